//! Turns one decoded item (a JSON-like map) into a valid, normalised [`Event`].
//!
//! Every problem in an item is reported, each naming the field and the rule,
//! so a sender fixes an event in one round trip instead of one error at a time.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeZone, Timelike, Utc};
use serde_json::{Map, Number, Value};
use std::borrow::Cow;

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
    let fields = Fields::of_map(map);
    let mut v = Validator {
        fields: &fields,
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
    v.event(rules)
}

/// Validates an item whose fields are all known (see [`Fields::parse`]):
/// the same rules and answers as [`validate`] on the same item as a map.
pub fn validate_fields(
    fields: &Fields<'_>,
    rules: &ValidationRules,
) -> Result<Event, ValidationError> {
    Validator {
        fields,
        problems: Vec::new(),
        more: 0,
    }
    .event(rules)
}

/// One field's value as validation reads it, borrowed from the input where it can be.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    /// A string.
    Str(Cow<'a, str>),
    /// A number, as written.
    Num(Cow<'a, Number>),
    /// A boolean.
    Bool(bool),
    /// An object or an array.
    Json(Cow<'a, Value>),
}

impl Field<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_number(&self) -> Option<&Number> {
        match self {
            Field::Num(n) => Some(n),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Field::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        self.as_number().and_then(Number::as_f64)
    }

    fn as_object(&self) -> Option<&Map<String, Value>> {
        match self {
            Field::Json(v) => v.as_object(),
            _ => None,
        }
    }

    /// As [`describe`] says it of the same JSON value.
    fn describe(&self) -> String {
        match self {
            Field::Str(s) => describe_str(s),
            Field::Num(n) => format!("number {n}"),
            Field::Bool(b) => format!("boolean {b}"),
            Field::Json(v) => describe(v),
        }
    }
}

/// The fields of one item, by their place in [`FIELDS`]; JSON `null` counts as absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields<'a> {
    slots: [Option<Field<'a>>; FIELD_COUNT],
}

const FIELD_COUNT: usize = 20;
const _: () = assert!(FIELDS.len() == FIELD_COUNT);

impl<'a> Fields<'a> {
    /// The known fields of `map` (unknown ones are the caller's to report).
    fn of_map(map: &'a Map<String, Value>) -> Self {
        let mut out = Fields::default();
        for (slot, name) in out.slots.iter_mut().zip(FIELDS) {
            *slot = map.get(*name).and_then(|v| match v {
                Value::Null => None,
                Value::String(s) => Some(Field::Str(Cow::Borrowed(s))),
                Value::Number(n) => Some(Field::Num(Cow::Borrowed(n))),
                Value::Bool(b) => Some(Field::Bool(*b)),
                other => Some(Field::Json(Cow::Borrowed(other))),
            });
        }
        out
    }

    /// Reads a JSON object whose keys are all in [`FIELDS`] without building
    /// a map: strings without escapes are borrowed from `raw`. `None` when
    /// anything is unusual (not an object, an unknown or escaped key, invalid
    /// JSON): the caller then decodes the item as a [`Value`], whose path
    /// reports every problem. The last of duplicate keys wins, as in a map.
    pub fn parse(raw: &'a [u8]) -> Option<Self> {
        use serde::de::{Deserializer as _, MapAccess, Visitor};
        use serde_json::value::RawValue;
        struct Flat;
        impl<'de> Visitor<'de> for Flat {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                use serde::de::Error as _;
                let mut out = Fields::default();
                while let Some(key) = map.next_key::<&'de str>()? {
                    let Some(at) = FIELDS.iter().position(|f| *f == key) else {
                        return Err(A::Error::custom("unknown field"));
                    };
                    let raw = map.next_value::<&'de RawValue>()?;
                    out.slots[at] = Field::of_raw(raw.get()).map_err(A::Error::custom)?;
                }
                Ok(out)
            }
        }
        let mut de = serde_json::Deserializer::from_slice(raw);
        let fields = de.deserialize_map(Flat).ok()?;
        de.end().ok()?;
        Some(fields)
    }

    /// The field named `name` (one of [`FIELDS`]).
    fn get(&self, name: &str) -> Option<&Field<'a>> {
        let at = FIELDS.iter().position(|f| *f == name)?;
        self.slots[at].as_ref()
    }

    /// `id` when it is a string.
    pub fn id(&self) -> Option<&str> {
        self.get("id").and_then(Field::as_str)
    }
}

impl<'a> Field<'a> {
    /// One JSON value's text; `None` for `null`.
    fn of_raw(text: &'a str) -> Result<Option<Self>, serde_json::Error> {
        Ok(match text.as_bytes().first() {
            Some(b'n') => None,
            Some(b't') => Some(Field::Bool(true)),
            Some(b'f') => Some(Field::Bool(false)),
            Some(b'"') if !text.contains('\\') => Some(Field::Str(Cow::Borrowed(
                text.get(1..text.len() - 1).unwrap_or_default(),
            ))),
            Some(b'"') => Some(Field::Str(Cow::Owned(serde_json::from_str(text)?))),
            Some(b'{' | b'[') => Some(Field::Json(Cow::Owned(serde_json::from_str(text)?))),
            _ => Some(Field::Num(Cow::Owned(serde_json::from_str(text)?))),
        })
    }
}

impl Validator<'_, '_> {
    /// Every field checked; the event, or every problem found.
    fn event(mut self, rules: &ValidationRules) -> Result<Event, ValidationError> {
        let v = &mut self;
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
                problems: std::mem::take(&mut v.problems),
                more: v.more,
            }),
        }
    }
}

/// A short description of a value's type, for error messages.
pub fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => describe_str(s),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// [`describe`] of a string.
fn describe_str(s: &str) -> String {
    if s.chars().count() > 40 {
        let head: String = s.chars().take(40).collect();
        // Debug-quoted, like short strings: control characters escaped.
        format!("string {head:?}…")
    } else {
        format!("string {s:?}")
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

struct Validator<'f, 'a> {
    fields: &'f Fields<'a>,
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

impl<'f, 'a> Validator<'f, 'a> {
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
    fn get(&self, field: &str) -> Option<&'f Field<'a>> {
        self.fields.get(field)
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
            self.problem(field, format!("must be a string, got {}", value.describe()));
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
                format!("must be an integer, got {}", value.describe()),
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
                    format!("must be true or false, got {}", value.describe()),
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
            Field::Str(s) => match DateTime::parse_from_rfc3339(s) {
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
            Field::Num(n) => match n
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
                        other.describe()
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
                    value.describe()
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
                    format!("must be a number of milliseconds, got {}", value.describe()),
                );
                None
            }
        }
    }

    fn cost(&mut self) -> Option<i64> {
        let value = self.get("cost")?;
        let text = match value {
            Field::Str(s) => s.to_string(),
            Field::Num(n) => n.to_string(),
            other => {
                self.problem(
                    "cost",
                    format!(
                        "must be a decimal string like \"0.0023\" or a number, got {}",
                        other.describe()
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
                    value.describe()
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> ValidationRules {
        ValidationRules {
            now: Utc
                .with_ymd_and_hms(2026, 11, 24, 12, 0, 0)
                .single()
                .expect("a valid instant"),
            late_arrival_horizon: Duration::from_secs(7 * 86_400),
            max_future_skew: Duration::from_secs(300),
        }
    }

    /// Both ways of reading an item, when the fast one takes it.
    fn both(
        raw: &str,
    ) -> Option<(
        Result<Event, ValidationError>,
        Result<Event, ValidationError>,
    )> {
        let fields = Fields::parse(raw.as_bytes())?;
        let value: Value = serde_json::from_str(raw).expect("the fast path took invalid JSON");
        Some((
            validate_fields(&fields, &rules()),
            validate(&value, &rules()),
        ))
    }

    #[test]
    fn ordinary_events_take_the_fast_path_and_read_the_same() {
        for raw in [
            r#"{"id":"a","ts":"2026-11-24T11:00:00Z","api":"openai","key":"k","status":200,"latency_ms":12.5,"cost":"0.0023","tokens_in":10,"cached":true,"metadata":{"team":"x"}}"#,
            r#"{"id":"b\"q","ts":1795000000000,"api":"a\u00e9","status":503.0,"error_type":"server_error"}"#,
            r#"{"id":"c","ts":"2026-11-24T11:00:00Z","api":"a","status":99,"cost":12,"user":null,"id":"d"}"#,
            r#"{"id":"","ts":"bad","api":7,"success":"yes","metadata":[1]}"#,
        ] {
            let (fast, slow) = both(raw).unwrap_or_else(|| panic!("not on the fast path: {raw}"));
            assert_eq!(fast, slow, "{raw}");
        }
        let (fast, _) = both(r#"{"id":"c","ts":"2026-11-24T11:00:00Z","api":"a","id":"d"}"#)
            .expect("fast path");
        assert_eq!(
            fast.expect("valid").id,
            "d",
            "the last of duplicate keys wins"
        );
    }

    #[test]
    fn unusual_items_are_left_to_the_value_path() {
        for raw in [
            r#"{"id":"a","ts":"2026-11-24T11:00:00Z","api":"a","latencyMs":3}"#,
            r#"{"specversion":"1.0","id":"a","source":"s","type":"t"}"#,
            r#"{"\u0069d":"a","ts":"2026-11-24T11:00:00Z","api":"a"}"#,
            r#"[{"id":"a"}]"#,
            r#"{"id":"a","api":"a"} x"#,
            "{\"id\":\"a\u{1}\",\"api\":\"a\"}",
            "5",
        ] {
            assert!(Fields::parse(raw.as_bytes()).is_none(), "{raw}");
        }
    }

    fn json_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9 ]{0,12}".prop_map(|s| format!("\"{s}\"")),
            Just(r#""x\"y\\z\n""#.to_string()),
            Just(r#""\u0000""#.to_string()),
            Just(r#""\ud83d\ude00 é""#.to_string()),
            Just(format!("\"{}\"", "w".repeat(300))),
            Just(r#""2026-11-24T11:59:59.1234567Z""#.to_string()),
            Just(r#""2026-11-24T23:59:60Z""#.to_string()),
            Just(r#""2026-01-01T00:00:00Z""#.to_string()),
            Just(r#""0.0023""#.to_string()),
            Just(r#""server_error""#.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            (0i64..1_000).prop_map(|n| n.to_string()),
            (1_795_000_000_000i64..1_796_000_000_000).prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
            Just("200.0".to_string()),
            Just("1e3".to_string()),
            Just("-0".to_string()),
            Just("123456789012345678901234567890".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("null".to_string()),
            Just("{}".to_string()),
            Just(r#"{"a":"b","c":"d\u0001"}"#.to_string()),
            Just(r#"{"a":1}"#.to_string()),
            Just("[1,2]".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn the_fast_path_reads_every_item_it_takes_as_the_value_path_does(
            fields in proptest::collection::vec((0..FIELD_COUNT + 1, json_value()), 0..14),
            spaced in any::<bool>(),
        ) {
            let sep = if spaced { " , " } else { "," };
            let body: Vec<String> = fields
                .iter()
                .map(|(at, v)| {
                    let name = FIELDS.get(*at).copied().unwrap_or("latency");
                    format!("\"{name}\":{v}")
                })
                .collect();
            let raw = format!("{{{}}}", body.join(sep));
            let known = fields.iter().all(|(at, _)| *at < FIELD_COUNT);
            match both(&raw) {
                Some((fast, slow)) => prop_assert_eq!(fast, slow, "{}", raw),
                None => prop_assert!(!known, "a valid object of known fields missed the fast path: {}", raw),
            }
        }
    }
}
