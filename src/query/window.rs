//! The one reader of a time range over the projections, by group. The key
//! routes, alert rules and quotas all read through it, so a quota's `used`
//! and the value its rule compares are the same sum of the same tables.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use futures::future::try_join_all;

use super::output::Group;
use super::plan::{decompose, Decomposition, Segment};
use super::{Catalog, QueryError, MAX_ROWS};
use crate::aggregate::spec::Dimension;
use crate::aggregate::Measures;
use crate::store::{AggQuery, ProjectionState, Store, Top};

/// A half-open time range `[from, to)`.
pub type Range = (DateTime<Utc>, DateTime<Utc>);

/// `[from, to)` read exactly (split into months, days, hours and minutes by
/// [`decompose`]) with `filters`, summed per `group_by`; also returns the
/// range the buckets read cover. `sketch`: read stored rows with their
/// latency sketches (percentiles), else the database sums integers only.
#[allow(clippy::too_many_arguments)]
pub async fn read_range(
    store: &Store,
    catalog: &Catalog,
    tz: Tz,
    filters: &[(Dimension, Vec<String>)],
    group_by: &[Dimension],
    (from, to): Range,
    now: DateTime<Utc>,
    sketch: bool,
) -> Result<(Vec<(Group, Measures)>, Range), QueryError> {
    let plan = plan_range(store, catalog, tz, filters, group_by, (from, to), now).await?;
    let rows = read(store, &plan, filters, group_by, sketch).await?;
    Ok((rows, plan.covered))
}

/// The tables and bucket ranges [`read_range`] reads.
async fn plan_range(
    store: &Store,
    catalog: &Catalog,
    tz: Tz,
    filters: &[(Dimension, Vec<String>)],
    group_by: &[Dimension],
    (from, to): Range,
    now: DateTime<Utc>,
) -> Result<Decomposition, QueryError> {
    let mut needed: Vec<Dimension> = group_by.to_vec();
    needed.extend(filters.iter().map(|(d, _)| *d));
    let stats = catalog.sizes(store).await;
    decompose(catalog, &stats, tz, &needed, from, to, now)
}

/// [`read_range`], with the lowest `as_of` of the tables it read (each
/// table's tier checkpoint; `None` when one has none or they cannot be read
/// now), taken before the rows so a fold committing in between cannot pair a
/// new `as_of` with old rows.
#[allow(clippy::too_many_arguments)]
pub async fn read_range_as_of(
    store: &Store,
    catalog: &Catalog,
    tz: Tz,
    filters: &[(Dimension, Vec<String>)],
    group_by: &[Dimension],
    range: Range,
    now: DateTime<Utc>,
    sketch: bool,
) -> Result<(Vec<(Group, Measures)>, Range, Option<DateTime<Utc>>), QueryError> {
    let plan = plan_range(store, catalog, tz, filters, group_by, range, now).await?;
    let as_of = catalog.checkpoints(store).await.ok().and_then(|states| {
        let mut lowest: Option<Option<DateTime<Utc>>> = None;
        for seg in &plan.segments {
            let a = ProjectionState::as_of_for(&states, &seg.spec, seg.granularity);
            lowest = Some(lowest.map_or(a, |prev| prev.min(a)));
        }
        lowest.flatten()
    });
    let rows = read(store, &plan, filters, group_by, sketch).await?;
    Ok((rows, plan.covered, as_of))
}

/// The read of one segment's table range.
pub(crate) fn segment_query<'a>(
    seg: &'a Segment,
    filters: &'a [(Dimension, Vec<String>)],
    group_by: &'a [Dimension],
    rows: bool,
    top: Option<Top>,
) -> AggQuery<'a> {
    AggQuery {
        spec: &seg.spec,
        granularity: seg.granularity,
        from: seg.from,
        to: seg.to,
        filters,
        group_by,
        rows,
        by_bucket: false,
        max_rows: MAX_ROWS,
        top,
    }
}

/// Reads every segment (concurrently, with no cap on the groups) and sums per group; `rows` reads the
/// stored rows with sketches, otherwise the database sums integers only.
pub async fn read(
    store: &Store,
    plan: &Decomposition,
    filters: &[(Dimension, Vec<String>)],
    group_by: &[Dimension],
    rows: bool,
) -> Result<Vec<(Group, Measures)>, QueryError> {
    let reads = plan.segments.iter().map(|seg| {
        // Rules and quotas are evaluated however many groups they have (a
        // rule grouped by key watches every key): no row cap, unlike the
        // routes, whose answers a person reads.
        let q = AggQuery {
            max_rows: usize::MAX,
            ..segment_query(seg, filters, group_by, rows, None)
        };
        async move { store.projections().query_agg(&q).await.map(|a| a.rows) }
    });
    let mut merged: HashMap<Group, Measures> = HashMap::new();
    for rows in try_join_all(reads).await? {
        for row in rows {
            let g = Group(group_by.iter().copied().zip(row.dims).collect());
            match merged.entry(g) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(row.measures);
                }
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    o.get_mut().merge(&row.measures)
                }
            }
        }
    }
    Ok(merged.into_iter().collect())
}
