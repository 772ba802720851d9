//! Scheduled jobs: retention, reconciliation and database housekeeping.
//!
//! Every instance schedules every job (tokio-cron-scheduler, UTC only: the
//! crate's timezone schedules drift at DST changes). Exactly one instance runs
//! each occurrence: a run starts by inserting `(job, slot)` into `job_runs`,
//! where `slot` is the cron occurrence, and the unique key lets one insert win.
//! Each job is idempotent, so a run cut short by a crash is simply finished by
//! the next occurrence (or `tally jobs run`).
//!
//! - **retention** deletes raw events older than `TALLY_RETENTION` and rows
//!   of aggregate granularities past their spec's `retention`, in bounded
//!   batches. Configuration refuses a raw retention shorter than the
//!   late-arrival horizon plus [`RETENTION_MARGIN`]: an event Tally can still
//!   accept always finds its earlier copy to deduplicate against.
//! - **reconciliation** recomputes yesterday's hourly and daily rows (and those
//!   of any earlier day that late events touched since the last run) from the
//!   raw log, in the same snapshot as the stored rows and the projection's
//!   checkpoint, and compares. A differing day raises the alert
//!   [`RECONCILIATION_RULE`](crate::alert::reconcile::RECONCILIATION_RULE) through the alert outbox (once; it resolves when a
//!   later run finds the day equal again).
//! - **optimize** runs the backend's housekeeping ([`Store::maintenance`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::aggregate::bucket::{day_start, next_bucket};
use crate::aggregate::spec::{Granularity, Spec};
use crate::alert::{reconcile, AlertError};
use crate::config::JobsConfig;
use crate::projection::fold::Fold;
use crate::store::jobs::History;
use crate::store::{Store, StoreError};

/// How much longer than the late-arrival horizon raw events must be kept.
pub const RETENTION_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// The jobs Tally runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Job {
    /// Deletes old raw events and old fine-grained aggregate rows.
    Retention,
    /// Compares stored aggregates with a recomputation from the raw log.
    Reconciliation,
    /// SQLite `PRAGMA optimize` and WAL checkpoint; PostgreSQL `ANALYZE`.
    Optimize,
}

impl Job {
    /// Every job.
    pub const ALL: [Job; 3] = [Job::Retention, Job::Reconciliation, Job::Optimize];

    /// The name in `job_runs.job` and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Job::Retention => "retention",
            Job::Reconciliation => "reconciliation",
            Job::Optimize => "optimize",
        }
    }

    /// Parses a job name.
    pub fn parse(s: &str) -> Option<Job> {
        Job::ALL.into_iter().find(|j| j.as_str() == s)
    }

    /// Its cron expression in `cfg`; `None` when set to `off` (or empty).
    pub fn cron(self, cfg: &JobsConfig) -> Option<&str> {
        let expr = match self {
            Job::Retention => &cfg.job_retention_cron,
            Job::Reconciliation => &cfg.job_reconciliation_cron,
            Job::Optimize => &cfg.job_optimize_cron,
        }
        .trim();
        (!expr.is_empty() && expr != "off").then_some(expr)
    }
}

/// Why a job could not be scheduled or run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The reconciliation alert could not be written.
    #[error(transparent)]
    Alert(#[from] AlertError),
    /// A setting is invalid.
    #[error("{0}")]
    Config(String),
    /// The scheduler failed.
    #[error("scheduler: {0}")]
    Scheduler(String),
}

/// Everything a job needs.
#[derive(Clone)]
pub struct JobContext {
    /// The deployment's store.
    pub store: Store,
    /// The projections (for aggregate retention and reconciliation).
    pub specs: Vec<Arc<Spec>>,
    /// Raw-event retention; `None` keeps everything.
    pub retention: Option<Duration>,
    /// Rows per delete statement.
    pub batch: i64,
    /// This process, recorded in `job_runs.instance`.
    pub instance: String,
    /// Subject prefix of alert notifications.
    pub alert_prefix: String,
    /// Retention of the history tables.
    pub history: HistoryRetention,
}

/// How long the history tables keep their rows (`None`: forever).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryRetention {
    /// `rejected_events`, by received time; at least the late-arrival horizon.
    pub rejected: Option<Duration>,
    /// Sent `alert_outbox` rows and resolved `alert_instances`; at least a day.
    pub alerts: Option<Duration>,
    /// Finished `job_runs`.
    pub job_runs: Option<Duration>,
    /// `alert_audit`.
    pub audit: Option<Duration>,
}

impl HistoryRetention {
    /// The retentions configured in `cfg`.
    pub fn from_config(cfg: &JobsConfig) -> Self {
        Self {
            rejected: cfg.retention_rejected.0,
            alerts: cfg.retention_alerts.0,
            job_runs: cfg.retention_job_runs.0,
            audit: cfg.retention_audit.0,
        }
    }

    fn of(&self, table: History) -> Option<Duration> {
        match table {
            History::SentNotifications | History::ResolvedInstances => self.alerts,
            History::JobRuns => self.job_runs,
            History::Audit => self.audit,
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    /// Rows deleted (retention), compared (reconciliation) or steps (optimize).
    pub rows_affected: i64,
    /// What it found, as stored in `job_runs.detail`.
    pub detail: Value,
}

/// Checks the cron expressions and that raw retention covers the horizon.
pub fn validate(cfg: &JobsConfig, late_arrival_horizon: Duration) -> Result<(), JobError> {
    for job in Job::ALL {
        if let Some(expr) = job.cron(cfg) {
            parse_cron(expr).map_err(|e| {
                JobError::Config(format!(
                    "{} cron `{expr}`: {e} (six fields, UTC: `sec min hour day-of-month month day-of-week`, e.g. `0 17 3 * * *`)",
                    job.as_str()
                ))
            })?;
        }
    }
    if let Some(r) = cfg.retention {
        let least = late_arrival_horizon + RETENTION_MARGIN;
        if r < least {
            return Err(JobError::Config(format!(
                "TALLY_RETENTION = {} is shorter than the late-arrival horizon ({}) plus a margin of {}: events Tally still accepts could no longer be deduplicated. Set it to at least {}",
                days(r),
                days(late_arrival_horizon),
                days(RETENTION_MARGIN),
                days(least)
            )));
        }
    }
    if let Some(r) = cfg.retention_rejected.0 {
        if r < late_arrival_horizon {
            return Err(JobError::Config(format!(
                "TALLY_RETENTION_REJECTED = {} is shorter than the late-arrival horizon ({}): a rejected event could be gone while it can still be sent again. Set it to at least {}, or `forever`",
                days(r),
                days(late_arrival_horizon),
                days(late_arrival_horizon)
            )));
        }
    }
    if cfg
        .retention_alerts
        .0
        .is_some_and(|r| r < Duration::from_secs(86_400))
    {
        return Err(JobError::Config(
            "TALLY_RETENTION_ALERTS must be at least 1d (a resolved alert that fires again within it keeps its alert_id sequence)".into(),
        ));
    }
    if cfg.retention_batch < 1 {
        return Err(JobError::Config(
            "TALLY_RETENTION_BATCH must be at least 1".into(),
        ));
    }
    Ok(())
}

/// `36d` for whole days, else humantime's form.
fn days(d: Duration) -> String {
    if d.as_secs().is_multiple_of(86_400) {
        format!("{}d", d.as_secs() / 86_400)
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn parse_cron(expr: &str) -> Result<croner::Cron, croner::errors::CronError> {
    // The same parser settings tokio-cron-scheduler uses, so both agree.
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
}

/// The occurrence a firing at `now` belongs to: the latest one not after
/// `now` (plus half a second, for a scheduler that fires a hair early).
pub fn slot_of(expr: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    use chrono::{DurationRound, TimeDelta};
    let cron = parse_cron(expr).ok()?;
    // Occurrences are whole seconds; croner keeps a matching instant's fraction.
    let at = (now + TimeDelta::milliseconds(500))
        .duration_trunc(TimeDelta::seconds(1))
        .ok()?;
    cron.find_previous_occurrence(&at, true).ok()
}

/// Runs `job` for `slot` unless another run (here or on another instance)
/// already holds that slot; `Ok(None)` then. The run is recorded in `job_runs`.
pub async fn run_job(
    ctx: &JobContext,
    job: Job,
    slot: DateTime<Utc>,
    trigger: &str,
) -> Result<Option<(i64, Result<JobOutcome, String>)>, JobError> {
    let Some(id) = ctx
        .store
        .jobs()
        .start_job_run(job.as_str(), slot, trigger, &ctx.instance)
        .await?
    else {
        tracing::debug!(job = job.as_str(), %slot, "another instance runs this occurrence");
        return Ok(None);
    };
    tracing::info!(job = job.as_str(), %slot, trigger, "job started");
    let result = match job {
        Job::Retention => retention(ctx).await,
        Job::Reconciliation => reconciliation(ctx, id).await,
        Job::Optimize => optimize(ctx).await,
    };
    let (outcome, rows, detail) = match &result {
        Ok(o) => ("ok", o.rows_affected, o.detail.to_string()),
        Err(e) => ("failed", 0, json!({"error": e.to_string()}).to_string()),
    };
    crate::metrics::JOB_RUNS.add(&[job.as_str(), outcome], 1);
    ctx.store
        .jobs()
        .finish_job_run(id, outcome, rows, Some(&detail))
        .await?;
    match &result {
        Ok(o) => tracing::info!(job = job.as_str(), rows, detail = %o.detail, "job finished"),
        Err(e) => tracing::error!(job = job.as_str(), error = %e, "job failed"),
    }
    Ok(Some((id, result.map_err(|e| e.to_string()))))
}

/// `now - d`, or the earliest representable instant when that overflows (a
/// retention of 100 years, the longest accepted, never does; this keeps a
/// bug elsewhere from becoming a panic here).
fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Runs `delete` (one bounded statement) until it deletes less than `batch`
/// rows; records the total for `table` in `deleted` and the metrics.
async fn delete_in_batches<F, Fut>(
    table: String,
    batch: i64,
    deleted: &mut BTreeMap<String, u64>,
    mut delete: F,
) -> Result<(), JobError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0u64;
    loop {
        let n = delete().await?;
        total += n;
        if n < batch as u64 {
            break;
        }
        // Let ingest's transactions in between the batches.
        tokio::task::yield_now().await;
    }
    crate::metrics::RETENTION_DELETED.add(&[&table], total);
    deleted.insert(table, total);
    Ok(())
}

async fn retention(ctx: &JobContext) -> Result<JobOutcome, JobError> {
    let now = Utc::now();
    let mut deleted = BTreeMap::new();
    let (store, batch) = (&ctx.store, ctx.batch);
    if let Some(r) = ctx.retention {
        let cutoff = before(now, r);
        delete_in_batches("usage_events".into(), batch, &mut deleted, || {
            store.log().delete_events_before(cutoff, batch)
        })
        .await?;
    }
    for spec in &ctx.specs {
        for (&g, &keep) in &spec.retention {
            let cutoff = before(now, keep);
            let table = crate::store::agg::table(spec, g, "");
            delete_in_batches(table, batch, &mut deleted, || {
                store
                    .projections()
                    .delete_agg_before(spec, g, cutoff, batch)
            })
            .await?;
        }
    }
    // The history tables.
    if let Some(keep) = ctx.history.rejected {
        let cutoff = before(now, keep);
        delete_in_batches("rejected_events".into(), batch, &mut deleted, || {
            store.log().delete_rejected_before(cutoff, batch)
        })
        .await?;
    }
    for table in History::ALL {
        if let Some(keep) = ctx.history.of(table) {
            let cutoff = before(now, keep);
            delete_in_batches(table.table().into(), batch, &mut deleted, || {
                store.jobs().delete_history_before(table, cutoff, batch)
            })
            .await?;
        }
    }
    let rows = deleted.values().sum::<u64>();
    Ok(JobOutcome {
        rows_affected: i64::try_from(rows).unwrap_or(i64::MAX),
        detail: json!({
            "deleted": deleted,
            "raw_retention": ctx.retention.map(days),
        }),
    })
}

async fn optimize(ctx: &JobContext) -> Result<JobOutcome, JobError> {
    let steps = ctx.store.maintenance().await?;
    Ok(JobOutcome {
        rows_affected: steps.len() as i64,
        detail: json!({ "steps": steps }),
    })
}

/// One day of one projection that did not match.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Projection name.
    pub projection: String,
    /// The day (in the projection's timezone).
    pub day: NaiveDate,
    /// Rows that differ, are missing or are extra.
    pub rows: usize,
    /// The first differing row, described.
    pub first: String,
}

async fn reconciliation(ctx: &JobContext, run_id: i64) -> Result<JobOutcome, JobError> {
    let now = Utc::now();
    // Where the previous successful run stopped looking for late events.
    let previous = ctx
        .store
        .jobs()
        .job_runs(Some(Job::Reconciliation.as_str()), 50)
        .await?
        .into_iter()
        .filter(|r| r.outcome == "ok" && r.id != run_id)
        .find_map(|r| {
            let d: Value = serde_json::from_str(r.detail.as_deref()?).ok()?;
            d.get("late_seq")?.as_i64()
        });
    let mut compared = 0usize;
    let mut mismatches = Vec::new();
    let mut checked = Vec::new();
    let mut late_seq = previous.unwrap_or(0);
    for spec in &ctx.specs {
        let grans: Vec<Granularity> = spec
            .granularities
            .iter()
            .copied()
            .filter(|g| matches!(g, Granularity::Hour | Granularity::Day))
            .collect();
        if grans.is_empty() {
            continue;
        }
        let tz = spec.timezone;
        let today = now.with_timezone(&tz).date_naive();
        let Some(yesterday) = today.pred_opt() else {
            continue;
        };
        let mut days = BTreeSet::from([yesterday]);
        // Days before yesterday that events stored since the last run fall
        // in: late events. The first run has no previous position and only
        // checks yesterday.
        if let Some(after) = previous {
            let (hours, max_seq) = ctx
                .store
                .log()
                .touched_hours(after, day_start(yesterday, tz))
                .await?;
            late_seq = late_seq.max(max_seq);
            days.extend(hours.iter().map(|h| h.with_timezone(&tz).date_naive()));
        } else {
            let (_, max_seq) = ctx.store.log().touched_hours(i64::MAX, now).await?;
            late_seq = late_seq.max(max_seq);
        }
        // Days whose raw events retention may have deleted cannot be recomputed.
        if let Some(r) = ctx.retention {
            let oldest = before(now, r);
            days.retain(|d| day_start(*d, tz) > oldest);
        }
        for day in days {
            let (n, found) = reconcile_day(&ctx.store, spec, &grans, day).await?;
            compared += n;
            checked.push(json!({"projection": spec.name, "day": day.to_string(), "rows": n}));
            settle_alert(ctx, spec, day, found.as_ref()).await?;
            if let Some(m) = found {
                mismatches.push(m);
            }
        }
    }
    for m in &mismatches {
        crate::metrics::RECONCILIATION_MISMATCHES.add(&[&m.projection], m.rows as u64);
        tracing::error!(projection = %m.projection, day = %m.day, rows = m.rows, first = %m.first, "reconciliation mismatch: stored aggregates differ from the raw log");
    }
    Ok(JobOutcome {
        rows_affected: compared as i64,
        detail: json!({
            "late_seq": late_seq,
            "checked": checked,
            "mismatches": mismatches.iter().map(|m| json!({
                "projection": m.projection,
                "day": m.day.to_string(),
                "rows": m.rows,
                "first": m.first,
            })).collect::<Vec<_>>(),
        }),
    })
}

/// Recomputes one day of one projection; the rows compared and the mismatch, if any.
pub async fn reconcile_day(
    store: &Store,
    spec: &Spec,
    grans: &[Granularity],
    day: NaiveDate,
) -> Result<(usize, Option<Mismatch>), JobError> {
    let from = day_start(day, spec.timezone);
    let to = next_bucket(from, Granularity::Day, spec.timezone);
    let mut differing = 0usize;
    let mut first: Option<String> = None;
    let mut compared = 0usize;
    // Each tier's tables against the events at or before its own checkpoint.
    for tier in spec.tiers() {
        let tier_grans: Vec<Granularity> = grans
            .iter()
            .copied()
            .filter(|g| tier.spec.granularities.contains(g))
            .collect();
        if tier_grans.is_empty() {
            continue;
        }
        let read = store
            .projections()
            .reconcile_read(spec, &tier.state, &tier_grans, from, to)
            .await?;
        if read.cursor.is_none() {
            continue;
        }
        let mut fold = Fold::new(&tier.spec);
        for e in &read.events {
            fold.add(e, read.catalog.charge(e));
        }
        let delta = fold.finish();
        compare_tables(
            &read.stored,
            &delta,
            &mut compared,
            &mut differing,
            &mut first,
        );
    }
    let mismatch = (differing > 0).then(|| Mismatch {
        projection: spec.name.clone(),
        day,
        rows: differing,
        first: first.unwrap_or_default(),
    });
    Ok((compared, mismatch))
}

/// Compares one tier's stored tables with the rows its events recompute to,
/// counting rows compared and differing and keeping the first difference.
fn compare_tables(
    stored_tables: &[(Granularity, Vec<crate::store::AggRow>)],
    delta: &crate::aggregate::Delta,
    compared: &mut usize,
    differing: &mut usize,
    first: &mut Option<String>,
) {
    for (g, stored) in stored_tables {
        let Some((_, expected)) = delta.tables.iter().find(|(dg, _)| dg == g) else {
            continue;
        };
        let mut seen = 0usize;
        for row in stored {
            *compared += 1;
            let key = crate::aggregate::measures::RowKey {
                bucket: row.bucket,
                dims: row.dims.clone(),
            };
            match expected.get(&key) {
                Some(m) => {
                    seen += 1;
                    if *m != row.measures {
                        *differing += 1;
                        first.get_or_insert_with(|| {
                            format!(
                                "{} bucket {} {:?}: stored requests={} cost_nanos={} tokens_in={} errors={}, recomputed requests={} cost_nanos={} tokens_in={} errors={}",
                                g.as_str(), row.bucket.to_rfc3339(), row.dims,
                                row.measures.requests, row.measures.cost_nanos, row.measures.tokens_in, row.measures.errors,
                                m.requests, m.cost_nanos, m.tokens_in, m.errors
                            )
                        });
                    }
                }
                None => {
                    *differing += 1;
                    first.get_or_insert_with(|| {
                        format!(
                            "{} bucket {} {:?}: stored row has no events in the raw log (requests={})",
                            g.as_str(),
                            row.bucket.to_rfc3339(),
                            row.dims,
                            row.measures.requests
                        )
                    });
                }
            }
        }
        if seen < expected.len() {
            let missing = expected.len() - seen;
            *differing += missing;
            if first.is_none() {
                let stored_keys: BTreeSet<(DateTime<Utc>, &Vec<String>)> =
                    stored.iter().map(|r| (r.bucket, &r.dims)).collect();
                if let Some((k, m)) = expected
                    .iter()
                    .find(|(k, _)| !stored_keys.contains(&(k.bucket, &k.dims)))
                {
                    *first = Some(format!(
                        "{} bucket {} {:?}: missing from the table (recomputed requests={})",
                        g.as_str(),
                        k.bucket.to_rfc3339(),
                        k.dims,
                        m.requests
                    ));
                }
            }
        }
    }
}

/// Raises (once) or resolves the reconciliation alert of one projection-day.
async fn settle_alert(
    ctx: &JobContext,
    spec: &Spec,
    day: NaiveDate,
    mismatch: Option<&Mismatch>,
) -> Result<(), JobError> {
    let found = reconcile::Finding {
        projection: &spec.name,
        day,
        mismatch: mismatch.map(|m| (m.rows, m.first.as_str())),
    };
    if !reconcile::settle(ctx.store.alerts(), &ctx.alert_prefix, found).await? {
        // Only one reconciliation runs per occurrence, so this is a manual run
        // racing a scheduled one: the other writer raised or resolved it.
        tracing::warn!(projection = %spec.name, %day, "reconciliation alert changed concurrently; left as the other run wrote it");
    }
    Ok(())
}

/// Schedules every enabled job on a tokio-cron-scheduler until `shutdown`.
pub async fn schedule(
    ctx: JobContext,
    cfg: &JobsConfig,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, JobError> {
    use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
    let err = |e: tokio_cron_scheduler::JobSchedulerError| JobError::Scheduler(e.to_string());
    let mut scheduler = JobScheduler::new().await.map_err(err)?;
    for job in Job::ALL {
        let Some(expr) = job.cron(cfg).map(str::to_string) else {
            tracing::info!(job = job.as_str(), "job off (cron expression `off`)");
            continue;
        };
        let ctx = ctx.clone();
        let expr_for_slot = expr.clone();
        let cron_job = CronJob::new_async(expr.as_str(), move |_id, _lock| {
            let ctx = ctx.clone();
            let expr = expr_for_slot.clone();
            Box::pin(async move {
                let now = Utc::now();
                let slot = slot_of(&expr, now).unwrap_or(now);
                if let Err(e) = run_job(&ctx, job, slot, "schedule").await {
                    tracing::error!(job = job.as_str(), error = %e, "could not run job");
                }
            })
        })
        .map_err(err)?;
        scheduler.add(cron_job).await.map_err(err)?;
        tracing::info!(job = job.as_str(), cron = %expr, "job scheduled (UTC)");
    }
    scheduler.start().await.map_err(err)?;
    Ok(tokio::spawn(async move {
        shutdown.cancelled().await;
        if let Err(e) = scheduler.shutdown().await {
            tracing::debug!(error = %e, "job scheduler shutdown");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> JobsConfig {
        JobsConfig {
            retention: None,
            job_retention_cron: "0 17 3 * * *".into(),
            job_reconciliation_cron: "0 7 1 * * *".into(),
            job_optimize_cron: "off".into(),
            retention_batch: 100,
            retention_rejected: crate::duration::Keep(Some(Duration::from_secs(90 * 86_400))),
            retention_alerts: crate::duration::Keep(Some(Duration::from_secs(90 * 86_400))),
            retention_job_runs: crate::duration::Keep(Some(Duration::from_secs(90 * 86_400))),
            retention_audit: crate::duration::Keep(None),
        }
    }

    #[test]
    fn history_retentions_are_checked() {
        let horizon = Duration::from_secs(35 * 86_400);
        let mut c = cfg();
        assert!(validate(&c, horizon).is_ok());
        c.retention_rejected = crate::duration::Keep(Some(Duration::from_secs(86_400)));
        let e = validate(&c, horizon).expect_err("shorter than the horizon");
        assert!(e.to_string().contains("TALLY_RETENTION_REJECTED"), "{e}");
        let mut c = cfg();
        c.retention_alerts = crate::duration::Keep(Some(Duration::from_secs(60)));
        assert!(validate(&c, horizon).is_err());
    }

    #[test]
    fn retention_must_cover_the_late_arrival_horizon() {
        let horizon = Duration::from_secs(35 * 86_400);
        let mut c = cfg();
        c.retention = Some(Duration::from_secs(35 * 86_400));
        let e = validate(&c, horizon).expect_err("too short");
        assert!(e.to_string().contains("at least 36d"), "{e}");
        c.retention = Some(Duration::from_secs(36 * 86_400));
        validate(&c, horizon).expect("horizon plus margin is enough");
    }

    #[test]
    fn bad_cron_names_the_job() {
        let mut c = cfg();
        c.job_retention_cron = "every day".into();
        let e = validate(&c, Duration::from_secs(60)).expect_err("bad cron");
        assert!(e.to_string().starts_with("retention cron"), "{e}");
    }

    #[test]
    fn a_firing_belongs_to_its_occurrence() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().expect("time");
        let expr = "0 17 3 * * *";
        assert_eq!(
            slot_of(expr, at("2026-03-29T03:17:00.004Z")),
            Some(at("2026-03-29T03:17:00Z"))
        );
        // A hair early still names the same occurrence.
        assert_eq!(
            slot_of(expr, at("2026-03-29T03:16:59.800Z")),
            Some(at("2026-03-29T03:17:00Z"))
        );
        assert_eq!(
            slot_of("*/5 * * * * *", at("2026-01-01T00:00:07Z")),
            Some(at("2026-01-01T00:00:05Z"))
        );
    }
}
