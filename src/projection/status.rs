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
        let status = match state {
            None => "new",
            Some(s) if s.spec_hash != spec.hash() => "changed",
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
        let lag = match state {
            Some(s) => Some(store.projections().events_after(s.cursor).await?),
            None => None,
        };
        out.push(info(spec, status, tables, state, lag, now_ms, &states));
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
    lag: Option<i64>,
    now_ms: i64,
    states: &[ProjectionState],
) -> ProjectionInfo {
    ProjectionInfo {
        name: spec.name.clone(),
        status,
        dimensions: spec.dimensions.iter().map(|d| d.as_str()).collect(),
        granularities: spec.granularities.iter().map(|g| g.as_str()).collect(),
        timezone: spec.timezone.name().to_string(),
        tables,
        checkpoint: state.map(|s| format!("{}:{}", s.cursor.tx, s.cursor.seq)),
        as_of: state.and_then(|s| s.as_of),
        lag_events: lag,
        events_folded: state.map(|s| s.events_folded),
        leader: state
            .filter(|s| s.lease_until_ms > now_ms)
            .and_then(|s| s.leader.clone()),
        rebuilding: states.iter().any(|s| s.name == shadow_state(&spec.name)),
    }
}
