//! API tokens (only their SHA-256 is stored) and the authentication switch.

use chrono::{DateTime, Utc};

use super::alerts::{from_ms, ms};
use super::db::{Db, Row, Sql};
use super::StoreError;

/// A stored API token (never the secret: only its SHA-256).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    /// Public id, also the token's visible prefix.
    pub id: String,
    /// Unique among active tokens.
    pub name: String,
    /// Comma-separated scopes.
    pub scopes: String,
    /// Hex SHA-256 of the whole token.
    pub token_sha256: String,
    /// When created.
    pub created_at: DateTime<Utc>,
    /// Who created it.
    pub created_by: String,
    /// When revoked (revoked tokens are kept for the record).
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Columns of `api_tokens`.
pub(crate) const TOKEN_COLUMNS: &str =
    "id, name, scopes, token_sha256, created_at_ms, created_by, revoked_at_ms";

/// Reads one row of [`TOKEN_COLUMNS`].
pub(crate) fn token_from_row(row: &Row) -> Result<TokenRow, sqlx::Error> {
    Ok(TokenRow {
        id: row.get("id")?,
        name: row.get("name")?,
        scopes: row.get("scopes")?,
        token_sha256: row.get("token_sha256")?,
        created_at: from_ms(row.get("created_at_ms")?),
        created_by: row.get("created_by")?,
        revoked_at: row.get::<Option<i64>, _>("revoked_at_ms")?.map(from_ms),
    })
}

/// The `api_tokens` and `settings` tables.
#[derive(Debug, Clone)]
pub struct Tokens {
    db: Db,
}

impl Tokens {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }

    /// Stores a new token; false when an active token already has its name.
    pub async fn create_token(&self, t: &TokenRow) -> Result<bool, StoreError> {
        let done = self
            .db
            .writer()
            .execute(
                Sql::new(
                    "INSERT INTO api_tokens (id, name, scopes, token_sha256, created_at_ms, created_by) \
                     SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS \
                     (SELECT 1 FROM api_tokens WHERE name = $2 AND revoked_at_ms IS NULL)",
                )
                .bind(&t.id)
                .bind(&t.name)
                .bind(&t.scopes)
                .bind(&t.token_sha256)
                .bind(ms(t.created_at))
                .bind(&t.created_by),
            )
            .await;
        match done {
            Ok(n) => Ok(n == 1),
            // Two creates of one name racing: the partial unique index decides.
            Err(sqlx::Error::Database(e))
                if e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every token, active ones first.
    pub async fn list(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.db.reader().read_all(Sql::new(format!(
                "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY revoked_at_ms IS NOT NULL, name, created_at_ms"
            )), token_from_row).await
    }

    /// True while at least one token is not revoked.
    pub async fn any_active(&self) -> Result<bool, StoreError> {
        Ok(self.list().await?.iter().any(|t| t.revoked_at.is_none()))
    }

    /// Revokes the active token with this name or id; false when there is none.
    pub async fn revoke_token(
        &self,
        name_or_id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = self
            .db
            .writer()
            .execute(
                Sql::new(
                    "UPDATE api_tokens SET revoked_at_ms = $1 \
                     WHERE (name = $2 OR id = $2) AND revoked_at_ms IS NULL",
                )
                .bind(ms(at))
                .bind(name_or_id),
            )
            .await?;
        Ok(done > 0)
    }

    /// A stored setting (the authentication switch).
    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .db
            .writer()
            .fetch_optional(Sql::new("SELECT value FROM settings WHERE name = $1").bind(name))
            .await?;
        Ok(row.map(|r| r.get("value")).transpose()?)
    }

    /// Stores a setting.
    pub async fn put_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.db
            .writer()
            .execute(
                Sql::new(
                    "INSERT INTO settings (name, value, updated_at_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                )
                .bind(name)
                .bind(value)
                .bind(ms(Utc::now())),
            )
            .await?;
        Ok(())
    }
}
