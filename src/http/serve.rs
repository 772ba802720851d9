//! The HTTP server loop: bounded connections, header timeout, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

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
