//! The alert side of the store: rules and their audit trail, quotas, alert
//! instances, the outbox of notifications, and named leases.
//!
//! The tables (`schema/*/0003_alerts.sql`) keep times as Unix milliseconds so
//! that one set of SQL text serves both backends: [`impl_alert_store!`]
//! instantiates it for each (`$N` placeholders work on SQLite too). The
//! backends differ only in which pool writes and how a write transaction
//! begins (SQLite takes the write lock up front with `BEGIN IMMEDIATE`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

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

/// How [`AlertStore::write_rule`] treats an existing rule of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail with [`RuleWritten::Exists`] (`POST`).
    Create,
    /// Replace it (`PUT`, `tally alerts apply`).
    Upsert,
}

/// What [`AlertStore::write_rule`] did.
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

/// Which notifications [`AlertStore::notifications`] returns (newest first).
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

/// The alert tables. One implementation per backend, from one SQL text.
#[async_trait]
pub trait AlertStore: Send + Sync {
    /// Every rule, by name.
    async fn alert_rules(&self) -> Result<Vec<RuleRow>, StoreError>;
    /// Rules whose evaluation currently fails (table `alert_rule_status`).
    async fn rule_failures(&self) -> Result<Vec<RuleFailure>, StoreError>;
    /// Records this round's failing rules (keeping `since` of those already
    /// failing) and clears every other rule's failure.
    async fn set_rule_failures(
        &self,
        failing: &[RuleFailure],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Creates or replaces a rule and records who did it, in one transaction.
    async fn write_rule(
        &self,
        name: &str,
        spec: &str,
        actor: &str,
        mode: WriteMode,
    ) -> Result<RuleWritten, StoreError>;
    /// Deletes a rule (its instances resolve at the next evaluation); the removed row.
    async fn delete_rule(&self, name: &str, actor: &str) -> Result<Option<RuleRow>, StoreError>;
    /// Audit entries, newest first, optionally for one target.
    async fn audit_log(
        &self,
        target: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, StoreError>;
    /// Every quota, by key.
    async fn quotas(&self) -> Result<Vec<QuotaRow>, StoreError>;
    /// Sets a key's quota (true: it had none).
    async fn put_quota(
        &self,
        key: &str,
        spec: &str,
        actor: &str,
    ) -> Result<(QuotaRow, bool), StoreError>;
    /// Removes a key's quota (false: it had none).
    async fn delete_quota(&self, key: &str, actor: &str) -> Result<bool, StoreError>;
    /// Every stored instance.
    async fn alert_instances(&self) -> Result<Vec<InstanceRow>, StoreError>;
    /// The pending and firing instances: what the evaluator and
    /// `GET /v1/alerts` read, bounded by what is active rather than by history.
    async fn active_instances(&self) -> Result<Vec<InstanceRow>, StoreError>;
    /// The stored instances with these fingerprints (any state).
    async fn instances_by_fingerprint(
        &self,
        fingerprints: &[String],
    ) -> Result<Vec<InstanceRow>, StoreError>;
    /// Writes instance changes and their notifications in one transaction if
    /// every instance is still at the version the change was computed from;
    /// otherwise writes nothing and answers false.
    async fn commit_transitions(
        &self,
        writes: &[InstanceWrite],
        notifications: &[NewNotification],
    ) -> Result<bool, StoreError>;
    /// The oldest notifications not yet published.
    async fn unsent_notifications(&self, limit: i64) -> Result<Vec<NotificationRow>, StoreError>;
    /// Records that the stream acknowledged these notifications.
    async fn mark_sent(&self, ids: &[i64], at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Notification history.
    async fn notifications(&self, f: &HistoryFilter) -> Result<Vec<NotificationRow>, StoreError>;
    /// Takes or renews the lease `name` for `ttl`; false while another live holder has it.
    async fn try_named_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError>;
    /// Gives a lease up if `holder` has it.
    async fn release_named_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
}

/// Milliseconds since the epoch.
pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The instant `ms` milliseconds after the epoch (the epoch for out-of-range values).
pub fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn opt_ms(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(ms)
}

/// A random 64-bit id in hex.
pub fn new_uid() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Columns of `alert_instances` (decoded by name in [`instance_from_row`]).
pub(crate) const INSTANCE_COLUMNS: &str = "fingerprint, rule, rule_uid, level, grp, severity, state, value, threshold, \
     active_since_ms, firing_since_ms, last_true_ms, last_sent_ms, resolved_at_ms, sequence, version, updated_at_ms";

/// Columns of `alert_outbox` (decoded by name in [`notification_from_row`]).
pub(crate) const OUTBOX_COLUMNS: &str =
    "id, fingerprint, sequence, rule, state, severity, subject, payload, created_at_ms, sent_at_ms";

/// Reads one row of [`INSTANCE_COLUMNS`].
pub(crate) fn instance_from_row<'r, R>(row: &'r R) -> Result<InstanceRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let t = |i: &str| -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        Ok(row.try_get::<Option<i64>, _>(i)?.map(from_ms))
    };
    Ok(InstanceRow {
        fingerprint: row.try_get("fingerprint")?,
        rule: row.try_get("rule")?,
        rule_uid: row.try_get("rule_uid")?,
        level: row.try_get("level")?,
        group: row.try_get("grp")?,
        severity: row.try_get("severity")?,
        value: row.try_get("value")?,
        threshold: row.try_get("threshold")?,
        life: Life {
            state: state_from_row(row, "state")?,
            active_since: t("active_since_ms")?,
            firing_since: t("firing_since_ms")?,
            last_true: t("last_true_ms")?,
            last_sent: t("last_sent_ms")?,
            resolved_at: t("resolved_at_ms")?,
            sequence: row.try_get("sequence")?,
        },
        version: row.try_get("version")?,
        updated_at: from_ms(row.try_get("updated_at_ms")?),
    })
}

fn state_from_row<'r, R>(row: &'r R, i: &str) -> Result<AlertState, sqlx::Error>
where
    R: sqlx::Row,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let name: String = row.try_get(i)?;
    AlertState::parse(&name).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: i.to_string(),
        source: format!("unknown alert state `{name}`").into(),
    })
}

/// Reads one row of [`OUTBOX_COLUMNS`].
pub(crate) fn notification_from_row<'r, R>(row: &'r R) -> Result<NotificationRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(NotificationRow {
        id: row.try_get("id")?,
        n: NewNotification {
            fingerprint: row.try_get("fingerprint")?,
            sequence: row.try_get("sequence")?,
            rule: row.try_get("rule")?,
            state: state_from_row(row, "state")?,
            severity: row.try_get("severity")?,
            subject: row.try_get("subject")?,
            payload: row.try_get("payload")?,
            created_at: from_ms(row.try_get("created_at_ms")?),
        },
        sent_at: row.try_get::<Option<i64>, _>("sent_at_ms")?.map(from_ms),
    })
}

/// Reads one row of `alert_rules` (`name, uid, spec, version, created_at_ms, updated_at_ms, updated_by`).
pub(crate) fn rule_from_row<'r, R>(row: &'r R) -> Result<RuleRow, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(RuleRow {
        name: row.try_get(0)?,
        uid: row.try_get(1)?,
        spec: row.try_get(2)?,
        version: row.try_get(3)?,
        created_at: from_ms(row.try_get(4)?),
        updated_at: from_ms(row.try_get(5)?),
        updated_by: row.try_get(6)?,
    })
}

/// The instance columns' values in bind order after the fingerprint.
pub(crate) struct InstanceBinds {
    pub(crate) times: [Option<i64>; 5],
    pub(crate) updated_at_ms: i64,
}

impl InstanceBinds {
    pub(crate) fn of(r: &InstanceRow) -> Self {
        Self {
            times: [
                opt_ms(r.life.active_since),
                opt_ms(r.life.firing_since),
                opt_ms(r.life.last_true),
                opt_ms(r.life.last_sent),
                opt_ms(r.life.resolved_at),
            ],
            updated_at_ms: ms(r.updated_at),
        }
    }
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

/// Implements [`AlertStore`] for a backend: `$writer` and `$reader` name its
/// pools, `$begin` the statement that opens a write transaction, and
/// `$lock` the suffix that locks a row read for update (empty on SQLite,
/// whose `BEGIN IMMEDIATE` already holds the write lock).
macro_rules! impl_alert_store {
    ($store:ty, $writer:ident, $reader:ident, $begin:literal, $lock:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::alerts::AlertStore for $store {
            async fn alert_rules(
                &self,
            ) -> Result<Vec<$crate::store::alerts::RuleRow>, $crate::store::StoreError> {
                let rows = sqlx::query(
                    "SELECT name, uid, spec, version, created_at_ms, updated_at_ms, updated_by \
                     FROM alert_rules ORDER BY name",
                )
                .fetch_all(&self.$reader)
                .await?;
                Ok(rows
                    .iter()
                    .map($crate::store::alerts::rule_from_row)
                    .collect::<Result<_, _>>()?)
            }

            async fn rule_failures(
                &self,
            ) -> Result<Vec<$crate::store::alerts::RuleFailure>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query(
                    "SELECT uid, rule, error, since_ms FROM alert_rule_status ORDER BY rule",
                )
                .fetch_all(&self.$reader)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok($crate::store::alerts::RuleFailure {
                            uid: r.try_get("uid")?,
                            rule: r.try_get("rule")?,
                            error: r.try_get("error")?,
                            since: $crate::store::alerts::from_ms(r.try_get("since_ms")?),
                        })
                    })
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn set_rule_failures(
                &self,
                failing: &[$crate::store::alerts::RuleFailure],
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<(), $crate::store::StoreError> {
                let now = $crate::store::alerts::ms(now);
                let mut tx = self.$writer.begin().await?;
                for f in failing {
                    sqlx::query(
                        "INSERT INTO alert_rule_status (uid, rule, error, since_ms, checked_at_ms) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (uid) DO UPDATE SET \
                         rule = excluded.rule, error = excluded.error, checked_at_ms = excluded.checked_at_ms",
                    )
                    .bind(&f.uid)
                    .bind(&f.rule)
                    .bind(&f.error)
                    .bind($crate::store::alerts::ms(f.since))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                // Every rule not failing now has recovered (or is gone).
                sqlx::query("DELETE FROM alert_rule_status WHERE checked_at_ms < $1")
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn write_rule(
                &self,
                name: &str,
                spec: &str,
                actor: &str,
                mode: $crate::store::alerts::WriteMode,
            ) -> Result<$crate::store::alerts::RuleWritten, $crate::store::StoreError> {
                use $crate::store::alerts::{rule_from_row, RuleWritten, WriteMode};
                let now = $crate::store::alerts::ms(chrono::Utc::now());
                let mut tx = self.$writer.begin_with($begin).await?;
                let old = sqlx::query(concat!(
                    "SELECT name, uid, spec, version, created_at_ms, updated_at_ms, updated_by \
                     FROM alert_rules WHERE name = $1",
                    $lock
                ))
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| rule_from_row(&r))
                .transpose()?;
                let (action, before) = match &old {
                    Some(_) if mode == WriteMode::Create => return Ok(RuleWritten::Exists),
                    Some(old) if old.spec == spec => return Ok(RuleWritten::Unchanged(old.clone())),
                    Some(old) => ("rule.update", Some(old.spec.clone())),
                    None => ("rule.create", None),
                };
                let row = match &old {
                    Some(old) => {
                        sqlx::query(
                            "UPDATE alert_rules SET spec = $2, version = version + 1, \
                             updated_at_ms = $3, updated_by = $4 WHERE name = $1 \
                             RETURNING name, uid, spec, version, created_at_ms, updated_at_ms, updated_by",
                        )
                        .bind(&old.name)
                        .bind(spec)
                        .bind(now)
                        .bind(actor)
                        .fetch_one(&mut *tx)
                        .await?
                    }
                    None => {
                        let inserted = sqlx::query(
                            "INSERT INTO alert_rules (name, uid, spec, version, created_at_ms, updated_at_ms, updated_by) \
                             VALUES ($1, $2, $3, 1, $4, $4, $5) ON CONFLICT (name) DO NOTHING \
                             RETURNING name, uid, spec, version, created_at_ms, updated_at_ms, updated_by",
                        )
                        .bind(name)
                        .bind($crate::store::alerts::new_uid())
                        .bind(spec)
                        .bind(now)
                        .bind(actor)
                        .fetch_optional(&mut *tx)
                        .await?;
                        match inserted {
                            Some(r) => r,
                            // Created concurrently by another writer.
                            None => return Ok(RuleWritten::Exists),
                        }
                    }
                };
                sqlx::query(
                    "INSERT INTO alert_audit (at_ms, actor, action, target, before, after) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(now)
                .bind(actor)
                .bind(action)
                .bind(name)
                .bind(before)
                .bind(spec)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                let row = rule_from_row(&row)?;
                Ok(if old.is_some() {
                    RuleWritten::Updated(row)
                } else {
                    RuleWritten::Created(row)
                })
            }

            async fn delete_rule(
                &self,
                name: &str,
                actor: &str,
            ) -> Result<Option<$crate::store::alerts::RuleRow>, $crate::store::StoreError> {
                let now = $crate::store::alerts::ms(chrono::Utc::now());
                let mut tx = self.$writer.begin_with($begin).await?;
                let old = sqlx::query(
                    "DELETE FROM alert_rules WHERE name = $1 \
                     RETURNING name, uid, spec, version, created_at_ms, updated_at_ms, updated_by",
                )
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| $crate::store::alerts::rule_from_row(&r))
                .transpose()?;
                if let Some(old) = &old {
                    sqlx::query(
                        "INSERT INTO alert_audit (at_ms, actor, action, target, before, after) \
                         VALUES ($1, $2, 'rule.delete', $3, $4, NULL)",
                    )
                    .bind(now)
                    .bind(actor)
                    .bind(name)
                    .bind(&old.spec)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(old)
            }

            async fn audit_log(
                &self,
                target: Option<&str>,
                limit: i64,
            ) -> Result<Vec<$crate::store::alerts::AuditRow>, $crate::store::StoreError> {
                let rows = sqlx::query(
                    "SELECT id, at_ms, actor, action, target, before, after FROM alert_audit \
                     WHERE CAST($1 AS TEXT) IS NULL OR target = $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(target)
                .bind(limit)
                .fetch_all(&self.$reader)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    use sqlx::Row;
                    out.push($crate::store::alerts::AuditRow {
                        id: r.try_get(0)?,
                        at: $crate::store::alerts::from_ms(r.try_get(1)?),
                        actor: r.try_get(2)?,
                        action: r.try_get(3)?,
                        target: r.try_get(4)?,
                        before: r.try_get(5)?,
                        after: r.try_get(6)?,
                    });
                }
                Ok(out)
            }

            async fn quotas(
                &self,
            ) -> Result<Vec<$crate::store::alerts::QuotaRow>, $crate::store::StoreError> {
                let rows = sqlx::query(
                    "SELECT key, uid, spec, updated_at_ms, updated_by FROM key_quotas ORDER BY key",
                )
                .fetch_all(&self.$reader)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    use sqlx::Row;
                    out.push($crate::store::alerts::QuotaRow {
                        key: r.try_get(0)?,
                        uid: r.try_get(1)?,
                        spec: r.try_get(2)?,
                        updated_at: $crate::store::alerts::from_ms(r.try_get(3)?),
                        updated_by: r.try_get(4)?,
                    });
                }
                Ok(out)
            }

            async fn put_quota(
                &self,
                key: &str,
                spec: &str,
                actor: &str,
            ) -> Result<($crate::store::alerts::QuotaRow, bool), $crate::store::StoreError> {
                use sqlx::Row;
                let now_t = chrono::Utc::now();
                let now = $crate::store::alerts::ms(now_t);
                let mut tx = self.$writer.begin_with($begin).await?;
                let old: Option<(String, String)> = sqlx::query(concat!(
                    "SELECT uid, spec FROM key_quotas WHERE key = $1",
                    $lock
                ))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()?;
                let uid = match &old {
                    Some((uid, _)) => uid.clone(),
                    None => $crate::store::alerts::new_uid(),
                };
                sqlx::query(
                    "INSERT INTO key_quotas (key, uid, spec, updated_at_ms, updated_by) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (key) DO UPDATE SET spec = excluded.spec, updated_at_ms = excluded.updated_at_ms, \
                     updated_by = excluded.updated_by",
                )
                .bind(key)
                .bind(&uid)
                .bind(spec)
                .bind(now)
                .bind(actor)
                .execute(&mut *tx)
                .await?;
                if old.as_ref().is_none_or(|(_, s)| s != spec) {
                    sqlx::query(
                        "INSERT INTO alert_audit (at_ms, actor, action, target, before, after) \
                         VALUES ($1, $2, 'quota.set', $3, $4, $5)",
                    )
                    .bind(now)
                    .bind(actor)
                    .bind(format!("quota:{key}"))
                    .bind(old.as_ref().map(|(_, s)| s.clone()))
                    .bind(spec)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok((
                    $crate::store::alerts::QuotaRow {
                        key: key.to_string(),
                        uid,
                        spec: spec.to_string(),
                        updated_at: $crate::store::alerts::from_ms(now),
                        updated_by: actor.to_string(),
                    },
                    old.is_none(),
                ))
            }

            async fn delete_quota(
                &self,
                key: &str,
                actor: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                use sqlx::Row;
                let now = $crate::store::alerts::ms(chrono::Utc::now());
                let mut tx = self.$writer.begin_with($begin).await?;
                let old = sqlx::query("DELETE FROM key_quotas WHERE key = $1 RETURNING spec")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(old) = old else {
                    return Ok(false);
                };
                let spec: String = old.try_get(0)?;
                sqlx::query(
                    "INSERT INTO alert_audit (at_ms, actor, action, target, before, after) \
                     VALUES ($1, $2, 'quota.delete', $3, $4, NULL)",
                )
                .bind(now)
                .bind(actor)
                .bind(format!("quota:{key}"))
                .bind(spec)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn alert_instances(
                &self,
            ) -> Result<Vec<$crate::store::alerts::InstanceRow>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM alert_instances ORDER BY fingerprint",
                    $crate::store::alerts::INSTANCE_COLUMNS
                ))
                .fetch_all(&self.$reader)
                .await?;
                Ok(rows
                    .iter()
                    .map($crate::store::alerts::instance_from_row)
                    .collect::<Result<_, _>>()?)
            }

            async fn active_instances(
                &self,
            ) -> Result<Vec<$crate::store::alerts::InstanceRow>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM alert_instances WHERE state IN ('pending', 'firing') ORDER BY fingerprint",
                    $crate::store::alerts::INSTANCE_COLUMNS
                ))
                .fetch_all(&self.$reader)
                .await?;
                Ok(rows
                    .iter()
                    .map($crate::store::alerts::instance_from_row)
                    .collect::<Result<_, _>>()?)
            }

            async fn instances_by_fingerprint(
                &self,
                fingerprints: &[String],
            ) -> Result<Vec<$crate::store::alerts::InstanceRow>, $crate::store::StoreError> {
                let mut out = Vec::new();
                // Bounded statements: SQLite binds at most 32,766 values.
                for chunk in fingerprints.chunks(500) {
                    let list = (1..=chunk.len())
                        .map(|i| format!("${i}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!(
                        "SELECT {} FROM alert_instances WHERE fingerprint IN ({list})",
                        $crate::store::alerts::INSTANCE_COLUMNS
                    );
                    let mut q = sqlx::query(&sql);
                    for fp in chunk {
                        q = q.bind(fp);
                    }
                    let rows = q.fetch_all(&self.$reader).await?;
                    for r in &rows {
                        out.push($crate::store::alerts::instance_from_row(r)?);
                    }
                }
                Ok(out)
            }

            async fn commit_transitions(
                &self,
                writes: &[$crate::store::alerts::InstanceWrite],
                notifications: &[$crate::store::alerts::NewNotification],
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::alerts::InstanceBinds;
                let mut tx = self.$writer.begin_with($begin).await?;
                for w in writes {
                    let r = &w.row;
                    let b = InstanceBinds::of(r);
                    let query = match w.expected_version {
                        Some(_) => sqlx::query(
                            "UPDATE alert_instances SET rule = $2, rule_uid = $3, level = $4, grp = $5, \
                             severity = $6, state = $7, value = $8, threshold = $9, active_since_ms = $10, \
                             firing_since_ms = $11, last_true_ms = $12, last_sent_ms = $13, resolved_at_ms = $14, \
                             sequence = $15, version = version + 1, updated_at_ms = $16 \
                             WHERE fingerprint = $1 AND version = $17",
                        ),
                        None => sqlx::query(
                            "INSERT INTO alert_instances (fingerprint, rule, rule_uid, level, grp, severity, state, \
                             value, threshold, active_since_ms, firing_since_ms, last_true_ms, last_sent_ms, \
                             resolved_at_ms, sequence, version, updated_at_ms) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 1, $16) \
                             ON CONFLICT (fingerprint) DO NOTHING",
                        ),
                    };
                    let mut query = query
                        .bind(&r.fingerprint)
                        .bind(&r.rule)
                        .bind(&r.rule_uid)
                        .bind(&r.level)
                        .bind(&r.group)
                        .bind(&r.severity)
                        .bind(r.life.state.as_str())
                        .bind(r.value)
                        .bind(r.threshold);
                    for t in b.times {
                        query = query.bind(t);
                    }
                    query = query.bind(r.life.sequence).bind(b.updated_at_ms);
                    if let Some(v) = w.expected_version {
                        query = query.bind(v);
                    }
                    if query.execute(&mut *tx).await?.rows_affected() != 1 {
                        // Another evaluator moved this instance first.
                        tx.rollback().await?;
                        return Ok(false);
                    }
                }
                for n in notifications {
                    sqlx::query(
                        "INSERT INTO alert_outbox (fingerprint, sequence, rule, state, severity, subject, payload, created_at_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    )
                    .bind(&n.fingerprint)
                    .bind(n.sequence)
                    .bind(&n.rule)
                    .bind(n.state.as_str())
                    .bind(&n.severity)
                    .bind(&n.subject)
                    .bind(&n.payload)
                    .bind($crate::store::alerts::ms(n.created_at))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn unsent_notifications(
                &self,
                limit: i64,
            ) -> Result<Vec<$crate::store::alerts::NotificationRow>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM alert_outbox WHERE sent_at_ms IS NULL ORDER BY id LIMIT $1",
                    $crate::store::alerts::OUTBOX_COLUMNS
                ))
                .bind(limit)
                .fetch_all(&self.$writer)
                .await?;
                Ok(rows
                    .iter()
                    .map($crate::store::alerts::notification_from_row)
                    .collect::<Result<_, _>>()?)
            }

            async fn mark_sent(
                &self,
                ids: &[i64],
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<(), $crate::store::StoreError> {
                if ids.is_empty() {
                    return Ok(());
                }
                let list = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
                sqlx::query(&format!(
                    "UPDATE alert_outbox SET sent_at_ms = $1 WHERE sent_at_ms IS NULL AND id IN ({list})"
                ))
                .bind($crate::store::alerts::ms(at))
                .execute(&self.$writer)
                .await?;
                Ok(())
            }

            async fn notifications(
                &self,
                f: &$crate::store::alerts::HistoryFilter,
            ) -> Result<Vec<$crate::store::alerts::NotificationRow>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM alert_outbox WHERE (CAST($1 AS TEXT) IS NULL OR rule = $1) \
                     AND (CAST($2 AS TEXT) IS NULL OR state = $2) AND created_at_ms >= $3 AND created_at_ms < $4 \
                     ORDER BY id DESC LIMIT $5",
                    $crate::store::alerts::OUTBOX_COLUMNS
                ))
                .bind(f.rule.as_deref())
                .bind(f.state.map($crate::store::alerts::AlertState::as_str))
                .bind(f.from.map($crate::store::alerts::ms).unwrap_or(i64::MIN))
                .bind(f.to.map($crate::store::alerts::ms).unwrap_or(i64::MAX))
                .bind(f.limit)
                .fetch_all(&self.$reader)
                .await?;
                Ok(rows
                    .iter()
                    .map($crate::store::alerts::notification_from_row)
                    .collect::<Result<_, _>>()?)
            }

            async fn try_named_lease(
                &self,
                name: &str,
                holder: &str,
                ttl: std::time::Duration,
            ) -> Result<bool, $crate::store::StoreError> {
                let now = $crate::store::alerts::ms(chrono::Utc::now());
                let until = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4);
                let done = sqlx::query(
                    "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
                     WHERE leases.holder = excluded.holder OR leases.until_ms < $4",
                )
                .bind(name)
                .bind(holder)
                .bind(until)
                .bind(now)
                .execute(&self.$writer)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn release_named_lease(
                &self,
                name: &str,
                holder: &str,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
                    .bind(name)
                    .bind(holder)
                    .execute(&self.$writer)
                    .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_alert_store;
