//! The operations side of the store: API tokens, the record of scheduled job
//! runs, and the bulk copy of alert state between deployments.
//!
//! Like [`super::alerts`], the tables (`schema/*/0004_ops.sql`) keep times as
//! Unix milliseconds so one SQL text serves both backends ([`impl_ops_store!`]).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::alerts::{AuditRow, InstanceRow, NotificationRow, QuotaRow, RuleRow};
use super::StoreError;

/// A stored API token (never the secret: only its SHA-256).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    /// Public id, also the token's visible prefix.
    pub id: String,
    /// Unique among active tokens.
    pub name: String,
    /// Comma-separated scopes.
    pub scopes: String,
    /// Hex SHA-256 of the whole token.
    pub token_sha256: String,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// When revoked (revoked tokens are kept for the record).
    pub revoked_at: Option<DateTime<Utc>>,
}

/// One run of a scheduled (or manually started) job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRunRow {
    /// Order of runs.
    pub id: i64,
    /// `retention`, `reconciliation` or `optimize`.
    pub job: String,
    /// The cron occurrence the run belongs to (a manual run: when it started).
    pub slot: DateTime<Utc>,
    /// `schedule` or `manual`.
    pub trigger: String,
    /// The Tally instance that ran it.
    pub instance: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished (`None` while running, or if the process died).
    pub finished_at: Option<DateTime<Utc>>,
    /// `running`, `ok` or `failed`.
    pub outcome: String,
    /// Rows deleted, compared or optimised, per job.
    pub rows_affected: i64,
    /// JSON with what the job found (mismatches, per-table counts, the error).
    pub detail: Option<String>,
}

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

/// The history tables the retention job trims, and which rows of each may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// `alert_outbox` rows the stream acknowledged (unsent ones always stay).
    SentNotifications,
    /// `alert_instances` that are resolved or inactive, by their last change.
    ResolvedInstances,
    /// Finished `job_runs`.
    JobRuns,
    /// `alert_audit` entries.
    Audit,
}

impl History {
    /// Every history table, in the order the retention job trims them.
    pub const ALL: [History; 4] = [
        History::SentNotifications,
        History::ResolvedInstances,
        History::JobRuns,
        History::Audit,
    ];

    /// The table's name.
    pub fn table(self) -> &'static str {
        match self {
            History::SentNotifications => "alert_outbox",
            History::ResolvedInstances => "alert_instances",
            History::JobRuns => "job_runs",
            History::Audit => "alert_audit",
        }
    }

    /// The `DELETE` (same text on both backends: times are Unix ms), `$1` the
    /// cutoff and `$2` the limit.
    pub fn delete_sql(self) -> &'static str {
        match self {
            History::SentNotifications => "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox \
                 WHERE sent_at_ms IS NOT NULL AND created_at_ms < $1 ORDER BY id LIMIT $2)",
            History::ResolvedInstances => "DELETE FROM alert_instances WHERE fingerprint IN (SELECT fingerprint \
                 FROM alert_instances WHERE state IN ('resolved', 'inactive') AND updated_at_ms < $1 LIMIT $2)",
            History::JobRuns => "DELETE FROM job_runs WHERE id IN (SELECT id FROM job_runs \
                 WHERE outcome <> 'running' AND started_at_ms < $1 ORDER BY id LIMIT $2)",
            History::Audit => "DELETE FROM alert_audit WHERE id IN (SELECT id FROM alert_audit \
                 WHERE at_ms < $1 ORDER BY id LIMIT $2)",
        }
    }
}

/// Tokens, job runs and bulk alert state. One implementation per backend, from one SQL text.
#[async_trait]
pub trait OpsStore: Send + Sync {
    /// Stores a token; false when an active token already has its name.
    async fn create_token(&self, t: &TokenRow) -> Result<bool, StoreError>;
    /// Every token, active first, then by name.
    async fn tokens(&self) -> Result<Vec<TokenRow>, StoreError>;
    /// Deletes up to `limit` rows of a history table older than `cutoff`
    /// (see [`History`]); returns how many.
    async fn delete_history_before(
        &self,
        table: History,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError>;
    /// A persistent setting (table `settings`), `None` when never set.
    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Sets a persistent setting.
    async fn put_setting(&self, name: &str, value: &str) -> Result<(), StoreError>;
    /// Revokes the active token with this name or id; false when there is none.
    async fn revoke_token(&self, name_or_id: &str, at: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Records the start of a run. `None` when a run of this job already
    /// holds `slot`: another instance took this occurrence.
    async fn start_job_run(
        &self,
        job: &str,
        slot: DateTime<Utc>,
        trigger: &str,
        instance: &str,
    ) -> Result<Option<i64>, StoreError>;
    /// Records how a run ended.
    async fn finish_job_run(
        &self,
        id: i64,
        outcome: &str,
        rows_affected: i64,
        detail: Option<&str>,
    ) -> Result<(), StoreError>;
    /// The most recent runs, newest first, optionally of one job.
    async fn job_runs(&self, job: Option<&str>, limit: i64) -> Result<Vec<JobRunRow>, StoreError>;
    /// Notifications not yet published.
    async fn outbox_backlog(&self) -> Result<i64, StoreError>;
    /// Reads every alert table and the tokens.
    async fn alert_state(&self) -> Result<AlertSnapshot, StoreError>;
    /// Writes `state` into empty tables, keeping ids, uids and versions, in one transaction.
    async fn restore_alert_state(&self, state: &AlertSnapshot) -> Result<(), StoreError>;
    /// Count and sums of the whole log, to verify a copy.
    async fn log_totals(&self) -> Result<super::LogTotals, StoreError>;
}

/// Reads one row of [`TOKEN_COLUMNS`].
pub(crate) fn token_from_row<'r, R>(row: &'r R) -> Result<TokenRow, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    use super::alerts::from_ms;
    Ok(TokenRow {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        scopes: row.try_get(2)?,
        token_sha256: row.try_get(3)?,
        created_at: from_ms(row.try_get(4)?),
        created_by: row.try_get(5)?,
        revoked_at: row.try_get::<Option<i64>, _>(6)?.map(from_ms),
    })
}

/// Columns of `api_tokens`, in [`token_from_row`] order.
pub(crate) const TOKEN_COLUMNS: &str =
    "id, name, scopes, token_sha256, created_at_ms, created_by, revoked_at_ms";

/// Columns of `job_runs`, in [`job_run_from_row`] order.
pub(crate) const JOB_RUN_COLUMNS: &str = "id, job, slot_ms, trigger, instance, started_at_ms, finished_at_ms, outcome, rows_affected, detail";

/// Reads one row of [`JOB_RUN_COLUMNS`].
pub(crate) fn job_run_from_row<'r, R>(row: &'r R) -> Result<JobRunRow, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    use super::alerts::from_ms;
    Ok(JobRunRow {
        id: row.try_get(0)?,
        job: row.try_get(1)?,
        slot: from_ms(row.try_get(2)?),
        trigger: row.try_get(3)?,
        instance: row.try_get(4)?,
        started_at: from_ms(row.try_get(5)?),
        finished_at: row.try_get::<Option<i64>, _>(6)?.map(from_ms),
        outcome: row.try_get(7)?,
        rows_affected: row.try_get(8)?,
        detail: row.try_get(9)?,
    })
}

/// Implements [`OpsStore`] for a backend: `$writer` and `$reader` name its
/// pools and `$begin` the statement that opens a write transaction.
macro_rules! impl_ops_store {
    ($store:ty, $writer:ident, $reader:ident, $begin:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::ops::OpsStore for $store {
            async fn create_token(
                &self,
                t: &$crate::store::ops::TokenRow,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::store::alerts::ms;
                let done = sqlx::query(
                    "INSERT INTO api_tokens (id, name, scopes, token_sha256, created_at_ms, created_by) \
                     SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS \
                     (SELECT 1 FROM api_tokens WHERE name = $2 AND revoked_at_ms IS NULL)",
                )
                .bind(&t.id)
                .bind(&t.name)
                .bind(&t.scopes)
                .bind(&t.token_sha256)
                .bind(ms(t.created_at))
                .bind(&t.created_by)
                .execute(&self.$writer)
                .await;
                match done {
                    Ok(d) => Ok(d.rows_affected() == 1),
                    // Two creates of one name racing: the partial unique index decides.
                    Err(sqlx::Error::Database(e))
                        if e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(e.into()),
                }
            }

            async fn tokens(
                &self,
            ) -> Result<Vec<$crate::store::ops::TokenRow>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM api_tokens ORDER BY revoked_at_ms IS NOT NULL, name, created_at_ms",
                    $crate::store::ops::TOKEN_COLUMNS
                ))
                .fetch_all(&self.$reader)
                .await?;
                Ok(rows
                    .iter()
                    .map($crate::store::ops::token_from_row)
                    .collect::<Result<_, _>>()?)
            }

            async fn delete_history_before(
                &self,
                table: $crate::store::ops::History,
                cutoff: chrono::DateTime<chrono::Utc>,
                limit: i64,
            ) -> Result<u64, $crate::store::StoreError> {
                let done = sqlx::query(table.delete_sql())
                    .bind($crate::store::alerts::ms(cutoff))
                    .bind(limit)
                    .execute(&self.$writer)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn setting(
                &self,
                name: &str,
            ) -> Result<Option<String>, $crate::store::StoreError> {
                Ok(sqlx::query_scalar("SELECT value FROM settings WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.$reader)
                    .await?)
            }

            async fn put_setting(
                &self,
                name: &str,
                value: &str,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO settings (name, value, updated_at_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                )
                .bind(name)
                .bind(value)
                .bind($crate::store::alerts::ms(chrono::Utc::now()))
                .execute(&self.$writer)
                .await?;
                Ok(())
            }

            async fn revoke_token(
                &self,
                name_or_id: &str,
                at: chrono::DateTime<chrono::Utc>,
            ) -> Result<bool, $crate::store::StoreError> {
                let done = sqlx::query(
                    "UPDATE api_tokens SET revoked_at_ms = $1 \
                     WHERE (name = $2 OR id = $2) AND revoked_at_ms IS NULL",
                )
                .bind($crate::store::alerts::ms(at))
                .bind(name_or_id)
                .execute(&self.$writer)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn start_job_run(
                &self,
                job: &str,
                slot: chrono::DateTime<chrono::Utc>,
                trigger: &str,
                instance: &str,
            ) -> Result<Option<i64>, $crate::store::StoreError> {
                use $crate::store::alerts::ms;
                let id: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO job_runs (job, slot_ms, trigger, instance, started_at_ms, outcome) \
                     VALUES ($1, $2, $3, $4, $5, 'running') ON CONFLICT (job, slot_ms) DO NOTHING RETURNING id",
                )
                .bind(job)
                .bind(ms(slot))
                .bind(trigger)
                .bind(instance)
                .bind(ms(chrono::Utc::now()))
                .fetch_optional(&self.$writer)
                .await?;
                Ok(id)
            }

            async fn finish_job_run(
                &self,
                id: i64,
                outcome: &str,
                rows_affected: i64,
                detail: Option<&str>,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "UPDATE job_runs SET finished_at_ms = $1, outcome = $2, rows_affected = $3, detail = $4 \
                     WHERE id = $5",
                )
                .bind($crate::store::alerts::ms(chrono::Utc::now()))
                .bind(outcome)
                .bind(rows_affected)
                .bind(detail)
                .bind(id)
                .execute(&self.$writer)
                .await?;
                Ok(())
            }

            async fn job_runs(
                &self,
                job: Option<&str>,
                limit: i64,
            ) -> Result<Vec<$crate::store::ops::JobRunRow>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM job_runs WHERE (CAST($1 AS TEXT) IS NULL OR job = $1) \
                     ORDER BY id DESC LIMIT $2",
                    $crate::store::ops::JOB_RUN_COLUMNS
                ))
                .bind(job)
                .bind(limit)
                .fetch_all(&self.$reader)
                .await?;
                Ok(rows
                    .iter()
                    .map($crate::store::ops::job_run_from_row)
                    .collect::<Result<_, _>>()?)
            }

            async fn log_totals(
                &self,
            ) -> Result<$crate::store::LogTotals, $crate::store::StoreError> {
                let (events, errors, cost_nanos, tokens_in, tokens_out, bytes) = sqlx::query_as::<
                    _,
                    (i64, i64, i64, i64, i64, i64),
                >(
                    "SELECT count(*), \
                     CAST(COALESCE(SUM(CASE WHEN success THEN 0 ELSE 1 END), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(tokens_in), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(tokens_out), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(COALESCE(request_bytes, 0) + COALESCE(response_bytes, 0)), 0) AS BIGINT) \
                     FROM usage_events",
                )
                .fetch_one(&self.$reader)
                .await?;
                Ok($crate::store::LogTotals {
                    events,
                    errors,
                    cost_nanos,
                    tokens_in,
                    tokens_out,
                    bytes,
                })
            }

            async fn outbox_backlog(&self) -> Result<i64, $crate::store::StoreError> {
                Ok(
                    sqlx::query_scalar("SELECT count(*) FROM alert_outbox WHERE sent_at_ms IS NULL")
                        .fetch_one(&self.$reader)
                        .await?,
                )
            }

            async fn alert_state(
                &self,
            ) -> Result<$crate::store::ops::AlertSnapshot, $crate::store::StoreError> {
                use $crate::store::alerts::AlertStore;
                let outbox = sqlx::query(&format!(
                    "SELECT {} FROM alert_outbox ORDER BY id",
                    $crate::store::alerts::OUTBOX_COLUMNS
                ))
                .fetch_all(&self.$reader)
                .await?
                .iter()
                .map($crate::store::alerts::notification_from_row)
                .collect::<Result<_, _>>()?;
                let mut audit = self.audit_log(None, i64::MAX).await?;
                audit.reverse();
                Ok($crate::store::ops::AlertSnapshot {
                    rules: self.alert_rules().await?,
                    quotas: self.quotas().await?,
                    instances: self.alert_instances().await?,
                    outbox,
                    audit,
                    tokens: $crate::store::ops::OpsStore::tokens(self).await?,
                })
            }

            async fn restore_alert_state(
                &self,
                s: &$crate::store::ops::AlertSnapshot,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::alerts::{ms, InstanceBinds};
                let mut tx = self.$writer.begin_with($begin).await?;
                for r in &s.rules {
                    sqlx::query(
                        "INSERT INTO alert_rules (name, uid, spec, version, created_at_ms, updated_at_ms, updated_by) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&r.name)
                    .bind(&r.uid)
                    .bind(&r.spec)
                    .bind(r.version)
                    .bind(ms(r.created_at))
                    .bind(ms(r.updated_at))
                    .bind(&r.updated_by)
                    .execute(&mut *tx)
                    .await?;
                }
                for q in &s.quotas {
                    sqlx::query(
                        "INSERT INTO key_quotas (key, uid, spec, updated_at_ms, updated_by) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(&q.key)
                    .bind(&q.uid)
                    .bind(&q.spec)
                    .bind(ms(q.updated_at))
                    .bind(&q.updated_by)
                    .execute(&mut *tx)
                    .await?;
                }
                for i in &s.instances {
                    let b = InstanceBinds::of(i);
                    sqlx::query(&format!(
                        "INSERT INTO alert_instances ({}) VALUES \
                         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                        $crate::store::alerts::INSTANCE_COLUMNS
                    ))
                    .bind(&i.fingerprint)
                    .bind(&i.rule)
                    .bind(&i.rule_uid)
                    .bind(&i.level)
                    .bind(&i.group)
                    .bind(&i.severity)
                    .bind(i.life.state.as_str())
                    .bind(i.value)
                    .bind(i.threshold)
                    .bind(b.times[0])
                    .bind(b.times[1])
                    .bind(b.times[2])
                    .bind(b.times[3])
                    .bind(b.times[4])
                    .bind(i.life.sequence)
                    .bind(i.version)
                    .bind(b.updated_at_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                // Outbox and audit rows get new ids in their old order: ids
                // only order rows, and identity columns refuse explicit values.
                for o in &s.outbox {
                    sqlx::query(
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
                    .bind(o.sent_at.map(ms))
                    .execute(&mut *tx)
                    .await?;
                }
                for a in &s.audit {
                    sqlx::query(
                        "INSERT INTO alert_audit (at_ms, actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(ms(a.at))
                    .bind(&a.actor)
                    .bind(&a.action)
                    .bind(&a.target)
                    .bind(&a.before)
                    .bind(&a.after)
                    .execute(&mut *tx)
                    .await?;
                }
                for t in &s.tokens {
                    sqlx::query(&format!(
                        "INSERT INTO api_tokens ({}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        $crate::store::ops::TOKEN_COLUMNS
                    ))
                    .bind(&t.id)
                    .bind(&t.name)
                    .bind(&t.scopes)
                    .bind(&t.token_sha256)
                    .bind(ms(t.created_at))
                    .bind(&t.created_by)
                    .bind(t.revoked_at.map(ms))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_ops_store;
