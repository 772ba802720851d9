//! Wiring: the store, the HTTP router and (later) the NATS consumer, projectors
//! and alert relay, built from config and run until a shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseConfig, ServerConfig};
use crate::http::{router, AppState};
use crate::store::{self, redact_url, EventStore, StoreError};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The event log could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// A built, not yet running, Tally server.
pub struct App {
    state: AppState,
    listener: TcpListener,
}

impl App {
    /// Opens and migrates the store, and binds the HTTP listener (port 0 picks a free one).
    pub async fn build(db: &DatabaseConfig, server: &ServerConfig) -> Result<Self, AppError> {
        tracing::debug!(database = %redact_url(&db.database_url), ?server, "configuration");
        let store = store::connect(&db.database_url, &db.store_options()).await?;
        store.migrate().await?;
        Self::with_store(store, server).await
    }

    /// Builds around an already opened (and migrated) store.
    pub async fn with_store(
        store: Arc<dyn EventStore>,
        server: &ServerConfig,
    ) -> Result<Self, AppError> {
        let listener = TcpListener::bind(server.http_addr)
            .await
            .map_err(|source| AppError::Bind {
                addr: server.http_addr,
                source,
            })?;
        Ok(Self {
            state: AppState::new(store, server),
            listener,
        })
    }

    /// The address the HTTP API actually listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// The store the app writes to.
    pub fn store(&self) -> Arc<dyn EventStore> {
        self.state.store.clone()
    }

    /// Serves until `shutdown` is cancelled, then finishes in-flight requests
    /// (each one's transaction commits or rolls back as a whole) and closes the store.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let store = self.state.store.clone();
        tracing::info!(addr = %self.local_addr(), backend = store.backend().name(), "Tally is listening");
        axum::serve(self.listener, router(self.state))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(AppError::Serve)?;
        store.close().await;
        tracing::info!("Tally stopped");
        Ok(())
    }
}
