//! The alert side of the store: rules and their audit trail, quotas, alert
//! instances and the outbox of notifications.
//!
//! The tables (`schema/*/0003_alerts.sql`) keep times as Unix milliseconds;
//! every statement here is the same on both backends.

use chrono::{DateTime, Utc};

use super::db::{Db, Row, Sql};
use super::StoreError;

/// A stored rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRow {
    /// Its name.
    pub name: String,
    /// Fixed at creation.
    pub uid: String,
    /// The rule as canonical JSON.
    pub spec: String,
    /// 1 at creation, +1 per change.
    pub version: i64,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// When last changed.
    pub updated_at: DateTime<Utc>,
    /// Who last changed it.
    pub updated_by: String,
}

/// How [`Alerts::write_rule`] treats an existing rule of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail with [`RuleWritten::Exists`] (`POST`).
    Create,
    /// Replace it (`PUT`, `tally alerts apply`).
    Upsert,
}

/// What [`Alerts::write_rule`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleWritten {
    /// A new rule.
    Created(RuleRow),
    /// An existing rule changed.
    Updated(RuleRow),
    /// The same spec was already stored (no audit entry).
    Unchanged(RuleRow),
    /// `Create` found the name taken.
    Exists,
    /// The rule is new and this many rules exist already (the cap).
    TooMany(u64),
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// Order of changes.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who (`X-Tally-Actor`, the API token's name, or `cli:<user>`).
    pub actor: String,
    /// `rule.create`, `rule.update`, `rule.delete`, `quota.set`, `quota.delete`.
    pub action: String,
    /// The rule name, or `quota:<key>`.
    pub target: String,
    /// The stored JSON before the change.
    pub before: Option<String>,
    /// The stored JSON after it.
    pub after: Option<String>,
}

/// A stored quota.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaRow {
    /// The API key.
    pub key: String,
    /// Fixed when first set.
    pub uid: String,
    /// `{"measure", "limit", "window"}` as JSON.
    pub spec: String,
    /// When last set.
    pub updated_at: DateTime<Utc>,
    /// Who set it.
    pub updated_by: String,
}

/// Where an alert instance is in its lifecycle (`alert::lifecycle` moves it;
/// the store keeps it by these names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertState {
    /// The condition does not hold (or never did).
    Inactive,
    /// The condition holds, not yet for `for`.
    Pending,
    /// Notified as firing.
    Firing,
    /// Was firing, notified as resolved.
    Resolved,
}

impl AlertState {
    /// Stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Inactive => "inactive",
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }

    /// Pending or firing: the instance is watched even when its group has no data.
    pub fn is_active(self) -> bool {
        matches!(self, AlertState::Pending | AlertState::Firing)
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "inactive" => Some(AlertState::Inactive),
            "pending" => Some(AlertState::Pending),
            "firing" => Some(AlertState::Firing),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        }
    }
}

/// The lifecycle fields of an instance, as `alert::lifecycle::advance`
/// moves them and the store keeps them.
#[derive(Debug, Clone, PartialEq)]
pub struct Life {
    /// Current state.
    pub state: AlertState,
    /// When the condition started holding (pending or firing); the alert's `started_at`.
    pub active_since: Option<DateTime<Utc>>,
    /// When it started firing.
    pub firing_since: Option<DateTime<Utc>>,
    /// The last evaluation at which the condition held.
    pub last_true: Option<DateTime<Utc>>,
    /// The last notification.
    pub last_sent: Option<DateTime<Utc>>,
    /// When it last resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Sequence number of the last notification (0: none yet).
    pub sequence: i64,
}

impl Default for Life {
    fn default() -> Self {
        Self {
            state: AlertState::Inactive,
            active_since: None,
            firing_since: None,
            last_true: None,
            last_sent: None,
            resolved_at: None,
            sequence: 0,
        }
    }
}

/// The stored state of one alert instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// `<fnv64 of rule uid, level and group>`; also the alert id.
    pub fingerprint: String,
    /// Rule name.
    pub rule: String,
    /// Rule uid.
    pub rule_uid: String,
    /// Level id (`""` or the `warn_at` fraction).
    pub level: String,
    /// The group as a JSON object.
    pub group: String,
    /// Severity of its notifications.
    pub severity: String,
    /// Measured value at the last transition.
    pub value: Option<f64>,
    /// Threshold at the last transition.
    pub threshold: Option<f64>,
    /// Where it is in its lifecycle, and since when.
    pub life: Life,
    /// Compare-and-set guard.
    pub version: i64,
    /// Last write.
    pub updated_at: DateTime<Utc>,
}

/// An instance to write: the new row, and the version it was read at
/// (`None`: not stored yet).
#[derive(Debug, Clone)]
pub struct InstanceWrite {
    /// New contents (its `version` is ignored: the store sets read version + 1).
    pub row: InstanceRow,
    /// Version the change was computed from.
    pub expected_version: Option<i64>,
}

/// A notification to add to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// Instance.
    pub fingerprint: String,
    /// Transition number.
    pub sequence: i64,
    /// Rule name.
    pub rule: String,
    /// [`AlertState::Firing`] or [`AlertState::Resolved`].
    pub state: AlertState,
    /// Severity.
    pub severity: String,
    /// NATS subject.
    pub subject: String,
    /// JSON body.
    pub payload: String,
    /// When decided.
    pub created_at: DateTime<Utc>,
}

/// A row of the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRow {
    /// Outbox order.
    pub id: i64,
    /// The notification.
    pub n: NewNotification,
    /// When the publish was acknowledged.
    pub sent_at: Option<DateTime<Utc>>,
}

/// Which notifications [`Alerts::notifications`] returns (newest first).
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only this rule.
    pub rule: Option<String>,
    /// Only notifications of this state.
    pub state: Option<AlertState>,
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created before.
    pub to: Option<DateTime<Utc>>,
    /// Most rows.
    pub limit: i64,
}

/// Milliseconds since the epoch.
pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The instant `ms` milliseconds after the epoch (the epoch for out-of-range values).
pub fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A random 64-bit id in hex.
pub fn new_uid() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A rule whose evaluation fails, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleFailure {
    /// The rule's uid (a quota's uid for a quota rule).
    pub uid: String,
    /// Its name (`quota_exceeded` for a quota).
    pub rule: String,
    /// The error, as an operator reads it.
    pub error: String,
    /// Failing since (first failed evaluation).
    pub since: DateTime<Utc>,
}

/// Columns of `alert_rules`.
const RULE_COLUMNS: &str = "name, uid, spec, version, created_at_ms, updated_at_ms, updated_by";

/// Columns of `alert_instances` (decoded by name in [`instance_from_row`]).
pub(crate) const INSTANCE_COLUMNS: &str = "fingerprint, rule, rule_uid, level, grp, severity, state, value, threshold, \
     active_since_ms, firing_since_ms, last_true_ms, last_sent_ms, resolved_at_ms, sequence, version, updated_at_ms";

/// Columns of `alert_outbox` (decoded by name in [`notification_from_row`]).
pub(crate) const OUTBOX_COLUMNS: &str =
    "id, fingerprint, sequence, rule, state, severity, subject, payload, created_at_ms, sent_at_ms";

fn opt_time(row: &Row, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    Ok(row.get::<Option<i64>, _>(col)?.map(from_ms))
}

/// Reads one row of [`INSTANCE_COLUMNS`].
pub(crate) fn instance_from_row(row: &Row) -> Result<InstanceRow, sqlx::Error> {
    Ok(InstanceRow {
        fingerprint: row.get("fingerprint")?,
        rule: row.get("rule")?,
        rule_uid: row.get("rule_uid")?,
        level: row.get("level")?,
        group: row.get("grp")?,
        severity: row.get("severity")?,
        value: row.get("value")?,
        threshold: row.get("threshold")?,
        life: Life {
            state: state_from_row(row, "state")?,
            active_since: opt_time(row, "active_since_ms")?,
            firing_since: opt_time(row, "firing_since_ms")?,
            last_true: opt_time(row, "last_true_ms")?,
            last_sent: opt_time(row, "last_sent_ms")?,
            resolved_at: opt_time(row, "resolved_at_ms")?,
            sequence: row.get("sequence")?,
        },
        version: row.get("version")?,
        updated_at: from_ms(row.get("updated_at_ms")?),
    })
}

fn state_from_row(row: &Row, col: &str) -> Result<AlertState, sqlx::Error> {
    let name: String = row.get(col)?;
    AlertState::parse(&name).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: col.to_string(),
        source: format!("unknown alert state `{name}`").into(),
    })
}

/// Reads one row of [`OUTBOX_COLUMNS`].
pub(crate) fn notification_from_row(row: &Row) -> Result<NotificationRow, sqlx::Error> {
    Ok(NotificationRow {
        id: row.get("id")?,
        n: NewNotification {
            fingerprint: row.get("fingerprint")?,
            sequence: row.get("sequence")?,
            rule: row.get("rule")?,
            state: state_from_row(row, "state")?,
            severity: row.get("severity")?,
            subject: row.get("subject")?,
            payload: row.get("payload")?,
            created_at: from_ms(row.get("created_at_ms")?),
        },
        sent_at: opt_time(row, "sent_at_ms")?,
    })
}

/// Reads one row of [`RULE_COLUMNS`].
pub(crate) fn rule_from_row(row: &Row) -> Result<RuleRow, sqlx::Error> {
    Ok(RuleRow {
        name: row.get("name")?,
        uid: row.get("uid")?,
        spec: row.get("spec")?,
        version: row.get("version")?,
        created_at: from_ms(row.get("created_at_ms")?),
        updated_at: from_ms(row.get("updated_at_ms")?),
        updated_by: row.get("updated_by")?,
    })
}

/// Reads one row of `alert_audit`.
pub(crate) fn audit_from_row(r: &Row) -> Result<AuditRow, sqlx::Error> {
    Ok(AuditRow {
        id: r.get("id")?,
        at: from_ms(r.get("at_ms")?),
        actor: r.get("actor")?,
        action: r.get("action")?,
        target: r.get("target")?,
        before: r.get("before")?,
        after: r.get("after")?,
    })
}

/// Binds an instance's columns after the fingerprint, in [`INSTANCE_COLUMNS`]
/// order up to `sequence`.
pub(crate) fn bind_instance<'a>(q: Sql<'a>, r: &'a InstanceRow) -> Sql<'a> {
    q.bind(&r.rule)
        .bind(&r.rule_uid)
        .bind(&r.level)
        .bind(&r.group)
        .bind(&r.severity)
        .bind(r.life.state.as_str())
        .bind(r.value)
        .bind(r.threshold)
        .bind(r.life.active_since.map(ms))
        .bind(r.life.firing_since.map(ms))
        .bind(r.life.last_true.map(ms))
        .bind(r.life.last_sent.map(ms))
        .bind(r.life.resolved_at.map(ms))
        .bind(r.life.sequence)
}

/// Rows per statement of [`Alerts::commit_transitions`] (17 parameters a
/// row: well within both dialects' limits).
const ROWS_PER_STATEMENT: usize = 200;

/// The alert tables: rules and their audit trail, quotas, instances and the outbox.
#[derive(Debug, Clone)]
pub struct Alerts {
    db: Db,
}

impl Alerts {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }

    /// Every rule, by name.
    pub async fn alert_rules(&self) -> Result<Vec<RuleRow>, StoreError> {
        self.db
            .reader()
            .read_all(
                Sql::new(format!(
                    "SELECT {RULE_COLUMNS} FROM alert_rules ORDER BY name"
                )),
                rule_from_row,
            )
            .await
    }

    /// Rules whose evaluation currently fails (table `alert_rule_status`).
    pub async fn rule_failures(&self) -> Result<Vec<RuleFailure>, StoreError> {
        let rows = self
            .db
            .reader()
            .fetch_all(Sql::new(
                "SELECT uid, rule, error, since_ms FROM alert_rule_status ORDER BY rule",
            ))
            .await?;
        rows.iter()
            .map(|r| {
                Ok(RuleFailure {
                    uid: r.get("uid")?,
                    rule: r.get("rule")?,
                    error: r.get("error")?,
                    since: from_ms(r.get("since_ms")?),
                })
            })
            .collect()
    }

    /// Records this round's failing rules (keeping `since` of those already
    /// failing) and clears every other rule's failure.
    pub async fn set_rule_failures(
        &self,
        failing: &[RuleFailure],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let now = ms(now);
        let mut tx = self.db.begin().await?;
        for f in failing {
            tx.execute(
                Sql::new(
                    "INSERT INTO alert_rule_status (uid, rule, error, since_ms, checked_at_ms) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (uid) DO UPDATE SET \
                     rule = excluded.rule, error = excluded.error, checked_at_ms = excluded.checked_at_ms",
                )
                .bind(&f.uid)
                .bind(&f.rule)
                .bind(&f.error)
                .bind(ms(f.since))
                .bind(now),
            )
            .await?;
        }
        // Every rule not failing now has recovered (or is gone).
        tx.execute(Sql::new("DELETE FROM alert_rule_status WHERE checked_at_ms < $1").bind(now))
            .await?;
        tx.commit().await
    }

    /// Creates or replaces a rule and records who did it, in one transaction.
    pub async fn write_rule(
        &self,
        name: &str,
        spec: &str,
        actor: &str,
        mode: WriteMode,
    ) -> Result<RuleWritten, StoreError> {
        self.write_rule_capped(name, spec, actor, mode, None).await
    }

    /// [`Self::write_rule`], refusing to create a rule when `max` rules
    /// exist (a replaced rule is never refused).
    pub async fn write_rule_capped(
        &self,
        name: &str,
        spec: &str,
        actor: &str,
        mode: WriteMode,
        max: Option<u64>,
    ) -> Result<RuleWritten, StoreError> {
        let now = ms(Utc::now());
        let mut tx = self.db.begin().await?;
        let old = tx
            .fetch_optional(
                Sql::new(format!(
                    "SELECT {RULE_COLUMNS} FROM alert_rules WHERE name = $1{}",
                    self.db.for_update()
                ))
                .bind(name),
            )
            .await?
            .map(|r| rule_from_row(&r))
            .transpose()?;
        let (action, before) = match &old {
            Some(_) if mode == WriteMode::Create => return Ok(RuleWritten::Exists),
            Some(old) if old.spec == spec => return Ok(RuleWritten::Unchanged(old.clone())),
            Some(old) => ("rule.update", Some(old.spec.clone())),
            None => ("rule.create", None),
        };
        if let (None, Some(max)) = (&old, max) {
            let n: i64 = tx
                .fetch_one(Sql::new("SELECT count(*) AS n FROM alert_rules"))
                .await?
                .get("n")?;
            if u64::try_from(n).unwrap_or(0) >= max {
                return Ok(RuleWritten::TooMany(max));
            }
        }
        let row = match &old {
            Some(old) => {
                tx.fetch_one(
                    Sql::new(format!(
                        "UPDATE alert_rules SET spec = $2, version = version + 1, \
                         updated_at_ms = $3, updated_by = $4 WHERE name = $1 RETURNING {RULE_COLUMNS}"
                    ))
                    .bind(&old.name)
                    .bind(spec)
                    .bind(now)
                    .bind(actor),
                )
                .await?
            }
            None => {
                let inserted = tx
                    .fetch_optional(
                        Sql::new(format!(
                            "INSERT INTO alert_rules ({RULE_COLUMNS}) \
                             VALUES ($1, $2, $3, 1, $4, $4, $5) ON CONFLICT (name) DO NOTHING \
                             RETURNING {RULE_COLUMNS}"
                        ))
                        .bind(name)
                        .bind(new_uid())
                        .bind(spec)
                        .bind(now)
                        .bind(actor),
                    )
                    .await?;
                match inserted {
                    Some(r) => r,
                    // Created concurrently by another writer.
                    None => return Ok(RuleWritten::Exists),
                }
            }
        };
        tx.execute(audit(
            now,
            actor,
            action,
            name,
            before,
            Some(spec.to_string()),
        ))
        .await?;
        tx.commit().await?;
        let row = rule_from_row(&row)?;
        Ok(if old.is_some() {
            RuleWritten::Updated(row)
        } else {
            RuleWritten::Created(row)
        })
    }

    /// Deletes a rule (its instances resolve at the next evaluation); the removed row.
    pub async fn delete_rule(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<Option<RuleRow>, StoreError> {
        let now = ms(Utc::now());
        let mut tx = self.db.begin().await?;
        let old = tx
            .fetch_optional(
                Sql::new(format!(
                    "DELETE FROM alert_rules WHERE name = $1 RETURNING {RULE_COLUMNS}"
                ))
                .bind(name),
            )
            .await?
            .map(|r| rule_from_row(&r))
            .transpose()?;
        if let Some(old) = &old {
            tx.execute(audit(
                now,
                actor,
                "rule.delete",
                name,
                Some(old.spec.clone()),
                None,
            ))
            .await?;
        }
        tx.commit().await?;
        Ok(old)
    }

    /// Audit entries, newest first, optionally for one target.
    pub async fn audit_log(
        &self,
        target: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.db
            .reader()
            .read_all(
                Sql::new(
                    "SELECT id, at_ms, actor, action, target, before, after FROM alert_audit \
                     WHERE CAST($1 AS TEXT) IS NULL OR target = $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(target)
                .bind(limit),
                audit_from_row,
            )
            .await
    }

    /// A number every committed change to the rules or the quotas moves
    /// (a trigger counts them, whatever made the change). Read it before
    /// the rules: rules read after it are at least as new.
    pub async fn rules_version(&self) -> Result<i64, StoreError> {
        self.db
            .reader()
            .fetch_one(Sql::new("SELECT n FROM alert_rules_version WHERE id = 1"))
            .await?
            .get::<i64, _>("n")
            .map_err(StoreError::from)
    }

    /// Every quota, by key.
    pub async fn quotas(&self) -> Result<Vec<QuotaRow>, StoreError> {
        self.db
            .reader()
            .read_all(
                Sql::new(
                    "SELECT key, uid, spec, updated_at_ms, updated_by FROM key_quotas ORDER BY key",
                ),
                quota_from_row,
            )
            .await
    }

    /// Sets a key's quota (true: it had none); `None` when the key has none
    /// and `max` quotas exist (a replaced quota is never refused).
    pub async fn put_quota(
        &self,
        key: &str,
        spec: &str,
        actor: &str,
        max: Option<u64>,
    ) -> Result<Option<(QuotaRow, bool)>, StoreError> {
        let now = ms(Utc::now());
        let mut tx = self.db.begin().await?;
        let old = tx
            .fetch_optional(
                Sql::new(format!(
                    "SELECT uid, spec FROM key_quotas WHERE key = $1{}",
                    self.db.for_update()
                ))
                .bind(key),
            )
            .await?;
        let old: Option<(String, String)> = match old {
            Some(r) => Some((r.get("uid")?, r.get("spec")?)),
            None => None,
        };
        if let (None, Some(max)) = (&old, max) {
            let n: i64 = tx
                .fetch_one(Sql::new("SELECT count(*) AS n FROM key_quotas"))
                .await?
                .get("n")?;
            if u64::try_from(n).unwrap_or(0) >= max {
                return Ok(None);
            }
        }
        let uid = match &old {
            Some((uid, _)) => uid.clone(),
            None => new_uid(),
        };
        tx.execute(
            Sql::new(
                "INSERT INTO key_quotas (key, uid, spec, updated_at_ms, updated_by) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (key) DO UPDATE SET spec = excluded.spec, updated_at_ms = excluded.updated_at_ms, \
                 updated_by = excluded.updated_by",
            )
            .bind(key)
            .bind(&uid)
            .bind(spec)
            .bind(now)
            .bind(actor),
        )
        .await?;
        if old.as_ref().is_none_or(|(_, s)| s != spec) {
            let before = old.as_ref().map(|(_, s)| s.clone());
            let target = format!("quota:{key}");
            tx.execute(audit(
                now,
                actor,
                "quota.set",
                &target,
                before,
                Some(spec.to_string()),
            ))
            .await?;
        }
        tx.commit().await?;
        Ok(Some((
            QuotaRow {
                key: key.to_string(),
                uid,
                spec: spec.to_string(),
                updated_at: from_ms(now),
                updated_by: actor.to_string(),
            },
            old.is_none(),
        )))
    }

    /// Removes a key's quota (false: it had none).
    pub async fn delete_quota(&self, key: &str, actor: &str) -> Result<bool, StoreError> {
        let now = ms(Utc::now());
        let mut tx = self.db.begin().await?;
        let old = tx
            .fetch_optional(
                Sql::new("DELETE FROM key_quotas WHERE key = $1 RETURNING spec").bind(key),
            )
            .await?;
        let Some(old) = old else {
            return Ok(false);
        };
        let target = format!("quota:{key}");
        tx.execute(audit(
            now,
            actor,
            "quota.delete",
            &target,
            Some(old.get("spec")?),
            None,
        ))
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every stored instance.
    pub async fn alert_instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        self.instances_where("TRUE").await
    }

    /// The pending and firing instances: what the evaluator and
    /// `GET /v1/alerts` read, bounded by what is active rather than by history.
    pub async fn active_instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        self.instances_where("state IN ('pending', 'firing')").await
    }

    async fn instances_where(&self, condition: &str) -> Result<Vec<InstanceRow>, StoreError> {
        self.db
            .reader()
            .read_all(Sql::new(format!(
                "SELECT {INSTANCE_COLUMNS} FROM alert_instances WHERE {condition} ORDER BY fingerprint"
            )), instance_from_row)
            .await
    }

    /// The stored instances with these fingerprints (any state).
    pub async fn instances_by_fingerprint(
        &self,
        fingerprints: &[String],
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let mut out = Vec::new();
        // Bounded statements: SQLite binds at most 32,766 values.
        for chunk in fingerprints.chunks(500) {
            let list = (1..=chunk.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut q = Sql::new(format!(
                "SELECT {INSTANCE_COLUMNS} FROM alert_instances WHERE fingerprint IN ({list})"
            ));
            for fp in chunk {
                q = q.bind(fp);
            }
            for r in &self.db.reader().fetch_all(q).await? {
                out.push(instance_from_row(r)?);
            }
        }
        Ok(out)
    }

    /// Writes instance changes and their notifications in one transaction if
    /// every instance is still at the version the change was computed from;
    /// otherwise writes nothing and answers false.
    pub async fn commit_transitions(
        &self,
        writes: &[InstanceWrite],
        notifications: &[NewNotification],
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.begin().await?;
        // A few statements of many rows each, not one per row: a round
        // that moves hundreds of instances costs a few round trips.
        let placeholders = |rows: usize, per_row: usize, tail: &str| -> String {
            (0..rows)
                .map(|i| {
                    let cols: Vec<String> = (1..=per_row)
                        .map(|c| format!("${}", i * per_row + c))
                        .collect();
                    format!("({}{tail})", cols.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (inserts, updates): (Vec<&InstanceWrite>, Vec<&InstanceWrite>) =
            writes.iter().partition(|w| w.expected_version.is_none());
        for chunk in inserts.chunks(ROWS_PER_STATEMENT) {
            let mut q = Sql::new(format!(
                "INSERT INTO alert_instances (fingerprint, rule, rule_uid, level, grp, severity, state, \
                 value, threshold, active_since_ms, firing_since_ms, last_true_ms, last_sent_ms, \
                 resolved_at_ms, sequence, updated_at_ms, version) VALUES {} \
                 ON CONFLICT (fingerprint) DO NOTHING",
                placeholders(chunk.len(), 16, ", 1")
            ));
            for w in chunk {
                q = bind_instance(q.bind(&w.row.fingerprint), &w.row).bind(ms(w.row.updated_at));
            }
            if tx.execute(q).await? != chunk.len() as u64 {
                // Another evaluator created one of these instances first.
                tx.rollback().await?;
                return Ok(false);
            }
        }
        for chunk in updates.chunks(ROWS_PER_STATEMENT) {
            // VALUES columns are `column1`, `column2`, … in both dialects.
            let mut q = Sql::new(format!(
                "UPDATE alert_instances SET rule = v.column2, rule_uid = v.column3, level = v.column4, \
                 grp = v.column5, severity = v.column6, state = v.column7, value = v.column8, \
                 threshold = v.column9, active_since_ms = v.column10, firing_since_ms = v.column11, \
                 last_true_ms = v.column12, last_sent_ms = v.column13, resolved_at_ms = v.column14, \
                 sequence = v.column15, updated_at_ms = v.column16, version = alert_instances.version + 1 \
                 FROM (VALUES {}) AS v \
                 WHERE alert_instances.fingerprint = v.column1 AND alert_instances.version = v.column17",
                placeholders(chunk.len(), 17, "")
            ));
            for w in chunk {
                q = bind_instance(q.bind(&w.row.fingerprint), &w.row)
                    .bind(ms(w.row.updated_at))
                    .bind(w.expected_version);
            }
            if tx.execute(q).await? != chunk.len() as u64 {
                // Another evaluator moved one of these instances first.
                tx.rollback().await?;
                return Ok(false);
            }
        }
        for chunk in notifications.chunks(ROWS_PER_STATEMENT) {
            let mut q = Sql::new(format!(
                "INSERT INTO alert_outbox (fingerprint, sequence, rule, state, severity, subject, payload, created_at_ms) \
                 VALUES {}",
                placeholders(chunk.len(), 8, "")
            ));
            for n in chunk {
                q = q
                    .bind(&n.fingerprint)
                    .bind(n.sequence)
                    .bind(&n.rule)
                    .bind(n.state.as_str())
                    .bind(&n.severity)
                    .bind(&n.subject)
                    .bind(&n.payload)
                    .bind(ms(n.created_at));
            }
            tx.execute(q).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The oldest notifications not yet published.
    pub async fn unsent_notifications(
        &self,
        limit: i64,
    ) -> Result<Vec<NotificationRow>, StoreError> {
        // The writer's view: a relay must not miss a notification just committed.
        self.db
            .writer()
            .read_all(
                Sql::new(format!(
                    "SELECT {OUTBOX_COLUMNS} FROM alert_outbox WHERE sent_at_ms IS NULL ORDER BY id LIMIT $1"
                ))
                .bind(limit),
            notification_from_row,
            )
            .await
    }

    /// Records that the stream acknowledged these notifications.
    pub async fn mark_sent(&self, ids: &[i64], at: DateTime<Utc>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Ids are integers Tally read from the outbox: safe to inline.
        let list = ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        self.db
            .writer()
            .execute(
                Sql::new(format!(
                    "UPDATE alert_outbox SET sent_at_ms = $1 WHERE sent_at_ms IS NULL AND id IN ({list})"
                ))
                .bind(ms(at)),
            )
            .await?;
        Ok(())
    }

    /// Notifications not yet published (for `/metrics`).
    pub async fn outbox_backlog(&self) -> Result<i64, StoreError> {
        Ok(self
            .db
            .reader()
            .fetch_one(Sql::new(
                "SELECT count(*) AS n FROM alert_outbox WHERE sent_at_ms IS NULL",
            ))
            .await?
            .get("n")?)
    }

    /// Notification history.
    pub async fn notifications(
        &self,
        f: &HistoryFilter,
    ) -> Result<Vec<NotificationRow>, StoreError> {
        self.db
            .reader()
            .read_all(
                Sql::new(format!(
                    "SELECT {OUTBOX_COLUMNS} FROM alert_outbox WHERE (CAST($1 AS TEXT) IS NULL OR rule = $1) \
                     AND (CAST($2 AS TEXT) IS NULL OR state = $2) AND created_at_ms >= $3 AND created_at_ms < $4 \
                     ORDER BY id DESC LIMIT $5"
                ))
                .bind(f.rule.as_deref())
                .bind(f.state.map(AlertState::as_str))
                .bind(f.from.map(ms).unwrap_or(i64::MIN))
                .bind(f.to.map(ms).unwrap_or(i64::MAX))
                .bind(f.limit),
            notification_from_row,
            )
            .await
    }
}

/// Reads one row of `key_quotas`.
fn quota_from_row(r: &Row) -> Result<QuotaRow, sqlx::Error> {
    Ok(QuotaRow {
        key: r.get("key")?,
        uid: r.get("uid")?,
        spec: r.get("spec")?,
        updated_at: from_ms(r.get("updated_at_ms")?),
        updated_by: r.get("updated_by")?,
    })
}

/// An `alert_audit` entry.
pub(crate) fn audit<'a>(
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    before: Option<String>,
    after: Option<String>,
) -> Sql<'a> {
    Sql::new(
        "INSERT INTO alert_audit (at_ms, actor, action, target, before, after) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(at_ms)
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(before)
    .bind(after)
}
