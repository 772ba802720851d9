//! Corrections and the restatement queue. The log stays append-only: a
//! correction is a row of `corrections`, the events it voided are rows of
//! `correction_events` (its history) and `voided_events` (the events voided
//! now, which every projection read skips), and the aggregate buckets it
//! changes are rows of `restatements` until a restatement redoes them. All of
//! it is written in one transaction, so a crash leaves either nothing or the
//! whole correction with its pending restatements.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, DurationRound, Utc};

use super::alerts::{from_ms, ms};
use super::db::{Arg, Db, Row, Sql, Tx};
use super::log::NOT_VOIDED;
use super::StoreError;

/// Most ids a correction by ids may list.
pub const MAX_VOID_IDS: usize = 10_000;

/// Ids looked up per statement.
const ID_CHUNK: usize = 1_000;

/// Voided hours closer than this are restated as one range.
const MERGE_GAP_HOURS: i64 = 6;

/// What a correction voids.
#[derive(Debug, Clone, PartialEq)]
pub enum VoidTarget {
    /// These event ids (distinct).
    Ids(Vec<String>),
    /// One key's events with `ts` in `[from, to)`, optionally narrowed.
    Range {
        /// The key.
        key: String,
        /// Start of event time (inclusive).
        from: DateTime<Utc>,
        /// End of event time (exclusive).
        to: DateTime<Utc>,
        /// Only these apis (empty: any).
        apis: Vec<String>,
        /// Only these models (empty: any).
        models: Vec<String>,
    },
}

/// A correction to record.
#[derive(Debug, Clone)]
pub struct NewCorrection<'a> {
    /// The caller's id (idempotency key).
    pub id: &'a str,
    /// Why.
    pub reason: &'a str,
    /// The request in canonical form: the same id with another request is a conflict.
    pub request: &'a str,
    /// Who.
    pub actor: &'a str,
    /// What it voids.
    pub target: &'a VoidTarget,
    /// Projections whose buckets it changes (every loaded one).
    pub projections: &'a [String],
}

/// A stored correction.
#[derive(Debug, Clone, PartialEq)]
pub struct CorrectionRow {
    /// Its id.
    pub id: String,
    /// Why.
    pub reason: String,
    /// The request as recorded (canonical JSON).
    pub request: String,
    /// Events it voided.
    pub voided: i64,
    /// Events it matched that were voided already (by another correction).
    pub already_voided: i64,
    /// Ids it listed that no stored event has.
    pub not_found: Vec<String>,
    /// Who made it.
    pub actor: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When it was reverted.
    pub reverted_at: Option<DateTime<Utc>>,
    /// Who reverted it.
    pub reverted_by: Option<String>,
    /// Why it was reverted.
    pub revert_reason: Option<String>,
}

/// What [`Corrections::record`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// Recorded now.
    New(CorrectionRow),
    /// The same id with the same request was recorded before: its answer.
    Same(CorrectionRow),
    /// The same id was recorded with another request.
    Conflict(CorrectionRow),
}

/// What [`Corrections::revert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reverted {
    /// Reverted now.
    Done(CorrectionRow),
    /// Reverted before.
    Already(CorrectionRow),
    /// No such correction.
    NotFound,
}

/// A pending restatement: recompute `projection`'s buckets that overlap
/// `[from, to)` of event time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restatement {
    /// Queue id.
    pub id: i64,
    /// The projection.
    pub projection: String,
    /// Start of the event-time range.
    pub from: DateTime<Utc>,
    /// End of the event-time range.
    pub to: DateTime<Utc>,
    /// What asked for it (`correction:<id>`, `revert:<id>`).
    pub cause: String,
    /// Which groups it may narrow itself to.
    pub scope: Scope,
}

/// The aggregate rows a restatement must recompute within its range: only
/// those whose groups can hold a changed event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    /// Every row of the range.
    #[default]
    All,
    /// The groups of this correction's events (voided or brought back).
    Correction(String),
    /// The groups of these models' events (a price change).
    Models(Vec<String>),
}

impl Scope {
    /// The `restatements.scope` text.
    pub(crate) fn to_column(&self) -> Option<String> {
        match self {
            Scope::All => None,
            Scope::Correction(id) => Some(serde_json::json!({ "correction": id }).to_string()),
            Scope::Models(m) => Some(serde_json::json!({ "models": m }).to_string()),
        }
    }

    /// Reads `restatements.scope`; anything unreadable restates whole buckets.
    pub(crate) fn from_column(text: Option<&str>) -> Self {
        let Some(v) = text.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok()) else {
            return Scope::All;
        };
        if let Some(id) = v["correction"].as_str() {
            return Scope::Correction(id.to_string());
        }
        match v["models"].as_array() {
            Some(m) => Scope::Models(
                m.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
            ),
            None => Scope::All,
        }
    }
}

const COLUMNS: &str = "id, reason, request, voided, already_voided, not_found, actor, \
     created_at_ms, reverted_at_ms, reverted_by, revert_reason";

fn correction_from_row(r: &Row) -> Result<CorrectionRow, StoreError> {
    let not_found: String = r.get("not_found")?;
    Ok(CorrectionRow {
        id: r.get("id")?,
        reason: r.get("reason")?,
        request: r.get("request")?,
        voided: r.get("voided")?,
        already_voided: r.get("already_voided")?,
        not_found: serde_json::from_str(&not_found).unwrap_or_default(),
        actor: r.get("actor")?,
        created_at: from_ms(r.get("created_at_ms")?),
        reverted_at: r.get::<Option<i64>, _>("reverted_at_ms")?.map(from_ms),
        reverted_by: r.get("reverted_by")?,
        revert_reason: r.get("revert_reason")?,
    })
}

/// The `corrections`, `correction_events`, `voided_events` and `restatements` tables.
#[derive(Debug, Clone)]
pub struct Corrections {
    db: Db,
}

impl Corrections {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }

    /// Records a correction: voids the events it names that are stored and
    /// not voided yet, and queues the restatement of every projection over
    /// the hours those events lie in. Idempotent by id.
    pub async fn record(&self, c: &NewCorrection<'_>) -> Result<Recorded, StoreError> {
        let mut tx = self.db.begin().await?;
        if let Some(row) = find(&self.db, &mut tx, c.id).await? {
            tx.rollback().await?;
            return Ok(match row.request == c.request {
                true => Recorded::Same(row),
                false => Recorded::Conflict(row),
            });
        }
        let now = Utc::now();
        let inserted = tx
            .execute(
                Sql::new(
                    "INSERT INTO corrections (id, reason, request, actor, created_at_ms) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(c.id)
                .bind(c.reason)
                .bind(c.request)
                .bind(c.actor)
                .bind(ms(now)),
            )
            .await;
        match inserted {
            Ok(_) => {}
            // The same id recorded by a concurrent request (PostgreSQL; SQLite's
            // write lock serialises the two): answer as for a repeat.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                tx.rollback().await?;
                let row = self.get(c.id).await?.ok_or_else(|| vanished(c.id))?;
                return Ok(match row.request == c.request {
                    true => Recorded::Same(row),
                    false => Recorded::Conflict(row),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let (mut voided, mut already, mut not_found) = (0u64, 0i64, Vec::new());
        match c.target {
            VoidTarget::Ids(ids) => {
                for chunk in ids.chunks(ID_CHUNK) {
                    let list: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    let found = tx
                        .fetch_all(
                            Sql::new(format!(
                                "SELECT id FROM usage_events WHERE {}",
                                self.db.one_of("id", "$1")
                            ))
                            .bind(Arg::List(list.clone())),
                        )
                        .await?;
                    let found: BTreeSet<String> = found
                        .iter()
                        .map(|r| r.get::<String, _>("id"))
                        .collect::<Result<_, _>>()?;
                    not_found.extend(chunk.iter().filter(|i| !found.contains(*i)).cloned());
                    let n = tx
                        .execute(
                            Sql::new(format!(
                                "INSERT INTO correction_events (correction_id, event_id, ts) \
                                 SELECT $2, id, ts FROM usage_events WHERE {} AND {NOT_VOIDED}",
                                self.db.one_of("id", "$1")
                            ))
                            .bind(Arg::List(list))
                            .bind(c.id),
                        )
                        .await?;
                    voided += n;
                    already += found.len() as i64 - n as i64;
                }
            }
            VoidTarget::Range {
                key,
                from,
                to,
                apis,
                models,
            } => {
                // Placeholders: $1 key, $2 from, $3 to, then the lists
                // given, then (for the insert) the correction id.
                // The key's rows are found in the `ts` index alone, which
                // carries `key` (schema 0008), and only they are fetched.
                let mut cond = "seq IN (SELECT seq FROM usage_events \
                     WHERE ts >= $2 AND ts < $3 AND key = $1)"
                    .to_string();
                let (key, from, to) = (key.as_str(), *from, *to);
                let mut next = 4;
                let mut lists: Vec<Vec<&str>> = Vec::new();
                for (column, values) in [("api", apis), ("model", models)] {
                    if !values.is_empty() {
                        cond.push_str(&format!(
                            " AND {}",
                            self.db.one_of(column, &format!("${next}"))
                        ));
                        lists.push(values.iter().map(String::as_str).collect());
                        next += 1;
                    }
                }
                let bind = |sql: String| {
                    let mut q = Sql::new(sql).bind(key).bind(from).bind(to);
                    for l in &lists {
                        q = q.bind(Arg::List(l.clone()));
                    }
                    q
                };
                let sql = format!(
                    "SELECT count(*) AS n FROM usage_events WHERE {cond} AND NOT {NOT_VOIDED}"
                );
                already = tx.fetch_one(bind(sql)).await?.get("n")?;
                voided = tx
                    .execute(
                        bind(format!(
                            "INSERT INTO correction_events (correction_id, event_id, ts) \
                             SELECT ${next}, id, ts FROM usage_events WHERE {cond} AND {NOT_VOIDED}"
                        ))
                        .bind(c.id),
                    )
                    .await?;
            }
        }
        let event_tx = match self.db {
            Db::Postgres(_) => super::postgres::EVENT_TX,
            Db::Sqlite(_) => super::sqlite::EVENT_TX,
        };
        tx.execute(
            Sql::new(format!(
                "INSERT INTO voided_events (event_id, correction_id, event_tx, event_seq, voided_at_ms) \
                 SELECT c.event_id, c.correction_id, {event_tx}, e.seq, $2 \
                 FROM correction_events c JOIN usage_events e ON e.id = c.event_id \
                 WHERE c.correction_id = $1"
            ))
            .bind(c.id)
            .bind(ms(now)),
        )
        .await?;
        let not_found_json = serde_json::to_string(&not_found).unwrap_or_else(|_| "[]".into());
        tx.execute(
            Sql::new(
                "UPDATE corrections SET voided = $2, already_voided = $3, not_found = $4 WHERE id = $1",
            )
            .bind(c.id)
            .bind(i64::try_from(voided).unwrap_or(i64::MAX))
            .bind(already)
            .bind(not_found_json.as_str()),
        )
        .await?;
        queue(
            &mut tx,
            c.id,
            c.projections,
            &format!("correction:{}", c.id),
            now,
        )
        .await?;
        let row = find(&self.db, &mut tx, c.id)
            .await?
            .ok_or_else(|| vanished(c.id))?;
        tx.commit().await?;
        Ok(Recorded::New(row))
    }

    /// Reverts a correction: its events count again (unless another
    /// correction voids them), and the same buckets are restated.
    pub async fn revert(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        projections: &[String],
    ) -> Result<Reverted, StoreError> {
        let mut tx = self.db.begin().await?;
        let Some(row) = find(&self.db, &mut tx, id).await? else {
            tx.rollback().await?;
            return Ok(Reverted::NotFound);
        };
        if row.reverted_at.is_some() {
            tx.rollback().await?;
            return Ok(Reverted::Already(row));
        }
        let now = Utc::now();
        tx.execute(Sql::new("DELETE FROM voided_events WHERE correction_id = $1").bind(id))
            .await?;
        tx.execute(
            Sql::new(
                "UPDATE corrections SET reverted_at_ms = $2, reverted_by = $3, revert_reason = $4 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(ms(now))
            .bind(actor)
            .bind(reason),
        )
        .await?;
        queue(&mut tx, id, projections, &format!("revert:{id}"), now).await?;
        let row = find(&self.db, &mut tx, id)
            .await?
            .ok_or_else(|| vanished(id))?;
        tx.commit().await?;
        Ok(Reverted::Done(row))
    }

    /// One correction.
    pub async fn get(&self, id: &str) -> Result<Option<CorrectionRow>, StoreError> {
        let row = self
            .db
            .reader()
            .fetch_optional(
                Sql::new(format!("SELECT {COLUMNS} FROM corrections WHERE id = $1")).bind(id),
            )
            .await?;
        row.as_ref().map(correction_from_row).transpose()
    }

    /// The newest corrections first.
    pub async fn list(&self, limit: i64) -> Result<Vec<CorrectionRow>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(
                Sql::new(format!(
                    "SELECT {COLUMNS} FROM corrections ORDER BY created_at_ms DESC, id LIMIT $1"
                ))
                .bind(limit),
            )
            .await?;
        rows.iter().map(correction_from_row).collect()
    }

    /// The ids a correction voided (its history, kept after a revert).
    pub async fn events_of(&self, id: &str, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(
                Sql::new(
                    "SELECT event_id FROM correction_events WHERE correction_id = $1 \
                     ORDER BY event_id LIMIT $2",
                )
                .bind(id)
                .bind(limit),
            )
            .await?;
        rows.iter()
            .map(|r| Ok(r.get::<String, _>("event_id")?))
            .collect()
    }

    /// Pending restatements, oldest first.
    pub async fn pending(&self, limit: i64) -> Result<Vec<Restatement>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(
                Sql::new(
                    "SELECT id, projection, from_ms, to_ms, cause, scope FROM restatements ORDER BY id LIMIT $1",
                )
                .bind(limit),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Restatement {
                    id: r.get("id")?,
                    projection: r.get("projection")?,
                    from: from_ms(r.get("from_ms")?),
                    to: from_ms(r.get("to_ms")?),
                    cause: r.get("cause")?,
                    scope: Scope::from_column(r.get::<Option<String>, _>("scope")?.as_deref()),
                })
            })
            .collect()
    }

    /// Drops a queued restatement that has nothing to do (its projection has
    /// no checkpoint yet; it will fold everything when it starts).
    pub async fn done(&self, id: i64) -> Result<(), StoreError> {
        self.db
            .writer()
            .execute(Sql::new("DELETE FROM restatements WHERE id = $1").bind(id))
            .await?;
        Ok(())
    }

    /// Pending restatements per projection.
    pub async fn pending_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(Sql::new(
                "SELECT projection, count(*) AS n FROM restatements GROUP BY projection",
            ))
            .await?;
        rows.iter()
            .map(|r| Ok((r.get("projection")?, r.get("n")?)))
            .collect()
    }
}

/// A correction row read back in the transaction that wrote it is missing.
fn vanished(id: &str) -> StoreError {
    StoreError::CorruptRow {
        id: id.to_string(),
        reason: "the correction row written in this transaction cannot be read back".into(),
    }
}

async fn find(db: &Db, tx: &mut Tx, id: &str) -> Result<Option<CorrectionRow>, StoreError> {
    let row = tx
        .fetch_optional(
            Sql::new(format!(
                "SELECT {COLUMNS} FROM corrections WHERE id = $1{}",
                db.for_update()
            ))
            .bind(id),
        )
        .await?;
    row.as_ref().map(correction_from_row).transpose()
}

/// Queues the restatement of `projections` over the hours of the events
/// `correction` lists (merged when close), inside its transaction.
async fn queue(
    tx: &mut Tx,
    correction: &str,
    projections: &[String],
    cause: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let rows = tx
        .fetch_all(
            Sql::new("SELECT ts FROM correction_events WHERE correction_id = $1").bind(correction),
        )
        .await?;
    let mut hours = BTreeSet::new();
    for r in &rows {
        let ts = r.time("ts")?;
        let hour = ts
            .duration_trunc(Duration::hours(1))
            .map_err(|e| StoreError::CorruptRow {
                id: correction.to_string(),
                reason: format!("hour of {ts}: {e}"),
            })?;
        hours.insert(hour);
    }
    let scope = Scope::Correction(correction.to_string());
    queue_ranges(tx, projections, &merge_hours(&hours), cause, &scope, now).await
}

/// Queues the restatement of each of `projections` over each range.
pub(crate) async fn queue_ranges(
    tx: &mut Tx,
    projections: &[String],
    ranges: &[(DateTime<Utc>, DateTime<Utc>)],
    cause: &str,
    scope: &Scope,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let scope = scope.to_column();
    for &(from, to) in ranges {
        for p in projections {
            tx.execute(
                Sql::new(
                    "INSERT INTO restatements (projection, from_ms, to_ms, cause, created_at_ms, scope) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(p.as_str())
                .bind(ms(from))
                .bind(ms(to))
                .bind(cause)
                .bind(ms(now))
                .bind(scope.clone()),
            )
            .await?;
        }
    }
    Ok(())
}

/// Hour starts as ranges of whole hours, joining those less than
/// [`MERGE_GAP_HOURS`] apart.
pub(crate) fn merge_hours(hours: &BTreeSet<DateTime<Utc>>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut out: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for &h in hours {
        let end = h + Duration::hours(1);
        match out.last_mut() {
            Some((_, to)) if h - *to < Duration::hours(MERGE_GAP_HOURS) => *to = end,
            _ => out.push((h, end)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn close_hours_are_restated_as_one_range_and_far_ones_apart() {
        let hours: BTreeSet<_> = [
            "2026-11-01T10:00:00Z",
            "2026-11-01T11:00:00Z",
            "2026-11-01T14:00:00Z",
            "2026-11-03T00:00:00Z",
        ]
        .into_iter()
        .map(t)
        .collect();
        assert_eq!(
            merge_hours(&hours),
            vec![
                (t("2026-11-01T10:00:00Z"), t("2026-11-01T15:00:00Z")),
                (t("2026-11-03T00:00:00Z"), t("2026-11-03T01:00:00Z")),
            ]
        );
    }
}
