//! The HTTP surface: shared state, the router, health endpoints and the one
//! error type every handler answers with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::ServerConfig;
use crate::ingest::Intake;
use crate::store::EventStore;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The ingest path shared with NATS.
    pub intake: Intake,
    /// The event log.
    pub store: Arc<dyn EventStore>,
    /// Largest accepted body, in bytes.
    pub max_body_bytes: usize,
    /// Last known database state, so a change is logged once, not on every probe.
    db_up: Arc<AtomicBool>,
}

impl AppState {
    /// State for a server with this config over this store.
    pub fn new(store: Arc<dyn EventStore>, config: &ServerConfig) -> Self {
        Self {
            intake: Intake::new(store.clone(), config.intake_limits()),
            store,
            max_body_bytes: config.max_body_bytes,
            db_up: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Records the database state and logs a change.
    pub fn note_database(&self, up: bool, error: Option<&str>) {
        if self.db_up.swap(up, Ordering::Relaxed) != up {
            crate::telemetry::database_state_changed(up, error);
        }
    }
}

/// All routes. Tests call this with `tower::ServiceExt::oneshot` or serve it on port 0.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(crate::ingest::http::post_events))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // The ingest handler enforces its own limit with a message that names it.
        .layer(DefaultBodyLimit::disable())
        .fallback(not_found)
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers within two seconds.
async fn readyz(State(state): State<AppState>) -> Response {
    let probe = tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await;
    let error = match probe {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 2s".to_string()),
    };
    state.note_database(error.is_none(), error.as_deref());
    match error {
        None => Json(json!({"status": "ready", "checks": {"database": {"status": "up"}}}))
            .into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not_ready",
                "checks": {"database": {"status": "down", "error": e}}
            })),
        )
            .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see README.md for the API (POST /v1/events, GET /healthz, GET /readyz)",
    )
}

/// An error answer: `{"code": "...", "error": "..."}` with a status.
///
/// `code` is stable and machine-readable (see the error table in README.md);
/// `error` tells a person what is wrong and what to do.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human message.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "error": self.message})),
        )
            .into_response()
    }
}
