//! The measures of an aggregate row, the key that names a row, and a
//! [`Delta`]: the rows a batch of events adds to a projection's tables.
//! Produced by the projector's fold, written by the store, read by queries
//! and alerts.

use std::borrow::Cow;
use std::hash::Hasher;

use chrono::{DateTime, Utc};

use super::price::Charge;
use super::sketch::{Bin, Sketch};
use super::spec::{Dimension, Granularity};
use crate::event::{ErrorType, Event};

/// The value an event has for a dimension, as stored: absent values are `''`.
pub fn dimension_value(e: &Event, d: Dimension) -> String {
    dimension_str(e, d).into_owned()
}

/// [`dimension_value`] without copying: only `status` is formatted.
pub fn dimension_str(e: &Event, d: Dimension) -> Cow<'_, str> {
    fn text(v: &Option<String>) -> Cow<'_, str> {
        Cow::Borrowed(v.as_deref().unwrap_or(""))
    }
    match d {
        Dimension::Api => Cow::Borrowed(e.api.as_str()),
        Dimension::Endpoint => text(&e.endpoint),
        Dimension::Method => text(&e.method),
        Dimension::Key => text(&e.key),
        Dimension::User => text(&e.user),
        Dimension::Model => text(&e.model),
        Dimension::Status => e
            .status
            .map_or(Cow::Borrowed(""), |s| Cow::Owned(s.to_string())),
        Dimension::ErrorType => Cow::Borrowed(e.error_type.map_or("", |t| t.as_str())),
        Dimension::Cached => Cow::Borrowed(if e.cached { "true" } else { "false" }),
    }
}

/// Latency in whole microseconds, as summed in `latency_sum_us` (half away from zero).
pub fn latency_us(ms: f64) -> i64 {
    (ms * 1000.0).round() as i64
}

/// The measures of one aggregate row. Integer sums are exact (saturating at
/// `i64::MAX`, far beyond any real month).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measures {
    /// Events.
    pub requests: i64,
    /// Events with `success = true`.
    pub successes: i64,
    /// Events with `success = false`.
    pub errors: i64,
    /// Errors per type, in [`ErrorType::ALL`] order.
    pub errors_by_type: [i64; 5],
    /// Events served from a cache.
    pub cache_hits: i64,
    /// Events that carried a latency.
    pub latency_count: i64,
    /// Sum of latencies in microseconds.
    pub latency_sum_us: i64,
    /// Smallest latency (ms), `None` when no event carried one.
    pub latency_min_ms: Option<f64>,
    /// Largest latency (ms).
    pub latency_max_ms: Option<f64>,
    /// Latency distribution.
    pub sketch: Sketch,
    /// Sum of request bytes.
    pub request_bytes: i64,
    /// Sum of response bytes.
    pub response_bytes: i64,
    /// Sum of input tokens.
    pub tokens_in: i64,
    /// Sum of output tokens.
    pub tokens_out: i64,
    /// Sum of cost in nano-units (sent by the emitter or from the catalog).
    pub cost_nanos: i64,
    /// The part of `cost_nanos` computed from the price catalog.
    pub cost_from_catalog_nanos: i64,
    /// Events with neither a `cost` nor a price in effect (counted at cost 0).
    pub unpriced: i64,
}

impl Measures {
    /// Counts one event, whose cost the catalog's rule found to be `charge`.
    pub fn add_event(&mut self, e: &Event, charge: Charge) {
        self.add_event_binned(e, e.latency_ms.map(Bin::of), charge);
    }

    /// Counts one event whose latency bin was computed already (`None`: the
    /// caller sketches the latency itself, as [`Fold`] does).
    pub fn add_event_binned(&mut self, e: &Event, bin: Option<Bin>, charge: Charge) {
        let add = |a: &mut i64, b: i64| *a = a.saturating_add(b);
        add(&mut self.requests, 1);
        if e.success {
            add(&mut self.successes, 1);
        } else {
            add(&mut self.errors, 1);
        }
        if let Some(t) = e.error_type {
            let i = ErrorType::ALL.iter().position(|x| *x == t).unwrap_or(4);
            add(&mut self.errors_by_type[i], 1);
        }
        if e.cached {
            add(&mut self.cache_hits, 1);
        }
        if let Some(ms) = e.latency_ms {
            add(&mut self.latency_count, 1);
            add(&mut self.latency_sum_us, latency_us(ms));
            self.latency_min_ms = Some(self.latency_min_ms.map_or(ms, |m| m.min(ms)));
            self.latency_max_ms = Some(self.latency_max_ms.map_or(ms, |m| m.max(ms)));
            if let Some(bin) = bin {
                self.sketch.add_bin(bin);
            }
        }
        add(&mut self.request_bytes, e.request_bytes.unwrap_or(0));
        add(&mut self.response_bytes, e.response_bytes.unwrap_or(0));
        add(&mut self.tokens_in, e.tokens_in.unwrap_or(0));
        add(&mut self.tokens_out, e.tokens_out.unwrap_or(0));
        match charge {
            Charge::Sent(n) => add(&mut self.cost_nanos, n),
            Charge::Catalog(n) => {
                add(&mut self.cost_nanos, n);
                add(&mut self.cost_from_catalog_nanos, n);
            }
            Charge::Unpriced => add(&mut self.unpriced, 1),
        }
    }

    /// Adds another row's measures (what an upsert does in SQL).
    pub fn merge(&mut self, o: &Measures) {
        self.merge_sums(o);
        self.sketch.merge(&o.sketch);
    }

    /// [`Measures::merge`] without the latency sketch (left as it is): what
    /// a read that sums integers only returns.
    pub fn merge_sums(&mut self, o: &Measures) {
        let add = |a: &mut i64, b: i64| *a = a.saturating_add(b);
        add(&mut self.requests, o.requests);
        add(&mut self.successes, o.successes);
        add(&mut self.errors, o.errors);
        for (a, b) in self.errors_by_type.iter_mut().zip(o.errors_by_type) {
            add(a, b);
        }
        add(&mut self.cache_hits, o.cache_hits);
        add(&mut self.latency_count, o.latency_count);
        add(&mut self.latency_sum_us, o.latency_sum_us);
        self.latency_min_ms = min_opt(self.latency_min_ms, o.latency_min_ms, f64::min);
        self.latency_max_ms = min_opt(self.latency_max_ms, o.latency_max_ms, f64::max);
        add(&mut self.request_bytes, o.request_bytes);
        add(&mut self.response_bytes, o.response_bytes);
        add(&mut self.tokens_in, o.tokens_in);
        add(&mut self.tokens_out, o.tokens_out);
        add(&mut self.cost_nanos, o.cost_nanos);
        add(&mut self.cost_from_catalog_nanos, o.cost_from_catalog_nanos);
        add(&mut self.unpriced, o.unpriced);
    }

    /// Estimated latency quantile in ms (see [`super::sketch`] for the error
    /// bound), within the observed `[min, max]`.
    pub fn latency_quantile(&self, q: f64) -> Option<f64> {
        let [v] = self.latency_quantiles([q]);
        v
    }

    /// [`Measures::latency_quantile`] of several ascending `qs` in one pass.
    ///
    /// A sketch answers a bin's representative value, which can lie up to α
    /// beyond the largest (or below the smallest) latency seen; clamping to
    /// the exact min and max keeps every answer inside the observed range and
    /// only moves it closer to the true quantile.
    pub fn latency_quantiles<const N: usize>(&self, qs: [f64; N]) -> [Option<f64>; N] {
        self.sketch.quantiles(qs).map(|v| {
            v.map(|v| {
                let v = self.latency_min_ms.map_or(v, |min| v.max(min));
                self.latency_max_ms.map_or(v, |max| v.min(max))
            })
        })
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Identifies an aggregate row within one table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    /// Start of the bucket.
    pub bucket: DateTime<Utc>,
    /// Dimension values in the spec's order.
    pub dims: Vec<String>,
}

/// A [`RowKey`] borrowed from an event, to look a row up without allocating.
/// Hashes exactly as the `RowKey` it equals (bucket, then the dimension
/// values as a slice of strings), as [`hashbrown::Equivalent`] requires.
#[derive(Hash)]
pub(crate) struct RowKeyRef<'a> {
    pub(crate) bucket: DateTime<Utc>,
    pub(crate) dims: &'a [Cow<'a, str>],
}

impl hashbrown::Equivalent<RowKey> for RowKeyRef<'_> {
    fn equivalent(&self, key: &RowKey) -> bool {
        self.bucket == key.bucket
            && self.dims.len() == key.dims.len()
            && self.dims.iter().zip(&key.dims).all(|(a, b)| **a == **b)
    }
}

/// FxHash (rustc's hasher), because SipHash was a visible share of the fold.
/// The keys are event fields, so a sender could aim collisions at it: the
/// hasher is seeded per process ([`SeededFx`]), and a delta is capped at
/// 60,000 rows per transaction, which bounds what a collision flood can cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`FxHasher`]s starting from a per-process random seed.
#[derive(Debug, Clone, Copy)]
pub struct SeededFx(u64);

impl Default for SeededFx {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        SeededFx(*SEED.get_or_init(rand::random))
    }
}

impl std::hash::BuildHasher for SeededFx {
    type Hasher = FxHasher;

    fn build_hasher(&self) -> FxHasher {
        FxHasher(self.0)
    }
}

/// The rows of one granularity table in a delta. hashbrown's map, for
/// lookups by a borrowed [`RowKeyRef`]: a row already in the delta (most
/// events) costs no allocation.
pub type Rows = hashbrown::HashMap<RowKey, Measures, SeededFx>;

/// The rows a batch of events adds to each granularity table of a projection:
/// what the store writes. Built by [`Fold::finish`].
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// One map per granularity of the spec, in the spec's order.
    pub tables: Vec<(Granularity, Rows)>,
    /// Events folded.
    pub events: usize,
}

impl Delta {
    /// Rows across all tables (what one apply writes).
    pub fn rows(&self) -> usize {
        self.tables.iter().map(|(_, r)| r.len()).sum()
    }

    /// Adds `other`'s rows to these (the rows of two cursor slices, one after
    /// the other, as one delta): what applying both would add.
    pub fn merge(&mut self, other: Delta) {
        self.events += other.events;
        for (g, rows) in other.tables {
            let Some(i) = self.tables.iter().position(|(t, _)| *t == g) else {
                self.tables.push((g, rows));
                continue;
            };
            let mine = &mut self.tables[i].1;
            if mine.is_empty() {
                *mine = rows;
                continue;
            }
            for (key, m) in rows {
                match mine.get_mut(&key) {
                    Some(row) => row.merge(&m),
                    None => {
                        mine.insert(key, m);
                    }
                }
            }
        }
    }
}
