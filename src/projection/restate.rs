//! Restatement: recompute a projection's buckets over an event-time range
//! from the log and swap them in, while ingest and the projectors go on.
//!
//! It runs in two steps, so the projector is held up only for the second.
//!
//! 1. **Prepare**, without any lock: read the projection's checkpoint
//!    (generation `G`, cursor `C0`) and the prices in one snapshot, and fold
//!    the non-voided events at or before `C0` of the changed groups and
//!    range (statement by statement: those events never change). The
//!    projector goes on folding meanwhile; catch-up passes, still without the
//!    lock, add what it folded since, until a pass is short.
//! 2. **Apply**, in one transaction that first locks the checkpoint row and
//!    bumps its generation, then reads the cursor `C1`. If the generation it
//!    found is not `G`, a price change or another restatement came in
//!    between and the snapshot may be stale: step 1 runs again (after three
//!    tries, it runs under the lock). Otherwise it adds the non-voided events
//!    folded after the last catch-up, up to `C1`, sums the coarse tables from
//!    the finer rows, and replaces the buckets.
//!
//! Why a concurrent fold is neither lost nor counted twice: a fold commits
//! under the same row lock, so it either committed before step 2 (and `C1`
//! includes it) or waits until the restatement commits. The restated buckets
//! count exactly the non-voided events at or before `C1`, each once: each
//! read covers the cursor slice after the previous one. Events after `C1` are the
//! projector's, which adds them on top afterwards. So the restatement need
//! not wait for all of a fold's upserts, a projector of this process gives
//! way (rolls back, writing nothing, and reads its batch again afterwards;
//! see [`FoldSignal::restating`]): the argument is unchanged. A batch the projector read
//! before step 2 (perhaps before a void, so it may hold a voided event)
//! carries the old generation, so its compare-and-set fails and it is read
//! again, now without the voided events. A void or revert committed during
//! step 1 (which step 1 may or may not have seen) queued its own
//! restatement of its groups and range in the same transaction: if that one
//! committed first, it moved the generation and step 1 is redone; if not,
//! it runs after this one and restates those buckets again. A crash before
//! the commit changes nothing and leaves the queue row, so the restatement
//! runs again; its result does not depend on how often it ran.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::fold::Fold;
use super::projector::{Announced, FoldSignal};
use super::rebuild::{shadow_state, SHADOW_SUFFIX};
use super::ProjectionError;
use crate::aggregate::bucket::{bucket_start, next_bucket};
use crate::aggregate::measures::{RowKey, Rows};
use crate::aggregate::spec::{Dimension, Granularity, Spec, FOLD_MARGIN};
use crate::backoff::Backoff;
use crate::failpoint::{abort as failpoint_abort, Failpoints};
use crate::store::corrections::{Restatement, Scope};
use crate::store::{AggRow, Cursor, Finished, Folded, Restating, Store};

/// Most values of one dimension a restatement narrows itself to.
const MAX_SCOPE_VALUES: usize = 1_000;

/// Log reads one change's restatements run at once, over all projections
/// (each holds one permit while it prepares and reads on it; spare permits
/// add reads): a projection that reads much (a daily finest table, or no
/// dimension to narrow by) gets the permits the others are done with, and
/// the pool keeps connections for ingest and the projectors. With
/// [`crate::store::READ_CHUNK`] it bounds memory: a projection holds at most this many
/// chunks of events at once.
pub const READS_IN_FLIGHT: usize = 4;

/// The log reads of one change's restatements: [`READS_IN_FLIGHT`] permits
/// shared by its projections.
pub struct Reads {
    permits: Semaphore,
}

impl Reads {
    /// Permits for one change.
    pub fn new() -> Self {
        Self {
            permits: Semaphore::new(READS_IN_FLIGHT),
        }
    }
}

impl Default for Reads {
    fn default() -> Self {
        Self::new()
    }
}

/// What one restatement did (live tables; a rebuild's shadow tables too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restated {
    /// Events folded into the restated buckets (per table set).
    pub events: usize,
    /// Rows written.
    pub rows: usize,
    /// Of `events`, those read under the checkpoint lock.
    pub under_lock: usize,
    /// Snapshots taken (more than one: a price change or another
    /// restatement made one stale).
    pub snapshots: usize,
    /// Milliseconds computing from snapshots, without the lock.
    pub unlocked_ms: u64,
    /// Milliseconds waiting for the checkpoint row (a fold in flight
    /// commits first).
    pub lock_wait_ms: u64,
    /// Milliseconds holding it before the commit: catching up, swapping in.
    pub locked_ms: u64,
}

impl Restated {
    /// Both restatements' figures (of two tiers).
    fn plus(self, o: Restated) -> Restated {
        Restated {
            events: self.events + o.events,
            rows: self.rows + o.rows,
            under_lock: self.under_lock + o.under_lock,
            snapshots: self.snapshots + o.snapshots,
            unlocked_ms: self.unlocked_ms + o.unlocked_ms,
            lock_wait_ms: self.lock_wait_ms + o.lock_wait_ms,
            locked_ms: self.locked_ms + o.locked_ms,
        }
    }
}

/// Milliseconds since `t`.
fn ms_since(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
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
    reads: &Reads,
    process: Process<'_>,
) -> Result<Restated, ProjectionError> {
    let Process { signal, failpoints } = process;
    let shadow = shadow_state(&spec.name);
    let at = |state| At { state, signal };
    if let Some((r, _, _guard)) =
        restate_state(store, spec, at(&shadow), SHADOW_SUFFIX, range, scope, reads).await?
    {
        // No queue row goes with a shadow commit.
        let _ = r.finish(None).await?;
    }
    // Each tier under its own checkpoint, one after the other; the queue row
    // goes with the last commit, so a crash in between restates them all
    // again (the result does not depend on how often it ran).
    let tiers = spec.tiers();
    let mut total = Restated::default();
    for (n, t) in tiers.iter().enumerate() {
        let last = n + 1 == tiers.len();
        match restate_state(store, &t.spec, at(&t.state), "", range, scope, reads).await? {
            Some((r, report, _guard)) => {
                if Failpoints::fires(failpoints.restate_before_commit) {
                    failpoint_abort("restate.before_commit");
                }
                if let Finished::Dequeue(id) = r.finish(done.filter(|_| last)).await? {
                    // SQLite: the rows are committed, the queue row not yet
                    // deleted; a crash here restates it all again. (The
                    // failpoint skips restatements that wrote no row, such
                    // as a minute table's past its retention: a crash test
                    // could not see them.)
                    if report.rows > 0 && Failpoints::fires(failpoints.restate_after_commit) {
                        failpoint_abort("restate.after_commit");
                    }
                    store.corrections().done(id).await?;
                }
                total = total.plus(report);
                if !last && Failpoints::fires(failpoints.restate_between_tiers) {
                    failpoint_abort("restate.between_tiers");
                }
            }
            None if last => {
                if let Some(id) = done {
                    store.corrections().done(id).await?;
                }
            }
            None => {}
        }
    }
    Ok(total)
}

/// Snapshots tried before a restatement is computed under the row lock.
const SNAPSHOT_TRIES: usize = 3;

/// Most catch-up reads without the lock after a restatement's snapshot.
const CATCH_UP_PASSES: usize = 4;

/// A catch-up read this short leaves little for the locked step.
const CATCH_UP_SHORT: Duration = Duration::from_millis(200);

/// Restates the tables of checkpoint `state`, uncommitted: computed from a
/// snapshot without the lock (so the projector keeps folding meanwhile),
/// then swapped in under it with what was folded since. When a price change
/// or another restatement moved the generation in between, the snapshot is
/// stale (its prices or voids may be older) and is taken again; after
/// [`SNAPSHOT_TRIES`] the work is done under the lock, as a busy price
/// catalog would otherwise keep it from ever finishing.
async fn restate_state(
    store: &Store,
    spec: &Spec,
    at: At<'_>,
    suffix: &str,
    range: (DateTime<Utc>, DateTime<Utc>),
    scope: &Scope,
    reads: &Reads,
) -> Result<Option<(Restating, Restated, Option<Announced>)>, ProjectionError> {
    let state = at.state;
    let projections = store.projections();
    let hash = spec.hash();
    let mut spent = Restated::default();
    for snapshots in 1..=SNAPSHOT_TRIES {
        let unlocked = std::time::Instant::now();
        let Some(mut folded) = projections.read_folded(state, &hash).await? else {
            return Ok(None);
        };
        let mut prepared = prepare(&mut folded, spec, range, scope, reads).await?;
        // What the projector folded meanwhile, still without the lock, until
        // a pass is short: the locked step then has little left to add.
        for _ in 0..CATCH_UP_PASSES {
            let Some(mut folded) = projections.read_folded(state, &hash).await? else {
                return Ok(None);
            };
            let started = std::time::Instant::now();
            let current = folded.generation() == prepared.generation;
            if current {
                catch_up(&mut folded, &mut prepared).await?;
            }
            if !current || started.elapsed() < CATCH_UP_SHORT {
                break;
            }
        }
        spent.unlocked_ms += ms_since(unlocked);
        let waiting = std::time::Instant::now();
        let announced = at.announce();
        let Some(mut r) = projections.begin_restatement(state, &hash).await? else {
            return Ok(None);
        };
        spent.lock_wait_ms += ms_since(waiting);
        let locked = std::time::Instant::now();
        let applied = apply(&mut r, spec, suffix, prepared).await?;
        spent.locked_ms += ms_since(locked);
        match applied {
            Some(report) => {
                return Ok(Some((
                    r,
                    Restated {
                        snapshots,
                        unlocked_ms: spent.unlocked_ms,
                        lock_wait_ms: spent.lock_wait_ms,
                        locked_ms: spent.locked_ms,
                        ..report
                    },
                    announced,
                )))
            }
            None => {
                tracing::debug!(projection = %state, "restatement snapshot went stale; taking another");
                r.abandon().await?;
            }
        }
    }
    let waiting = std::time::Instant::now();
    let announced = at.announce();
    let Some(mut r) = projections.begin_restatement(state, &hash).await? else {
        return Ok(None);
    };
    spent.lock_wait_ms += ms_since(waiting);
    let locked = std::time::Instant::now();
    // Permits of its own: holding the lock, it must not queue behind the
    // change's other projections.
    let prepared = prepare(r.folded(), spec, range, scope, &Reads::new()).await?;
    // Prepared under the same lock: it cannot be stale.
    let report = swap_in(&mut r, spec, suffix, prepared).await?;
    let under_lock = report.events;
    Ok(Some((
        r,
        Restated {
            under_lock,
            snapshots: SNAPSHOT_TRIES,
            unlocked_ms: spent.unlocked_ms,
            lock_wait_ms: spent.lock_wait_ms,
            locked_ms: spent.locked_ms + ms_since(locked),
            ..report
        },
        announced,
    )))
}

/// What a restatement shares with the rest of its process.
#[derive(Clone, Copy, Default)]
pub struct Process<'a> {
    /// Where it announces that it waits for a checkpoint lock, so this
    /// process's projector gives way.
    pub signal: Option<&'a FoldSignal>,
    /// Crash hooks (tests).
    pub failpoints: Failpoints,
}

/// The checkpoint a restatement locks, and where it announces that it waits
/// for the lock (so this process's projector gives way; see
/// [`FoldSignal::restating`]).
#[derive(Clone, Copy)]
struct At<'a> {
    state: &'a str,
    signal: Option<&'a FoldSignal>,
}

impl At<'_> {
    fn announce(&self) -> Option<Announced> {
        self.signal.map(|s| s.restating(self.state))
    }
}

/// How one granularity's buckets are restated.
enum Source {
    /// Folded from the events (the finest table; every table where finer
    /// rows do not sum up exactly).
    Events(Box<Fold>),
    /// Summed from the finer table's rows once those are swapped in.
    Finer(Granularity),
}

/// One granularity's restated buckets.
struct Table {
    granularity: Granularity,
    /// Bucket starts in `[from, to)`.
    range: (DateTime<Utc>, DateTime<Utc>),
    source: Source,
}

/// A restatement computed from a [`Folded`] snapshot, to be swapped in.
pub struct Prepared {
    /// The checkpoint generation the snapshot was read at.
    generation: i64,
    /// The checkpoint cursor the snapshot's events were folded up to.
    cursor: Cursor,
    /// The groups restated (empty: whole buckets).
    filter: Vec<(Dimension, Vec<String>)>,
    /// Per granularity, finest first.
    tables: Vec<Table>,
    /// Events folded so far.
    events: usize,
}

/// Computes `spec`'s restated buckets overlapping `[from, to)` from the
/// events `folded` has: everything but what only the locked step can know
/// (events folded later, and coarse rows summed from finer ones). Reads
/// run concurrently, as many as `reads` has permits for.
pub async fn prepare(
    folded: &mut Folded,
    spec: &Spec,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    scope: &Scope,
    reads: &Reads,
) -> Result<Prepared, ProjectionError> {
    let tz = spec.timezone;
    // Only the groups a changed event can be in: rows of other groups keep
    // what they hold, since none of their events changed. The same filter
    // selects the events, the finer rows and the rows replaced.
    let filter: Vec<(Dimension, Vec<String>)> = folded
        .scope_groups(scope, MAX_SCOPE_VALUES)
        .await?
        .into_iter()
        .filter(|(d, _)| spec.dimensions.contains(d))
        .collect();
    let mut grans = spec.granularities.clone();
    grans.sort();
    let mut tables = Vec::new();
    let mut events = 0;
    let mut finer: Option<Granularity> = None;
    for g in grans {
        // Buckets past a granularity's retention are restated too: queries
        // never read them, and the next retention run deletes them again.
        let start = bucket_start(from, g, tz);
        let end = ceil(to, g, tz);
        let source = match finer.filter(|&f| sums_up(spec, f, start)) {
            // A coarse bucket is the sum of the finer rows just restated and
            // the untouched ones beside them: no event is read twice, and a
            // month costs its day rows instead of its events.
            Some(f) => Source::Finer(f),
            None => {
                let one = Spec {
                    granularities: vec![g],
                    ..spec.clone()
                };
                let mut spans = Spans::new(start, end, Folded::read_span(&filter));
                let snapshot: &Folded = folded;
                let filter = &filter;
                // The reads run side by side and fold as their rows arrive;
                // the lock is never held across an await.
                let cell = std::sync::Mutex::new((Fold::new(&one), 0usize));
                let shared = &cell;
                // One read at a time on the projection's own permit, more on
                // spare ones: a projection with little to read is never
                // queued behind one with much.
                let own = reads.permits.acquire().await.map_err(|_| {
                    ProjectionError::ReadTask("restatement read permits closed".into())
                })?;
                let mut running = FuturesUnordered::new();
                let mut own_busy = false;
                loop {
                    while running.len() < READS_IN_FLIGHT {
                        let permit = if own_busy {
                            match reads.permits.try_acquire() {
                                Ok(p) => Some(p),
                                Err(_) => break,
                            }
                        } else {
                            None
                        };
                        let Some((at, until)) = spans.next() else {
                            break;
                        };
                        own_busy |= permit.is_none();
                        let mine = permit.is_none();
                        running.push(async move {
                            let mut n = 0;
                            let read = snapshot
                                .read_events(at, until, filter, |chunk| {
                                    n += chunk.len();
                                    if let Ok(mut f) = shared.lock() {
                                        // The fold's measures merge in any order.
                                        for e in &chunk {
                                            f.0.add(e, snapshot.catalog().charge(e));
                                        }
                                        f.1 += chunk.len();
                                    }
                                })
                                .await;
                            drop(permit);
                            (mine, until - at, n, read)
                        });
                    }
                    let Some((mine, span, n, read)) = running.next().await else {
                        break;
                    };
                    own_busy &= !mine;
                    read?;
                    spans.observed(span, n);
                }
                drop(own);
                drop(running);
                let (fold, read) = cell
                    .into_inner()
                    .map_err(|_| ProjectionError::ReadTask("a restatement read panicked".into()))?;
                events += read;
                Source::Events(Box::new(fold))
            }
        };
        tables.push(Table {
            granularity: g,
            range: (start, end),
            source,
        });
        finer = Some(g);
    }
    Ok(Prepared {
        generation: folded.generation(),
        cursor: folded.cursor(),
        filter,
        tables,
        events,
    })
}

/// Swaps `prepared` in under the row lock `r` holds: adds the events folded
/// since its snapshot, sums the coarse tables from the finer rows, and
/// replaces the buckets (in `spec`'s tables with `suffix`). `None`, writing
/// nothing, when the generation moved since the snapshot: its prices or
/// voids may be stale, and it must be prepared again.
pub async fn apply(
    r: &mut Restating,
    spec: &Spec,
    suffix: &str,
    prepared: Prepared,
) -> Result<Option<Restated>, ProjectionError> {
    if r.folded().generation() != prepared.generation {
        return Ok(None);
    }
    swap_in(r, spec, suffix, prepared).await.map(Some)
}

async fn swap_in(
    r: &mut Restating,
    spec: &Spec,
    suffix: &str,
    mut prepared: Prepared,
) -> Result<Restated, ProjectionError> {
    let tz = spec.timezone;
    let before = prepared.events;
    catch_up(r.folded(), &mut prepared).await?;
    let filter = std::mem::take(&mut prepared.filter);
    let mut report = Restated {
        events: prepared.events,
        under_lock: prepared.events - before,
        ..Restated::default()
    };
    for Table {
        granularity: g,
        range,
        source,
    } in prepared.tables
    {
        let rows = match source {
            Source::Finer(f) => roll_up(r.rows(spec, suffix, f, range, &filter).await?, g, tz),
            Source::Events(fold) => fold
                .finish()
                .tables
                .into_iter()
                .find(|(tg, _)| *tg == g)
                .map(|(_, rows)| rows)
                .unwrap_or_default(),
        };
        report.rows += rows.len();
        r.replace(spec, suffix, g, range, &filter, &rows).await?;
    }
    Ok(report)
}

/// Events one read of a restatement aims at: sparse stretches of the log
/// are read in longer spans, so a month with few events costs a few
/// statements rather than one per hour (each statement has a fixed cost).
const READ_TARGET: usize = 20_000;

/// Most a span grows from one read to the next: a sparse stretch followed
/// by a busy one must not yield one huge read that leaves nothing to run
/// beside it.
const SPAN_GROWTH: i32 = 8;

/// The time spans a restatement reads `[start, end)` in, handed out one at a
/// time: each starts at the base span (one read's worth of events on a busy
/// log) and grows while reads return far fewer than [`READ_TARGET`] events.
struct Spans {
    at: DateTime<Utc>,
    end: DateTime<Utc>,
    base: chrono::Duration,
    span: chrono::Duration,
}

impl Spans {
    fn new(start: DateTime<Utc>, end: DateTime<Utc>, base: chrono::Duration) -> Self {
        Self {
            at: start,
            end,
            base,
            span: base,
        }
    }

    fn next(&mut self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if self.at >= self.end {
            return None;
        }
        let until = self
            .at
            .checked_add_signed(self.span)
            .map_or(self.end, |u| u.min(self.end));
        let at = std::mem::replace(&mut self.at, until);
        Some((at, until))
    }

    /// Sizes the next spans from a read of `span` that found `events`: as
    /// long as this density needs for [`READ_TARGET`] events, within
    /// [`SPAN_GROWTH`] times the current span and never below the base.
    fn observed(&mut self, span: chrono::Duration, events: usize) {
        // Never longer than what is left to read, so it cannot overflow.
        let left = self.end - self.at;
        let grown = self.span.checked_mul(SPAN_GROWTH).unwrap_or(left).min(left);
        let wanted = if events == 0 {
            grown
        } else {
            let ratio = READ_TARGET as f64 / events as f64;
            chrono::Duration::milliseconds((span.num_milliseconds() as f64 * ratio) as i64)
        };
        self.span = wanted.clamp(self.base, grown.max(self.base));
    }
}

/// Adds to `prepared`'s folds the events `folded` has beyond its cursor (at
/// the same generation: same prices, and voids it either saw or has queued
/// restatements for), and moves its cursor there.
async fn catch_up(folded: &mut Folded, prepared: &mut Prepared) -> Result<(), ProjectionError> {
    if folded.cursor() == prepared.cursor {
        return Ok(());
    }
    for table in &mut prepared.tables {
        if let Source::Events(fold) = &mut table.source {
            let mut resume = None;
            loop {
                let chunk = folded
                    .events_after(prepared.cursor, table.range, &prepared.filter, resume)
                    .await?;
                prepared.events += chunk.events.len();
                for e in &chunk.events {
                    fold.add(e, folded.catalog().charge(e));
                }
                resume = chunk.next;
                if resume.is_none() {
                    break;
                }
            }
        }
    }
    prepared.cursor = folded.cursor();
    Ok(())
}

/// Whether `spec`'s `finer` table, from `start` on, sums exactly to every
/// coarser one: in UTC every coarser bucket is a whole number of finer ones
/// (elsewhere a half-hour DST shift can split an hour across two days), and
/// retention must not have deleted finer rows there yet, and the fold must
/// have written them ([`FOLD_MARGIN`] inside the retention, the same margin).
fn sums_up(spec: &Spec, finer: Granularity, start: DateTime<Utc>) -> bool {
    spec.timezone == chrono_tz::Tz::UTC
        && spec.retention.get(&finer).is_none_or(|keep| {
            chrono::Duration::from_std(*keep)
                .ok()
                .and_then(|keep| Utc::now().checked_sub_signed(keep + FOLD_MARGIN))
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
    let reads = &Reads::new();
    let runs = batch.iter().map(|(job, spec)| async move {
        let started = std::time::Instant::now();
        let report = restate(
            store,
            spec,
            (job.from, job.to),
            &job.scope,
            Some(job.id),
            reads,
            Process { signal, failpoints },
        )
        .await?;
        tracing::info!(
            projection = %spec.name,
            from = %job.from,
            to = %job.to,
            cause = %job.cause,
            events = report.events,
            under_lock = report.under_lock,
            snapshots = report.snapshots,
            rows = report.rows,
            unlocked_ms = report.unlocked_ms,
            lock_wait_ms = report.lock_wait_ms,
            locked_ms = report.locked_ms,
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn spans_read(mut spans: Spans, events_per_hour: usize) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        while let Some((at, until)) = spans.next() {
            let hours = (until - at).num_seconds() as f64 / 3600.0;
            spans.observed(until - at, (events_per_hour as f64 * hours) as usize);
            out.push((at, until));
        }
        out
    }

    fn month() -> (DateTime<Utc>, DateTime<Utc>) {
        let start = Utc
            .with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
            .single()
            .expect("valid");
        let end = Utc
            .with_ymd_and_hms(2026, 4, 1, 0, 0, 0)
            .single()
            .expect("valid");
        (start, end)
    }

    /// The spans cover the range exactly, in order, without gaps.
    fn assert_covers(
        spans: &[(DateTime<Utc>, DateTime<Utc>)],
        (start, end): (DateTime<Utc>, DateTime<Utc>),
    ) {
        assert_eq!(spans.first().map(|s| s.0), Some(start));
        assert_eq!(spans.last().map(|s| s.1), Some(end));
        assert!(spans
            .windows(2)
            .all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
    }

    #[test]
    fn an_empty_month_is_read_in_a_few_growing_spans() {
        let range = month();
        let spans = spans_read(Spans::new(range.0, range.1, chrono::Duration::hours(1)), 0);
        assert_covers(&spans, range);
        // 1 h, 8 h, 64 h, 512 h, then the rest: not one read per hour (744).
        assert_eq!(spans.len(), 5, "{spans:?}");
    }

    #[test]
    fn a_busy_month_keeps_the_base_span() {
        let range = month();
        let spans = spans_read(
            Spans::new(range.0, range.1, chrono::Duration::hours(1)),
            50_000,
        );
        assert_covers(&spans, range);
        assert_eq!(spans.len(), 744);
    }

    #[test]
    fn a_sparse_month_grows_to_the_target_density() {
        let range = month();
        // 500 events an hour: 40 hours make the read target.
        let spans = spans_read(
            Spans::new(range.0, range.1, chrono::Duration::hours(1)),
            500,
        );
        assert_covers(&spans, range);
        assert!(
            spans[2..spans.len() - 1]
                .iter()
                .all(|(a, b)| (*b - *a) == chrono::Duration::hours(40)),
            "{spans:?}"
        );
    }
}
