//! Rolling-window quotas per API key: `PUT /v1/keys/{key}/quota` stores one,
//! `GET` answers how much of it is used, and the evaluator runs each quota as
//! the rule `quota_exceeded` (scope and group: that key).
//!
//! Precision: one minute. The window is the last `window / 1m` minute buckets
//! of the minute projection, the current minute included, so usage counts
//! from the start of the minute `window` ago and a minute's usage leaves the
//! window all at once, `window` after the minute began.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::rule::{window_range, Measure, Op, Rule, RuleSpec, ScopeValue, Severity};
use super::AlertError;
use crate::aggregate::spec::{Dimension, Granularity, Spec};
use crate::aggregate::Measures;
use crate::query::output::rfc3339_opt;
use crate::query::Catalog;
use crate::store::{AggQuery, Store};

/// The rule name every quota alerts under.
pub const QUOTA_RULE: &str = "quota_exceeded";

/// A quota as sent in `PUT /v1/keys/{key}/quota`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Quota)]
pub struct QuotaSpec {
    /// A summed measure: requests, errors, rate_limited, timeouts, server_errors, cost, tokens, tokens_in, tokens_out.
    #[schema(schema_with = sum_measure)]
    pub measure: Measure,
    /// Most usage allowed within the window (cost in currency units).
    #[schema(value_type = f64, minimum = 0)]
    pub limit: serde_json::Number,
    /// Rolling window length (`5h`): whole minutes, at most the minute projection's retention
    /// (8 days as shipped; the document lists windows up to 7 days).
    #[schema(pattern = r"^([1-9][0-9]{0,3}m|[1-9][0-9]?h|[1-7]d)$")]
    pub window: String,
}

/// The measures a quota may limit (the summed ones), for the API document.
fn sum_measure() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(
            Measure::ALL
                .into_iter()
                .filter(|m| m.is_sum())
                .map(Measure::as_str),
        ))
        .build()
}

/// A validated quota.
#[derive(Debug, Clone)]
pub struct Quota {
    /// The key it limits.
    pub key: String,
    /// As stored.
    pub spec: QuotaSpec,
    /// `limit` as a number.
    pub limit: f64,
    /// Window length.
    pub window: Duration,
    /// The minute projection it is read from.
    pub minute: Arc<Spec>,
}

fn invalid(m: impl Into<String>) -> AlertError {
    AlertError::Invalid(m.into())
}

/// The minute projection that has `key`, preferring the fewest dimensions.
fn minute_spec(specs: &[Arc<Spec>]) -> Option<Arc<Spec>> {
    specs
        .iter()
        .filter(|s| {
            s.granularities.contains(&Granularity::Minute) && s.dimensions.contains(&Dimension::Key)
        })
        .min_by_key(|s| (s.dimensions.len(), s.name.clone()))
        .cloned()
}

impl QuotaSpec {
    /// Parses a JSON body.
    pub fn from_json(body: &[u8]) -> Result<Self, AlertError> {
        serde_json::from_slice(body).map_err(|e| {
            invalid(format!(
                "the quota must be a JSON object {{\"measure\", \"limit\", \"window\"}}: {e}"
            ))
        })
    }

    /// Validates for `key` against the loaded projections.
    pub fn validate(&self, key: &str, specs: &[Arc<Spec>]) -> Result<Quota, AlertError> {
        let max = crate::event::validate::MAX_KEY_CHARS;
        if key.is_empty() || key.chars().count() > max {
            return Err(invalid(format!(
                "the key must be 1 to {max} characters, as events' `key`"
            )));
        }
        if !self.measure.is_sum() {
            return Err(invalid(format!(
                "measure `{}` cannot be a quota: use a summed measure (requests, errors, rate_limited, timeouts, server_errors, cost, tokens, tokens_in, tokens_out)",
                self.measure.as_str()
            )));
        }
        let limit = self
            .limit
            .as_f64()
            .filter(|l| l.is_finite() && *l >= 0.0)
            .ok_or_else(|| invalid("`limit` must be a number of at least 0"))?;
        let minute = minute_spec(specs).ok_or_else(|| {
            invalid("quotas are read from a projection with minute buckets and the `key` dimension (alerts_minute); none is loaded")
        })?;
        let window = crate::duration::parse(&self.window).map_err(|e| {
            invalid(format!(
                "`window` {:?} is not a duration ({e}); write e.g. \"5h\"",
                self.window
            ))
        })?;
        if window < Duration::from_secs(60)
            || window.as_secs() % 60 != 0
            || window.subsec_nanos() != 0
        {
            return Err(invalid(format!(
                "`window` {:?} must be a whole number of minutes (the quota's precision), at least 1m",
                self.window
            )));
        }
        if let Some(kept) = minute.retention.get(&Granularity::Minute) {
            if window > *kept {
                return Err(invalid(format!(
                    "`window` {:?} is longer than the minute projection `{}` keeps data ({})",
                    self.window,
                    minute.name,
                    humantime::format_duration(*kept)
                )));
            }
        }
        Ok(Quota {
            key: key.to_string(),
            spec: self.clone(),
            limit,
            window,
            minute,
        })
    }
}

impl Quota {
    /// The rule the evaluator runs for this quota: `quota_exceeded`, critical,
    /// firing while used > limit.
    pub fn rule(&self, uid: &str, specs: &[Arc<Spec>]) -> Result<Rule, AlertError> {
        let spec = RuleSpec {
            name: QUOTA_RULE.to_string(),
            severity: Some(Severity::Critical),
            labels: [("quota".to_string(), "true".to_string())].into(),
            measure: self.spec.measure,
            window: humantime::format_duration(self.window).to_string(),
            timezone: None,
            scope: [("key".to_string(), ScopeValue::One(self.key.clone()))].into(),
            group_by: vec!["key".to_string()],
            op: Some(Op::Gt),
            threshold: Some(self.limit),
            baseline: None,
            limit: None,
            warn_at: None,
            min_requests: None,
            for_: None,
            keep_firing_for: None,
            repeat_every: None,
        };
        spec.validate(uid, specs)
    }
}

/// `GET /v1/keys/{key}/quota`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct QuotaStatus {
    /// The key.
    pub key: String,
    /// What is limited.
    #[schema(value_type = String)]
    pub measure: &'static str,
    /// The limit, as set.
    #[schema(value_type = f64)]
    pub limit: serde_json::Number,
    /// The window, as set.
    pub window: String,
    /// Usage in the window (cost exact to 9 decimals).
    #[schema(value_type = f64)]
    pub used: serde_json::Value,
    /// `max(0, limit - used)`.
    #[schema(value_type = f64)]
    pub remaining: serde_json::Value,
    /// `used > limit`.
    pub exceeded: bool,
    /// When the oldest minute with usage leaves the window (usage next drops); null with no usage.
    #[serde(serialize_with = "rfc3339_opt")]
    pub resets_at: Option<DateTime<Utc>>,
    /// Start of the oldest minute counted.
    #[serde(serialize_with = "rfc3339_opt")]
    pub window_start: Option<DateTime<Utc>>,
    /// Every event committed before this is counted.
    #[serde(serialize_with = "rfc3339_opt")]
    pub as_of: Option<DateTime<Utc>>,
    /// Always `1m`.
    #[schema(value_type = String)]
    pub precision: &'static str,
}

/// Exact JSON for a measure value: integers as integers, cost to 9 decimals.
pub fn amount(measure: Measure, m: &Measures, value: f64) -> serde_json::Value {
    if measure == Measure::Cost {
        let n = m.cost_nanos;
        let text = format!(
            "{}{}.{:09}",
            if n < 0 { "-" } else { "" },
            n.unsigned_abs() / 1_000_000_000,
            n.unsigned_abs() % 1_000_000_000
        );
        // Exact, without trailing zeros: 3.750000000 → 3.75, 2.000000000 → 2.
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return text
            .parse::<serde_json::Number>()
            .map(serde_json::Value::Number)
            .unwrap_or_else(|_| serde_json::json!(value));
    }
    number(value)
}

/// A float as JSON, written as an integer when it is one.
pub fn number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        serde_json::json!(v as i64)
    } else {
        serde_json::json!(v)
    }
}

/// Usage of `quota` at `now`. `used` is read exactly as the evaluator reads
/// the quota's rule (same window, same reader: [`crate::query::window`]), so
/// the route and the alert cannot disagree; the minute buckets are read only
/// to say when the oldest usage leaves the window.
pub async fn status(
    store: &Store,
    catalog: &Catalog,
    quota: &Quota,
    now: DateTime<Utc>,
) -> Result<QuotaStatus, AlertError> {
    let rule = quota.rule("", &catalog.specs)?;
    let ((start, end), _) = window_range(&rule, now);
    let window = end - start;
    let filters = [(Dimension::Key, vec![quota.key.clone()])];
    let buckets = AggQuery {
        spec: &quota.minute,
        granularity: Granularity::Minute,
        from: start,
        to: end,
        filters: &filters,
        group_by: &[],
        rows: false,
        by_bucket: true,
        max_rows: crate::query::MAX_ROWS,
        top: None,
    };
    // `as_of` before the rows (see `query::Catalog::checkpoints`): the
    // lowest of the minute table's and the window's tables' tiers.
    let minute_as_of = catalog.checkpoints(store).await.ok().and_then(|s| {
        crate::store::ProjectionState::as_of_for(&s, &quota.minute, Granularity::Minute)
    });
    let (read, buckets) = tokio::join!(
        crate::query::window::read_range_as_of(
            store,
            catalog,
            rule.tz,
            &rule.scope,
            &rule.group_by,
            (start, end),
            now,
            false,
        ),
        store.projections().query_agg(&buckets),
    );
    let (read, _, window_as_of) = read?;
    let as_of = match (minute_as_of, window_as_of) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => None,
    };
    let mut total = Measures::default();
    for (_, m) in &read {
        total.merge(m);
    }
    let buckets = buckets.map_err(crate::query::QueryError::from)?;
    let oldest = buckets
        .rows
        .iter()
        .filter(|row| quota.spec.measure.value(&row.measures).unwrap_or(0.0) > 0.0)
        .map(|row| row.bucket)
        .min();
    let used = quota.spec.measure.value(&total).unwrap_or(0.0);
    let remaining = (quota.limit - used).max(0.0);
    let remaining = if quota.spec.measure == Measure::Cost {
        let nanos = (quota.limit * 1e9).round() as i64 - total.cost_nanos;
        let m = Measures {
            cost_nanos: nanos.max(0),
            ..Measures::default()
        };
        amount(Measure::Cost, &m, remaining)
    } else {
        number(remaining)
    };
    Ok(QuotaStatus {
        key: quota.key.clone(),
        measure: quota.spec.measure.as_str(),
        limit: quota.spec.limit.clone(),
        window: quota.spec.window.clone(),
        used: amount(quota.spec.measure, &total, used),
        remaining,
        exceeded: used > quota.limit,
        resets_at: oldest.map(|b| b + window),
        window_start: Some(start),
        as_of,
        precision: "1m",
    })
}

/// The stored quota of `key`, validated (`None`: no quota).
pub async fn load(
    store: &Store,
    catalog: &Catalog,
    key: &str,
) -> Result<Option<Quota>, AlertError> {
    let rows = store.alerts().quotas().await?;
    let Some(row) = rows.into_iter().find(|q| q.key == key) else {
        return Ok(None);
    };
    let spec = QuotaSpec::from_json(row.spec.as_bytes()).map_err(|e| AlertError::Stored {
        name: format!("quota:{key}"),
        reason: e.to_string(),
    })?;
    spec.validate(key, &catalog.specs)
        .map(Some)
        .map_err(|e| AlertError::Stored {
            name: format!("quota:{key}"),
            reason: e.to_string(),
        })
}
