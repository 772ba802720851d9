//! The event log: `usage_events` (the source of truth) and `rejected_events`.
//!
//! Two backends implement [`EventStore`]: [`postgres::PgStore`] for production
//! and [`sqlite::SqliteStore`] as the embedded default. Both append a batch in
//! one transaction and classify every event as inserted, duplicate or conflict
//! with the same pure logic ([`classify`]), so their answers cannot drift apart;
//! `tests/it/store.rs` runs one conformance suite against both.

pub mod agg;
pub mod alerts;
pub mod ops;
pub mod postgres;
pub mod sqlite;

use crate::aggregate::spec::{Granularity, Spec};
pub use agg::{
    AggAnswer, AggQuery, AggRow, Apply, ApplyOutcome, Cursor, LogBatch, ProjectionState, Top,
    Watermark,
};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::event::codec::to_wire_json;
use crate::event::{ErrorType, Event};

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

/// The projections' side of the store: reading the log in commit-safe order,
/// checkpoints, leases and the aggregate tables. One implementation per backend.
#[async_trait]
pub trait ProjectionStore: Send + Sync + 'static {
    /// Up to `limit` events after `after`, in cursor order, from one snapshot.
    /// Never returns an event while an event that will sort before it can still commit.
    async fn read_log(&self, after: Cursor, limit: i64) -> Result<LogBatch, StoreError>;

    /// Events stored after `after` (a projection's lag), committed or not yet foldable.
    async fn events_after(&self, after: Cursor) -> Result<i64, StoreError>;

    /// `Some(what is wrong)` when a checkpoint or stored event lies beyond the
    /// positions the database will give new events (PostgreSQL: a dump
    /// restored into a new cluster restarts transaction ids below the stored
    /// ones; SQLite: a log file older than its checkpoints). New events would
    /// then sort before the checkpoints and never be folded.
    async fn log_position_problem(&self) -> Result<Option<String>, StoreError>;

    /// Repairs what [`ProjectionStore::log_position_problem`] finds, keeping
    /// which events each checkpoint has folded; returns what it did. Run with
    /// no Tally serving this database.
    async fn repair_log_positions(&self) -> Result<String, StoreError>;

    /// Creates the spec's tables (with `suffix`) if missing and the checkpoint
    /// row `state` (with the spec's hash) if missing, and returns the row.
    async fn ensure_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<ProjectionState, StoreError>;

    /// Every checkpoint row, by name.
    async fn projection_states(&self) -> Result<Vec<ProjectionState>, StoreError>;

    /// Takes or renews the projector lease of `state` for `ttl`; false when
    /// another live instance holds it.
    async fn try_lease(&self, state: &str, owner: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Gives the lease up (clean shutdown), if `owner` holds it.
    async fn release_lease(&self, state: &str, owner: &str) -> Result<(), StoreError>;

    /// Adds each folded batch to its tables and moves its checkpoint, in one
    /// transaction per batch or one for all (the backend's choice), if that
    /// checkpoint is still where the batch was read from. A batch whose
    /// checkpoint moved writes nothing, and the answer is then
    /// [`ApplyOutcome::Stale`] (other batches may have committed: the caller
    /// re-reads every checkpoint). On an error, too, some batches may have
    /// committed; the checkpoints tell which.
    async fn apply_fold(&self, applies: &[Apply<'_>]) -> Result<ApplyOutcome, StoreError>;

    /// Drops the tables (every granularity, with `suffix`) and the checkpoint row.
    async fn drop_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<(), StoreError>;

    /// Atomically replaces the live tables and checkpoint of `spec` with the
    /// rebuilt ones (`suffix`, `shadow_state`). Returns false, changing nothing,
    /// when the live checkpoint is ahead of the shadow's (readers would see
    /// totals step back): fold further and try again.
    async fn swap_rebuilt(
        &self,
        spec: &Spec,
        state: &str,
        shadow_state: &str,
        suffix: &str,
    ) -> Result<bool, StoreError>;

    /// Every row of one table, in key order (tests, reconciliation, `projections list`).
    async fn read_agg(
        &self,
        spec: &Spec,
        granularity: Granularity,
        suffix: &str,
    ) -> Result<Vec<AggRow>, StoreError>;

    /// The rows an [`AggQuery`] selects, under the store's statement timeout.
    async fn query_agg(&self, q: &AggQuery<'_>) -> Result<AggAnswer, StoreError>;

    /// A cheap size estimate of each named table that exists (PostgreSQL:
    /// pages on disk; SQLite: the largest rowid), for choosing between
    /// projections that can answer the same query.
    async fn table_sizes(&self, tables: &[String]) -> Result<HashMap<String, i64>, StoreError>;

    /// Rows in a table named by a spec.
    async fn count_rows(&self, table: &str) -> Result<i64, StoreError>;
}

/// The append-only event log. One implementation per backend.
#[async_trait]
pub trait EventStore: ProjectionStore + alerts::AlertStore + ops::OpsStore {
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// Applies pending migrations from `schema/<backend>/` (idempotent).
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap liveness probe for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Appends events and rejected payloads in one transaction.
    ///
    /// Returns one [`Outcome`] per event, in order. Conflicts are also written to
    /// `rejected_events` in the same transaction. Either everything is committed
    /// or nothing is (and an error is returned).
    async fn append(
        &self,
        events: &[Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError>;

    /// The stored event with this id.
    async fn get_event(&self, id: &str) -> Result<Option<Event>, StoreError>;

    /// Row counts of `usage_events` and `rejected_events`.
    async fn counts(&self) -> Result<LogCounts, StoreError>;

    /// The most recent rejected payloads, newest first.
    async fn recent_rejected(&self, limit: i64) -> Result<Vec<RejectedRow>, StoreError>;

    /// Closes the pools, waiting for connections to be returned.
    async fn close(&self);

    /// Deletes up to `limit` rejected payloads received before `cutoff`.
    async fn delete_rejected_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError>;

    /// Approximate row counts of `tables` (PostgreSQL: the planner's
    /// estimate, so a scrape never scans; SQLite: exact), for `/metrics`.
    async fn table_rows(&self, tables: &[&str]) -> Result<Vec<(String, i64)>, StoreError>;

    /// Deletes up to `limit` events whose `ts` is before `cutoff`; how many it deleted.
    async fn delete_events_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError>;

    /// Deletes up to `limit` rows of a live aggregate table whose bucket starts before `cutoff`.
    async fn delete_agg_before(
        &self,
        spec: &Spec,
        granularity: Granularity,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError>;

    /// Up to `limit` whole events (message and metadata included) after
    /// `after_seq` in `seq` order, with `ts` in `[from, to)`; each with its seq.
    async fn export_events(
        &self,
        after_seq: i64,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<(i64, Event)>, StoreError>;

    /// The UTC hours (bucket starts) that events stored after `after_seq`
    /// with `ts` before `before` fall in, and the largest seq stored (0 when
    /// empty): the days late events touched since reconciliation last looked.
    async fn touched_hours(
        &self,
        after_seq: i64,
        before: DateTime<Utc>,
    ) -> Result<(Vec<DateTime<Utc>>, i64), StoreError>;

    /// From one snapshot: the projection's checkpoint, the stored rows of
    /// `granularities` with buckets in `[from, to)`, and every event folded
    /// as of that checkpoint with `ts` in `[from, to)`.
    async fn reconcile_read(
        &self,
        spec: &Spec,
        granularities: &[Granularity],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<ReconcileRead, StoreError>;

    /// Backend housekeeping after bulk deletes (SQLite: `PRAGMA optimize`
    /// and a WAL checkpoint); a line per step taken.
    async fn maintenance(&self) -> Result<Vec<String>, StoreError>;

    /// Connection pool usage, for `/metrics`.
    fn pool_stats(&self) -> Vec<PoolStats>;
}

/// What [`EventStore::reconcile_read`] saw.
#[derive(Debug, Clone)]
pub struct ReconcileRead {
    /// The projection's checkpoint at the snapshot (`None`: no such projection).
    pub cursor: Option<Cursor>,
    /// Stored rows per granularity, in key order.
    pub stored: Vec<(Granularity, Vec<AggRow>)>,
    /// The events those rows should have been folded from.
    pub events: Vec<Event>,
}

/// One connection pool's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// `main`, `query`, `reader` or `writer`.
    pub pool: &'static str,
    /// Open connections.
    pub size: u32,
    /// Of which idle.
    pub idle: u32,
    /// Most connections.
    pub max: u32,
}

/// The whole log summed ([`ops::OpsStore::log_totals`]), compared by `tally copy`.
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
pub async fn connect(url: &str, options: &StoreOptions) -> Result<Arc<dyn EventStore>, StoreError> {
    Ok(match Backend::from_url(url)? {
        Backend::Postgres => Arc::new(postgres::PgStore::connect(url, options).await?),
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect(url, options).await?),
    })
}

/// A URL with its password replaced, safe to log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The columns of `usage_events` that carry the event, in bind order.
pub(crate) const EVENT_COLUMNS: &str =
    "id, ts, api, endpoint, method, key, \"user\", model, status, success, \
     error_type, error_message, latency_ms, request_bytes, response_bytes, tokens_in, tokens_out, \
     cost_nanos, cached, metadata";

/// Indices of the first occurrence of each id: the only events a backend inserts.
pub(crate) fn first_occurrences(events: &[Event]) -> Vec<usize> {
    let mut seen = HashSet::with_capacity(events.len());
    (0..events.len())
        .filter(|&i| seen.insert(events[i].id.as_str()))
        .collect()
}

/// The ids of `unique` that were not inserted: only these need their stored
/// version read back (none in the common, duplicate-free case).
pub(crate) fn not_inserted<'a>(unique: &[&'a Event], inserted: &HashSet<String>) -> Vec<&'a str> {
    unique
        .iter()
        .map(|e| e.id.as_str())
        .filter(|id| !inserted.contains(*id))
        .collect()
}

/// Columns read back by `recent_rejected` (decoded by name in [`rejected_from_row`]).
pub(crate) const REJECTED_COLUMNS: &str =
    "received_at, source, subject, kind, event_id, item_index, reason, payload";

/// Builds a [`RejectedRow`] from a row holding [`REJECTED_COLUMNS`], read by
/// name, given the backend-specific `received_at`.
pub(crate) fn rejected_from_row<'r, R>(
    row: &'r R,
    received_at: DateTime<Utc>,
) -> Result<RejectedRow, StoreError>
where
    R: sqlx::Row,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(RejectedRow {
        received_at,
        source: row.try_get("source")?,
        subject: row.try_get("subject")?,
        kind: row.try_get("kind")?,
        event_id: row.try_get("event_id")?,
        item_index: row.try_get("item_index")?,
        reason: row.try_get("reason")?,
        payload: row.try_get("payload")?,
    })
}

/// Classifies every event of a batch once the backend knows which ids it
/// inserted and what was already stored for the others.
///
/// The "winner" of an id is the stored row, or the first occurrence in this batch
/// when that one was inserted now. Every other occurrence is a duplicate when it
/// equals the winner and a conflict otherwise.
pub(crate) fn classify(
    events: &[Event],
    inserted: &HashSet<String>,
    existing: &HashMap<String, Event>,
) -> (Vec<Outcome>, Vec<Rejected>) {
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut outcomes = Vec::with_capacity(events.len());
    let mut conflicts = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let first_index = *first.entry(e.id.as_str()).or_insert(i);
        let is_new = inserted.contains(&e.id);
        if is_new && first_index == i {
            outcomes.push(Outcome::Inserted);
            continue;
        }
        let winner = if is_new {
            Some(&events[first_index])
        } else {
            existing.get(&e.id)
        };
        match winner {
            Some(w) if w == e => outcomes.push(Outcome::Duplicate),
            Some(w) => {
                outcomes.push(Outcome::Conflict);
                conflicts.push(conflict_record(e, w, i));
            }
            // Not inserted yet not found: only possible if a concurrent delete ran;
            // reporting a duplicate would hide it, so call it a conflict.
            None => {
                outcomes.push(Outcome::Conflict);
                conflicts.push(Rejected {
                    kind: RejectKind::Conflict,
                    event_id: Some(e.id.clone()),
                    item_index: i32::try_from(i).ok(),
                    reason: format!("id `{}` was neither inserted nor found", e.id),
                    content_type: Some("application/json".into()),
                    payload: to_wire_json(e).to_string().into_bytes(),
                    subject: None,
                });
            }
        }
    }
    (outcomes, conflicts)
}

fn conflict_record(e: &Event, stored: &Event, index: usize) -> Rejected {
    let new = to_wire_json(e);
    let old = to_wire_json(stored);
    let mut differing: Vec<&str> = crate::event::validate::FIELDS
        .iter()
        .copied()
        .filter(|f| new.get(f) != old.get(f))
        .collect();
    if differing.is_empty() {
        differing.push("(normalised form)");
    }
    Rejected {
        kind: RejectKind::Conflict,
        event_id: Some(e.id.clone()),
        item_index: i32::try_from(index).ok(),
        reason: format!(
            "conflict: id `{}` is already stored with different content (differs in: {}); the stored event is kept. Use a new id for a new call",
            e.id,
            differing.join(", ")
        ),
        content_type: Some("application/json".into()),
        payload: new.to_string().into_bytes(),
        subject: None,
    }
}

/// Builds an [`Event`] from a row holding [`EVENT_COLUMNS`], read by name,
/// given the backend-specific `ts`; `metadata` is JSON text.
pub(crate) fn event_from_row<'r, R>(row: &'r R, ts: DateTime<Utc>) -> Result<Event, StoreError>
where
    R: sqlx::Row,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = row.try_get("id")?;
    let corrupt = |reason: String| StoreError::CorruptRow {
        id: id.clone(),
        reason,
    };
    let error_type: Option<String> = row.try_get("error_type")?;
    let error_type = match error_type {
        Some(t) => Some(ErrorType::parse(&t).ok_or_else(|| corrupt(format!("error_type {t:?}")))?),
        None => None,
    };
    let metadata: Option<String> = row.try_get("metadata")?;
    let metadata = match metadata {
        Some(text) => serde_json::from_str(&text).map_err(|e| corrupt(format!("metadata: {e}")))?,
        None => Default::default(),
    };
    Ok(Event {
        ts,
        api: row.try_get("api")?,
        endpoint: row.try_get("endpoint")?,
        method: row.try_get("method")?,
        key: row.try_get("key")?,
        user: row.try_get("user")?,
        model: row.try_get("model")?,
        status: row.try_get("status")?,
        success: row.try_get("success")?,
        error_type,
        error_message: row.try_get("error_message")?,
        latency_ms: row.try_get("latency_ms")?,
        request_bytes: row.try_get("request_bytes")?,
        response_bytes: row.try_get("response_bytes")?,
        tokens_in: row.try_get("tokens_in")?,
        tokens_out: row.try_get("tokens_out")?,
        cost_nanos: row.try_get("cost_nanos")?,
        cached: row.try_get("cached")?,
        metadata,
        id,
    })
}

/// The event columns a projector reads, in this order; each backend appends
/// its cursor columns. No id, message or metadata: nothing folds them, and on
/// a 1M-event backlog every column read costs (see BENCHMARKS.md).
pub(crate) const FOLD_COLUMNS: &str = "ts, api, endpoint, method, key, \"user\", model, status, \
     success, error_type, latency_ms, request_bytes, response_bytes, tokens_in, tokens_out, \
     cost_nanos, cached";

/// An event read with [`FOLD_COLUMNS`] (`ts` decoded by the caller); `id` is
/// empty and `error_message`/`metadata` absent. `seq` names the row in errors.
pub(crate) fn fold_event_from_row<'r, R>(
    row: &'r R,
    ts: DateTime<Utc>,
    seq: i64,
) -> Result<Event, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'r str: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let error_type: Option<&str> = row.try_get(9)?;
    let error_type = match error_type {
        Some(t) => Some(ErrorType::parse(t).ok_or_else(|| StoreError::CorruptRow {
            id: format!("seq {seq}"),
            reason: format!("error_type {t:?}"),
        })?),
        None => None,
    };
    Ok(Event {
        id: String::new(),
        ts,
        api: row.try_get(1)?,
        endpoint: row.try_get(2)?,
        method: row.try_get(3)?,
        key: row.try_get(4)?,
        user: row.try_get(5)?,
        model: row.try_get(6)?,
        status: row.try_get(7)?,
        success: row.try_get(8)?,
        error_type,
        error_message: None,
        latency_ms: row.try_get(10)?,
        request_bytes: row.try_get(11)?,
        response_bytes: row.try_get(12)?,
        tokens_in: row.try_get(13)?,
        tokens_out: row.try_get(14)?,
        cost_nanos: row.try_get(15)?,
        cached: row.try_get(16)?,
        metadata: Default::default(),
    })
}

/// `metadata` as stored: JSON text, NULL when empty.
pub(crate) fn metadata_json(e: &Event) -> Option<String> {
    (!e.metadata.is_empty())
        .then(|| serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".to_string()))
}
