//! The one notification type. Evaluation, rule removal and reconciliation all
//! describe a transition as a [`Notice`]; [`Notice::into_outbox`] is the only
//! place that turns one into an outbox row (subject, payload, state).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use super::subject;
use crate::store::alerts::{AlertState, InstanceRow, NewNotification};

/// The body of one alert notification, as published on NATS (README: "Alert
/// notifications"). The fields every notification has are typed; what only
/// one kind of alert adds goes in `extra`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Notification)]
pub struct Notice {
    /// The instance's fingerprint.
    pub alert_id: String,
    /// Rule name.
    pub rule: String,
    /// `firing` or `resolved`.
    #[serde(serialize_with = "state_name")]
    #[schema(value_type = String, pattern = "^(firing|resolved)$")]
    pub state: AlertState,
    /// Severity (also the subject's middle token).
    pub severity: String,
    /// The group's dimension values.
    #[schema(value_type = BTreeMap<String, String>)]
    pub group: Value,
    /// The rule's labels.
    #[schema(value_type = BTreeMap<String, String>)]
    pub labels: Value,
    /// The measure watched (`null` when the rule is gone).
    pub measure: Option<String>,
    /// The value that decided the transition.
    #[schema(value_type = Option<f64>)]
    pub value: Value,
    /// The threshold it was compared with.
    #[schema(value_type = Option<f64>)]
    pub threshold: Value,
    /// The window, described (`null` when the rule is gone).
    pub window: Option<String>,
    /// When the condition started holding.
    #[serde(serialize_with = "millis")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<DateTime<Utc>>,
    /// When it resolved (only on `resolved`).
    #[serde(serialize_with = "millis")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub resolved_at: Option<DateTime<Utc>>,
    /// The transition's number for this instance.
    pub sequence: i64,
    /// Fields of one kind of alert (`level`, `limit`, `reason`, `first_difference`, `evaluated_at`).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

impl Notice {
    /// A notice for `row` as it stands after the transition to `state`; the
    /// caller fills what its kind of alert knows better than the row.
    pub fn of(row: &InstanceRow, state: AlertState) -> Self {
        Self {
            alert_id: row.fingerprint.clone(),
            rule: row.rule.clone(),
            state,
            severity: row.severity.clone(),
            group: serde_json::from_str(&row.group).unwrap_or_else(|_| Value::Object(Map::new())),
            labels: Value::Object(Map::new()),
            measure: None,
            value: row.value.map_or(Value::Null, Value::from),
            threshold: row.threshold.map_or(Value::Null, Value::from),
            window: None,
            started_at: row.life.active_since.or(row.life.firing_since),
            resolved_at: row
                .life
                .resolved_at
                .filter(|_| state == AlertState::Resolved),
            sequence: row.life.sequence,
            extra: Map::new(),
        }
    }

    /// Adds a field of this kind of alert.
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.extra.insert(name.to_string(), value);
        self
    }

    /// The outbox row: published on `<prefix>.<severity>.<rule>`.
    pub fn into_outbox(self, prefix: &str, now: DateTime<Utc>) -> NewNotification {
        let payload = serde_json::to_string(&self).unwrap_or_else(|_| "{}".to_string());
        NewNotification {
            subject: subject(prefix, &self.severity, &self.rule),
            fingerprint: self.alert_id,
            sequence: self.sequence,
            rule: self.rule,
            state: self.state,
            severity: self.severity,
            payload,
            created_at: now,
        }
    }
}

/// RFC 3339 with milliseconds, the format of every time in a notification.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn state_name<S: serde::Serializer>(state: &AlertState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.as_str())
}

fn millis<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}
