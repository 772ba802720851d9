//! `tally prices`: import a catalog (Tally's format or LiteLLM's), list it,
//! delete a price, force a reprice; `--wait` follows the restatements.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use tally::config::DatabaseConfig;
use tally::price::{PriceOut, Pricer};
use tally::store::Store;

use super::ops::{cli_actor, open};

/// The format of a price file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PriceFormat {
    /// Tally's: TOML `[[prices]]` tables, or JSON (one price, an array, or `{"prices": [...]}`).
    Tally,
    /// LiteLLM's `model_prices_and_context_window.json` (per-token prices).
    Litellm,
}

#[derive(Debug, Subcommand)]
pub enum PricesCommand {
    /// Create or update prices from a file (idempotent: importing it again changes nothing).
    Import {
        /// The price file.
        file: std::path::PathBuf,
        /// Its format.
        #[arg(long, value_enum, default_value = "tally")]
        format: PriceFormat,
        /// LiteLLM only (its file has no dates): when the prices take effect (RFC 3339).
        #[arg(long)]
        effective_from: Option<String>,
        /// LiteLLM only: narrow every price to this api (default: any api).
        #[arg(long)]
        api: Option<String>,
        /// Recorded in the audit trail (default: `cli:$USER`).
        #[arg(long)]
        actor: Option<String>,
        /// Follow the restatements the import queued until they are done (a running `tally serve` does them).
        #[arg(long)]
        wait: bool,
    },
    /// The stored prices.
    List {
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Only prices narrowed to this api.
        #[arg(long)]
        api: Option<String>,
        /// Only the prices in effect at this instant (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        /// JSON (as `GET /v1/prices`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a price by id (its events are repriced).
    Delete {
        /// The price's id.
        id: String,
        /// Recorded in the audit trail (default: `cli:$USER`).
        #[arg(long)]
        actor: Option<String>,
    },
    /// Restate every projection from an instant on with the current catalog.
    Reprice {
        /// From (RFC 3339).
        #[arg(long)]
        from: String,
        /// Only this model's events change (whole buckets are restated).
        #[arg(long)]
        model: Option<String>,
        /// Recorded in the audit trail (default: `cli:$USER`).
        #[arg(long)]
        actor: Option<String>,
        /// Follow the restatements until they are done (a running `tally serve` does them).
        #[arg(long)]
        wait: bool,
    },
}

fn instant(flag: &str, v: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| {
            format!("--{flag} `{v}` is not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z)")
        })
}

/// Runs a `tally prices` command.
pub async fn prices(db: &DatabaseConfig, which: PricesCommand) -> anyhow::Result<()> {
    let store = open(db).await?;
    let pricer = Pricer::new(store.clone(), None);
    match which {
        PricesCommand::Import {
            file,
            format,
            effective_from,
            api,
            actor,
            wait,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let inputs = match format {
                PriceFormat::Tally => {
                    if effective_from.is_some() || api.is_some() {
                        anyhow::bail!("--effective-from and --api are for --format litellm; a Tally price file gives them per price");
                    }
                    tally::price::from_tally_file(&text)
                        .with_context(|| format!("reading {}", file.display()))?
                }
                PriceFormat::Litellm => {
                    let from = effective_from.context(
                        "--effective-from is required with --format litellm (its file has no dates), e.g. --effective-from 2026-01-01T00:00:00Z",
                    )?;
                    let from = instant("effective-from", &from)?;
                    let (inputs, report) = tally::price::from_litellm(&text, from, api.as_deref())
                        .with_context(|| format!("reading {}", file.display()))?;
                    println!(
                        "LiteLLM entries: {} converted, {} skipped without token prices, {} skipped with more than 9 decimals per million tokens",
                        report.converted, report.skipped_no_token_price, report.skipped_too_precise
                    );
                    inputs
                }
            };
            let actor = actor.unwrap_or_else(cli_actor);
            let answer = pricer
                .put(&inputs, &actor)
                .await
                .with_context(|| format!("importing {}", file.display()))?;
            println!(
                "prices: {} created, {} updated, {} unchanged; {} restatements queued",
                answer.created, answer.updated, answer.unchanged, answer.restatements
            );
            if wait {
                follow(&store).await?;
            }
        }
        PricesCommand::List {
            model,
            api,
            at,
            json,
        } => {
            let at = at.as_deref().map(|v| instant("at", v)).transpose()?;
            let prices = pricer.list(model.as_deref(), api.as_deref(), at).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "prices": prices }))?
                );
            } else {
                print!("{}", table(&prices));
            }
        }
        PricesCommand::Delete { id, actor } => {
            let gone = pricer.delete(&id, &actor.unwrap_or_else(cli_actor)).await?;
            println!(
                "deleted {} ({} from {})",
                gone.id, gone.model, gone.effective_from
            );
        }
        PricesCommand::Reprice {
            from,
            model,
            actor,
            wait,
        } => {
            let from = instant("from", &from)?;
            let n = pricer
                .reprice(from, model.as_deref(), &actor.unwrap_or_else(cli_actor))
                .await?;
            println!("{n} restatements queued");
            if wait {
                follow(&store).await?;
            }
        }
    }
    Ok(())
}

/// A plain table of prices.
fn table(prices: &[PriceOut]) -> String {
    let mut rows = vec![[
        "id".to_string(),
        "model".into(),
        "api".into(),
        "effective_from".into(),
        "effective_to".into(),
        "input/Mtok".into(),
        "output/Mtok".into(),
        "cached/Mtok".into(),
        "per_request".into(),
    ]];
    for p in prices {
        rows.push([
            p.id.clone(),
            p.model.clone(),
            p.api.clone().unwrap_or_else(|| "*".into()),
            p.effective_from.clone(),
            p.effective_to.clone().unwrap_or_else(|| "-".into()),
            p.input_per_mtok.clone(),
            p.output_per_mtok.clone(),
            p.cached_input_per_mtok
                .clone()
                .unwrap_or_else(|| "-".into()),
            p.per_request.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Shows the restatement queue draining, as a progress bar on stderr, until
/// it is empty.
pub(super) async fn follow(store: &Store) -> anyhow::Result<()> {
    let total = pending(store).await?;
    if total == 0 {
        return Ok(());
    }
    let mut err = std::io::stderr();
    loop {
        let left = pending(store).await?;
        let done = total.saturating_sub(left);
        let width = 30;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        write!(
            err,
            "\rrestating [{}{}] {done}/{total}",
            "#".repeat(filled),
            " ".repeat(width - filled)
        )?;
        err.flush()?;
        if left == 0 {
            writeln!(err)?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn pending(store: &Store) -> anyhow::Result<usize> {
    Ok(store
        .corrections()
        .pending_counts()
        .await?
        .iter()
        .map(|(_, n)| usize::try_from(*n).unwrap_or(0))
        .sum())
}
