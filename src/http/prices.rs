//! `/v1/prices`: the price catalog (list, put, delete, audit, reprice). The
//! work is [`crate::price`]'s; here only parsing and status codes.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::alerts::{audit_view, AuditList};
use super::auth::actor;
use super::body::read_admin_body;
use super::error::ApiError;
use super::openapi::{ActorParam, ErrorBody};
use super::query::{pairs, Pairs};
use super::state::AppState;
use crate::price::{PriceError, PriceInput, PriceOut, PutAnswer};

fn invalid(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_price", message)
}

fn instant(field: &str, v: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            invalid(format!(
                "`{field}` `{v}` is not an RFC 3339 time ({e}); e.g. 2026-11-01T00:00:00Z"
            ))
        })
}

/// The stored prices.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PriceList {
    /// By model, api and effective_from.
    pub prices: Vec<PriceOut>,
}

/// Filters of `GET /v1/prices`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PriceFilter {
    /// Only this model.
    pub model: Option<String>,
    /// Only prices narrowed to this api (`api=` alone: only model-only prices).
    pub api: Option<String>,
    /// Only the prices in effect at this instant (RFC 3339).
    pub at: Option<String>,
}

/// `GET /v1/prices`.
#[utoipa::path(
    get, path = "/v1/prices", tag = "prices",
    summary = "The price catalog, with each price's effective range",
    params(PriceFilter),
    responses(
        (status = 200, description = "The prices", body = PriceList),
        (status = 400, description = "An unknown parameter or a bad `at` (`invalid_price`, `invalid_parameter`)", body = ErrorBody),
    )
)]
pub async fn list_prices(
    State(state): State<AppState>,
    q: Pairs,
) -> Result<Json<PriceList>, ApiError> {
    let mut p = crate::query::params::Params::new(pairs(q)?);
    let model = p.take_one("model")?;
    let api = p.take_one("api")?;
    let at = p.take_one("at")?;
    p.finish("model, api, at")?;
    let at = at.as_deref().map(|v| instant("at", v)).transpose()?;
    Ok(Json(PriceList {
        prices: state
            .pricer
            .list(model.as_deref(), api.as_deref(), at)
            .await?,
    }))
}

/// One price or a list of them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PriceBody {
    /// Several prices, applied in one transaction.
    Many(Vec<PriceInput>),
    /// One price.
    One(PriceInput),
}

/// `PUT /v1/prices`.
#[utoipa::path(
    put, path = "/v1/prices", tag = "prices",
    summary = "Create or update prices (one object or an array; idempotent)",
    description = "A price is matched by `id` when given, otherwise by (api, model, effective_from); a price sent exactly as stored changes nothing. Amounts are decimal currency units (strings, or JSON numbers read exactly) with at most 9 fractional digits, per million tokens for token prices. All prices of a request are applied in one transaction, each change audited (GET /v1/prices/audit). A change whose effective range covers events already folded queues their restatement (see `restating` in GET /v1/projections).",
    params(ActorParam),
    request_body(content = PriceBody, description = "One price or an array of at most 10,000"),
    responses(
        (status = 200, description = "Applied", body = PutAnswer),
        (status = 400, description = "Invalid price (`invalid_price`): negative or too precise amount, unknown field, bad `effective_from`, two prices of one (api, model) at the same instant…; the message says what to fix", body = ErrorBody),
        (status = 413, description = "The body is larger than 1 MiB", body = ErrorBody),
    )
)]
pub async fn put_prices(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<PutAnswer>, ApiError> {
    let body = read_admin_body(&state, &headers, body).await?;
    let inputs = crate::price::from_tally_file(
        std::str::from_utf8(&body).map_err(|_| invalid("the body is not UTF-8 JSON".into()))?,
    )
    .map_err(|e| {
        invalid(e.to_string().replace(
            "not a Tally price file",
            "the body is not a price or a list of prices",
        ))
    })?;
    Ok(Json(state.pricer.put(&inputs, &actor(&headers)).await?))
}

/// The `{id}` path segment of a price.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PriceIdParam {
    /// The price's id.
    pub id: String,
}

/// `DELETE /v1/prices/{id}`.
#[utoipa::path(
    delete, path = "/v1/prices/{id}", tag = "prices",
    summary = "Delete a price (audited); its events are repriced",
    description = "Events it priced fall back to the previous price of the same (api, model), or the model-only price, or become `unpriced`; the affected buckets are restated.",
    params(PriceIdParam, ActorParam),
    responses(
        (status = 200, description = "Deleted: the price as it was", body = PriceOut),
        (status = 404, description = "No such price", body = ErrorBody),
    )
)]
pub async fn delete_price(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PriceOut>, ApiError> {
    Ok(Json(state.pricer.delete(&id, &actor(&headers)).await?))
}

/// `GET /v1/prices/audit`.
#[utoipa::path(
    get, path = "/v1/prices/audit", tag = "prices",
    summary = "Who changed which price, when, from what to what (newest first, at most 1000)",
    responses(
        (status = 200, description = "Audit entries (`price.create`, `price.update`, `price.delete`, `price.reprice`)", body = AuditList),
    )
)]
pub async fn price_audit(State(state): State<AppState>) -> Result<Json<AuditList>, ApiError> {
    let rows = state
        .store
        .prices()
        .audit_log(None, 1000)
        .await
        .map_err(PriceError::from)?;
    Ok(Json(AuditList {
        entries: rows.iter().map(audit_view).collect(),
    }))
}

/// `POST /v1/prices/reprice`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepriceRequest {
    /// Restate from this instant (RFC 3339) to the end of the log.
    pub from: String,
    /// Only this model's events change (whole buckets are restated).
    #[serde(default)]
    pub model: Option<String>,
}

/// What a reprice queued.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RepriceAnswer {
    /// Restatements queued (per projection and month of the range).
    pub restatements: usize,
}

/// `POST /v1/prices/reprice`.
#[utoipa::path(
    post, path = "/v1/prices/reprice", tag = "prices",
    summary = "Force the restatement of every projection from an instant on",
    description = "Price changes restate what they change by themselves; this is for after a restore or a manual edit. Audited as `price.reprice`.",
    params(ActorParam),
    request_body(content = RepriceRequest),
    responses(
        (status = 202, description = "Queued", body = RepriceAnswer),
        (status = 400, description = "Bad `from` or body (`invalid_price`)", body = ErrorBody),
    )
)]
pub async fn reprice(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<RepriceAnswer>), ApiError> {
    let body = read_admin_body(&state, &headers, body).await?;
    let req: RepriceRequest = serde_json::from_slice(&body)
        .map_err(|e| invalid(format!("the body is not a reprice request: {e}")))?;
    let from = instant("from", &req.from)?;
    let restatements = state
        .pricer
        .reprice(from, req.model.as_deref(), &actor(&headers))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(RepriceAnswer { restatements })))
}
