//! Restatement: recompute a projection's buckets over an event-time range
//! from the log and swap them in, while ingest and the projectors go on.
//!
//! Why a concurrent fold is neither lost nor counted twice: the restatement
//! runs in one transaction that first locks the projection's checkpoint row
//! and bumps its `generation`, then reads the cursor `C`. A fold commits
//! under the same row lock, so it either committed before (and `C` includes
//! it) or waits until the restatement commits. The restated buckets count
//! exactly the non-voided events at or before `C` (the log read filters on
//! the cursor and on `voided_events`); events after `C` are the projector's,
//! which adds them on top afterwards. A batch the projector read before the
//! restatement (perhaps before a void, so it may hold a voided event) carries
//! the old generation, so its compare-and-set fails and it is read again,
//! now without the voided events. A crash before the commit changes nothing
//! and leaves the queue row, so the restatement runs again; its result does
//! not depend on how often it ran.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::fold::Fold;
use super::projector::{failpoint_abort, Failpoints, FoldSignal};
use super::rebuild::{shadow_state, SHADOW_SUFFIX};
use super::ProjectionError;
use crate::aggregate::bucket::{bucket_start, next_bucket};
use crate::aggregate::measures::{RowKey, Rows};
use crate::aggregate::spec::{Dimension, Granularity, Spec};
use crate::backoff::Backoff;
use crate::store::corrections::{Restatement, Scope};
use crate::store::{AggRow, Restating, Store};

/// Most values of one dimension a restatement narrows itself to.
const MAX_SCOPE_VALUES: usize = 1_000;

/// Events read from the log per statement: one hour of event time.
const READ_SPAN: chrono::Duration = chrono::Duration::hours(1);

/// What one restatement did (live tables; a rebuild's shadow tables too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restated {
    /// Events folded into the restated buckets (per table set).
    pub events: usize,
    /// Rows written.
    pub rows: usize,
}

/// The first bucket start at or after `t`.
fn ceil(t: DateTime<Utc>, g: Granularity, tz: chrono_tz::Tz) -> DateTime<Utc> {
    let start = bucket_start(t, g, tz);
    if start == t {
        t
    } else {
        next_bucket(start, g, tz)
    }
}

/// Restates `spec`'s buckets overlapping `[from, to)`: the shadow tables of
/// a rebuild in progress first, then the live ones, deleting the queue row
/// `done` with the live commit. A projection without a checkpoint (never
/// started) has nothing to restate.
pub async fn restate(
    store: &Store,
    spec: &Spec,
    range: (DateTime<Utc>, DateTime<Utc>),
    scope: &Scope,
    done: Option<i64>,
    failpoints: Failpoints,
) -> Result<Restated, ProjectionError> {
    let projections = store.projections();
    let hash = spec.hash();
    let shadow = shadow_state(&spec.name);
    if let Some(r) = projections.begin_restatement(&shadow, &hash).await? {
        let (r, _) = restate_in(r, spec, SHADOW_SUFFIX, range, scope).await?;
        r.finish(None).await?;
    }
    match projections.begin_restatement(&spec.name, &hash).await? {
        Some(r) => {
            let (r, report) = restate_in(r, spec, "", range, scope).await?;
            if Failpoints::fires(failpoints.restate_before_commit) {
                failpoint_abort("restate.before_commit");
            }
            r.finish(done).await?;
            Ok(report)
        }
        None => {
            if let Some(id) = done {
                store.corrections().done(id).await?;
            }
            Ok(Restated::default())
        }
    }
}

async fn restate_in(
    mut r: Restating,
    spec: &Spec,
    suffix: &str,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    scope: &Scope,
) -> Result<(Restating, Restated), ProjectionError> {
    let tz = spec.timezone;
    let mut report = Restated::default();
    // Only the groups a changed event can be in: rows of other groups keep
    // what they hold, since none of their events changed. The same filter
    // selects the events, the finer rows and the rows replaced.
    let filter: Vec<(Dimension, Vec<String>)> = r
        .scope_groups(scope, MAX_SCOPE_VALUES)
        .await?
        .into_iter()
        .filter(|(d, _)| spec.dimensions.contains(d))
        .collect();
    let mut grans = spec.granularities.clone();
    grans.sort();
    let mut finer: Option<Granularity> = None;
    for g in grans {
        // Buckets past a granularity's retention are restated too: queries
        // never read them, and the next retention run deletes them again.
        let start = bucket_start(from, g, tz);
        let end = ceil(to, g, tz);
        let rows = match finer.filter(|&f| sums_up(spec, f, start)) {
            // A coarse bucket is the sum of the finer rows just restated and
            // the untouched ones beside them: no event is read twice, and a
            // month costs its day rows instead of its events.
            Some(f) => roll_up(r.rows(spec, suffix, f, (start, end), &filter).await?, g, tz),
            None => {
                let one = Spec {
                    granularities: vec![g],
                    ..spec.clone()
                };
                let mut fold = Fold::new(&one);
                let mut at = start;
                while at < end {
                    let until = (at + READ_SPAN).min(end);
                    let events = r.events(at, until, &filter).await?;
                    report.events += events.len();
                    for e in &events {
                        fold.add(e, r.catalog().charge(e));
                    }
                    at = until;
                }
                fold.finish()
                    .tables
                    .into_iter()
                    .find(|(tg, _)| *tg == g)
                    .map(|(_, rows)| rows)
                    .unwrap_or_default()
            }
        };
        report.rows += rows.len();
        r.replace(spec, suffix, g, (start, end), &filter, &rows)
            .await?;
        finer = Some(g);
    }
    Ok((r, report))
}

/// Whether `spec`'s `finer` table, from `start` on, sums exactly to every
/// coarser one: in UTC every coarser bucket is a whole number of finer ones
/// (elsewhere a half-hour DST shift can split an hour across two days), and
/// retention must not have deleted finer rows there yet (a day of margin).
fn sums_up(spec: &Spec, finer: Granularity, start: DateTime<Utc>) -> bool {
    spec.timezone == chrono_tz::Tz::UTC
        && spec.retention.get(&finer).is_none_or(|keep| {
            chrono::Duration::from_std(*keep)
                .ok()
                .and_then(|keep| Utc::now().checked_sub_signed(keep + chrono::Duration::days(1)))
                .is_some_and(|oldest| start >= oldest)
        })
}

/// Finer rows summed into `g` buckets (measures merge exactly, sketches included).
fn roll_up(rows: Vec<AggRow>, g: Granularity, tz: chrono_tz::Tz) -> Rows {
    let mut out = Rows::default();
    for row in rows {
        let key = RowKey {
            bucket: bucket_start(row.bucket, g, tz),
            dims: row.dims,
        };
        match out.get_mut(&key) {
            Some(m) => m.merge(&row.measures),
            None => {
                out.insert(key, row.measures);
            }
        }
    }
    out
}

/// Runs queued restatements until `shutdown`: looks every `poll` (and at
/// once when `wake` is notified). A restatement whose projection is not
/// loaded here waits for an instance that loads it. Each one is told to
/// `signal` as a fold of events as old as its range, so the alert evaluator
/// drops the window parts it cached and reads the new numbers.
pub async fn run(
    store: Store,
    specs: Vec<Arc<Spec>>,
    poll: Duration,
    wake: Arc<tokio::sync::Notify>,
    signal: Option<Arc<FoldSignal>>,
    failpoints: Failpoints,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        match step(&store, &specs, signal.as_deref(), failpoints).await {
            Ok(true) => {
                backoff.reset();
                continue;
            }
            Ok(false) => backoff.reset(),
            Err(e) => {
                tracing::warn!(error = %e, "restatement failed; retrying");
                backoff.sleep(&shutdown).await;
                continue;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = wake.notified() => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// Does the oldest queued restatement of a loaded projection, together with
/// the same change's restatements of the other loaded projections (each in
/// its own transaction, concurrently: they lock different checkpoint rows,
/// so each waits only for its own projector); false when there is none.
pub async fn step(
    store: &Store,
    specs: &[Arc<Spec>],
    signal: Option<&FoldSignal>,
    failpoints: Failpoints,
) -> Result<bool, ProjectionError> {
    let pending: Vec<Restatement> = store.corrections().pending(100).await?;
    let loaded = |j: &Restatement| specs.iter().find(|s| s.name == j.projection).cloned();
    let Some(first) = pending.iter().find(|j| loaded(j).is_some()).cloned() else {
        return Ok(false);
    };
    let mut seen = std::collections::HashSet::new();
    let batch: Vec<(Restatement, Arc<Spec>)> = pending
        .into_iter()
        .filter(|j| {
            (j.from, j.to, &j.cause, &j.scope) == (first.from, first.to, &first.cause, &first.scope)
        })
        .filter_map(|j| loaded(&j).map(|s| (j, s)))
        .filter(|(j, _)| seen.insert(j.projection.clone()))
        .collect();
    let runs = batch.iter().map(|(job, spec)| async move {
        let started = std::time::Instant::now();
        let report = restate(
            store,
            spec,
            (job.from, job.to),
            &job.scope,
            Some(job.id),
            failpoints,
        )
        .await?;
        tracing::info!(
            projection = %spec.name,
            from = %job.from,
            to = %job.to,
            cause = %job.cause,
            events = report.events,
            rows = report.rows,
            ms = started.elapsed().as_millis() as u64,
            "restated"
        );
        Ok::<_, ProjectionError>(())
    });
    let results = futures::future::join_all(runs).await;
    if let Some(signal) = signal {
        signal.committed(Some(first.from));
    }
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(true)
}
