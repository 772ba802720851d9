//! A mergeable latency sketch with a guaranteed relative error.
//!
//! The sketch of DDSketch (Masson, Rim & Lee, VLDB 2019): a positive value `x`
//! is counted in bin `i = ceil(ln x / ln γ)` with `γ = (1 + α) / (1 − α)`, and
//! a bin is read back as `2γ^i / (γ + 1)`, which is within `α` of every value
//! in it. Quantiles walk the bins to the nearest rank, so the estimate of the
//! q-quantile is within a relative `α` of the exact nearest-rank quantile.
//! Merging adds bin counts, so hourly sketches merge into days and months
//! exactly as if the events had been sketched together.
//!
//! `α` = [`RELATIVE_ERROR`] = 0.8%, under the 1% Tally promises. Latencies
//! below 1 µs are counted as 0. Encoded size: a version byte, the zero count,
//! then (bin delta, count) varint pairs: a few bytes per occupied bin.

/// The relative error bound of every quantile estimate.
pub const RELATIVE_ERROR: f64 = 0.008;

/// Values below this (milliseconds) are counted in the zero bin.
pub const MIN_VALUE_MS: f64 = 0.001;

const VERSION: u8 = 1;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR)
}

/// Latency distribution of a group of events.
///
/// Bins are a sorted `Vec` rather than a map: most aggregate rows hold a
/// handful of bins, and a delta holds tens of thousands of rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    zero: u64,
    /// (bin index, count), sorted by index, no zero counts.
    bins: Vec<(i32, u64)>,
}

/// Where a value goes in a sketch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    /// Negative or non-finite: impossible after validation, not counted.
    Ignored,
    /// Below [`MIN_VALUE_MS`]: counted as 0.
    Zero,
    /// A logarithmic bin.
    Index(i32),
}

impl Bin {
    /// The bin of a latency in milliseconds.
    pub fn of(ms: f64) -> Self {
        if !ms.is_finite() || ms < 0.0 {
            Bin::Ignored
        } else if ms < MIN_VALUE_MS {
            Bin::Zero
        } else {
            // ln(f64::MAX)/ln(γ) ≈ 44,000: always fits.
            Bin::Index((ms.ln() / gamma().ln()).ceil() as i32)
        }
    }
}

/// A stored sketch that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("latency sketch is corrupt: {0}")]
pub struct SketchError(&'static str);

impl Sketch {
    /// Counts one latency in milliseconds. Negative and non-finite values are
    /// impossible here (validation refuses them) and are ignored.
    pub fn add(&mut self, ms: f64) {
        self.add_bin(Bin::of(ms));
    }

    /// Counts one value whose bin was computed already (one `ln` per event,
    /// however many rows it lands in).
    pub fn add_bin(&mut self, bin: Bin) {
        match bin {
            Bin::Ignored => {}
            Bin::Zero => self.zero += 1,
            Bin::Index(i) => self.add_to_bin(i, 1),
        }
    }

    /// A sketch of `zero` values below [`MIN_VALUE_MS`] and one value per bin
    /// index in `bins` (any order; sorted here). Folding collects indices and
    /// sketches them once per row: appending is O(1) where a sorted insert per
    /// value is a search and, for a new bin, a shift.
    pub fn from_bins(zero: u64, bins: &mut [i32]) -> Self {
        bins.sort_unstable();
        let mut out: Vec<(i32, u64)> = Vec::new();
        for &i in bins.iter() {
            match out.last_mut() {
                Some((last, c)) if *last == i => *c += 1,
                _ => out.push((i, 1)),
            }
        }
        Sketch { zero, bins: out }
    }

    fn add_to_bin(&mut self, index: i32, count: u64) {
        match self.bins.binary_search_by_key(&index, |&(i, _)| i) {
            Ok(pos) => self.bins[pos].1 += count,
            Err(pos) => self.bins.insert(pos, (index, count)),
        }
    }

    /// Adds every count of `other`, in place: no allocation unless the bins
    /// grow (queries merge thousands of rows per answer).
    pub fn merge(&mut self, other: &Sketch) {
        self.zero += other.zero;
        if other.bins.is_empty() {
            return;
        }
        if self.bins.is_empty() {
            self.bins.clone_from(&other.bins);
            return;
        }
        // Pass 1: how many of `other`'s bins are new here.
        let mut missing = 0;
        let mut j = 0;
        for &(i, _) in &other.bins {
            while j < self.bins.len() && self.bins[j].0 < i {
                j += 1;
            }
            if j == self.bins.len() || self.bins[j].0 != i {
                missing += 1;
            }
        }
        if missing == 0 {
            // Every bin exists: add (the common case for a running total).
            let mut j = 0;
            for &(i, c) in &other.bins {
                while self.bins[j].0 < i {
                    j += 1;
                }
                self.bins[j].1 += c;
            }
            return;
        }
        // Pass 2: merge from the back into the grown vector.
        let old = self.bins.len();
        self.bins.resize(old + missing, (0, 0));
        let (mut a, mut b, mut w) = (old, other.bins.len(), old + missing);
        while b > 0 {
            w -= 1;
            let (bi, bc) = other.bins[b - 1];
            if a > 0 && self.bins[a - 1].0 > bi {
                self.bins[w] = self.bins[a - 1];
                a -= 1;
            } else if a > 0 && self.bins[a - 1].0 == bi {
                self.bins[w] = (bi, self.bins[a - 1].1 + bc);
                a -= 1;
                b -= 1;
            } else {
                self.bins[w] = (bi, bc);
                b -= 1;
            }
        }
    }

    /// Number of values counted.
    pub fn count(&self) -> u64 {
        self.zero + self.bins.iter().map(|&(_, c)| c).sum::<u64>()
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Estimate of the nearest-rank `q`-quantile (`q` in 0..=1): the value of
    /// rank `ceil(q·n)` (at least 1) in sorted order, within [`RELATIVE_ERROR`].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        if rank <= self.zero {
            return Some(0.0);
        }
        let mut seen = self.zero;
        let g = gamma();
        for &(i, c) in &self.bins {
            seen += c;
            if seen >= rank {
                return Some(2.0 * g.powi(i) / (g + 1.0));
            }
        }
        None
    }

    /// [`Sketch::quantile`] of several ascending `qs` in one pass over the bins.
    pub fn quantiles<const N: usize>(&self, qs: [f64; N]) -> [Option<f64>; N] {
        let mut out = [None; N];
        let n = self.count();
        if n == 0 {
            return out;
        }
        let g = gamma();
        let mut seen = self.zero;
        let mut current = None;
        let mut bins = self.bins.iter();
        for (slot, q) in out.iter_mut().zip(qs) {
            let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
            if rank <= self.zero {
                *slot = Some(0.0);
                continue;
            }
            while seen < rank {
                let Some(&(i, c)) = bins.next() else { break };
                seen += c;
                current = Some(2.0 * g.powi(i) / (g + 1.0));
            }
            if seen >= rank {
                *slot = current;
            }
        }
        out
    }

    /// The storage form (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.bins.len() * 3);
        out.push(VERSION);
        put_varint(&mut out, self.zero);
        let mut prev: i64 = 0;
        for &(i, c) in &self.bins {
            let delta = i64::from(i) - prev;
            prev = i64::from(i);
            put_varint(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
            put_varint(&mut out, c);
        }
        out
    }

    /// Reads [`Sketch::encode`]'s output. Empty input is an empty sketch.
    pub fn decode(bytes: &[u8]) -> Result<Self, SketchError> {
        let Some((&version, mut rest)) = bytes.split_first() else {
            return Ok(Sketch::default());
        };
        if version != VERSION {
            return Err(SketchError("unknown version"));
        }
        let zero = get_varint(&mut rest)?;
        let mut sketch = Sketch {
            zero,
            // At least two bytes per bin.
            bins: Vec::with_capacity(rest.len() / 2),
        };
        let mut prev: i64 = 0;
        while !rest.is_empty() {
            let z = get_varint(&mut rest)?;
            let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
            prev += delta;
            let index = i32::try_from(prev).map_err(|_| SketchError("bin out of range"))?;
            let count = get_varint(&mut rest)?;
            if count > 0 {
                // Encoded bins ascend: append, unless the input is unusual.
                match sketch.bins.last() {
                    Some(&(last, _)) if last >= index => sketch.add_to_bin(index, count),
                    _ => sketch.bins.push((index, count)),
                }
            }
        }
        Ok(sketch)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &mut &[u8]) -> Result<u64, SketchError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first().ok_or(SketchError("truncated"))?;
        *input = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(SketchError("varint too long"))
}

/// The exact nearest-rank quantile of `values` (sorted in place), for tests and
/// reconciliation.
pub fn exact_quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_sketch_from_collected_bins_equals_one_added_to_value_by_value(
            values in proptest::collection::vec(0.0f64..120_000.0, 0..400),
        ) {
            let mut added = Sketch::default();
            values.iter().for_each(|&v| added.add(v));
            let mut zero = 0;
            let mut bins = Vec::new();
            for &v in &values {
                match Bin::of(v) {
                    Bin::Index(i) => bins.push(i),
                    Bin::Zero => zero += 1,
                    Bin::Ignored => {}
                }
            }
            prop_assert_eq!(Sketch::from_bins(zero, &mut bins), added);
        }

        #[test]
        fn quantiles_are_within_the_relative_error(
            values in proptest::collection::vec(0.0f64..120_000.0, 1..400),
            split in 0usize..400,
        ) {
            let split = split.min(values.len());
            let (mut a, mut b) = (Sketch::default(), Sketch::default());
            values[..split].iter().for_each(|&v| a.add(v));
            values[split..].iter().for_each(|&v| b.add(v));
            a.merge(&b);
            let decoded = Sketch::decode(&a.encode()).expect("round trip");
            prop_assert_eq!(&decoded, &a);
            let mut sorted = values.clone();
            for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
                let exact = exact_quantile(&mut sorted, q).expect("non-empty");
                let est = decoded.quantile(q).expect("non-empty");
                if exact < MIN_VALUE_MS {
                    prop_assert_eq!(est, 0.0);
                } else {
                    prop_assert!((est - exact).abs() <= RELATIVE_ERROR * exact * (1.0 + 1e-9),
                        "q={} exact={} est={}", q, exact, est);
                }
            }
        }
    }

    proptest! {
        /// Merging parts, in place or not, equals one sketch of every value.
        #[test]
        fn merging_parts_equals_the_whole(
            values in proptest::collection::vec(0.0f64..5_000.0, 1..300),
            parts in 1usize..12,
        ) {
            let mut whole = Sketch::default();
            values.iter().for_each(|&v| whole.add(v));
            let mut total = Sketch::default();
            for chunk in values.chunks(values.len().div_ceil(parts)) {
                let mut part = Sketch::default();
                chunk.iter().for_each(|&v| part.add(v));
                total.merge(&part);
                // Merging the same part again and once more takes the in-place path.
                let mut twice = total.clone();
                twice.merge(&part);
                prop_assert_eq!(twice.count(), total.count() + part.count());
            }
            prop_assert_eq!(&total, &whole);
            let qs = [0.0, 0.5, 0.95, 0.99, 1.0];
            prop_assert_eq!(total.quantiles(qs), qs.map(|q| total.quantile(q)));
        }
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        assert!(Sketch::decode(&[9]).is_err());
        assert!(Sketch::decode(&[1, 0x80]).is_err());
        assert!(Sketch::decode(&[]).expect("empty").is_empty());
    }
}
