//! Wiring: the store, the HTTP router, the NATS consumer, the projectors, the
//! alert evaluator and relay, and the jobs, built from config and run until a shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::aggregate::spec;
use crate::alert::eval::Evaluator;
use crate::alert::relay::{self, RelayConfig};
use crate::config::{AlertConfig, DatabaseConfig, ServerConfig};
use crate::health::Health;
use crate::http::{router, AppState};
use crate::ingest::nats::{NatsError, NatsIntake};
use crate::projection::projector::ProjectionTask;
use crate::projection::{ProjectionError, Projector, ProjectorConfig};
use crate::query::Catalog;
use crate::store::{self, redact_url, Store, StoreError};

/// Loads the specs, creates missing tables and checkpoints, and refuses to go
/// on when any projection's stored spec differs from its file (naming every such
/// projection and the command that fixes it). A database that cannot be reached
/// does not stop start-up: those projections open (and check) when it is back.
pub async fn open_projectors(
    store: &Store,
    dir: Option<&std::path::Path>,
) -> Result<Vec<ProjectionTask>, ProjectionError> {
    // Checked before anything folds: a projector past the log's next
    // position would skip every new event silently.
    match store.projections().log_position_problem().await {
        Ok(Some(problem)) => return Err(ProjectionError::LogPosition(problem)),
        Ok(None) => {}
        // An unreachable database is handled below, like every projection.
        Err(e) => tracing::warn!(error = %e, "cannot check the log positions now"),
    }
    let source = spec::SpecSource::resolve(dir);
    tracing::info!(source = %source, "projection specs");
    let specs = source.load()?;
    let mut tasks = Vec::with_capacity(specs.len());
    let mut changed = Vec::new();
    for spec in specs {
        let spec = Arc::new(spec);
        match Projector::open(store.clone(), spec.clone(), &spec.name, "").await {
            Ok(p) => tasks.push(ProjectionTask {
                spec,
                projector: Some(p),
            }),
            Err(e @ ProjectionError::SpecChanged { .. }) => changed.push(e.to_string()),
            Err(ProjectionError::Store(e)) if !e.is_data_error() => {
                tracing::warn!(projection = %spec.name, error = %e, "database unreachable; the projector starts when it is back");
                tasks.push(ProjectionTask {
                    spec,
                    projector: None,
                });
            }
            Err(e) => return Err(e),
        }
    }
    if !changed.is_empty() {
        return Err(ProjectionError::Changed(changed.join("\n")));
    }
    if tasks.is_empty() {
        tracing::warn!(source = %source, "no projection specs: nothing will be aggregated");
    }
    Ok(tasks)
}

/// `<host>-<pid>-<random>`: unique per process, readable in `projections list`.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "tally".to_string());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

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
    /// NATS ingest could not be set up as configured.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A projection spec is invalid or no longer matches its tables.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// A setting is out of range.
    #[error("configuration: {0}")]
    Config(String),
}

/// A built, not yet running, Tally server.
pub struct App {
    state: AppState,
    listener: TcpListener,
    nats: Option<NatsIntake>,
    projectors: Vec<ProjectionTask>,
    projector_config: ProjectorConfig,
    alerts: AlertConfig,
    jobs: crate::config::JobsConfig,
    nats_connection: crate::nats::NatsConnection,
    instance: String,
    shutdown_timeout: Duration,
    http_limits: crate::http::ServeLimits,
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
    pub async fn with_store(store: Store, server: &ServerConfig) -> Result<Self, AppError> {
        crate::jobs::validate(&server.jobs, server.late_arrival_horizon)
            .map_err(|e| AppError::Config(e.to_string()))?;
        crate::auth::check_bind(&store, server.http_addr, server.insecure_no_auth)
            .await
            .map_err(|e| AppError::Config(e.to_string()))?;
        let listener = TcpListener::bind(server.http_addr)
            .await
            .map_err(|source| AppError::Bind {
                addr: server.http_addr,
                source,
            })?;
        let projector_config = server.projections.projector().map_err(AppError::Config)?;
        crate::failpoint::arm(projector_config.failpoints);
        let projectors =
            open_projectors(&store, server.projections.projections_dir.as_deref()).await?;
        let health = Arc::new(Health::default());
        let catalog = Catalog::new(projectors.iter().map(|t| t.spec.clone()).collect());
        let state = AppState::new(store, server, health.clone(), catalog);
        let nats = match &server.nats.connection.nats_url {
            Some(_) => Some(NatsIntake::start(&server.nats, state.intake.clone(), health).await?),
            None => None,
        };
        Ok(Self {
            state,
            listener,
            nats,
            projectors,
            projector_config,
            alerts: server.alerts.clone(),
            jobs: server.jobs.clone(),
            nats_connection: server.nats.connection.clone(),
            instance: instance_id(),
            shutdown_timeout: server.shutdown_timeout,
            http_limits: crate::http::ServeLimits {
                max_connections: server.http_max_connections,
                header_timeout: server.http_header_timeout,
            },
        })
    }

    /// This process's name in projector leases.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The address the HTTP API actually listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// The store the app writes to.
    pub fn store(&self) -> Store {
        self.state.store.clone()
    }

    /// Serves until `shutdown` is cancelled, then finishes in-flight requests
    /// and the NATS batch in flight (each one's transaction commits or rolls
    /// back as a whole) and closes the store. Work still unfinished after the
    /// shutdown timeout is abandoned unacknowledged, so JetStream redelivers it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let store = self.state.store.clone();
        tracing::info!(addr = %self.local_addr(), backend = store.backend().name(), nats = self.nats.is_some(), "Tally is listening");
        let deadline = CancellationToken::new();
        let timer = {
            let (shutdown, deadline, timeout) =
                (shutdown.clone(), deadline.clone(), self.shutdown_timeout);
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(timeout).await;
                deadline.cancel();
            })
        };
        let nats = self
            .nats
            .map(|n| tokio::spawn(n.run(shutdown.clone(), deadline.clone())));
        let signal = self.state.signal.clone();
        let wake_relay = Arc::new(tokio::sync::Notify::new());
        let mut projector_config = self.projector_config.clone();
        projector_config.on_commit = Some(signal.clone());
        projector_config.wake = Some(self.state.intake.appended());
        if !self.projectors.is_empty() {
            // What this process appends is folded from memory (`LogTail`).
            store.log_tail().keep(self.projector_config.tail_bytes);
        }
        let projectors = crate::projection::projector::spawn_all(
            self.state.store.clone(),
            self.projectors,
            projector_config,
            self.instance.clone(),
            shutdown.clone(),
        );
        let settings = self.alerts.settings(self.projector_config.lease_ttl);
        let evaluator = Evaluator::new(
            store.clone(),
            self.state.catalog.clone(),
            &settings.subject_prefix,
            Some(signal),
        );
        let job_ctx = crate::jobs::JobContext {
            store: store.clone(),
            specs: self.state.catalog.specs.clone(),
            retention: self.jobs.retention,
            batch: self.jobs.retention_batch,
            instance: self.instance.clone(),
            alert_prefix: settings.subject_prefix.clone(),
            history: crate::jobs::HistoryRetention::from_config(&self.jobs),
        };
        let scheduler = match crate::jobs::schedule(job_ctx, &self.jobs, shutdown.clone()).await {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the job scheduler; jobs only run with `tally jobs run`");
                None
            }
        };
        let mut background = vec![
            tokio::spawn(evaluator.run(
                settings.clone(),
                self.instance.clone(),
                wake_relay.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(crate::projection::restate::run(
                store.clone(),
                self.state.catalog.specs.clone(),
                self.projector_config
                    .poll_interval
                    .max(Duration::from_millis(500)),
                self.state.restate_wake.clone(),
                Some(self.state.signal.clone()),
                self.projector_config.failpoints,
                shutdown.clone(),
            )),
        ];
        if self.nats_connection.nats_url.is_some() {
            let cfg = RelayConfig {
                connection: self.nats_connection.clone(),
                stream: self.alerts.alerts_stream.clone(),
                subject_prefix: settings.subject_prefix.clone(),
                dedup_window: self.alerts.alerts_dedup_window,
                lease_ttl: settings.lease_ttl,
            };
            background.push(tokio::spawn(relay::run(
                store.clone(),
                cfg,
                self.instance.clone(),
                wake_relay,
                shutdown.clone(),
            )));
        } else {
            tracing::warn!("no NATS URL: alert notifications are kept in alert_outbox (and GET /v1/alerts) but not published");
        }
        let http = tokio::spawn(crate::http::serve(
            self.listener,
            router(self.state),
            self.http_limits,
            shutdown.clone(),
            deadline.clone(),
        ));
        if let Some(nats) = nats {
            let _ = nats.await;
        }
        if let Some(s) = scheduler {
            let _ = s.await;
        }
        for p in projectors.into_iter().chain(background) {
            let _ = p.await;
        }
        let served = http.await;
        timer.abort();
        store.close().await;
        match served {
            Ok(()) => {}
            Err(e) => return Err(AppError::Serve(std::io::Error::other(e))),
        }
        tracing::info!("Tally stopped");
        Ok(())
    }
}
