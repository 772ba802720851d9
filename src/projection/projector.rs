//! The projector task: read a batch after the checkpoint, fold it, apply it.
//!
//! Exactly once: the store applies a batch only if the checkpoint is still at
//! the cursor the batch was read after, in the same transaction that adds the
//! rows. A crash before commit leaves checkpoint and tables untouched; a crash
//! after commit leaves both moved. A projector whose apply comes back
//! [`ApplyOutcome::Stale`] (another instance or a rebuild moved the
//! checkpoint) re-reads the checkpoint and goes on from there.
//!
//! `as_of`: each read records a [`Watermark`] (when, and which transaction ids
//! were assigned by then). Once a read returns everything below its snapshot's
//! `xmin`, every older mark with `xmax <= xmin` is fully folded, so its time
//! is a true "everything committed before this is in the aggregates".

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::fold::fold;
use super::spec::Spec;
use super::ProjectionError;
use crate::backoff::Backoff;
use crate::store::{Apply, ApplyOutcome, Cursor, EventStore, Watermark};

/// How projectors run (`tally serve` flags).
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Most events read and folded per transaction.
    pub batch_size: i64,
    /// Sleep between polls once caught up.
    pub poll_interval: Duration,
    /// How long a projector lease lasts without renewal; a dead instance's
    /// projections are taken over after at most this long.
    pub lease_ttl: Duration,
    /// Crash-test hooks.
    pub failpoints: Failpoints,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 2000,
            poll_interval: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(10),
            failpoints: Failpoints::default(),
        }
    }
}

/// Probabilities of aborting the process at the projector's two crash points,
/// set by `TALLY_FAILPOINTS=projector.before_commit=0.2,projector.after_commit=0.2`.
/// Only the crash tests set them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Failpoints {
    /// Between writing the rows and committing.
    pub before_commit: f64,
    /// Right after the commit.
    pub after_commit: f64,
}

impl Failpoints {
    /// Parses `name=probability` pairs; unknown names are an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut f = Failpoints::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, p) = pair
                .split_once('=')
                .ok_or_else(|| format!("failpoint `{pair}`: expected name=probability"))?;
            let p: f64 = p
                .parse()
                .map_err(|_| format!("failpoint `{pair}`: probability must be a number"))?;
            match name {
                "projector.before_commit" => f.before_commit = p,
                "projector.after_commit" => f.after_commit = p,
                _ => return Err(format!("unknown failpoint `{name}`; known: projector.before_commit, projector.after_commit")),
            }
        }
        Ok(f)
    }

    fn fires(p: f64) -> bool {
        p > 0.0 && rand::random::<f64>() < p
    }
}

/// What one [`Projector::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Events folded and committed.
    pub folded: usize,
    /// The read returned fewer events than asked: nothing more is foldable now.
    pub caught_up: bool,
    /// The checkpoint had moved under us; the cursor was reloaded.
    pub stale: bool,
}

/// Folds one projection's tables (live, or shadow during a rebuild).
pub struct Projector {
    store: Arc<dyn EventStore>,
    spec: Arc<Spec>,
    state: String,
    suffix: String,
    cursor: Cursor,
    as_of: Option<DateTime<Utc>>,
    marks: VecDeque<Watermark>,
    last_write: Instant,
    failpoints: Failpoints,
}

/// Most watermarks remembered while waiting for old transactions to finish.
const MAX_MARKS: usize = 1024;

/// An idle projector persists a newer `as_of` at most this often.
const IDLE_AS_OF_EVERY: Duration = Duration::from_millis(500);

impl Projector {
    /// Creates the tables and checkpoint if missing and checks that the stored
    /// spec hash is this spec's.
    pub async fn open(
        store: Arc<dyn EventStore>,
        spec: Arc<Spec>,
        state: &str,
        suffix: &str,
    ) -> Result<Self, ProjectionError> {
        let row = store.ensure_projection(&spec, state, suffix).await?;
        if row.spec_hash != spec.hash() {
            return Err(ProjectionError::SpecChanged {
                name: spec.name.clone(),
                stored: row.spec,
                now: spec.canonical(),
            });
        }
        Ok(Self {
            store,
            spec,
            state: state.to_string(),
            suffix: suffix.to_string(),
            cursor: row.cursor,
            as_of: row.as_of,
            marks: VecDeque::new(),
            last_write: Instant::now(),
            failpoints: Failpoints::default(),
        })
    }

    /// Arms crash hooks (tests).
    pub fn with_failpoints(mut self, failpoints: Failpoints) -> Self {
        self.failpoints = failpoints;
        self
    }

    /// The spec being folded.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The last committed cursor as this projector knows it.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Re-reads the checkpoint (after a Stale apply or on taking the lease).
    pub async fn reload(&mut self) -> Result<(), ProjectionError> {
        let states = self.store.projection_states().await?;
        let row = states
            .into_iter()
            .find(|s| s.name == self.state)
            .ok_or_else(|| ProjectionError::NotFound(self.state.clone()))?;
        if row.spec_hash != self.spec.hash() {
            return Err(ProjectionError::SpecChanged {
                name: self.spec.name.clone(),
                stored: row.spec,
                now: self.spec.canonical(),
            });
        }
        self.cursor = row.cursor;
        self.as_of = row.as_of;
        self.marks.clear();
        Ok(())
    }

    /// Reads up to `limit` events after the checkpoint, folds and applies them.
    pub async fn step(&mut self, limit: i64) -> Result<Step, ProjectionError> {
        let t0 = Instant::now();
        let batch = self.store.read_log(self.cursor, limit.max(1)).await?;
        let t_read = t0.elapsed();
        let caught_up = (batch.events.len() as i64) < limit.max(1);
        let mark = batch.watermark;
        if self.marks.len() == MAX_MARKS {
            self.marks.pop_front();
        }
        self.marks.push_back(mark);
        let mut as_of = None;
        if caught_up {
            while let Some(m) = self.marks.front() {
                if m.xmax > mark.xmin {
                    break;
                }
                as_of = Some(m.at);
                self.marks.pop_front();
            }
        }
        let as_of = as_of.filter(|t| self.as_of.is_none_or(|old| *t > old));
        if batch.events.is_empty()
            && (as_of.is_none() || self.last_write.elapsed() < IDLE_AS_OF_EVERY)
        {
            return Ok(Step {
                folded: 0,
                caught_up,
                stale: false,
            });
        }
        let to = batch.events.last().map_or(self.cursor, |(c, _)| *c);
        let t1 = Instant::now();
        let delta = fold(&self.spec, batch.events.iter().map(|(_, e)| e));
        let t_fold = t1.elapsed();
        let t2 = Instant::now();
        let apply = Apply {
            state: &self.state,
            spec: &self.spec,
            suffix: &self.suffix,
            from: self.cursor,
            to,
            as_of,
            delta: &delta,
            crash_before_commit: Failpoints::fires(self.failpoints.before_commit),
        };
        match self.store.apply_fold(&apply).await? {
            ApplyOutcome::Applied => {
                if std::env::var_os("TALLY_PROFILE").is_some() {
                    eprintln!("{} read {:?} fold {:?} apply {:?} events {} rows {}", self.state, t_read, t_fold, t2.elapsed(), delta.events, delta.rows());
                }
                if Failpoints::fires(self.failpoints.after_commit) {
                    super::failpoint_abort("projector.after_commit");
                }
                self.cursor = to;
                if as_of.is_some() {
                    self.as_of = as_of;
                }
                self.last_write = Instant::now();
                Ok(Step {
                    folded: delta.events,
                    caught_up,
                    stale: false,
                })
            }
            ApplyOutcome::Stale => {
                tracing::info!(projection = %self.state, "checkpoint moved under this projector; re-reading it");
                self.reload().await?;
                Ok(Step {
                    folded: 0,
                    caught_up: false,
                    stale: true,
                })
            }
        }
    }

    /// Steps until caught up; returns the events folded. For tests, rebuilds and benchmarks.
    pub async fn catch_up(&mut self, limit: i64) -> Result<u64, ProjectionError> {
        let mut total = 0u64;
        loop {
            let step = self.step(limit).await?;
            total += step.folded as u64;
            if step.caught_up {
                return Ok(total);
            }
        }
    }

    /// Runs until `shutdown`: holds (or waits for) the lease and folds new events.
    pub async fn run(
        mut self,
        config: ProjectorConfig,
        owner: String,
        shutdown: CancellationToken,
    ) {
        let renew_every = config.lease_ttl / 3;
        let mut leading = false;
        let mut renewed = Instant::now();
        let mut backoff = Backoff::new();
        let name = self.state.clone();
        self.failpoints = config.failpoints;
        while !shutdown.is_cancelled() {
            if !leading || renewed.elapsed() >= renew_every {
                match self.store.try_lease(&name, &owner, config.lease_ttl).await {
                    Ok(true) => {
                        renewed = Instant::now();
                        if !leading {
                            tracing::info!(projection = %name, %owner, "projector lease taken; folding");
                            if let Err(e) = self.reload().await {
                                tracing::error!(projection = %name, error = %e, "projector stopped");
                                break;
                            }
                            leading = true;
                        }
                    }
                    Ok(false) => {
                        leading = false;
                        tokio::select! {
                            _ = tokio::time::sleep(renew_every) => {}
                            _ = shutdown.cancelled() => {}
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(projection = %name, error = %e, "cannot take the projector lease; retrying");
                        leading = false;
                        backoff.sleep(&shutdown).await;
                        continue;
                    }
                }
            }
            match self.step(config.batch_size).await {
                Ok(step) => {
                    backoff.reset();
                    if step.folded > 0 {
                        tracing::debug!(projection = %name, events = step.folded, cursor = ?self.cursor, "folded");
                    }
                    if step.caught_up {
                        tokio::select! {
                            _ = tokio::time::sleep(config.poll_interval) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                }
                Err(e @ ProjectionError::SpecChanged { .. }) => {
                    tracing::error!(projection = %name, error = %e, "projector stopped");
                    break;
                }
                Err(e) => {
                    tracing::warn!(projection = %name, error = %e, "projector step failed; retrying");
                    backoff.sleep(&shutdown).await;
                }
            }
        }
        if leading {
            if let Err(e) = self.store.release_lease(&name, &owner).await {
                tracing::debug!(projection = %name, error = %e, "lease not released; it expires by itself");
            }
        }
    }
}

/// The projector task of `tally serve`: opens the projection (retrying while
/// the database is unreachable; stopping if its spec changed) unless `opened`
/// already did, then [`Projector::run`]s it.
pub async fn run(
    store: Arc<dyn EventStore>,
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
