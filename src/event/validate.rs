//! Turns one decoded item (a JSON-like map) into a valid, normalised [`Event`].
//!
//! Every problem in an item is reported, each naming the field and the rule,
//! so a sender fixes an event in one round trip instead of one error at a time.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeZone, Timelike, Utc};
use serde_json::{Map, Value};

use super::cost::parse_nanos;
use super::{ErrorType, Event};

/// The fields of the wire contract, in documentation order.
pub const FIELDS: &[&str] = &[
    "id",
    "ts",
    "api",
    "endpoint",
    "method",
    "key",
    "user",
    "model",
    "status",
    "success",
    "error_type",
    "error_message",
    "latency_ms",
    "request_bytes",
    "response_bytes",
    "tokens_in",
    "tokens_out",
    "cost",
    "cached",
    "metadata",
];

/// Longest `key`, in characters.
pub const MAX_KEY_CHARS: usize = 256;
/// Longest accepted `latency_ms`: one hour.
pub const MAX_LATENCY_MS: f64 = 3_600_000.0;
/// Most entries accepted in `metadata`.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 128;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 1024;
/// Largest `tokens_in` / `tokens_out` of one event. With this bound a bucket's
/// `i64` sum overflows only after 9.2 billion events at the maximum.
pub const MAX_TOKENS: i64 = 1_000_000_000;
/// Largest `request_bytes` / `response_bytes` of one event (1 TB): a bucket's
/// sum overflows only after 9.2 million events at the maximum (9.2 EB).
pub const MAX_BYTES: i64 = 1_000_000_000_000;
/// Largest `cost` of one event in nano-units (1,000 currency units): a
/// bucket's sum overflows only after 9.2 million events at the maximum.
pub const MAX_COST_NANOS: i64 = 1_000 * super::cost::NANOS_PER_UNIT;
/// Most problems listed for one item; the rest are counted.
pub const MAX_PROBLEMS: usize = 16;
/// Longest reason text of one item, in characters (longer ones are cut).
pub const MAX_REASON_CHARS: usize = 4_096;
/// Longest field name quoted in a reason, in characters.
const MAX_QUOTED_NAME_CHARS: usize = 64;

/// The time window an event's `ts` must fall in, relative to "now".
#[derive(Debug, Clone, Copy)]
pub struct ValidationRules {
    /// The instant validation is done at (injected so tests are deterministic).
    pub now: DateTime<Utc>,
    /// How far back `ts` may be: older events are rejected, which also bounds
    /// how long the raw log must keep ids for exact deduplication.
    pub late_arrival_horizon: Duration,
    /// How far ahead `ts` may be (clock skew of emitters).
    pub max_future_skew: Duration,
}

impl ValidationRules {
    /// Rules with the given horizon, Tally's 5-minute future skew, and now = the wall clock.
    pub fn now(late_arrival_horizon: Duration) -> Self {
        Self {
            now: Utc::now(),
            late_arrival_horizon,
            max_future_skew: Duration::from_secs(300),
        }
    }
}

/// One broken rule in one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The offending field (`None` for the item as a whole).
    pub field: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// Why an item is not a valid event; lists every problem found (the first
/// [`MAX_PROBLEMS`], and how many more there were).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// At least one problem.
    pub problems: Vec<Problem>,
    /// Problems found beyond [`MAX_PROBLEMS`], not listed.
    pub more: usize,
}

impl ValidationError {
    /// An error with a single problem.
    pub fn single(field: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                field: field.map(str::to_string),
                message: message.into(),
            }],
            more: 0,
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                text.push_str("; ");
            }
            match &p.field {
                Some(field) => {
                    text.push_str("field `");
                    text.push_str(field);
                    text.push_str("`: ");
                    text.push_str(&p.message);
                }
                None => text.push_str(&p.message),
            }
        }
        if self.more > 0 {
            text.push_str(&format!("; and {} more problems", self.more));
        }
        f.write_str(&truncate_chars(&text, MAX_REASON_CHARS))
    }
}

/// A name from the input as it may be quoted in a reason: control characters
/// escaped (PostgreSQL refuses NUL in text), at most 64 characters.
pub fn quoted_name(name: &str) -> String {
    truncate_chars(&super::escape_controls(name), MAX_QUOTED_NAME_CHARS)
}

/// `s` cut to `max` characters, with `…` when something was cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// Validates one item and normalises it into an [`Event`].
pub fn validate(item: &Value, rules: &ValidationRules) -> Result<Event, ValidationError> {
    let Value::Object(map) = item else {
        return Err(ValidationError::single(
            None,
            format!("an event must be an object (a map), got {}", describe(item)),
        ));
    };
    let mut v = Validator {
        map,
        problems: Vec::new(),
        more: 0,
    };
    for name in map.keys() {
        if !FIELDS.contains(&name.as_str()) {
            let hint = suggest(name)
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_else(|| format!("; known fields: {}", FIELDS.join(", ")));
            v.problem(name, format!("unknown field{hint}"));
        }
    }

    let id = v.required_string("id", 128, Text::Printable);
    let ts = v.timestamp("ts", rules);
    let api = v.required_string("api", 128, Text::Printable);
    let endpoint = v.optional_string("endpoint", 256, Text::Printable);
    let method = v.optional_string("method", 16, Text::Printable);
    let key = v.optional_string("key", MAX_KEY_CHARS, Text::Printable);
    let user = v.optional_string("user", 256, Text::Printable);
    let model = v.optional_string("model", 256, Text::Printable);
    let status = v.integer("status", 100, 599).map(|s| s as i32);
    let success_given = v.boolean("success");
    let error_type_given = v.error_type();
    let error_message = v.optional_string("error_message", 1024, Text::Lines);
    let latency_ms = v.latency();
    let request_bytes = v.integer("request_bytes", 0, MAX_BYTES);
    let response_bytes = v.integer("response_bytes", 0, MAX_BYTES);
    let tokens_in = v.integer("tokens_in", 0, MAX_TOKENS);
    let tokens_out = v.integer("tokens_out", 0, MAX_TOKENS);
    let cost_nanos = v.cost();
    let cached = v.boolean("cached").unwrap_or(false);
    let metadata = v.metadata();

    // An explicit `success` wins; an `error_type` alone marks a failure (timeouts
    // often have no status); otherwise the status decides; no status means success.
    let success = match (success_given, error_type_given) {
        (Some(s), _) => s,
        (None, Some(_)) => false,
        (None, None) => status.is_none_or(|s| s < 400),
    };
    if success && error_type_given.is_some() {
        v.problem(
            "error_type",
            "is only allowed on a failed call, but `success` is true; drop `error_type` or set `success` to false",
        );
    }
    let error_type = if success {
        None
    } else {
        Some(error_type_given.unwrap_or_else(|| ErrorType::from_status(status)))
    };

    match (v.problems.is_empty(), id, ts, api) {
        (true, Some(id), Some(ts), Some(api)) => Ok(Event {
            id,
            ts,
            api,
            endpoint,
            method,
            key,
            user,
            model,
            status,
            success,
            error_type,
            error_message,
            latency_ms,
            request_bytes,
            response_bytes,
            tokens_in,
            tokens_out,
            cost_nanos,
            cached,
            metadata,
        }),
        _ => Err(ValidationError {
            problems: v.problems,
            more: v.more,
        }),
    }
}

/// A short description of a value's type, for error messages.
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            let head: String = s.chars().take(40).collect();
            // Debug-quoted, like short strings: control characters escaped.
            format!("string {head:?}…")
        }
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A leap second (`:60`) is read as the first instant of the next second,
/// as PostgreSQL stores it, so both backends store the same `ts`; it is only
/// accepted where one can occur, at 23:59:60 UTC.
fn without_leap_second(ts: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let nanos = ts.nanosecond();
    if nanos < 1_000_000_000 {
        return Ok(ts);
    }
    if ts.hour() != 23 || ts.minute() != 59 || ts.second() != 59 {
        return Err(format!(
            "second 60 (a leap second) exists only at 23:59:60 UTC, got {}:60 UTC; send the next second instead",
            ts.format("%Y-%m-%dT%H:%M")
        ));
    }
    let next = ts
        .with_nanosecond(nanos - 1_000_000_000)
        .map(|t| t + chrono::Duration::seconds(1));
    next.ok_or_else(|| "the leap second cannot be read as the next second".to_string())
}

/// The contract field a misspelt name probably meant (`latencyMs` → `latency_ms`).
fn suggest(name: &str) -> Option<&'static str> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect()
    };
    let n = norm(name);
    let aliases: &[(&str, &str)] = &[
        ("timestamp", "ts"),
        ("time", "ts"),
        ("latency", "latency_ms"),
        ("duration", "latency_ms"),
        ("durationms", "latency_ms"),
        ("apikey", "key"),
        ("apikeyid", "key"),
        ("keyid", "key"),
        ("userid", "user"),
        ("statuscode", "status"),
        ("errortype", "error_type"),
        ("error", "error_message"),
        ("inputtokens", "tokens_in"),
        ("outputtokens", "tokens_out"),
        ("prompttokens", "tokens_in"),
        ("completiontokens", "tokens_out"),
        ("price", "cost"),
        ("cachehit", "cached"),
        ("route", "endpoint"),
        ("path", "endpoint"),
    ];
    FIELDS
        .iter()
        .copied()
        .find(|f| norm(f) == n)
        .or_else(|| aliases.iter().find(|(a, _)| *a == n).map(|(_, f)| *f))
}

struct Validator<'a> {
    map: &'a Map<String, Value>,
    problems: Vec<Problem>,
    more: usize,
}

/// Which control characters a string field may hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Text {
    /// None at all (identifiers and dimensions).
    Printable,
    /// Tab, line feed and carriage return only (free text such as `error_message`).
    Lines,
}

impl Text {
    fn refuses(self, c: char) -> bool {
        c.is_control() && (self == Text::Printable || !matches!(c, '\t' | '\n' | '\r'))
    }

    fn rule(self) -> &'static str {
        match self {
            Text::Printable => "must not contain control characters (such as NUL, tab or line feed)",
            Text::Lines => "must not contain control characters other than tab, line feed and carriage return (NUL is refused)",
        }
    }
}

impl<'a> Validator<'a> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        if self.problems.len() >= MAX_PROBLEMS {
            self.more += 1;
            return;
        }
        self.problems.push(Problem {
            field: Some(quoted_name(field)),
            message: message.into(),
        });
    }

    /// The field's value; JSON `null` counts as absent.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn required_string(&mut self, field: &str, max: usize, text: Text) -> Option<String> {
        if self.get(field).is_none() {
            self.problem(field, "is required");
            return None;
        }
        let s = self.optional_string(field, max, text);
        if s.is_none() && self.get(field).is_some_and(|v| v.as_str() == Some("")) {
            self.problem(field, format!("must not be empty (1 to {max} characters)"));
        }
        s
    }

    /// An optional string; `""` counts as absent.
    fn optional_string(&mut self, field: &str, max: usize, text: Text) -> Option<String> {
        let value = self.get(field)?;
        let Some(s) = value.as_str() else {
            self.problem(field, format!("must be a string, got {}", describe(value)));
            return None;
        };
        let chars = s.chars().count();
        if chars > max {
            self.problem(
                field,
                format!("is {chars} characters long; at most {max} are allowed"),
            );
            return None;
        }
        if s.chars().any(|c| text.refuses(c)) {
            self.problem(field, text.rule());
            return None;
        }
        (!s.is_empty()).then(|| s.to_string())
    }

    fn integer(&mut self, field: &str, min: i64, max: i64) -> Option<i64> {
        let value = self.get(field)?;
        let Some(n) = value.as_number() else {
            self.problem(
                field,
                format!("must be an integer, got {}", describe(value)),
            );
            return None;
        };
        // `10.0` is an integer written as a float: accept it, reject `10.5`.
        // Whole floats beyond 2^53 are out of every bound, so their rounding
        // never decides anything (`as` saturates).
        let parsed = n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.fract() == 0.0)
                .map(|f| f as i64)
        });
        let shown = truncate_chars(&n.to_string(), 32);
        match parsed {
            Some(i) if (min..=max).contains(&i) => Some(i),
            // Quantities (bounded below by 0) name the side that was crossed.
            Some(i) if min == 0 && i < 0 => {
                self.problem(field, format!("must be ≥ {min}, got {shown}"));
                None
            }
            Some(_) if min == 0 => {
                self.problem(
                    field,
                    format!("must be ≤ {max} (the most one event may carry), got {shown}"),
                );
                None
            }
            Some(_) => {
                self.problem(
                    field,
                    format!("must be between {min} and {max}, got {shown}"),
                );
                None
            }
            None => {
                self.problem(field, format!("must be a whole number, got {shown}"));
                None
            }
        }
    }

    fn boolean(&mut self, field: &str) -> Option<bool> {
        let value = self.get(field)?;
        match value.as_bool() {
            Some(b) => Some(b),
            None => {
                self.problem(
                    field,
                    format!("must be true or false, got {}", describe(value)),
                );
                None
            }
        }
    }

    fn timestamp(&mut self, field: &str, rules: &ValidationRules) -> Option<DateTime<Utc>> {
        let Some(value) = self.get(field) else {
            self.problem(
                field,
                "is required (RFC 3339 like \"2026-11-24T10:00:00Z\" or integer epoch milliseconds)",
            );
            return None;
        };
        let ts = match value {
            Value::String(s) => match DateTime::parse_from_rfc3339(s) {
                Ok(t) => match without_leap_second(t.with_timezone(&Utc)) {
                    Ok(t) => t,
                    Err(message) => {
                        self.problem(field, message);
                        return None;
                    }
                },
                Err(e) => {
                    self.problem(
                        field,
                        format!(
                            "{:?} is not an RFC 3339 timestamp ({e}); e.g. \"2026-11-24T10:00:00.123Z\"",
                            truncate_chars(s, 64)
                        ),
                    );
                    return None;
                }
            },
            Value::Number(n) => match n
                .as_i64()
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            {
                Some(t) => t,
                None => {
                    self.problem(
                        field,
                        format!(
                            "must be integer epoch milliseconds or an RFC 3339 string, got {n}"
                        ),
                    );
                    return None;
                }
            },
            other => {
                self.problem(
                    field,
                    format!(
                        "must be an RFC 3339 string or integer epoch milliseconds, got {}",
                        describe(other)
                    ),
                );
                return None;
            }
        };
        let ts = ts.trunc_subsecs(6);
        let oldest = rules.now - rules.late_arrival_horizon;
        let newest = rules.now + rules.max_future_skew;
        if ts < oldest {
            self.problem(
                field,
                format!(
                    "{} is older than the late-arrival horizon of {} (oldest accepted now: {})",
                    super::format_ts(&ts),
                    humantime::format_duration(rules.late_arrival_horizon),
                    super::format_ts(&oldest)
                ),
            );
            return None;
        }
        if ts > newest {
            self.problem(
                field,
                format!(
                    "{} is more than {} in the future (check the emitter's clock)",
                    super::format_ts(&ts),
                    humantime::format_duration(rules.max_future_skew)
                ),
            );
            return None;
        }
        Some(ts)
    }

    fn error_type(&mut self) -> Option<ErrorType> {
        let value = self.get("error_type")?;
        let parsed = value.as_str().and_then(ErrorType::parse);
        if parsed.is_none() {
            let allowed: Vec<&str> = ErrorType::ALL.iter().map(|t| t.as_str()).collect();
            self.problem(
                "error_type",
                format!(
                    "must be one of {}, got {}",
                    allowed.join(", "),
                    describe(value)
                ),
            );
        }
        parsed
    }

    fn latency(&mut self) -> Option<f64> {
        let value = self.get("latency_ms")?;
        match value.as_f64() {
            Some(ms) if ms.is_finite() && (0.0..=MAX_LATENCY_MS).contains(&ms) => Some(ms),
            Some(ms) => {
                self.problem(
                    "latency_ms",
                    format!("must be between 0 and {MAX_LATENCY_MS} milliseconds, got {ms}"),
                );
                None
            }
            None => {
                self.problem(
                    "latency_ms",
                    format!("must be a number of milliseconds, got {}", describe(value)),
                );
                None
            }
        }
    }

    fn cost(&mut self) -> Option<i64> {
        let value = self.get("cost")?;
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                self.problem(
                    "cost",
                    format!(
                        "must be a decimal string like \"0.0023\" or a number, got {}",
                        describe(other)
                    ),
                );
                return None;
            }
        };
        match parse_nanos(&text) {
            Ok(n) if n > MAX_COST_NANOS => {
                self.problem(
                    "cost",
                    format!(
                        "{} is more than the largest cost of one event, {}",
                        truncate_chars(&text, 64),
                        super::cost::format_nanos_short(MAX_COST_NANOS)
                    ),
                );
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                self.problem("cost", e);
                None
            }
        }
    }

    fn metadata(&mut self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(value) = self.get("metadata") else {
            return out;
        };
        let Some(obj) = value.as_object() else {
            self.problem(
                "metadata",
                format!(
                    "must be an object of string → string, got {}",
                    describe(value)
                ),
            );
            return out;
        };
        if obj.len() > MAX_METADATA_ENTRIES {
            self.problem(
                "metadata",
                format!(
                    "has {} entries; at most {MAX_METADATA_ENTRIES} are allowed",
                    obj.len()
                ),
            );
            return out;
        }
        for (k, v) in obj {
            let field = format!("metadata.{k}");
            if k.is_empty() || k.chars().count() > MAX_METADATA_KEY_CHARS {
                self.problem(
                    &field,
                    format!("keys must be 1 to {MAX_METADATA_KEY_CHARS} characters"),
                );
                continue;
            }
            if k.chars().any(|c| Text::Printable.refuses(c)) {
                self.problem(&field, format!("keys {}", Text::Printable.rule()));
                continue;
            }
            match v.as_str() {
                Some(s) if s.chars().count() > MAX_METADATA_VALUE_CHARS => self.problem(
                    &field,
                    format!("values must be at most {MAX_METADATA_VALUE_CHARS} characters"),
                ),
                Some(s) if s.chars().any(|c| Text::Lines.refuses(c)) => {
                    self.problem(&field, format!("values {}", Text::Lines.rule()))
                }
                Some(s) => {
                    out.insert(k.clone(), s.to_string());
                }
                None => self.problem(
                    &field,
                    format!("values must be strings, got {}", describe(v)),
                ),
            }
        }
        out
    }
}
