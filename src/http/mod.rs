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
pub mod corrections;
pub mod dashboard;
pub mod error;
pub mod guard;
pub mod ingest;
pub mod openapi;
pub mod ops;
pub mod prices;
pub mod query;
pub mod serve;
pub mod state;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;
pub use serve::{serve, ServeLimits};
pub use state::AppState;

/// The route table, once: each entry registers the handlers with axum and
/// their `#[utoipa::path]` description with the OpenAPI document.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(ingest::post_events))
        .routes(routes!(query::get_stats))
        .routes(routes!(query::get_keys))
        .routes(routes!(query::get_key_page))
        .routes(routes!(
            alerts::get_quota,
            alerts::put_quota,
            alerts::delete_quota
        ))
        .routes(routes!(alerts::list_rules, alerts::create_rule))
        .routes(routes!(
            alerts::get_rule,
            alerts::put_rule,
            alerts::delete_rule
        ))
        .routes(routes!(alerts::rule_audit))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(
            corrections::post_correction,
            corrections::list_corrections
        ))
        .routes(routes!(corrections::get_correction))
        .routes(routes!(corrections::revert_correction))
        .routes(routes!(prices::list_prices, prices::put_prices))
        .routes(routes!(prices::delete_price))
        .routes(routes!(prices::price_audit))
        .routes(routes!(prices::reprice))
        .routes(routes!(query::get_projections))
        .routes(routes!(query::get_openapi))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
}

/// All routes. Tests call this with `tower::ServiceExt::oneshot` or serve it on port 0.
pub fn router(state: AppState) -> Router {
    let (mut routes, doc) = routes().split_for_parts();
    let gate = guard::Gate {
        auth: state.auth.clone(),
        open: std::sync::Arc::new(guard::OpenGuard::new(
            &state.allowed_hosts,
            &guard::openapi_json(&doc),
        )),
    };
    if let Some(refresh) = state.dashboard {
        routes = routes.merge(dashboard::routes(refresh));
    }
    routes
        // The ingest handler enforces its own limit with a message that names it.
        .layer(DefaultBodyLimit::disable())
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(gate, auth::require))
        .layer(axum::middleware::from_fn(guard::headers))
        .with_state(state)
}
