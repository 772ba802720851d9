//! `bench e2e` (c) and (d): the highest live rate `tally serve` sustains
//! with its latency goals, and the canonical queries while it does.
//!
//! Each step publishes a live load at one rate (arrays of events from this
//! process, never from `serve`'s) for a fixed time, while probes, one at a
//! time, measure publish → row in `agg_by_key_hour` (freshness) and publish →
//! first alert on NATS, and the five canonical queries of `bench query` are
//! timed over HTTP. A step passes when both p99 goals hold and the publisher
//! kept its rate. The search grows the rate by half while steps pass and
//! bisects once one fails. Between steps the service catches up, and its peak
//! RSS is reset, so each step's figures are its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{peak_rss_mib, BenchError};

/// Freshness goal: publish → row in `agg_by_key_hour`, p99.
pub const FRESHNESS_P99_MS: f64 = 1000.0;
/// Alert goal: publish → first alert received, p99.
pub const ALERT_P99_MS: f64 = 2000.0;
/// Query goal while the sustained load runs: each canonical query's p99
/// (the quiet goal, 5 ms at 10M events, is `bench query`'s).
pub const QUERY_UNDER_LOAD_P99_MS: f64 = 20.0;
/// How often a probe is published (they overlap).
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A publisher at less than this share of the asked rate did not keep it.
const PUBLISHER_SLACK: f64 = 0.95;

/// What a step runs against.
pub struct Target<'a> {
    pub js: &'a async_nats::jetstream::Context,
    pub client: &'a async_nats::Client,
    pub db_url: &'a str,
    pub http: &'a str,
    /// The api the probes use (the rules scoped to it fire for a probe).
    pub probe_api: &'a str,
    /// Alerts each probe raises.
    pub per_probe: usize,
    pub serve: &'a mut std::process::Child,
}

/// How a step's live events look.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub seconds: u64,
    pub per_message: usize,
    /// Timestamps over the last `span` (in arrival order, 1% late).
    pub span: Option<Duration>,
    /// Every field drawn independently (the high-cardinality shape).
    pub independent: bool,
    pub seed: u64,
}

/// One step's figures.
#[derive(Debug, Clone)]
pub struct StepFigures {
    pub asked: f64,
    pub published: f64,
    pub fresh_ms: (f64, f64),
    pub alert_ms: (f64, f64),
    pub probes: usize,
    pub rss_mib: f64,
    /// (query, p50 ms, p99 ms).
    pub queries: Vec<(&'static str, f64, f64)>,
    /// Time the service needed after the step to fold its backlog.
    pub settle: Duration,
}

impl StepFigures {
    pub fn publisher_kept_up(&self) -> bool {
        self.published >= self.asked * PUBLISHER_SLACK
    }

    pub fn passed(&self) -> bool {
        self.publisher_kept_up()
            && self.fresh_ms.1 <= FRESHNESS_P99_MS
            && self.alert_ms.1 <= ALERT_P99_MS
    }
}

/// The search's outcome: every step, and the best passing one.
#[derive(Debug, Clone, Default)]
pub struct Search {
    pub steps: Vec<StepFigures>,
}

impl Search {
    /// The highest rate that passed (as published), with its figures.
    pub fn best(&self) -> Option<&StepFigures> {
        self.steps
            .iter()
            .filter(|s| s.passed())
            .max_by(|a, b| a.published.total_cmp(&b.published))
    }

    /// Peak RSS over every step.
    pub fn peak_rss(&self) -> f64 {
        self.steps.iter().map(|s| s.rss_mib).fold(0.0, f64::max)
    }
}

/// Steps the rate from `start` ev/s: ×1.5 while steps pass, bisecting
/// between the best pass and the lowest failure once one fails, for at most
/// `steps` steps (fewer once the bracket is within 10%).
pub async fn search(
    t: &mut Target<'_>,
    load: Load,
    start: f64,
    steps: usize,
) -> Result<Search, BenchError> {
    let mut out = Search::default();
    let (mut pass, mut fail): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = start.max(100.0);
    for i in 0..steps.max(1) {
        let load = Load {
            seed: load.seed + i as u64,
            ..load
        };
        let fig = step(t, load, rate).await?;
        println!(
            "    step {}: asked {:>7.0} ev/s, published {:>7.0}{}  freshness p50/p99 {:>5.0}/{:>5.0} ms  alert p50/p99 {:>5.0}/{:>5.0} ms  ({} probes)  peak RSS {:.0} MiB  caught up {:.1}s after  {}",
            i + 1,
            fig.asked,
            fig.published,
            if fig.publisher_kept_up() { "" } else { " (the publisher could not keep the asked rate)" },
            fig.fresh_ms.0,
            fig.fresh_ms.1,
            fig.alert_ms.0,
            fig.alert_ms.1,
            fig.probes,
            fig.rss_mib,
            fig.settle.as_secs_f64(),
            if fig.passed() { "pass" } else { "FAIL" },
        );
        for (name, p50, p99) in &fig.queries {
            println!("        query {name:<34} p50 {p50:>7.2} ms  p99 {p99:>7.2} ms");
        }
        if fig.passed() {
            pass = Some(pass.map_or(fig.published, |p: f64| p.max(fig.published)));
        } else if fig.publisher_kept_up() {
            fail = Some(fail.map_or(rate, |f: f64| f.min(rate)));
        }
        let kept_up = fig.publisher_kept_up();
        out.steps.push(fig);
        if !kept_up {
            // Asking more of a publisher that is already short measures nothing.
            break;
        }
        rate = match (pass, fail) {
            (Some(p), Some(f)) if f / p <= 1.1 => break,
            (Some(p), Some(f)) => (p + f) / 2.0,
            (Some(p), None) => p * 1.5,
            (None, Some(f)) => f / 2.0,
            (None, None) => rate * 1.5,
        };
    }
    Ok(out)
}

/// One step: live load at `rate` ev/s for `load.seconds`, probes and queries beside it.
async fn step(t: &mut Target<'_>, load: Load, rate: f64) -> Result<StepFigures, BenchError> {
    reset_peak_rss(t.serve);
    let count = (rate * load.seconds as f64).max(1.0) as usize;
    let per_message = load.per_message.max(1);
    let cfg = crate::dev::emit::EmitConfig {
        count,
        rate: Some(rate / per_message as f64),
        batch: per_message,
        apis: 10,
        keys: 1000,
        models: 20,
        seed: load.seed,
        id_prefix: format!("live{}-", load.seed),
        progress: false,
        realistic: true,
        independent: load.independent,
        span: load.span,
        ..crate::dev::emit::EmitConfig::default()
    };
    let emitter = {
        let js = t.js.clone();
        tokio::spawn(async move { crate::dev::emit::emit(&js, &cfg).await })
    };
    let running = || !emitter.is_finished();
    let http = reqwest::Client::new();
    let key = busiest_key(&http, t.http).await?;
    let paths = super::query::canonical_paths(chrono::Utc::now(), &key);
    let queries = time_queries(&http, t.http, &paths, &emitter);
    let probes = probe(t, &running);
    let (queries, probes) = tokio::join!(queries, probes);
    let (mut fresh, mut alert) = probes?;
    let queries = queries?;
    let (summary, _) = emitter
        .await
        .map_err(|e| BenchError::Check(format!("load task: {e}")))?
        .map_err(|e| BenchError::Check(e.to_string()))?;
    let rss_mib = peak_rss_mib(t.serve);
    let settled = Instant::now();
    super::wait_drained(t.js, t.serve, Duration::from_secs(600)).await?;
    super::project::wait_projections_caught_up(t.db_url, Duration::from_secs(600)).await?;
    if fresh.is_empty() {
        return Err(BenchError::Check("no probe was measured".into()));
    }
    fresh.sort_by(f64::total_cmp);
    alert.sort_by(f64::total_cmp);
    let pick = |v: &[f64]| (super::nearest_rank(v, 0.5), super::nearest_rank(v, 0.99));
    Ok(StepFigures {
        asked: rate,
        published: summary.events as f64 / summary.seconds.max(1e-9),
        fresh_ms: pick(&fresh),
        alert_ms: pick(&alert),
        probes: fresh.len(),
        rss_mib,
        queries,
        settle: settled.elapsed(),
    })
}

/// Publishes a probe every [`PROBE_EVERY`] while `running`: each a new key
/// on the probe api with enough tokens to cross every token rule scoped to
/// it. Probes overlap, so a slow one does not thin the sample. One watcher
/// polls the aggregate table for the probes not yet visible; the alert
/// subscription records each key's first alert. Checks that every probe
/// raised exactly its alerts and that nothing else alerted.
async fn probe(
    t: &Target<'_>,
    running: &dyn Fn() -> bool,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    let mut alerts = t
        .client
        .subscribe("usage.alerts.>")
        .await
        .map_err(|e| BenchError::Check(format!("subscribe: {e}")))?;
    let db = super::project::Probe::connect(t.db_url).await?;
    // key → (published at, visible after, first alert after)
    type Seen = (Instant, Option<Duration>, Option<Duration>);
    let mut probes: HashMap<String, Seen> = HashMap::new();
    let mut received: HashMap<String, usize> = HashMap::new();
    let mut n = 0usize;
    let mut next_probe = Instant::now();
    loop {
        let publishing = running();
        if publishing && Instant::now() >= next_probe {
            n += 1;
            let key = format!("probe-{n}-{:08x}", rand::random::<u32>());
            let body = serde_json::json!({
                "id": key, "ts": chrono::Utc::now().to_rfc3339(), "api": t.probe_api, "key": key,
                "tokens_in": tally::event::validate::MAX_TOKENS,
            });
            let started = super::publish_probe(t.js, &body).await?;
            probes.insert(key, (started, None, None));
            next_probe = started + PROBE_EVERY;
        }
        // Alerts that arrived meanwhile.
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1), alerts.next()).await
        {
            let Some(k) = alert_key(&m.payload) else {
                continue;
            };
            *received.entry(k.clone()).or_default() += 1;
            if let Some(p) = probes.get_mut(&k) {
                p.2.get_or_insert_with(|| p.0.elapsed());
            }
        }
        for (key, p) in probes.iter_mut().filter(|(_, p)| p.1.is_none()) {
            if db.visible(key).await? {
                p.1 = Some(p.0.elapsed());
            }
        }
        let open = probes
            .values()
            .filter(|p| p.1.is_none() || p.2.is_none())
            .count();
        if !publishing && open == 0 {
            break;
        }
        if let Some(oldest) = probes
            .values()
            .filter(|p| p.1.is_none() || p.2.is_none())
            .map(|p| p.0)
            .min()
        {
            // An overloaded step is a failed step, not an error: wait for
            // its probes (so none is left to count in the next, slower
            // step), and its latencies say how far off it was.
            if oldest.elapsed() > Duration::from_secs(300) {
                return Err(BenchError::Check(format!(
                    "{open} probes not folded or not alerted within 300s"
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Collect the stragglers, then check every probe got exactly its alerts.
    let settle = Instant::now() + Duration::from_secs(3);
    while let Ok(Some(m)) = tokio::time::timeout(
        settle.saturating_duration_since(Instant::now()),
        alerts.next(),
    )
    .await
    {
        if let Some(k) = alert_key(&m.payload) {
            *received.entry(k).or_default() += 1;
        }
    }
    let wrong: Vec<_> = received
        .iter()
        .filter(|(k, c)| !k.starts_with("probe-") || **c != t.per_probe)
        .collect();
    if !wrong.is_empty() || received.len() != n {
        return Err(BenchError::Check(format!(
            "each of {n} probes should raise exactly {} alerts; got {} keys, wrong: {wrong:?}",
            t.per_probe,
            received.len()
        )));
    }
    let ms = |d: Option<Duration>| d.unwrap_or_default().as_secs_f64() * 1000.0;
    Ok((
        probes.values().map(|p| ms(p.1)).collect(),
        probes.values().map(|p| ms(p.2)).collect(),
    ))
}

/// The group key of a `firing` notification; `None` for the others (a probe
/// of an earlier step resolving as its window slides past it).
fn alert_key(payload: &[u8]) -> Option<String> {
    let body = serde_json::from_slice::<serde_json::Value>(payload).ok();
    match body {
        Some(b) if b["state"] == "firing" => {
            Some(b["group"]["key"].as_str().unwrap_or_default().to_string())
        }
        Some(_) => None,
        // Unreadable: counted under an empty key, which fails the check.
        None => Some(String::new()),
    }
}

/// Asks the five canonical queries in turn until the load ends; (name, p50, p99) each.
async fn time_queries<T>(
    http: &reqwest::Client,
    base: &str,
    paths: &[(&'static str, String)],
    load: &tokio::task::JoinHandle<T>,
) -> Result<Vec<(&'static str, f64, f64)>, BenchError> {
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    while !load.is_finished() {
        for (i, (_, path)) in paths.iter().enumerate() {
            let started = Instant::now();
            let r = http
                .get(format!("{base}{path}"))
                .send()
                .await
                .map_err(|e| BenchError::Check(format!("{path}: {e}")))?;
            let status = r.status();
            let body = r
                .bytes()
                .await
                .map_err(|e| BenchError::Check(format!("{path}: {e}")))?;
            if !status.is_success() {
                return Err(BenchError::Check(format!(
                    "{path}: {status} {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            ms[i].push(started.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(paths
        .iter()
        .zip(ms)
        .map(|((name, _), mut v)| {
            v.sort_by(f64::total_cmp);
            if v.is_empty() {
                (*name, 0.0, 0.0)
            } else {
                (
                    *name,
                    super::nearest_rank(&v, 0.5),
                    super::nearest_rank(&v, 0.99),
                )
            }
        })
        .collect())
}

/// The key with the most requests this month (the per-key queries ask about it).
async fn busiest_key(http: &reqwest::Client, base: &str) -> Result<String, BenchError> {
    let now = chrono::Utc::now();
    let from =
        (now - chrono::Duration::days(31)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (now + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let url = format!("{base}/v1/keys?from={from}&to={to}&order_by=requests&limit=1");
    let v = super::serve::get_json(http, &url).await?;
    v["keys"][0]["key"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| BenchError::Check(format!("no key in {v}")))
}

/// Resets the process's peak RSS (`VmHWM`) so the next phase reports its own.
pub fn reset_peak_rss(child: &std::process::Child) {
    // "5" resets the peak resident set size (proc(5), clear_refs).
    let _ = std::fs::write(format!("/proc/{}/clear_refs", child.id()), "5");
}
