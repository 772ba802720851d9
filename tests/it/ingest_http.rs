//! `POST /v1/events` against a real server: every bad input of the contract, the
//! HTTP answer, the rows in `usage_events` and `rejected_events`, and that the
//! valid events beside a bad one are counted exactly once.

use serde_json::{json, Value};
use tally::store::Backend;

use crate::support::{self, both_backends, now_rfc3339, wire, TestServer, TestStore};

async fn server(s: &TestStore) -> TestServer {
    TestServer::start(s.store.clone(), support::server_config()).await
}

async fn counts(s: &TestStore) -> (i64, i64) {
    let c = s.store.log().counts().await.expect("counts");
    (c.events, c.rejected)
}

both_backends!(
    valid_batch_is_accepted_and_answered_after_commit,
    each_bad_field_is_rejected_beside_valid_events,
    unparseable_bodies_get_400_and_are_kept,
    oversize_bodies_get_413,
    duplicates_and_conflicts_over_http,
);

async fn valid_batch_is_accepted_and_answered_after_commit(s: &TestStore) {
    let srv = server(s).await;
    let (status, body) = srv
        .post_json(&json!([wire("v-1"), wire("v-2"), {"id": "v-3", "ts": chrono::Utc::now().timestamp_millis(), "api": "serpapi", "cost": 0.0023}]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"accepted": 3, "duplicates": 0, "conflicts": 0, "rejected": [], "conflicting": []})
    );
    // The answer came after the commit: the rows are readable now.
    assert_eq!(counts(s).await, (3, 0));
    let e = s
        .store
        .log()
        .get_event("v-3")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(e.cost_nanos, Some(2_300_000));
    let (status, _) = srv.post_json(&wire("v-4")).await;
    assert_eq!(status, 200);
    assert_eq!(counts(s).await, (4, 0));
}

/// (field, bad value, text the error must contain).
fn bad_fields() -> Vec<(&'static str, Value, &'static str)> {
    let old = (chrono::Utc::now() - chrono::Duration::days(36)).to_rfc3339();
    let future = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    vec![
        ("id", json!(""), "`id`"),
        ("id", json!(12), "`id`: must be a string"),
        ("id", json!("x".repeat(129)), "at most 128"),
        ("id", json!("tab\there"), "control characters"),
        ("ts", json!("yesterday"), "RFC 3339"),
        ("ts", json!(true), "`ts`"),
        ("ts", json!(1.5), "integer epoch milliseconds"),
        ("ts", json!(old), "older than the late-arrival horizon"),
        ("ts", json!(future), "in the future"),
        ("api", json!(""), "`api`"),
        ("api", json!(["openai"]), "must be a string"),
        ("api", json!("a".repeat(129)), "at most 128"),
        ("endpoint", json!("e".repeat(257)), "at most 256"),
        ("key", json!(7), "`key`: must be a string"),
        ("user", json!({"a": 1}), "`user`: must be a string"),
        ("model", json!("m".repeat(257)), "at most 256"),
        ("method", json!("M".repeat(17)), "at most 16"),
        ("status", json!(99), "between 100 and 599"),
        ("status", json!(600), "between 100 and 599"),
        ("status", json!("200"), "must be an integer"),
        ("status", json!(200.5), "whole number"),
        ("success", json!("yes"), "true or false"),
        (
            "error_type",
            json!("boom"),
            "must be one of rate_limit, timeout",
        ),
        ("error_message", json!("m".repeat(1025)), "at most 1024"),
        ("latency_ms", json!(-1), "between 0 and 3600000"),
        ("latency_ms", json!(3_600_001), "between 0 and 3600000"),
        ("latency_ms", json!("fast"), "must be a number"),
        ("request_bytes", json!(-5), "must be ≥ 0"),
        ("response_bytes", json!(1.5), "whole number"),
        ("tokens_in", json!("10"), "must be an integer"),
        ("tokens_out", json!(-1), "must be ≥ 0"),
        ("cost", json!("0.0000000001"), "10 fractional digits"),
        ("cost", json!(0.0000000001), "fractional digits"),
        ("cost", json!("-0.01"), "negative"),
        ("cost", json!(-1), "negative"),
        ("cost", json!("ten"), "not a decimal number"),
        ("cost", json!(true), "decimal string"),
        ("cached", json!(1), "true or false"),
        ("metadata", json!("x"), "object of string"),
        ("metadata", json!({"a": 1}), "values must be strings"),
        (
            "metadata",
            Value::Object((0..17).map(|i| (format!("k{i}"), json!("v"))).collect()),
            "at most 16",
        ),
        ("latencyMs", json!(12), "did you mean `latency_ms`"),
        ("colour", json!("red"), "unknown field"),
    ]
}

async fn each_bad_field_is_rejected_beside_valid_events(s: &TestStore) {
    let srv = server(s).await;
    let cases = bad_fields();
    for (i, (field, value, expect)) in cases.iter().enumerate() {
        let mut bad = wire(&format!("bad-{i}"));
        bad[*field] = value.clone();
        let batch = json!([wire(&format!("ok-a-{i}")), bad, wire(&format!("ok-b-{i}"))]);
        let (status, body) = srv.post_json(&batch).await;
        assert_eq!(status, 200, "{field}={value}: {body}");
        assert_eq!(body["accepted"], 2, "{field}={value}: {body}");
        let rejected = body["rejected"].as_array().expect("rejected list");
        assert_eq!(rejected.len(), 1, "{field}={value}: {body}");
        assert_eq!(rejected[0]["index"], 1);
        let error = rejected[0]["error"].as_str().expect("error text");
        assert!(
            error.contains(expect),
            "{field}={value}: error {error:?} lacks {expect:?}"
        );
        assert!(
            error.contains(&format!("`{field}")) || *field == "id",
            "error names the field: {error}"
        );
    }
    // Missing required fields.
    for field in ["id", "ts", "api"] {
        let mut bad = wire("missing");
        bad.as_object_mut().expect("object").remove(field);
        let (status, body) = srv
            .post_json(&json!([bad, wire(&format!("ok-missing-{field}"))]))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["accepted"], 1);
        let error = body["rejected"][0]["error"].as_str().expect("error");
        assert!(
            error.contains(&format!("field `{field}`: is required")),
            "{error}"
        );
    }
    let n = cases.len() as i64;
    assert_eq!(counts(s).await, (2 * n + 3, n + 3));
    // The raw bytes of each bad item are kept with its reason.
    let rows = s.store.log().recent_rejected(1000).await.expect("rejected");
    assert!(rows
        .iter()
        .all(|r| r.kind == "invalid" && r.source == "http"));
    let latency = rows
        .iter()
        .find(|r| r.event_id.as_deref() == Some(&format!("bad-{}", n - 2)))
        .expect("row for latencyMs");
    let raw: Value = serde_json::from_slice(&latency.payload).expect("raw JSON");
    assert_eq!(raw["latencyMs"], 12);
    assert!(latency.reason.contains("latency_ms"));
}

async fn unparseable_bodies_get_400_and_are_kept(s: &TestStore) {
    let srv = server(s).await;
    let cases: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (
            Some("application/json"),
            b"{\"id\": \"x\"".to_vec(),
            "invalid JSON",
        ),
        (
            Some("application/json"),
            b"[{\"id\": 1},]".to_vec(),
            "invalid JSON",
        ),
        (
            Some("application/json"),
            b"\"hello\"".to_vec(),
            "must be a JSON object or an array",
        ),
        (
            Some("application/json"),
            b"42".to_vec(),
            "must be a JSON object or an array",
        ),
        (Some("application/json"), b"".to_vec(), "empty"),
        (Some("application/json"), b"[]".to_vec(), "no events"),
        (
            Some("application/msgpack"),
            vec![0xc1, 0x00],
            "invalid MessagePack",
        ),
        (
            Some("application/msgpack"),
            vec![0x81, 0xa2, b'i', b'd'],
            "invalid MessagePack",
        ),
        (
            Some("application/msgpack"),
            rmp_serde::to_vec(&"str").expect("encode"),
            "map or an array of maps",
        ),
        (
            Some("application/cloudevents-batch+json"),
            b"{not json".to_vec(),
            "invalid JSON",
        ),
    ];
    for (ct, body, expect) in &cases {
        let (status, answer) = srv.post(*ct, body.clone()).await;
        assert_eq!(status, 400, "{answer}");
        let error = answer["error"].as_str().expect("error");
        assert!(error.contains(expect), "{error:?} lacks {expect:?}");
        assert!(answer["code"].is_string());
    }
    let (status, answer) = srv.post(Some("text/csv"), "a,b\n1,2").await;
    assert_eq!(status, 415);
    assert!(answer["error"]
        .as_str()
        .expect("error")
        .contains("application/x-ndjson"));
    let rows = s.store.log().recent_rejected(100).await.expect("rows");
    assert_eq!(rows.len(), cases.len() + 1);
    assert!(rows
        .iter()
        .all(|r| r.kind == "unparseable" && r.event_id.is_none()));
    // Newest first: the first case is last, with its bytes intact.
    assert_eq!(rows.last().expect("row").payload, cases[0].1);
    assert_eq!(counts(s).await.0, 0);
}

async fn oversize_bodies_get_413(s: &TestStore) {
    let mut config = support::server_config();
    config.max_body_bytes = 64 * 1024;
    let srv = TestServer::start(s.store.clone(), config).await;
    let big = format!("[{}]", vec![wire("x").to_string(); 2000].join(","));
    let (status, answer) = srv
        .post_json(&serde_json::from_str(&big).expect("json"))
        .await;
    assert_eq!(status, 413);
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains("65536 bytes"),
        "{answer}"
    );
    // Too many events under the byte limit (default config: 10,000 events, 4 MiB).
    let srv = server(s).await;
    let many: Vec<Value> = (0..10_001)
        .map(|i| json!({"id": format!("m{i}")}))
        .collect();
    let (status, answer) = srv.post_json(&Value::Array(many)).await;
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains("at most 10000"),
        "{answer}"
    );
    // Exactly at the limit is fine.
    let ts = now_rfc3339();
    let ok: Vec<Value> = (0..10_000)
        .map(|i| json!({"id": format!("ok{i}"), "ts": ts, "api": "a"}))
        .collect();
    let (status, answer) = srv.post_json(&Value::Array(ok)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 10_000);
    assert_eq!(counts(s).await.0, 10_000);
}

async fn duplicates_and_conflicts_over_http(s: &TestStore) {
    let srv = server(s).await;
    let a = json!({"id": "dup-1", "ts": now_rfc3339(), "api": "openai", "cost": "0.5", "tokens_in": 10});
    let (_, body) = srv.post_json(&json!([a.clone(), a.clone()])).await;
    assert_eq!(
        (body["accepted"].clone(), body["duplicates"].clone()),
        (json!(1), json!(1))
    );
    let mut changed = a.clone();
    changed["cost"] = json!("0.6");
    let (status, body) = srv
        .post_json(&json!([a.clone(), changed, wire("dup-2")]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(body["conflicts"], 1);
    assert_eq!(body["conflicting"][0]["index"], 1);
    assert_eq!(body["conflicting"][0]["id"], "dup-1");
    assert_eq!(counts(s).await, (2, 1));
    let stored = s
        .store
        .log()
        .get_event("dup-1")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(stored.cost_nanos, Some(500_000_000));
    let rows = s.store.log().recent_rejected(10).await.expect("rows");
    assert_eq!(rows[0].kind, "conflict");
    assert!(
        rows[0].reason.contains("differs in: cost"),
        "{}",
        rows[0].reason
    );
}

#[tokio::test]
async fn encodings_ndjson_msgpack_cloudevents() {
    let s = support::store(Backend::Sqlite).await;
    let srv = server(&s).await;
    let ts = now_rfc3339();
    // NDJSON: one bad line does not spoil the others.
    let nd = format!(
        "{}\n\n{{broken\n{}\n",
        json!({"id": "nd-1", "ts": ts, "api": "a"}),
        json!({"id": "nd-2", "ts": ts, "api": "a"})
    );
    let (status, body) = srv.post(Some("application/x-ndjson"), nd).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert!(body["rejected"][0]["error"]
        .as_str()
        .expect("e")
        .contains("invalid JSON"));

    // MessagePack: a map, and an array of maps (with an integer ts and a float cost).
    #[derive(serde::Serialize)]
    struct M<'a> {
        id: &'a str,
        ts: i64,
        api: &'a str,
        cost: f64,
        latency_ms: f64,
    }
    let ms = chrono::Utc::now().timestamp_millis();
    let one = rmp_serde::to_vec_named(&M {
        id: "mp-1",
        ts: ms,
        api: "a",
        cost: 0.1,
        latency_ms: 12.5,
    })
    .expect("enc");
    let (status, body) = srv.post(Some("application/msgpack"), one).await;
    assert_eq!(
        (status, body["accepted"].clone()),
        (200, json!(1)),
        "{body}"
    );
    let many = rmp_serde::to_vec_named(&vec![
        M {
            id: "mp-2",
            ts: ms,
            api: "a",
            cost: 1.25,
            latency_ms: 1.0,
        },
        M {
            id: "mp-3",
            ts: ms,
            api: "a",
            cost: -1.0,
            latency_ms: 1.0,
        },
    ])
    .expect("enc");
    let (status, body) = srv.post(Some("application/msgpack"), many).await;
    assert_eq!(status, 200);
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected"][0]["id"], "mp-3");
    let e = s
        .store
        .log()
        .get_event("mp-1")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(
        (e.cost_nanos, e.latency_ms),
        (Some(100_000_000), Some(12.5))
    );

    // CloudEvents: id → id, time → ts, subject → key, data → the rest.
    let ce = json!({"specversion": "1.0", "id": "ce-1", "source": "svc", "type": "usage",
        "time": ts, "subject": "key_7", "data": {"api": "openai", "tokens_in": 5}});
    let (status, body) = srv
        .post(Some("application/cloudevents+json"), ce.to_string())
        .await;
    assert_eq!(
        (status, body["accepted"].clone()),
        (200, json!(1)),
        "{body}"
    );
    let e = s
        .store
        .log()
        .get_event("ce-1")
        .await
        .expect("get")
        .expect("row");
    assert_eq!((e.key.as_deref(), e.tokens_in), (Some("key_7"), Some(5)));
    let batch = json!([
        {"specversion": "1.0", "id": "ce-2", "source": "s", "type": "t", "time": ts, "data": {"api": "x"}},
        {"specversion": "0.3", "id": "ce-3", "source": "s", "type": "t", "time": ts, "data": {"api": "x"}},
        {"id": "ce-4", "ts": ts, "api": "x"}
    ]);
    let (status, body) = srv
        .post(
            Some("application/cloudevents-batch+json"),
            batch.to_string(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["accepted"], 1, "{body}");
    let errors: Vec<&str> = body["rejected"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["error"].as_str().expect("e"))
        .collect();
    assert!(
        errors[0].contains("specversion") && errors[1].contains("specversion"),
        "{errors:?}"
    );
    // Without a content type the body is sniffed.
    let (status, body) = srv.post(None, wire("sniff-1").to_string()).await;
    assert_eq!((status, body["accepted"].clone()), (200, json!(1)));
    assert_eq!(s.store.log().counts().await.expect("c").events, 7);
}

#[tokio::test]
async fn unicode_is_stored_exactly_and_limits_count_characters() {
    let s = support::store(Backend::Sqlite).await;
    let srv = server(&s).await;
    let ts = now_rfc3339();
    let endpoint = "😀".repeat(256);
    let (_, body) = srv
        .post_json(&json!([
            {"id": "ü-ñ-日本-🚀", "ts": ts, "api": "δοκιμή", "endpoint": endpoint, "user": "مستخدم",
             "error_message": "ошибка\n第二行", "metadata": {"ключ": "值"}},
            {"id": "too-long", "ts": ts, "api": "a", "endpoint": "😀".repeat(257)}
        ]))
        .await;
    assert_eq!(body["accepted"], 1, "{body}");
    assert!(body["rejected"][0]["error"]
        .as_str()
        .expect("e")
        .contains("257 characters"));
    let e = s
        .store
        .log()
        .get_event("ü-ñ-日本-🚀")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(e.api, "δοκιμή");
    assert_eq!(e.endpoint.as_deref(), Some(endpoint.as_str()));
    assert_eq!(e.error_message.as_deref(), Some("ошибка\n第二行"));
    assert_eq!(e.metadata.get("ключ").map(String::as_str), Some("值"));
}

#[tokio::test]
async fn health_and_readiness() {
    let s = support::store(Backend::Sqlite).await;
    let srv = server(&s).await;
    assert_eq!(srv.get("/healthz").await, (200, json!({"status": "ok"})));
    let (status, body) = srv.get("/readyz").await;
    assert_eq!(
        (status, body["checks"]["database"]["status"].clone()),
        (200, json!("up"))
    );
    let (status, body) = srv.get("/nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");

    // A PostgreSQL URL where nothing listens: not ready, and ingest answers 503, not 500.
    let port = tally_cli::dev::devserver::free_port().expect("port");
    let dead = tally::store::connect(
        &format!("postgres://postgres@127.0.0.1:{port}/none"),
        &tally::store::StoreOptions {
            acquire_timeout: std::time::Duration::from_millis(500),
            ..Default::default()
        },
    )
    .await
    .expect("lazy connect");
    let srv = TestServer::start(dead, support::server_config()).await;
    let (status, body) = srv.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["database"]["status"], "down");
    let (status, body) = srv.post_json(&wire("while-down")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "store_unavailable");
}
