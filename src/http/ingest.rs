//! `POST /v1/events`: reads the body within the size limit, hands it to
//! [`Intake`](crate::ingest::Intake), and maps the outcome to a status code.

use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use super::body::read_body;
use super::error::ApiError;
use super::openapi::{ErrorBody, EventsBody};
use super::state::AppState;
use crate::event::codec::CodecError;
use crate::ingest::{IngestError, IngestReport};
use crate::store::Origin;

/// Ingests one body. Answers 200 only after the accepted events are committed.
#[utoipa::path(
    post, path = "/v1/events", tag = "ingest",
    summary = "Ingest usage events",
    description = "One event, a JSON array, NDJSON, MessagePack (one map or an array), or CloudEvents (structured or batch); see README \"Ingest\". Answers after the commit with each event's outcome: invalid events are listed in `rejected` and do not stop the others.",
    request_body(
        description = "Usage events",
        content(
            (EventsBody = "application/json"),
            (String = "application/x-ndjson"),
            (Vec<u8> = "application/msgpack"),
            (EventsBody = "application/cloudevents+json"),
            (EventsBody = "application/cloudevents-batch+json"),
        ),
    ),
    responses(
        (status = 200, description = "The body was decoded: each event's outcome (valid events are stored even when others are `rejected` or `conflicting`)", body = IngestReport),
        (status = 400, description = "The body is empty or cannot be decoded at all", body = ErrorBody),
        (status = 408, description = "The body did not arrive within TALLY_HTTP_BODY_TIMEOUT", body = ErrorBody),
        (status = 413, description = "The body is larger than TALLY_MAX_BODY_BYTES or holds more than TALLY_MAX_BATCH_EVENTS events", body = ErrorBody),
        (status = 415, description = "The content type is not one of the above", body = ErrorBody),
        (status = 503, description = "The event log is unavailable; nothing was stored. Retry with the same ids", body = ErrorBody),
    )
)]
pub async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<IngestReport>, ApiError> {
    let bytes = read_body(
        &headers,
        body,
        state.max_body_bytes,
        state.body_timeout,
        "split the batch (TALLY_MAX_BODY_BYTES sets the limit)",
    )
    .await?;
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let origin = Origin {
        source: "http",
        subject: Some("/v1/events".to_string()),
    };
    match state.intake.ingest(&bytes, content_type, &origin).await {
        Ok(report) => {
            state.health.note_database(true, None);
            Ok(Json(report))
        }
        Err(IngestError::Body(e)) => Err(match e {
            CodecError::UnsupportedMediaType(_) | CodecError::Unrecognised(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                e.to_string(),
            ),
            CodecError::TooManyEvents { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_events",
                e.to_string(),
            ),
            CodecError::Empty => {
                ApiError::new(StatusCode::BAD_REQUEST, "empty_batch", e.to_string())
            }
            CodecError::Unparseable(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "unparseable_body", e.to_string())
            }
        }),
        Err(IngestError::Store(e)) => {
            let message = e.to_string();
            state.health.note_database(false, Some(&message));
            tracing::warn!(error = %message, "append failed; answering 503");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the event log is unavailable; nothing from this request was stored. Retry with the same ids: duplicates are harmless",
            ))
        }
    }
}
