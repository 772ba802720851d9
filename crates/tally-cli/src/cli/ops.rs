//! Operator commands: `tokens`, `jobs`, `export`, `import`, `copy`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;

use super::progress_bar;
use tally::auth;
use tally::config::{DatabaseConfig, JobsConfig, ProjectionConfig};
use tally::jobs::{self, Job, JobContext};
use tally::store::{self, redact_url, Store};
use tally::transfer::{self, ExportFormat};

#[derive(Debug, Subcommand)]
pub(super) enum TokensCommand {
    /// Create a token and print it once (only its SHA-256 is stored).
    Create {
        /// Unique among active tokens; recorded as the actor of changes made with it.
        #[arg(long)]
        name: String,
        /// ingest, read, admin; repeat or comma-separate for several (admin includes all).
        #[arg(long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Every token (never the secret): id, name, scopes, created, revoked.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name or id (effective within a second on running servers).
    /// Authentication stays on after the last token is revoked: the API is then closed.
    Revoke {
        /// Token name or id.
        name: String,
    },
    /// Turn authentication off (it turned on with the first token). Refused
    /// while a token is active; the API is then open on loopback only (or
    /// anywhere with --insecure-no-auth).
    DisableAuth,
}

#[derive(Debug, Subcommand)]
pub(super) enum JobsCommand {
    /// Recent job runs (from `job_runs`) and each job's schedule.
    List {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Most runs shown.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        jobs: JobsConfig,
    },
    /// Run a job now (recorded in `job_runs` with trigger `manual`).
    Run {
        /// retention, reconciliation or optimize.
        job: String,
        #[command(flatten)]
        jobs: JobsConfig,
        #[command(flatten)]
        projections: ProjectionConfig,
        /// Oldest event timestamp accepted (retention must exceed it; see `serve`).
        #[arg(long, env = "TALLY_LATE_ARRIVAL_HORIZON", default_value = "35d", value_parser = tally::duration::parse)]
        late_arrival_horizon: Duration,
        /// Subject prefix of alert notifications (as `serve`).
        #[arg(
            long,
            env = "TALLY_ALERTS_SUBJECT_PREFIX",
            default_value = "usage.alerts"
        )]
        alerts_subject_prefix: String,
    },
}

#[derive(Debug, clap::Args)]
pub(super) struct ExportArgs {
    /// Only events with `ts` at or after this (RFC 3339 or YYYY-MM-DD, UTC).
    #[arg(long)]
    from: Option<String>,
    /// Only events with `ts` before this.
    #[arg(long)]
    to: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "ndjson")]
    format: ExportFormat,
    /// File to write (default: standard output). Prices and corrections go
    /// beside it, to `<out>.ledger.json`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write the prices and corrections (default: `<out>.ledger.json`;
    /// needed to keep them when the events go to standard output).
    #[arg(long)]
    ledger: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(super) struct ImportArgs {
    /// A file written by `tally export` (NDJSON or MessagePack, detected).
    /// When `<file>.ledger.json` exists, say what to do with it: `--ledger`
    /// to restore it, `--no-ledger` to leave it.
    file: PathBuf,
    /// The ledger file (prices and corrections) to restore after the events.
    #[arg(long, conflicts_with = "no_ledger")]
    ledger: Option<PathBuf>,
    /// Restore no ledger, even when `<file>.ledger.json` exists (its voided
    /// events then count again, and its prices are not restored).
    #[arg(long)]
    no_ledger: bool,
    /// How far in the future an event timestamp may be.
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW", default_value = "5m", value_parser = tally::duration::parse)]
    max_future_skew: Duration,
    /// Fold the imported events into the projections now (a running server does it anyway).
    #[arg(long)]
    no_project: bool,
    #[command(flatten)]
    projections: ProjectionConfig,
}

#[derive(clap::Args)]
pub(super) struct CopyArgs {
    /// Source database URL.
    #[arg(long)]
    from: String,
    /// Target database URL (must hold no events; migrated first).
    #[arg(long)]
    to: String,
    #[command(flatten)]
    projections: ProjectionConfig,
}

/// The URLs are redacted so the arguments can be printed.
impl std::fmt::Debug for CopyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyArgs")
            .field("from", &redact_url(&self.from))
            .field("to", &redact_url(&self.to))
            .field("projections", &self.projections)
            .finish()
    }
}

/// `$USER` of the operator, for audit fields.
pub(super) fn cli_actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

pub(super) async fn open(db: &DatabaseConfig) -> anyhow::Result<Store> {
    let store = store::connect(&db.database_url, &db.store_options()).await?;
    store
        .migrate()
        .await
        .with_context(|| format!("opening {}", redact_url(&db.database_url)))?;
    Ok(store)
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(super) async fn tokens(db: &DatabaseConfig, which: TokensCommand) -> anyhow::Result<()> {
    let store = open(db).await?;
    match which {
        TokensCommand::Create { name, scopes } => {
            let scopes = auth::parse_scopes(&scopes)?;
            let (token, row) = auth::create_token(&store, &name, &scopes, &cli_actor()).await?;
            eprintln!(
                "created token `{}` (id {}, scopes {}). It is shown only now; store it in a secret manager:",
                row.name, row.id, row.scopes
            );
            println!("{token}");
        }
        TokensCommand::List { json } => {
            let rows = store.tokens().list().await?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id, "name": t.name,
                            "scopes": t.scopes.split(',').collect::<Vec<_>>(),
                            "created_at": time(t.created_at), "created_by": t.created_by,
                            "revoked_at": t.revoked_at.map(time),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<14} {:<24} {:<20} {:<22} REVOKED",
                    "ID", "NAME", "SCOPES", "CREATED"
                );
                for t in rows {
                    println!(
                        "{:<14} {:<24} {:<20} {:<22} {}",
                        t.id,
                        t.name,
                        t.scopes,
                        time(t.created_at),
                        t.revoked_at.map(time).unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        TokensCommand::Revoke { name } => {
            if store.tokens().revoke_token(&name, Utc::now()).await? {
                println!("revoked `{name}`; running servers refuse it within a second");
                let active = store.tokens().any_active().await?;
                if !active {
                    println!("no active token is left: authentication stays on, so every request is refused until a token is created (`tally tokens disable-auth` turns it off)");
                }
            } else {
                anyhow::bail!("no active token with name or id `{name}`");
            }
        }
        TokensCommand::DisableAuth => {
            tally::auth::disable_auth(&store).await?;
            println!("authentication is off: the API is open to anyone who can reach it (servers on a non-loopback address refuse requests unless started with --insecure-no-auth)");
        }
    }
    store.close().await;
    Ok(())
}

pub(super) async fn jobs(db: &DatabaseConfig, which: JobsCommand) -> anyhow::Result<()> {
    let store = open(db).await?;
    match which {
        JobsCommand::List {
            job,
            limit,
            json,
            jobs: cfg,
        } => {
            if let Some(j) = &job {
                Job::parse(j).with_context(|| {
                    format!("unknown job `{j}`: use retention, reconciliation or optimize")
                })?;
            }
            let runs = store.jobs().job_runs(job.as_deref(), limit.max(1)).await?;
            if json {
                let v: Vec<_> = runs
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id, "job": r.job, "slot": time(r.slot), "trigger": r.trigger,
                            "instance": r.instance, "started_at": time(r.started_at),
                            "finished_at": r.finished_at.map(time), "outcome": r.outcome,
                            "rows_affected": r.rows_affected,
                            "detail": r.detail.as_deref().and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for j in Job::ALL {
                    let cron = j.cron(&cfg);
                    let next = cron
                        .and_then(next_occurrence)
                        .map(time)
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<15} cron `{}` (UTC)  next {next}",
                        j.as_str(),
                        cron.unwrap_or("off")
                    );
                }
                println!();
                println!(
                    "{:<6} {:<15} {:<21} {:<9} {:<21} {:>8} {:<8} {:>10}  INSTANCE",
                    "ID", "JOB", "SLOT", "TRIGGER", "STARTED", "SECONDS", "OUTCOME", "ROWS"
                );
                for r in runs {
                    let secs = r
                        .finished_at
                        .map(|f| {
                            format!("{:.1}", (f - r.started_at).num_milliseconds() as f64 / 1e3)
                        })
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<6} {:<15} {:<21} {:<9} {:<21} {:>8} {:<8} {:>10}  {}",
                        r.id,
                        r.job,
                        time(r.slot),
                        r.trigger,
                        time(r.started_at),
                        secs,
                        r.outcome,
                        r.rows_affected,
                        r.instance
                    );
                }
            }
        }
        JobsCommand::Run {
            job,
            jobs: cfg,
            projections,
            late_arrival_horizon,
            alerts_subject_prefix,
        } => {
            let job = Job::parse(&job).with_context(|| {
                format!("unknown job `{job}`: use retention, reconciliation or optimize")
            })?;
            jobs::validate(&cfg, late_arrival_horizon)?;
            let specs = tally::aggregate::spec::load_specs(projections.projections_dir.as_deref())?
                .into_iter()
                .map(std::sync::Arc::new)
                .collect();
            let ctx = JobContext {
                store: store.clone(),
                specs,
                retention: cfg.retention,
                batch: cfg.retention_batch,
                instance: format!("cli-{}", std::process::id()),
                alert_prefix: alerts_subject_prefix,
                history: jobs::HistoryRetention::from_config(&cfg),
            };
            match jobs::run_job(&ctx, job, Utc::now(), "manual").await? {
                None => anyhow::bail!("a run of `{}` holds this instant; try again", job.as_str()),
                Some((id, Ok(o))) => {
                    println!(
                        "{} run {id}: ok, {} rows\n{}",
                        job.as_str(),
                        o.rows_affected,
                        serde_json::to_string_pretty(&o.detail)?
                    );
                }
                Some((id, Err(e))) => anyhow::bail!("{} run {id} failed: {e}", job.as_str()),
            }
        }
    }
    store.close().await;
    Ok(())
}

fn next_occurrence(expr: &str) -> Option<DateTime<Utc>> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .ok()?;
    cron.find_next_occurrence(&Utc::now(), false).ok()
}

/// RFC 3339, or a date meaning its UTC midnight.
fn parse_instant(flag: &str, s: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").with_context(|| {
        format!("--{flag} `{s}`: use RFC 3339 (2026-11-01T00:00:00Z) or a date (2026-11-01)")
    })?;
    Ok(d.and_time(chrono::NaiveTime::MIN).and_utc())
}

fn bar(started: Instant, unit: &'static str) -> impl FnMut(u64, u64) {
    let mut stderr = std::io::stderr();
    move |done, total| {
        let _ = write!(
            stderr,
            "\r{}",
            progress_bar(done, total, started.elapsed(), unit)
        );
        let _ = stderr.flush();
    }
}

pub(super) async fn export(db: &DatabaseConfig, a: ExportArgs) -> anyhow::Result<()> {
    let from = a
        .from
        .as_deref()
        .map(|s| parse_instant("from", s))
        .transpose()?;
    let to =
        a.to.as_deref()
            .map(|s| parse_instant("to", s))
            .transpose()?;
    let store = open(db).await?;
    let started = Instant::now();
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            transfer::create_private(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let report =
        transfer::export(&store, from, to, a.format, &mut out, bar(started, "events")).await?;
    drop(out);
    eprintln!(
        "\nexported {} events in {:.1}s",
        report.events,
        started.elapsed().as_secs_f64()
    );
    match a
        .ledger
        .clone()
        .or_else(|| a.out.as_deref().map(transfer::ledger_path))
    {
        Some(path) => {
            let l = transfer::export_ledger(&store, &path).await?;
            eprintln!(
                "exported {} prices and {} corrections to {}",
                l.prices.len(),
                l.corrections.len(),
                path.display()
            );
        }
        None => {
            let l = store.ledger().await?;
            if !(l.prices.is_empty() && l.corrections.is_empty()) {
                eprintln!(
                    "warning: {} prices and {} corrections were not exported (events went to standard output): pass --ledger FILE",
                    l.prices.len(),
                    l.corrections.len()
                );
            }
        }
    }
    store.close().await;
    Ok(())
}

pub(super) async fn import(db: &DatabaseConfig, a: ImportArgs) -> anyhow::Result<()> {
    // A ledger voids events and changes prices: applying one because a file
    // lies beside the backup would let whoever can write there do both.
    let beside = transfer::ledger_path(&a.file);
    if a.ledger.is_none() && !a.no_ledger && std::fs::symlink_metadata(&beside).is_ok() {
        anyhow::bail!(
            "{} lies beside the backup: pass `--ledger {}` to restore its prices and corrections, or `--no-ledger` to import the events without them (voided events then count again); nothing was imported",
            beside.display(),
            beside.display()
        );
    }
    let store = open(db).await?;
    let started = Instant::now();
    let report = transfer::import(
        store.clone(),
        &a.file,
        a.max_future_skew,
        bar(started, "bytes"),
    )
    .await?;
    eprintln!();
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &a.ledger {
        let restored = transfer::import_ledger(&store, path).await?;
        eprintln!(
            "ledger {}: restored {}",
            path.display(),
            serde_json::to_string(&restored)?
        );
    }
    if !a.no_project {
        for task in
            tally::app::open_projectors(&store, a.projections.projections_dir.as_deref()).await?
        {
            if let Some(mut p) = task.projector {
                let n = p.catch_up(a.projections.projector_batch.max(1)).await?;
                eprintln!("projection {}: folded {n} events", task.spec.name);
            }
        }
    }
    store.close().await;
    Ok(())
}

pub(super) async fn copy(db: &DatabaseConfig, a: CopyArgs) -> anyhow::Result<()> {
    let opts = db.store_options();
    let source = store::connect(&a.from, &opts).await?;
    source
        .migrate()
        .await
        .with_context(|| format!("opening the source {}", redact_url(&a.from)))?;
    let target = store::connect(&a.to, &opts).await?;
    target
        .migrate()
        .await
        .with_context(|| format!("opening the target {}", redact_url(&a.to)))?;
    let started = Instant::now();
    let mut stderr = std::io::stderr();
    let report = transfer::copy(
        &source,
        target.clone(),
        a.projections.projections_dir.as_deref(),
        |what, done, total| {
            let _ = write!(
                stderr,
                "\r{what}: {}",
                progress_bar(done, total, started.elapsed(), "events")
            );
            let _ = stderr.flush();
        },
    )
    .await?;
    eprintln!();
    println!(
        "copied {} events and {} rows of rules, quotas, alerts and tokens from {} to {} in {:.1}s",
        report.events,
        report.state_rows,
        redact_url(&a.from),
        redact_url(&a.to),
        started.elapsed().as_secs_f64()
    );
    for (name, n) in &report.projections {
        println!("projection {name}: folded {n} events");
    }
    println!(
        "verified: {} events, {} errors, cost_nanos {}, tokens_in {}, tokens_out {}, bytes {} equal in both databases and in every aggregate table",
        report.target.events,
        report.target.errors,
        report.target.cost_nanos,
        report.target.tokens_in,
        report.target.tokens_out,
        report.target.bytes
    );
    source.close().await;
    target.close().await;
    Ok(())
}
