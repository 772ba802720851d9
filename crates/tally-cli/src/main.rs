//! The `tally` binary: the command line lives in `tally_cli::cli`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_cli::cli::run().await
}
