//! The projections' side of the store: reading the log in commit-safe order,
//! checkpoints, and the aggregate tables (created, folded into, swapped after
//! a rebuild, read by queries and by reconciliation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::agg::{
    agg_row_from, all_columns, create_table_sql, float_values, index_sql, int_values, key_columns,
    merged_sketch, query_select, table, ADDED_COLUMNS, FLOAT_COLUMNS, INT_COLUMNS,
};
use super::corrections::Scope;
use super::db::{Arg, Db, Row, Sql, Tx};
use super::log::{EventColumns, NOT_VOIDED};
use super::tail::LogTail;
use super::{
    postgres, sqlite, AggAnswer, AggQuery, AggRow, Apply, ApplyOutcome, Cursor, KnownSketches,
    LogBatch, ProjectionState, ReconcileRead, StoreError,
};
use crate::aggregate::measures::{Measures, RowKey, Rows};
use crate::aggregate::sketch::Sketch;
use crate::aggregate::spec::{Dimension, Granularity, Spec};

/// Checkpoints and aggregate tables.
#[derive(Debug, Clone)]
pub struct Projections {
    db: Db,
    tail: Arc<LogTail>,
}

const CHECKPOINT_COLUMNS: &str = "name, spec_hash, spec, cursor_tx, cursor_seq, as_of, \
     events_folded, leader, lease_until_ms, updated_at, generation";

fn state_from_row(r: &Row) -> Result<ProjectionState, StoreError> {
    Ok(ProjectionState {
        name: r.get("name")?,
        spec_hash: r.get("spec_hash")?,
        spec: r.get("spec")?,
        cursor: Cursor {
            tx: r.get("cursor_tx")?,
            seq: r.get("cursor_seq")?,
        },
        as_of: r.opt_time("as_of")?,
        events_folded: r.get("events_folded")?,
        leader: r.get("leader")?,
        lease_until_ms: r.get("lease_until_ms")?,
        updated_at: r.time("updated_at")?,
        generation: r.get("generation")?,
    })
}

/// An aggregate row of [`all_columns`] (or a query's select list, whose
/// first column is the bucket or its group's first bucket) from either dialect.
fn agg_row(r: &Row, dims: usize, table: &str) -> Result<AggRow, StoreError> {
    let bucket = r.time(0)?;
    match r {
        Row::Postgres(r) => agg_row_from(r, bucket, dims, table),
        Row::Sqlite(r) => agg_row_from(r, bucket, dims, table),
    }
}

impl Projections {
    pub(crate) fn new(db: Db, tail: Arc<LogTail>) -> Self {
        Self { db, tail }
    }

    /// Up to `limit` events after `after`, in cursor order, from one snapshot.
    /// Never returns an event while an event that will sort before it can still commit.
    ///
    /// With the log's tail on, the read returns positions and the columns of
    /// those this process appended come from the tail ([`LogTail`]); the
    /// others are read in the same snapshot.
    pub async fn read_log(&self, after: Cursor, limit: i64) -> Result<LogBatch, StoreError> {
        let tail = (self.tail.is_on() && self.tail.reading()).then_some(&*self.tail);
        match &self.db {
            Db::Postgres(p) => postgres::read_log(p, after, limit, tail).await,
            Db::Sqlite(p) => sqlite::read_log(p, after, limit, tail).await,
        }
    }

    /// Events stored after `after` (a projection's lag), committed or not yet foldable.
    pub async fn events_after(&self, after: Cursor) -> Result<i64, StoreError> {
        match &self.db {
            Db::Postgres(p) => postgres::events_after(p, after).await,
            Db::Sqlite(p) => sqlite::events_after(p, after).await,
        }
    }

    /// `Some(what is wrong)` when a checkpoint or stored event lies beyond the
    /// positions the database will give new events (PostgreSQL: a dump
    /// restored into a new cluster restarts transaction ids below the stored
    /// ones; SQLite: a log file older than its checkpoints). New events would
    /// then sort before the checkpoints and never be folded.
    pub async fn log_position_problem(&self) -> Result<Option<String>, StoreError> {
        match &self.db {
            Db::Postgres(p) => postgres::log_position_problem(p).await,
            Db::Sqlite(p) => sqlite::log_position_problem(p).await,
        }
    }

    /// Repairs what [`Projections::log_position_problem`] finds, keeping
    /// which events each checkpoint has folded; returns what it did. Run with
    /// no Tally serving this database.
    pub async fn repair_log_positions(&self) -> Result<String, StoreError> {
        match &self.db {
            Db::Postgres(p) => postgres::repair_log_positions(p).await,
            Db::Sqlite(p) => sqlite::repair_log_positions(p).await,
        }
    }

    /// Creates the spec's tables (with `suffix`) if missing and the checkpoint
    /// row `state` (with the spec's hash) if missing, and returns the row.
    pub async fn ensure_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<ProjectionState, StoreError> {
        // Tables from before the price catalog: their rows lack the new
        // measures, so every bucket is restated (in month pieces). On
        // PostgreSQL the restatement is queued in the transaction that adds
        // the columns. SQLite's queue is in the main file, which that
        // transaction cannot write: it is queued first, in its own commit,
        // so a crash in between leaves the columns missing and the next
        // start queues it again (restating twice changes nothing).
        let live = state.split('~').next().unwrap_or(state).to_string();
        if let Db::Sqlite(_) = self.db {
            let mut stale = false;
            for &g in &spec.granularities {
                stale |= lacks_added_columns(&self.db, &table(spec, g, suffix)).await?;
            }
            if stale {
                let mut tx = self.db.begin().await?;
                queue_upgrade(&mut tx, &live).await?;
                tx.commit().await?;
                if crate::failpoint::Failpoints::fires(crate::failpoint::armed().upgrade_queued) {
                    crate::failpoint::abort("store.upgrade_queued");
                }
            }
        }
        let mut tx = self.db.begin_aggregates().await?;
        if let Tx::Postgres(tx) = &mut tx {
            postgres::ddl_lock(tx).await?;
        }
        let mut upgraded = false;
        for &g in &spec.granularities {
            let t = table(spec, g, suffix);
            tx.execute(Sql::new(create_table_sql(self.db.backend(), spec, &t)))
                .await?;
            upgraded |= add_missing_columns(&mut tx, &self.db, &t).await?;
        }
        if upgraded && matches!(self.db, Db::Postgres(_)) {
            queue_upgrade(&mut tx, &live).await?;
        }
        let now = Utc::now();
        tx.execute(
            Sql::new(
                "INSERT INTO projection_checkpoints (name, spec_hash, spec, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $4) ON CONFLICT (name) DO NOTHING",
            )
            .bind(state)
            .bind(spec.hash())
            .bind(spec.canonical())
            .bind(now),
        )
        .await?;
        let row = tx
            .fetch_one(
                Sql::new(format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints WHERE name = $1"
                ))
                .bind(state),
            )
            .await?;
        let found = state_from_row(&row)?;
        // Indexes only on tables built with this very spec: a changed spec's
        // tables may lack the columns (the caller then refuses to start).
        if found.spec_hash == spec.hash() {
            for &g in &spec.granularities {
                for sql in index_sql(spec, &table(spec, g, suffix)) {
                    tx.execute(Sql::new(sql)).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(found)
    }

    /// Creates every tier's tables and checkpoint row of the live projection
    /// `spec` if missing (see [`crate::aggregate::spec::Tier`]), and returns
    /// the rows, finest tier first.
    ///
    /// A checkpoint from before tiers (one row under the projection's name,
    /// with the whole spec's hash, covering every table) is split in one
    /// transaction: the coarse tier's row starts as its copy (same cursor,
    /// `as_of` and generation: its tables are exactly there), and the finest
    /// tier's row takes its tier's hash. An older instance still folding
    /// the projection with the whole spec then finds another hash: its
    /// compare-and-set fails and it stops with "spec changed" instead of
    /// writing day rows a second time.
    pub async fn ensure_tiers(&self, spec: &Spec) -> Result<Vec<ProjectionState>, StoreError> {
        let tiers = spec.tiers();
        if tiers.len() > 1 {
            let mut tx = self.db.begin_aggregates().await?;
            if let Tx::Postgres(tx) = &mut tx {
                postgres::ddl_lock(tx).await?;
            }
            let now = Utc::now();
            for t in &tiers[1..] {
                tx.execute(
                    Sql::new(
                        "INSERT INTO projection_checkpoints (name, spec_hash, spec, cursor_tx, cursor_seq, \
                         as_of, events_folded, generation, created_at, updated_at) \
                         SELECT $1, $2, $3, cursor_tx, cursor_seq, as_of, events_folded, generation, $4, $4 \
                         FROM projection_checkpoints WHERE name = $5 AND spec_hash = $6 \
                         ON CONFLICT (name) DO NOTHING",
                    )
                    .bind(&t.state)
                    .bind(t.spec.hash())
                    .bind(t.spec.canonical())
                    .bind(now)
                    .bind(&tiers[0].state)
                    .bind(spec.hash()),
                )
                .await?;
            }
            tx.execute(
                Sql::new(
                    "UPDATE projection_checkpoints SET spec_hash = $2, spec = $3, \
                     generation = generation + 1, updated_at = $4 WHERE name = $1 AND spec_hash = $5",
                )
                .bind(&tiers[0].state)
                .bind(tiers[0].spec.hash())
                .bind(tiers[0].spec.canonical())
                .bind(now)
                .bind(spec.hash()),
            )
            .await?;
            tx.commit().await?;
        }
        let mut rows = Vec::with_capacity(tiers.len());
        for t in &tiers {
            rows.push(self.ensure_projection(&t.spec, &t.state, "").await?);
        }
        Ok(rows)
    }

    /// Every checkpoint row, by name.
    pub async fn projection_states(&self) -> Result<Vec<ProjectionState>, StoreError> {
        self.db
            .reader()
            .read_all(
                Sql::new(format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints ORDER BY name"
                )),
                state_from_row,
            )
            .await
    }

    /// Adds each folded batch to its tables and moves its checkpoint, if that
    /// checkpoint is still where the batch was read from. A batch whose
    /// checkpoint moved writes nothing, and the answer is then
    /// [`ApplyOutcome::Stale`] (other batches may have committed: the caller
    /// re-reads every checkpoint). On an error, too, some batches may have
    /// committed; the checkpoints tell which.
    ///
    /// PostgreSQL commits one transaction per projection, side by side on
    /// their own connections: a projection's rows commit with its own
    /// checkpoint (all exactly-once needs), and one backend per projection
    /// spreads the upserts over the cores. SQLite has one writer: one
    /// transaction for all. Either way it is a derived transaction
    /// ([`Db::begin_derived`]): it does not wait for its flush.
    pub async fn apply_fold(&self, applies: &[Apply<'_>]) -> Result<ApplyOutcome, StoreError> {
        if let Db::Sqlite(_) = self.db {
            let (mut tx, _registered) = self.db.begin_derived().await?;
            for apply in applies {
                let outcome = apply_in(&mut tx, apply).await?;
                if outcome != ApplyOutcome::Applied {
                    tx.rollback().await?;
                    return Ok(outcome);
                }
            }
            for hook in applies.iter().filter_map(|a| a.before_commit) {
                hook();
            }
            tx.commit().await?;
            for hook in applies.iter().filter_map(|a| a.after_commit) {
                (hook.0)();
            }
            return Ok(ApplyOutcome::Applied);
        }
        let outcomes = futures::future::join_all(applies.iter().map(|a| self.apply_one(a))).await;
        let mut all = ApplyOutcome::Applied;
        for outcome in outcomes {
            match outcome? {
                ApplyOutcome::Applied => {}
                ApplyOutcome::Stale => all = ApplyOutcome::Stale,
                ApplyOutcome::GaveWay if all == ApplyOutcome::Applied => {
                    all = ApplyOutcome::GaveWay
                }
                ApplyOutcome::GaveWay => {}
            }
        }
        Ok(all)
    }

    async fn apply_one(&self, apply: &Apply<'_>) -> Result<ApplyOutcome, StoreError> {
        let (mut tx, _registered) = self.db.begin_derived().await?;
        let outcome = apply_in(&mut tx, apply).await?;
        if outcome != ApplyOutcome::Applied {
            tx.rollback().await?;
            return Ok(outcome);
        }
        if let Some(hook) = apply.before_commit {
            hook();
        }
        tx.commit().await?;
        if let Some(hook) = apply.after_commit {
            (hook.0)();
        }
        Ok(ApplyOutcome::Applied)
    }

    /// Drops the tables (every granularity, with `suffix`) and the checkpoint row.
    pub async fn drop_projection(
        &self,
        spec: &Spec,
        state: &str,
        suffix: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_aggregates().await?;
        for g in Granularity::ALL {
            tx.execute(Sql::new(format!(
                "DROP TABLE IF EXISTS {}",
                table(spec, g, suffix)
            )))
            .await?;
        }
        tx.execute(Sql::new("DELETE FROM projection_checkpoints WHERE name = $1").bind(state))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Atomically replaces the live tables and checkpoints of `spec` with the
    /// rebuilt ones (`suffix`, `shadow_state`): every tier's checkpoint row
    /// takes the shadow's cursor (and its tier's hash, and a new generation:
    /// what was read of the old tables is not of these), and a tier row the
    /// spec no longer has is removed. Returns false, changing nothing, when
    /// a live checkpoint is ahead of the shadow's (readers would see totals
    /// step back): fold further and try again.
    pub async fn swap_rebuilt(
        &self,
        spec: &Spec,
        shadow_state: &str,
        suffix: &str,
    ) -> Result<bool, StoreError> {
        // Lock the live checkpoints first (SQLite: BEGIN IMMEDIATE holds the
        // write lock already): a live projector's commit finishes before the
        // swap, and its next compare-and-set fails and re-reads.
        let mut tx = self.db.begin_aggregates().await?;
        let now = Utc::now();
        let tiers = spec.tiers();
        for t in &tiers {
            tx.execute(
                Sql::new(
                    "INSERT INTO projection_checkpoints (name, spec_hash, spec, created_at, updated_at) \
                     VALUES ($1, '', '', $2, $2) ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at",
                )
                .bind(&t.state)
                .bind(now),
            )
            .await?;
            let moved = tx
                .execute(
                    Sql::new(
                        "UPDATE projection_checkpoints SET \
                         (cursor_tx, cursor_seq, as_of, events_folded) = \
                         (SELECT cursor_tx, cursor_seq, as_of, events_folded \
                          FROM projection_checkpoints WHERE name = $2), \
                         spec_hash = $4, spec = $5, updated_at = $3, generation = generation + 1 \
                         WHERE name = $1 AND EXISTS (SELECT 1 FROM projection_checkpoints s \
                         WHERE s.name = $2 AND (s.cursor_tx, s.cursor_seq) >= \
                         (projection_checkpoints.cursor_tx, projection_checkpoints.cursor_seq))",
                    )
                    .bind(&t.state)
                    .bind(shadow_state)
                    .bind(now)
                    .bind(t.spec.hash())
                    .bind(t.spec.canonical()),
                )
                .await?;
            if moved != 1 {
                // The live tables are ahead of the shadow: swapping now would step back.
                tx.rollback().await?;
                return Ok(false);
            }
        }
        {
            use crate::aggregate::spec::{tier_state, Tier};
            let name = tier_state(&spec.name, Tier::Coarse, false);
            if !tiers.iter().any(|t| t.state == name) {
                tx.execute(
                    Sql::new("DELETE FROM projection_checkpoints WHERE name = $1").bind(name),
                )
                .await?;
            }
        }
        for g in Granularity::ALL {
            tx.execute(Sql::new(format!(
                "DROP TABLE IF EXISTS {}",
                table(spec, g, "")
            )))
            .await?;
        }
        for &g in &spec.granularities {
            let (live, shadow) = (table(spec, g, ""), table(spec, g, suffix));
            tx.execute(Sql::new(format!("ALTER TABLE {shadow} RENAME TO {live}")))
                .await?;
            let renames = match &self.db {
                Db::Postgres(_) => postgres::index_renames(spec, &shadow, &live),
                Db::Sqlite(_) => sqlite::index_renames(spec, &shadow, &live),
            };
            for sql in renames {
                tx.execute(Sql::new(sql)).await?;
            }
        }
        tx.execute(
            Sql::new("DELETE FROM projection_checkpoints WHERE name = $1").bind(shadow_state),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Every row of one table, in key order (tests, reconciliation, `projections list`).
    pub async fn read_agg(
        &self,
        spec: &Spec,
        granularity: Granularity,
        suffix: &str,
    ) -> Result<Vec<AggRow>, StoreError> {
        let t = table(spec, granularity, suffix);
        let rows = self
            .db
            .reader()
            .fetch_all(Sql::new(format!(
                "SELECT {} FROM {t} ORDER BY {}",
                all_columns(spec),
                key_columns(spec)
            )))
            .await?;
        let n = spec.dimensions.len();
        rows.iter().map(|r| agg_row(r, n, &t)).collect()
    }

    /// The statement of an [`AggQuery`] and the table it reads.
    fn agg_sql<'q>(&self, q: &'q AggQuery<'_>) -> (Sql<'q>, String) {
        let t = table(q.spec, q.granularity, "");
        let (select, tail) = query_select(q, self.db.backend());
        let mut text = format!("SELECT {select} FROM {t} WHERE bucket >= $1 AND bucket < $2");
        for (i, (d, _)) in q.filters.iter().enumerate() {
            let param = format!("${}", i + 3);
            text.push_str(&format!(" AND {}", self.db.one_of(&d.column(), &param)));
        }
        text.push_str(&tail);
        let mut sql = Sql::new(text).bind(q.from).bind(q.to);
        for (_, values) in q.filters {
            sql = sql.bind(Arg::List(values.iter().map(String::as_str).collect()));
        }
        (sql, t)
    }

    /// The rows an [`AggQuery`] selects together with checkpoint `state`
    /// (its cursor, generation and spec hash) from one snapshot: the rows
    /// are exactly the table's contents at that checkpoint. `None` when
    /// there is no such checkpoint.
    pub async fn query_agg_at(
        &self,
        state: &str,
        q: &AggQuery<'_>,
    ) -> Result<Option<(ProjectionState, Vec<AggRow>)>, StoreError> {
        let mut tx = self.db.snapshot().await?;
        let row = tx
            .fetch_optional(
                Sql::new(format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM projection_checkpoints WHERE name = $1"
                ))
                .bind(state),
            )
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let checkpoint = state_from_row(&row)?;
        let (sql, t) = self.agg_sql(q);
        let rows = tx.fetch_all(sql).await?;
        tx.rollback().await?;
        let n = q.group_by.len();
        let rows = rows
            .iter()
            .map(|r| agg_row(r, n, &t))
            .collect::<Result<_, _>>()?;
        Ok(Some((checkpoint, rows)))
    }

    /// The rows an [`AggQuery`] selects, under the store's statement timeout.
    pub async fn query_agg(&self, q: &AggQuery<'_>) -> Result<AggAnswer, StoreError> {
        let (sql, t) = self.agg_sql(q);
        let rows = self.db.fetch_timed(sql).await?;
        if rows.len() > q.max_rows {
            return Err(StoreError::TooManyRows(q.max_rows));
        }
        // With a ranking, every row carries the number of groups in its
        // `count(*) OVER ()` column, after the measures.
        let groups = match (q.top, rows.first()) {
            (None, _) => None,
            (Some(_), None) => Some(0),
            (Some(_), Some(r)) => {
                Some(r.get(1 + q.group_by.len() + INT_COLUMNS.len() + FLOAT_COLUMNS.len() + 1)?)
            }
        };
        let n = q.group_by.len();
        let rows = rows
            .iter()
            .map(|r| agg_row(r, n, &t))
            .collect::<Result<_, _>>()?;
        Ok(AggAnswer { rows, groups })
    }

    /// A cheap size estimate of each named table that exists (PostgreSQL:
    /// pages on disk; SQLite: the largest rowid), for choosing between
    /// projections that can answer the same query.
    pub async fn table_sizes(&self, tables: &[String]) -> Result<HashMap<String, i64>, StoreError> {
        let Db::Sqlite(p) = &self.db else {
            let list = Arg::List(tables.iter().map(String::as_str).collect());
            let sql = Sql::new(postgres::TABLE_PAGES).bind(list);
            // On the timed pool: `pg_relation_size` waits for a table's lock,
            // and a query planner must not hang behind a long DDL or LOCK.
            let rows = self.db.fetch_timed(sql).await?;
            return rows
                .iter()
                .map(|r| Ok((r.get("name")?, r.get("size")?)))
                .collect();
        };
        sqlite::table_sizes(p, tables).await
    }

    /// Rows in a table named by a spec.
    pub async fn count_rows(&self, table: &str) -> Result<i64, StoreError> {
        Ok(self
            .db
            .reader()
            .fetch_one(Sql::new(format!("SELECT count(*) AS n FROM {table}")))
            .await?
            .get("n")?)
    }

    /// The newest bucket each of `spec`'s tables (with `suffix`) holds, `None`
    /// for an empty table: a row of a newer bucket cannot be stored yet, so a
    /// fold's upsert of it needs no read of a stored sketch (see
    /// [`Apply::newest`]). Read on the primary (the bucket leads each table's
    /// primary key, so it is one index probe per table).
    pub async fn newest_buckets(
        &self,
        spec: &Spec,
        suffix: &str,
    ) -> Result<Vec<(Granularity, Option<DateTime<Utc>>)>, StoreError> {
        let mut out = Vec::with_capacity(spec.granularities.len());
        for &g in &spec.granularities {
            let row = self
                .db
                .writer()
                .fetch_optional(Sql::new(format!(
                    "SELECT bucket FROM {} ORDER BY bucket DESC LIMIT 1",
                    table(spec, g, suffix)
                )))
                .await?;
            out.push((g, row.map(|r| r.time("bucket")).transpose()?));
        }
        Ok(out)
    }

    /// Deletes up to `limit` rows of a live aggregate table whose bucket starts before `cutoff`.
    pub async fn delete_agg_before(
        &self,
        spec: &Spec,
        granularity: Granularity,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let t = table(spec, granularity, "");
        let row_id = match &self.db {
            Db::Postgres(_) => "ctid",
            Db::Sqlite(_) => "rowid",
        };
        let sql = format!(
            "DELETE FROM {t} WHERE {row_id} IN (SELECT {row_id} FROM {t} WHERE bucket < $1 LIMIT $2)"
        );
        self.db.delete_derived_batch(&sql, cutoff, limit).await
    }

    /// From one snapshot: the projection's checkpoint, the stored rows of
    /// `granularities` (tables of checkpoint `state`) with buckets in
    /// `[from, to)`, and every event folded as of that checkpoint with `ts`
    /// in `[from, to)`.
    pub async fn reconcile_read(
        &self,
        spec: &Spec,
        state: &str,
        granularities: &[Granularity],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<ReconcileRead, StoreError> {
        let mut tx = self.db.snapshot().await?;
        let cursor = tx
            .fetch_optional(
                Sql::new(
                    "SELECT cursor_tx, cursor_seq FROM projection_checkpoints WHERE name = $1",
                )
                .bind(state),
            )
            .await?;
        let Some(cursor) = cursor else {
            return Ok(ReconcileRead {
                cursor: None,
                stored: Vec::new(),
                events: Vec::new(),
                catalog: Default::default(),
            });
        };
        let cursor = Cursor {
            tx: cursor.get("cursor_tx")?,
            seq: cursor.get("cursor_seq")?,
        };
        let mut stored = Vec::with_capacity(granularities.len());
        for &g in granularities {
            let t = table(spec, g, "");
            let rows = tx
                .fetch_all(
                    Sql::new(format!(
                        "SELECT {} FROM {t} WHERE bucket >= $1 AND bucket < $2 ORDER BY {}",
                        all_columns(spec),
                        key_columns(spec)
                    ))
                    .bind(from)
                    .bind(to),
                )
                .await?;
            let n = spec.dimensions.len();
            let rows = rows
                .iter()
                .map(|r| agg_row(r, n, &t))
                .collect::<Result<Vec<_>, _>>()?;
            stored.push((g, rows));
        }
        let rows = tx
            .fetch_all(range_read(&self.db, (from, to), cursor, &[]))
            .await?;
        let events = log_events(&rows)?.into_iter().map(|(_, e)| e).collect();
        let catalog = super::prices::Prices::catalog_in(&mut tx).await?;
        tx.commit().await?;
        Ok(ReconcileRead {
            cursor: Some(cursor),
            stored,
            events,
            catalog,
        })
    }
}

/// Adds the [`ADDED_COLUMNS`] a table lacks (it was created by an older
/// Tally); true when it lacked any.
async fn add_missing_columns(tx: &mut Tx, db: &Db, table: &str) -> Result<bool, StoreError> {
    let sql = match db.backend() {
        super::Backend::Postgres => postgres::TABLE_COLUMNS,
        super::Backend::Sqlite => sqlite::TABLE_COLUMNS,
    };
    let have: Vec<String> = tx
        .fetch_all(Sql::new(sql).bind(table))
        .await?
        .iter()
        .map(|r| r.get::<String, _>("name"))
        .collect::<Result<_, _>>()?;
    let int = match db.backend() {
        super::Backend::Postgres => "BIGINT",
        super::Backend::Sqlite => "INTEGER",
    };
    let mut added = false;
    for c in ADDED_COLUMNS {
        if !have.iter().any(|h| h == c) {
            tx.execute(Sql::new(format!(
                "ALTER TABLE {table} ADD COLUMN {c} {int} NOT NULL DEFAULT 0"
            )))
            .await?;
            added = true;
        }
    }
    Ok(added)
}

/// Whether `table` exists (in the aggregates file on SQLite) without some
/// of [`ADDED_COLUMNS`].
async fn lacks_added_columns(db: &Db, table: &str) -> Result<bool, StoreError> {
    let have: Vec<String> = db
        .derived_writer()
        .fetch_all(Sql::new(sqlite::TABLE_COLUMNS).bind(table))
        .await?
        .iter()
        .map(|r| r.get::<String, _>("name"))
        .collect::<Result<_, _>>()?;
    Ok(!have.is_empty() && ADDED_COLUMNS.iter().any(|c| !have.iter().any(|h| h == c)))
}

/// Queues the restatement of every bucket of `live`, whose tables gained
/// measure columns their rows lack.
async fn queue_upgrade(tx: &mut Tx, live: &str) -> Result<(), StoreError> {
    super::prices::queue_over_log(
        tx,
        &[live.to_string()],
        vec![(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC)],
        "upgrade: new measure columns",
        &super::corrections::Scope::All,
        Utc::now(),
    )
    .await?;
    Ok(())
}

/// One projection's share of [`Projections::apply_fold`] inside `tx`: the
/// checkpoint's compare-and-set, then its tables.
async fn apply_in(tx: &mut Tx, apply: &Apply<'_>) -> Result<ApplyOutcome, StoreError> {
    // The compare-and-set comes first: its row lock serialises every
    // writer of this projection until commit.
    let moved = tx
        .execute(
            Sql::new(
                "UPDATE projection_checkpoints SET cursor_tx = $4, cursor_seq = $5, \
                 as_of = COALESCE($6, as_of), events_folded = events_folded + $7, updated_at = $9 \
                 WHERE name = $1 AND spec_hash = $2 AND cursor_tx = $3 AND cursor_seq = $8 \
                 AND generation = $10",
            )
            .bind(apply.state)
            .bind(apply.spec.hash())
            .bind(apply.from.tx)
            .bind(apply.to.tx)
            .bind(apply.to.seq)
            .bind(apply.as_of)
            .bind(i64::try_from(apply.delta.events).unwrap_or(i64::MAX))
            .bind(apply.from.seq)
            .bind(Utc::now())
            .bind(apply.generation),
        )
        .await?;
    if moved != 1 {
        return Ok(ApplyOutcome::Stale);
    }
    let asked = || {
        apply
            .give_way
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::SeqCst) > 0)
    };
    for (g, rows) in &apply.delta.tables {
        let t = table(apply.spec, *g, apply.suffix);
        let all: Vec<(&RowKey, &Measures)> = rows.iter().collect();
        let stored = match apply.newest.iter().find(|(ng, _)| ng == g) {
            Some((_, newest)) => Stored::UpTo(*newest),
            None => Stored::Maybe,
        };
        for chunk in all.chunks(UPSERT_CHUNK) {
            if asked() {
                return Ok(ApplyOutcome::GaveWay);
            }
            let known = apply.known.map(|k| (k, *g));
            upsert_chunk(tx, apply.spec, &t, chunk, stored, known).await?;
        }
    }
    Ok(ApplyOutcome::Applied)
}

/// The aggregate table a dialect writes to, and the spec that lays it out.
pub(crate) struct Target<'a> {
    pub(crate) spec: &'a Spec,
    pub(crate) table: &'a str,
}

/// One row of an upsert: its key and the values of every other column, with
/// the latency sketch merged with the stored one.
pub(crate) struct Upsert<'a> {
    pub(crate) key: &'a RowKey,
    pub(crate) ints: [i64; INT_COLUMNS.len()],
    pub(crate) floats: [Option<f64>; FLOAT_COLUMNS.len()],
    pub(crate) sketch: Option<Vec<u8>>,
}

/// The rows of one upsert statement and the stored sketches they merge
/// with. Each row's values are computed as the dialect binds them, so a
/// chunk is never held twice (once as values, once as bound columns).
pub(crate) struct Upserts<'a> {
    rows: Vec<(&'a RowKey, &'a Measures)>,
    existing: HashMap<RowKey, Sketch>,
    /// The stored sketch of each row its writer knew (by index in `rows`).
    known: Vec<Option<Sketch>>,
    /// Where each written sketch is recorded.
    record: Option<(&'a Mutex<KnownSketches>, Granularity)>,
}

impl<'a> Upserts<'a> {
    /// How many rows.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The rows in `range`, with their values.
    pub(crate) fn each(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = Upsert<'a>> + '_ {
        let known = &self.known[range.clone()];
        self.rows[range]
            .iter()
            .zip(known)
            .map(|(&(key, m), known)| {
                let stored = known.as_ref().or_else(|| self.existing.get(key));
                let merged = merged_sketch(m, stored);
                let sketch = (m.latency_count > 0).then(|| merged.encode());
                if let (Some((to, g)), Some(bytes)) = (self.record, &sketch) {
                    // Poisoned only by a panic elsewhere while recording:
                    // then this apply's result is not trusted either.
                    if let Ok(mut to) = to.lock() {
                        to.record(g, key, bytes);
                    }
                }
                Upsert {
                    key,
                    ints: int_values(m),
                    floats: float_values(m, &merged),
                    sketch,
                }
            })
    }
}

/// Most rows one upsert statement (and its sketch read) carries. Bounds the
/// bound-argument buffers (60,000-row statements held ~54 MiB of encoded
/// arguments) and keeps each sketch read to a few thousand keys (for 60,000
/// PostgreSQL hashed the whole aggregate table).
pub const UPSERT_CHUNK: usize = 2_048;

/// Adds `rows` to `table`, [`UPSERT_CHUNK`] rows per statement. A latency
/// sketch cannot be added in SQL, so the stored sketches of the keys that
/// carry latencies are read first (under the checkpoint's lock, which
/// serialises this projection's writers) and merged here.
async fn upsert_rows(
    tx: &mut Tx,
    spec: &Spec,
    table: &str,
    rows: &Rows,
    stored: Stored,
) -> Result<(), StoreError> {
    let all: Vec<(&RowKey, &Measures)> = rows.iter().collect();
    for chunk in all.chunks(UPSERT_CHUNK) {
        upsert_chunk(tx, spec, table, chunk, stored, None).await?;
    }
    Ok(())
}

/// Whether an upsert's keys may already have rows (whose sketches it must
/// read to merge with).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stored {
    Maybe,
    /// This transaction deleted every row the keys could match: a
    /// restatement's swap skips reading sketches that cannot be there.
    None,
    /// The table holds no bucket newer than this (`None`: no row at all):
    /// only keys of older buckets may be stored.
    UpTo(Option<DateTime<Utc>>),
}

impl Stored {
    /// Whether a row of `key` may be stored already (its sketch must be read).
    fn may_hold(self, key: &RowKey) -> bool {
        match self {
            Stored::Maybe => true,
            Stored::None => false,
            Stored::UpTo(newest) => newest.is_some_and(|b| key.bucket <= b),
        }
    }
}

/// One statement's share of [`upsert_rows`]; the keys are distinct. With
/// `known`, the sketches found there are not read, and each written one is
/// recorded there.
async fn upsert_chunk<'a>(
    tx: &mut Tx,
    spec: &Spec,
    table: &str,
    rows: &[(&'a RowKey, &'a Measures)],
    stored: Stored,
    known: Option<(&'a Mutex<KnownSketches>, Granularity)>,
) -> Result<(), StoreError> {
    let mut from_known: Vec<Option<Sketch>> = vec![None; rows.len()];
    let mut keys: Vec<&RowKey> = Vec::new();
    {
        let guard = known.and_then(|(k, g)| Some((k.lock().ok()?, g)));
        for ((k, m), slot) in rows.iter().zip(&mut from_known) {
            if m.latency_count == 0 || !stored.may_hold(k) {
                continue;
            }
            match guard.as_ref().and_then(|(known, g)| known.get(*g, k)) {
                Some(bytes) => {
                    *slot = Some(Sketch::decode(bytes).map_err(|e| StoreError::CorruptRow {
                        id: format!("{table} bucket {} (known sketch)", k.bucket),
                        reason: e.to_string(),
                    })?)
                }
                None => keys.push(*k),
            }
        }
    }
    let target = Target { spec, table };
    let mut existing = HashMap::new();
    if !keys.is_empty() {
        let found = match tx {
            Tx::Postgres(tx) => postgres::sketches(tx, &target, &keys).await?,
            Tx::Sqlite(tx) => sqlite::sketches(tx, &target, &keys).await?,
        };
        existing.reserve(found.len());
        if let Some(first) = found.first() {
            // Positions resolved by name once, then read by position.
            let bucket_at = first.position("bucket")?;
            let dims_at = spec
                .dimensions
                .iter()
                .map(|d| first.position(d.as_str()))
                .collect::<Result<Vec<_>, _>>()?;
            let sketch_at = first.position("latency_sketch")?;
            for r in &found {
                let bucket = r.time(bucket_at)?;
                let dims = dims_at
                    .iter()
                    .map(|&i| r.get(i))
                    .collect::<Result<Vec<String>, _>>()?;
                let bytes: Vec<u8> = r.get(sketch_at)?;
                let sketch = Sketch::decode(&bytes).map_err(|e| StoreError::CorruptRow {
                    id: format!("{table} bucket {bucket}"),
                    reason: e.to_string(),
                })?;
                existing.insert(RowKey { bucket, dims }, sketch);
            }
        }
    }
    let rows = Upserts {
        rows: rows.to_vec(),
        existing,
        known: from_known,
        record: known,
    };
    match tx {
        Tx::Postgres(tx) => postgres::upsert(tx, &target, &rows).await,
        Tx::Sqlite(tx) => sqlite::upsert(tx, &target, &rows).await,
    }
}

/// Events a restatement holds per read: a catch-up statement returns at
/// most this many, and a range read's streamed rows are handed on in chunks
/// of this size (an hour of a busy log, or everything a projector folded
/// during a long restatement, can be millions of events).
pub const READ_CHUNK: i64 = 20_000;

/// One chunk of a restatement's catch-up read of the log.
#[derive(Debug, Clone, Default)]
pub struct EventChunk {
    /// The events of the chunk that the read's range and groups keep.
    pub events: Vec<crate::event::Event>,
    /// Where the next chunk starts; `None`: the read is done.
    pub next: Option<Cursor>,
}

/// The log columns, the "folded as of `($3, $4)`" and "after `($5, $6)`"
/// conditions and the cursor order of `db`'s dialect.
fn log_dialect(db: &Db) -> (String, &'static str, &'static str, &'static str) {
    match db {
        Db::Postgres(_) => (
            postgres::log_columns(),
            postgres::FOLDED_UP_TO,
            postgres::FOLDED_AFTER,
            "tx, seq",
        ),
        Db::Sqlite(_) => (
            sqlite::log_columns(),
            sqlite::FOLDED_UP_TO,
            sqlite::FOLDED_AFTER,
            "seq",
        ),
    }
}

/// Dimensions the log's `ts` index carries besides `ts` and `seq` (schema
/// 0008): the identities a correction or a daily projection names.
const IN_TS_INDEX: [Dimension; 2] = [Dimension::User, Dimension::Key];

/// The events with `ts` in `[from, to)` folded as of `cursor`, without the
/// voided ones (what the aggregates of those buckets count), of the groups
/// `filter` allows: one statement.
///
/// When the groups name a user or a key, the rows are first found in the
/// `ts` index alone (which carries both), and only those are fetched: a
/// day of ten users is a few hundred rows among the day's 333,000 at 10M
/// events a month, where reading the rows themselves to test them walked
/// the whole day. (PostgreSQL tests a plain index scan's conditions on the
/// row, never on the columns the index includes; a separate index per
/// dimension would cost the append path a quarter of its rate.)
fn range_read<'a>(
    db: &Db,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    cursor: Cursor,
    filter: &'a [(Dimension, Vec<String>)],
) -> Sql<'a> {
    let (columns, folded, _, _) = log_dialect(db);
    // Absent values are '' in the aggregates: the same test on both sides.
    let narrow = group_condition(db, filter, 5, Side::Log);
    let indexed: String = filter
        .iter()
        .enumerate()
        .filter(|(_, (d, _))| IN_TS_INDEX.contains(d))
        .map(|(i, (d, values))| dimension_condition(db, *d, values, 5 + i, Side::Log))
        .collect();
    let rows = if indexed.is_empty() {
        "ts >= $1 AND ts < $2".to_string()
    } else {
        format!("seq IN (SELECT seq FROM usage_events WHERE ts >= $1 AND ts < $2{indexed})")
    };
    let mut sql = Sql::new(format!(
        "SELECT {columns} FROM usage_events WHERE {rows} AND {folded} \
         AND {NOT_VOIDED}{narrow}"
    ))
    .bind(from)
    .bind(to)
    .bind(cursor.tx.to_string())
    .bind(cursor.seq);
    if !indexed.is_empty() {
        // Ten users or ten thousand: only a plan made for the values can
        // tell. The plain read keeps its cached plan (a month's restatement
        // runs 720 of them per projection, where planning each would show).
        sql = sql.custom_plan();
    }
    for (_, values) in filter {
        sql = sql.bind(Arg::List(values.iter().map(String::as_str).collect()));
    }
    sql
}

/// One chunk of the events a fold committed after `after` and up to
/// `cursor`, without the voided ones, with `ts` in `[from, to)` and of the
/// groups `filter` allows, from `resume` on. Statement by statement: the
/// events up to a cursor never change, and a long snapshot would keep
/// PostgreSQL from pruning the row versions the projector's upserts leave.
///
/// The read walks the cursor index, one slice of at most [`READ_CHUNK`]
/// events at a time, and tests the range and groups on that slice only: the
/// events a projector folded over a few seconds are a thin slice of the
/// cursor order but may span the whole time range (live events of a range
/// reaching now), where the `ts` index would scan every event of the range;
/// and given conditions on the range and groups beside the cursor's, the
/// planner misjudges how many rows of a thin slice match (correlated
/// dimensions, a range that holds the whole slice) and has been seen to
/// scan the log, or probe `voided_events` by a scan per row, for each
/// chunk. The slice is a `LIMIT`ed subquery the conditions cannot be pushed
/// into, so its plan is the cursor walk alone; testing them in the
/// statement keeps it from sending and decoding every event of the slice
/// (a catch-up under the checkpoint lock right after a fold committed a
/// batch kept a few of 20,000). The slice's last event is always sent, so
/// the next chunk knows where to go on; Rust tests every event again.
async fn catch_up_chunk(
    db: &Db,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    after: Cursor,
    cursor: Cursor,
    filter: &[(Dimension, Vec<String>)],
    resume: Option<Cursor>,
) -> Result<EventChunk, StoreError> {
    let (columns, folded, later, order) = log_dialect(db);
    let after = resume.unwrap_or(after);
    let narrow = group_condition(db, filter, 8, Side::Log);
    let (position, last) = match db {
        Db::Postgres(_) => (
            "cursor_tx, seq",
            "(cursor_tx, seq) = (SELECT cursor_tx, seq FROM slice ORDER BY cursor_tx DESC, seq DESC LIMIT 1)",
        ),
        Db::Sqlite(_) => ("seq", "seq = (SELECT max(seq) FROM slice)"),
    };
    let mut sql = Sql::new(format!(
        "WITH slice AS MATERIALIZED (SELECT {columns} FROM usage_events WHERE {folded} AND {later} \
         AND {NOT_VOIDED} ORDER BY {order} LIMIT $7) \
         SELECT *, (SELECT count(*) FROM slice) AS slice_len FROM slice \
         WHERE (ts >= $1 AND ts < $2{narrow}) OR {last} ORDER BY {position}"
    ))
    .bind(from)
    .bind(to)
    .bind(cursor.tx.to_string())
    .bind(cursor.seq)
    .bind(after.tx.to_string())
    .bind(after.seq)
    .bind(READ_CHUNK)
    .custom_plan();
    for (_, values) in filter {
        sql = sql.bind(Arg::List(values.iter().map(String::as_str).collect()));
    }
    let rows = db.reader().fetch_all(sql).await?;
    let full = match rows.first() {
        Some(r) => r.get::<i64, _>("slice_len")? == READ_CHUNK,
        None => false,
    };
    let read = log_events(&rows)?;
    let next = match read.last() {
        Some((c, _)) if full => Some(*c),
        _ => None,
    };
    let keep = |e: &crate::event::Event| {
        e.ts >= from
            && e.ts < to
            && filter.iter().all(|(d, values)| {
                let v = crate::aggregate::measures::dimension_str(e, *d);
                values.iter().any(|x| *x == v)
            })
    };
    Ok(EventChunk {
        events: read
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| keep(e))
            .collect(),
        next,
    })
}

/// ` AND <column> IN <list>` per filtered dimension, lists bound from
/// placeholder `$first` on.
fn group_condition(
    db: &Db,
    filter: &[(Dimension, Vec<String>)],
    first: usize,
    side: Side,
) -> String {
    filter
        .iter()
        .enumerate()
        .map(|(i, (d, values))| dimension_condition(db, *d, values, first + i, side))
        .collect()
}

/// ` AND <column> IN <list>` for one dimension, its list bound at `$param`.
/// On the log (`Side::Log`) an absent value is NULL where the aggregates
/// hold '': a list with '' also takes NULL, written as `column IS NULL`
/// rather than `COALESCE(column, '')` so that the condition can be checked
/// on the columns an index carries.
fn dimension_condition(
    db: &Db,
    d: Dimension,
    values: &[String],
    param: usize,
    side: Side,
) -> String {
    let column = d.column();
    let listed = db.one_of(&column, &format!("${param}"));
    if side == Side::Log && values.iter().any(String::is_empty) {
        format!(" AND ({listed} OR {column} IS NULL)")
    } else {
        format!(" AND {listed}")
    }
}

/// Which table a group condition reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `usage_events`: absent dimension values are NULL.
    Log,
    /// An aggregate table: absent dimension values are ''.
    Aggregate,
}

/// Events read with a dialect's log columns, with their cursors.
fn log_events(rows: &[Row]) -> Result<Vec<(Cursor, crate::event::Event)>, StoreError> {
    let cols = match rows.first() {
        None => return Ok(Vec::new()),
        Some(Row::Postgres(r)) => EventColumns::of(r)?,
        Some(Row::Sqlite(r)) => EventColumns::of(r)?,
    };
    rows.iter()
        .map(|r| match r {
            Row::Postgres(r) => postgres::log_event(&cols, r),
            Row::Sqlite(r) => sqlite::log_event(&cols, r),
        })
        .collect()
}

/// The log as one checkpoint has folded it, read without any lock: what a
/// restatement recomputes its buckets from before it takes the checkpoint
/// row to swap them in (see [`Restating`]). The checkpoint and the prices
/// are read in one snapshot; the events up to its cursor never change.
pub struct Folded {
    db: Db,
    cursor: Cursor,
    generation: i64,
    catalog: crate::aggregate::price::Catalog,
}

/// What is left to do once a restatement committed.
#[must_use = "a queue row handed back must be deleted"]
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    /// Nothing: the queue row (if any) went with the commit.
    Done,
    /// Delete this queue row ([`crate::store::Corrections::done`]): the
    /// restated rows are committed in another file than the queue.
    Dequeue(i64),
}

/// A restatement being swapped in: one write transaction that holds a
/// projection's checkpoint row (so no fold commits beside it) and has bumped
/// its generation (so a batch read before it is refused and read again).
/// The caller recomputes buckets from the events of [`Restating::folded`]
/// (or, having done most of that beforehand from a [`Folded`] snapshot, adds
/// the events after its cursor, [`Folded::events_after`]) and swaps them in with
/// [`Restating::replace`]; nothing is visible until [`Restating::finish`].
pub struct Restating {
    tx: Tx,
    /// Dropped after `tx` (fields drop in order): see [`Db::begin_derived`].
    _registered: Option<super::postgres::XidGuard>,
    folded: Folded,
}

/// The checkpoint row of `state` built with `spec_hash`: generation and cursor.
async fn checkpoint_at(
    tx: &mut Tx,
    state: &str,
    spec_hash: &str,
) -> Result<Option<(i64, Cursor)>, StoreError> {
    let row = tx
        .fetch_optional(
            Sql::new(
                "SELECT generation, cursor_tx, cursor_seq FROM projection_checkpoints \
                 WHERE name = $1 AND spec_hash = $2",
            )
            .bind(state)
            .bind(spec_hash),
        )
        .await?;
    row.map(|row| {
        Ok((
            row.get("generation")?,
            Cursor {
                tx: row.get("cursor_tx")?,
                seq: row.get("cursor_seq")?,
            },
        ))
    })
    .transpose()
}

impl Projections {
    /// Opens a read-only snapshot of the log as checkpoint `state` (built
    /// with `spec_hash`) has folded it; `None` when there is no such
    /// checkpoint. Folds go on meanwhile: [`Folded::events_after`] has
    /// what they add.
    pub async fn read_folded(
        &self,
        state: &str,
        spec_hash: &str,
    ) -> Result<Option<Folded>, StoreError> {
        let mut tx = self.db.snapshot().await?;
        let Some((generation, cursor)) = checkpoint_at(&mut tx, state, spec_hash).await? else {
            tx.rollback().await?;
            return Ok(None);
        };
        // The same snapshot: these prices are the ones of this generation.
        let catalog = super::prices::Prices::catalog_in(&mut tx).await?;
        tx.rollback().await?;
        Ok(Some(Folded {
            db: self.db.clone(),
            cursor,
            generation,
            catalog,
        }))
    }

    /// Starts restating the tables of checkpoint `state` (which must have
    /// been built with `spec_hash`); `None` when there is no such checkpoint.
    pub async fn begin_restatement(
        &self,
        state: &str,
        spec_hash: &str,
    ) -> Result<Option<Restating>, StoreError> {
        let (mut tx, registered) = self.db.begin_derived().await?;
        // The row lock comes first: a fold committing now finishes before
        // this reads the cursor, and the next one waits for this commit.
        let moved = tx
            .execute(
                Sql::new(
                    "UPDATE projection_checkpoints SET generation = generation + 1, updated_at = $3 \
                     WHERE name = $1 AND spec_hash = $2",
                )
                .bind(state)
                .bind(spec_hash)
                .bind(Utc::now()),
            )
            .await?;
        let Some((generation, cursor)) = (match moved {
            1 => checkpoint_at(&mut tx, state, spec_hash).await?,
            _ => None,
        }) else {
            tx.rollback().await?;
            return Ok(None);
        };
        // Read under the row lock: a price change committed before it is
        // here; one committing later bumps the generation again and queues
        // its own restatement.
        let catalog = super::prices::Prices::catalog_in(&mut tx).await?;
        Ok(Some(Restating {
            tx,
            _registered: registered,
            folded: Folded {
                db: self.db.clone(),
                cursor,
                generation: generation - 1,
                catalog,
            },
        }))
    }
}

impl Folded {
    /// How much event time one read of [`Folded::read_events`] spans on a
    /// busy log (a restatement reads sparse stretches in longer spans): a
    /// day when `filter` names users or keys (the `ts` index finds their
    /// rows, a few per group and day; fewer statements, fewer plans), an
    /// hour otherwise (each statement reads every row of its span).
    pub fn read_span(filter: &[(Dimension, Vec<String>)]) -> chrono::Duration {
        if filter.iter().any(|(d, _)| IN_TS_INDEX.contains(d)) {
            chrono::Duration::days(1)
        } else {
            chrono::Duration::hours(1)
        }
    }

    /// The checkpoint the events are read as of.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The checkpoint's generation (before a restatement's own bump): a
    /// price change or another restatement since then moves it.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// The price catalog the restated buckets are costed with.
    pub fn catalog(&self) -> &crate::aggregate::price::Catalog {
        &self.catalog
    }

    /// The events with `ts` in `[from, to)` that the checkpoint has folded
    /// (events after it are the projector's to fold), without voided ones,
    /// and only those of the groups `filter` allows, handed to `each` in
    /// chunks of at most [`READ_CHUNK`] as they arrive: one statement, whose
    /// rows are streamed, so memory stays bounded however busy the range.
    pub async fn read_events(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        filter: &[(Dimension, Vec<String>)],
        mut each: impl FnMut(Vec<crate::event::Event>),
    ) -> Result<(), StoreError> {
        let sql = range_read(&self.db, (from, to), self.cursor, filter);
        self.db
            .reader()
            .fetch_chunked(sql, READ_CHUNK as usize, |rows| {
                each(log_events(&rows)?.into_iter().map(|(_, e)| e).collect());
                Ok(())
            })
            .await
    }

    /// A chunk of the events a fold committed after `after` (up to this
    /// checkpoint's cursor) with `ts` in `[from, to)`, without voided ones,
    /// of the groups `filter` allows: what the projector added since an
    /// earlier snapshot. From `resume` on (the previous chunk's `next`).
    pub async fn events_after(
        &self,
        after: Cursor,
        range: (DateTime<Utc>, DateTime<Utc>),
        filter: &[(Dimension, Vec<String>)],
        resume: Option<Cursor>,
    ) -> Result<EventChunk, StoreError> {
        catch_up_chunk(&self.db, range, after, self.cursor, filter, resume).await
    }

    /// The values of each text dimension among the events a restatement's
    /// `scope` can change (a dimension with more than `max` values is left
    /// out: it then does not narrow anything). Empty: whole buckets.
    pub async fn scope_groups(
        &mut self,
        scope: &Scope,
        max: usize,
    ) -> Result<Vec<(Dimension, Vec<String>)>, StoreError> {
        let id = match scope {
            Scope::All => return Ok(Vec::new()),
            Scope::Models(m) => return Ok(vec![(Dimension::Model, m.clone())]),
            Scope::Correction(id) => id,
        };
        const TEXT: [Dimension; 6] = [
            Dimension::Api,
            Dimension::Endpoint,
            Dimension::Method,
            Dimension::Key,
            Dimension::User,
            Dimension::Model,
        ];
        let cols: Vec<String> = TEXT
            .iter()
            .map(|d| format!("COALESCE(e.{}, '') AS {}", d.column(), d.column()))
            .collect();
        let rows = self
            .db
            .reader()
            .fetch_all(
                Sql::new(format!(
                    "SELECT DISTINCT {} FROM correction_events c JOIN usage_events e ON e.id = c.event_id \
                     WHERE c.correction_id = $1",
                    cols.join(", ")
                ))
                .bind(id.as_str()),
            )
            .await?;
        let mut sets: Vec<std::collections::BTreeSet<String>> =
            vec![Default::default(); TEXT.len()];
        for r in &rows {
            for (i, d) in TEXT.iter().enumerate() {
                sets[i].insert(r.get::<String, _>(d.as_str())?);
            }
        }
        Ok(TEXT
            .iter()
            .zip(sets)
            .filter(|(_, v)| v.len() <= max)
            .map(|(d, v)| (*d, v.into_iter().collect()))
            .collect())
    }
}

impl Restating {
    /// The log as of the locked checkpoint (its cursor includes every fold
    /// committed so far; none commits until this one does).
    pub fn folded(&mut self) -> &mut Folded {
        &mut self.folded
    }

    /// The rows of one table with buckets in `[from, to)`, as this
    /// transaction sees them (a finer table just restated, for a coarser one
    /// to be summed from).
    pub async fn rows(
        &mut self,
        spec: &Spec,
        suffix: &str,
        g: Granularity,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        filter: &[(Dimension, Vec<String>)],
    ) -> Result<Vec<AggRow>, StoreError> {
        let t = table(spec, g, suffix);
        let narrow = group_condition(&self.folded.db, filter, 3, Side::Aggregate);
        let mut sql = Sql::new(format!(
            "SELECT {} FROM {t} WHERE bucket >= $1 AND bucket < $2{narrow}",
            all_columns(spec)
        ))
        .bind(from)
        .bind(to);
        for (_, values) in filter {
            sql = sql.bind(Arg::List(values.iter().map(String::as_str).collect()));
        }
        let rows = self.tx.fetch_all(sql).await?;
        let n = spec.dimensions.len();
        rows.iter().map(|r| agg_row(r, n, &t)).collect()
    }

    /// Replaces the rows of one table with buckets in `[from, to)` (and
    /// groups `filter` allows) by `rows`.
    pub async fn replace(
        &mut self,
        spec: &Spec,
        suffix: &str,
        g: Granularity,
        (from, to): (DateTime<Utc>, DateTime<Utc>),
        filter: &[(Dimension, Vec<String>)],
        rows: &Rows,
    ) -> Result<(), StoreError> {
        let t = table(spec, g, suffix);
        let narrow = group_condition(&self.folded.db, filter, 3, Side::Aggregate);
        let mut sql = Sql::new(format!(
            "DELETE FROM {t} WHERE bucket >= $1 AND bucket < $2{narrow}"
        ))
        .bind(from)
        .bind(to);
        for (_, values) in filter {
            sql = sql.bind(Arg::List(values.iter().map(String::as_str).collect()));
        }
        self.tx.execute(sql).await?;
        // Every row lies in what was just deleted (checked, as a row outside
        // it would have its stored sketch replaced instead of merged).
        // Sets built once: a filter may hold a thousand values per dimension
        // and this runs per row, under the lock.
        let sets: Option<Vec<(usize, std::collections::HashSet<&str>)>> = filter
            .iter()
            .map(|(d, values)| {
                let at = spec.dimensions.iter().position(|sd| sd == d)?;
                Some((at, values.iter().map(String::as_str).collect()))
            })
            .collect();
        let inside = |k: &RowKey| {
            k.bucket >= from
                && k.bucket < to
                && sets.as_ref().is_some_and(|sets| {
                    sets.iter()
                        .all(|(at, set)| k.dims.get(*at).is_some_and(|v| set.contains(v.as_str())))
                })
        };
        let stored = if rows.keys().all(inside) {
            Stored::None
        } else {
            Stored::Maybe
        };
        upsert_rows(&mut self.tx, spec, &t, rows, stored).await
    }

    /// Commits, deleting the queue row `done`: in the same transaction on
    /// PostgreSQL (so a crash before it redoes the whole restatement, never
    /// half of it). SQLite's queue is in the main file, which this
    /// transaction cannot write: the row is handed back as
    /// [`Finished::Dequeue`] for the caller to delete after the commit (a
    /// crash between redoes the whole restatement, which computes the same
    /// rows again).
    pub async fn finish(mut self, done: Option<i64>) -> Result<Finished, StoreError> {
        match (&self.folded.db, done) {
            (Db::Postgres(_), Some(id)) => {
                self.tx
                    .execute(Sql::new("DELETE FROM restatements WHERE id = $1").bind(id))
                    .await?;
                self.tx.commit().await?;
                Ok(Finished::Done)
            }
            (Db::Sqlite(_), Some(id)) => {
                self.tx.commit().await?;
                Ok(Finished::Dequeue(id))
            }
            (_, None) => {
                self.tx.commit().await?;
                Ok(Finished::Done)
            }
        }
    }

    /// Gives up; nothing changes.
    pub async fn abandon(self) -> Result<(), StoreError> {
        self.tx.rollback().await
    }
}
