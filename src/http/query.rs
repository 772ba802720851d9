//! The query routes: `/v1/stats`, `/v1/keys`, `/v1/keys/{key}/stats`,
//! `/v1/projections` and `/openapi.json`.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::openapi::{ErrorBody, KeyPageParams, KeysParams, StatsParams};
use super::state::AppState;
use crate::alert::quota::QuotaStatus;
use crate::projection::status;
use crate::query::keys::{self, KeyPage, KeysRequest, KeysResponse};
use crate::query::output::rfc3339_opt;
use crate::query::stats::{self, StatsRequest, StatsResponse};
use crate::query::QueryError;

pub(super) type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

pub(super) fn pairs(q: Pairs) -> Result<Vec<(String, String)>, ApiError> {
    q.map(|Query(p)| p).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query_string",
            format!("the query string cannot be decoded: {e}"),
        )
    })
}

/// `GET /v1/stats`.
#[utoipa::path(
    get, path = "/v1/stats", tag = "query",
    summary = "Aggregated time series per group, with totals",
    description = "Answered from the narrowest projection that covers group_by and the filters at the granularity and timezone (or from a finer table whose buckets tile them, re-bucketed). Buckets are atomic: every bucket overlapping [from, to) is counted in full; `covered` says which range that is. At most 10,000 buckets per answer.",
    params(StatsParams),
    responses(
        (status = 200, description = "Series and totals", body = StatsResponse),
        (status = 400, description = "A parameter is invalid, `from` is not before `to`, the range holds too many buckets, or no loaded projection answers this grouping (`no_projection`); the message says what to change", body = ErrorBody),
    )
)]
pub async fn get_stats(
    State(state): State<AppState>,
    q: Pairs,
) -> Result<Json<StatsResponse>, ApiError> {
    let req = StatsRequest::parse(pairs(q)?, Utc::now())?;
    Ok(Json(stats::run(&state.store, &state.catalog, &req).await?))
}

/// `GET /v1/keys`.
#[utoipa::path(
    get, path = "/v1/keys", tag = "query",
    summary = "API keys ranked over a range",
    description = "Exact to the minute: the range is split into months, days, hours and minutes of the loaded projections.",
    params(KeysParams),
    responses(
        (status = 200, description = "Keys, best first", body = KeysResponse),
        (status = 400, description = "A parameter is invalid, `from` is not before `to`, or no loaded projection has the `key` dimension in this timezone", body = ErrorBody),
    )
)]
pub async fn get_keys(
    State(state): State<AppState>,
    q: Pairs,
) -> Result<Json<KeysResponse>, ApiError> {
    let now = Utc::now();
    let req = KeysRequest::parse(pairs(q)?, now)?;
    Ok(Json(
        keys::list(&state.store, &state.catalog, &req, now).await?,
    ))
}

/// The key page with the key's quota.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyPageAnswer {
    /// Today, this month, the last 24 h, by model and by api.
    #[serde(flatten)]
    pub page: KeyPage,
    /// The key's rolling quota status now (as `GET /v1/keys/{key}/quota`); `null` without one.
    pub quota: Option<QuotaStatus>,
}

/// `GET /v1/keys/{key}/stats`.
#[utoipa::path(
    get, path = "/v1/keys/{key}/stats", tag = "query",
    summary = "One key's page: today, this month, last 24 h, by model and api, and its quota",
    params(KeyPageParams),
    responses(
        (status = 200, description = "The key page (zeros for a key without usage)", body = KeyPageAnswer),
        (status = 400, description = "`at` or `tz` is invalid, or no loaded projection has the `key` dimension in this timezone", body = ErrorBody),
    )
)]
pub async fn get_key_page(
    State(state): State<AppState>,
    Path(key): Path<String>,
    q: Pairs,
) -> Result<Json<KeyPageAnswer>, ApiError> {
    let now = Utc::now();
    let page = keys::page(&state.store, &state.catalog, &key, pairs(q)?, now).await?;
    let quota = match crate::alert::quota::load(&state.store, &state.catalog, &key).await? {
        Some(q) => Some(crate::alert::quota::status(&state.store, &state.catalog, &q, now).await?),
        None => None,
    };
    Ok(Json(KeyPageAnswer { page, quota }))
}

/// One projection as `GET /v1/projections` describes it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionView {
    /// Projection name (its file in projections/).
    pub name: String,
    /// `ok`, `new` (no checkpoint yet) or `changed` (needs `tally projections rebuild`).
    #[schema(value_type = String)]
    pub status: &'static str,
    /// Dimensions, in table column order.
    #[schema(value_type = Vec<String>)]
    pub dimensions: Vec<&'static str>,
    /// Granularities.
    #[schema(value_type = Vec<String>)]
    pub granularities: Vec<&'static str>,
    /// Timezone of hour/day/month buckets.
    pub timezone: String,
    /// Its tables, one per granularity.
    pub tables: Vec<String>,
    /// Every event committed before this instant is folded in.
    #[serde(serialize_with = "rfc3339_opt")]
    pub as_of: Option<DateTime<Utc>>,
    /// Events in the log after the checkpoint.
    pub lag_events: Option<i64>,
    /// Events folded since the tables were built.
    pub events_folded: Option<i64>,
    /// Checkpoint cursor as `tx:seq`.
    pub checkpoint: Option<String>,
    /// A rebuild is in progress.
    pub rebuilding: bool,
    /// Restatements queued for this projection (corrections being applied to
    /// its buckets); 0 when none.
    pub restating: i64,
    /// How long each granularity's buckets are kept (`8days`); absent granularities are kept forever.
    pub retention: BTreeMap<String, String>,
    /// Each tier's checkpoint: the minute and hour tables (`fine`) commit
    /// with every batch, the day and month tables (`coarse`) at most every
    /// `TALLY_COARSE_COMMIT_INTERVAL` while events keep coming. `as_of` and
    /// `lag_events` above are the lowest `as_of` and the largest lag of
    /// these; `checkpoint` is the finest tier's.
    pub tiers: Vec<TierView>,
}

/// One tier of a projection in `GET /v1/projections`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TierView {
    /// `fine` (minute and hour tables) or `coarse` (day and month tables).
    #[schema(value_type = String)]
    pub tier: &'static str,
    /// The tier's granularities.
    #[schema(value_type = Vec<String>)]
    pub granularities: Vec<&'static str>,
    /// Every event committed before this instant is in the tier's tables.
    #[serde(serialize_with = "rfc3339_opt")]
    pub as_of: Option<DateTime<Utc>>,
    /// Events in the log after the tier's checkpoint.
    pub lag_events: Option<i64>,
    /// Checkpoint cursor as `tx:seq`.
    pub checkpoint: Option<String>,
}

/// The `GET /v1/projections` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Projections {
    /// Every loaded projection.
    pub projections: Vec<ProjectionView>,
}

/// The parameters `GET /v1/projections` accepts (none).
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NoParams {}

/// `GET /v1/projections`.
#[utoipa::path(
    get, path = "/v1/projections", tag = "query",
    summary = "What can be queried: dimensions, granularities, timezone, as_of, lag",
    responses(
        (status = 200, description = "Projections", body = Projections),
        (status = 400, description = "A query parameter was given; this route takes none", body = ErrorBody),
    )
)]
pub async fn get_projections(
    State(state): State<AppState>,
    q: Pairs,
) -> Result<Json<Projections>, ApiError> {
    crate::query::params::Params::new(pairs(q)?).finish("none")?;
    let specs: Vec<_> = state.catalog.specs.iter().map(|s| (**s).clone()).collect();
    let infos = status::list(&state.store, &specs, false)
        .await
        .map_err(|e| ApiError::from(QueryError::Unavailable(e.to_string())))?;
    let restating = state
        .store
        .corrections()
        .pending_counts()
        .await
        .map_err(|e| ApiError::from(QueryError::Unavailable(e.to_string())))?;
    let projections = infos
        .into_iter()
        .filter(|p| p.status != "orphaned")
        .map(|p| ProjectionView {
            restating: restating
                .iter()
                .find(|(n, _)| *n == p.name)
                .map_or(0, |(_, n)| *n),
            retention: specs
                .iter()
                .find(|s| s.name == p.name)
                .map(|s| {
                    s.retention
                        .iter()
                        .map(|(g, d)| {
                            (
                                g.as_str().to_string(),
                                humantime::format_duration(*d).to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            tables: p.tables.into_iter().map(|(t, _)| t).collect(),
            name: p.name,
            status: p.status,
            dimensions: p.dimensions,
            granularities: p.granularities,
            timezone: p.timezone,
            as_of: p.as_of,
            lag_events: p.lag_events,
            events_folded: p.events_folded,
            checkpoint: p.checkpoint,
            rebuilding: p.rebuilding,
            tiers: p
                .tiers
                .into_iter()
                .map(|t| TierView {
                    tier: t.tier,
                    granularities: t.granularities,
                    as_of: t.as_of,
                    lag_events: t.lag_events,
                    checkpoint: t.checkpoint,
                })
                .collect(),
        })
        .collect();
    Ok(Json(Projections { projections }))
}

/// `GET /openapi.json`.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    summary = "This document (OpenAPI 3.1), generated from the code",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)),
)]
pub async fn get_openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::DOCUMENT.as_str(),
    )
        .into_response()
}
