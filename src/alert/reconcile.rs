//! The reconciliation alert: raised when the reconciliation job finds a
//! projection-day whose aggregates differ from the log, resolved when a
//! later run finds it agrees. The job decides *what* it found; this module
//! carries the instance through [`lifecycle::advance`](super::lifecycle::advance)
//! like every other alert, so its notifications have the same shape and numbering.

use chrono::{NaiveDate, Utc};
use serde_json::json;

use super::lifecycle::{advance, Timing};
use super::notice::{rfc3339, Notice};
use super::{fingerprint, AlertError};
use crate::store::alerts::{InstanceRow, InstanceWrite};
use crate::store::Alerts;

/// Rule name of the alert raised on a reconciliation mismatch (reserved).
pub const RECONCILIATION_RULE: &str = "tally_reconciliation_mismatch";

/// Rule uid of that alert (no stored rule has it).
pub const RECONCILIATION_UID: &str = "tally-reconciliation";

const SEVERITY: &str = "critical";

/// What reconciliation found for one projection-day.
#[derive(Debug, Clone, Copy)]
pub struct Finding<'a> {
    /// Projection name.
    pub projection: &'a str,
    /// The day, in the projection's time zone.
    pub day: NaiveDate,
    /// `Some((rows that differ, the first difference described))`, or `None` when it agrees.
    pub mismatch: Option<(usize, &'a str)>,
}

/// Raises (once) or resolves the reconciliation alert of one projection-day;
/// returns false when another writer changed the instance concurrently (it
/// is then left as that writer wrote it).
pub async fn settle(store: &Alerts, prefix: &str, found: Finding<'_>) -> Result<bool, AlertError> {
    let group = json!({"projection": found.projection, "day": found.day.to_string()});
    let group_text = group.to_string();
    let fp = fingerprint(&[RECONCILIATION_UID, "", &group_text]);
    let existing = store
        .instances_by_fingerprint(std::slice::from_ref(&fp))
        .await?
        .into_iter()
        .next();
    let now = Utc::now();
    let mut life = existing
        .as_ref()
        .map(|r| r.life.clone())
        .unwrap_or_default();
    let change = advance(&mut life, &Timing::default(), found.mismatch.is_some(), now);
    let Some(state) = change.notify else {
        // Already firing for this day, or nothing wrong and nothing raised.
        return Ok(true);
    };
    let row = InstanceRow {
        fingerprint: fp,
        rule: RECONCILIATION_RULE.to_string(),
        rule_uid: RECONCILIATION_UID.to_string(),
        level: String::new(),
        group: group_text,
        severity: SEVERITY.to_string(),
        value: Some(found.mismatch.map_or(0.0, |(rows, _)| rows as f64)),
        threshold: Some(0.0),
        life,
        version: 0,
        updated_at: now,
    };
    let mut notice = Notice::of(&row, state);
    notice.group = group;
    notice.measure = Some("mismatched_rows".to_string());
    notice.threshold = json!(0);
    notice.window = Some("1d".to_string());
    notice.started_at = row.life.firing_since;
    let note = notice
        .with(
            "first_difference",
            json!(found.mismatch.map(|(_, first)| first)),
        )
        .with("evaluated_at", json!(rfc3339(now)))
        .into_outbox(prefix, now);
    let write = InstanceWrite {
        expected_version: existing.as_ref().map(|r| r.version),
        row,
    };
    Ok(store.commit_transitions(&[write], &[note]).await?)
}
