//! Operator routes: `/metrics`, `/healthz`, `/readyz`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::state::AppState;
use crate::health::NatsState;

/// Prometheus text exposition (format 0.0.4).
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = crate::metrics::render(&state.store).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers within two seconds.
///
/// NATS being down does not make Tally unready: HTTP ingest still works and the
/// stream keeps the messages; the answer says `degraded` and shows the state.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let probe = tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await;
    let error = match probe {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 2s".to_string()),
    };
    state
        .health
        .note_database(error.is_none(), error.as_deref());
    let nats = state.health.nats();
    // The probe is unauthenticated: it says which dependency is down, never
    // the database's error text (host names, users); that goes to the log.
    let database = match &error {
        None => json!({"status": "up"}),
        Some(_) => json!({"status": "down"}),
    };
    let (code, status) = match (&error, nats) {
        (Some(_), _) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        (None, NatsState::Down) => (StatusCode::OK, "degraded"),
        (None, _) => (StatusCode::OK, "ready"),
    };
    (
        code,
        Json(json!({
            "status": status,
            "checks": {"database": database, "nats": {"status": nats.as_str()}}
        })),
    )
        .into_response()
}
