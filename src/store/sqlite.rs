//! What SQLite does its own way: one writer connection and a read-only pool,
//! multi-row inserts of up to [`ROWS_PER_STATEMENT`] events, the log cursor
//! `seq`, index re-creation after a swap, and a statement deadline enforced by
//! a progress handler. Everything else is in the shared store modules, over
//! [`super::db::Db`].
//!
//! Invariant: all writes go through the single-connection writer pool, so
//! transactions commit one after another and `seq` (the rowid) order is commit
//! order. The projector relies on this to use `seq` alone as its cursor.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

use super::agg::{all_columns, index_name, index_sql, key_columns, upsert_clause};
use super::db::{timed_out, Row as DbRow, Sql};
use super::log::{each_event, voided_indices, EventColumns, Inserted, FOLD_COLUMNS};
use super::log::{metadata_json, EVENT_COLUMNS};
use super::projections::{Target, Upserts};
use super::tail::{self, LogTail};
use super::{Backend, Cursor, LogBatch, Origin, Rejected, StoreError, StoreOptions, Watermark};
use crate::aggregate::measures::RowKey;
use crate::aggregate::spec::Spec;
use crate::event::{format_ts, Event};

/// A transaction on this dialect's connection.
type Tx<'c> = Transaction<'c, Sqlite>;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./schema/sqlite");

/// Events per INSERT statement: 21 binds each stays well under SQLite's 32,766-variable limit.
pub const ROWS_PER_STATEMENT: usize = 500;

/// The pools of one SQLite file.
#[derive(Debug, Clone)]
pub(crate) struct Pools {
    /// Exactly one connection: SQLite allows one writer, and queuing in the pool
    /// is cheaper than SQLITE_BUSY retries.
    pub(crate) writer: SqlitePool,
    /// Readers never block the writer in WAL mode.
    pub(crate) reader: SqlitePool,
    /// Longest a query-module read may run.
    statement_timeout: Duration,
}

/// Opens (creating if missing) the database file with durable settings:
/// WAL and `synchronous = FULL`, because an acknowledged event must survive a power cut.
pub(crate) async fn connect(url: &str, options: &StoreOptions) -> Result<Pools, StoreError> {
    let opts = SqliteConnectOptions::from_str(url)?;
    create_private(opts.get_filename());
    let base = opts
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        // Every connection back in the pool is durable again, whatever
        // `begin_derived` set (a failure closes it; a new one is durable).
        .after_release(|conn, _| {
            Box::pin(async move {
                sqlx::query(DURABLE).execute(conn).await?;
                Ok(true)
            })
        })
        .acquire_timeout(options.acquire_timeout.max(Duration::from_secs(30)))
        .connect_with(base.clone())
        .await?;
    let reader = SqlitePoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        .connect_with(base.read_only(true))
        .await?;
    Ok(Pools {
        writer,
        reader,
        statement_timeout: options.statement_timeout,
    })
}

/// The writer's durable setting: a commit returns once the WAL is on disk.
const DURABLE: &str = "PRAGMA synchronous = FULL";

/// A write transaction for derived data only (aggregates, checkpoints,
/// restatement progress) whose commit does not wait for the WAL's fsync
/// (`synchronous = NORMAL`; SQLite refuses to change it inside a
/// transaction, so it is set before `BEGIN`). The writer pool's release hook
/// sets it back to FULL before the connection serves anything else.
///
/// Why a power cut cannot lose anything but derived commits: WAL recovery
/// keeps the longest prefix of whole, checksummed commits, and a durable
/// commit's fsync writes every frame before it. So a lost derived commit
/// takes only later derived commits with it; each carries its own checkpoint
/// compare-and-set, so the lost rows are folded again from the log.
pub(crate) async fn begin_derived(pool: &SqlitePool) -> Result<Tx<'static>, StoreError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("PRAGMA synchronous = NORMAL")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::Transaction::begin(conn, Some("BEGIN IMMEDIATE".into())).await?)
}

/// Creates a missing database file empty and readable by its owner only
/// (`0600`) before SQLite opens it: SQLite gives its `-wal` and `-shm`
/// files the database file's mode. A file that exists keeps its mode. Any
/// failure is left to SQLite's own open, which reports it.
fn create_private(path: &std::path::Path) {
    if path.as_os_str() == ":memory:" || path.as_os_str().is_empty() {
        return;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let _ = opts.open(path);
}

/// `metadata` is JSON text already.
pub(crate) fn event_select() -> String {
    EVENT_COLUMNS.to_string()
}

/// `column` is one of the values of `param`, a JSON array: one bound
/// parameter, whatever the list's length (SQLite binds at most 32,766).
pub(crate) fn one_of(column: &str, param: &str) -> String {
    format!("{column} IN (SELECT value FROM json_each({param}))")
}

/// The UTC hour of `ts` (fixed-width RFC 3339 text: its first 13 characters), as a timestamp.
pub(crate) const HOUR_OF_TS: &str = "substr(ts, 1, 13) || ':00:00.000000Z'";

/// Reads a stored fixed-width timestamp back.
pub fn parse_ts(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Inserts the batch's first occurrences; the ids it inserted.
pub(crate) async fn insert_events(
    tx: &mut Tx<'_>,
    events: &[&Event],
) -> Result<Inserted, StoreError> {
    let now = format_ts(&Utc::now());
    let mut inserted = Inserted::with_capacity(events.len());
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut qb = insert_rows(chunk.iter().copied(), &now);
        qb.push(" ON CONFLICT (id) DO NOTHING RETURNING id, seq");
        let rows: Vec<(String, i64)> = qb.build_query_as().fetch_all(&mut **tx).await?;
        inserted.extend(
            rows.into_iter()
                .map(|(id, seq)| (id, Cursor { tx: 0, seq })),
        );
    }
    Ok(inserted)
}

/// Records rejected payloads.
pub(crate) async fn insert_rejects(
    tx: &mut Tx<'_>,
    rejects: &[Rejected],
    origin: &Origin,
) -> Result<(), StoreError> {
    let now = format_ts(&Utc::now());
    for chunk in rejects.chunks(ROWS_PER_STATEMENT) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO rejected_events (received_at, source, subject, kind, event_id, item_index, reason, content_type, payload) ",
        );
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(now.as_str())
                .push_bind(origin.source)
                .push_bind(r.subject.as_deref().or(origin.subject.as_deref()))
                .push_bind(r.kind.as_str())
                .push_bind(r.event_id.as_deref())
                .push_bind(r.item_index)
                .push_bind(r.reason.as_str())
                .push_bind(r.content_type.as_deref())
                .push_bind(r.payload.as_slice());
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A multi-row `INSERT INTO usage_events … VALUES (…), (…)` without a
/// conflict clause (the caller adds it). At most [`ROWS_PER_STATEMENT`] rows.
fn insert_rows<'a>(
    rows: impl IntoIterator<Item = &'a Event>,
    ingested_at: &'a str,
) -> QueryBuilder<'a, Sqlite> {
    let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
        "INSERT INTO usage_events ({EVENT_COLUMNS}, ingested_at) "
    ));
    qb.push_values(rows, |mut b, e| {
        b.push_bind(e.id.as_str())
            .push_bind(format_ts(&e.ts))
            .push_bind(e.api.as_str())
            .push_bind(e.endpoint.as_deref())
            .push_bind(e.method.as_deref())
            .push_bind(e.key.as_deref())
            .push_bind(e.user.as_deref())
            .push_bind(e.model.as_deref())
            .push_bind(e.status)
            .push_bind(e.success)
            .push_bind(e.error_type.map(|t| t.as_str()))
            .push_bind(e.error_message.as_deref())
            .push_bind(e.latency_ms)
            .push_bind(e.request_bytes)
            .push_bind(e.response_bytes)
            .push_bind(e.tokens_in)
            .push_bind(e.tokens_out)
            .push_bind(e.cost_nanos)
            .push_bind(e.cached)
            .push_bind(metadata_json(e))
            .push_bind(ingested_at);
    });
    qb
}

/// Exact row counts.
pub(crate) async fn table_rows(
    p: &Pools,
    tables: &[&str],
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        // Names come from Tally's own constants, never from a request.
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
            .fetch_one(&p.reader)
            .await?;
        out.push((t.to_string(), n));
    }
    Ok(out)
}

pub(crate) async fn maintenance(p: &Pools) -> Result<Vec<String>, StoreError> {
    let mut done = Vec::new();
    sqlx::query("PRAGMA optimize").execute(&p.writer).await?;
    done.push("PRAGMA optimize".to_string());
    // TRUNCATE waits for readers and resets the WAL file to zero bytes, so
    // a WAL grown by a large delete gives its disk space back.
    let (busy, log, moved): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(&p.writer)
        .await?;
    done.push(format!(
        "PRAGMA wal_checkpoint(TRUNCATE): busy={busy} wal_pages={log} checkpointed={moved}"
    ));
    Ok(done)
}

/// An event's log transaction as a number (`usage_events` as `e`): none on SQLite.
/// The column names of table `$1`.
pub(crate) const TABLE_COLUMNS: &str = "SELECT name FROM pragma_table_info($1)";

pub(crate) const EVENT_TX: &str = "0";

/// The condition "folded as of the cursor `($3, $4)`": `tx` is always 0 on
/// SQLite (`seq` order is commit order), bound as text like PostgreSQL's.
pub(crate) const FOLDED_UP_TO: &str = "(0, seq) <= (CAST($3 AS INTEGER), $4)";

/// The condition "not folded as of the cursor `($5, $6)`".
pub(crate) const FOLDED_AFTER: &str = "(0, seq) > (CAST($5 AS INTEGER), $6)";

/// [`FOLD_COLUMNS`], then the cursor's `seq` (17).
pub(crate) fn log_columns() -> String {
    format!("{FOLD_COLUMNS}, seq")
}

/// A row read with [`log_columns`] and its cursor.
pub(crate) fn log_event(cols: &EventColumns, r: &SqliteRow) -> Result<(Cursor, Event), StoreError> {
    let at = cols
        .seq
        .ok_or_else(|| sqlx::Error::ColumnNotFound("seq".into()))?;
    let seq: i64 = r.try_get(at)?;
    let text: &str = r.try_get(cols.ts)?;
    let ts = parse_ts(text).ok_or_else(|| StoreError::CorruptRow {
        id: format!("seq {seq}"),
        reason: format!("ts {text:?}"),
    })?;
    Ok((Cursor { tx: 0, seq }, cols.event(r, ts)?))
}

/// The log after `after`: `seq` order is commit order.
pub(crate) async fn read_log(
    p: &Pools,
    after: Cursor,
    limit: i64,
    tail: Option<&LogTail>,
) -> Result<LogBatch, StoreError> {
    // Taken before the read: everything committed before it is visible to
    // the read, which starts its WAL snapshot afterwards.
    let at = Utc::now();
    // One snapshot for every statement below.
    let mut tx = p.reader.begin().await?;
    let full = |range: &str| {
        format!(
            "SELECT {} FROM usage_events WHERE {range} ORDER BY seq",
            log_columns()
        )
    };
    let events = match tail {
        None => {
            let rows = sqlx::query(&format!("{} LIMIT ?", full("seq > ?")))
                .bind(after.seq)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
            each_event(&rows, log_event)?
        }
        Some(tail) => {
            let seqs: Vec<i64> = sqlx::query_scalar(
                "SELECT seq FROM usage_events WHERE seq > ? ORDER BY seq LIMIT ?",
            )
            .bind(after.seq)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let positions: Vec<Cursor> =
                seqs.into_iter().map(|seq| Cursor { tx: 0, seq }).collect();
            tail::fill(tail, positions, async |first, last| {
                let rows = sqlx::query(&full("seq >= ? AND seq <= ?"))
                    .bind(first.seq)
                    .bind(last.seq)
                    .fetch_all(&mut *tx)
                    .await?;
                each_event(&rows, log_event)
            })
            .await?
        }
    };
    // The voided among them: one range lookup (the table is small, usually empty).
    let voided = match (events.first(), events.last()) {
        (Some((first, _)), Some((last, _))) => {
            let seqs: Vec<i64> = sqlx::query_scalar(
                "SELECT event_seq FROM voided_events WHERE event_seq >= ? AND event_seq <= ?",
            )
            .bind(first.seq)
            .bind(last.seq)
            .fetch_all(&mut *tx)
            .await?;
            let at: Vec<Cursor> = seqs.into_iter().map(|seq| Cursor { tx: 0, seq }).collect();
            voided_indices(&events, &at)
        }
        _ => Vec::new(),
    };
    tx.commit().await?;
    Ok(LogBatch {
        events,
        voided,
        watermark: Watermark {
            at,
            xmin: 0,
            xmax: 0,
        },
        // One writer at a time: rowid order is commit order, nothing waits.
        held_back: false,
    })
}

/// Events stored after `after`.
pub(crate) async fn events_after(p: &Pools, after: Cursor) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE seq > ?")
            .bind(after.seq)
            .fetch_one(&p.reader)
            .await?,
    )
}

pub(crate) async fn log_position_problem(p: &Pools) -> Result<Option<String>, StoreError> {
    let (next, folded): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'usage_events'), \
                (SELECT coalesce(max(cursor_seq), 0) FROM projection_checkpoints)",
    )
    .fetch_one(&p.reader)
    .await?;
    Ok((folded > next).then(|| {
        format!(
            "a projection checkpoint is at log position {folded}, beyond the last position the log handed out ({next}): the database file is older than its checkpoints (restored from a backup?), and new events would get positions that are never folded"
        )
    }))
}

pub(crate) async fn repair_log_positions(p: &Pools) -> Result<String, StoreError> {
    let mut tx = p.writer.begin().await?;
    let done = sqlx::query(
        "UPDATE sqlite_sequence SET seq = max(seq, (SELECT coalesce(max(cursor_seq), 0) FROM projection_checkpoints)) \
         WHERE name = 'usage_events'",
    )
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        sqlx::query(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'usage_events', \
             max((SELECT coalesce(max(seq), 0) FROM usage_events), (SELECT coalesce(max(cursor_seq), 0) FROM projection_checkpoints))",
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok("new events now get log positions past every checkpoint; rebuild the projections (`tally projections rebuild NAME`) if the log lost events they had folded".into())
}

/// SQLite cannot rename an index: the dimension indexes are recreated under
/// the live name, so the next rebuild's shadow can use the shadow names.
pub(crate) fn index_renames(spec: &Spec, shadow: &str, live: &str) -> Vec<String> {
    let dropped = spec.dimensions.iter();
    let mut sql: Vec<String> = dropped
        .map(|&d| format!("DROP INDEX IF EXISTS {}", index_name(shadow, d)))
        .collect();
    sql.extend(index_sql(spec, live));
    sql
}

/// Rows per statement in aggregate upserts: at most 32 binds a row.
const AGG_ROWS_PER_STATEMENT: usize = 500;

/// The stored `bucket`, dimensions and `latency_sketch` of these keys,
/// [`AGG_ROWS_PER_STATEMENT`] keys a statement (a `VALUES` list).
pub(crate) async fn sketches(
    tx: &mut Tx<'_>,
    t: &Target<'_>,
    keys: &[&RowKey],
) -> Result<Vec<DbRow>, StoreError> {
    let (spec, table) = (t.spec, t.table);
    let mut out = Vec::new();
    for chunk in keys.chunks(AGG_ROWS_PER_STATEMENT) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {}, latency_sketch FROM {table} WHERE latency_sketch IS NOT NULL AND ({}) IN (VALUES ",
            key_columns(spec),
            key_columns(spec)
        ));
        let mut rows = qb.separated(", ");
        for k in chunk {
            rows.push("(");
            rows.push_bind_unseparated(format_ts(&k.bucket));
            for d in &k.dims {
                rows.push_unseparated(", ");
                rows.push_bind_unseparated(d.as_str());
            }
            rows.push_unseparated(")");
        }
        qb.push(")");
        let found = qb.build().fetch_all(&mut **tx).await?;
        out.extend(found.into_iter().map(DbRow::Sqlite));
    }
    Ok(out)
}

/// Inserts or adds to the rows: multi-row `INSERT … ON CONFLICT` statements.
pub(crate) async fn upsert(
    tx: &mut Tx<'_>,
    t: &Target<'_>,
    rows: &Upserts<'_>,
) -> Result<(), StoreError> {
    let (spec, table) = (t.spec, t.table);
    let conflict = upsert_clause(Backend::Sqlite, spec, table);
    for start in (0..rows.len()).step_by(AGG_ROWS_PER_STATEMENT) {
        let end = (start + AGG_ROWS_PER_STATEMENT).min(rows.len());
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("INSERT INTO {table} ({}) ", all_columns(spec)));
        qb.push_values(rows.each(start..end), |mut b, r| {
            b.push_bind(format_ts(&r.key.bucket));
            for d in &r.key.dims {
                b.push_bind(d.as_str());
            }
            for v in r.ints {
                b.push_bind(v);
            }
            for v in r.floats {
                b.push_bind(v);
            }
            b.push_bind(r.sketch);
        });
        qb.push(conflict.as_str());
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Runs a query-module read on the read pool, interrupted at the statement
/// timeout. SQLite has no statement timeout: a progress handler interrupts
/// the statement itself once the deadline passes (dropping the future would
/// leave it running on the connection's worker thread).
pub(crate) async fn fetch_timed(p: &Pools, sql: Sql<'_>) -> Result<Vec<DbRow>, StoreError> {
    let mut conn = p.reader.acquire().await?;
    let deadline = Deadline::arm(p.statement_timeout);
    {
        let watch = deadline.watch();
        conn.lock_handle()
            .await?
            .set_progress_handler(1_000, move || !watch.passed());
    }
    let result = sql.sqlite().fetch_all(&mut *conn).await;
    drop(deadline);
    if let Ok(mut handle) = conn.lock_handle().await {
        handle.remove_progress_handler();
    }
    // 9: SQLITE_INTERRUPT, raised when the progress handler stops the statement.
    let rows = result.map_err(|e| timed_out(e, "9", p.statement_timeout))?;
    Ok(rows.into_iter().map(DbRow::Sqlite).collect())
}

/// The largest rowid of each table that exists: close to its row count, as
/// rows are deleted only by retention, and one index probe.
pub(crate) async fn table_sizes(
    p: &Pools,
    t: &[String],
) -> Result<HashMap<String, i64>, StoreError> {
    let existing: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&p.reader)
            .await?;
    let mut out = HashMap::new();
    for t in t.iter().filter(|t| existing.contains(t)) {
        let n: Option<i64> = sqlx::query_scalar(&format!("SELECT max(rowid) FROM {t}"))
            .fetch_one(&p.reader)
            .await?;
        out.insert(t.clone(), n.unwrap_or(0));
    }
    Ok(out)
}

/// A statement deadline shared with a connection's progress handler. Dropping
/// it disarms the handler (even when the query's future is dropped midway), so
/// a connection back in the pool never interrupts the next statement.
struct Deadline(std::sync::Arc<std::sync::atomic::AtomicU64>);

/// What the progress handler reads.
struct DeadlineWatch(std::sync::Arc<std::sync::atomic::AtomicU64>);

fn process_nanos() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Deadline {
    fn arm(timeout: Duration) -> Self {
        let at =
            process_nanos().saturating_add(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX));
        Self(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(at)))
    }

    fn watch(&self) -> DeadlineWatch {
        DeadlineWatch(self.0.clone())
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.0.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    }
}

impl DeadlineWatch {
    fn passed(&self) -> bool {
        process_nanos() >= self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `synchronous` of the writer connection: 2 is FULL, 1 NORMAL.
    async fn writer_sync(p: &Pools) -> i64 {
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&p.writer)
            .await
            .expect("pragma")
    }

    #[tokio::test]
    async fn the_writer_is_durable_again_after_a_derived_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let p = connect(&url, &StoreOptions::default())
            .await
            .expect("connect");
        assert_eq!(writer_sync(&p).await, 2, "the writer opens durable");
        for commit in [true, false] {
            let mut tx = begin_derived(&p.writer).await.expect("begin");
            let inside: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut *tx)
                .await
                .expect("pragma");
            assert_eq!(inside, 1, "a derived transaction commits without the fsync");
            if commit {
                tx.commit().await.expect("commit");
            } else {
                drop(tx);
            }
            // The release hook runs on a task of its own: the next acquire
            // waits for it, as every writer does.
            assert_eq!(writer_sync(&p).await, 2, "committed: {commit}");
        }
    }
}
