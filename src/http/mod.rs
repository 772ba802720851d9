//! The HTTP API: the only layer that knows axum, status codes and JSON
//! response shapes. Handlers are thin: they parse the request, call the
//! stage that owns the behaviour (`ingest`, `query`, `alert`, `auth`) and map
//! its answer or error ([`error`]) to a response.
//!
//! [`router`] lists every route once; [`serve`] runs it with bounded
//! connections; [`auth`] is the token middleware.

pub mod alerts;
pub mod auth;
pub mod body;
pub mod error;
pub mod ingest;
pub mod ops;
pub mod query;
pub mod serve;
pub mod state;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;
pub use serve::{serve, ServeLimits};
pub use state::AppState;

/// All routes. Tests call this with `tower::ServiceExt::oneshot` or serve it on port 0.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(ingest::post_events))
        .route("/v1/stats", get(query::get_stats))
        .route("/v1/keys", get(query::get_keys))
        .route("/v1/keys/{key}/stats", get(query::get_key_page))
        .route(
            "/v1/keys/{key}/quota",
            get(alerts::get_quota)
                .put(alerts::put_quota)
                .delete(alerts::delete_quota),
        )
        .route(
            "/v1/alert-rules",
            get(alerts::list_rules).post(alerts::create_rule),
        )
        .route(
            "/v1/alert-rules/{name}",
            get(alerts::get_rule)
                .put(alerts::put_rule)
                .delete(alerts::delete_rule),
        )
        .route("/v1/alert-rules/{name}/audit", get(alerts::rule_audit))
        .route("/v1/alerts", get(alerts::list_alerts))
        .route("/v1/projections", get(query::get_projections))
        .route("/openapi.json", get(query::get_openapi))
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        // The ingest handler enforces its own limit with a message that names it.
        .layer(DefaultBodyLimit::disable())
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require,
        ))
        .with_state(state)
}
