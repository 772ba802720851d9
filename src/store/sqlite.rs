//! What SQLite does its own way: two files (the main file and the
//! aggregates file beside it), each with one writer connection, and a
//! read-only pool that sees both; multi-row inserts of up to
//! [`ROWS_PER_STATEMENT`] events, the log cursor `seq`, index re-creation
//! after a swap, and a statement deadline enforced by a progress handler.
//! Everything else is in the shared store modules, over [`super::db::Db`].
//!
//! Invariant: every write of the main file goes through its single-connection
//! writer pool, so the log's transactions commit one after another and `seq`
//! (the rowid) order is commit order. The projector relies on this to use
//! `seq` alone as its cursor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// The pools of one SQLite database: the main file (the event log and
/// everything that must survive a power cut) and the aggregates file beside
/// it (projection tables and their checkpoints, all derived from the log).
#[derive(Debug, Clone)]
pub(crate) struct Pools {
    /// The main file's one writer connection: SQLite allows one writer per
    /// file, and queuing in the pool is cheaper than SQLITE_BUSY retries.
    /// The aggregates file is attached read-only as `agg`.
    pub(crate) writer: SqlitePool,
    /// The aggregates file's one writer connection, so folding never waits
    /// for ingest's commits nor they for it. Its `main` is the aggregates
    /// file (unqualified `CREATE TABLE` lands there); the main file is
    /// attached read-only as `log`.
    pub(crate) derived: SqlitePool,
    /// Read-only connections to the main file with the aggregates file
    /// attached as `agg`: a name resolves to whichever file holds it.
    pub(crate) reader: SqlitePool,
    /// Longest a query-module read may run.
    statement_timeout: Duration,
}

/// The aggregates file of the database at `main`: `tally.db` →
/// `tally.aggregates.db`, in the same directory.
pub fn aggregates_path(main: &Path) -> PathBuf {
    let stem = main
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tally".into());
    main.with_file_name(format!("{stem}.aggregates.db"))
}

/// `file:` URI of `path` opened read-only, for `ATTACH` (SQLite reads `?`
/// and `#` as the start of parameters and `%` as an escape).
fn read_only_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3F"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?mode=ro");
    uri
}

/// Attaches `path` read-only as `schema` on every new connection of a pool.
fn attaching(pool: SqlitePoolOptions, path: &Path, schema: &'static str) -> SqlitePoolOptions {
    let uri = read_only_uri(path);
    pool.after_connect(move |conn, _| {
        let uri = uri.clone();
        Box::pin(async move {
            sqlx::query(&format!("ATTACH DATABASE $1 AS {schema}"))
                .bind(uri)
                .execute(conn)
                .await?;
            Ok(())
        })
    })
}

/// Opens (creating if missing) the main file with durable settings (WAL and
/// `synchronous = FULL`, because an acknowledged event must survive a power
/// cut) and the aggregates file beside it (WAL and `synchronous = NORMAL`:
/// a commit lost in a power cut loses rows and checkpoint together, and they
/// are folded again).
pub(crate) async fn connect(url: &str, options: &StoreOptions) -> Result<Pools, StoreError> {
    let opts = SqliteConnectOptions::from_str(url)?;
    let main = opts.get_filename().to_path_buf();
    let aggregates = aggregates_path(&main);
    create_private(&main);
    create_private(&aggregates);
    let base = opts
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        .row_buffer_size(ROW_BUFFER);
    // The aggregates file first: the others attach it, so it must exist.
    let derived_opts = SqliteConnectOptions::new()
        .filename(&aggregates)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .row_buffer_size(ROW_BUFFER);
    let derived = attaching(SqlitePoolOptions::new(), &main, "log")
        .max_connections(1)
        .acquire_timeout(options.acquire_timeout.max(Duration::from_secs(30)))
        .connect_with(derived_opts)
        .await?;
    let writer = attaching(SqlitePoolOptions::new(), &aggregates, "agg")
        .max_connections(1)
        .acquire_timeout(options.acquire_timeout.max(Duration::from_secs(30)))
        .connect_with(base.clone())
        .await?;
    let reader = attaching(SqlitePoolOptions::new(), &aggregates, "agg")
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        .connect_with(base.read_only(true))
        .await?;
    Ok(Pools {
        writer,
        derived,
        reader,
        statement_timeout: options.statement_timeout,
    })
}

/// Rows a statement's worker thread may hand over before the reading task
/// takes them (sqlx's default is 50). A busy runtime takes a while to
/// schedule the reading task, and the append's `RETURNING` (a row an event)
/// and the fold's reads return thousands; every caller collects all rows
/// anyway, so this bounds nothing a statement would not hold.
const ROW_BUFFER: usize = 8_192;

/// The main file's own tables (its migrations create them): every other
/// table in it belongs to the aggregates file and is moved there once.
pub(crate) const MAIN_TABLES: [&str; 23] = [
    "_sqlx_migrations",
    "alert_audit",
    "alert_instances",
    "alert_outbox",
    "alert_rule_status",
    "alert_rules",
    "alert_rules_version",
    "api_tokens",
    "correction_events",
    "corrections",
    "job_runs",
    "key_quotas",
    "leases",
    "price_audit",
    "prices",
    "rejected_events",
    "restatements",
    "settings",
    "sqlite_sequence",
    "sqlite_stat1",
    "usage_events",
    "usage_events_v5",
    "voided_events",
];

/// `projection_checkpoints` as the main file's migrations left it, for an
/// aggregates file that lost it (deleted to be rebuilt, or restored without
/// it). Checked against the migrations by
/// `store::sqlite::tests::a_lost_aggregates_file_gets_the_migrated_checkpoints_table`.
const CHECKPOINTS: &str = "CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name           TEXT PRIMARY KEY,
    spec_hash      TEXT NOT NULL,
    spec           TEXT NOT NULL,
    cursor_tx      INTEGER NOT NULL DEFAULT 0,
    cursor_seq     INTEGER NOT NULL DEFAULT 0,
    as_of          TEXT,
    events_folded  INTEGER NOT NULL DEFAULT 0,
    leader         TEXT,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    generation     INTEGER NOT NULL DEFAULT 0
)";

/// Moves the derived tables a main file holds (`projection_checkpoints`,
/// which the main migrations create, and the projection tables of a
/// database made before the aggregates file existed) to the aggregates
/// file, with their rows and indexes. Two ordered commits, each safe to
/// redo: the aggregates file's copy first (skipped for a table it already
/// has), then the main file's drop. A crash between leaves the table in
/// both; the next start sees the copy and only drops.
pub(crate) async fn move_derived_tables(p: &Pools) -> Result<(), StoreError> {
    let moving = copy_derived_tables(p).await?;
    drop_moved_tables(p, &moving).await
}

/// The first commit of [`move_derived_tables`]: copies the derived tables
/// the aggregates file lacks and names every derived table of the main file.
async fn copy_derived_tables(p: &Pools) -> Result<Vec<String>, StoreError> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM main.sqlite_master WHERE type = 'table' AND sql IS NOT NULL \
         AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&p.writer)
    .await?;
    let moving: Vec<(String, String)> = tables
        .into_iter()
        .filter(|(name, _)| !MAIN_TABLES.contains(&name.as_str()))
        .collect();
    if moving.is_empty() {
        // A new or lost aggregates file: its checkpoints start empty, and
        // every projection is folded again from the log.
        sqlx::query(CHECKPOINTS).execute(&p.derived).await?;
        return Ok(Vec::new());
    }
    let mut tx = p.derived.begin_with("BEGIN IMMEDIATE").await?;
    for (name, create) in &moving {
        let there: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = $1",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if there.is_some() {
            continue;
        }
        sqlx::query(create).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "INSERT INTO main.\"{name}\" SELECT * FROM log.\"{name}\""
        ))
        .execute(&mut *tx)
        .await?;
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT sql FROM log.sqlite_master WHERE type = 'index' AND tbl_name = $1 \
             AND sql IS NOT NULL",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        for create in indexes {
            sqlx::query(&create).execute(&mut *tx).await?;
        }
    }
    // A lost aggregates file and a main file without checkpoints (moved
    // already): folded again from the log.
    sqlx::query(CHECKPOINTS).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(moving.into_iter().map(|(name, _)| name).collect())
}

/// The second commit of [`move_derived_tables`]: drops the copied tables
/// from the main file.
async fn drop_moved_tables(p: &Pools, moving: &[String]) -> Result<(), StoreError> {
    if moving.is_empty() {
        return Ok(());
    }
    let mut tx = p.writer.begin_with("BEGIN IMMEDIATE").await?;
    for name in moving {
        sqlx::query(&format!("DROP TABLE main.\"{name}\""))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
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
    for (file, pool) in [("main", &p.writer), ("aggregates", &p.derived)] {
        sqlx::query("PRAGMA main.optimize").execute(pool).await?;
        done.push(format!("{file}: PRAGMA optimize"));
        // TRUNCATE waits for readers and resets the WAL file to zero bytes,
        // so a WAL grown by a large delete gives its disk space back.
        let (busy, log, moved): (i64, i64, i64) =
            sqlx::query_as("PRAGMA main.wal_checkpoint(TRUNCATE)")
                .fetch_one(pool)
                .await?;
        done.push(format!(
            "{file}: PRAGMA wal_checkpoint(TRUNCATE): busy={busy} wal_pages={log} checkpointed={moved}"
        ));
    }
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
    let existing: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM main.sqlite_master WHERE type = 'table' \
             UNION ALL SELECT name FROM agg.sqlite_master WHERE type = 'table'",
    )
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

    async fn sync_of(pool: &SqlitePool) -> i64 {
        sqlx::query_scalar("PRAGMA main.synchronous")
            .fetch_one(pool)
            .await
            .expect("pragma")
    }

    #[tokio::test]
    async fn events_are_durable_and_aggregates_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let p = connect(&url, &StoreOptions::default())
            .await
            .expect("connect");
        assert_eq!(sync_of(&p.writer).await, 2, "the main file: FULL");
        assert_eq!(sync_of(&p.derived).await, 1, "the aggregates file: NORMAL");
        assert!(dir.path().join("t.aggregates.db").exists());
    }

    async fn checkpoint_columns(p: &Pools) -> Vec<(String, String, i64, Option<String>, i64)> {
        sqlx::query_as(
            "SELECT name, type, \"notnull\", dflt_value, pk \
             FROM pragma_table_info('projection_checkpoints', 'main') ORDER BY cid",
        )
        .fetch_all(&p.derived)
        .await
        .expect("columns")
    }

    #[tokio::test]
    async fn a_lost_aggregates_file_gets_the_migrated_checkpoints_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let open = || async {
            let p = connect(&url, &StoreOptions::default())
                .await
                .expect("connect");
            MIGRATOR.run(&p.writer).await.expect("migrate");
            move_derived_tables(&p).await.expect("move");
            p
        };
        let p = open().await;
        let migrated = checkpoint_columns(&p).await;
        assert!(migrated.len() >= 12, "{migrated:?}");
        let in_main: Option<String> = sqlx::query_scalar(
            "SELECT name FROM main.sqlite_master WHERE name = 'projection_checkpoints'",
        )
        .fetch_optional(&p.writer)
        .await
        .expect("main");
        assert_eq!(in_main, None, "moved out of the main file");
        p.writer.close().await;
        p.derived.close().await;
        p.reader.close().await;
        for side in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.path().join(format!("t.aggregates.db{side}")));
        }
        let p = open().await;
        assert_eq!(checkpoint_columns(&p).await, migrated);
    }

    async fn names_in(pool: &SqlitePool, schema: &str) -> Vec<String> {
        sqlx::query_scalar(&format!(
            "SELECT type || ' ' || name FROM {schema}.sqlite_master \
             WHERE name IN ('projection_checkpoints', 'by_x_hour', 'by_x_hour_k') ORDER BY name"
        ))
        .fetch_all(pool)
        .await
        .expect("names")
    }

    async fn close(p: Pools) {
        p.writer.close().await;
        p.derived.close().await;
        p.reader.close().await;
    }

    /// A database of the one-file layout (its projection tables and
    /// checkpoints in the main file, no aggregates file), opened by a process
    /// that dies after the move's first commit (the copy) and before its
    /// second (the drop): the next start only drops, and the aggregates
    /// file holds each table once, with its rows and indexes.
    #[tokio::test]
    async fn a_crash_between_the_moves_two_commits_copies_nothing_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let connected = || async {
            let p = connect(&url, &StoreOptions::default())
                .await
                .expect("connect");
            MIGRATOR.run(&p.writer).await.expect("migrate");
            p
        };
        // The one-file layout, as an older Tally left it.
        let p = connected().await;
        move_derived_tables(&p).await.expect("move");
        for sql in [
            CHECKPOINTS,
            "INSERT INTO main.projection_checkpoints \
             (name, spec_hash, spec, cursor_seq, created_at, updated_at) \
             VALUES ('by_x', 'h', '{}', 42, 't', 't')",
            "CREATE TABLE main.by_x_hour (bucket TEXT NOT NULL, k TEXT NOT NULL, \
             requests INTEGER NOT NULL, PRIMARY KEY (bucket, k))",
            "CREATE INDEX main.by_x_hour_k ON by_x_hour (k)",
            "INSERT INTO main.by_x_hour VALUES ('h1', 'a', 1), ('h1', 'b', 2), ('h2', 'a', 3)",
        ] {
            sqlx::query(sql).execute(&p.writer).await.expect(sql);
        }
        close(p).await;
        for side in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.path().join(format!("t.aggregates.db{side}")));
        }
        // Killed after the copy's commit.
        let p = connected().await;
        let moving = copy_derived_tables(&p).await.expect("copy");
        assert_eq!(moving, ["by_x_hour", "projection_checkpoints"]);
        assert_eq!(
            names_in(&p.writer, "main").await.len(),
            3,
            "not dropped yet"
        );
        close(p).await;
        // The next start.
        let p = connected().await;
        move_derived_tables(&p).await.expect("move after the crash");
        assert!(names_in(&p.writer, "main").await.is_empty());
        assert_eq!(
            names_in(&p.derived, "main").await,
            [
                "table by_x_hour",
                "index by_x_hour_k",
                "table projection_checkpoints"
            ]
        );
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT bucket, k, requests FROM by_x_hour ORDER BY bucket, k")
                .fetch_all(&p.derived)
                .await
                .expect("rows");
        assert_eq!(
            rows,
            [
                ("h1".into(), "a".into(), 1),
                ("h1".into(), "b".into(), 2),
                ("h2".into(), "a".into(), 3)
            ]
        );
        let cursor: Vec<i64> =
            sqlx::query_scalar("SELECT cursor_seq FROM projection_checkpoints WHERE name = 'by_x'")
                .fetch_all(&p.derived)
                .await
                .expect("checkpoint");
        assert_eq!(cursor, [42]);
    }

    #[test]
    fn the_aggregates_file_sits_beside_the_main_file() {
        assert_eq!(
            aggregates_path(Path::new("/var/lib/tally/tally.db")),
            PathBuf::from("/var/lib/tally/tally.aggregates.db")
        );
        assert_eq!(
            aggregates_path(Path::new("data")),
            PathBuf::from("data.aggregates.db")
        );
        assert_eq!(
            read_only_uri(Path::new("/a b/x?y#z%.db")),
            "file:/a b/x%3Fy%23z%25.db?mode=ro"
        );
    }
}
