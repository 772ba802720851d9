//! `tally bench all [--quick]`: every benchmark, then one table of each
//! figure beside its goal. `--quick` sizes them to fit in about ten minutes
//! on two cores; run it before resolving anything that could touch
//! performance. A benchmark that fails is a row marked MISS with its error,
//! and the rest still run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{BenchError, Goal};
use tally::store::Backend;

/// Parameters of `tally bench all`.
#[derive(Debug, Clone, clap::Args)]
pub struct AllBench {
    /// Sizes that fit in about 10 minutes on 2 cores (without it: each
    /// benchmark's own default size, which takes hours).
    #[arg(long)]
    pub quick: bool,
    /// Projection specs.
    #[arg(long, env = "TALLY_PROJECTIONS_DIR", default_value = "projections")]
    pub projections_dir: PathBuf,
}

/// Runs every benchmark and prints the table; the figures.
pub async fn all(params: &AllBench) -> Result<Vec<Goal>, BenchError> {
    let started = Instant::now();
    let q = params.quick;
    let size = |quick: usize, full: usize| if q { quick } else { full };
    let dir = params.projections_dir.clone();
    let mut goals = Vec::new();
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let b = backend.name();
        banner(&format!("append --backend {b}"));
        let p = super::AppendBench {
            backend,
            events: size(200_000, 1_000_000),
            batch: 1_000,
            rounds: 1,
            postgres_url: None,
        };
        match super::append(&p).await {
            Ok(r) => goals.push(Goal::at_least(
                format!("append {b}: tally / bulk load"),
                r.ratio(),
                0.6,
                format!("{:.0} / {:.0} ev/s", r.tally_rate, r.baseline_rate),
            )),
            Err(e) => goals.push(failed(format!("append {b}"), e)),
        }
    }
    banner("ingest --backend postgres --no-live");
    let p = super::IngestBench {
        backend: Backend::Postgres,
        events: size(100_000, 1_000_000),
        no_live: true,
    };
    match super::ingest(&p).await {
        Ok(r) => {
            goals.push(Goal::at_least(
                "ingest postgres (1 event per message): drain / store append".into(),
                r.drain_rate / r.baseline_rate,
                0.7,
                format!("{:.0} / {:.0} ev/s", r.drain_rate, r.baseline_rate),
            ));
            goals.push(Goal::at_most(
                "ingest postgres: serve peak RSS, MiB".into(),
                r.drain_peak_rss_mib,
                150.0,
                String::new(),
            ));
        }
        Err(e) => goals.push(failed("ingest postgres".into(), e)),
    }
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let b = backend.name();
        banner(&format!("project --backend {b}"));
        let p = super::ProjectBench {
            backend,
            events: size(200_000, 1_000_000),
            live_seconds: if q { 10 } else { 20 },
            projections_dir: dir.clone(),
            uniform: false,
            span: Duration::from_secs(3600),
        };
        match super::project(&p).await {
            Ok(r) => {
                goals.push(Goal::at_least(
                    format!("project {b}: fold / append"),
                    r.fold_rate / r.append_rate,
                    2.0,
                    format!("{:.0} / {:.0} ev/s", r.fold_rate, r.append_rate),
                ));
                if let Some((_, p99, _)) = r.freshness_ms {
                    goals.push(Goal::at_most(
                        format!("project {b}: freshness at half load, p99 ms"),
                        p99,
                        1000.0,
                        String::new(),
                    ));
                }
            }
            Err(e) => goals.push(failed(format!("project {b}"), e)),
        }
    }
    banner("alerts --backend postgres");
    let p = super::alerts::AlertsBench {
        backend: Backend::Postgres,
        rules: 1_000,
        keys: 10_000,
        events: size(50_000, 100_000),
        live_seconds: if q { 15 } else { 30 },
        projections_dir: dir.clone(),
        load_fraction: 0.5,
        rounds: if q { 1 } else { 2 },
    };
    match super::alerts::alerts(&p).await {
        Ok(r) => {
            goals.push(Goal::at_least(
                "alerts postgres: ingest with 1,000 rules / without".into(),
                r.ingest_with / r.ingest_without,
                0.9,
                format!("{:.0} / {:.0} ev/s", r.ingest_with, r.ingest_without),
            ));
            goals.push(Goal::at_most(
                "alerts postgres: publish → alert at half load, p99 ms".into(),
                r.latency_ms.1,
                2000.0,
                String::new(),
            ));
        }
        Err(e) => goals.push(failed("alerts postgres".into(), e)),
    }
    banner("query");
    let events = size(1_000_000, 10_000_000);
    let p = super::QueryBench {
        events,
        iterations: size(200, 500),
        baseline_iterations: size(3, 10),
        projections_dir: dir.clone(),
        uniform: false,
    };
    match super::query(&p).await {
        Ok(figures) => goals.extend(figures.iter().map(|f| {
            Goal::at_most(
                format!("query p99 ms ({events} events): {}", f.name),
                f.tally_ms.1,
                5.0,
                format!("GROUP BY p50 {:.1} ms", f.baseline_ms.0),
            )
        })),
        Err(e) => goals.push(failed("query".into(), e)),
    }
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let b = backend.name();
        banner(&format!("e2e --backend {b}"));
        let p = super::e2e::E2eBench {
            backend,
            events: size(200_000, 1_000_000),
            rules: 1_000,
            shapes: vec![super::e2e::Shape::Recent, super::e2e::Shape::Spread],
            per_message: 100,
            projections_dir: dir.clone(),
            steps: if q { 2 } else { 5 },
            step_seconds: if q { 20 } else { 60 },
            start_share: 0.3,
            start_rate: None,
        };
        match super::e2e::e2e(&p).await {
            Ok(r) => goals.extend(super::e2e::goals(backend, &r)),
            Err(e) => goals.push(failed(format!("e2e {b}"), e)),
        }
    }
    println!(
        "\n== bench all{}: {:.0} s, {} cores ==",
        if q { " --quick" } else { "" },
        started.elapsed().as_secs_f64(),
        super::num_cpus()
    );
    super::print_goals(&goals);
    Ok(goals)
}

fn banner(what: &str) {
    println!("\n== tally bench {what} ==");
}

fn failed(what: String, e: BenchError) -> Goal {
    Goal {
        what,
        value: f64::NAN,
        goal: "runs".into(),
        met: false,
        note: format!("error: {e}"),
    }
}
