//! Operator routes: `/metrics`, `/healthz`, `/readyz`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::state::AppState;
use crate::health::NatsState;

/// Prometheus text exposition (format 0.0.4).
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    summary = "Prometheus metrics (text format 0.0.4); see README \"Metrics\"",
    responses((status = 200, description = "Prometheus exposition", content_type = "text/plain", body = String)),
)]
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

/// The liveness answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    #[schema(value_type = String, pattern = "^ok$")]
    pub status: &'static str,
}

/// Liveness: the process is up.
#[utoipa::path(
    get, path = "/healthz", tag = "operations", summary = "Liveness",
    responses((status = 200, description = "The process is up", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// One dependency's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// `up` or `down` (NATS also `disabled`).
    #[schema(value_type = String)]
    pub status: &'static str,
}

/// Each dependency's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    /// The event log.
    pub database: Check,
    /// The NATS connection.
    pub nats: Check,
}

/// The readiness answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, `degraded` (NATS down; HTTP ingest still works) or `not_ready`.
    #[schema(value_type = String)]
    pub status: &'static str,
    /// Each dependency.
    pub checks: Checks,
}

/// Ready when the database answers within two seconds.
///
/// NATS being down does not make Tally unready: HTTP ingest still works and the
/// stream keeps the messages; the answer says `degraded` and shows the state.
#[utoipa::path(
    get, path = "/readyz", tag = "operations", summary = "Readiness (database reachable)",
    responses(
        (status = 200, description = "`ready`, or `degraded` when NATS is down", body = Readiness),
        (status = 503, description = "`not_ready`: the database does not answer", body = Readiness),
    ),
)]
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
    let database = Check {
        status: if error.is_none() { "up" } else { "down" },
    };
    let (code, status) = match (&error, nats) {
        (Some(_), _) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        (None, NatsState::Down) => (StatusCode::OK, "degraded"),
        (None, _) => (StatusCode::OK, "ready"),
    };
    let checks = Checks {
        database,
        nats: Check {
            status: nats.as_str(),
        },
    };
    (code, Json(Readiness { status, checks })).into_response()
}
