//! Strict parsing of query-string parameters: every name is known, every value
//! is checked, and every error says what is allowed.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::QueryError;
use crate::aggregate::spec::{Dimension, Granularity};
use crate::aggregate::Measures;

/// A measure groups can be ranked by (descending; ties by group values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderBy {
    /// Events.
    Requests,
    /// Successful events.
    Successes,
    /// Failed events.
    Errors,
    /// Cost.
    Cost,
    /// Tokens in + out.
    Tokens,
    /// Input tokens.
    TokensIn,
    /// Output tokens.
    TokensOut,
    /// Request bytes.
    RequestBytes,
    /// Response bytes.
    ResponseBytes,
    /// Cache hits.
    Cached,
    /// Events without a cost or a price.
    Unpriced,
}

impl OrderBy {
    const NAMES: [(&'static str, OrderBy); 11] = [
        ("requests", OrderBy::Requests),
        ("successes", OrderBy::Successes),
        ("errors", OrderBy::Errors),
        ("cost", OrderBy::Cost),
        ("tokens", OrderBy::Tokens),
        ("tokens_in", OrderBy::TokensIn),
        ("tokens_out", OrderBy::TokensOut),
        ("request_bytes", OrderBy::RequestBytes),
        ("response_bytes", OrderBy::ResponseBytes),
        ("cached", OrderBy::Cached),
        ("unpriced", OrderBy::Unpriced),
    ];

    /// Every wire name, in documentation order.
    pub fn names() -> [&'static str; 11] {
        Self::NAMES.map(|(n, _)| n)
    }

    /// Parses an `order_by` value.
    pub fn parse(s: &str) -> Result<Self, QueryError> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, o)| *o)
            .ok_or_else(|| {
                QueryError::bad(
                    "invalid_order_by",
                    format!(
                        "order_by `{s}` is not a measure; use one of: {}",
                        Self::NAMES.map(|(n, _)| n).join(", ")
                    ),
                )
            })
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, o)| *o == self)
            .map_or("requests", |(n, _)| n)
    }

    /// The same ranking value in SQL, over an aggregate table's columns.
    pub fn sql(self) -> &'static str {
        match self {
            OrderBy::Requests => "sum(requests)",
            OrderBy::Successes => "sum(successes)",
            OrderBy::Errors => "sum(errors)",
            OrderBy::Cost => "sum(cost_nanos)",
            OrderBy::Tokens => "sum(tokens_in) + sum(tokens_out)",
            OrderBy::TokensIn => "sum(tokens_in)",
            OrderBy::TokensOut => "sum(tokens_out)",
            OrderBy::RequestBytes => "sum(request_bytes)",
            OrderBy::ResponseBytes => "sum(response_bytes)",
            OrderBy::Cached => "sum(cache_hits)",
            OrderBy::Unpriced => "sum(unpriced)",
        }
    }

    /// The ranked value of a group's totals.
    pub fn value(self, m: &Measures) -> i128 {
        let v = match self {
            OrderBy::Requests => m.requests,
            OrderBy::Successes => m.successes,
            OrderBy::Errors => m.errors,
            OrderBy::Cost => m.cost_nanos,
            OrderBy::Tokens => return i128::from(m.tokens_in) + i128::from(m.tokens_out),
            OrderBy::TokensIn => m.tokens_in,
            OrderBy::TokensOut => m.tokens_out,
            OrderBy::RequestBytes => m.request_bytes,
            OrderBy::ResponseBytes => m.response_bytes,
            OrderBy::Cached => m.cache_hits,
            OrderBy::Unpriced => m.unpriced,
        };
        i128::from(v)
    }
}

/// Query-string pairs, consumed as they are read, so that whatever is left
/// over is an unknown parameter.
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Wraps decoded `(name, value)` pairs, in request order.
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    /// Every value of `name` (repeats and comma lists both allowed), removed.
    pub fn take_all(&mut self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.pairs.retain(|(k, v)| {
            if k == name {
                out.push(v.clone());
                false
            } else {
                true
            }
        });
        out
    }

    /// The single value of `name`, removed; a repeat is an error.
    pub fn take_one(&mut self, name: &str) -> Result<Option<String>, QueryError> {
        let mut all = self.take_all(name);
        match all.len() {
            0 => Ok(None),
            1 => Ok(all.pop()),
            _ => Err(QueryError::bad(
                "repeated_parameter",
                format!(
                    "parameter `{name}` is given {} times; give it once",
                    all.len()
                ),
            )),
        }
    }

    /// An RFC 3339 instant.
    pub fn time(&mut self, name: &str) -> Result<Option<DateTime<Utc>>, QueryError> {
        self.take_one(name)?
            .map(|v| parse_time(name, &v))
            .transpose()
    }

    /// A non-negative integer no larger than `max`.
    pub fn count(&mut self, name: &str, max: usize) -> Result<Option<usize>, QueryError> {
        let Some(v) = self.take_one(name)? else {
            return Ok(None);
        };
        match v.trim().parse::<usize>() {
            Ok(n) if n <= max => Ok(Some(n)),
            _ => Err(QueryError::bad(
                "invalid_parameter",
                format!("`{name}` must be a whole number from 0 to {max}, got `{v}`"),
            )),
        }
    }

    /// A timezone (IANA name).
    pub fn tz(&mut self) -> Result<Tz, QueryError> {
        match self.take_one("tz")? {
            None => Ok(Tz::UTC),
            Some(v) => v.parse::<Tz>().map_err(|_| {
                QueryError::bad(
                    "invalid_tz",
                    format!("tz `{v}` is not an IANA timezone name (e.g. `UTC`, `Europe/Berlin`, `America/New_York`)"),
                )
            }),
        }
    }

    /// `dimension=value` filters, each repeatable ("any of"), in dimension order.
    pub fn filters(&mut self) -> Result<Vec<(Dimension, Vec<String>)>, QueryError> {
        let mut out = Vec::new();
        for d in Dimension::ALL {
            let values = self.take_all(d.as_str());
            if !values.is_empty() {
                out.push((d, values));
            }
        }
        Ok(out)
    }

    /// Comma-separated dimensions (repeats allowed), without duplicates.
    pub fn dimensions(&mut self, name: &str) -> Result<Vec<Dimension>, QueryError> {
        let mut out = Vec::new();
        for v in self.take_all(name) {
            for part in v.split(',').map(str::trim) {
                if part.is_empty() {
                    return Err(QueryError::bad(
                        "unknown_dimension",
                        format!(
                            "{name} holds an empty name (`{name}={v}`); list dimensions separated by commas, or leave `{name}` out"
                        ),
                    ));
                }
                let d = Dimension::parse(part).ok_or_else(|| {
                    QueryError::bad(
                        "unknown_dimension",
                        format!(
                            "{name}: `{part}` is not a dimension; use any of: {}",
                            Dimension::ALL.map(|d| d.as_str()).join(", ")
                        ),
                    )
                })?;
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    /// Fails with the leftover names when any parameter was not read.
    pub fn finish(self, allowed: &str) -> Result<(), QueryError> {
        if self.pairs.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&str> = self.pairs.iter().map(|(k, _)| k.as_str()).collect();
        names.dedup();
        Err(QueryError::bad(
            "unknown_parameter",
            format!(
                "unknown parameter{} {}; allowed: {allowed}",
                if names.len() > 1 { "s" } else { "" },
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }
}

/// Parses an RFC 3339 instant, naming the parameter when it fails.
pub fn parse_time(name: &str, v: &str) -> Result<DateTime<Utc>, QueryError> {
    DateTime::parse_from_rfc3339(v.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            QueryError::bad(
                "invalid_time",
                format!("`{name}` must be an RFC 3339 time such as `2026-11-24T10:00:00Z` or `2026-11-24T10:00:00+01:00`; `{v}` is not ({e})"),
            )
        })
}

/// Parses a granularity value.
pub fn parse_granularity(v: &str) -> Result<Granularity, QueryError> {
    Granularity::parse(v.trim()).ok_or_else(|| {
        QueryError::bad(
            "invalid_granularity",
            format!("granularity `{v}` is not one of: minute, hour, day, month"),
        )
    })
}

/// Checks `from < to` and returns the pair.
pub fn range(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    default_from: impl FnOnce(DateTime<Utc>) -> DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), QueryError> {
    let to = to.unwrap_or(now);
    let from = from.unwrap_or_else(|| default_from(to));
    if from >= to {
        return Err(QueryError::bad(
            "invalid_range",
            format!("`from` ({from}) must be before `to` ({to}): the range is [from, to)"),
        ));
    }
    if to - from > Duration::days(3660) {
        return Err(QueryError::bad(
            "range_too_long",
            "the range is longer than 10 years (3660 days), the most one query may span",
        ));
    }
    Ok((from, to))
}
