//! `tally bench restate`: how long a correction or a price change takes to
//! be restated by a running `tally serve`, against a full rebuild of the
//! same projection in the same run, and what it does to freshness, while
//! events keep arriving at half the measured append rate.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Utc};
use serde_json::{json, Value};
use tally::aggregate::spec::load_dir;
use tally::store::{Backend, Origin, Store, StoreOptions};

use super::serve::{call, get_json};
use super::{append_synthetic, fold_backlog, num_cpus, tempfile_dir, BenchError};
use crate::dev::devserver::TempPostgres;
use crate::dev::synth::{self, SynthConfig};

/// `tally bench restate`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestateBench {
    /// Database to measure: postgres or sqlite.
    #[arg(long, value_parser = super::parse_backend, default_value = "postgres")]
    pub backend: Backend,
    /// Events in the log.
    #[arg(long, default_value_t = 10_000_000)]
    pub events: usize,
    /// Their timestamps spread over this span before now.
    #[arg(long, default_value = "30d", value_parser = tally::duration::parse)]
    pub span: Duration,
    /// Projection specs (the shipped ones by default).
    #[arg(long, env = "TALLY_PROJECTIONS_DIR", default_value = "projections")]
    pub projections_dir: PathBuf,
}

/// One measured case.
#[derive(Debug, Clone)]
pub struct Case {
    /// What was changed.
    pub name: &'static str,
    /// From the request to an empty restatement queue.
    pub took: Duration,
    /// From the request to the last of each projection's restatements.
    pub per_projection: Vec<(String, Duration)>,
    /// Worst `as_of` age of any projection while it ran.
    pub worst_age: Duration,
}

/// Measured figures.
#[derive(Debug, Clone)]
pub struct RestateResult {
    /// Full rebuild of each projection alone from the log, in spec order.
    pub rebuilds: Vec<(String, Duration)>,
    /// The sum of those: rebuilding every projection a change touches.
    pub rebuild_all: Duration,
    /// Worst `as_of` age during the quiet period before the cases.
    pub quiet_age: Duration,
    /// The cases, in order.
    pub cases: Vec<Case>,
    /// Peak RSS of `tally serve` over the run.
    pub serve_peak_mib: f64,
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn check(e: impl std::fmt::Display) -> BenchError {
    BenchError::Check(e.to_string())
}

/// Runs the benchmark and prints figures and ratios.
pub async fn restate(params: &RestateBench) -> Result<RestateResult, BenchError> {
    let specs = load_dir(&params.projections_dir).map_err(check)?;
    let tmp = tempfile_dir()?;
    let cluster = match params.backend {
        Backend::Postgres => Some(TempPostgres::start(true)?),
        Backend::Sqlite => None,
    };
    let url = match &cluster {
        Some(pg) => pg.create_database("restate")?,
        None => format!("sqlite://{}", tmp.join("restate.db").display()),
    };
    println!(
        "backend {}: {} events over {}, {} projections, {} cores",
        params.backend.name(),
        params.events,
        humantime::format_duration(params.span),
        specs.len(),
        num_cpus()
    );
    let store = tally::store::connect(&url, &StoreOptions::default()).await?;
    store.migrate().await?;
    let now = Utc::now();
    let cfg = SynthConfig {
        seed: 21,
        apis: 10,
        keys: 1000,
        models: 20,
        id_prefix: "log".into(),
        correlated: true,
        arrival_order: Some(params.events),
        span: params.span,
        now,
    };
    let append = append_synthetic(&store, &cfg, params.events).await?;
    let rate = params.events as f64 / append.as_secs_f64();
    println!("append through the store: {rate:.0} ev/s");

    // Baseline: each projection folded from scratch alone, one after the
    // other; these are the tables `serve` then keeps up to date.
    let mut rebuilds = Vec::new();
    for spec in &specs {
        let started = Instant::now();
        fold_backlog(&store, std::slice::from_ref(spec)).await?;
        let took = started.elapsed();
        println!(
            "full rebuild of {} ({} events): {:.1}s",
            spec.name,
            params.events,
            took.as_secs_f64()
        );
        rebuilds.push((spec.name.clone(), took));
    }
    let rebuild_all: Duration = rebuilds.iter().map(|(_, d)| *d).sum();
    println!(
        "full rebuild of all {} projections: {:.1}s",
        specs.len(),
        rebuild_all.as_secs_f64()
    );
    store.close().await;

    // `TALLY_BENCH_SERVE_LOG_FILE` keeps the server's log after the run;
    // `TALLY_BENCH_SERVE_LOG=info` shows each restatement's rows and time.
    let log = std::env::var_os("TALLY_BENCH_SERVE_LOG_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.join("tally.log"));
    let (mut child, base) = super::serve::spawn(
        &url,
        &params.projections_dir,
        &log,
        &[
            // The month case reaches 30 days back.
            ("TALLY_LATE_ARRIVAL_HORIZON", "40d".into()),
            ("TALLY_RETENTION_REJECTED", "forever".into()),
            (
                "TALLY_LOG",
                std::env::var("TALLY_BENCH_SERVE_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ],
    )?;
    let result = run_cases(params, &specs, &url, &base, rate, now, &mut child)
        .await
        .map(|(quiet_age, cases)| RestateResult {
            rebuilds,
            rebuild_all,
            quiet_age,
            cases,
            serve_peak_mib: super::peak_rss_mib(&child),
        });
    let _ = child.kill();
    let _ = child.wait();
    drop(cluster);
    if std::env::var_os("TALLY_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let result = result?;
    println!();
    println!(
        "| change | restated in | each projection: restated in (its rebuild / that) | all projections' rebuild / restatement | worst as_of age while it ran |"
    );
    println!("|---|---|---|---|---|");
    for c in &result.cases {
        let took = c.took.as_secs_f64().max(1e-6);
        let each: Vec<String> = c
            .per_projection
            .iter()
            .map(|(name, d)| match ratio(&result.rebuilds, name, *d) {
                Some(r) => format!("{name} {:.2}s ({r:.0}x)", d.as_secs_f64()),
                None => format!("{name} {:.2}s", d.as_secs_f64()),
            })
            .collect();
        println!(
            "| {} | {:.2}s | {} | {:.0}x | {:.1}s |",
            c.name,
            c.took.as_secs_f64(),
            each.join(", "),
            result.rebuild_all.as_secs_f64() / took,
            c.worst_age.as_secs_f64()
        );
    }
    println!(
        "worst as_of age with no restatement (same live load): {:.1}s",
        result.quiet_age.as_secs_f64()
    );
    println!("serve peak RSS: {:.0} MiB", result.serve_peak_mib);
    if let Some(hour) = result.cases.first() {
        let worst = hour
            .per_projection
            .iter()
            .filter_map(|(name, d)| ratio(&result.rebuilds, name, *d).map(|r| (r, name)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((r, name)) = worst {
            println!(
                "goal: one key's hour restated at least 100x faster than a full rebuild of the same projection, in every projection: {r:.0}x at worst ({name}; {})",
                if r >= 100.0 { "met" } else { "NOT met" }
            );
        }
    }
    Ok(result)
}

/// How many times faster than its own full rebuild projection `name` was
/// restated.
fn ratio(rebuilds: &[(String, Duration)], name: &str, took: Duration) -> Option<f64> {
    rebuilds
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, r)| r.as_secs_f64() / took.as_secs_f64().max(1e-6))
}

/// The worst `as_of` age seen (ms) and the projection it was seen on.
type Worst = Arc<std::sync::Mutex<(u64, String)>>;

/// Worst `as_of` age over the projections, sampled every 100 ms into `worst`.
async fn watch_ages(store: Store, worst: Worst, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(states) = store.projections().projection_states().await {
            let now = Utc::now();
            let oldest = states
                .iter()
                .filter(|s| !s.name.contains('~'))
                .filter_map(|s| {
                    s.as_of
                        .map(|a| ((now - a).num_milliseconds().max(0) as u64, s.name.clone()))
                })
                .max();
            if let (Some(oldest), Ok(mut w)) = (oldest, worst.lock()) {
                if oldest.0 > w.0 {
                    *w = oldest;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes the worst age seen so far and starts over.
fn take(worst: &Worst) -> (Duration, String) {
    let (ms, name) = worst
        .lock()
        .map(|mut w| std::mem::take(&mut *w))
        .unwrap_or_default();
    (Duration::from_millis(ms), name)
}

/// Appends fresh events at `rate` per second until `stop`.
async fn live_load(store: Store, rate: f64, stop: Arc<AtomicBool>) -> Result<u64, BenchError> {
    let origin = Origin {
        source: "bench",
        subject: None,
    };
    let per_tick = ((rate / 10.0).round() as usize).max(1);
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let cfg = SynthConfig {
            seed: 22,
            apis: 10,
            keys: 1000,
            models: 20,
            id_prefix: "live".into(),
            correlated: true,
            arrival_order: None,
            span: Duration::from_secs(1),
            now: Utc::now(),
        };
        let events = synth::events(&cfg, sent, per_tick);
        for chunk in events.chunks(1000) {
            store.log().append(chunk, &[], &origin).await?;
        }
        sent += per_tick as u64;
    }
    Ok(sent)
}

/// Restatements still queued, per projection.
async fn pending(store: &Store) -> Result<Vec<(String, i64)>, BenchError> {
    Ok(store.corrections().pending_counts().await?)
}

async fn run_cases(
    params: &RestateBench,
    specs: &[tally::aggregate::Spec],
    url: &str,
    base: &str,
    rate: f64,
    now: DateTime<Utc>,
    child: &mut std::process::Child,
) -> Result<(Duration, Vec<Case>), BenchError> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| !r.status().is_success())
        .unwrap_or(true)
    {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(check(format!(
                "tally serve exited with {status} (TALLY_BENCH_KEEP=1 keeps its log)"
            )));
        }
        if Instant::now() > deadline {
            return Err(check("tally serve did not become ready"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = tally::store::connect(url, &StoreOptions::default()).await?;
    // The projections were rebuilt one after the other: the first one's
    // `as_of` is minutes old until serve's projector polls once. The quiet
    // figure starts when every projection has caught up under serve.
    let ready = Utc::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let states = store.projections().projection_states().await?;
        let caught_up = states
            .iter()
            .filter(|s| !s.name.ends_with("~rebuild"))
            .all(|s| s.as_of.is_some_and(|a| a >= ready));
        if caught_up && !states.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(check("serve's projectors did not catch up within 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let live = tokio::spawn(live_load(store.clone(), rate / 2.0, stop.clone()));
    println!("live load: {:.0} ev/s (half the append rate)", rate / 2.0);

    let worst: Worst = Arc::default();
    let watcher_stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_ages(
        store.clone(),
        worst.clone(),
        watcher_stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (quiet_age, _) = take(&worst);

    let hour = (now - chrono::Duration::days(3))
        .duration_trunc(chrono::Duration::hours(1))
        .map_err(check)?;
    let month_from = (now - params.span + chrono::Duration::hours(2))
        .duration_trunc(chrono::Duration::hours(1))
        .map_err(check)?;
    let top = get_json(
        &http,
        &format!(
            "{base}/v1/keys?from={}&to={}&order_by=requests&limit=1",
            rfc(hour),
            rfc(hour + chrono::Duration::hours(1))
        ),
    )
    .await?;
    let key = top["keys"][0]["key"]
        .as_str()
        .ok_or_else(|| check(format!("no key in {top}")))?
        .to_string();
    let models = get_json(
        &http,
        &format!(
            "{base}/v1/stats?from={}&to={}&group_by=model&series=false",
            rfc(hour),
            rfc(hour + chrono::Duration::hours(1))
        ),
    )
    .await?;
    let model = models["totals"][0]["group"]["model"]
        .as_str()
        .ok_or_else(|| check(format!("no model in {models}")))?
        .to_string();

    let cases: Vec<(&'static str, reqwest::Method, String, Value)> = vec![
        (
            "void one key's hour",
            reqwest::Method::POST,
            format!("{base}/v1/corrections"),
            json!({"id": "bench-hour", "reason": "bench restate",
                   "void": {"key": key, "from": rfc(hour), "to": rfc(hour + chrono::Duration::hours(1))}}),
        ),
        (
            "void one key's month",
            reqwest::Method::POST,
            format!("{base}/v1/corrections"),
            json!({"id": "bench-month", "reason": "bench restate",
                   "void": {"key": key, "from": rfc(month_from), "to": rfc(now)}}),
        ),
        (
            "one model's price for a month",
            reqwest::Method::PUT,
            format!("{base}/v1/prices"),
            json!({"model": model, "effective_from": rfc(month_from),
                   "input_per_mtok": "1.25", "output_per_mtok": "5"}),
        ),
    ];
    let mut out = Vec::new();
    for (name, method, url, body) in cases {
        take(&worst);
        let started = Instant::now();
        let answer = call(&http, method, &url, Some(&body)).await?;
        // Each projection is done when none of its restatements is queued
        // (the request queued them all before it answered).
        let mut done: Vec<(String, Duration)> = Vec::new();
        loop {
            let queued = pending(&store).await?;
            let at = started.elapsed();
            for spec in specs {
                let waiting = queued.iter().any(|(p, n)| *p == spec.name && *n > 0);
                if !waiting && !done.iter().any(|(p, _)| *p == spec.name) {
                    done.push((spec.name.clone(), at));
                }
            }
            if queued.iter().all(|(_, n)| *n == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = started.elapsed();
        // Let one more sample land after the queue emptied.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (worst_age, on) = take(&worst);
        println!(
            "{name}: restated in {:.2}s (answer: voided {}, restatements {}), worst as_of age {:.1}s ({on})",
            took.as_secs_f64(),
            answer["voided"],
            answer["restatements"],
            worst_age.as_secs_f64()
        );
        out.push(Case {
            name,
            took,
            per_projection: done,
            worst_age,
        });
    }
    // The hour is gone from the key's numbers.
    let after = get_json(
        &http,
        &format!(
            "{base}/v1/stats?key={key}&from={}&to={}&series=false",
            rfc(hour),
            rfc(hour + chrono::Duration::hours(1))
        ),
    )
    .await?;
    let left = after["totals"][0]["requests"].as_i64().unwrap_or(0);
    if left != 0 {
        return Err(check(format!(
            "{key} still has {left} requests in the voided hour"
        )));
    }
    stop.store(true, Ordering::Relaxed);
    watcher_stop.store(true, Ordering::Relaxed);
    let sent = live.await.map_err(check)??;
    let _ = watcher.await;
    println!("live events appended meanwhile: {sent}");
    store.close().await;
    Ok((quiet_age, out))
}
