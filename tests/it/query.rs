//! The query API against an oracle computed here from the raw events, on both
//! backends, over real HTTP: ranges, granularities, groupings, filters,
//! partial buckets, DST days, top-N, fill, empty answers, and every bad input.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;
use tally::aggregate::sketch::RELATIVE_ERROR;
use tally::aggregate::spec::Granularity;
use tally::event::{ErrorType, Event};
use tally::store::{Backend, StoreOptions};

use crate::projection::oracle::{append_all, dim, nearest_rank, oracle_bucket, seeded_events};
use crate::support::{self, TestServer, TestStore};

const SPECS: [(&str, &str); 4] = [
    (
        "by_api.toml",
        "name='by_api'\ndimensions=['api','endpoint','method']\ngranularities=['hour','day','month']",
    ),
    (
        "by_key.toml",
        "name='by_key'\ndimensions=['api','key','model']\ngranularities=['hour','day','month']",
    ),
    // No retention: the answers must not depend on the day the test runs.
    (
        "keys_minute.toml",
        "name='keys_minute'\ndimensions=['api','key','model']\ngranularities=['minute']",
    ),
    (
        "ny.toml",
        "name='ny'\ndimensions=['api','key']\ngranularities=['hour','day','month']\ntimezone='America/New_York'",
    ),
];

struct Fixture {
    server: TestServer,
    events: Vec<Event>,
    _store: TestStore,
    _dir: tempfile::TempDir,
}

fn spec_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (file, text) in SPECS {
        std::fs::write(dir.path().join(file), text).expect("write spec");
    }
    dir
}

/// A server whose projectors have folded `n` seeded events.
async fn fixture(backend: Backend, n: usize) -> Fixture {
    let store = support::store(backend).await;
    let events = seeded_events("q", n, 7);
    append_all(&store.store, &events, 500).await;
    let dir = spec_dir();
    let mut config = support::server_config();
    config.projections.projections_dir = Some(dir.path().to_path_buf());
    let server = TestServer::start(store.store.clone(), config).await;
    wait_folded(&server).await;
    Fixture {
        server,
        events,
        _store: store,
        _dir: dir,
    }
}

async fn wait_folded(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, body) = server.get("/v1/projections").await;
        assert_eq!(status, 200, "{body}");
        let list = body["projections"].as_array().expect("projections");
        if list.len() == SPECS.len()
            && list
                .iter()
                .all(|p| p["lag_events"] == 0 && !p["as_of"].is_null())
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "projections did not catch up: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

// ---------------------------------------------------------------- oracle ---

#[derive(Debug, Default, Clone)]
struct Sums {
    requests: i64,
    successes: i64,
    errors: i64,
    by_type: [i64; 5],
    cached: i64,
    latencies: Vec<f64>,
    latency_sum_us: i64,
    request_bytes: i64,
    response_bytes: i64,
    tokens_in: i64,
    tokens_out: i64,
    cost_nanos: i64,
}

impl Sums {
    fn add(&mut self, e: &Event) {
        self.requests += 1;
        if e.success {
            self.successes += 1;
        } else {
            self.errors += 1;
        }
        if let Some(t) = e.error_type {
            self.by_type[ErrorType::ALL.iter().position(|x| *x == t).expect("type")] += 1;
        }
        self.cached += i64::from(e.cached);
        if let Some(l) = e.latency_ms {
            self.latencies.push(l);
            self.latency_sum_us += (l * 1000.0).round() as i64;
        }
        self.request_bytes += e.request_bytes.unwrap_or(0);
        self.response_bytes += e.response_bytes.unwrap_or(0);
        self.tokens_in += e.tokens_in.unwrap_or(0);
        self.tokens_out += e.tokens_out.unwrap_or(0);
        self.cost_nanos += e.cost_nanos.unwrap_or(0);
    }
}

type Filters<'a> = &'a [(&'a str, &'a [&'a str])];

fn passes(e: &Event, filters: Filters<'_>) -> bool {
    filters
        .iter()
        .all(|(d, values)| values.contains(&dim(e, d).as_str()))
}

/// `/v1/stats` by the documented rule: an event counts when its bucket starts
/// at or after the bucket holding `from` and before `to`.
fn oracle_series(
    events: &[Event],
    g: Granularity,
    tz: Tz,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    group_by: &[&str],
    filters: Filters<'_>,
) -> BTreeMap<(DateTime<Utc>, Vec<String>), Sums> {
    let first = oracle_bucket(from, g, tz);
    let mut out: BTreeMap<(DateTime<Utc>, Vec<String>), Sums> = BTreeMap::new();
    for e in events.iter().filter(|e| passes(e, filters)) {
        let b = oracle_bucket(e.ts, g, tz);
        if b >= first && b < to {
            let group = group_by.iter().map(|d| dim(e, d)).collect();
            out.entry((b, group)).or_default().add(e);
        }
    }
    out
}

/// Sums per group of the events with `ts` in `[from, to)`.
fn oracle_range(
    events: &[Event],
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    group_by: &[&str],
    filters: Filters<'_>,
) -> BTreeMap<Vec<String>, Sums> {
    let mut out: BTreeMap<Vec<String>, Sums> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.ts >= from && e.ts < to && passes(e, filters))
    {
        let group = group_by.iter().map(|d| dim(e, d)).collect();
        out.entry(group).or_default().add(e);
    }
    out
}

fn cost_text(nanos: i64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

/// Every measure of a JSON point equals the oracle's (percentiles within the
/// documented relative error of the exact nearest-rank value).
fn assert_measures(got: &Value, want: &Sums, ctx: &str) {
    let int = |field: &str| {
        got.pointer(field)
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("{ctx}: {field} missing in {got}"))
    };
    assert_eq!(int("/requests"), want.requests, "{ctx}: requests");
    assert_eq!(int("/successes"), want.successes, "{ctx}: successes");
    assert_eq!(int("/errors"), want.errors, "{ctx}: errors");
    for (i, name) in [
        "rate_limit",
        "timeout",
        "server_error",
        "client_error",
        "other",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            int(&format!("/errors_by_type/{name}")),
            want.by_type[i],
            "{ctx}: errors {name}"
        );
    }
    assert_eq!(int("/cached"), want.cached, "{ctx}: cached");
    assert_eq!(int("/request_bytes"), want.request_bytes, "{ctx}");
    assert_eq!(int("/response_bytes"), want.response_bytes, "{ctx}");
    assert_eq!(int("/tokens_in"), want.tokens_in, "{ctx}");
    assert_eq!(int("/tokens_out"), want.tokens_out, "{ctx}");
    assert_eq!(int("/cost_nanos"), want.cost_nanos, "{ctx}");
    assert_eq!(got["cost"], cost_text(want.cost_nanos), "{ctx}: cost");
    if want.requests > 0 {
        let rate = got["success_rate"].as_f64().expect("success_rate");
        assert!(
            (rate - want.successes as f64 / want.requests as f64).abs() < 1e-12,
            "{ctx}: success_rate"
        );
    } else {
        assert!(got["success_rate"].is_null(), "{ctx}: success_rate");
    }
    let lat = &got["latency_ms"];
    if want.latencies.is_empty() {
        for k in ["avg", "min", "max", "p50", "p95", "p99"] {
            assert!(lat[k].is_null(), "{ctx}: latency {k} should be null");
        }
        return;
    }
    let mut sorted = want.latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let avg = want.latency_sum_us as f64 / sorted.len() as f64 / 1000.0;
    assert!(
        (lat["avg"].as_f64().expect("avg") - avg).abs() < 1e-9,
        "{ctx}: avg"
    );
    assert_eq!(lat["min"].as_f64(), sorted.first().copied(), "{ctx}: min");
    assert_eq!(lat["max"].as_f64(), sorted.last().copied(), "{ctx}: max");
    for (k, q) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
        let exact = nearest_rank(&sorted, q);
        let est = lat[k].as_f64().expect("percentile");
        assert!(
            (est - exact).abs() <= RELATIVE_ERROR * exact + 1e-9,
            "{ctx}: {k} estimate {est} vs exact {exact}"
        );
    }
}

fn group_values(v: &Value, group_by: &[&str]) -> Vec<String> {
    group_by
        .iter()
        .map(|d| v["group"][*d].as_str().expect("group value").to_string())
        .collect()
}

async fn get_ok(server: &TestServer, path: &str) -> Value {
    let (status, body) = server.get(path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Queries `/v1/stats` and compares every point and total with the oracle.
#[allow(clippy::too_many_arguments)]
async fn check_stats(
    f: &Fixture,
    g: Granularity,
    tz: Tz,
    (from, to): (&str, &str),
    group_by: &[&str],
    filters: Filters<'_>,
    expect_projection: &str,
) -> Value {
    let mut query = vec![
        ("from".to_string(), from.to_string()),
        ("to".to_string(), to.to_string()),
        ("granularity".to_string(), g.as_str().to_string()),
        ("tz".to_string(), tz.name().to_string()),
    ];
    if !group_by.is_empty() {
        query.push(("group_by".into(), group_by.join(",")));
    }
    for (d, values) in filters {
        for v in *values {
            query.push((d.to_string(), v.to_string()));
        }
    }
    let resp = f
        .server
        .client
        .get(format!("{}/v1/stats", f.server.base))
        .query(&query)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    let ctx = format!("{g:?} {from}..{to} by {group_by:?} where {filters:?}");
    assert_eq!(body["projection"], expect_projection, "{ctx}");
    assert_eq!(body["granularity"], g.as_str());
    assert_eq!(body["timezone"], tz.name());
    assert!(!body["as_of"].is_null(), "{ctx}: as_of");
    let want = oracle_series(&f.events, g, tz, (t(from), t(to)), group_by, filters);
    let series = body["series"].as_array().expect("series");
    assert_eq!(series.len(), want.len(), "{ctx}: points");
    for p in series {
        let key = (
            t(p["bucket"].as_str().expect("bucket")),
            group_values(p, group_by),
        );
        let w = want
            .get(&key)
            .unwrap_or_else(|| panic!("{ctx}: unexpected point {key:?}"));
        assert_measures(p, w, &format!("{ctx} point {key:?}"));
    }
    // Totals: the same events, per group.
    let mut totals: BTreeMap<Vec<String>, Sums> = BTreeMap::new();
    for e in f.events.iter().filter(|e| passes(e, filters)) {
        let b = oracle_bucket(e.ts, g, tz);
        if b >= oracle_bucket(t(from), g, tz) && b < t(to) {
            let group = group_by.iter().map(|d| dim(e, d)).collect();
            totals.entry(group).or_default().add(e);
        }
    }
    if group_by.is_empty() {
        totals.entry(Vec::new()).or_default();
    }
    let got_totals = body["totals"].as_array().expect("totals");
    assert_eq!(got_totals.len(), totals.len(), "{ctx}: totals");
    for tot in got_totals {
        let key = group_values(tot, group_by);
        assert_measures(tot, &totals[&key], &format!("{ctx} total {key:?}"));
    }
    body
}

// ----------------------------------------------------------------- tests ---

async fn stats_match_the_oracle(backend: Backend) {
    let f = fixture(backend, 4000).await;
    let utc = Tz::UTC;
    let ny: Tz = "America/New_York".parse().expect("tz");
    // Whole buckets, several granularities and groupings.
    check_stats(
        &f,
        Granularity::Hour,
        utc,
        ("2026-11-24T07:00:00Z", "2026-11-24T13:00:00Z"),
        &["api"],
        &[],
        "by_api",
    )
    .await;
    check_stats(
        &f,
        Granularity::Day,
        utc,
        ("2026-01-01T00:00:00Z", "2027-01-02T00:00:00Z"),
        &["key"],
        &[],
        "by_key",
    )
    .await;
    check_stats(
        &f,
        Granularity::Month,
        utc,
        ("2024-01-01T00:00:00Z", "2027-02-01T00:00:00Z"),
        &[],
        &[],
        "by_api",
    )
    .await;
    check_stats(
        &f,
        Granularity::Hour,
        utc,
        ("2026-11-24T08:00:00Z", "2026-11-24T12:00:00Z"),
        &["api", "endpoint", "method"],
        &[],
        "by_api",
    )
    .await;
    // Filters, repeated for "any of", and on a dimension not grouped by.
    check_stats(
        &f,
        Granularity::Hour,
        utc,
        ("2026-11-24T06:00:00Z", "2026-11-24T14:00:00Z"),
        &["model"],
        &[("api", &["openai", "anthropic"]), ("key", &["k1"])],
        "by_key",
    )
    .await;
    check_stats(
        &f,
        Granularity::Minute,
        utc,
        ("2026-11-24T09:30:00Z", "2026-11-24T10:15:00Z"),
        &["key"],
        &[("api", &["openai"])],
        "keys_minute",
    )
    .await;
    // Partial buckets: [08:20, 11:40) counts the 08:00 … 11:00 hours in full.
    let body = check_stats(
        &f,
        Granularity::Hour,
        utc,
        ("2026-11-24T08:20:00Z", "2026-11-24T11:40:00Z"),
        &["api"],
        &[],
        "by_api",
    )
    .await;
    assert_eq!(body["covered"]["from"], "2026-11-24T08:00:00Z");
    assert_eq!(body["covered"]["to"], "2026-11-24T12:00:00Z");
    // DST days in New York: 23 hours on 8 March, 25 on 1 November.
    let body = check_stats(
        &f,
        Granularity::Day,
        ny,
        ("2026-03-07T05:00:00Z", "2026-03-10T04:00:00Z"),
        &["api"],
        &[],
        "ny",
    )
    .await;
    assert!(!body["series"].as_array().expect("series").is_empty());
    // With fill=zero the buckets show the 23-hour day: 8 March starts at 05:00Z, 9 March at 04:00Z.
    let body = get_ok(&f.server, "/v1/stats?from=2026-03-07T05:00:00Z&to=2026-03-10T04:00:00Z&granularity=day&tz=America/New_York&fill=zero").await;
    let buckets: Vec<&str> = body["series"]
        .as_array()
        .expect("series")
        .iter()
        .filter_map(|p| p["bucket"].as_str())
        .collect();
    assert_eq!(
        buckets,
        [
            "2026-03-07T05:00:00Z",
            "2026-03-08T05:00:00Z",
            "2026-03-09T04:00:00Z"
        ]
    );
    check_stats(
        &f,
        Granularity::Day,
        ny,
        ("2026-10-31T04:00:00Z", "2026-11-03T05:00:00Z"),
        &["key"],
        &[],
        "ny",
    )
    .await;
    check_stats(
        &f,
        Granularity::Hour,
        ny,
        ("2026-11-01T04:00:00Z", "2026-11-01T09:00:00Z"),
        &[],
        &[("api", &["serpapi"])],
        "ny",
    )
    .await;
    // A zone no projection is kept in, answered from a finer table whose
    // buckets tile its buckets: Paris days and months from UTC hours,
    // Kolkata hours (+5:30) from minutes. Same numbers as the oracle's.
    let paris: Tz = "Europe/Paris".parse().expect("tz");
    let kolkata: Tz = "Asia/Kolkata".parse().expect("tz");
    check_stats(
        &f,
        Granularity::Day,
        paris,
        ("2026-11-22T23:00:00Z", "2026-11-25T23:00:00Z"),
        &["api", "endpoint"],
        &[],
        "by_api",
    )
    .await;
    check_stats(
        &f,
        Granularity::Month,
        paris,
        ("2026-09-30T22:00:00Z", "2026-12-31T23:00:00Z"),
        &["endpoint"],
        &[],
        "by_api",
    )
    .await;
    let body = check_stats(
        &f,
        Granularity::Hour,
        kolkata,
        ("2026-11-24T06:30:00Z", "2026-11-24T12:30:00Z"),
        &["key"],
        &[("api", &["openai"])],
        "keys_minute",
    )
    .await;
    assert_eq!(body["covered"]["from"], "2026-11-24T06:30:00Z");
    // series=false: the same totals, no series.
    let both = get_ok(&f.server, "/v1/stats?from=2026-11-24T06:00:00Z&to=2026-11-24T14:00:00Z&granularity=hour&group_by=model").await;
    let totals_only = get_ok(&f.server, "/v1/stats?from=2026-11-24T06:00:00Z&to=2026-11-24T14:00:00Z&granularity=hour&group_by=model&series=false").await;
    assert!(!both["series"].as_array().expect("series").is_empty());
    assert_eq!(totals_only["series"], serde_json::json!([]));
    assert_eq!(totals_only["totals"], both["totals"]);

    // Empty: no events in 2025.
    let body = check_stats(
        &f,
        Granularity::Day,
        utc,
        ("2025-05-01T00:00:00Z", "2025-05-08T00:00:00Z"),
        &[],
        &[],
        "by_api",
    )
    .await;
    assert_eq!(body["series"].as_array().map(Vec::len), Some(0));
    assert_eq!(body["totals"][0]["requests"], 0);
    let body = check_stats(
        &f,
        Granularity::Hour,
        utc,
        ("2026-11-24T08:00:00Z", "2026-11-24T12:00:00Z"),
        &["api"],
        &[("key", &["no-such-key"])],
        "by_key",
    )
    .await;
    assert_eq!(body["totals"].as_array().map(Vec::len), Some(0));

    // fill=zero: every bucket for every group.
    let body = get_ok(&f.server, "/v1/stats?from=2026-11-24T06:00:00Z&to=2026-11-24T14:00:00Z&granularity=hour&group_by=api&fill=zero").await;
    let groups = body["totals"].as_array().expect("totals").len();
    assert_eq!(body["series"].as_array().map(Vec::len), Some(8 * groups));
    assert!(body["series"]
        .as_array()
        .expect("series")
        .iter()
        .any(|p| p["requests"] == 0));

    // Top-N: order_by + limit keeps the oracle's best groups, in order.
    let body = get_ok(&f.server, "/v1/stats?from=2026-01-01T00:00:00Z&to=2027-01-02T00:00:00Z&granularity=month&group_by=key,model&order_by=cost&limit=3").await;
    // The month buckets widen the range to [2026-01-01, 2027-02-01).
    let wide = oracle_range(
        &f.events,
        (t("2026-01-01T00:00:00Z"), t("2027-02-01T00:00:00Z")),
        &["key", "model"],
        &[],
    );
    let mut want: Vec<(Vec<String>, Sums)> = wide.into_iter().collect();
    want.sort_by(|(ga, a), (gb, b)| b.cost_nanos.cmp(&a.cost_nanos).then(ga.cmp(gb)));
    let got = body["totals"].as_array().expect("totals");
    assert_eq!(got.len(), 3);
    for (i, tot) in got.iter().enumerate() {
        assert_eq!(group_values(tot, &["key", "model"]), want[i].0, "rank {i}");
        assert_measures(tot, &want[i].1, &format!("top {i}"));
    }
    for p in body["series"].as_array().expect("series") {
        let g = group_values(p, &["key", "model"]);
        assert!(
            want[..3].iter().any(|(w, _)| *w == g),
            "series holds only the top groups"
        );
    }
}

#[tokio::test]
async fn stats_match_the_oracle_sqlite() {
    stats_match_the_oracle(Backend::Sqlite).await;
}

#[tokio::test]
async fn stats_match_the_oracle_postgres() {
    stats_match_the_oracle(Backend::Postgres).await;
}

async fn keys_match_the_oracle(backend: Backend) {
    let f = fixture(backend, 3000).await;
    // Minute-exact ranges: [09:13, 11:47) is minutes, hours, minutes.
    for (from, to) in [
        ("2026-11-24T09:13:00Z", "2026-11-24T11:47:00Z"),
        ("2026-10-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        ("2026-03-08T05:59:00Z", "2026-03-08T08:01:00Z"),
    ] {
        let want = oracle_range(&f.events, (t(from), t(to)), &["key"], &[]);
        let mut ranked: Vec<(Vec<String>, Sums)> = want.into_iter().collect();
        ranked.sort_by(|(ga, a), (gb, b)| b.cost_nanos.cmp(&a.cost_nanos).then(ga.cmp(gb)));
        let body = get_ok(
            &f.server,
            &format!("/v1/keys?from={from}&to={to}&order_by=cost&limit=2&offset=1"),
        )
        .await;
        assert_eq!(body["covered"]["from"], from);
        assert_eq!(body["covered"]["to"], to);
        assert_eq!(body["total_keys"], ranked.len());
        let keys = body["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), ranked.len().saturating_sub(1).min(2));
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(k["key"], ranked[i + 1].0[0], "{from}..{to} rank {}", i + 1);
            assert_measures(
                k,
                &ranked[i + 1].1,
                &format!("keys {from}..{to} #{}", i + 1),
            );
        }
        // Requests ranking over the same range, first page.
        let body = get_ok(
            &f.server,
            &format!("/v1/keys?from={from}&to={to}&order_by=requests&api=openai"),
        )
        .await;
        let want = oracle_range(
            &f.events,
            (t(from), t(to)),
            &["key"],
            &[("api", &["openai"])],
        );
        let mut ranked: Vec<(Vec<String>, Sums)> = want.into_iter().collect();
        ranked.sort_by(|(ga, a), (gb, b)| b.requests.cmp(&a.requests).then(ga.cmp(gb)));
        let keys = body["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), ranked.len());
        for (k, (g, s)) in keys.iter().zip(&ranked) {
            assert_eq!(k["key"], g[0]);
            assert_measures(k, s, "keys by requests");
        }
    }

    // The key page at a fixed instant.
    let body = get_ok(&f.server, "/v1/keys/k2/stats?at=2026-11-24T11:21:30Z").await;
    assert_eq!(body["key"], "k2");
    let k2: &[(&str, &[&str])] = &[("key", &["k2"])];
    let windows = [
        ("today", t("2026-11-24T00:00:00Z")),
        ("this_month", t("2026-11-01T00:00:00Z")),
        // 24 hours before `at`, from the minute that holds that instant.
        ("last_24h", t("2026-11-23T11:21:00Z")),
    ];
    for (name, from) in windows {
        // Exact to the minute: the minute holding `at` is counted in full.
        let to = t("2026-11-24T11:22:00Z");
        let want = oracle_range(&f.events, (from, to), &[], k2);
        let empty = Sums::default();
        assert_measures(&body[name], want.get(&Vec::new()).unwrap_or(&empty), name);
        assert_eq!(
            body[name]["covered"]["to"], "2026-11-24T11:22:00Z",
            "{name}"
        );
    }
    let month = (t("2026-11-01T00:00:00Z"), t("2026-11-24T11:22:00Z"));
    for (field, d) in [("by_model", "model"), ("by_api", "api")] {
        let want = oracle_range(&f.events, month, &[d], k2);
        let got = body[field].as_array().expect("breakdown");
        assert_eq!(got.len(), want.len(), "{field}");
        for row in got {
            let v = row[d].as_str().expect("value").to_string();
            assert_measures(row, &want[&vec![v]], field);
        }
    }
    assert!(body["quota"].is_null());
}

#[tokio::test]
async fn keys_match_the_oracle_sqlite() {
    keys_match_the_oracle(Backend::Sqlite).await;
}

#[tokio::test]
async fn keys_match_the_oracle_postgres() {
    keys_match_the_oracle(Backend::Postgres).await;
}

/// Every bad input is a 400 whose message names the problem and what is allowed.
#[tokio::test]
async fn bad_query_parameters_get_a_400_that_says_what_to_fix() {
    let f = fixture(Backend::Sqlite, 200).await;
    let cases: &[(&str, &str, &str)] = &[
        ("/v1/stats?bogus=1", "unknown_parameter", "`bogus`"),
        ("/v1/stats?group_by=api,colour", "unknown_dimension", "`colour` is not a dimension"),
        ("/v1/stats?group_by=", "unknown_dimension", "empty name"),
        ("/v1/stats?group_by=api,,key", "unknown_dimension", "empty name"),
        ("/v1/stats?from=2026-11-24T10:00:00Z&to=2026-11-24T10:00:00Z", "invalid_range", "must be before"),
        ("/v1/stats?from=2026-11-25T10:00:00Z&to=2026-11-24T10:00:00Z", "invalid_range", "must be before"),
        ("/v1/stats?from=yesterday", "invalid_time", "RFC 3339"),
        ("/v1/stats?granularity=week", "invalid_granularity", "minute, hour, day, month"),
        ("/v1/stats?granularity=minute&from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z", "range_too_long", "10000"),
        ("/v1/stats?from=2000-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&granularity=month", "range_too_long", "10 years"),
        ("/v1/stats?from=2026-11-01T00:00:00Z&to=2026-11-30T00:00:00Z&granularity=hour&group_by=api,key,model&fill=zero", "too_many_points", "10000"),
        ("/v1/stats?group_by=user", "no_projection", "add a file to projections/"),
        // Kolkata hours start at :30 UTC: no hour table tiles them, and the
        // minute table lacks `endpoint`.
        ("/v1/stats?granularity=day&tz=Asia/Kolkata&group_by=endpoint", "no_projection", "Asia/Kolkata"),
        ("/v1/stats?series=maybe", "invalid_parameter", "totals only"),
        ("/v1/stats?tz=Mars/Olympus", "invalid_tz", "IANA"),
        ("/v1/stats?order_by=vibes&limit=3&group_by=api", "invalid_order_by", "cost"),
        ("/v1/stats?limit=0&group_by=api", "invalid_parameter", "limit"),
        ("/v1/stats?limit=abc&group_by=api", "invalid_parameter", "whole number"),
        ("/v1/stats?fill=linear", "invalid_parameter", "zero"),
        ("/v1/stats?from=2026-11-24T10:00:00Z&from=2026-11-24T11:00:00Z", "repeated_parameter", "once"),
        ("/v1/keys?order_by=vibes", "invalid_order_by", "requests"),
        ("/v1/keys?limit=5000", "invalid_parameter", "1000"),
        ("/v1/keys?key=k1", "invalid_parameter", "/v1/keys/{key}/stats"),
        ("/v1/keys?colour=red", "unknown_parameter", "`colour`"),
        ("/v1/keys/k1/stats?at=soon", "invalid_time", "RFC 3339"),
        ("/v1/keys/k1/stats?from=2026-11-24T10:00:00Z", "unknown_parameter", "at, tz"),
        ("/v1/projections?x=1", "unknown_parameter", "`x`"),
    ];
    for (path, code, needle) in cases {
        let (status, body) = f.server.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], *code, "{path}: {body}");
        let msg = body["error"].as_str().expect("message");
        assert!(
            msg.contains(needle),
            "{path}: message {msg:?} should mention {needle:?}"
        );
    }
    // The 400 for a missing projection lists what exists.
    let (_, body) = f.server.get("/v1/stats?group_by=user").await;
    let msg = body["error"].as_str().expect("message");
    for name in ["by_api", "by_key", "keys_minute", "ny"] {
        assert!(msg.contains(name), "{msg}");
    }
}

/// A query that outlives the statement timeout is cancelled and answered 503,
/// not left hanging: a lock held on the table makes it wait.
#[tokio::test]
async fn a_query_past_the_statement_timeout_is_a_503() {
    let pg = support::postgres();
    let url = pg.create_database("timeout").expect("database");
    let options = StoreOptions {
        statement_timeout: Duration::from_millis(300),
        ..StoreOptions::default()
    };
    let store = tally::store::connect(&url, &options).await.expect("store");
    store.migrate().await.expect("migrate");
    let dir = spec_dir();
    let mut config = support::server_config();
    config.projections.projections_dir = Some(dir.path().to_path_buf());
    let server = TestServer::start(store, config).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE agg_by_api_hour IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .expect("lock");
    let started = Instant::now();
    let (status, body) = server.get("/v1/stats?group_by=api").await;
    let waited = started.elapsed();
    tx.rollback().await.expect("rollback");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable");
    assert!(
        body["error"]
            .as_str()
            .expect("message")
            .contains("statement timeout"),
        "{body}"
    );
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");
    // Once the lock is gone the same query answers.
    let (status, _) = server.get("/v1/stats?group_by=api").await;
    assert_eq!(status, 200);
}

/// `/openapi.json` parses and documents exactly the routes the router serves.
#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let f = fixture(Backend::Sqlite, 50).await;
    let (status, doc) = f.server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths: HashSet<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    let routes = [
        "/v1/events",
        "/v1/stats",
        "/v1/keys",
        "/v1/keys/{key}/stats",
        "/v1/keys/{key}/quota",
        "/v1/alert-rules",
        "/v1/alert-rules/{name}",
        "/v1/alert-rules/{name}/audit",
        "/v1/alerts",
        "/v1/corrections",
        "/v1/corrections/{id}",
        "/v1/corrections/{id}/revert",
        "/v1/prices",
        "/v1/prices/{id}",
        "/v1/prices/audit",
        "/v1/prices/reprice",
        "/v1/projections",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ];
    assert_eq!(paths, routes.into_iter().collect::<HashSet<_>>());
    // Each documented GET route exists (answers something other than 404).
    for p in routes.iter().filter(|p| **p != "/v1/events") {
        let path = p
            .replace("{key}", "k1")
            .replace("{name}", "r1")
            .replace("{id}", "c1");
        let resp = f
            .server
            .client
            .get(format!("{}{path}", f.server.base))
            .send()
            .await
            .expect("request");
        // A 404 for a missing key's quota or rule is the route's own answer.
        let body = resp.text().await.unwrap_or_default();
        assert!(!body.contains("no such route"), "{path}: {body}");
    }
    // Every parameter of /v1/stats is documented.
    let params: HashSet<&str> = doc["paths"]["/v1/stats"]["get"]["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in [
        "from",
        "to",
        "granularity",
        "group_by",
        "tz",
        "order_by",
        "limit",
        "fill",
        "series",
        "api",
        "key",
        "model",
        "endpoint",
        "user",
    ] {
        assert!(params.contains(name), "{name} undocumented");
    }
}
