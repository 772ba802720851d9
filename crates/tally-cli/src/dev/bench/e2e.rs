//! `tally bench e2e`: `tally serve` as a whole, with the shipped projections
//! and 1,000 alert rules, against the store and the database measured alone
//! in the same run.
//!
//! (a) the store's append rate alone (batches of 1,000, as ingest appends)
//!     and the database's bulk-load limit (PostgreSQL: `COPY` in chunks of
//!     100,000; SQLite: one transaction of multi-row inserts) for the same events;
//! (b) `tally serve` drains a pre-filled stream of those events (100 per
//!     message) and every projection's checkpoint reaches the end of the log:
//!     end-to-end events/s as a ratio of (a), and the serve process's peak RSS.
//!
//! (c) on the same process, the highest live rate at which freshness and
//!     alert latency both meet their goals (see [`super::sustained`]);
//! (d) the five canonical queries of `bench query`, timed during (c).
//!
//! Three data shapes run by default: events within the last hour, events
//! spread over 30 days arriving in time order with 1% up to an hour late,
//! and high-cardinality events (the last hour, every field drawn
//! independently: about three aggregate rows an event). The live load of (c)
//! has the same shape.
//!
//! After (b) each shape also reports its **write limit**: the time to
//! bulk-load its events plus the time to bulk-load the aggregate rows `serve`
//! ended up with (same tables, keys and indexes), in the same run: what the
//! database needs at least to hold the log and its aggregates.

use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolCopyExt;

use super::{
    nats_with_usage_stream, num_cpus, peak_rss_mib, spawn_tally_with, stop, tempfile_dir,
    wait_drained, BenchError, Databases,
};
use crate::dev::synth::{self, SynthConfig};
use tally::event::Event;
use tally::store::alerts::WriteMode;
use tally::store::{Backend, Origin, Store, StoreOptions};

/// Parameters of `tally bench e2e`.
#[derive(Debug, Clone, clap::Args)]
pub struct E2eBench {
    /// Database to measure: postgres or sqlite.
    #[arg(long, value_parser = super::parse_backend, default_value = "postgres")]
    pub backend: Backend,
    /// Events of each shape.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Alert rules installed (grouped by key, scoped by api, as `bench alerts`).
    #[arg(long, default_value_t = 1_000)]
    pub rules: usize,
    /// Data shapes to run: `recent` (the last hour), `spread` (30 days),
    /// `highcard` (the last hour, every field drawn independently).
    #[arg(long, value_delimiter = ',', default_value = "recent,spread,highcard")]
    pub shapes: Vec<Shape>,
    /// Events per NATS message when pre-filling the stream.
    #[arg(long, default_value_t = 100)]
    pub per_message: usize,
    /// Projection specs.
    #[arg(long, env = "TALLY_PROJECTIONS_DIR", default_value = "projections")]
    pub projections_dir: std::path::PathBuf,
    /// (c) steps of the sustained-rate search (0: skip (c) and (d)).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// (c) seconds of live load per step.
    #[arg(long, default_value_t = 60)]
    pub step_seconds: u64,
    /// (c) the first step's rate, as a share of (a)'s append rate.
    #[arg(long, default_value_t = 0.3)]
    pub start_share: f64,
    /// (c) the first step's rate in events a second, instead of a share of
    /// the append rate (which varies from run to run): for comparing two
    /// binaries at the same load.
    #[arg(long)]
    pub start_rate: Option<f64>,
}

/// How the events' timestamps are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Within the last hour.
    Recent,
    /// Over the last 30 days, in time order, 1% up to an hour late.
    Spread,
    /// Within the last hour, every field drawn independently (1,000 keys ×
    /// 10 apis × 20 models): about three aggregate rows an event.
    Highcard,
}

impl Shape {
    fn span(self) -> Duration {
        match self {
            Shape::Recent | Shape::Highcard => Duration::from_secs(3600),
            Shape::Spread => Duration::from_secs(30 * 86_400),
        }
    }

    /// Keys behave like customers (each calls one API with one or two models).
    fn correlated(self) -> bool {
        self != Shape::Highcard
    }

    fn label(self) -> &'static str {
        match self {
            Shape::Recent => "recent",
            Shape::Spread => "30d",
            Shape::Highcard => "highcard",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Recent => "recent (last hour)",
            Shape::Spread => "spread (30 days, 1% late)",
            Shape::Highcard => "highcard (last hour, every field drawn independently)",
        }
    }
}

/// The figures of one shape.
#[derive(Debug, Clone)]
pub struct E2eResult {
    /// The shape.
    pub shape: Shape,
    /// (a) store append alone, ev/s.
    pub append_rate: f64,
    /// (a) the database's bulk-load limit, ev/s.
    pub bulk_rate: f64,
    /// (b) drained and folded by `tally serve`, ev/s.
    pub drain_rate: f64,
    /// (b) peak RSS of `tally serve`, MiB.
    pub drain_rss_mib: f64,
    /// The write limit: events and their aggregate rows bulk-loaded, ev/s.
    pub write_limit: f64,
    /// (c) and (d): the sustained-rate search, when run.
    pub sustained: Option<super::sustained::Search>,
}

/// Runs every shape and prints the figures with their goals.
pub async fn e2e(params: &E2eBench) -> Result<Vec<E2eResult>, BenchError> {
    let specs = super::load_specs(&params.projections_dir)?;
    let tmp = tempfile_dir()?;
    let dbs = Databases::start(params.backend, &tmp)?;
    let (drain_goal, sustained_goal) = match params.backend {
        Backend::Postgres => (0.7, 0.5),
        Backend::Sqlite => (0.5, 0.3),
    };
    println!(
        "backend {}: {} events per shape, {} rules, {} projections, {} events per message, {} cores",
        params.backend.name(),
        params.events,
        params.rules,
        specs.len(),
        params.per_message,
        num_cpus()
    );
    let mut out = Vec::new();
    for (i, shape) in params.shapes.iter().copied().enumerate() {
        println!("\nshape {}:", shape.name());
        let synth_cfg = SynthConfig {
            seed: 31 + i as u64,
            apis: 10,
            keys: 1000,
            models: 20,
            id_prefix: format!("e2e{i}"),
            correlated: shape.correlated(),
            arrival_order: Some(params.events),
            span: shape.span(),
            ..SynthConfig::default()
        };
        let events = synth::events(&synth_cfg, 0, params.events);

        // (a) The store alone, then the database's bulk-load limit.
        let url = dbs.fresh(&format!("append{i}"))?;
        let store = tally::store::connect(&url, &StoreOptions::default()).await?;
        store.migrate().await?;
        let append = append_all(&store, &events).await?;
        store.close().await;
        let bulk_url = dbs.fresh(&format!("bulk{i}"))?;
        let bulk = bulk_load(params.backend, &bulk_url, &events).await?;
        let rate = |d: Duration| events.len() as f64 / d.as_secs_f64();
        let (append_rate, bulk_rate) = (rate(append), rate(bulk));
        println!(
            "(a) store append alone {append_rate:>9.0} ev/s   bulk-load limit ({}) {bulk_rate:>9.0} ev/s",
            match params.backend {
                Backend::Postgres => "COPY, 100,000 per chunk",
                Backend::Sqlite => "one transaction of multi-row INSERTs",
            }
        );

        // (b) `tally serve` with rules drains the pre-filled stream and folds it.
        let url = dbs.fresh(&format!("serve{i}"))?;
        let apis: Vec<String> = events
            .iter()
            .map(|e| e.api.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        install_rules(&url, params.rules, &apis, &specs).await?;
        let (nats, client, js) = nats_with_usage_stream().await?;
        let published = prefill(&js, &events, params.per_message).await?;
        println!(
            "    pre-filled the stream: {} messages of up to {} events",
            published, params.per_message
        );
        let started = Instant::now();
        let port = crate::dev::devserver::free_port()?;
        let http = format!("http://127.0.0.1:{port}");
        let env = vec![
            (
                "TALLY_PROJECTIONS_DIR",
                params.projections_dir.display().to_string(),
            ),
            (
                "TALLY_LOG",
                std::env::var("TALLY_BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            ),
            ("TALLY_HTTP_ADDR", format!("127.0.0.1:{port}")),
        ];
        let mut tally =
            spawn_tally_with(&url, &nats.url(), &tmp.join(format!("serve{i}.log")), &env)?;
        // The child is stopped whatever happens below.
        let measured = async {
            wait_drained(&js, &mut tally, Duration::from_secs(3600)).await?;
            let drained = started.elapsed();
            let store = tally::store::connect(&url, &StoreOptions::default()).await?;
            wait_folded(&store, &mut tally, events.len(), Duration::from_secs(3600)).await?;
            let folded = started.elapsed();
            let drain_rss_mib = peak_rss_mib(&tally);
            let drain_cpu = super::cpu_seconds(&tally);
            let from_tail = super::metric(&http, "tally_projector_events_read_total{source=\"tail\"}").await;
            let from_log = super::metric(&http, "tally_projector_events_read_total{source=\"log\"}").await;
            let ts: Vec<_> = events.iter().map(|e| e.ts).collect();
            super::project::check_totals(&store, specs.iter().map(|s| &**s), &ts).await?;
            store.close().await;
            let drain_rate = rate(folded);
            println!(
                "(b) serve: drained in {:.1}s, every projection folded in {:.1}s: {drain_rate:>9.0} ev/s   ratio to append {:.2} (goal ≥ {drain_goal})   to bulk load {:.2}   peak RSS {drain_rss_mib:.0} MiB (goal ≤ 150)",
                drained.as_secs_f64(),
                folded.as_secs_f64(),
                drain_rate / append_rate,
                drain_rate / bulk_rate,
            );
            println!(
                "    serve's CPU until folded: {drain_cpu:.1} s ({:.1} µs an event); its projectors took {:.0} % of the events from memory, the rest from the log",
                drain_cpu * 1e6 / events.len() as f64,
                100.0 * from_tail / (from_tail + from_log).max(1.0),
            );
            let (agg_took, agg_rows) =
                bulk_load_aggregates(params.backend, &url, &bulk_url, &specs).await?;
            let write_limit = events.len() as f64 / (bulk + agg_took).as_secs_f64();
            println!(
                "    write limit: the events and their {agg_rows} aggregate rows ({:.2} an event) bulk-loaded in {:.1}s + {:.1}s: {write_limit:>9.0} ev/s   drain / write limit {:.2}",
                agg_rows as f64 / events.len() as f64,
                bulk.as_secs_f64(),
                agg_took.as_secs_f64(),
                drain_rate / write_limit,
            );
            // (c) and (d) on the same process, now holding the 1M events.
            let sustained = if params.steps == 0 {
                None
            } else {
                println!(
                    "(c) sustained-rate search: {} s per step, probes for freshness (goal p99 ≤ {} ms) and alerts (goal p99 ≤ {} ms); (d) the five canonical queries timed meanwhile",
                    params.step_seconds,
                    super::sustained::FRESHNESS_P99_MS,
                    super::sustained::ALERT_P99_MS
                );
                let mut target = super::sustained::Target {
                    js: &js,
                    client: &client,
                    db_url: &url,
                    http: &http,
                    probe_api: &apis[0],
                    per_probe: super::alerts::alerts_per_probe(
                        &super::alerts::rules(params.rules, &apis)?,
                        &apis[0],
                    ),
                    serve: &mut tally,
                };
                let load = super::sustained::Load {
                    seconds: params.step_seconds,
                    per_message: params.per_message,
                    span: (shape == Shape::Spread).then(|| shape.span()),
                    independent: !shape.correlated(),
                    seed: 100 + 10 * i as u64,
                };
                let search = super::sustained::search(
                    &mut target,
                    load,
                    params
                        .start_rate
                        .unwrap_or(append_rate * params.start_share),
                    params.steps,
                )
                .await?;
                match search.best() {
                    Some(best) => println!(
                        "(c) highest sustained rate with both goals: {:.0} ev/s   ratio to append {:.2} (goal ≥ {sustained_goal})",
                        best.published,
                        best.published / append_rate
                    ),
                    None => println!(
                        "(c) no step met both latency goals (lowest rate tried {:.0} ev/s)",
                        search.steps.iter().map(|s| s.asked).fold(f64::MAX, f64::min)
                    ),
                }
                Some(search)
            };
            Ok::<_, BenchError>((drain_rate, drain_rss_mib, write_limit, sustained))
        }
        .await;
        stop(tally);
        let (drain_rate, drain_rss_mib, write_limit, sustained) = measured?;
        drop(js);
        let _ = client.drain().await;
        drop(nats);
        out.push(E2eResult {
            shape,
            append_rate,
            bulk_rate,
            drain_rate,
            drain_rss_mib,
            write_limit,
            sustained,
        });
    }
    println!();
    super::print_goals(&goals(params.backend, &out));
    if std::env::var_os("TALLY_BENCH_KEEP").is_none() {
        drop(dbs);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(out)
}

/// Every figure of the run beside its goal: the recent and spread shapes
/// against the store's append rate, the high-cardinality shape against its
/// write limit.
pub fn goals(backend: Backend, results: &[E2eResult]) -> Vec<super::Goal> {
    let (drain_goal, sustained_goal) = match backend {
        Backend::Postgres => (0.7, 0.5),
        Backend::Sqlite => (0.5, 0.3),
    };
    let (limit_drain_goal, limit_sustained_goal) = match backend {
        Backend::Postgres => (0.5, 0.25),
        Backend::Sqlite => (0.35, 0.25),
    };
    let mut out = Vec::new();
    for r in results {
        let what = |s: &str| format!("e2e {} {}: {s}", backend.name(), r.shape.label());
        // What the rates are measured against.
        let (base, base_name, drain_goal, sustained_goal) = match r.shape {
            Shape::Highcard => (
                r.write_limit,
                "write limit",
                limit_drain_goal,
                limit_sustained_goal,
            ),
            _ => (r.append_rate, "store append", drain_goal, sustained_goal),
        };
        out.push(super::Goal::at_least(
            what(&format!("backlog drain / {base_name}")),
            r.drain_rate / base,
            drain_goal,
            format!("{:.0} / {:.0} ev/s", r.drain_rate, base),
        ));
        let mut rss = r.drain_rss_mib;
        if let Some(search) = &r.sustained {
            rss = rss.max(search.peak_rss());
            match search.best() {
                Some(best) => {
                    out.push(super::Goal::at_least(
                        what(&format!("sustained rate / {base_name}")),
                        best.published / base,
                        sustained_goal,
                        format!(
                            "{:.0} ev/s; freshness p99 {:.0} ms, alert p99 {:.0} ms",
                            best.published, best.fresh_ms.1, best.alert_ms.1
                        ),
                    ));
                    for (name, _, p99) in &best.queries {
                        out.push(super::Goal::at_most(
                            what(&format!("query under load, p99 ms: {name}")),
                            *p99,
                            super::sustained::QUERY_UNDER_LOAD_P99_MS,
                            String::new(),
                        ));
                    }
                }
                None => out.push(super::Goal::at_least(
                    what(&format!("sustained rate / {base_name}")),
                    0.0,
                    sustained_goal,
                    "no step met the latency goals".into(),
                )),
            }
        }
        out.push(super::Goal::at_most(
            what("serve peak RSS, MiB (every phase)"),
            rss,
            150.0,
            String::new(),
        ));
    }
    out
}

/// Appends every event through the store, 1,000 per transaction.
async fn append_all(store: &Store, events: &[Event]) -> Result<Duration, BenchError> {
    let origin = Origin {
        source: "bench",
        subject: None,
    };
    let started = Instant::now();
    for b in events.chunks(1000) {
        store.log().append(b, &[], &origin).await?;
    }
    Ok(started.elapsed())
}

/// The fastest way this database loads the same rows: the physical limit.
async fn bulk_load(backend: Backend, url: &str, events: &[Event]) -> Result<Duration, BenchError> {
    let store = tally::store::connect(url, &StoreOptions::default()).await?;
    store.migrate().await?;
    store.close().await;
    match backend {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await?;
            let started = Instant::now();
            for chunk in events.chunks(100_000) {
                let mut copy = pool
                    .copy_in_raw(&format!(
                        "COPY usage_events ({}) FROM STDIN",
                        super::baseline::COLUMNS
                    ))
                    .await?;
                copy.send(super::baseline::copy_text(chunk).into_bytes())
                    .await?;
                copy.finish().await?;
            }
            let took = started.elapsed();
            pool.close().await;
            Ok(took)
        }
        Backend::Sqlite => {
            let pool = sqlite_writer(url, true).await?;
            let now = tally::event::format_ts(&chrono::Utc::now());
            let started = Instant::now();
            let mut tx = pool.begin().await?;
            for rows in events.chunks(super::baseline::SQLITE_ROWS_PER_STATEMENT) {
                super::baseline::sqlite_insert(rows, &now)
                    .build()
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            let took = started.elapsed();
            pool.close().await;
            Ok(took)
        }
    }
}

/// Copies every aggregate table of `from` (serve's database) into `to`
/// (where [`bulk_load`] put the events), timing only the load: PostgreSQL
/// `COPY … FROM STDIN` of rows read out beforehand; SQLite one transaction of
/// `INSERT … SELECT` from the attached file. The tables, keys and indexes are
/// the ones the projectors create. The time and the rows loaded.
async fn bulk_load_aggregates(
    backend: Backend,
    from: &str,
    to: &str,
    specs: &[std::sync::Arc<tally::aggregate::Spec>],
) -> Result<(Duration, u64), BenchError> {
    let target = tally::store::connect(to, &StoreOptions::default()).await?;
    let mut tables = Vec::new();
    for spec in specs {
        // Opening a projector creates its tables, indexes and checkpoints.
        tally::projection::projector::Projector::open(target.clone(), spec.clone(), &spec.name, "")
            .await
            .map_err(|e| BenchError::Check(format!("tables of {}: {e}", spec.name)))?;
        for g in &spec.granularities {
            tables.push(tally::aggregate::spec::table_name(&spec.name, *g));
        }
    }
    target.close().await;
    let mut rows = 0u64;
    match backend {
        Backend::Postgres => {
            let (src, dst) = (
                sqlx::PgPool::connect(from).await?,
                sqlx::PgPool::connect(to).await?,
            );
            let mut copies = Vec::new();
            for t in &tables {
                let mut out = src.copy_out_raw(&format!("COPY {t} TO STDOUT")).await?;
                let mut data = Vec::new();
                while let Some(chunk) = futures::StreamExt::next(&mut out).await {
                    let chunk: &[u8] = &chunk?;
                    data.extend_from_slice(chunk);
                }
                rows += data.iter().filter(|b| **b == b'\n').count() as u64;
                copies.push((t, data));
            }
            let started = Instant::now();
            for (t, data) in copies {
                let mut copy = dst.copy_in_raw(&format!("COPY {t} FROM STDIN")).await?;
                copy.send(data).await?;
                copy.finish().await?;
            }
            let took = started.elapsed();
            src.close().await;
            dst.close().await;
            Ok((took, rows))
        }
        Backend::Sqlite => {
            use sqlx::sqlite::SqliteConnectOptions;
            use std::str::FromStr;
            // Both sides' aggregates files, where `serve` writes these
            // tables, with its settings for them (`synchronous = NORMAL`).
            let aggregates = |url: &str| -> Result<std::path::PathBuf, BenchError> {
                Ok(tally::store::sqlite::aggregates_path(
                    SqliteConnectOptions::from_str(url)?.get_filename(),
                ))
            };
            let src_path = aggregates(from)?.display().to_string();
            let dst = format!("sqlite://{}", aggregates(to)?.display());
            let pool = sqlite_writer(&dst, false).await?;
            sqlx::query("ATTACH DATABASE ? AS src")
                .bind(&src_path)
                .execute(&pool)
                .await?;
            // Read once first, so the timed load does not pay for a cold file.
            for t in &tables {
                let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM src.{t}"))
                    .fetch_one(&pool)
                    .await?;
                rows += n as u64;
            }
            let started = Instant::now();
            let mut tx = pool.begin().await?;
            for t in &tables {
                sqlx::query(&format!("INSERT INTO main.{t} SELECT * FROM src.{t}"))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            let took = started.elapsed();
            pool.close().await;
            Ok((took, rows))
        }
    }
}

/// One connection to the SQLite file `url` with Tally's settings for it:
/// `durable` (the main file) or not (the aggregates file).
async fn sqlite_writer(url: &str, durable: bool) -> Result<sqlx::SqlitePool, BenchError> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use std::str::FromStr;
    let options = SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if durable {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        });
    Ok(sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?)
}

/// Installs the bench's alert rules into a fresh database.
async fn install_rules(
    url: &str,
    n: usize,
    apis: &[String],
    specs: &[std::sync::Arc<tally::aggregate::Spec>],
) -> Result<(), BenchError> {
    let store = tally::store::connect(url, &StoreOptions::default()).await?;
    store.migrate().await?;
    for r in super::alerts::rules(n, apis)? {
        r.validate("", specs)
            .map_err(|e| BenchError::Check(format!("bench rule {}: {e}", r.name)))?;
        store
            .alerts()
            .write_rule(&r.name, &r.to_json(), "bench", WriteMode::Upsert)
            .await?;
    }
    store.close().await;
    Ok(())
}

/// Publishes the events as JSON arrays, `per_message` per message, on the
/// subject of their first event's api; waits for every ack. Messages published.
async fn prefill(
    js: &async_nats::jetstream::Context,
    events: &[Event],
    per_message: usize,
) -> Result<usize, BenchError> {
    let mut pending = std::collections::VecDeque::new();
    let mut n = 0;
    for chunk in events.chunks(per_message.max(1)) {
        let items: Vec<_> = chunk
            .iter()
            .map(tally::event::codec::to_wire_json)
            .collect();
        let body = serde_json::to_vec(&items).map_err(|e| BenchError::Check(e.to_string()))?;
        let subject = format!("usage.events.{}", chunk[0].api);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("e2e-{}", chunk[0].id).as_str());
        let ack = js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| BenchError::Check(format!("publish: {e}")))?;
        pending.push_back(ack);
        if pending.len() >= 256 {
            if let Some(a) = pending.pop_front() {
                a.await
                    .map_err(|e| BenchError::Check(format!("ack: {e}")))?;
            }
        }
        n += 1;
    }
    for a in pending {
        a.await
            .map_err(|e| BenchError::Check(format!("ack: {e}")))?;
    }
    Ok(n)
}

/// Waits until the log holds `events` and every projection's checkpoint is at its end.
///
/// The exact check counts the log and the events after each checkpoint,
/// which costs the database time in proportion to the lag (about a core
/// when polled every 20 ms a million events behind): it runs once every
/// checkpoint says it has passed `events` events, or every 5 s.
async fn wait_folded(
    store: &Store,
    child: &mut std::process::Child,
    events: usize,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    let mut exact_at: Option<Instant> = None;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Check(format!("tally exited with {status}")));
        }
        let states = store.projections().projection_states().await?;
        let passed = !states.is_empty() && states.iter().all(|s| s.events_folded >= events as i64);
        if passed || exact_at.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            exact_at = Some(Instant::now());
            let stored = store.log().counts().await?.events;
            let mut behind = 0;
            for state in &states {
                behind += store.projections().events_after(state.cursor).await?;
            }
            if stored == events as i64 && behind == 0 && !states.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Check(format!(
                    "after {timeout:?}: {stored} of {events} events stored, projections {behind} events behind"
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
