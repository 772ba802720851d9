//! SQLite event log: WAL mode, one writer connection taking `BEGIN IMMEDIATE`,
//! multi-row inserts of up to [`ROWS_PER_STATEMENT`] events.
//!
//! Invariant: all writes go through the single-connection writer pool, so
//! transactions commit one after another and `seq` (the rowid) order is commit
//! order. The projector relies on this to use `seq` alone as its cursor.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

use super::{
    classify, event_from_row, first_occurrences, metadata_json, not_inserted, rejected_from_row,
    Backend, EventStore, LogCounts, Origin, Outcome, Rejected, RejectedRow, StoreError,
    StoreOptions, EVENT_COLUMNS, REJECTED_COLUMNS,
};
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
        Ok(Self { writer, reader })
    }

    /// The read pool, for queries of other modules.
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// The single-connection write pool.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
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
                let ts_text: String = row.try_get(1)?;
                let ts = parse_ts(&ts_text).ok_or_else(|| StoreError::CorruptRow {
                    id: row.try_get::<String, _>(0).unwrap_or_default(),
                    reason: format!("ts {ts_text:?}"),
                })?;
                let e = event_from_row(row, ts)?;
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

/// A multi-row `INSERT INTO usage_events … VALUES (…), (…)` without a conflict
/// clause (the benchmark's baseline uses it bare). At most [`ROWS_PER_STATEMENT`] rows.
pub(crate) fn insert_rows<'a>(
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
                let received: String = r.try_get(0)?;
                rejected_from_row(r, parse_ts(&received).unwrap_or_default())
            })
            .collect()
    }

    async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}
