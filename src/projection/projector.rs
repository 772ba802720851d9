//! Projector tasks: read the log after the checkpoints, fold, apply.
//!
//! A [`FoldGroup`] folds several projections from **one** read of the log (the
//! read costs as much as an upsert, so N projections reading separately
//! would cost N reads per event). Each member keeps its own checkpoint;
//! the group reads from the lowest and folds an event into a member only
//! if it lies after that member's cursor. Reads are chunked and folded into
//! the same in-memory delta until the delta reaches a row budget, so events
//! that share a bucket and dimensions cost one upsert, not one each.
//!
//! A member is one *tier* of a projection ([`Tier`]: its minute and hour
//! tables, or its day and month tables) with a checkpoint row of its own. A
//! coarse member keeps what it folded as [`Pending`] rows across batches and
//! commits them on its cadence ([`ProjectorConfig::coarse_every`]), so a busy
//! group's day and month rows are rewritten once per interval, not once per
//! commit; the group reads from each member's pending position.
//!
//! Exactly once: the store applies a batch only if every member's checkpoint
//! is still at the cursor the batch was read after, in the same transaction
//! that adds the rows. A crash before commit leaves checkpoints and tables
//! untouched; a crash after commit leaves both moved. A group whose apply
//! comes back [`ApplyOutcome::Stale`] (another instance or a rebuild moved a
//! checkpoint) re-reads the checkpoints and goes on from there.
//!
//! Giving way: a restatement queued on a member's checkpoint lock (same
//! process, announced through [`FoldSignal::restating`]) would otherwise wait
//! for every upsert of the fold holding it. The fold rolls back at its next
//! statement instead ([`ApplyOutcome::GaveWay`]), waits for the restatement,
//! and reads its batch again. A member gives way at most once between two
//! of its commits, so restatements in a row cannot starve it.
//!
//! `as_of`: each read records a [`Watermark`] (when, and which transaction ids
//! were assigned by then). Once a read returns everything below its snapshot's
//! `xmin`, every older mark with `xmax <= xmin` is fully folded, so its time
//! is a true "everything committed before this is in the aggregates".

pub use crate::failpoint::Failpoints;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::fold::Fold;
use super::ProjectionError;
use crate::aggregate::measures::{Delta, Rows};
use crate::aggregate::price::Catalog;
use crate::aggregate::sketch::Bin;
use crate::aggregate::spec::{Granularity, Spec, Tier};
use crate::backoff::Backoff;
use crate::lease::{Holding, Lease, LeaseKind};
use crate::store::{
    AfterCommit, Apply, ApplyOutcome, Cursor, KnownSketches, LogBatch, ProjectionState, Store,
    Watermark,
};

/// How projectors run (`tally serve` flags).
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Most events folded per transaction (read in chunks of at most
    /// [`READ_CHUNK`]; the delta is also capped at [`MAX_DELTA_ROWS`] rows).
    pub batch_size: i64,
    /// Sleep between polls once caught up.
    pub poll_interval: Duration,
    /// How long a projector lease lasts without renewal; a dead instance's
    /// projections are taken over after at most this long.
    pub lease_ttl: Duration,
    /// Crash-test hooks.
    pub failpoints: Failpoints,
    /// Told about every commit that folded events, and about leadership
    /// (the alert evaluator of this process).
    pub on_commit: Option<Arc<FoldSignal>>,
    /// Notified when this process appended events: a caught-up group folds
    /// them at once rather than after `poll_interval` (which still bounds the
    /// wait for events other instances append).
    pub wake: Option<Arc<tokio::sync::Notify>>,
    /// Longest the coarse tier's rows (day and month tables) wait in memory
    /// before they commit while events keep coming; they commit sooner once
    /// the projector has found nothing new for [`COARSE_IDLE_GRACE`] or they
    /// reach [`PENDING_MAX_ROWS`].
    /// Zero: with every batch, like the fine tier.
    pub coarse_every: Duration,
    /// Bytes of the events this process appends kept for its projectors
    /// (`store::LogTail`); 0 turns the tail off.
    pub tail_bytes: usize,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 200_000,
            poll_interval: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(10),
            failpoints: Failpoints::default(),
            on_commit: None,
            wake: None,
            coarse_every: COARSE_EVERY,
            tail_bytes: crate::store::DEFAULT_TAIL_BYTES,
        }
    }
}

/// What the projectors of one process tell its alert evaluator: that they
/// committed (wake up), the oldest event timestamp folded since the evaluator
/// last asked (a late event invalidates the settled parts of windows it has
/// cached), and which projections they lead (it may cache only if every
/// projection it reads is folded here, where it hears about late events).
#[derive(Debug)]
pub struct FoldSignal {
    notify: tokio::sync::Notify,
    oldest_ms: std::sync::atomic::AtomicI64,
    leading: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    /// Restatements waiting for (or holding) each checkpoint row's lock.
    restating: std::sync::Mutex<std::collections::HashMap<String, Arc<Waiting>>>,
    /// Committed minute rows for the alert evaluator's ring.
    feed: std::sync::Mutex<Feed>,
    /// Notified when `feed` gets a commit.
    fed: tokio::sync::Notify,
}

/// The rows one commit added to a live minute table, and the checkpoint
/// slice they are exactly the rows of: the table at `(from, generation)`
/// plus these rows is the table at `(to, generation)`.
#[derive(Debug, Clone)]
pub struct MinuteCommit {
    /// The checkpoint row (the fine tier's).
    pub state: String,
    /// Its generation when the commit's compare-and-set passed.
    pub generation: i64,
    /// Its cursor before the commit.
    pub from: Cursor,
    /// Its cursor after.
    pub to: Cursor,
    /// The rows added to its minute table, those of buckets from `since` on.
    pub rows: Arc<Rows>,
    /// The first bucket whose rows are in `rows` (older ones were left out).
    pub since: DateTime<Utc>,
}

/// Commits waiting for the evaluator, bounded by [`FEED_MAX_ROWS`].
#[derive(Debug, Default)]
struct Feed {
    listening: bool,
    /// The first bucket the listener keeps: older rows are not copied.
    from: Option<DateTime<Utc>>,
    queue: VecDeque<MinuteCommit>,
    rows: usize,
    /// A commit was dropped (nobody listening, or the queue was full) since
    /// the last [`FoldSignal::take_commits`].
    gap: bool,
}

/// Rows the commits waiting for the evaluator may hold; past it they are
/// dropped and the evaluator's ring reloads from the tables.
pub const FEED_MAX_ROWS: usize = 25_000;

impl Default for FoldSignal {
    fn default() -> Self {
        Self {
            notify: tokio::sync::Notify::new(),
            oldest_ms: std::sync::atomic::AtomicI64::new(i64::MAX),
            leading: std::sync::Mutex::new(std::collections::HashMap::new()),
            restating: std::sync::Mutex::new(std::collections::HashMap::new()),
            feed: std::sync::Mutex::new(Feed::default()),
            fed: tokio::sync::Notify::new(),
        }
    }
}

/// How many restatements of one checkpoint are queued on (or hold) its lock.
#[derive(Debug, Default)]
pub struct Waiting {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

impl Waiting {
    /// Whether a restatement is queued on (or holds) the lock now.
    pub fn asked(&self) -> bool {
        self.count.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Waits until no restatement is queued or running, at most `limit`.
    pub async fn settled(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let done = self.done.notified();
                if !self.asked() {
                    return;
                }
                done.await;
            }
        })
        .await;
    }
}

/// Held by a restatement from its lock request to its commit or abandon.
#[derive(Debug)]
pub struct Announced(Arc<Waiting>);

impl Drop for Announced {
    fn drop(&mut self) {
        self.0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.done.notify_waiters();
    }
}

impl FoldSignal {
    /// The waiting count of checkpoint `state`.
    pub fn waiting(&self, state: &str) -> Arc<Waiting> {
        match self.restating.lock() {
            Ok(mut r) => r.entry(state.to_string()).or_default().clone(),
            // A poisoned map only loses the hint: nobody gives way.
            Err(_) => Arc::new(Waiting::default()),
        }
    }

    /// Announces a restatement about to queue on `state`'s checkpoint lock:
    /// until the guard drops, a fold holding that lock rolls back at its
    /// next statement (once between two of its commits) instead of making
    /// the restatement wait for all its upserts.
    pub fn restating(&self, state: &str) -> Announced {
        let w = self.waiting(state);
        w.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Announced(w)
    }

    /// A commit folded events, the oldest with timestamp `oldest`.
    pub fn committed(&self, oldest: Option<DateTime<Utc>>) {
        if let Some(t) = oldest {
            self.oldest_ms
                .fetch_min(t.timestamp_millis(), std::sync::atomic::Ordering::SeqCst);
        }
        self.notify.notify_one();
    }

    /// Whether this process folds `projection` now.
    pub fn set_leading(&self, projection: &str, leading: bool) {
        if let Ok(mut l) = self.leading.lock() {
            l.insert(projection.to_string(), leading);
        }
    }

    /// True when this process folds every one of `projections`.
    pub fn leads_all<'a>(&self, mut projections: impl Iterator<Item = &'a str>) -> bool {
        self.leading
            .lock()
            .map(|l| projections.all(|p| l.get(p).copied().unwrap_or(false)))
            .unwrap_or(false)
    }

    /// The oldest event timestamp folded since the last call, if any.
    pub fn take_oldest(&self) -> Option<DateTime<Utc>> {
        let ms = self
            .oldest_ms
            .swap(i64::MAX, std::sync::atomic::Ordering::SeqCst);
        (ms != i64::MAX).then(|| DateTime::from_timestamp_millis(ms).unwrap_or_default())
    }

    /// Wakes the evaluator without a commit (a rule or quota changed).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Waits for the next commit (or [`FoldSignal::wake`]).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Whether the evaluator takes minute commits now, and from which
    /// bucket on (`None`: not listening).
    pub fn listening(&self) -> Option<DateTime<Utc>> {
        self.feed
            .lock()
            .ok()
            .filter(|f| f.listening)
            .map(|f| f.from.unwrap_or(DateTime::<Utc>::MIN_UTC))
    }

    /// The first bucket the listener keeps (rows of older buckets are not
    /// handed over: no window it serves reads them).
    pub fn listen_from(&self, from: DateTime<Utc>) {
        if let Ok(mut f) = self.feed.lock() {
            f.from = Some(from);
        }
    }

    /// Starts (or stops) keeping minute commits for [`FoldSignal::take_commits`].
    /// Stopping drops what waits and marks a gap.
    pub fn listen(&self, on: bool) {
        if let Ok(mut f) = self.feed.lock() {
            if !on && f.listening {
                f.queue.clear();
                f.rows = 0;
                f.gap = true;
            }
            f.listening = on;
        }
    }

    /// Hands a committed minute slice to the listener (a gap when nobody
    /// listens or the queue is full).
    pub fn publish(&self, commit: MinuteCommit) {
        let Ok(mut f) = self.feed.lock() else {
            return;
        };
        if !f.listening {
            return;
        }
        if f.rows + commit.rows.len() > FEED_MAX_ROWS {
            f.queue.clear();
            f.rows = 0;
            f.gap = true;
            return;
        }
        f.rows += commit.rows.len();
        f.queue.push_back(commit);
        drop(f);
        self.fed.notify_waiters();
    }

    /// The commits published since the last call, in commit order, and
    /// whether any was dropped in between (then the listener must not
    /// chain the others onto what it holds).
    pub fn take_commits(&self) -> (Vec<MinuteCommit>, bool) {
        match self.feed.lock() {
            Ok(mut f) => {
                f.rows = 0;
                let gap = std::mem::take(&mut f.gap);
                (f.queue.drain(..).collect(), gap)
            }
            Err(_) => (Vec::new(), true),
        }
    }

    /// Waits at most `limit` for a commit to be published.
    pub async fn fed(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.fed.notified()).await;
    }
}

/// What a member's commit tells this process (see [`Apply::after_commit`]).
type CommitHook = Box<dyn Fn() + Send + Sync>;

/// Events per log read.
pub const READ_CHUNK: i64 = 2_500;

/// How long a commit failed by `projector.fail_background_commit` runs first.
const FAILED_COMMIT_AFTER: Duration = Duration::from_millis(150);

/// How often the read beside a commit looks for new events once it found
/// nothing more ([`read_ahead`]).
const FOLLOW_EVERY: Duration = Duration::from_millis(15);

/// [`ProjectorConfig::coarse_every`] by default.
pub const COARSE_EVERY: Duration = Duration::from_secs(10);

/// Rows the uncommitted deltas of a group's members (pending, and in the
/// commits running in the background) may hold together before they commit
/// whatever their cadence; past it, the group waits for the commits in
/// flight. They count against the batch's [`MAX_DELTA_ROWS`] too, so what a
/// group holds in memory stays within that budget plus one read chunk's rows
/// (a row is a few hundred bytes). Sized so that a coarse tier whose day and
/// month rows number a few tens of thousands (tens of thousands of users)
/// commits once per interval, not every second: below that, the day and
/// month rows are rewritten about as often as events arrive.
pub const PENDING_MAX_ROWS: usize = 50_000;

/// Aggregate rows after which a transaction's delta stops growing (bounds
/// memory and transaction size). Checked after each [`READ_CHUNK`], so a
/// delta may pass it by one chunk's rows (~9 per event when every event
/// opens rows of its own).
pub const MAX_DELTA_ROWS: usize = 60_000;

/// What one [`FoldGroup::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Step {
    /// Events read and folded (counted once per event, not per member): in
    /// every member's committed rows, or in a coarse member's pending ones.
    pub folded: usize,
    /// Members whose rows committed.
    pub commits: usize,
    /// The last read returned fewer events than asked: nothing more is foldable now.
    pub caught_up: bool,
    /// Caught up, but committed events wait behind a transaction still
    /// running (see [`LogBatch::held_back`]): worth reading again soon.
    pub held_back: bool,
    /// A checkpoint had moved under us; the cursors were reloaded.
    pub stale: bool,
    /// The oldest event timestamp committed by this step (over the members
    /// that committed).
    pub oldest: Option<DateTime<Utc>>,
    /// Aggregate rows upserted (across members and granularities).
    pub rows: usize,
    /// Time spent reading and folding before the apply (zero when the batch
    /// was prefetched during the previous apply).
    pub prepare: Duration,
    /// Time the apply's transactions took (with the next batch's prefetch
    /// running beside them).
    pub apply: Duration,
}

/// One checkpoint inside a [`FoldGroup`] (a projection's tier, or a rebuild's
/// shadow): the spec of its tables and where its checkpoint is.
#[derive(Debug)]
struct Member {
    spec: Arc<Spec>,
    state: String,
    suffix: String,
    cursor: Cursor,
    /// The checkpoint's restatement generation this member's reads assume.
    generation: i64,
    as_of: Option<DateTime<Utc>>,
    leading: bool,
    /// Held while [`FoldGroup::run`] runs; `None` outside it (tests, rebuilds),
    /// where the member always leads.
    lease: Option<Lease>,
    /// Gave way to a restatement since its last commit: it may not again.
    gave_way: bool,
    /// A coarse tier: commits at [`ProjectorConfig::coarse_every`] under
    /// [`FoldGroup::run`] (every batch elsewhere).
    coarse: bool,
    /// How long its folded rows may wait before they commit (zero: every step).
    every: Duration,
    /// Folded after `cursor` (after `committing`'s rows when one runs),
    /// not committed yet.
    pending: Option<Pending>,
    /// Its commit running beside the fold (a member with a cadence commits
    /// in the background, so a large coarse commit does not hold up the
    /// fine tier's next one); at most one at a time.
    committing: Option<InFlight>,
    /// The newest bucket each of its tables holds as of `cursor` (read at
    /// open and reload, raised by its own commits): newer rows are written
    /// without reading a stored sketch. Empty: unknown, read them all.
    newest: Vec<(Granularity, Option<DateTime<Utc>>)>,
    /// The stored sketches of the rows of its newest buckets, as its own
    /// commits wrote them: their upserts need no read. Kept for a fine
    /// tier (a coarse tier's day rows would hold hundreds of megabytes of
    /// sketches for what is a small share of the reads). Forgotten with
    /// `newest`.
    known: Option<Arc<std::sync::Mutex<KnownSketches>>>,
}

/// How old a bucket's rows may be, behind the newest bucket of their table,
/// and still be in [`Member::known`]: live traffic writes the newest few
/// minutes and the current hour again and again; older rows take late
/// events only now and then.
fn known_keep(g: Granularity) -> chrono::TimeDelta {
    match g {
        Granularity::Minute => chrono::TimeDelta::minutes(5),
        Granularity::Hour => chrono::TimeDelta::hours(1),
        Granularity::Day => chrono::TimeDelta::hours(26),
        Granularity::Month => chrono::TimeDelta::days(32),
    }
}

/// Most bytes one member's [`Member::known`] holds (beyond it, it starts
/// over): ~2,000 busy keys' hourly and minute sketches are a few MiB.
const KNOWN_MAX_BYTES: usize = 8 << 20;

/// What a member folded after its checkpoint and has not committed: it lives
/// only in memory and is dropped on any doubt (a stale compare-and-set,
/// giving way to a restatement, a lost lease, a crash); the member then reads
/// again from its committed cursor. Its commit is an ordinary
/// compare-and-set from the committed cursor to `to`, the rows of exactly
/// that cursor slice.
#[derive(Debug)]
struct Pending {
    /// The cursor its rows reach.
    to: Cursor,
    delta: Delta,
    /// The latest `as_of` read with it (true for `to`).
    as_of: Option<DateTime<Utc>>,
    oldest: Option<DateTime<Utc>>,
    /// When its first rows were folded.
    since: Instant,
}

/// A member's commit running in its own task ([`FoldGroup::step`] spawns it,
/// [`FoldGroup::reap`] takes its outcome). Its rows are the member's cursor
/// slice `(cursor, to]`; the member's [`Pending`] rows, if any, start at
/// `to`, so they are dropped (and read again) unless this commit lands.
#[derive(Debug)]
struct InFlight {
    to: Cursor,
    as_of: Option<DateTime<Utc>>,
    rows: usize,
    /// The newest bucket of each table its rows touch (raises
    /// [`Member::newest`] once it lands).
    tops: Vec<(Granularity, DateTime<Utc>)>,
    /// Restatements waiting for the checkpoint's lock, which it gives way to.
    wait: Option<Arc<Waiting>>,
    task: tokio::task::JoinHandle<Result<ApplyOutcome, ProjectionError>>,
}

/// The newest bucket of each table `delta` has rows in.
fn tops(delta: &Delta) -> Vec<(Granularity, DateTime<Utc>)> {
    delta
        .tables
        .iter()
        .filter_map(|(g, rows)| Some((*g, rows.keys().map(|k| k.bucket).max()?)))
        .collect()
}

impl Member {
    /// A member at checkpoint `row`, leading until a lease says otherwise.
    fn at(
        spec: Arc<Spec>,
        state: String,
        suffix: String,
        row: &ProjectionState,
        coarse: bool,
    ) -> Self {
        Member {
            spec,
            state,
            suffix,
            cursor: row.cursor,
            generation: row.generation,
            as_of: row.as_of,
            leading: true,
            lease: None,
            gave_way: false,
            coarse,
            every: Duration::ZERO,
            pending: None,
            committing: None,
            newest: Vec::new(),
            known: (!coarse).then(Default::default),
        }
    }

    /// Forgets the stored sketches it knew (its checkpoint is read again).
    fn forget_known(&self) {
        if let Some(k) = &self.known {
            if let Ok(mut k) = k.lock() {
                k.clear();
            }
        }
    }

    /// Before an apply that passes [`Member::known`].
    fn begin_known(&self) {
        if let Some(k) = &self.known {
            if let Ok(mut k) = k.lock() {
                k.begin(&self.spec, Utc::now());
            }
        }
    }

    /// Its last apply landed: what it recorded is stored.
    fn landed_known(&self) {
        if let Some(k) = &self.known {
            if let Ok(mut k) = k.lock() {
                k.landed(known_keep, KNOWN_MAX_BYTES);
            }
        }
    }

    /// Reads the newest bucket of each of its tables (after its checkpoint
    /// was read: a writer committing in between only makes it higher).
    async fn load_newest(&mut self, store: &Store) -> Result<(), ProjectionError> {
        self.forget_known();
        self.newest = store
            .projections()
            .newest_buckets(&self.spec, &self.suffix)
            .await?;
        Ok(())
    }

    /// Raises the newest buckets by the tops of rows that just committed.
    fn committed(&mut self, tops: &[(Granularity, DateTime<Utc>)]) {
        for &(g, top) in tops {
            if let Some((_, newest)) = self.newest.iter_mut().find(|(ng, _)| *ng == g) {
                *newest = Some(newest.map_or(top, |n| n.max(top)));
            }
        }
    }

    /// Where the member's next read starts: after its pending rows, or
    /// after the rows of its commit in flight.
    fn read_at(&self) -> Cursor {
        match (&self.pending, &self.committing) {
            (Some(p), _) => p.to,
            (None, Some(c)) => c.to,
            (None, None) => self.cursor,
        }
    }

    /// Takes a batch folded after [`Member::read_at`] into the pending rows.
    fn absorb(
        &mut self,
        to: Cursor,
        delta: Delta,
        as_of: Option<DateTime<Utc>>,
        oldest: Option<DateTime<Utc>>,
    ) {
        let base = self.read_at();
        match &mut self.pending {
            Some(p) => {
                if to != p.to {
                    p.delta.merge(delta);
                    p.to = to;
                    p.oldest = match (p.oldest, oldest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                p.as_of = as_of.or(p.as_of);
            }
            None if to != base => {
                self.pending = Some(Pending {
                    to,
                    delta,
                    as_of,
                    oldest,
                    since: Instant::now(),
                })
            }
            None => {}
        }
    }

    /// Whether the pending rows commit now: their interval passed, or `now`
    /// (the projector found nothing new for [`COARSE_IDLE_GRACE`], or the
    /// group's pending rows reached [`PENDING_MAX_ROWS`]).
    fn due(&self, now: bool) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| now || p.since.elapsed() >= self.every)
    }

    /// Rows waiting to commit.
    fn pending_rows(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.delta.rows())
    }

    /// Rows of its commit in flight.
    fn committing_rows(&self) -> usize {
        self.committing.as_ref().map_or(0, |c| c.rows)
    }
}

/// Projections folded together from one read of the log.
pub struct FoldGroup {
    store: Store,
    members: Vec<Member>,
    marks: VecDeque<Watermark>,
    /// The next batch, read and folded while the previous one committed.
    prefetched: Option<Prepared>,
    last_write: Instant,
    /// Since when every step found nothing new (`None`: the last one read
    /// events).
    idle_since: Option<Instant>,
    /// Commit the coarse tiers at the first step that finds nothing new,
    /// without [`COARSE_IDLE_GRACE`] ([`Projector::catch_up`]).
    flush_idle: bool,
    failpoints: Failpoints,
    /// The price catalog events are costed with; `None`: load it before the
    /// next read. Loaded only after the members' generations were read, so
    /// a catalog change (which bumps every generation) committed before that
    /// read is in it, and one committed after makes the apply stale.
    catalog: Option<Arc<Catalog>>,
    /// Where restatements of this process announce themselves (set by [`FoldGroup::run`]).
    signal: Option<Arc<FoldSignal>>,
}

/// Longest a member that gave way waits for the restatement before it reads
/// again (its compare-and-set then simply queues on the lock).
const GIVE_WAY_WAIT: Duration = Duration::from_secs(2);

/// How soon a group first reads again when committed events were held back
/// by a transaction still running (instead of waiting for a poll or an
/// append); the wait doubles up to the poll interval (at most 1 s) while it lasts.
const HELD_BACK_RETRY: Duration = Duration::from_millis(10);

/// How long [`Projector::catch_up`] waits for held-back events before it
/// says so in the log.
const HELD_BACK_NOTICE: Duration = Duration::from_secs(5);

/// Most watermarks remembered while waiting for old transactions to finish.
const MAX_MARKS: usize = 1024;

/// How long a group finds nothing new before its coarse tiers commit
/// their pending rows ahead of [`ProjectorConfig::coarse_every`].
pub const COARSE_IDLE_GRACE: Duration = Duration::from_millis(500);

/// An idle group persists a newer `as_of` at most this often.
const IDLE_AS_OF_EVERY: Duration = Duration::from_millis(500);

async fn open_member(
    store: &Store,
    spec: Arc<Spec>,
    state: &str,
    suffix: &str,
) -> Result<Member, ProjectionError> {
    let row = store
        .projections()
        .ensure_projection(&spec, state, suffix)
        .await?;
    if row.spec_hash != spec.hash() {
        return Err(ProjectionError::SpecChanged {
            name: spec.name.clone(),
            stored: row.spec,
            now: spec.canonical(),
        });
    }
    let mut m = Member::at(spec, state.to_string(), suffix.to_string(), &row, false);
    m.load_newest(store).await?;
    Ok(m)
}

/// Opens every tier of the live projection `spec` (see [`Tier`]), creating
/// their tables and checkpoints if missing.
async fn open_tiers(store: &Store, spec: &Spec) -> Result<Vec<Member>, ProjectionError> {
    let rows = store.projections().ensure_tiers(spec).await?;
    let mut members = Vec::with_capacity(rows.len());
    for (t, row) in spec.tiers().into_iter().zip(rows) {
        if row.spec_hash != t.spec.hash() {
            return Err(ProjectionError::SpecChanged {
                name: spec.name.clone(),
                stored: row.spec,
                now: t.spec.canonical(),
            });
        }
        let coarse = t.tier == Tier::Coarse;
        let mut m = Member::at(Arc::new(t.spec), t.state, String::new(), &row, coarse);
        m.load_newest(store).await?;
        members.push(m);
    }
    Ok(members)
}

impl FoldGroup {
    /// Joins opened projectors into one group (they keep their checkpoints).
    pub fn new(store: Store, projectors: Vec<Projector>) -> Self {
        let members = projectors
            .into_iter()
            .flat_map(|p| p.group.members)
            .collect();
        Self {
            store,
            members,
            marks: VecDeque::new(),
            prefetched: None,
            last_write: Instant::now(),
            idle_since: None,
            flush_idle: false,
            failpoints: Failpoints::default(),
            catalog: None,
            signal: None,
        }
    }

    /// The lowest member checkpoint: everything at or before it is folded everywhere.
    pub fn min_cursor(&self) -> Cursor {
        self.members
            .iter()
            .map(|m| m.cursor)
            .min()
            .unwrap_or_default()
    }

    /// Names of the member projections.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.state.clone()).collect()
    }

    /// Re-reads every member's checkpoint. A member whose stored spec no longer
    /// matches is an error (it must stop: its tables have another shape now).
    pub async fn reload(&mut self) -> Result<(), ProjectionError> {
        // A commit landing after the read would make the next one stale.
        self.settle().await;
        let states = self.store.projections().projection_states().await?;
        for m in &mut self.members {
            let row = states
                .iter()
                .find(|s| s.name == m.state)
                .ok_or_else(|| ProjectionError::NotFound(m.state.clone()))?;
            if row.spec_hash != m.spec.hash() {
                return Err(ProjectionError::SpecChanged {
                    name: m.spec.name.clone(),
                    stored: row.spec.clone(),
                    now: m.spec.canonical(),
                });
            }
            m.cursor = row.cursor;
            m.generation = row.generation;
            m.as_of = row.as_of;
            m.pending = None;
            m.newest.clear();
            m.forget_known();
        }
        for m in &mut self.members {
            m.load_newest(&self.store).await?;
        }
        self.marks.clear();
        self.prefetched = None;
        self.catalog = None;
        Ok(())
    }

    /// Rows held between steps: the pending rows of members with a cadence,
    /// but those in `committing`, and the rows of commits in flight.
    fn held(&self, committing: &[usize]) -> usize {
        let in_flight: usize = self.members.iter().map(Member::committing_rows).sum();
        in_flight
            + self
                .members
                .iter()
                .enumerate()
                .filter(|(i, m)| !m.every.is_zero() && !committing.contains(i))
                .map(|(_, m)| m.pending_rows())
                .sum::<usize>()
    }

    /// Whether the next batch was read beside the last commit (one kept
    /// only if it holds events).
    fn ready(&self) -> bool {
        self.prefetched.is_some()
    }

    /// Whether a member's commit runs in the background.
    pub fn committing(&self) -> bool {
        self.members.iter().any(|m| m.committing.is_some())
    }

    /// Waits for the commits in flight and forgets their outcome (the caller
    /// reads the checkpoints next, or stops).
    async fn settle(&mut self) {
        for m in &mut self.members {
            if let Some(c) = m.committing.take() {
                let _ = c.task.await;
            }
        }
    }

    /// Takes the outcome of the members' commits in flight: those that
    /// ended, or all of them (`wait`). One that landed moves its member's
    /// cursor. One that did not (stale, gave way, failed) leaves the member's
    /// pending rows without their base (they start where its rows end): they
    /// are dropped, and the member reads again from its checkpoint. `Some`:
    /// the checkpoints were read again; the step to report.
    async fn reap(&mut self, wait: bool) -> Result<Option<Step>, ProjectionError> {
        let mut failed = None;
        let mut stale = false;
        let mut gave_way = Vec::new();
        for m in &mut self.members {
            if !m
                .committing
                .as_ref()
                .is_some_and(|c| wait || c.task.is_finished())
            {
                continue;
            }
            let Some(c) = m.committing.take() else {
                continue;
            };
            let outcome = match c.task.await {
                Ok(outcome) => outcome,
                Err(e) => Err(ProjectionError::CommitTask(e.to_string())),
            };
            if let Ok(ApplyOutcome::Applied) = outcome {
                if Failpoints::fires(self.failpoints.after_commit) {
                    crate::failpoint::abort("projector.after_commit");
                }
                m.cursor = c.to;
                m.committed(&c.tops);
                m.landed_known();
                if c.as_of.is_some() {
                    m.as_of = c.as_of;
                }
                m.gave_way = false;
                continue;
            }
            // Its rows are not in the tables: neither are the rows after them.
            m.pending = None;
            match outcome {
                Ok(ApplyOutcome::GaveWay) => {
                    if let Some(w) = c.wait.filter(|w| w.asked()) {
                        m.gave_way = true;
                        gave_way.push(w);
                    }
                    stale = true;
                }
                Ok(_) => stale = true,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if failed.is_none() && !stale {
            return Ok(None);
        }
        // What was read ahead assumed those rows committed.
        self.prefetched = None;
        self.marks.clear();
        if let Some(e) = failed {
            return Err(e);
        }
        tracing::debug!(projections = ?self.names(), "a commit in the background did not land; reading again from the checkpoints");
        for w in gave_way {
            w.settled(GIVE_WAY_WAIT).await;
        }
        self.reload().await?;
        Ok(Some(Step {
            stale: true,
            ..Step::default()
        }))
    }

    /// Starts member `i`'s commit of its pending rows (up to `to`) in a task
    /// of its own; [`FoldGroup::reap`] takes the outcome. Returns its rows.
    fn spawn_commit(
        &mut self,
        i: usize,
        (to, as_of): (Cursor, Option<DateTime<Utc>>),
        wait: Option<Arc<Waiting>>,
        hook: Option<CommitHook>,
        crash: bool,
    ) -> usize {
        let fail = Failpoints::fires(self.failpoints.fail_background_commit);
        let store = self.store.clone();
        let m = &mut self.members[i];
        let Some(p) = m.pending.take() else {
            return 0;
        };
        let rows = p.delta.rows();
        let tops = tops(&p.delta);
        let (state, spec, suffix) = (m.state.clone(), m.spec.clone(), m.suffix.clone());
        let (from, generation, newest) = (m.cursor, m.generation, m.newest.clone());
        m.begin_known();
        let known = m.known.clone();
        let give_way = wait.clone();
        let task = tokio::spawn(async move {
            if fail {
                // As a connection lost mid-commit would, a while after it began.
                tokio::time::sleep(FAILED_COMMIT_AFTER).await;
                return Err(ProjectionError::CommitTask(
                    "failpoint projector.fail_background_commit".into(),
                ));
            }
            let apply = Apply {
                state: &state,
                spec: &spec,
                suffix: &suffix,
                from,
                generation,
                to,
                as_of,
                delta: &p.delta,
                before_commit: crash.then_some(crash_before_commit as fn()),
                give_way: give_way.as_deref().map(|w| &w.count),
                newest: &newest,
                after_commit: hook.as_deref().map(AfterCommit),
                known: known.as_deref(),
            };
            Ok(store
                .projections()
                .apply_fold(std::slice::from_ref(&apply))
                .await?)
        });
        m.committing = Some(InFlight {
            to,
            as_of,
            rows,
            tops,
            wait,
            task,
        });
        rows
    }

    /// Drops the member whose spec changed (named in the error), keeping the rest.
    fn drop_member(&mut self, name: &str) {
        self.members.retain(|m| m.spec.name != name);
        // Its indices no longer match the members.
        self.prefetched = None;
    }

    /// Reads up to `limit` events after the lowest leading checkpoint (in
    /// chunks), folds them into every leading member that has not folded them
    /// yet, and applies everything in one transaction. While that transaction
    /// runs, the next batch is already read and folded (the database and the
    /// fold use different cores); it is kept for the next step if the commit
    /// went through, and thrown away otherwise.
    pub async fn step(&mut self, limit: i64) -> Result<Step, ProjectionError> {
        // Commits in flight that ended; all of them once the rows held
        // (pending and in flight) reach their bound: a member's next rows
        // cannot commit while its last commit runs.
        let full = self.held(&[]) >= PENDING_MAX_ROWS;
        if let Some(step) = self.reap(full).await? {
            return Ok(step);
        }
        let leading: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].leading)
            .collect();
        if leading.is_empty() {
            self.prefetched = None;
            return Ok(Step {
                caught_up: true,
                ..Step::default()
            });
        }
        let limit = limit.max(1);
        let started = Instant::now();
        let catalog = match &self.catalog {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(self.store.prices().catalog().await?);
                self.catalog = Some(c.clone());
                c
            }
        };
        let prepared = match self.prefetched.take() {
            Some(p) if p.leading == leading => p,
            _ => {
                let base: Vec<Cursor> =
                    leading.iter().map(|&i| self.members[i].read_at()).collect();
                let budget = MAX_DELTA_ROWS.saturating_sub(self.held(&[]));
                prepare(
                    &self.store,
                    &self.members,
                    &catalog,
                    &mut self.marks,
                    leading.clone(),
                    base,
                    (limit, budget),
                    None,
                )
                .await?
            }
        };
        let prepare_took = started.elapsed();
        let Prepared {
            leading,
            to,
            deltas,
            last_mark,
            read,
            caught_up,
            held_back,
            oldest,
            ..
        } = prepared;
        let as_of = as_of(&mut self.marks, last_mark);
        // Each member takes its share into its pending rows; those whose
        // rows are due commit them (the fine tier every step).
        let idle = caught_up && read == 0;
        let idle_write_due = self.last_write.elapsed() >= IDLE_AS_OF_EVERY;
        // The coarse tier's rows wait for their interval while events keep
        // coming; once none came for [`COARSE_IDLE_GRACE`], they commit.
        // (Under a steady load the projector catches up between batches
        // every few hundred milliseconds: committing then rewrote every
        // active group's day and month rows about once a second.)
        self.idle_since = match idle {
            true => Some(self.idle_since.unwrap_or_else(Instant::now)),
            false => None,
        };
        let settled = self
            .idle_since
            .is_some_and(|t| self.flush_idle || t.elapsed() >= COARSE_IDLE_GRACE);
        for ((&i, &to), delta) in leading.iter().zip(&to).zip(deltas) {
            self.members[i].absorb(to, delta, as_of, oldest);
        }
        let full = self.held(&[]) >= PENDING_MAX_ROWS;
        let mut chosen = Vec::new();
        for &i in &leading {
            let m = &self.members[i];
            if m.committing.is_some() {
                // One commit at a time: its next rows wait for it.
                continue;
            }
            if m.due(settled || full) {
                chosen.push(i);
            } else if m.pending.is_none()
                && idle_write_due
                && as_of.is_some_and(|t| m.as_of.is_none_or(|old| t > old))
            {
                // Nothing new: only a newer `as_of` to record.
                chosen.push(i);
            }
        }
        if chosen.is_empty() {
            return Ok(Step {
                folded: read as usize,
                caught_up,
                held_back,
                prepare: prepare_took,
                ..Step::default()
            });
        }
        let crash = Failpoints::fires(self.failpoints.before_commit);
        let waits: Vec<Option<Arc<Waiting>>> = chosen
            .iter()
            .map(|&i| {
                let m = &self.members[i];
                let signal = self.signal.as_ref().filter(|_| !m.gave_way)?;
                Some(signal.waiting(&m.state))
            })
            .collect();
        let nothing = Delta::default();
        // What each chosen member commits: its pending rows, or only a newer `as_of`.
        let commits: Vec<(Cursor, Option<DateTime<Utc>>)> = chosen
            .iter()
            .map(|&i| {
                let m = &self.members[i];
                let newer =
                    |t: Option<DateTime<Utc>>| t.filter(|t| m.as_of.is_none_or(|old| *t > old));
                match &m.pending {
                    Some(p) => (p.to, newer(p.as_of)),
                    None => (m.cursor, newer(as_of)),
                }
            })
            .collect();
        // Told when each member's commit lands (on PostgreSQL each commits
        // on its own): the evaluator wakes, and the alert ring takes the
        // live minute rows, as soon as that table is committed, not after
        // the slower members or the next batch's prefetch.
        let drop_feed = Failpoints::fires(self.failpoints.drop_ring_feed);
        let feed_from = self
            .signal
            .as_ref()
            .and_then(|s| s.listening())
            .filter(|_| !drop_feed);
        let hooks: Vec<Option<CommitHook>> = chosen
            .iter()
            .zip(&commits)
            .map(|(&i, &(to, _))| {
                let signal = self.signal.clone()?;
                let m = &self.members[i];
                let pending = m.pending.as_ref();
                let feed = feed_from.filter(|_| m.suffix.is_empty()).and_then(|from| {
                    let p = pending?;
                    let (_, rows) = p
                        .delta
                        .tables
                        .iter()
                        .find(|(g, _)| *g == Granularity::Minute)?;
                    let rows: Rows = rows
                        .iter()
                        .filter(|(k, _)| k.bucket >= from)
                        .map(|(k, m)| (k.clone(), m.clone()))
                        .collect();
                    Some(MinuteCommit {
                        state: m.state.clone(),
                        generation: m.generation,
                        from: m.cursor,
                        to,
                        rows: Arc::new(rows),
                        since: from,
                    })
                });
                let oldest = pending.and_then(|p| p.oldest);
                let feed = std::sync::Mutex::new(feed);
                Some(Box::new(move || {
                    if let Some(c) = feed.lock().ok().and_then(|mut f| f.take()) {
                        signal.publish(c);
                    }
                    signal.committed(oldest);
                }) as CommitHook)
            })
            .collect();
        // A member with a cadence commits its pending rows in the
        // background: a coarse commit of tens of thousands of rows does not
        // hold up the next fine commit. The rest commit here, beside the
        // next batch's read.
        let mut spawned = (0, 0);
        let mut inline = Vec::with_capacity(chosen.len());
        for (((i, commit), wait), hook) in chosen.into_iter().zip(commits).zip(waits).zip(hooks) {
            let m = &self.members[i];
            if !m.every.is_zero() && m.pending.is_some() {
                spawned.0 += 1;
                spawned.1 += self.spawn_commit(i, commit, wait, hook, crash);
            } else {
                inline.push((i, commit, wait, hook));
            }
        }
        if inline.is_empty() {
            return Ok(Step {
                folded: read as usize,
                commits: spawned.0,
                caught_up,
                held_back,
                rows: spawned.1,
                prepare: prepare_took,
                ..Step::default()
            });
        }
        let (chosen, ((commits, waits), hooks)): (Vec<usize>, ((Vec<_>, Vec<_>), Vec<_>)) = inline
            .into_iter()
            .map(|(i, commit, wait, hook)| (i, ((commit, wait), hook)))
            .unzip();
        for &i in &chosen {
            self.members[i].begin_known();
        }
        let applies: Vec<Apply<'_>> = chosen
            .iter()
            .zip(&commits)
            .zip(&waits)
            .zip(&hooks)
            .map(|(((&i, &(to, member_as_of)), wait), hook)| {
                let m = &self.members[i];
                Apply {
                    state: &m.state,
                    spec: &m.spec,
                    suffix: &m.suffix,
                    from: m.cursor,
                    generation: m.generation,
                    to,
                    as_of: member_as_of,
                    delta: m.pending.as_ref().map_or(&nothing, |p| &p.delta),
                    before_commit: crash.then_some(crash_before_commit as fn()),
                    give_way: wait.as_deref().map(|w| &w.count),
                    newest: &m.newest,
                    after_commit: hook.as_deref().map(AfterCommit),
                    known: m.known.as_deref(),
                }
            })
            .collect();
        let rows: usize = spawned.1 + applies.iter().map(|a| a.delta.rows()).sum::<usize>();
        let committed_oldest = chosen
            .iter()
            .filter_map(|&i| self.members[i].pending.as_ref().and_then(|p| p.oldest))
            .min();
        let store = self.store.clone();
        let applying = Instant::now();
        let budget = MAX_DELTA_ROWS.saturating_sub(self.held(&chosen));
        // The next batch starts where this one ends (after the pending
        // rows), as if the commit went through, and is read while the
        // commit runs: what a backlog holds, or (caught up) what arrives
        // until the commit ends, so the next commit starts at once with
        // everything that came meanwhile already folded.
        let applied = CancellationToken::new();
        let next = prepare(
            &store,
            &self.members,
            &catalog,
            &mut self.marks,
            leading.clone(),
            to.clone(),
            (limit, budget),
            Some(applied.clone()),
        );
        let apply = async {
            let outcome = store.projections().apply_fold(&applies).await;
            applied.cancel();
            outcome
        };
        let (outcome, next) = tokio::join!(apply, next);
        let next = Some(next);
        drop(applies);
        let apply_took = applying.elapsed();
        let outcome = outcome?;
        // A member asked to give way when the outcome came may have given
        // way (on PostgreSQL the others may have committed): it may not give
        // way again until it commits.
        let mut gave_way = Vec::new();
        for (&i, wait) in chosen.iter().zip(&waits) {
            let m = &mut self.members[i];
            if outcome == ApplyOutcome::Applied {
                m.gave_way = false;
            } else if let Some(w) = wait.as_ref().filter(|w| w.asked()) {
                m.gave_way = true;
                gave_way.push(w.clone());
            }
        }
        match outcome {
            ApplyOutcome::Applied => {
                if Failpoints::fires(self.failpoints.after_commit) {
                    crate::failpoint::abort("projector.after_commit");
                }
                for (&i, &(to, member_as_of)) in chosen.iter().zip(&commits) {
                    let m = &mut self.members[i];
                    m.cursor = to;
                    if let Some(p) = m.pending.take() {
                        m.committed(&tops(&p.delta));
                    }
                    m.landed_known();
                    if member_as_of.is_some() {
                        m.as_of = member_as_of;
                    }
                }
                self.last_write = Instant::now();
                // A failed prefetch is not this step's failure: the next step
                // reads again. So does one that found nothing: events that
                // wake the group later are not in it.
                self.prefetched = next.and_then(Result::ok).filter(|p| p.read > 0);
                Ok(Step {
                    folded: read as usize,
                    commits: spawned.0 + chosen.len(),
                    caught_up,
                    held_back,
                    stale: false,
                    oldest: committed_oldest,
                    rows,
                    prepare: prepare_took,
                    apply: apply_took,
                })
            }
            ApplyOutcome::Stale | ApplyOutcome::GaveWay => {
                if outcome == ApplyOutcome::Stale {
                    tracing::info!(projections = ?self.names(), "a checkpoint moved under this projector; re-reading them");
                } else {
                    tracing::debug!(projections = ?self.names(), "gave way to a restatement; reading the batch again after it");
                }
                // Reading before the restatement commits would find the old
                // generation, and the next compare-and-set would fail again.
                for w in gave_way {
                    w.settled(GIVE_WAY_WAIT).await;
                }
                self.reload().await?;
                Ok(Step {
                    stale: true,
                    prepare: prepare_took,
                    apply: apply_took,
                    ..Step::default()
                })
            }
        }
    }

    /// Runs until `shutdown`: takes (or waits for) each member's lease and
    /// folds new events into the members it leads.
    pub async fn run(
        mut self,
        config: ProjectorConfig,
        owner: String,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        let mut held_back_wait = Duration::ZERO;
        self.failpoints = config.failpoints;
        self.signal = config.on_commit.clone();
        let store = self.store.clone();
        for m in &mut self.members {
            m.leading = false;
            m.every = if m.coarse {
                config.coarse_every
            } else {
                Duration::ZERO
            };
            m.lease = Some(Lease::new(
                LeaseKind::Projection,
                &m.state,
                &owner,
                config.lease_ttl,
            ));
            if let Some(signal) = &config.on_commit {
                signal.set_leading(&m.state, false);
            }
        }
        while !shutdown.is_cancelled() && !self.members.is_empty() {
            let mut taken = false;
            for m in &mut self.members {
                let Some(lease) = m.lease.as_mut() else {
                    continue;
                };
                let holding = lease.keep(store.leases()).await;
                m.leading = holding.held();
                if !m.leading {
                    // Another instance may fold (and commit) this slice now.
                    m.pending = None;
                    m.forget_known();
                }
                if matches!(holding, Holding::Taken | Holding::Lost) {
                    taken |= holding == Holding::Taken;
                    if let Some(signal) = &config.on_commit {
                        signal.set_leading(&m.state, m.leading);
                    }
                }
            }
            if taken {
                // Another instance may have folded while we did not lead.
                if let Err(e) = self.reload().await {
                    if !self.handle(e) {
                        backoff.sleep(&shutdown).await;
                    }
                    continue;
                }
            }
            if !self.members.iter().any(|m| m.leading) {
                tokio::select! {
                    _ = tokio::time::sleep(config.lease_ttl / 3) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            match self.step(config.batch_size).await {
                Ok(step) => {
                    backoff.reset();
                    if step.commits > 0 {
                        tracing::debug!(
                            projections = ?self.names(),
                            events = step.folded,
                            commits = step.commits,
                            rows = step.rows,
                            prepare_ms = step.prepare.as_millis() as u64,
                            apply_ms = step.apply.as_millis() as u64,
                            "folded"
                        );
                    }
                    if step.caught_up && !self.ready() {
                        let wait = if step.held_back {
                            // Committed events wait only for another
                            // transaction to end: look again soon, backing
                            // off towards the poll interval (at most 1 s)
                            // while no progress is made.
                            let most = config.poll_interval.min(Duration::from_secs(1));
                            held_back_wait = if step.folded > 0 {
                                HELD_BACK_RETRY
                            } else {
                                held_back_wait * 2
                            }
                            .clamp(HELD_BACK_RETRY, most.max(HELD_BACK_RETRY));
                            held_back_wait
                        } else if self.members.iter().any(|m| m.pending.is_some()) {
                            // Rows wait for the idle grace: look again then,
                            // whatever the poll interval.
                            config.poll_interval.min(COARSE_IDLE_GRACE)
                        } else {
                            config.poll_interval
                        };
                        let appended = async {
                            match &config.wake {
                                Some(wake) => wake.notified().await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = appended => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                }
                Err(e) => {
                    if !self.handle(e) {
                        backoff.sleep(&shutdown).await;
                    }
                }
            }
        }
        self.settle().await;
        for m in &self.members {
            if let Some(signal) = &config.on_commit {
                signal.set_leading(&m.state, false);
            }
        }
        for m in &mut self.members {
            if let Some(lease) = m.lease.as_mut() {
                lease.release(store.leases()).await;
            }
        }
    }

    /// Logs an error; a changed spec removes its member (true: go on at once).
    fn handle(&mut self, e: ProjectionError) -> bool {
        match e {
            ProjectionError::SpecChanged { ref name, .. } => {
                tracing::error!(projection = %name, error = %e, "projector stopped for this projection");
                let name = name.clone();
                self.drop_member(&name);
                true
            }
            e => {
                tracing::warn!(projections = ?self.names(), error = %e, "projector step failed; retrying");
                false
            }
        }
    }
}

/// The `as_of` a batch whose last read (watermark `mark`) reached everything
/// foldable proves: it reached everything below that snapshot's xmin, so
/// every earlier mark with `xmax <= xmin` is fully folded; those are taken
/// from `marks`, and the newest one's time is the answer.
fn as_of(marks: &mut VecDeque<Watermark>, mark: Option<Watermark>) -> Option<DateTime<Utc>> {
    let mark = mark?;
    let mut as_of = None;
    while let Some(m) = marks.front() {
        if m.xmax > mark.xmin {
            break;
        }
        as_of = Some(m.at);
        marks.pop_front();
    }
    as_of
}

/// A batch read and folded, not yet applied.
struct Prepared {
    /// Indices of the members it was folded for.
    leading: Vec<usize>,
    /// Each member's cursor after the batch.
    to: Vec<Cursor>,
    deltas: Vec<Delta>,
    /// The last read's watermark, when it reached everything foldable: the
    /// batch's `as_of` is computed from it when the batch is applied (see
    /// [`as_of`]), so a batch read ahead and thrown away costs no mark.
    last_mark: Option<Watermark>,
    read: i64,
    caught_up: bool,
    /// The last read found committed events it could not fold yet.
    held_back: bool,
    /// Oldest event timestamp in the batch.
    oldest: Option<DateTime<Utc>>,
}

/// Reads up to `limit` events after the lowest of `base` and folds each into
/// the members (`leading`, with cursors `base`) it lies after, stopping once
/// the delta holds `budget` rows.
///
/// The log is read by a spawned task ([`read_ahead`]) that stays a chunk or
/// two ahead: the database's scan and the decoding of rows run on the other
/// core while this one folds. Once the delta holds [`MAX_DELTA_ROWS`] rows
/// the rest of the read is abandoned.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    store: &Store,
    members: &[Member],
    catalog: &Catalog,
    marks: &mut VecDeque<Watermark>,
    leading: Vec<usize>,
    base: Vec<Cursor>,
    (limit, budget): (i64, usize),
    follow: Option<CancellationToken>,
) -> Result<Prepared, ProjectionError> {
    // At least one chunk's worth, however much is held.
    let budget = budget.max(MAX_DELTA_ROWS / 4);
    let from = base.iter().copied().min().unwrap_or_default();
    let mut folds: Vec<Fold> = leading
        .iter()
        .map(|&i| Fold::new(&members[i].spec))
        .collect();
    let mut to = base.clone();
    let mut read = 0i64;
    let mut last_mark: Option<Watermark> = None;
    let mut oldest = None;
    let (sender, mut batches) = tokio::sync::mpsc::channel(2);
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { read_ahead(&store, from, limit, sender, follow).await })
    };
    let mut capped = false;
    let mut held_back = false;
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        read += batch.events.len() as i64;
        held_back = batch.held_back;
        if last_mark != Some(batch.watermark) {
            if marks.len() == MAX_MARKS {
                marks.pop_front();
            }
            marks.push_back(batch.watermark);
            last_mark = Some(batch.watermark);
        }
        let mut voided = batch.voided.iter().copied().peekable();
        for (at, (cursor, e)) in batch.events.iter().enumerate() {
            // A voided event counts nowhere; the cursor still moves past it.
            if voided.next_if_eq(&at).is_some() {
                for (k, t) in to.iter_mut().enumerate() {
                    if *cursor > base[k] {
                        *t = *cursor;
                    }
                }
                continue;
            }
            oldest = Some(oldest.map_or(e.ts, |o: DateTime<Utc>| o.min(e.ts)));
            let bin = e.latency_ms.map(Bin::of);
            let charge = catalog.charge(e);
            for (k, fold) in folds.iter_mut().enumerate() {
                if *cursor > base[k] {
                    fold.add_binned(e, bin, charge);
                    to[k] = *cursor;
                }
            }
        }
        if folds.iter().map(Fold::rows).sum::<usize>() >= budget {
            capped = true;
            break;
        }
    }
    drop(batches);
    // Capped: the reader stops by itself once its send fails (aborting it
    // mid-read would drop its transaction half-way).
    if !capped {
        // The channel closed: the reader ended. Make sure it did not die
        // half-way, which would pass for having read everything.
        reader
            .await
            .map_err(|e| ProjectionError::ReadTask(e.to_string()))?;
    }
    let caught_up = !capped && read < limit;
    Ok(Prepared {
        leading,
        to,
        deltas: folds.into_iter().map(Fold::finish).collect(),
        last_mark: last_mark.filter(|_| caught_up),
        read,
        caught_up,
        held_back: caught_up && held_back,
        oldest,
    })
}

/// Sends up to `limit` events after `after` to `out` in batches of
/// [`READ_CHUNK`] (each read its own short snapshot), ending with the error if
/// one occurs; stops once `out` is closed. With `follow`, a read that finds
/// nothing more does not end it: it reads again every [`FOLLOW_EVERY`] until
/// `follow` is cancelled (the commit running beside it ended), and ends
/// after a read that found nothing more, so a batch still ends caught up.
///
/// One long snapshot streaming the whole batch was tried and measured slower
/// on PostgreSQL: while it is open, the upserts' old row versions cannot be
/// pruned (see BENCHMARKS.md).
async fn read_ahead(
    store: &Store,
    after: Cursor,
    limit: i64,
    out: tokio::sync::mpsc::Sender<Result<LogBatch, crate::store::StoreError>>,
    follow: Option<CancellationToken>,
) {
    let (mut after, mut left) = (after, limit);
    while left > 0 {
        let want = READ_CHUNK.clamp(1, left);
        let batch = match store.projections().read_log(after, want).await {
            Ok(b) => b,
            Err(e) => {
                let _ = out.send(Err(e)).await;
                return;
            }
        };
        let n = batch.events.len() as i64;
        if let Some((c, _)) = batch.events.last() {
            after = *c;
        }
        if out.send(Ok(batch)).await.is_err() {
            return;
        }
        left -= n;
        if n < want {
            let Some(follow) = follow.as_ref() else {
                return;
            };
            tokio::select! {
                _ = follow.cancelled() => return,
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            }
        }
    }
}

/// Folds one projection's tables (live, or shadow during a rebuild): a
/// [`FoldGroup`] of one.
pub struct Projector {
    spec: Arc<Spec>,
    group: FoldGroup,
}

impl Projector {
    /// Creates the tables and checkpoints if missing and checks that the
    /// stored spec hashes are this spec's. The live projection (`state` is
    /// the spec's name, no `suffix`) is folded by tier, each tier under its
    /// own checkpoint ([`Tier`]); a rebuild's shadow under one.
    pub async fn open(
        store: Store,
        spec: Arc<Spec>,
        state: &str,
        suffix: &str,
    ) -> Result<Self, ProjectionError> {
        let members = if suffix.is_empty() && state == spec.name {
            open_tiers(&store, &spec).await?
        } else {
            vec![open_member(&store, spec.clone(), state, suffix).await?]
        };
        Ok(Self {
            spec,
            group: FoldGroup {
                store,
                members,
                marks: VecDeque::new(),
                prefetched: None,
                last_write: Instant::now(),
                idle_since: None,
                flush_idle: false,
                failpoints: Failpoints::default(),
                catalog: None,
                signal: None,
            },
        })
    }

    /// Arms crash hooks (tests).
    pub fn with_failpoints(mut self, failpoints: Failpoints) -> Self {
        self.group.failpoints = failpoints;
        self
    }

    /// Lets the coarse tier's rows wait up to `every` before they commit, as
    /// [`FoldGroup::run`] does with [`ProjectorConfig::coarse_every`] (tests;
    /// elsewhere every step commits every tier).
    pub fn with_coarse_every(mut self, every: Duration) -> Self {
        for m in self.group.members.iter_mut().filter(|m| m.coarse) {
            m.every = every;
        }
        self
    }

    /// Lets this projector give way to restatements announced on `signal`
    /// (as [`FoldGroup::run`] does with [`ProjectorConfig::on_commit`]).
    pub fn with_signal(mut self, signal: Arc<FoldSignal>) -> Self {
        self.group.signal = Some(signal);
        self
    }

    /// The spec being folded.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The lowest committed cursor of its checkpoints as this projector knows it.
    pub fn cursor(&self) -> Cursor {
        self.group.min_cursor()
    }

    /// Re-reads the checkpoint.
    pub async fn reload(&mut self) -> Result<(), ProjectionError> {
        self.group.reload().await
    }

    /// Reads up to `limit` events after the checkpoint, folds and applies them.
    pub async fn step(&mut self, limit: i64) -> Result<Step, ProjectionError> {
        self.group.step(limit).await
    }

    /// Steps until every event committed so far is folded; returns the
    /// events folded. For `tally copy`/`import`, tests and benchmarks.
    ///
    /// Committed events that wait behind a transaction still running
    /// ([`Step::held_back`]: any transaction of the PostgreSQL cluster, in
    /// any database) are waited for, not left out: a copy verified against
    /// its log right after would otherwise find them missing.
    pub async fn catch_up(&mut self, limit: i64) -> Result<u64, ProjectionError> {
        // Everything there is, the coarse tier's rows too: they commit at
        // the first step that finds nothing new.
        self.group.flush_idle = true;
        let folded = self.fold_everything(limit).await;
        self.group.flush_idle = false;
        folded
    }

    async fn fold_everything(&mut self, limit: i64) -> Result<u64, ProjectionError> {
        let mut total = 0u64;
        let mut wait = HELD_BACK_RETRY;
        let mut waited = Duration::ZERO;
        let mut told = false;
        // A batch read ahead before this call may miss events committed
        // since: read from the checkpoints' pending positions again.
        self.group.prefetched = None;
        loop {
            let step = self.step(limit).await?;
            total += step.folded as u64;
            if !step.caught_up {
                continue;
            }
            if !step.held_back {
                if self.group.committing() {
                    // Done once the commits in flight landed (or read again).
                    self.group.reap(true).await?;
                    continue;
                }
                return Ok(total);
            }
            if waited >= HELD_BACK_NOTICE && !told {
                told = true;
                tracing::warn!(
                    projections = ?self.group.names(),
                    waited_s = waited.as_secs(),
                    "committed events wait behind a transaction still running on the database server; folding them once it ends"
                );
            }
            tokio::time::sleep(wait).await;
            waited += wait;
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs until `shutdown` (see [`FoldGroup::run`]).
    pub async fn run(self, config: ProjectorConfig, owner: String, shutdown: CancellationToken) {
        self.group.run(config, owner, shutdown).await;
    }
}

/// A projection `tally serve` runs: opened at start-up, or not yet (database
/// unreachable then).
pub struct ProjectionTask {
    /// The spec.
    pub spec: Arc<Spec>,
    /// The projector, when it could be opened at start-up.
    pub projector: Option<Projector>,
}

/// Projections this close to the most advanced one share its group's read;
/// the others (a new projection backfilling the log) read on their own, so
/// they do not hold back the freshness of the rest.
pub const GROUP_LAG: i64 = 50_000;

/// The projector tasks of `tally serve`: one group of the projections that
/// are (nearly) caught up, one task per projection that is far behind or
/// could not be opened yet. Each task ends at `shutdown`.
pub fn spawn_all(
    store: Store,
    tasks: Vec<ProjectionTask>,
    config: ProjectorConfig,
    owner: String,
    shutdown: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let head = tasks
        .iter()
        .filter_map(|t| t.projector.as_ref().map(|p| p.cursor().seq))
        .max()
        .unwrap_or(0);
    let mut together = Vec::new();
    let mut handles = Vec::new();
    for t in tasks {
        match t.projector {
            Some(p) if head - p.cursor().seq <= GROUP_LAG => together.push(p),
            opened => handles.push(tokio::spawn(run_one(
                store.clone(),
                t.spec,
                opened,
                config.clone(),
                owner.clone(),
                shutdown.clone(),
            ))),
        }
    }
    // One group for all of them: one read of the log feeds every projection,
    // and each commits in its own transaction (on PostgreSQL side by side),
    // so the alert windows' minute table is not held up by a bigger one.
    if !together.is_empty() {
        let group = FoldGroup::new(store.clone(), together);
        tracing::info!(projections = ?group.names(), "projections folded together from one read of the log");
        handles.push(tokio::spawn(group.run(
            config.clone(),
            owner.clone(),
            shutdown.clone(),
        )));
    }
    handles
}

/// One projection's task: opens it (retrying while the database is
/// unreachable; stopping if its spec changed) unless `opened` already did.
async fn run_one(
    store: Store,
    spec: Arc<Spec>,
    opened: Option<Projector>,
    config: ProjectorConfig,
    owner: String,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let projector = match opened {
        Some(p) => p,
        None => loop {
            match Projector::open(store.clone(), spec.clone(), &spec.name, "").await {
                Ok(p) => break p,
                Err(e @ ProjectionError::SpecChanged { .. }) => {
                    tracing::error!(projection = %spec.name, error = %e, "projector not started");
                    return;
                }
                Err(e) => {
                    tracing::debug!(projection = %spec.name, error = %e, "projector cannot open yet; retrying");
                    if backoff.sleep(&shutdown).await {
                        return;
                    }
                }
            }
        },
    };
    projector.run(config, owner, shutdown).await;
}

fn crash_before_commit() {
    crate::failpoint::abort("projector.before_commit")
}
