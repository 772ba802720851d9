//! `GET /v1/stats`: a time series per group, and each group's totals.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::output::{rfc3339, rfc3339_opt, Covered, Group, MeasuresOut, Point, Total};
use super::params::{parse_granularity, range, OrderBy, Params};
use super::plan::{buckets, choose, finer_source};
use super::{Catalog, QueryError, MAX_POINTS, MAX_ROWS};
use crate::aggregate::bucket::{bucket_start, next_bucket};
use crate::aggregate::spec::{Dimension, Granularity};
use crate::aggregate::Measures;
use crate::store::{AggQuery, AggRow, ProjectionState, Store, Top};

/// The parameters `/v1/stats` accepts (for messages).
pub const PARAMETERS: &str = "from, to, granularity, group_by, tz, order_by, limit, fill, series, and the filters api, endpoint, method, key, user, model, status, error_type, cached";

/// A parsed `/v1/stats` request.
#[derive(Debug, Clone)]
pub struct StatsRequest {
    /// Start of the range (inclusive).
    pub from: DateTime<Utc>,
    /// End of the range (exclusive).
    pub to: DateTime<Utc>,
    /// Bucket size.
    pub granularity: Granularity,
    /// Dimensions each series is split by.
    pub group_by: Vec<Dimension>,
    /// `dimension IN (values)`, ANDed.
    pub filters: Vec<(Dimension, Vec<String>)>,
    /// Timezone of hour, day and month buckets.
    pub tz: Tz,
    /// Ranking of groups (descending).
    pub order_by: Option<OrderBy>,
    /// Keep only the first `limit` groups of the ranking.
    pub limit: Option<usize>,
    /// Include empty buckets as zeros.
    pub fill_zero: bool,
    /// Answer the series (`false`: totals only, which a page of tables needs).
    pub series: bool,
}

impl StatsRequest {
    /// Parses query-string pairs; `now` is the default end of the range.
    pub fn parse(pairs: Vec<(String, String)>, now: DateTime<Utc>) -> Result<Self, QueryError> {
        let mut p = Params::new(pairs);
        let granularity = match p.take_one("granularity")? {
            Some(g) => parse_granularity(&g)?,
            None => Granularity::Hour,
        };
        let (from, to) = (p.time("from")?, p.time("to")?);
        let default_span = match granularity {
            Granularity::Minute => Duration::hours(1),
            Granularity::Hour => Duration::hours(24),
            Granularity::Day => Duration::days(30),
            Granularity::Month => Duration::days(365),
        };
        let (from, to) = range(from, to, |to| to - default_span, now)?;
        let group_by = p.dimensions("group_by")?;
        let tz = p.tz()?;
        let order_by = p
            .take_one("order_by")?
            .map(|v| OrderBy::parse(v.trim()))
            .transpose()?;
        let limit = p.count("limit", MAX_POINTS)?;
        if limit == Some(0) {
            return Err(QueryError::bad(
                "invalid_parameter",
                format!("`limit` must be from 1 to {MAX_POINTS}"),
            ));
        }
        let fill_zero = match p.take_one("fill")?.as_deref() {
            None | Some("none") => false,
            Some("zero") => true,
            Some(v) => {
                return Err(QueryError::bad(
                    "invalid_parameter",
                    format!("`fill` must be `zero` (include empty buckets) or `none`, got `{v}`"),
                ))
            }
        };
        let series = match p.take_one("series")?.as_deref() {
            None | Some("true") => true,
            Some("false") => false,
            Some(v) => {
                return Err(QueryError::bad(
                    "invalid_parameter",
                    format!(
                        "`series` must be `true` (default) or `false` (totals only), got `{v}`"
                    ),
                ))
            }
        };
        let filters = p.filters()?;
        p.finish(PARAMETERS)?;
        Ok(Self {
            from,
            to,
            granularity,
            group_by,
            filters,
            tz,
            order_by,
            limit,
            fill_zero,
            series,
        })
    }
}

/// The `/v1/stats` answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Stats)]
pub struct StatsResponse {
    /// The requested start.
    #[serde(serialize_with = "rfc3339")]
    pub from: DateTime<Utc>,
    /// The requested end.
    #[serde(serialize_with = "rfc3339")]
    pub to: DateTime<Utc>,
    /// The buckets counted: every bucket that overlaps `[from, to)`, in full.
    pub covered: Covered,
    /// Bucket size.
    pub granularity: &'static str,
    /// Timezone of the buckets.
    pub timezone: String,
    /// Grouping dimensions.
    pub group_by: Vec<&'static str>,
    /// The projection that answered.
    pub projection: String,
    /// Every event committed before this instant is counted.
    #[serde(serialize_with = "rfc3339_opt")]
    pub as_of: Option<DateTime<Utc>>,
    /// Ranking measure, when given.
    pub order_by: Option<&'static str>,
    /// Group limit, when given.
    pub limit: Option<usize>,
    /// One point per non-empty (or, with `fill=zero`, every) bucket and group.
    pub series: Vec<Point>,
    /// Each group over the whole range, in ranking order.
    pub totals: Vec<Total>,
}

fn group_of(group_by: &[Dimension], row: AggRow) -> (DateTime<Utc>, Group, Measures) {
    let group = Group(group_by.iter().copied().zip(row.dims).collect());
    (row.bucket, group, row.measures)
}

/// Ranks groups by `order` (descending), ties by group values.
pub fn rank(groups: &mut [(Group, Measures)], order: OrderBy) {
    groups.sort_by(|(ga, a), (gb, b)| order.value(b).cmp(&order.value(a)).then(ga.cmp(gb)));
}

/// Answers a stats request from the aggregate tables.
pub async fn run(
    store: &Store,
    catalog: &Catalog,
    req: &StatsRequest,
) -> Result<StatsResponse, QueryError> {
    let started = std::time::Instant::now();
    let mut needed = req.group_by.clone();
    needed.extend(req.filters.iter().map(|(d, _)| *d));
    let sizes = catalog.sizes(store).await;
    // `source`: the granularity of the table read; finer than asked when the
    // asked timezone is answered by re-bucketing (see `finer_source`).
    let (spec, source, tz) = match choose(catalog, &sizes, req.granularity, req.tz, &needed) {
        Ok(spec) if req.granularity == Granularity::Minute => (spec, req.granularity, req.tz),
        Ok(spec) => {
            let tz = spec.timezone;
            (spec, req.granularity, tz)
        }
        Err(none) => {
            let starts = buckets(req.from, req.to, req.granularity, req.tz, MAX_POINTS)?;
            let mut edges = starts.clone();
            if let Some(l) = starts.last() {
                edges.push(next_bucket(*l, req.granularity, req.tz));
            }
            let now = Utc::now();
            match finer_source(catalog, &sizes, req.granularity, &needed, &edges, now) {
                Some((spec, source)) => (spec, source, req.tz),
                None => return Err(none),
            }
        }
    };
    let starts = buckets(req.from, req.to, req.granularity, tz, MAX_POINTS)?;
    let (first, last) = match (starts.first(), starts.last()) {
        (Some(f), Some(l)) => (*f, next_bucket(*l, req.granularity, tz)),
        _ => {
            return Err(QueryError::bad(
                "invalid_range",
                "the range holds no bucket",
            ))
        }
    };
    let base = AggQuery {
        spec: &spec,
        granularity: source,
        from: first,
        to: last,
        filters: &req.filters,
        group_by: &req.group_by,
        rows: true,
        by_bucket: true,
        max_rows: MAX_ROWS,
        top: None,
    };
    let as_of = async {
        let states = catalog.checkpoints(store).await?;
        Ok::<_, QueryError>(ProjectionState::as_of_for(&states, &spec, source))
    };
    // Top-N: rank the groups on summed integers first (no sketches), then read
    // full rows for the chosen groups only.
    let chosen: Option<Vec<Group>> = match req.limit {
        Some(limit) if !req.group_by.is_empty() => {
            let order = req.order_by.unwrap_or(OrderBy::Requests);
            // Ranked and cut in the database: only `limit` groups come back.
            let sums = store
                .projections()
                .query_agg(&AggQuery {
                    rows: false,
                    by_bucket: false,
                    top: Some(Top {
                        order: order.sql(),
                        limit,
                        offset: 0,
                    }),
                    ..base.clone()
                })
                .await?;
            let groups: Vec<(Group, Measures)> = sums
                .rows
                .into_iter()
                .map(|r| {
                    let (_, g, m) = group_of(&req.group_by, r);
                    (g, m)
                })
                .collect();
            Some(groups.into_iter().map(|(g, _)| g).collect())
        }
        _ => None,
    };
    let filters: Vec<(Dimension, Vec<String>)> = match &chosen {
        None => req.filters.clone(),
        Some(groups) => {
            let mut f: Vec<(Dimension, Vec<String>)> = req
                .filters
                .iter()
                .filter(|(d, _)| !req.group_by.contains(d))
                .cloned()
                .collect();
            for (i, d) in req.group_by.iter().enumerate() {
                let mut values: Vec<String> = groups.iter().map(|g| g.0[i].1.clone()).collect();
                values.sort();
                values.dedup();
                f.push((*d, values));
            }
            f
        }
    };
    let (rows, as_of) = if chosen.as_ref().is_some_and(|g| g.is_empty()) {
        (Vec::new(), as_of.await?)
    } else {
        let q = AggQuery {
            filters: &filters,
            ..base.clone()
        };
        // `as_of` before the rows, so the rows are at least that fresh: read
        // together, a fold committing in between could pair a new `as_of`
        // with old rows.
        let as_of = as_of.await?;
        (store.projections().query_agg(&q).await?.rows, as_of)
    };

    let read_rows = started.elapsed();
    let row_count = rows.len();
    let mut cells: BTreeMap<(DateTime<Utc>, Group), Measures> = BTreeMap::new();
    for row in rows {
        let (bucket, group, m) = group_of(&req.group_by, row);
        let bucket = match source == req.granularity {
            true => bucket,
            false => bucket_start(bucket, req.granularity, tz),
        };
        if chosen.as_ref().is_some_and(|c| !c.contains(&group)) {
            continue;
        }
        // The first row of a cell moves in; later ones merge.
        match cells.entry((bucket, group)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(m);
            }
            std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().merge(&m),
        }
    }
    let mut totals: HashMap<Group, Measures> = HashMap::new();
    for ((_, g), m) in &cells {
        totals.entry(g.clone()).or_default().merge(m);
    }
    if req.group_by.is_empty() {
        totals.entry(Group::default()).or_default();
    }
    let mut totals: Vec<(Group, Measures)> = totals.into_iter().collect();
    match (&chosen, req.order_by) {
        (Some(c), _) => totals.sort_by_key(|(g, _)| c.iter().position(|x| x == g)),
        (None, Some(order)) => rank(&mut totals, order),
        (None, None) => totals.sort_by(|a, b| a.0.cmp(&b.0)),
    }
    let points = if !req.series {
        totals.len()
    } else if req.fill_zero {
        starts.len().saturating_mul(totals.len())
    } else {
        cells.len()
    };
    if points > MAX_POINTS {
        return Err(QueryError::bad(
            "too_many_points",
            format!(
                "the answer has {points} points (buckets × groups), more than {MAX_POINTS}; use a shorter range, a coarser granularity, filters, or `limit` to keep the top groups"
            ),
        ));
    }
    let position: HashMap<&Group, usize> = totals
        .iter()
        .enumerate()
        .map(|(i, (g, _))| (g, i))
        .collect();
    let mut series = Vec::with_capacity(points);
    let empty = Measures::default();
    for &b in starts.iter().filter(|_| req.series) {
        let mut at: Vec<(usize, &Group, &Measures)> = if req.fill_zero {
            totals
                .iter()
                .enumerate()
                .map(|(i, (g, _))| (i, g, cells.get(&(b, g.clone())).unwrap_or(&empty)))
                .collect()
        } else {
            cells
                .range((b, Group::default())..)
                .take_while(|((bb, _), _)| *bb == b)
                .map(|((_, g), m)| (position.get(g).copied().unwrap_or(usize::MAX), g, m))
                .collect()
        };
        at.sort_by_key(|(i, _, _)| *i);
        series.extend(at.into_iter().map(|(_, g, m)| Point {
            bucket: b,
            group: g.clone(),
            measures: MeasuresOut::from(m),
        }));
    }
    tracing::debug!(
        projection = %spec.name,
        rows = row_count,
        points = series.len(),
        read_us = read_rows.as_micros() as u64,
        total_us = started.elapsed().as_micros() as u64,
        "stats answered"
    );
    Ok(StatsResponse {
        from: req.from,
        to: req.to,
        covered: Covered {
            from: first,
            to: last,
        },
        granularity: req.granularity.as_str(),
        timezone: tz.name().to_string(),
        group_by: req.group_by.iter().map(|d| d.as_str()).collect(),
        projection: spec.name.clone(),
        as_of,
        order_by: req.order_by.map(OrderBy::as_str),
        limit: req.limit,
        series,
        totals: totals
            .iter()
            .map(|(g, m)| Total {
                group: g.clone(),
                measures: MeasuresOut::from(m),
            })
            .collect(),
    })
}
