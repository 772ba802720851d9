//! The price catalog's tables: `prices` and its audit trail `price_audit`.
//!
//! Every change runs in one transaction that also (1) bumps the generation
//! of every projection checkpoint, so a projector batch priced with the old
//! catalog is refused by its compare-and-set and re-read with the new one,
//! and (2) queues the restatement of the event-time ranges the change
//! reprices, clamped to the span of the log. The generation bump comes
//! first: it waits for a fold in flight to commit, so the log span read
//! after it includes every event that fold priced the old way.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, TimeZone, Utc};

use super::alerts::{audit_from_row, from_ms, ms, AuditRow};
use super::corrections::Scope;
use super::db::{Db, Row, Sql, Tx};
use super::StoreError;
use crate::aggregate::price::{Catalog, Price};
use crate::event::cost::format_nanos_short;

/// Moves every checkpoint's generation: a fold priced before it is refused.
const BUMP_GENERATIONS: &str = "UPDATE projection_checkpoints SET generation = generation + 1";

/// [`BUMP_GENERATIONS`] on its own, where the checkpoints are written.
pub(crate) async fn bump_generations(db: &Db) -> Result<(), StoreError> {
    db.derived_writer()
        .execute(Sql::new(BUMP_GENERATIONS))
        .await?;
    Ok(())
}

/// A validated price to store: `id` given updates (or creates) that price;
/// without one, the price with the same (api, model, effective_from) is
/// updated, or a new one is created.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPrice {
    /// The caller's id, if any.
    pub id: Option<String>,
    /// The price.
    pub price: Price,
}

/// A stored price.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceRow {
    /// Its id.
    pub id: String,
    /// The price.
    pub price: Price,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// By whom.
    pub updated_by: String,
}

/// What a put did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PutDone {
    /// The id of each price sent, in order.
    pub ids: Vec<String>,
    /// Created.
    pub created: usize,
    /// Changed.
    pub updated: usize,
    /// Sent as stored.
    pub unchanged: usize,
    /// Restatements queued.
    pub restatements: usize,
}

/// The outcome of a put.
#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    /// Written (or nothing to write).
    Done(PutDone),
    /// Refused, nothing written: the message says what to fix.
    Invalid(String),
}

/// Restatement ranges are queued in pieces of at most one UTC month, so no
/// restatement transaction spans more than a month of events.
fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(t)
}

fn next_month(t: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Merges overlapping ranges and cuts them at UTC month starts.
pub(crate) fn month_pieces(
    mut ranges: Vec<(DateTime<Utc>, DateTime<Utc>)>,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    ranges.retain(|(a, b)| a < b);
    ranges.sort();
    let mut merged: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some((_, to)) if a <= *to => *to = (*to).max(b),
            _ => merged.push((a, b)),
        }
    }
    let mut out = Vec::new();
    for (mut a, b) in merged {
        while a < b {
            let cut = next_month(month_start(a)).min(b);
            out.push((a, cut));
            a = cut;
        }
    }
    out
}

fn price_from_row(r: &Row) -> Result<PriceRow, StoreError> {
    let us: i64 = r.get("effective_from_us")?;
    Ok(PriceRow {
        id: r.get("id")?,
        price: Price {
            api: r.get("api")?,
            model: r.get("model")?,
            effective_from: DateTime::from_timestamp_micros(us).unwrap_or_default(),
            input: r.get("input_nanos")?,
            output: r.get("output_nanos")?,
            cached_input: r.get("cached_input_nanos")?,
            per_request: r.get("per_request_nanos")?,
        },
        created_at: from_ms(r.get("created_at_ms")?),
        updated_at: from_ms(r.get("updated_at_ms")?),
        updated_by: r.get("updated_by")?,
    })
}

const COLUMNS: &str = "id, api, model, effective_from_us, input_nanos, output_nanos, \
     cached_input_nanos, per_request_nanos, created_at_ms, updated_at_ms, updated_by";

/// The audit JSON of a price (amounts as exact decimals).
fn audit_json(id: &str, p: &Price) -> String {
    serde_json::json!({
        "id": id,
        "api": (!p.api.is_empty()).then_some(&p.api),
        "model": p.model,
        "effective_from": rfc3339(p.effective_from),
        "input_per_mtok": format_nanos_short(p.input),
        "output_per_mtok": format_nanos_short(p.output),
        "cached_input_per_mtok": p.cached_input.map(format_nanos_short),
        "per_request": p.per_request.map(format_nanos_short),
    })
    .to_string()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn same_key(a: &Price, b: &Price) -> bool {
    a.api == b.api && a.model == b.model && a.effective_from == b.effective_from
}

/// `[from, next effective_from of the same (api, model))` of `p` among `all`.
fn effective_range(all: &[PriceRow], p: &Price) -> (DateTime<Utc>, DateTime<Utc>) {
    let to = all
        .iter()
        .filter(|r| r.price.api == p.api && r.price.model == p.model)
        .map(|r| r.price.effective_from)
        .filter(|t| *t > p.effective_from)
        .min()
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    (p.effective_from, to)
}

/// The `prices` and `price_audit` tables.
#[derive(Debug, Clone)]
pub struct Prices {
    db: Db,
}

impl Prices {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }

    /// Every stored price, by (model, api, effective_from).
    pub async fn list(&self) -> Result<Vec<PriceRow>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(Sql::new(format!(
                "SELECT {COLUMNS} FROM prices ORDER BY model, api, effective_from_us"
            )))
            .await?;
        rows.iter().map(price_from_row).collect()
    }

    /// The catalog stored now.
    pub async fn catalog(&self) -> Result<Catalog, StoreError> {
        Ok(Catalog::new(
            self.list().await?.into_iter().map(|r| r.price),
        ))
    }

    /// The catalog as seen inside `tx` (a restatement prices with it).
    pub(crate) async fn catalog_in(tx: &mut Tx) -> Result<Catalog, StoreError> {
        let rows = tx
            .fetch_all(Sql::new(format!("SELECT {COLUMNS} FROM prices")))
            .await?;
        let rows = rows
            .iter()
            .map(price_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Catalog::new(rows.into_iter().map(|r| r.price)))
    }

    /// Audit entries, newest first (`target`: one price id).
    pub async fn audit_log(
        &self,
        target: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let sql = match target {
            Some(t) => Sql::new(
                "SELECT id, at_ms, actor, action, target, before, after FROM price_audit \
                 WHERE target = $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(t)
            .bind(limit),
            None => Sql::new(
                "SELECT id, at_ms, actor, action, target, before, after FROM price_audit \
                 ORDER BY id DESC LIMIT $1",
            )
            .bind(limit),
        };
        let rows = self.db.reader().fetch_all(sql).await?;
        Ok(rows.iter().map(audit_from_row).collect::<Result<_, _>>()?)
    }

    /// Opens a catalog change: serialises it with other changes, bumps every
    /// checkpoint's generation and reads the stored prices.
    ///
    /// SQLite keeps the checkpoints in the aggregates file, which a main
    /// file transaction cannot write: they are bumped there before it (which
    /// waits for a fold in flight, as the bump in the transaction does on
    /// PostgreSQL) and again after its commit ([`Prices::committed`]), so a
    /// fold that reloaded the old catalog between the two fails its
    /// compare-and-set. A crash between the commit and the second bump
    /// restarts every projector, which loads the catalog anew.
    async fn begin(&self) -> Result<(Tx, Vec<PriceRow>), StoreError> {
        if let Db::Sqlite(_) = self.db {
            bump_generations(&self.db).await?;
        }
        let mut tx = self.db.begin().await?;
        if let Tx::Postgres(t) = &mut tx {
            sqlx::query("LOCK TABLE prices IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut **t)
                .await?;
            tx.execute(Sql::new(BUMP_GENERATIONS)).await?;
        }
        let rows = tx
            .fetch_all(Sql::new(format!("SELECT {COLUMNS} FROM prices")))
            .await?;
        let rows = rows
            .iter()
            .map(price_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((tx, rows))
    }

    /// Commits a catalog change (see [`Prices::begin`]).
    async fn committed(&self, tx: Tx) -> Result<(), StoreError> {
        tx.commit().await?;
        if let Db::Sqlite(_) = self.db {
            bump_generations(&self.db).await?;
        }
        Ok(())
    }

    /// Creates or updates prices, in one transaction, auditing each change
    /// and queueing the restatements they need.
    pub async fn put(&self, prices: &[NewPrice], actor: &str) -> Result<PutOutcome, StoreError> {
        let (mut tx, before) = self.begin().await?;
        let now = Utc::now();
        let mut rows = before.clone();
        let mut done = PutDone::default();
        let mut ranges = Vec::new();
        // (old version, new version) of every changed price, for the ranges.
        let mut changed: Vec<(Option<Price>, Price)> = Vec::new();
        for (i, new) in prices.iter().enumerate() {
            let at = if prices.len() > 1 {
                format!("prices[{i}]: ")
            } else {
                String::new()
            };
            let existing = match &new.id {
                Some(id) => rows.iter().position(|r| &r.id == id),
                None => rows.iter().position(|r| same_key(&r.price, &new.price)),
            };
            if let Some(other) = rows
                .iter()
                .enumerate()
                .find(|(j, r)| Some(*j) != existing && same_key(&r.price, &new.price))
            {
                tx.rollback().await?;
                return Ok(PutOutcome::Invalid(format!(
                    "{at}price `{}` already starts at {} for model `{}`{}: change that price (send its id) or pick another effective_from",
                    other.1.id,
                    rfc3339(new.price.effective_from),
                    new.price.model,
                    if new.price.api.is_empty() { String::new() } else { format!(" on api `{}`", new.price.api) }
                )));
            }
            match existing {
                Some(j) if rows[j].price == new.price => {
                    done.unchanged += 1;
                    done.ids.push(rows[j].id.clone());
                }
                Some(j) => {
                    let old = rows[j].clone();
                    tx.execute(
                        bind_price(
                            Sql::new(
                                "UPDATE prices SET api = $2, model = $3, effective_from_us = $4, \
                                 input_nanos = $5, output_nanos = $6, cached_input_nanos = $7, \
                                 per_request_nanos = $8, updated_at_ms = $9, updated_by = $10 \
                                 WHERE id = $1",
                            )
                            .bind(old.id.as_str()),
                            &new.price,
                        )
                        .bind(ms(now))
                        .bind(actor),
                    )
                    .await?;
                    tx.execute(audit(
                        now,
                        actor,
                        "price.update",
                        &old.id,
                        Some(audit_json(&old.id, &old.price)),
                        Some(audit_json(&old.id, &new.price)),
                    ))
                    .await?;
                    rows[j].price = new.price.clone();
                    rows[j].updated_at = now;
                    rows[j].updated_by = actor.to_string();
                    changed.push((Some(old.price), new.price.clone()));
                    done.updated += 1;
                    done.ids.push(old.id);
                }
                None => {
                    let id = new
                        .id
                        .clone()
                        .unwrap_or_else(|| format!("prc_{}", super::alerts::new_uid()));
                    tx.execute(
                        bind_price(
                            Sql::new(format!(
                                "INSERT INTO prices ({COLUMNS}) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)"
                            ))
                            .bind(id.as_str()),
                            &new.price,
                        )
                        .bind(ms(now))
                        .bind(actor),
                    )
                    .await?;
                    tx.execute(audit(
                        now,
                        actor,
                        "price.create",
                        &id,
                        None,
                        Some(audit_json(&id, &new.price)),
                    ))
                    .await?;
                    rows.push(PriceRow {
                        id: id.clone(),
                        price: new.price.clone(),
                        created_at: now,
                        updated_at: now,
                        updated_by: actor.to_string(),
                    });
                    changed.push((None, new.price.clone()));
                    done.created += 1;
                    done.ids.push(id);
                }
            }
        }
        if changed.is_empty() {
            // Nothing changed: the generation bump is undone with the rest.
            tx.rollback().await?;
            return Ok(PutOutcome::Done(done));
        }
        for (old, new) in &changed {
            if let Some(old) = old {
                ranges.push(effective_range(&before, old));
            }
            ranges.push(effective_range(&rows, new));
        }
        let models: BTreeSet<String> = changed
            .iter()
            .flat_map(|(o, n)| o.iter().chain([n]).map(|p| p.model.clone()))
            .collect();
        let scope = scoped(models);
        done.restatements = queue_repricing(&mut tx, ranges, "price change", &scope, now).await?;
        self.committed(tx).await?;
        Ok(PutOutcome::Done(done))
    }

    /// Deletes a price; `None` when there is none. Returns the restatements queued.
    pub async fn delete(&self, id: &str, actor: &str) -> Result<Option<usize>, StoreError> {
        let (mut tx, before) = self.begin().await?;
        let Some(old) = before.iter().find(|r| r.id == id).cloned() else {
            tx.rollback().await?;
            return Ok(None);
        };
        let now = Utc::now();
        tx.execute(Sql::new("DELETE FROM prices WHERE id = $1").bind(id))
            .await?;
        tx.execute(audit(
            now,
            actor,
            "price.delete",
            id,
            Some(audit_json(id, &old.price)),
            None,
        ))
        .await?;
        let range = effective_range(&before, &old.price);
        let scope = scoped([old.price.model.clone()].into());
        let n = queue_repricing(
            &mut tx,
            vec![range],
            &format!("price delete:{id}"),
            &scope,
            now,
        )
        .await?;
        self.committed(tx).await?;
        Ok(Some(n))
    }

    /// Queues the restatement of `[from, end of the log]` (audited as
    /// `price.reprice`). Returns the restatements queued.
    pub async fn reprice(
        &self,
        from: DateTime<Utc>,
        model: Option<&str>,
        actor: &str,
    ) -> Result<usize, StoreError> {
        let (mut tx, _) = self.begin().await?;
        let now = Utc::now();
        let detail = serde_json::json!({ "from": rfc3339(from), "model": model }).to_string();
        tx.execute(audit(
            now,
            actor,
            "price.reprice",
            model.unwrap_or("*"),
            None,
            Some(detail),
        ))
        .await?;
        let cause = match model {
            Some(m) => format!("reprice model {m}"),
            None => "reprice".to_string(),
        };
        let scope = match model {
            Some(m) => scoped([m.to_string()].into()),
            None => Scope::All,
        };
        let n = queue_repricing(
            &mut tx,
            vec![(from, DateTime::<Utc>::MAX_UTC)],
            &cause,
            &scope,
            now,
        )
        .await?;
        self.committed(tx).await?;
        Ok(n)
    }
}

fn bind_price<'a>(q: Sql<'a>, p: &'a Price) -> Sql<'a> {
    q.bind(p.api.as_str())
        .bind(p.model.as_str())
        .bind(p.effective_from.timestamp_micros())
        .bind(p.input)
        .bind(p.output)
        .bind(p.cached_input)
        .bind(p.per_request)
}

fn audit<'a>(
    at: DateTime<Utc>,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    before: Option<String>,
    after: Option<String>,
) -> Sql<'a> {
    Sql::new(
        "INSERT INTO price_audit (at_ms, actor, action, target, before, after) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(ms(at))
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(before)
    .bind(after)
}

/// Queues, inside a catalog change, the restatement of every projection
/// over `ranges` (see [`queue_over_log`]). Returns the rows queued.
async fn queue_repricing(
    tx: &mut Tx,
    ranges: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    cause: &str,
    scope: &Scope,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let names: BTreeSet<String> = tx
        .fetch_all(Sql::new("SELECT name FROM projection_checkpoints"))
        .await?
        .iter()
        .map(|r| r.get::<String, _>("name"))
        .collect::<Result<_, _>>()?;
    // A rebuild's shadow tables are restated with their live projection.
    let names: Vec<String> = names.into_iter().filter(|n| !n.contains('~')).collect();
    queue_over_log(tx, &names, ranges, cause, scope, now).await
}

/// Most models a repricing narrows itself to; more restate whole buckets.
const MAX_SCOPED_MODELS: usize = 100;

fn scoped(models: BTreeSet<String>) -> Scope {
    if models.len() > MAX_SCOPED_MODELS {
        Scope::All
    } else {
        Scope::Models(models.into_iter().collect())
    }
}

/// Queues the restatement of `projections` over `ranges` clamped to the
/// log's event-time span (whole hours), in month pieces; nothing when the
/// log is empty. Returns the rows queued.
pub(crate) async fn queue_over_log(
    tx: &mut Tx,
    projections: &[String],
    ranges: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    cause: &str,
    scope: &Scope,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let span = tx
        .fetch_one(Sql::new(
            "SELECT min(ts) AS lo, max(ts) AS hi FROM usage_events",
        ))
        .await?;
    let (Some(lo), Some(hi)) = (span.opt_time("lo")?, span.opt_time("hi")?) else {
        return Ok(0);
    };
    let hour = chrono::Duration::hours(1);
    let lo = chrono::DurationRound::duration_trunc(lo, hour).unwrap_or(lo);
    let hi = chrono::DurationRound::duration_trunc(hi, hour).unwrap_or(hi) + hour;
    let clamped: Vec<_> = ranges
        .into_iter()
        .map(|(a, b)| (a.max(lo), b.min(hi)))
        .collect();
    let pieces = month_pieces(clamped);
    super::corrections::queue_ranges(tx, projections, &pieces, cause, scope, now).await?;
    Ok(pieces.len() * projections.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid")
            .with_timezone(&Utc)
    }

    #[test]
    fn ranges_merge_and_split_at_month_starts() {
        let got = month_pieces(vec![
            (t("2026-01-20T00:00:00Z"), t("2026-02-10T00:00:00Z")),
            (t("2026-02-05T00:00:00Z"), t("2026-02-12T00:00:00Z")),
            (t("2026-04-01T00:00:00Z"), t("2026-04-01T00:00:00Z")),
            (t("2026-12-31T00:00:00Z"), t("2027-01-01T05:00:00Z")),
        ]);
        assert_eq!(
            got,
            vec![
                (t("2026-01-20T00:00:00Z"), t("2026-02-01T00:00:00Z")),
                (t("2026-02-01T00:00:00Z"), t("2026-02-12T00:00:00Z")),
                (t("2026-12-31T00:00:00Z"), t("2027-01-01T00:00:00Z")),
                (t("2027-01-01T00:00:00Z"), t("2027-01-01T05:00:00Z")),
            ]
        );
    }
}
