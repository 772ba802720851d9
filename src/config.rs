//! Configuration: one struct per concern, every option a flag with a `TALLY_*`
//! environment variable, defaults in one place (the `default_value`s below).

use std::net::SocketAddr;
use std::time::Duration;

use crate::ingest::IntakeLimits;
use crate::store::StoreOptions;
use crate::telemetry::LogFormat;

/// Where the event log lives.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// Database URL: `sqlite://PATH` (embedded default) or `postgres://USER:PASS@HOST:PORT/DB`.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
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
}

impl DatabaseConfig {
    /// Pool settings derived from this config.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.db_max_connections,
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
        default_value = "info,sqlx=warn",
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
    #[arg(long, env = "TALLY_LATE_ARRIVAL_HORIZON", default_value = "35d", value_parser = humantime::parse_duration)]
    pub late_arrival_horizon: Duration,

    /// How far in the future an event timestamp may be (emitter clock skew).
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_future_skew: Duration,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most events accepted in one request body.
    #[arg(long, env = "TALLY_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    pub max_batch_events: usize,
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
