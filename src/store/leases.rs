//! Leases: which instance does a singleton's work. A projection's lease lives
//! on its checkpoint row (dropped with the projection, shown by `projections
//! list`); every other lease (evaluator, relay) is a row of `leases`. The
//! loop that takes and renews them lives above the store, in `lease.rs`.

use std::time::Duration;

use chrono::Utc;

use super::db::{Db, Sql};
use super::StoreError;

/// The lease rows.
#[derive(Debug, Clone)]
pub struct Leases {
    db: Db,
}

impl Leases {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }

    /// Takes or renews the projector lease of checkpoint `state` for `ttl`;
    /// false when another live instance holds it.
    pub async fn try_lease(
        &self,
        state: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.take(
            Held::InCheckpoint,
            "UPDATE projection_checkpoints SET leader = $2, lease_until_ms = $3 \
             WHERE name = $1 AND (leader IS NULL OR leader = $2 OR lease_until_ms < $4)",
            (state, owner),
            ttl,
        )
        .await
    }

    /// Gives the projector lease up (clean shutdown), if `owner` holds it.
    pub async fn release_lease(&self, state: &str, owner: &str) -> Result<(), StoreError> {
        self.release(
            Held::InCheckpoint,
            "UPDATE projection_checkpoints SET leader = NULL, lease_until_ms = 0 \
             WHERE name = $1 AND leader = $2",
            (state, owner),
        )
        .await
    }

    /// Takes or renews the named lease for `ttl`; false when another live holder has it.
    pub async fn try_named_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.take(
            Held::Named,
            "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
             WHERE leases.holder = excluded.holder OR leases.until_ms < $4",
            (name, holder),
            ttl,
        )
        .await
    }

    /// Gives the named lease up, if `holder` has it.
    pub async fn release_named_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.release(
            Held::Named,
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            (name, holder),
        )
        .await
    }

    /// Runs a take-or-renew statement: `$1` the lease, `$2` the holder, `$3`
    /// the new expiry, `$4` now (all Unix ms); true when it changed one row.
    async fn take(
        &self,
        held: Held,
        sql: &str,
        (name, holder): (&str, &str),
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Utc::now().timestamp_millis();
        let until = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4));
        let q = Sql::new(sql).bind(name).bind(holder).bind(until).bind(now);
        Ok(self.pool(held).execute(q).await? == 1)
    }

    async fn release(
        &self,
        held: Held,
        sql: &str,
        (name, holder): (&str, &str),
    ) -> Result<(), StoreError> {
        let q = Sql::new(sql).bind(name).bind(holder);
        self.pool(held).execute(q).await?;
        Ok(())
    }

    /// Where a lease is written: a projector's with its checkpoint (on
    /// SQLite, the aggregates file), a named one in `leases`.
    fn pool(&self, held: Held) -> super::db::Pool<'_> {
        match held {
            Held::InCheckpoint => self.db.derived_writer(),
            Held::Named => self.db.writer(),
        }
    }
}

/// Which table holds a lease.
#[derive(Clone, Copy)]
enum Held {
    /// A projector's, in its `projection_checkpoints` row.
    InCheckpoint,
    /// A named one (jobs, the alert evaluator and relay), in `leases`.
    Named,
}
