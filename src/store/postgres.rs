//! PostgreSQL event log: one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING`
//! per batch, so a batch of 1,000 events costs one round trip, not 1,000.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::agg::{
    agg_row_from, all_columns, create_table_sql, float_values, index_name, index_sql, int_values,
    key_columns, merged_sketch, query_select, table, total_groups, unix_ms, upsert_clause,
    FLOAT_COLUMNS, INT_COLUMNS,
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
use crate::event::Event;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./schema/postgres");

/// The event log on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Query-module reads: the same database with `statement_timeout` set, so
    /// a runaway query is cancelled by the server rather than left running.
    query_pool: PgPool,
    statement_timeout: Duration,
}

impl PgStore {
    /// Connects lazily: the pool opens connections on first use, so Tally starts
    /// (and reports not-ready) while the database is still down.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(url)?.application_name("tally");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect.clone());
        let timeout_ms = options.statement_timeout.as_millis().max(1).to_string();
        let query_pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(
                connect
                    .application_name("tally-query")
                    .options([("statement_timeout", timeout_ms.as_str())]),
            );
        Ok(Self {
            pool,
            query_pool,
            statement_timeout: options.statement_timeout,
        })
    }

    async fn insert_events(
        tx: &mut Transaction<'_, Postgres>,
        events: &[&Event],
    ) -> Result<HashSet<String>, StoreError> {
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
             RETURNING id"
        );
        let rows: Vec<String> = sqlx::query_scalar(&sql)
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
        Ok(rows.into_iter().collect())
    }

    async fn fetch_events(
        executor: impl sqlx::PgExecutor<'_>,
        ids: &[&str],
    ) -> Result<HashMap<String, Event>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let sql = format!(
            "SELECT {} FROM usage_events WHERE id = ANY($1)",
            EVENT_COLUMNS.replace("metadata", "metadata::text")
        );
        let rows = sqlx::query(&sql).bind(ids).fetch_all(executor).await?;
        rows.iter()
            .map(|row: &PgRow| {
                let ts: DateTime<Utc> = row.try_get("ts")?;
                let e = event_from_row(row, ts)?;
                Ok((e.id.clone(), e))
            })
            .collect()
    }

    async fn append_once(
        &self,
        events: &[Event],
        unique: &[&Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = if unique.is_empty() {
            HashSet::new()
        } else {
            Self::insert_events(&mut tx, unique).await?
        };
        let missing = not_inserted(unique, &inserted);
        let existing = Self::fetch_events(&mut *tx, &missing).await?;
        let (outcomes, conflicts) = classify(events, &inserted, &existing);
        Self::insert_rejects(&mut tx, rejects, origin).await?;
        Self::insert_rejects(&mut tx, &conflicts, origin).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn insert_rejects(
        tx: &mut Transaction<'_, Postgres>,
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
}

/// Deadlock and serialization failures: the transaction was rolled back and may be retried.
fn is_retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

#[async_trait]
impl EventStore for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn append(
        &self,
        events: &[Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError> {
        // Rows are inserted in id order, so two batches that share ids take their
        // unique-index locks in the same order and cannot deadlock. The retry is a
        // backstop for lock cycles we did not foresee; the transaction is all or nothing.
        let mut unique: Vec<&Event> = first_occurrences(events)
            .into_iter()
            .map(|i| &events[i])
            .collect();
        unique.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.append_once(events, &unique, rejects, origin).await {
                Err(StoreError::Database(e)) if attempt < 4 && is_retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "append retried");
                }
                other => return other,
            }
        }
    }

    async fn get_event(&self, id: &str) -> Result<Option<Event>, StoreError> {
        Ok(Self::fetch_events(&self.pool, &[id]).await?.remove(id))
    }

    async fn counts(&self) -> Result<LogCounts, StoreError> {
        let (events, rejected): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM rejected_events)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(LogCounts { events, rejected })
    }

    async fn recent_rejected(&self, limit: i64) -> Result<Vec<RejectedRow>, StoreError> {
        let sql =
            format!("SELECT {REJECTED_COLUMNS} FROM rejected_events ORDER BY seq DESC LIMIT $1");
        let rows = sqlx::query(&sql).bind(limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| rejected_from_row(r, r.try_get("received_at")?))
            .collect()
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn delete_rejected_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM rejected_events WHERE seq IN \
             (SELECT seq FROM rejected_events WHERE received_at < $1 ORDER BY seq LIMIT $2)",
        )
        .bind(cutoff)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn table_rows(&self, tables: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, f32)> = sqlx::query_as(
            "SELECT relname::text, reltuples FROM pg_class \
             WHERE relname = ANY($1) AND relkind = 'r' AND relnamespace = current_schema()::regnamespace",
        )
        .bind(tables)
        .fetch_all(&self.pool)
        .await?;
        // reltuples is -1 before the first ANALYZE (the optimize job runs it).
        Ok(rows
            .into_iter()
            .map(|(t, n)| (t, n.max(0.0) as i64))
            .collect())
    }

    async fn delete_events_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM usage_events WHERE seq IN \
             (SELECT seq FROM usage_events WHERE ts < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(limit)
        .execute(&self.pool)
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
            "DELETE FROM {t} WHERE ctid IN (SELECT ctid FROM {t} WHERE bucket < $1 LIMIT $2)"
        ))
        .bind(cutoff)
        .bind(limit)
        .execute(&self.pool)
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
            "SELECT {}, seq FROM usage_events WHERE seq > $1 \
             AND ($2::timestamptz IS NULL OR ts >= $2) AND ($3::timestamptz IS NULL OR ts < $3) \
             ORDER BY seq LIMIT $4",
            EVENT_COLUMNS.replace("metadata", "metadata::text")
        );
        let rows = sqlx::query(&sql)
            .bind(after_seq)
            .bind(from)
            .bind(to)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("seq")?, event_from_row(r, r.try_get("ts")?)?)))
            .collect()
    }

    async fn touched_hours(
        &self,
        after_seq: i64,
        before: DateTime<Utc>,
    ) -> Result<(Vec<DateTime<Utc>>, i64), StoreError> {
        let hours: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT DISTINCT date_trunc('hour', ts, 'UTC') FROM usage_events WHERE seq > $1 AND ts < $2 ORDER BY 1",
        )
        .bind(after_seq)
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        let max: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM usage_events")
            .fetch_one(&self.pool)
            .await?;
        Ok((hours, max.unwrap_or(0)))
    }

    async fn reconcile_read(
        &self,
        spec: &Spec,
        granularities: &[Granularity],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<ReconcileRead, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let cursor: Option<(i64, i64)> = sqlx::query_as(
            "SELECT cursor_tx, cursor_seq FROM projection_checkpoints WHERE name = $1",
        )
        .bind(&spec.name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((ctx, cseq)) = cursor else {
            return Ok(ReconcileRead {
                cursor: None,
                stored: Vec::new(),
                events: Vec::new(),
            });
        };
        let mut stored = Vec::with_capacity(granularities.len());
        for &g in granularities {
            let t = table(spec, g, "");
            let sql = format!(
                "SELECT {} FROM {t} WHERE bucket >= $1 AND bucket < $2 ORDER BY {}",
                all_columns(spec),
                key_columns(spec)
            );
            let rows = sqlx::query(&sql)
                .bind(from)
                .bind(to)
                .fetch_all(&mut *tx)
                .await?;
            let n = spec.dimensions.len();
            let rows = rows
                .iter()
                .map(|r| agg_row_from(r, r.try_get(0)?, n, &t))
                .collect::<Result<Vec<_>, _>>()?;
            stored.push((g, rows));
        }
        let sql = format!(
            "SELECT {} FROM usage_events \
             WHERE ts >= $1 AND ts < $2 AND (tx, seq) <= ($3::text::xid8, $4)",
            log_columns()
        );
        let rows = sqlx::query(&sql)
            .bind(from)
            .bind(to)
            .bind(ctx.to_string())
            .bind(cseq)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let events = rows
            .iter()
            .map(|r| fold_event_from_row(r, r.try_get(0)?, r.try_get(18)?))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReconcileRead {
            cursor: Some(Cursor { tx: ctx, seq: cseq }),
            stored,
            events,
        })
    }

    async fn maintenance(&self) -> Result<Vec<String>, StoreError> {
        // Autovacuum reclaims what retention deleted; fresh statistics keep
        // the planner on the ts index after a large delete.
        sqlx::query("ANALYZE usage_events")
            .execute(&self.pool)
            .await?;
        Ok(vec![
            "ANALYZE usage_events (autovacuum reclaims space)".to_string()
        ])
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        [("main", &self.pool), ("query", &self.query_pool)]
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

/// Event columns as the projector reads them (no message, no metadata), then `tx`, `seq`.
/// [`FOLD_COLUMNS`], then the cursor: `tx` (17), `seq` (18).
fn log_columns() -> String {
    format!("{FOLD_COLUMNS}, tx::text::bigint AS cursor_tx, seq AS cursor_seq")
}

const CHECKPOINT_COLUMNS: &str = "name, spec_hash, spec, cursor_tx, cursor_seq, as_of, \
     events_folded, leader, lease_until_ms, updated_at";

fn state_from_row(r: &PgRow) -> Result<ProjectionState, StoreError> {
    Ok(ProjectionState {
        name: r.try_get(0)?,
        spec_hash: r.try_get(1)?,
        spec: r.try_get(2)?,
        cursor: Cursor {
            tx: r.try_get(3)?,
            seq: r.try_get(4)?,
        },
        as_of: r.try_get(5)?,
        events_folded: r.try_get(6)?,
        leader: r.try_get(7)?,
        lease_until_ms: r.try_get(8)?,
        updated_at: r.try_get(9)?,
    })
}

impl PgStore {
    /// Stored sketches of the keys of `rows` that carry latencies.
    async fn existing_sketches(
        tx: &mut Transaction<'_, Postgres>,
        spec: &Spec,
        table: &str,
        rows: &[(&RowKey, &Measures)],
    ) -> Result<HashMap<RowKey, Sketch>, StoreError> {
        let keys: Vec<&RowKey> = rows
            .iter()
            .filter(|(_, m)| m.latency_count > 0)
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
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
            "SELECT {}, t.latency_sketch FROM {table} t JOIN (SELECT {}) AS k ON {} \
             WHERE t.latency_sketch IS NOT NULL",
            select.join(", "),
            keys_list.join(", "),
            on.join(" AND ")
        );
        let mut q = sqlx::query(&sql).bind(keys.iter().map(|k| k.bucket).collect::<Vec<_>>());
        for i in 0..n {
            q = q.bind(keys.iter().map(|k| k.dims[i].as_str()).collect::<Vec<_>>());
        }
        let found = q.fetch_all(&mut **tx).await?;
        let mut out = HashMap::with_capacity(found.len());
        for r in &found {
            let bucket: DateTime<Utc> = r.try_get(0)?;
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
        Ok(out)
    }

    /// One projection's share of [`ProjectionStore::apply_fold`]: its
    /// checkpoint's compare-and-set, then its tables, in one transaction.
    async fn apply_one(&self, apply: &Apply<'_>) -> Result<ApplyOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Aggregates are derived data and the checkpoint commits with them: a
        // commit lost in a database crash loses both together and is folded
        // again, so this transaction need not wait for its WAL flush.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        // The compare-and-set comes first: its row lock serialises every
        // writer of this projection until commit.
        let moved = sqlx::query(
            "UPDATE projection_checkpoints SET cursor_tx = $4, cursor_seq = $5, \
                 as_of = COALESCE($6, as_of), events_folded = events_folded + $7, updated_at = now() \
             WHERE name = $1 AND spec_hash = $2 AND cursor_tx = $3 AND cursor_seq = $8",
        )
        .bind(apply.state)
        .bind(apply.spec.hash())
        .bind(apply.from.tx)
        .bind(apply.to.tx)
        .bind(apply.to.seq)
        .bind(apply.as_of)
        .bind(i64::try_from(apply.delta.events).unwrap_or(i64::MAX))
        .bind(apply.from.seq)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(ApplyOutcome::Stale);
        }
        for (g, rows) in &apply.delta.tables {
            let t = table(apply.spec, *g, apply.suffix);
            Self::upsert_rows(&mut tx, apply.spec, &t, rows).await?;
        }
        if let Some(hook) = apply.before_commit {
            hook();
        }
        tx.commit().await?;
        Ok(ApplyOutcome::Applied)
    }

    async fn upsert_rows(
        tx: &mut Transaction<'_, Postgres>,
        spec: &Spec,
        table: &str,
        rows: &Rows,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let rows: Vec<(&RowKey, &Measures)> = rows.iter().collect();
        let existing = Self::existing_sketches(tx, spec, table, &rows).await?;
        let n = spec.dimensions.len();
        let mut types = vec!["timestamptz[]"];
        types.extend(std::iter::repeat_n("text[]", n));
        types.extend(std::iter::repeat_n("int8[]", INT_COLUMNS.len()));
        types.extend(std::iter::repeat_n("float8[]", FLOAT_COLUMNS.len()));
        types.push("bytea[]");
        // Select-list `unnest`s (zipped in lockstep) cost about half of
        // `FROM UNNEST(…)`, which materialises the rows before inserting them.
        let unnest: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("unnest(${}::{t})", i + 1))
            .collect();
        let sql = format!(
            "INSERT INTO {table} ({}) SELECT {}{}",
            all_columns(spec),
            unnest.join(", "),
            upsert_clause(Backend::Postgres, spec, table)
        );
        let mut ints: Vec<Vec<i64>> = vec![Vec::with_capacity(rows.len()); INT_COLUMNS.len()];
        let mut floats: Vec<Vec<Option<f64>>> =
            vec![Vec::with_capacity(rows.len()); FLOAT_COLUMNS.len()];
        let mut sketches: Vec<Option<Vec<u8>>> = Vec::with_capacity(rows.len());
        for (key, m) in &rows {
            for (col, v) in ints.iter_mut().zip(int_values(m)) {
                col.push(v);
            }
            let merged = merged_sketch(m, existing.get(*key));
            for (col, v) in floats.iter_mut().zip(float_values(m, &merged)) {
                col.push(v);
            }
            sketches.push((m.latency_count > 0).then(|| merged.encode()));
        }
        let mut q = sqlx::query(&sql).bind(rows.iter().map(|(k, _)| k.bucket).collect::<Vec<_>>());
        for i in 0..n {
            q = q.bind(
                rows.iter()
                    .map(|(k, _)| k.dims[i].as_str())
                    .collect::<Vec<_>>(),
            );
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
}

#[async_trait]
impl ProjectionStore for PgStore {
    async fn log_position_problem(&self) -> Result<Option<String>, StoreError> {
        // xmax of a snapshot is the next transaction id to be handed out; no
        // id is consumed by reading it.
        let (next, checkpoint, stored): (i64, i64, i64) = sqlx::query_as(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, \
                    (SELECT coalesce(max(cursor_tx), 0) FROM projection_checkpoints), \
                    coalesce((SELECT tx::text::bigint FROM usage_events ORDER BY tx DESC LIMIT 1), 0)",
        )
        .fetch_one(&self.pool)
        .await?;
        let ahead = checkpoint.max(stored);
        Ok((ahead >= next).then(|| {
            format!(
                "the log holds transaction ids up to {ahead} but this cluster hands out {next} next: the database was restored into another cluster (pg_dump/pg_restore, a new server), so new events would sort before the checkpoints and never be folded"
            )
        }))
    }

    async fn repair_log_positions(&self) -> Result<String, StoreError> {
        // Each distinct writer transaction id of the log is renumbered 1..k in
        // order, and each checkpoint moved to the same place in that order, so
        // every checkpoint still covers exactly the events it folded. Then
        // transaction ids are consumed until the cluster's next one is past k.
        let mut tx = self.pool.begin().await?;
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
        tx.commit().await?;
        let mut burned = 0u64;
        loop {
            let next: i64 =
                sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
                    .fetch_one(&self.pool)
                    .await?;
            if next > k + 1 {
                break;
            }
            // Each autocommitted call takes one transaction id.
            sqlx::query("SELECT pg_current_xact_id()")
                .execute(&self.pool)
                .await?;
            burned += 1;
        }
        Ok(format!(
            "renumbered {k} writer transaction ids of {moved} events and moved the checkpoints with them; consumed {burned} transaction ids so new events sort after them"
        ))
    }

    async fn read_log(&self, after: Cursor, limit: i64) -> Result<LogBatch, StoreError> {
        // One REPEATABLE READ snapshot for both statements; now() (transaction
        // start) is no later than the snapshot, as `Watermark::at` requires.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let (at, xmin, xmax): (DateTime<Utc>, i64, i64) = sqlx::query_as(
            "SELECT now(), pg_snapshot_xmin(pg_current_snapshot())::text::bigint, \
                    pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
        )
        .fetch_one(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT {} FROM usage_events \
             WHERE (tx, seq) > ($1::text::xid8, $2) AND tx < $4::text::xid8 \
             ORDER BY tx, seq LIMIT $3",
            log_columns()
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
        let mut held_back = false;
        if (rows.len() as i64) < limit {
            // Caught up below xmin: do committed events wait above it?
            let last = match rows.last() {
                Some(r) => Cursor {
                    tx: r.try_get(17)?,
                    seq: r.try_get(18)?,
                },
                None => after,
            };
            held_back = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM usage_events \
                 WHERE (tx, seq) > ($1::text::xid8, $2) AND tx >= $3::text::xid8)",
            )
            .bind(last.tx.to_string())
            .bind(last.seq)
            .bind(xmin.to_string())
            .fetch_one(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let events = rows
            .iter()
            .map(|r| {
                let cursor = Cursor {
                    tx: r.try_get(17)?,
                    seq: r.try_get(18)?,
                };
                Ok((cursor, fold_event_from_row(r, r.try_get(0)?, cursor.seq)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(LogBatch {
            events,
            watermark: Watermark { at, xmin, xmax },
            held_back,
        })
    }

    async fn events_after(&self, after: Cursor) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM usage_events WHERE (tx, seq) > ($1::text::xid8, $2)",
        )
        .bind(after.tx.to_string())
        .bind(after.seq)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn ensure_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<ProjectionState, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Two instances starting together must not race on CREATE TABLE.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.projection.ddl'))")
            .execute(&mut *tx)
            .await?;
        for &g in &spec.granularities {
            let t = table(spec, g, suffix);
            sqlx::query(&create_table_sql(Backend::Postgres, spec, &t))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO projection_checkpoints (name, spec_hash, spec) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(state)
        .bind(spec.hash())
        .bind(spec.canonical())
        .execute(&mut *tx)
        .await?;
        let sql =
            format!("SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints WHERE name = $1");
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
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(state_from_row).collect()
    }

    async fn try_lease(&self, state: &str, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = Utc::now();
        let until = unix_ms(now) + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let done = sqlx::query(
            "UPDATE projection_checkpoints SET leader = $2, lease_until_ms = $3 \
             WHERE name = $1 AND (leader IS NULL OR leader = $2 OR lease_until_ms < $4)",
        )
        .bind(state)
        .bind(owner)
        .bind(until)
        .bind(unix_ms(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(&self, state: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE projection_checkpoints SET leader = NULL, lease_until_ms = 0 \
             WHERE name = $1 AND leader = $2",
        )
        .bind(state)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn apply_fold(&self, applies: &[Apply<'_>]) -> Result<ApplyOutcome, StoreError> {
        // One transaction per projection, run side by side on their own
        // connections: a projection's rows commit with its own checkpoint
        // (all exactly-once needs), and one backend per projection spreads the
        // upserts over the cores instead of running them one after another.
        let outcomes = futures::future::join_all(applies.iter().map(|a| self.apply_one(a))).await;
        let mut all = ApplyOutcome::Applied;
        for outcome in outcomes {
            if outcome? == ApplyOutcome::Stale {
                all = ApplyOutcome::Stale;
            }
        }
        Ok(all)
    }

    async fn drop_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for g in Granularity::ALL {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", table(spec, g, suffix)))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1")
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
        let mut tx = self.pool.begin().await?;
        // Lock the live checkpoint first: a live projector's commit finishes
        // before the swap, and its next compare-and-set fails and re-reads.
        sqlx::query(
            "INSERT INTO projection_checkpoints (name, spec_hash, spec) VALUES ($1, '', '') \
             ON CONFLICT (name) DO UPDATE SET updated_at = now()",
        )
        .bind(state)
        .execute(&mut *tx)
        .await?;
        let moved = sqlx::query(
            "UPDATE projection_checkpoints m SET spec_hash = s.spec_hash, spec = s.spec, \
                 cursor_tx = s.cursor_tx, cursor_seq = s.cursor_seq, as_of = s.as_of, \
                 events_folded = s.events_folded, updated_at = now() \
             FROM projection_checkpoints s WHERE m.name = $1 AND s.name = $2 \
               AND (s.cursor_tx, s.cursor_seq) >= (m.cursor_tx, m.cursor_seq)",
        )
        .bind(state)
        .bind(shadow_state)
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
            let live = table(spec, g, "");
            let shadow = table(spec, g, suffix);
            sqlx::query(&format!("ALTER TABLE {shadow} RENAME TO {live}"))
                .execute(&mut *tx)
                .await?;
            // Keep index names tied to the live name, so the next rebuild can reuse the shadow's.
            sqlx::query(&format!(
                "ALTER INDEX IF EXISTS {shadow}_pkey RENAME TO {live}_pkey"
            ))
            .execute(&mut *tx)
            .await?;
            for &d in &spec.dimensions {
                sqlx::query(&format!(
                    "ALTER INDEX IF EXISTS {} RENAME TO {}",
                    index_name(&shadow, d),
                    index_name(&live, d)
                ))
                .execute(&mut *tx)
                .await?;
            }
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1")
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
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        let n = spec.dimensions.len();
        rows.iter()
            .map(|r| {
                let bucket: DateTime<Utc> = r.try_get(0)?;
                agg_row_from(r, bucket, n, &t)
            })
            .collect()
    }

    async fn query_agg(&self, q: &AggQuery<'_>) -> Result<AggAnswer, StoreError> {
        let t = table(q.spec, q.granularity, "");
        let (select, tail) = query_select(q, Backend::Postgres);
        let mut qb = sqlx::QueryBuilder::<Postgres>::new(format!(
            "SELECT {select} FROM {t} WHERE bucket >= "
        ));
        qb.push_bind(q.from);
        qb.push(" AND bucket < ");
        qb.push_bind(q.to);
        for (d, values) in q.filters {
            qb.push(format!(" AND {} = ANY(", d.column()));
            qb.push_bind(values.clone());
            qb.push(")");
        }
        qb.push(tail);
        let rows = match qb.build().fetch_all(&self.query_pool).await {
            Ok(rows) => rows,
            // 57014: query_canceled, which is what statement_timeout raises.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("57014") => {
                return Err(StoreError::Timeout(self.statement_timeout))
            }
            Err(e) => return Err(e.into()),
        };
        if rows.len() > q.max_rows {
            return Err(StoreError::TooManyRows(q.max_rows));
        }
        let n = q.group_by.len();
        let groups = total_groups(q, rows.first())?;
        let rows = rows
            .iter()
            .map(|r| {
                let bucket: DateTime<Utc> = r.try_get(0)?;
                agg_row_from(r, bucket, n, &t)
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(AggAnswer { rows, groups })
    }

    async fn table_sizes(&self, tables: &[String]) -> Result<HashMap<String, i64>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT relname::TEXT, (pg_relation_size(oid) / 8192)::BIGINT FROM pg_class \
             WHERE relkind = 'r' AND relname = ANY($1) AND pg_table_is_visible(oid)",
        )
        .bind(tables)
        .fetch_all(&self.query_pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn count_rows(&self, table: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await?)
    }
}

super::alerts::impl_alert_store!(PgStore, pool, pool, "BEGIN", " FOR UPDATE");
super::ops::impl_ops_store!(PgStore, pool, pool, "BEGIN");
