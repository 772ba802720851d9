//! Operations and security: tokens and scopes, the non-loopback refusal,
//! `/metrics`, retention, reconciliation, jobs across instances, and
//! export/import/copy between backends.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tally::auth::{self, Scope};
use tally::jobs::{self, Job, JobContext};
use tally::store::{Backend, Origin, Store};
use tally_cli::dev::synth::{self, SynthConfig};

use crate::support::proc::{jetstream, nats, TallyProc};
use crate::support::{database, open, server_config, TestServer};

const PROJECTIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections");

fn tally() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    c.env_remove("TALLY_DATABASE_URL")
        .env("RUST_BACKTRACE", "0")
        .env("TALLY_PROJECTIONS_DIR", PROJECTIONS);
    c
}

/// Runs the binary; panics with its output unless it succeeds.
fn run_ok(args: &[&str]) -> String {
    let out = tally().args(args).output().expect("run tally");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "tally {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn fresh_db(backend: Backend) -> (String, Option<tempfile::TempDir>) {
    database(backend, "ops")
}

/// Folds every shipped projection up to the end of the log.
async fn fold_all(store: &Store) {
    fold_all_with(store, Path::new(PROJECTIONS)).await
}

/// [`fold_all`] with the specs of `dir`.
async fn fold_all_with(store: &Store, dir: &Path) {
    for task in tally::app::open_projectors(store, Some(dir))
        .await
        .expect("open projections")
    {
        task.projector
            .expect("projector")
            .catch_up(10_000)
            .await
            .expect("fold");
    }
}

/// Every row of every shipped projection table, by table name.
async fn all_aggregates(store: &Store) -> BTreeMap<String, Vec<tally::store::AggRow>> {
    let mut out = BTreeMap::new();
    for spec in tally::aggregate::spec::load_dir(Path::new(PROJECTIONS)).expect("specs") {
        for &g in &spec.granularities {
            let rows = store
                .projections()
                .read_agg(&spec, g, "")
                .await
                .expect("read agg");
            out.insert(tally::store::agg::table(&spec, g, ""), rows);
        }
    }
    out
}

fn import_origin() -> Origin {
    Origin {
        source: "import",
        subject: None,
    }
}

/// Every route with a method, a request that reaches its handler, and the scope it needs.
fn route_table() -> Vec<(reqwest::Method, &'static str, Option<Value>, Scope)> {
    use reqwest::Method as M;
    let rule = json!({"name": "r1", "measure": "requests", "window": "1h", "threshold": 1000});
    let quota = json!({"measure": "requests", "limit": 10, "window": "1h"});
    vec![
        (
            M::POST,
            "/v1/events",
            Some(json!({"id": "a1", "ts": crate::support::now_rfc3339(), "api": "x"})),
            Scope::Ingest,
        ),
        (M::GET, "/v1/stats", None, Scope::Read),
        (M::GET, "/v1/keys", None, Scope::Read),
        (M::GET, "/v1/keys/k1/stats", None, Scope::Read),
        (M::GET, "/v1/keys/k1/quota", None, Scope::Read),
        (M::PUT, "/v1/keys/k1/quota", Some(quota), Scope::Admin),
        (M::DELETE, "/v1/keys/k1/quota", None, Scope::Admin),
        (M::GET, "/v1/alert-rules", None, Scope::Read),
        (M::POST, "/v1/alert-rules", Some(rule.clone()), Scope::Admin),
        (M::GET, "/v1/alert-rules/r1", None, Scope::Read),
        (M::PUT, "/v1/alert-rules/r1", Some(rule), Scope::Admin),
        (M::GET, "/v1/alert-rules/r1/audit", None, Scope::Read),
        (M::DELETE, "/v1/alert-rules/r1", None, Scope::Admin),
        (M::GET, "/v1/alerts", None, Scope::Read),
        (M::GET, "/v1/projections", None, Scope::Read),
        (M::GET, "/metrics", None, Scope::Read),
    ]
}

async fn call(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (u16, String) {
    let mut req = server
        .client
        .request(method, format!("{}{path}", server.base));
    if let Some(b) = body {
        req = req.json(b);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn every_route_answers_401_403_or_200_by_scope() {
    let (url, _dir) = fresh_db(Backend::Sqlite);
    let store = open(&url).await;
    let server = TestServer::start(store.clone(), server_config()).await;

    // No token exists yet: the loopback API is open.
    let (status, _) = call(&server, reqwest::Method::GET, "/v1/stats", None, None).await;
    assert_eq!(status, 200, "open before any token exists");

    let mut tokens = BTreeMap::new();
    for scope in Scope::ALL {
        let (t, row) = auth::create_token(&store, scope.as_str(), &[scope], "test")
            .await
            .expect("create token");
        assert_ne!(row.token_sha256, t, "only the hash is stored");
        assert!(
            !row.token_sha256.contains(&t[6..]),
            "no part of the secret is stored"
        );
        tokens.insert(scope, t);
    }
    // Running servers pick up the first token within the reload interval.
    tokio::time::sleep(auth::RELOAD_EVERY + Duration::from_millis(200)).await;
    // The probes stay open.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let (status, _) = call(&server, reqwest::Method::GET, path, None, None).await;
        assert_eq!(status, 200, "{path} without a token");
    }
    for (method, path, body, need) in route_table() {
        let (status, text) = call(&server, method.clone(), path, body.as_ref(), None).await;
        assert_eq!(status, 401, "{method} {path} without a token: {text}");
        let (status, text) = call(
            &server,
            method.clone(),
            path,
            body.as_ref(),
            Some("tally_nope_x"),
        )
        .await;
        assert_eq!(status, 401, "{method} {path} with an unknown token: {text}");
        for scope in Scope::ALL {
            let (status, text) = call(
                &server,
                method.clone(),
                path,
                body.as_ref(),
                Some(&tokens[&scope]),
            )
            .await;
            let allowed = scope == need || scope == Scope::Admin;
            if allowed {
                assert!(
                    (200..300).contains(&status) || status == 404,
                    "{method} {path} with `{}`: {status} {text}",
                    scope.as_str()
                );
            } else {
                assert_eq!(
                    status,
                    403,
                    "{method} {path} with `{}`: {text}",
                    scope.as_str()
                );
                assert!(
                    text.contains(need.as_str()),
                    "the 403 names the scope: {text}"
                );
            }
        }
    }
    // Changes made with a token are audited under its name, whatever the header says.
    let rule = json!({"name": "audited", "measure": "requests", "window": "1h", "threshold": 5});
    let resp = server
        .client
        .post(format!("{}/v1/alert-rules", server.base))
        .bearer_auth(&tokens[&Scope::Admin])
        .header("X-Tally-Actor", "mallory")
        .json(&rule)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 201);
    let audit = store
        .alerts()
        .audit_log(Some("audited"), 10)
        .await
        .expect("audit");
    assert_eq!(audit[0].actor, "token:admin");

    // A revoked token is refused within the reload interval.
    assert!(store
        .tokens()
        .revoke_token("read", Utc::now())
        .await
        .expect("revoke"));
    tokio::time::sleep(auth::RELOAD_EVERY + Duration::from_millis(300)).await;
    let (status, _) = call(
        &server,
        reqwest::Method::GET,
        "/v1/stats",
        None,
        Some(&tokens[&Scope::Read]),
    )
    .await;
    assert_eq!(status, 401, "revoked");
}

#[tokio::test]
async fn a_token_made_by_the_cli_works_at_once_and_secrets_stay_out_of_logs() {
    let (url, _dir) = fresh_db(Backend::Postgres);
    // The test cluster trusts local connections, so any password works: it is
    // here only to be looked for in the log.
    let with_password = url.replacen(
        "postgres://postgres@",
        "postgres://postgres:hunter2secret@",
        1,
    );
    assert_ne!(with_password, url, "url shape: {url}");
    // Authentication is on from the start: one token exists.
    run_ok(&[
        "--database-url",
        &url,
        "tokens",
        "create",
        "--name",
        "ops",
        "--scope",
        "admin",
    ]);
    let server = TallyProc::start_http(
        &with_password,
        &[
            ("TALLY_LOG", "trace"),
            ("TALLY_NATS_PASSWORD", "natssecret42"),
        ],
    )
    .await;
    let out = tally()
        .args([
            "--database-url",
            &url,
            "tokens",
            "create",
            "--name",
            "svc",
            "--scope",
            "ingest",
            "--scope",
            "read",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("tally_"), "{token}");
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("{}/v1/stats", server.base))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 401, "no token");
    let resp = client
        .post(format!("{}/v1/events", server.base))
        .bearer_auth(&token)
        .json(&json!({"id": "s1", "ts": crate::support::now_rfc3339(), "api": "x"}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 200, "a fresh token works at once");
    let resp = client
        .get(format!("{}/v1/stats", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 200);
    let listed = run_ok(&["--database-url", &url, "tokens", "list", "--json"]);
    assert!(
        listed.contains("\"svc\"") && !listed.contains(&token[20..]),
        "{listed}"
    );
    let log = server.log_text();
    for secret in ["hunter2secret", "natssecret42", &token[20..]] {
        assert!(!log.contains(secret), "`{secret}` appears in the log");
    }
    assert!(
        log.contains("Tally is listening"),
        "the log was written: {log}"
    );
}

#[test]
fn serving_on_a_public_address_without_tokens_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let port = tally_cli::dev::devserver::free_port()
        .expect("port")
        .to_string();
    let addr = format!("0.0.0.0:{port}");
    let out = tally()
        .args(["--database-url", &db, "serve", "--http-addr", &addr])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve on 0.0.0.0") && err.contains("--insecure-no-auth"),
        "{err}"
    );

    // With the flag it starts.
    let mut child = tally()
        .args([
            "--database-url",
            &db,
            "serve",
            "--http-addr",
            &addr,
            "--insecure-no-auth",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap_or(0))).is_ok()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "--insecure-no-auth serves on {addr}");
}

/// Parses Prometheus text: every sample line is `name{labels} value`, every
/// family has a TYPE before its samples. Returns samples by `name{labels}`.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("name");
            let kind = parts.next().expect("kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().expect("name");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_count_what_the_test_did() {
    let nats = nats();
    let (url, _dir) = fresh_db(Backend::Sqlite);
    let server = TallyProc::start(&url, &nats.url(), &[]).await;
    let (_client, js) = jetstream(&nats.url()).await;
    let ts = crate::support::now_rfc3339();
    // NATS: 30 events, 5 of them published twice, and 2 invalid messages.
    for i in 0..30 {
        let body = json!({"id": format!("n{i}"), "ts": ts, "api": "x", "cost": "0.01"}).to_string();
        let copies = if i < 5 { 2 } else { 1 };
        for _ in 0..copies {
            js.publish("usage.events.x", body.clone().into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    }
    for bad in ["{not json", r#"{"id":"bad1","api":"x"}"#] {
        js.publish("usage.events.x", bad.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    // HTTP: 10 events, one conflicting with a NATS one.
    let client = reqwest::Client::new();
    let mut batch: Vec<Value> = (0..9)
        .map(|i| json!({"id": format!("h{i}"), "ts": ts, "api": "x"}))
        .collect();
    batch.push(json!({"id": "n0", "ts": ts, "api": "different"}));
    crate::support::proc::wait_drained(&url, &js, 30, Duration::from_secs(30), "nats events").await;
    let resp = client
        .post(format!("{}/v1/events", server.base))
        .json(&batch)
        .send()
        .await
        .expect("post");
    assert!(resp.status().is_success());
    let text = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let m = parse_prometheus(&text);
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(
        get("tally_events_ingested_total{source=\"nats\"}"),
        30.0,
        "{text}"
    );
    assert_eq!(
        get("tally_events_duplicates_total{source=\"nats\"}"),
        5.0,
        "{text}"
    );
    assert_eq!(
        get("tally_events_rejected_total{source=\"nats\",reason=\"unparseable\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        get("tally_events_rejected_total{source=\"nats\",reason=\"invalid\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        get("tally_events_ingested_total{source=\"http\"}"),
        9.0,
        "{text}"
    );
    assert_eq!(
        get("tally_events_conflicts_total{source=\"http\"}"),
        1.0,
        "{text}"
    );
    assert!(
        get("tally_append_batch_seconds_count{source=\"http\"}") >= 1.0,
        "{text}"
    );
    assert!(m.contains_key("tally_nats_consumer_pending"), "{text}");
    assert!(
        m.keys()
            .any(|k| k.starts_with("tally_projection_lag_events{projection=\"by_key\"}")),
        "{text}"
    );
    for checkpoint in ["by_key", "by_key~coarse"] {
        assert!(
            m.keys().any(|k| k.starts_with(&format!(
                "tally_checkpoint_lag_events{{checkpoint=\"{checkpoint}\"}}"
            ))),
            "{text}"
        );
    }
    assert_eq!(get("tally_alert_outbox_backlog"), 0.0);
    assert_eq!(get("tally_database_up"), 1.0);
    assert!(
        get("tally_db_pool_connections{pool=\"reader\",state=\"max\"}") >= 1.0,
        "{text}"
    );
}

fn job_ctx(store: &Store, retention: Option<Duration>) -> JobContext {
    JobContext {
        store: store.clone(),
        specs: tally::aggregate::spec::load_dir(Path::new(PROJECTIONS))
            .expect("specs")
            .into_iter()
            .map(Arc::new)
            .collect(),
        retention,
        batch: 7,
        instance: "test".into(),
        alert_prefix: "usage.alerts".into(),
        history: Default::default(),
    }
}

async fn run(ctx: &JobContext, job: Job) -> jobs::JobOutcome {
    let (_, r) = jobs::run_job(ctx, job, Utc::now(), "manual")
        .await
        .expect("run job")
        .expect("slot free");
    r.expect("job ok")
}

fn event_at(id: &str, ts: DateTime<Utc>) -> tally::event::Event {
    let mut e = crate::support::full_event(id, ts);
    e.metadata.clear();
    e
}

async fn retention_case(backend: Backend) {
    let (url, _dir) = fresh_db(backend);
    let store = open(&url).await;
    let now = Utc::now();
    let days = |d: i64| now - chrono::Duration::days(d);
    // 20 events 40 days old (past a 36-day retention), 20 at 30 days, 20 at 10, 20 now.
    let mut events = Vec::new();
    for (age, n) in [(40, 20), (30, 20), (10, 20), (0, 20)] {
        for i in 0..n {
            events.push(event_at(&format!("e{age}-{i}"), days(age)));
        }
    }
    store
        .log()
        .append(&events, &[], &import_origin())
        .await
        .expect("append");
    // Rows folded while they were young, now past their retention: the fold
    // writes no minute row past a retention (and its margin) any more, so the
    // events are folded with the shipped specs less their retentions (the
    // same projections: a retention is not part of a spec's hash).
    let young = tempfile::tempdir().expect("dir");
    for entry in std::fs::read_dir(PROJECTIONS).expect("specs") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("spec");
            let kept: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("retention"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(young.path().join(path.file_name().expect("name")), kept)
                .expect("write");
        }
    }
    fold_all_with(&store, young.path()).await;
    let spec = tally::aggregate::spec::load_dir(Path::new(PROJECTIONS))
        .expect("specs")
        .into_iter()
        .find(|s| {
            s.retention
                .contains_key(&tally::aggregate::spec::Granularity::Minute)
        })
        .expect("a projection with minute retention");
    let keep_minutes = spec.retention[&tally::aggregate::spec::Granularity::Minute];
    let minute_rows = |store: Store, spec: tally::aggregate::spec::Spec| async move {
        store
            .projections()
            .read_agg(&spec, tally::aggregate::spec::Granularity::Minute, "")
            .await
            .expect("rows")
    };
    let before = minute_rows(store.clone(), spec.clone()).await;
    assert_eq!(before.len(), 4, "one minute row per age");

    // Horizon 35 days: 36 is the least retention config accepts.
    let ctx = job_ctx(&store, Some(Duration::from_secs(36 * 86_400)));
    let out = run(&ctx, Job::Retention).await;
    assert_eq!(out.detail["deleted"]["usage_events"], 20, "{}", out.detail);
    assert_eq!(store.log().counts().await.expect("counts").events, 60);
    for id in ["e40-0", "e40-19"] {
        assert!(
            store.log().get_event(id).await.expect("get").is_none(),
            "{id} deleted"
        );
    }
    for id in ["e30-0", "e10-19", "e0-5"] {
        assert!(
            store.log().get_event(id).await.expect("get").is_some(),
            "{id} kept"
        );
    }
    // Minute rows past the spec's retention go; hourly and daily rows stay.
    let after = minute_rows(store.clone(), spec.clone()).await;
    let cutoff = now - chrono::Duration::from_std(keep_minutes).expect("duration");
    assert!(after.iter().all(|r| r.bucket >= cutoff));
    assert_eq!(
        after.len(),
        before.iter().filter(|r| r.bucket >= cutoff).count()
    );
    let by_key = tally::aggregate::spec::load_dir(Path::new(PROJECTIONS))
        .expect("specs")
        .into_iter()
        .find(|s| s.name == "by_key")
        .expect("by_key");
    let hours = store
        .projections()
        .read_agg(&by_key, tally::aggregate::spec::Granularity::Hour, "")
        .await
        .expect("hours");
    assert_eq!(
        hours.iter().map(|r| r.measures.requests).sum::<i64>(),
        80,
        "aggregates keep history"
    );

    // A re-sent id inside the horizon is still a duplicate; one past it is refused, not counted.
    let intake = tally::ingest::Intake::new(store.clone(), server_config().intake_limits());
    let resent = json!([
        tally::event::codec::to_wire_json(&event_at("e30-3", days(30))),
        tally::event::codec::to_wire_json(&event_at("e40-3", days(40))),
    ]);
    let report = intake
        .ingest(
            resent.to_string().as_bytes(),
            Some("application/json"),
            &Origin {
                source: "http",
                subject: None,
            },
        )
        .await
        .expect("ingest");
    assert_eq!(
        (report.accepted, report.duplicates, report.rejected.len()),
        (0, 1, 1),
        "{report:?}"
    );
    assert!(report.rejected[0].error.contains("ts"), "{report:?}");
    // Running it again deletes nothing more.
    let again = run(&ctx, Job::Retention).await;
    assert_eq!(again.rows_affected, 0, "{}", again.detail);
    assert_eq!(store.log().counts().await.expect("counts").events, 60);
}

#[tokio::test]
async fn retention_deletes_only_past_the_horizon_sqlite() {
    retention_case(Backend::Sqlite).await;
}

#[tokio::test]
async fn retention_deletes_only_past_the_horizon_postgres() {
    retention_case(Backend::Postgres).await;
}

async fn corrupt(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let pool = crate::support::sqlite_pool(url).await;
        let done = sqlx::query(sql).execute(&pool).await.expect("corrupt");
        assert_eq!(done.rows_affected(), 1, "{sql}");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("pg");
        let done = sqlx::query(sql).execute(&pool).await.expect("corrupt");
        assert_eq!(done.rows_affected(), 1, "{sql}");
        pool.close().await;
    }
}

async fn reconciliation_case(backend: Backend) {
    let (url, _dir) = fresh_db(backend);
    let store = open(&url).await;
    let yesterday = (Utc::now() - chrono::Duration::days(1))
        .date_naive()
        .and_hms_opt(12, 0, 0)
        .expect("noon")
        .and_utc();
    let cfg = SynthConfig {
        span: Duration::from_secs(6 * 3600),
        now: yesterday,
        id_prefix: "r".into(),
        ..SynthConfig::default()
    };
    store
        .log()
        .append(&synth::events(&cfg, 0, 2_000), &[], &import_origin())
        .await
        .expect("append");
    fold_all(&store).await;
    let ctx = job_ctx(&store, None);
    let clean = run(&ctx, Job::Reconciliation).await;
    assert_eq!(
        clean.detail["mismatches"],
        json!([]),
        "no false alarm: {}",
        clean.detail
    );
    assert!(clean.rows_affected > 100, "rows compared: {}", clean.detail);
    assert!(store
        .alerts()
        .alert_instances()
        .await
        .expect("instances")
        .is_empty());

    // One stored hourly row is off by one request.
    corrupt(
        &url,
        "UPDATE agg_by_key_hour SET requests = requests + 1 WHERE (bucket, api, key, model) = \
         (SELECT bucket, api, key, model FROM agg_by_key_hour ORDER BY bucket, api, key, model LIMIT 1)",
    )
    .await;
    let found = run(&ctx, Job::Reconciliation).await;
    let mismatches = found.detail["mismatches"].as_array().expect("list").clone();
    assert_eq!(mismatches.len(), 1, "{}", found.detail);
    assert_eq!(mismatches[0]["projection"], "by_key");
    assert_eq!(mismatches[0]["rows"], 1);
    assert!(
        mismatches[0]["first"]
            .as_str()
            .expect("first")
            .contains("hour bucket"),
        "{}",
        found.detail
    );
    // Found again by the next run, but raised only once.
    run(&ctx, Job::Reconciliation).await;
    let notes = store
        .alerts()
        .notifications(&tally::store::alerts::HistoryFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("history");
    assert_eq!(notes.len(), 1, "exactly one alert: {notes:?}");
    assert_eq!(
        notes[0].n.rule,
        tally::alert::reconcile::RECONCILIATION_RULE
    );
    assert_eq!(notes[0].n.state.as_str(), "firing");
    assert_eq!(
        notes[0].n.subject,
        "usage.alerts.critical.tally_reconciliation_mismatch"
    );
    let body: Value = serde_json::from_str(&notes[0].n.payload).expect("json");
    assert_eq!(
        body["group"],
        json!({"projection": "by_key", "day": yesterday.date_naive().to_string()})
    );

    // Repaired by a rebuild: the next run resolves it, once.
    tally::projection::rebuild::rebuild(
        store.clone(),
        Arc::new(
            ctx.specs
                .iter()
                .find(|s| s.name == "by_key")
                .expect("by_key")
                .as_ref()
                .clone(),
        ),
        10_000,
        "test",
        |_, _| {},
    )
    .await
    .expect("rebuild");
    let repaired = run(&ctx, Job::Reconciliation).await;
    assert_eq!(repaired.detail["mismatches"], json!([]));
    let notes = store
        .alerts()
        .notifications(&tally::store::alerts::HistoryFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("history");
    assert_eq!(
        notes.iter().map(|n| n.n.state.as_str()).collect::<Vec<_>>(),
        ["resolved", "firing"]
    );

    // A late event for three days ago: that day is checked too, and a corrupted
    // daily row there is found.
    let late_day = Utc::now() - chrono::Duration::days(3);
    let mut late = event_at("late-1", late_day);
    late.key = Some("late-key".into());
    store
        .log()
        .append(&[late], &[], &import_origin())
        .await
        .expect("late");
    fold_all(&store).await;
    corrupt(
        &url,
        "UPDATE agg_by_key_day SET cost_nanos = cost_nanos + 5 WHERE key = 'late-key'",
    )
    .await;
    let out = run(&ctx, Job::Reconciliation).await;
    let mismatches = out.detail["mismatches"].as_array().expect("list").clone();
    assert_eq!(mismatches.len(), 1, "{}", out.detail);
    assert_eq!(
        mismatches[0]["day"],
        late_day.date_naive().to_string(),
        "{}",
        out.detail
    );
    let metrics = tally::metrics::RECONCILIATION_MISMATCHES.get(&["by_key"]);
    assert!(metrics >= 3, "mismatches counted in metrics: {metrics}");
}

#[tokio::test]
async fn reconciliation_detects_a_corrupted_row_and_alerts_once_sqlite() {
    reconciliation_case(Backend::Sqlite).await;
}

#[tokio::test]
async fn reconciliation_detects_a_corrupted_row_and_alerts_once_postgres() {
    reconciliation_case(Backend::Postgres).await;
}

#[tokio::test]
async fn a_scheduled_job_runs_once_per_occurrence_across_two_instances() {
    let (url, _dir) = fresh_db(Backend::Postgres);
    let every_2s = [
        ("TALLY_JOB_OPTIMIZE_CRON", "*/2 * * * * *"),
        ("TALLY_JOB_RETENTION_CRON", "off"),
        ("TALLY_JOB_RECONCILIATION_CRON", "off"),
    ];
    let mut a = TallyProc::start_http(&url, &every_2s).await;
    let mut b = TallyProc::start_http(&url, &every_2s).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    // Stopped before counting, so no run starts between the reads below.
    a.kill9();
    b.kill9();
    let store = open(&url).await;
    let runs = store
        .jobs()
        .job_runs(Some("optimize"), 100)
        .await
        .expect("runs");
    assert!(runs.len() >= 3, "{runs:?}");
    let slots: std::collections::BTreeSet<_> = runs.iter().map(|r| r.slot).collect();
    assert_eq!(slots.len(), runs.len(), "one run per occurrence: {runs:?}");
    for r in &runs {
        assert_eq!(
            r.slot.timestamp() % 2,
            0,
            "slots are the cron occurrences: {r:?}"
        );
        assert_eq!(r.trigger, "schedule");
    }
    assert!(
        runs.iter().filter(|r| r.outcome == "ok").count() >= 2,
        "{runs:?}"
    );
    // Both instances fired; for each occurrence one of them stood down.
    let (la, lb) = (a.log_text(), b.log_text());
    let stood_down = la.matches("another instance runs this occurrence").count()
        + lb.matches("another instance runs this occurrence").count();
    let started = la.matches("job started").count() + lb.matches("job started").count();
    assert!(stood_down >= 2, "stood down {stood_down} times\n{la}\n{lb}");
    // Each started run has its row (a kill can fall between the insert and the log line).
    assert!(
        started <= runs.len() && runs.len() <= started + 1,
        "started {started}, recorded {}",
        runs.len()
    );
    // Analysts read the same table with plain SQL.
    let pool = sqlx::PgPool::connect(&url).await.expect("pg");
    type Row = (String, DateTime<Utc>, Option<DateTime<Utc>>, String, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT job, started, finished, outcome, rows_affected FROM job_runs ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("job_runs");
    assert_eq!(rows.len(), runs.len());
    assert!(rows
        .iter()
        .all(|r| r.0 == "optimize" && r.2.is_none_or(|f| f >= r.1)));
    pool.close().await;
    let listed = run_ok(&[
        "--database-url",
        &url,
        "jobs",
        "list",
        "--job",
        "optimize",
        "--json",
    ]);
    let listed: Vec<Value> = serde_json::from_str(&listed).expect("json");
    assert!(listed.len() >= runs.len());
}

#[tokio::test]
async fn export_import_and_copy_to_postgres_keep_aggregates_identical() {
    let (src_url, _src_dir) = fresh_db(Backend::Sqlite);
    let src = open(&src_url).await;
    let cfg = SynthConfig {
        span: Duration::from_secs(3 * 86_400),
        id_prefix: "x".into(),
        ..SynthConfig::default()
    };
    let mut events = synth::events(&cfg, 0, 3_000);
    events[0].metadata.insert("team".into(), "search".into());
    events[1].error_message = Some("upstream said no".into());
    // Some events without a cost, for the price catalog to price.
    for e in events.iter_mut().skip(4).step_by(3) {
        e.cost_nanos = None;
    }
    src.log()
        .append(&events, &[], &import_origin())
        .await
        .expect("append");
    fold_all(&src).await;
    // Some alert state to carry over.
    let server = TestServer::start(src.clone(), server_config()).await;
    let resp = server
        .client
        .post(format!("{}/v1/alert-rules", server.base))
        .json(&json!({"name": "big", "measure": "requests", "window": "1h", "group_by": ["key"], "threshold": 100000}))
        .send()
        .await
        .expect("rule");
    assert_eq!(resp.status().as_u16(), 201);
    let resp = server
        .client
        .put(format!("{}/v1/keys/key_01/quota", server.base))
        .json(&json!({"measure": "tokens", "limit": 1000000, "window": "1h"}))
        .send()
        .await
        .expect("quota");
    assert!(resp.status().is_success());
    // Prices and a correction, which must travel with the events.
    let model = events
        .iter()
        .find(|e| e.cost_nanos.is_none())
        .and_then(|e| e.model.clone())
        .expect("an unpriced event with a model");
    let resp = server
        .client
        .put(format!("{}/v1/prices", server.base))
        .json(
            &json!([{"model": model, "effective_from": "2020-01-01T00:00:00Z",
                        "input_per_mtok": "1.5", "output_per_mtok": "2.25"}]),
        )
        .send()
        .await
        .expect("prices");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = server
        .client
        .post(format!("{}/v1/corrections", server.base))
        .json(&json!({"id": "dup", "reason": "double-sent",
                      "void": {"ids": [events[2].id, events[3].id]}}))
        .send()
        .await
        .expect("correction");
    assert_eq!(resp.status().as_u16(), 201);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, p) = server.get("/v1/projections").await;
        let list = p["projections"].as_array().cloned().unwrap_or_default();
        if !list.is_empty()
            && list
                .iter()
                .all(|x| x["restating"] == 0 && x["lag_events"] == 0)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not restated: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server);
    // The server closes its store when it stops: open the file again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let src = open(&src_url).await;
    let src_aggs = all_aggregates(&src).await;
    let src_totals = src.log().log_totals().await.expect("totals");
    assert_eq!(
        src.log().counted_totals().await.expect("counted").events,
        2_998
    );
    let catalog_cost: i64 = src_aggs["agg_by_key_day"]
        .iter()
        .map(|r| r.measures.cost_from_catalog_nanos)
        .sum();
    assert!(catalog_cost > 0, "the price priced events");

    let dir = tempfile::tempdir().expect("dir");
    for format in ["ndjson", "msgpack"] {
        let file = dir.path().join(format!("backup.{format}"));
        let file = file.to_str().expect("path");
        run_ok(&[
            "--database-url",
            &src_url,
            "export",
            "--format",
            format,
            "--out",
            file,
        ]);
        let (dst_url, _dst_dir) = fresh_db(Backend::Sqlite);
        let ledger = format!("{file}.ledger.json");
        let out = run_ok(&[
            "--database-url",
            &dst_url,
            "import",
            file,
            "--ledger",
            &ledger,
        ]);
        let report: Value = serde_json::from_str(&out).expect("report");
        assert_eq!(report["accepted"], 3_000, "{out}");
        assert_eq!(report["rejected"], 0, "{out}");
        let again: Value = serde_json::from_str(&run_ok(&[
            "--database-url",
            &dst_url,
            "import",
            file,
            "--ledger",
            &ledger,
        ]))
        .expect("report");
        assert_eq!(
            (again["accepted"].as_i64(), again["duplicates"].as_i64()),
            (Some(0), Some(3_000)),
            "idempotent"
        );
        assert!(
            std::path::Path::new(&format!("{file}.ledger.json")).exists(),
            "the ledger travels beside the backup"
        );
        let dst = open(&dst_url).await;
        assert_eq!(
            dst.log().log_totals().await.expect("totals"),
            src_totals,
            "{format}"
        );
        assert_eq!(
            all_aggregates(&dst).await,
            src_aggs,
            "{format}: aggregates equal"
        );
        for id in [&events[0].id, &events[1].id] {
            assert_eq!(
                dst.log().get_event(id).await.expect("get"),
                src.log().get_event(id).await.expect("get"),
                "{format}: {id} round-trips whole"
            );
        }
    }
    // A time-range export holds exactly the events in the range.
    let from = (Utc::now() - chrono::Duration::days(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let ranged = dir.path().join("range.ndjson");
    run_ok(&[
        "--database-url",
        &src_url,
        "export",
        "--from",
        &from,
        "--out",
        ranged.to_str().expect("path"),
    ]);
    let lines = std::fs::read_to_string(&ranged)
        .expect("read")
        .lines()
        .count();
    let from_t: DateTime<Utc> = from.parse().expect("time");
    assert_eq!(lines, events.iter().filter(|e| e.ts >= from_t).count());

    // copy SQLite → PostgreSQL.
    let (pg_url, _) = fresh_db(Backend::Postgres);
    let out = run_ok(&["copy", "--from", &src_url, "--to", &pg_url]);
    assert!(out.contains("verified: 3000 events"), "{out}");
    let pg = open(&pg_url).await;
    assert_eq!(pg.log().log_totals().await.expect("totals"), src_totals);
    assert_eq!(
        all_aggregates(&pg).await,
        src_aggs,
        "copy: aggregates equal"
    );
    let rules = pg.alerts().alert_rules().await.expect("rules");
    assert_eq!(
        rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["big"]
    );
    assert_eq!(
        rules,
        src.alerts().alert_rules().await.expect("rules"),
        "rules keep uid and version"
    );
    assert_eq!(
        pg.alerts().quotas().await.expect("quotas"),
        src.alerts().quotas().await.expect("quotas")
    );
    // A second copy into the now non-empty target is refused.
    let out = tally()
        .args(["copy", "--from", &src_url, "--to", &pg_url])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty target"));
}

const NATS_CONF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../docker/nats/nats-server.conf"
);

async fn connect_as(url: &str, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

/// The shipped nats-server config (the one docker/compose.yaml mounts): Tally
/// works with only its user's permissions, producers and alert consumers with
/// theirs, and Tally's user cannot touch other streams.
#[tokio::test]
async fn nats_users_limited_to_their_subjects() {
    use futures::StreamExt;
    let env = [
        ("TALLY_NATS_PASSWORD", "t-pass-1"),
        ("PRODUCER_NATS_PASSWORD", "p-pass-2"),
        ("ALERTS_NATS_PASSWORD", "a-pass-3"),
    ];
    let nats = tally_cli::dev::devserver::TempNats::start_with_config(Path::new(NATS_CONF), &env)
        .expect("nats-server with the shipped config");
    let url = nats.url();
    let (db, _dir) = fresh_db(Backend::Sqlite);
    let server = TallyProc::start(
        &db,
        &url,
        &[
            ("TALLY_NATS_USER", "tally"),
            ("TALLY_NATS_PASSWORD", "t-pass-1"),
        ],
    )
    .await;
    let alerts = connect_as(&url, "alerts", "a-pass-3").await;
    let mut alert_sub = alerts
        .subscribe("usage.alerts.>")
        .await
        .expect("subscribe alerts");
    let producer = connect_as(&url, "producer", "p-pass-2").await;
    let mut rejected_sub = producer
        .subscribe("usage.rejected")
        .await
        .expect("subscribe rejected");
    producer.flush().await.expect("flush");
    alerts.flush().await.expect("flush");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/alert-rules", server.base))
        // 5m, not 1m: a 1m window is the current minute only, so events sent
        // at :59 and evaluated at :00 would not count (seen once in CI).
        .json(&json!({"name": "burst", "severity": "critical", "measure": "requests", "window": "5m", "threshold": 5}))
        .send()
        .await
        .expect("rule");
    assert_eq!(resp.status().as_u16(), 201);
    let js = async_nats::jetstream::new(producer.clone());
    let ts = crate::support::now_rfc3339();
    for i in 0..10 {
        let body = json!({"id": format!("p{i}"), "ts": ts, "api": "x"}).to_string();
        js.publish("usage.events.x", body.into())
            .await
            .expect("publish")
            .await
            .expect("stream ack");
    }
    js.publish("usage.events.x", "{broken".into())
        .await
        .expect("publish")
        .await
        .expect("stream ack");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while crate::support::proc::event_count(&db).await < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ingested; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let notice = tokio::time::timeout(Duration::from_secs(10), rejected_sub.next())
        .await
        .expect("a rejected notice")
        .expect("message");
    let notice: Value = serde_json::from_slice(&notice.payload).expect("json");
    assert_eq!(notice["kind"], "unparseable");
    let alert = tokio::time::timeout(Duration::from_secs(30), alert_sub.next())
        .await
        .unwrap_or_else(|_| panic!("no alert; log:\n{}", server.log_text()))
        .expect("message");
    assert_eq!(alert.subject.as_str(), "usage.alerts.critical.burst");
    let body: Value = serde_json::from_slice(&alert.payload).expect("json");
    assert_eq!(body["state"], "firing");

    // Tally's user may not create (or touch) other streams.
    let as_tally = connect_as(&url, "tally", "t-pass-1").await;
    let js = async_nats::jetstream::new(as_tally);
    let other = tokio::time::timeout(
        Duration::from_secs(8),
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "OTHER".into(),
            subjects: vec!["other.>".into()],
            ..Default::default()
        }),
    )
    .await;
    assert!(
        !matches!(other, Ok(Ok(_))),
        "the tally user created a foreign stream"
    );
    // A wrong password is refused.
    let wrong = async_nats::ConnectOptions::with_user_and_password("tally".into(), "nope".into())
        .max_reconnects(Some(1))
        .connect(&url)
        .await;
    assert!(wrong.is_err(), "a wrong password connects");
    drop(server);
}

/// The files docker/compose.yaml mounts and builds from are the tested ones.
#[test]
fn compose_mounts_the_tested_config_files() {
    let root = &Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let compose = std::fs::read_to_string(root.join("docker/compose.yaml")).expect("compose.yaml");
    assert!(
        compose.contains("./nats/nats-server.conf:/etc/nats/nats-server.conf:ro"),
        "compose mounts the nats config the tests use"
    );
    assert!(
        compose.contains("-c, /etc/nats/nats-server.conf")
            || compose.contains("\"-c\", \"/etc/nats/nats-server.conf\"")
    );
    for var in [
        "TALLY_NATS_USER: tally",
        "TALLY_NATS_PASSWORD",
        "TALLY_DATABASE_URL: postgres://",
    ] {
        assert!(compose.contains(var), "compose sets {var}");
    }
    assert!(root.join("docker/nats/nats-server.conf").is_file());
    let dockerfile = std::fs::read_to_string(root.join("docker/Dockerfile")).expect("Dockerfile");
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        for src in line
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, s)| s.to_vec())
            .unwrap_or_default()
        {
            assert!(root.join(src).exists(), "Dockerfile copies missing {src}");
        }
    }
    assert!(dockerfile.contains("USER tally"), "runs as a non-root user");
    // When a docker CLI with compose is installed, the file must validate.
    let out = Command::new("docker")
        .args(["compose", "-f"])
        .arg(root.join("docker/compose.yaml"))
        .arg("config")
        .output();
    if let Ok(out) = out {
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let cfg = String::from_utf8_lossy(&out.stdout);
            assert!(cfg.contains("nats-server.conf"), "{cfg}");
        } else {
            assert!(
                err.contains("unknown command")
                    || err.contains("is not a docker command")
                    || err.contains("unknown shorthand"),
                "docker compose config failed: {err}"
            );
        }
    }
}

/// A JSON array file imports too; history older than the late-arrival
/// horizon is restored, and invalid items are counted, not lost.
#[tokio::test]
async fn import_takes_a_json_array_and_restores_old_history() {
    let (url, _dir) = fresh_db(Backend::Sqlite);
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("events.json");
    let old = (Utc::now() - chrono::Duration::days(100)).to_rfc3339();
    let body = json!([
        {"id": "j1", "ts": old, "api": "x", "cost": "0.25"},
        {"id": "j2", "ts": crate::support::now_rfc3339(), "api": "x", "tokens_in": 7},
        {"id": "j3", "api": "x"}
    ]);
    std::fs::write(&file, serde_json::to_string_pretty(&body).expect("json")).expect("write");
    let out = run_ok(&[
        "--database-url",
        &url,
        "import",
        file.to_str().expect("path"),
    ]);
    let report: Value = serde_json::from_str(&out).expect("report");
    assert_eq!(
        (report["accepted"].as_i64(), report["rejected"].as_i64()),
        (Some(2), Some(1)),
        "{out}"
    );
    let store = open(&url).await;
    let totals = store.log().log_totals().await.expect("totals");
    assert_eq!(
        (totals.events, totals.cost_nanos, totals.tokens_in),
        (2, 250_000_000, 7)
    );
    let rejected = store.log().recent_rejected(10).await.expect("rejected");
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].source, "import");
    assert!(rejected[0].reason.contains("ts"), "{}", rejected[0].reason);
}
