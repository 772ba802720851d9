//! Backup, restore and migration: `tally export`, `tally import`, `tally copy`.
//!
//! The backup format is the wire format: NDJSON (one event per line, as
//! `POST /v1/events` takes it) or a stream of MessagePack maps. A backup can
//! therefore also be replayed through NATS or HTTP. Import goes through the
//! same validation and the same append as live ingest, except that the
//! late-arrival horizon does not apply (history is restored on purpose), and
//! ids deduplicate, so importing a file twice changes nothing.
//!
//! Prices and corrections (with their audit and history) travel beside the
//! events as a [`LedgerSnapshot`] JSON file (`<backup>.ledger.json`): a
//! voided event stays in the backup, and the ledger voids it again.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::aggregate::spec::Granularity;
use crate::event::codec::{to_msgpack, to_wire_json};
use crate::event::ValidationRules;
use crate::ingest::{Intake, IntakeLimits};
use crate::projection::ProjectionError;
use crate::store::{LedgerRestored, LedgerSnapshot, LogTotals, Origin, Store, StoreError};

/// Events per read, append or body.
const CHUNK: usize = 5_000;

/// Backup formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One JSON event per line.
    Ndjson,
    /// MessagePack maps, one after another.
    Msgpack,
}

/// Errors of export, import and copy.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// Projections could not be brought up to date.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The target of a copy already holds events.
    #[error("the target database already holds {0} events; copy needs an empty target (import merges instead)")]
    TargetNotEmpty(i64),
    /// A copy's totals differ.
    #[error("verification failed: {0}")]
    Verify(String),
}

/// What `tally export` wrote.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ExportReport {
    /// Events written.
    pub events: u64,
}

/// Streams the log, in `seq` order, with `ts` in `[from, to)`, to `out`.
/// `progress(done, total)` is called after each chunk.
pub async fn export(
    store: &Store,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    format: ExportFormat,
    out: &mut dyn Write,
    mut progress: impl FnMut(u64, u64),
) -> Result<ExportReport, TransferError> {
    let total = u64::try_from(store.log().counts().await?.events).unwrap_or(0);
    let mut after = 0i64;
    let mut report = ExportReport::default();
    let io = |e: std::io::Error| TransferError::Io(format!("cannot write the export: {e}"));
    loop {
        let rows = store
            .log()
            .export_events(after, from, to, CHUNK as i64)
            .await?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        after = *last;
        for (_, e) in &rows {
            let v = to_wire_json(e);
            match format {
                ExportFormat::Ndjson => {
                    serde_json::to_writer(&mut *out, &v)
                        .map_err(|e| TransferError::Io(e.to_string()))?;
                    out.write_all(b"\n").map_err(io)?;
                }
                ExportFormat::Msgpack => out.write_all(&to_msgpack(&v)).map_err(io)?,
            }
        }
        report.events += rows.len() as u64;
        progress(report.events, total.max(report.events));
    }
    out.flush().map_err(io)?;
    Ok(report)
}

/// What `tally import` did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ImportReport {
    /// Events stored now.
    pub accepted: u64,
    /// Events already stored with the same content.
    pub duplicates: u64,
    /// Events whose id is stored with different content (kept in `rejected_events`).
    pub conflicts: u64,
    /// Items that failed decoding or validation (kept in `rejected_events`).
    pub rejected: u64,
    /// The first few rejection reasons.
    pub first_errors: Vec<String>,
}

impl ImportReport {
    fn add(&mut self, r: &crate::ingest::IngestReport) {
        self.accepted += r.accepted as u64;
        self.duplicates += r.duplicates as u64;
        self.conflicts += r.conflicts as u64;
        self.rejected += r.rejected.len() as u64;
        for e in r.rejected.iter().chain(&r.conflicting) {
            if self.first_errors.len() < 5 {
                self.first_errors
                    .push(format!("item {}: {}", e.index, e.error));
            }
        }
    }
}

/// The ledger file that travels with a backup at `path`.
/// Opens `path` for writing, truncated; a file it creates is readable by its
/// owner only (`0600`: exports hold every event, ledgers every price and
/// correction). A file that exists keeps its mode (`chmod 600` it).
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

pub fn ledger_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".ledger.json");
    std::path::PathBuf::from(name)
}

/// Writes the store's prices and corrections to `path` (JSON).
pub async fn export_ledger(store: &Store, path: &Path) -> Result<LedgerSnapshot, TransferError> {
    let ledger = store.ledger().await?;
    let text = serde_json::to_string_pretty(&ledger)
        .map_err(|e| TransferError::Io(format!("cannot encode the ledger: {e}")))?;
    create_private(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| TransferError::Io(format!("cannot write {}: {e}", path.display())))?;
    Ok(ledger)
}

/// Restores prices and corrections from a ledger file written by
/// [`export_ledger`] (rows already there are kept), after the events.
pub async fn import_ledger(store: &Store, path: &Path) -> Result<LedgerRestored, TransferError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TransferError::Io(format!("cannot read {}: {e}", path.display())))?;
    let ledger: LedgerSnapshot = serde_json::from_str(&text).map_err(|e| {
        TransferError::Io(format!(
            "{} is not a ledger written by `tally export`: {e}",
            path.display()
        ))
    })?;
    Ok(store.restore_ledger(&ledger).await?)
}

/// Imports a backup file: NDJSON, MessagePack maps one after another, or one
/// JSON array (detected from the first byte).
pub async fn import(
    store: Store,
    path: &Path,
    max_future_skew: Duration,
    mut progress: impl FnMut(u64, u64),
) -> Result<ImportReport, TransferError> {
    let file = std::fs::File::open(path)
        .map_err(|e| TransferError::Io(format!("cannot open {}: {e}", path.display())))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader: Box<dyn BufRead> = Box::new(std::io::BufReader::with_capacity(1 << 20, file));
    let first = reader
        .fill_buf()
        .map_err(|e| TransferError::Io(e.to_string()))?
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace());
    let format = match first {
        None => return Ok(ImportReport::default()),
        // One JSON array (as `POST /v1/events` takes): read whole, then
        // imported as NDJSON. Large backups should be NDJSON or MessagePack.
        Some(b'[') => {
            let mut all = Vec::new();
            reader
                .read_to_end(&mut all)
                .map_err(|e| TransferError::Io(format!("cannot read {}: {e}", path.display())))?;
            let items: Vec<serde_json::Value> = serde_json::from_slice(&all).map_err(|e| {
                TransferError::Io(format!(
                    "{} starts with `[` but is not a JSON array: {e}",
                    path.display()
                ))
            })?;
            let mut ndjson = Vec::with_capacity(all.len());
            for item in &items {
                serde_json::to_writer(&mut ndjson, item)
                    .map_err(|e| TransferError::Io(e.to_string()))?;
                ndjson.push(b'\n');
            }
            reader = Box::new(std::io::Cursor::new(ndjson));
            ExportFormat::Ndjson
        }
        Some(b'{') => ExportFormat::Ndjson,
        Some(_) => ExportFormat::Msgpack,
    };
    // History is restored on purpose: no late-arrival horizon.
    let limits = IntakeLimits {
        late_arrival_horizon: Duration::from_secs(200 * 365 * 86_400),
        max_future_skew,
        max_events: CHUNK,
    };
    let intake = Intake::new(store, limits.clone());
    let origin = Origin {
        source: "import",
        subject: Some(path.display().to_string()),
    };
    let mut report = ImportReport::default();
    let mut read = 0u64;
    let io = |e: std::io::Error| TransferError::Io(format!("cannot read {}: {e}", path.display()));
    loop {
        let (body, content_type, bytes, done) = match format {
            ExportFormat::Ndjson => {
                let mut body = Vec::with_capacity(1 << 20);
                let mut lines = 0;
                let mut done = false;
                while lines < CHUNK {
                    let n = reader.read_until(b'\n', &mut body).map_err(io)?;
                    if n == 0 {
                        done = true;
                        break;
                    }
                    lines += 1;
                }
                let len = body.len() as u64;
                (body, "application/x-ndjson", len, done)
            }
            ExportFormat::Msgpack => {
                let mut values = Vec::with_capacity(CHUNK);
                let mut done = false;
                let mut bytes = 0u64;
                while values.len() < CHUNK {
                    if reader.fill_buf().map_err(io)?.is_empty() {
                        done = true;
                        break;
                    }
                    let mut counting = Counting(&mut reader, 0);
                    let v = rmpv::decode::read_value(&mut counting).map_err(|e| {
                        TransferError::Io(format!(
                            "{}: not MessagePack after {read} events: {e}",
                            path.display()
                        ))
                    })?;
                    bytes += counting.1;
                    values.push(v);
                }
                let mut body = Vec::new();
                rmpv::encode::write_value(&mut body, &rmpv::Value::Array(values))
                    .map_err(|e| TransferError::Io(e.to_string()))?;
                (body, "application/msgpack", bytes, done)
            }
        };
        if body.iter().any(|b| !b.is_ascii_whitespace()) {
            let rules = ValidationRules {
                max_future_skew: limits.max_future_skew,
                ..ValidationRules::now(limits.late_arrival_horizon)
            };
            let prepared = intake.prepare(&body, Some(content_type), None, &rules);
            let outcomes = intake
                .append(&prepared.events, &prepared.rejects, &origin)
                .await?;
            report.add(&prepared.report(&outcomes));
        }
        read += bytes;
        progress(read, size.max(read));
        if done {
            break;
        }
    }
    Ok(report)
}

/// Counts the bytes a decoder takes from a reader.
struct Counting<'a, R>(&'a mut R, u64);

impl<R: std::io::Read> std::io::Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
}

/// What `tally copy` did and checked.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Events copied.
    pub events: u64,
    /// Rows of rules, quotas, alert instances, notifications, audit and tokens copied.
    pub state_rows: usize,
    /// Prices, corrections and voided events copied.
    pub ledger: crate::store::LedgerRestored,
    /// Totals of the source log.
    pub source: LogTotals,
    /// Totals of the target log.
    pub target: LogTotals,
    /// Projections rebuilt in the target, with the events folded.
    pub projections: Vec<(String, u64)>,
}

/// Copies a deployment's log, alert state, prices and corrections into an empty database, folds
/// every projection there, and verifies counts and totals.
pub async fn copy(
    source: &Store,
    target: Store,
    projections_dir: Option<&Path>,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<CopyReport, TransferError> {
    let existing = target.log().counts().await?.events;
    if existing > 0 {
        return Err(TransferError::TargetNotEmpty(existing));
    }
    let total = u64::try_from(source.log().counts().await?.events).unwrap_or(0);
    let origin = Origin {
        source: "import",
        subject: Some("tally copy".into()),
    };
    let mut after = 0i64;
    let mut copied = 0u64;
    loop {
        let rows = source
            .log()
            .export_events(after, None, None, CHUNK as i64)
            .await?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        after = *last;
        let events: Vec<_> = rows.into_iter().map(|(_, e)| e).collect();
        target.log().append(&events, &[], &origin).await?;
        copied += events.len() as u64;
        progress("events", copied, total.max(copied));
    }
    let state = source.alert_state().await?;
    target.restore_alert_state(&state).await?;
    // Prices and corrections before the first fold, so it voids and prices
    // exactly as the source did.
    let ledger = target.restore_ledger(&source.ledger().await?).await?;
    let mut projections = Vec::new();
    for task in crate::app::open_projectors(&target, projections_dir).await? {
        let Some(mut p) = task.projector else {
            continue;
        };
        let n = p.catch_up(50_000).await?;
        progress(&format!("projection {}", task.spec.name), n, n);
        projections.push((task.spec.name.clone(), n));
    }
    let (s, t) = (
        source.log().log_totals().await?,
        target.log().log_totals().await?,
    );
    if s != t {
        return Err(TransferError::Verify(format!(
            "source totals {s:?} differ from target totals {t:?}"
        )));
    }
    verify_projections(
        &target,
        projections_dir,
        &target.log().counted_totals().await?,
    )
    .await?;
    Ok(CopyReport {
        events: copied,
        state_rows: state.rows(),
        ledger,
        source: s,
        target: t,
        projections,
    })
}

/// Checks that every unpruned aggregate table sums to the log's totals of
/// the events that count (`totals`: [`crate::store::EventLog::counted_totals`]):
/// requests, input tokens, and the cost the emitters sent (the aggregates'
/// cost less its catalog part).
pub async fn verify_projections(
    store: &Store,
    projections_dir: Option<&Path>,
    totals: &LogTotals,
) -> Result<(), TransferError> {
    for spec in
        crate::aggregate::spec::load_specs(projections_dir).map_err(ProjectionError::from)?
    {
        for &g in &spec.granularities {
            if spec.retention.contains_key(&g) && g == Granularity::Minute {
                continue;
            }
            let rows = store.projections().read_agg(&spec, g, "").await?;
            let requests: i64 = rows.iter().map(|r| r.measures.requests).sum();
            let cost: i64 = rows
                .iter()
                .map(|r| r.measures.cost_nanos - r.measures.cost_from_catalog_nanos)
                .sum();
            let tokens_in: i64 = rows.iter().map(|r| r.measures.tokens_in).sum();
            if (requests, cost, tokens_in) != (totals.events, totals.cost_nanos, totals.tokens_in) {
                return Err(TransferError::Verify(format!(
                    "{}: requests {requests}, cost_nanos {cost}, tokens_in {tokens_in}; the log has {}, {}, {}",
                    crate::store::agg::table(&spec, g, ""),
                    totals.events,
                    totals.cost_nanos,
                    totals.tokens_in
                )));
            }
        }
    }
    Ok(())
}
