//! What PostgreSQL does its own way: the pools, bulk appends with
//! `UNNEST` (a batch of 1,000 events is one round trip), the commit-safe log
//! cursor `(tx, seq)` over `xid8`, select-list `unnest` upserts, index
//! renames, and the statement timeout. Everything else is in the shared
//! store modules, over [`super::db::Db`].

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::agg::{all_columns, index_name, upsert_clause, FLOAT_COLUMNS, INT_COLUMNS};
use super::db::{timed_out, Row as DbRow, Sql};
use super::log::{each_event, voided_indices, EventColumns, Inserted, FOLD_COLUMNS};
use super::log::{metadata_json, EVENT_COLUMNS};
use super::projections::{Target, Upserts};
use super::tail::{self, LogTail};
use super::{Backend, Cursor, LogBatch, Origin, Rejected, StoreError, StoreOptions, Watermark};
use crate::aggregate::measures::RowKey;
use crate::aggregate::spec::Spec;
use crate::event::Event;

/// A transaction on this dialect's connection.
type Tx<'c> = Transaction<'c, Postgres>;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./schema/postgres");

/// The pools of one PostgreSQL database.
#[derive(Debug, Clone)]
pub(crate) struct Pools {
    pub(crate) main: PgPool,
    /// Query-module reads: the same database with `statement_timeout` set, so
    /// a runaway query is cancelled by the server rather than left running.
    pub(crate) query: PgPool,
    statement_timeout: Duration,
    /// Transaction ids of this process's open transactions that write
    /// derived tables only (folds, restatements): see [`read_log`].
    pub(crate) derived: DerivedXids,
}

/// The ids of open transactions that never insert events (see [`read_log`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct DerivedXids(std::sync::Arc<std::sync::Mutex<HashSet<i64>>>);

impl DerivedXids {
    /// Records the id of `tx` (assigning one now) until the guard is dropped.
    /// Only a transaction that writes no event may be registered.
    pub(crate) async fn register(&self, tx: &mut Tx<'_>) -> Result<XidGuard, StoreError> {
        let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
            .fetch_one(&mut **tx)
            .await?;
        if let Ok(mut ids) = self.0.lock() {
            ids.insert(xid);
        }
        Ok(XidGuard {
            ids: self.clone(),
            xid,
        })
    }

    fn contains(&self, xid: i64) -> bool {
        self.0.lock().is_ok_and(|ids| ids.contains(&xid))
    }
}

/// Keeps a transaction id in [`DerivedXids`] until its transaction ended
/// (dropped after the commit or rollback; a guard dropped earlier only makes
/// the log's readers wait for that transaction, as for any other).
#[derive(Debug)]
pub(crate) struct XidGuard {
    ids: DerivedXids,
    xid: i64,
}

impl Drop for XidGuard {
    fn drop(&mut self) {
        if let Ok(mut ids) = self.ids.0.lock() {
            ids.remove(&self.xid);
        }
    }
}

/// Connects lazily: the pool opens connections on first use, so Tally starts
/// (and reports not-ready) while the database is still down.
pub(crate) fn connect(url: &str, options: &StoreOptions) -> Result<Pools, StoreError> {
    let connect = PgConnectOptions::from_str(url)?.application_name("tally");
    let main = PgPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        .connect_lazy_with(connect.clone());
    let timeout_ms = options.statement_timeout.as_millis().max(1).to_string();
    let query = PgPoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        .connect_lazy_with(
            connect
                .application_name("tally-query")
                .options([("statement_timeout", timeout_ms.as_str())]),
        );
    Ok(Pools {
        main,
        query,
        statement_timeout: options.statement_timeout,
        derived: DerivedXids::default(),
    })
}

/// `metadata` is `jsonb`: read as text.
pub(crate) fn event_select() -> String {
    EVENT_COLUMNS.replace("metadata", "metadata::text AS metadata")
}

/// `column` is one of the values of `param`, a text array.
pub(crate) fn one_of(column: &str, param: &str) -> String {
    format!("{column} = ANY({param})")
}

/// The UTC hour of `ts`, as a timestamp.
pub(crate) const HOUR_OF_TS: &str = "date_trunc('hour', ts, 'UTC')";

/// Deadlock and serialization failures: the transaction was rolled back and may be retried.
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

/// Inserts the batch's first occurrences; the ids it inserted.
pub(crate) async fn insert_events(
    tx: &mut Tx<'_>,
    events: &[&Event],
) -> Result<Inserted, StoreError> {
    let n = events.len();
    let mut id = Vec::with_capacity(n);
    let mut ts: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    let mut api = Vec::with_capacity(n);
    let mut endpoint = Vec::with_capacity(n);
    let mut method = Vec::with_capacity(n);
    let mut key = Vec::with_capacity(n);
    let mut user = Vec::with_capacity(n);
    let mut model = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut success = Vec::with_capacity(n);
    let mut error_type = Vec::with_capacity(n);
    let mut error_message = Vec::with_capacity(n);
    let mut latency = Vec::with_capacity(n);
    let mut req_bytes = Vec::with_capacity(n);
    let mut resp_bytes = Vec::with_capacity(n);
    let mut tok_in = Vec::with_capacity(n);
    let mut tok_out = Vec::with_capacity(n);
    let mut cost = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    for e in events {
        id.push(e.id.as_str());
        ts.push(e.ts);
        api.push(e.api.as_str());
        endpoint.push(e.endpoint.as_deref());
        method.push(e.method.as_deref());
        key.push(e.key.as_deref());
        user.push(e.user.as_deref());
        model.push(e.model.as_deref());
        status.push(e.status);
        success.push(e.success);
        error_type.push(e.error_type.map(|t| t.as_str()));
        error_message.push(e.error_message.as_deref());
        latency.push(e.latency_ms);
        req_bytes.push(e.request_bytes);
        resp_bytes.push(e.response_bytes);
        tok_in.push(e.tokens_in);
        tok_out.push(e.tokens_out);
        cost.push(e.cost_nanos);
        cached.push(e.cached);
        metadata.push(metadata_json(e));
    }
    let sql = format!(
        "INSERT INTO usage_events ({EVENT_COLUMNS}) \
         SELECT id, ts, api, endpoint, method, key, u, model, status, success, error_type, \
                error_message, latency_ms, request_bytes, response_bytes, tokens_in, tokens_out, \
                cost_nanos, cached, metadata::jsonb \
         FROM UNNEST($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::text[], $9::int4[], $10::bool[], $11::text[], $12::text[], \
                     $13::float8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[], $18::int8[], \
                     $19::bool[], $20::text[]) \
           AS t(id, ts, api, endpoint, method, key, u, model, status, success, error_type, \
                error_message, latency_ms, request_bytes, response_bytes, tokens_in, tokens_out, \
                cost_nanos, cached, metadata) \
         ON CONFLICT (id) DO NOTHING \
         RETURNING id, tx::text::bigint, seq"
    );
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&sql)
        .bind(id)
        .bind(ts)
        .bind(api)
        .bind(endpoint)
        .bind(method)
        .bind(key)
        .bind(user)
        .bind(model)
        .bind(status)
        .bind(success)
        .bind(error_type)
        .bind(error_message)
        .bind(latency)
        .bind(req_bytes)
        .bind(resp_bytes)
        .bind(tok_in)
        .bind(tok_out)
        .bind(cost)
        .bind(cached)
        .bind(metadata)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, tx, seq)| (id, Cursor { tx, seq }))
        .collect())
}

/// Records rejected payloads.
pub(crate) async fn insert_rejects(
    tx: &mut Tx<'_>,
    rejects: &[Rejected],
    origin: &Origin,
) -> Result<(), StoreError> {
    if rejects.is_empty() {
        return Ok(());
    }
    let kind: Vec<&str> = rejects.iter().map(|r| r.kind.as_str()).collect();
    let event_id: Vec<Option<&str>> = rejects.iter().map(|r| r.event_id.as_deref()).collect();
    let index: Vec<Option<i32>> = rejects.iter().map(|r| r.item_index).collect();
    let reason: Vec<&str> = rejects.iter().map(|r| r.reason.as_str()).collect();
    let ctype: Vec<Option<&str>> = rejects.iter().map(|r| r.content_type.as_deref()).collect();
    let payload: Vec<&[u8]> = rejects.iter().map(|r| r.payload.as_slice()).collect();
    let subject: Vec<Option<&str>> = rejects
        .iter()
        .map(|r| r.subject.as_deref().or(origin.subject.as_deref()))
        .collect();
    sqlx::query(
        "INSERT INTO rejected_events (source, subject, kind, event_id, item_index, reason, content_type, payload) \
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::text[], $8::bytea[])",
    )
    .bind(origin.source)
    .bind(subject)
    .bind(kind)
    .bind(event_id)
    .bind(index)
    .bind(reason)
    .bind(ctype)
    .bind(payload)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The planner's row estimate of each table, so a `/metrics` scrape never scans.
pub(crate) async fn table_rows(
    p: &Pools,
    tables: &[&str],
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows: Vec<(String, f32)> = sqlx::query_as(
        "SELECT relname::text, reltuples FROM pg_class \
         WHERE relname = ANY($1) AND relkind = 'r' AND relnamespace = current_schema()::regnamespace",
    )
    .bind(tables)
    .fetch_all(&p.main)
    .await?;
    // reltuples is -1 before the first ANALYZE (the optimize job runs it).
    Ok(rows
        .into_iter()
        .map(|(t, n)| (t, n.max(0.0) as i64))
        .collect())
}

pub(crate) async fn maintenance(p: &Pools) -> Result<Vec<String>, StoreError> {
    // Autovacuum reclaims what retention deleted; fresh statistics keep
    // the planner on the ts index after a large delete.
    sqlx::query("ANALYZE usage_events").execute(&p.main).await?;
    Ok(vec![
        "ANALYZE usage_events (autovacuum reclaims space)".to_string()
    ])
}

/// An event's log transaction as a number (`usage_events` as `e`).
/// The column names of table `$1` (in the current schema).
pub(crate) const TABLE_COLUMNS: &str =
    "SELECT column_name AS name FROM information_schema.columns \
     WHERE table_schema = current_schema() AND table_name = $1";

pub(crate) const EVENT_TX: &str = "e.tx::text::bigint";

/// The condition "folded as of the cursor `($3, $4)`": `tx` is an `xid8`,
/// bound as text.
pub(crate) const FOLDED_UP_TO: &str = "(tx, seq) <= ($3::text::xid8, $4)";

/// The condition "not folded as of the cursor `($5, $6)`".
pub(crate) const FOLDED_AFTER: &str = "(tx, seq) > ($5::text::xid8, $6)";

/// [`FOLD_COLUMNS`], then the cursor: `tx` as a number, `seq`.
pub(crate) fn log_columns() -> String {
    format!("{FOLD_COLUMNS}, tx::text::bigint AS cursor_tx, seq")
}

/// A row of [`log_columns`] and its cursor.
pub(crate) fn log_event(cols: &EventColumns, r: &PgRow) -> Result<(Cursor, Event), StoreError> {
    let at = |i: Option<usize>| i.ok_or_else(|| sqlx::Error::ColumnNotFound("cursor".into()));
    let cursor = Cursor {
        tx: r.try_get(at(cols.tx)?)?,
        seq: r.try_get(at(cols.seq)?)?,
    };
    Ok((cursor, cols.event(r, r.try_get(cols.ts)?)?))
}

/// The log after `after` in commit-safe order: only events below the
/// snapshot's horizon, which no transaction still running can sort before.
///
/// The horizon is the oldest transaction still running (the snapshot's
/// `xmin`), passing over this process's open fold and restatement
/// transactions ([`DerivedXids`]): those write aggregate tables only and
/// will never add an event, and a fold's own commit (or a coarse tier's,
/// or a restatement, seconds long) would otherwise hide every event
/// appended while it runs.
pub(crate) async fn read_log(
    p: &Pools,
    after: Cursor,
    limit: i64,
    tail: Option<&LogTail>,
) -> Result<LogBatch, StoreError> {
    // One REPEATABLE READ snapshot for both statements; now() (transaction
    // start) is no later than the snapshot, as `Watermark::at` requires.
    let mut tx = p.main.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (at, xmin, xmax, running): (DateTime<Utc>, i64, i64, Vec<i64>) = sqlx::query_as(
        "SELECT now(), pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint, \
                ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(s) AS x) \
         FROM pg_current_snapshot() AS s",
    )
    .fetch_one(&mut *tx)
    .await?;
    // Ids registered after the snapshot was taken, or released before this
    // look, only count as running: never the other way round.
    let xmin = running
        .iter()
        .copied()
        .filter(|x| !p.derived.contains(*x))
        .min()
        .unwrap_or(xmax)
        .max(xmin);
    // Below the horizon, in cursor order; with the tail on, positions only.
    let select = match tail {
        None => log_columns(),
        Some(_) => "tx::text::bigint AS cursor_tx, seq".to_string(),
    };
    let sql = format!(
        "SELECT {select} FROM usage_events \
         WHERE (tx, seq) > ($1::text::xid8, $2) AND tx < $4::text::xid8 \
         ORDER BY tx, seq LIMIT $3"
    );
    // xmin of this transaction's snapshot, read above: a constant, where
    // `pg_current_snapshot()` in the WHERE clause would be rebuilt per row.
    let rows = sqlx::query(&sql)
        .bind(after.tx.to_string())
        .bind(after.seq)
        .bind(limit)
        .bind(xmin.to_string())
        .fetch_all(&mut *tx)
        .await?;
    let found = rows.len();
    let events = match tail {
        None => each_event(&rows, log_event)?,
        Some(tail) => {
            let positions = rows
                .iter()
                .map(|r| {
                    Ok(Cursor {
                        tx: r.try_get(0)?,
                        seq: r.try_get(1)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            tail::fill(tail, positions, async |first, last| {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM usage_events \
                     WHERE (tx, seq) >= ($1::text::xid8, $2) AND (tx, seq) <= ($3::text::xid8, $4) \
                     ORDER BY tx, seq",
                    log_columns()
                ))
                .bind(first.tx.to_string())
                .bind(first.seq)
                .bind(last.tx.to_string())
                .bind(last.seq)
                .fetch_all(&mut *tx)
                .await?;
                each_event(&rows, log_event)
            })
            .await?
        }
    };
    // The voided among them, from the same snapshot: one range lookup (the
    // table is small, usually empty).
    let voided = match (events.first(), events.last()) {
        (Some((first, _)), Some((last, _))) => {
            let at: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT event_tx, event_seq FROM voided_events \
                 WHERE (event_tx, event_seq) >= ($1, $2) AND (event_tx, event_seq) <= ($3, $4)",
            )
            .bind(first.tx)
            .bind(first.seq)
            .bind(last.tx)
            .bind(last.seq)
            .fetch_all(&mut *tx)
            .await?;
            let at: Vec<Cursor> = at.into_iter().map(|(tx, seq)| Cursor { tx, seq }).collect();
            voided_indices(&events, &at)
        }
        _ => Vec::new(),
    };
    let mut held_back = false;
    if (found as i64) < limit {
        // Caught up below xmin: do committed events wait above it?
        let last = events.last().map_or(after, |(c, _)| *c);
        // `ORDER BY … LIMIT 1`, not `EXISTS`: the cached generic plan of an
        // `EXISTS` expects a third of the log to match and scans it all when
        // nothing does (0.66 s at 5M events, on every idle poll); the order
        // keeps it on the cursor index.
        held_back = sqlx::query_scalar::<_, i32>(
            "SELECT 1 FROM usage_events \
             WHERE (tx, seq) > ($1::text::xid8, $2) AND tx >= $3::text::xid8 \
             ORDER BY tx, seq LIMIT 1",
        )
        .bind(last.tx.to_string())
        .bind(last.seq)
        .bind(xmin.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    }
    tx.commit().await?;
    Ok(LogBatch {
        events,
        voided,
        watermark: Watermark { at, xmin, xmax },
        held_back,
    })
}

/// Events stored after `after`.
pub(crate) async fn events_after(p: &Pools, after: Cursor) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE (tx, seq) > ($1::text::xid8, $2)",
    )
    .bind(after.tx.to_string())
    .bind(after.seq)
    .fetch_one(&p.main)
    .await?)
}

pub(crate) async fn log_position_problem(p: &Pools) -> Result<Option<String>, StoreError> {
    // xmax of a snapshot is the next transaction id to be handed out; no
    // id is consumed by reading it.
    let (next, checkpoint, stored): (i64, i64, i64) = sqlx::query_as(
        "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, \
                (SELECT coalesce(max(cursor_tx), 0) FROM projection_checkpoints), \
                coalesce((SELECT tx::text::bigint FROM usage_events ORDER BY tx DESC LIMIT 1), 0)",
    )
    .fetch_one(&p.main)
    .await?;
    let ahead = checkpoint.max(stored);
    Ok((ahead >= next).then(|| {
        format!(
            "the log holds transaction ids up to {ahead} but this cluster hands out {next} next: the database was restored into another cluster (pg_dump/pg_restore, a new server), so new events would sort before the checkpoints and never be folded"
        )
    }))
}

pub(crate) async fn repair_log_positions(p: &Pools) -> Result<String, StoreError> {
    // Each distinct writer transaction id of the log is renumbered 1..k in
    // order, and each checkpoint moved to the same place in that order, so
    // every checkpoint still covers exactly the events it folded. Then
    // transaction ids are consumed until the cluster's next one is past k.
    let mut tx = p.main.begin().await?;
    sqlx::query("LOCK TABLE usage_events, projection_checkpoints IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TEMP TABLE tally_tx_map ON COMMIT DROP AS \
         SELECT tx AS old, row_number() OVER (ORDER BY tx) AS new FROM (SELECT DISTINCT tx FROM usage_events) d",
    )
    .execute(&mut *tx)
    .await?;
    let k: i64 = sqlx::query_scalar("SELECT count(*) FROM tally_tx_map")
        .fetch_one(&mut *tx)
        .await?;
    // A checkpoint between two ids keeps every event of the lower one.
    sqlx::query(
        "UPDATE projection_checkpoints c SET \
           cursor_seq = CASE WHEN EXISTS (SELECT 1 FROM tally_tx_map m WHERE m.old::text::bigint = c.cursor_tx) \
                        THEN c.cursor_seq ELSE 9223372036854775807 END, \
           cursor_tx = coalesce((SELECT max(m.new) FROM tally_tx_map m WHERE m.old::text::bigint <= c.cursor_tx), 0) \
         WHERE c.cursor_tx > 0",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE projection_checkpoints SET cursor_seq = 0 WHERE cursor_tx = 0 AND cursor_seq = 9223372036854775807",
    )
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query(
        "UPDATE usage_events u SET tx = m.new::text::xid8 FROM tally_tx_map m WHERE u.tx = m.old",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Voided events are found by log position: move theirs too.
    sqlx::query(
        "UPDATE voided_events v SET event_tx = u.tx::text::bigint FROM usage_events u \
         WHERE u.id = v.event_id",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut burned = 0u64;
    loop {
        let next: i64 =
            sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
                .fetch_one(&p.main)
                .await?;
        if next > k + 1 {
            break;
        }
        // Each autocommitted call takes one transaction id.
        sqlx::query("SELECT pg_current_xact_id()")
            .execute(&p.main)
            .await?;
        burned += 1;
    }
    Ok(format!(
        "renumbered {k} writer transaction ids of {moved} events and moved the checkpoints with them; consumed {burned} transaction ids so new events sort after them"
    ))
}

/// Two instances starting together must not race on `CREATE TABLE`.
pub(crate) async fn ddl_lock(tx: &mut Tx<'_>) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.projection.ddl'))")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Keeps index names tied to the live table's name after the shadow table
/// took it, so the next rebuild can reuse the shadow's names.
pub(crate) fn index_renames(spec: &Spec, shadow: &str, live: &str) -> Vec<String> {
    let mut sql = vec![format!(
        "ALTER INDEX IF EXISTS {shadow}_pkey RENAME TO {live}_pkey"
    )];
    sql.extend(spec.dimensions.iter().map(|&d| {
        let (from, to) = (index_name(shadow, d), index_name(live, d));
        format!("ALTER INDEX IF EXISTS {from} RENAME TO {to}")
    }));
    sql
}

/// The stored `bucket`, dimensions and `latency_sketch` of these keys, in
/// one statement that joins the keys as zipped arrays.
pub(crate) async fn sketches(
    tx: &mut Tx<'_>,
    t: &Target<'_>,
    keys: &[&RowKey],
) -> Result<Vec<DbRow>, StoreError> {
    let spec = t.spec;
    let n = spec.dimensions.len();
    let mut unnest = vec!["$1::timestamptz[]".to_string()];
    unnest.extend((0..n).map(|i| format!("${}::text[]", i + 2)));
    let names: Vec<String> = spec.dimensions.iter().map(|d| d.column()).collect();
    let mut on = vec![format!("t.bucket = k.bucket")];
    on.extend(names.iter().map(|c| format!("t.{c} = k.{c}")));
    let mut select = vec!["t.bucket".to_string()];
    select.extend(names.iter().map(|c| format!("t.{c}")));
    // `unnest` in the select list (zipped, arrays of equal length) rather
    // than `FROM UNNEST(a, b, …)`, which materialises every row first.
    let mut keys_list = vec![format!("unnest({}) AS bucket", unnest[0])];
    keys_list.extend(
        names
            .iter()
            .zip(&unnest[1..])
            .map(|(c, u)| format!("unnest({u}) AS {c}")),
    );
    let sql = format!(
        "SELECT {}, t.latency_sketch FROM {} t JOIN (SELECT {}) AS k ON {} \
         WHERE t.latency_sketch IS NOT NULL",
        select.join(", "),
        t.table,
        keys_list.join(", "),
        on.join(" AND ")
    );
    let mut q = sqlx::query(&sql).bind(keys.iter().map(|k| k.bucket).collect::<Vec<_>>());
    for i in 0..n {
        q = q.bind(keys.iter().map(|k| k.dims[i].as_str()).collect::<Vec<_>>());
    }
    let found = q.fetch_all(&mut **tx).await?;
    Ok(found.into_iter().map(DbRow::Postgres).collect())
}

/// Inserts or adds to the rows: one statement of zipped select-list
/// `unnest`s, which cost about half of `FROM UNNEST(…)` (that materialises
/// the rows before inserting them).
pub(crate) async fn upsert(
    tx: &mut Tx<'_>,
    t: &Target<'_>,
    rows: &Upserts<'_>,
) -> Result<(), StoreError> {
    let spec = t.spec;
    let n = spec.dimensions.len();
    let mut types = vec!["timestamptz[]"];
    types.extend(std::iter::repeat_n("text[]", n));
    types.extend(std::iter::repeat_n("int8[]", INT_COLUMNS.len()));
    types.extend(std::iter::repeat_n("float8[]", FLOAT_COLUMNS.len()));
    types.push("bytea[]");
    let unnest: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("unnest(${}::{t})", i + 1))
        .collect();
    let sql = format!(
        "INSERT INTO {} ({}) SELECT {}{}",
        t.table,
        all_columns(spec),
        unnest.join(", "),
        upsert_clause(Backend::Postgres, spec, t.table)
    );
    // One pass over the rows fills every column.
    let len = rows.len();
    let mut buckets = Vec::with_capacity(len);
    let mut dims: Vec<Vec<&str>> = vec![Vec::with_capacity(len); n];
    let mut ints: Vec<Vec<i64>> = vec![Vec::with_capacity(len); INT_COLUMNS.len()];
    let mut floats: Vec<Vec<Option<f64>>> = vec![Vec::with_capacity(len); FLOAT_COLUMNS.len()];
    let mut sketches = Vec::with_capacity(len);
    for r in rows.each(0..len) {
        buckets.push(r.key.bucket);
        for (col, d) in dims.iter_mut().zip(&r.key.dims) {
            col.push(d.as_str());
        }
        for (col, v) in ints.iter_mut().zip(r.ints) {
            col.push(v);
        }
        for (col, v) in floats.iter_mut().zip(r.floats) {
            col.push(v);
        }
        sketches.push(r.sketch);
    }
    let mut q = sqlx::query(&sql).bind(buckets);
    for col in dims {
        q = q.bind(col);
    }
    for col in ints {
        q = q.bind(col);
    }
    for col in floats {
        q = q.bind(col);
    }
    q.bind(sketches).execute(&mut **tx).await?;
    Ok(())
}

/// Runs a query-module read on the pool whose connections carry
/// `statement_timeout`: the server cancels a runaway statement.
pub(crate) async fn fetch_timed(p: &Pools, sql: Sql<'_>) -> Result<Vec<DbRow>, StoreError> {
    let rows = sql.postgres().fetch_all(&p.query).await;
    // 57014: query_canceled, which is what statement_timeout raises.
    let rows = rows.map_err(|e| timed_out(e, "57014", p.statement_timeout))?;
    Ok(rows.into_iter().map(DbRow::Postgres).collect())
}

/// Pages on disk (from the catalog: no scan) of each table in `$1` that exists.
pub(crate) const TABLE_PAGES: &str = "SELECT relname::TEXT AS name, \
     (pg_relation_size(oid) / 8192)::BIGINT AS size FROM pg_class \
     WHERE relkind = 'r' AND relname = ANY($1) AND pg_table_is_visible(oid)";
