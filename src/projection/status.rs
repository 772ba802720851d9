//! What `tally projections list` (and later `GET /v1/projections`) shows: each
//! projection's spec, tables, checkpoint, freshness and lag.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::rebuild::shadow_state;
use super::ProjectionError;
use crate::aggregate::spec::Spec;
use crate::store::{ProjectionState, Store};

/// One projection as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionInfo {
    /// Projection name.
    pub name: String,
    /// `ok`, `new` (no checkpoint yet), `changed` (needs `tally projections rebuild`),
    /// or `orphaned` (checkpoint without a spec file).
    pub status: &'static str,
    /// Dimensions, in table column order.
    pub dimensions: Vec<&'static str>,
    /// Granularities.
    pub granularities: Vec<&'static str>,
    /// Timezone of hour/day/month buckets.
    pub timezone: String,
    /// Each table with its row count (when counted).
    pub tables: Vec<(String, Option<i64>)>,
    /// Checkpoint cursor as `tx:seq` (tx is 0 on SQLite).
    pub checkpoint: Option<String>,
    /// Every event committed before this instant is folded in.
    pub as_of: Option<DateTime<Utc>>,
    /// Events in the log after the checkpoint.
    pub lag_events: Option<i64>,
    /// Events folded since the tables were built.
    pub events_folded: Option<i64>,
    /// Instance holding the projector lease, if the lease is live.
    pub leader: Option<String>,
    /// Whether a rebuild is in progress (a shadow checkpoint exists).
    pub rebuilding: bool,
    /// Each tier's checkpoint (the projection-wide fields above are the
    /// lowest `as_of`, the largest lag and the finest tier's cursor).
    pub tiers: Vec<TierInfo>,
}

/// One tier of a projection: tables folded and committed together under a
/// checkpoint of their own (see [`crate::aggregate::spec::Tier`]).
#[derive(Debug, Clone, Serialize)]
pub struct TierInfo {
    /// `fine` (minute and hour tables) or `coarse` (day and month tables).
    pub tier: &'static str,
    /// Its granularities.
    pub granularities: Vec<&'static str>,
    /// Checkpoint cursor as `tx:seq`.
    pub checkpoint: Option<String>,
    /// Every event committed before this instant is in its tables.
    pub as_of: Option<DateTime<Utc>>,
    /// Events in the log after its checkpoint.
    pub lag_events: Option<i64>,
    /// Instance holding its lease, if the lease is live.
    pub leader: Option<String>,
}

/// Describes every spec and every stored checkpoint. `count_rows` also counts
/// each table's rows (a full scan on PostgreSQL: for the CLI, not the API).
pub async fn list(
    store: &Store,
    specs: &[Spec],
    count_rows: bool,
) -> Result<Vec<ProjectionInfo>, ProjectionError> {
    let states = store.projections().projection_states().await?;
    let now_ms = Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for spec in specs {
        let state = states.iter().find(|s| s.name == spec.name);
        let tiers = spec.tiers();
        // A checkpoint from before tiers (the whole spec's hash) is split
        // into tiers when the projector opens it: not a changed spec.
        let matches = |t: &crate::aggregate::spec::TierSpec, s: &ProjectionState| {
            s.spec_hash == t.spec.hash() || (s.name == spec.name && s.spec_hash == spec.hash())
        };
        let status = match state {
            None => "new",
            Some(_)
                if tiers.iter().any(|t| {
                    states
                        .iter()
                        .find(|s| s.name == t.state)
                        .is_some_and(|s| !matches(t, s))
                }) =>
            {
                "changed"
            }
            Some(_) => "ok",
        };
        let mut tables = Vec::new();
        // A changed spec may name tables that do not exist yet.
        if status == "ok" {
            for &g in &spec.granularities {
                let t = spec.table(g);
                let rows = if count_rows {
                    Some(store.projections().count_rows(&t).await?)
                } else {
                    None
                };
                tables.push((t, rows));
            }
        }
        let mut tier_infos = Vec::new();
        for t in &tiers {
            // A tier row not created yet is where the projection's row is.
            let row = states
                .iter()
                .find(|s| s.name == t.state)
                .or(state.filter(|_| status != "new"));
            let lag = match row {
                Some(s) => Some(store.projections().events_after(s.cursor).await?),
                None => None,
            };
            tier_infos.push(TierInfo {
                tier: t.tier.as_str(),
                granularities: t.spec.granularities.iter().map(|g| g.as_str()).collect(),
                checkpoint: row.map(|s| format!("{}:{}", s.cursor.tx, s.cursor.seq)),
                as_of: row.and_then(|s| s.as_of),
                lag_events: lag,
                leader: row
                    .filter(|s| s.lease_until_ms > now_ms)
                    .and_then(|s| s.leader.clone()),
            });
        }
        out.push(info(
            spec, status, tables, state, tier_infos, now_ms, &states,
        ));
    }
    for s in states.iter().filter(|s| !s.name.contains('~')) {
        if !specs.iter().any(|spec| spec.name == s.name) {
            out.push(ProjectionInfo {
                name: s.name.clone(),
                status: "orphaned",
                dimensions: vec![],
                granularities: vec![],
                timezone: String::new(),
                tables: vec![],
                checkpoint: Some(format!("{}:{}", s.cursor.tx, s.cursor.seq)),
                as_of: s.as_of,
                lag_events: None,
                events_folded: Some(s.events_folded),
                leader: None,
                rebuilding: false,
                tiers: Vec::new(),
            });
        }
    }
    Ok(out)
}

fn info(
    spec: &Spec,
    status: &'static str,
    tables: Vec<(String, Option<i64>)>,
    state: Option<&ProjectionState>,
    tiers: Vec<TierInfo>,
    now_ms: i64,
    states: &[ProjectionState],
) -> ProjectionInfo {
    let lowest = |a: Option<Option<DateTime<Utc>>>, b: Option<DateTime<Utc>>| match a {
        None => Some(b),
        Some(prev) => Some(prev.min(b)),
    };
    ProjectionInfo {
        name: spec.name.clone(),
        status,
        dimensions: spec.dimensions.iter().map(|d| d.as_str()).collect(),
        granularities: spec.granularities.iter().map(|g| g.as_str()).collect(),
        timezone: spec.timezone.name().to_string(),
        tables,
        checkpoint: state.map(|s| format!("{}:{}", s.cursor.tx, s.cursor.seq)),
        as_of: tiers.iter().map(|t| t.as_of).fold(None, lowest).flatten(),
        lag_events: tiers.iter().filter_map(|t| t.lag_events).max(),
        events_folded: state.map(|s| s.events_folded),
        leader: state
            .filter(|s| s.lease_until_ms > now_ms)
            .and_then(|s| s.leader.clone()),
        rebuilding: states.iter().any(|s| s.name == shadow_state(&spec.name)),
        tiers,
    }
}
