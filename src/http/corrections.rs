//! `/v1/corrections`: void events (by ids or by a key's range), list,
//! show, revert. The work is [`crate::correction`]'s; here only parsing and
//! status codes.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::actor;
use super::body::read_admin_body;
use super::error::ApiError;
use super::openapi::{ActorParam, ErrorBody};
use super::query::{pairs, Pairs};
use super::state::AppState;
use crate::correction::{CorrectionAnswer, CorrectionRequest, RevertRequest};

/// Most voided ids shown by `GET /v1/corrections/{id}`.
const SHOWN_IDS: i64 = 10_000;

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_correction",
            format!("the body is not a valid correction: {e}"),
        )
    })
}

/// `POST /v1/corrections`: 201 when recorded, 200 for the same request again.
#[utoipa::path(
    post, path = "/v1/corrections", tag = "corrections",
    summary = "Void events: by ids, or one key's events in a time range",
    description = "The log is never changed: the correction and the events it voids are recorded, and every aggregate bucket they touch is restated in the background (see `restating` in GET /v1/projections). Idempotent by `id`: the same request again answers the same (200); another request under the same id is 409. A range (`key`, `from`, `to`, half-open on the event `ts`, optionally `api` and `model`) voids exactly the events stored when it is accepted and may reach back at most the late-arrival horizon. A later re-send of a voided id stays a duplicate and stays voided; to amend an event, void it and send the corrected one under a new id.",
    params(ActorParam),
    request_body(content = CorrectionRequest, description = "The correction"),
    responses(
        (status = 201, description = "Recorded", body = CorrectionAnswer),
        (status = 200, description = "The same request was recorded before: its answer", body = CorrectionAnswer),
        (status = 400, description = "Invalid request (`invalid_correction`): no reason, an empty `void`, ids and a range together, a range older than the late-arrival horizon, …; the message says what to fix", body = ErrorBody),
        (status = 409, description = "The id was used for another request (`correction_conflict`)", body = ErrorBody),
        (status = 413, description = "The body is larger than 1 MiB", body = ErrorBody),
    )
)]
pub async fn post_correction(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_admin_body(&state, &headers, body).await?;
    let req: CorrectionRequest = parse(&body)?;
    let (answer, new) = state.corrector.submit(&req, &actor(&headers)).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)).into_response())
}

/// `?limit=` of the list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Most corrections returned, newest first (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// The list of corrections.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CorrectionList {
    /// Newest first.
    pub corrections: Vec<CorrectionAnswer>,
}

/// `GET /v1/corrections`.
#[utoipa::path(
    get, path = "/v1/corrections", tag = "corrections",
    summary = "Corrections, newest first",
    params(ListParams),
    responses(
        (status = 200, description = "The corrections", body = CorrectionList),
        (status = 400, description = "Invalid `limit`", body = ErrorBody),
    )
)]
pub async fn list_corrections(
    State(state): State<AppState>,
    q: Pairs,
) -> Result<Json<CorrectionList>, ApiError> {
    let mut p = crate::query::params::Params::new(pairs(q)?);
    let limit = p.count("limit", crate::correction::MAX_LIST as usize)?;
    p.finish("limit")?;
    let limit = match limit {
        None => 100,
        Some(0) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                "`limit` must be from 1 to 1000",
            ))
        }
        Some(n) => n as i64,
    };
    Ok(Json(CorrectionList {
        corrections: state.corrector.list(limit).await?,
    }))
}

/// The `{id}` path segment of a correction.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CorrectionIdParam {
    /// The correction's id.
    pub id: String,
}

/// One correction with the ids it voided.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CorrectionDetail {
    /// The correction.
    #[serde(flatten)]
    pub correction: CorrectionAnswer,
    /// The ids it voided (sorted; at most 10,000), kept after a revert.
    pub event_ids: Vec<String>,
}

/// `GET /v1/corrections/{id}`.
#[utoipa::path(
    get, path = "/v1/corrections/{id}", tag = "corrections",
    summary = "One correction and the events it voided",
    params(CorrectionIdParam),
    responses(
        (status = 200, description = "The correction", body = CorrectionDetail),
        (status = 404, description = "No such correction", body = ErrorBody),
    )
)]
pub async fn get_correction(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<CorrectionDetail>, ApiError> {
    let (correction, event_ids) = state.corrector.get(&id, SHOWN_IDS).await?;
    Ok(Json(CorrectionDetail {
        correction,
        event_ids,
    }))
}

/// `POST /v1/corrections/{id}/revert`.
#[utoipa::path(
    post, path = "/v1/corrections/{id}/revert", tag = "corrections",
    summary = "Undo a correction (recorded; its buckets are restated again)",
    description = "Its events count again, unless another correction voids them. A reverted correction stays listed, with `reverted_at`, `reverted_by` and `revert_reason`.",
    params(CorrectionIdParam, ActorParam),
    request_body(content = RevertRequest, description = "Why"),
    responses(
        (status = 200, description = "Reverted", body = CorrectionAnswer),
        (status = 400, description = "No `reason` (`invalid_correction`)", body = ErrorBody),
        (status = 404, description = "No such correction", body = ErrorBody),
        (status = 409, description = "Reverted already (`already_reverted`)", body = ErrorBody),
        (status = 413, description = "The body is larger than 1 MiB", body = ErrorBody),
    )
)]
pub async fn revert_correction(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<CorrectionAnswer>, ApiError> {
    let body = read_admin_body(&state, &headers, body).await?;
    let req: RevertRequest = parse(&body)?;
    Ok(Json(
        state.corrector.revert(&id, &req, &actor(&headers)).await?,
    ))
}
