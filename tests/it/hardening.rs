//! Bad inputs and faults that used to stop ingest or freeze the aggregates
//! (issue 17): each test shows the exact counts of the valid events beside the
//! bad ones, on both backends and through both HTTP and NATS where they apply.

use std::time::Duration;

use serde_json::{json, Value};
use tally::store::Backend;

use crate::support::proc::{
    consumer_backlog, event_count, jetstream, nats, wait_drained, TallyProc,
};
use crate::support::{self, both_backends, now_rfc3339, wire, TestServer, TestStore};

async fn server(s: &TestStore) -> TestServer {
    TestServer::start(s.store.clone(), support::server_config()).await
}

both_backends!(
    nul_and_control_characters_are_refused_by_field_beside_valid_events,
    oversize_quantities_are_refused_at_ingest_and_the_fold_goes_on,
    leap_seconds_are_stored_alike_and_retries_are_duplicates,
    a_row_the_database_refuses_is_kept_and_its_neighbours_counted,
);

/// (what, item, text the reason must contain).
fn nul_cases() -> Vec<(&'static str, Value, &'static str)> {
    let ts = now_rfc3339();
    vec![
        (
            "error_message",
            json!({"id": "nul-1", "ts": ts, "api": "a", "success": false, "error_message": "bad\u{0}byte"}),
            "`error_message`",
        ),
        (
            "metadata key",
            json!({"id": "nul-2", "ts": ts, "api": "a", "metadata": {"k\u{0}": "v"}}),
            "`metadata.k\\u{0}`",
        ),
        (
            "metadata value",
            json!({"id": "nul-3", "ts": ts, "api": "a", "metadata": {"k": "v\u{0}"}}),
            "`metadata.k`",
        ),
        (
            "an invalid item's id",
            json!({"id": "nul\u{0}-4", "ts": ts, "api": "a"}),
            "`id`",
        ),
        (
            "an unknown field's name",
            json!({"id": "nul-5", "ts": ts, "api": "a", "bad\u{0}name": 1}),
            "`bad\\u{0}name`",
        ),
        (
            "a bell in the model",
            json!({"id": "nul-6", "ts": ts, "api": "a", "model": "gpt\u{7}"}),
            "`model`",
        ),
    ]
}

async fn nul_and_control_characters_are_refused_by_field_beside_valid_events(s: &TestStore) {
    let srv = server(s).await;
    let cases = nul_cases();
    let mut batch = Vec::new();
    for (i, (_, item, _)) in cases.iter().enumerate() {
        batch.push(wire(&format!("nul-ok-{i}")));
        batch.push(item.clone());
    }
    // Tab, line feed and carriage return stay allowed in free text.
    let mut lines = wire("nul-ok-lines");
    lines["success"] = json!(false);
    lines["error_message"] = json!("line 1\n\tline 2\r\n");
    lines["metadata"] = json!({"trace": "a\tb"});
    batch.push(lines);
    let (status, body) = srv.post_json(&Value::Array(batch)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], cases.len() + 1, "{body}");
    let rejected = body["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), cases.len(), "{body}");
    for ((what, _, expect), r) in cases.iter().zip(rejected) {
        let error = r["error"].as_str().expect("error");
        assert!(error.contains(expect), "{what}: {error:?} lacks {expect:?}");
        assert!(!error.contains('\u{0}'), "{what}: raw NUL in {error:?}");
    }
    // The invalid item's id is kept escaped, so it can be found.
    assert_eq!(rejected[3]["id"], "nul\\u{0}-4");
    let c = s.store.log().counts().await.expect("counts");
    assert_eq!(
        (c.events, c.rejected),
        (cases.len() as i64 + 1, cases.len() as i64)
    );
    let rows = s.store.log().recent_rejected(100).await.expect("rows");
    assert!(rows
        .iter()
        .any(|r| r.event_id.as_deref() == Some("nul\\u{0}-4")));
    // The raw bytes are kept as they came, NUL included.
    assert!(rows
        .iter()
        .any(|r| r.payload.windows(6).any(|w| w == b"\\u0000")));
}

async fn oversize_quantities_are_refused_at_ingest_and_the_fold_goes_on(s: &TestStore) {
    let srv = server(s).await;
    let ts = now_rfc3339();
    let cases = [
        ("tokens_in", json!(5e18), "must be ≤ 1000000000"),
        (
            "tokens_out",
            json!(5_000_000_000_i64),
            "must be ≤ 1000000000",
        ),
        (
            "request_bytes",
            json!(9_000_000_000_000_000_i64),
            "must be ≤ 1000000000000",
        ),
        ("response_bytes", json!(u64::MAX), "must be ≤ 1000000000000"),
        (
            "cost",
            json!("5000000000"),
            "largest cost of one event, 1000",
        ),
        (
            "cost",
            json!(1000.000000001),
            "largest cost of one event, 1000",
        ),
    ];
    let mut batch = Vec::new();
    for (i, (field, value, _)) in cases.iter().enumerate() {
        let mut bad = json!({"id": format!("big-{i}"), "ts": ts, "api": "big"});
        bad[*field] = value.clone();
        batch.push(bad);
        batch.push(json!({"id": format!("big-ok-{i}"), "ts": ts, "api": "big", "tokens_in": 1_000_000_000_i64, "cost": "1000"}));
    }
    let (status, body) = srv.post_json(&Value::Array(batch)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], cases.len(), "{body}");
    let rejected = body["rejected"].as_array().expect("rejected");
    for ((field, _, expect), r) in cases.iter().zip(rejected) {
        let error = r["error"].as_str().expect("error");
        assert!(
            error.contains(&format!("`{field}`")) && error.contains(expect),
            "{field}: {error:?} lacks {expect:?}"
        );
    }
    // The maximum values fold: the served projections reach the log's end
    // and sum exactly (before the bound, 5e18 twice froze them).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, answer) = srv.get("/v1/stats?granularity=hour&api=big").await;
        assert_eq!(status, 200, "{answer}");
        let totals = &answer["totals"][0];
        if totals["requests"] == cases.len() {
            assert_eq!(totals["tokens_in"], 6_000_000_000_i64, "{totals}");
            assert_eq!(totals["cost"], "6000.000000000", "{totals}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not folded: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn leap_seconds_are_stored_alike_and_retries_are_duplicates(s: &TestStore) {
    let srv = server(s).await;
    // 2016-12-31T23:59:60Z was a real leap second; it is read as the next second.
    // (Old timestamps are outside the default horizon, so use a store-level rule.)
    let rules = tally::event::ValidationRules {
        now: chrono::DateTime::parse_from_rfc3339("2017-01-01T00:01:00Z")
            .expect("now")
            .into(),
        late_arrival_horizon: Duration::from_secs(3600),
        max_future_skew: Duration::from_secs(300),
    };
    let leap = json!({"id": "leap-1", "ts": "2016-12-31T23:59:60.5Z", "api": "a"});
    let e = tally::event::validate(&leap, &rules).expect("a real leap second is accepted");
    assert_eq!(
        tally::event::format_ts(&e.ts),
        "2017-01-01T00:00:00.500000Z"
    );
    let other = json!({"id": "leap-2", "ts": "2016-12-31T10:00:60Z", "api": "a"});
    let err = tally::event::validate(&other, &rules).expect_err("not at 23:59");
    assert!(err.to_string().contains("23:59:60"), "{err}");
    // Stored and read back alike; the same event again is a duplicate.
    for _ in 0..2 {
        let outcomes = s
            .store
            .log()
            .append(
                std::slice::from_ref(&e),
                &[],
                &tally::store::Origin {
                    source: "test",
                    subject: None,
                },
            )
            .await
            .expect("append");
        assert_ne!(outcomes[0], tally::store::Outcome::Conflict);
    }
    let stored = s
        .store
        .log()
        .get_event("leap-1")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored, e);
    // Over HTTP, a `:60` at another minute gets a reason naming `ts`.
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M").to_string();
    let (status, body) = srv
        .post_json(
            &json!([wire("leap-ok"), {"id": "leap-3", "ts": format!("{now}:60Z"), "api": "a"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    let error = body["rejected"][0]["error"].as_str().expect("error");
    assert!(
        error.contains("`ts`") && error.contains("leap second"),
        "{error}"
    );
}

/// A row that passes validation but that the database refuses (here a CHECK
/// constraint added to the test database) is kept in `rejected_events` with
/// the database's reason; its neighbours in the same body are counted.
async fn a_row_the_database_refuses_is_kept_and_its_neighbours_counted(s: &TestStore) {
    let srv = server(s).await;
    refuse_id_in(s, "refuse-me").await;
    let (status, body) = srv
        .post_json(&json!([wire("ref-ok-1"), wire("refuse-me"), wire("ref-ok-2"), {"id": "ref-bad", "api": "a"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    let rejected = body["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 2, "{body}");
    assert!(rejected
        .iter()
        .any(|r| r["id"] == "refuse-me"
            && r["error"].as_str().is_some_and(|e| e.contains("refused"))));
    let c = s.store.log().counts().await.expect("counts");
    assert_eq!((c.events, c.rejected), (2, 2));
    let rows = s.store.log().recent_rejected(10).await.expect("rows");
    let refused = rows
        .iter()
        .find(|r| r.event_id.as_deref() == Some("refuse-me"))
        .expect("refused row");
    assert_eq!(refused.kind, "refused");
    assert!(
        refused.reason.contains("tally_test_refuse"),
        "{}",
        refused.reason
    );
    let wire_back: Value = serde_json::from_slice(&refused.payload).expect("payload is the event");
    assert_eq!(wire_back["id"], "refuse-me");
}

/// Adds a CHECK constraint refusing one event id (a trigger on SQLite).
async fn refuse_id_in(s: &TestStore, id: &str) {
    let url = s.url.clone();
    match s.store.backend() {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.expect("pg");
            sqlx::query(&format!(
                "ALTER TABLE usage_events ADD CONSTRAINT tally_test_refuse CHECK (id <> '{id}')"
            ))
            .execute(&pool)
            .await
            .expect("constraint");
        }
        Backend::Sqlite => {
            let pool = crate::support::sqlite_pool(&url).await;
            sqlx::query(&format!(
                "CREATE TRIGGER tally_test_refuse BEFORE INSERT ON usage_events WHEN NEW.id = '{id}' \
                 BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: tally_test_refuse'); END"
            ))
            .execute(&pool)
            .await
            .expect("trigger");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float32_costs_in_msgpack_are_read_as_written() {
    let s = support::store(Backend::Sqlite).await;
    let srv = server(&s).await;
    let v = rmpv::Value::Map(vec![
        (rmpv::Value::from("id"), rmpv::Value::from("f32-1")),
        (rmpv::Value::from("ts"), rmpv::Value::from(now_rfc3339())),
        (rmpv::Value::from("api"), rmpv::Value::from("a")),
        (rmpv::Value::from("cost"), rmpv::Value::F32(0.0023)),
        (rmpv::Value::from("latency_ms"), rmpv::Value::F32(12.5)),
    ]);
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &v).expect("encode");
    let (status, answer) = srv.post(Some("application/msgpack"), body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 1, "{answer}");
    let e = s
        .store
        .log()
        .get_event("f32-1")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(e.cost_nanos, Some(2_300_000));
    assert_eq!(e.latency_ms, Some(12.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_bodies_are_sniffed_as_json_only_and_a_bom_is_accepted() {
    let s = support::store(Backend::Sqlite).await;
    let srv = server(&s).await;
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let (status, answer) = srv.post(ct, "hello world").await;
        assert_eq!(status, 415, "{ct:?}: {answer}");
        let error = answer["error"].as_str().expect("error");
        assert!(
            error.contains("application/msgpack") && error.contains("JSON"),
            "{error}"
        );
        assert!(!error.contains("MessagePack:"), "{error}");
    }
    // No content type and bytes that are neither JSON nor a MessagePack container.
    let (status, answer) = srv.post(None, "hello").await;
    assert_eq!(status, 415, "{answer}");
    // A byte-order mark before JSON, with and without a declared type.
    let body = format!("\u{feff}{}", json!([wire("bom-1")]));
    let (status, answer) = srv.post(Some("text/plain"), body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let body = format!("\u{feff}{}", json!(wire("bom-2")));
    let (status, answer) = srv.post(Some("application/json"), body).await;
    assert_eq!(status, 200, "{answer}");
    let body = format!(
        "\u{feff}{}\n{}\n",
        json!(wire("bom-3")),
        json!(wire("bom-4"))
    );
    let (status, answer) = srv.post(None, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 2, "{answer}");
    assert_eq!(s.store.log().counts().await.expect("counts").events, 4);
}

/// Bodies built to cost memory: each is refused (or its items rejected) with
/// a short reason, and the server's peak RSS stays within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_cost_bounded_memory_and_short_reasons() {
    const BOUND_KIB: u64 = 96 * 1024;
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let tally = TallyProc::start_http(&url, &[]).await;
    let client = reqwest::Client::new();
    let post = |ct: &'static str, body: Vec<u8>| {
        let client = client.clone();
        let base = tally.base.clone();
        async move {
            let r = client
                .post(format!("{base}/v1/events"))
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let text = r.text().await.expect("body");
            (status, text)
        }
    };
    let (_, baseline) = tally.memory_kib();
    let max_body = 4 * 1024 * 1024 - 64;

    // 1. Nested MessagePack maps with long keys.
    let key = "k".repeat(4096);
    let mut nested = rmpv::Value::Nil;
    while {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &nested).expect("encode");
        b.len() + 4200 < max_body && b.len() < 900 * 4200
    } {
        nested = rmpv::Value::Map(vec![(rmpv::Value::from(key.as_str()), nested)]);
    }
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &nested).expect("encode");
    let (status, text) = post("application/msgpack", body).await;
    assert!(
        status == 200 || status == 400,
        "{status}: {}",
        &text[..text.len().min(300)]
    );
    assert!(text.len() < 16 * 1024, "answer of {} bytes", text.len());

    // 2. An array of millions of nils.
    let n = 3_000_000u32;
    let mut body = vec![0xdd];
    body.extend_from_slice(&n.to_be_bytes());
    body.extend(std::iter::repeat_n(0xc0, n as usize));
    let (status, text) = post("application/msgpack", body).await;
    assert_eq!(status, 413, "{text}");

    // 3. An object with hundreds of thousands of unknown keys, JSON and MessagePack.
    let mut obj = serde_json::Map::new();
    obj.insert("id".into(), json!("wide"));
    let mut i = 0;
    let mut size = 0;
    while size < max_body - 100 {
        let k = format!("u{i}");
        size += k.len() + 5;
        obj.insert(k, json!(0));
        i += 1;
    }
    let wide = Value::Object(obj);
    let (status, text) = post("application/json", wide.to_string().into_bytes()).await;
    assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
    assert!(text.len() < 16 * 1024, "answer of {} bytes", text.len());
    assert!(text.contains("not shaped like an event"), "{text}");
    let body = tally::event::codec::to_msgpack(&wide);
    let (status, text) = post("application/msgpack", body).await;
    assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
    assert!(text.len() < 16 * 1024, "answer of {} bytes", text.len());

    // 4. A JSON array of millions of zeros.
    let mut body = b"[".to_vec();
    body.extend(std::iter::repeat_n(b"0,".as_slice(), 1_500_000).flatten());
    body.extend_from_slice(b"0]");
    let (status, text) = post("application/json", body).await;
    assert_eq!(status, 413, "{text}");

    // 5. An admin route with a huge body.
    let (status, _) = {
        let r = client
            .post(format!("{}/v1/alert-rules", tally.base))
            .header("content-type", "application/json")
            .body(vec![b' '; 64 * 1024 * 1024])
            .send()
            .await;
        (r.map(|r| r.status().as_u16()).unwrap_or(0), ())
    };
    assert!(status == 413 || status == 0, "{status}");

    let (_, peak) = tally.memory_kib();
    eprintln!(
        "hostile bodies: peak RSS {} MiB, {} MiB over the {} MiB at start",
        peak / 1024,
        peak.saturating_sub(baseline) / 1024,
        baseline / 1024
    );
    assert!(
        peak.saturating_sub(baseline) < BOUND_KIB,
        "peak RSS grew by {} MiB (baseline {} MiB, peak {} MiB)",
        peak.saturating_sub(baseline) / 1024,
        baseline / 1024,
        peak / 1024
    );
    // Every bad item was kept, with a bounded reason.
    let pool = crate::support::sqlite_pool(&url).await;
    let longest: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(length(reason)), 0) FROM rejected_events")
            .fetch_one(&pool)
            .await
            .expect("reasons");
    assert!(longest < 8 * 1024, "a reason of {longest} characters");
}

/// Over NATS, messages with NUL characters and a message the database
/// refuses even in `rejected_events` never stop the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_ingest_goes_on_past_nul_and_refused_messages() {
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let (db, _dir) = support::database(backend, "nul");
        let store = support::open(&db).await;
        // The database refuses this id in the log, and its record in rejected_events.
        let ts = TestStore {
            store: store.clone(),
            url: db.clone(),
            _dir: None,
        };
        refuse_id_in(&ts, "refuse-me").await;
        refuse_record_in(&ts, "refuse-me").await;
        drop(ts);
        let n = nats();
        let tally = TallyProc::start(&db, &n.url(), &[]).await;
        let (client, js) = jetstream(&n.url()).await;
        let mut notices = client.subscribe("usage.rejected").await.expect("subscribe");
        client.flush().await.expect("flush");
        let mut published = 0;
        let mut valid = 0;
        for (i, (_, item, _)) in nul_cases().into_iter().enumerate() {
            let body = json!([wire(&format!("n-ok-{i}")), item]);
            js.publish("usage.events.a", body.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("ack");
            published += 1;
            valid += 1;
        }
        // The whole message holds only the refused event: terminated, kept, never blocking.
        js.publish("usage.events.a", wire("refuse-me").to_string().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
        published += 1;
        for i in 0..20 {
            js.publish(
                "usage.events.a",
                wire(&format!("n-after-{i}")).to_string().into(),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
            published += 1;
            valid += 1;
        }
        wait_drained(&db, &js, valid, Duration::from_secs(60), "nul over nats").await;
        assert_eq!(event_count(&db).await, valid);
        assert_eq!(consumer_backlog(&js).await, (0, 0));
        let refused = notices_until(&mut notices, published).await;
        assert!(
            refused
                .iter()
                .any(|v| v["kind"] == "refused" && v["event_id"] == "refuse-me"),
            "{refused:?}"
        );
        let log = tally.log_text();
        assert!(!log.contains("shutdown deadline"), "{log}");
        drop(tally);
        let _ = published;
    }
}

async fn notices_until(sub: &mut async_nats::Subscriber, at_least: usize) -> Vec<Value> {
    use futures::StreamExt;
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(m)) = tokio::time::timeout_at(until, sub.next()).await {
        got.push(serde_json::from_slice(&m.payload).expect("notice JSON"));
        if got.len() >= at_least {
            break;
        }
    }
    got
}

/// Refuses the rejection record of one event id too, so only the plainest
/// record (or none) can be kept.
async fn refuse_record_in(s: &TestStore, id: &str) {
    let url = s.url.clone();
    match s.store.backend() {
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.expect("pg");
            sqlx::query(&format!(
                "ALTER TABLE rejected_events ADD CONSTRAINT tally_test_refuse_record CHECK (event_id IS DISTINCT FROM '{id}')"
            ))
            .execute(&pool)
            .await
            .expect("constraint");
        }
        Backend::Sqlite => {
            let pool = crate::support::sqlite_pool(&url).await;
            sqlx::query(&format!(
                "CREATE TRIGGER tally_test_refuse_record BEFORE INSERT ON rejected_events WHEN NEW.event_id = '{id}' \
                 BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: tally_test_refuse_record'); END"
            ))
            .execute(&pool)
            .await
            .expect("trigger");
        }
    }
}

/// `tally serve` started outside the repository uses the specs built into the
/// binary; `projections init` writes them out; a set directory that is
/// missing is still an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_from_any_directory_with_the_built_in_specs() {
    let elsewhere = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", elsewhere.path().join("t.db").display());
    let port = tally_cli::dev::devserver::free_port().expect("port");
    let base = format!("http://127.0.0.1:{port}");
    let log = elsewhere.path().join("serve.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("serve")
        .current_dir(elsewhere.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TALLY_DATABASE_URL", &db)
        .env("TALLY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(elsewhere.path().join("err.log")).expect("log"))
        .spawn()
        .expect("spawn");
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let projections = loop {
        if let Ok(r) = client.get(format!("{base}/v1/projections")).send().await {
            break r.json::<Value>().await.expect("json");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "serve exited with {status}: {}",
                std::fs::read_to_string(elsewhere.path().join("err.log")).unwrap_or_default()
            );
        }
        assert!(std::time::Instant::now() < deadline, "serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let text = projections.to_string();
    for name in ["alerts_minute", "by_api", "by_key", "by_user"] {
        assert!(text.contains(name), "{name} missing from {text}");
    }

    let run = |args: &[&str], envs: &[(&str, &str)]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .current_dir(elsewhere.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TALLY_DATABASE_URL", &db)
            .envs(envs.iter().copied())
            .output()
            .expect("run tally")
    };
    let out = run(&["projections", "list"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("built into this binary"),
        "{out:?}"
    );
    // Written out for editing, then found in the working directory.
    let out = run(&["projections", "init"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(elsewhere.path().join("projections/by_key.toml").is_file());
    let again = run(&["projections", "init"], &[]);
    assert!(
        !again.status.success(),
        "init must not overwrite: {again:?}"
    );
    let out = run(&["projections", "list"], &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("found in the working directory"),
        "{out:?}"
    );
    // A set directory that does not exist stays an error.
    let out = run(
        &["serve"],
        &[("TALLY_PROJECTIONS_DIR", "/nonexistent/specs")],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/specs"),
        "{out:?}"
    );
}

/// A client that writes its whole (oversized) body before reading the answer
/// gets the 413 and its message, not a connection reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_sent_whole_still_gets_its_413() {
    let s = support::store(Backend::Sqlite).await;
    let mut config = support::server_config();
    config.max_body_bytes = 64 * 1024;
    let srv = TestServer::start(s.store.clone(), config).await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let body = vec![b'x'; 4 * 1024 * 1024];
        let mut tcp = std::net::TcpStream::connect(&addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).expect("head");
        tcp.write_all(&body).expect("the whole body is read, not refused mid-way");
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).to_string()
    })
    .await
    .expect("client");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("65536 bytes"), "{answer}");
}

/// Starts a server with fast alert evaluation over `s`.
async fn alert_server(s: &TestStore) -> TestServer {
    let mut config = support::server_config();
    config.alerts.alerts_tick = Duration::from_millis(300);
    config.alerts.alerts_min_interval = Duration::from_millis(50);
    TestServer::start(s.store.clone(), config).await
}

/// Waits until `rule` has an active (pending or firing) alert.
async fn wait_active(srv: &TestServer, rule: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, a) = srv.get(&format!("/v1/alerts?rule={rule}")).await;
        assert_eq!(status, 200, "{a}");
        if a["active"].as_array().is_some_and(|v| !v.is_empty()) {
            return a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rule} never became active: {a}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `GET /v1/alert-rules/{rule}` says `failing`; returns the view.
async fn wait_failing(srv: &TestServer, rule: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, r) = srv.get(&format!("/v1/alert-rules/{rule}")).await;
        assert_eq!(status, 200, "{r}");
        if r["status"] == "failing" {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{rule} never marked failing: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const BURST_RULE: &str = r#"{"name": "burst", "measure": "requests", "window": "1h",
    "group_by": ["key"], "threshold": 5}"#;

/// SQLite: a stored rule whose scope lists 40,000 keys (more values than one
/// SQLite statement can bind) used to fail every evaluation round, so no
/// other rule fired. Now it is marked failing and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_rule_does_not_stop_the_others_on_sqlite() {
    use tally::store::alerts::WriteMode;
    let s = support::store(Backend::Sqlite).await;
    let keys: Vec<String> = (0..40_000).map(|i| format!("k{i}")).collect();
    let huge = json!({"name": "huge-scope", "measure": "requests", "window": "1h",
        "scope": {"key": keys}, "group_by": ["key"], "threshold": 1});
    s.store
        .alerts()
        .write_rule("huge-scope", &huge.to_string(), "test", WriteMode::Create)
        .await
        .expect("stored without the HTTP validation");
    let srv = alert_server(&s).await;
    let (status, answer) = srv
        .post_json(&Value::Array(
            (0..10)
                .map(|i| {
                    let mut e = wire(&format!("burst-{i}"));
                    e["key"] = json!("k1");
                    e
                })
                .collect(),
        ))
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, r) = srv
        .client
        .post(format!("{}/v1/alert-rules", srv.base))
        .header("content-type", "application/json")
        .body(BURST_RULE)
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .expect("create rule");
    assert_eq!(status, 201, "{r:?}");
    wait_active(&srv, "burst").await;
    let failing = wait_failing(&srv, "huge-scope").await;
    assert!(
        failing["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 1000")),
        "{failing}"
    );
    let (_, ok) = srv.get("/v1/alert-rules/burst").await;
    assert_eq!(ok["status"], "ok", "{ok}");
    // The failing rule raises an alert of its own, under the reserved name.
    let raised = wait_active(&srv, "tally_rule_failing").await;
    let active = &raised["active"][0];
    assert_eq!(active["group"], json!({"rule": "huge-scope"}), "{raised}");
    assert_eq!(active["severity"], "critical", "{raised}");
    let metrics = srv
        .client
        .get(format!("{}/metrics", srv.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("tally_alert_rules_failing 1"), "{metrics}");
    assert!(
        metrics.contains("tally_alert_rule_failing{rule=\"huge-scope\"} 1"),
        "{metrics}"
    );
    // Creating such a rule over HTTP is refused up front.
    let (status, answer) = srv
        .client
        .post(format!("{}/v1/alert-rules", srv.base))
        .header("content-type", "application/json")
        .body(json!({"name": "huge2", "measure": "requests", "window": "1h", "scope": {"key": (0..1001).map(|i| format!("k{i}")).collect::<Vec<_>>()}, "threshold": 1}).to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map(|s| (s, ()))
        .expect("create");
    assert_eq!(status, 400, "{answer:?}");
    // Fixed: the failure clears.
    s.store
        .alerts().write_rule("huge-scope", &json!({"name": "huge-scope", "measure": "requests", "window": "1h", "group_by": ["key"], "threshold": 1}).to_string(), "test", WriteMode::Upsert)
        .await
        .expect("fixed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, r) = srv.get("/v1/alert-rules/huge-scope").await;
        if r["status"] == "ok" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "failure never cleared: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // … and so does its alert, with a `resolved` notification.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, a) = srv.get("/v1/alerts?rule=tally_rule_failing").await;
        let states: Vec<&str> = a["history"]
            .as_array()
            .map(|h| h.iter().filter_map(|n| n["state"].as_str()).collect())
            .unwrap_or_default();
        if a["active"] == json!([]) && states.contains(&"resolved") && states.contains(&"firing") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failing-rule alert never resolved: {a}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// PostgreSQL: a rule whose window read fails (here: its tables are locked by
/// another session, so the read hits the statement timeout) is marked failing
/// with the database's reason; a rule on another projection still fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_whose_read_fails_is_isolated_on_postgres() {
    let (url, _dir) = support::database(Backend::Postgres, "rulefail");
    let store = tally::store::connect(
        &url,
        &tally::store::StoreOptions {
            statement_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    let s = TestStore {
        store,
        url: url.clone(),
        _dir: None,
    };
    let srv = alert_server(&s).await;
    let mut events = Vec::new();
    for i in 0..10 {
        let mut e = wire(&format!("rf-{i}"));
        e["key"] = json!("k1");
        e["user"] = json!("u1");
        events.push(e);
    }
    let (status, answer) = srv.post_json(&Value::Array(events)).await;
    assert_eq!(status, 200, "{answer}");
    // Wait until every projection folded them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let states = s
            .store
            .projections()
            .projection_states()
            .await
            .expect("states");
        let mut all = true;
        for st in &states {
            all &= s
                .store
                .projections()
                .events_after(st.cursor)
                .await
                .expect("lag")
                == 0;
        }
        if all && !states.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not folded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let locker = sqlx::PgPool::connect(&url).await.expect("pg");
    let mut lock = locker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE agg_by_user_day, agg_by_user_month IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    for body in [
        r#"{"name": "by-user", "measure": "requests", "window": "calendar_day", "group_by": ["user"], "threshold": 5}"#,
        BURST_RULE,
    ] {
        let status = srv
            .client
            .post(format!("{}/v1/alert-rules", srv.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("create")
            .status();
        assert_eq!(status, 201);
    }
    wait_active(&srv, "burst").await;
    let failing = wait_failing(&srv, "by-user").await;
    assert!(
        failing["error"]
            .as_str()
            .is_some_and(|e| e.contains("timeout") || e.contains("cancel")),
        "{failing}"
    );
    lock.rollback().await.expect("unlock");
    // Unlocked: it evaluates again, fires, and its failure clears.
    wait_active(&srv, "by-user").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, r) = srv.get("/v1/alert-rules/by-user").await;
        if r["status"] == "ok" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "failure never cleared: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Revoking the last token closes the API instead of opening it; only an
/// explicit `disable-auth` opens it again, and never on a public address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_last_token_keeps_authentication_on() {
    use tally::auth::{create_token, disable_auth, Scope};
    let s = support::store(Backend::Sqlite).await;
    let (token, _) = create_token(&s.store, "admin1", &[Scope::Admin], "test")
        .await
        .expect("token");
    let mut config = support::server_config();
    config.http_addr = "0.0.0.0:0".parse().expect("addr");
    let srv = TestServer::start(s.store.clone(), config).await;
    let get = |auth: Option<String>| {
        let req = srv.client.get(format!("{}/v1/projections", srv.base));
        let req = match auth {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        async move {
            let r = req.send().await.expect("request");
            (r.status().as_u16(), r.text().await.expect("text"))
        }
    };
    assert_eq!(get(Some(token.clone())).await.0, 200);
    assert_eq!(get(None).await.0, 401);
    assert!(s
        .store
        .tokens()
        .revoke_token("admin1", chrono::Utc::now())
        .await
        .expect("revoke"));
    tokio::time::sleep(tally::auth::RELOAD_EVERY + Duration::from_millis(300)).await;
    let (status, text) = get(None).await;
    assert_eq!(status, 401, "the API must stay closed: {text}");
    assert!(text.contains("no active token"), "{text}");
    assert_eq!(get(Some(token.clone())).await.0, 401, "revoked");
    // A restart does not open it either.
    drop(srv);
    let mut config = support::server_config();
    config.http_addr = "127.0.0.1:0".parse().expect("addr");
    let srv = TestServer::start(support::open(&s.url).await, config).await;
    let r = srv
        .client
        .get(format!("{}/v1/projections", srv.base))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    drop(srv);
    // (A stopped server closes its store: open it again.)
    let store = support::open(&s.url).await;
    // Only the explicit command turns it off, and not while a token is active.
    create_token(&store, "admin2", &[Scope::Admin], "test")
        .await
        .expect("token");
    assert!(
        disable_auth(&store).await.is_err(),
        "refused while a token is active"
    );
    assert!(store
        .tokens()
        .revoke_token("admin2", chrono::Utc::now())
        .await
        .expect("revoke"));
    disable_auth(&store).await.expect("disable");
    let srv = TestServer::start(store, support::server_config()).await;
    let r = srv
        .client
        .get(format!("{}/v1/projections", srv.base))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200, "open on loopback once disabled");
    drop(srv);
    // On a public address an open API is refused on every request, even when
    // authentication was turned off while the server ran.
    let store = support::open(&s.url).await;
    let (token, _) = create_token(&store, "admin3", &[Scope::Admin], "test")
        .await
        .expect("token");
    let mut config = support::server_config();
    config.http_addr = "0.0.0.0:0".parse().expect("addr");
    let srv = TestServer::start(store.clone(), config).await;
    let ok = srv
        .client
        .get(format!("{}/v1/projections", srv.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status().as_u16(), 200);
    assert!(store
        .tokens()
        .revoke_token("admin3", chrono::Utc::now())
        .await
        .expect("revoke"));
    disable_auth(&store).await.expect("disable");
    tokio::time::sleep(tally::auth::RELOAD_EVERY + Duration::from_millis(300)).await;
    let r = srv
        .client
        .get(format!("{}/v1/projections", srv.base))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("text");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("public address"), "{text}");
}

/// Folds `by_key` until caught up and returns its hourly `requests` total.
async fn folded_requests(store: &tally::store::Store) -> i64 {
    use tally::aggregate::spec::{Granularity, SpecSource};
    let spec = SpecSource::Builtin
        .load()
        .expect("specs")
        .into_iter()
        .find(|s| s.name == "by_key")
        .expect("by_key");
    let spec = std::sync::Arc::new(spec);
    let mut p = tally::projection::Projector::open(store.clone(), spec.clone(), "by_key", "")
        .await
        .expect("open");
    p.catch_up(10_000).await.expect("fold");
    store
        .projections()
        .read_agg(&spec, Granularity::Hour, "")
        .await
        .expect("agg")
        .iter()
        .map(|r| r.measures.requests)
        .sum()
}

fn events(prefix: &str, n: usize) -> Vec<tally::event::Event> {
    (0..n)
        .map(|i| crate::support::full_event(&format!("{prefix}-{i}"), chrono::Utc::now()))
        .collect()
}

const ORIGIN: tally::store::Origin = tally::store::Origin {
    source: "test",
    subject: None,
};

/// SQLite: once retention emptied the log, new events used to get the
/// positions of deleted ones (rowid reuse), below the checkpoint, and were
/// never folded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_events_after_retention_emptied_the_log_are_folded_on_sqlite() {
    let s = support::store(Backend::Sqlite).await;
    s.store
        .log()
        .append(&events("old", 5), &[], &ORIGIN)
        .await
        .expect("append");
    assert_eq!(folded_requests(&s.store).await, 5);
    let deleted = s
        .store
        .log()
        .delete_events_before(chrono::Utc::now() + chrono::Duration::hours(1), 100)
        .await
        .expect("retention");
    assert_eq!(deleted, 5);
    s.store
        .log()
        .append(&events("new", 3), &[], &ORIGIN)
        .await
        .expect("append");
    assert_eq!(
        folded_requests(&s.store).await,
        8,
        "the new events are folded"
    );
    assert_eq!(
        s.store
            .projections()
            .log_position_problem()
            .await
            .expect("check"),
        None
    );
}

/// PostgreSQL: a dump restored into a new cluster restarts transaction ids
/// below the stored ones. Simulated by moving the log and checkpoints a
/// billion ids ahead, as a restore from a busier cluster leaves them: start-up
/// refuses and names the command, which repairs it without folding anything
/// twice or skipping anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_restored_into_a_new_cluster_is_refused_then_repaired_on_postgres() {
    let s = support::store(Backend::Postgres).await;
    s.store
        .log()
        .append(&events("a", 4), &[], &ORIGIN)
        .await
        .expect("append");
    assert_eq!(folded_requests(&s.store).await, 4);
    s.store
        .log()
        .append(&events("b", 2), &[], &ORIGIN)
        .await
        .expect("append");
    let pool = sqlx::PgPool::connect(&s.url).await.expect("pg");
    for sql in [
        "UPDATE usage_events SET tx = (tx::text::bigint + 1000000000)::text::xid8",
        "UPDATE projection_checkpoints SET cursor_tx = cursor_tx + 1000000000 WHERE cursor_tx > 0",
    ] {
        sqlx::query(sql)
            .execute(&pool)
            .await
            .expect("simulate the restore");
    }
    let problem = s
        .store
        .projections()
        .log_position_problem()
        .await
        .expect("check");
    assert!(
        problem.as_deref().is_some_and(|p| p.contains("restored")),
        "{problem:?}"
    );
    let err = match tally::app::open_projectors(&s.store, None).await {
        Ok(_) => panic!("start-up must refuse"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("tally projections repair-positions"), "{err}");
    // The command.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["projections", "repair-positions"])
        .env("TALLY_DATABASE_URL", &s.url)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        s.store
            .projections()
            .log_position_problem()
            .await
            .expect("check"),
        None
    );
    // The two events not yet folded are folded once; new ones after them too.
    s.store
        .log()
        .append(&events("c", 3), &[], &ORIGIN)
        .await
        .expect("append");
    assert_eq!(folded_requests(&s.store).await, 9);
}

/// Slow clients: headers that never finish are cut off after the header
/// timeout, a body that trickles gets `408`, and connections beyond the limit
/// wait instead of holding the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_timed_out_and_connections_are_bounded() {
    use std::io::{Read, Write};
    let s = support::store(Backend::Sqlite).await;
    let mut config = support::server_config();
    config.http_header_timeout = Duration::from_secs(1);
    config.http_body_timeout = Duration::from_secs(1);
    config.http_max_connections = 4;
    let srv = TestServer::start(s.store.clone(), config).await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    let (header_cut, body_answer) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            // Headers begun, never finished.
            let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
            slow.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            slow.write_all(b"GET /v1/projections HTTP/1.1\r\nHost: 127.0.0.1\r\n").expect("write");
            let t = std::time::Instant::now();
            let mut buf = Vec::new();
            let _ = slow.read_to_end(&mut buf);
            let header_cut = t.elapsed();
            // A body that stops after one byte.
            let mut trickle = std::net::TcpStream::connect(&addr).expect("connect");
            trickle.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            trickle
                .write_all(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[")
                .expect("write");
            let mut answer = Vec::new();
            let _ = trickle.read_to_end(&mut answer);
            (header_cut, String::from_utf8_lossy(&answer).to_string())
        }
    })
    .await
    .expect("clients");
    assert!(
        header_cut < Duration::from_secs(5),
        "unfinished headers held for {header_cut:?}"
    );
    assert!(body_answer.starts_with("HTTP/1.1 408"), "{body_answer}");
    assert!(body_answer.contains("request_timeout"), "{body_answer}");
    // Ten idle connections against a limit of four: a real request is still
    // answered once the idle ones time out, and the server stays up.
    let idle: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    let (status, _) = srv.get("/v1/projections").await;
    assert_eq!(status, 200);
    drop(idle);
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// `/readyz` is open to anyone: it names the dependency that is down, never
/// the database's error text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_what_is_down_without_the_error_text() {
    let dead = support::dead_store("secretuser", Duration::from_millis(500)).await;
    let srv = TestServer::start(dead, support::server_config()).await;
    let (status, body) = srv.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        body["checks"]["database"],
        json!({"status": "down"}),
        "{body}"
    );
    let text = body.to_string();
    assert!(
        !text.contains("127.0.0.1") && !text.contains("secretuser"),
        "{text}"
    );
}

/// Durations far beyond anything sensible are refused where they are read,
/// naming the setting, instead of panicking later in a date subtraction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_durations_are_refused_not_panicked_on() {
    let dir = tempfile::tempdir().expect("dir");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let run = |args: &[&str], envs: &[(&str, String)]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &db)
            .env("TALLY_HTTP_ADDR", "127.0.0.1:0")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run tally")
    };
    for (var, value) in [
        ("TALLY_RETENTION", "999999999999d"),
        ("TALLY_LATE_ARRIVAL_HORIZON", "999999999999d"),
        ("TALLY_MAX_FUTURE_SKEW", "999999999999d"),
    ] {
        let out = run(&["serve"], &[(var, value.to_string())]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}: {out:?}");
        assert!(!err.contains("panicked"), "{var}: {err}");
        assert!(err.contains("100 years"), "{var}: {err}");
    }
    // In a projection spec.
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).expect("dir");
    std::fs::write(
        specs.join("p.toml"),
        "name = \"p\"\ndimensions = [\"api\"]\ngranularities = [\"minute\"]\ntimezone = \"UTC\"\nretention = { minute = \"999999999999d\" }\n",
    )
    .expect("spec");
    let out = run(
        &["serve"],
        &[("TALLY_PROJECTIONS_DIR", specs.display().to_string())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("retention.minute") && err.contains("100 years"),
        "{err}"
    );
}

both_backends!(history_tables_have_a_retention);

/// The history tables are trimmed by the retention job: old rejected
/// payloads, sent notifications, resolved instances and finished job runs
/// go; unsent notifications, active instances and (by default) the audit
/// trail stay; `/metrics` shows the tables' sizes.
async fn history_tables_have_a_retention(s: &TestStore) {
    use tally::jobs::{run_job, HistoryRetention, Job, JobContext};
    let day_ms: i64 = 86_400_000;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (old, recent) = (now_ms - 100 * day_ms, now_ms - day_ms);
    // Rejected payloads: one old (its received time moved back), one recent.
    s.store
        .log()
        .append(
            &[],
            &[bad_record("old-rej"), bad_record("new-rej")],
            &ORIGIN,
        )
        .await
        .expect("rejects");
    let old_ts = chrono::DateTime::from_timestamp_millis(old).expect("ts");
    let sqls: Vec<String> = match s.store.backend() {
        Backend::Postgres => vec![format!(
            "UPDATE rejected_events SET received_at = to_timestamp({}) WHERE event_id = 'old-rej'",
            old / 1000
        )],
        Backend::Sqlite => vec![format!(
            "UPDATE rejected_events SET received_at = '{}' WHERE event_id = 'old-rej'",
            tally::event::format_ts(&old_ts)
        )],
    };
    let mut all = sqls;
    for (i, (created, sent)) in [(old, Some(old)), (old, None), (recent, Some(recent))]
        .iter()
        .enumerate()
    {
        all.push(format!(
            "INSERT INTO alert_outbox (fingerprint, sequence, rule, state, severity, subject, payload, created_at_ms, sent_at_ms) \
             VALUES ('fp{i}', 1, 'r', 'firing', 'warning', 's', '{{}}', {created}, {})",
            sent.map_or("NULL".to_string(), |v| v.to_string())
        ));
    }
    for (fp, state, at) in [
        ("i-old", "resolved", old),
        ("i-firing", "firing", old),
        ("i-new", "resolved", recent),
    ] {
        all.push(format!(
            "INSERT INTO alert_instances (fingerprint, rule, rule_uid, level, grp, severity, state, updated_at_ms) \
             VALUES ('{fp}', 'r', 'u', 'l', '{{}}', 'warning', '{state}', {at})"
        ));
    }
    all.push(format!(
        "INSERT INTO alert_audit (at_ms, actor, action, target) VALUES ({old}, 'a', 'rule.create', 'r')"
    ));
    all.push(format!(
        "INSERT INTO job_runs (job, slot_ms, trigger, instance, started_at_ms, finished_at_ms, outcome) \
         VALUES ('optimize', {old}, 'manual', 'x', {old}, {old}, 'ok')"
    ));
    for sql in &all {
        s.exec(sql).await;
    }
    let ctx = JobContext {
        store: s.store.clone(),
        specs: Vec::new(),
        retention: None,
        batch: 1,
        instance: "test".into(),
        alert_prefix: "usage.alerts".into(),
        history: HistoryRetention {
            rejected: Some(Duration::from_secs(40 * 86_400)),
            alerts: Some(Duration::from_secs(30 * 86_400)),
            job_runs: Some(Duration::from_secs(30 * 86_400)),
            audit: None,
        },
    };
    let (_, outcome) = run_job(&ctx, Job::Retention, chrono::Utc::now(), "manual")
        .await
        .expect("run")
        .expect("claimed");
    let outcome = outcome.expect("ok");
    let deleted = &outcome.detail["deleted"];
    assert_eq!(deleted["rejected_events"], 1, "{deleted}");
    assert_eq!(deleted["alert_outbox"], 1, "{deleted}");
    assert_eq!(deleted["alert_instances"], 1, "{deleted}");
    assert_eq!(deleted["job_runs"], 1, "{deleted}");
    assert!(deleted.get("alert_audit").is_none(), "{deleted}");
    let rows = s.store.log().recent_rejected(10).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].event_id.as_deref(), Some("new-rej"));
    let left: Vec<String> = s
        .store
        .alerts()
        .alert_instances()
        .await
        .expect("instances")
        .into_iter()
        .map(|i| i.fingerprint)
        .collect();
    assert_eq!(left, vec!["i-firing".to_string(), "i-new".to_string()]);
    let active = s.store.alerts().active_instances().await.expect("active");
    assert_eq!(active.len(), 1);
    let sizes = s
        .store
        .table_rows(&["alert_outbox", "alert_audit"])
        .await
        .expect("sizes");
    if s.store.backend() == Backend::Sqlite {
        assert!(
            sizes.contains(&("alert_outbox".to_string(), 2)),
            "{sizes:?}"
        );
        assert!(sizes.contains(&("alert_audit".to_string(), 1)), "{sizes:?}");
    } else {
        assert_eq!(sizes.len(), 2, "{sizes:?}");
    }
}

fn bad_record(id: &str) -> tally::store::Rejected {
    tally::store::Rejected {
        kind: tally::store::RejectKind::Invalid,
        event_id: Some(id.into()),
        item_index: Some(0),
        reason: "test".into(),
        content_type: None,
        payload: b"{}".to_vec(),
        subject: None,
    }
}

/// NATS batches have a byte budget: 200 messages of 900 KB each (every one
/// rejected, its bytes kept) no longer land in one batch of ~200 MB of
/// payloads plus their copies; peak RSS stays bounded. An oversized token
/// count over NATS is rejected like over HTTP, its neighbour counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_batches_are_bounded_by_bytes() {
    const BOUND_KIB: u64 = 128 * 1024;
    let db = crate::support::postgres()
        .create_database("natsbytes")
        .expect("db");
    let n = nats();
    let (_client, js) = jetstream(&n.url()).await;
    // The stream must exist before publishing: create it as Tally would.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "USAGE".into(),
        subjects: vec!["usage.events.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        description: Some("Tally usage events".into()),
        ..Default::default()
    })
    .await
    .expect("stream");
    let ts = now_rfc3339();
    for i in 0..200 {
        let body = json!({"id": format!("big-{i}"), "ts": ts, "api": "a", "error_message": "x".repeat(900_000)});
        js.publish("usage.events.a", body.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    let overflow = json!([
        {"id": "of-ok", "ts": ts, "api": "a", "tokens_in": 10},
        {"id": "of-bad", "ts": ts, "api": "a", "tokens_in": 5e18}
    ]);
    js.publish("usage.events.a", overflow.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    // With the default budget (2 MiB). Measured: 90 MiB; 166 MiB with an
    // 8 MiB budget; 412 MiB without one (all 200 messages in one batch).
    let tally = TallyProc::start(&db, &n.url(), &[]).await;
    wait_drained(&db, &js, 1, Duration::from_secs(120), "big messages").await;
    let (_, peak) = tally.memory_kib();
    assert!(peak < BOUND_KIB, "peak RSS {} MiB", peak / 1024);
    let pool = sqlx::PgPool::connect(&db).await.expect("pg");
    let rejected: i64 = sqlx::query_scalar("SELECT count(*) FROM rejected_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(
        rejected, 201,
        "every big message and the overflow item are kept"
    );
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM rejected_events WHERE event_id = 'of-bad'")
            .fetch_one(&pool)
            .await
            .expect("reason");
    assert!(
        reason.contains("`tokens_in`") && reason.contains("1000000000"),
        "{reason}"
    );
    eprintln!("peak RSS with 200 x 900 KB messages: {} MiB", peak / 1024);
}

/// During a database outage, authenticated requests do not queue behind each
/// other's token reload (the reload used to hold a mutex across the database
/// call): twenty concurrent requests finish in about one acquire timeout, not
/// twenty (measured: about 21 s before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_checks_do_not_queue_during_a_database_outage() {
    use tally::auth::{create_token, Scope};
    let (mut pg, store) = support::private_postgres("authout", Duration::from_secs(1)).await;
    let (token, _) = create_token(&store, "reader", &[Scope::Read], "test")
        .await
        .expect("token");
    let srv = TestServer::start(store, support::server_config()).await;
    let get = |client: reqwest::Client, base: String, token: String| async move {
        client
            .get(format!("{base}/v1/alert-rules"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    assert_eq!(
        get(srv.client.clone(), srv.base.clone(), token.clone())
            .await
            .ok(),
        Some(200)
    );
    pg.kill_server().expect("stop postgres");
    // Past the reload interval: every request now wants a fresh token list.
    tokio::time::sleep(tally::auth::RELOAD_EVERY + Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let answers = futures::future::join_all(
        (0..20).map(|_| get(srv.client.clone(), srv.base.clone(), token.clone())),
    )
    .await;
    let took = started.elapsed();
    for a in &answers {
        // The token is still known (stale list); the route itself cannot reach the database.
        assert_eq!(a.as_ref().ok(), Some(&503), "{answers:?}");
    }
    eprintln!("20 requests during the outage took {took:?}");
    assert!(
        took < Duration::from_secs(8),
        "20 requests took {took:?}: they queued behind each other's reload"
    );
}

/// SQLite: a query past the statement timeout is interrupted, not left
/// running on the connection's worker thread. With one read connection, a
/// small query right after a timed-out large one used to wait behind the
/// still-running statement and time out too; now it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_sqlite_query_is_interrupted() {
    use chrono::DurationRound;
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = tally::store::connect(
        &url,
        &tally::store::StoreOptions {
            max_connections: 1,
            statement_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    let srv = TestServer::start(store, support::server_config()).await;
    let bucket = tally::event::format_ts(
        &(chrono::Utc::now() - chrono::Duration::hours(2))
            .duration_trunc(chrono::Duration::hours(1))
            .expect("trunc"),
    );
    let pool = crate::support::sqlite_pool(&url).await;
    sqlx::query(&format!(
        "INSERT INTO agg_by_key_hour (bucket, api, key, model, requests) \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500000) \
         SELECT '{bucket}', 'a', 'k' || i, '', 1 FROM n"
    ))
    .execute(&pool)
    .await
    .expect("seed");
    // Ranked in SQL: no row comes out before the whole table is aggregated.
    let (status, answer) = srv
        .get("/v1/stats?granularity=hour&group_by=key&order_by=requests&limit=5")
        .await;
    assert_eq!(status, 503, "the large query times out: {answer}");
    let (status, answer) = srv.get("/v1/stats?granularity=hour&api=nothing").await;
    assert_eq!(
        status, 200,
        "the connection is free again at once: {answer}"
    );
}
