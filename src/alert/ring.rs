//! The alert ring: the recent minute buckets of the tables rolling minute
//! rules read, kept in memory by the evaluator and advanced by the commits
//! of this process's projector, so that a round reads windows of up to
//! [`RING_HORIZON`] from memory instead of from the database.
//!
//! A ring is a cache of committed table contents, never more:
//! - It is loaded from one snapshot holding the table's rows and the
//!   checkpoint they are exactly the contents of (cursor and generation:
//!   [`Projections::query_agg_at`](crate::store::Projections::query_agg_at)).
//! - It takes a committed slice ([`MinuteCommit`]) only when the slice starts
//!   at the ring's cursor under the ring's generation and carries every row
//!   of the buckets the ring holds (the projector copies only buckets from
//!   the ring's first one on); the rows of a commit are exactly what its
//!   compare-and-set added to the table, so the ring is then the table at
//!   the slice's end.
//! - Anything else is doubt, and doubt reloads it from the table: a slice
//!   that does not chain (another instance folded, a commit was not handed
//!   over), a generation moved (a restatement, a price change, a rebuild's
//!   swap), another spec, commits dropped while nobody listened, or a
//!   stored checkpoint still ahead of the ring once the feed had
//!   [`FEED_WAIT`] to deliver.
//!
//! A restart starts with no ring and loads it from the tables, so a crash
//! at any point (after a commit, before the ring took it) gives the same
//! values and the same transitions. Shapes whose rows would pass
//! [`RING_MAX_ROWS`], windows longer than the horizon, and tables this
//! process does not fold keep the evaluator's grouped reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::aggregate::spec::{Dimension, Granularity, Spec};
use crate::aggregate::Measures;
use crate::projection::projector::{FoldSignal, MinuteCommit};
use crate::query::output::Group;
use crate::query::window::Range;
use crate::store::{AggQuery, Cursor, ProjectionState, Store, StoreError};

/// The longest span of minutes a ring keeps (a rule's window, and its
/// baseline window before it when it has one).
pub const RING_HORIZON: chrono::Duration = chrono::Duration::hours(2);

/// Most (bucket, group) entries one shape's ring holds; a shape with more
/// is read from the tables, as without a ring.
pub const RING_MAX_ROWS: usize = 250_000;

/// How long a round waits for the commit that moved a checkpoint past its
/// ring before it reloads the ring instead.
pub const FEED_WAIT: Duration = Duration::from_millis(200);

/// How long a shape found too large is read from the tables before the
/// ring tries it again.
const TOO_LARGE_RETRY: Duration = Duration::from_secs(300);

/// What one shape's ring holds: the minute rows of `spec`'s table that
/// `scope` selects, summed per `group_by`, for buckets from `from` on.
#[derive(Debug, Clone)]
pub struct Want {
    /// The projection whose minute table it reads.
    pub spec: Arc<Spec>,
    /// Filters: a dimension and the values it may take.
    pub scope: Vec<(Dimension, Vec<String>)>,
    /// The grouping of the shape's reads.
    pub group_by: Vec<Dimension>,
    /// Keep latency sketches (percentile measures).
    pub sketch: bool,
    /// The first bucket a window of the round reads.
    pub from: DateTime<Utc>,
}

impl Want {
    fn same_rows(&self, other: &Want) -> bool {
        self.spec.name == other.spec.name
            && self.spec.hash() == other.spec.hash()
            && self.scope == other.scope
            && self.group_by == other.group_by
            && self.sketch == other.sketch
    }
}

/// One shape's ring.
#[derive(Debug)]
struct Held {
    want: Want,
    /// The checkpoint row of the minute table's tier.
    state: String,
    /// The tier's spec hash the rows were read under.
    hash: String,
    cursor: Cursor,
    generation: i64,
    /// Buckets before it are not kept.
    start: DateTime<Utc>,
    /// (index in the spec's dimensions, allowed values) per filter.
    filters: Vec<(usize, HashSet<String>)>,
    /// Index in the spec's dimensions of each `group_by` dimension.
    picks: Vec<usize>,
    /// Every group seen, by id (a window sums into a dense array by id).
    groups: Vec<Group>,
    ids: HashMap<Group, u32>,
    buckets: BTreeMap<DateTime<Utc>, HashMap<u32, Measures>>,
    rows: usize,
    /// The settled parts of the windows asked for lately, kept up to date
    /// by [`Held::add`] (see [`Held::window`]).
    settled: std::sync::Mutex<Vec<Settled>>,
}

/// The sums per group id of a window's buckets before its last
/// [`HEAD_MINUTES`]: `[from, split)`. Merging is exact and order-free (sums,
/// minimum, maximum, sketch bins), so a row added later into that range is
/// merged into it here as into the bucket, and the sums stay those of the
/// buckets.
#[derive(Debug)]
struct Settled {
    from: DateTime<Utc>,
    split: DateTime<Utc>,
    sums: Vec<Option<Measures>>,
}

/// A window's last minutes, summed from the buckets on every round (the rest
/// is [`Settled`]): the current minute and the one before take most rows.
const HEAD_MINUTES: i64 = 2;

/// Most settled parts a shape keeps (a few windows, each moving once a minute).
const SETTLED_MAX: usize = 8;

impl Held {
    /// Adds one table row (dimension values in the spec's order).
    fn add(&mut self, bucket: DateTime<Utc>, dims: &[String], m: &Measures) {
        if bucket < self.start {
            return;
        }
        if !self
            .filters
            .iter()
            .all(|(i, allowed)| dims.get(*i).is_some_and(|v| allowed.contains(v)))
        {
            return;
        }
        let group = Group(
            self.want
                .group_by
                .iter()
                .zip(&self.picks)
                .map(|(d, i)| (*d, dims.get(*i).cloned().unwrap_or_default()))
                .collect(),
        );
        let id = match self.ids.get(&group) {
            Some(id) => *id,
            None => {
                let id = self.groups.len() as u32;
                self.groups.push(group.clone());
                self.ids.insert(group, id);
                id
            }
        };
        let sketch = self.want.sketch;
        let take = |held: &mut Measures| match sketch {
            true => held.merge(m),
            false => held.merge_sums(m),
        };
        if let Ok(mut settled) = self.settled.lock() {
            for part in settled
                .iter_mut()
                .filter(|p| p.from <= bucket && bucket < p.split)
            {
                let at = id as usize;
                if part.sums.len() <= at {
                    part.sums.resize(at + 1, None);
                }
                take(part.sums[at].get_or_insert_with(Measures::default));
            }
        }
        let groups = self.buckets.entry(bucket).or_default();
        let held = groups.entry(id).or_insert_with(|| {
            self.rows += 1;
            Measures::default()
        });
        take(held);
    }

    /// Drops the buckets before `from`.
    fn prune(&mut self, from: DateTime<Utc>) {
        if from <= self.start {
            return;
        }
        let kept = self.buckets.split_off(&from);
        self.rows -= self.buckets.values().map(HashMap::len).sum::<usize>();
        self.buckets = kept;
        self.start = from;
        if let Ok(mut settled) = self.settled.lock() {
            settled.retain(|p| p.from >= from);
        }
        // Forget the groups no bucket holds any more once they are most.
        if self.groups.len() > 1024 && self.groups.len() > 2 * self.rows {
            let live: HashSet<u32> = self
                .buckets
                .values()
                .flat_map(|b| b.keys().copied())
                .collect();
            let mut renumber: HashMap<u32, u32> = HashMap::with_capacity(live.len());
            let mut groups = Vec::with_capacity(live.len());
            for (old, g) in std::mem::take(&mut self.groups).into_iter().enumerate() {
                if live.contains(&(old as u32)) {
                    renumber.insert(old as u32, groups.len() as u32);
                    groups.push(g);
                }
            }
            self.ids = groups
                .iter()
                .enumerate()
                .map(|(i, g)| (g.clone(), i as u32))
                .collect();
            // Their sums are by the old ids.
            if let Ok(mut settled) = self.settled.lock() {
                settled.clear();
            }
            self.groups = groups;
            for b in self.buckets.values_mut() {
                *b = std::mem::take(b)
                    .into_iter()
                    .filter_map(|(id, m)| Some((*renumber.get(&id)?, m)))
                    .collect();
            }
        }
    }

    /// Takes a committed slice of its checkpoint: `Ok(true)` if it chained
    /// on, `Ok(false)` if the ring already holds it, `Err(())` if it does
    /// not chain (the ring no longer knows the table).
    fn take(&mut self, c: &MinuteCommit) -> Result<bool, ()> {
        if c.state != self.state {
            return Ok(false);
        }
        if c.generation < self.generation
            || (c.generation == self.generation && c.to <= self.cursor)
        {
            return Ok(false);
        }
        // A commit that left out rows of buckets the ring holds is not
        // the whole slice for it either.
        if c.generation != self.generation || c.from != self.cursor || c.since > self.start {
            return Err(());
        }
        for (key, m) in c.rows.iter() {
            let dims = &key.dims;
            self.add(key.bucket, dims, m);
        }
        self.cursor = c.to;
        Ok(true)
    }

    /// Sums the buckets of `[from, to)` per group: the window's settled part
    /// (all but its last [`HEAD_MINUTES`], summed once and then kept up to
    /// date by every row added into it, until the window moves) plus its
    /// last minutes, summed from the buckets.
    fn window(&self, (from, to): Range) -> HashMap<Group, Measures> {
        let split = (to - chrono::Duration::minutes(HEAD_MINUTES)).max(from);
        let mut sums: Vec<Option<Measures>> = vec![None; self.groups.len()];
        let mut settled = self.settled.lock().ok();
        let part = settled.as_mut().and_then(|settled| {
            if let Some(i) = settled
                .iter()
                .position(|p| p.from == from && p.split == split)
            {
                return Some(&settled[i].sums);
            }
            if settled.len() >= SETTLED_MAX {
                settled.remove(0);
            }
            settled.push(Settled {
                from,
                split,
                sums: self.sum(from, split, Vec::new()),
            });
            settled.last().map(|p| &p.sums)
        });
        let head_from = match part {
            Some(part) => {
                sums[..part.len()].clone_from_slice(part);
                split
            }
            // A poisoned lock: sum it all.
            None => from,
        };
        drop(settled);
        let sums = self.sum(head_from, to, sums);
        sums.into_iter()
            .zip(&self.groups)
            .filter_map(|(m, g)| Some((g.clone(), m?)))
            .collect()
    }

    /// Adds the buckets of `[from, to)` to `sums` (by group id).
    fn sum(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        mut sums: Vec<Option<Measures>>,
    ) -> Vec<Option<Measures>> {
        sums.resize(self.groups.len(), None);
        if from >= to {
            return sums;
        }
        for groups in self.buckets.range(from..to).map(|(_, g)| g) {
            for (id, m) in groups {
                match &mut sums[*id as usize] {
                    Some(sum) => sum.merge(m),
                    empty => *empty = Some(m.clone()),
                }
            }
        }
        sums
    }
}

/// What one [`Ring::sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    /// Shapes served from memory this round.
    pub shapes: usize,
    /// Shapes loaded from the tables this round.
    pub loaded: usize,
    /// Committed slices taken.
    pub commits: usize,
    /// Entries held across shapes.
    pub rows: usize,
}

/// The rings of every shape the evaluator serves from memory.
#[derive(Debug, Default)]
pub struct Ring {
    held: HashMap<String, Held>,
    /// Shapes too large for a ring, and since when.
    too_large: HashMap<String, Instant>,
    listening: bool,
}

impl Ring {
    /// An empty ring (nothing served until [`Ring::sync`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every ring and stops listening to `signal` (the evaluator
    /// lost its lease: commits would pile up with nobody to take them).
    pub fn stop(&mut self, signal: &FoldSignal) {
        signal.listen(false);
        self.listening = false;
        self.held.clear();
    }

    /// Brings the ring of every shape in `wants` (by shape key) to the
    /// committed contents of its table, at least as new as the checkpoints
    /// stored when it was called: takes the commits `signal` has, checks
    /// them against the stored checkpoints, and loads from the tables what
    /// it cannot chain. Drops the rings no longer wanted.
    /// `states` are the stored checkpoints, read before the call.
    pub async fn sync(
        &mut self,
        store: &Store,
        signal: &FoldSignal,
        wants: &HashMap<String, Want>,
        states: &[ProjectionState],
    ) -> Result<Synced, StoreError> {
        if wants.is_empty() {
            // Nothing to serve: the projector need not copy its commits.
            if self.listening {
                self.stop(signal);
            }
            return Ok(Synced::default());
        }
        if let Some(from) = wants.values().map(|w| w.from).min() {
            signal.listen_from(from);
        }
        if !self.listening {
            signal.listen(true);
            self.listening = true;
        }
        self.held
            .retain(|key, h| wants.get(key).is_some_and(|w| w.same_rows(&h.want)));
        self.too_large
            .retain(|_, since| since.elapsed() < TOO_LARGE_RETRY);
        let mut synced = Synced::default();
        // Checkpoints first, then what the feed has: a commit landing in
        // between only puts the ring ahead of what was read.
        let stored = |state: &str| states.iter().find(|s| s.name == state);
        self.take(signal, &mut synced);
        let mut behind = false;
        self.held.retain(|_, h| match stored(&h.state) {
            Some(s) if s.spec_hash == h.hash && s.generation == h.generation => {
                behind |= s.cursor > h.cursor;
                true
            }
            _ => {
                tracing::debug!(state = %h.state, "a checkpoint was restated or rebuilt; reloading the ring");
                false
            }
        });
        if behind {
            // A commit this process made may be between its transaction
            // and the feed: give it a moment, then reload what still lags.
            signal.fed(FEED_WAIT).await;
            self.take(signal, &mut synced);
            self.held.retain(|_, h| {
                let kept = stored(&h.state)
                    .is_some_and(|s| s.cursor <= h.cursor && s.generation == h.generation);
                if !kept {
                    tracing::debug!(state = %h.state, "a checkpoint is still ahead of the ring; reloading it");
                }
                kept
            });
        }
        for (key, want) in wants {
            if self.too_large.contains_key(key) {
                continue;
            }
            match self.held.get_mut(key) {
                Some(h) if h.start <= want.from => {
                    h.prune(want.from);
                    continue;
                }
                _ => {}
            }
            self.held.remove(key);
            match load(store, want).await? {
                Some(h) => {
                    synced.loaded += 1;
                    self.held.insert(key.clone(), h);
                }
                None => {
                    tracing::info!(shape = %key, max = RING_MAX_ROWS, "an alert shape has too many minute rows for the ring; its windows are read from the tables");
                    self.too_large.insert(key.clone(), Instant::now());
                }
            }
        }
        self.held.retain(|key, h| {
            let keep = h.rows <= RING_MAX_ROWS;
            if !keep {
                tracing::info!(shape = %key, max = RING_MAX_ROWS, "an alert shape outgrew the ring; its windows are read from the tables");
            }
            keep
        });
        for key in wants.keys() {
            if !self.held.contains_key(key) && !self.too_large.contains_key(key) {
                // Dropped just above.
                self.too_large.insert(key.clone(), Instant::now());
            }
        }
        synced.shapes = self.held.len();
        synced.rows = self.held.values().map(|h| h.rows).sum();
        Ok(synced)
    }

    /// Takes the published commits into the rings they chain onto; drops
    /// the rings they do not (and every ring after a gap in the feed).
    fn take(&mut self, signal: &FoldSignal, synced: &mut Synced) {
        let (commits, gap) = signal.take_commits();
        if gap && !self.held.is_empty() {
            tracing::debug!("commits were dropped before the ring took them; reloading it");
            self.held.clear();
        }
        for c in &commits {
            self.held.retain(|_, h| match h.take(c) {
                Ok(took) => {
                    synced.commits += usize::from(took);
                    true
                }
                Err(()) => {
                    tracing::debug!(state = %c.state, "a commit does not chain onto the ring; reloading it");
                    false
                }
            });
        }
    }

    /// The values of shape `key`'s window `range` per group, when its ring
    /// holds the whole range.
    pub fn values(&self, key: &str, range: Range) -> Option<HashMap<Group, Measures>> {
        let h = self.held.get(key)?;
        (range.0 >= h.start).then(|| h.window(range))
    }
}

/// Loads a shape's ring from its table; `None` when it has more than
/// [`RING_MAX_ROWS`] entries.
async fn load(store: &Store, want: &Want) -> Result<Option<Held>, StoreError> {
    let state = want.spec.checkpoint_of(Granularity::Minute);
    let far = Utc::now() + chrono::Duration::days(3650);
    let q = AggQuery {
        spec: &want.spec,
        granularity: Granularity::Minute,
        from: want.from,
        to: far,
        filters: &want.scope,
        group_by: &want.group_by,
        rows: want.sketch,
        by_bucket: true,
        max_rows: usize::MAX,
        top: None,
    };
    let Some((checkpoint, rows)) = store.projections().query_agg_at(&state, &q).await? else {
        return Ok(None);
    };
    let index = |d: &Dimension| want.spec.dimensions.iter().position(|x| x == d);
    let mut h = Held {
        want: want.clone(),
        state,
        hash: checkpoint.spec_hash,
        cursor: checkpoint.cursor,
        generation: checkpoint.generation,
        start: want.from,
        // The rows read are already filtered and grouped: the read's
        // dimensions are `group_by`'s, in that order.
        filters: Vec::new(),
        picks: (0..want.group_by.len()).collect(),
        groups: Vec::new(),
        ids: HashMap::new(),
        buckets: BTreeMap::new(),
        rows: 0,
        settled: std::sync::Mutex::new(Vec::new()),
    };
    for row in rows {
        h.add(row.bucket, &row.dims, &row.measures);
        if h.rows > RING_MAX_ROWS {
            return Ok(None);
        }
    }
    // Commits carry whole table rows: filter and group them by the spec's order.
    h.filters = want
        .scope
        .iter()
        .filter_map(|(d, values)| Some((index(d)?, values.iter().cloned().collect())))
        .collect();
    h.picks = want.group_by.iter().filter_map(index).collect();
    if h.picks.len() != want.group_by.len() || h.filters.len() != want.scope.len() {
        // A dimension the table does not have: not a shape it can serve.
        return Ok(None);
    }
    Ok(Some(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(from: DateTime<Utc>) -> Held {
        let spec = Spec::parse(
            "name = \"m\"\ndimensions = [\"api\", \"key\"]\ngranularities = [\"minute\"]\ntimezone = \"UTC\"",
            None,
        )
        .expect("spec");
        Held {
            want: Want {
                spec: Arc::new(spec),
                scope: vec![(Dimension::Api, vec!["a".into()])],
                group_by: vec![Dimension::Key],
                sketch: false,
                from,
            },
            state: "m".into(),
            hash: String::new(),
            cursor: Cursor::default(),
            generation: 0,
            start: from,
            filters: vec![(0, HashSet::from(["a".to_string()]))],
            picks: vec![1],
            groups: Vec::new(),
            ids: HashMap::new(),
            buckets: BTreeMap::new(),
            rows: 0,
            settled: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn requests(n: i64) -> Measures {
        Measures {
            requests: n,
            ..Measures::default()
        }
    }

    #[test]
    fn a_commit_chains_on_only_at_the_rings_cursor_generation_and_start() {
        use crate::aggregate::measures::{RowKey, Rows};
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let at = |seq| Cursor { tx: 0, seq };
        let commit = |from, to, generation, since| MinuteCommit {
            state: "m".into(),
            generation,
            from: at(from),
            to: at(to),
            rows: Arc::new(Rows::from_iter([(
                RowKey {
                    bucket: t0,
                    dims: vec!["a".into(), "k1".into()],
                },
                requests(1),
            )])),
            since,
        };
        let mut h = held(t0);
        assert_eq!(h.take(&commit(0, 5, 0, t0)), Ok(true));
        assert_eq!(h.cursor, at(5));
        assert_eq!(h.take(&commit(0, 5, 0, t0)), Ok(false), "already held");
        assert_eq!(h.take(&commit(6, 9, 0, t0)), Err(()), "a gap");
        assert_eq!(h.take(&commit(5, 9, 1, t0)), Err(()), "another generation");
        let later = t0 + chrono::Duration::minutes(1);
        assert_eq!(
            h.take(&commit(5, 9, 0, later)),
            Err(()),
            "rows the ring holds were left out"
        );
        assert_eq!(
            h.take(&commit(5, 9, 0, t0 - chrono::Duration::minutes(1))),
            Ok(true)
        );
        let sums = h.window((t0, later));
        assert_eq!(
            sums[&Group(vec![(Dimension::Key, "k1".into())])].requests,
            2
        );
    }

    #[test]
    fn pruning_forgets_old_groups_and_keeps_every_sum() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let minute = chrono::Duration::minutes(1);
        let mut h = held(t0);
        // 2,000 keys in the first minute, 10 of them again in the next two;
        // another api's rows and rows before the start are not held.
        for k in 0..2000 {
            h.add(t0, &["a".into(), format!("k{k}")], &requests(1));
        }
        h.add(t0, &["b".into(), "k1".into()], &requests(100));
        h.add(t0 - minute, &["a".into(), "k1".into()], &requests(100));
        for k in 0..10 {
            h.add(t0 + minute, &["a".into(), format!("k{k}")], &requests(2));
            h.add(
                t0 + minute * 2,
                &["a".into(), format!("k{k}")],
                &requests(3),
            );
        }
        assert_eq!(h.rows, 2020);
        assert_eq!(h.window((t0, t0 + minute * 3)).len(), 2000);
        h.prune(t0 + minute);
        assert_eq!(h.rows, 20);
        assert_eq!(
            h.groups.len(),
            10,
            "the groups no bucket holds are forgotten"
        );
        // New groups after the renumbering get ids of their own.
        h.add(t0 + minute * 2, &["a".into(), "new".into()], &requests(5));
        let sums = h.window((t0 + minute, t0 + minute * 3));
        assert_eq!(sums.len(), 11);
        for k in 0..10 {
            let g = Group(vec![(Dimension::Key, format!("k{k}"))]);
            assert_eq!(sums[&g].requests, 5, "k{k}");
        }
        assert_eq!(
            sums[&Group(vec![(Dimension::Key, "new".into())])].requests,
            5
        );
        assert_eq!(h.window((t0 + minute * 2, t0 + minute * 3)).len(), 11);
    }

    /// The settled parts of windows, kept between rounds, always sum what
    /// the buckets hold: rows added late into them, windows that move,
    /// windows asked for in any order, pruning. Fails if a row added into a
    /// settled range is not merged into it (or merged twice), or if a moved
    /// window reuses another's part.
    #[test]
    fn windows_from_settled_parts_equal_the_buckets_summed() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let minute = chrono::Duration::minutes(1);
        let mut h = held(t0);
        let naive = |h: &Held, from: DateTime<Utc>, to: DateTime<Utc>| {
            let mut sums: HashMap<Group, i64> = HashMap::new();
            for (_, groups) in h.buckets.range(from..to) {
                for (id, m) in groups {
                    *sums.entry(h.groups[*id as usize].clone()).or_default() += m.requests;
                }
            }
            sums
        };
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % n
        };
        for round in 0..400i32 {
            let now = t0 + minute * (10 + round / 10);
            // Mostly the current minute, sometimes one long past.
            for _ in 0..5 {
                let back = match next(10) {
                    0 => next(9) as i32,
                    _ => 0,
                };
                let bucket = now - minute * back;
                let key = format!("k{}", next(30));
                h.add(bucket, &["a".into(), key], &requests(1 + next(5) as i64));
            }
            if round % 97 == 96 {
                h.prune(now - minute * 8);
            }
            for span in [1, 3, 5] {
                let range = (now - minute * (span - 1), now + minute);
                let sums: HashMap<Group, i64> = h
                    .window(range)
                    .into_iter()
                    .map(|(g, m)| (g, m.requests))
                    .collect();
                assert_eq!(
                    sums,
                    naive(&h, range.0, range.1),
                    "round {round}, {span} min"
                );
            }
        }
    }
}
