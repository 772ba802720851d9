//! `tally bench query`: five canonical questions answered by `tally serve` over
//! HTTP (keep-alive) from the projections, against the same answers computed
//! the hand-rolled way in the same run: GROUP BY over `usage_events` with
//! composite indexes on (api, ts), (key, ts), (model, ts), (status, ts). Both
//! answers are compared number for number before any timing is reported.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, DurationRound, NaiveDate, Utc};
use serde_json::Value;
use sqlx::postgres::PgPoolCopyExt;
use sqlx::{PgPool, Row};

use super::baseline::copy_text;
use super::serve::get_json;
use super::{fold_backlog, num_cpus, tempfile_dir, BenchError};
use crate::dev::devserver::TempPostgres;
use crate::dev::synth::{self, SynthConfig};
use tally::aggregate::sketch::RELATIVE_ERROR;
use tally::aggregate::spec::load_dir;
use tally::store::StoreOptions;

/// Parameters of `tally bench query`.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryBench {
    /// Events generated over 30 days (COPY, then folded into the projections).
    #[arg(long, default_value_t = 10_000_000)]
    pub events: usize,
    /// Timed Tally requests per canonical query.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), default_value_t = 500)]
    pub iterations: usize,
    /// Timed runs per canonical query of the raw GROUP BY (slow, so fewer).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), default_value_t = 10)]
    pub baseline_iterations: usize,
    /// Projection specs.
    #[arg(long, env = "TALLY_PROJECTIONS_DIR", default_value = "projections")]
    pub projections_dir: PathBuf,
    /// Draw every field independently (the worst case for the projections).
    #[arg(long)]
    pub uniform: bool,
}

/// Latency figures of one canonical query.
#[derive(Debug, Clone)]
pub struct QueryFigures {
    /// Short name.
    pub name: &'static str,
    /// Tally p50 and p99, ms.
    pub tally_ms: (f64, f64),
    /// Raw GROUP BY p50 and p99, ms.
    pub baseline_ms: (f64, f64),
}

/// One canonical question, asked both ways.
struct Canonical {
    name: &'static str,
    /// Path and query string of the Tally request.
    path: String,
    /// SQL statements of the hand-rolled answer (a page may need several).
    sql: Vec<(String, Vec<Bind>)>,
}

#[derive(Debug, Clone)]
enum Bind {
    Ts(DateTime<Utc>),
    Text(String),
}

const SPAN_DAYS: i64 = 30;

/// Runs the benchmark and prints p50/p99 per query and the ratios.
pub async fn query(params: &QueryBench) -> Result<Vec<QueryFigures>, BenchError> {
    let specs = load_dir(&params.projections_dir).map_err(|e| BenchError::Check(e.to_string()))?;
    let tmp = tempfile_dir()?;
    let cluster = TempPostgres::start(false)?;
    let url = cluster.create_database("query")?;
    let store = tally::store::connect(&url, &StoreOptions::default()).await?;
    store.migrate().await?;
    let end = Utc::now()
        .duration_trunc(chrono::Duration::hours(1))
        .map_err(|e| BenchError::Check(e.to_string()))?;
    println!(
        "PostgreSQL: {} events over the {SPAN_DAYS} days before {end} ({}), 1,000 keys, 10 apis, 20 models, {} cores",
        params.events,
        if params.uniform {
            "uniform: every field drawn independently"
        } else {
            "realistic: each key calls one API with one or two models"
        },
        num_cpus()
    );

    // Load: COPY in chunks (the fast path), then the baseline's indexes.
    let cfg = SynthConfig {
        seed: 11,
        apis: 10,
        keys: 1000,
        models: 20,
        span: Duration::from_secs(u64::try_from(SPAN_DAYS).unwrap_or(30) * 86_400),
        now: end - chrono::Duration::microseconds(1),
        id_prefix: "q".into(),
        correlated: !params.uniform,
        arrival_order: Some(params.events),
    };
    let started = Instant::now();
    let pool = sqlx::PgPool::connect(&url).await?;
    let chunk = 50_000;
    let mut done = 0;
    while done < params.events {
        let n = chunk.min(params.events - done);
        let events = synth::events(&cfg, done as u64, n);
        let mut copy = pool
            .copy_in_raw(&format!(
                "COPY usage_events ({}) FROM STDIN",
                super::baseline::COLUMNS
            ))
            .await?;
        copy.send(copy_text(&events).into_bytes()).await?;
        copy.finish().await?;
        done += n;
    }
    println!(
        "load: COPY {} events in {:.1}s",
        params.events,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    for (name, cols) in [
        ("bench_api_ts", "api, ts"),
        ("bench_key_ts", "key, ts"),
        ("bench_model_ts", "model, ts"),
        ("bench_status_ts", "status, ts"),
    ] {
        sqlx::query(&format!("CREATE INDEX {name} ON usage_events ({cols})"))
            .execute(&pool)
            .await?;
    }
    sqlx::query("VACUUM ANALYZE usage_events")
        .execute(&pool)
        .await?;
    println!(
        "baseline indexes (api, ts), (key, ts), (model, ts), (status, ts) + ANALYZE: {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Projections: folded by the projector from the log, as `tally serve` does.
    let started = Instant::now();
    fold_backlog(&store, &specs).await?;
    for spec in &specs {
        for &g in &spec.granularities {
            sqlx::query(&format!("VACUUM ANALYZE {}", spec.table(g)))
                .execute(&pool)
                .await?;
        }
    }
    println!(
        "projections ({}) folded from the log: {:.1}s",
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );

    // Tally itself, as a separate process, answering over HTTP.
    let (mut child, base) =
        super::serve::spawn(&url, &params.projections_dir, &tmp.join("tally.log"), &[])?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .map_err(|e| BenchError::Check(e.to_string()))?;
    let ready = wait_ready(&client, &base, &mut child).await;
    let result = match ready {
        Ok(()) => run_queries(params, &client, &base, &pool, end).await,
        Err(e) => Err(e),
    };
    if let Some(secs) = std::env::var("TALLY_BENCH_HOLD")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        // Leaves the server and database up for a look (EXPLAIN, curl).
        println!("holding {secs}s: tally at {base}, database {url}");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    store.close().await;
    drop(cluster);
    if std::env::var_os("TALLY_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    child: &mut std::process::Child,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Check(format!(
                "tally serve exited with {status}"
            )));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Check("tally serve did not become ready".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(t.year(), t.month(), 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(t, |d| d.and_utc())
}

fn next_month(t: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(t, |d| d.and_utc())
}

const MEASURES_SQL: &str = "count(*), count(*) FILTER (WHERE NOT success), \
     coalesce(sum(cost_nanos), 0)::BIGINT, coalesce(sum(tokens_in), 0)::BIGINT, \
     coalesce(sum(tokens_out), 0)::BIGINT, \
     percentile_disc(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY latency_ms)";

fn canonical(end: DateTime<Utc>, key: &str) -> Vec<Canonical> {
    let day = |t: DateTime<Utc>| t.duration_trunc(chrono::Duration::days(1)).unwrap_or(t);
    let from30 = day(end - chrono::Duration::days(SPAN_DAYS));
    let from24 = end - chrono::Duration::hours(24);
    let from7 = end - chrono::Duration::days(7);
    let (month, next) = (month_start(end), next_month(end));
    let today = day(end);
    let k = || Bind::Text(key.to_string());
    vec![
        Canonical {
            name: "30 days daily by api",
            path: format!(
                "/v1/stats?from={}&to={}&granularity=day&group_by=api",
                rfc(from30),
                rfc(end)
            ),
            sql: vec![(
                format!("SELECT date_trunc('day', ts, 'UTC') AS b, api, {MEASURES_SQL} FROM usage_events WHERE ts >= $1 AND ts < $2 GROUP BY 1, 2 ORDER BY 1, 2"),
                vec![Bind::Ts(from30), Bind::Ts(end)],
            )],
        },
        Canonical {
            name: "24 h hourly for one key",
            path: format!(
                "/v1/stats?from={}&to={}&granularity=hour&key={key}",
                rfc(from24),
                rfc(end)
            ),
            sql: vec![(
                format!("SELECT date_trunc('hour', ts, 'UTC') AS b, '' AS g, {MEASURES_SQL} FROM usage_events WHERE key = $3 AND ts >= $1 AND ts < $2 GROUP BY 1 ORDER BY 1"),
                vec![Bind::Ts(from24), Bind::Ts(end), k()],
            )],
        },
        Canonical {
            name: "this month top 50 keys by cost",
            path: format!(
                "/v1/keys?from={}&to={}&order_by=cost&limit=50",
                rfc(month),
                rfc(next)
            ),
            sql: vec![(
                format!("SELECT $1::timestamptz AS b, key, {MEASURES_SQL} FROM usage_events WHERE ts >= $1 AND ts < $2 GROUP BY key ORDER BY 5 DESC, key LIMIT 50"),
                vec![Bind::Ts(month), Bind::Ts(next)],
            )],
        },
        Canonical {
            name: "one key's stats page",
            path: format!("/v1/keys/{key}/stats?at={}", rfc(end)),
            sql: vec![
                (
                    format!("SELECT $1::timestamptz AS b, 'today' AS g, {MEASURES_SQL} FROM usage_events WHERE key = $3 AND ts >= $1 AND ts < $2"),
                    vec![Bind::Ts(today), Bind::Ts(end), k()],
                ),
                (
                    format!("SELECT $1::timestamptz AS b, 'this_month' AS g, {MEASURES_SQL} FROM usage_events WHERE key = $3 AND ts >= $1 AND ts < $2"),
                    vec![Bind::Ts(month), Bind::Ts(end), k()],
                ),
                (
                    format!("SELECT $1::timestamptz AS b, 'last_24h' AS g, {MEASURES_SQL} FROM usage_events WHERE key = $3 AND ts >= $1 AND ts < $2"),
                    vec![Bind::Ts(from24), Bind::Ts(end), k()],
                ),
                (
                    format!("SELECT $1::timestamptz AS b, 'model:' || coalesce(model, '') AS g, {MEASURES_SQL} FROM usage_events WHERE key = $3 AND ts >= $1 AND ts < $2 GROUP BY model"),
                    vec![Bind::Ts(month), Bind::Ts(end), k()],
                ),
                (
                    format!("SELECT $1::timestamptz AS b, 'api:' || api AS g, {MEASURES_SQL} FROM usage_events WHERE key = $3 AND ts >= $1 AND ts < $2 GROUP BY api"),
                    vec![Bind::Ts(month), Bind::Ts(end), k()],
                ),
            ],
        },
        Canonical {
            name: "7 days hourly error rate, one api",
            path: format!(
                "/v1/stats?from={}&to={}&granularity=hour&api=openai",
                rfc(from7),
                rfc(end)
            ),
            sql: vec![(
                format!("SELECT date_trunc('hour', ts, 'UTC') AS b, '' AS g, {MEASURES_SQL} FROM usage_events WHERE api = $3 AND ts >= $1 AND ts < $2 GROUP BY 1 ORDER BY 1"),
                vec![Bind::Ts(from7), Bind::Ts(end), Bind::Text("openai".into())],
            )],
        },
    ]
}

/// What both answers are compared on: per (bucket, group): requests, errors,
/// cost, tokens in, tokens out exactly, and p50/p95/p99 within the sketch error.
type Numbers = BTreeMap<(String, String), ([i64; 5], [Option<f64>; 3])>;

fn measures_of(v: &Value) -> ([i64; 5], [Option<f64>; 3]) {
    let i = |p: &str| v.pointer(p).and_then(Value::as_i64).unwrap_or(-1);
    let f = |p: &str| v.pointer(p).and_then(Value::as_f64);
    (
        [
            i("/requests"),
            i("/errors"),
            i("/cost_nanos"),
            i("/tokens_in"),
            i("/tokens_out"),
        ],
        [
            f("/latency_ms/p50"),
            f("/latency_ms/p95"),
            f("/latency_ms/p99"),
        ],
    )
}

/// Tally's answer in the comparison shape (empty rows left out, as the
/// GROUP BY has none).
fn tally_numbers(name: &str, v: &Value) -> Numbers {
    let mut out = tally_rows(name, v);
    out.retain(|_, (ints, _)| ints[0] != 0);
    out
}

fn tally_rows(name: &str, v: &Value) -> Numbers {
    let mut out = Numbers::new();
    let arr = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    match name {
        "30 days daily by api" => {
            for p in arr("/series") {
                let b = p["bucket"].as_str().unwrap_or_default().to_string();
                let g = p["group"]["api"].as_str().unwrap_or_default().to_string();
                out.insert((b, g), measures_of(&p));
            }
        }
        "this month top 50 keys by cost" => {
            for (i, k) in arr("/keys").iter().enumerate() {
                let g = format!("{i:02}:{}", k["key"].as_str().unwrap_or_default());
                out.insert((String::new(), g), measures_of(k));
            }
        }
        "one key's stats page" => {
            for w in ["today", "this_month", "last_24h"] {
                out.insert((String::new(), w.to_string()), measures_of(&v[w]));
            }
            for (field, dim) in [("/by_model", "model"), ("/by_api", "api")] {
                for r in arr(field) {
                    let g = format!("{dim}:{}", r[dim].as_str().unwrap_or_default());
                    out.insert((String::new(), g), measures_of(&r));
                }
            }
        }
        _ => {
            for p in arr("/series") {
                let b = p["bucket"].as_str().unwrap_or_default().to_string();
                out.insert((b, String::new()), measures_of(&p));
            }
        }
    }
    out
}

async fn baseline(pool: &PgPool, q: &Canonical) -> Result<Numbers, BenchError> {
    let mut out = Numbers::new();
    for (sql, binds) in &q.sql {
        let mut query = sqlx::query(sql);
        for b in binds {
            query = match b {
                Bind::Ts(t) => query.bind(*t),
                Bind::Text(s) => query.bind(s.clone()),
            };
        }
        let rows = query.fetch_all(pool).await?;
        for (i, r) in rows.iter().enumerate() {
            let b: DateTime<Utc> = r.try_get(0)?;
            let g: Option<String> = r.try_get(1)?;
            let mut g = g.unwrap_or_default();
            let bucket = if q.name.contains("daily") || q.name.contains("hourly") {
                rfc(b)
            } else {
                String::new()
            };
            if q.name.starts_with("this month") {
                g = format!("{i:02}:{g}");
            }
            let p: Option<Vec<Option<f64>>> = r.try_get(7)?;
            let p = p.unwrap_or_default();
            let pct = |i: usize| p.get(i).copied().flatten();
            let requests: i64 = r.try_get(2)?;
            if requests == 0 {
                continue;
            }
            out.insert(
                (bucket, g),
                (
                    [
                        requests,
                        r.try_get(3)?,
                        r.try_get(4)?,
                        r.try_get(5)?,
                        r.try_get(6)?,
                    ],
                    [pct(0), pct(1), pct(2)],
                ),
            );
        }
    }
    Ok(out)
}

fn compare(name: &str, tally: &Numbers, base: &Numbers) -> Result<(), BenchError> {
    let tally_keys: Vec<_> = tally.keys().collect();
    let base_keys: Vec<_> = base.keys().collect();
    if tally_keys != base_keys {
        return Err(BenchError::Check(format!(
            "{name}: Tally answers {} rows, the GROUP BY {} (first Tally {:?}, first GROUP BY {:?})",
            tally.len(),
            base.len(),
            tally_keys.first(),
            base_keys.first()
        )));
    }
    for (k, (ti, tp)) in tally {
        let (bi, bp) = &base[k];
        if ti != bi {
            return Err(BenchError::Check(format!(
                "{name} {k:?}: Tally {ti:?} vs GROUP BY {bi:?} (requests, errors, cost_nanos, tokens_in, tokens_out)"
            )));
        }
        for (t, b) in tp.iter().zip(bp) {
            let ok = match (t, b) {
                (Some(t), Some(b)) => (t - b).abs() <= RELATIVE_ERROR * b.abs() + 1e-9,
                (None, None) => true,
                _ => false,
            };
            if !ok {
                return Err(BenchError::Check(format!(
                    "{name} {k:?}: percentiles {tp:?} vs exact {bp:?}"
                )));
            }
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn p50_p99(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

async fn get_bytes(client: &reqwest::Client, url: &str) -> Result<usize, BenchError> {
    let r = client
        .get(url)
        .send()
        .await
        .map_err(|e| BenchError::Check(format!("{url}: {e}")))?;
    if !r.status().is_success() {
        return Err(BenchError::Check(format!("{url}: {}", r.status())));
    }
    let body = r
        .bytes()
        .await
        .map_err(|e| BenchError::Check(format!("{url}: {e}")))?;
    Ok(body.len())
}

async fn run_queries(
    params: &QueryBench,
    client: &reqwest::Client,
    base: &str,
    pool: &PgPool,
    end: DateTime<Utc>,
) -> Result<Vec<QueryFigures>, BenchError> {
    // The busiest key this month is the one the per-key questions ask about.
    let top = get_json(
        client,
        &format!(
            "{base}/v1/keys?from={}&to={}&order_by=requests&limit=1",
            rfc(month_start(end)),
            rfc(next_month(end))
        ),
    )
    .await?;
    let key = top["keys"][0]["key"]
        .as_str()
        .ok_or_else(|| BenchError::Check(format!("no key in {top}")))?
        .to_string();
    println!(
        "\n{:<34} {:>10} {:>10} {:>12} {:>12} {:>8} {:>8}",
        "query (key = busiest key)",
        "tally p50",
        "tally p99",
        "GROUP BY p50",
        "GROUP BY p99",
        "ratio",
        "goal"
    );
    let mut figures = Vec::new();
    for q in canonical(end, &key) {
        let url = format!("{base}{}", q.path);
        // Same numbers first: Tally's answer against the raw GROUP BY.
        let answer = get_json(client, &url).await?;
        let expected = baseline(pool, &q).await?;
        compare(q.name, &tally_numbers(q.name, &answer), &expected)?;
        for _ in 0..5 {
            get_json(client, &url).await?;
        }
        // Timed: request to last byte of the answer (the client's JSON parse
        // is not Tally's latency; the answer was checked above).
        let mut tally_ms = Vec::with_capacity(params.iterations);
        for _ in 0..params.iterations {
            let started = Instant::now();
            get_bytes(client, &url).await?;
            tally_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let mut base_ms = Vec::with_capacity(params.baseline_iterations);
        for _ in 0..params.baseline_iterations {
            let started = Instant::now();
            baseline(pool, &q).await?;
            base_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let (t50, t99) = p50_p99(tally_ms);
        let (b50, b99) = p50_p99(base_ms);
        let ratio = b50 / t50.max(1e-6);
        let goal = if t99 <= 5.0 { "p99 ok" } else { "p99 >5ms" };
        println!(
            "{:<34} {:>8.2}ms {:>8.2}ms {:>10.1}ms {:>10.1}ms {:>7.0}× {:>8}",
            q.name, t50, t99, b50, b99, ratio, goal
        );
        figures.push(QueryFigures {
            name: q.name,
            tally_ms: (t50, t99),
            baseline_ms: (b50, b99),
        });
    }
    println!(
        "\nratio = GROUP BY p50 / Tally p50 (Tally timed over HTTP with keep-alive, {} runs; GROUP BY over a pooled connection, {} runs). Goals: p99 ≤ 5 ms each; ≥ 100× on the 30-day queries.",
        params.iterations, params.baseline_iterations
    );
    println!("check: every answer equals the GROUP BY's (counts, errors, cost, tokens exactly; p50/p95/p99 within {:.1}%)", RELATIVE_ERROR * 100.0);
    Ok(figures)
}

/// The five canonical questions as Tally request paths, for timing them
/// while events arrive (`bench e2e`).
pub(super) fn canonical_paths(end: DateTime<Utc>, key: &str) -> Vec<(&'static str, String)> {
    canonical(end, key)
        .into_iter()
        .map(|q| (q.name, q.path))
        .collect()
}
