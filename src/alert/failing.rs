//! The alert of a rule that cannot be evaluated: raised when a rule (or a
//! quota's rule) fails — its window cannot be read, or its stored spec no
//! longer validates — and resolved when it evaluates again or is deleted.
//! A broken rule would otherwise watch nothing in silence. The evaluator
//! decides; the instance goes through [`lifecycle::advance`](super::lifecycle::advance)
//! like every other alert.

/// Rule name of the alert (reserved).
pub const RULE_FAILING_RULE: &str = "tally_rule_failing";

/// Rule uid of that alert (no stored rule has it).
pub const RULE_FAILING_UID: &str = "tally-rule-failing";

/// Its severity.
pub const SEVERITY: &str = "critical";

/// The instance of the failing rule `uid` (one per rule).
pub fn fingerprint(uid: &str) -> String {
    super::fingerprint(&[RULE_FAILING_UID, "", uid])
}
