//! The seam between the store's shared code and the two SQL dialects.
//!
//! Everything that is the same on PostgreSQL and SQLite (the statements of
//! alerts, tokens, jobs and checkpoints, the orchestration of an append, a
//! swap or a reconciliation read) is written once against [`Db`], [`Sql`] and
//! [`Row`]. Those three absorb the differences that do not change a
//! statement's meaning:
//!
//! - **pools**: PostgreSQL has one pool; SQLite a single-connection writer
//!   and a read-only pool ([`Db::writer`], [`Db::reader`]);
//! - **transactions**: [`Db::begin`] opens a write transaction (`BEGIN
//!   IMMEDIATE` on SQLite, so it holds the write lock from the start) and
//!   [`Db::snapshot`] a read-only one that sees one snapshot throughout;
//! - **time**: PostgreSQL stores `timestamptz`, SQLite fixed-width RFC 3339
//!   text (readable by an analyst, and ordered as text the way it is in
//!   time). [`Arg::Time`] binds and [`Row::time`] reads either encoding.
//!
//! Placeholders are `$1`, `$2`, …: PostgreSQL's syntax, which SQLite reads as
//! the same numbered parameters. What really differs in SQL (bulk inserts,
//! the log cursor, DDL, timeouts) lives in `postgres.rs` and `sqlite.rs`.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Postgres, Row as _, Sqlite, Transaction};

use super::{postgres, sqlite, Backend, StoreError};
use crate::event::format_ts;

/// One database, in its dialect, with its pools.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    /// PostgreSQL.
    Postgres(postgres::Pools),
    /// SQLite.
    Sqlite(sqlite::Pools),
}

impl Db {
    /// Which dialect this is.
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Where reads go (SQLite: the read-only pool; readers never block the writer).
    pub(crate) fn reader(&self) -> Pool<'_> {
        match self {
            Db::Postgres(p) => Pool::Postgres("main", &p.main),
            Db::Sqlite(p) => Pool::Sqlite("reader", &p.reader),
        }
    }

    /// Where writes outside a transaction go (SQLite: the one writer connection).
    pub(crate) fn writer(&self) -> Pool<'_> {
        match self {
            Db::Postgres(p) => Pool::Postgres("main", &p.main),
            Db::Sqlite(p) => Pool::Sqlite("writer", &p.writer),
        }
    }

    /// A write transaction. On SQLite it takes the database's write lock at
    /// once (`BEGIN IMMEDIATE`), so a read in it cannot go stale before a write.
    pub(crate) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match self {
            Db::Postgres(p) => Tx::Postgres(p.main.begin().await?),
            Db::Sqlite(p) => Tx::Sqlite(p.writer.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// Where writes of derived data outside a transaction go (projection
    /// tables and checkpoints, leases on them; SQLite: the aggregates file's
    /// writer connection).
    pub(crate) fn derived_writer(&self) -> Pool<'_> {
        match self {
            Db::Postgres(p) => Pool::Postgres("main", &p.main),
            Db::Sqlite(p) => Pool::Sqlite("derived", &p.derived),
        }
    }

    /// A durable write transaction on the tables of derived data (creating,
    /// dropping and swapping projection tables, their checkpoint rows; on
    /// SQLite the aggregates file's writer). It must not write the main
    /// file's tables: on SQLite they are read-only there.
    pub(crate) async fn begin_aggregates(&self) -> Result<Tx, StoreError> {
        Ok(match self {
            Db::Postgres(p) => Tx::Postgres(p.main.begin().await?),
            Db::Sqlite(p) => Tx::Sqlite(p.derived.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// A write transaction for derived data (aggregates and the checkpoint
    /// that commits with them). It does not wait for its log flush
    /// (PostgreSQL `synchronous_commit = off`; SQLite: the aggregates file,
    /// `synchronous = NORMAL`, with a writer connection of its own): a
    /// commit lost in a crash of the machine loses rows and checkpoint
    /// together, and they are folded again.
    ///
    /// On PostgreSQL its transaction id is registered until the returned
    /// guard is dropped (after the commit or rollback): it writes no event,
    /// so the projectors' log reads need not wait for it.
    pub(crate) async fn begin_derived(
        &self,
    ) -> Result<(Tx, Option<postgres::XidGuard>), StoreError> {
        let mut tx = match self {
            Db::Sqlite(p) => Tx::Sqlite(p.derived.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres(_) => self.begin().await?,
        };
        let mut guard = None;
        if let (Tx::Postgres(t), Db::Postgres(p)) = (&mut tx, self) {
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut **t)
                .await?;
            guard = Some(p.derived.register(t).await?);
        }
        Ok((tx, guard))
    }

    /// A read-only transaction whose statements all see one snapshot
    /// (PostgreSQL: `REPEATABLE READ`; SQLite: a deferred read transaction in
    /// WAL mode, whose snapshot is taken at its first `SELECT`).
    pub(crate) async fn snapshot(&self) -> Result<Tx, StoreError> {
        Ok(match self {
            Db::Postgres(p) => {
                let mut tx = p.main.begin().await?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await?;
                Tx::Postgres(tx)
            }
            Db::Sqlite(p) => Tx::Sqlite(p.reader.begin().await?),
        })
    }

    /// Applies pending migrations from `schema/<backend>/` (idempotent).
    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Db::Postgres(p) => postgres::MIGRATOR.run(&p.main).await?,
            Db::Sqlite(p) => {
                sqlite::MIGRATOR.run(&p.writer).await?;
                sqlite::move_derived_tables(p).await?;
            }
        }
        Ok(())
    }

    /// Closes the pools, waiting for connections to be returned.
    pub(crate) async fn close(&self) {
        for p in self.pools() {
            p.close().await;
        }
    }

    /// Connection pool usage, for `/metrics`.
    pub(crate) fn pool_stats(&self) -> Vec<super::PoolStats> {
        self.pools().into_iter().map(Pool::stats).collect()
    }

    fn pools(&self) -> Vec<Pool<'_>> {
        match self {
            Db::Postgres(p) => vec![
                Pool::Postgres("main", &p.main),
                Pool::Postgres("query", &p.query),
            ],
            Db::Sqlite(p) => vec![
                Pool::Sqlite("writer", &p.writer),
                Pool::Sqlite("derived", &p.derived),
                Pool::Sqlite("reader", &p.reader),
            ],
        }
    }

    /// The condition "`column` is one of the values of `param`" (`$n`),
    /// bound with [`Arg::List`].
    pub(crate) fn one_of(&self, column: &str, param: &str) -> String {
        match self {
            Db::Postgres(_) => postgres::one_of(column, param),
            Db::Sqlite(_) => sqlite::one_of(column, param),
        }
    }

    /// Every row of a query-module read, cancelled at the statement timeout
    /// ([`StoreError::Timeout`]).
    pub(crate) async fn fetch_timed(&self, sql: Sql<'_>) -> Result<Vec<Row>, StoreError> {
        match self {
            Db::Postgres(p) => postgres::fetch_timed(p, sql).await,
            Db::Sqlite(p) => sqlite::fetch_timed(p, sql).await,
        }
    }

    /// Runs a retention `DELETE` of at most `$2` rows older than `$1`; how
    /// many it deleted.
    pub(crate) async fn delete_batch<'a>(
        &self,
        sql: &'a str,
        cutoff: impl Into<Arg<'a>>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let q = Sql::new(sql).bind(cutoff).bind(limit);
        Ok(self.writer().execute(q).await?)
    }

    /// [`Db::delete_batch`] on a table of derived data.
    pub(crate) async fn delete_derived_batch<'a>(
        &self,
        sql: &'a str,
        cutoff: impl Into<Arg<'a>>,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let q = Sql::new(sql).bind(cutoff).bind(limit);
        Ok(self.derived_writer().execute(q).await?)
    }

    /// The suffix that locks a row read in a write transaction until commit
    /// (empty on SQLite, whose `BEGIN IMMEDIATE` already holds the write lock).
    pub(crate) fn for_update(&self) -> &'static str {
        match self {
            Db::Postgres(_) => " FOR UPDATE",
            Db::Sqlite(_) => "",
        }
    }
}

/// [`StoreError::Timeout`] when `e` is the dialect's error `code` for a
/// statement cancelled at its deadline; else `e`.
pub(crate) fn timed_out(e: sqlx::Error, code: &str, after: std::time::Duration) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some(code) => StoreError::Timeout(after),
        _ => e.into(),
    }
}

/// A statement and its arguments.
#[derive(Debug, Clone)]
pub(crate) struct Sql<'a> {
    text: Cow<'a, str>,
    args: Vec<Arg<'a>>,
    custom_plan: bool,
}

impl<'a> Sql<'a> {
    /// A statement with `$1`, `$2`, … placeholders.
    pub(crate) fn new(text: impl Into<Cow<'a, str>>) -> Self {
        Self {
            text: text.into(),
            args: Vec::new(),
            custom_plan: false,
        }
    }

    /// Plans the statement for its arguments each time (PostgreSQL: not a
    /// cached prepared statement), for one whose best plan depends on them:
    /// a generic plan cannot tell a thin cursor slice from a wide one.
    pub(crate) fn custom_plan(mut self) -> Self {
        self.custom_plan = true;
        self
    }

    /// Binds the next placeholder.
    pub(crate) fn bind(mut self, value: impl Into<Arg<'a>>) -> Self {
        self.args.push(value.into());
        self
    }

    /// The statement for PostgreSQL: times as `timestamptz`, lists as `text[]`.
    pub(crate) fn postgres(&self) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
        let mut q = sqlx::query(&self.text);
        for a in &self.args {
            q = match a {
                Arg::Time(v) => q.bind(*v),
                Arg::List(v) => q.bind(v),
                other => bind_plain(q, other),
            };
        }
        if self.custom_plan {
            q = q.persistent(false);
        }
        q
    }

    /// The statement for SQLite: times as fixed-width RFC 3339 text, lists
    /// as a JSON array (for `json_each`).
    pub(crate) fn sqlite(
        &self,
    ) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments<'_>> {
        let mut q = sqlx::query(&self.text);
        for a in &self.args {
            q = match a {
                Arg::Time(v) => q.bind(v.as_ref().map(format_ts)),
                Arg::List(v) => q.bind(serde_json::to_string(v).unwrap_or_else(|_| "[]".into())),
                other => bind_plain(q, other),
            };
        }
        q
    }
}

/// Binds a value both dialects encode alike (NULL for a time or a list,
/// which the dialects bind themselves).
fn bind_plain<'q, DB>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    a: &'q Arg<'_>,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i32>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<f64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<bool>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q [u8]>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    match a {
        Arg::Int(v) => q.bind(*v),
        Arg::Int32(v) => q.bind(*v),
        Arg::Float(v) => q.bind(*v),
        Arg::Bool(v) => q.bind(*v),
        Arg::Text(v) => q.bind(v.as_deref()),
        Arg::Bytes(v) => q.bind(v.as_deref()),
        Arg::Time(_) | Arg::List(_) => q.bind(None::<i64>),
    }
}

/// A bound value; every kind may be NULL.
#[derive(Debug, Clone)]
pub(crate) enum Arg<'a> {
    /// `bigint` / `INTEGER`.
    Int(Option<i64>),
    /// `integer` / `INTEGER`.
    Int32(Option<i32>),
    /// `double precision` / `REAL`.
    Float(Option<f64>),
    /// `boolean` / `INTEGER` 0 or 1.
    Bool(Option<bool>),
    /// `text` / `TEXT`.
    Text(Option<Cow<'a, str>>),
    /// `bytea` / `BLOB`.
    Bytes(Option<Cow<'a, [u8]>>),
    /// `timestamptz` / fixed-width RFC 3339 `TEXT`.
    Time(Option<DateTime<Utc>>),
    /// A list of text values for [`Db::one_of`]: `text[]` / a JSON array.
    List(Vec<&'a str>),
}

macro_rules! arg_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl<'a> From<$t> for Arg<'a> {
            fn from(v: $t) -> Self {
                Arg::$variant(Some(v.into()))
            }
        }
        impl<'a> From<Option<$t>> for Arg<'a> {
            fn from(v: Option<$t>) -> Self {
                Arg::$variant(v.map(Into::into))
            }
        }
    )*};
}

arg_from!(
    i64 => Int,
    i32 => Int32,
    f64 => Float,
    bool => Bool,
    &'a str => Text,
    String => Text,
    &'a [u8] => Bytes,
    Vec<u8> => Bytes,
    DateTime<Utc> => Time,
);

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(Cow::Borrowed(v.as_str())))
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Arg::Text(v.as_deref().map(Cow::Borrowed))
    }
}

/// A row read through [`Db`]; columns are read by name.
pub(crate) enum Row {
    /// From PostgreSQL.
    Postgres(PgRow),
    /// From SQLite.
    Sqlite(SqliteRow),
}

impl Row {
    /// The value of a column, by name (or, where a select list has no
    /// names, such as a computed aggregate, by position).
    pub(crate) fn get<T, I>(&self, col: I) -> Result<T, sqlx::Error>
    where
        T: for<'r> sqlx::Decode<'r, Postgres>
            + sqlx::Type<Postgres>
            + for<'r> sqlx::Decode<'r, Sqlite>
            + sqlx::Type<Sqlite>,
        I: sqlx::ColumnIndex<PgRow> + sqlx::ColumnIndex<SqliteRow>,
    {
        match self {
            Row::Postgres(r) => r.try_get(col),
            Row::Sqlite(r) => r.try_get(col),
        }
    }

    /// The position of a column in this row's result set.
    pub(crate) fn position(&self, name: &str) -> Result<usize, sqlx::Error> {
        use sqlx::Column as _;
        match self {
            Row::Postgres(r) => r.try_column(name).map(|c| c.ordinal()),
            Row::Sqlite(r) => r.try_column(name).map(|c| c.ordinal()),
        }
    }

    /// A timestamp column, in either encoding.
    pub(crate) fn time<I>(&self, col: I) -> Result<DateTime<Utc>, StoreError>
    where
        I: sqlx::ColumnIndex<PgRow> + sqlx::ColumnIndex<SqliteRow> + std::fmt::Display + Copy,
    {
        self.opt_time(col)?.ok_or_else(|| StoreError::CorruptRow {
            id: col.to_string(),
            reason: "NULL timestamp".into(),
        })
    }

    /// A nullable timestamp column, in either encoding.
    pub(crate) fn opt_time<I>(&self, col: I) -> Result<Option<DateTime<Utc>>, StoreError>
    where
        I: sqlx::ColumnIndex<PgRow> + sqlx::ColumnIndex<SqliteRow> + std::fmt::Display + Copy,
    {
        match self {
            Row::Postgres(r) => Ok(r.try_get(col)?),
            Row::Sqlite(r) => {
                let text: Option<String> = r.try_get(col)?;
                text.map(|t| {
                    sqlite::parse_ts(&t).ok_or_else(|| StoreError::CorruptRow {
                        id: col.to_string(),
                        reason: format!("{col} {t:?} is not an RFC 3339 timestamp"),
                    })
                })
                .transpose()
            }
        }
    }
}

/// A dialect's rows as [`Row`]s.
fn rows<R>(found: Vec<R>, wrap: fn(R) -> Row) -> Vec<Row> {
    found.into_iter().map(wrap).collect()
}

/// A pool to run single statements on (autocommit).
#[derive(Clone, Copy)]
pub(crate) enum Pool<'a> {
    /// PostgreSQL, with the pool's name in `/metrics`.
    Postgres(&'static str, &'a PgPool),
    /// SQLite, with the pool's name in `/metrics`.
    Sqlite(&'static str, &'a SqlitePool),
}

impl Pool<'_> {
    async fn close(self) {
        match self {
            Pool::Postgres(_, p) => p.close().await,
            Pool::Sqlite(_, p) => p.close().await,
        }
    }

    fn stats(self) -> super::PoolStats {
        let (name, size, idle, max) = match self {
            Pool::Postgres(n, p) => (n, p.size(), p.num_idle(), p.options().get_max_connections()),
            Pool::Sqlite(n, p) => (n, p.size(), p.num_idle(), p.options().get_max_connections()),
        };
        super::PoolStats {
            pool: name,
            size,
            idle: u32::try_from(idle).unwrap_or(u32::MAX),
            max,
        }
    }

    /// Every row.
    pub(crate) async fn fetch_all(self, q: Sql<'_>) -> Result<Vec<Row>, StoreError> {
        Ok(match self {
            Pool::Postgres(_, p) => rows(q.postgres().fetch_all(p).await?, Row::Postgres),
            Pool::Sqlite(_, p) => rows(q.sqlite().fetch_all(p).await?, Row::Sqlite),
        })
    }

    /// Every row, handed to `each` in chunks of at most `chunk` as they
    /// arrive: memory stays bounded however many rows the statement returns.
    pub(crate) async fn fetch_chunked(
        self,
        q: Sql<'_>,
        chunk: usize,
        mut each: impl FnMut(Vec<Row>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        use futures::{StreamExt, TryStreamExt};
        let chunk = chunk.max(1);
        let mut buf = Vec::with_capacity(chunk);
        let mut rows = match self {
            Pool::Postgres(_, p) => q.postgres().fetch(p).map_ok(Row::Postgres).boxed(),
            Pool::Sqlite(_, p) => q.sqlite().fetch(p).map_ok(Row::Sqlite).boxed(),
        };
        while let Some(r) = rows.try_next().await? {
            buf.push(r);
            if buf.len() >= chunk {
                each(std::mem::replace(&mut buf, Vec::with_capacity(chunk)))?;
            }
        }
        if !buf.is_empty() {
            each(buf)?;
        }
        Ok(())
    }

    /// The first row, if any.
    pub(crate) async fn fetch_optional(self, q: Sql<'_>) -> Result<Option<Row>, StoreError> {
        Ok(match self {
            Pool::Postgres(_, p) => q.postgres().fetch_optional(p).await?.map(Row::Postgres),
            Pool::Sqlite(_, p) => q.sqlite().fetch_optional(p).await?.map(Row::Sqlite),
        })
    }

    /// Exactly one row.
    pub(crate) async fn fetch_one(self, q: Sql<'_>) -> Result<Row, StoreError> {
        Ok(match self {
            Pool::Postgres(_, p) => Row::Postgres(q.postgres().fetch_one(p).await?),
            Pool::Sqlite(_, p) => Row::Sqlite(q.sqlite().fetch_one(p).await?),
        })
    }

    /// Every row, each decoded by `decode`.
    pub(crate) async fn read_all<T, E>(
        self,
        q: Sql<'_>,
        decode: impl Fn(&Row) -> Result<T, E>,
    ) -> Result<Vec<T>, StoreError>
    where
        StoreError: From<E>,
    {
        let found = self.fetch_all(q).await?;
        Ok(found.iter().map(decode).collect::<Result<_, _>>()?)
    }

    /// Runs the statement; the rows it changed.
    pub(crate) async fn execute(self, q: Sql<'_>) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Pool::Postgres(_, p) => q.postgres().execute(p).await?.rows_affected(),
            Pool::Sqlite(_, p) => q.sqlite().execute(p).await?.rows_affected(),
        })
    }
}

/// An open transaction; dropped without [`Tx::commit`], it rolls back.
pub(crate) enum Tx {
    /// PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
    /// SQLite.
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    /// Every row.
    pub(crate) async fn fetch_all(&mut self, q: Sql<'_>) -> Result<Vec<Row>, StoreError> {
        Ok(match self {
            Tx::Postgres(tx) => rows(q.postgres().fetch_all(&mut **tx).await?, Row::Postgres),
            Tx::Sqlite(tx) => rows(q.sqlite().fetch_all(&mut **tx).await?, Row::Sqlite),
        })
    }

    /// The first row, if any.
    pub(crate) async fn fetch_optional(&mut self, q: Sql<'_>) -> Result<Option<Row>, StoreError> {
        Ok(match self {
            Tx::Postgres(tx) => q
                .postgres()
                .fetch_optional(&mut **tx)
                .await?
                .map(Row::Postgres),
            Tx::Sqlite(tx) => q.sqlite().fetch_optional(&mut **tx).await?.map(Row::Sqlite),
        })
    }

    /// Exactly one row.
    pub(crate) async fn fetch_one(&mut self, q: Sql<'_>) -> Result<Row, StoreError> {
        Ok(match self {
            Tx::Postgres(tx) => Row::Postgres(q.postgres().fetch_one(&mut **tx).await?),
            Tx::Sqlite(tx) => Row::Sqlite(q.sqlite().fetch_one(&mut **tx).await?),
        })
    }

    /// Runs the statement; the rows it changed.
    pub(crate) async fn execute(&mut self, q: Sql<'_>) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Tx::Postgres(tx) => q.postgres().execute(&mut **tx).await?.rows_affected(),
            Tx::Sqlite(tx) => q.sqlite().execute(&mut **tx).await?.rows_affected(),
        })
    }

    /// Commits.
    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Postgres(tx) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Rolls back now (rather than when dropped, which defers it to the pool).
    pub(crate) async fn rollback(self) -> Result<(), StoreError> {
        match self {
            Tx::Postgres(tx) => tx.rollback().await?,
            Tx::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}
