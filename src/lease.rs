//! The one lease loop: take a lease, renew it every third of its length, and
//! give it up on a clean stop. The projectors, the alert evaluator and the
//! relay each hold one through [`Lease`]; whoever loses it stops the work it
//! guards until it holds it again.
//!
//! A lease only keeps two instances from doing the same work at once; what
//! makes the work exactly-once is each stage's compare-and-set (checkpoints,
//! instance versions, the outbox's unique key). Scheduled jobs need no lease:
//! each occurrence is claimed by a unique `(job, slot)` row.
//!
//! Two kinds exist in the store, and both renew the same way: a projection's
//! lease lives on its checkpoint row (dropping the projection drops the
//! lease with it, and `tally projections list` shows the holder), every
//! other lease in the `leases` table.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store::{Leases, StoreError};

/// Which store mechanism a lease uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// A row of the `leases` table (evaluator, relay).
    Named,
    /// The checkpoint row of a projection (projectors, rebuilds).
    Projection,
}

/// What [`Lease::keep`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Held now and not before: reload whatever another holder may have changed.
    Taken,
    /// Held before and still held (or not due for renewal).
    Kept,
    /// Held before, lost now: stop the guarded work.
    Lost,
    /// Not held: another live instance has it (or the store is unreachable).
    Waiting,
}

impl Holding {
    /// The guarded work may run.
    pub fn held(self) -> bool {
        matches!(self, Holding::Taken | Holding::Kept)
    }
}

/// One lease this process wants to hold.
#[derive(Debug, Clone)]
pub struct Lease {
    kind: LeaseKind,
    name: String,
    owner: String,
    ttl: Duration,
    renewed: Option<Instant>,
    held: bool,
}

impl Lease {
    /// A lease `name` for `owner`, lasting `ttl` without renewal.
    pub fn new(kind: LeaseKind, name: &str, owner: &str, ttl: Duration) -> Self {
        Self {
            kind,
            name: name.to_string(),
            owner: owner.to_string(),
            ttl,
            renewed: None,
            held: false,
        }
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Held at the last renewal.
    pub fn held(&self) -> bool {
        self.held
    }

    /// How often it is renewed: a third of its length, so two renewals can
    /// fail before it expires.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Takes or renews the lease when a renewal is due; an unreachable store
    /// counts as not holding it (logged), so no work runs unguarded.
    pub async fn keep(&mut self, store: &Leases) -> Holding {
        if self
            .renewed
            .is_some_and(|t| t.elapsed() < self.renew_every())
        {
            return if self.held {
                Holding::Kept
            } else {
                Holding::Waiting
            };
        }
        let was = self.held;
        self.held = match self.try_take(store).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "cannot take or renew the lease; retrying");
                false
            }
        };
        self.renewed = Some(Instant::now());
        match (was, self.held) {
            (false, true) => {
                // Operators (and a test) look for these lines by projection.
                match self.kind {
                    LeaseKind::Projection => {
                        tracing::info!(projection = %self.name, owner = %self.owner, "projector lease taken; folding")
                    }
                    LeaseKind::Named => {
                        tracing::info!(lease = %self.name, owner = %self.owner, "lease taken")
                    }
                }
                Holding::Taken
            }
            (true, true) => Holding::Kept,
            (true, false) => {
                tracing::warn!(lease = %self.name, owner = %self.owner, "lease lost; work stops until it is taken again");
                Holding::Lost
            }
            (false, false) => Holding::Waiting,
        }
    }

    /// Sleeps until the next renewal is due, or `shutdown`.
    pub async fn wait(&self, shutdown: &CancellationToken) {
        tokio::select! {
            _ = tokio::time::sleep(self.renew_every()) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    /// Gives the lease up if held (clean stop); a failure only means it
    /// expires by itself after its length.
    pub async fn release(&mut self, store: &Leases) {
        if !std::mem::take(&mut self.held) {
            return;
        }
        let released = match self.kind {
            LeaseKind::Named => store.release_named_lease(&self.name, &self.owner).await,
            LeaseKind::Projection => store.release_lease(&self.name, &self.owner).await,
        };
        if let Err(e) = released {
            tracing::debug!(lease = %self.name, error = %e, "lease not released; it expires by itself");
        }
    }

    async fn try_take(&self, store: &Leases) -> Result<bool, StoreError> {
        match self.kind {
            LeaseKind::Named => {
                store
                    .try_named_lease(&self.name, &self.owner, self.ttl)
                    .await
            }
            LeaseKind::Projection => store.try_lease(&self.name, &self.owner, self.ttl).await,
        }
    }
}
