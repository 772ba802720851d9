//! `tally bench …`: performance measured against a baseline in the same run.
//!
//! Machines here are shared and noisy, so absolute rates mean little; every
//! benchmark prints the ratio of Tally's path to the physical limit of the same
//! database, measured on the same rows right before.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolCopyExt;

use crate::devserver::TempPostgres;
use crate::event::{format_ts, Event};
use crate::store::postgres::PgStore;
use crate::store::sqlite::{insert_rows, SqliteStore, ROWS_PER_STATEMENT};
use crate::store::{metadata_json, Backend, EventStore, Origin, StoreOptions, EVENT_COLUMNS};
use crate::synth::{self, SynthConfig};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A baseline query failed.
    #[error("baseline: {0}")]
    Sql(#[from] sqlx::Error),
    /// The throwaway PostgreSQL could not start.
    #[error(transparent)]
    DevServer(#[from] crate::devserver::DevServerError),
    /// Temp files.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The two paths did not store the same rows.
    #[error("check failed: {0}")]
    Check(String),
}

/// Parameters of `tally bench append`.
#[derive(Debug, Clone)]
pub struct AppendBench {
    /// Database to measure.
    pub backend: Backend,
    /// Events per path.
    pub events: usize,
    /// Events per transaction.
    pub batch: usize,
    /// Rounds (baseline then Tally each round); the best of each is reported.
    pub rounds: usize,
    /// An existing PostgreSQL database to use instead of a throwaway cluster.
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
                let store = PgStore::connect(&url, &StoreOptions::default()).await?;
                store.migrate().await?;
                let result = postgres_round(&store, &events, params.batch, &origin).await;
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
    store: &PgStore,
    events: &[Event],
    batch: usize,
    origin: &Origin,
) -> Result<(Duration, Duration), BenchError> {
    let pool = store.pool();
    sqlx::query("DROP TABLE IF EXISTS bench_copy")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE bench_copy (LIKE usage_events INCLUDING ALL)")
        .execute(pool)
        .await?;

    let start = Instant::now();
    for chunk in events.chunks(batch) {
        let mut copy = pool
            .copy_in_raw(&format!("COPY bench_copy ({EVENT_COLUMNS}) FROM STDIN"))
            .await?;
        copy.send(copy_text(chunk).into_bytes()).await?;
        copy.finish().await?;
    }
    let baseline = start.elapsed();

    let start = Instant::now();
    for chunk in events.chunks(batch) {
        store.append(chunk, &[], origin).await?;
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

/// COPY text format: tab-separated, `\N` for NULL, backslash escapes.
fn copy_text(events: &[Event]) -> String {
    fn field(out: &mut String, v: Option<&str>) {
        match v {
            None => out.push_str("\\N"),
            Some(s) => {
                for c in s.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\t' => out.push_str("\\t"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        c => out.push(c),
                    }
                }
            }
        }
        out.push('\t');
    }
    let num = |v: Option<i64>| v.map(|n| n.to_string());
    let mut out = String::with_capacity(events.len() * 400);
    for e in events {
        field(&mut out, Some(&e.id));
        field(&mut out, Some(&format_ts(&e.ts)));
        field(&mut out, Some(&e.api));
        field(&mut out, e.endpoint.as_deref());
        field(&mut out, e.method.as_deref());
        field(&mut out, e.key.as_deref());
        field(&mut out, e.user.as_deref());
        field(&mut out, e.model.as_deref());
        field(&mut out, e.status.map(|s| s.to_string()).as_deref());
        field(&mut out, Some(if e.success { "t" } else { "f" }));
        field(&mut out, e.error_type.map(|t| t.as_str()));
        field(&mut out, e.error_message.as_deref());
        field(&mut out, e.latency_ms.map(|l| l.to_string()).as_deref());
        field(&mut out, num(e.request_bytes).as_deref());
        field(&mut out, num(e.response_bytes).as_deref());
        field(&mut out, num(e.tokens_in).as_deref());
        field(&mut out, num(e.tokens_out).as_deref());
        field(&mut out, num(e.cost_nanos).as_deref());
        field(&mut out, Some(if e.cached { "t" } else { "f" }));
        field(&mut out, metadata_json(e).as_deref());
        out.pop();
        let _ = writeln!(out);
    }
    out
}

async fn sqlite_round(
    baseline_path: &std::path::Path,
    tally_path: &std::path::Path,
    events: &[Event],
    batch: usize,
    origin: &Origin,
) -> Result<(Duration, Duration), BenchError> {
    let open = |p: &std::path::Path| format!("sqlite://{}", p.display());
    let base = SqliteStore::connect(&open(baseline_path), &StoreOptions::default()).await?;
    base.migrate().await?;
    let start = Instant::now();
    for chunk in events.chunks(batch) {
        let mut tx = base.writer().begin_with("BEGIN IMMEDIATE").await?;
        let now = format_ts(&chrono::Utc::now());
        for rows in chunk.chunks(ROWS_PER_STATEMENT) {
            insert_rows(rows, &now).build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    let baseline = start.elapsed();
    let baseline_count = base.counts().await?.events;
    base.close().await;

    let tally: Arc<dyn EventStore> =
        Arc::new(SqliteStore::connect(&open(tally_path), &StoreOptions::default()).await?);
    tally.migrate().await?;
    let start = Instant::now();
    for chunk in events.chunks(batch) {
        tally.append(chunk, &[], origin).await?;
    }
    let elapsed = start.elapsed();
    let tally_count = tally.counts().await?.events;
    tally.close().await;
    check_counts(baseline_count, tally_count, events.len())?;
    Ok((baseline, elapsed))
}
