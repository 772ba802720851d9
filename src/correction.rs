//! Corrections: voiding events without touching the log. A request is
//! validated here (every problem names the field to fix), recorded by the
//! store with the events it voids and the restatements it needs, and the
//! restater ([`crate::projection::restate`]) is woken to redo the affected
//! buckets. Idempotent by the correction's id: the same request again gets
//! the same answer; another request under the same id is a conflict.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::store::corrections::{
    CorrectionRow, NewCorrection, Recorded, Reverted, VoidTarget, MAX_VOID_IDS,
};
use crate::store::{Store, StoreError};

/// Longest correction id, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest `reason`, in characters.
pub const MAX_REASON_CHARS: usize = 1_000;
/// Longest event id (as the event contract).
const MAX_EVENT_ID_CHARS: usize = 128;
/// Most corrections listed at once.
pub const MAX_LIST: i64 = 1_000;

/// Errors of a correction.
#[derive(Debug, thiserror::Error)]
pub enum CorrectionError {
    /// The request is malformed; the message names what to fix.
    #[error("{0}")]
    Invalid(String),
    /// The id was used for another request.
    #[error("correction `{0}` was recorded with another request; use a new id (or send the same request to get its answer)")]
    Conflict(String),
    /// No such correction.
    #[error("no correction `{0}`")]
    NotFound(String),
    /// The correction was reverted already.
    #[error("correction `{0}` was reverted already")]
    AlreadyReverted(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One value or a list (`"api": "openai"` or `"api": ["openai", "anthropic"]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Any of these.
    Many(Vec<String>),
}

impl OneOrMany {
    fn values(&self) -> Vec<String> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// What to void: `ids`, or one `key`'s events in `[from, to)` (optionally
/// narrowed by `api` and `model`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Void {
    /// Event ids (at most 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    /// The key whose events in `[from, to)` are voided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Start of event time, RFC 3339 (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// End of event time, RFC 3339 (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Only these apis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<OneOrMany>,
    /// Only these models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<OneOrMany>,
}

/// `POST /v1/corrections`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrectionRequest {
    /// Your id for this correction (idempotency key), at most 128 characters.
    pub id: String,
    /// Why (required), at most 1,000 characters.
    #[serde(default)]
    pub reason: Option<String>,
    /// What to void.
    #[serde(default)]
    pub void: Option<Void>,
}

/// `POST /v1/corrections/{id}/revert`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// Why (required).
    #[serde(default)]
    pub reason: Option<String>,
}

/// A correction as answered.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct CorrectionAnswer {
    /// Its id.
    pub id: String,
    /// Events it voided.
    pub voided: i64,
    /// Events it matched that another correction had voided already.
    pub already_voided: i64,
    /// Ids it listed that no stored event has.
    pub not_found: Vec<String>,
    /// Why.
    pub reason: String,
    /// What it voids, as recorded (ids sorted, times in UTC).
    pub void: Void,
    /// Who made it.
    pub actor: String,
    /// When.
    pub created_at: String,
    /// When it was reverted (`null`: in force).
    pub reverted_at: Option<String>,
    /// Who reverted it.
    pub reverted_by: Option<String>,
    /// Why it was reverted.
    pub revert_reason: Option<String>,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn answer(row: CorrectionRow) -> CorrectionAnswer {
    let void = serde_json::from_str::<serde_json::Value>(&row.request)
        .ok()
        .and_then(|v| serde_json::from_value::<Void>(v["void"].clone()).ok())
        .unwrap_or(Void {
            ids: None,
            key: None,
            from: None,
            to: None,
            api: None,
            model: None,
        });
    CorrectionAnswer {
        id: row.id,
        voided: row.voided,
        already_voided: row.already_voided,
        not_found: row.not_found,
        reason: row.reason,
        void,
        actor: row.actor,
        created_at: time(row.created_at),
        reverted_at: row.reverted_at.map(time),
        reverted_by: row.reverted_by,
        revert_reason: row.revert_reason,
    }
}

fn invalid(msg: impl Into<String>) -> CorrectionError {
    CorrectionError::Invalid(msg.into())
}

fn text(field: &str, v: &str, max: usize) -> Result<(), CorrectionError> {
    if v.trim().is_empty() {
        return Err(invalid(format!("`{field}` must not be empty")));
    }
    if v.chars().count() > max {
        return Err(invalid(format!(
            "`{field}` is longer than {max} characters"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(format!("`{field}` contains a control character")));
    }
    Ok(())
}

fn instant(field: &str, v: Option<&str>) -> Result<DateTime<Utc>, CorrectionError> {
    let v = v.ok_or_else(|| {
        invalid(format!(
            "`void.{field}` is required with `void.key` (RFC 3339, e.g. 2026-11-01T00:00:00Z)"
        ))
    })?;
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            invalid(format!(
                "`void.{field}` `{v}` is not an RFC 3339 time ({e})"
            ))
        })
}

fn list(field: &str, v: &Option<OneOrMany>) -> Result<Vec<String>, CorrectionError> {
    let values = v.as_ref().map(OneOrMany::values).unwrap_or_default();
    if v.is_some() && values.is_empty() {
        return Err(invalid(format!(
            "`void.{field}` is an empty list; leave it out to match any"
        )));
    }
    for x in &values {
        text(&format!("void.{field}"), x, 256)?;
    }
    let set: BTreeSet<String> = values.into_iter().collect();
    Ok(set.into_iter().collect())
}

/// A validated correction, in canonical form.
#[derive(Debug, Clone, PartialEq)]
struct Valid {
    id: String,
    reason: String,
    target: VoidTarget,
}

impl Valid {
    /// The canonical request: what idempotency compares.
    fn canonical(&self) -> String {
        let void = match &self.target {
            VoidTarget::Ids(ids) => serde_json::json!({ "ids": ids }),
            VoidTarget::Range {
                key,
                from,
                to,
                apis,
                models,
            } => {
                let mut v = serde_json::json!({ "key": key, "from": time(*from), "to": time(*to) });
                if !apis.is_empty() {
                    v["api"] = serde_json::json!(apis);
                }
                if !models.is_empty() {
                    v["model"] = serde_json::json!(models);
                }
                v
            }
        };
        serde_json::json!({ "id": self.id, "reason": self.reason, "void": void }).to_string()
    }
}

/// Records corrections and reverts, and wakes the restater.
#[derive(Debug, Clone)]
pub struct Corrector {
    store: Store,
    projections: Vec<String>,
    horizon: Duration,
    wake: Arc<tokio::sync::Notify>,
}

impl Corrector {
    /// Corrections over `projections` (the loaded ones); a range may reach
    /// back at most `horizon` (the late-arrival horizon).
    pub fn new(
        store: Store,
        projections: Vec<String>,
        horizon: Duration,
        wake: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            store,
            projections,
            horizon,
            wake,
        }
    }

    /// Checks a request; every problem names the field.
    fn validate(
        &self,
        req: &CorrectionRequest,
        now: DateTime<Utc>,
    ) -> Result<Valid, CorrectionError> {
        text("id", &req.id, MAX_ID_CHARS)?;
        let reason = req.reason.as_deref().ok_or_else(|| {
            invalid("`reason` is required: say why these events should not count")
        })?;
        text("reason", reason, MAX_REASON_CHARS)?;
        let void = req.void.as_ref().ok_or_else(|| {
            invalid("`void` is required: `{\"ids\": [...]}` or `{\"key\": ..., \"from\": ..., \"to\": ...}`")
        })?;
        let range_fields = void.key.is_some() || void.from.is_some() || void.to.is_some();
        let target = match (&void.ids, range_fields) {
            (Some(_), true) => {
                return Err(invalid(
                    "`void` takes either `ids` or `key` with `from` and `to`, not both",
                ))
            }
            (None, false) => {
                return Err(invalid(
                    "`void` is empty: give `ids` or `key` with `from` and `to`",
                ))
            }
            (Some(ids), false) => {
                if void.api.is_some() || void.model.is_some() {
                    return Err(invalid("`void.api` and `void.model` narrow a range (`key`, `from`, `to`), not a list of ids"));
                }
                if ids.is_empty() {
                    return Err(invalid("`void.ids` is empty"));
                }
                if ids.len() > MAX_VOID_IDS {
                    return Err(invalid(format!(
                        "`void.ids` lists {} ids, more than {MAX_VOID_IDS}; split the correction",
                        ids.len()
                    )));
                }
                for id in ids {
                    text("void.ids[]", id, MAX_EVENT_ID_CHARS)?;
                }
                let set: BTreeSet<String> = ids.iter().cloned().collect();
                VoidTarget::Ids(set.into_iter().collect())
            }
            (None, true) => {
                let key = void
                    .key
                    .as_deref()
                    .ok_or_else(|| invalid("`void.key` is required with `from` and `to`"))?;
                text("void.key", key, crate::event::validate::MAX_KEY_CHARS)?;
                let from = instant("from", void.from.as_deref())?;
                let to = instant("to", void.to.as_deref())?;
                if from >= to {
                    return Err(invalid("`void.from` must be before `void.to`"));
                }
                let oldest =
                    now - chrono::Duration::from_std(self.horizon).unwrap_or(chrono::Duration::MAX);
                if from < oldest {
                    return Err(invalid(format!(
                        "`void.from` {} is older than the late-arrival horizon ({}); a correction reaches back at most that far",
                        time(from),
                        humantime::format_duration(self.horizon)
                    )));
                }
                VoidTarget::Range {
                    key: key.to_string(),
                    from,
                    to,
                    apis: list("api", &void.api)?,
                    models: list("model", &void.model)?,
                }
            }
        };
        Ok(Valid {
            id: req.id.clone(),
            reason: reason.to_string(),
            target,
        })
    }

    /// Records `req` by `actor`: `(answer, true)` when new, `(answer, false)`
    /// when the same request was recorded before.
    pub async fn submit(
        &self,
        req: &CorrectionRequest,
        actor: &str,
    ) -> Result<(CorrectionAnswer, bool), CorrectionError> {
        let valid = self.validate(req, Utc::now())?;
        let request = valid.canonical();
        let recorded = self
            .store
            .corrections()
            .record(&NewCorrection {
                id: &valid.id,
                reason: &valid.reason,
                request: &request,
                actor,
                target: &valid.target,
                projections: &self.projections,
            })
            .await?;
        match recorded {
            Recorded::New(row) => {
                self.wake.notify_one();
                Ok((answer(row), true))
            }
            Recorded::Same(row) => Ok((answer(row), false)),
            Recorded::Conflict(row) => Err(CorrectionError::Conflict(row.id)),
        }
    }

    /// Reverts correction `id`.
    pub async fn revert(
        &self,
        id: &str,
        req: &RevertRequest,
        actor: &str,
    ) -> Result<CorrectionAnswer, CorrectionError> {
        let reason = req
            .reason
            .as_deref()
            .ok_or_else(|| invalid("`reason` is required: say why the correction is undone"))?;
        text("reason", reason, MAX_REASON_CHARS)?;
        match self
            .store
            .corrections()
            .revert(id, actor, reason, &self.projections)
            .await?
        {
            Reverted::Done(row) => {
                self.wake.notify_one();
                Ok(answer(row))
            }
            Reverted::Already(row) => Err(CorrectionError::AlreadyReverted(row.id)),
            Reverted::NotFound => Err(CorrectionError::NotFound(id.to_string())),
        }
    }

    /// One correction and the ids it voided (at most `limit`).
    pub async fn get(
        &self,
        id: &str,
        limit: i64,
    ) -> Result<(CorrectionAnswer, Vec<String>), CorrectionError> {
        let row = self
            .store
            .corrections()
            .get(id)
            .await?
            .ok_or_else(|| CorrectionError::NotFound(id.to_string()))?;
        let ids = self.store.corrections().events_of(id, limit).await?;
        Ok((answer(row), ids))
    }

    /// The newest corrections.
    pub async fn list(&self, limit: i64) -> Result<Vec<CorrectionAnswer>, CorrectionError> {
        let rows = self
            .store
            .corrections()
            .list(limit.clamp(1, MAX_LIST))
            .await?;
        Ok(rows.into_iter().map(answer).collect())
    }
}
