//! The evaluator: reads each rule's window from the projections, moves every
//! alert instance through its [`lifecycle`](super::lifecycle), and writes the
//! state changes with their notifications in one transaction (the outbox).
//!
//! One instance evaluates at a time (the `alerts.evaluator` lease); even if
//! two ever did, instance writes are compare-and-set on a version and the
//! outbox is unique on `(fingerprint, sequence)`, so a transition is
//! recorded once. It evaluates after a local projector commit (woken through
//! a [`Notify`]), whenever any projection checkpoint moved (another
//! instance's projector), and on a tick, so that alerts resolve as windows
//! slide with no new data.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::lifecycle::{advance, AlertState, Life, Timing};
use super::notice::{rfc3339, Notice};
use super::quota::{self, number, QuotaSpec};
use super::ring::{Ring, Synced, Want, RING_HORIZON};
use super::rule::{window_range, Level, Rule, RuleSpec, Window};
use super::{failing, fingerprint, AlertError};
use crate::aggregate::bucket::bucket_start;
use crate::aggregate::spec::{Dimension, Granularity, Spec};
use crate::aggregate::Measures;
use crate::backoff::Backoff;
use crate::lease::{Holding, Lease, LeaseKind};
use crate::projection::projector::FoldSignal;
use crate::query::output::Group;
use crate::query::window::{self, Range};
use crate::query::Catalog;
use crate::store::alerts::{InstanceRow, InstanceWrite, NewNotification, RuleFailure};
use crate::store::{Cursor, ProjectionState, Store};

/// Evaluator and relay settings (`tally serve` flags).
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// Subjects are `<prefix>.<severity>.<rule>`.
    pub subject_prefix: String,
    /// Evaluate every rule at least this often.
    pub tick: Duration,
    /// How often to look for moved checkpoints.
    pub poll: Duration,
    /// Evaluator/relay lease length.
    pub lease_ttl: Duration,
    /// Least time between two evaluations (bounds their share of the database).
    pub min_interval: Duration,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            subject_prefix: "usage.alerts".into(),
            tick: Duration::from_secs(5),
            poll: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(10),
            min_interval: Duration::from_millis(100),
        }
    }
}

/// The lease name of the evaluator.
pub const EVALUATOR_LEASE: &str = "alerts.evaluator";

/// Validated rules by uid, with the stored spec they came from: a rule is
/// parsed again only when its spec changed.
pub type RuleCache = HashMap<String, (String, Rule)>;

/// Every rule to evaluate: the stored rules and one per quota. A stored rule
/// that no longer validates (a projection it needs was removed) is skipped
/// with an error in the log and added to `failing`; its firing instances resolve.
pub async fn load_rules(
    store: &Store,
    catalog: &Catalog,
    cache: &mut RuleCache,
    failing: &mut Vec<(String, String, String)>,
) -> Result<Vec<Rule>, AlertError> {
    let (rules, quotas) = tokio::join!(store.alerts().alert_rules(), store.alerts().quotas());
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |uid: &str,
                   spec: &str,
                   name: String,
                   parse: &dyn Fn() -> Result<Rule, String>| {
        seen.insert(uid.to_string());
        match cache.get(uid) {
            Some((cached, rule)) if cached == spec => out.push(rule.clone()),
            _ => match parse() {
                Ok(rule) => {
                    cache.insert(uid.to_string(), (spec.to_string(), rule.clone()));
                    out.push(rule)
                }
                Err(reason) => {
                    tracing::error!(rule = %name, %reason, "stored alert rule or quota cannot be evaluated; skipped");
                    failing.push((uid.to_string(), name, reason));
                }
            },
        }
    };
    for row in rules? {
        add(&row.uid, &row.spec, row.name.clone(), &|| {
            serde_json::from_str::<RuleSpec>(&row.spec)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    s.validate(&row.uid, &catalog.specs)
                        .map_err(|e| e.to_string())
                })
        });
    }
    for row in quotas? {
        let name = format!("{}:{}", crate::alert::quota::QUOTA_RULE, row.key);
        add(&row.uid, &row.spec, name, &|| {
            QuotaSpec::from_json(row.spec.as_bytes())
                .and_then(|s| s.validate(&row.key, &catalog.specs))
                .and_then(|q| q.rule(&row.uid, &catalog.specs))
                .map_err(|e| e.to_string())
        });
    }
    cache.retain(|uid, _| seen.contains(uid));
    Ok(out)
}

/// An instance the evaluator knows: its stored row and version.
#[derive(Debug, Clone)]
struct Tracked {
    row: InstanceRow,
    version: Option<i64>,
}

/// What one evaluation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    /// Rules evaluated.
    pub rules: usize,
    /// Instances written.
    pub written: usize,
    /// Notifications added to the outbox.
    pub notifications: usize,
    /// Another evaluator moved an instance first; nothing was written.
    pub stale: bool,
    /// Time spent reading windows.
    pub read_ms: u64,
    /// Rules that could not be evaluated this round (the others were).
    pub failing: usize,
    /// What the ring of minute buckets did before the reads.
    pub ring: Synced,
    /// Time spent loading the rules.
    pub rules_ms: u64,
    /// Time spent bringing the ring up to date.
    pub ring_ms: u64,
    /// Time spent looking up stored instances of newly holding groups.
    pub track_ms: u64,
    /// Time spent writing the transitions and notifications.
    pub write_ms: u64,
}

/// Rules loaded at one rules version.
struct Loaded {
    version: i64,
    rules: Arc<Vec<Rule>>,
    failing: Vec<(String, String, String)>,
}

/// Evaluates rules against the projections; keeps the instances it knows in memory.
pub struct Evaluator {
    store: Store,
    catalog: Arc<Catalog>,
    prefix: String,
    instances: Option<HashMap<String, Tracked>>,
    rules: RuleCache,
    /// The rules as last loaded, with the rules version read before them
    /// and the stored rules that failed to load: loaded again only when
    /// the version moved.
    loaded: Option<Loaded>,
    /// Window reads up to the last two minutes, by read and range.
    stable: std::sync::Mutex<HashMap<String, (Instant, Values)>>,
    /// Whether this round may use `stable` (see [`FoldSignal`]).
    cache_stable: bool,
    signal: Option<Arc<FoldSignal>>,
    /// Failing rules by uid as last written to the store (`None`: not yet
    /// written by this evaluator), with the time each started failing.
    failing: Option<HashMap<String, RuleFailure>>,
    /// Recent minute buckets of the shapes it serves from memory (only with
    /// a `signal`: it is fed by this process's projector).
    ring: Ring,
}

/// How long the settled part of a minute window is reused.
const STABLE_TTL: Duration = Duration::from_secs(30);

type Values = Arc<HashMap<Group, Measures>>;

/// What one window read selects. Rules whose scopes differ only in the one
/// value of one dimension (`api = a`, `api = b`, … each grouped by `key`)
/// share one shape: the read filters that dimension by all their values and
/// groups by it too ([`Shape::split`] hands each rule its part), so 1,000
/// rules over 10 APIs and 3 windows make 3 reads, not 30.
#[derive(Debug, Clone)]
struct Shape {
    /// Filters; `split`'s dimension lists every member's value.
    scope: Vec<(Dimension, Vec<String>)>,
    /// The members' grouping, then `split`'s dimension when there is one.
    group_by: Vec<Dimension>,
    /// The dimension whose value tells the members apart.
    split: Option<Dimension>,
    tz: Tz,
    /// Read stored rows with their latency sketches.
    sketch: bool,
    /// A rolling window of minutes (its settled part is reused between rounds).
    minute: bool,
}

impl Shape {
    /// The shape's identity (also the key of its reads).
    fn key(&self) -> String {
        format!(
            "{:?}|{:?}|{:?}|{}|{}|{}",
            self.scope, self.group_by, self.split, self.tz, self.sketch, self.minute
        )
    }

    /// The read's values by the split dimension's value, each with the
    /// members' grouping (the split dimension taken off the group); one
    /// entry (`""`) when the shape has no split dimension.
    fn split(&self, values: &Values) -> HashMap<String, Values> {
        if self.split.is_none() {
            return HashMap::from([(String::new(), values.clone())]);
        }
        let mut out: HashMap<String, HashMap<Group, Measures>> = HashMap::new();
        for (g, m) in values.iter() {
            let mut dims = g.0.clone();
            let Some((_, value)) = dims.pop() else {
                continue;
            };
            out.entry(value).or_default().insert(Group(dims), m.clone());
        }
        out.into_iter().map(|(v, g)| (v, Arc::new(g))).collect()
    }
}

/// Every rule's shape for one round: shapes by key, and each rule's shape
/// key and split value.
#[derive(Debug, Default)]
struct ReadPlan {
    shapes: HashMap<String, Shape>,
    of_rule: HashMap<String, (String, String)>,
}

impl ReadPlan {
    fn of(rules: &[Rule]) -> Self {
        let mut plan = ReadPlan::default();
        let mut values: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
        for rule in rules {
            let minute = matches!(
                rule.window,
                Window::Rolling {
                    granularity: Granularity::Minute,
                    ..
                }
            );
            // The first scope dimension with one value the rule does not group by.
            let at = rule
                .scope
                .iter()
                .position(|(d, v)| v.len() == 1 && !rule.group_by.contains(d));
            let mut shape = Shape {
                scope: rule.scope.clone(),
                group_by: rule.group_by.clone(),
                split: None,
                tz: rule.tz,
                sketch: rule.measure.needs_sketch(),
                minute,
            };
            let mut value = String::new();
            if let Some(i) = at {
                let dim = shape.scope[i].0;
                value = shape.scope[i].1[0].clone();
                shape.scope[i].1.clear();
                shape.group_by.push(dim);
                shape.split = Some(dim);
            }
            let key = shape.key();
            if at.is_some() {
                values.entry(key.clone()).or_default().insert(value.clone());
            }
            plan.of_rule.insert(rule.uid.clone(), (key.clone(), value));
            plan.shapes.entry(key).or_insert(shape);
        }
        for (key, shape) in plan.shapes.iter_mut() {
            if let (Some(dim), Some(all)) = (shape.split, values.remove(key)) {
                if let Some((_, list)) = shape.scope.iter_mut().find(|(d, _)| *d == dim) {
                    *list = all.into_iter().collect();
                }
            }
        }
        plan
    }
}

/// One round's reads: by shape and range, split per value, and those that
/// failed (each read at most once a round).
#[derive(Default)]
struct RoundCache {
    reads: HashMap<String, Values>,
    split: HashMap<String, Arc<HashMap<String, Values>>>,
    failed: HashMap<String, String>,
}

impl Evaluator {
    /// An evaluator publishing under `prefix`; `signal` (from this process's
    /// projectors) lets it reuse the settled parts of windows between rounds.
    pub fn new(
        store: Store,
        catalog: Arc<Catalog>,
        prefix: &str,
        signal: Option<Arc<FoldSignal>>,
    ) -> Self {
        Self {
            store,
            catalog,
            prefix: prefix.to_string(),
            instances: None,
            rules: RuleCache::new(),
            loaded: None,
            stable: std::sync::Mutex::new(HashMap::new()),
            cache_stable: false,
            signal,
            failing: None,
            ring: Ring::new(),
        }
    }

    /// The shapes whose windows the ring can serve this round, by shape
    /// key: rolling minute windows within [`RING_HORIZON`], over a minute
    /// table that is caught up, kept long enough, and folded by this
    /// process (whose commits feed the ring).
    fn ring_wants(
        &self,
        signal: &FoldSignal,
        rules: &[Rule],
        plan: &ReadPlan,
        states: &[ProjectionState],
        now: DateTime<Utc>,
    ) -> HashMap<String, Want> {
        let mut wants: HashMap<String, Want> = HashMap::new();
        for rule in rules {
            let Some((key, _)) = plan.of_rule.get(&rule.uid) else {
                continue;
            };
            let shape = &plan.shapes[key];
            if !shape.minute {
                continue;
            }
            // Keyed as `read` looks it up: by the shape with every value.
            let key = &shape.key();
            let (window, previous) = window_range(rule, now);
            let from = if rule.baseline { previous.0 } else { window.0 };
            if window.1 - from > RING_HORIZON {
                continue;
            }
            if let Some(w) = wants.get_mut(key) {
                w.from = w.from.min(from);
                continue;
            }
            let mut needed = shape.group_by.clone();
            needed.extend(shape.scope.iter().map(|(d, _)| *d));
            // Any minute table with the shape's dimensions that has caught
            // up gives the same sums; the fewest dimensions is the smallest.
            // (Not the planner's statistics: reading them here would fill
            // their cache before the tables are caught up.)
            let ready = |s: &Spec| {
                let state = s.checkpoint_of(Granularity::Minute);
                states.iter().any(|c| c.name == state && c.as_of.is_some())
            };
            let Some(spec) = self
                .catalog
                .specs
                .iter()
                .filter(|s| s.granularities.contains(&Granularity::Minute))
                .filter(|s| needed.iter().all(|d| s.dimensions.contains(d)))
                .filter(|s| ready(s))
                .min_by_key(|s| (s.dimensions.len(), s.name.clone()))
                .cloned()
            else {
                continue;
            };
            let state = spec.checkpoint_of(Granularity::Minute);
            let kept = spec
                .retention
                .get(&Granularity::Minute)
                .and_then(|r| chrono::Duration::from_std(*r).ok())
                .is_none_or(|r| r > RING_HORIZON + chrono::Duration::days(1));
            if !kept || !signal.leads_all([state.as_str()].into_iter()) {
                continue;
            }
            wants.insert(
                key.clone(),
                Want {
                    spec,
                    scope: shape.scope.clone(),
                    group_by: shape.group_by.clone(),
                    sketch: shape.sketch,
                    from,
                },
            );
        }
        wants
    }

    /// The values of `rule`'s window `range` per group, from the read of its
    /// [`Shape`] (shared by the rules of that shape, and split by the value
    /// of each rule's own scope once per read).
    async fn rule_values(
        &self,
        rule: &Rule,
        plan: &ReadPlan,
        range: Range,
        now: DateTime<Utc>,
        cache: &mut RoundCache,
    ) -> Result<Values, AlertError> {
        let Some((key, value)) = plan.of_rule.get(&rule.uid) else {
            return Ok(Values::default());
        };
        let shape = &plan.shapes[key];
        let split_key = format!("{key}|{}|{}", range.0, range.1);
        if let Some(failed) = cache.failed.get(&split_key) {
            // One failed read per shape and round: its rules fail alike.
            return Err(AlertError::Invalid(failed.clone()));
        }
        let split = match cache.split.get(&split_key) {
            Some(split) => split.clone(),
            None => match self.read(shape, range, now, &mut cache.reads).await {
                Ok(values) => {
                    let split = Arc::new(shape.split(&values));
                    cache.split.insert(split_key, split.clone());
                    split
                }
                Err(e) => {
                    cache.failed.insert(split_key, e.to_string());
                    return Err(e);
                }
            },
        };
        Ok(split.get(value).cloned().unwrap_or_default())
    }

    /// Reads a shape's window per group (once per round and range).
    async fn read(
        &self,
        shape: &Shape,
        (from, to): Range,
        now: DateTime<Utc>,
        cache: &mut HashMap<String, Values>,
    ) -> Result<Values, AlertError> {
        let what = shape.key();
        let key = format!("{what}|{from}|{to}");
        if let Some(v) = cache.get(&key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.ring.values(&what, (from, to)) {
            let v = Arc::new(v);
            cache.insert(key, v.clone());
            return Ok(v);
        }
        // Minute windows: only the last two minutes change between rounds
        // (new events, and events a few seconds late into the previous
        // minute). The rest is read once and reused until the window slides
        // or STABLE_TTL passes (which bounds how late an event long past its
        // minute can be before it counts).
        let minute = chrono::Duration::minutes(1);
        let head_from = bucket_start(now, Granularity::Minute, Tz::UTC) - minute;
        let split = self.cache_stable && shape.minute && from < head_from && head_from < to;
        let values = match split {
            true => {
                self.read_split(shape, (from, head_from, to), now, &what, cache)
                    .await?
            }
            false => None,
        };
        let values = match values {
            Some(v) => v,
            None => self.read_range(shape, (from, to), now).await?.0,
        };
        cache.insert(key, values.clone());
        Ok(values)
    }

    /// A minute window as its settled part (reused between rounds) plus its
    /// last two minutes (read every round). `None` when either part's tables
    /// do not cover it exactly (a minute table still backfilling): the two
    /// would then overlap, and the caller reads the window whole.
    async fn read_split(
        &self,
        shape: &Shape,
        (from, head_from, to): (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>),
        now: DateTime<Utc>,
        what: &str,
        cache: &mut HashMap<String, Values>,
    ) -> Result<Option<Values>, AlertError> {
        let stable_key = format!("{what}|{from}|{head_from}");
        let cached = self.stable.lock().ok().and_then(|s| {
            s.get(&stable_key)
                .filter(|(at, _)| at.elapsed() < STABLE_TTL)
                .map(|(_, v)| v.clone())
        });
        let stable = match cached {
            Some(v) => v,
            None => {
                let (v, covered) = self.read_range(shape, (from, head_from), now).await?;
                if covered != (from, head_from) {
                    return Ok(None);
                }
                if let Ok(mut s) = self.stable.lock() {
                    s.retain(|_, (at, _)| at.elapsed() < STABLE_TTL);
                    s.insert(stable_key, (Instant::now(), v.clone()));
                }
                v
            }
        };
        // Every minute window of this shape ends at the same `to`: one head read.
        let head_key = format!("{what}|{head_from}|{to}");
        let head = match cache.get(&head_key) {
            Some(v) => v.clone(),
            None => {
                let (v, covered) = self.read_range(shape, (head_from, to), now).await?;
                if covered != (head_from, to) {
                    return Ok(None);
                }
                cache.insert(head_key, v.clone());
                v
            }
        };
        let mut merged: HashMap<Group, Measures> = (*stable).clone();
        for (g, m) in head.iter() {
            merged.entry(g.clone()).or_default().merge(m);
        }
        Ok(Some(Arc::new(merged)))
    }

    /// Reads `[from, to)` of a shape per group, from the tables that fit;
    /// also returns the range those tables' buckets cover.
    async fn read_range(
        &self,
        shape: &Shape,
        range: Range,
        now: DateTime<Utc>,
    ) -> Result<(Values, Range), AlertError> {
        let (rows, covered) = window::read_range(
            &self.store,
            &self.catalog,
            shape.tz,
            &shape.scope,
            &shape.group_by,
            range,
            now,
            shape.sketch,
        )
        .await?;
        Ok((Arc::new(rows.into_iter().collect()), covered))
    }

    /// The rules to evaluate and the stored ones that failed to load: those
    /// loaded last, unless the rules version moved since.
    async fn current_rules(
        &mut self,
    ) -> Result<(Arc<Vec<Rule>>, Vec<(String, String, String)>), AlertError> {
        let version = self.store.alerts().rules_version().await?;
        if let Some(l) = self.loaded.as_ref().filter(|l| l.version == version) {
            return Ok((l.rules.clone(), l.failing.clone()));
        }
        let mut failing = Vec::new();
        let rules =
            Arc::new(load_rules(&self.store, &self.catalog, &mut self.rules, &mut failing).await?);
        self.loaded = Some(Loaded {
            version,
            rules: rules.clone(),
            failing: failing.clone(),
        });
        Ok((rules, failing))
    }

    /// One evaluation of every rule at `now`.
    pub async fn evaluate(&mut self, now: DateTime<Utc>) -> Result<Round, AlertError> {
        let started = Instant::now();
        let (rules, mut failing) = self.current_rules().await?;
        let rules_ms = started.elapsed().as_millis() as u64;
        // Only active instances are loaded; a resolved one is looked up when
        // its group holds again, and forgotten an hour after it resolved, so
        // memory and each read follow what is active, not the history.
        if self.instances.is_none() {
            let rows = self.store.alerts().active_instances().await?;
            self.instances = Some(rows.into_iter().map(tracked).collect());
        }
        if let Some(map) = self.instances.as_mut() {
            let forget_before = now - chrono::Duration::hours(1);
            map.retain(|_, t| t.row.life.state.is_active() || t.row.updated_at >= forget_before);
        }
        // Settled window parts may be reused only while this process folds
        // every projection (so it hears of every late event), and not past
        // a late event older than the window heads.
        let head_from =
            bucket_start(now, Granularity::Minute, Tz::UTC) - chrono::Duration::minutes(1);
        self.cache_stable = match &self.signal {
            Some(signal) => {
                let late = signal.take_oldest().is_some_and(|t| t < head_from);
                let leads = signal.leads_all(
                    self.catalog
                        .specs
                        .iter()
                        .flat_map(|s| s.checkpoints())
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                );
                if late || !leads {
                    if let Ok(mut s) = self.stable.lock() {
                        s.clear();
                    }
                }
                leads
            }
            None => false,
        };
        let plan = ReadPlan::of(&rules);
        let mut synced = Synced::default();
        let started = Instant::now();
        if let Some(signal) = self.signal.clone() {
            // The checkpoints are read now: the planner's statistics (which
            // say whether a table is caught up) may be older.
            let synced_ring = async {
                let states = self.store.projections().projection_states().await?;
                let wants = self.ring_wants(&signal, &rules, &plan, &states, now);
                self.ring.sync(&self.store, &signal, &wants, &states).await
            };
            match synced_ring.await {
                Ok(s) => synced = s,
                Err(e) => {
                    // The windows are read from the tables this round.
                    tracing::warn!(error = %e, "cannot bring the alert ring up to date; reading windows from the tables");
                    self.ring.stop(&signal);
                }
            }
        }
        let ring_ms = started.elapsed().as_millis() as u64;
        let mut cache = RoundCache::default();
        let mut changes: Vec<(Tracked, Option<NewNotification>)> = Vec::new();
        // Instances pending or firing, by rule uid: evaluated whether or not
        // their group still has data in the window.
        let mut active: HashMap<String, Vec<String>> = HashMap::new();
        for (fp, t) in self.instances.iter().flatten() {
            // Reconciliation alerts are raised and resolved by that job, and
            // failing-rule alerts below, not by rules.
            if t.row.life.state.is_active()
                && t.row.rule_uid != super::reconcile::RECONCILIATION_UID
                && t.row.rule_uid != failing::RULE_FAILING_UID
            {
                active
                    .entry(t.row.rule_uid.clone())
                    .or_default()
                    .push(fp.clone());
            }
        }
        let empty = Measures::default();
        let mut read_time = Duration::ZERO;
        // First every rule's window, and the stored instances of holding
        // groups this evaluator does not track (resolved, forgotten): one
        // read for all of them. Then every instance's step.
        let mut evaluated: Vec<(&Rule, Values, Option<Values>)> = Vec::new();
        let mut unknown = Vec::new();
        for rule in rules.iter() {
            let (window, previous) = window_range(rule, now);
            let read_started = Instant::now();
            // One rule's read error must not stop the others: the rule is
            // marked failing and its instances keep their state. Only a
            // database that cannot be reached ends the round.
            let read = async {
                let current = self
                    .rule_values(rule, &plan, window, now, &mut cache)
                    .await?;
                let baseline = match rule.baseline {
                    true => Some(
                        self.rule_values(rule, &plan, previous, now, &mut cache)
                            .await?,
                    ),
                    false => None,
                };
                Ok::<_, AlertError>((current, baseline))
            };
            let (current, baseline) = match read.await {
                Ok(v) => v,
                Err(e) => {
                    self.store.ping().await?;
                    tracing::warn!(rule = %rule.name, error = %e, "alert rule evaluation failed; the others go on");
                    failing.push((rule.uid.clone(), rule.name.clone(), e.to_string()));
                    active.remove(&rule.uid);
                    continue;
                }
            };
            read_time += read_started.elapsed();
            for (group, m) in current.iter() {
                for level in &rule.levels {
                    let threshold = threshold_of(rule, level, baseline.as_ref(), Some(group));
                    if holds(rule, level, m, threshold) {
                        let fp = fingerprint(&[&rule.uid, &level.id, &group_json(group)]);
                        if !self.instances.as_ref().is_some_and(|i| i.contains_key(&fp)) {
                            unknown.push(fp);
                        }
                    }
                }
            }
            evaluated.push((rule, current, baseline));
        }
        let tracking = Instant::now();
        self.track(&unknown).await?;
        let track_time = tracking.elapsed();
        for (rule, current, baseline) in evaluated {
            let baseline = baseline.as_ref();
            let mut handled = HashSet::new();
            for fp in active.remove(&rule.uid).unwrap_or_default() {
                let Some(t) = self.instances.as_ref().and_then(|i| i.get(&fp)) else {
                    continue;
                };
                let Some(level) = rule.levels.iter().find(|l| l.id == t.row.level) else {
                    // The level was removed from the rule.
                    changes.extend(self.retire(&fp, now));
                    continue;
                };
                let group = group_from_json(&t.row.group, &rule.group_by);
                let m = group
                    .as_ref()
                    .and_then(|g| current.get(g))
                    .unwrap_or(&empty);
                let threshold = threshold_of(rule, level, baseline, group.as_ref());
                let input = Input {
                    rule,
                    level,
                    group: &t.row.group,
                    holds: holds(rule, level, m, threshold),
                    value: rule.measure.value(m),
                    threshold,
                    m,
                };
                changes.extend(self.step(&fp, input, now));
                handled.insert(fp);
            }
            // Only groups whose condition holds can start an instance: the
            // rest cost one comparison each.
            for (group, m) in current.iter() {
                for level in &rule.levels {
                    let threshold = threshold_of(rule, level, baseline, Some(group));
                    if !holds(rule, level, m, threshold) {
                        continue;
                    }
                    let group_json = group_json(group);
                    let fp = fingerprint(&[&rule.uid, &level.id, &group_json]);
                    if handled.contains(&fp) {
                        continue;
                    }
                    let input = Input {
                        rule,
                        level,
                        group: &group_json,
                        holds: true,
                        value: rule.measure.value(m),
                        threshold,
                        m,
                    };
                    changes.extend(self.step(&fp, input, now));
                }
            }
        }
        // Active instances of rules that no longer exist resolve.
        for fp in active.into_values().flatten() {
            changes.extend(self.retire(&fp, now));
        }
        changes.extend(self.failing_alerts(&failing, now).await?);
        let mut round = Round {
            rules: rules.len(),
            read_ms: read_time.as_millis() as u64,
            failing: failing.len(),
            ring: synced,
            rules_ms,
            ring_ms,
            track_ms: track_time.as_millis() as u64,
            ..Round::default()
        };
        self.record_failures(failing, now).await;
        if changes.is_empty() {
            return Ok(round);
        }
        let writes: Vec<InstanceWrite> = changes
            .iter()
            .map(|(t, _)| InstanceWrite {
                row: t.row.clone(),
                expected_version: t.version,
            })
            .collect();
        let notes: Vec<NewNotification> = changes.iter().filter_map(|(_, n)| n.clone()).collect();
        let writing = Instant::now();
        let committed = self
            .store
            .alerts()
            .commit_transitions(&writes, &notes)
            .await?;
        round.write_ms = writing.elapsed().as_millis() as u64;
        if !committed {
            tracing::info!("an alert instance moved under this evaluator; re-reading them");
            self.instances = None;
            round.stale = true;
            return Ok(round);
        }
        round.written = writes.len();
        round.notifications = notes.len();
        if let Some(map) = self.instances.as_mut() {
            for (mut t, n) in changes {
                if let Some(n) = &n {
                    tracing::info!(rule = %n.rule, fingerprint = %n.fingerprint, sequence = n.sequence, state = n.state.as_str(), "alert transition");
                }
                t.version = Some(t.version.map_or(1, |v| v + 1));
                map.insert(t.row.fingerprint.clone(), t);
            }
        }
        Ok(round)
    }

    /// Writes the failing rules to the store when the set (or an error)
    /// changed; a failure to write is logged, never fatal to the round.
    async fn record_failures(
        &mut self,
        failing: Vec<(String, String, String)>,
        now: DateTime<Utc>,
    ) {
        let previous = self.failing.take();
        let known = previous.clone().unwrap_or_default();
        let current: HashMap<String, RuleFailure> = failing
            .into_iter()
            .map(|(uid, rule, error)| {
                let since = known.get(&uid).map_or(now, |f| f.since);
                (
                    uid.clone(),
                    RuleFailure {
                        uid,
                        rule,
                        error,
                        since,
                    },
                )
            })
            .collect();
        let changed = previous.as_ref().is_none_or(|p| {
            p.len() != current.len()
                || current
                    .iter()
                    .any(|(uid, f)| p.get(uid).is_none_or(|o| o.error != f.error))
        });
        if !changed {
            self.failing = previous;
            return;
        }
        let list: Vec<RuleFailure> = current.values().cloned().collect();
        match self.store.alerts().set_rule_failures(&list, now).await {
            Ok(()) => self.failing = Some(current),
            Err(e) => {
                tracing::warn!(error = %e, "cannot record failing alert rules; retrying next round")
            }
        }
    }

    /// Advances one instance; returns its new row and notification when it changed.
    fn step(
        &self,
        fp: &str,
        input: Input<'_>,
        now: DateTime<Utc>,
    ) -> Option<(Tracked, Option<NewNotification>)> {
        let known = self.instances.as_ref().and_then(|i| i.get(fp));
        let (mut life, version) = match known {
            Some(t) => (t.row.life.clone(), t.version),
            None if !input.holds => return None,
            None => (Life::default(), None),
        };
        let timing = Timing {
            for_: input.rule.for_,
            keep_firing_for: input.rule.keep_firing_for,
            repeat_every: input.rule.repeat_every,
        };
        let change = advance(&mut life, &timing, input.holds, now);
        if !change.dirty {
            return None;
        }
        let row = InstanceRow {
            fingerprint: fp.to_string(),
            rule: input.rule.name.clone(),
            rule_uid: input.rule.uid.clone(),
            level: input.level.id.clone(),
            group: input.group.to_string(),
            severity: input.level.severity.as_str().to_string(),
            value: input.value,
            threshold: Some(input.threshold),
            life,
            version: version.unwrap_or(0),
            updated_at: now,
        };
        let note = change
            .notify
            .map(|state| self.notification(&row, &input, state, now));
        Some((Tracked { row, version }, note))
    }

    /// Loads the stored instances of `fingerprints` this evaluator does not
    /// track (resolved, or forgotten an hour after), so a new transition is
    /// written over their version.
    async fn track(&mut self, fingerprints: &[String]) -> Result<(), AlertError> {
        if fingerprints.is_empty() {
            return Ok(());
        }
        let rows = self
            .store
            .alerts()
            .instances_by_fingerprint(fingerprints)
            .await?;
        if let Some(map) = self.instances.as_mut() {
            map.extend(rows.into_iter().map(tracked));
        }
        Ok(())
    }

    /// Raises the alert of each rule in `failing` (uid, name, error) and
    /// resolves those of rules that evaluate again or are gone.
    async fn failing_alerts(
        &mut self,
        failing: &[(String, String, String)],
        now: DateTime<Utc>,
    ) -> Result<Vec<(Tracked, Option<NewNotification>)>, AlertError> {
        let known = |s: &Self, fp: &str| s.instances.as_ref().is_some_and(|i| i.contains_key(fp));
        let unknown: Vec<String> = failing
            .iter()
            .map(|(uid, _, _)| failing::fingerprint(uid))
            .filter(|fp| !known(self, fp))
            .collect();
        self.track(&unknown).await?;
        let mut out = Vec::new();
        let mut raised = HashSet::new();
        for (uid, name, error) in failing {
            let fp = failing::fingerprint(uid);
            raised.insert(fp.clone());
            out.extend(self.failing_alert(&fp, uid, name, Some(error), now));
        }
        let recovered: Vec<(String, String)> = self
            .instances
            .iter()
            .flatten()
            .filter(|(fp, t)| {
                t.row.rule_uid == failing::RULE_FAILING_UID
                    && t.row.life.state.is_active()
                    && !raised.contains(*fp)
            })
            .map(|(fp, t)| (fp.clone(), t.row.group.clone()))
            .collect();
        for (fp, group) in recovered {
            let name = serde_json::from_str::<serde_json::Value>(&group)
                .ok()
                .and_then(|g| g["rule"].as_str().map(str::to_string))
                .unwrap_or_default();
            out.extend(self.failing_alert(&fp, "", &name, None, now));
        }
        Ok(out)
    }

    /// Advances the failing-rule alert `fp` of rule `name` (`error`: it fails now).
    fn failing_alert(
        &self,
        fp: &str,
        uid: &str,
        name: &str,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Option<(Tracked, Option<NewNotification>)> {
        let known = self.instances.as_ref().and_then(|i| i.get(fp));
        let (mut life, version) = match known {
            Some(t) => (t.row.life.clone(), t.version),
            None if error.is_none() => return None,
            None => (Life::default(), None),
        };
        let change = advance(&mut life, &Timing::default(), error.is_some(), now);
        if !change.dirty {
            return None;
        }
        let group = json!({ "rule": name });
        let row = InstanceRow {
            fingerprint: fp.to_string(),
            rule: failing::RULE_FAILING_RULE.to_string(),
            rule_uid: failing::RULE_FAILING_UID.to_string(),
            level: String::new(),
            group: group.to_string(),
            severity: failing::SEVERITY.to_string(),
            value: None,
            threshold: None,
            life,
            version: version.unwrap_or(0),
            updated_at: now,
        };
        let note = change.notify.map(|state| {
            let mut notice = Notice::of(&row, state);
            notice.started_at = row.life.firing_since;
            let mut notice = notice
                .with("error", json!(error))
                .with("evaluated_at", json!(rfc3339(now)));
            if !uid.is_empty() {
                notice = notice.with("rule_uid", json!(uid));
            }
            notice.into_outbox(&self.prefix, now)
        });
        Some((Tracked { row, version }, note))
    }

    /// Resolves (or drops, if only pending) an instance whose rule or level no longer exists.
    fn retire(&self, fp: &str, now: DateTime<Utc>) -> Option<(Tracked, Option<NewNotification>)> {
        let t = self.instances.as_ref()?.get(fp)?;
        let mut life = t.row.life.clone();
        let change = advance(&mut life, &Timing::default(), false, now);
        if !change.dirty {
            return None;
        }
        let mut row = t.row.clone();
        row.life = life;
        row.updated_at = now;
        let note = change.notify.map(|state| {
            Notice::of(&row, state)
                .with("reason", json!("rule_removed"))
                .into_outbox(&self.prefix, now)
        });
        Some((
            Tracked {
                row,
                version: t.version,
            },
            note,
        ))
    }

    fn notification(
        &self,
        row: &InstanceRow,
        input: &Input<'_>,
        state: AlertState,
        now: DateTime<Utc>,
    ) -> NewNotification {
        let rule = input.rule;
        let mut notice = Notice::of(row, state);
        notice.labels = json!(rule.labels);
        notice.measure = Some(rule.measure.as_str().to_string());
        notice.value = match input.value {
            Some(v) => quota::amount(rule.measure, input.m, v),
            None => serde_json::Value::Null,
        };
        notice.threshold = number(input.threshold);
        notice.window = Some(rule.window.describe());
        notice.started_at = row.life.active_since;
        notice
            .with("level", json!(input.level.id.parse::<f64>().ok()))
            .with("limit", json!(rule.spec.limit))
            .with("evaluated_at", json!(rfc3339(now)))
            .into_outbox(&self.prefix, now)
    }

    /// Runs until `shutdown`: holds the evaluator lease (or waits for it) and
    /// evaluates when woken, when a checkpoint moved, and on the tick.
    pub async fn run(
        mut self,
        settings: AlertSettings,
        owner: String,
        relay: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        let mut lease = Lease::new(
            LeaseKind::Named,
            EVALUATOR_LEASE,
            &owner,
            settings.lease_ttl,
        );
        let mut last_eval: Option<Instant> = None;
        let mut last_cursors: Vec<(String, Cursor)> = Vec::new();
        let mut backoff = Backoff::new();
        while !shutdown.is_cancelled() {
            match lease.keep(self.store.leases()).await {
                // Another instance may have moved instances while we did not lead.
                Holding::Taken => self.instances = None,
                Holding::Kept => {}
                Holding::Lost | Holding::Waiting => {
                    if let Some(signal) = &self.signal {
                        self.ring.stop(signal);
                    }
                    lease.wait(&shutdown).await;
                    continue;
                }
            }
            let woken = tokio::select! {
                _ = async {
                    match &self.signal {
                        Some(s) => s.notified().await,
                        None => std::future::pending().await,
                    }
                } => true,
                _ = tokio::time::sleep(settings.poll) => false,
                _ = shutdown.cancelled() => break,
            };
            let mut due = woken || last_eval.is_none_or(|t| t.elapsed() >= settings.tick);
            if !due {
                if let Ok(states) = self.store.projections().projection_states().await {
                    let cursors: Vec<(String, Cursor)> =
                        states.into_iter().map(|s| (s.name, s.cursor)).collect();
                    due = cursors != last_cursors;
                    last_cursors = cursors;
                }
            }
            if !due {
                continue;
            }
            if let Some(gap) =
                last_eval.and_then(|t| settings.min_interval.checked_sub(t.elapsed()))
            {
                tokio::select! {
                    _ = tokio::time::sleep(gap) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            let started = Instant::now();
            last_eval = Some(started);
            match self.evaluate(Utc::now()).await {
                Ok(round) => {
                    tracing::debug!(
                        rules = round.rules,
                        written = round.written,
                        notifications = round.notifications,
                        stale = round.stale,
                        read_ms = round.read_ms,
                        ring_shapes = round.ring.shapes,
                        ring_loaded = round.ring.loaded,
                        ring_rows = round.ring.rows,
                        rules_ms = round.rules_ms,
                        ring_ms = round.ring_ms,
                        track_ms = round.track_ms,
                        write_ms = round.write_ms,
                        ms = started.elapsed().as_millis() as u64,
                        woken,
                        "alert evaluation"
                    );
                    backoff.reset();
                    if round.notifications > 0 {
                        relay.notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "alert evaluation failed; retrying");
                    self.instances = None;
                    backoff.sleep(&shutdown).await;
                }
            }
        }
        lease.release(self.store.leases()).await;
    }
}

/// A level's threshold for `group`: the level's own, or its multiple of the
/// group's value in the baseline window when the rule compares with one (no
/// group: it cannot hold).
fn threshold_of(
    rule: &Rule,
    level: &Level,
    baseline: Option<&Values>,
    group: Option<&Group>,
) -> f64 {
    match (baseline, group) {
        (Some(b), Some(g)) => {
            level.threshold
                * b.get(g)
                    .and_then(|bm| rule.measure.value(bm))
                    .unwrap_or(0.0)
        }
        (Some(_), None) => f64::INFINITY,
        (None, _) => level.threshold,
    }
}

/// Whether a level's condition holds for the measures `m` of one group.
fn holds(rule: &Rule, level: &Level, m: &Measures, threshold: f64) -> bool {
    u64::try_from(m.requests).unwrap_or(0) >= rule.min_requests
        && rule
            .measure
            .value(m)
            .is_some_and(|v| level.op.holds(v, threshold))
}

/// A stored instance as the evaluator tracks it (at its stored version).
fn tracked(row: InstanceRow) -> (String, Tracked) {
    let version = Some(row.version);
    (row.fingerprint.clone(), Tracked { row, version })
}

/// One instance's evaluation input.
struct Input<'a> {
    rule: &'a Rule,
    level: &'a Level,
    group: &'a str,
    holds: bool,
    value: Option<f64>,
    threshold: f64,
    m: &'a Measures,
}

/// The group of a stored instance, in the rule's `group_by` order; `None`
/// when the rule now groups by other dimensions.
fn group_from_json(text: &str, group_by: &[Dimension]) -> Option<Group> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let o = v.as_object()?;
    if o.len() != group_by.len() {
        return None;
    }
    group_by
        .iter()
        .map(|d| o.get(d.as_str())?.as_str().map(|s| (*d, s.to_string())))
        .collect::<Option<Vec<_>>>()
        .map(Group)
}

fn group_json(g: &Group) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        g.0.iter()
            .map(|(d, v)| (d.as_str().to_string(), json!(v)))
            .collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Rule {
        let spec = crate::aggregate::spec::Spec::parse(
            "name = \"m\"\ndimensions = [\"api\", \"key\", \"model\"]\ngranularities = [\"minute\", \"hour\"]\ntimezone = \"UTC\"",
            None,
        )
        .expect("spec");
        RuleSpec::from_json(json.as_bytes())
            .and_then(|r| r.validate("u", &[Arc::new(spec)]))
            .expect("rule")
    }

    fn rule_as(uid: &str, json: &str) -> Rule {
        let mut r = rule(json);
        r.uid = uid.to_string();
        r
    }

    #[test]
    fn rules_that_differ_in_one_scope_value_share_one_read() {
        let rules = vec![
            rule_as(
                "1",
                r#"{"name":"a","measure":"requests","window":"1h","scope":{"api":"x"},"group_by":["key"],"threshold":1}"#,
            ),
            rule_as(
                "2",
                r#"{"name":"b","measure":"tokens","window":"1h","scope":{"api":"y"},"group_by":["key"],"threshold":1}"#,
            ),
            rule_as(
                "3",
                r#"{"name":"c","measure":"cost","window":"15m","scope":{"api":"z"},"group_by":["key"],"threshold":1}"#,
            ),
            // Another grouping, or a scope of several values: a shape of its own.
            rule_as(
                "4",
                r#"{"name":"d","measure":"requests","window":"1h","scope":{"api":"x"},"threshold":1}"#,
            ),
            rule_as(
                "5",
                r#"{"name":"e","measure":"requests","window":"1h","scope":{"api":["x","y"]},"group_by":["key"],"threshold":1}"#,
            ),
            // Grouped by the dimension it scopes: nothing to split on.
            rule_as(
                "6",
                r#"{"name":"f","measure":"requests","window":"1h","scope":{"api":"x"},"group_by":["api"],"threshold":1}"#,
            ),
        ];
        let plan = ReadPlan::of(&rules);
        let shape_of = |uid: &str| plan.of_rule[uid].0.clone();
        assert_eq!(shape_of("1"), shape_of("2"));
        assert_eq!(
            shape_of("1"),
            shape_of("3"),
            "windows differ by range, not shape"
        );
        let shared = &plan.shapes[&shape_of("1")];
        assert_eq!(
            shared.scope,
            vec![(Dimension::Api, vec!["x".into(), "y".into(), "z".into()])]
        );
        assert_eq!(shared.group_by, vec![Dimension::Key, Dimension::Api]);
        assert_eq!(plan.of_rule["2"].1, "y");
        for own in ["4", "5", "6"] {
            assert_ne!(shape_of(own), shape_of("1"), "rule {own}");
        }
        assert_eq!(plan.shapes.len(), 4);
        assert_eq!(plan.shapes[&shape_of("5")].split, None);
        assert_eq!(plan.shapes[&shape_of("6")].split, None);
        // The shared read, split: each rule gets its api's keys, grouped by key.
        let g = |key: &str, api: &str| {
            Group(vec![
                (Dimension::Key, key.into()),
                (Dimension::Api, api.into()),
            ])
        };
        let m = |n: i64| Measures {
            requests: n,
            ..Measures::default()
        };
        let read: Values = Arc::new(HashMap::from([
            (g("k1", "x"), m(1)),
            (g("k1", "y"), m(2)),
            (g("k2", "y"), m(3)),
        ]));
        let split = shared.split(&read);
        let key = |k: &str| Group(vec![(Dimension::Key, k.into())]);
        assert_eq!(split["x"].len(), 1);
        assert_eq!(split["x"][&key("k1")].requests, 1);
        assert_eq!(split["y"][&key("k1")].requests, 2);
        assert_eq!(split["y"][&key("k2")].requests, 3);
        assert!(!split.contains_key("z"));
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn rolling_windows_are_the_last_buckets_including_the_current_one() {
        let r = rule(r#"{"name":"a","measure":"requests","window":"5m","threshold":1}"#);
        let (w, prev) = window_range(&r, t("2026-03-29T01:02:30Z"));
        assert_eq!(w, (t("2026-03-29T00:58:00Z"), t("2026-03-29T01:03:00Z")));
        assert_eq!(prev, (t("2026-03-29T00:53:00Z"), t("2026-03-29T00:58:00Z")));
    }

    #[test]
    fn calendar_windows_follow_the_timezone_across_dst() {
        // Berlin's spring-forward day has 23 hours; its month starts at 22:00 or 23:00 UTC.
        let day = rule(
            r#"{"name":"a","measure":"cost","window":"calendar_day","timezone":"Europe/Berlin","threshold":1}"#,
        );
        let (w, prev) = window_range(&day, t("2026-03-29T12:00:00Z"));
        assert_eq!(w, (t("2026-03-28T23:00:00Z"), t("2026-03-29T22:00:00Z")));
        assert_eq!(prev, (t("2026-03-27T23:00:00Z"), t("2026-03-28T23:00:00Z")));
        let month = rule(
            r#"{"name":"a","measure":"cost","window":"calendar_month","timezone":"America/New_York","threshold":1}"#,
        );
        let (w, prev) = window_range(&month, t("2026-11-01T03:00:00Z"));
        assert_eq!(
            w,
            (t("2026-10-01T04:00:00Z"), t("2026-11-01T04:00:00Z")),
            "still October in New York"
        );
        assert_eq!(prev, (t("2026-09-01T04:00:00Z"), t("2026-10-01T04:00:00Z")));
    }

    #[test]
    fn stored_groups_read_back_in_rule_order_and_fingerprints_are_stable() {
        let g = Group(vec![
            (Dimension::Key, "k1".into()),
            (Dimension::Api, "openai".into()),
        ]);
        let text = group_json(&g);
        assert_eq!(text, r#"{"api":"openai","key":"k1"}"#);
        assert_eq!(
            group_from_json(&text, &[Dimension::Key, Dimension::Api]),
            Some(g)
        );
        assert_eq!(
            group_from_json(&text, &[Dimension::Key]),
            None,
            "grouping changed"
        );
        assert_eq!(
            fingerprint(&["u", "", &text]),
            fingerprint(&["u", "", &text])
        );
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
    }
}
