//! SQLite event log: WAL mode, one writer connection taking `BEGIN IMMEDIATE`,
//! multi-row inserts of up to [`ROWS_PER_STATEMENT`] events.
//!
//! Invariant: all writes go through the single-connection writer pool, so
//! transactions commit one after another and `seq` (the rowid) order is commit
//! order. The projector relies on this to use `seq` alone as its cursor.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

use super::agg::{
    agg_row_from, all_columns, create_table_sql, float_values, index_name, index_sql, int_values,
    key_columns, merged_sketch, query_select, table, total_groups, unix_ms, upsert_clause,
};
use super::{
    classify, event_from_row, first_occurrences, fold_event_from_row, metadata_json, not_inserted,
    rejected_from_row, Backend, EventStore, LogCounts, Origin, Outcome, Rejected, RejectedRow,
    StoreError, StoreOptions, EVENT_COLUMNS, FOLD_COLUMNS, REJECTED_COLUMNS,
};
use super::{
    AggAnswer, AggQuery, AggRow, Apply, ApplyOutcome, Cursor, LogBatch, ProjectionState,
    ProjectionStore, Watermark,
};
use super::{PoolStats, ReconcileRead};
use crate::aggregate::measures::{Measures, RowKey, Rows};
use crate::aggregate::sketch::Sketch;
use crate::aggregate::spec::{Granularity, Spec};
use crate::event::{format_ts, Event};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./schema/sqlite");

/// Events per INSERT statement: 21 binds each stays well under SQLite's 32,766-variable limit.
pub const ROWS_PER_STATEMENT: usize = 500;

/// The event log in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Exactly one connection: SQLite allows one writer, and queuing in the pool
    /// is cheaper than SQLITE_BUSY retries.
    writer: SqlitePool,
    /// Readers never block the writer in WAL mode.
    reader: SqlitePool,
    /// Longest a query-module read may run.
    statement_timeout: Duration,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file with durable settings:
    /// WAL and `synchronous = FULL`, because an acknowledged event must survive a power cut.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let base = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(
                options
                    .acquire_timeout
                    .max(std::time::Duration::from_secs(30)),
            )
            .connect_with(base.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(base.read_only(true))
            .await?;
        Ok(Self {
            writer,
            reader,
            statement_timeout: options.statement_timeout,
        })
    }

    async fn insert_events(
        tx: &mut Transaction<'_, Sqlite>,
        events: &[&Event],
    ) -> Result<HashSet<String>, StoreError> {
        let now = format_ts(&Utc::now());
        let mut inserted = HashSet::with_capacity(events.len());
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut qb = insert_rows(chunk.iter().copied(), &now);
            qb.push(" ON CONFLICT (id) DO NOTHING RETURNING id");
            let ids: Vec<String> = qb.build_query_scalar().fetch_all(&mut **tx).await?;
            inserted.extend(ids);
        }
        Ok(inserted)
    }

    async fn fetch_events(
        executor: impl sqlx::SqliteExecutor<'_>,
        ids: &[&str],
    ) -> Result<HashMap<String, Event>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        // json_each binds the whole id list as one parameter, whatever its length.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM usage_events WHERE id IN (SELECT value FROM json_each(?))"
        );
        let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
        let rows = sqlx::query(&sql).bind(list).fetch_all(executor).await?;
        rows.iter()
            .map(|row: &SqliteRow| {
                let e = event_from_row(row, stored_ts(row)?)?;
                Ok((e.id.clone(), e))
            })
            .collect()
    }

    async fn insert_rejects(
        tx: &mut Transaction<'_, Sqlite>,
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

/// An aggregate row whose `bucket` (column 0) is stored as text.
fn agg_row_text(r: &SqliteRow, dims: usize, table: &str) -> Result<AggRow, StoreError> {
    let bucket: String = r.try_get(0)?;
    let bucket = parse_ts(&bucket).ok_or_else(|| StoreError::CorruptRow {
        id: table.to_string(),
        reason: format!("bucket {bucket:?}"),
    })?;
    agg_row_from(r, bucket, dims, table)
}

/// Reads a stored fixed-width timestamp back.
pub fn parse_ts(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[async_trait]
impl EventStore for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn append(
        &self,
        events: &[Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let unique: Vec<&Event> = first_occurrences(events)
            .into_iter()
            .map(|i| &events[i])
            .collect();
        let inserted = Self::insert_events(&mut tx, &unique).await?;
        let missing = not_inserted(&unique, &inserted);
        let existing = Self::fetch_events(&mut *tx, &missing).await?;
        let (outcomes, conflicts) = classify(events, &inserted, &existing);
        Self::insert_rejects(&mut tx, rejects, origin).await?;
        Self::insert_rejects(&mut tx, &conflicts, origin).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn get_event(&self, id: &str) -> Result<Option<Event>, StoreError> {
        Ok(Self::fetch_events(&self.reader, &[id]).await?.remove(id))
    }

    async fn counts(&self) -> Result<LogCounts, StoreError> {
        let (events, rejected): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM rejected_events)",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(LogCounts { events, rejected })
    }

    async fn recent_rejected(&self, limit: i64) -> Result<Vec<RejectedRow>, StoreError> {
        let sql =
            format!("SELECT {REJECTED_COLUMNS} FROM rejected_events ORDER BY seq DESC LIMIT ?");
        let rows = sqlx::query(&sql)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
                let received: String = r.try_get("received_at")?;
                rejected_from_row(r, parse_ts(&received).unwrap_or_default())
            })
            .collect()
    }

    async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn delete_rejected_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM rejected_events WHERE seq IN \
             (SELECT seq FROM rejected_events WHERE received_at < ? ORDER BY seq LIMIT ?)",
        )
        .bind(format_ts(&cutoff))
        .bind(limit)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn table_rows(&self, tables: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        let mut out = Vec::with_capacity(tables.len());
        for t in tables {
            // Names come from Tally's own constants, never from a request.
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
                .fetch_one(&self.reader)
                .await?;
            out.push((t.to_string(), n));
        }
        Ok(out)
    }

    async fn delete_events_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM usage_events WHERE seq IN \
             (SELECT seq FROM usage_events WHERE ts < ? LIMIT ?)",
        )
        .bind(format_ts(&cutoff))
        .bind(limit)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn delete_agg_before(
        &self,
        spec: &Spec,
        granularity: Granularity,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let t = table(spec, granularity, "");
        let done = sqlx::query(&format!(
            "DELETE FROM {t} WHERE rowid IN (SELECT rowid FROM {t} WHERE bucket < ? LIMIT ?)"
        ))
        .bind(format_ts(&cutoff))
        .bind(limit)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn export_events(
        &self,
        after_seq: i64,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<(i64, Event)>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, seq FROM usage_events WHERE seq > ? \
             AND (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?) ORDER BY seq LIMIT ?"
        );
        let from = from.map(|t| format_ts(&t));
        let to = to.map(|t| format_ts(&t));
        let rows = sqlx::query(&sql)
            .bind(after_seq)
            .bind(&from)
            .bind(&from)
            .bind(&to)
            .bind(&to)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("seq")?, event_from_row(r, stored_ts(r)?)?)))
            .collect()
    }

    async fn touched_hours(
        &self,
        after_seq: i64,
        before: DateTime<Utc>,
    ) -> Result<(Vec<DateTime<Utc>>, i64), StoreError> {
        // `ts` is fixed-width RFC 3339 text: its first 13 characters are the hour.
        let hours: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT substr(ts, 1, 13) FROM usage_events WHERE seq > ? AND ts < ? ORDER BY 1",
        )
        .bind(after_seq)
        .bind(format_ts(&before))
        .fetch_all(&self.reader)
        .await?;
        let max: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM usage_events")
            .fetch_one(&self.reader)
            .await?;
        let hours = hours
            .iter()
            .filter_map(|h| parse_ts(&format!("{h}:00:00Z")))
            .collect();
        Ok((hours, max.unwrap_or(0)))
    }

    async fn reconcile_read(
        &self,
        spec: &Spec,
        granularities: &[Granularity],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<ReconcileRead, StoreError> {
        // A deferred read transaction in WAL mode reads one snapshot, taken at
        // its first SELECT, while the writer goes on.
        let mut tx = self.reader.begin().await?;
        let cursor: Option<i64> =
            sqlx::query_scalar("SELECT cursor_seq FROM projection_checkpoints WHERE name = ?")
                .bind(&spec.name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(cseq) = cursor else {
            return Ok(ReconcileRead {
                cursor: None,
                stored: Vec::new(),
                events: Vec::new(),
            });
        };
        let (from_text, to_text) = (format_ts(&from), format_ts(&to));
        let mut stored = Vec::with_capacity(granularities.len());
        for &g in granularities {
            let t = table(spec, g, "");
            let sql = format!(
                "SELECT {} FROM {t} WHERE bucket >= ? AND bucket < ? ORDER BY {}",
                all_columns(spec),
                key_columns(spec)
            );
            let rows = sqlx::query(&sql)
                .bind(&from_text)
                .bind(&to_text)
                .fetch_all(&mut *tx)
                .await?;
            let n = spec.dimensions.len();
            let rows = rows
                .iter()
                .map(|r| agg_row_text(r, n, &t))
                .collect::<Result<Vec<_>, _>>()?;
            stored.push((g, rows));
        }
        let sql = format!(
            "SELECT {} FROM usage_events WHERE ts >= ? AND ts < ? AND seq <= ?",
            log_columns()
        );
        let rows = sqlx::query(&sql)
            .bind(&from_text)
            .bind(&to_text)
            .bind(cseq)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let events = rows
            .iter()
            .map(|r| log_event(r).map(|(_, e)| e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReconcileRead {
            cursor: Some(Cursor { tx: 0, seq: cseq }),
            stored,
            events,
        })
    }

    async fn maintenance(&self) -> Result<Vec<String>, StoreError> {
        let mut done = Vec::new();
        sqlx::query("PRAGMA optimize").execute(&self.writer).await?;
        done.push("PRAGMA optimize".to_string());
        // TRUNCATE waits for readers and resets the WAL file to zero bytes, so
        // a WAL grown by a large delete gives its disk space back.
        let (busy, log, moved): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.writer)
            .await?;
        done.push(format!(
            "PRAGMA wal_checkpoint(TRUNCATE): busy={busy} wal_pages={log} checkpointed={moved}"
        ));
        Ok(done)
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        [("writer", &self.writer), ("reader", &self.reader)]
            .into_iter()
            .map(|(name, p)| PoolStats {
                pool: name,
                size: p.size(),
                idle: u32::try_from(p.num_idle()).unwrap_or(u32::MAX),
                max: p.options().get_max_connections(),
            })
            .collect()
    }
}

/// The `ts` of an event row (stored as fixed-width RFC 3339 text).
fn stored_ts(r: &SqliteRow) -> Result<DateTime<Utc>, StoreError> {
    let ts: String = r.try_get("ts")?;
    parse_ts(&ts).ok_or_else(|| StoreError::CorruptRow {
        id: r.try_get::<String, _>("id").unwrap_or_default(),
        reason: format!("ts {ts:?}"),
    })
}

/// [`FOLD_COLUMNS`], then the cursor's `seq` (17).
fn log_columns() -> String {
    format!("{FOLD_COLUMNS}, seq")
}

/// A row read with [`log_columns`] and its cursor.
fn log_event(r: &SqliteRow) -> Result<(Cursor, Event), StoreError> {
    let seq: i64 = r.try_get(17)?;
    let text: &str = r.try_get(0)?;
    let ts = parse_ts(text).ok_or_else(|| StoreError::CorruptRow {
        id: format!("seq {seq}"),
        reason: format!("ts {text:?}"),
    })?;
    Ok((Cursor { tx: 0, seq }, fold_event_from_row(r, ts, seq)?))
}

const CHECKPOINT_COLUMNS: &str = "name, spec_hash, spec, cursor_tx, cursor_seq, as_of, \
     events_folded, leader, lease_until_ms, updated_at";

/// Rows per statement in aggregate upserts: at most 32 binds a row.
const AGG_ROWS_PER_STATEMENT: usize = 500;

fn state_from_row(r: &SqliteRow) -> Result<ProjectionState, StoreError> {
    let as_of: Option<String> = r.try_get(5)?;
    let updated: String = r.try_get(9)?;
    Ok(ProjectionState {
        name: r.try_get(0)?,
        spec_hash: r.try_get(1)?,
        spec: r.try_get(2)?,
        cursor: Cursor {
            tx: r.try_get(3)?,
            seq: r.try_get(4)?,
        },
        as_of: as_of.as_deref().and_then(parse_ts),
        events_folded: r.try_get(6)?,
        leader: r.try_get(7)?,
        lease_until_ms: r.try_get(8)?,
        updated_at: parse_ts(&updated).unwrap_or_default(),
    })
}

impl SqliteStore {
    async fn existing_sketches(
        tx: &mut Transaction<'_, Sqlite>,
        spec: &Spec,
        table: &str,
        keys: &[&RowKey],
    ) -> Result<HashMap<RowKey, Sketch>, StoreError> {
        let mut out = HashMap::new();
        let n = spec.dimensions.len();
        for chunk in keys.chunks(AGG_ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
                "SELECT {}, latency_sketch FROM {table} WHERE latency_sketch IS NOT NULL AND ({}) IN (VALUES ",
                key_columns(spec),
                key_columns(spec)
            ));
            for (i, k) in chunk.iter().enumerate() {
                if i > 0 {
                    qb.push(", ");
                }
                qb.push("(");
                qb.push_bind(format_ts(&k.bucket));
                for d in &k.dims {
                    qb.push(", ");
                    qb.push_bind(d.as_str());
                }
                qb.push(")");
            }
            qb.push(")");
            for r in qb.build().fetch_all(&mut **tx).await? {
                let bucket: String = r.try_get(0)?;
                let bucket = parse_ts(&bucket).ok_or_else(|| StoreError::CorruptRow {
                    id: table.to_string(),
                    reason: format!("bucket {bucket:?}"),
                })?;
                let dims = (0..n)
                    .map(|i| r.try_get::<String, _>(i + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                let bytes: Vec<u8> = r.try_get(n + 1)?;
                let sketch = Sketch::decode(&bytes).map_err(|e| StoreError::CorruptRow {
                    id: format!("{table} bucket {bucket}"),
                    reason: e.to_string(),
                })?;
                out.insert(RowKey { bucket, dims }, sketch);
            }
        }
        Ok(out)
    }

    async fn upsert_rows(
        tx: &mut Transaction<'_, Sqlite>,
        spec: &Spec,
        table: &str,
        rows: &Rows,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let rows: Vec<(&RowKey, &Measures)> = rows.iter().collect();
        let with_latency: Vec<&RowKey> = rows
            .iter()
            .filter(|(_, m)| m.latency_count > 0)
            .map(|(k, _)| *k)
            .collect();
        let existing = Self::existing_sketches(tx, spec, table, &with_latency).await?;
        let conflict = upsert_clause(Backend::Sqlite, spec, table);
        for chunk in rows.chunks(AGG_ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new(format!("INSERT INTO {table} ({}) ", all_columns(spec)));
            qb.push_values(chunk, |mut b, (key, m)| {
                b.push_bind(format_ts(&key.bucket));
                for d in &key.dims {
                    b.push_bind(d.clone());
                }
                for v in int_values(m) {
                    b.push_bind(v);
                }
                let merged = merged_sketch(m, existing.get(*key));
                for v in float_values(m, &merged) {
                    b.push_bind(v);
                }
                b.push_bind((m.latency_count > 0).then(|| merged.encode()));
            });
            qb.push(conflict.as_str());
            qb.build().execute(&mut **tx).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl ProjectionStore for SqliteStore {
    async fn read_log(&self, after: Cursor, limit: i64) -> Result<LogBatch, StoreError> {
        // Taken before the read: everything committed before it is visible to
        // the read, which starts its WAL snapshot afterwards.
        let at = Utc::now();
        let sql = format!(
            "SELECT {} FROM usage_events WHERE seq > ? ORDER BY seq LIMIT ?",
            log_columns()
        );
        let rows = sqlx::query(&sql)
            .bind(after.seq)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        let events = rows
            .iter()
            .map(log_event)
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(LogBatch {
            events,
            watermark: Watermark {
                at,
                xmin: 0,
                xmax: 0,
            },
            // One writer at a time: rowid order is commit order, nothing waits.
            held_back: false,
        })
    }

    async fn log_position_problem(&self) -> Result<Option<String>, StoreError> {
        let (next, folded): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'usage_events'), \
                    (SELECT coalesce(max(cursor_seq), 0) FROM projection_checkpoints)",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok((folded > next).then(|| {
            format!(
                "a projection checkpoint is at log position {folded}, beyond the last position the log handed out ({next}): the database file is older than its checkpoints (restored from a backup?), and new events would get positions that are never folded"
            )
        }))
    }

    async fn repair_log_positions(&self) -> Result<String, StoreError> {
        let mut tx = self.writer.begin().await?;
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

    async fn events_after(&self, after: Cursor) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE seq > ?")
                .bind(after.seq)
                .fetch_one(&self.reader)
                .await?,
        )
    }

    async fn ensure_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<ProjectionState, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        for &g in &spec.granularities {
            let t = table(spec, g, suffix);
            sqlx::query(&create_table_sql(Backend::Sqlite, spec, &t))
                .execute(&mut *tx)
                .await?;
        }
        let now = format_ts(&Utc::now());
        sqlx::query(
            "INSERT INTO projection_checkpoints (name, spec_hash, spec, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(state)
        .bind(spec.hash())
        .bind(spec.canonical())
        .bind(&now)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints WHERE name = ?");
        let row = sqlx::query(&sql).bind(state).fetch_one(&mut *tx).await?;
        let found = state_from_row(&row)?;
        // Indexes only on tables built with this very spec: a changed spec's
        // tables may lack the columns (the caller then refuses to start).
        if found.spec_hash == spec.hash() {
            for &g in &spec.granularities {
                for sql in index_sql(spec, &table(spec, g, suffix)) {
                    sqlx::query(&sql).execute(&mut *tx).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(found)
    }

    async fn projection_states(&self) -> Result<Vec<ProjectionState>, StoreError> {
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints ORDER BY name");
        let rows = sqlx::query(&sql).fetch_all(&self.reader).await?;
        rows.iter().map(state_from_row).collect()
    }

    async fn try_lease(&self, state: &str, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = Utc::now();
        let until = unix_ms(now) + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let done = sqlx::query(
            "UPDATE projection_checkpoints SET leader = ?2, lease_until_ms = ?3 \
             WHERE name = ?1 AND (leader IS NULL OR leader = ?2 OR lease_until_ms < ?4)",
        )
        .bind(state)
        .bind(owner)
        .bind(until)
        .bind(unix_ms(now))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(&self, state: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE projection_checkpoints SET leader = NULL, lease_until_ms = 0 \
             WHERE name = ? AND leader = ?",
        )
        .bind(state)
        .bind(owner)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn apply_fold(&self, applies: &[Apply<'_>]) -> Result<ApplyOutcome, StoreError> {
        // BEGIN IMMEDIATE takes the database's write lock for the whole batch.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let now = format_ts(&Utc::now());
        for apply in applies {
            let moved = sqlx::query(
                "UPDATE projection_checkpoints SET cursor_tx = ?4, cursor_seq = ?5, \
                     as_of = COALESCE(?6, as_of), events_folded = events_folded + ?7, updated_at = ?9 \
                 WHERE name = ?1 AND spec_hash = ?2 AND cursor_tx = ?3 AND cursor_seq = ?8",
            )
            .bind(apply.state)
            .bind(apply.spec.hash())
            .bind(apply.from.tx)
            .bind(apply.to.tx)
            .bind(apply.to.seq)
            .bind(apply.as_of.as_ref().map(format_ts))
            .bind(i64::try_from(apply.delta.events).unwrap_or(i64::MAX))
            .bind(apply.from.seq)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(ApplyOutcome::Stale);
            }
        }
        for apply in applies {
            for (g, rows) in &apply.delta.tables {
                let t = table(apply.spec, *g, apply.suffix);
                Self::upsert_rows(&mut tx, apply.spec, &t, rows).await?;
            }
        }
        for hook in applies.iter().filter_map(|a| a.before_commit) {
            hook();
        }
        tx.commit().await?;
        Ok(ApplyOutcome::Applied)
    }

    async fn drop_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        for g in Granularity::ALL {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", table(spec, g, suffix)))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE name = ?")
            .bind(state)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn swap_rebuilt(
        &self,
        spec: &Spec,
        state: &str,
        shadow_state: &str,
        suffix: &str,
    ) -> Result<bool, StoreError> {
        // BEGIN IMMEDIATE takes the database's write lock: no projector commits in between.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let now = format_ts(&Utc::now());
        sqlx::query(
            "INSERT INTO projection_checkpoints (name, spec_hash, spec, created_at, updated_at) \
             VALUES (?1, '', '', ?2, ?2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(state)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        let moved = sqlx::query(
            "UPDATE projection_checkpoints SET \
                 (spec_hash, spec, cursor_tx, cursor_seq, as_of, events_folded) = \
                 (SELECT spec_hash, spec, cursor_tx, cursor_seq, as_of, events_folded \
                  FROM projection_checkpoints WHERE name = ?2), updated_at = ?3 \
             WHERE name = ?1 AND EXISTS (SELECT 1 FROM projection_checkpoints s \
                 WHERE s.name = ?2 AND s.cursor_seq >= projection_checkpoints.cursor_seq)",
        )
        .bind(state)
        .bind(shadow_state)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            // The live tables are ahead of the shadow: swapping now would step back.
            tx.rollback().await?;
            return Ok(false);
        }
        for g in Granularity::ALL {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", table(spec, g, "")))
                .execute(&mut *tx)
                .await?;
        }
        for &g in &spec.granularities {
            let (live, shadow) = (table(spec, g, ""), table(spec, g, suffix));
            sqlx::query(&format!("ALTER TABLE {shadow} RENAME TO {live}"))
                .execute(&mut *tx)
                .await?;
            // SQLite cannot rename an index: recreate the dimension indexes under
            // the live name, so the next rebuild's shadow can use the shadow names.
            for &d in &spec.dimensions {
                sqlx::query(&format!("DROP INDEX IF EXISTS {}", index_name(&shadow, d)))
                    .execute(&mut *tx)
                    .await?;
            }
            for sql in index_sql(spec, &live) {
                sqlx::query(&sql).execute(&mut *tx).await?;
            }
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE name = ?")
            .bind(shadow_state)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn read_agg(
        &self,
        spec: &Spec,
        granularity: Granularity,
        suffix: &str,
    ) -> Result<Vec<AggRow>, StoreError> {
        let t = table(spec, granularity, suffix);
        let sql = format!(
            "SELECT {} FROM {t} ORDER BY {}",
            all_columns(spec),
            key_columns(spec)
        );
        let rows = sqlx::query(&sql).fetch_all(&self.reader).await?;
        let n = spec.dimensions.len();
        rows.iter().map(|r| agg_row_text(r, n, &t)).collect()
    }

    async fn query_agg(&self, q: &AggQuery<'_>) -> Result<AggAnswer, StoreError> {
        let t = table(q.spec, q.granularity, "");
        let (select, tail) = query_select(q, Backend::Sqlite);
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {select} FROM {t} WHERE bucket >= "));
        qb.push_bind(format_ts(&q.from));
        qb.push(" AND bucket < ");
        qb.push_bind(format_ts(&q.to));
        for (d, values) in q.filters {
            qb.push(format!(" AND {} IN (", d.column()));
            let mut list = qb.separated(", ");
            for v in values {
                list.push_bind(v.clone());
            }
            qb.push(")");
        }
        qb.push(tail);
        // SQLite has no statement timeout: a progress handler interrupts the
        // statement itself once the deadline passes (dropping the future
        // would leave it running on the connection's worker thread).
        let mut conn = self.reader.acquire().await?;
        let deadline = Deadline::arm(self.statement_timeout);
        {
            let watch = deadline.watch();
            conn.lock_handle()
                .await?
                .set_progress_handler(1_000, move || !watch.passed());
        }
        let result = qb.build().fetch_all(&mut *conn).await;
        drop(deadline);
        if let Ok(mut handle) = conn.lock_handle().await {
            handle.remove_progress_handler();
        }
        let rows = match result {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("9") => {
                return Err(StoreError::Timeout(self.statement_timeout))
            }
            other => other?,
        };
        if rows.len() > q.max_rows {
            return Err(StoreError::TooManyRows(q.max_rows));
        }
        let n = q.group_by.len();
        let groups = total_groups(q, rows.first())?;
        let rows = rows
            .iter()
            .map(|r| agg_row_text(r, n, &t))
            .collect::<Result<_, StoreError>>()?;
        Ok(AggAnswer { rows, groups })
    }

    async fn table_sizes(&self, tables: &[String]) -> Result<HashMap<String, i64>, StoreError> {
        let existing: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
                .fetch_all(&self.reader)
                .await?;
        let mut out = HashMap::new();
        for t in tables.iter().filter(|t| existing.contains(t)) {
            // Rows are never deleted but by retention: the largest rowid is
            // close to the row count and costs one index probe.
            let n: Option<i64> = sqlx::query_scalar(&format!("SELECT max(rowid) FROM {t}"))
                .fetch_one(&self.reader)
                .await?;
            out.insert(t.clone(), n.unwrap_or(0));
        }
        Ok(out)
    }

    async fn count_rows(&self, table: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.reader)
            .await?)
    }
}

super::alerts::impl_alert_store!(SqliteStore, writer, reader, "BEGIN IMMEDIATE", "");
super::ops::impl_ops_store!(SqliteStore, writer, reader, "BEGIN IMMEDIATE");

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
