//! Which table answers a query: the narrowest projection whose dimensions
//! cover the grouping and the filters, at the granularity and in the timezone
//! asked for; and, for totals over a range, which months, days, hours and
//! minutes make the range up.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::{Catalog, QueryError, TableStats};
use crate::aggregate::bucket::{bucket_start, next_bucket};
use crate::aggregate::spec::{Dimension, Granularity, Spec};

/// True when `spec` can answer at granularity `g` in `tz` over `needed`.
/// Minute buckets are the same instants in every zone, so any spec serves them.
fn covers(spec: &Spec, g: Granularity, tz: Tz, needed: &[Dimension]) -> bool {
    spec.granularities.contains(&g)
        && (g == Granularity::Minute || spec.timezone == tz)
        && needed.iter().all(|d| spec.dimensions.contains(d))
}

/// The narrowest covering projection: among those caught up with the log, the
/// smallest table (by `stats`), then
/// the fewest dimensions, then the name. Fewest dimensions alone is not
/// narrowest: `(user, api)` has fewer than `(api, endpoint, method)` and
/// thousands of times more rows.
pub fn find(
    catalog: &Catalog,
    stats: &TableStats,
    g: Granularity,
    tz: Tz,
    needed: &[Dimension],
) -> Option<Arc<Spec>> {
    let rank = |s: &Spec| {
        (
            // A projection still backfilling answers only if nothing else can.
            !stats.ready.contains(&s.checkpoint_of(g)),
            // A table not (yet) created ranks last.
            stats.sizes.get(&s.table(g)).copied().unwrap_or(i64::MAX),
            s.dimensions.len(),
            s.name.clone(),
        )
    };
    catalog
        .specs
        .iter()
        .filter(|s| covers(s, g, tz, needed))
        .min_by_key(|s| rank(s))
        .cloned()
}

/// [`find`], or the 400 that lists what exists and what to add.
pub fn choose(
    catalog: &Catalog,
    stats: &TableStats,
    g: Granularity,
    tz: Tz,
    needed: &[Dimension],
) -> Result<Arc<Spec>, QueryError> {
    find(catalog, stats, g, tz, needed).ok_or_else(|| no_projection(catalog, g, tz, needed))
}

fn no_projection(catalog: &Catalog, g: Granularity, tz: Tz, needed: &[Dimension]) -> QueryError {
    let dims: Vec<&str> = needed.iter().map(|d| d.as_str()).collect();
    QueryError::bad(
        "no_projection",
        format!(
            "no projection has {} at granularity `{}` in timezone `{}`. Projections: {}. \
             Query with those dimensions, granularities and timezones, or add a file to projections/ such as: \
             name = \"custom\", dimensions = [{}], granularities = [\"{}\"], timezone = \"{}\" (Tally backfills it at start-up)",
            if dims.is_empty() {
                "no dimensions".to_string()
            } else {
                format!("dimensions [{}]", dims.join(", "))
            },
            g.as_str(),
            tz.name(),
            catalog.describe(),
            dims.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", "),
            g.as_str(),
            tz.name(),
        ),
    )
}

/// The first bucket boundary at or after `t`.
pub fn ceil(t: DateTime<Utc>, g: Granularity, tz: Tz) -> DateTime<Utc> {
    let start = bucket_start(t, g, tz);
    if start == t {
        t
    } else {
        next_bucket(start, g, tz)
    }
}

/// When no projection keeps `g` in the asked timezone: the coarsest finer
/// table whose buckets tile the asked buckets exactly (every one of `edges`,
/// the bucket starts and the end, is also a bucket start there), for example
/// a UTC hour table for Berlin hours, days and months. The caller re-buckets
/// its rows; sums and latency sketches merge exactly, so the answer equals
/// one from a table kept in that timezone. A minute table serves only when
/// its retention at `now` still holds the first edge.
pub fn finer_source(
    catalog: &Catalog,
    stats: &TableStats,
    g: Granularity,
    needed: &[Dimension],
    edges: &[DateTime<Utc>],
    now: DateTime<Utc>,
) -> Option<(Arc<Spec>, Granularity)> {
    let mut zones: Vec<Tz> = Vec::new();
    for s in catalog.specs.iter() {
        if !zones.contains(&s.timezone) {
            zones.push(s.timezone);
        }
    }
    let first = *edges.first()?;
    for fine in Granularity::ALL.into_iter().rev().filter(|f| *f < g) {
        for &zone in &zones {
            if !edges.iter().all(|&b| bucket_start(b, fine, zone) == b) {
                continue;
            }
            let Some(spec) = find(catalog, stats, fine, zone, needed) else {
                continue;
            };
            let kept = spec
                .retention
                .get(&fine)
                .and_then(|r| chrono::Duration::from_std(*r).ok())
                .is_none_or(|r| now - r <= first);
            if kept {
                return Some((spec, fine));
            }
        }
    }
    None
}

/// Every bucket start in `[from, to)`, from the bucket that holds `from`; an
/// error when there are more than `max`.
pub fn buckets(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    g: Granularity,
    tz: Tz,
    max: usize,
) -> Result<Vec<DateTime<Utc>>, QueryError> {
    let mut out = Vec::new();
    let mut b = bucket_start(from, g, tz);
    while b < to {
        if out.len() == max {
            return Err(QueryError::bad(
                "range_too_long",
                format!(
                    "the range holds more than {max} {} buckets; use a shorter range or a coarser granularity",
                    g.as_str()
                ),
            ));
        }
        out.push(b);
        b = next_bucket(b, g, tz);
    }
    Ok(out)
}

/// One table read of a decomposed range: bucket starts in `[from, to)`.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The projection read.
    pub spec: Arc<Spec>,
    /// Its table's granularity.
    pub granularity: Granularity,
    /// First bucket start.
    pub from: DateTime<Utc>,
    /// End (exclusive) of the bucket starts read.
    pub to: DateTime<Utc>,
}

/// A range split into the fewest whole buckets, coarsest first.
#[derive(Debug, Clone)]
pub struct Decomposition {
    /// The reads.
    pub segments: Vec<Segment>,
    /// The range the buckets actually cover: `[from, to)` itself, unless the
    /// finest available granularity had to widen an edge.
    pub covered: (DateTime<Utc>, DateTime<Utc>),
}

/// Splits `[from, to)` into months, days, hours and minutes of projections
/// that cover `needed` in `tz` (minutes only where the minute table still
/// holds data under its retention at `now`). Only the finest level widens an
/// edge, and [`Decomposition::covered`] says so.
pub fn decompose(
    catalog: &Catalog,
    stats: &TableStats,
    tz: Tz,
    needed: &[Dimension],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Decomposition, QueryError> {
    let mut levels: Vec<Level> = Vec::new();
    for g in Granularity::ALL.into_iter().rev() {
        if let Some(spec) = find(catalog, stats, g, tz, needed) {
            let kept_from = spec
                .retention
                .get(&g)
                .and_then(|r| chrono::Duration::from_std(*r).ok())
                .map(|r| now - r);
            levels.push(Level {
                granularity: g,
                spec,
                kept_from,
            });
        }
    }
    if levels.is_empty() {
        return Err(no_projection(catalog, Granularity::Hour, tz, needed));
    }
    // A level whose table is still backfilling would undercount its part of
    // the range: leave it to the others (if any level is caught up).
    let ready = |l: &Level| stats.ready.contains(&l.spec.checkpoint_of(l.granularity));
    if levels.iter().any(ready) {
        levels.retain(ready);
    }
    let mut segments = Vec::new();
    let covered = split(&levels, from, to, &mut segments);
    segments.sort_by_key(|s| (std::cmp::Reverse(s.granularity), s.from));
    Ok(Decomposition { segments, covered })
}

/// A granularity that can serve a decomposition, and from when its table
/// still holds rows (its retention).
struct Level {
    granularity: Granularity,
    spec: Arc<Spec>,
    kept_from: Option<DateTime<Utc>>,
}

fn split(
    levels: &[Level],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    out: &mut Vec<Segment>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let all: Vec<&Level> = levels.iter().collect();
    split_refilter(&all, from, to, out)
}

/// Splits with the coarsest usable level of `levels` (coarse to fine); the
/// edges go to the finer levels, each re-checked against its retention.
fn split_refilter(
    levels: &[&Level],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    out: &mut Vec<Segment>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    // A table past its retention cannot serve this part of the range: a
    // coarser level widens instead (unless nothing else is left).
    let usable = |l: &&Level| l.kept_from.is_none_or(|k| from >= k);
    let index = levels.iter().position(usable).unwrap_or(0);
    let level = levels[index];
    let rest = &levels[index + 1..];
    let finest = !rest.iter().any(usable);
    let (g, tz) = (level.granularity, level.spec.timezone);
    let segment = |from, to| Segment {
        spec: level.spec.clone(),
        granularity: g,
        from,
        to,
    };
    if finest {
        let (a, b) = (bucket_start(from, g, tz), ceil(to, g, tz));
        out.push(segment(a, b));
        return (a, b);
    }
    let (a, b) = (ceil(from, g, tz), bucket_start(to, g, tz));
    if a >= b {
        return split_refilter(rest, from, to, out);
    }
    out.push(segment(a, b));
    let left = if from < a {
        split_refilter(rest, from, a, out).0
    } else {
        a
    };
    let right = if b < to {
        split_refilter(rest, b, to, out).1
    } else {
        b
    };
    (left, right)
}
