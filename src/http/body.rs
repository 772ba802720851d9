//! Reading request bodies within a limit and a time, the same way on every route.

use std::time::Duration;

use axum::http::StatusCode;

use super::error::ApiError;
use super::state::AppState;

/// Largest body of every route but `POST /v1/events` (rules, quotas): 1 MiB.
pub const ADMIN_MAX_BODY_BYTES: usize = 1024 * 1024;
/// How much of an oversized body is read and discarded before the `413`, so a
/// client that sends its whole body before reading the answer sees the status
/// instead of a connection reset (nginx's `lingering_close`).
pub const DISCARD_MAX_BYTES: usize = 64 * 1024 * 1024;
/// How long an oversized body is read and discarded at most.
pub const DISCARD_MAX_TIME: Duration = Duration::from_secs(10);

/// Reads a request body of at most `limit` bytes.
///
/// Over the limit the answer is `413 body_too_large` naming the limit and
/// `hint` (how to fix it). The rest of an oversized body is read and
/// discarded first, up to [`DISCARD_MAX_BYTES`] and [`DISCARD_MAX_TIME`],
/// unless the client asked `Expect: 100-continue` (it has sent nothing yet).
///
/// A body that does not arrive within `timeout` is answered `408
/// request_timeout` (a client trickling bytes cannot hold a connection).
pub async fn read_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
    timeout: Duration,
    hint: &str,
) -> Result<bytes::Bytes, ApiError> {
    match tokio::time::timeout(timeout, read_body_within(headers, body, limit, hint)).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} (TALLY_HTTP_BODY_TIMEOUT); send it at once, or split it",
                humantime::format_duration(timeout)
            ),
        )),
    }
}

async fn read_body_within(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
    hint: &str,
) -> Result<bytes::Bytes, ApiError> {
    use axum::http::header::{CONTENT_LENGTH, EXPECT};
    use futures::StreamExt;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the limit of {limit} bytes; {hint}"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let waits_for_continue = headers
        .get(EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut over = declared.is_some_and(|d| d > limit as u64);
    if over && waits_for_continue {
        return Err(too_large());
    }
    let mut buf = bytes::BytesMut::with_capacity(if over {
        0
    } else {
        declared.map_or(0, |d| d as usize).min(limit)
    });
    let mut seen: usize = 0;
    let mut stream = body.into_data_stream();
    let discard_until = tokio::time::Instant::now() + DISCARD_MAX_TIME;
    loop {
        let next = if over {
            match tokio::time::timeout_at(discard_until, stream.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        } else {
            stream.next().await
        };
        match next {
            Some(Ok(chunk)) => {
                seen = seen.saturating_add(chunk.len());
                if !over && buf.len() + chunk.len() > limit {
                    over = true;
                    buf = bytes::BytesMut::new();
                }
                if !over {
                    buf.extend_from_slice(&chunk);
                } else if seen > limit.saturating_add(DISCARD_MAX_BYTES) {
                    break;
                }
            }
            Some(Err(_)) if over => break,
            Some(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    format!("could not read the request body: {e}"),
                ))
            }
            None => break,
        }
    }
    if over {
        Err(too_large())
    } else {
        Ok(buf.freeze())
    }
}

/// [`read_body`] with [`ADMIN_MAX_BODY_BYTES`], for rules and quotas.
pub async fn read_admin_body(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<bytes::Bytes, ApiError> {
    read_body(
        headers,
        body,
        ADMIN_MAX_BODY_BYTES,
        state.body_timeout,
        "a rule or quota is a small JSON object",
    )
    .await
}
