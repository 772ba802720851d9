//! The usage event: its model, its validation and its wire codecs.
//!
//! Everything that enters Tally, over HTTP or NATS, passes through
//! [`codec::decode_body`] (bytes → items) and [`validate::validate`]
//! (item → [`Event`]). An [`Event`] is therefore always valid and normalised:
//! defaults applied, `error_type` derived, timestamps truncated to microseconds,
//! the cost in nano-units. Two deliveries of the same call compare equal with
//! `==`, which is what duplicate/conflict detection relies on.

pub mod codec;
pub mod cost;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};

pub use validate::{validate, ValidationError, ValidationRules};

/// One API call, as stored in `usage_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Idempotency key: the same id is stored at most once.
    pub id: String,
    /// When the call happened (not when Tally received it), microsecond precision.
    pub ts: DateTime<Utc>,
    /// The called API, e.g. `openai`.
    pub api: String,
    /// Endpoint or route within the API.
    pub endpoint: Option<String>,
    /// HTTP method or operation kind.
    pub method: Option<String>,
    /// API key *id* (never a secret) the call was billed to.
    pub key: Option<String>,
    /// End user on whose behalf the call was made.
    pub user: Option<String>,
    /// Model name for LLM-style APIs.
    pub model: Option<String>,
    /// Response status code, 100..=599.
    pub status: Option<i32>,
    /// Whether the call succeeded (derived from `status` when not given).
    pub success: bool,
    /// Failure class; `Some` exactly when `success` is false.
    pub error_type: Option<ErrorType>,
    /// Free-text error, stored but never aggregated.
    pub error_message: Option<String>,
    /// Call latency in milliseconds.
    pub latency_ms: Option<f64>,
    /// Request payload size.
    pub request_bytes: Option<i64>,
    /// Response payload size.
    pub response_bytes: Option<i64>,
    /// Prompt/input tokens.
    pub tokens_in: Option<i64>,
    /// Completion/output tokens.
    pub tokens_out: Option<i64>,
    /// Cost in nano-units (1e-9 of the currency unit), exact.
    pub cost_nanos: Option<i64>,
    /// Whether the answer came from a cache.
    pub cached: bool,
    /// Free string pairs, stored but never aggregated. Empty when absent.
    pub metadata: BTreeMap<String, String>,
}

/// Why a call failed; a closed set so that aggregates have one column per type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorType {
    /// 429 or a provider's quota refusal.
    RateLimit,
    /// 408/504 or a client-side timeout.
    Timeout,
    /// 5xx other than 504.
    ServerError,
    /// 4xx other than 408 and 429.
    ClientError,
    /// Anything else (connection reset, parse failure…).
    Other,
}

impl ErrorType {
    /// All error types, in the column order of aggregate tables.
    pub const ALL: [ErrorType; 5] = [
        ErrorType::RateLimit,
        ErrorType::Timeout,
        ErrorType::ServerError,
        ErrorType::ClientError,
        ErrorType::Other,
    ];

    /// The wire and column name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::RateLimit => "rate_limit",
            ErrorType::Timeout => "timeout",
            ErrorType::ServerError => "server_error",
            ErrorType::ClientError => "client_error",
            ErrorType::Other => "other",
        }
    }

    /// Parses the wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The failure class a status code implies (used when `error_type` is absent).
    pub fn from_status(status: Option<i32>) -> Self {
        match status {
            Some(429) => ErrorType::RateLimit,
            Some(408) | Some(504) => ErrorType::Timeout,
            Some(s) if (500..600).contains(&s) => ErrorType::ServerError,
            Some(s) if (400..500).contains(&s) => ErrorType::ClientError,
            _ => ErrorType::Other,
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Formats a timestamp the way Tally writes it everywhere: UTC, microseconds, `Z`.
///
/// Fixed width, so text comparison orders it correctly (SQLite stores it as TEXT).
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    ts.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// `s` with every control character written as a Rust-style escape (`\u{0}`).
///
/// For text copied from the input into reasons and rejected-item ids:
/// PostgreSQL refuses NUL in `text`, and a reader should see the others.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}
