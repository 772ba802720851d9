//! Configuration: one struct per concern, every option a flag with a `TALLY_*`
//! environment variable, defaults in one place (the `default_value`s below).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::ingest::nats::NatsConfig;
use crate::ingest::IntakeLimits;
use crate::projection::{Failpoints, ProjectorConfig};
use crate::store::StoreOptions;
use crate::telemetry::LogFormat;

/// Where the event log lives.
#[derive(Clone, clap::Args)]
pub struct DatabaseConfig {
    /// Database URL: `sqlite://PATH` (embedded default) or `postgres://USER:PASS@HOST:PORT/DB`.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://tally.db",
        global = true
    )]
    pub database_url: String,

    /// Most pooled database connections.
    #[arg(
        long,
        env = "TALLY_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,

    /// Longest a query (`/v1/stats`, `/v1/keys`, …) may run before it is
    /// cancelled and answered with 503.
    #[arg(long, env = "TALLY_QUERY_TIMEOUT", default_value = "5s", value_parser = crate::duration::parse, global = true)]
    pub query_timeout: Duration,
}

/// The URL is redacted ([`crate::store::redact_url`]) so the config can be logged.
impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field(
                "database_url",
                &crate::store::redact_url(&self.database_url),
            )
            .field("db_max_connections", &self.db_max_connections)
            .field("query_timeout", &self.query_timeout)
            .finish()
    }
}

impl DatabaseConfig {
    /// Pool settings derived from this config.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.db_max_connections,
            statement_timeout: self.query_timeout,
            ..StoreOptions::default()
        }
    }
}

/// Logging.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Log filter in `RUST_LOG` syntax, e.g. `info` or `tally=debug,sqlx=warn`.
    #[arg(
        long,
        env = "TALLY_LOG",
        default_value = "info,sqlx=warn,tokio_cron_scheduler=warn",
        global = true
    )]
    pub log: String,

    /// Log format.
    #[arg(
        long,
        env = "TALLY_LOG_FORMAT",
        value_enum,
        default_value = "human",
        global = true
    )]
    pub log_format: LogFormat,
}

/// The server (`tally serve`, `tally demo`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    #[arg(long, env = "TALLY_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Oldest event timestamp accepted, relative to now (e.g. `35d`, `48h`).
    #[arg(long, env = "TALLY_LATE_ARRIVAL_HORIZON", default_value = "35d", value_parser = crate::duration::parse)]
    pub late_arrival_horizon: Duration,

    /// How far in the future an event timestamp may be (emitter clock skew).
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW", default_value = "5m", value_parser = crate::duration::parse)]
    pub max_future_skew: Duration,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most HTTP connections served at once; further clients wait in the
    /// listen backlog until one closes.
    #[arg(long, env = "TALLY_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,

    /// Longest wait for a request's headers, from the connection's start or
    /// the end of its previous request (so it also closes idle keep-alive
    /// connections).
    #[arg(long, env = "TALLY_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = crate::duration::parse)]
    pub http_header_timeout: Duration,

    /// Longest time to receive a whole request body (`408` after it).
    #[arg(long, env = "TALLY_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = crate::duration::parse)]
    pub http_body_timeout: Duration,

    /// Most events accepted in one request body.
    #[arg(long, env = "TALLY_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    pub max_batch_events: usize,

    /// Serve on a non-loopback address even though no API token exists (the
    /// API is then open to anyone who can reach it). Without this flag such a
    /// start is refused.
    #[arg(long, env = "TALLY_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Host names (comma-separated, without ports; `*.example.com` for every
    /// subdomain) the API answers to while authentication is off, beside IP
    /// addresses, `localhost` and `*.localhost`: a request naming another
    /// host gets `403 host_not_allowed` (DNS rebinding), and a browser's
    /// change from another origin `403 cross_origin` unless its host is listed.
    #[arg(long, env = "TALLY_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// The dashboard at `/` and `/dashboard/…` (`on` or `off`).
    #[arg(long, env = "TALLY_DASHBOARD", value_enum, default_value = "on")]
    pub dashboard: Switch,

    /// How often the dashboard refreshes by default (the page can change or
    /// pause it); at least 1s.
    #[arg(long, env = "TALLY_DASHBOARD_REFRESH", default_value = "10s", value_parser = crate::duration::parse)]
    pub dashboard_refresh: Duration,

    /// NATS JetStream ingest (off unless `TALLY_NATS_URL` is set).
    #[command(flatten)]
    pub nats: NatsConfig,

    /// Scheduled jobs: retention, reconciliation, housekeeping.
    #[command(flatten)]
    pub jobs: JobsConfig,

    /// Projections and their projector tasks.
    #[command(flatten)]
    pub projections: ProjectionConfig,

    /// Alert evaluation and delivery.
    #[command(flatten)]
    pub alerts: AlertConfig,

    /// How long a shutdown may take before in-flight work is abandoned (it is
    /// then redelivered by JetStream, never lost).
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value = "8s", value_parser = crate::duration::parse)]
    pub shutdown_timeout: Duration,
}

impl ServerConfig {
    /// Ingest limits derived from this config.
    pub fn intake_limits(&self) -> IntakeLimits {
        IntakeLimits {
            late_arrival_horizon: self.late_arrival_horizon,
            max_future_skew: self.max_future_skew,
            max_events: self.max_batch_events,
        }
    }
}

/// A feature turned `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Projection specs and projector tasks (`serve`, `projections …`).
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectionConfig {
    /// Directory of projection specs (`*.toml`, one projection each); default:
    /// `./projections` when it exists, else the specs built into the binary.
    #[arg(long, env = "TALLY_PROJECTIONS_DIR")]
    pub projections_dir: Option<PathBuf>,

    /// Most events a projector folds per transaction (larger: fewer rewrites
    /// of each aggregate row while catching up; more memory).
    #[arg(long, env = "TALLY_PROJECTOR_BATCH", default_value_t = 200_000)]
    pub projector_batch: i64,

    /// How often a caught-up projector looks for new events.
    #[arg(long, env = "TALLY_PROJECTOR_POLL", default_value = "100ms", value_parser = crate::duration::parse)]
    pub projector_poll: Duration,

    /// Projector lease length: how soon another instance takes over the
    /// projections of an instance that died.
    #[arg(long, env = "TALLY_PROJECTOR_LEASE", default_value = "10s", value_parser = crate::duration::parse)]
    pub projector_lease: Duration,

    /// Longest the day and month tables' new rows wait before they commit
    /// while events keep coming (minute and hour tables commit with every
    /// batch). Longer: fewer rewrites of each busy day and month row, and a
    /// staler `as_of` on those tables under load; `0s`: with every batch.
    #[arg(long, env = "TALLY_COARSE_COMMIT_INTERVAL", default_value = "10s", value_parser = crate::duration::parse)]
    pub coarse_commit_interval: Duration,

    /// Memory for the events this process appends, kept so its projectors
    /// need not read them back from the log, in bytes (0: read everything
    /// from the log). Full, it keeps the oldest: what a lagging projector
    /// reads next.
    #[arg(long, env = "TALLY_PROJECTOR_TAIL_BYTES", default_value_t = crate::store::DEFAULT_TAIL_BYTES)]
    pub projector_tail_bytes: usize,

    /// Crash-test hooks (`projector.before_commit=0.1,projector.after_commit=0.1`).
    /// Never set this in production: the process aborts at random commits.
    #[arg(long, env = "TALLY_FAILPOINTS", hide = true, default_value = "")]
    pub failpoints: String,
}

impl ProjectionConfig {
    /// Projector settings derived from this config.
    pub fn projector(&self) -> Result<ProjectorConfig, String> {
        Ok(ProjectorConfig {
            batch_size: self.projector_batch.max(1),
            poll_interval: self.projector_poll,
            lease_ttl: self.projector_lease.max(Duration::from_millis(300)),
            failpoints: Failpoints::parse(&self.failpoints)?,
            on_commit: None,
            wake: None,
            coarse_every: self.coarse_commit_interval,
            tail_bytes: self.projector_tail_bytes,
        })
    }
}

/// Alert evaluation and notification delivery (`serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct AlertConfig {
    /// JetStream stream that receives alert notifications (created if missing).
    #[arg(long, env = "TALLY_ALERTS_STREAM", default_value = "USAGE_ALERTS")]
    pub alerts_stream: String,

    /// Notifications go to `<prefix>.<severity>.<rule>`.
    #[arg(
        long,
        env = "TALLY_ALERTS_SUBJECT_PREFIX",
        default_value = "usage.alerts"
    )]
    pub alerts_subject_prefix: String,

    /// Evaluate every rule at least this often (windows slide with no new data).
    #[arg(long, env = "TALLY_ALERTS_TICK", default_value = "5s", value_parser = crate::duration::parse)]
    pub alerts_tick: Duration,

    /// Duplicate window of the alert stream: a notification re-published
    /// within it (after a crash between publish and bookkeeping) is dropped.
    #[arg(long, env = "TALLY_ALERTS_DEDUP_WINDOW", default_value = "1h", value_parser = crate::duration::parse)]
    pub alerts_dedup_window: Duration,

    /// Least time between two evaluations: bounds the database share of
    /// evaluation under heavy load (alerts follow the data within about this).
    #[arg(long, env = "TALLY_ALERTS_MIN_INTERVAL", default_value = "100ms", value_parser = crate::duration::parse)]
    pub alerts_min_interval: Duration,

    /// How many rules and quotas may be created.
    #[command(flatten)]
    pub limits: RuleLimits,
}

/// Caps on the number of alert rules and key quotas. Only a new rule or
/// quota is refused (`400 too_many_rules`); stored ones always evaluate.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct RuleLimits {
    /// Most alert rules (`POST`/`PUT /v1/alert-rules`, `tally alerts apply`).
    #[arg(long, env = "TALLY_MAX_RULES", default_value_t = 10_000)]
    pub max_rules: u64,

    /// Most key quotas (`PUT /v1/keys/{key}/quota`); unset: no cap.
    #[arg(long, env = "TALLY_MAX_QUOTAS")]
    pub max_quotas: Option<u64>,
}

impl AlertConfig {
    /// Evaluator settings derived from this config.
    pub fn settings(&self, lease_ttl: Duration) -> crate::alert::eval::AlertSettings {
        crate::alert::eval::AlertSettings {
            subject_prefix: self.alerts_subject_prefix.clone(),
            tick: self.alerts_tick.max(Duration::from_millis(100)),
            min_interval: self.alerts_min_interval,
            lease_ttl,
            ..Default::default()
        }
    }
}

/// Scheduled jobs (`serve`, `jobs run`). Cron expressions have six fields
/// (`sec min hour day-of-month month day-of-week`) and are always UTC; `off`
/// turns a job off.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsConfig {
    /// Delete raw events whose `ts` is older than this (e.g. `400d`). Unset:
    /// keep the raw log forever. Must exceed the late-arrival horizon by at
    /// least one day (`jobs::RETENTION_MARGIN`), so every id Tally can still
    /// accept is still there to deduplicate against.
    #[arg(long, env = "TALLY_RETENTION", value_parser = crate::duration::parse)]
    pub retention: Option<Duration>,

    /// When the retention job runs.
    #[arg(long, env = "TALLY_JOB_RETENTION_CRON", default_value = "0 17 3 * * *")]
    pub job_retention_cron: String,

    /// When the reconciliation job runs.
    #[arg(
        long,
        env = "TALLY_JOB_RECONCILIATION_CRON",
        default_value = "0 7 1 * * *"
    )]
    pub job_reconciliation_cron: String,

    /// When the housekeeping job (SQLite `PRAGMA optimize`, WAL checkpoint; PostgreSQL `ANALYZE`) runs.
    #[arg(long, env = "TALLY_JOB_OPTIMIZE_CRON", default_value = "0 47 4 * * *")]
    pub job_optimize_cron: String,

    /// How long rejected payloads are kept, by the time Tally received them
    /// (`forever` keeps them). At least the late-arrival horizon, so a
    /// rejected event can be found for as long as it could be sent again.
    #[arg(long, env = "TALLY_RETENTION_REJECTED", default_value = "90d", value_parser = crate::duration::parse_keep)]
    pub retention_rejected: crate::duration::Keep,

    /// How long sent alert notifications (`alert_outbox`) and resolved alert
    /// instances are kept (`forever` keeps them); at least 1 day.
    #[arg(long, env = "TALLY_RETENTION_ALERTS", default_value = "90d", value_parser = crate::duration::parse_keep)]
    pub retention_alerts: crate::duration::Keep,

    /// How long finished job runs (`job_runs`) are kept (`forever` keeps them).
    #[arg(long, env = "TALLY_RETENTION_JOB_RUNS", default_value = "90d", value_parser = crate::duration::parse_keep)]
    pub retention_job_runs: crate::duration::Keep,

    /// How long the audit trail of rules and quotas (`alert_audit`) is kept;
    /// by default forever.
    #[arg(long, env = "TALLY_RETENTION_AUDIT", default_value = "forever", value_parser = crate::duration::parse_keep)]
    pub retention_audit: crate::duration::Keep,

    /// Rows deleted per statement by retention (bounded so no transaction holds locks for long).
    #[arg(long, env = "TALLY_RETENTION_BATCH", default_value_t = 10_000)]
    pub retention_batch: i64,
}
