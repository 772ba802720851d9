//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes, the response and request types, and the route table in
//! [`super::routes`]. Nothing here is typed by hand twice: dimension, measure
//! and ordering lists come from the enums the parsers use, the scopes from
//! [`super::auth::required_scope`], the bounds from the validation constants.
//!
//! `src/http/openapi.json` is a committed copy for readers; a test
//! regenerates it and fails when it differs (`TALLY_BLESS=1` rewrites it).

use std::sync::LazyLock;

use axum::http::Method;
use serde::Serialize;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, ParameterStyle};
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, Required, ResponseBuilder};
use utoipa::{IntoParams, Modify, PartialSchema, ToSchema};

use super::auth::required_scope;
use crate::aggregate::spec::{Dimension, Granularity};
use crate::event::validate as rules;
use crate::event::ErrorType;
use crate::query::params::OrderBy;

/// The document, built once.
pub static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    serde_json::to_string_pretty(&*API).unwrap_or_else(|e| {
        format!("{{\"error\": \"the OpenAPI document cannot be written: {e}\"}}")
    })
});

/// Every route as `METHOD /path`, comma-separated, for the 404 message.
pub static ROUTES: LazyLock<String> = LazyLock::new(|| {
    let mut out = Vec::new();
    for (path, item) in &API.paths.paths {
        let ops = [
            ("GET", &item.get),
            ("PUT", &item.put),
            ("POST", &item.post),
            ("DELETE", &item.delete),
        ];
        for (method, op) in ops {
            if op.is_some() {
                out.push(format!("{method} {path}"));
            }
        }
    }
    out.join(", ")
});

/// The generated document, built once for both answers above.
static API: LazyLock<OpenApi> = LazyLock::new(document);

/// Generates the document from the route table and the types.
pub fn document() -> OpenApi {
    let (_, mut doc) = super::routes().split_for_parts();
    Finish.modify(&mut doc);
    doc
}

/// The error answer every route uses: `{"code": "...", "error": "..."}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// Stable, machine-readable code (README: "Errors").
    pub code: &'static str,
    /// What is wrong and what to do, for a person.
    pub error: String,
}

/// The document's root: what the routes cannot say about themselves.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Tally",
        description = "Event-sourced usage metering: ingest usage events, query exact aggregates, manage alert rules and quotas. Times are RFC 3339; ranges are half-open [from, to). Once any API token exists, every route except /healthz, /readyz and /openapi.json needs `Authorization: Bearer <token>`: POST /v1/events the `ingest` scope, every GET the `read` scope, every other change the `admin` scope (admin includes the others); 401 without a valid token, 403 without the scope. Every error answer is `{\"code\", \"error\"}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody, Event, EventsBody)),
    tags(
        (name = "ingest", description = "Usage events in"),
        (name = "query", description = "Aggregates out"),
        (name = "alerts", description = "Alert rules, alerts and key quotas"),
        (name = "corrections", description = "Voiding events and undoing that; the aggregates are restated"),
        (name = "prices", description = "The price catalog: cost for events sent without one; changes reprice the aggregates"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Adds what every operation shares, derived from the code that enforces it:
/// the security scheme, each operation's scope and its 401/403 answers.
struct Finish;

impl Modify for Finish {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token from `tally tokens create`"))
                    .build(),
            ),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            let ops = [
                (Method::GET, &mut item.get),
                (Method::PUT, &mut item.put),
                (Method::POST, &mut item.post),
                (Method::DELETE, &mut item.delete),
            ];
            for (method, op) in ops {
                if let Some(op) = op.as_mut() {
                    secure(op, &method, path);
                }
            }
        }
    }
}

fn secure(op: &mut Operation, method: &Method, path: &str) {
    // The middleware matches concrete paths; any value stands for a template.
    let concrete = path.replace("{key}", "k").replace("{name}", "n");
    let error = || {
        ContentBuilder::new()
            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "Error",
            ))))
            .build()
    };
    // Every route that reads the database may meet it down or a statement timeout.
    if !matches!(path, "/healthz" | "/openapi.json" | "/metrics") {
        op.responses.responses.entry("503".into()).or_insert_with(|| {
            ResponseBuilder::new()
                .description("The database is unavailable or the statement timed out (TALLY_QUERY_TIMEOUT); retry")
                .content("application/json", error())
                .into()
        });
    }
    match required_scope(method, &concrete) {
        None => op.security = Some(vec![SecurityRequirement::default()]),
        Some(scope) => {
            op.security = Some(vec![SecurityRequirement::new::<_, _, &str>("bearer", [])]);
            let note = format!(
                "\n\nNeeds a token with the `{}` scope once authentication is on.",
                scope.as_str()
            );
            let description = op.description.get_or_insert_with(String::new);
            description.push_str(note.trim_start_matches(|c| description.is_empty() && c == '\n'));
            op.responses
                .responses
                .entry("401".into())
                .or_insert_with(|| {
                    ResponseBuilder::new()
                        .description("No valid token (authentication is on)")
                        .content("application/json", error())
                        .into()
                });
            op.responses
                .responses
                .entry("403".into())
                .or_insert_with(|| {
                    ResponseBuilder::new()
                        .description(format!("The token lacks the `{}` scope", scope.as_str()))
                        .content("application/json", error())
                        .into()
                });
        }
    }
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn integer(min: i64, max: i64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(min))
        .maximum(Some(max))
}

/// A printable string of 1 to `max` characters (as the validator checks).
fn text(max: usize) -> ObjectBuilder {
    string()
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(r"^[^\x00-\x1f\x7f]+$"))
}

/// One usage event on the wire (README: "Event"). Built from the validator's
/// field list and bounds.
pub struct Event;

impl PartialSchema for Event {
    fn schema() -> RefOr<Schema> {
        let b = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "One API call. Unknown fields are rejected. `ts` must lie within the late-arrival horizon (TALLY_LATE_ARRIVAL_HORIZON) and at most 5 minutes ahead; an event outside it is rejected in the answer's `rejected`, not by the status.",
            ))
            .property("id", text(128).description(Some("Unique per event; a resend with the same id is a duplicate")))
            .property(
                "ts",
                OneOfBuilder::new()
                    .item(string().format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))))
                    .item(ObjectBuilder::new().schema_type(Type::Integer).format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64))))
                    .description(Some("When the call happened: RFC 3339, or integer epoch milliseconds")),
            )
            .property("api", text(128).description(Some("The API called (openai, serpapi, …)")))
            .property("endpoint", text(256))
            .property("method", text(16))
            .property("key", text(rules::MAX_KEY_CHARS).description(Some("The API key used")))
            .property("user", text(256))
            .property("model", text(256))
            .property("status", integer(100, 599).description(Some("HTTP status of the call")))
            .property("success", ObjectBuilder::new().schema_type(Type::Boolean).description(Some("Default: status < 400, or false when error_type is given")))
            .property(
                "error_type",
                string().enum_values(Some(ErrorType::ALL.map(ErrorType::as_str))).description(Some("Only on a failed call; default from the status")),
            )
            .property("error_message", string().max_length(Some(1024)))
            .property(
                "latency_ms",
                ObjectBuilder::new().schema_type(Type::Number).minimum(Some(0.0)).maximum(Some(rules::MAX_LATENCY_MS)),
            )
            .property("request_bytes", integer(0, rules::MAX_BYTES))
            .property("response_bytes", integer(0, rules::MAX_BYTES))
            .property("tokens_in", integer(0, rules::MAX_TOKENS))
            .property("tokens_out", integer(0, rules::MAX_TOKENS))
            .property(
                "cost",
                OneOfBuilder::new()
                    .item(string().pattern(Some(r"^[0-9]{1,4}(\.[0-9]{1,9})?$")))
                    .item(ObjectBuilder::new().schema_type(Type::Number).minimum(Some(0.0)).maximum(Some(1000.0)))
                    .description(Some("Currency units, at most 1000 and 9 decimals; a decimal string keeps it exact")),
            )
            .property("cached", ObjectBuilder::new().schema_type(Type::Boolean))
            .property(
                "metadata",
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .max_properties(Some(rules::MAX_METADATA_ENTRIES))
                    .property_names(Some(string().min_length(Some(1)).max_length(Some(rules::MAX_METADATA_KEY_CHARS))))
                    .additional_properties(Some(AdditionalProperties::RefOr(
                        string().max_length(Some(rules::MAX_METADATA_VALUE_CHARS)).into(),
                    ))),
            )
            .required("id")
            .required("ts")
            .required("api")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        RefOr::T(Schema::Object(b.build()))
    }
}

impl ToSchema for Event {}

/// `POST /v1/events` bodies in JSON (plain or CloudEvents, structured or
/// batch): one item or a non-empty array of them.
pub struct EventsBody;

impl ToSchema for EventsBody {}

impl PartialSchema for EventsBody {
    fn schema() -> RefOr<Schema> {
        events_body()
    }
}

///
/// Each item should be an [`Event`], but the body schema does not say so:
/// items are validated one by one, and an invalid one is listed in the
/// answer's `rejected` (status 200) while its neighbours are stored. Only
/// what refuses the whole body (not an object or a non-empty array) is in
/// the schema, so a contract tester sees the statuses Tally really answers.
fn events_body() -> RefOr<Schema> {
    let item = || {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "An event (see the `Event` schema), or a CloudEvent whose `data` is one",
            ))
    };
    OneOfBuilder::new()
        .item(item())
        .item(
            ArrayBuilder::new()
                .items(
                    ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
                        .description(Some("An event (see the `Event` schema); anything else is listed in `rejected`")),
                )
                .min_items(Some(1))
                .description(Some("At most TALLY_MAX_BATCH_EVENTS events (413 `too_many_events` beyond)")),
        )
        .description(Some("One item or a non-empty array of items: events, or with a CloudEvents content type CloudEvents whose `data` is an event. Each item is validated on its own against the `Event` schema; an invalid item is listed in the answer's `rejected` while the others are stored."))
        .into()
}

fn query(name: &str, description: &str, schema: impl Into<RefOr<Schema>>) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

fn time(name: &str, description: &str) -> Parameter {
    query(
        name,
        description,
        string().format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
    )
}

/// `tz`: an IANA zone name such as `UTC` or `Europe/Berlin`.
fn tz(description: &str) -> Parameter {
    query(
        "tz",
        description,
        string()
            .pattern(Some(TZ_PATTERN))
            .max_length(Some(64))
            .examples(["UTC", "Europe/Berlin"]),
    )
}

/// The shape of an IANA zone name; the server checks the name itself.
pub const TZ_PATTERN: &str = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}$";

fn order_by(description: &str) -> Parameter {
    query(
        "order_by",
        description,
        string().enum_values(Some(OrderBy::names())),
    )
}

/// The `dimension=value` filters, each repeatable.
fn filters(except: Option<Dimension>) -> Vec<Parameter> {
    Dimension::ALL
        .into_iter()
        .filter(|d| Some(*d) != except)
        .map(|d| {
            let mut p = query(
                d.as_str(),
                &format!("Only events whose `{}` is one of these values (repeat the parameter). Absent values are the empty string.", d.as_str()),
                ArrayBuilder::new().items(string()),
            );
            p.style = Some(ParameterStyle::Form);
            p.explode = Some(true);
            p
        })
        .collect()
}

/// The query string of `GET /v1/stats`.
pub struct StatsParams;

impl IntoParams for StatsParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let mut group_by = query(
            "group_by",
            "Dimensions to split the series by, comma-separated (or repeated). The combination must be covered by a loaded projection at this granularity and timezone (see GET /v1/projections); otherwise 400 `no_projection`.",
            ArrayBuilder::new()
                .items(string().enum_values(Some(Dimension::ALL.map(Dimension::as_str))))
                .unique_items(true)
                .max_items(Some(Dimension::ALL.len())),
        );
        group_by.style = Some(ParameterStyle::Form);
        group_by.explode = Some(false);
        let mut out = vec![
            time("from", "Range start (inclusive); must be before `to`. Default: `to` minus 1 h (minute), 24 h (hour), 30 d (day), 365 d (month). At most 3660 days before `to`."),
            time("to", "Range end (exclusive). Default: now."),
            query(
                "granularity",
                "Bucket size. Default hour.",
                string().enum_values(Some(Granularity::ALL.map(Granularity::as_str))),
            ),
            group_by,
            tz("IANA timezone of hour/day/month buckets. Default UTC. A projection kept in another zone answers when its buckets tile these exactly (a UTC hour table serves every whole-hour zone; a minute table, within its retention, serves the others); otherwise 400 `no_projection`."),
            order_by("Rank groups by this total (descending; ties by group values). With `limit`: top-N groups."),
            query(
                "limit",
                "Keep the first N groups of the ranking (default ranking: requests).",
                integer(1, crate::query::MAX_POINTS as i64),
            ),
            query(
                "fill",
                "`zero`: include empty buckets as zeros for every group.",
                string().enum_values(Some(["zero", "none"])),
            ),
            query(
                "series",
                "`false`: answer the totals only (`series` is then empty and the point limit applies to the groups). Default `true`.",
                string().enum_values(Some(["true", "false"])),
            ),
        ];
        out.extend(filters(None));
        out
    }
}

/// The query string of `GET /v1/keys`.
pub struct KeysParams;

impl IntoParams for KeysParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let mut out = vec![
            time("from", "Range start (inclusive); must be before `to`. Default: start of this month (in tz)."),
            time("to", "Range end (exclusive). Default: now."),
            tz("IANA timezone of the tables used. Default UTC."),
            order_by("Ranking measure (descending). Default cost."),
            query("limit", "Keys returned. Default 50.", integer(1, crate::query::keys::MAX_KEYS as i64)),
            query("offset", "Keys skipped. Default 0.", integer(0, crate::query::keys::MAX_OFFSET as i64)),
        ];
        out.extend(filters(Some(Dimension::Key)));
        out
    }
}

/// The query string of `GET /v1/keys/{key}/stats`.
pub struct KeyPageParams;

impl IntoParams for KeyPageParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            key_path(),
            time("at", "The instant the page is computed for. Default now."),
            tz("Timezone of today and this month. Default UTC."),
        ]
    }
}

/// The `{key}` path segment, as long as an event's `key` may be.
fn key_path() -> Parameter {
    ParameterBuilder::new()
        .name("key")
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some("The API key"))
        .schema(Some(
            string()
                .min_length(Some(1))
                .max_length(Some(rules::MAX_KEY_CHARS)),
        ))
        .build()
}

/// The `{key}` path segment.
pub struct KeyParam;

impl IntoParams for KeyParam {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![key_path()]
    }
}

/// `X-Tally-Actor`: who makes a change.
pub struct ActorParam;

impl IntoParams for ActorParam {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![ParameterBuilder::new()
            .name("X-Tally-Actor")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some("Who makes the change, recorded in the audit trail (default `anonymous`; longer values are cut to 200 characters; replaced by `token:<name>` with authentication on)"))
            .schema(Some(string()))
            .build()]
    }
}

/// The `{name}` path segment of a rule.
pub struct RuleNameParam;

impl IntoParams for RuleNameParam {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![ParameterBuilder::new()
            .name("name")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .description(Some("Rule name"))
            .schema(Some(
                string().pattern(Some(crate::alert::rule::NAME_PATTERN)),
            ))
            .build()]
    }
}

/// The query string of `GET /v1/alerts`.
pub struct AlertsParams;

impl IntoParams for AlertsParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let dims = Dimension::ALL.map(Dimension::as_str).join("|");
        let mut group = query(
            "group",
            "`dimension:value` (repeat for several): only alerts of groups with these values",
            ArrayBuilder::new().items(string().pattern(Some(format!("^({dims}):")))),
        );
        group.style = Some(ParameterStyle::Form);
        group.explode = Some(true);
        vec![
            query("rule", "Only this rule", string()),
            query(
                "state",
                "Only alerts in this state (history: firing or resolved)",
                string().enum_values(Some(["pending", "firing", "resolved"])),
            ),
            group,
            time("from", "History recorded at or after"),
            time("to", "History recorded before"),
            query(
                "limit",
                "Most history entries (default 100)",
                integer(1, 10_000),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed `openapi.json` is what the code generates. Run with
    /// `TALLY_BLESS=1` to rewrite it after changing a route or a type.
    #[test]
    fn committed_document_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/openapi.json");
        let generated = format!("{}\n", DOCUMENT.as_str());
        if std::env::var_os("TALLY_BLESS").is_some() {
            std::fs::write(path, &generated).expect("write openapi.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "src/http/openapi.json differs from the document the code generates; \
             run `TALLY_BLESS=1 cargo test -p tally committed_document` and commit the file"
        );
    }

    /// Every documented operation has a scope rule, and the lists come from the enums.
    #[test]
    fn the_document_is_derived_from_the_definitions() {
        let doc: serde_json::Value = serde_json::from_str(&DOCUMENT).expect("json");
        let params = doc["paths"]["/v1/stats"]["get"]["parameters"]
            .as_array()
            .expect("parameters");
        let order = params
            .iter()
            .find(|p| p["name"] == "order_by")
            .expect("order_by");
        assert_eq!(
            order["schema"]["enum"].as_array().map(Vec::len),
            Some(OrderBy::names().len())
        );
        for d in Dimension::ALL {
            assert!(
                params.iter().any(|p| p["name"] == d.as_str()),
                "filter {} undocumented",
                d.as_str()
            );
        }
        // Patterns typed in `#[schema]` attributes (which take literals only)
        // agree with the constants the server validates with.
        let rule = &doc["components"]["schemas"]["Rule"]["properties"];
        assert_eq!(rule["name"]["pattern"], crate::alert::rule::NAME_PATTERN);
        assert_eq!(rule["timezone"]["pattern"], TZ_PATTERN);
        let stats = &doc["paths"]["/v1/stats"]["get"];
        assert!(stats["responses"]["401"].is_object() && stats["responses"]["403"].is_object());
        assert_eq!(
            doc["paths"]["/healthz"]["get"]["security"],
            serde_json::json!([{}])
        );
    }
}
