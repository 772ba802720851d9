//! What protects an open API (authentication off: the loopback default, or
//! `--insecure-no-auth`) from the browsers of the people who can reach it.
//!
//! With authentication on, a browser cannot send a request Tally accepts: the
//! bearer token is never attached by the browser itself. With it off, any web
//! page its operator opens could, so three checks run on every request to a
//! route that needs a scope ([`super::auth::required_scope`]):
//!
//! 1. **Host** (DNS rebinding): the `Host` header, without its port, must be
//!    an IP address, `localhost`, `*.localhost` or one of
//!    `TALLY_ALLOWED_HOSTS`, else `403 host_not_allowed`. A rebound name
//!    (`attacker.example` resolving to 127.0.0.1) arrives with its own name.
//! 2. **Cross-origin** (CSRF), on POST/PUT/PATCH/DELETE: `Sec-Fetch-Site`,
//!    when sent, must be `same-origin` or `none`; without it, an `Origin`
//!    (`null` included) must name the request's own `Host` or an allowed
//!    host, else `403 cross_origin`. Requests with neither header (curl, SDKs,
//!    `tally` itself) pass, as in Go's `http.CrossOriginProtection`.
//! 3. **Declared content types**: a POST with a body, on any route but
//!    `/v1/events`, must declare a media type its OpenAPI request body lists,
//!    else `415 unsupported_media_type` (a browser's "simple" `text/plain`
//!    POST needs no preflight). The table is read from the generated OpenAPI
//!    document, so a route added later accepts what its own entry lists.
//!
//! [`headers`] adds `nosniff`, a deny-all CSP and `no-store` to every answer
//! whose handler set none of its own.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;

use super::error::ApiError;

/// The checks of an open API, built once per router.
#[derive(Debug, Default)]
pub struct OpenGuard {
    /// `TALLY_ALLOWED_HOSTS`, lower-case, without ports; `*.example.com`
    /// entries allow every subdomain.
    allowed_hosts: Vec<String>,
    /// Per route template (`/v1/alert-rules/{name}`), the media types its
    /// POST request body lists (lower-case); a route without an entry takes
    /// no body.
    post_types: Vec<(Vec<Segment>, Vec<String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param,
}

fn template(path: &str) -> Vec<Segment> {
    path.split('/')
        .map(|s| match s.starts_with('{') && s.ends_with('}') {
            true => Segment::Param,
            false => Segment::Literal(s.to_string()),
        })
        .collect()
}

/// The route that ingests Tally's usage events keeps its own content-type
/// rules (sniffing, `text/plain`), documented in the ingest docs.
const EVENTS_ROUTE: &str = "/v1/events";

impl OpenGuard {
    /// Checks allowing `allowed_hosts` beside the loopback names, with the
    /// POST media types of `openapi` (the generated document).
    pub fn new(allowed_hosts: &[String], openapi: &serde_json::Value) -> Self {
        let allowed_hosts = allowed_hosts
            .iter()
            .map(|h| host_without_port(h.trim()).to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let mut post_types = Vec::new();
        if let Some(paths) = openapi.get("paths").and_then(|p| p.as_object()) {
            for (path, item) in paths {
                let types: Vec<String> = item
                    .pointer("/post/requestBody/content")
                    .and_then(|c| c.as_object())
                    .map(|c| c.keys().map(|k| k.to_ascii_lowercase()).collect())
                    .unwrap_or_default();
                if item.get("post").is_some() {
                    post_types.push((template(path), types));
                }
            }
        }
        Self {
            allowed_hosts,
            post_types,
        }
    }

    /// `Err` with the answer when an unauthenticated request must be refused.
    pub fn check(&self, req: &Request) -> Result<(), ApiError> {
        let headers = req.headers();
        let host = headers
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{fffd}").trim().to_string());
        if let Some(host) = &host {
            if !self.host_allowed(host) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "host_not_allowed",
                    format!(
                        "the Host header names `{}`, which is not an IP address, localhost or a host listed in TALLY_ALLOWED_HOSTS: while authentication is off, Tally answers only to names it knows (a web page could otherwise reach it through DNS rebinding). Add the name to TALLY_ALLOWED_HOSTS (comma-separated), or create an API token (`tally tokens create`)",
                        printable(host)
                    ),
                ));
            }
        }
        if is_unsafe(req.method()) {
            self.same_origin(headers, host.as_deref())?;
        }
        if req.method() == Method::POST && req.uri().path() != EVENTS_ROUTE && has_body(headers) {
            self.declared_type(req.uri().path(), headers)?;
        }
        Ok(())
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_without_port(host).to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        if name.parse::<IpAddr>().is_ok() || name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        self.listed(name)
    }

    fn listed(&self, name: &str) -> bool {
        self.allowed_hosts
            .iter()
            .any(|a| match a.strip_prefix("*.") {
                Some(parent) => name
                    .strip_suffix(parent)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => a == name,
            })
    }

    fn same_origin(&self, headers: &HeaderMap, host: Option<&str>) -> Result<(), ApiError> {
        let refuse = |why: String| {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!("{why}: while authentication is off, Tally refuses changes a web page on another site asks a browser to make. Send the request from the same origin, without a browser (curl, an SDK, `tally`), list the origin's host in TALLY_ALLOWED_HOSTS, or create an API token (`tally tokens create`)"),
            ))
        };
        if let Some(site) = headers.get("sec-fetch-site") {
            let site = site.to_str().unwrap_or("");
            return match site.eq_ignore_ascii_case("same-origin")
                || site.eq_ignore_ascii_case("none")
            {
                true => Ok(()),
                false => refuse(format!(
                    "the browser says this request comes from a `{}` page (Sec-Fetch-Site)",
                    printable(site)
                )),
            };
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("null").trim();
        let authority = origin
            .split_once("://")
            .map(|(_, rest)| rest.trim_end_matches('/').to_ascii_lowercase());
        let Some(authority) = authority.filter(|a| !a.is_empty() && !a.contains('/')) else {
            return refuse(format!("the request's Origin is `{}`", printable(origin)));
        };
        let same_host = host.is_some_and(|h| h.eq_ignore_ascii_case(&authority));
        let listed = self.listed(host_without_port(&authority).trim_end_matches('.'));
        match same_host || listed {
            true => Ok(()),
            false => refuse(format!(
                "the request's Origin `{}` is not this server's Host `{}`",
                printable(origin),
                printable(host.unwrap_or(""))
            )),
        }
    }

    fn declared_type(&self, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        let segments: Vec<&str> = path.split('/').collect();
        let types = self
            .post_types
            .iter()
            .find(|(t, _)| {
                t.len() == segments.len()
                    && t.iter().zip(&segments).all(|(t, s)| match t {
                        Segment::Param => !s.is_empty(),
                        Segment::Literal(l) => l == s,
                    })
            })
            .map(|(_, types)| types.as_slice());
        // An unknown route answers 404 after this check: leave it to that.
        let Some(types) = types else { return Ok(()) };
        let sent = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        if sent
            .as_deref()
            .is_some_and(|s| types.iter().any(|t| t == s))
        {
            return Ok(());
        }
        let wanted = match types.is_empty() {
            true => "this route takes no body".to_string(),
            false => format!("send `Content-Type: {}`", types.join("` or `")),
        };
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the body's Content-Type is {}: {wanted} (while authentication is off, a body must declare its type, so a web page cannot send it as a form or text)",
                sent.map_or("missing".to_string(), |s| format!("`{}`", printable(&s)))
            ),
        ))
    }
}

/// The methods that change something (a browser sends them cross-site).
fn is_unsafe(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// A request has a body unless it says `Content-Length: 0`, or sends neither
/// a length nor a transfer encoding.
fn has_body(headers: &HeaderMap) -> bool {
    match headers.get(header::CONTENT_LENGTH) {
        Some(len) => len.to_str().ok().and_then(|l| l.trim().parse::<u64>().ok()) != Some(0),
        None => headers.contains_key(header::TRANSFER_ENCODING),
    }
}

/// `host[:port]` → `host` (`[::1]:8080` → `::1`).
fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.matches(':').count() {
        1 => host.split(':').next().unwrap_or(host),
        _ => host,
    }
}

/// Input echoed in a message: short, no control characters.
fn printable(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// The headers every answer gets unless its handler set its own: no MIME
/// sniffing of error bodies that echo input, nothing to run or frame, and
/// nothing cached (answers carry usage data).
pub async fn headers(req: Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let defaults: [(header::HeaderName, &'static str); 3] = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in defaults {
        if !h.contains_key(&name) {
            h.insert(name, HeaderValue::from_static(value));
        }
    }
    resp
}

/// What the token middleware holds: the token check and, for when it says
/// authentication is off, the checks of this module.
#[derive(Clone)]
pub struct Gate {
    /// The token check.
    pub auth: Arc<crate::auth::Auth>,
    /// The open-API checks.
    pub open: Arc<OpenGuard>,
}

/// The OpenAPI document as JSON, for [`OpenGuard::new`].
pub(super) fn openapi_json(doc: &utoipa::openapi::OpenApi) -> serde_json::Value {
    serde_json::to_value(doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn guard() -> OpenGuard {
        let doc = serde_json::json!({"paths": {
            "/v1/alert-rules": {"post": {"requestBody": {"content": {"application/json": {}}}}, "get": {}},
            "/v1/corrections/{id}/revert": {"post": {"requestBody": {"content": {"application/json": {}}}}},
            "/v1/nobody": {"post": {}},
            "/v1/events": {"post": {"requestBody": {"content": {"application/msgpack": {}}}}},
        }});
        OpenGuard::new(
            &[
                "tally".into(),
                "*.corp.example".into(),
                "Proxy.Example:443".into(),
            ],
            &doc,
        )
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).expect("request")
    }

    fn code(r: Result<(), ApiError>) -> Option<&'static str> {
        r.err().map(|e| e.code)
    }

    #[test]
    fn hosts_are_ips_localhost_or_listed() {
        let g = guard();
        for ok in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "::1",
            "10.1.2.3",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "localhost.",
            "tally:8080",
            "TALLY",
            "a.corp.example",
            "proxy.example",
        ] {
            assert_eq!(
                code(g.check(&req("GET", "/v1/stats", &[("host", ok)]))),
                None,
                "{ok}"
            );
        }
        for bad in [
            "attacker.example:8080",
            "localhost.attacker.example",
            "corp.example",
            "xcorp.example",
            "tally.evil",
            "127.0.0.1.nip.io",
        ] {
            assert_eq!(
                code(g.check(&req("GET", "/v1/stats", &[("host", bad)]))),
                Some("host_not_allowed"),
                "{bad}"
            );
        }
        assert_eq!(code(g.check(&req("GET", "/v1/stats", &[]))), None);
    }

    #[test]
    fn cross_site_changes_are_refused() {
        let g = guard();
        let h = ("host", "127.0.0.1:8080");
        let post = |extra: &[(&str, &str)]| {
            let mut all = vec![
                h,
                ("content-type", "application/json"),
                ("content-length", "2"),
            ];
            all.extend_from_slice(extra);
            code(g.check(&req("POST", "/v1/alert-rules", &all)))
        };
        assert_eq!(post(&[]), None);
        assert_eq!(post(&[("sec-fetch-site", "same-origin")]), None);
        assert_eq!(post(&[("sec-fetch-site", "none")]), None);
        assert_eq!(
            post(&[("sec-fetch-site", "cross-site")]),
            Some("cross_origin")
        );
        assert_eq!(
            post(&[("sec-fetch-site", "same-site")]),
            Some("cross_origin")
        );
        // Sec-Fetch-Site decides when present, whatever Origin says.
        assert_eq!(
            post(&[
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://evil.example")
            ]),
            None
        );
        assert_eq!(post(&[("origin", "http://127.0.0.1:8080")]), None);
        assert_eq!(
            post(&[("origin", "http://127.0.0.1:9999")]),
            Some("cross_origin")
        );
        assert_eq!(post(&[("origin", "null")]), Some("cross_origin"));
        assert_eq!(
            post(&[("origin", "http://evil.example:8080")]),
            Some("cross_origin")
        );
        assert_eq!(post(&[("origin", "https://tally")]), None);
        // Reads are not changes.
        assert_eq!(
            code(g.check(&req(
                "GET",
                "/v1/stats",
                &[h, ("sec-fetch-site", "cross-site")]
            ))),
            None
        );
        for m in ["PUT", "PATCH", "DELETE"] {
            assert_eq!(
                code(g.check(&req(
                    m,
                    "/v1/alert-rules/x",
                    &[h, ("origin", "http://evil.example")]
                ))),
                Some("cross_origin"),
                "{m}"
            );
        }
    }

    #[test]
    fn bodies_declare_a_listed_type() {
        let g = guard();
        let with = |path: &str, ct: Option<&str>, len: &str| {
            let mut all = vec![("content-length", len)];
            if let Some(ct) = ct {
                all.push(("content-type", ct));
            }
            code(g.check(&req("POST", path, &all)))
        };
        let json = Some("application/json");
        assert_eq!(with("/v1/alert-rules", json, "2"), None);
        assert_eq!(
            with(
                "/v1/alert-rules",
                Some("Application/JSON; charset=utf-8"),
                "2"
            ),
            None
        );
        assert_eq!(
            with("/v1/alert-rules", Some("text/plain"), "2"),
            Some("unsupported_media_type")
        );
        assert_eq!(
            with("/v1/alert-rules", None, "2"),
            Some("unsupported_media_type")
        );
        assert_eq!(with("/v1/alert-rules", Some("text/plain"), "0"), None);
        assert_eq!(
            with("/v1/corrections/c1/revert", Some("text/plain"), "5"),
            Some("unsupported_media_type")
        );
        assert_eq!(with("/v1/corrections/c1/revert", json, "5"), None);
        assert_eq!(
            with("/v1/nobody", json, "5"),
            Some("unsupported_media_type")
        );
        assert_eq!(with("/v1/events", Some("text/plain"), "5"), None);
        assert_eq!(with("/v1/unknown", Some("text/plain"), "5"), None);
        // A chunked body is a body.
        assert_eq!(
            code(g.check(&req(
                "POST",
                "/v1/alert-rules",
                &[("transfer-encoding", "chunked")]
            ))),
            Some("unsupported_media_type")
        );
        assert_eq!(code(g.check(&req("POST", "/v1/alert-rules", &[]))), None);
    }
}
