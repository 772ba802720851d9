//! `tally projections rebuild NAME`: fold the whole log into shadow tables
//! (`agg_<name>_<granularity>_rebuild`, checkpoint `<name>~rebuild`) while
//! live ingest and the live projector go on, then swap them in one
//! transaction. Readers see the old tables until the commit and the new ones
//! after it, never an empty table. The live checkpoint takes the shadow's
//! cursor, so the live projector (whose next compare-and-set fails) carries on
//! from exactly where the rebuild stopped.

use std::sync::Arc;
use std::time::Duration;

use super::projector::Projector;
use super::ProjectionError;
use crate::aggregate::spec::Spec;
use crate::store::{Cursor, Store};

/// Shadow tables' suffix.
pub const SHADOW_SUFFIX: &str = "_rebuild";

/// The checkpoint row of a rebuild in progress (`~` cannot occur in a spec name).
pub fn shadow_state(name: &str) -> String {
    format!("{name}~rebuild")
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Events folded into the new tables.
    pub events: u64,
}

/// Rebuilds `spec` from the log. `progress(folded, total)` is called after each batch.
pub async fn rebuild(
    store: Store,
    spec: Arc<Spec>,
    batch_size: i64,
    owner: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildReport, ProjectionError> {
    let shadow = shadow_state(&spec.name);
    store
        .projections()
        .ensure_projection(&spec, &shadow, SHADOW_SUFFIX)
        .await?;
    if !store
        .leases()
        .try_lease(&shadow, owner, Duration::from_secs(60))
        .await?
    {
        return Err(ProjectionError::RebuildRunning(spec.name.clone()));
    }
    // Whatever an interrupted rebuild left is thrown away: start from the log's beginning.
    store
        .projections()
        .drop_projection(&spec, &shadow, SHADOW_SUFFIX)
        .await?;
    let mut projector =
        Projector::open(store.clone(), spec.clone(), &shadow, SHADOW_SUFFIX).await?;
    store
        .leases()
        .try_lease(&shadow, owner, Duration::from_secs(60))
        .await?;
    let total =
        u64::try_from(store.projections().events_after(Cursor::default()).await?).unwrap_or(0);
    let mut folded = 0u64;
    progress(0, total);
    loop {
        let step = projector.step(batch_size).await?;
        folded += step.folded as u64;
        progress(folded, total.max(folded));
        if step.folded > 0 {
            store
                .leases()
                .try_lease(&shadow, owner, Duration::from_secs(60))
                .await?;
        }
        // Swap only once caught up and not behind the live projector; otherwise
        // fold on (live ingest is slower than folding, so this converges).
        if step.caught_up
            && store
                .projections()
                .swap_rebuilt(&spec, &shadow, SHADOW_SUFFIX)
                .await?
        {
            return Ok(RebuildReport { events: folded });
        }
        if step.caught_up {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
