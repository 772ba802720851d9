//! The dashboard: a page of plain ES modules embedded in the binary (no build
//! step, no CDN), served at `/` and `/dashboard/…`. The page reads only the
//! public API with the visitor's token, so these routes serve static bytes
//! and need none: nothing here reads the store.
//!
//! The sources are in `dashboard/` at the repository root; `uPlot` is
//! vendored under `dashboard/vendor/` (MIT, version in README).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

/// Every file under `/dashboard/assets/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/app.js"),
    },
    Asset {
        name: "api.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/api.js"),
    },
    Asset {
        name: "format.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/format.js"),
    },
    Asset {
        name: "time.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/time.js"),
    },
    Asset {
        name: "ui.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/ui.js"),
    },
    Asset {
        name: "charts.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/charts.js"),
    },
    Asset {
        name: "overview.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/overview.js"),
    },
    Asset {
        name: "key.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/key.js"),
    },
    Asset {
        name: "style.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../../dashboard/style.css"),
    },
    Asset {
        name: "uPlot.esm.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../../dashboard/vendor/uPlot.esm.js"),
    },
    Asset {
        name: "uPlot.min.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../../dashboard/vendor/uPlot.min.css"),
    },
];

const INDEX: &str = include_str!("../../dashboard/index.html");

/// The page's own origin only: the dashboard loads nothing from elsewhere.
/// uPlot sizes its canvas through element styles, hence `'unsafe-inline'`
/// for styles (never for scripts).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// The rendered index page and each asset's ETag.
struct Dashboard {
    index: String,
    index_etag: String,
    etags: Vec<String>,
}

fn etag(bytes: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    format!("\"{:016x}\"", h.finish())
}

/// The dashboard's routes; `refresh` is the page's default auto-refresh.
pub fn routes<S: Clone + Send + Sync + 'static>(refresh: Duration) -> Router<S> {
    let seconds = refresh.as_secs().max(1);
    let index = INDEX.replace("{{REFRESH_SECONDS}}", &seconds.to_string());
    let dash = Arc::new(Dashboard {
        index_etag: etag(index.as_bytes()),
        index,
        etags: ASSETS.iter().map(|a| etag(a.body)).collect(),
    });
    let page = {
        let dash = dash.clone();
        move |headers: HeaderMap| {
            let dash = dash.clone();
            async move { index_page(&dash, &headers) }
        }
    };
    let page_rest = {
        let dash = dash.clone();
        move |Path(rest): Path<String>, headers: HeaderMap| {
            let dash = dash.clone();
            async move {
                match rest.strip_prefix("assets/") {
                    Some(name) => asset(&dash, name, &headers),
                    None => index_page(&dash, &headers),
                }
            }
        }
    };
    Router::new()
        .route("/", get(page.clone()))
        .route("/dashboard", get(page.clone()))
        .route("/dashboard/", get(page))
        .route("/dashboard/{*rest}", get(page_rest))
}

fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag))
}

fn respond(mime: &'static str, tag: &str, body: Vec<u8>, headers: &HeaderMap) -> Response {
    let mut out = if not_modified(headers, tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, body).into_response()
    };
    let h = out.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    // Revalidated on every load: a new binary's assets are never mixed with
    // an old page's.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out
}

fn index_page(dash: &Dashboard, headers: &HeaderMap) -> Response {
    let mut out = respond(
        "text/html; charset=utf-8",
        &dash.index_etag,
        dash.index.clone().into_bytes(),
        headers,
    );
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    out
}

fn asset(dash: &Dashboard, name: &str, headers: &HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.name == name) {
        Some(i) => respond(
            ASSETS[i].mime,
            &dash.etags[i],
            ASSETS[i].body.to_vec(),
            headers,
        ),
        None => super::error::ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dashboard asset `{name}`"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_embedded() {
        let names: Vec<&str> = ASSETS.iter().map(|a| a.name).collect();
        let sources = ASSETS
            .iter()
            .filter(|a| a.name.ends_with(".js"))
            .map(|a| std::str::from_utf8(a.body).unwrap_or_default())
            .chain([INDEX]);
        for text in sources {
            for part in text.split(['"', '\'']) {
                if let Some(name) = part
                    .strip_prefix("./")
                    .or_else(|| part.strip_prefix("/dashboard/assets/"))
                {
                    if name.ends_with(".js") || name.ends_with(".css") {
                        assert!(
                            names.contains(&name),
                            "`{name}` is imported but not embedded"
                        );
                    }
                }
            }
        }
    }
}
