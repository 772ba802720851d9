//! Logging setup and one function per notable happening, so that the log line
//! (and, later, the metric) for a happening is written in one place.

use tracing_subscriber::{fmt, EnvFilter};

use crate::event::codec::CodecError;
use crate::ingest::IngestReport;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (`info`, `tally=debug`).
/// Calling it twice is harmless (the second call is ignored), which tests rely on.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: log files and shippers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A body was refused as a whole (and stored in `rejected_events`).
pub fn body_rejected(source: &str, error: &CodecError) {
    tracing::info!(source, %error, "body rejected");
}

/// A body was committed.
pub fn batch_ingested(source: &str, report: &IngestReport) {
    tracing::debug!(
        source,
        accepted = report.accepted,
        duplicates = report.duplicates,
        conflicts = report.conflicts,
        rejected = report.rejected.len(),
        "batch committed"
    );
}

/// The database changed between reachable and unreachable; logged once per change.
pub fn database_state_changed(up: bool, error: Option<&str>) {
    if up {
        tracing::info!("database is reachable again");
    } else {
        tracing::warn!(error = error.unwrap_or(""), "database is unreachable");
    }
}

/// The NATS connection changed state; logged once per change.
pub fn nats_state_changed(state: crate::health::NatsState, detail: &str) {
    match state {
        crate::health::NatsState::Up => tracing::info!(detail, "NATS is connected"),
        crate::health::NatsState::Down => {
            tracing::warn!(
                detail,
                "NATS is unreachable; HTTP ingest keeps working, NATS ingest resumes on reconnect"
            )
        }
        crate::health::NatsState::Disabled => {}
    }
}
