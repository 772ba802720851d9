//! The security model of an open API (authentication off): host and origin
//! checks, declared content types, headers on every answer; secrets never
//! printed; private files; caps on rules and quotas. The same cross-site
//! cases run in a real browser in `tests/dashboard/security.test.mjs`.

use std::time::Duration;

use serde_json::{json, Value};
use tally::store::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, TestServer};

/// One raw HTTP/1.1 exchange, so every header (Host included) is exactly
/// what the test wrote: status, lower-cased headers, body.
async fn raw(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tcp.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.expect("read");
    parse_response(&String::from_utf8_lossy(&out))
}

fn parse_response(text: &str) -> (u16, Vec<(String, String)>, String) {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("<not an error: {body}>"))
}

const RULE: &str = r#"{"name": "r1", "measure": "requests", "window": "1h", "threshold": 1}"#;

async fn open_server(allowed: &[&str]) -> (support::TestStore, TestServer) {
    let s = support::store(Backend::Sqlite).await;
    let mut config = support::server_config();
    config.allowed_hosts = allowed.iter().map(|h| h.to_string()).collect();
    let srv = TestServer::start(s.store.clone(), config).await;
    (s, srv)
}

/// The three requests the review reproduced (a rule created, an event
/// voided, a reprice queued, from a browser on another site) and their
/// variants are refused; nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_refuses_rebound_hosts_and_cross_site_changes() {
    let (_s, srv) = open_server(&[]).await;
    let (status, body) = srv.post_json(&json!([support::wire("victim")])).await;
    assert_eq!(status, 200, "{body}");
    let port = srv.base.rsplit(':').next().expect("port").to_string();
    let evil_host = format!("attacker.example:{port}");
    let evil_origin = format!("http://attacker.example:{port}");
    let corr = r#"{"id": "c1", "reason": "csrf", "void": {"ids": ["victim"]}}"#;
    let reprice = r#"{"from": "2026-01-01T00:00:00Z"}"#;
    for (path, body) in [
        ("/v1/alert-rules", RULE),
        ("/v1/corrections", corr),
        ("/v1/prices/reprice", reprice),
    ] {
        // As reproduced: a rebound host, its origin, a "simple" content type.
        let (status, _, answer) = raw(
            &srv.base,
            "POST",
            path,
            &[
                ("host", &evil_host),
                ("origin", &evil_origin),
                ("content-type", "text/plain"),
            ],
            body,
        )
        .await;
        assert_eq!(
            (status, code(&answer).as_str()),
            (403, "host_not_allowed"),
            "{path}: {answer}"
        );
        assert!(answer.contains("TALLY_ALLOWED_HOSTS"), "{answer}");
        // Our own host, another origin (a page elsewhere posting to 127.0.0.1).
        for origin in [evil_origin.as_str(), "null", "http://127.0.0.1:1"] {
            let (status, _, answer) = raw(
                &srv.base,
                "POST",
                path,
                &[("origin", origin), ("content-type", "application/json")],
                body,
            )
            .await;
            assert_eq!(
                (status, code(&answer).as_str()),
                (403, "cross_origin"),
                "{path} from {origin}: {answer}"
            );
        }
        for site in ["cross-site", "same-site"] {
            let (status, _, answer) = raw(
                &srv.base,
                "POST",
                path,
                &[
                    ("sec-fetch-site", site),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await;
            assert_eq!(
                (status, code(&answer).as_str()),
                (403, "cross_origin"),
                "{path} {site}: {answer}"
            );
        }
        // No browser headers, but a body a form could send: 415.
        for ct in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            None,
        ] {
            let mut headers = vec![];
            if let Some(ct) = ct {
                headers.push(("content-type", ct));
            }
            let (status, _, answer) = raw(&srv.base, "POST", path, &headers, body).await;
            assert_eq!(
                (status, code(&answer).as_str()),
                (415, "unsupported_media_type"),
                "{path} {ct:?}: {answer}"
            );
            assert!(answer.contains("application/json"), "{answer}");
        }
    }
    // Nothing changed.
    let (_, rules) = srv.get("/v1/alert-rules").await;
    assert_eq!(rules["rules"], json!([]), "{rules}");
    let (_, corrections) = srv.get("/v1/corrections").await;
    assert_eq!(corrections["corrections"], json!([]), "{corrections}");
    let (_, prices) = srv.get("/v1/prices").await;
    let (_, audit) = srv.get("/v1/prices/audit").await;
    assert!(!audit.to_string().contains("reprice"), "{prices} {audit}");

    // Reads by a rebound name are refused too; the probes and the page are not.
    let (status, _, answer) = raw(&srv.base, "GET", "/v1/stats", &[("host", &evil_host)], "").await;
    assert_eq!((status, code(&answer).as_str()), (403, "host_not_allowed"));
    for path in [
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/",
        "/dashboard/assets/app.js",
    ] {
        let (status, _, answer) = raw(&srv.base, "GET", path, &[("host", &evil_host)], "").await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    // What a same-origin page, curl and SDKs send passes.
    for headers in [
        vec![("content-type", "application/json")],
        vec![("content-type", "Application/JSON; charset=utf-8")],
        vec![
            ("content-type", "application/json"),
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://attacker.example"),
        ],
        vec![
            ("content-type", "application/json"),
            ("origin", &format!("http://127.0.0.1:{port}")),
        ],
        vec![("content-type", "application/json"), ("host", "localhost")],
        vec![
            ("content-type", "application/json"),
            ("sec-fetch-site", "none"),
        ],
    ] {
        let (status, _, answer) = raw(&srv.base, "PUT", "/v1/alert-rules/r1", &headers, RULE).await;
        assert!(
            status == 200 || status == 201,
            "{headers:?}: {status} {answer}"
        );
    }
    // Ingest keeps its own content-type rules (text/plain is sniffed as JSON).
    let ev = json!([support::wire("plain-1")]).to_string();
    let (status, _, answer) = raw(
        &srv.base,
        "POST",
        "/v1/events",
        &[("content-type", "text/plain")],
        &ev,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

/// `docker/compose.yaml` runs the API open: its health check and requests
/// naming the container (`Host: tally:8080`) still pass with its settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_health_check_and_the_container_name_pass() {
    let compose = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docker/compose.yaml"
    ))
    .expect("compose.yaml");
    let allowed = compose
        .lines()
        .find_map(|l| l.trim().strip_prefix("TALLY_ALLOWED_HOSTS:"))
        .expect("compose.yaml sets TALLY_ALLOWED_HOSTS")
        .trim()
        .trim_matches('"')
        .to_string();
    let probe = compose
        .split("printf '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the health check's request")
        .replace("\\\\r\\\\n", "\r\n");
    let (_s, srv) = open_server(&allowed.split(',').collect::<Vec<_>>()).await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(probe.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains(" 200 "), "health check: {probe:?} → {text}");
    for name in allowed.split(',') {
        let host = format!("{name}:8080");
        let (status, _, answer) = raw(&srv.base, "GET", "/v1/stats", &[("host", &host)], "").await;
        assert_eq!(status, 200, "{host}: {answer}");
        let (status, _, answer) = raw(
            &srv.base,
            "POST",
            "/v1/alert-rules",
            &[
                ("host", &host),
                ("origin", &format!("http://{host}")),
                ("content-type", "application/json"),
            ],
            RULE,
        )
        .await;
        assert_eq!(status, 201, "{host}: {answer}");
    }
}

/// With authentication on, a browser cannot attach the token: the checks of
/// an open API give way to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_open_api_checks_do_not_apply() {
    let (s, srv) = open_server(&[]).await;
    let (token, _) =
        tally::auth::create_token(&s.store, "admin", &[tally::auth::Scope::Admin], "t")
            .await
            .expect("token");
    let bearer = format!("Bearer {token}");
    let (status, _, answer) = raw(
        &srv.base,
        "POST",
        "/v1/alert-rules",
        &[
            ("host", "tally.internal.example"),
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        RULE,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let (status, _, answer) = raw(
        &srv.base,
        "GET",
        "/v1/stats",
        &[("host", "attacker.example")],
        "",
    )
    .await;
    assert_eq!((status, code(&answer).as_str()), (401, "unauthorized"));
}

/// Every API answer, errors included, tells the browser not to sniff, run,
/// frame or cache it; the dashboard's page keeps its own policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_carry_the_security_headers() {
    let (_s, srv) = open_server(&[]).await;
    let header = |h: &[(String, String)], name: &str| {
        h.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    for (method, path, headers, want) in [
        ("GET", "/v1/stats", vec![], 200),
        ("GET", "/v1/stats?granularity=fortnight", vec![], 400),
        ("GET", "/nope/x", vec![], 404),
        ("GET", "/healthz", vec![], 200),
        ("GET", "/openapi.json", vec![], 200),
        ("GET", "/v1/stats", vec![("host", "attacker.example")], 403),
        (
            "POST",
            "/v1/alert-rules",
            vec![("content-type", "text/html")],
            415,
        ),
    ] {
        let (status, h, body) = raw(&srv.base, method, path, &headers, "{}").await;
        assert_eq!(status, want, "{path}: {body}");
        assert_eq!(header(&h, "x-content-type-options"), "nosniff", "{path}");
        assert_eq!(
            header(&h, "content-security-policy"),
            "default-src 'none'; frame-ancestors 'none'",
            "{path}"
        );
        assert_eq!(header(&h, "cache-control"), "no-store", "{path}");
    }
    let (status, h, _) = raw(&srv.base, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    let csp = header(&h, "content-security-policy");
    assert!(
        csp.contains("script-src"),
        "the dashboard's own policy: {csp}"
    );
    assert_eq!(header(&h, "cache-control"), "no-cache");
}

/// `TALLY_MAX_RULES` and `TALLY_MAX_QUOTAS` refuse only new rules and
/// quotas; stored ones are replaced and evaluated as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_and_quota_caps_refuse_only_new_ones() {
    let s = support::store(Backend::Sqlite).await;
    let mut config = support::server_config();
    config.alerts.limits.max_rules = 2;
    config.alerts.limits.max_quotas = Some(1);
    let srv = TestServer::start(s.store.clone(), config).await;
    srv.settled().await;
    let rule =
        |name: &str| json!({"name": name, "measure": "requests", "window": "1h", "threshold": 5});
    for name in ["a", "b"] {
        let (status, body) = srv
            .send_as("t", "POST", "/v1/alert-rules", rule(name))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = srv.send_as("t", "POST", "/v1/alert-rules", rule("c")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("too_many_rules")),
        "{body}"
    );
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("TALLY_MAX_RULES")),
        "{body}"
    );
    let (status, body) = srv
        .send_as("t", "PUT", "/v1/alert-rules/c", rule("c"))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("too_many_rules")),
        "{body}"
    );
    let mut changed = rule("a");
    changed["threshold"] = json!(9);
    let (status, body) = srv.send_as("t", "PUT", "/v1/alert-rules/a", changed).await;
    assert_eq!(status, 200, "{body}");
    let quota = json!({"measure": "requests", "limit": 10, "window": "1h"});
    let (status, body) = srv.send_as("t", "PUT", "/v1/keys/k1/quota", &quota).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = srv.send_as("t", "PUT", "/v1/keys/k2/quota", &quota).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("too_many_rules")),
        "{body}"
    );
    let (status, body) = srv
        .send_as(
            "t",
            "PUT",
            "/v1/keys/k1/quota",
            json!({"measure": "requests", "limit": 20, "window": "1h"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Deleting one makes room again.
    let (status, _) = srv.send_as("t", "DELETE", "/v1/alert-rules/b", "").await;
    assert_eq!(status, 204);
    let (status, body) = srv.send_as("t", "POST", "/v1/alert-rules", rule("c")).await;
    assert_eq!(status, 201, "{body}");
}

/// `tally alerts apply` checks the cap before writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_apply_checks_the_rule_cap_before_writing() {
    let dir = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let file = dir.path().join("rules.toml");
    let rules = (0..3)
        .map(|i| format!("[[rule]]\nname = \"r{i}\"\nmeasure = \"requests\"\nwindow = \"1h\"\nthreshold = 1\n"))
        .collect::<String>();
    std::fs::write(&file, rules).expect("write");
    let run = |max: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["alerts", "apply"])
            .arg(&file)
            .env("TALLY_DATABASE_URL", &db)
            .env("TALLY_MAX_RULES", max)
            .env(
                "TALLY_PROJECTIONS_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections"),
            )
            .output()
            .expect("run tally")
    };
    let out = run("2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("TALLY_MAX_RULES") && err.contains("nothing was written"),
        "{err}"
    );
    let store = support::open(&db).await;
    assert!(store
        .alerts()
        .alert_rules()
        .await
        .expect("rules")
        .is_empty());
    let out = run("3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.alerts().alert_rules().await.expect("rules").len(), 3);
}

/// `503` answers name the dependency that is down, never its error text
/// (hosts, users, driver messages), to clients with or without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_answers_name_the_dependency_not_its_error() {
    // No database at all: the token check itself cannot run.
    let dead = support::dead_store("secretuser:S3cretPW", Duration::from_millis(300)).await;
    let srv = TestServer::start(dead, support::server_config()).await;
    let leaks = |text: &str| {
        [
            "database error",
            "pool timed out",
            "os error",
            "refused",
            "secretuser",
            "S3cretPW",
        ]
        .iter()
        .any(|w| text.to_lowercase().contains(&w.to_lowercase()))
    };
    let (status, _, body) = raw(&srv.base, "GET", "/v1/stats", &[], "").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("database is unavailable") && !leaks(&body),
        "{body}"
    );

    // A database that goes away after the token list was read: the routes'
    // own answers.
    let (mut pg, store) = support::private_postgres("down503", Duration::from_millis(500)).await;
    let srv = TestServer::start(store, support::server_config()).await;
    assert_eq!(srv.get("/v1/alert-rules").await.0, 200);
    pg.kill_server().expect("stop postgres");
    for (method, path, body) in [
        ("GET", "/v1/stats", ""),
        ("GET", "/v1/alert-rules", ""),
        ("POST", "/v1/alert-rules", RULE),
        (
            "POST",
            "/v1/corrections",
            r#"{"id": "c1", "reason": "r", "void": {"ids": ["x"]}}"#,
        ),
        (
            "PUT",
            "/v1/prices",
            r#"{"model": "m", "effective_from": "2026-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "1"}"#,
        ),
    ] {
        let (status, _, answer) = raw(
            &srv.base,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(status, 503, "{method} {path}: {answer}");
        assert!(
            answer.contains("database") && !leaks(&answer),
            "{method} {path}: {answer}"
        );
    }
}

/// Every form a secret can take (an environment variable, a URL's
/// user:password, a NATS token in the URL, a query parameter) stays out of
/// `--help`, the start-up log at `debug` and the errors that print a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_printed() {
    use std::process::Command;
    const SECRETS: [&str; 6] = [
        "S3cretPW",
        "QueryPW9",
        "NatsT0ken",
        "NatsPw77",
        "EnvPw55",
        "EnvTok66",
    ];
    let bin = env!("CARGO_BIN_EXE_tally");
    let find = |text: &str| {
        SECRETS
            .iter()
            .find(|s| text.contains(*s))
            .map(|s| s.to_string())
    };
    let dead_port = tally_cli::dev::devserver::free_port().expect("port");
    let pg_url = format!(
        "postgres://alice:S3cretPW@127.0.0.1:{dead_port}/tally?sslmode=disable&password=QueryPW9"
    );
    let base_env = [
        ("TALLY_DATABASE_URL", pg_url.as_str()),
        ("TALLY_NATS_PASSWORD", "EnvPw55"),
        ("TALLY_NATS_TOKEN", "EnvTok66"),
        ("TALLY_NATS_URL", "nats://NatsT0ken@127.0.0.1:1"),
        ("TALLY_SERVER", "http://bob:S3cretPW@127.0.0.1:1"),
    ];
    // --help of every command that reads them.
    for args in [
        vec!["serve", "--help"],
        vec!["--help"],
        vec!["stats", "--help"],
        vec!["emit", "--help"],
        vec!["migrate", "--help"],
    ] {
        let out = Command::new(bin)
            .args(&args)
            .envs(base_env)
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?}: {text}");
        assert_eq!(find(&text), None, "{args:?} printed a secret:\n{text}");
    }
    // Error paths that print a URL: an unreachable PostgreSQL at start-up
    // (with the query-parameter password), at debug.
    for cmd in ["serve", "migrate"] {
        let out = Command::new(bin)
            .arg(cmd)
            .envs(base_env)
            .env("TALLY_LOG", "debug")
            .env("TALLY_HTTP_ADDR", "127.0.0.1:0")
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{text}");
        if cmd == "serve" {
            assert!(
                text.contains("postgres://***@127.0.0.1"),
                "the error names where: {text}"
            );
        }
        assert_eq!(find(&text), None, "{cmd} printed a secret:\n{text}");
    }

    // A real NATS that wants a token, then one that wants a user and
    // password, both written in TALLY_NATS_URL: Tally connects (so the
    // credentials went through), and its debug log never shows them.
    let dir = tempfile::tempdir().expect("dir");
    for (auth, url_auth) in [
        ("authorization { token: \"NatsT0ken\" }", "NatsT0ken@"),
        (
            "authorization { user: natsuser, password: \"NatsPw77\" }",
            "natsuser:NatsPw77@",
        ),
    ] {
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, format!("jetstream: enabled\n{auth}\n")).expect("conf");
        let nats =
            tally_cli::dev::devserver::TempNats::start_with_config(&conf, &[]).expect("nats");
        let url = nats.url().replace("nats://", &format!("nats://{url_auth}"));
        let db = format!(
            "sqlite://{}",
            dir.path().join(format!("{}.db", nats.port())).display()
        );
        let mut proc = crate::support::proc::TallyProc::start(
            &db,
            &url,
            &[
                ("TALLY_LOG", "debug"),
                ("TALLY_SERVER", "http://bob:S3cretPW@127.0.0.1:1"),
            ],
        )
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let ready = loop {
            let r = reqwest::get(format!("{}/readyz", proc.base))
                .await
                .expect("readyz");
            let body: Value = r.json().await.expect("json");
            if body["checks"]["nats"]["status"] == "up" {
                break body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "NATS never up: {body}\n{}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // A published event is ingested: the connection is authenticated.
        let conn = tally::nats::NatsConnection {
            nats_url: Some(url.clone()),
            ..Default::default()
        };
        let client = tally::nats::connect(&conn, "test", None)
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        js.publish(
            "usage.events.openai",
            json!(support::wire("nats-secret-1")).to_string().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while crate::support::proc::event_count(&db).await < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "not ingested: {ready}\n{}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        proc.terminate();
        let log = proc.log_text();
        assert!(log.contains("DEBUG"), "the log is at debug: {log}");
        assert_eq!(find(&log), None, "the log printed a secret:\n{log}");
        // And the connection error of a wrong port prints the URL masked.
        let out = Command::new(bin)
            .args(["emit", "--count", "1"])
            .env(
                "TALLY_NATS_URL",
                format!("nats://{url_auth}127.0.0.1:{dead_port}"),
            )
            .env("TALLY_LOG", "debug")
            .output()
            .expect("emit");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("***@127.0.0.1"), "{text}");
        assert_eq!(find(&text), None, "emit printed a secret:\n{text}");
    }
}

/// Files holding the log or the ledger are created readable by their owner
/// only; a file that exists keeps its mode.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_databases_exports_and_ledgers_are_private() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    let dir = tempfile::tempdir().expect("dir");
    let db_path = dir.path().join("t.db");
    let db = format!("sqlite://{}", db_path.display());
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let store = support::open(&db).await;
    store
        .log()
        .append(
            &[support::full_event("f1", chrono::Utc::now())],
            &[],
            &crate::projection::oracle::origin(),
        )
        .await
        .expect("append");
    store.close().await;
    assert_eq!(mode(&db_path), 0o600, "database");
    for side in ["-wal", "-shm"] {
        let p = dir.path().join(format!("t.db{side}"));
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{side}");
        }
    }
    let out_file = dir.path().join("backup.ndjson");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["export", "--out"])
        .arg(&out_file)
        .env("TALLY_DATABASE_URL", &db)
        .output()
        .expect("export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&out_file), 0o600, "export");
    assert_eq!(
        mode(&tally::transfer::ledger_path(&out_file)),
        0o600,
        "ledger"
    );
    // An existing file keeps its mode.
    let kept = dir.path().join("kept.ndjson");
    std::fs::write(&kept, "").expect("touch");
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["export", "--out"])
        .arg(&kept)
        .env("TALLY_DATABASE_URL", &db)
        .output()
        .expect("export");
    assert!(out.status.success());
    assert_eq!(mode(&kept), 0o640);
}

/// A ledger beside a backup voids events and changes prices: `tally import`
/// applies it only when asked, and refuses before importing anything when
/// neither `--ledger` nor `--no-ledger` says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_applies_a_ledger_only_when_asked() {
    use std::process::Command;
    let dir = tempfile::tempdir().expect("dir");
    let src = format!("sqlite://{}", dir.path().join("src.db").display());
    let srv_store = support::open(&src).await;
    let srv = TestServer::start(srv_store.clone(), support::server_config()).await;
    let (status, body) = srv
        .post_json(&json!([support::wire("e1"), support::wire("e2")]))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = srv
        .send_as(
            "t",
            "POST",
            "/v1/corrections",
            json!({"id": "c1", "reason": "r", "void": {"ids": ["e1"]}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    drop(srv);
    let backup = dir.path().join("b.ndjson");
    let run = |db: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(extra)
            .env("TALLY_DATABASE_URL", db)
            .env(
                "TALLY_PROJECTIONS_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections"),
            )
            .output()
            .expect("run")
    };
    let out = run(&src, &["export", "--out", backup.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = |name: &str| format!("sqlite://{}", dir.path().join(name).display());
    let b = backup.to_str().expect("path");
    let out = run(&target("plain.db"), &["import", b]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--ledger")
            && err.contains("--no-ledger")
            && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(
        crate::support::proc::event_count(&target("plain.db")).await,
        0,
        "refused before importing anything"
    );
    // Asked for: applied. Refused explicitly: not applied.
    let ledger = tally::transfer::ledger_path(&backup);
    let out = run(
        &target("with.db"),
        &["import", b, "--ledger", ledger.to_str().expect("path")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&target("without.db"), &["import", b, "--no-ledger"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (db, voided) in [("with.db", 1), ("without.db", 0)] {
        let store = support::open(&target(db)).await;
        let n = store
            .corrections()
            .list(100)
            .await
            .expect("corrections")
            .len();
        assert_eq!(n, voided, "{db}");
    }
}

/// `tally projections init` never writes through what is already at a
/// file's path (a dangling symlink included), and leaves nothing behind
/// when it stops partway.
#[cfg(unix)]
#[test]
fn projections_init_creates_new_files_only() {
    let dir = tempfile::tempdir().expect("dir");
    let target = dir.path().join("elsewhere.toml");
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).expect("dir");
    // The last file a dangling symlink: the others are written first.
    let (last, _) = tally::aggregate::spec::BUILTIN.last().expect("a spec");
    std::os::unix::fs::symlink(&target, specs.join(last)).expect("symlink");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["projections", "init"])
        .arg(&specs)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!target.exists(), "wrote through the symlink");
    let left: Vec<_> = std::fs::read_dir(&specs)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the symlink is left: {left:?}");
}

/// A rule grouped by a high-cardinality dimension is evaluated however many
/// groups it has: 250,000 keys (more rows than a query route may read) and
/// the one key over the threshold fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_over_250_000_keys_is_evaluated() {
    // A cluster of its own: its long folds would hold back the log reads of
    // the other tests on the shared one.
    let pg = tally_cli::dev::devserver::TempPostgres::start(false).expect("private postgres");
    let url = pg.create_database("wide").expect("db");
    let store = support::open(&url).await;
    let now = chrono::Utc::now();
    let origin = crate::projection::oracle::origin();
    let mut events: Vec<tally::event::Event> = (0..250_000)
        .map(|i| {
            let mut e = support::full_event(&format!("wide-{i}"), now);
            e.key = Some(format!("key-{i}"));
            e
        })
        .collect();
    for i in 0..5 {
        let mut e = support::full_event(&format!("hot-{i}"), now);
        e.key = Some("hot".into());
        events.push(e);
    }
    for chunk in events.chunks(10_000) {
        store
            .log()
            .append(chunk, &[], &origin)
            .await
            .expect("append");
    }
    let mut config = support::server_config();
    config.alerts.alerts_tick = Duration::from_millis(300);
    config.alerts.alerts_min_interval = Duration::from_millis(50);
    let srv = TestServer::start(store.clone(), config).await;
    srv.settled().await;
    let (status, body) = srv
        .send_as(
            "t",
            "POST",
            "/v1/alert-rules",
            json!({"name": "per-key", "measure": "requests", "window": "1h", "group_by": ["key"], "threshold": 3}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, rule) = srv.get("/v1/alert-rules/per-key").await;
        assert_ne!(rule["status"], "failing", "{rule}");
        let (_, a) = srv.get("/v1/alerts?rule=per-key").await;
        if let Some(active) = a["active"].as_array().filter(|v| !v.is_empty()) {
            assert_eq!(active.len(), 1, "{a}");
            assert_eq!(active[0]["group"], json!({"key": "hot"}), "{a}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never fired: {a} {rule}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
