//! `tally bench project`: how fast projectors fold, against how fast the same
//! events are appended (measured first, in the same run), and how fresh the
//! hourly tables are under a live NATS load of half the append rate.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{
    append_synthetic, fold_backlog, nats_with_usage_stream, num_cpus, peak_rss_mib,
    spawn_tally_with, stop, tempfile_dir, wait_drained, BenchError,
};
use crate::dev::devserver::TempPostgres;
use crate::dev::synth::SynthConfig;
use tally::aggregate::spec::{load_dir, Granularity};
use tally::projection::projector::MAX_DELTA_ROWS;
use tally::store::{Backend, Store, StoreOptions};

/// Parameters of `tally bench project`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectBench {
    /// Database to measure: postgres or sqlite.
    #[arg(long, value_parser = super::parse_backend)]
    pub backend: Backend,
    /// Backlog size.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Seconds of live load for the freshness measurement (0: skip it).
    #[arg(long, default_value_t = 20)]
    pub live_seconds: u64,
    /// Projection specs to fold (the shipped ones by default).
    #[arg(long, env = "TALLY_PROJECTIONS_DIR", default_value = "projections")]
    pub projections_dir: PathBuf,
    /// Draw every field independently (the worst case for folding) instead of realistic keys.
    #[arg(long)]
    pub uniform: bool,
    /// Timestamps spread over this span before now (density decides how many
    /// events share an aggregate row).
    #[arg(long, default_value = "1h", value_parser = tally::duration::parse)]
    pub span: Duration,
}

/// Measured figures.
#[derive(Debug, Clone)]
pub struct ProjectResult {
    /// (a) events per second through `Store::append`.
    pub append_rate: f64,
    /// (b) events per second folded into every projection from a backlog.
    pub fold_rate: f64,
    /// (c) publish → visible in `agg_by_key_hour`, milliseconds: p50, p99, max.
    pub freshness_ms: Option<(f64, f64, f64)>,
}

/// Runs the benchmark and prints figures and ratios.
pub async fn project(params: &ProjectBench) -> Result<ProjectResult, BenchError> {
    let specs = load_dir(&params.projections_dir).map_err(|e| BenchError::Check(e.to_string()))?;
    if !specs
        .iter()
        .any(|s| s.name == "by_key" && s.granularities.contains(&Granularity::Hour))
    {
        return Err(BenchError::Check("the freshness probe reads agg_by_key_hour: the specs need `by_key` with an hour granularity".into()));
    }
    let tmp = tempfile_dir()?;
    let cluster = match params.backend {
        Backend::Postgres => Some(TempPostgres::start(true)?),
        Backend::Sqlite => None,
    };
    let url = match &cluster {
        Some(pg) => pg.create_database("project")?,
        None => format!("sqlite://{}", tmp.join("project.db").display()),
    };
    println!(
        "backend {}: {} events over {} ({}), {} projections ({}), {} cores",
        params.backend.name(),
        params.events,
        humantime::format_duration(params.span),
        if params.uniform {
            "uniform: every field and timestamp drawn independently"
        } else {
            "arriving in time order (1% late), 1,000 keys each calling one API with one or two models, 10 users per key"
        },
        specs.len(),
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        num_cpus()
    );
    let store = tally::store::connect(&url, &StoreOptions::default()).await?;
    store.migrate().await?;

    // (a) The backlog, appended the way ingest appends (1,000 per transaction).
    let synth_cfg = SynthConfig {
        seed: 5,
        apis: 10,
        keys: 1000,
        models: 20,
        id_prefix: "fold".into(),
        correlated: !params.uniform,
        arrival_order: (!params.uniform).then_some(params.events),
        span: params.span,
        ..SynthConfig::default()
    };
    let append = append_synthetic(&store, &synth_cfg, params.events).await?;
    let append_rate = params.events as f64 / append.as_secs_f64();
    println!(
        "(a) append through the store:             {append_rate:>9.0} ev/s ({:.1}s)",
        append.as_secs_f64()
    );

    // Where the fold's time goes: the log read alone, then read + fold in memory.
    let read = read_log_through(&store, None).await?;
    let folded = read_log_through(&store, Some(&specs)).await?;
    let chunk = tally::projection::projector::READ_CHUNK;
    for (what, took) in [
        ("read + fold in memory, no writes:".to_string(), folded),
        (format!("log read alone (chunks of {chunk}):"), read),
    ] {
        println!(
            "    {what:<35}   {:>9.0} ev/s ({:.1}s)",
            params.events as f64 / took.as_secs_f64(),
            took.as_secs_f64()
        );
    }

    // (b) Every projection folds the backlog in the one group `tally serve` runs them in.
    let started = Instant::now();
    let stats = fold_backlog(&store, &specs).await?;
    let fold = started.elapsed();
    let fold_rate = params.events as f64 / fold.as_secs_f64();
    println!(
        "(b) fold of the backlog, all projections: {fold_rate:>9.0} ev/s ({:.1}s)   ratio (b)/(a) {:.2}   goal ≥ 2",
        fold.as_secs_f64(),
        fold_rate / append_rate
    );
    println!(
        "    {} transactions upserted {} aggregate rows ({:.2} per event)",
        stats.transactions,
        stats.rows,
        stats.rows as f64 / params.events as f64
    );
    let ts: Vec<_> = crate::dev::synth::events(&synth_cfg, 0, params.events)
        .iter()
        .map(|e| e.ts)
        .collect();
    check_totals(&store, &specs, &ts).await?;

    // (c) Freshness: `tally serve` ingests from NATS at half the append rate
    // while probes are published one at a time and looked for in the hourly table.
    let mut freshness_ms = None;
    if params.live_seconds > 0 {
        freshness_ms = Some(freshness(params, &url, &tmp).await?);
    }
    store.close().await;
    if std::env::var_os("TALLY_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        println!("    kept {}", tmp.display());
    }
    Ok(ProjectResult {
        append_rate,
        fold_rate,
        freshness_ms,
    })
}

/// Reads the whole log as the projector does (chunks of [`READ_CHUNK`]) and,
/// with `specs`, folds it into their deltas in memory (rolled up and emptied
/// every [`MAX_DELTA_ROWS`] rows, as a transaction would); nothing is
/// written. How long it took.
///
/// [`READ_CHUNK`]: tally::projection::projector::READ_CHUNK
/// [`MAX_DELTA_ROWS`]: tally::projection::projector::MAX_DELTA_ROWS
async fn read_log_through(
    store: &Store,
    specs: Option<&[tally::aggregate::Spec]>,
) -> Result<std::time::Duration, BenchError> {
    use tally::projection::fold::Fold;
    let started = Instant::now();
    let specs = specs.unwrap_or_default();
    let mut folds: Vec<Fold> = specs.iter().map(Fold::new).collect();
    let catalog = store.prices().catalog().await?;
    let mut cursor = tally::store::Cursor::default();
    loop {
        let batch = store
            .projections()
            .read_log(cursor, tally::projection::projector::READ_CHUNK)
            .await?;
        for (_, e) in &batch.events {
            let charge = catalog.charge(e);
            for f in folds.iter_mut() {
                f.add(e, charge);
            }
        }
        let full = folds.iter().map(Fold::rows).sum::<usize>() >= MAX_DELTA_ROWS;
        if full || batch.events.is_empty() {
            // Rolling up is part of the fold's cost.
            let rolled: usize =
                std::mem::replace(&mut folds, specs.iter().map(Fold::new).collect())
                    .into_iter()
                    .map(|f| f.finish().rows())
                    .sum();
            std::hint::black_box(rolled);
        }
        match batch.events.last() {
            Some((c, _)) => cursor = *c,
            None => return Ok(started.elapsed()),
        }
    }
}

/// Every table of every projection sums to the number of events, but a
/// minute table with a retention, which sums to the events from its fold
/// horizon on (`Spec::fold_horizon`; `ts`: every event's timestamp).
pub(super) async fn check_totals<'a>(
    store: &Store,
    specs: impl IntoIterator<Item = &'a tally::aggregate::Spec>,
    ts: &[chrono::DateTime<chrono::Utc>],
) -> Result<(), BenchError> {
    let now = chrono::Utc::now();
    for spec in specs {
        for &g in &spec.granularities {
            let rows = store.projections().read_agg(spec, g, "").await?;
            let total: i64 = rows.iter().map(|r| r.measures.requests).sum();
            // The horizon moved on while the fold ran (and `ts` may have been
            // drawn again since): events near it may be there or not.
            let (low, high) = match spec.fold_horizon(g, now) {
                None => (ts.len(), ts.len()),
                Some(h) => {
                    let hour = chrono::Duration::hours(1);
                    (
                        ts.iter().filter(|t| **t >= h + hour).count(),
                        ts.iter().filter(|t| **t >= h - hour * 6).count(),
                    )
                }
            };
            if !(low as i64..=high as i64).contains(&total) {
                return Err(BenchError::Check(format!(
                    "{} holds {total} requests, expected {low}..={high}",
                    spec.table(g)
                )));
            }
        }
    }
    println!(
        "    check: every table of every projection sums to its {} requests",
        ts.len()
    );
    Ok(())
}

async fn freshness(
    params: &ProjectBench,
    url: &str,
    tmp: &std::path::Path,
) -> Result<(f64, f64, f64), BenchError> {
    // The ingest rate first: `tally serve` drains a pre-filled stream.
    let (nats, _client, js) = nats_with_usage_stream().await?;
    let drain_events = params.events.clamp(10_000, 100_000);
    let prefill = crate::dev::emit::EmitConfig {
        count: drain_events,
        apis: 10,
        keys: 1000,
        models: 20,
        seed: 8,
        id_prefix: "drain".into(),
        progress: false,
        realistic: !params.uniform,
        ..crate::dev::emit::EmitConfig::default()
    };
    crate::dev::emit::emit(&js, &prefill)
        .await
        .map_err(|e| BenchError::Check(e.to_string()))?;
    let started = Instant::now();
    let mut tally = spawn_tally_with(
        url,
        &nats.url(),
        &tmp.join("live.log"),
        &[
            (
                "TALLY_PROJECTIONS_DIR",
                params.projections_dir.display().to_string(),
            ),
            (
                "TALLY_LOG",
                std::env::var("TALLY_BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ],
    )?;
    wait_drained(&js, &mut tally, Duration::from_secs(3600)).await?;
    let ingest_rate = drain_events as f64 / started.elapsed().as_secs_f64();
    let rate = ingest_rate / 2.0;
    // Freshness is a steady-state figure: the projections first fold the
    // drained burst (that catch-up is what (b) measures).
    let caught_up = wait_projections_caught_up(url, Duration::from_secs(600)).await?;
    println!(
        "    NATS ingest rate of `tally serve` (draining {drain_events} pre-published events): {ingest_rate:.0} ev/s; live load at half: {rate:.0} ev/s (projections caught up {:.1}s after the drain)",
        caught_up.as_secs_f64()
    );
    let count = (rate * params.live_seconds as f64).max(1.0) as usize;
    let cfg = crate::dev::emit::EmitConfig {
        count,
        rate: Some(rate),
        apis: 10,
        keys: 1000,
        models: 20,
        seed: 9,
        id_prefix: "live".into(),
        progress: false,
        realistic: !params.uniform,
        ..crate::dev::emit::EmitConfig::default()
    };
    let load = {
        let js = js.clone();
        tokio::spawn(async move { crate::dev::emit::emit(&js, &cfg).await })
    };
    let probe = Probe::connect(url).await?;
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while !load.is_finished() {
        n += 1;
        let key = format!("probe-{n}-{}", rand::random::<u32>());
        let body = serde_json::json!({
            "id": key, "ts": chrono::Utc::now().to_rfc3339(), "api": "probe", "key": key,
        });
        let started = super::publish_probe(&js, &body).await?;
        loop {
            if probe.visible(&key).await? {
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(BenchError::Check(format!(
                    "probe {key} not visible after 30s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (summary, _) = load
        .await
        .map_err(|e| BenchError::Check(format!("load task: {e}")))?
        .map_err(|e| BenchError::Check(e.to_string()))?;
    let rss = peak_rss_mib(&tally);
    stop(tally);
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| super::nearest_rank(&latencies, q);
    if latencies.is_empty() {
        return Err(BenchError::Check("no probe was measured".into()));
    }
    let (p50, p99, max) = (pick(0.5), pick(0.99), pick(1.0));
    println!(
        "(c) freshness at {:.0} ev/s live load ({} events published at {:.0} msg/s): publish → agg_by_key_hour p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms over {} probes   goal p99 ≤ 1000 ms   tally peak RSS {rss:.0} MiB",
        rate,
        summary.published,
        summary.published as f64 / summary.seconds,
        latencies.len()
    );
    Ok((p50, p99, max))
}

/// Waits until every projection's checkpoint is at the end of the log; how long that took.
pub(super) async fn wait_projections_caught_up(
    url: &str,
    timeout: Duration,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let store = tally::store::connect(url, &StoreOptions::default()).await?;
    loop {
        let mut behind = 0;
        for state in store.projections().projection_states().await? {
            behind += store.projections().events_after(state.cursor).await?;
        }
        if behind == 0 {
            store.close().await;
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(BenchError::Check(format!(
                "projections still {behind} events behind after {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Looks a probe key up in `agg_by_key_hour` with the backend's own driver.
pub(super) enum Probe {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Probe {
    pub(super) async fn connect(url: &str) -> Result<Self, BenchError> {
        Ok(match Backend::from_url(url)? {
            Backend::Postgres => Probe::Pg(sqlx::PgPool::connect(url).await?),
            Backend::Sqlite => {
                // The probed tables are in the aggregates file beside it.
                use std::str::FromStr;
                let main = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(tally::store::sqlite::aggregates_path(main.get_filename()))
                    .read_only(true);
                Probe::Sqlite(sqlx::SqlitePool::connect_with(options).await?)
            }
        })
    }

    pub(super) async fn visible(&self, key: &str) -> Result<bool, BenchError> {
        self.visible_in("agg_by_key_hour", key).await
    }

    /// True once `table` (a trusted name) has a row for `key`.
    pub(super) async fn visible_in(&self, table: &str, key: &str) -> Result<bool, BenchError> {
        let n: i64 = match self {
            Probe::Pg(p) => {
                sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE key = $1"))
                    .bind(key)
                    .fetch_one(p)
                    .await?
            }
            Probe::Sqlite(p) => {
                sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE key = ?"))
                    .bind(key)
                    .fetch_one(p)
                    .await?
            }
        };
        Ok(n > 0)
    }
}
