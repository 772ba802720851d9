//! API tokens: creation, hashing, and the check every HTTP request passes
//! (the middleware that calls it is `http::auth`).
//!
//! A token is `tally_<id>_<secret>`; the store keeps only its SHA-256, so a
//! leaked database does not leak usable tokens. Authentication turns on when
//! the first token is created and stays on (the `auth` row of `settings`),
//! even when every token is revoked: revoking the last token closes the API,
//! it never opens it. Only `tally tokens disable-auth` turns it off. While it
//! is off, the API is open, which is allowed only on a loopback address or
//! with `--insecure-no-auth`, checked at start-up ([`check_bind`]) and on
//! every request.
//!
//! Tokens are matched against an in-memory copy of the table, reloaded at
//! most every [`RELOAD_EVERY`] (and on an unknown token, so a token created
//! with the CLI works at once). Revocation therefore takes effect within
//! that interval. A reload runs in the background of one request; the others
//! use the previous copy rather than queue behind it, so a database outage
//! costs each request nothing (the copy is at most [`STALE_LIMIT`] old). The presented token's hash is compared with every stored
//! hash in constant time, so response timing reveals nothing about how close
//! a guess was.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{Mutex, RwLock};

use crate::store::tokens::TokenRow;
use crate::store::{Store, StoreError};

/// How stale the in-memory token list may get (revocation delay).
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// Longest a token reload may take before it is abandoned.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Oldest token list still used while the database cannot be read; past it,
/// requests get `503 store_unavailable`.
pub const STALE_LIMIT: Duration = Duration::from_secs(60);
/// The `settings` row that says authentication is on.
pub const AUTH_SETTING: &str = "auth";

/// What a token may do. `admin` includes the other two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// `POST /v1/events`.
    Ingest,
    /// Every `GET`: stats, keys, alerts, rules, quotas, projections, `/metrics`.
    Read,
    /// Changes: alert rules and quotas (and everything else).
    Admin,
}

impl Scope {
    /// Every scope, in display order.
    pub const ALL: [Scope; 3] = [Scope::Ingest, Scope::Read, Scope::Admin];

    /// The scope's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    /// Parses one scope name.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|c| c.as_str() == s.trim())
    }
}

/// Errors of token management.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A scope name is not one of ingest, read, admin.
    #[error("unknown scope `{0}`: use ingest, read or admin (comma-separated for several)")]
    UnknownScope(String),
    /// No scope given.
    #[error("a token needs at least one scope: ingest, read or admin")]
    NoScope,
    /// Bad name.
    #[error("token name must be 1-64 characters of [A-Za-z0-9_.-]")]
    BadName,
    /// The name is taken by an active token.
    #[error("an active token named `{0}` exists: revoke it first or pick another name")]
    NameTaken(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Serving on a non-loopback address without tokens.
    #[error("refusing to serve on {0} without authentication: no API token exists. Create one with `tally tokens create --name NAME --scope admin`, bind to 127.0.0.1, or pass --insecure-no-auth")]
    OpenNonLoopback(SocketAddr),
    /// `disable-auth` while tokens are active.
    #[error("{0} active token(s) exist: revoke them first (`tally tokens revoke NAME`); authentication stays on while any token is active")]
    TokensActive(usize),
}

/// Parses `ingest,read` into scopes (sorted, deduplicated).
pub fn parse_scopes(list: &[String]) -> Result<Vec<Scope>, AuthError> {
    let mut scopes = Vec::new();
    for part in list.iter().flat_map(|s| s.split(',')) {
        if part.trim().is_empty() {
            continue;
        }
        scopes.push(Scope::parse(part).ok_or_else(|| AuthError::UnknownScope(part.to_string()))?);
    }
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err(AuthError::NoScope);
    }
    Ok(scopes)
}

/// Hex SHA-256 of a token: what the store keeps.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Creates and stores a token; returns the token (shown once) and its row.
pub async fn create_token(
    store: &Store,
    name: &str,
    scopes: &[Scope],
    created_by: &str,
) -> Result<(String, TokenRow), AuthError> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !name_ok {
        return Err(AuthError::BadName);
    }
    if scopes.is_empty() {
        return Err(AuthError::NoScope);
    }
    // On before the token exists: from here on, revoking it closes the API.
    store.tokens().put_setting(AUTH_SETTING, "on").await?;
    let id = hex::encode(rand::random::<[u8; 6]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let token = format!("tally_{id}_{secret}");
    let row = TokenRow {
        id,
        name: name.to_string(),
        scopes: scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(","),
        token_sha256: token_hash(&token),
        created_at: Utc::now(),
        created_by: created_by.to_string(),
        revoked_at: None,
    };
    if !store.tokens().create_token(&row).await? {
        return Err(AuthError::NameTaken(name.to_string()));
    }
    Ok((token, row))
}

/// Whether authentication is on (a token was ever created, and it was not
/// turned off since).
pub async fn auth_enabled(store: &Store) -> Result<bool, StoreError> {
    Ok(store.tokens().setting(AUTH_SETTING).await?.as_deref() == Some("on"))
}

/// Turns authentication off (`tally tokens disable-auth`); refused while a
/// token is active. The API is then open on loopback or with `--insecure-no-auth`.
pub async fn disable_auth(store: &Store) -> Result<(), AuthError> {
    let active = store
        .tokens()
        .list()
        .await?
        .iter()
        .filter(|t| t.revoked_at.is_none())
        .count();
    if active > 0 {
        return Err(AuthError::TokensActive(active));
    }
    store.tokens().put_setting(AUTH_SETTING, "off").await?;
    Ok(())
}

/// Refuses a non-loopback bind with no active token, unless `insecure` is set.
pub async fn check_bind(store: &Store, addr: SocketAddr, insecure: bool) -> Result<(), AuthError> {
    if addr.ip().is_loopback() || insecure {
        if insecure && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "--insecure-no-auth: the API is open to anyone who can reach this address until a token is created");
        }
        return Ok(());
    }
    let active = store.tokens().any_active().await?;
    if active || auth_enabled(store).await? {
        // With authentication on and no active token, every request is
        // refused until one is created: closed, not open.
        Ok(())
    } else {
        Err(AuthError::OpenNonLoopback(addr))
    }
}

struct Entry {
    hash: [u8; 32],
    name: String,
    scopes: Vec<Scope>,
}

struct Snapshot {
    entries: Vec<Entry>,
    /// Authentication on although `entries` may be empty.
    enabled: bool,
    loaded: Instant,
}

/// The request check: one per server, shared by every request.
pub struct Auth {
    store: Store,
    snapshot: RwLock<Option<Snapshot>>,
    reload: Mutex<()>,
    /// Serving on a non-loopback address without `--insecure-no-auth`: an
    /// open API is refused on every request, not only at start-up.
    public: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No bearer token, and tokens exist.
    Missing,
    /// The token is unknown or revoked.
    Unknown,
    /// Authentication is on but every token is revoked.
    NoActiveToken,
    /// No token exists and the server listens on a public address.
    OpenPublic,
    /// The token lacks the scope.
    Scope {
        /// The token's name.
        name: String,
        /// The scope the request needs.
        need: Scope,
    },
    /// The token list cannot be read.
    Unavailable(String),
}

impl Auth {
    /// A check over the tokens in `store`, for a server bound to `addr`.
    pub fn new(store: Store, addr: SocketAddr, insecure_no_auth: bool) -> Self {
        Self {
            store,
            snapshot: RwLock::new(None),
            reload: Mutex::new(()),
            public: !addr.ip().is_loopback() && !insecure_no_auth,
        }
    }

    /// Reloads when the snapshot is older than `max_age`. One reload runs at a
    /// time; a request that finds one running uses the current copy instead of
    /// waiting (when there is one not older than [`STALE_LIMIT`]), unless
    /// `wait` (an unknown token, perhaps created a moment ago).
    async fn refresh(&self, max_age: Duration, wait: bool) -> Result<(), StoreError> {
        let fresh = |s: &Option<Snapshot>, age: Duration| {
            s.as_ref().is_some_and(|s| s.loaded.elapsed() < age)
        };
        if fresh(&*self.snapshot.read().await, max_age) {
            return Ok(());
        }
        let _one = match self.reload.try_lock() {
            Ok(guard) => guard,
            Err(_) if !wait && fresh(&*self.snapshot.read().await, STALE_LIMIT) => return Ok(()),
            Err(_) => self.reload.lock().await,
        };
        if fresh(&*self.snapshot.read().await, max_age) {
            return Ok(());
        }
        let load = async {
            let rows = self.store.tokens().list().await?;
            let enabled = auth_enabled(&self.store).await?;
            Ok::<_, StoreError>((rows, enabled))
        };
        let (rows, enabled) = match tokio::time::timeout(RELOAD_TIMEOUT, load).await {
            Ok(r) => r?,
            Err(_) => return Err(StoreError::Timeout(RELOAD_TIMEOUT)),
        };
        let entries = rows
            .into_iter()
            .filter(|t| t.revoked_at.is_none())
            .filter_map(|t| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&t.token_sha256, &mut hash).ok()?;
                let scopes = t.scopes.split(',').filter_map(Scope::parse).collect();
                Some(Entry {
                    hash,
                    name: t.name,
                    scopes,
                })
            })
            .collect();
        *self.snapshot.write().await = Some(Snapshot {
            entries,
            enabled,
            loaded: Instant::now(),
        });
        Ok(())
    }

    /// `Ok(None)`: authentication is off (no active token). `Ok(Some(name))`:
    /// the token named `name` holds `need`.
    pub async fn check(
        &self,
        bearer: Option<&str>,
        need: Scope,
    ) -> Result<Option<String>, Refusal> {
        if let Err(e) = self.refresh(RELOAD_EVERY, false).await {
            // A stale list is better than refusing every request while the
            // database blips; with none at all (or a too old one) there is
            // nothing to check against.
            let usable = self
                .snapshot
                .read()
                .await
                .as_ref()
                .is_some_and(|s| s.loaded.elapsed() < STALE_LIMIT);
            if !usable {
                return Err(Refusal::Unavailable(e.to_string()));
            }
        }
        let hash: [u8; 32] = match bearer {
            Some(b) => Sha256::digest(b.as_bytes()).into(),
            None => [0; 32],
        };
        for attempt in 0..2 {
            {
                let guard = self.snapshot.read().await;
                let Some(snap) = guard.as_ref() else {
                    return Err(Refusal::Unavailable("token list not loaded".into()));
                };
                if snap.entries.is_empty() && !snap.enabled {
                    return if self.public {
                        Err(Refusal::OpenPublic)
                    } else {
                        Ok(None)
                    };
                }
                if bearer.is_none() {
                    return Err(if snap.entries.is_empty() {
                        Refusal::NoActiveToken
                    } else {
                        Refusal::Missing
                    });
                }
                // Every entry is compared, whatever matched, in constant time.
                let mut found: Option<&Entry> = None;
                for e in &snap.entries {
                    if bool::from(e.hash.ct_eq(&hash)) {
                        found = Some(e);
                    }
                }
                if let Some(e) = found {
                    let ok = e.scopes.contains(&need) || e.scopes.contains(&Scope::Admin);
                    return if ok {
                        Ok(Some(e.name.clone()))
                    } else {
                        Err(Refusal::Scope {
                            name: e.name.clone(),
                            need,
                        })
                    };
                }
            }
            // Unknown: perhaps created a moment ago. Reload once, soon.
            if attempt == 0
                && self
                    .refresh(Duration::from_millis(100), true)
                    .await
                    .is_err()
            {
                break;
            }
        }
        let none_active = self
            .snapshot
            .read()
            .await
            .as_ref()
            .is_some_and(|s| s.entries.is_empty());
        if none_active {
            return Err(Refusal::NoActiveToken);
        }
        Err(Refusal::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_refuse_unknown_names() {
        let s = parse_scopes(&["read,ingest".into(), "read".into()]).expect("valid");
        assert_eq!(s, vec![Scope::Ingest, Scope::Read]);
        assert!(matches!(
            parse_scopes(&["write".into()]),
            Err(AuthError::UnknownScope(_))
        ));
        assert!(matches!(parse_scopes(&[]), Err(AuthError::NoScope)));
    }

    #[test]
    fn the_hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
