//! `GET /v1/keys` (keys ranked over a range) and `GET /v1/keys/{key}/stats`
//! (one key's page). Both count ranges exactly to the minute: a range is split
//! into months, days, hours and minutes ([`super::plan::decompose`]).

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use futures::future::try_join_all;
use serde::Serialize;

use super::output::{rfc3339, rfc3339_opt, Covered, Group, MeasuresOut};
use super::params::{range, OrderBy, Params};
use super::plan::{decompose, Decomposition, Segment};
use super::stats::rank;
use super::window::{read, segment_query};
use super::{Catalog, QueryError};
use crate::aggregate::bucket::{day_start, month_start};
use crate::aggregate::spec::Dimension;
use crate::aggregate::Measures;
use crate::store::{ProjectionState, Store, Top};

/// The parameters `/v1/keys` accepts.
pub const KEYS_PARAMETERS: &str = "from, to, tz, order_by (cost|requests|tokens|errors|…), limit, offset, and the filters api, endpoint, method, user, model, status, error_type, cached";

/// The parameters `/v1/keys/{key}/stats` accepts.
pub const KEY_PAGE_PARAMETERS: &str = "at, tz";

/// Largest `limit` of `/v1/keys`.
pub const MAX_KEYS: usize = 1000;
/// Most keys `/v1/keys` may skip.
pub const MAX_OFFSET: usize = 1_000_000_000;

/// Groups with their measures over a range, and how fresh they are.
#[derive(Debug, Clone)]
pub struct RangeTotals {
    /// The groups asked for, in ranking order (or by group values).
    pub groups: Vec<(Group, Measures)>,
    /// Groups with any data in the range (before offset/limit).
    pub total_groups: usize,
    /// The range the buckets cover.
    pub covered: (DateTime<Utc>, DateTime<Utc>),
    /// The oldest `as_of` of the projections read.
    pub as_of: Option<DateTime<Utc>>,
}

/// A page of a ranking: order, skip, take.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Ranking measure.
    pub order: OrderBy,
    /// Groups skipped.
    pub offset: usize,
    /// Groups kept.
    pub limit: usize,
}

/// Totals per group over `[from, to)`, read from the coarsest tables that fit.
#[allow(clippy::too_many_arguments)]
pub async fn range_totals(
    store: &Store,
    catalog: &Catalog,
    tz: Tz,
    filters: &[(Dimension, Vec<String>)],
    group_by: &[Dimension],
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
    page: Option<Page>,
) -> Result<RangeTotals, QueryError> {
    let mut needed = group_by.to_vec();
    needed.extend(filters.iter().map(|(d, _)| *d));
    let sizes = catalog.sizes(store).await;
    let plan = decompose(catalog, &sizes, tz, &needed, from, to, now)?;
    let as_of = async {
        let states = catalog.checkpoints(store).await?;
        let mut as_of: Option<Option<DateTime<Utc>>> = None;
        for seg in &plan.segments {
            let a = ProjectionState::as_of_for(&states, &seg.spec, seg.granularity);
            as_of = Some(match as_of {
                None => a,
                Some(prev) => prev.min(a),
            });
        }
        Ok::<_, QueryError>(as_of.flatten())
    };
    // One table: the database ranks and cuts. Several: sum them here, then rank.
    let single = match (page, plan.segments.as_slice()) {
        (Some(page), [seg]) => Some((page, seg)),
        _ => None,
    };
    let ranked = async {
        match single {
            Some((page, seg)) => {
                let top = Top {
                    order: page.order.sql(),
                    limit: page.limit,
                    offset: page.offset,
                };
                let q = segment_query(seg, filters, group_by, false, Some(top));
                let answer = store.projections().query_agg(&q).await?;
                let groups: Vec<(Group, Measures)> = answer
                    .rows
                    .into_iter()
                    .map(|r| {
                        (
                            Group(group_by.iter().copied().zip(r.dims).collect()),
                            r.measures,
                        )
                    })
                    .collect();
                let total = usize::try_from(answer.groups.unwrap_or(0)).unwrap_or(0);
                Ok::<_, QueryError>((groups, total, true))
            }
            None => {
                let groups = read(store, &plan, filters, group_by, false).await?;
                let total = groups.len();
                Ok((groups, total, false))
            }
        }
    };
    // `as_of` before the rows (see `alert::quota::status`): read together, a
    // fold committing in between could pair a new `as_of` with old rows.
    let as_of = as_of.await?;
    let (mut groups, total_groups, paged) = ranked.await?;
    let groups = match page {
        None => {
            let mut full = read(store, &plan, filters, group_by, true).await?;
            full.sort_by(|a, b| a.0.cmp(&b.0));
            full
        }
        Some(page) => {
            let chosen: Vec<Group> = if paged {
                groups.into_iter().map(|(g, _)| g).collect()
            } else {
                rank(&mut groups, page.order);
                groups
                    .into_iter()
                    .skip(page.offset)
                    .take(page.limit)
                    .map(|(g, _)| g)
                    .collect()
            };
            if chosen.is_empty() {
                Vec::new()
            } else {
                let mut narrowed: Vec<(Dimension, Vec<String>)> = filters
                    .iter()
                    .filter(|(d, _)| !group_by.contains(d))
                    .cloned()
                    .collect();
                for (i, d) in group_by.iter().enumerate() {
                    let mut values: Vec<String> = chosen.iter().map(|g| g.0[i].1.clone()).collect();
                    values.sort();
                    values.dedup();
                    narrowed.push((*d, values));
                }
                let full = read(store, &plan, &narrowed, group_by, true).await?;
                let mut by_group: HashMap<Group, Measures> = full.into_iter().collect();
                chosen
                    .into_iter()
                    .map(|g| {
                        let m = by_group.remove(&g).unwrap_or_default();
                        (g, m)
                    })
                    .collect()
            }
        }
    };
    Ok(RangeTotals {
        groups,
        total_groups,
        covered: plan.covered,
        as_of,
    })
}

/// A parsed `/v1/keys` request.
#[derive(Debug, Clone)]
pub struct KeysRequest {
    /// Start (inclusive).
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Timezone the month/day/hour tables must follow.
    pub tz: Tz,
    /// Ranking.
    pub page: Page,
    /// Filters on other dimensions.
    pub filters: Vec<(Dimension, Vec<String>)>,
}

impl KeysRequest {
    /// Parses query-string pairs; the default range is this month so far.
    pub fn parse(pairs: Vec<(String, String)>, now: DateTime<Utc>) -> Result<Self, QueryError> {
        let mut p = Params::new(pairs);
        let tz = p.tz()?;
        let (from, to) = (p.time("from")?, p.time("to")?);
        let (from, to) = range(
            from,
            to,
            |to| {
                let m = month_start(to, tz);
                if m < to {
                    m
                } else {
                    to - Duration::days(1)
                }
            },
            now,
        )?;
        let order = match p.take_one("order_by")? {
            Some(v) => OrderBy::parse(v.trim())?,
            None => OrderBy::Cost,
        };
        let limit = p.count("limit", MAX_KEYS)?.unwrap_or(50);
        if limit == 0 {
            return Err(QueryError::bad(
                "invalid_parameter",
                format!("`limit` must be from 1 to {MAX_KEYS}"),
            ));
        }
        let offset = p.count("offset", MAX_OFFSET)?.unwrap_or(0);
        let filters = p.filters()?;
        if filters.iter().any(|(d, _)| *d == Dimension::Key) {
            return Err(QueryError::bad(
                "invalid_parameter",
                "`key` cannot filter /v1/keys; use GET /v1/keys/{key}/stats for one key",
            ));
        }
        p.finish(KEYS_PARAMETERS)?;
        Ok(Self {
            from,
            to,
            tz,
            page: Page {
                order,
                offset,
                limit,
            },
            filters,
        })
    }
}

/// One key of `/v1/keys`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyRow {
    /// The API key.
    pub key: String,
    /// Its measures over the range.
    #[serde(flatten)]
    pub measures: MeasuresOut,
}

/// The `/v1/keys` answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Keys)]
pub struct KeysResponse {
    /// Requested start.
    #[serde(serialize_with = "rfc3339")]
    pub from: DateTime<Utc>,
    /// Requested end.
    #[serde(serialize_with = "rfc3339")]
    pub to: DateTime<Utc>,
    /// What the buckets cover (differs only where no finer table exists).
    pub covered: Covered,
    /// Ranking measure.
    pub order_by: &'static str,
    /// Keys returned at most.
    pub limit: usize,
    /// Keys skipped.
    pub offset: usize,
    /// Keys with any usage in the range.
    pub total_keys: usize,
    /// Every event committed before this instant is counted.
    #[serde(serialize_with = "rfc3339_opt")]
    pub as_of: Option<DateTime<Utc>>,
    /// The keys, best first.
    pub keys: Vec<KeyRow>,
}

/// Answers `/v1/keys`.
pub async fn list(
    store: &Store,
    catalog: &Catalog,
    req: &KeysRequest,
    now: DateTime<Utc>,
) -> Result<KeysResponse, QueryError> {
    let t = range_totals(
        store,
        catalog,
        req.tz,
        &req.filters,
        &[Dimension::Key],
        (req.from, req.to),
        now,
        Some(req.page),
    )
    .await?;
    Ok(KeysResponse {
        from: req.from,
        to: req.to,
        covered: Covered {
            from: t.covered.0,
            to: t.covered.1,
        },
        order_by: req.page.order.as_str(),
        limit: req.page.limit,
        offset: req.page.offset,
        total_keys: t.total_groups,
        as_of: t.as_of,
        keys: t
            .groups
            .into_iter()
            .map(|(g, m)| KeyRow {
                key: g.0.into_iter().next().map(|(_, v)| v).unwrap_or_default(),
                measures: MeasuresOut::from(&m),
            })
            .collect(),
    })
}

/// A window of the key page.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PageWindow {
    /// Start.
    #[serde(serialize_with = "rfc3339")]
    pub from: DateTime<Utc>,
    /// End.
    #[serde(serialize_with = "rfc3339")]
    pub to: DateTime<Utc>,
    /// What the buckets cover.
    pub covered: Covered,
    /// Measures.
    #[serde(flatten)]
    pub measures: MeasuresOut,
}

/// What a [`Breakdown`] holds in its `group` (for the API document).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct BreakdownBy {
    /// In `by_model`.
    model: Option<String>,
    /// In `by_api`.
    api: Option<String>,
}

/// One value of a breakdown (`model` or `api`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Breakdown {
    /// `{"model": "…"}` or `{"api": "…"}`, inlined.
    #[serde(flatten)]
    #[schema(value_type = BreakdownBy)]
    pub group: Group,
    /// Its measures.
    #[serde(flatten)]
    pub measures: MeasuresOut,
}

/// The `/v1/keys/{key}/stats` answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyPage {
    /// The key.
    pub key: String,
    /// The instant the page is computed for (`at`, default now).
    #[serde(serialize_with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// Timezone of "today" and "this month".
    pub timezone: String,
    /// Every event committed before this instant is counted.
    #[serde(serialize_with = "rfc3339_opt")]
    pub as_of: Option<DateTime<Utc>>,
    /// From local midnight to `at`.
    pub today: PageWindow,
    /// From the first of the local month to `at`.
    pub this_month: PageWindow,
    /// The 24 hours before `at`.
    pub last_24h: PageWindow,
    /// This month by model, by cost (descending).
    pub by_model: Vec<Breakdown>,
    /// This month by api, by cost (descending).
    pub by_api: Vec<Breakdown>,
}

/// Answers `/v1/keys/{key}/stats`.
pub async fn page(
    store: &Store,
    catalog: &Catalog,
    key: &str,
    pairs: Vec<(String, String)>,
    now: DateTime<Utc>,
) -> Result<KeyPage, QueryError> {
    let max = crate::event::validate::MAX_KEY_CHARS;
    if key.chars().count() > max {
        return Err(QueryError::bad(
            "invalid_key",
            format!("the key is longer than {max} characters, which no event's `key` can be"),
        ));
    }
    let mut p = Params::new(pairs);
    let at = p.time("at")?.unwrap_or(now);
    let tz = p.tz()?;
    p.finish(KEY_PAGE_PARAMETERS)?;
    let filters = vec![(Dimension::Key, vec![key.to_string()])];
    let split = [Dimension::Api, Dimension::Model];
    let day = day_start(at.with_timezone(&tz).date_naive(), tz);
    let month = month_start(at, tz);
    // The three windows share most of their reads (this month's hours and
    // minutes are today's): plan all three, read each distinct table range once.
    let sizes = catalog.sizes(store).await;
    let needed = [Dimension::Key, Dimension::Api, Dimension::Model];
    let starts = [day, month, at - Duration::hours(24)];
    let mut plans = Vec::with_capacity(3);
    for from in starts {
        plans.push(if from < at {
            Some(decompose(catalog, &sizes, tz, &needed, from, at, now)?)
        } else {
            None // `at` is exactly midnight: an empty window.
        });
    }
    let mut distinct: Vec<&Segment> = Vec::new();
    let same = |a: &Segment, b: &Segment| {
        a.spec.name == b.spec.name
            && a.granularity == b.granularity
            && a.from == b.from
            && a.to == b.to
    };
    for seg in plans.iter().flatten().flat_map(|p| &p.segments) {
        if !distinct.iter().any(|d| same(d, seg)) {
            distinct.push(seg);
        }
    }
    let reads = distinct.iter().map(|seg| {
        let q = segment_query(seg, &filters, &split, true, None);
        async move { store.projections().query_agg(&q).await.map(|a| a.rows) }
    });
    // The checkpoints before the rows: see `range_totals`.
    let states = catalog.checkpoints(store).await?;
    let read = try_join_all(reads).await?;
    let window_totals = |plan: &Option<Decomposition>| -> RangeTotals {
        let Some(plan) = plan else {
            return RangeTotals {
                groups: Vec::new(),
                total_groups: 0,
                covered: (at, at),
                as_of: None,
            };
        };
        let mut merged: HashMap<Group, Measures> = HashMap::new();
        for seg in &plan.segments {
            let i = distinct.iter().position(|d| same(d, seg)).unwrap_or(0);
            for row in read.get(i).into_iter().flatten() {
                let g = Group(split.iter().copied().zip(row.dims.clone()).collect());
                merged.entry(g).or_default().merge(&row.measures);
            }
        }
        let as_of = plan
            .segments
            .iter()
            .map(|seg| ProjectionState::as_of_for(&states, &seg.spec, seg.granularity))
            .min()
            .flatten();
        RangeTotals {
            total_groups: merged.len(),
            groups: merged.into_iter().collect(),
            covered: plan.covered,
            as_of,
        }
    };
    let (today, this_month, last_24h) = (
        window_totals(&plans[0]),
        window_totals(&plans[1]),
        window_totals(&plans[2]),
    );
    let as_of = [&today, &this_month, &last_24h]
        .iter()
        .filter(|t| t.covered.0 < t.covered.1)
        .map(|t| t.as_of)
        .min()
        .flatten();
    let sum = |t: &RangeTotals| {
        let mut m = Measures::default();
        for (_, g) in &t.groups {
            m.merge(g);
        }
        m
    };
    let win = |from: DateTime<Utc>, t: &RangeTotals| PageWindow {
        from,
        to: at,
        covered: Covered {
            from: t.covered.0,
            to: t.covered.1,
        },
        measures: MeasuresOut::from(&sum(t)),
    };
    let breakdown = |index: usize| {
        let dim = split[index];
        let mut by: HashMap<String, Measures> = HashMap::new();
        for (g, m) in &this_month.groups {
            by.entry(g.0[index].1.clone()).or_default().merge(m);
        }
        let mut v: Vec<(String, Measures)> = by.into_iter().collect();
        v.sort_by(|(a, ma), (b, mb)| mb.cost_nanos.cmp(&ma.cost_nanos).then(a.cmp(b)));
        v.into_iter()
            .map(|(value, m)| Breakdown {
                group: Group(vec![(dim, value)]),
                measures: MeasuresOut::from(&m),
            })
            .collect::<Vec<_>>()
    };
    Ok(KeyPage {
        key: key.to_string(),
        at,
        timezone: tz.name().to_string(),
        as_of,
        today: win(day, &today),
        this_month: win(month, &this_month),
        last_24h: win(at - Duration::hours(24), &last_24h),
        by_model: breakdown(1),
        by_api: breakdown(0),
    })
}
