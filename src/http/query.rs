//! The query routes: `/v1/stats`, `/v1/keys`, `/v1/keys/{key}/stats`,
//! `/v1/projections` and `/openapi.json`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde_json::json;

use super::error::ApiError;
use super::state::AppState;
use crate::projection::status;
use crate::query::keys::{self, KeysRequest};
use crate::query::stats::{self, StatsRequest};
use crate::query::QueryError;

/// The OpenAPI 3.1 document of the whole HTTP API.
pub const OPENAPI: &str = include_str!("openapi.json");

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn pairs(q: Pairs) -> Result<Vec<(String, String)>, ApiError> {
    q.map(|Query(p)| p).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query_string",
            format!("the query string cannot be decoded: {e}"),
        )
    })
}

/// `GET /v1/stats`.
pub async fn get_stats(State(state): State<AppState>, q: Pairs) -> Result<Response, ApiError> {
    let req = StatsRequest::parse(pairs(q)?, Utc::now())?;
    let answer = stats::run(&state.store, &state.catalog, &req).await?;
    Ok(Json(answer).into_response())
}

/// `GET /v1/keys`.
pub async fn get_keys(State(state): State<AppState>, q: Pairs) -> Result<Response, ApiError> {
    let now = Utc::now();
    let req = KeysRequest::parse(pairs(q)?, now)?;
    let answer = keys::list(&state.store, &state.catalog, &req, now).await?;
    Ok(Json(answer).into_response())
}

/// `GET /v1/keys/{key}/stats`.
pub async fn get_key_page(
    State(state): State<AppState>,
    Path(key): Path<String>,
    q: Pairs,
) -> Result<Response, ApiError> {
    let now = Utc::now();
    let mut answer = keys::page(&state.store, &state.catalog, &key, pairs(q)?, now).await?;
    if let Some(quota) = crate::alert::quota::load(&state.store, &state.catalog, &key).await? {
        let status = crate::alert::quota::status(&state.store, &state.catalog, &quota, now).await?;
        answer.quota = serde_json::to_value(status).ok();
    }
    Ok(Json(answer).into_response())
}

/// `GET /v1/projections`.
pub async fn get_projections(
    State(state): State<AppState>,
    q: Pairs,
) -> Result<Response, ApiError> {
    crate::query::params::Params::new(pairs(q)?).finish("none")?;
    let specs: Vec<_> = state.catalog.specs.iter().map(|s| (**s).clone()).collect();
    let infos = status::list(&state.store, &specs, false)
        .await
        .map_err(|e| ApiError::from(QueryError::Unavailable(e.to_string())))?;
    let list: Vec<_> = infos
        .into_iter()
        .filter(|p| p.status != "orphaned")
        .map(|p| {
            json!({
                "name": p.name,
                "status": p.status,
                "dimensions": p.dimensions,
                "granularities": p.granularities,
                "timezone": p.timezone,
                "tables": p.tables.iter().map(|(t, _)| t).collect::<Vec<_>>(),
                "as_of": p.as_of.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                "lag_events": p.lag_events,
                "events_folded": p.events_folded,
                "checkpoint": p.checkpoint,
                "rebuilding": p.rebuilding,
                "retention": specs.iter().find(|s| s.name == p.name).map(|s| {
                    s.retention.iter().map(|(g, d)| (g.as_str().to_string(), json!(humantime::format_duration(*d).to_string()))).collect::<serde_json::Map<_, _>>()
                }),
            })
        })
        .collect();
    Ok(Json(json!({"projections": list})).into_response())
}

/// `GET /openapi.json`.
pub async fn get_openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
