//! What both backends share for projections: the checkpoint types, the
//! aggregate tables' column layout and the SQL text built from a spec.
//!
//! Table and column names are interpolated into SQL, so they come only from
//! validated specs ([`Spec`] names are `[a-z][a-z0-9_]*`, dimensions a closed
//! enum), never from request text.

use chrono::{DateTime, Utc};

use super::Backend;
use crate::aggregate::measures::{Delta, Measures, SeededFx};
use crate::aggregate::sketch::Sketch;
use crate::aggregate::spec::{table_name, Dimension, Granularity, Spec};
use crate::event::Event;

/// A position in the event log, in commit-safe order.
///
/// PostgreSQL: `(tx, seq)`, the writing transaction id and the identity; the
/// projector reads only `tx < pg_snapshot_xmin(pg_current_snapshot())`, so no
/// transaction that can still commit sorts below the cursor. SQLite: `tx` is 0
/// and `seq` (the rowid) alone is commit order, because one writer commits at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor {
    /// Writing transaction id (PostgreSQL `xid8` as a number; 0 on SQLite).
    pub tx: i64,
    /// `usage_events.seq`.
    pub seq: i64,
}

/// What a log read could see, for `as_of`: every transaction that committed
/// before `at` has an id below `xmax`; every id below `xmin` has finished.
/// (SQLite: both 0, and everything committed before `at` was visible.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// Taken no later than the read's snapshot.
    pub at: DateTime<Utc>,
    /// Oldest transaction still running at the snapshot.
    pub xmin: i64,
    /// First transaction id not yet assigned at the snapshot.
    pub xmax: i64,
}

/// Events after a cursor, in cursor order, and what the read could see.
#[derive(Debug, Clone)]
pub struct LogBatch {
    /// Each event with its cursor. `id`, `error_message` and `metadata` are
    /// not loaded (`id` is empty): no projection aggregates them.
    pub events: Vec<(Cursor, Event)>,
    /// Indices into `events` of the voided ones (a correction lists them in
    /// `voided_events`): the projector moves its cursor past them without
    /// folding them. Usually empty.
    pub voided: Vec<usize>,
    /// The read's snapshot.
    pub watermark: Watermark,
    /// Set when the read returned fewer events than asked although committed
    /// events follow: their transactions started after one still running
    /// (PostgreSQL's `xmin` horizon), so they become foldable as soon as it
    /// ends. The projector then looks again within milliseconds instead of
    /// waiting for the next poll. Always false on SQLite.
    pub held_back: bool,
}

/// A row of `projection_checkpoints`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionState {
    /// Projection name (`<name>~rebuild` for a rebuild in progress).
    pub name: String,
    /// [`Spec::hash`] of the spec the tables were built with.
    pub spec_hash: String,
    /// [`Spec::canonical`] of that spec, for messages.
    pub spec: String,
    /// Everything at or before this is folded in.
    pub cursor: Cursor,
    /// Every event committed before this instant is folded in.
    pub as_of: Option<DateTime<Utc>>,
    /// Events folded since the tables were created.
    pub events_folded: i64,
    /// Instance holding the projector lease.
    pub leader: Option<String>,
    /// Lease expiry, Unix milliseconds.
    pub lease_until_ms: i64,
    /// Last checkpoint write.
    pub updated_at: DateTime<Utc>,
    /// Bumped by every restatement of these tables: a batch read before it
    /// is refused by [`Apply`]'s compare-and-set.
    pub generation: i64,
}

impl ProjectionState {
    /// The `as_of` of `spec`'s table at `g` among `states`: that of its
    /// tier's checkpoint ([`Spec::checkpoint_of`]).
    pub fn as_of_for(
        states: &[ProjectionState],
        spec: &Spec,
        g: Granularity,
    ) -> Option<DateTime<Utc>> {
        let name = spec.checkpoint_of(g);
        states.iter().find(|s| s.name == name).and_then(|s| s.as_of)
    }

    /// The lowest `as_of` over every table of `spec` (`None` when one has none).
    pub fn as_of_all(states: &[ProjectionState], spec: &Spec) -> Option<DateTime<Utc>> {
        let mut lowest: Option<Option<DateTime<Utc>>> = None;
        for name in spec.checkpoints() {
            let a = states.iter().find(|s| s.name == name).and_then(|s| s.as_of);
            lowest = Some(match lowest {
                None => a,
                Some(prev) => prev.min(a),
            });
        }
        lowest.flatten()
    }
}

/// One projector commit: add `delta` to the tables and move the checkpoint
/// from `from` to `to`, only if the checkpoint is still at `from` with `spec_hash`.
#[derive(Debug)]
pub struct Apply<'a> {
    /// The checkpoint row.
    pub state: &'a str,
    /// The spec being folded.
    pub spec: &'a Spec,
    /// Table-name suffix (`""`, or `_rebuild` for shadow tables).
    pub suffix: &'a str,
    /// Expected current cursor.
    pub from: Cursor,
    /// Expected [`ProjectionState::generation`] (no restatement since the read).
    pub generation: i64,
    /// New cursor.
    pub to: Cursor,
    /// New `as_of`, when it advances.
    pub as_of: Option<DateTime<Utc>>,
    /// The rows to add.
    pub delta: &'a Delta,
    /// Called after the rows are written, before the commit (the projector's
    /// crash test hook); the store knows nothing of what it does.
    pub before_commit: Option<fn()>,
    /// Read before each statement after the checkpoint's row lock is taken:
    /// when non-zero, the transaction rolls back and reports
    /// [`ApplyOutcome::GaveWay`], so a writer queued on that lock (a
    /// restatement) need not wait for every upsert. The caller decides when
    /// giving way is allowed; the store knows nothing of who is waiting.
    pub give_way: Option<&'a std::sync::atomic::AtomicUsize>,
    /// The newest bucket each table held when this checkpoint was last read
    /// or committed by its writer (`None`: the table was empty), as
    /// [`super::Projections::newest_buckets`] gives it: rows of newer buckets
    /// are upserted without reading a stored sketch. Sound because every
    /// other writer of these tables (another instance, a restatement, a
    /// rebuild's swap) moves the checkpoint's cursor or generation, so this
    /// apply's compare-and-set fails before it writes. Empty: read every
    /// sketch.
    pub newest: &'a [(Granularity, Option<DateTime<Utc>>)],
    /// Called once this apply's rows and checkpoint are committed (on
    /// PostgreSQL each apply commits on its own, possibly long before the
    /// others of the same call); the store knows nothing of what it does.
    pub after_commit: Option<AfterCommit<'a>>,
    /// The stored sketches its writer knows (see [`KnownSketches`]): rows
    /// found there are upserted without reading their stored sketch, and
    /// every sketch this apply writes is recorded there.
    pub known: Option<&'a std::sync::Mutex<KnownSketches>>,
}

/// The latency sketches a projection's writer knows to be stored, because
/// its own commits wrote them: a row found here is upserted without reading
/// its stored sketch (a third of an upsert's time). Kept as the encoded
/// bytes written (a few bytes a bin).
///
/// Sound for the same reason as [`Apply::newest`]: every other writer of
/// these tables moves the checkpoint's cursor or generation, so an apply
/// whose compare-and-set succeeds finds the rows exactly as its writer's
/// last commit left them. The writer's part of the contract:
/// - [`KnownSketches::begin`] before each apply that passes it, which
///   forgets everything unless the previous apply landed
///   ([`KnownSketches::landed`]): an apply that failed, gave way or went
///   stale may have recorded sketches that were never committed;
/// - forget everything ([`KnownSketches::clear`]) whenever it reads its
///   checkpoint again;
/// - never pass a row that retention may delete (`begin` drops them).
#[derive(Debug, Default)]
pub struct KnownSketches {
    /// Whether the entries are the tables' rows as of the writer's
    /// checkpoint (the last apply landed).
    valid: bool,
    tables: Vec<(Granularity, KnownTable)>,
}

type KnownTable = hashbrown::HashMap<crate::aggregate::RowKey, Vec<u8>, SeededFx>;

/// How far before `now` minus a table's retention a known row must be: the
/// retention job of another instance may run with a clock this far ahead.
const KNOWN_RETENTION_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

impl KnownSketches {
    /// Forgets every entry.
    pub fn clear(&mut self) {
        self.valid = false;
        self.tables.clear();
    }

    /// Before an apply of `spec`'s tables at `now`: forgets everything
    /// unless the last apply landed, drops the rows retention may delete,
    /// and marks the entries unconfirmed until [`KnownSketches::landed`].
    pub fn begin(&mut self, spec: &Spec, now: DateTime<Utc>) {
        if !self.valid && !self.is_empty() {
            tracing::debug!(
                projection = %spec.name,
                entries = self.len(),
                "the last apply did not land; forgetting the known sketches"
            );
        }
        if !self.valid {
            self.tables.clear();
        }
        self.valid = false;
        for (g, rows) in &mut self.tables {
            if let Some(keep) = spec.retention.get(g) {
                let keep = chrono::TimeDelta::from_std(*keep).unwrap_or(chrono::TimeDelta::MAX);
                let cutoff = now
                    .checked_sub_signed(keep)
                    .and_then(|t| t.checked_add_signed(KNOWN_RETENTION_MARGIN));
                match cutoff {
                    Some(c) => rows.retain(|k, _| k.bucket >= c),
                    None => rows.clear(),
                }
            }
        }
    }

    /// The apply begun last landed: its recorded sketches are stored. Keeps
    /// per table the rows of buckets no older than its newest one minus
    /// `keep(granularity)`, and nothing at all beyond `max_bytes`.
    pub fn landed(&mut self, keep: impl Fn(Granularity) -> chrono::TimeDelta, max_bytes: usize) {
        self.valid = true;
        let mut bytes = 0;
        for (g, rows) in &mut self.tables {
            let Some(top) = rows.keys().map(|k| k.bucket).max() else {
                continue;
            };
            let from = top.checked_sub_signed(keep(*g)).unwrap_or(top);
            rows.retain(|k, _| k.bucket >= from);
            bytes += rows
                .iter()
                .map(|(k, v)| {
                    v.capacity() + k.dims.iter().map(|d| d.capacity() + 24).sum::<usize>() + 64
                })
                .sum::<usize>();
        }
        if bytes > max_bytes {
            tracing::debug!(
                entries = self.len(),
                bytes,
                "the known sketches outgrew their bound; starting over"
            );
            self.tables.clear();
        }
    }

    /// Entries held (every table).
    pub fn len(&self) -> usize {
        self.tables.iter().map(|(_, r)| r.len()).sum()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn table(&self, g: Granularity) -> Option<&KnownTable> {
        self.tables.iter().find(|(tg, _)| *tg == g).map(|(_, r)| r)
    }

    /// The stored sketch of `key` in table `g`, if known.
    pub(crate) fn get(&self, g: Granularity, key: &crate::aggregate::RowKey) -> Option<&[u8]> {
        self.table(g)?.get(key).map(Vec::as_slice)
    }

    /// Records the sketch an upsert writes for `key` in table `g`.
    pub(crate) fn record(&mut self, g: Granularity, key: &crate::aggregate::RowKey, bytes: &[u8]) {
        let at = match self.tables.iter().position(|(tg, _)| *tg == g) {
            Some(at) => at,
            None => {
                self.tables.push((g, KnownTable::default()));
                self.tables.len() - 1
            }
        };
        let rows = &mut self.tables[at].1;
        match rows.get_mut(key) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(bytes);
            }
            None => {
                rows.insert(key.clone(), bytes.to_vec());
            }
        }
    }
}

/// The callback of [`Apply::after_commit`].
#[derive(Clone, Copy)]
pub struct AfterCommit<'a>(pub &'a (dyn Fn() + Send + Sync));

impl std::fmt::Debug for AfterCommit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterCommit")
    }
}

/// Whether an [`Apply`] landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Committed.
    Applied,
    /// The checkpoint had moved (another projector or a rebuild): nothing written.
    Stale,
    /// Rolled back part-way because [`Apply::give_way`] asked: nothing written.
    GaveWay,
}

/// One aggregate row, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct AggRow {
    /// Bucket start.
    pub bucket: DateTime<Utc>,
    /// Dimension values in the spec's order.
    pub dims: Vec<String>,
    /// The measures (sketch decoded).
    pub measures: Measures,
}

/// Integer measure columns, in [`int_values`] order.
pub const INT_COLUMNS: [&str; 18] = [
    "requests",
    "successes",
    "errors",
    "errors_rate_limit",
    "errors_timeout",
    "errors_server_error",
    "errors_client_error",
    "errors_other",
    "cache_hits",
    "latency_count",
    "latency_sum_us",
    "request_bytes",
    "response_bytes",
    "tokens_in",
    "tokens_out",
    "cost_nanos",
    "cost_from_catalog_nanos",
    "unpriced",
];

/// Columns added after tables were first created (issue 21): an existing
/// table gets them with `ALTER TABLE`, and its buckets are restated.
pub const ADDED_COLUMNS: [&str; 2] = ["cost_from_catalog_nanos", "unpriced"];

/// Nullable float columns, in [`float_values`] order.
pub const FLOAT_COLUMNS: [&str; 5] = [
    "latency_min_ms",
    "latency_max_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
];

/// The integer measures of a row, in [`INT_COLUMNS`] order.
pub fn int_values(m: &Measures) -> [i64; INT_COLUMNS.len()] {
    let [rl, to, se, ce, ot] = m.errors_by_type;
    [
        m.requests,
        m.successes,
        m.errors,
        rl,
        to,
        se,
        ce,
        ot,
        m.cache_hits,
        m.latency_count,
        m.latency_sum_us,
        m.request_bytes,
        m.response_bytes,
        m.tokens_in,
        m.tokens_out,
        m.cost_nanos,
        m.cost_from_catalog_nanos,
        m.unpriced,
    ]
}

/// The float columns of an upserted row, in [`FLOAT_COLUMNS`] order: the
/// delta's min and max (the upsert combines them with the stored ones) and the
/// percentiles of `merged`, the row's sketch after the upsert.
pub fn float_values(delta: &Measures, merged: &Sketch) -> [Option<f64>; 5] {
    [
        delta.latency_min_ms,
        delta.latency_max_ms,
        merged.quantile(0.5),
        merged.quantile(0.95),
        merged.quantile(0.99),
    ]
}

/// Rebuilds [`Measures`] from stored columns.
pub fn measures_from(
    ints: [i64; INT_COLUMNS.len()],
    min: Option<f64>,
    max: Option<f64>,
    sketch: Sketch,
) -> Measures {
    let [requests, successes, errors, rl, to, se, ce, ot, cache_hits, latency_count, latency_sum_us, request_bytes, response_bytes, tokens_in, tokens_out, cost_nanos, cost_from_catalog_nanos, unpriced] =
        ints;
    Measures {
        requests,
        successes,
        errors,
        errors_by_type: [rl, to, se, ce, ot],
        cache_hits,
        latency_count,
        latency_sum_us,
        latency_min_ms: min,
        latency_max_ms: max,
        sketch,
        request_bytes,
        response_bytes,
        tokens_in,
        tokens_out,
        cost_nanos,
        cost_from_catalog_nanos,
        unpriced,
    }
}

/// The table of `granularity` with a suffix (`""` live, `_rebuild` shadow).
pub fn table(spec: &Spec, granularity: Granularity, suffix: &str) -> String {
    format!("{}{suffix}", table_name(&spec.name, granularity))
}

/// Quoted dimension columns, comma-separated.
pub fn dim_columns(spec: &Spec) -> String {
    spec.dimensions
        .iter()
        .map(|d| d.column())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `bucket, <dims>`: the primary key.
pub fn key_columns(spec: &Spec) -> String {
    if spec.dimensions.is_empty() {
        "bucket".to_string()
    } else {
        format!("bucket, {}", dim_columns(spec))
    }
}

/// Every column in insert order: key, integers, floats, sketch.
pub fn all_columns(spec: &Spec) -> String {
    format!(
        "{}, {}, {}, latency_sketch",
        key_columns(spec),
        INT_COLUMNS.join(", "),
        FLOAT_COLUMNS.join(", ")
    )
}

/// `CREATE TABLE IF NOT EXISTS` for one granularity table.
pub fn create_table_sql(backend: Backend, spec: &Spec, table: &str) -> String {
    // Dimension keys compare bytewise ("C"): locale-aware comparison costs
    // several times more in every primary-key lookup of every upsert.
    let (ts, int, float, blob, text) = match backend {
        Backend::Postgres => (
            "TIMESTAMPTZ",
            "BIGINT",
            "DOUBLE PRECISION",
            "BYTEA",
            "TEXT COLLATE \"C\"",
        ),
        Backend::Sqlite => ("TEXT", "INTEGER", "REAL", "BLOB", "TEXT"),
    };
    let mut cols = vec![format!("bucket {ts} NOT NULL")];
    cols.extend(
        spec.dimensions
            .iter()
            .map(|d| format!("{} {text} NOT NULL DEFAULT ''", d.column())),
    );
    cols.extend(
        INT_COLUMNS
            .iter()
            .map(|c| format!("{c} {int} NOT NULL DEFAULT 0")),
    );
    cols.extend(FLOAT_COLUMNS.iter().map(|c| format!("{c} {float}")));
    cols.push(format!("latency_sketch {blob}"));
    cols.push(format!("PRIMARY KEY ({})", key_columns(spec)));
    // PostgreSQL: pages kept 30% free so that the upsert's UPDATE of an
    // existing row is a HOT update (no new index entry, no index bloat).
    let with = match backend {
        Backend::Postgres => " WITH (fillfactor = 70)",
        Backend::Sqlite => "",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (\n    {}\n){with}",
        cols.join(",\n    ")
    )
}

/// The `ON CONFLICT … DO UPDATE` clause: integers add, min/max combine, and the
/// sketch and percentiles take the merged values the projector computed.
pub fn upsert_clause(backend: Backend, spec: &Spec, table: &str) -> String {
    let mut sets: Vec<String> = INT_COLUMNS
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    let (min, max) = match backend {
        // LEAST/GREATEST ignore NULLs.
        Backend::Postgres => (
            format!("LEAST({table}.latency_min_ms, excluded.latency_min_ms)"),
            format!("GREATEST({table}.latency_max_ms, excluded.latency_max_ms)"),
        ),
        // SQLite's two-argument min/max return NULL if either is NULL.
        Backend::Sqlite => (
            format!("min(coalesce({table}.latency_min_ms, excluded.latency_min_ms), coalesce(excluded.latency_min_ms, {table}.latency_min_ms))"),
            format!("max(coalesce({table}.latency_max_ms, excluded.latency_max_ms), coalesce(excluded.latency_max_ms, {table}.latency_max_ms))"),
        ),
    };
    sets.push(format!("latency_min_ms = {min}"));
    sets.push(format!("latency_max_ms = {max}"));
    for c in [
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "latency_sketch",
    ] {
        sets.push(format!(
            "{c} = CASE WHEN excluded.latency_count = 0 THEN {table}.{c} ELSE excluded.{c} END"
        ));
    }
    format!(
        " ON CONFLICT ({}) DO UPDATE SET {}",
        key_columns(spec),
        sets.join(", ")
    )
}

/// The rows of one granularity of a delta with merged sketches: `existing`
/// holds the stored sketch of every key that has one.
pub fn merged_sketch(delta: &Measures, existing: Option<&Sketch>) -> Sketch {
    let mut s = existing.cloned().unwrap_or_default();
    s.merge(&delta.sketch);
    s
}

/// Unix milliseconds of an instant (lease expiry).
pub fn unix_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Builds an [`AggRow`] from a row of [`all_columns`], given the
/// backend-specific bucket (column 0).
pub(crate) fn agg_row_from<'r, R>(
    row: &'r R,
    bucket: DateTime<Utc>,
    dims: usize,
    table: &str,
) -> Result<AggRow, super::StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'r [u8]: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let dim_values = (0..dims)
        .map(|i| row.try_get::<String, _>(1 + i))
        .collect::<Result<Vec<_>, _>>()?;
    let base = 1 + dims;
    let mut ints = [0i64; INT_COLUMNS.len()];
    for (i, v) in ints.iter_mut().enumerate() {
        *v = row.try_get(base + i)?;
    }
    let fbase = base + INT_COLUMNS.len();
    let min: Option<f64> = row.try_get(fbase)?;
    let max: Option<f64> = row.try_get(fbase + 1)?;
    // Borrowed: the sketch is decoded straight from the row's buffer.
    let bytes: Option<&[u8]> = row.try_get(fbase + FLOAT_COLUMNS.len())?;
    let sketch =
        Sketch::decode(bytes.unwrap_or_default()).map_err(|e| super::StoreError::CorruptRow {
            id: format!("{table} bucket {bucket}"),
            reason: e.to_string(),
        })?;
    Ok(AggRow {
        bucket,
        dims: dim_values,
        measures: measures_from(ints, min, max, sketch),
    })
}

/// One read of an aggregate table for the query module. Dimension and table
/// names come from the spec; request values are only ever bound parameters.
#[derive(Debug, Clone)]
pub struct AggQuery<'a> {
    /// The projection read.
    pub spec: &'a Spec,
    /// Which of its tables.
    pub granularity: Granularity,
    /// First bucket start included.
    pub from: DateTime<Utc>,
    /// Bucket starts before this are included.
    pub to: DateTime<Utc>,
    /// `dimension IN (values)` per entry, all of them ANDed.
    pub filters: &'a [(Dimension, Vec<String>)],
    /// Columns returned as [`AggRow::dims`], in this order.
    pub group_by: &'a [Dimension],
    /// False: the database sums the rows per group (no sketch, `bucket` is the
    /// group's first bucket) — the cheap read for ranking groups. True: every
    /// stored row with its sketch, for the caller to merge.
    pub rows: bool,
    /// Keep buckets apart when summing (`rows = false`).
    pub by_bucket: bool,
    /// Answer [`super::StoreError::TooManyRows`] past this many rows.
    /// `usize::MAX`: no cap (no `LIMIT`).
    pub max_rows: usize,
    /// With `rows = false, by_bucket = false`: rank the groups in the
    /// database and return one page of them (and how many groups there are).
    /// The rows then carry the groups only: every measure reads 0.
    pub top: Option<Top>,
}

/// A page of groups ranked in SQL: `ORDER BY <order> DESC, <group columns>`.
/// Group columns compare bytewise (`COLLATE "C"` on PostgreSQL, `BINARY` on
/// SQLite), as Rust strings do, so both rankings agree on ties.
#[derive(Debug, Clone, Copy)]
pub struct Top {
    /// SQL expression over the summed measure columns, from a closed list.
    pub order: &'static str,
    /// Groups returned.
    pub limit: usize,
    /// Groups skipped.
    pub offset: usize,
}

/// What [`super::Projections::query_agg`] answers.
#[derive(Debug, Clone, Default)]
pub struct AggAnswer {
    /// The rows (or summed groups).
    pub rows: Vec<AggRow>,
    /// With [`AggQuery::top`]: how many groups there are in all.
    pub groups: Option<i64>,
}

/// Dimensions that get a `(dimension, bucket)` index: the per-customer ones,
/// with thousands of values, that the key and user views filter on. A filter
/// on any other dimension scans the range's primary-key entries (few per
/// bucket for those low-cardinality values). Each index costs the projector
/// one more index insert per new row (measured: indexing every dimension
/// took the fold from 0.77× to 0.49× the append rate), so only these.
pub const INDEXED: [Dimension; 2] = [Dimension::Key, Dimension::User];

/// `CREATE INDEX` statements of a table: one `(dimension, bucket)` index per
/// [`INDEXED`] dimension it has, so a filter on a key or user over a time
/// range is a range scan. Existing rows change only their measures, so the
/// upsert stays a HOT update.
pub fn index_sql(spec: &Spec, table: &str) -> Vec<String> {
    spec.dimensions
        .iter()
        .filter(|d| INDEXED.contains(d))
        .map(|d| {
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {table} ({}, bucket)",
                index_name(table, *d),
                d.column()
            )
        })
        .collect()
}

/// The name of a dimension index of `table`.
pub fn index_name(table: &str, d: Dimension) -> String {
    format!("{table}_{}_idx", d.as_str())
}

/// The SELECT of an [`AggQuery`], with `{from}`/`{to}` and filter values pushed
/// as binds by `bind`; backend differences are only in the placeholders and
/// how a timestamp is bound, which the caller's `QueryBuilder` handles.
pub fn query_select(q: &AggQuery<'_>, backend: Backend) -> (String, String) {
    let groups: Vec<String> = q.group_by.iter().map(|d| d.column()).collect();
    let mut select = Vec::new();
    if q.rows {
        select.push("bucket".to_string());
        select.extend(groups.iter().cloned());
        select.extend(INT_COLUMNS.iter().map(|c| c.to_string()));
        // The stored percentiles are one row's; answers merge the sketches.
        select
            .extend(["latency_min_ms", "latency_max_ms", "NULL", "NULL", "NULL"].map(String::from));
        select.push("latency_sketch".into());
        return (select.join(", "), row_limit(q.max_rows));
    }
    select.push("min(bucket)".to_string());
    select.extend(groups.iter().cloned());
    let cast = match backend {
        Backend::Postgres => "::BIGINT",
        Backend::Sqlite => "",
    };
    if q.top.is_some() {
        // Ranking needs only the order expression (in ORDER BY): the
        // measures of the chosen groups are read afterwards, with sketches.
        select.extend(INT_COLUMNS.iter().map(|_| format!("0{cast}")));
    } else {
        select.extend(INT_COLUMNS.iter().map(|c| format!("sum({c}){cast}")));
    }
    select.push("min(latency_min_ms)".into());
    select.push("max(latency_max_ms)".into());
    // The percentile columns and the sketch are not summed: `agg_row_from`
    // reads them as NULL (an empty sketch).
    select.extend(["NULL", "NULL", "NULL", "NULL"].map(String::from));
    let mut group = Vec::new();
    if q.by_bucket {
        group.push("bucket".to_string());
    }
    group.extend(groups);
    let mut tail = if group.is_empty() {
        // An aggregate without GROUP BY answers one row even over no rows.
        " HAVING count(*) > 0".to_string()
    } else {
        format!(" GROUP BY {}", group.join(", "))
    };
    match q.top {
        Some(top) => {
            select.push("count(*) OVER ()".into());
            let mut order = vec![format!("{} DESC", top.order)];
            order.extend(q.group_by.iter().map(|d| d.column()));
            tail.push_str(&format!(
                " ORDER BY {} LIMIT {} OFFSET {}",
                order.join(", "),
                top.limit,
                top.offset
            ));
        }
        None => tail.push_str(&row_limit(q.max_rows)),
    }
    (select.join(", "), tail)
}

/// The `LIMIT` that tells a query past `max_rows` rows (one row more); none
/// when uncapped (`usize::MAX`; a database limit is a signed 64-bit integer).
fn row_limit(max_rows: usize) -> String {
    match max_rows {
        usize::MAX => String::new(),
        n => format!(" LIMIT {}", n.saturating_add(1)),
    }
}
