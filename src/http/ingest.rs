//! `POST /v1/events`: reads the body within the size limit, hands it to
//! [`Intake`](crate::ingest::Intake), and maps the outcome to a status code.

use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use super::body::read_body;
use super::error::ApiError;
use super::state::AppState;
use crate::event::codec::CodecError;
use crate::ingest::{IngestError, IngestReport};
use crate::store::Origin;

/// Ingests one body. Answers 200 only after the accepted events are committed.
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
