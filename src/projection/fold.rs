//! Folding events into per-bucket deltas, in memory.
//!
//! A [`Delta`] (defined in `aggregate::measures`) maps each (bucket, dimension values) row of each granularity
//! table to the [`Measures`] of the events that fall in it. The store adds a
//! delta to the tables (integers add exactly, sketches merge), so folding a
//! log in any batch sizes gives the same tables as folding it at once.

use std::borrow::Cow;
use std::hash::Hasher;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::aggregate::bucket::bucket_start;
use crate::aggregate::measures::{
    dimension_str, Delta, Measures, RowKey, RowKeyRef, Rows, SeededFx,
};
use crate::aggregate::price::Charge;
use crate::aggregate::sketch::{Bin, Sketch};
use crate::aggregate::spec::{Dimension, Granularity, Spec};
use crate::event::Event;

/// Folds events into a projection's [`Delta`].
///
/// Each event is counted once, in its *fine row*: its dimension values and
/// its bucket in every granularity of the spec. [`Fold::finish`] then rolls
/// the fine rows up into each granularity's table. An event costs one hash
/// probe instead of one per granularity, and rows roll up by merging exactly
/// as the store's upsert does, so the tables are those of a per-event fold.
/// Keying the fine row by every bucket (not the finest alone) keeps that true
/// in any time zone, even one where an hour could straddle two days.
///
/// The fine rows live in one `Vec`, their dimension values packed in one
/// arena, and the hash table holds only indices: a probe touches a few
/// contiguous bytes instead of chasing one allocation per dimension.
#[derive(Debug, Clone)]
pub struct Fold {
    dimensions: Vec<Dimension>,
    granularities: Vec<Granularity>,
    timezone: Tz,
    index: hashbrown::HashTable<usize>,
    rows: Vec<FineRow>,
    /// Packed dimension values of every fine row (see [`pack`]).
    arena: Vec<u8>,
    /// This event's packed values (reused between events).
    key: Vec<u8>,
    /// UTC only: the last (day, month) bucket pair, in microseconds.
    month_of_day: Option<(i64, i64)>,
    hasher: SeededFx,
    events: usize,
    /// Per granularity: buckets older than this (microseconds) get no row
    /// ([`Spec::fold_horizon`]); `i64::MIN` when unbounded.
    horizon: [i64; MAX_GRANULARITIES],
    /// Every granularity is bounded: an event older than all of them is
    /// counted and costs nothing more.
    all_bounded: bool,
}

/// One (buckets, dimension values) row of a [`Fold`].
#[derive(Debug, Clone)]
struct FineRow {
    hash: u64,
    /// Bucket start per granularity of the spec (microseconds since the epoch).
    buckets: [i64; MAX_GRANULARITIES],
    /// Range of the packed dimension values in the arena.
    dims: std::ops::Range<usize>,
    /// Everything but the sketch, which [`Fold::finish`] builds from `bins`.
    measures: Measures,
    /// Latency bin index of every event with one (see [`Sketch::from_bins`]).
    bins: Vec<i32>,
    /// Latencies in the zero bin.
    zero: u64,
}

/// A spec lists each of the four granularities at most once.
const MAX_GRANULARITIES: usize = 4;

/// Appends dimension values as (u32 length, bytes) pairs: unambiguous whatever
/// characters the values hold.
fn pack(out: &mut Vec<u8>, value: &str) {
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// The values [`pack`] wrote, in order.
fn unpack(mut bytes: &[u8]) -> Vec<Cow<'_, str>> {
    let mut out = Vec::new();
    while let Some((len, rest)) = bytes.split_first_chunk::<4>() {
        let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
        let (value, rest) = rest.split_at(len);
        // Packed from `&str`s, so always UTF-8.
        out.push(String::from_utf8_lossy(value));
        bytes = rest;
    }
    out
}

/// Bucket start in microseconds. UTC takes arithmetic and, for months, a
/// one-entry cache keyed by the day (events arrive roughly in time order);
/// other zones [`bucket_start`] itself.
fn bucket_us(
    ts: DateTime<Utc>,
    g: Granularity,
    tz: Tz,
    month_of_day: &mut Option<(i64, i64)>,
) -> i64 {
    if tz != Tz::UTC {
        return bucket_start(ts, g, tz).timestamp_micros();
    }
    if g != Granularity::Month {
        return bucket_start(ts, g, Tz::UTC).timestamp_micros();
    }
    let day = bucket_start(ts, Granularity::Day, Tz::UTC).timestamp_micros();
    match *month_of_day {
        Some((d, m)) if d == day => m,
        _ => {
            let m = bucket_start(ts, Granularity::Month, Tz::UTC).timestamp_micros();
            *month_of_day = Some((day, m));
            m
        }
    }
}

impl Fold {
    /// An empty fold for `spec`, bounded by its horizons at this instant.
    pub fn new(spec: &Spec) -> Self {
        Self::at(spec, Utc::now())
    }

    /// An empty fold for `spec` whose horizons ([`Spec::fold_horizon`]) are those at `now`.
    pub fn at(spec: &Spec, now: DateTime<Utc>) -> Self {
        let granularities: Vec<Granularity> = spec
            .granularities
            .iter()
            .copied()
            .take(MAX_GRANULARITIES)
            .collect();
        let mut horizon = [i64::MIN; MAX_GRANULARITIES];
        for (slot, &g) in horizon.iter_mut().zip(&granularities) {
            if let Some(h) = spec.fold_horizon(g, now) {
                *slot = h.timestamp_micros();
            }
        }
        let all_bounded = horizon
            .iter()
            .take(granularities.len())
            .all(|&h| h != i64::MIN);
        Fold {
            horizon,
            all_bounded,
            dimensions: spec.dimensions.clone(),
            granularities,
            timezone: spec.timezone,
            index: hashbrown::HashTable::new(),
            rows: Vec::new(),
            arena: Vec::new(),
            key: Vec::new(),
            month_of_day: None,
            hasher: SeededFx::default(),
            events: 0,
        }
    }

    /// Folds one event, costed `charge` (see [`Catalog::charge`]).
    ///
    /// [`Catalog::charge`]: crate::aggregate::price::Catalog::charge
    pub fn add(&mut self, e: &Event, charge: Charge) {
        self.add_binned(e, e.latency_ms.map(Bin::of), charge);
    }

    /// [`Fold::add`] with the event's latency bin computed by the caller
    /// (once per event for all projections of a group).
    pub fn add_binned(&mut self, e: &Event, bin: Option<Bin>, charge: Charge) {
        let mut buckets = [0i64; MAX_GRANULARITIES];
        for (slot, &g) in buckets.iter_mut().zip(&self.granularities) {
            *slot = bucket_us(e.ts, g, self.timezone, &mut self.month_of_day);
        }
        let n = self.granularities.len();
        if self.all_bounded
            && buckets[..n]
                .iter()
                .zip(&self.horizon[..n])
                .all(|(b, h)| b < h)
        {
            // Past every table's horizon (a minute-only spec): counted, no row.
            self.events += 1;
            return;
        }
        self.key.clear();
        for &d in &self.dimensions {
            pack(&mut self.key, &dimension_str(e, d));
        }
        let mut h = std::hash::BuildHasher::build_hasher(&self.hasher);
        h.write(&self.key);
        for b in buckets {
            h.write_i64(b);
        }
        let hash = h.finish();
        let Fold {
            index,
            rows,
            arena,
            key,
            ..
        } = self;
        let found = index
            .find(hash, |&i| {
                let r = &rows[i];
                r.hash == hash && r.buckets == buckets && arena[r.dims.clone()] == key[..]
            })
            .copied();
        let i = match found {
            Some(i) => i,
            None => {
                let start = arena.len();
                arena.extend_from_slice(key);
                rows.push(FineRow {
                    hash,
                    buckets,
                    dims: start..arena.len(),
                    measures: Measures::default(),
                    bins: Vec::new(),
                    zero: 0,
                });
                let i = rows.len() - 1;
                index.insert_unique(hash, i, |&j| rows[j].hash);
                i
            }
        };
        let row = &mut rows[i];
        row.measures.add_event_binned(e, None, charge);
        if e.latency_ms.is_some() {
            match bin {
                Some(Bin::Index(b)) => row.bins.push(b),
                Some(Bin::Zero) => row.zero += 1,
                Some(Bin::Ignored) | None => {}
            }
        }
        self.events += 1;
    }

    /// Upper bound of the rows [`Fold::finish`] gives (one per granularity per fine row).
    pub fn rows(&self) -> usize {
        self.rows.len() * self.granularities.len()
    }

    /// Events folded so far.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Rolls the fine rows up into one table per granularity.
    pub fn finish(self) -> Delta {
        let mut tables: Vec<(Granularity, Rows)> = self
            .granularities
            .iter()
            .map(|&g| (g, Rows::default()))
            .collect();
        let last = tables.len().saturating_sub(1);
        for mut row in self.rows {
            let dims = unpack(&self.arena[row.dims.clone()]);
            row.measures.sketch = Sketch::from_bins(row.zero, &mut row.bins);
            drop(std::mem::take(&mut row.bins));
            let mut measures = Some(row.measures);
            for (j, (_, table)) in tables.iter_mut().enumerate() {
                if row.buckets[j] < self.horizon[j] {
                    continue;
                }
                let bucket = DateTime::from_timestamp_micros(row.buckets[j]).unwrap_or_default();
                let m = if j == last {
                    measures.take().unwrap_or_default()
                } else {
                    measures.clone().unwrap_or_default()
                };
                let view = RowKeyRef {
                    bucket,
                    dims: &dims,
                };
                match table.get_mut(&view) {
                    Some(existing) => existing.merge(&m),
                    None => {
                        let key = RowKey {
                            bucket,
                            dims: dims.iter().map(|d| d.to_string()).collect(),
                        };
                        table.insert(key, m);
                    }
                }
            }
        }
        Delta {
            tables,
            events: self.events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::measures::dimension_value;
    use crate::event::ErrorType;
    use proptest::prelude::*;

    fn spec(dimensions: &str, granularities: &str, tz: &str) -> Spec {
        Spec::parse(
            &format!(
                "name = \"t\"\ndimensions = [{dimensions}]\ngranularities = [{granularities}]\ntimezone = \"{tz}\"\n"
            ),
            None,
        )
        .expect("valid spec")
    }

    /// A latency whose sketch bin is represented by a value above it, found
    /// rather than hard-coded so the test keeps meaning something if α changes.
    fn latency_binned_high() -> f64 {
        (0..10_000)
            .map(|i| 2_000.0 + f64::from(i) * 0.1)
            .find(|&v| {
                let mut s = Sketch::default();
                s.add(v);
                s.quantile(0.99).is_some_and(|q| q > v)
            })
            .expect("some latency is binned above itself")
    }

    /// Two batches' deltas merged equal one fold of both batches (what a
    /// coarse tier commits after holding its rows over several steps).
    #[test]
    fn merged_deltas_equal_one_fold_of_both_batches() {
        let spec = spec(
            "\"api\", \"key\", \"model\"",
            "\"day\", \"month\"",
            "Europe/Berlin",
        );
        let events: Vec<Event> = (0..400)
            .map(|i| {
                event(
                    1_700_000_000 + i * 977,
                    (i % 7) as u8,
                    (i % 3) as u8,
                    (i % 4 != 0).then_some(i as f64 * 1.5),
                    i % 5 == 0,
                )
            })
            .collect();
        let fold_of = |events: &[Event]| {
            let mut f = Fold::new(&spec);
            for e in events {
                f.add(e, charge(e));
            }
            f.finish()
        };
        let whole = fold_of(&events);
        let mut merged = fold_of(&events[..150]);
        merged.merge(fold_of(&events[150..]));
        assert_eq!(merged.events, whole.events);
        assert_eq!(merged.tables.len(), whole.tables.len());
        for ((g, rows), (wg, wrows)) in merged.tables.iter().zip(&whole.tables) {
            assert_eq!(g, wg);
            let sorted = |r: &Rows| {
                let mut v: Vec<(RowKey, Measures)> =
                    r.iter().map(|(k, m)| (k.clone(), m.clone())).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            };
            assert_eq!(sorted(rows), sorted(wrows), "{g:?}");
        }
    }

    #[test]
    fn minute_rows_past_the_retention_and_its_margin_are_not_folded() {
        let now = DateTime::parse_from_rfc3339("2026-12-07T12:00:30Z")
            .expect("t")
            .with_timezone(&Utc);
        let at = |days_ago: i64| (now - chrono::Duration::days(days_ago)).timestamp();
        let both = Spec::parse(
            "name = \"t\"\ndimensions = [\"key\"]\ngranularities = [\"minute\", \"hour\"]\ntimezone = \"UTC\"\nretention = { minute = \"8d\" }\n",
            None,
        )
        .expect("spec");
        let only = Spec::parse(
            "name = \"m\"\ndimensions = [\"key\"]\ngranularities = [\"minute\"]\ntimezone = \"UTC\"\nretention = { minute = \"8d\" }\n",
            None,
        )
        .expect("spec");
        // 8 days of retention and a day of margin: 9 days back is the horizon.
        let events: Vec<Event> = [1, 8, 9, 10, 30]
            .iter()
            .map(|&d| event(at(d) - 60, 1, 1, Some(5.0), false))
            .collect();
        for (spec, minute_rows, hour_rows) in [(&both, 2, 5), (&only, 2, 0)] {
            let mut fold = Fold::at(spec, now);
            for e in &events {
                fold.add(e, charge(e));
            }
            assert_eq!(fold.events(), 5, "every event is counted");
            let delta = fold.finish();
            let rows = |g: Granularity| {
                delta
                    .tables
                    .iter()
                    .find(|(t, _)| *t == g)
                    .map_or(0, |(_, r)| r.len())
            };
            assert_eq!(rows(Granularity::Minute), minute_rows, "{}", spec.name);
            assert_eq!(rows(Granularity::Hour), hour_rows, "{}", spec.name);
        }
        // Without a retention every minute row is kept.
        let mut fold = Fold::at(&spec("\"key\"", "\"minute\"", "UTC"), now);
        for e in &events {
            fold.add(e, charge(e));
        }
        assert_eq!(fold.finish().tables[0].1.len(), 5);
    }

    #[test]
    fn percentiles_stay_within_the_observed_min_and_max() {
        let high = latency_binned_high();
        let mut m = Measures::default();
        m.add_event(&event(0, 1, 1, Some(high), false), Charge::Unpriced);
        let [p50, p99] = m.latency_quantiles([0.5, 0.99]);
        assert!(
            m.sketch.quantile(0.99).is_some_and(|q| q > high),
            "raw sketch is above max"
        );
        assert_eq!(p99, Some(high));
        assert_eq!(p50, Some(high));
        assert_eq!(m.latency_quantile(0.95), Some(high));
        // Several values: every percentile within [min, max].
        let mut m = Measures::default();
        for (i, v) in [high, 12.5, 300.0, 47.25].into_iter().enumerate() {
            m.add_event(&event(i as i64, 1, 1, Some(v), false), Charge::Unpriced);
        }
        for q in [0.0, 0.01, 0.5, 0.95, 0.99, 1.0] {
            let v = m.latency_quantile(q).expect("latencies");
            assert!((12.5..=high).contains(&v), "q{q} = {v}");
        }
    }

    fn event(ts_s: i64, key: u8, model: u8, latency: Option<f64>, error: bool) -> Event {
        let text = |v: String| (!v.is_empty()).then_some(v);
        Event {
            id: format!("e{ts_s}-{key}"),
            ts: DateTime::from_timestamp(ts_s, 0).expect("in range"),
            api: format!("api{}", key % 3),
            endpoint: None,
            method: Some("POST".into()),
            // Values that would collide if packed with a separator.
            key: text(["", "a", "a\u{0}", "\u{0}a", "b|c"][usize::from(key % 5)].to_string()),
            user: Some(format!("u{key}")),
            model: text(format!("m{}", model % 2)),
            status: Some(if error { 429 } else { 200 }),
            success: !error,
            error_type: error.then_some(ErrorType::ALL[usize::from(key) % 5]),
            error_message: None,
            latency_ms: latency,
            request_bytes: Some(i64::from(key)),
            response_bytes: None,
            tokens_in: Some(7),
            tokens_out: Some(i64::from(model)),
            cost_nanos: Some(1_000_000_001),
            cached: key.is_multiple_of(2),
            metadata: Default::default(),
        }
    }

    /// Sent costs for some events, and catalog costs or none for the rest,
    /// so every measure of the cost rule is exercised.
    fn charge(e: &Event) -> Charge {
        match e.ts.timestamp() % 3 {
            0 => Charge::Sent(e.cost_nanos.unwrap_or(0)),
            1 => Charge::Catalog(e.tokens_in.unwrap_or(0) * 7),
            _ => Charge::Unpriced,
        }
    }

    /// The fold as first written: every event into every granularity table.
    fn naive(
        spec: &Spec,
        events: &[Event],
    ) -> Vec<(Granularity, std::collections::BTreeMap<RowKey, Measures>)> {
        spec.granularities
            .iter()
            .map(|&g| {
                let mut rows = std::collections::BTreeMap::<RowKey, Measures>::new();
                for e in events {
                    let key = RowKey {
                        bucket: bucket_start(e.ts, g, spec.timezone),
                        dims: spec
                            .dimensions
                            .iter()
                            .map(|&d| dimension_value(e, d))
                            .collect(),
                    };
                    rows.entry(key).or_default().add_event(e, charge(e));
                }
                (g, rows)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn fold_equals_a_per_event_fold_in_any_zone(
            raw in proptest::collection::vec(
                (0i64..400 * 86_400, any::<u8>(), any::<u8>(), proptest::option::of(0.0f64..5_000.0), any::<bool>()),
                1..300,
            ),
            zone in 0usize..5,
            shape in 0usize..3,
        ) {
            // Around 2026-03-29 (Berlin spring forward) and 2026-11-01 (New York fall back).
            let base = 1_772_000_000i64;
            let events: Vec<Event> = raw
                .iter()
                .map(|&(t, k, m, l, err)| event(base + t / 97, k, m, l, err))
                .collect();
            let tz = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"][zone];
            let (dims, grans) = [
                ("\"api\", \"key\", \"model\"", "\"hour\", \"day\", \"month\""),
                ("\"user\", \"api\"", "\"day\", \"month\""),
                ("\"key\", \"status\", \"error_type\", \"cached\"", "\"minute\", \"hour\""),
            ][shape];
            let spec = spec(dims, grans, tz);
            let mut fold = Fold::new(&spec);
            events.iter().for_each(|e| fold.add(e, charge(e)));
            prop_assert_eq!(fold.events(), events.len());
            let delta = fold.finish();
            let expected = naive(&spec, &events);
            prop_assert_eq!(delta.tables.len(), expected.len());
            for ((g, got), (eg, want)) in delta.tables.iter().zip(&expected) {
                prop_assert_eq!(g, eg);
                let got: std::collections::BTreeMap<RowKey, Measures> =
                    got.iter().map(|(k, m)| (k.clone(), m.clone())).collect();
                prop_assert_eq!(&got, want);
            }
        }
    }

    #[test]
    fn packed_values_round_trip_whatever_they_contain() {
        let values = ["", "a", "\u{0}\u{0}\u{0}\u{0}", "é€😀", "x\u{1f}y"];
        let mut buf = Vec::new();
        values.iter().for_each(|v| pack(&mut buf, v));
        let back: Vec<String> = unpack(&buf).into_iter().map(Cow::into_owned).collect();
        assert_eq!(back, values);
    }
}
