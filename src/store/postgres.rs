//! PostgreSQL event log: one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING`
//! per batch, so a batch of 1,000 events costs one round trip, not 1,000.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::{
    classify, event_from_row, first_occurrences, metadata_json, not_inserted, rejected_from_row,
    Backend, EventStore, LogCounts, Origin, Outcome, Rejected, RejectedRow, StoreError,
    StoreOptions, EVENT_COLUMNS, REJECTED_COLUMNS,
};
use crate::event::Event;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./schema/postgres");

/// The event log on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects lazily: the pool opens connections on first use, so Tally starts
    /// (and reports not-ready) while the database is still down.
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let connect = PgConnectOptions::from_str(url)?.application_name("tally");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self { pool })
    }

    /// The pool, for modules that keep their own tables in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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
                let ts: DateTime<Utc> = row.try_get(1)?;
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
            .map(|r| rejected_from_row(r, r.try_get(0)?))
            .collect()
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
