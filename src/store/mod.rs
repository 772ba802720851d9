//! The store: the event log, the aggregate tables, alert state and the
//! operations tables, on PostgreSQL (production) or SQLite (the embedded
//! default).
//!
//! [`Store`] is the handle the rest of Tally holds. It hands out one small
//! interface per concern, named after what it holds: [`EventLog`],
//! [`Projections`], [`Leases`], [`Alerts`], [`Tokens`] and [`Jobs`]. Each is
//! written once: the statements that are the same on both backends go
//! through the dialect seam in `db.rs`, and only what a dialect really does
//! its own way (bulk inserts, the log cursor, upserts, timeouts) lives in
//! `postgres.rs` and `sqlite.rs`. `tests/it/store.rs` runs one conformance
//! suite against both.

pub mod agg;
pub mod alerts;
pub mod corrections;
mod db;
pub mod jobs;
pub mod leases;
pub mod log;
mod postgres;
pub mod prices;
pub mod projections;
mod snapshot;
pub mod sqlite;
pub mod tail;
pub mod tokens;

pub use agg::{
    AfterCommit, AggAnswer, AggQuery, AggRow, Apply, ApplyOutcome, Cursor, KnownSketches, LogBatch,
    ProjectionState, Top, Watermark,
};
pub use alerts::Alerts;
pub use corrections::Corrections;
pub use jobs::Jobs;
pub use leases::Leases;
pub use log::EventLog;
pub use prices::Prices;
pub use projections::{
    EventChunk, Finished, Folded, Projections, Restating, READ_CHUNK, UPSERT_CHUNK,
};
pub use snapshot::{AlertSnapshot, LedgerRestored, LedgerSnapshot};
pub use tail::{LogTail, TailStats, DEFAULT_TAIL_BYTES};
pub use tokens::Tokens;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::aggregate::spec::Granularity;
use crate::event::Event;
use db::Db;

/// Which database a store writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL (production).
    Postgres,
    /// SQLite (embedded default).
    Sqlite,
}

impl Backend {
    /// The backend a database URL names.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    /// Lower-case name, as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// Errors of the event log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL names no supported backend.
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// A query selected more rows than it may hold in memory.
    #[error("the query selects more than {0} aggregate rows")]
    TooManyRows(usize),
    /// A query ran past the statement timeout and was cancelled.
    #[error("the query ran longer than the statement timeout ({0:?}) and was cancelled")]
    Timeout(Duration),
    /// A stored row could not be read back as an event.
    #[error("stored row for event `{id}` is unreadable: {reason}")]
    CorruptRow {
        /// The event id of the row.
        id: String,
        /// What failed to decode.
        reason: String,
    },
}

impl StoreError {
    /// True when the database refused the *data* (a constraint or a value it
    /// cannot store): retrying the same rows cannot succeed. Everything else
    /// (connection lost, pool exhausted, server shutting down) is worth a retry.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => {
                !matches!(e.kind(), sqlx::error::ErrorKind::Other)
                    || e.code().is_some_and(|c| c.starts_with("22"))
                    // SQLite: SQLITE_TOOBIG (18), SQLITE_CONSTRAINT (19), SQLITE_MISMATCH (20),
                    // SQLITE_RANGE (25), compared on the primary code: the driver reports
                    // extended ones (a trigger's RAISE(ABORT) is 1811, CONSTRAINT_TRIGGER).
                    || (e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                        && e
                            .code()
                            .and_then(|c| c.parse::<i32>().ok())
                            .is_some_and(|c| matches!(c & 0xff, 18 | 19 | 20 | 25)))
            }
            StoreError::CorruptRow { .. } => true,
            _ => false,
        }
    }
}

/// What happened to one event of an appended batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now; counted.
    Inserted,
    /// The same id with the same content was already stored (or earlier in the batch).
    Duplicate,
    /// The same id was stored with different content; recorded in `rejected_events`.
    Conflict,
    /// The database refused the event although it passed validation; it was
    /// recorded in `rejected_events` (kind `refused`) instead.
    Refused,
}

/// Why a payload ended up in `rejected_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// The body could not be decoded at all.
    Unparseable,
    /// One item failed validation.
    Invalid,
    /// The id exists with different content.
    Conflict,
    /// Valid, but the database refused to store it (kept with the database's reason).
    Refused,
}

impl RejectKind {
    /// The value of `rejected_events.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::Unparseable => "unparseable",
            RejectKind::Invalid => "invalid",
            RejectKind::Conflict => "conflict",
            RejectKind::Refused => "refused",
        }
    }
}

/// Where a batch came from, stored with each rejected payload.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `http`, `nats` or `import`.
    pub source: &'static str,
    /// NATS subject or HTTP path.
    pub subject: Option<String>,
}

/// A payload that was not accepted, with the reason.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// What kind of failure.
    pub kind: RejectKind,
    /// The event id when one could be read.
    pub event_id: Option<String>,
    /// Position of the item in its body (0-based), `None` for a whole body.
    pub item_index: Option<i32>,
    /// What is wrong and how to fix it.
    pub reason: String,
    /// Content type the payload was read as.
    pub content_type: Option<String>,
    /// The raw bytes.
    pub payload: Vec<u8>,
    /// Subject it arrived on when it differs within a batch (NATS); else the batch's [`Origin`].
    pub subject: Option<String>,
}

/// A row of `rejected_events`, as read back.
#[derive(Debug, Clone)]
pub struct RejectedRow {
    /// When Tally stored it.
    pub received_at: DateTime<Utc>,
    /// `http`, `nats` or `import`.
    pub source: String,
    /// NATS subject or HTTP path.
    pub subject: Option<String>,
    /// `unparseable`, `invalid` or `conflict`.
    pub kind: String,
    /// The event id when one could be read.
    pub event_id: Option<String>,
    /// Position in the body.
    pub item_index: Option<i32>,
    /// Why it was rejected.
    pub reason: String,
    /// The raw bytes.
    pub payload: Vec<u8>,
}

/// Row counts of the log, for tests, the demo and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogCounts {
    /// Rows in `usage_events`.
    pub events: i64,
    /// Rows in `rejected_events`.
    pub rejected: i64,
}

/// What [`Projections::reconcile_read`] saw.
#[derive(Debug, Clone)]
pub struct ReconcileRead {
    /// The projection's checkpoint at the snapshot (`None`: no such projection).
    pub cursor: Option<Cursor>,
    /// Stored rows per granularity, in key order.
    pub stored: Vec<(Granularity, Vec<AggRow>)>,
    /// The events those rows should have been folded from.
    pub events: Vec<Event>,
    /// The price catalog at the snapshot, to cost them with.
    pub catalog: crate::aggregate::price::Catalog,
}

/// One connection pool's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// `main`, `query` (PostgreSQL); `writer`, `derived`, `reader` (SQLite).
    pub pool: &'static str,
    /// Open connections.
    pub size: u32,
    /// Of which idle.
    pub idle: u32,
    /// Most connections.
    pub max: u32,
}

/// The whole log summed ([`EventLog::log_totals`]), compared by `tally copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct LogTotals {
    /// Events.
    pub events: i64,
    /// Failed events.
    pub errors: i64,
    /// Sum of `cost_nanos`.
    pub cost_nanos: i64,
    /// Sum of `tokens_in`.
    pub tokens_in: i64,
    /// Sum of `tokens_out`.
    pub tokens_out: i64,
    /// Sum of `request_bytes + response_bytes`.
    pub bytes: i64,
}

/// Pool settings shared by both backends.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most connections in the pool (PostgreSQL) or read pool (SQLite).
    pub max_connections: u32,
    /// How long to wait for a connection before giving up (keeps requests from hanging when the DB is down).
    pub acquire_timeout: Duration,
    /// Longest a query-module read may run before it is cancelled.
    pub statement_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens the store a URL names (without migrating).
pub async fn connect(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
    let db = match Backend::from_url(url)? {
        Backend::Postgres => Db::Postgres(postgres::connect(url, options)?),
        Backend::Sqlite => Db::Sqlite(sqlite::connect(url, options).await?),
    };
    Ok(Store::new(db))
}

/// One database: a cheap handle (clones share the pools) that hands out the
/// interface of each concern.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    log: EventLog,
    projections: Projections,
    leases: Leases,
    alerts: Alerts,
    tokens: Tokens,
    jobs: Jobs,
    corrections: Corrections,
    prices: Prices,
    tail: Arc<LogTail>,
}

impl Store {
    fn new(db: Db) -> Self {
        let tail = Arc::new(LogTail::default());
        Self {
            log: EventLog::new(db.clone(), tail.clone()),
            projections: Projections::new(db.clone(), tail.clone()),
            tail,
            leases: Leases::new(db.clone()),
            alerts: Alerts::new(db.clone()),
            tokens: Tokens::new(db.clone()),
            jobs: Jobs::new(db.clone()),
            corrections: Corrections::new(db.clone()),
            prices: Prices::new(db.clone()),
            db,
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// The event log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The events this process appended, kept for its projectors (off until
    /// [`LogTail::keep`]; `serve` turns it on when it folds).
    pub fn log_tail(&self) -> &LogTail {
        &self.tail
    }

    /// Checkpoints and aggregate tables.
    pub fn projections(&self) -> &Projections {
        &self.projections
    }

    /// Projector and singleton leases.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Rules, quotas, alert instances and the outbox.
    pub fn alerts(&self) -> &Alerts {
        &self.alerts
    }

    /// API tokens and the authentication switch.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Job runs and history retention.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Corrections (voided events) and the restatement queue.
    pub fn corrections(&self) -> &Corrections {
        &self.corrections
    }

    /// The price catalog and its audit trail.
    pub fn prices(&self) -> &Prices {
        &self.prices
    }

    /// Applies pending migrations from `schema/<backend>/` (idempotent).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.db.migrate().await
    }

    /// Cheap liveness probe for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.reader().execute(db::Sql::new("SELECT 1")).await?;
        Ok(())
    }

    /// Closes the pools, waiting for connections to be returned.
    pub async fn close(&self) {
        self.db.close().await
    }

    /// Approximate row counts of `tables` (PostgreSQL: the planner's
    /// estimate, so a scrape never scans; SQLite: exact), for `/metrics`.
    pub async fn table_rows(&self, tables: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        match &self.db {
            Db::Postgres(p) => postgres::table_rows(p, tables).await,
            Db::Sqlite(p) => sqlite::table_rows(p, tables).await,
        }
    }

    /// Backend housekeeping after bulk deletes (PostgreSQL: `ANALYZE`;
    /// SQLite: `PRAGMA optimize` and a WAL checkpoint); a line per step taken.
    pub async fn maintenance(&self) -> Result<Vec<String>, StoreError> {
        match &self.db {
            Db::Postgres(p) => postgres::maintenance(p).await,
            Db::Sqlite(p) => sqlite::maintenance(p).await,
        }
    }

    /// Connection pool usage, for `/metrics`.
    pub fn pool_stats(&self) -> Vec<PoolStats> {
        self.db.pool_stats()
    }
}

/// A URL safe to log: its whole userinfo (`user:password@`, `token@`,
/// `user@`) is shown as `***@`, and `password`/`sslpassword` query
/// parameters are dropped. A URL the parser refuses (PostgreSQL's
/// multi-host form) is masked by hand the same way.
pub fn redact_url(url: &str) -> String {
    const SECRET_PARAMS: [&str; 2] = ["password", "sslpassword"];
    let secret = |k: &str| SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(k));
    if let Ok(mut parsed) = url::Url::parse(url) {
        if !parsed.cannot_be_a_base() {
            let had_userinfo = !parsed.username().is_empty() || parsed.password().is_some();
            if had_userinfo {
                let _ = parsed.set_password(None);
                let _ = parsed.set_username("***");
            }
            if parsed.query().is_some() {
                let kept: Vec<(String, String)> = parsed
                    .query_pairs()
                    .filter(|(k, _)| !secret(k))
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                match kept.is_empty() {
                    true => parsed.set_query(None),
                    false => {
                        parsed.query_pairs_mut().clear().extend_pairs(kept);
                    }
                }
            }
            return parsed.to_string();
        }
    }
    // By hand: the authority ends at the first `/`, `?` or `#` after `://`.
    let (head, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("***{}", &authority[at..]),
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, format!("#{f}")),
                None => (query, String::new()),
            };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|pair| !secret(pair.split('=').next().unwrap_or("")))
                .collect();
            match kept.is_empty() {
                true => format!("{path}{fragment}"),
                false => format!("{path}?{}{fragment}", kept.join("&")),
            }
        }
        None => tail.to_string(),
    };
    format!("{head}{authority}{tail}")
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn every_credential_form_is_masked() {
        for (url, shown) in [
            (
                "postgres://alice:S3cret@db:5432/tally",
                "postgres://***@db:5432/tally",
            ),
            ("postgres://alice@db/tally", "postgres://***@db/tally"),
            ("nats://TOKEN@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
            ("nats://u:p%40ss@h:4222", "nats://***@h:4222"),
            (
                "postgres://db/tally?sslmode=require&password=S3cret&PASSWORD=x&sslpassword=k",
                "postgres://db/tally?sslmode=require",
            ),
            ("postgres://db/tally?password=S3cret", "postgres://db/tally"),
            (
                "postgres://al:S3cret@h1:5432,h2:5433/tally?password=S3cret&x=1",
                "postgres://***@h1:5432,h2:5433/tally?x=1",
            ),
            ("sqlite://tally.db", "sqlite://tally.db"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("postgres://h/db", "postgres://h/db"),
        ] {
            let got = redact_url(url);
            assert_eq!(got, shown, "{url}");
            for secret in ["S3cret", "TOKEN", "alice", "p%40ss"] {
                assert!(!got.contains(secret), "{got}");
            }
        }
    }
}
