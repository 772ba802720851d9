//! NATS JetStream ingest against a real `nats-server -js`, real PostgreSQL and
//! SQLite files, with `tally serve` as a child process: every failure path
//! ends with the log holding exactly the distinct events, with exact sums.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tally_cli::dev::devserver::TempPostgres;
use tally_cli::dev::emit::{EmitEncoding, Expectation};

use crate::support::postgres;
use crate::support::proc::{
    consumer_backlog, emit, emit_config, event_count, expected_sums, jetstream, log_sums, nats,
    wait_drained, TallyProc,
};

const DRAIN: Duration = Duration::from_secs(120);

async fn assert_exact(db_url: &str, expect: &Expectation, what: &str) {
    let (total, sums) = log_sums(db_url).await;
    assert_eq!(total as u64, expect.events, "{what}: distinct events");
    assert_eq!(sums, expected_sums(expect), "{what}: per api/key sums");
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("tally.db").display())
}

/// Test 1: 20% republished ids, half with a new `Nats-Msg-Id` so JetStream's own
/// dedup window cannot help: exactly the distinct ids, with exact sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_events_count_once_on_postgres_and_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    for db in [
        postgres().create_database("nats").expect("db"),
        sqlite_url(&dir),
    ] {
        let n = nats();
        let tally = TallyProc::start(&db, &n.url(), &[]).await;
        let (_c, js) = jetstream(&n.url()).await;
        let mut cfg = emit_config(20_000, 1);
        cfg.duplicates = 0.2;
        cfg.late = 0.05;
        let expect = emit(&js, cfg).await;
        assert_eq!(expect.events, 20_000);
        wait_drained(&db, &js, 20_000, DRAIN, "duplicates").await;
        assert_exact(&db, &expect, &db).await;
        drop(tally);
    }
}

/// Test 2: `kill -9` at random points during one stream, several times; after
/// restarts the counts are exact (redelivered events are duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_commit_and_ack_loses_and_doubles_nothing() {
    let db = postgres().create_database("kill").expect("db");
    let n = nats();
    // Small batches and a short ack wait, so kills land between commit and ack
    // and redelivery comes quickly.
    let env = [("TALLY_NATS_BATCH", "50"), ("TALLY_NATS_ACK_WAIT", "2s")];
    let mut tally = TallyProc::start(&db, &n.url(), &env).await;
    let (_c, js) = jetstream(&n.url()).await;
    let mut cfg = emit_config(15_000, 2);
    cfg.duplicates = 0.1;
    cfg.rate = Some(6_000.0);
    let publisher = tokio::spawn(async move { emit(&js, cfg).await });
    let mut kills = 0;
    let mut seen_progress = Vec::new();
    while !publisher.is_finished() || kills < 3 {
        tokio::time::sleep(Duration::from_millis(rand::random_range(300..900))).await;
        seen_progress.push(event_count(&db).await);
        tally.kill9();
        kills += 1;
        tally.spawn().await;
        if kills >= 6 {
            break;
        }
    }
    let expect = publisher.await.expect("publisher");
    let (_c, js) = jetstream(&n.url()).await;
    wait_drained(&db, &js, 15_000, DRAIN, "after kill -9").await;
    assert_exact(&db, &expect, "after kill -9").await;
    assert!(kills >= 3, "killed {kills} times");
    assert!(
        seen_progress.iter().any(|&c| c > 0 && c < 15_000),
        "at least one kill landed mid-stream: counts at kills {seen_progress:?}"
    );
}

/// Test 3: PostgreSQL stopped (immediate mode) for seconds mid-stream: Tally
/// keeps running, `/readyz` goes not-ready and back, counts are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_mid_stream_is_survived() {
    let mut pg = TempPostgres::start(true).expect("private postgres");
    let db = pg.create_database("outage").expect("db");
    let n = nats();
    let mut tally = TallyProc::start(&db, &n.url(), &[]).await;
    let (_c, js) = jetstream(&n.url()).await;
    let mut cfg = emit_config(20_000, 3);
    cfg.duplicates = 0.1;
    cfg.rate = Some(4_000.0);
    let publisher = tokio::spawn(async move { emit(&js, cfg).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(tally.readyz().await, 200);
    pg.kill_server().expect("stop postgres");
    let mut saw_not_ready = false;
    let down_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < down_until {
        if tally.readyz().await == 503 {
            saw_not_ready = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(saw_not_ready, "/readyz reported the outage");
    assert!(tally.running(), "Tally survives the outage");
    pg.start_server().expect("restart postgres");
    let expect = publisher.await.expect("publisher");
    let (_c, js) = jetstream(&n.url()).await;
    wait_drained(&db, &js, 20_000, DRAIN, "after outage").await;
    assert_exact(&db, &expect, "after outage").await;
    assert_eq!(tally.readyz().await, 200, "ready again");
    assert!(tally.running(), "Tally never exited");
    let log = tally.log_text();
    assert_eq!(
        log.matches("database is unreachable").count(),
        1,
        "the outage is logged once, not per retry:\n{log}"
    );
    assert!(log.contains("database is reachable again"));
}

/// Test 4: nats-server killed and restarted on the same store directory while
/// Tally drains a backlog; more events after the restart; exact counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_stream_is_survived() {
    let db = postgres().create_database("natsrestart").expect("db");
    let mut n = nats();
    let env = [("TALLY_NATS_BATCH", "100")];
    let tally = TallyProc::start(&db, &n.url(), &env).await;
    let (client, js) = jetstream(&n.url()).await;
    let mut cfg = emit_config(20_000, 4);
    cfg.duplicates = 0.1;
    let first = emit(&js, cfg).await;
    drop((client, js));
    // Kill while Tally is still draining.
    let before = event_count(&db).await;
    n.kill_server().expect("kill nats");
    // HTTP ingest keeps working while NATS is down.
    let http = reqwest::Client::new()
        .post(format!("{}/v1/events", tally.base))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"id":"http-during-nats-outage","ts":"{}","api":"openai","key":"k-http","tokens_in":7,"cost":"0.5"}}"#,
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        ))
        .send()
        .await
        .expect("http ingest");
    assert_eq!(http.status(), 200, "HTTP ingest works while NATS is down");
    tokio::time::sleep(Duration::from_secs(2)).await;
    n.start_server().expect("restart nats");
    let (_c, js) = jetstream(&n.url()).await;
    let mut cfg = emit_config(5_000, 5);
    cfg.id_prefix = format!("{}-after", cfg.id_prefix);
    let second = emit(&js, cfg).await;
    wait_drained(&db, &js, 25_001, DRAIN, "after nats restart").await;
    let (total, sums) = log_sums(&db).await;
    assert_eq!(total, 25_001);
    let mut want = expected_sums(&first);
    for (k, v) in expected_sums(&second) {
        let e = want.entry(k).or_insert([0; 6]);
        for i in 0..6 {
            e[i] += v[i];
        }
    }
    want.insert(
        ("openai".into(), "k-http".into()),
        [1, 1, 0, 7, 0, 500_000_000],
    );
    assert_eq!(sums, want);
    assert!(
        before < 20_000,
        "the kill landed while Tally was draining ({before} of 20000 stored)"
    );
}

/// Test 5: malformed messages mixed into the stream: each lands in
/// `rejected_events` with its reason and subject, a notice is published to
/// `usage.rejected`, all valid events are counted and the consumer never stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_rejected_with_reason_and_never_block() {
    let db = postgres().create_database("poison").expect("db");
    let n = nats();
    let tally = TallyProc::start(&db, &n.url(), &[]).await;
    let (client, js) = jetstream(&n.url()).await;
    let mut notices = client.subscribe("usage.rejected").await.expect("subscribe");
    let mut cfg = emit_config(5_000, 6);
    cfg.invalid = 0.05;
    cfg.encoding = EmitEncoding::Msgpack;
    let expect = emit(&js, cfg).await;
    assert!(
        expect.rejected_messages > 100,
        "{}",
        expect.rejected_messages
    );
    // A message with two valid events and one invalid item: the valid ones
    // count, the invalid one is rejected, the message is acked.
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    let mixed = format!(
        r#"[{{"id":"mixed-1","ts":"{now}","api":"exa","tokens_in":1}},{{"id":"mixed-2","ts":"{now}","api":"exa","status":700}},{{"id":"mixed-3","ts":"{now}","api":"exa","tokens_in":2}}]"#
    );
    js.publish("usage.events.exa", mixed.into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    // Not UTF-8, no content type.
    js.publish("usage.events.exa", vec![0xff, 0xfe, 0x00, 0x01].into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let distinct = expect.events as i64 + 2;
    wait_drained(&db, &js, distinct, DRAIN, "poison").await;

    let pool = sqlx::PgPool::connect(&db).await.expect("pg");
    let rejected: Vec<(String, Option<String>, String, Option<String>)> = sqlx::query_as(
        "SELECT kind, subject, reason, event_id FROM rejected_events WHERE source = 'nats' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .expect("rejected");
    // Every malformed message, plus the bad item and the binary garbage.
    assert_eq!(rejected.len() as u64, expect.rejected_messages + 2);
    assert!(rejected.iter().all(|(_, subject, reason, _)| subject
        .as_deref()
        .is_some_and(|s| s.starts_with("usage.events."))
        && !reason.is_empty()));
    let item = rejected
        .iter()
        .find(|r| r.3.as_deref() == Some("mixed-2"))
        .expect("the invalid item is kept");
    assert!(
        item.2.contains("status"),
        "reason names the field: {}",
        item.2
    );
    for id in ["mixed-1", "mixed-3"] {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(n, 1, "{id} counted once");
    }
    let (total, sums) = log_sums(&db).await;
    assert_eq!(total, distinct);
    let mut want = expected_sums(&expect);
    want.insert(("exa".into(), String::new()), [2, 2, 0, 3, 0, 0]);
    assert_eq!(sums, want);

    // One notice per rejected item, each naming subject, sequence and reason.
    let mut got = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while got < rejected.len() {
        match tokio::time::timeout_at(until, notices.next()).await {
            Ok(Some(m)) => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("notice JSON");
                assert!(v["subject"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("usage.events.")));
                assert!(v["stream_sequence"].as_u64().is_some_and(|s| s > 0), "{v}");
                assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()));
                assert!(["invalid", "unparseable"].contains(&v["kind"].as_str().unwrap_or("")));
                got += 1;
            }
            _ => break,
        }
    }
    assert_eq!(got, rejected.len(), "one notice per rejected item");
    assert_eq!(consumer_backlog(&js).await, (0, 0), "nothing left pending");
    drop(tally);
}

/// Test 6: with the database stopped and 100,000 events published, Tally's
/// resident memory stays bounded (it pulls at most a few batches), and every
/// event is counted once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_with_database_down_keeps_memory_bounded() {
    const BOUND_KIB: u64 = 64 * 1024;
    const DRAIN_BOUND_KIB: u64 = 84 * 1024;
    let mut pg = TempPostgres::start(true).expect("private postgres");
    let db = pg.create_database("backpressure").expect("db");
    let n = nats();
    // Small projector batches, no day or month rows held between them and
    // no log tail: this test bounds what NATS ingest holds; the projector's
    // own budgets (TALLY_PROJECTOR_BATCH, the coarse tier's pending rows,
    // TALLY_PROJECTOR_TAIL_BYTES) are measured in BENCHMARKS.md.
    let tally = TallyProc::start(
        &db,
        &n.url(),
        &[
            ("TALLY_PROJECTOR_BATCH", "500"),
            ("TALLY_COARSE_COMMIT_INTERVAL", "0s"),
            ("TALLY_PROJECTOR_TAIL_BYTES", "0"),
        ],
    )
    .await;
    let (rss_idle, _) = tally.memory_kib();
    pg.kill_server().expect("stop postgres");
    let (_c, js) = jetstream(&n.url()).await;
    let mut cfg = emit_config(100_000, 7);
    cfg.window = 4096;
    let expect = emit(&js, cfg).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss, hwm) = tally.memory_kib();
    eprintln!("backpressure: idle RSS {rss_idle} KiB, RSS {rss} KiB, peak {hwm} KiB with 100k events waiting");
    assert!(
        hwm < BOUND_KIB,
        "peak RSS {hwm} KiB exceeds the {BOUND_KIB} KiB bound (idle was {rss_idle} KiB)"
    );
    let (pending, unacked) = consumer_backlog(&js).await;
    assert!(
        pending > 90_000,
        "the backlog stays in the stream, not in Tally: pending {pending}, unacked {unacked}"
    );
    pg.start_server().expect("restart postgres");
    wait_drained(&db, &js, 100_000, DRAIN, "after backlog").await;
    assert_exact(&db, &expect, "after backlog").await;
    let (_, hwm) = tally.memory_kib();
    eprintln!(
        "backpressure: peak {hwm} KiB after draining 100k events (projectors folding meanwhile)"
    );
    // Draining, the projectors fold beside ingest, and the allocator's
    // per-thread pages add a few MiB (mimalloc: 63 MiB before it, 72 MiB
    // with it, in this debug build). Holding the backlog would add its
    // 100k decoded events, tens of MiB more.
    assert!(
        hwm < DRAIN_BOUND_KIB,
        "peak RSS {hwm} KiB while draining 100k events"
    );
}

/// Test 7: two Tally instances share the consumer and the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_consumer_exactly() {
    let db = postgres().create_database("two").expect("db");
    let n = nats();
    let env = [("TALLY_NATS_BATCH", "200")];
    let a = TallyProc::start(&db, &n.url(), &env).await;
    let b = TallyProc::start(&db, &n.url(), &env).await;
    let (_c, js) = jetstream(&n.url()).await;
    let mut cfg = emit_config(20_000, 8);
    cfg.duplicates = 0.2;
    let expect = emit(&js, cfg).await;
    wait_drained(&db, &js, 20_000, DRAIN, "two instances").await;
    assert_exact(&db, &expect, "two instances").await;
    for (name, p) in [("a", &a), ("b", &b)] {
        assert!(
            p.log_text().contains("NATS batch committed"),
            "instance {name} took part"
        );
    }
}

/// SIGTERM mid-stream: Tally stops fetching, finishes the batch in flight and
/// exits cleanly within 10 seconds; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_and_exits_within_10s() {
    let db = postgres().create_database("sigterm").expect("db");
    let n = nats();
    let mut tally = TallyProc::start(&db, &n.url(), &[]).await;
    let (_c, js) = jetstream(&n.url()).await;
    let expect = emit(&js, emit_config(20_000, 9)).await;
    let (took, status) = tally.terminate();
    assert!(status.success(), "clean exit: {status}");
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    assert!(tally.log_text().contains("NATS ingest stopped"));
    tally.spawn().await;
    wait_drained(&db, &js, 20_000, DRAIN, "after SIGTERM").await;
    assert_exact(&db, &expect, "after SIGTERM").await;
}

/// A stream that exists with other settings: Tally says what differs and
/// exits, unless told to manage it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_other_settings_is_reported_not_silently_used() {
    let db = postgres().create_database("mismatch").expect("db");
    let n = nats();
    let (_c, js) = jetstream(&n.url()).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "USAGE".into(),
        subjects: vec!["usage.events.openai".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("serve")
        .env("TALLY_DATABASE_URL", &db)
        .env("TALLY_NATS_URL", n.url())
        .env("TALLY_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .expect("run tally");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("subjects are [\"usage.events.openai\"]")
            && err.contains("usage.events.>")
            && err.contains("--nats-manage-stream"),
        "the error says what differs and how to fix it:\n{err}"
    );
    // Managed: Tally updates the subjects and runs.
    let tally = TallyProc::start(&db, &n.url(), &[("TALLY_NATS_MANAGE_STREAM", "true")]).await;
    let mut stream = js.get_stream("USAGE").await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.config.subjects, vec!["usage.events.>".to_string()]);
    let expect = emit(&js, emit_config(100, 10)).await;
    wait_drained(&db, &js, 100, DRAIN, "managed stream").await;
    assert_exact(&db, &expect, "managed stream").await;
    drop(tally);
}
