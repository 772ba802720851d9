//! The token middleware: which scope each route needs, and the answers
//! (401/403/503) when [`Auth::check`] refuses.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::guard::Gate;
use crate::auth::{Refusal, Scope};

/// The scope a request needs; `None` for the probes, the API description and
/// the dashboard's static files.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    match path {
        "/healthz" | "/readyz" | "/openapi.json" => None,
        // The dashboard's static page and assets: the page asks for a token
        // and sends it with every API call it makes.
        "/" | "/dashboard" => None,
        _ if path.starts_with("/dashboard/") => None,
        "/v1/events" if method == Method::POST => Some(Scope::Ingest),
        _ if method == Method::GET || method == Method::HEAD => Some(Scope::Read),
        _ => Some(Scope::Admin),
    }
}

/// Who made a change: `X-Tally-Actor`, which [`require`] sets to
/// `token:<name>` (replacing what a client sent) when authentication is on;
/// else `anonymous`.
pub(super) fn actor(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-tally-actor")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(200).collect::<String>())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "anonymous".to_string())
}

/// The bearer token of a request, if it has one.
fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Middleware: answers 401 without a valid token and 403 without the scope;
/// otherwise records the token's name as the request's actor.
/// While authentication is off, the request must also pass the checks of an
/// open API ([`super::guard`]).
pub async fn require(State(gate): State<Gate>, mut req: Request, next: Next) -> Response {
    let Some(need) = required_scope(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    match gate.auth.check(bearer(&req), need).await {
        Ok(None) => match gate.open.check(&req) {
            Ok(()) => next.run(req).await,
            Err(refused) => refused.into_response(),
        },
        Ok(Some(name)) => {
            // The audit trail names the token, never what the client claims.
            if let Ok(v) = HeaderValue::from_str(&format!("token:{name}")) {
                req.headers_mut().insert("x-tally-actor", v);
            }
            next.run(req).await
        }
        Err(refusal) => {
            let (status, code, message) = match refusal {
                Refusal::Missing => (
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this route needs an API token: send `Authorization: Bearer <token>` (create one with `tally tokens create`)".to_string(),
                ),
                Refusal::Unknown => (
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the bearer token is unknown or revoked".to_string(),
                ),
                Refusal::NoActiveToken => (
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "authentication is on but no active token exists (the last one was revoked): create one with `tally tokens create --name NAME --scope admin`".to_string(),
                ),
                Refusal::OpenPublic => (
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this server listens on a public address and no API token exists: create one with `tally tokens create --name NAME --scope admin` (or restart it on 127.0.0.1, or with --insecure-no-auth)".to_string(),
                ),
                Refusal::Scope { name, need } => (
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "token `{name}` lacks the `{}` scope this route needs",
                        need.as_str()
                    ),
                ),
                Refusal::Unavailable(e) => {
                    // Said to clients without a token: the dependency, never its error text.
                    tracing::warn!(error = %e, "cannot check an API token: database unavailable");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        "cannot check the token: the database is unavailable; try again (the server's log has the error)".to_string(),
                    )
                }
            };
            let mut resp = ApiError::new(status, code, message).into_response();
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_documented_scope() {
        assert_eq!(required_scope(&Method::GET, "/healthz"), None);
        assert_eq!(required_scope(&Method::GET, "/openapi.json"), None);
        assert_eq!(
            required_scope(&Method::POST, "/v1/events"),
            Some(Scope::Ingest)
        );
        assert_eq!(required_scope(&Method::GET, "/v1/stats"), Some(Scope::Read));
        assert_eq!(required_scope(&Method::GET, "/metrics"), Some(Scope::Read));
        assert_eq!(
            required_scope(&Method::POST, "/v1/alert-rules"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required_scope(&Method::DELETE, "/v1/keys/k/quota"),
            Some(Scope::Admin)
        );
    }
}
