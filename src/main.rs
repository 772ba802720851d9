//! The `tally` binary: everything lives in the library; see `tally::cli`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally::cli::run().await
}
