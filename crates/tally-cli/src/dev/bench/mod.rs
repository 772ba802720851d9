//! `tally bench …`: performance measured against a baseline in the same run.
//!
//! Machines here are shared and noisy, so absolute rates mean little; every
//! benchmark prints the ratio of Tally's path to the physical limit of the same
//! database, measured on the same rows right before.

pub mod alerts;
pub mod all;
pub mod baseline;
pub mod e2e;
pub mod project;
pub mod query;
pub mod restate;
mod serve;
pub mod sustained;

pub use project::{project, ProjectBench, ProjectResult};
pub use query::{query, QueryBench, QueryFigures};

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolCopyExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr;

use crate::dev::devserver::TempPostgres;
use crate::dev::synth::{self, SynthConfig};
use baseline::{copy_text, sqlite_insert, COLUMNS, SQLITE_ROWS_PER_STATEMENT};
use tally::event::{format_ts, Event};
use tally::store::{Backend, Origin, Store, StoreOptions};

/// Folds the whole log into `specs` as `tally serve` does (one group, one
/// shared read), until every checkpoint has nothing after it.
async fn fold_backlog(
    store: &Store,
    specs: &[tally::aggregate::Spec],
) -> Result<FoldStats, BenchError> {
    use tally::projection::{Projector, ProjectorConfig};
    let check = |e: tally::projection::ProjectionError| BenchError::Check(e.to_string());
    let mut projectors = Vec::new();
    for spec in specs.iter().cloned() {
        let name = spec.name.clone();
        projectors.push(
            Projector::open(store.clone(), Arc::new(spec), &name, "")
                .await
                .map_err(check)?,
        );
    }
    // The group `tally serve` runs (a Vec, should serve ever split it in lanes again).
    let groups = vec![tally::projection::projector::FoldGroup::new(
        store.clone(),
        projectors,
    )];
    let tasks: Vec<_> = groups
        .into_iter()
        .map(|mut group| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut stats = FoldStats::default();
                loop {
                    let step = group
                        .step(ProjectorConfig::default().batch_size)
                        .await
                        .map_err(check)?;
                    if step.folded > 0 {
                        stats.transactions += 1;
                        stats.rows += step.rows;
                    }
                    if step.caught_up
                        && store.projections().events_after(group.min_cursor()).await? == 0
                    {
                        return Ok::<_, BenchError>(stats);
                    }
                }
            })
        })
        .collect();
    let mut stats = FoldStats::default();
    for t in tasks {
        let lane = t
            .await
            .map_err(|e| BenchError::Check(format!("fold task: {e}")))??;
        stats.transactions += lane.transactions;
        stats.rows += lane.rows;
    }
    Ok(stats)
}

/// What [`fold_backlog`] wrote: how much the aggregate rows were rewritten.
#[derive(Debug, Clone, Copy, Default)]
struct FoldStats {
    /// Transactions that folded events.
    transactions: usize,
    /// Aggregate rows upserted, summed over transactions.
    rows: usize,
}

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] tally::store::StoreError),
    /// A baseline query failed.
    #[error("baseline: {0}")]
    Sql(#[from] sqlx::Error),
    /// The throwaway PostgreSQL could not start.
    #[error(transparent)]
    DevServer(#[from] crate::dev::devserver::DevServerError),
    /// Temp files.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The two paths did not store the same rows.
    #[error("check failed: {0}")]
    Check(String),
}

/// Parameters of `tally bench append`.
#[derive(Debug, Clone, clap::Args)]
pub struct AppendBench {
    /// Database to measure: postgres or sqlite.
    #[arg(long, value_parser = parse_backend)]
    pub backend: Backend,
    /// Events per path.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Events per transaction.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), default_value_t = 1_000)]
    pub batch: usize,
    /// Rounds (baseline then Tally each round); the best of each is reported.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), default_value_t = 1)]
    pub rounds: usize,
    /// An existing PostgreSQL database to use instead of a throwaway cluster.
    #[arg(long)]
    pub postgres_url: Option<String>,
}

/// The measured rates of one run.
#[derive(Debug, Clone)]
pub struct AppendResult {
    /// Baseline events per second (best round).
    pub baseline_rate: f64,
    /// Tally events per second (best round).
    pub tally_rate: f64,
}

impl AppendResult {
    /// Tally ÷ baseline.
    pub fn ratio(&self) -> f64 {
        self.tally_rate / self.baseline_rate
    }
}

/// Runs the append benchmark and prints a table.
pub async fn append(params: &AppendBench) -> Result<AppendResult, BenchError> {
    let cfg = SynthConfig {
        span: Duration::from_secs(20 * 24 * 3600),
        keys: 1000,
        apis: 10,
        models: 20,
        id_prefix: format!("bench{:08x}", rand::random::<u32>()),
        ..SynthConfig::default()
    };
    println!(
        "generating {} events ({} per batch, {} round(s), backend {})…",
        params.events,
        params.batch,
        params.rounds,
        params.backend.name()
    );
    let events = synth::events(&cfg, 0, params.events);
    let origin = Origin {
        source: "bench",
        subject: None,
    };
    let mut best = AppendResult {
        baseline_rate: 0.0,
        tally_rate: 0.0,
    };
    let tmp = tempfile_dir()?;
    // Keep the throwaway cluster alive for the whole run.
    let mut cluster = None;
    for round in 1..=params.rounds {
        let (baseline, tally) = match params.backend {
            Backend::Postgres => {
                let url = match &params.postgres_url {
                    Some(u) => u.clone(),
                    None => {
                        if cluster.is_none() {
                            cluster = Some(TempPostgres::start(true)?);
                        }
                        let pg = cluster.as_ref().expect("cluster was just started");
                        pg.create_database("bench")?
                    }
                };
                let store = tally::store::connect(&url, &StoreOptions::default()).await?;
                store.migrate().await?;
                let result = postgres_round(&store, &url, &events, params.batch, &origin).await;
                store.close().await;
                result?
            }
            Backend::Sqlite => {
                let base = tmp.join(format!("baseline-{round}.db"));
                let tally = tmp.join(format!("tally-{round}.db"));
                sqlite_round(&base, &tally, &events, params.batch, &origin).await?
            }
        };
        let rate = |d: Duration| events.len() as f64 / d.as_secs_f64();
        println!(
            "round {round}: baseline {:>10.0} ev/s ({:.2}s)   tally {:>10.0} ev/s ({:.2}s)   ratio {:.2}",
            rate(baseline),
            baseline.as_secs_f64(),
            rate(tally),
            tally.as_secs_f64(),
            rate(tally) / rate(baseline)
        );
        best.baseline_rate = best.baseline_rate.max(rate(baseline));
        best.tally_rate = best.tally_rate.max(rate(tally));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let baseline_name = match params.backend {
        Backend::Postgres => "COPY into a table of the same shape",
        Backend::Sqlite => "prepared multi-row INSERT, one transaction per batch",
    };
    println!(
        "\nbackend: {}   events: {}   batch: {}   cores: {}",
        params.backend.name(),
        params.events,
        params.batch,
        num_cpus()
    );
    println!(
        "baseline ({baseline_name}): {:.0} events/s",
        best.baseline_rate
    );
    println!(
        "tally append (dedup, conflict detection, RETURNING): {:.0} events/s",
        best.tally_rate
    );
    println!("ratio tally/baseline: {:.2} (goal ≥ 0.60)", best.ratio());
    Ok(best)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn tempfile_dir() -> Result<std::path::PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("tally-bench-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn postgres_round(
    store: &Store,
    url: &str,
    events: &[Event],
    batch: usize,
    origin: &Origin,
) -> Result<(Duration, Duration), BenchError> {
    let pool = &sqlx::PgPool::connect(url).await?;
    sqlx::query("DROP TABLE IF EXISTS bench_copy")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE bench_copy (LIKE usage_events INCLUDING ALL)")
        .execute(pool)
        .await?;

    let start = Instant::now();
    for chunk in events.chunks(batch) {
        let mut copy = pool
            .copy_in_raw(&format!("COPY bench_copy ({COLUMNS}) FROM STDIN"))
            .await?;
        copy.send(copy_text(chunk).into_bytes()).await?;
        copy.finish().await?;
    }
    let baseline = start.elapsed();

    let start = Instant::now();
    for chunk in events.chunks(batch) {
        store.log().append(chunk, &[], origin).await?;
    }
    let tally = start.elapsed();

    let (a, b): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM bench_copy), (SELECT count(*) FROM usage_events)",
    )
    .fetch_one(pool)
    .await?;
    check_counts(a, b, events.len())?;
    sqlx::query("DROP TABLE bench_copy").execute(pool).await?;
    Ok((baseline, tally))
}

fn check_counts(baseline: i64, tally: i64, expected: usize) -> Result<(), BenchError> {
    if baseline as usize != expected || tally as usize != expected {
        return Err(BenchError::Check(format!(
            "expected {expected} rows on both paths, baseline has {baseline}, tally has {tally}"
        )));
    }
    Ok(())
}

async fn sqlite_round(
    baseline_path: &std::path::Path,
    tally_path: &std::path::Path,
    events: &[Event],
    batch: usize,
    origin: &Origin,
) -> Result<(Duration, Duration), BenchError> {
    let open = |p: &std::path::Path| format!("sqlite://{}", p.display());
    let base = tally::store::connect(&open(baseline_path), &StoreOptions::default()).await?;
    base.migrate().await?;
    base.close().await;
    // The baseline's own connection, as durable as the store's writer.
    let options = SqliteConnectOptions::from_str(&open(baseline_path))?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let start = Instant::now();
    for chunk in events.chunks(batch) {
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
        let now = format_ts(&chrono::Utc::now());
        for rows in chunk.chunks(SQLITE_ROWS_PER_STATEMENT) {
            sqlite_insert(rows, &now).build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    let baseline = start.elapsed();
    let baseline_count: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&writer)
        .await?;
    writer.close().await;

    let tally = tally::store::connect(&open(tally_path), &StoreOptions::default()).await?;
    tally.migrate().await?;
    let start = Instant::now();
    for chunk in events.chunks(batch) {
        tally.log().append(chunk, &[], origin).await?;
    }
    let elapsed = start.elapsed();
    let tally_count = tally.log().counts().await?.events;
    tally.close().await;
    check_counts(baseline_count, tally_count, events.len())?;
    Ok((baseline, elapsed))
}

/// Parameters of `tally bench ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestBench {
    /// Database to measure: postgres or sqlite.
    #[arg(long, value_parser = parse_backend)]
    pub backend: Backend,
    /// Events per path.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Skip the live run (`tally emit` publishing while Tally consumes).
    #[arg(long)]
    pub no_live: bool,
}

/// `--backend postgres|sqlite`.
pub fn parse_backend(name: &str) -> Result<Backend, String> {
    match name {
        "postgres" => Ok(Backend::Postgres),
        "sqlite" => Ok(Backend::Sqlite),
        other => Err(format!("unknown backend `{other}`: use postgres or sqlite")),
    }
}

/// The measured rates of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestResult {
    /// (a) events per second appended straight through the store.
    pub baseline_rate: f64,
    /// (b) events per second drained from a pre-filled stream, end to end.
    pub drain_rate: f64,
    /// (b) Tally's peak resident memory, MiB.
    pub drain_peak_rss_mib: f64,
    /// (c) events per second with publishing and consuming at once.
    pub live_rate: Option<f64>,
    /// (c) Tally's peak resident memory, MiB.
    pub live_peak_rss_mib: Option<f64>,
}

/// Runs the NATS ingest benchmark and prints rates, ratios and peak RSS.
pub async fn ingest(params: &IngestBench) -> Result<IngestResult, BenchError> {
    let seed = 7;
    let cfg = crate::dev::emit::EmitConfig {
        count: params.events,
        seed,
        apis: 10,
        keys: 1000,
        models: 20,
        id_prefix: "bench".into(),
        progress: false,
        ..crate::dev::emit::EmitConfig::default()
    };
    let tmp = tempfile_dir()?;
    let dbs = Databases::start(params.backend, &tmp)?;
    let fresh_db = |name: &str| dbs.fresh(name);
    println!(
        "backend {}: {} events, {} cores",
        params.backend.name(),
        params.events,
        num_cpus()
    );

    // (a) Baseline: the same events straight through the store, batches of 1000.
    let url = fresh_db("baseline")?;
    let store = tally::store::connect(&url, &StoreOptions::default()).await?;
    store.migrate().await?;
    let synth_cfg = SynthConfig {
        seed,
        apis: cfg.apis,
        keys: cfg.keys,
        models: cfg.models,
        id_prefix: cfg.id_prefix.clone(),
        ..SynthConfig::default()
    };
    let baseline = append_synthetic(&store, &synth_cfg, params.events).await?;
    store.close().await;
    let baseline_rate = params.events as f64 / baseline.as_secs_f64();
    println!(
        "(a) baseline, store append without NATS: {baseline_rate:>9.0} ev/s ({:.1}s)",
        baseline.as_secs_f64()
    );

    // (b) Pre-published stream, drained by `tally serve` end to end.
    let (nats, client, js) = nats_with_usage_stream().await?;
    print!("    publishing {} events to JetStream… ", params.events);
    let (summary, _) = crate::dev::emit::emit(&js, &cfg)
        .await
        .map_err(|e| BenchError::Check(e.to_string()))?;
    println!("{:.0} msg/s", summary.published as f64 / summary.seconds);
    let url = fresh_db("drain")?;
    let started = Instant::now();
    let mut tally = spawn_tally(&url, &nats.url(), &tmp.join("drain.log"))?;
    wait_drained(&js, &mut tally, Duration::from_secs(3600)).await?;
    let drain = started.elapsed();
    let drain_rss = peak_rss_mib(&tally);
    stop(tally);
    check_count(&url, params.events).await?;
    let drain_rate = params.events as f64 / drain.as_secs_f64();
    println!(
        "(b) tally draining a pre-filled stream:  {drain_rate:>9.0} ev/s ({:.1}s)   ratio (b)/(a) {:.2}   peak RSS {drain_rss:.0} MiB",
        drain.as_secs_f64(),
        drain_rate / baseline_rate
    );
    drop(js);
    let _ = client.drain().await;
    drop(nats);

    // (c) Live: `tally emit` publishes while Tally consumes.
    let (mut live_rate, mut live_peak_rss_mib) = (None, None);
    if !params.no_live {
        let nats = crate::dev::devserver::TempNats::start()?;
        let url = fresh_db("live")?;
        let mut tally = spawn_tally(&url, &nats.url(), &tmp.join("live.log"))?;
        let client = async_nats::connect(nats.url())
            .await
            .map_err(|e| BenchError::Check(format!("connect to NATS: {e}")))?;
        let js = async_nats::jetstream::new(client.clone());
        wait_consumer(&js, &mut tally).await?;
        let started = Instant::now();
        let (summary, _) = crate::dev::emit::emit(&js, &cfg)
            .await
            .map_err(|e| BenchError::Check(e.to_string()))?;
        wait_drained(&js, &mut tally, Duration::from_secs(3600)).await?;
        let live = started.elapsed();
        let rss = peak_rss_mib(&tally);
        stop(tally);
        check_count(&url, params.events).await?;
        let rate = params.events as f64 / live.as_secs_f64();
        println!(
            "(c) live, emit publishing meanwhile:     {rate:>9.0} ev/s ({:.1}s)   ratio (c)/(a) {:.2}   peak RSS {rss:.0} MiB   (publisher alone {:.0} msg/s)",
            live.as_secs_f64(),
            rate / baseline_rate,
            summary.published as f64 / summary.seconds
        );
        drop(js);
        let _ = client.drain().await;
        live_rate = Some(rate);
        live_peak_rss_mib = Some(rss);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("goal: (b)/(a) ≥ 0.70 on PostgreSQL with peak RSS ≤ 150 MiB");
    Ok(IngestResult {
        baseline_rate,
        drain_rate,
        drain_peak_rss_mib: drain_rss,
        live_rate,
        live_peak_rss_mib,
    })
}

/// Nearest-rank quantile `q` of `sorted` (ascending, not empty).
/// One benchmark figure beside its goal, for the summary tables.
#[derive(Debug, Clone)]
pub struct Goal {
    /// What was measured.
    pub what: String,
    /// The figure.
    pub value: f64,
    /// The goal, as text (`≥ 0.7`).
    pub goal: String,
    /// Whether the figure meets it.
    pub met: bool,
    /// Context (absolute rates).
    pub note: String,
}

impl Goal {
    /// A figure that must be at least `goal`.
    pub fn at_least(what: String, value: f64, goal: f64, note: String) -> Self {
        Goal {
            what,
            value,
            goal: format!("≥ {goal}"),
            met: value >= goal,
            note,
        }
    }

    /// A figure that must be at most `goal`.
    pub fn at_most(what: String, value: f64, goal: f64, note: String) -> Self {
        Goal {
            what,
            value,
            goal: format!("≤ {goal}"),
            met: value <= goal,
            note,
        }
    }
}

/// Prints figures and goals as one table.
pub fn print_goals(goals: &[Goal]) {
    let width = goals
        .iter()
        .map(|g| g.what.chars().count())
        .max()
        .unwrap_or(10);
    println!(
        "{:<width$}  {:>10}  {:<8}  {:<4}  note",
        "figure", "value", "goal", ""
    );
    for g in goals {
        println!(
            "{:<width$}  {:>10.2}  {:<8}  {:<4}  {}",
            g.what,
            g.value,
            g.goal,
            if g.met { "met" } else { "MISS" },
            g.note
        );
    }
}

pub(super) fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Publishes a probe event and waits for JetStream's ack; returns when the
/// publish started (the probe's latency origin).
pub(super) async fn publish_probe(
    js: &async_nats::jetstream::Context,
    body: &serde_json::Value,
) -> Result<Instant, BenchError> {
    let started = Instant::now();
    js.publish("usage.events.probe", body.to_string().into())
        .await
        .map_err(|e| BenchError::Check(format!("publish probe: {e}")))?
        .await
        .map_err(|e| BenchError::Check(format!("probe ack: {e}")))?;
    Ok(started)
}

/// Where a benchmark makes its databases: a throwaway durable PostgreSQL
/// cluster, or SQLite files in a temp dir.
pub(super) struct Databases {
    cluster: Option<TempPostgres>,
    dir: std::path::PathBuf,
}

impl Databases {
    /// Starts the cluster (PostgreSQL) or just remembers `dir` (SQLite).
    pub(super) fn start(backend: Backend, dir: &std::path::Path) -> Result<Self, BenchError> {
        Ok(Self {
            cluster: match backend {
                Backend::Postgres => Some(TempPostgres::start(true)?),
                Backend::Sqlite => None,
            },
            dir: dir.to_path_buf(),
        })
    }

    /// The URL of a new, empty database called `name`.
    pub(super) fn fresh(&self, name: &str) -> Result<String, BenchError> {
        Ok(match &self.cluster {
            Some(pg) => pg.create_database(name)?,
            None => format!("sqlite://{}", self.dir.join(format!("{name}.db")).display()),
        })
    }
}

/// A private `nats-server -js` with the `USAGE` stream on `usage.events.>`
/// already created (so events can be published before Tally starts).
async fn nats_with_usage_stream() -> Result<
    (
        crate::dev::devserver::TempNats,
        async_nats::Client,
        async_nats::jetstream::Context,
    ),
    BenchError,
> {
    let nats = crate::dev::devserver::TempNats::start()?;
    let client = async_nats::connect(nats.url())
        .await
        .map_err(|e| BenchError::Check(format!("connect to NATS: {e}")))?;
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "USAGE".into(),
        subjects: vec!["usage.events.>".into()],
        ..Default::default()
    })
    .await
    .map_err(|e| BenchError::Check(format!("create stream: {e}")))?;
    Ok((nats, client, js))
}

/// Appends `events` synthetic events through the store, 1,000 per
/// transaction, in the 10k chunks `tally emit` generates (so a NATS path given
/// the same config stores identical rows). Returns the time spent appending
/// (generation excluded).
async fn append_synthetic(
    store: &Store,
    cfg: &SynthConfig,
    events: usize,
) -> Result<Duration, BenchError> {
    let origin = Origin {
        source: "bench",
        subject: None,
    };
    let mut spent = Duration::ZERO;
    let mut done = 0;
    while done < events {
        let n = 10_000.min(events - done);
        let chunk = synth::events(cfg, done as u64, n);
        let started = Instant::now();
        for b in chunk.chunks(1000) {
            store.log().append(b, &[], &origin).await?;
        }
        spent += started.elapsed();
        done += n;
    }
    Ok(spent)
}

/// The projection specs of `dir`, shared as `tally serve` holds them.
fn load_specs(dir: &std::path::Path) -> Result<Vec<Arc<tally::aggregate::Spec>>, BenchError> {
    Ok(tally::aggregate::spec::load_dir(dir)
        .map_err(|e| BenchError::Check(e.to_string()))?
        .into_iter()
        .map(Arc::new)
        .collect())
}

/// `tally serve` (this executable) as a child, logging to `log`.
fn spawn_tally(
    db_url: &str,
    nats_url: &str,
    log: &std::path::Path,
) -> Result<std::process::Child, BenchError> {
    spawn_tally_with(db_url, nats_url, log, &[])
}

/// [`spawn_tally`] with extra environment variables.
fn spawn_tally_with(
    db_url: &str,
    nats_url: &str,
    log: &std::path::Path,
    env: &[(&str, String)],
) -> Result<std::process::Child, BenchError> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let port = crate::dev::devserver::free_port()?;
    // `TALLY_BENCH_WRAP="heaptrack -o /tmp/serve"` (or `perf record …`) runs
    // serve under a profiler; VmHWM is then the profiler's, not serve's.
    // `TALLY_BENCH_SERVE=<binary>` serves with another build (an A/B under
    // one driver, so both are measured alike).
    let exe = match std::env::var_os("TALLY_BENCH_SERVE") {
        Some(path) => std::path::PathBuf::from(path),
        None => std::env::current_exe()?,
    };
    let wrap = std::env::var("TALLY_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(words).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    Ok(command
        .arg("serve")
        .env("TALLY_DATABASE_URL", db_url)
        .env("TALLY_NATS_URL", nats_url)
        .env("TALLY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("TALLY_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(out)
        .stderr(err)
        .spawn()?)
}

/// Waits until Tally has created its stream and consumer.
async fn wait_consumer(
    js: &async_nats::jetstream::Context,
    child: &mut std::process::Child,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(stream) = js.get_stream("USAGE").await {
            if stream.consumer_info("tally").await.is_ok() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Check(format!("tally exited with {status}")));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Check("tally did not start".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn wait_drained(
    js: &async_nats::jetstream::Context,
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Check(format!("tally exited with {status}")));
        }
        if let Ok(stream) = js.get_stream("USAGE").await {
            if let Ok(info) = stream.consumer_info("tally").await {
                if info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.delivered.stream_sequence > 0
                {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(BenchError::Check("not drained in time".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) fn peak_rss_mib(child: &std::process::Child) -> f64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU seconds (user + system) `child` has used so far (Linux: USER_HZ is 100).
pub(super) fn cpu_seconds(child: &std::process::Child) -> f64 {
    std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

/// The value of one series in `serve`'s `/metrics` (0 when absent).
pub(super) async fn metric(base: &str, series: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("{base}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn stop(mut child: std::process::Child) {
    let pid = child.id().to_string();
    if std::env::var_os("TALLY_BENCH_WRAP").is_some() {
        // Under a profiler the child is the wrapper: stop serve, its child,
        // first (a wrapper need not pass the signal on).
        let _ = std::process::Command::new("pkill")
            .args(["-TERM", "-P", &pid])
            .status();
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = child.wait();
}

async fn check_count(url: &str, want: usize) -> Result<(), BenchError> {
    let store = tally::store::connect(url, &StoreOptions::default()).await?;
    let have = store.log().counts().await?.events;
    store.close().await;
    if have != want as i64 {
        return Err(BenchError::Check(format!(
            "the log holds {have} events, expected {want}"
        )));
    }
    Ok(())
}
