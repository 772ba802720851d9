//! The oracle for projection tests: aggregate tables must equal a fold written
//! independently here from the events the test itself appended.
//!
//! The oracle shares no code with `tally::projection`: its own dimension
//! values, its own bucket arithmetic (offset-shifted truncation for hours, a
//! minute scan for local midnights) and exact nearest-rank percentiles.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Datelike, Duration, DurationRound, NaiveDate, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use tally::aggregate::sketch::RELATIVE_ERROR;
use tally::aggregate::spec::{load_dir, Granularity, Spec};
use tally::event::{ErrorType, Event};
use tally::projection::Projector;
use tally::store::{Origin, Store};

pub const PROJECTIONS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections");

/// The shipped specs.
pub fn shipped() -> Vec<Spec> {
    load_dir(std::path::Path::new(PROJECTIONS_DIR)).expect("shipped specs load")
}

/// Extra specs that exercise timezones, every dimension and zero dimensions.
pub fn tz_specs() -> Vec<Spec> {
    [
        "name='tz_new_york'\ndimensions=['api','key']\ngranularities=['hour','day','month']\ntimezone='America/New_York'",
        "name='tz_berlin'\ndimensions=['model','status','error_type','cached']\ngranularities=['hour','day','month']\ntimezone='Europe/Berlin'",
        "name='tz_kolkata'\ndimensions=['user','endpoint','method']\ngranularities=['minute','hour','day','month']\ntimezone='Asia/Kolkata'",
        "name='totals'\ndimensions=[]\ngranularities=['day','month']\ntimezone='UTC'",
    ]
    .iter()
    .map(|t| Spec::parse(t, None).expect("test spec"))
    .collect()
}

// ---------------------------------------------------------------- oracle ---

/// Sums of one aggregate row, plus every latency for exact percentiles.
#[derive(Debug, Default, Clone)]
pub struct OracleRow {
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    pub by_type: [i64; 5],
    pub cache_hits: i64,
    pub latencies: Vec<f64>,
    pub latency_sum_us: i64,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub cost_nanos: i64,
    pub cost_from_catalog_nanos: i64,
    pub unpriced: i64,
}

/// A price as the oracle applies it: amounts in nano-units (per million
/// tokens for token prices); `api: None` is any api.
#[derive(Debug, Clone, PartialEq)]
pub struct OraclePrice {
    pub api: Option<String>,
    pub model: String,
    pub from: DateTime<Utc>,
    pub input: i64,
    pub output: i64,
    pub cached_input: Option<i64>,
    pub per_request: Option<i64>,
}

/// The documented cost rule, written again: the sent cost; else the price of
/// (api, model), else of the model alone, latest `from` at or before `ts`,
/// rounded half to even once; else unpriced. Returns (cost, from catalog, unpriced).
pub fn oracle_charge(e: &Event, prices: &[OraclePrice]) -> (i64, i64, i64) {
    if let Some(c) = e.cost_nanos {
        return (c, 0, 0);
    }
    let Some(model) = e.model.as_deref() else {
        return (0, 0, 1);
    };
    let latest = |api: Option<&str>| {
        prices
            .iter()
            .filter(|p| p.model == model && p.api.as_deref() == api && p.from <= e.ts)
            .max_by_key(|p| p.from)
    };
    let Some(p) = latest(Some(e.api.as_str())).or_else(|| latest(None)) else {
        return (0, 0, 1);
    };
    let input = if e.cached {
        p.cached_input.unwrap_or(p.input)
    } else {
        p.input
    };
    let total = i128::from(e.tokens_in.unwrap_or(0)) * i128::from(input)
        + i128::from(e.tokens_out.unwrap_or(0)) * i128::from(p.output);
    let (q, r) = (total / 1_000_000, total % 1_000_000);
    let rounded = if r * 2 > 1_000_000 || (r * 2 == 1_000_000 && q % 2 == 1) {
        q + 1
    } else {
        q
    };
    let cost = i64::try_from(rounded).expect("fits") + p.per_request.unwrap_or(0);
    (cost, cost, 0)
}

type OracleTable = BTreeMap<(DateTime<Utc>, Vec<String>), OracleRow>;

pub fn dim(e: &Event, name: &str) -> String {
    match name {
        "api" => e.api.clone(),
        "endpoint" => e.endpoint.clone().unwrap_or_default(),
        "method" => e.method.clone().unwrap_or_default(),
        "key" => e.key.clone().unwrap_or_default(),
        "user" => e.user.clone().unwrap_or_default(),
        "model" => e.model.clone().unwrap_or_default(),
        "status" => e.status.map(|s| format!("{s}")).unwrap_or_default(),
        "error_type" => match e.error_type {
            None => String::new(),
            Some(ErrorType::RateLimit) => "rate_limit".into(),
            Some(ErrorType::Timeout) => "timeout".into(),
            Some(ErrorType::ServerError) => "server_error".into(),
            Some(ErrorType::ClientError) => "client_error".into(),
            Some(ErrorType::Other) => "other".into(),
        },
        "cached" => format!("{}", e.cached),
        other => panic!("unknown dimension {other}"),
    }
}

/// The first instant whose local date is `date`: scan minute by minute around
/// the naive guess (local midnight read with the offset of noon that day).
fn oracle_day_start(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let noon = tz
        .from_local_datetime(&date.and_hms_opt(12, 0, 0).expect("noon"))
        .earliest()
        .expect("noon exists");
    let offset = i64::from(noon.offset().fix().local_minus_utc());
    let guess = date.and_hms_opt(0, 0, 0).expect("midnight").and_utc() - Duration::seconds(offset);
    let mut best = None;
    for m in -180..=180 {
        let t = guess + Duration::minutes(m);
        if t.with_timezone(&tz).date_naive() == date && best.is_none_or(|b| t < b) {
            best = Some(t);
        }
    }
    best.expect("a day has a first minute")
}

pub fn oracle_bucket(ts: DateTime<Utc>, g: Granularity, tz: Tz) -> DateTime<Utc> {
    match g {
        Granularity::Minute => ts.duration_trunc(Duration::minutes(1)).expect("trunc"),
        Granularity::Hour => {
            let offset = Duration::seconds(i64::from(
                ts.with_timezone(&tz).offset().fix().local_minus_utc(),
            ));
            (ts + offset)
                .duration_trunc(Duration::hours(1))
                .expect("trunc")
                - offset
        }
        Granularity::Day => oracle_day_start(ts.with_timezone(&tz).date_naive(), tz),
        Granularity::Month => {
            let d = ts.with_timezone(&tz).date_naive();
            oracle_day_start(
                NaiveDate::from_ymd_opt(d.year(), d.month(), 1).expect("first"),
                tz,
            )
        }
    }
}

/// The distinct events (first delivery of each id wins) folded per granularity,
/// costed with the price catalog `prices`.
pub fn oracle_priced(
    spec: &Spec,
    events: &[Event],
    prices: &[OraclePrice],
) -> BTreeMap<Granularity, OracleTable> {
    let mut seen = HashSet::new();
    let mut out: BTreeMap<Granularity, OracleTable> = BTreeMap::new();
    for e in events.iter().filter(|e| seen.insert(e.id.clone())) {
        let dims: Vec<String> = spec.dimensions.iter().map(|d| dim(e, d.as_str())).collect();
        for &g in &spec.granularities {
            let key = (oracle_bucket(e.ts, g, spec.timezone), dims.clone());
            let r = out.entry(g).or_default().entry(key).or_default();
            r.requests += 1;
            if e.success {
                r.successes += 1;
            } else {
                r.errors += 1;
            }
            if let Some(t) = e.error_type {
                let i = match t {
                    ErrorType::RateLimit => 0,
                    ErrorType::Timeout => 1,
                    ErrorType::ServerError => 2,
                    ErrorType::ClientError => 3,
                    ErrorType::Other => 4,
                };
                r.by_type[i] += 1;
            }
            r.cache_hits += i64::from(e.cached);
            if let Some(l) = e.latency_ms {
                r.latencies.push(l);
                r.latency_sum_us += (l * 1000.0).round() as i64;
            }
            r.request_bytes += e.request_bytes.unwrap_or(0);
            r.response_bytes += e.response_bytes.unwrap_or(0);
            r.tokens_in += e.tokens_in.unwrap_or(0);
            r.tokens_out += e.tokens_out.unwrap_or(0);
            let (cost, catalog, unpriced) = oracle_charge(e, prices);
            r.cost_nanos += cost;
            r.cost_from_catalog_nanos += catalog;
            r.unpriced += unpriced;
        }
    }
    out
}

pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1]
}

/// Asserts every table of `spec` (with `suffix`) equals the oracle, row for row.
pub async fn assert_matches_oracle(store: &Store, spec: &Spec, events: &[Event]) {
    assert_matches_priced_oracle(store, spec, events, &[]).await;
}

/// [`assert_matches_oracle`] with a price catalog.
pub async fn assert_matches_priced_oracle(
    store: &Store,
    spec: &Spec,
    events: &[Event],
    prices: &[OraclePrice],
) {
    let expected = oracle_priced(spec, events, prices);
    for &g in &spec.granularities {
        // A minute table keeps no rows past its retention and margin: the
        // fold's horizon was at most this one when it ran, so both sides are
        // compared from here on.
        let horizon = spec.fold_horizon(g, chrono::Utc::now());
        let kept = |bucket: &DateTime<Utc>| horizon.is_none_or(|h| *bucket >= h);
        let mut rows = store
            .projections()
            .read_agg(spec, g, "")
            .await
            .expect("read aggregate table");
        rows.retain(|r| kept(&r.bucket));
        let mut want = expected.get(&g).cloned().unwrap_or_default();
        want.retain(|(bucket, _), _| kept(bucket));
        let got_keys: Vec<_> = rows.iter().map(|r| (r.bucket, r.dims.clone())).collect();
        let want_keys: Vec<_> = want.keys().cloned().collect();
        assert_eq!(
            got_keys,
            want_keys,
            "{}: rows of agg_{}_{} differ from the oracle",
            spec.name,
            spec.name,
            g.as_str()
        );
        for row in &rows {
            let w = &want[&(row.bucket, row.dims.clone())];
            let m = &row.measures;
            let ctx = format!("{} {} {} {:?}", spec.name, g.as_str(), row.bucket, row.dims);
            assert_eq!(
                (
                    m.requests,
                    m.successes,
                    m.errors,
                    m.errors_by_type,
                    m.cache_hits
                ),
                (w.requests, w.successes, w.errors, w.by_type, w.cache_hits),
                "counts of {ctx}"
            );
            assert_eq!(
                (
                    m.request_bytes,
                    m.response_bytes,
                    m.tokens_in,
                    m.tokens_out,
                    m.cost_nanos,
                    m.cost_from_catalog_nanos,
                    m.unpriced
                ),
                (
                    w.request_bytes,
                    w.response_bytes,
                    w.tokens_in,
                    w.tokens_out,
                    w.cost_nanos,
                    w.cost_from_catalog_nanos,
                    w.unpriced
                ),
                "sums of {ctx}"
            );
            assert_eq!(
                m.latency_count,
                w.latencies.len() as i64,
                "latency_count of {ctx}"
            );
            assert_eq!(
                m.latency_sum_us, w.latency_sum_us,
                "latency_sum_us of {ctx}"
            );
            let mut sorted = w.latencies.clone();
            sorted.sort_by(f64::total_cmp);
            assert_eq!(
                m.latency_min_ms,
                sorted.first().copied(),
                "latency_min of {ctx}"
            );
            assert_eq!(
                m.latency_max_ms,
                sorted.last().copied(),
                "latency_max of {ctx}"
            );
            for q in [0.5, 0.95, 0.99] {
                let est = m.latency_quantile(q);
                if sorted.is_empty() {
                    assert_eq!(est, None, "p{q} of {ctx}");
                    continue;
                }
                let exact = nearest_rank(&sorted, q);
                let est = est.expect("quantile of a non-empty row");
                if exact < 0.001 {
                    assert_eq!(est, 0.0, "p{q} of {ctx}");
                } else {
                    assert!(
                        (est - exact).abs() <= RELATIVE_ERROR * exact * (1.0 + 1e-9),
                        "p{q} of {ctx}: estimate {est} vs exact {exact}"
                    );
                }
            }
        }
    }
}

// ------------------------------------------------------------- generator ---

/// Instants around DST changes, month ends and leap days.
pub const ANCHORS: [&str; 10] = [
    "2026-03-08T07:00:00Z", // New York springs forward
    "2026-11-01T06:00:00Z", // New York falls back
    "2026-03-29T01:00:00Z", // Berlin springs forward
    "2026-10-25T01:00:00Z", // Berlin falls back
    "2024-02-29T18:30:00Z", // Kolkata: 29 Feb → 1 Mar
    "2024-02-29T23:30:00Z", // UTC: 29 Feb → 1 Mar
    "2026-01-31T23:30:00Z", // month end
    "2026-12-31T23:00:00Z", // year end
    "2026-06-30T18:30:00Z", // Kolkata midnight
    "2026-11-24T10:00:00Z",
];

/// A deterministic event from a few random choices.
pub fn event(
    id: String,
    anchor: usize,
    offset_s: i64,
    micros: u32,
    pick: [u8; 8],
    latency: Option<f64>,
) -> Event {
    let base = DateTime::parse_from_rfc3339(ANCHORS[anchor % ANCHORS.len()])
        .expect("anchor")
        .with_timezone(&Utc);
    let ts =
        base + Duration::seconds(offset_s) + Duration::microseconds(i64::from(micros % 1_000_000));
    let opt = |v: u8, n: u8, prefix: &str| {
        (!v.is_multiple_of(n + 1)).then(|| format!("{prefix}{}", v % (n + 1)))
    };
    let status = [
        Some(200),
        Some(201),
        Some(429),
        Some(408),
        Some(500),
        Some(503),
        Some(404),
        None,
    ][usize::from(pick[5] % 8)];
    let success = match status {
        Some(s) => s < 400,
        None => !pick[6].is_multiple_of(3),
    };
    let error_type = (!success).then_some(match status {
        Some(429) => ErrorType::RateLimit,
        Some(408) | Some(504) => ErrorType::Timeout,
        Some(s) if s >= 500 => ErrorType::ServerError,
        Some(_) => ErrorType::ClientError,
        None => ErrorType::Other,
    });
    let n = i64::from(pick[7]);
    Event {
        id,
        ts,
        api: ["openai", "anthropic", "serpapi"][usize::from(pick[0] % 3)].to_string(),
        endpoint: opt(pick[1], 3, "/v1/e"),
        method: opt(pick[1] / 4, 2, "M"),
        key: opt(pick[2], 4, "k"),
        user: opt(pick[3], 3, "u"),
        model: opt(pick[4], 3, "m"),
        status,
        success,
        error_type,
        error_message: None,
        latency_ms: latency,
        request_bytes: (n % 3 != 0).then_some(n * 17),
        response_bytes: (n % 4 != 0).then_some(n * 101),
        tokens_in: (n % 2 == 0).then_some(n * 3),
        tokens_out: (n % 5 != 0).then_some(n * 7),
        cost_nanos: (n % 3 != 1).then_some(n * 1_234_567),
        cached: pick[6].is_multiple_of(4),
        metadata: Default::default(),
    }
}

/// `n` seeded events spread over all anchors (for non-proptest tests).
pub fn seeded_events(prefix: &str, n: usize, seed: u64) -> Vec<Event> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let pick: [u8; 8] = rng.random();
            let latency = (!pick[7].is_multiple_of(7))
                .then(|| f64::from(rng.random_range(0u32..3_000_000)) / 1000.0);
            event(
                format!("{prefix}-{i}"),
                rng.random_range(0..ANCHORS.len()),
                rng.random_range(-7200..7200),
                rng.random(),
                pick,
                latency,
            )
        })
        .collect()
}

pub fn origin() -> Origin {
    Origin {
        source: "test",
        subject: None,
    }
}

/// Appends in batches of `batch`.
pub async fn append_all(store: &Store, events: &[Event], batch: usize) {
    for chunk in events.chunks(batch.max(1)) {
        store
            .log()
            .append(chunk, &[], &origin())
            .await
            .expect("append");
    }
}

/// Opens a projector on the live tables of `spec`.
pub async fn projector(store: &Store, spec: &Spec) -> Projector {
    Projector::open(store.clone(), Arc::new(spec.clone()), &spec.name, "")
        .await
        .expect("open projector")
}

/// Folds until nothing is left after the checkpoint. `catch_up` alone stops at
/// what is foldable *now*: on PostgreSQL a transaction open anywhere in the
/// cluster (another test's database included) holds back `xmin`, and events
/// committed after it wait until it ends.
pub async fn fold_all(p: &mut Projector, store: &Store, limit: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        p.catch_up(limit).await.expect("catch up");
        if store
            .projections()
            .events_after(p.cursor())
            .await
            .expect("lag")
            == 0
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "projector did not fold everything in 60s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Lag of every shipped projection's checkpoints (None: one is missing).
pub async fn lag(store: &Store) -> Option<i64> {
    let states = store.projections().projection_states().await.ok()?;
    let mut total = 0;
    for spec in shipped() {
        for name in spec.checkpoints() {
            let s = states.iter().find(|s| s.name == name)?;
            total += store.projections().events_after(s.cursor).await.ok()?;
        }
    }
    Some(total)
}

/// Waits (up to a minute) until no restatement is queued and every shipped
/// projection has folded the whole log: what a restarted `serve` does.
pub async fn wait_restated(store: &Store) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let queued = store.corrections().pending(10).await.expect("queue");
        if queued.is_empty() && lag(store).await == Some(0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not restated after the restart"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
