//! Alert rules: the wire form ([`RuleSpec`], JSON over HTTP and TOML in
//! `tally alerts apply`) and the validated form ([`Rule`]) the evaluator runs.
//!
//! A rule never carries SQL: its scope and grouping name dimensions from a
//! closed list, and validation checks that a loaded projection can answer it
//! at a granularity no coarser than its window.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::AlertError;
use crate::aggregate::bucket::{bucket_start, day_start, month_start, next_bucket};
use crate::aggregate::spec::{Dimension, Granularity, Spec};
use crate::aggregate::Measures;
use crate::query::window::Range;

/// What a rule name may look like (it becomes a NATS subject token).
pub const NAME_PATTERN: &str = "^[a-z0-9_-]{1,64}$";

/// Longest rolling window.
pub const MAX_WINDOW: Duration = Duration::from_secs(31 * 86_400);

/// How urgent an alert is; part of its NATS subject.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For information.
    Info,
    /// Someone should look.
    Warning,
    /// Act now.
    Critical,
}

impl Severity {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// What a rule measures over its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Events.
    Requests,
    /// Failed events.
    Errors,
    /// errors / requests (0 with no requests).
    ErrorRate,
    /// Errors of type `rate_limit`.
    RateLimited,
    /// Errors of type `timeout`.
    Timeouts,
    /// Errors of type `server_error`.
    ServerErrors,
    /// Cost in currency units (exact to 9 decimals).
    Cost,
    /// tokens_in + tokens_out.
    Tokens,
    /// Input tokens.
    TokensIn,
    /// Output tokens.
    TokensOut,
    /// 95th percentile latency (ms, from the sketch: within 1%).
    LatencyP95,
    /// 99th percentile latency (ms).
    LatencyP99,
}

impl Measure {
    /// Every measure, in documentation order.
    pub const ALL: [Measure; 12] = [
        Measure::Requests,
        Measure::Errors,
        Measure::ErrorRate,
        Measure::RateLimited,
        Measure::Timeouts,
        Measure::ServerErrors,
        Measure::Cost,
        Measure::Tokens,
        Measure::TokensIn,
        Measure::TokensOut,
        Measure::LatencyP95,
        Measure::LatencyP99,
    ];

    /// Every measure's name, comma-separated, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Measure::as_str).join(", ")
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Requests => "requests",
            Measure::Errors => "errors",
            Measure::ErrorRate => "error_rate",
            Measure::RateLimited => "rate_limited",
            Measure::Timeouts => "timeouts",
            Measure::ServerErrors => "server_errors",
            Measure::Cost => "cost",
            Measure::Tokens => "tokens",
            Measure::TokensIn => "tokens_in",
            Measure::TokensOut => "tokens_out",
            Measure::LatencyP95 => "latency_p95",
            Measure::LatencyP99 => "latency_p99",
        }
    }

    /// True for the measures read from latency sketches (the rows must carry them).
    pub fn needs_sketch(self) -> bool {
        matches!(self, Measure::LatencyP95 | Measure::LatencyP99)
    }

    /// True for sums (usable as a quota, exact integers except cost).
    pub fn is_sum(self) -> bool {
        !matches!(
            self,
            Measure::ErrorRate | Measure::LatencyP95 | Measure::LatencyP99
        )
    }

    /// The value over `m`; `None` when undefined (a percentile with no latencies).
    pub fn value(self, m: &Measures) -> Option<f64> {
        // Index of each type in `errors_by_type` follows ErrorType::ALL.
        let by_type = |i: usize| m.errors_by_type[i] as f64;
        Some(match self {
            Measure::Requests => m.requests as f64,
            Measure::Errors => m.errors as f64,
            Measure::ErrorRate if m.requests == 0 => 0.0,
            Measure::ErrorRate => m.errors as f64 / m.requests as f64,
            Measure::RateLimited => by_type(0),
            Measure::Timeouts => by_type(1),
            Measure::ServerErrors => by_type(2),
            Measure::Cost => m.cost_nanos as f64 / 1e9,
            Measure::Tokens => (m.tokens_in + m.tokens_out) as f64,
            Measure::TokensIn => m.tokens_in as f64,
            Measure::TokensOut => m.tokens_out as f64,
            Measure::LatencyP95 => return m.latency_quantile(0.95),
            Measure::LatencyP99 => return m.latency_quantile(0.99),
        })
    }
}

/// Comparison of a measure with a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Op {
    /// Above.
    #[serde(rename = ">")]
    Gt,
    /// At or above.
    #[serde(rename = ">=")]
    Ge,
    /// Below.
    #[serde(rename = "<")]
    Lt,
    /// At or below.
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    /// True when `value op threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
        }
    }
}

/// Most values one scope dimension may list: a read binds each of them (SQLite
/// allows 32,766 bound values per statement, and shared reads combine rules).
pub const MAX_SCOPE_VALUES: usize = 1_000;

/// A scope filter: one value or any of several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ScopeValue {
    /// `api = "openai"`.
    One(String),
    /// `api = ["openai", "anthropic"]`.
    Any(Vec<String>),
}

/// A rule as written by its author (HTTP JSON body, or one `[[rule]]` of a
/// TOML file). Stored as canonical JSON; [`RuleSpec::validate`] turns it into
/// a [`Rule`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Rule)]
pub struct RuleSpec {
    /// `[a-z0-9_-]`, 1 to 64 characters; part of the NATS subject.
    #[schema(pattern = r"^[a-z0-9_-]{1,64}$")]
    pub name: String,
    /// Defaults to `warning` (for `limit` rules: the severity at 100% and above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// Free labels copied into every notification (at most 32; names up to 100 and values up to 1000 bytes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// What is measured.
    pub measure: Measure,
    /// `5m`, `1h`, `7d` (rolling: whole buckets of the finest loaded granularity, at most 31d), `calendar_day` or `calendar_month`.
    #[schema(pattern = r"^(calendar_day|calendar_month|[1-9][0-9]{0,4}[mhd])$")]
    pub window: String,
    /// Timezone of calendar windows (IANA name), default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}$")]
    pub timezone: Option<String>,
    /// Filters on dimensions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scope: BTreeMap<String, ScopeValue>,
    /// One alert instance per distinct value of these dimensions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    /// Comparison with `threshold` (default `>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<Op>,
    /// The value compared with (with `baseline`: a factor of the baseline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// `previous_window`: compare with `threshold` × the value one window earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^previous_window$")]
    pub baseline: Option<String>,
    /// A limit, alerted on at the `warn_at` fractions of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    /// Fractions of `limit` (`[0.8, 1.0]`): one alert level each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_items = 1, max_items = 10)]
    pub warn_at: Option<Vec<f64>>,
    /// The condition holds only with at least this many requests in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// How long the condition must hold before the alert fires (default 0).
    #[serde(
        default,
        rename = "for",
        skip_serializing_if = "Option::is_none",
        alias = "for_"
    )]
    #[schema(pattern = r"^[0-9]{1,4}(s|m|h|d)$")]
    pub for_: Option<String>,
    /// How long a firing alert stays firing after the condition stops holding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]{1,4}(s|m|h|d)$")]
    pub keep_firing_for: Option<String>,
    /// Re-notify a firing alert this often (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[1-9][0-9]{0,3}(m|h|d)$")]
    pub repeat_every: Option<String>,
}

/// What a rule sums or measures over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `length` of `granularity` buckets, the current one included.
    Rolling {
        /// Window length (a whole number of buckets).
        length: Duration,
        /// The bucket size it is read at: its precision.
        granularity: Granularity,
    },
    /// Today so far, in the rule's timezone.
    CalendarDay,
    /// This month so far, in the rule's timezone.
    CalendarMonth,
}

impl Window {
    /// The wire form (`5h`, `calendar_day`).
    pub fn describe(&self) -> String {
        match self {
            Window::Rolling { length, .. } => humantime::format_duration(*length).to_string(),
            Window::CalendarDay => "calendar_day".into(),
            Window::CalendarMonth => "calendar_month".into(),
        }
    }
}

/// One alert level of a rule: a threshold rule has one, a `limit` rule one
/// per `warn_at` fraction. Each level of each group is its own alert instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    /// `""` for a threshold rule, the fraction (`0.8`) for a limit rule.
    pub id: String,
    /// Comparison.
    pub op: Op,
    /// Value compared with.
    pub threshold: f64,
    /// Severity of this level's notifications.
    pub severity: Severity,
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The name.
    pub name: String,
    /// Fixed at creation; part of fingerprints.
    pub uid: String,
    /// Free labels.
    pub labels: BTreeMap<String, String>,
    /// What is measured.
    pub measure: Measure,
    /// Over which window.
    pub window: Window,
    /// Timezone of calendar windows (and of day/month tables read).
    pub tz: Tz,
    /// Filters, in dimension order.
    pub scope: Vec<(Dimension, Vec<String>)>,
    /// Group dimensions.
    pub group_by: Vec<Dimension>,
    /// Alert levels.
    pub levels: Vec<Level>,
    /// Compare with `threshold × value one window earlier`.
    pub baseline: bool,
    /// Fewest requests for the condition to hold.
    pub min_requests: u64,
    /// How long the condition must hold before firing.
    pub for_: Duration,
    /// Firing outlives the condition by this much.
    pub keep_firing_for: Duration,
    /// Re-notification period.
    pub repeat_every: Option<Duration>,
    /// The spec it came from.
    pub spec: RuleSpec,
}

fn invalid(message: impl Into<String>) -> AlertError {
    AlertError::Invalid(message.into())
}

/// Checks a rule or quota name: `[a-z0-9_-]`, 1 to 64 characters.
pub fn check_name(name: &str) -> Result<(), AlertError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(invalid(format!(
            "`name` {name:?} is invalid: use 1 to 64 characters from a-z, 0-9, `_` and `-` (it becomes part of the NATS subject)"
        )));
    }
    Ok(())
}

fn duration(field: &str, text: &Option<String>) -> Result<Duration, AlertError> {
    match text {
        None => Ok(Duration::ZERO),
        Some(t) => crate::duration::parse(t).map_err(|e| {
            invalid(format!(
                "`{field}` {t:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"1h\""
            ))
        }),
    }
}

/// The length of one bucket of a fixed-size granularity.
fn bucket_len(g: Granularity) -> Option<Duration> {
    match g {
        Granularity::Minute => Some(Duration::from_secs(60)),
        Granularity::Hour => Some(Duration::from_secs(3600)),
        _ => None,
    }
}

/// Parses a window against the projections that cover the rule's dimensions.
pub fn parse_window(
    text: &str,
    tz: Tz,
    covering: &[&Spec],
    dims: &str,
) -> Result<Window, AlertError> {
    let text = text.trim();
    let has = |g: Granularity, same_tz: bool| {
        covering
            .iter()
            .any(|s| s.granularities.contains(&g) && (!same_tz || s.timezone == tz))
    };
    match text {
        "calendar_day" | "calendar_month" => {
            let ok = has(Granularity::Minute, false)
                || has(Granularity::Hour, false)
                || has(Granularity::Day, true)
                || (text == "calendar_month" && has(Granularity::Month, true));
            if !ok {
                return Err(invalid(format!(
                    "window `{text}` in {tz} needs minute or hour buckets, or {} buckets in {tz}, of a projection with {dims}; none is loaded. Add one to projections/",
                    if text == "calendar_day" { "day" } else { "day or month" }
                )));
            }
            Ok(if text == "calendar_day" {
                Window::CalendarDay
            } else {
                Window::CalendarMonth
            })
        }
        _ => {
            let length = crate::duration::parse(text).map_err(|e| {
                invalid(format!(
                    "`window` {text:?} is neither a duration ({e}) nor `calendar_day` / `calendar_month`; write e.g. \"5m\", \"1h\", \"7d\""
                ))
            })?;
            let finest = [Granularity::Minute, Granularity::Hour]
                .into_iter()
                .find(|g| has(*g, false));
            let Some(granularity) = finest else {
                return Err(invalid(format!(
                    "a rolling window needs minute or hour buckets of a projection with {dims}, and none is loaded; use `calendar_day` / `calendar_month`, or add a projection with minute buckets"
                )));
            };
            let step = bucket_len(granularity).unwrap_or(Duration::from_secs(60));
            if length < step {
                return Err(invalid(format!(
                    "window `{text}` is shorter than the finest available granularity for {dims} ({}); use at least {}",
                    granularity.as_str(),
                    humantime::format_duration(step)
                )));
            }
            if length > MAX_WINDOW {
                return Err(invalid(format!(
                    "window `{text}` is longer than 31d; use `calendar_month` for billing periods"
                )));
            }
            if length.as_secs() % step.as_secs() != 0 || length.subsec_nanos() != 0 {
                return Err(invalid(format!(
                    "window `{text}` is not a whole number of {}s, the finest available granularity for {dims}",
                    granularity.as_str()
                )));
            }
            Ok(Window::Rolling {
                length,
                granularity,
            })
        }
    }
}

/// Parses a list of dimension names, naming the field in errors.
fn dimensions<'a>(
    field: &str,
    names: impl Iterator<Item = &'a String>,
) -> Result<Vec<Dimension>, AlertError> {
    let mut out = Vec::new();
    for n in names {
        let d = Dimension::parse(n).ok_or_else(|| {
            invalid(format!(
                "`{field}` names unknown dimension `{n}`; known: {}",
                Dimension::ALL.map(Dimension::as_str).join(", ")
            ))
        })?;
        if out.contains(&d) {
            return Err(invalid(format!("`{field}` names `{n}` twice")));
        }
        out.push(d);
    }
    Ok(out)
}

impl RuleSpec {
    /// Parses a JSON body.
    pub fn from_json(body: &[u8]) -> Result<Self, AlertError> {
        serde_json::from_slice(body).map_err(|e| {
            invalid(format!(
                "the rule is not valid JSON or has a wrong field: {e}. Measures: {}",
                Measure::names()
            ))
        })
    }

    /// Validates against the loaded projections; `uid` is the stored rule's.
    pub fn validate(&self, uid: &str, specs: &[std::sync::Arc<Spec>]) -> Result<Rule, AlertError> {
        check_name(&self.name)?;
        let tz: Tz = match &self.timezone {
            None => Tz::UTC,
            Some(t) => t.parse().map_err(|_| {
                invalid(format!(
                    "`timezone` {t:?} is not an IANA timezone name (e.g. \"Europe/Berlin\")"
                ))
            })?,
        };
        let scope_dims = dimensions("scope", self.scope.keys())?;
        let mut scope = Vec::new();
        for (d, (name, v)) in scope_dims.iter().zip(&self.scope) {
            let values = match v {
                ScopeValue::One(s) => vec![s.clone()],
                ScopeValue::Any(list) if !list.is_empty() => list.clone(),
                ScopeValue::Any(_) => {
                    return Err(invalid(format!(
                        "`scope.{name}` is an empty list; give at least one value"
                    )))
                }
            };
            if values.len() > MAX_SCOPE_VALUES {
                return Err(invalid(format!(
                    "`scope.{name}` lists {} values; at most {MAX_SCOPE_VALUES} are allowed (group_by the dimension instead, or split the rule)",
                    values.len()
                )));
            }
            scope.push((*d, values));
        }
        let group_by = dimensions("group_by", self.group_by.iter())?;
        let mut needed: Vec<Dimension> = group_by.clone();
        needed.extend(scope_dims.iter().copied().filter(|d| !group_by.contains(d)));
        let dims = if needed.is_empty() {
            "no dimensions".to_string()
        } else {
            format!(
                "dimensions [{}]",
                needed
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let covering: Vec<&Spec> = specs
            .iter()
            .map(|s| s.as_ref())
            .filter(|s| needed.iter().all(|d| s.dimensions.contains(d)))
            .collect();
        if covering.is_empty() {
            return Err(invalid(format!(
                "no loaded projection has {dims} (scope and group_by); group or filter by fewer dimensions, or add a projection to projections/"
            )));
        }
        let window = parse_window(&self.window, tz, &covering, &dims)?;
        let severity = self.severity.unwrap_or(Severity::Warning);
        let baseline = match self.baseline.as_deref() {
            None => false,
            Some("previous_window") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "`baseline` {other:?} is unknown; the only baseline is \"previous_window\""
                )))
            }
        };
        let levels = match (self.threshold, self.limit, &self.warn_at) {
            (Some(t), None, None) if t.is_finite() => vec![Level {
                id: String::new(),
                op: self.op.unwrap_or(Op::Gt),
                threshold: t,
                severity,
            }],
            (Some(_), None, None) => return Err(invalid("`threshold` must be a finite number")),
            (None, Some(_), None) => {
                return Err(invalid(
                    "`limit` needs `warn_at`: the fractions of the limit to alert at, e.g. warn_at = [0.8, 1.0]",
                ))
            }
            (None, Some(limit), Some(fractions)) => {
                if !(limit.is_finite() && limit > 0.0) {
                    return Err(invalid("`limit` must be a positive number"));
                }
                if self.op.is_some() || baseline {
                    return Err(invalid(
                        "`op` and `baseline` go with `threshold`, not with `limit` (a limit alerts at value >= fraction × limit)",
                    ));
                }
                if fractions.is_empty() || fractions.len() > 10 {
                    return Err(invalid("`warn_at` needs 1 to 10 fractions, e.g. [0.8, 1.0]"));
                }
                let mut sorted = fractions.clone();
                sorted.sort_by(f64::total_cmp);
                sorted.dedup();
                if sorted.len() != fractions.len() {
                    return Err(invalid("`warn_at` lists a fraction twice"));
                }
                if sorted.iter().any(|f| !(f.is_finite() && *f > 0.0 && *f <= 10.0)) {
                    return Err(invalid(
                        "`warn_at` fractions must be numbers above 0 and at most 10 (1.0 = 100% of the limit)",
                    ));
                }
                sorted
                    .into_iter()
                    .map(|f| Level {
                        id: format!("{f}"),
                        op: Op::Ge,
                        threshold: f * limit,
                        // Below the limit is a warning; reaching it has the rule's severity.
                        severity: if f < 1.0 {
                            severity.min(Severity::Warning)
                        } else {
                            self.severity.unwrap_or(Severity::Critical)
                        },
                    })
                    .collect()
            }
            (None, None, Some(_)) => return Err(invalid("`warn_at` needs `limit`")),
            (None, None, None) => {
                return Err(invalid(
                    "a rule needs either `threshold` (with `op`, default \">\") or `limit` with `warn_at`",
                ))
            }
            _ => {
                return Err(invalid(
                    "give either `threshold` or `limit` with `warn_at`, not both",
                ))
            }
        };
        let for_ = duration("for", &self.for_)?;
        let keep_firing_for = duration("keep_firing_for", &self.keep_firing_for)?;
        let repeat_every = match &self.repeat_every {
            None => None,
            Some(_) => {
                let d = duration("repeat_every", &self.repeat_every)?;
                if d < Duration::from_secs(60) {
                    return Err(invalid("`repeat_every` must be at least 1m"));
                }
                Some(d)
            }
        };
        for (field, d) in [("for", for_), ("keep_firing_for", keep_firing_for)] {
            if d > MAX_WINDOW {
                return Err(invalid(format!("`{field}` must be at most 31d")));
            }
        }
        if self.labels.len() > 32
            || self
                .labels
                .iter()
                .any(|(k, v)| k.len() > 100 || v.len() > 1000)
        {
            return Err(invalid(
                "`labels`: at most 32, names up to 100 and values up to 1000 bytes",
            ));
        }
        Ok(Rule {
            name: self.name.clone(),
            uid: uid.to_string(),
            labels: self.labels.clone(),
            measure: self.measure,
            window,
            tz,
            scope,
            group_by,
            levels,
            baseline,
            min_requests: self.min_requests.unwrap_or(0),
            for_,
            keep_firing_for,
            repeat_every,
            spec: self.clone(),
        })
    }

    /// The stored form: compact JSON with fields in declaration order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// A file for `tally alerts apply`: `[[rule]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// The rules.
    #[serde(default)]
    pub rule: Vec<RuleSpec>,
}

/// `[from, to)` of a rule's window at `now`, and of the window before it.
pub fn window_range(rule: &Rule, now: DateTime<Utc>) -> (Range, Range) {
    match rule.window {
        Window::Rolling {
            length,
            granularity,
        } => {
            let end = next_bucket(
                bucket_start(now, granularity, Tz::UTC),
                granularity,
                Tz::UTC,
            );
            let len = chrono::Duration::from_std(length).unwrap_or_default();
            ((end - len, end), (end - len - len, end - len))
        }
        Window::CalendarDay => {
            let start = day_start(now.with_timezone(&rule.tz).date_naive(), rule.tz);
            let end = next_bucket(start, Granularity::Day, rule.tz);
            let before = bucket_start(
                start - chrono::Duration::seconds(1),
                Granularity::Day,
                rule.tz,
            );
            ((start, end), (before, start))
        }
        Window::CalendarMonth => {
            let start = month_start(now, rule.tz);
            let end = next_bucket(start, Granularity::Month, rule.tz);
            let before = month_start(start - chrono::Duration::seconds(1), rule.tz);
            ((start, end), (before, start))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn specs() -> Vec<Arc<Spec>> {
        let minute = Spec::parse(
            "name = \"m\"\ndimensions = [\"api\", \"key\", \"model\"]\ngranularities = [\"minute\"]\ntimezone = \"UTC\"",
            None,
        )
        .expect("spec");
        let user = Spec::parse(
            "name = \"u\"\ndimensions = [\"user\", \"api\"]\ngranularities = [\"day\", \"month\"]\ntimezone = \"UTC\"",
            None,
        )
        .expect("spec");
        vec![Arc::new(minute), Arc::new(user)]
    }

    fn rule(json: &str) -> Result<Rule, AlertError> {
        RuleSpec::from_json(json.as_bytes())?.validate("u1", &specs())
    }

    #[test]
    fn limit_rules_have_one_level_per_fraction() {
        let r = rule(r#"{"name":"rl","measure":"requests","window":"1h","group_by":["key"],"limit":1000,"warn_at":[1.0,0.8]}"#).expect("valid");
        assert_eq!(r.levels.len(), 2);
        assert_eq!(r.levels[0].threshold, 800.0);
        assert_eq!(r.levels[0].severity, Severity::Warning);
        assert_eq!(r.levels[1].severity, Severity::Critical);
        assert_eq!(
            r.window,
            Window::Rolling {
                length: Duration::from_secs(3600),
                granularity: Granularity::Minute
            }
        );
    }

    #[test]
    fn bad_rules_say_what_to_fix() {
        let cases = [
            (
                r#"{"name":"a","measure":"bogus","window":"1h","threshold":1}"#,
                "unknown variant",
            ),
            (
                r#"{"name":"a","measure":"requests","window":"1h","group_by":["colour"],"threshold":1}"#,
                "unknown dimension `colour`",
            ),
            (
                r#"{"name":"a","measure":"requests","window":"30s","threshold":1}"#,
                "shorter than the finest",
            ),
            (
                r#"{"name":"a","measure":"requests","window":"1h","limit":5}"#,
                "needs `warn_at`",
            ),
            (
                r#"{"name":"A b","measure":"requests","window":"1h","threshold":1}"#,
                "`name`",
            ),
            (
                r#"{"name":"a","measure":"requests","window":"1h","group_by":["user"],"threshold":1}"#,
                "rolling window needs minute or hour",
            ),
            (
                r#"{"name":"a","measure":"requests","window":"1h","threshold":1,"sql":"drop"}"#,
                "unknown field",
            ),
            (
                r#"{"name":"a","measure":"requests","window":"90s","threshold":1}"#,
                "whole number",
            ),
        ];
        for (json, want) in cases {
            match rule(json) {
                Err(AlertError::Invalid(m)) => assert!(m.contains(want), "{json}: {m}"),
                other => panic!("{json}: expected an error with {want:?}, got {other:?}"),
            }
        }
        // Grouped by user: only day/month tables, so calendar windows work.
        assert!(rule(r#"{"name":"a","measure":"cost","window":"calendar_month","group_by":["user"],"threshold":1}"#).is_ok());
    }
}
