//! `tally bench alerts`: the cost of alert rules on ingest, and how soon an
//! alert follows the event that crosses its threshold.
//!
//! In one run, on one database server and one nats-server:
//! (a) `tally serve` drains a pre-filled stream with no rules: the ingest rate;
//! (b) the same with N rules grouped by key (scoped by api, over several
//!     measures and windows): the ingest rate with rules, and the ratio;
//! (c) a live load at half of (a) while probes publish one crossing event
//!     each (a new key, enormous token count): publish → alert received by a
//!     NATS subscriber, p50/p99. Every probe must produce exactly its alerts.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{
    nats_with_usage_stream, num_cpus, peak_rss_mib, spawn_tally_with, stop, tempfile_dir,
    wait_drained, BenchError,
};
use crate::dev::synth::SynthConfig;
use tally::alert::rule::RuleSpec;
use tally::store::alerts::WriteMode;
use tally::store::{Backend, StoreOptions};

/// Parameters of `tally bench alerts`.
#[derive(Debug, Clone, clap::Args)]
pub struct AlertsBench {
    /// Database to measure: postgres or sqlite.
    #[arg(long, value_parser = super::parse_backend, default_value = "postgres")]
    pub backend: Backend,
    /// Rules to install (grouped by key, scoped by api).
    #[arg(long, default_value_t = 1_000)]
    pub rules: usize,
    /// Distinct API keys of the load.
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Events drained for each ingest rate.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Seconds of live load with latency probes.
    #[arg(long, default_value_t = 30)]
    pub live_seconds: u64,
    /// Projection specs.
    #[arg(long, env = "TALLY_PROJECTIONS_DIR", default_value = "projections")]
    pub projections_dir: std::path::PathBuf,
    /// Live load as a fraction of the measured ingest rate.
    #[arg(long, default_value_t = 0.5)]
    pub load_fraction: f64,
    /// Pairs of ingest-rate runs without/with rules, alternated.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), default_value_t = 2)]
    pub rounds: usize,
}

/// Measured figures.
#[derive(Debug, Clone)]
pub struct AlertsResult {
    /// (a) ev/s without rules.
    pub ingest_without: f64,
    /// (b) ev/s with the rules.
    pub ingest_with: f64,
    /// (c) publish → alert received, ms: p50, p99, max.
    pub latency_ms: (f64, f64, f64),
}

const MEASURES: [&str; 4] = ["tokens", "requests", "errors", "cost"];
const WINDOWS: [&str; 3] = ["5m", "15m", "1h"];

/// The bench's rules: rule `i` watches api `i % apis`, grouped by key, with a
/// measure and window from small cycles and a threshold the load never reaches.
pub(super) fn rules(n: usize, apis: &[String]) -> Result<Vec<RuleSpec>, BenchError> {
    (0..n)
        .map(|i| {
            let measure = MEASURES[i % MEASURES.len()];
            let json = serde_json::json!({
                "name": format!("bench-{i:04}"),
                "severity": "warning",
                "measure": measure,
                "window": WINDOWS[(i / MEASURES.len()) % WINDOWS.len()],
                "scope": {"api": apis[i % apis.len()]},
                "group_by": ["key"],
                // Reached only by a probe (10^9 tokens, the most one event may carry).
                "threshold": if measure == "tokens" { 5.0e8 } else { 1.0e12 },
            });
            serde_json::from_value(json)
                .map_err(|e| BenchError::Check(format!("bench rule {i}: {e}")))
        })
        .collect()
}

/// Alerts a probe on `api` raises: one per tokens rule scoped to that api.
pub(super) fn alerts_per_probe(rules: &[RuleSpec], api: &str) -> usize {
    rules
        .iter()
        .filter(|r| r.measure == tally::alert::rule::Measure::Tokens)
        .filter(|r| {
            matches!(r.scope.get("api"), Some(tally::alert::rule::ScopeValue::One(a)) if a == api)
        })
        .count()
}

/// Runs the benchmark and prints figures and ratios.
pub async fn alerts(params: &AlertsBench) -> Result<AlertsResult, BenchError> {
    let specs = super::load_specs(&params.projections_dir)?;
    let tmp = tempfile_dir()?;
    let dbs = super::Databases::start(params.backend, &tmp)?;
    let fresh_db = |name: &str| dbs.fresh(name);
    let synth = SynthConfig {
        seed: 11,
        apis: 10,
        keys: params.keys,
        models: 20,
        id_prefix: "x".into(),
        ..SynthConfig::default()
    };
    let apis: Vec<String> = crate::dev::synth::events(&synth, 0, 5_000)
        .into_iter()
        .map(|e| e.api)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    println!(
        "backend {}: {} rules grouped by key over {} keys, {} apis; {} events drained per rate; {} cores",
        params.backend.name(),
        params.rules,
        params.keys,
        apis.len(),
        params.events,
        num_cpus()
    );
    let env = |log: &str| {
        vec![
            (
                "TALLY_PROJECTIONS_DIR",
                params.projections_dir.display().to_string(),
            ),
            (
                "TALLY_ALERTS_MIN_INTERVAL",
                std::env::var("TALLY_ALERTS_MIN_INTERVAL").unwrap_or_else(|_| "250ms".into()),
            ),
            (
                "TALLY_LOG",
                std::env::var("TALLY_BENCH_CHILD_LOG").unwrap_or_else(|_| log.into()),
            ),
        ]
    };
    let drain = |db: String, seed: u64, name: &'static str| {
        let env = env("warn");
        let tmp = tmp.clone();
        let keys = params.keys;
        let events = params.events;
        async move {
            let (nats, _client, js) = nats_with_usage_stream().await?;
            let cfg = crate::dev::emit::EmitConfig {
                count: events,
                apis: 10,
                keys,
                models: 20,
                seed,
                id_prefix: name.into(),
                progress: false,
                realistic: true,
                ..crate::dev::emit::EmitConfig::default()
            };
            crate::dev::emit::emit(&js, &cfg)
                .await
                .map_err(|e| BenchError::Check(e.to_string()))?;
            let started = Instant::now();
            let env_ref: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
            let mut tally =
                spawn_tally_with(&db, &nats.url(), &tmp.join(format!("{name}.log")), &env_ref)?;
            wait_drained(&js, &mut tally, Duration::from_secs(3600)).await?;
            let rate = events as f64 / started.elapsed().as_secs_f64();
            stop(tally);
            Ok::<_, BenchError>(rate)
        }
    };

    // (a) and (b), alternated `rounds` times on fresh databases (this machine
    // is shared and noisy: one pair can differ by ±15% either way).
    let installed = rules(params.rules, &apis)?;
    for r in &installed {
        r.validate("", &specs)
            .map_err(|e| BenchError::Check(format!("bench rule {}: {e}", r.name)))?;
    }
    let (mut without_sum, mut with_sum) = (0.0, 0.0);
    let mut with_db = String::new();
    for round in 0..params.rounds.max(1) {
        let without = drain(fresh_db(&format!("without{round}"))?, 21, "without").await?;
        let db = fresh_db(&format!("with{round}"))?;
        let store = tally::store::connect(&db, &StoreOptions::default()).await?;
        store.migrate().await?;
        for r in &installed {
            store
                .alerts()
                .write_rule(&r.name, &r.to_json(), "bench", WriteMode::Upsert)
                .await?;
        }
        store.close().await;
        let with = drain(db.clone(), 22, "with").await?;
        println!(
            "    round {}: (a) without rules {without:>7.0} ev/s, (b) with {} rules {with:>7.0} ev/s, ratio {:.2}",
            round + 1,
            params.rules,
            with / without
        );
        without_sum += without;
        with_sum += with;
        with_db = db;
    }
    let rounds = params.rounds.max(1) as f64;
    let (ingest_without, ingest_with) = (without_sum / rounds, with_sum / rounds);
    println!("(a) NATS ingest without rules (mean): {ingest_without:>9.0} ev/s");
    println!(
        "(b) NATS ingest with {} rules (mean):  {ingest_with:>9.0} ev/s   ratio (b)/(a) {:.2}   goal ≥ 0.90",
        params.rules,
        ingest_with / ingest_without
    );

    // (c) Live load at half of (a), probes crossing thresholds.
    let (nats, client, js) = nats_with_usage_stream().await?;
    let tally = spawn_tally_with(&with_db, &nats.url(), &tmp.join("live.log"), &{
        let e = env("warn");
        e.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()
    })?;
    let live_rate = ingest_without * params.load_fraction;
    let rate = live_rate;
    // The child is stopped whatever happens below.
    let probed = async {
        let mut alerts = client
            .subscribe("usage.alerts.>")
            .await
            .map_err(|e| BenchError::Check(format!("subscribe: {e}")))?;
        let rate = live_rate;
        let cfg = crate::dev::emit::EmitConfig {
            count: (rate * params.live_seconds as f64).max(1.0) as usize,
            rate: Some(rate),
            apis: 10,
            keys: params.keys,
            models: 20,
            seed: 23,
            id_prefix: "live".into(),
            progress: false,
            realistic: true,
            ..crate::dev::emit::EmitConfig::default()
        };
        let load = {
            let js = js.clone();
            tokio::spawn(async move { crate::dev::emit::emit(&js, &cfg).await })
        };
        // Rules a probe on apis[0] crosses: tokens rules on that api.
        let per_probe = alerts_per_probe(&installed, &apis[0]);
        let mut latencies = Vec::new();
        let mut folded = Vec::new();
        let probe = super::project::Probe::connect(&with_db).await?;
        let mut received: HashMap<String, usize> = HashMap::new();
        let mut n = 0u64;
        // Let the server start and the relay connect before the first probe.
        tokio::time::sleep(Duration::from_secs(3)).await;
        while !load.is_finished() {
            n += 1;
            let key = format!("probe-{n}-{:08x}", rand::random::<u32>());
            let body = serde_json::json!({
                "id": key, "ts": chrono::Utc::now().to_rfc3339(), "api": apis[0], "key": key,
                "tokens_in": tally::event::validate::MAX_TOKENS,
            });
            let started = super::publish_probe(&js, &body).await?;
            // The alert and the probe's minute row, watched at once.
            let fold = async {
                loop {
                    if probe.visible_in("agg_alerts_minute_minute", &key).await? {
                        return Ok::<_, BenchError>(started.elapsed());
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        return Err(BenchError::Check(format!(
                            "probe {key} not folded after 30s"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            let alert = async {
                loop {
                    let next = tokio::time::timeout(Duration::from_secs(30), alerts.next())
                        .await
                        .map_err(|_| BenchError::Check(format!("no alert for {key} within 30s")))?
                        .ok_or_else(|| BenchError::Check("alert subscription closed".into()))?;
                    let body: serde_json::Value = serde_json::from_slice(&next.payload)
                        .map_err(|e| BenchError::Check(format!("alert body: {e}")))?;
                    let k = body["group"]["key"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    *received.entry(k.clone()).or_default() += 1;
                    if k == key {
                        return Ok::<_, BenchError>(started.elapsed());
                    }
                }
            };
            let (fold, alert) = tokio::join!(fold, alert);
            folded.push(fold?.as_secs_f64() * 1000.0);
            latencies.push(alert?.as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        load.await
            .map_err(|e| BenchError::Check(format!("load task: {e}")))?
            .map_err(|e| BenchError::Check(e.to_string()))?;
        // Collect the stragglers, then check every probe got exactly its alerts.
        let settle = Instant::now() + Duration::from_secs(5);
        while let Ok(Some(m)) = tokio::time::timeout(
            settle.saturating_duration_since(Instant::now()),
            alerts.next(),
        )
        .await
        {
            if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                let k = body["group"]["key"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                *received.entry(k).or_default() += 1;
            }
        }
        Ok::<_, BenchError>((n, per_probe, latencies, received, folded))
    }
    .await;
    let rss = peak_rss_mib(&tally);
    stop(tally);
    let (n, per_probe, mut latencies, received, mut folded) = probed?;
    let wrong: Vec<_> = received
        .iter()
        .filter(|(k, c)| !k.starts_with("probe-") || **c != per_probe)
        .collect();
    if !wrong.is_empty() || received.len() as u64 != n {
        return Err(BenchError::Check(format!(
            "each of {n} probes should raise exactly {per_probe} alerts; got {} keys, wrong: {wrong:?}",
            received.len()
        )));
    }
    latencies.sort_by(f64::total_cmp);
    if latencies.is_empty() {
        return Err(BenchError::Check("no probe was measured".into()));
    }
    let pick = |q: f64| super::nearest_rank(&latencies, q);
    let (p50, p99, max) = (pick(0.5), pick(0.99), pick(1.0));
    folded.sort_by(f64::total_cmp);
    let fold_pick = |q: f64| super::nearest_rank(&folded, q);
    println!(
        "    publish → probe row in agg_alerts_minute_minute (projection freshness): p50 {:.0} ms, p99 {:.0} ms",
        fold_pick(0.5),
        fold_pick(0.99)
    );
    println!(
        "(c) live load {rate:.0} ev/s: publish → first alert received p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms over {n} probes ({per_probe} alerts each, all exact)   goal p99 ≤ 2000 ms   tally peak RSS {rss:.0} MiB"
    );
    drop(nats);
    if std::env::var_os("TALLY_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(AlertsResult {
        ingest_without,
        ingest_with,
        latency_ms: (p50, p99, max),
    })
}
