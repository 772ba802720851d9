//! The alert routes: `/v1/alert-rules` (CRUD with audit), `/v1/alerts`
//! (active instances and notification history) and `/v1/keys/{key}/quota`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::body::read_admin_body;
use super::error::ApiError;
use super::state::AppState;
use crate::alert::quota::{self, QuotaSpec, QUOTA_RULE};
use crate::alert::rule::RuleSpec;
use crate::alert::AlertError;
use crate::query::params::parse_time;
use crate::query::QueryError;
use crate::store::alerts::{
    AlertState, AuditRow, HistoryFilter, RuleFailure, RuleRow, RuleWritten, WriteMode,
};

/// Who made a change: `X-Tally-Actor`, which the token middleware sets to
/// `token:<name>` (replacing what a client sent) when authentication is on;
/// else `anonymous`.
fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-tally-actor")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(200).collect::<String>())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "anonymous".to_string())
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A rule as answered: its spec plus version and change metadata.
pub fn rule_view(row: &RuleRow) -> Value {
    let mut v: Value = serde_json::from_str(&row.spec).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("version".into(), json!(row.version));
        o.insert("created_at".into(), json!(time(row.created_at)));
        o.insert("updated_at".into(), json!(time(row.updated_at)));
        o.insert("updated_by".into(), json!(row.updated_by));
    }
    v
}

fn audit_view(a: &AuditRow) -> Value {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .unwrap_or(Value::Null)
    };
    json!({
        "id": a.id,
        "at": time(a.at),
        "actor": a.actor,
        "action": a.action,
        "target": a.target,
        "before": parse(&a.before),
        "after": parse(&a.after),
    })
}

/// Parses and validates a rule body.
fn parse_rule(state: &AppState, body: &[u8]) -> Result<RuleSpec, ApiError> {
    let spec = RuleSpec::from_json(body)?;
    if spec.name == QUOTA_RULE {
        return Err(AlertError::Invalid(format!(
            "`{QUOTA_RULE}` is reserved for key quotas; set one with PUT /v1/keys/{{key}}/quota"
        ))
        .into());
    }
    if spec.name == crate::alert::reconcile::RECONCILIATION_RULE {
        return Err(AlertError::Invalid(format!(
            "`{}` is reserved for the reconciliation job",
            crate::alert::reconcile::RECONCILIATION_RULE
        ))
        .into());
    }
    spec.validate("", &state.catalog.specs)?;
    Ok(spec)
}

fn not_found(what: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
}

/// `POST /v1/alert-rules`: 201, or 400 when the name is taken.
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
        .write_rule(
            &spec.name,
            &spec.to_json(),
            &actor(&headers),
            WriteMode::Create,
        )
        .await
        .map_err(AlertError::from)?;
    state.signal.wake();
    match written {
        RuleWritten::Created(row) => Ok((StatusCode::CREATED, Json(rule_view(&row))).into_response()),
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

/// `PUT /v1/alert-rules/{name}`: creates (201) or replaces (200).
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
        .write_rule(&name, &spec.to_json(), &actor(&headers), WriteMode::Upsert)
        .await
        .map_err(AlertError::from)?;
    state.signal.wake();
    Ok(match written {
        RuleWritten::Created(row) => (StatusCode::CREATED, Json(rule_view(&row))).into_response(),
        RuleWritten::Updated(row) | RuleWritten::Unchanged(row) => {
            Json(rule_view(&row)).into_response()
        }
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
pub async fn list_rules(State(state): State<AppState>) -> Result<Response, ApiError> {
    let rules = rules_with_status(&state).await?;
    let rules: Vec<Value> = rules.into_iter().map(|(_, view)| view).collect();
    Ok(Json(json!({ "rules": rules })).into_response())
}

/// Every rule (by name) with its view, status included.
async fn rules_with_status(state: &AppState) -> Result<Vec<(RuleRow, Value)>, ApiError> {
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
fn with_status(mut view: Value, row: &RuleRow, failures: &[RuleFailure]) -> Value {
    let failure = failures.iter().find(|f| f.uid == row.uid);
    if let Some(o) = view.as_object_mut() {
        match failure {
            None => {
                o.insert("status".into(), json!("ok"));
            }
            Some(f) => {
                o.insert("status".into(), json!("failing"));
                o.insert("error".into(), json!(f.error));
                o.insert("failing_since".into(), json!(time(f.since)));
            }
        }
    }
    view
}

/// `GET /v1/alert-rules/{name}`.
pub async fn get_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let rules = rules_with_status(&state).await?;
    match rules.into_iter().find(|(r, _)| r.name == name) {
        Some((_, view)) => Ok(Json(view).into_response()),
        None => Err(not_found(format!("no alert rule named `{name}`"))),
    }
}

/// `DELETE /v1/alert-rules/{name}`: 204; its firing alerts resolve at the next evaluation.
pub async fn delete_rule(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match state
        .store
        .alerts()
        .delete_rule(&name, &actor(&headers))
        .await
        .map_err(AlertError::from)?
    {
        Some(_) => {
            state.signal.wake();
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        None => Err(not_found(format!("no alert rule named `{name}`"))),
    }
}

/// `GET /v1/alert-rules/{name}/audit`: every change, newest first.
pub async fn rule_audit(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let rows = state
        .store
        .alerts()
        .audit_log(Some(&name), 1000)
        .await
        .map_err(AlertError::from)?;
    let entries: Vec<Value> = rows.iter().map(audit_view).collect();
    Ok(Json(json!({ "entries": entries })).into_response())
}

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn bad(message: String) -> ApiError {
    ApiError::from(QueryError::bad("invalid_parameter", message))
}

/// `GET /v1/alerts?rule=&state=&group=dim:value&from=&to=&limit=`: instances
/// now pending or firing, and the notification history (newest first).
pub async fn list_alerts(State(state): State<AppState>, q: Pairs) -> Result<Response, ApiError> {
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
    let active: Vec<Value> = instances
        .iter()
        .filter(|i| i.life.state.is_active())
        .filter(|i| filter.rule.as_ref().is_none_or(|r| *r == i.rule))
        .filter(|i| filter.state.is_none_or(|s| s == i.life.state))
        .filter_map(|i| {
            let group: Value = serde_json::from_str(&i.group).unwrap_or(json!({}));
            group_ok(&group).then(|| {
                json!({
                    "alert_id": i.fingerprint,
                    "rule": i.rule,
                    "state": i.life.state.as_str(),
                    "severity": i.severity,
                    "group": group,
                    "value": i.value,
                    "threshold": i.threshold,
                    "level": i.level.parse::<f64>().ok(),
                    "started_at": i.life.active_since.map(time),
                    "firing_since": i.life.firing_since.map(time),
                    "sequence": i.life.sequence,
                })
            })
        })
        .collect();
    let history: Vec<Value> = history
        .map_err(AlertError::from)?
        .into_iter()
        .filter_map(|n| {
            let mut body: Value = serde_json::from_str(&n.n.payload).ok()?;
            let group = body.get("group").cloned().unwrap_or(json!({}));
            if !group_ok(&group) {
                return None;
            }
            if let Some(o) = body.as_object_mut() {
                o.insert("subject".into(), json!(n.n.subject));
                o.insert("created_at".into(), json!(time(n.n.created_at)));
                o.insert("sent_at".into(), json!(n.sent_at.map(time)));
            }
            Some(body)
        })
        .take(usize::try_from(filter.limit).unwrap_or(100))
        .collect();
    Ok(Json(json!({ "active": active, "history": history })).into_response())
}

/// `PUT /v1/keys/{key}/quota`: sets (201) or replaces (200) the key's quota;
/// answers its current status.
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
    let (_, created) = state
        .store
        .alerts()
        .put_quota(&key, &text, &actor(&headers))
        .await
        .map_err(AlertError::from)?;
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
pub async fn get_quota(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    match quota::load(&state.store, &state.catalog, &key).await? {
        Some(q) => {
            let status = quota::status(&state.store, &state.catalog, &q, Utc::now()).await?;
            Ok(Json(status).into_response())
        }
        None => Err(not_found(format!(
            "key `{key}` has no quota; set one with PUT /v1/keys/{key}/quota {{\"measure\": \"tokens\", \"limit\": 100000, \"window\": \"5h\"}}"
        ))),
    }
}

/// `DELETE /v1/keys/{key}/quota`.
pub async fn delete_quota(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if state
        .store
        .alerts()
        .delete_quota(&key, &actor(&headers))
        .await
        .map_err(AlertError::from)?
    {
        state.signal.wake();
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(format!("key `{key}` has no quota")))
    }
}
