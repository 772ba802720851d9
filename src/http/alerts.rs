//! The alert routes: `/v1/alert-rules` (CRUD with audit), `/v1/alerts`
//! (active instances and notification history) and `/v1/keys/{key}/quota`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::auth::actor;
use super::body::read_admin_body;
use super::error::ApiError;
use super::openapi::{ActorParam, ErrorBody, KeyParam, RuleNameParam};
use super::state::AppState;
use crate::alert::notice::Notice;
use crate::alert::quota::{self, QuotaSpec, QuotaStatus};
use crate::alert::rule::RuleSpec;
use crate::alert::AlertError;
use crate::query::params::parse_time;
use crate::query::QueryError;
use crate::store::alerts::{
    AlertState, AuditRow, HistoryFilter, RuleFailure, RuleRow, RuleWritten, WriteMode,
};

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A rule as answered: its spec plus version, change metadata and, when
/// listed, whether it can be evaluated now.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredRule {
    /// The rule as written.
    #[serde(flatten)]
    #[schema(value_type = RuleFields)]
    pub spec: Map<String, Value>,
    /// Incremented by every change.
    pub version: i64,
    /// When it was created.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When it last changed.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// Who changed it last (`token:<name>` with authentication on).
    pub updated_by: String,
    /// `ok`, or `failing` when it cannot be evaluated now (the others still are); listed rules only.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^(ok|failing)$")]
    pub status: Option<&'static str>,
    /// Why it is failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when it is failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub failing_since: Option<String>,
}

/// The fields of a [`RuleSpec`] inside an answer that adds its own: the
/// rule's schema without `additionalProperties: false`, which would forbid
/// the added fields under `allOf`.
pub struct RuleFields;

impl utoipa::PartialSchema for RuleFields {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let mut schema = <RuleSpec as utoipa::PartialSchema>::schema();
        if let utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::Object(o)) = &mut schema {
            o.additional_properties = None;
        }
        schema
    }
}

impl ToSchema for RuleFields {}

/// A rule as answered, without a status.
pub fn rule_view(row: &RuleRow) -> StoredRule {
    StoredRule {
        spec: serde_json::from_str(&row.spec).unwrap_or_default(),
        version: row.version,
        created_at: time(row.created_at),
        updated_at: time(row.updated_at),
        updated_by: row.updated_by.clone(),
        status: None,
        error: None,
        failing_since: None,
    }
}

/// One change of a rule or quota.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    /// Increasing id.
    pub id: i64,
    /// When.
    #[schema(format = DateTime)]
    pub at: String,
    /// Who (`X-Tally-Actor`, or `token:<name>` with authentication on).
    pub actor: String,
    /// `rule.create`, `rule.update`, `rule.delete`, `quota.set` or `quota.delete`.
    #[schema(pattern = r"^(rule\.(create|update|delete)|quota\.(set|delete))$")]
    pub action: String,
    /// The rule name or key.
    pub target: String,
    /// The rule or quota before (`null` when created).
    #[schema(value_type = Option<Object>)]
    pub before: Value,
    /// After (`null` when deleted).
    #[schema(value_type = Option<Object>)]
    pub after: Value,
}

pub(super) fn audit_view(a: &AuditRow) -> AuditEntry {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .unwrap_or(Value::Null)
    };
    AuditEntry {
        id: a.id,
        at: time(a.at),
        actor: a.actor.clone(),
        action: a.action.clone(),
        target: a.target.clone(),
        before: parse(&a.before),
        after: parse(&a.after),
    }
}

/// `GET /v1/alert-rules`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    /// Every rule, by name.
    pub rules: Vec<StoredRule>,
}

/// `GET /v1/alert-rules/{name}/audit`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
}

/// An alert pending or firing now.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActiveAlert {
    /// The instance's fingerprint (rule, level, group).
    pub alert_id: String,
    /// Rule name.
    pub rule: String,
    /// `pending` (condition holds, `for` not yet elapsed) or `firing`.
    #[schema(value_type = String, pattern = "^(pending|firing)$")]
    pub state: &'static str,
    /// Severity.
    pub severity: String,
    /// The group's dimension values.
    #[schema(value_type = BTreeMap<String, String>)]
    pub group: Value,
    /// The last evaluated value.
    pub value: Option<f64>,
    /// The threshold it is compared with.
    pub threshold: Option<f64>,
    /// The fraction of the limit (limit rules), else `null`.
    pub level: Option<f64>,
    /// When the condition started holding.
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    /// When it started firing.
    #[schema(format = DateTime)]
    pub firing_since: Option<String>,
    /// Transitions notified so far.
    pub sequence: i64,
}

/// A notification as sent, with its delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct Sent {
    /// The notification's body as published.
    #[serde(flatten)]
    #[schema(value_type = Notice)]
    pub body: Map<String, Value>,
    /// The NATS subject.
    pub subject: String,
    /// When it was recorded.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When NATS acknowledged it (`null` while queued).
    #[schema(format = DateTime)]
    pub sent_at: Option<String>,
}

/// `GET /v1/alerts`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    /// Alerts pending or firing now.
    pub active: Vec<ActiveAlert>,
    /// Notifications, newest first.
    pub history: Vec<Sent>,
}

/// Parses and validates a rule body.
fn parse_rule(state: &AppState, body: &[u8]) -> Result<RuleSpec, ApiError> {
    let spec = RuleSpec::from_json(body)?;
    if let Some(why) = crate::alert::reserved(&spec.name) {
        return Err(AlertError::Invalid(format!("`{}` {why}", spec.name)).into());
    }
    spec.validate("", &state.catalog.specs)?;
    Ok(spec)
}

fn not_found(what: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
}

/// `POST /v1/alert-rules`: 201, or 400 when the name is taken.
#[utoipa::path(
    post, path = "/v1/alert-rules", tag = "alerts",
    summary = "Create an alert rule",
    description = "Either `threshold` (with `op`, optionally `baseline`) or `limit` with `warn_at`. The rule's scope and group_by must be covered by a loaded projection with buckets fine enough for its window; otherwise 400 `invalid_rule` says what to change.",
    params(ActorParam),
    request_body(content = RuleSpec, description = "The rule"),
    responses(
        (status = 201, description = "Created", body = StoredRule),
        (status = 400, description = "Invalid rule (`invalid_rule`) or the name is taken (`name_taken`)", body = ErrorBody),
        (status = 413, description = "The body is larger than 1 MiB", body = ErrorBody),
    )
)]
pub async fn create_rule(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_admin_body(&state, &headers, body).await?;
    let spec = parse_rule(&state, &body)?;
    let written = state
        .store
        .alerts()
        .write_rule_capped(
            &spec.name,
            &spec.to_json(),
            &actor(&headers),
            WriteMode::Create,
            Some(state.rule_limits.max_rules),
        )
        .await
        .map_err(AlertError::from)?;
    state.signal.wake();
    match written {
        RuleWritten::Created(row) => {
            Ok((StatusCode::CREATED, Json(rule_view(&row))).into_response())
        }
        RuleWritten::TooMany(max) => Err(too_many_rules(max)),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "name_taken",
            format!(
                "a rule named `{}` already exists; choose another name, or replace it with PUT /v1/alert-rules/{}",
                spec.name, spec.name
            ),
        )),
    }
}

/// The answer to a new rule past `TALLY_MAX_RULES`.
fn too_many_rules(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "too_many_rules",
        format!("{max} alert rules exist, the most this server allows (TALLY_MAX_RULES): delete one, or raise the cap; existing rules can still be replaced"),
    )
}

/// `PUT /v1/alert-rules/{name}`: creates (201) or replaces (200).
#[utoipa::path(
    put, path = "/v1/alert-rules/{name}", tag = "alerts",
    summary = "Create (201) or replace (200) a rule",
    description = "The body's `name` may be left out; when given it must equal the path's. See POST /v1/alert-rules for what makes a rule valid.",
    params(RuleNameParam, ActorParam),
    request_body(content = RuleSpec, description = "The rule"),
    responses(
        (status = 200, description = "Replaced (or unchanged)", body = StoredRule),
        (status = 201, description = "Created", body = StoredRule),
        (status = 400, description = "Invalid rule", body = ErrorBody),
        (status = 409, description = "Created concurrently by another request; retry", body = ErrorBody),
        (status = 413, description = "The body is larger than 1 MiB", body = ErrorBody),
    )
)]
pub async fn put_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_admin_body(&state, &headers, body).await?;
    let mut value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::from(AlertError::Invalid(format!(
            "the rule is not valid JSON: {e}"
        )))
    })?;
    if let Some(o) = value.as_object_mut() {
        match o.get("name") {
            None => {
                o.insert("name".into(), json!(name));
            }
            Some(n) if n.as_str() == Some(name.as_str()) => {}
            Some(n) => {
                return Err(AlertError::Invalid(format!(
                    "the body's name {n} differs from the path's `{name}`; rules are renamed by DELETE and POST"
                ))
                .into())
            }
        }
    }
    let spec = parse_rule(&state, value.to_string().as_bytes())?;
    let written = state
        .store
        .alerts()
        .write_rule_capped(
            &name,
            &spec.to_json(),
            &actor(&headers),
            WriteMode::Upsert,
            Some(state.rule_limits.max_rules),
        )
        .await
        .map_err(AlertError::from)?;
    state.signal.wake();
    Ok(match written {
        RuleWritten::Created(row) => (StatusCode::CREATED, Json(rule_view(&row))).into_response(),
        RuleWritten::Updated(row) | RuleWritten::Unchanged(row) => {
            Json(rule_view(&row)).into_response()
        }
        RuleWritten::TooMany(max) => return Err(too_many_rules(max)),
        RuleWritten::Exists => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "the rule was created concurrently; retry",
            ))
        }
    })
}

/// `GET /v1/alert-rules`.
#[utoipa::path(
    get, path = "/v1/alert-rules", tag = "alerts",
    summary = "Every alert rule, with whether it can be evaluated now",
    responses((status = 200, description = "Rules", body = RuleList)),
)]
pub async fn list_rules(State(state): State<AppState>) -> Result<Json<RuleList>, ApiError> {
    let rules = rules_with_status(&state).await?;
    Ok(Json(RuleList {
        rules: rules.into_iter().map(|(_, view)| view).collect(),
    }))
}

/// Every rule (by name) with its view, status included.
async fn rules_with_status(state: &AppState) -> Result<Vec<(RuleRow, StoredRule)>, ApiError> {
    let alerts = state.store.alerts();
    let rows = alerts.alert_rules().await.map_err(AlertError::from)?;
    let failures = alerts.rule_failures().await.map_err(AlertError::from)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let view = with_status(rule_view(&r), &r, &failures);
            (r, view)
        })
        .collect())
}

/// Adds `status` (`ok` or `failing`), and for a failing rule `error` and
/// `failing_since`, to a rule's view.
fn with_status(mut view: StoredRule, row: &RuleRow, failures: &[RuleFailure]) -> StoredRule {
    match failures.iter().find(|f| f.uid == row.uid) {
        None => view.status = Some("ok"),
        Some(f) => {
            view.status = Some("failing");
            view.error = Some(f.error.clone());
            view.failing_since = Some(time(f.since));
        }
    }
    view
}

/// `GET /v1/alert-rules/{name}`.
#[utoipa::path(
    get, path = "/v1/alert-rules/{name}", tag = "alerts", summary = "One rule",
    params(RuleNameParam),
    responses(
        (status = 200, description = "The rule", body = StoredRule),
        (status = 404, description = "No rule has this name", body = ErrorBody),
    )
)]
pub async fn get_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<StoredRule>, ApiError> {
    let rules = rules_with_status(&state).await?;
    match rules.into_iter().find(|(r, _)| r.name == name) {
        Some((_, view)) => Ok(Json(view)),
        None => Err(not_found(format!("no alert rule named `{name}`"))),
    }
}

/// `DELETE /v1/alert-rules/{name}`: 204; its firing alerts resolve at the next evaluation.
#[utoipa::path(
    delete, path = "/v1/alert-rules/{name}", tag = "alerts",
    summary = "Delete a rule; its firing alerts resolve",
    params(RuleNameParam, ActorParam),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No rule has this name", body = ErrorBody),
    )
)]
pub async fn delete_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let removed = state
        .store
        .alerts()
        .delete_rule(&name, &actor(&headers))
        .await;
    deleted(&state, removed.map_err(AlertError::from)?.is_some(), || {
        format!("no alert rule named `{name}`")
    })
}

/// `204` after a deletion that found its target (the evaluator is woken to
/// resolve what it fired), else `404` with `missing`.
fn deleted(
    state: &AppState,
    found: bool,
    missing: impl FnOnce() -> String,
) -> Result<Response, ApiError> {
    if !found {
        return Err(not_found(missing()));
    }
    state.signal.wake();
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/alert-rules/{name}/audit`: every change, newest first.
#[utoipa::path(
    get, path = "/v1/alert-rules/{name}/audit", tag = "alerts",
    summary = "Who changed the rule, when, from what to what (newest first, at most 1000)",
    params(RuleNameParam),
    responses(
        (status = 200, description = "Audit entries (none for a name never used)", body = AuditList),
        (status = 400, description = "The name cannot be a rule's", body = ErrorBody),
    ),
)]
pub async fn rule_audit(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<AuditList>, ApiError> {
    crate::alert::rule::check_name(&name)?;
    let rows = state
        .store
        .alerts()
        .audit_log(Some(&name), 1000)
        .await
        .map_err(AlertError::from)?;
    Ok(Json(AuditList {
        entries: rows.iter().map(audit_view).collect(),
    }))
}

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn bad(message: String) -> ApiError {
    ApiError::from(QueryError::bad("invalid_parameter", message))
}

/// `GET /v1/alerts?rule=&state=&group=dim:value&from=&to=&limit=`: instances
/// now pending or firing, and the notification history (newest first).
#[utoipa::path(
    get, path = "/v1/alerts", tag = "alerts",
    summary = "Alerts pending or firing now, and the notification history (newest first)",
    params(super::openapi::AlertsParams),
    responses(
        (status = 200, description = "Active alerts and history", body = AlertList),
        (status = 400, description = "A parameter is invalid", body = ErrorBody),
    )
)]
pub async fn list_alerts(
    State(state): State<AppState>,
    q: Pairs,
) -> Result<Json<AlertList>, ApiError> {
    let Query(pairs) = q.map_err(|e| bad(format!("the query string cannot be decoded: {e}")))?;
    let mut filter = HistoryFilter {
        limit: 100,
        ..HistoryFilter::default()
    };
    let mut groups: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "rule" => filter.rule = Some(v),
            "state" => match AlertState::parse(&v) {
                Some(s) if s != AlertState::Inactive => filter.state = Some(s),
                _ => return Err(bad(format!("`state` {v:?} must be firing, pending or resolved"))),
            },
            "group" => match v.split_once(':') {
                Some((d, val)) => groups.push((d.to_string(), val.to_string())),
                None => return Err(bad(format!("`group` {v:?} must be dimension:value, e.g. key:k1"))),
            },
            "from" => filter.from = Some(parse_time("from", &v)?),
            "to" => filter.to = Some(parse_time("to", &v)?),
            "limit" => {
                filter.limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| bad(format!("`limit` {v:?} must be from 1 to 10000")))?
            }
            other => {
                return Err(bad(format!(
                    "unknown parameter `{other}`; /v1/alerts accepts rule, state, group, from, to, limit"
                )))
            }
        }
    }
    let group_ok = |g: &Value| {
        groups
            .iter()
            .all(|(d, v)| g.get(d).and_then(Value::as_str) == Some(v.as_str()))
    };
    let history_filter = HistoryFilter {
        // Pending is never notified: history filters only on firing/resolved.
        state: filter.state,
        limit: if groups.is_empty() {
            filter.limit
        } else {
            10_000
        },
        ..filter.clone()
    };
    let (instances, history) = tokio::join!(
        state.store.alerts().active_instances(),
        state.store.alerts().notifications(&history_filter)
    );
    let instances = instances.map_err(AlertError::from)?;
    let active = instances
        .iter()
        .filter(|i| i.life.state.is_active())
        .filter(|i| filter.rule.as_ref().is_none_or(|r| *r == i.rule))
        .filter(|i| filter.state.is_none_or(|s| s == i.life.state))
        .filter_map(|i| {
            let group: Value = serde_json::from_str(&i.group).unwrap_or(json!({}));
            group_ok(&group).then(|| ActiveAlert {
                alert_id: i.fingerprint.clone(),
                rule: i.rule.clone(),
                state: i.life.state.as_str(),
                severity: i.severity.clone(),
                group,
                value: i.value,
                threshold: i.threshold,
                level: i.level.parse::<f64>().ok(),
                started_at: i.life.active_since.map(time),
                firing_since: i.life.firing_since.map(time),
                sequence: i.life.sequence,
            })
        })
        .collect();
    let history = history
        .map_err(AlertError::from)?
        .into_iter()
        .filter_map(|n| {
            let body: Map<String, Value> = serde_json::from_str(&n.n.payload).ok()?;
            let group = body.get("group").cloned().unwrap_or(json!({}));
            group_ok(&group).then(|| Sent {
                body,
                subject: n.n.subject,
                created_at: time(n.n.created_at),
                sent_at: n.sent_at.map(time),
            })
        })
        .take(usize::try_from(filter.limit).unwrap_or(100))
        .collect();
    Ok(Json(AlertList { active, history }))
}

/// `PUT /v1/keys/{key}/quota`: sets (201) or replaces (200) the key's quota;
/// answers its current status.
#[utoipa::path(
    put, path = "/v1/keys/{key}/quota", tag = "alerts",
    summary = "Set the key's rolling quota (201 new, 200 replaced); crossing it fires `quota_exceeded`",
    params(KeyParam, ActorParam),
    request_body(content = QuotaSpec, description = "The quota"),
    responses(
        (status = 200, description = "Replaced; the quota's status now", body = QuotaStatus),
        (status = 201, description = "Set; the quota's status now", body = QuotaStatus),
        (status = 400, description = "Invalid quota, or a window longer than the minute projection keeps data", body = ErrorBody),
        (status = 413, description = "The body is larger than 1 MiB", body = ErrorBody),
    )
)]
pub async fn put_quota(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = read_admin_body(&state, &headers, body).await?;
    let spec = QuotaSpec::from_json(&body)?;
    let quota = spec.validate(&key, &state.catalog.specs)?;
    let text = serde_json::to_string(&spec).unwrap_or_default();
    let max = state.rule_limits.max_quotas;
    let (_, created) = state
        .store
        .alerts()
        .put_quota(&key, &text, &actor(&headers), max)
        .await
        .map_err(AlertError::from)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "too_many_rules",
                format!(
                    "{} key quotas exist, the most this server allows (TALLY_MAX_QUOTAS): delete one, or raise the cap; existing quotas can still be changed",
                    max.unwrap_or_default()
                ),
            )
        })?;
    state.signal.wake();
    let status = quota::status(&state.store, &state.catalog, &quota, Utc::now()).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(status)).into_response())
}

/// `GET /v1/keys/{key}/quota`: 404 when the key has none.
#[utoipa::path(
    get, path = "/v1/keys/{key}/quota", tag = "alerts",
    summary = "The key's rolling quota: used, remaining, exceeded, resets_at (one-minute precision)",
    params(KeyParam),
    responses(
        (status = 200, description = "The quota's status now", body = QuotaStatus),
        (status = 404, description = "The key has no quota", body = ErrorBody),
    )
)]
pub async fn get_quota(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<QuotaStatus>, ApiError> {
    match quota::load(&state.store, &state.catalog, &key).await? {
        Some(q) => Ok(Json(
            quota::status(&state.store, &state.catalog, &q, Utc::now()).await?,
        )),
        None => Err(not_found(format!(
            "key `{key}` has no quota; set one with PUT /v1/keys/{key}/quota {{\"measure\": \"tokens\", \"limit\": 100000, \"window\": \"5h\"}}"
        ))),
    }
}

/// `DELETE /v1/keys/{key}/quota`.
#[utoipa::path(
    delete, path = "/v1/keys/{key}/quota", tag = "alerts",
    summary = "Remove the key's quota",
    params(KeyParam, ActorParam),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "The key has no quota", body = ErrorBody),
    )
)]
pub async fn delete_quota(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let removed = state
        .store
        .alerts()
        .delete_quota(&key, &actor(&headers))
        .await;
    deleted(&state, removed.map_err(AlertError::from)?, || {
        format!("key `{key}` has no quota")
    })
}
