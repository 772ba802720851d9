//! The JSON shapes of query answers (documented in README.md and `/openapi.json`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::aggregate::spec::Dimension;
use crate::aggregate::Measures;
use crate::event::cost::format_nanos;

/// Dimension values of a group, serialized as an object in group_by order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Group(pub Vec<(Dimension, String)>);

impl utoipa::PartialSchema for Group {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
        let names = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(Dimension::ALL.map(Dimension::as_str)));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "Dimension values of the group, in group_by order (absent values are the empty string)",
            ))
            .property_names(Some(names))
            .additional_properties(Some(AdditionalProperties::RefOr(
                ObjectBuilder::new().schema_type(Type::String).into(),
            )))
            .into()
    }
}

impl utoipa::ToSchema for Group {}

impl Serialize for Group {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (d, v) in &self.0 {
            map.serialize_entry(d.as_str(), v)?;
        }
        map.end()
    }
}

/// Errors per type.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorsByType {
    /// `rate_limit`
    pub rate_limit: i64,
    /// `timeout`
    pub timeout: i64,
    /// `server_error`
    pub server_error: i64,
    /// `client_error`
    pub client_error: i64,
    /// `other`
    pub other: i64,
}

/// Latency figures in milliseconds; `null` when no event carried a latency.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Latency {
    /// Exact mean (from the microsecond sum).
    pub avg: Option<f64>,
    /// Exact minimum.
    pub min: Option<f64>,
    /// Exact maximum.
    pub max: Option<f64>,
    /// Median, within 1% relative error.
    pub p50: Option<f64>,
    /// 95th percentile, within 1% relative error.
    pub p95: Option<f64>,
    /// 99th percentile, within 1% relative error.
    pub p99: Option<f64>,
}

/// The measures of one point or total.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Measures)]
pub struct MeasuresOut {
    /// Events.
    pub requests: i64,
    /// Events with `success = true`.
    pub successes: i64,
    /// Events with `success = false`.
    pub errors: i64,
    /// Errors per type.
    pub errors_by_type: ErrorsByType,
    /// Events served from a cache.
    pub cached: i64,
    /// `successes / requests`; `null` when there were no requests.
    pub success_rate: Option<f64>,
    /// Latency.
    pub latency_ms: Latency,
    /// Sum of request bytes.
    pub request_bytes: i64,
    /// Sum of response bytes.
    pub response_bytes: i64,
    /// Sum of input tokens.
    pub tokens_in: i64,
    /// Sum of output tokens.
    pub tokens_out: i64,
    /// Exact decimal cost with 9 fractional digits.
    #[schema(pattern = r"^-?[0-9]+\.[0-9]{9}$", example = "0.001250000")]
    pub cost: String,
    /// The same cost as an integer number of nano-units.
    pub cost_nanos: i64,
    /// The part of `cost` computed from the price catalog (events sent
    /// without a `cost`), exact decimal.
    #[schema(pattern = r"^-?[0-9]+\.[0-9]{9}$", example = "0.000250000")]
    pub cost_from_catalog: String,
    /// The same as an integer number of nano-units.
    pub cost_from_catalog_nanos: i64,
    /// Events with neither a `cost` nor a price in effect (counted at cost 0).
    pub unpriced: i64,
}

impl From<&Measures> for MeasuresOut {
    fn from(m: &Measures) -> Self {
        let [rate_limit, timeout, server_error, client_error, other] = m.errors_by_type;
        let has_latency = m.latency_count > 0;
        let [p50, p95, p99] = m.latency_quantiles([0.5, 0.95, 0.99]);
        Self {
            requests: m.requests,
            successes: m.successes,
            errors: m.errors,
            errors_by_type: ErrorsByType {
                rate_limit,
                timeout,
                server_error,
                client_error,
                other,
            },
            cached: m.cache_hits,
            success_rate: (m.requests > 0).then(|| m.successes as f64 / m.requests as f64),
            latency_ms: Latency {
                avg: has_latency.then(|| m.latency_sum_us as f64 / m.latency_count as f64 / 1000.0),
                min: m.latency_min_ms,
                max: m.latency_max_ms,
                p50,
                p95,
                p99,
            },
            request_bytes: m.request_bytes,
            response_bytes: m.response_bytes,
            tokens_in: m.tokens_in,
            tokens_out: m.tokens_out,
            cost: format_nanos(m.cost_nanos),
            cost_nanos: m.cost_nanos,
            cost_from_catalog: format_nanos(m.cost_from_catalog_nanos),
            cost_from_catalog_nanos: m.cost_from_catalog_nanos,
            unpriced: m.unpriced,
        }
    }
}

/// A bucket of one group.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Point {
    /// Bucket start (UTC).
    #[serde(serialize_with = "rfc3339")]
    pub bucket: DateTime<Utc>,
    /// The group's dimension values.
    pub group: Group,
    /// Its measures.
    #[serde(flatten)]
    pub measures: MeasuresOut,
}

/// A group's measures over the whole range.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Total {
    /// The group's dimension values.
    pub group: Group,
    /// Its measures.
    #[serde(flatten)]
    pub measures: MeasuresOut,
}

/// A range actually counted.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Covered {
    /// Start of the first bucket counted.
    #[serde(serialize_with = "rfc3339")]
    pub from: DateTime<Utc>,
    /// End of the last bucket counted.
    #[serde(serialize_with = "rfc3339")]
    pub to: DateTime<Utc>,
}

/// Serializes an instant as `2026-11-24T10:00:00Z` (sub-seconds only when present).
pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// [`rfc3339`] for optional instants.
pub fn rfc3339_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}
