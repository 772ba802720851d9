//! Projections: the event log folded into hourly, daily and monthly aggregates.
//!
//! Data flow: [`spec`] reads `projections/*.toml`; a [`projector::Projector`]
//! per projection reads the log after its checkpoint in commit-safe order
//! ([`crate::store::Projections::read_log`]), folds a batch in memory
//! ([`fold`], buckets from [`bucket`], latency sketches from [`sketch`]) and
//! hands the delta to the store, which adds it to every granularity table and
//! moves the checkpoint in one transaction — only if the checkpoint is still
//! where the batch was read from. That compare-and-set is what makes a crash,
//! a second instance or a rebuild unable to count a batch twice; the lease
//! only keeps two instances from doing the same work.
//! [`rebuild`] folds the whole log into shadow tables and swaps them in.

pub mod fold;
pub mod projector;
pub mod rebuild;
pub mod restate;
pub mod status;

pub use projector::{Failpoints, Projector, ProjectorConfig};

use crate::aggregate::SpecError;
use crate::store::StoreError;

/// Errors of the projection stage.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// A spec file is malformed, inconsistent or cannot be read.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A checkpoint lies beyond the positions new events will get.
    #[error("{0}. Stop every Tally on this database and run `tally projections repair-positions`, then start again")]
    LogPosition(String),
    /// The tables were built from a different spec than the file now says.
    #[error("projection `{name}` changed since its tables were built (stored: {stored}; file: {now}). Its aggregates would mix two shapes, so Tally will not start. Run `tally projections rebuild {name}` to rebuild it from the event log (or restore the old spec)")]
    SpecChanged {
        /// Projection name.
        name: String,
        /// Canonical stored spec.
        stored: String,
        /// Canonical spec in the file.
        now: String,
    },
    /// One or more projections changed (one message each, joined).
    #[error("{0}")]
    Changed(String),
    /// No spec file defines this projection.
    #[error("no projection named `{0}` in the projections directory")]
    NotFound(String),
    /// Another process is rebuilding the same projection.
    #[error("projection `{0}` is already being rebuilt by another process")]
    RebuildRunning(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A log read task panicked or was cancelled (a bug, or the runtime shutting down).
    #[error("log read task failed: {0}")]
    ReadTask(String),
    /// A commit running in the background ended without an outcome (it panicked).
    #[error("commit task failed: {0}")]
    CommitTask(String),
}
