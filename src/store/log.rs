//! The event log: `usage_events` (the source of truth) and `rejected_events`.
//!
//! An append classifies every event as inserted, duplicate or conflict with
//! one pure function ([`classify`]) over what the dialect's bulk insert
//! reports, so the two backends cannot drift apart; `tests/it/store.rs` runs
//! one conformance suite against both.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::db::{Db, Row, Sql, Tx};
use super::tail::LogTail;
use super::{
    postgres, sqlite, Cursor, LogCounts, LogTotals, Origin, Outcome, RejectKind, Rejected,
    RejectedRow, StoreError,
};
use crate::event::codec::to_wire_json;
use crate::event::{ErrorType, Event};

/// The append-only event log.
#[derive(Debug, Clone)]
pub struct EventLog {
    db: Db,
    tail: Arc<LogTail>,
}

/// The ids an append inserted, each with its log position.
pub(crate) type Inserted = HashMap<String, Cursor>;

impl EventLog {
    pub(crate) fn new(db: Db, tail: Arc<LogTail>) -> Self {
        Self { db, tail }
    }

    /// Appends a batch in one transaction: all of it commits or none (an
    /// error). Answers one [`Outcome`] per event, in order; conflicts are
    /// written to `rejected_events` with the batch's rejected payloads.
    pub async fn append(
        &self,
        events: &[Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut unique: Vec<&Event> = first_occurrences(events)
            .into_iter()
            .map(|i| &events[i])
            .collect();
        // PostgreSQL: rows are inserted in id order, so two batches that share
        // ids take their unique-index locks in the same order and cannot
        // deadlock; the retry below is a backstop for lock cycles we did not
        // foresee (the transaction is all or nothing). SQLite has one writer
        // and keeps arrival order, which is `ts` order: sorting by id there
        // scatters the `ts` index inserts and cost 15–20% of its append rate
        // (BENCHMARKS.md, issue 18).
        if let Db::Postgres(_) = self.db {
            unique.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.append_once(events, &unique, rejects, origin).await {
                Err(StoreError::Database(e)) if attempt < 4 && postgres::is_retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "append retried");
                }
                other => return other,
            }
        }
    }

    async fn append_once(
        &self,
        events: &[Event],
        unique: &[&Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut tx = self.db.begin().await?;
        let inserted = insert_events(&mut tx, unique).await?;
        let missing = not_inserted(unique, &inserted);
        let existing = if missing.is_empty() {
            HashMap::new()
        } else {
            by_id(&tx.fetch_all(events_sql(&self.db, &missing)).await?)?
        };
        let (outcomes, conflicts) = classify(events, &inserted, &existing);
        insert_rejects(&mut tx, rejects, origin).await?;
        insert_rejects(&mut tx, &conflicts, origin).await?;
        tx.commit().await?;
        // Only now: an append that rolled back must leave nothing behind.
        if self.tail.is_on() {
            self.tail.push(
                unique
                    .iter()
                    .filter_map(|e| inserted.get(&e.id).map(|at| (*at, (*e).clone()))),
            );
        }
        Ok(outcomes)
    }

    /// The stored event with this id.
    pub async fn get_event(&self, id: &str) -> Result<Option<Event>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(events_sql(&self.db, &[id]))
            .await?;
        Ok(by_id(&rows)?.remove(id))
    }

    /// Row counts of `usage_events` and `rejected_events`.
    pub async fn counts(&self) -> Result<LogCounts, StoreError> {
        let r = self
            .db
            .reader()
            .fetch_one(Sql::new(
                "SELECT (SELECT count(*) FROM usage_events) AS events, \
                 (SELECT count(*) FROM rejected_events) AS rejected",
            ))
            .await?;
        Ok(LogCounts {
            events: r.get("events")?,
            rejected: r.get("rejected")?,
        })
    }

    /// The most recent rejected payloads, newest first.
    pub async fn recent_rejected(&self, limit: i64) -> Result<Vec<RejectedRow>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(
                Sql::new(format!(
                    "SELECT {REJECTED_COLUMNS} FROM rejected_events ORDER BY seq DESC LIMIT $1"
                ))
                .bind(limit),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RejectedRow {
                    received_at: r.time("received_at")?,
                    source: r.get("source")?,
                    subject: r.get("subject")?,
                    kind: r.get("kind")?,
                    event_id: r.get("event_id")?,
                    item_index: r.get("item_index")?,
                    reason: r.get("reason")?,
                    payload: r.get("payload")?,
                })
            })
            .collect()
    }

    /// Deletes up to `limit` rejected payloads received before `cutoff`.
    pub async fn delete_rejected_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let sql = "DELETE FROM rejected_events WHERE seq IN \
             (SELECT seq FROM rejected_events WHERE received_at < $1 ORDER BY seq LIMIT $2)";
        self.db.delete_batch(sql, cutoff, limit).await
    }

    /// Deletes up to `limit` events whose `ts` is before `cutoff`; how many it deleted.
    pub async fn delete_events_before(
        &self,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let sql = "DELETE FROM usage_events WHERE seq IN \
             (SELECT seq FROM usage_events WHERE ts < $1 LIMIT $2)";
        self.db.delete_batch(sql, cutoff, limit).await
    }

    /// Up to `limit` whole events (message and metadata included) after
    /// `after_seq` in `seq` order, with `ts` in `[from, to)`; each with its seq.
    pub async fn export_events(
        &self,
        after_seq: i64,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<(i64, Event)>, StoreError> {
        let sql = format!(
            "SELECT {}, seq FROM usage_events WHERE seq > $1 \
             AND ($2 IS NULL OR ts >= $2) AND ($3 IS NULL OR ts < $3) \
             ORDER BY seq LIMIT $4",
            self.event_select()
        );
        let rows = self
            .db
            .reader()
            .fetch_all(
                Sql::new(sql)
                    .bind(after_seq)
                    .bind(from)
                    .bind(to)
                    .bind(limit),
            )
            .await?;
        Ok(events_of(&rows)?
            .into_iter()
            .map(|(seq, e)| (seq.unwrap_or_default(), e))
            .collect())
    }

    /// The UTC hours (bucket starts) that events stored after `after_seq`
    /// with `ts` before `before` fall in, and the largest seq stored (0 when
    /// empty): the days late events touched since reconciliation last looked.
    pub async fn touched_hours(
        &self,
        after_seq: i64,
        before: DateTime<Utc>,
    ) -> Result<(Vec<DateTime<Utc>>, i64), StoreError> {
        let hour = match &self.db {
            Db::Postgres(_) => postgres::HOUR_OF_TS,
            Db::Sqlite(_) => sqlite::HOUR_OF_TS,
        };
        let rows = self
            .db
            .reader()
            .fetch_all(
                Sql::new(format!(
                    "SELECT DISTINCT {hour} AS hour FROM usage_events \
                     WHERE seq > $1 AND ts < $2 ORDER BY 1"
                ))
                .bind(after_seq)
                .bind(before),
            )
            .await?;
        let hours = rows
            .iter()
            .map(|r| r.time("hour"))
            .collect::<Result<_, _>>()?;
        let max: Option<i64> = self
            .db
            .reader()
            .fetch_one(Sql::new("SELECT max(seq) AS seq FROM usage_events"))
            .await?
            .get("seq")?;
        Ok((hours, max.unwrap_or(0)))
    }

    /// The whole log summed, compared by `tally copy`.
    pub async fn log_totals(&self) -> Result<LogTotals, StoreError> {
        self.totals_where("TRUE").await
    }

    /// [`EventLog::log_totals`] of the events that count: not voided. Their
    /// `cost_nanos` is what emitters sent (catalog costs are the projections').
    pub async fn counted_totals(&self) -> Result<LogTotals, StoreError> {
        self.totals_where(NOT_VOIDED).await
    }

    async fn totals_where(&self, condition: &str) -> Result<LogTotals, StoreError> {
        let r = self
            .db
            .reader()
            .fetch_one(Sql::new(format!(
                "SELECT count(*) AS events, \
                 CAST(COALESCE(SUM(CASE WHEN success THEN 0 ELSE 1 END), 0) AS BIGINT) AS errors, \
                 CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) AS cost_nanos, \
                 CAST(COALESCE(SUM(tokens_in), 0) AS BIGINT) AS tokens_in, \
                 CAST(COALESCE(SUM(tokens_out), 0) AS BIGINT) AS tokens_out, \
                 CAST(COALESCE(SUM(COALESCE(request_bytes, 0) + COALESCE(response_bytes, 0)), 0) AS BIGINT) AS bytes \
                 FROM usage_events WHERE {condition}"
            )))
            .await?;
        Ok(LogTotals {
            events: r.get("events")?,
            errors: r.get("errors")?,
            cost_nanos: r.get("cost_nanos")?,
            tokens_in: r.get("tokens_in")?,
            tokens_out: r.get("tokens_out")?,
            bytes: r.get("bytes")?,
        })
    }

    fn event_select(&self) -> String {
        match &self.db {
            Db::Postgres(_) => postgres::event_select(),
            Db::Sqlite(_) => sqlite::event_select(),
        }
    }
}

async fn insert_events(tx: &mut Tx, unique: &[&Event]) -> Result<Inserted, StoreError> {
    if unique.is_empty() {
        return Ok(Inserted::new());
    }
    match tx {
        Tx::Postgres(tx) => postgres::insert_events(tx, unique).await,
        Tx::Sqlite(tx) => sqlite::insert_events(tx, unique).await,
    }
}

/// Reads the stored events with these ids.
fn events_sql<'a>(db: &Db, ids: &[&'a str]) -> Sql<'a> {
    let select = match db {
        Db::Postgres(_) => postgres::event_select(),
        Db::Sqlite(_) => sqlite::event_select(),
    };
    Sql::new(format!(
        "SELECT {select} FROM usage_events WHERE {}",
        db.one_of("id", "$1")
    ))
    .bind(super::db::Arg::List(ids.to_vec()))
}

/// Events read with the dialect's event columns, by id.
fn by_id(rows: &[Row]) -> Result<HashMap<String, Event>, StoreError> {
    Ok(events_of(rows)?
        .into_iter()
        .map(|(_, e)| (e.id.clone(), e))
        .collect())
}

async fn insert_rejects(
    tx: &mut Tx,
    rejects: &[Rejected],
    origin: &Origin,
) -> Result<(), StoreError> {
    if rejects.is_empty() {
        return Ok(());
    }
    match tx {
        Tx::Postgres(tx) => postgres::insert_rejects(tx, rejects, origin).await,
        Tx::Sqlite(tx) => sqlite::insert_rejects(tx, rejects, origin).await,
    }
}

/// Every event in `rows` (one result set) with its `seq` when selected.
fn events_of(rows: &[Row]) -> Result<Vec<(Option<i64>, Event)>, StoreError> {
    let cols = match rows.first() {
        None => return Ok(Vec::new()),
        Some(Row::Postgres(r)) => EventColumns::of(r)?,
        Some(Row::Sqlite(r)) => EventColumns::of(r)?,
    };
    rows.iter()
        .map(|r| {
            let ts = r.time(cols.ts)?;
            let seq = cols.seq.map(|i| r.get(i)).transpose()?;
            let e = match r {
                Row::Postgres(r) => cols.event(r, ts)?,
                Row::Sqlite(r) => cols.event(r, ts)?,
            };
            Ok((seq, e))
        })
        .collect()
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
pub(crate) fn not_inserted<'a>(unique: &[&'a Event], inserted: &Inserted) -> Vec<&'a str> {
    unique
        .iter()
        .map(|e| e.id.as_str())
        .filter(|id| !inserted.contains_key(*id))
        .collect()
}

/// Columns read back by `recent_rejected`.
pub(crate) const REJECTED_COLUMNS: &str =
    "received_at, source, subject, kind, event_id, item_index, reason, payload";

/// Classifies every event of a batch once the backend knows which ids it
/// inserted and what was already stored for the others.
///
/// The "winner" of an id is the stored row, or the first occurrence in this batch
/// when that one was inserted now. Every other occurrence is a duplicate when it
/// equals the winner and a conflict otherwise.
pub(crate) fn classify(
    events: &[Event],
    inserted: &Inserted,
    existing: &HashMap<String, Event>,
) -> (Vec<Outcome>, Vec<Rejected>) {
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut outcomes = Vec::with_capacity(events.len());
    let mut conflicts = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let first_index = *first.entry(e.id.as_str()).or_insert(i);
        let is_new = inserted.contains_key(&e.id);
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

/// The event columns a projector reads, in this order; each dialect appends
/// its cursor columns. No id, message or metadata: nothing folds them, and on
/// a 1M-event backlog every column read costs (see BENCHMARKS.md).
pub(crate) const FOLD_COLUMNS: &str = "ts, api, endpoint, method, key, \"user\", model, status, \
     success, error_type, latency_ms, request_bytes, response_bytes, tokens_in, tokens_out, \
     cost_nanos, cached";

/// The condition "not voided" on `usage_events` (no join needed).
pub(crate) const NOT_VOIDED: &str =
    "NOT EXISTS (SELECT 1 FROM voided_events WHERE voided_events.event_id = usage_events.id)";

/// Indices into `events` (in cursor order) of those at the `voided` positions.
pub(crate) fn voided_indices<T>(events: &[(Cursor, T)], voided: &[Cursor]) -> Vec<usize> {
    let mut out: Vec<usize> = voided
        .iter()
        .filter_map(|c| events.binary_search_by_key(c, |(at, _)| *at).ok())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Each row of `rows` (one result set) decoded with the columns resolved
/// from the first.
pub(crate) fn each_event<R, T>(
    rows: &[R],
    decode: impl Fn(&EventColumns, &R) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError>
where
    R: sqlx::Row,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
{
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let cols = EventColumns::of(first)?;
    rows.iter().map(|r| decode(&cols, r)).collect()
}

/// Where each event column stands in a result set: resolved by name once
/// per batch, then read by position in every row (a name lookup per column
/// and row would cost the projector's read of a million events). `id`,
/// `error_message` and `metadata` are optional: the projector does not read
/// them. `ts` is decoded by the caller (its encoding is the dialect's).
pub(crate) struct EventColumns {
    pub(crate) ts: usize,
    /// `seq`, when selected.
    pub(crate) seq: Option<usize>,
    /// `cursor_tx` (PostgreSQL's `tx` as a number), when selected.
    pub(crate) tx: Option<usize>,
    id: Option<usize>,
    error_message: Option<usize>,
    metadata: Option<usize>,
    /// The [`FOLD_COLUMNS`] after `ts`, in that order.
    fields: [usize; 16],
}

impl EventColumns {
    /// The positions in `row`'s result set.
    pub(crate) fn of<R>(row: &R) -> Result<Self, StoreError>
    where
        R: sqlx::Row,
        for<'n> &'n str: sqlx::ColumnIndex<R>,
    {
        use sqlx::Column as _;
        let at = |name: &str| row.try_column(name).map(|c| c.ordinal());
        // FOLD_COLUMNS lists `ts`, then the fields in `fields` order.
        let names = FOLD_COLUMNS.split(", ").skip(1);
        let mut fields = [0; 16];
        for (slot, name) in fields.iter_mut().zip(names) {
            *slot = at(name.trim_matches('"'))?;
        }
        Ok(Self {
            ts: at("ts")?,
            seq: at("seq").ok(),
            tx: at("cursor_tx").ok(),
            id: at("id").ok(),
            error_message: at("error_message").ok(),
            metadata: at("metadata").ok(),
            fields,
        })
    }

    /// The event in `row`, given its `ts`.
    pub(crate) fn event<'r, R>(&self, row: &'r R, ts: DateTime<Utc>) -> Result<Event, StoreError>
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
        let id: String = match self.id {
            Some(i) => row.try_get(i)?,
            None => String::new(),
        };
        let corrupt = |reason: String| {
            let seq = self.seq.and_then(|i| row.try_get::<i64, _>(i).ok());
            StoreError::CorruptRow {
                id: match seq {
                    Some(seq) if id.is_empty() => format!("seq {seq}"),
                    _ => id.clone(),
                },
                reason,
            }
        };
        let f = &self.fields;
        let error_type: Option<&str> = row.try_get(f[8])?;
        let error_type = match error_type {
            Some(t) => {
                Some(ErrorType::parse(t).ok_or_else(|| corrupt(format!("error_type {t:?}")))?)
            }
            None => None,
        };
        let metadata: Option<&str> = match self.metadata {
            Some(i) => row.try_get(i)?,
            None => None,
        };
        let metadata = match metadata {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| corrupt(format!("metadata: {e}")))?
            }
            None => Default::default(),
        };
        Ok(Event {
            ts,
            api: row.try_get(f[0])?,
            endpoint: row.try_get(f[1])?,
            method: row.try_get(f[2])?,
            key: row.try_get(f[3])?,
            user: row.try_get(f[4])?,
            model: row.try_get(f[5])?,
            status: row.try_get(f[6])?,
            success: row.try_get(f[7])?,
            error_type,
            error_message: match self.error_message {
                Some(i) => row.try_get(i)?,
                None => None,
            },
            latency_ms: row.try_get(f[9])?,
            request_bytes: row.try_get(f[10])?,
            response_bytes: row.try_get(f[11])?,
            tokens_in: row.try_get(f[12])?,
            tokens_out: row.try_get(f[13])?,
            cost_nanos: row.try_get(f[14])?,
            cached: row.try_get(f[15])?,
            metadata,
            id,
        })
    }
}

/// `metadata` as stored: JSON text, NULL when empty.
pub(crate) fn metadata_json(e: &Event) -> Option<String> {
    (!e.metadata.is_empty())
        .then(|| serde_json::to_string(&e.metadata).unwrap_or_else(|_| "{}".to_string()))
}
