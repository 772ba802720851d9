//! The alert and token tables as one value, for `tally copy` between
//! deployments; the prices and corrections ([`LedgerSnapshot`]) for export,
//! import and copy.

use super::alerts::{
    audit, bind_instance, ms, notification_from_row, AuditRow, InstanceRow, NotificationRow,
    QuotaRow, RuleRow, OUTBOX_COLUMNS,
};
use super::db::Sql;
use super::tokens::{TokenRow, TOKEN_COLUMNS};
use super::{Store, StoreError};

/// Everything of the alert tables, for `tally copy`.
#[derive(Debug, Clone, Default)]
pub struct AlertSnapshot {
    /// `alert_rules`.
    pub rules: Vec<RuleRow>,
    /// `key_quotas`.
    pub quotas: Vec<QuotaRow>,
    /// `alert_instances`.
    pub instances: Vec<InstanceRow>,
    /// `alert_outbox` (history and unsent notifications).
    pub outbox: Vec<NotificationRow>,
    /// `alert_audit`, oldest first.
    pub audit: Vec<AuditRow>,
    /// `api_tokens`, revoked ones included.
    pub tokens: Vec<TokenRow>,
}

impl AlertSnapshot {
    /// Rows in all tables.
    pub fn rows(&self) -> usize {
        self.rules.len()
            + self.quotas.len()
            + self.instances.len()
            + self.outbox.len()
            + self.audit.len()
            + self.tokens.len()
    }
}

impl Store {
    /// Every row of the alert and token tables.
    pub async fn alert_state(&self) -> Result<AlertSnapshot, StoreError> {
        let outbox = Sql::new(format!(
            "SELECT {OUTBOX_COLUMNS} FROM alert_outbox ORDER BY id"
        ));
        let outbox = self
            .db
            .reader()
            .read_all(outbox, notification_from_row)
            .await?;
        let mut audit = self.alerts().audit_log(None, i64::MAX).await?;
        audit.reverse();
        Ok(AlertSnapshot {
            rules: self.alerts().alert_rules().await?,
            quotas: self.alerts().quotas().await?,
            instances: self.alerts().alert_instances().await?,
            outbox,
            audit,
            tokens: self.tokens().list().await?,
        })
    }

    /// Writes a snapshot into empty alert and token tables, in one transaction.
    pub async fn restore_alert_state(&self, s: &AlertSnapshot) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        for r in &s.rules {
            tx.execute(
                Sql::new(
                    "INSERT INTO alert_rules (name, uid, spec, version, created_at_ms, updated_at_ms, updated_by) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&r.name)
                .bind(&r.uid)
                .bind(&r.spec)
                .bind(r.version)
                .bind(ms(r.created_at))
                .bind(ms(r.updated_at))
                .bind(&r.updated_by),
            )
            .await?;
        }
        for q in &s.quotas {
            tx.execute(
                Sql::new(
                    "INSERT INTO key_quotas (key, uid, spec, updated_at_ms, updated_by) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&q.key)
                .bind(&q.uid)
                .bind(&q.spec)
                .bind(ms(q.updated_at))
                .bind(&q.updated_by),
            )
            .await?;
        }
        for i in &s.instances {
            let q = Sql::new(
                "INSERT INTO alert_instances (fingerprint, rule, rule_uid, level, grp, severity, state, \
                 value, threshold, active_since_ms, firing_since_ms, last_true_ms, last_sent_ms, \
                 resolved_at_ms, sequence, version, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            );
            tx.execute(
                bind_instance(q.bind(&i.fingerprint), i)
                    .bind(i.version)
                    .bind(ms(i.updated_at)),
            )
            .await?;
        }
        // Outbox and audit rows get new ids in their old order: ids
        // only order rows, and identity columns refuse explicit values.
        for o in &s.outbox {
            tx.execute(
                Sql::new(
                    "INSERT INTO alert_outbox (fingerprint, sequence, rule, state, severity, subject, payload, created_at_ms, sent_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&o.n.fingerprint)
                .bind(o.n.sequence)
                .bind(&o.n.rule)
                .bind(o.n.state.as_str())
                .bind(&o.n.severity)
                .bind(&o.n.subject)
                .bind(&o.n.payload)
                .bind(ms(o.n.created_at))
                .bind(o.sent_at.map(ms)),
            )
            .await?;
        }
        for a in &s.audit {
            tx.execute(audit(
                ms(a.at),
                &a.actor,
                &a.action,
                &a.target,
                a.before.clone(),
                a.after.clone(),
            ))
            .await?;
        }
        for t in &s.tokens {
            tx.execute(
                Sql::new(format!(
                    "INSERT INTO api_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                ))
                .bind(&t.id)
                .bind(&t.name)
                .bind(&t.scopes)
                .bind(&t.token_sha256)
                .bind(ms(t.created_at))
                .bind(&t.created_by)
                .bind(t.revoked_at.map(ms)),
            )
            .await?;
        }
        tx.commit().await
    }
}

/// The price catalog, the corrections and their histories, for `tally
/// export` (a JSON file beside the events), `import` and `copy`: what makes
/// a restored deployment show the same numbers. Voided events are listed by
/// id: their log positions are found again in the target.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LedgerSnapshot {
    /// Format version of this file.
    pub version: u32,
    /// `prices` rows.
    pub prices: Vec<LedgerPrice>,
    /// `price_audit`, oldest first.
    pub price_audit: Vec<LedgerAudit>,
    /// `corrections` rows.
    pub corrections: Vec<LedgerCorrection>,
    /// `correction_events`: (correction id, event id, ts in RFC 3339).
    pub correction_events: Vec<(String, String, String)>,
    /// `voided_events`: (event id, correction id, voided at, Unix ms).
    pub voided: Vec<(String, String, i64)>,
}

/// A `prices` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct LedgerPrice {
    pub id: String,
    pub api: String,
    pub model: String,
    pub effective_from_us: i64,
    pub input_nanos: i64,
    pub output_nanos: i64,
    pub cached_input_nanos: Option<i64>,
    pub per_request_nanos: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub updated_by: String,
}

/// A `price_audit` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct LedgerAudit {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// A `corrections` row.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct LedgerCorrection {
    pub id: String,
    pub reason: String,
    pub request: String,
    pub voided: i64,
    pub already_voided: i64,
    pub not_found: String,
    pub actor: String,
    pub created_at_ms: i64,
    pub reverted_at_ms: Option<i64>,
    pub reverted_by: Option<String>,
    pub revert_reason: Option<String>,
}

/// What [`Store::restore_ledger`] added (rows already there are kept).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LedgerRestored {
    /// Prices added.
    pub prices: usize,
    /// Corrections added.
    pub corrections: usize,
    /// Events voided (whose event is in the log).
    pub voided: usize,
    /// Restatements queued for projections that exist already.
    pub restatements: usize,
}

impl Store {
    /// The price catalog and the corrections, with their histories.
    pub async fn ledger(&self) -> Result<LedgerSnapshot, StoreError> {
        let r = self.db.reader();
        let prices = r
            .read_all(
                Sql::new(
                    "SELECT id, api, model, effective_from_us, input_nanos, output_nanos, \
                     cached_input_nanos, per_request_nanos, created_at_ms, updated_at_ms, updated_by \
                     FROM prices ORDER BY id",
                ),
                |r| -> Result<_, sqlx::Error> {
                    Ok(LedgerPrice {
                        id: r.get("id")?,
                        api: r.get("api")?,
                        model: r.get("model")?,
                        effective_from_us: r.get("effective_from_us")?,
                        input_nanos: r.get("input_nanos")?,
                        output_nanos: r.get("output_nanos")?,
                        cached_input_nanos: r.get("cached_input_nanos")?,
                        per_request_nanos: r.get("per_request_nanos")?,
                        created_at_ms: r.get("created_at_ms")?,
                        updated_at_ms: r.get("updated_at_ms")?,
                        updated_by: r.get("updated_by")?,
                    })
                },
            )
            .await?;
        let price_audit = r
            .read_all(
                Sql::new(
                    "SELECT at_ms, actor, action, target, before, after FROM price_audit ORDER BY id",
                ),
                |r| -> Result<_, sqlx::Error> {
                    Ok(LedgerAudit {
                        at_ms: r.get("at_ms")?,
                        actor: r.get("actor")?,
                        action: r.get("action")?,
                        target: r.get("target")?,
                        before: r.get("before")?,
                        after: r.get("after")?,
                    })
                },
            )
            .await?;
        let corrections = r
            .read_all(
                Sql::new(
                    "SELECT id, reason, request, voided, already_voided, not_found, actor, \
                     created_at_ms, reverted_at_ms, reverted_by, revert_reason \
                     FROM corrections ORDER BY created_at_ms, id",
                ),
                |r| -> Result<_, sqlx::Error> {
                    Ok(LedgerCorrection {
                        id: r.get("id")?,
                        reason: r.get("reason")?,
                        request: r.get("request")?,
                        voided: r.get("voided")?,
                        already_voided: r.get("already_voided")?,
                        not_found: r.get("not_found")?,
                        actor: r.get("actor")?,
                        created_at_ms: r.get("created_at_ms")?,
                        reverted_at_ms: r.get("reverted_at_ms")?,
                        reverted_by: r.get("reverted_by")?,
                        revert_reason: r.get("revert_reason")?,
                    })
                },
            )
            .await?;
        let rows = r
            .fetch_all(Sql::new(
                "SELECT correction_id, event_id, ts FROM correction_events ORDER BY correction_id, event_id",
            ))
            .await?;
        let mut correction_events = Vec::with_capacity(rows.len());
        for row in &rows {
            correction_events.push((
                row.get("correction_id")?,
                row.get("event_id")?,
                crate::event::format_ts(&row.time("ts")?),
            ));
        }
        let voided = r
            .read_all(
                Sql::new(
                    "SELECT event_id, correction_id, voided_at_ms FROM voided_events ORDER BY event_id",
                ),
                |r| -> Result<_, sqlx::Error> {
                    Ok((r.get("event_id")?, r.get("correction_id")?, r.get("voided_at_ms")?))
                },
            )
            .await?;
        Ok(LedgerSnapshot {
            version: 1,
            prices,
            price_audit,
            corrections,
            correction_events,
            voided,
        })
    }

    /// Adds a snapshot's rows that are not there yet, in one transaction,
    /// after the events were restored; then queues the restatement of every
    /// existing projection over the log (whole buckets), because events
    /// folded before may now be voided or priced.
    pub async fn restore_ledger(&self, s: &LedgerSnapshot) -> Result<LedgerRestored, StoreError> {
        let mut tx = self.db.begin().await?;
        let mut done = LedgerRestored::default();
        for p in &s.prices {
            done.prices += tx
                .execute(
                    Sql::new(
                        "INSERT INTO prices (id, api, model, effective_from_us, input_nanos, output_nanos, \
                         cached_input_nanos, per_request_nanos, created_at_ms, updated_at_ms, updated_by) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
                    )
                    .bind(&p.id)
                    .bind(&p.api)
                    .bind(&p.model)
                    .bind(p.effective_from_us)
                    .bind(p.input_nanos)
                    .bind(p.output_nanos)
                    .bind(p.cached_input_nanos)
                    .bind(p.per_request_nanos)
                    .bind(p.created_at_ms)
                    .bind(p.updated_at_ms)
                    .bind(&p.updated_by),
                )
                .await? as usize;
        }
        // The audit is appended only to an empty trail: importing twice must
        // not repeat it, and an audit row has no natural key to skip by.
        let trail: i64 = tx
            .fetch_one(Sql::new("SELECT count(*) AS n FROM price_audit"))
            .await?
            .get("n")?;
        if trail == 0 {
            for a in &s.price_audit {
                tx.execute(
                    Sql::new(
                        "INSERT INTO price_audit (at_ms, actor, action, target, before, after) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(a.at_ms)
                    .bind(&a.actor)
                    .bind(&a.action)
                    .bind(&a.target)
                    .bind(a.before.clone())
                    .bind(a.after.clone()),
                )
                .await?;
            }
        }
        for c in &s.corrections {
            done.corrections += tx
                .execute(
                    Sql::new(
                        "INSERT INTO corrections (id, reason, request, voided, already_voided, not_found, \
                         actor, created_at_ms, reverted_at_ms, reverted_by, revert_reason) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
                    )
                    .bind(&c.id)
                    .bind(&c.reason)
                    .bind(&c.request)
                    .bind(c.voided)
                    .bind(c.already_voided)
                    .bind(&c.not_found)
                    .bind(&c.actor)
                    .bind(c.created_at_ms)
                    .bind(c.reverted_at_ms)
                    .bind(c.reverted_by.clone())
                    .bind(c.revert_reason.clone()),
                )
                .await? as usize;
        }
        for (correction, event, ts) in &s.correction_events {
            let ts = super::sqlite::parse_ts(ts).ok_or_else(|| StoreError::CorruptRow {
                id: event.clone(),
                reason: format!("`{ts}` is not a timestamp"),
            })?;
            tx.execute(
                Sql::new(
                    "INSERT INTO correction_events (correction_id, event_id, ts) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(correction.as_str())
                .bind(event.as_str())
                .bind(ts),
            )
            .await?;
        }
        let event_tx = match self.db {
            super::db::Db::Postgres(_) => super::postgres::EVENT_TX,
            super::db::Db::Sqlite(_) => super::sqlite::EVENT_TX,
        };
        for (event, correction, at) in &s.voided {
            done.voided += tx
                .execute(
                    Sql::new(format!(
                        "INSERT INTO voided_events (event_id, correction_id, event_tx, event_seq, voided_at_ms) \
                         SELECT e.id, $2, {event_tx}, e.seq, $3 FROM usage_events e WHERE e.id = $1 \
                         ON CONFLICT DO NOTHING"
                    ))
                    .bind(event.as_str())
                    .bind(correction.as_str())
                    .bind(*at),
                )
                .await? as usize;
        }
        if done.prices + done.corrections + done.voided > 0 {
            if let super::db::Tx::Postgres(_) = tx {
                tx.execute(Sql::new(
                    "UPDATE projection_checkpoints SET generation = generation + 1",
                ))
                .await?;
            }
            let names: Vec<String> = tx
                .fetch_all(Sql::new("SELECT name FROM projection_checkpoints"))
                .await?
                .iter()
                .map(|r| r.get::<String, _>("name"))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|n| !n.contains('~'))
                .collect();
            done.restatements = super::prices::queue_over_log(
                &mut tx,
                &names,
                vec![(
                    chrono::DateTime::<chrono::Utc>::MIN_UTC,
                    chrono::DateTime::<chrono::Utc>::MAX_UTC,
                )],
                "restore",
                &super::corrections::Scope::All,
                chrono::Utc::now(),
            )
            .await?;
        }
        tx.commit().await?;
        // SQLite: the checkpoints are in the aggregates file (see
        // `Prices::begin`); the restore's restatements redo every bucket.
        if let (super::db::Db::Sqlite(_), true) =
            (&self.db, done.prices + done.corrections + done.voided > 0)
        {
            super::prices::bump_generations(&self.db).await?;
        }
        Ok(done)
    }
}
