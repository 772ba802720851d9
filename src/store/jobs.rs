//! The record of scheduled job runs, and retention of the history tables.

use chrono::{DateTime, Utc};

use super::alerts::{from_ms, ms};
use super::db::{Db, Row, Sql};
use super::StoreError;

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
/// Columns of `job_runs`.
const JOB_RUN_COLUMNS: &str = "id, job, slot_ms, trigger, instance, started_at_ms, finished_at_ms, outcome, rows_affected, detail";

/// Reads one row of [`JOB_RUN_COLUMNS`].
fn job_run_from_row(row: &Row) -> Result<JobRunRow, sqlx::Error> {
    Ok(JobRunRow {
        id: row.get("id")?,
        job: row.get("job")?,
        slot: from_ms(row.get("slot_ms")?),
        trigger: row.get("trigger")?,
        instance: row.get("instance")?,
        started_at: from_ms(row.get("started_at_ms")?),
        finished_at: row.get::<Option<i64>, _>("finished_at_ms")?.map(from_ms),
        outcome: row.get("outcome")?,
        rows_affected: row.get("rows_affected")?,
        detail: row.get("detail")?,
    })
}

/// The `job_runs` table and the history tables' retention.
#[derive(Debug, Clone)]
pub struct Jobs {
    db: Db,
}

impl Jobs {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }

    /// Claims the occurrence `(job, slot)`: its run id, or `None` when
    /// another instance (or an earlier start) has it.
    pub async fn start_job_run(
        &self,
        job: &str,
        slot: DateTime<Utc>,
        trigger: &str,
        instance: &str,
    ) -> Result<Option<i64>, StoreError> {
        let row = self
            .db
            .writer()
            .fetch_optional(
                Sql::new(
                    "INSERT INTO job_runs (job, slot_ms, trigger, instance, started_at_ms, outcome) \
                     VALUES ($1, $2, $3, $4, $5, 'running') ON CONFLICT (job, slot_ms) DO NOTHING RETURNING id",
                )
                .bind(job)
                .bind(ms(slot))
                .bind(trigger)
                .bind(instance)
                .bind(ms(Utc::now())),
            )
            .await?;
        Ok(row.map(|r| r.get("id")).transpose()?)
    }

    /// Records how a run ended.
    pub async fn finish_job_run(
        &self,
        id: i64,
        outcome: &str,
        rows_affected: i64,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        self.db
            .writer()
            .execute(
                Sql::new(
                    "UPDATE job_runs SET finished_at_ms = $1, outcome = $2, rows_affected = $3, detail = $4 \
                     WHERE id = $5",
                )
                .bind(ms(Utc::now()))
                .bind(outcome)
                .bind(rows_affected)
                .bind(detail)
                .bind(id),
            )
            .await?;
        Ok(())
    }

    /// The latest runs, newest first, optionally of one job.
    pub async fn job_runs(
        &self,
        job: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRunRow>, StoreError> {
        self.db
            .reader()
            .read_all(
                Sql::new(format!(
                    "SELECT {JOB_RUN_COLUMNS} FROM job_runs WHERE (CAST($1 AS TEXT) IS NULL OR job = $1) \
                     ORDER BY id DESC LIMIT $2"
                ))
                .bind(job)
                .bind(limit),
            job_run_from_row,
            )
            .await
    }

    /// Deletes up to `limit` finished rows of a history table older than `cutoff`.
    pub async fn delete_history_before(
        &self,
        table: History,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        self.db
            .delete_batch(table.delete_sql(), ms(cutoff), limit)
            .await
    }
}
