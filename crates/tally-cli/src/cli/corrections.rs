//! `tally corrections`: submit (from a JSON file or argument), list, show,
//! revert; `--wait` follows the restatements with a progress bar.

use anyhow::Context;
use clap::Subcommand;
use tally::config::DatabaseConfig;
use tally::correction::{CorrectionRequest, Corrector, RevertRequest};

use super::ops::{cli_actor, open};
use super::prices::follow;

#[derive(Debug, Subcommand)]
pub enum CorrectionsCommand {
    /// Record a correction: a JSON body as `POST /v1/corrections` takes it,
    /// from a file (`-` for standard input) or given inline with `--json`.
    Submit {
        /// The file holding the correction.
        file: Option<std::path::PathBuf>,
        /// The correction itself, inline.
        #[arg(long, conflicts_with = "file")]
        json: Option<String>,
        /// Recorded as the correction's actor (default: `cli:$USER`).
        #[arg(long)]
        actor: Option<String>,
        /// How far back a range may reach (as `serve`'s setting).
        #[arg(long, env = "TALLY_LATE_ARRIVAL_HORIZON", default_value = "7d", value_parser = tally::duration::parse)]
        late_arrival_horizon: std::time::Duration,
        /// Follow the restatements until they are done (a running `tally serve` does them).
        #[arg(long)]
        wait: bool,
    },
    /// Corrections, newest first, as JSON.
    List {
        /// Most corrections shown.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Undo a correction (recorded; its buckets are restated again).
    Revert {
        /// The correction's id.
        id: String,
        /// Why (required).
        #[arg(long)]
        reason: String,
        /// Recorded as the revert's actor (default: `cli:$USER`).
        #[arg(long)]
        actor: Option<String>,
        /// Follow the restatements until they are done.
        #[arg(long)]
        wait: bool,
    },
}

/// Runs a `tally corrections` command.
pub async fn corrections(db: &DatabaseConfig, which: CorrectionsCommand) -> anyhow::Result<()> {
    let store = open(db).await?;
    let names: Vec<String> = store
        .projections()
        .projection_states()
        .await?
        .into_iter()
        .map(|s| s.name)
        .filter(|n| !n.contains('~'))
        .collect();
    let corrector = |horizon| {
        Corrector::new(
            store.clone(),
            names.clone(),
            horizon,
            std::sync::Arc::new(tokio::sync::Notify::new()),
        )
    };
    match which {
        CorrectionsCommand::Submit {
            file,
            json,
            actor,
            late_arrival_horizon,
            wait,
        } => {
            let text = match (json, file) {
                (Some(j), _) => j,
                (None, Some(p)) if p.as_os_str() == "-" => {
                    std::io::read_to_string(std::io::stdin()).context("reading standard input")?
                }
                (None, Some(p)) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?,
                (None, None) => anyhow::bail!("give the correction as a FILE or with --json"),
            };
            let req: CorrectionRequest = serde_json::from_str(&text)
                .context("the correction is not valid JSON of POST /v1/corrections")?;
            let (answer, new) = corrector(late_arrival_horizon)
                .submit(&req, &actor.unwrap_or_else(cli_actor))
                .await?;
            if !new {
                eprintln!("recorded before: the same answer");
            }
            println!("{}", serde_json::to_string_pretty(&answer)?);
            if wait {
                follow(&store).await?;
            }
        }
        CorrectionsCommand::List { limit } => {
            let list = corrector(std::time::Duration::ZERO)
                .list(limit.clamp(1, tally::correction::MAX_LIST))
                .await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "corrections": list }))?
            );
        }
        CorrectionsCommand::Revert {
            id,
            reason,
            actor,
            wait,
        } => {
            let req = RevertRequest {
                reason: Some(reason),
            };
            let answer = corrector(std::time::Duration::ZERO)
                .revert(&id, &req, &actor.unwrap_or_else(cli_actor))
                .await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            if wait {
                follow(&store).await?;
            }
        }
    }
    Ok(())
}
