//! The query module: answers from the aggregate tables, never the raw log.
//!
//! A request is parsed strictly ([`params`]: every unknown parameter or value
//! is a 400 that lists what is allowed), planned onto the narrowest projection
//! that covers its dimensions ([`plan`]), read with bound values only (table
//! and column names come from the loaded specs), and merged in memory: integer
//! measures add exactly, latency sketches merge exactly, percentiles come from
//! the merged sketch. [`stats`] serves `/v1/stats`, [`keys`] the per-key views,
//! [`http`] the routes and `/openapi.json`, [`render`] the CLI's tables.
//!
//! Partial buckets: a bucket is atomic. `/v1/stats` counts every bucket that
//! overlaps `[from, to)` in full and says which range that is (`covered`);
//! the key views decompose a range into months, days, hours and (from the
//! minute projection) minutes, so they are exact to the minute.

pub mod keys;
pub mod output;
pub mod params;
pub mod plan;
pub mod render;
pub mod stats;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::aggregate::spec::Spec;
use crate::store::{ProjectionState, Store, StoreError};

/// Most points (buckets × groups) one answer may hold.
pub const MAX_POINTS: usize = 10_000;

/// Most stored rows one answer may read (bounds memory before merging).
pub const MAX_ROWS: usize = 200_000;

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request is wrong; the message says what to change.
    #[error("{message}")]
    BadRequest {
        /// Stable machine-readable code.
        code: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// No such key, projection or route target.
    #[error("{0}")]
    NotFound(String),
    /// The database did not answer in time or is down: try again.
    #[error("{0}")]
    Unavailable(String),
    /// Any other database failure.
    #[error(transparent)]
    Store(StoreError),
}

impl QueryError {
    /// A 400 with this code and message.
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        QueryError::BadRequest {
            code,
            message: message.into(),
        }
    }
}

/// The message of a `503` while the database cannot be reached.
pub const DATABASE_DOWN: &str =
    "the database is unavailable: try again (the server's log has the error)";

impl From<StoreError> for QueryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Timeout(t) => QueryError::Unavailable(format!(
                "the query ran longer than the statement timeout ({}) and was cancelled: narrow the range, use a coarser granularity or add filters (TALLY_QUERY_TIMEOUT sets the limit)",
                humantime::format_duration(t)
            )),
            StoreError::TooManyRows(n) => QueryError::bad(
                "too_many_rows",
                format!("the query would read more than {n} aggregate rows: narrow the range, use a coarser granularity, add filters or group by fewer dimensions"),
            ),
            e if !e.is_data_error() => {
                // The answer names the dependency; its error text (hosts,
                // users) goes to the log only.
                tracing::warn!(error = %e, "query failed: database unavailable");
                QueryError::Unavailable(DATABASE_DOWN.to_string())
            }
            e => QueryError::Store(e),
        }
    }
}

/// What the planner knows about the tables: their sizes, and which
/// projections have caught up with the log at least once (a new spec still
/// backfilling has no `as_of` and would answer with a fraction of the events).
#[derive(Debug, Clone, Default)]
pub struct TableStats {
    /// Size estimate per existing table.
    pub sizes: HashMap<String, i64>,
    /// Checkpoints (projection tiers) with an `as_of`.
    pub ready: HashSet<String>,
}

/// Table statistics, as last read, and when.
type Sizes = Option<(Instant, Arc<TableStats>)>;

/// How long table size estimates are reused: sizes change slowly, and a
/// stale estimate only costs speed, never correctness.
const SIZES_TTL: Duration = Duration::from_secs(30);

/// How long a read of the checkpoints is reused for answers' `as_of`.
///
/// An answer's `as_of` promises that every event committed before it is in
/// the rows, so the checkpoints must be read *before* the rows (read
/// together, a fold committing in between pairs a new `as_of` with old
/// rows). Any read that finished before the rows were read keeps that
/// promise, so a recent one is reused rather than paying a round trip per
/// request; `as_of` is then at most this much older than it could be.
const CHECKPOINTS_TTL: Duration = Duration::from_millis(100);

/// The checkpoints as last read, and when the read finished.
type Checkpoints = Option<(Instant, Arc<Vec<ProjectionState>>)>;

/// What can be queried: the loaded projection specs, and how big their tables
/// are (the planner prefers the smallest table that can answer).
#[derive(Debug, Default)]
pub struct Catalog {
    /// Every loaded spec.
    pub specs: Vec<Arc<Spec>>,
    sizes: Mutex<Sizes>,
    checkpoints: Mutex<Checkpoints>,
}

impl Catalog {
    /// A catalog of these specs.
    pub fn new(specs: Vec<Arc<Spec>>) -> Self {
        Self {
            specs,
            sizes: Mutex::new(None),
            checkpoints: Mutex::new(None),
        }
    }

    /// Every projection's checkpoint, read at most [`CHECKPOINTS_TTL`] ago
    /// and always before this call returns: call it before reading the rows
    /// whose `as_of` it gives.
    pub async fn checkpoints(
        &self,
        store: &Store,
    ) -> Result<Arc<Vec<ProjectionState>>, StoreError> {
        if let Ok(guard) = self.checkpoints.lock() {
            if let Some((at, states)) = guard.as_ref() {
                if at.elapsed() < CHECKPOINTS_TTL {
                    return Ok(states.clone());
                }
            }
        }
        let states = Arc::new(store.projections().projection_states().await?);
        if let Ok(mut guard) = self.checkpoints.lock() {
            *guard = Some((Instant::now(), states.clone()));
        }
        Ok(states)
    }

    /// Size estimates of every table and the caught-up projections, cached for
    /// [`SIZES_TTL`]. A failed read gives no statistics: the planner then
    /// orders by dimension count alone.
    pub async fn sizes(&self, store: &Store) -> Arc<TableStats> {
        if let Ok(guard) = self.sizes.lock() {
            if let Some((at, sizes)) = guard.as_ref() {
                if at.elapsed() < SIZES_TTL {
                    return sizes.clone();
                }
            }
        }
        let tables: Vec<String> = self
            .specs
            .iter()
            .flat_map(|s| s.granularities.iter().map(|g| s.table(*g)))
            .collect();
        let read = async {
            let sizes = store.projections().table_sizes(&tables).await?;
            let ready = store
                .projections()
                .projection_states()
                .await?
                .into_iter()
                .filter(|s| s.as_of.is_some())
                .map(|s| s.name)
                .collect();
            Ok::<_, StoreError>(TableStats { sizes, ready })
        };
        match read.await {
            Ok(stats) => {
                let sizes = Arc::new(stats);
                if let Ok(mut guard) = self.sizes.lock() {
                    *guard = Some((Instant::now(), sizes.clone()));
                }
                sizes
            }
            Err(e) => {
                tracing::debug!(error = %e, "table statistics unavailable");
                Arc::new(TableStats::default())
            }
        }
    }

    /// One line per projection: `by_key (api, key, model; hour, day, month; UTC)`.
    pub fn describe(&self) -> String {
        if self.specs.is_empty() {
            return "none (projections/ holds no specs)".to_string();
        }
        self.specs
            .iter()
            .map(|s| {
                let dims: Vec<&str> = s.dimensions.iter().map(|d| d.as_str()).collect();
                let grans: Vec<&str> = s.granularities.iter().map(|g| g.as_str()).collect();
                format!(
                    "{} ({}; {}; {})",
                    s.name,
                    dims.join(", "),
                    grans.join(", "),
                    s.timezone.name()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}
