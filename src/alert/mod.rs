//! Alerts: rules and quotas evaluated over the projections, each alert
//! instance carried through a lifecycle, and every transition delivered to
//! NATS exactly once.
//!
//! The data flow: [`rule`] (what to watch) → [`eval`] (after each projector
//! commit and on a tick: read the windows, run [`lifecycle`], write state and
//! notifications in one transaction: the outbox) → [`relay`] (publish the
//! outbox to JetStream with `Nats-Msg-Id = <fingerprint>:<sequence>`, then
//! mark it sent). [`quota`] turns per-key quotas into rules and answers
//! `GET /v1/keys/{key}/quota`; [`http`] serves the routes.
//!
//! Exactly once, end to end: a transition exists once because the outbox has
//! a unique `(fingerprint, sequence)` and instance writes are compare-and-set
//! on a version; it is published at least once because the relay only marks
//! a row sent after the stream's ack; and at most once because JetStream
//! drops a second publish with the same `Nats-Msg-Id` (within the stream's
//! duplicate window, which is longer than any relay retry loop).

pub mod eval;
pub mod failing;
pub mod lifecycle;
pub mod notice;
pub mod quota;
pub mod reconcile;
pub mod relay;
pub mod ring;
pub mod rule;

use crate::query::QueryError;
use crate::store::StoreError;

/// Errors of the alert module.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// A rule or quota is invalid; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A window could not be read.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A stored rule no longer parses (written by another version, or a spec was removed).
    #[error("stored rule `{name}` cannot be evaluated: {reason}")]
    Stored {
        /// The rule.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Why `name` cannot be a stored rule's name: Tally raises alerts under it.
pub fn reserved(name: &str) -> Option<&'static str> {
    match name {
        quota::QUOTA_RULE => {
            Some("is reserved for key quotas; set one with PUT /v1/keys/{key}/quota")
        }
        reconcile::RECONCILIATION_RULE => Some("is reserved for the reconciliation job"),
        failing::RULE_FAILING_RULE => {
            Some("is reserved for the alert of a rule that cannot be evaluated")
        }
        _ => None,
    }
}

/// FNV-1a (64 bits) of the parts, separated so that `("ab","c")` ≠ `("a","bc")`.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The NATS subject of a notification: `<prefix>.<severity>.<rule>`.
pub fn subject(prefix: &str, severity: &str, rule: &str) -> String {
    format!("{prefix}.{severity}.{rule}")
}

/// What `tally alerts apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Rules created.
    pub created: Vec<String>,
    /// Rules whose spec changed.
    pub updated: Vec<String>,
    /// Rules already as in the file.
    pub unchanged: Vec<String>,
    /// Rules deleted because the file no longer has them (`--prune`).
    pub deleted: Vec<String>,
}

/// Makes the stored rules match a TOML file of `[[rule]]` tables: every rule
/// is validated first (nothing is written if any is invalid), then created or
/// replaced; with `prune`, stored rules missing from the file are deleted.
/// Applying the same file twice changes nothing and adds no audit entries.
/// Nothing is written either when the rules would outnumber `max_rules`
/// (counting the stored rules the file keeps, or all of them without `prune`).
pub async fn apply_file(
    store: &crate::store::Store,
    specs: &[std::sync::Arc<crate::aggregate::spec::Spec>],
    text: &str,
    actor: &str,
    prune: bool,
    max_rules: u64,
) -> Result<ApplyReport, AlertError> {
    use crate::store::alerts::{RuleWritten, WriteMode};
    let file: rule::RuleFile =
        toml::from_str(text).map_err(|e| AlertError::Invalid(format!("rules file: {e}")))?;
    let mut names = std::collections::HashSet::new();
    for r in &file.rule {
        if !names.insert(r.name.clone()) {
            return Err(AlertError::Invalid(format!(
                "rules file: rule `{}` appears twice",
                r.name
            )));
        }
        if let Some(why) = reserved(&r.name) {
            return Err(AlertError::Invalid(format!(
                "rules file: `{}` {why}",
                r.name
            )));
        }
        r.validate("", specs)
            .map_err(|e| AlertError::Invalid(format!("rule `{}`: {e}", r.name)))?;
    }
    let stored: std::collections::HashSet<String> = store
        .alerts()
        .alert_rules()
        .await?
        .into_iter()
        .map(|r| r.name)
        .collect();
    let new = names.iter().filter(|n| !stored.contains(*n)).count() as u64;
    let kept = match prune {
        true => stored.iter().filter(|n| names.contains(*n)).count(),
        false => stored.len(),
    } as u64;
    if new > 0 && kept + new > max_rules {
        return Err(AlertError::Invalid(format!(
            "rules file: it creates {new} rules and {kept} would be kept, more than the {max_rules} this server allows (TALLY_MAX_RULES, --max-rules); nothing was written"
        )));
    }
    let mut report = ApplyReport::default();
    for r in &file.rule {
        match store
            .alerts()
            .write_rule(&r.name, &r.to_json(), actor, WriteMode::Upsert)
            .await?
        {
            RuleWritten::Created(_) => report.created.push(r.name.clone()),
            RuleWritten::Updated(_) => report.updated.push(r.name.clone()),
            RuleWritten::Unchanged(_) => report.unchanged.push(r.name.clone()),
            RuleWritten::Exists => {
                return Err(AlertError::Invalid(format!(
                    "rule `{}` was created concurrently; apply again",
                    r.name
                )))
            }
            RuleWritten::TooMany(max) => {
                return Err(AlertError::Invalid(format!(
                    "rule `{}`: {max} rules exist, the most this server allows (TALLY_MAX_RULES)",
                    r.name
                )))
            }
        }
    }
    if prune {
        for row in store.alerts().alert_rules().await? {
            if !names.contains(&row.name)
                && store
                    .alerts()
                    .delete_rule(&row.name, actor)
                    .await?
                    .is_some()
            {
                report.deleted.push(row.name);
            }
        }
    }
    Ok(report)
}
