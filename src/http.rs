//! The HTTP surface: shared state, the router, health endpoints and the one
//! error type every handler answers with.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::alert::http as alert;
use crate::config::ServerConfig;
use crate::health::{Health, NatsState};
use crate::ingest::Intake;
use crate::query::http as query;
use crate::query::Catalog;
use crate::store::EventStore;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The ingest path shared with NATS.
    pub intake: Intake,
    /// The event log.
    pub store: Arc<dyn EventStore>,
    /// Largest accepted body, in bytes.
    pub max_body_bytes: usize,
    /// Longest time to receive a whole body.
    pub body_timeout: Duration,
    /// Dependency states shared with the background tasks.
    pub health: Arc<Health>,
    /// The projections the query module can read.
    pub catalog: Arc<Catalog>,
    /// Shared by the projectors and the alert evaluator of this process; a
    /// rule or quota change wakes the evaluator through it.
    pub signal: Arc<crate::projection::projector::FoldSignal>,
    /// The API token check.
    pub auth: Arc<crate::auth::Auth>,
}

impl AppState {
    /// State for a server with this config over this store.
    pub fn new(
        store: Arc<dyn EventStore>,
        config: &ServerConfig,
        health: Arc<Health>,
        catalog: Catalog,
    ) -> Self {
        Self {
            intake: Intake::new(store.clone(), config.intake_limits()),
            store: store.clone(),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.http_body_timeout,
            health,
            catalog: Arc::new(catalog),
            signal: Arc::default(),
            auth: Arc::new(crate::auth::Auth::new(
                store.clone(),
                config.http_addr,
                config.insecure_no_auth,
            )),
        }
    }
}

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

/// Limits of the HTTP server itself (see [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest wait for a request's headers (and idle keep-alive).
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown`, then lets open
/// connections finish their request until `deadline`.
///
/// Unlike `axum::serve`, it bounds what slow or idle clients can hold: at
/// most `max_connections` at once (the rest wait in the listen backlog), and
/// a connection that does not send a request's headers within
/// `header_timeout` is closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: tokio_util::sync::CancellationToken,
    deadline: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // TCP_NODELAY: an answer is written in several segments; Nagle would
        // hold the last one back until the client acknowledges the first.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let conn =
            builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
        while connections.try_join_next().is_some() {}
    }
    tokio::select! {
        _ = async { while connections.join_next().await.is_some() {} } => {}
        // Idle keep-alive clients must not hold the process past the deadline.
        _ = deadline.cancelled() => connections.abort_all(),
    }
}

/// All routes. Tests call this with `tower::ServiceExt::oneshot` or serve it on port 0.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(crate::ingest::http::post_events))
        .route("/v1/stats", get(query::get_stats))
        .route("/v1/keys", get(query::get_keys))
        .route("/v1/keys/{key}/stats", get(query::get_key_page))
        .route(
            "/v1/keys/{key}/quota",
            get(alert::get_quota)
                .put(alert::put_quota)
                .delete(alert::delete_quota),
        )
        .route(
            "/v1/alert-rules",
            get(alert::list_rules).post(alert::create_rule),
        )
        .route(
            "/v1/alert-rules/{name}",
            get(alert::get_rule)
                .put(alert::put_rule)
                .delete(alert::delete_rule),
        )
        .route("/v1/alert-rules/{name}/audit", get(alert::rule_audit))
        .route("/v1/alerts", get(alert::list_alerts))
        .route("/v1/projections", get(query::get_projections))
        .route("/openapi.json", get(query::get_openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // The ingest handler enforces its own limit with a message that names it.
        .layer(DefaultBodyLimit::disable())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            crate::auth::require,
        ))
        .with_state(state)
}

/// Prometheus text exposition (format 0.0.4).
async fn metrics(State(state): State<AppState>) -> Response {
    let body = crate::metrics::render(state.store.as_ref()).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when the database answers within two seconds.
///
/// NATS being down does not make Tally unready: HTTP ingest still works and the
/// stream keeps the messages; the answer says `degraded` and shows the state.
async fn readyz(State(state): State<AppState>) -> Response {
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
    let database = match &error {
        None => json!({"status": "up"}),
        Some(_) => json!({"status": "down"}),
    };
    let (code, status) = match (&error, nats) {
        (Some(_), _) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        (None, NatsState::Down) => (StatusCode::OK, "degraded"),
        (None, _) => (StatusCode::OK, "ready"),
    };
    (
        code,
        Json(json!({
            "status": status,
            "checks": {"database": database, "nats": {"status": nats.as_str()}}
        })),
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see README.md or GET /openapi.json for the API (POST /v1/events, GET /v1/stats, GET /v1/keys, GET /v1/keys/{key}/stats, GET /v1/projections, GET /metrics, GET /healthz, GET /readyz)",
    )
}

/// An error answer: `{"code": "...", "error": "..."}` with a status.
///
/// `code` is stable and machine-readable (see the error table in README.md);
/// `error` tells a person what is wrong and what to do.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human message.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "error": self.message})),
        )
            .into_response()
    }
}
