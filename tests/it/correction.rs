//! Corrections (issue 21): voided events count nowhere, on both backends,
//! while events keep arriving; reverts bring them back; the HTTP contract.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tally::aggregate::spec::load_dir;
use tally::event::Event;
use tally::store::Backend;

use crate::projection::oracle::{
    append_all, assert_matches_oracle, lag, seeded_events, wait_restated,
};
use crate::support::proc::TallyProc;
use crate::support::{self, TestServer};

async fn send(server: &TestServer, method: &str, path: &str, body: Value) -> (u16, Value) {
    server.send_as("tester", method, path, body).await
}

async fn settled(server: &TestServer) {
    server.settled().await
}

fn specs() -> Vec<tally::aggregate::spec::Spec> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections");
    load_dir(std::path::Path::new(dir)).expect("shipped specs")
}

async fn assert_tables(store: &tally::store::Store, events: &[Event], voided: &HashSet<String>) {
    let counted: Vec<Event> = events
        .iter()
        .filter(|e| !voided.contains(&e.id))
        .cloned()
        .collect();
    for spec in specs() {
        assert_matches_oracle(store, &spec, &counted).await;
    }
}

async fn voids_match_the_oracle(backend: Backend) {
    let st = support::store(backend).await;
    let mut events = seeded_events("c", 3000, 21);
    append_all(&st.store, &events, 500).await;
    let mut config = support::server_config();
    // The seeded events lie on fixed dates; the horizon must not depend on today.
    config.late_arrival_horizon = Duration::from_secs(3650 * 86_400);
    config.jobs.retention_rejected = tally::duration::Keep(None);
    let server = TestServer::start(st.store.clone(), config).await;
    settled(&server).await;

    // By ids: two stored events, one unknown id.
    let ids = [events[0].id.clone(), events[1].id.clone()];
    let body = json!({"id": "corr-1", "reason": "double-sent by release 4.2",
                      "void": {"ids": [ids[0], ids[1], "no-such-event"]}});
    let (status, answer) = send(&server, "POST", "/v1/corrections", body.clone()).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["voided"], 2);
    assert_eq!(answer["already_voided"], 0);
    assert_eq!(answer["not_found"], json!(["no-such-event"]));
    assert_eq!(answer["actor"], "tester");
    // The same request again: the same answer; another body under the id: 409.
    let (status, again) = send(&server, "POST", "/v1/corrections", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, answer);
    let (status, conflict) = send(
        &server,
        "POST",
        "/v1/corrections",
        json!({"id": "corr-1", "reason": "other", "void": {"ids": [ids[0]]}}),
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["code"], "correction_conflict");

    // By range: key k1 on 24 November 09:00–10:30, while more events arrive
    // for the same buckets (appended beside the restatement).
    let (from, to) = ("2026-11-24T09:00:00Z", "2026-11-24T10:30:00Z");
    let (status, ranged) = send(
        &server,
        "POST",
        "/v1/corrections",
        json!({"id": "corr-2", "reason": "test traffic",
               "void": {"key": "k1", "from": from, "to": to}}),
    )
    .await;
    assert_eq!(status, 201, "{ranged}");
    let in_range = |e: &Event| {
        e.key.as_deref() == Some("k1") && e.ts >= support_time(from) && e.ts < support_time(to)
    };
    let mut voided: HashSet<String> = ids.iter().cloned().collect();
    let range_ids: Vec<String> = events
        .iter()
        .filter(|e| in_range(e))
        .map(|e| e.id.clone())
        .collect();
    assert!(!range_ids.is_empty(), "the seed has events in the range");
    assert_eq!(ranged["voided"].as_i64(), Some(range_ids.len() as i64));
    voided.extend(range_ids.iter().cloned());
    // New events in the same hours, and a re-send of a voided id (a duplicate: still voided).
    let later = seeded_events("c2", 600, 22);
    append_all(&st.store, &later, 100).await;
    let resent = vec![events[0].clone()];
    append_all(&st.store, &resent, 1).await;
    events.extend(later);
    settled(&server).await;
    assert_tables(&st.store, &events, &voided).await;

    // A range overlapping an already voided event counts it as already voided.
    let (status, overlap) = send(
        &server,
        "POST",
        "/v1/corrections",
        json!({"id": "corr-3", "reason": "overlap",
               "void": {"ids": [range_ids[0]]}}),
    )
    .await;
    assert_eq!(status, 201, "{overlap}");
    assert_eq!(overlap["voided"], 0);
    assert_eq!(overlap["already_voided"], 1);

    // Revert corr-1: its two events count again.
    let (status, reverted) = send(
        &server,
        "POST",
        "/v1/corrections/corr-1/revert",
        json!({"reason": "they were real"}),
    )
    .await;
    assert_eq!(status, 200, "{reverted}");
    assert_eq!(reverted["reverted_by"], "tester");
    let (status, twice) = send(
        &server,
        "POST",
        "/v1/corrections/corr-1/revert",
        json!({"reason": "again"}),
    )
    .await;
    assert_eq!(status, 409, "{twice}");
    for id in &ids {
        voided.remove(id);
    }
    settled(&server).await;
    assert_tables(&st.store, &events, &voided).await;

    // The record: listed newest first, with the ids each voided.
    let (status, list) = server.get("/v1/corrections").await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["corrections"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(names.len(), 3);
    let (status, one) = server.get("/v1/corrections/corr-2").await;
    assert_eq!(status, 200, "{one}");
    let mut want = range_ids.clone();
    want.sort();
    assert_eq!(one["event_ids"], json!(want));
    assert_eq!(one["void"]["key"], "k1");
    let (status, _) = server.get("/v1/corrections/nope").await;
    assert_eq!(status, 404);
}

fn support_time(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&chrono::Utc)
}

#[tokio::test]
async fn voided_events_count_nowhere_sqlite() {
    voids_match_the_oracle(Backend::Sqlite).await;
}

#[tokio::test]
async fn voided_events_count_nowhere_postgres() {
    voids_match_the_oracle(Backend::Postgres).await;
}

/// Bad corrections get a 400 that names what to fix.
#[tokio::test]
async fn bad_corrections_get_a_400_that_says_what_to_fix() {
    let st = support::store(Backend::Sqlite).await;
    let server = TestServer::start(st.store.clone(), support::server_config()).await;
    let old = (chrono::Utc::now() - chrono::Duration::days(400)).to_rfc3339();
    let now = chrono::Utc::now().to_rfc3339();
    let cases = [
        (
            json!({"id": "a", "void": {"ids": ["e1"]}}),
            "`reason` is required",
        ),
        (json!({"id": "a", "reason": "x"}), "`void` is required"),
        (
            json!({"id": "a", "reason": "x", "void": {}}),
            "`void` is empty",
        ),
        (
            json!({"id": "a", "reason": "x", "void": {"ids": []}}),
            "`void.ids` is empty",
        ),
        (
            json!({"id": "a", "reason": " ", "void": {"ids": ["e1"]}}),
            "`reason` must not be empty",
        ),
        (
            json!({"id": "a", "reason": "x", "void": {"ids": ["e1"], "key": "k"}}),
            "not both",
        ),
        (
            json!({"id": "a", "reason": "x", "void": {"key": "k", "from": now, "to": old}}),
            "before `void.to`",
        ),
        (
            json!({"id": "a", "reason": "x", "void": {"key": "k", "from": old, "to": now}}),
            "late-arrival horizon",
        ),
        (
            json!({"id": "a", "reason": "x", "void": {"key": "k", "from": "yesterday", "to": now}}),
            "RFC 3339",
        ),
        (
            json!({"id": "a", "reason": "x", "void": {"key": "k", "to": now}}),
            "`void.from` is required",
        ),
        (
            json!({"id": "a", "reason": "x", "void": {"ids": ["e1"]}, "colour": 1}),
            "unknown field",
        ),
        (
            json!({"id": "", "reason": "x", "void": {"ids": ["e1"]}}),
            "`id` must not be empty",
        ),
    ];
    for (body, want) in cases {
        let (status, answer) = send(&server, "POST", "/v1/corrections", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], "invalid_correction", "{body}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{body}: `{msg}` lacks `{want}`");
    }
    let (status, answer) = send(&server, "POST", "/v1/corrections/x/revert", json!({})).await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = send(
        &server,
        "POST",
        "/v1/corrections/x/revert",
        json!({"reason": "r"}),
    )
    .await;
    assert_eq!(status, 404);
}

/// A quota exceeded because of test traffic stops being exceeded once the
/// traffic is voided, and its alert resolves exactly once.
#[tokio::test]
async fn voiding_test_traffic_clears_an_exceeded_quota() {
    let st = support::store(Backend::Sqlite).await;
    let mut config = support::server_config();
    config.alerts.alerts_tick = Duration::from_millis(300);
    let server = TestServer::start(st.store.clone(), config).await;
    let (status, q) = send(
        &server,
        "PUT",
        "/v1/keys/k_test/quota",
        json!({"measure": "requests", "limit": 5, "window": "1h"}),
    )
    .await;
    assert!(status == 200 || status == 201, "{q}");
    let ts = (chrono::Utc::now() - chrono::Duration::minutes(2)).to_rfc3339();
    let events: Vec<Value> = (0..8)
        .map(|i| json!({"id": format!("t{i}"), "ts": ts, "api": "openai", "key": "k_test"}))
        .collect();
    let (status, r) = server.post_json(&Value::Array(events)).await;
    assert_eq!(status, 200, "{r}");
    let fired = wait_for(&server, "firing").await;
    assert_eq!(fired, 1);
    let (_, quota) = server.get("/v1/keys/k_test/quota").await;
    assert_eq!(quota["exceeded"], true, "{quota}");
    let from = (chrono::Utc::now() - chrono::Duration::minutes(10)).to_rfc3339();
    let to = (chrono::Utc::now() + chrono::Duration::minutes(1)).to_rfc3339();
    let (status, c) = send(
        &server,
        "POST",
        "/v1/corrections",
        json!({"id": "test-traffic", "reason": "test traffic",
               "void": {"key": "k_test", "from": from, "to": to}}),
    )
    .await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["voided"], 8);
    settled(&server).await;
    let (_, quota) = server.get("/v1/keys/k_test/quota").await;
    assert_eq!(quota["exceeded"], false, "{quota}");
    assert_eq!(quota["used"], 0, "{quota}");
    assert_eq!(wait_for(&server, "resolved").await, 1);
    // Later rounds do not resolve it again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, alerts) = server.get("/v1/alerts?rule=quota_exceeded&limit=100").await;
    let resolved = alerts["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|n| n["state"] == "resolved")
        .count();
    assert_eq!(resolved, 1, "{alerts}");
}

/// Waits until the quota rule has a notification in `state`; how many.
async fn wait_for(server: &TestServer, state: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, alerts) = server.get("/v1/alerts?rule=quota_exceeded&limit=100").await;
        let n = alerts["history"]
            .as_array()
            .map(|h| h.iter().filter(|n| n["state"] == state).count())
            .unwrap_or(0);
        if n > 0 {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no `{state}` notification: {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same correction sent by several clients at once is recorded once;
/// every answer is the same.
#[tokio::test]
async fn concurrent_submissions_of_one_correction_record_it_once() {
    let st = support::store(Backend::Postgres).await;
    let events = seeded_events("cc", 50, 5);
    append_all(&st.store, &events, 50).await;
    let server = TestServer::start(st.store.clone(), support::server_config()).await;
    settled(&server).await;
    let body =
        json!({"id": "same", "reason": "race", "void": {"ids": [events[3].id, events[4].id]}});
    let answers = futures::future::join_all(
        (0..8).map(|_| send(&server, "POST", "/v1/corrections", body.clone())),
    )
    .await;
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(created, 1, "{answers:?}");
    for (status, answer) in &answers {
        assert!(*status == 200 || *status == 201, "{answer}");
        assert_eq!(answer, &answers[0].1);
    }
    assert_eq!(answers[0].1["voided"], 2);
}

/// `kill -9` in the middle of a restatement (a failpoint aborts `tally serve`
/// between writing the restated rows and committing them): nothing of it is
/// visible, the queue still holds it, and the restarted process redoes it
/// while events keep arriving; afterwards every table equals the oracle.
async fn a_crash_mid_restatement_redoes_it(backend: Backend, failpoint: &str) {
    let (url, _dir) = support::database(backend, "restate_crash");
    let store = support::open(&url).await;
    let armed = format!("{failpoint}=1");
    let env = [
        ("TALLY_FAILPOINTS", armed.as_str()),
        ("TALLY_LATE_ARRIVAL_HORIZON", "3650d"),
        ("TALLY_RETENTION_REJECTED", "forever"),
        ("TALLY_PROJECTOR_POLL", "20ms"),
    ];
    let mut tally = TallyProc::start_http(&url, &env).await;
    let mut events = seeded_events("rc", 3000, 31);
    append_all(&store, &events, 500).await;
    wait_caught_up(&store).await;
    let before = snapshot(&store).await;
    let (from, to) = ("2026-11-24T08:00:00Z", "2026-11-24T11:00:00Z");
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/corrections", tally.base))
        .json(&json!({"id": "crash", "reason": "test traffic", "void": {"key": "k2", "from": from, "to": to}}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.running() {
        assert!(Instant::now() < deadline, "the failpoint did not fire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tally.log_text().contains(&format!("failpoint {failpoint}")));
    if failpoint == "restate.before_commit" {
        // The crash left the tables as they were and the restatements queued.
        assert_eq!(
            snapshot(&store).await,
            before,
            "a half restatement is visible"
        );
    } else {
        // One tier of a projection (or all, `restate.after_commit`) is
        // restated: the queue row must still be there for the restart to
        // finish it.
        assert_ne!(snapshot(&store).await, before, "no tier was restated");
    }
    assert!(!store
        .corrections()
        .pending(10)
        .await
        .expect("queue")
        .is_empty());
    // Events for the same hours arrive while it is down, then it restarts.
    let later = seeded_events("rc2", 400, 32);
    append_all(&store, &later, 100).await;
    events.extend(later);
    tally.set_env("TALLY_FAILPOINTS", "");
    tally.spawn().await;
    wait_restated(&store).await;
    tally.kill9();
    let voided: HashSet<String> = events
        .iter()
        .filter(|e| {
            e.id.starts_with("rc-")
                && e.key.as_deref() == Some("k2")
                && e.ts >= support_time(from)
                && e.ts < support_time(to)
        })
        .map(|e| e.id.clone())
        .collect();
    assert!(!voided.is_empty());
    assert_tables(&store, &events, &voided).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_restatement_redoes_it_sqlite() {
    a_crash_mid_restatement_redoes_it(Backend::Sqlite, "restate.before_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_restatement_redoes_it_postgres() {
    a_crash_mid_restatement_redoes_it(Backend::Postgres, "restate.before_commit").await;
}

/// `kill -9` after a restatement committed one tier of a projection (its
/// hour tables) and before the next (its day and month tables): the queue
/// row goes only with the last tier's commit, so the restart restates both
/// again and every table equals the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_restatements_tiers_redoes_it_sqlite() {
    a_crash_mid_restatement_redoes_it(Backend::Sqlite, "restate.between_tiers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_restatements_tiers_redoes_it_postgres() {
    a_crash_mid_restatement_redoes_it(Backend::Postgres, "restate.between_tiers").await;
}

/// `kill -9` on SQLite after a restatement's last commit (the aggregates
/// file) and before its queue row is deleted (the main file): the restart
/// finds the row and restates again, which changes nothing, and every table
/// equals the oracle. Deleting the row before the commit would lose the
/// restatement here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_restatements_commit_and_its_dequeue_redoes_it_sqlite() {
    a_crash_mid_restatement_redoes_it(Backend::Sqlite, "restate.after_commit").await;
}

/// Every row of every shipped table, to compare before and after.
async fn snapshot(store: &tally::store::Store) -> Vec<String> {
    let mut out = Vec::new();
    for spec in specs() {
        for &g in &spec.granularities {
            let rows = store
                .projections()
                .read_agg(&spec, g, "")
                .await
                .expect("read table");
            out.extend(rows.iter().map(|r| format!("{} {g:?} {r:?}", spec.name)));
        }
    }
    out
}

async fn wait_caught_up(store: &tally::store::Store) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while lag(store).await != Some(0) {
        assert!(Instant::now() < deadline, "projections did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes events over NATS in messages of 50 (JSON arrays), acked.
async fn publish_all(js: &async_nats::jetstream::Context, events: &[Event]) {
    for chunk in events.chunks(50) {
        let body: Vec<Value> = chunk
            .iter()
            .map(tally::event::codec::to_wire_json)
            .collect();
        js.publish("usage.events.race", Value::Array(body).to_string().into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
}

/// A correction and a price change restated while events for the same
/// buckets keep arriving over NATS, with a `kill -9` of Tally in the middle
/// of the restatement: afterwards every table equals the priced oracle and
/// reconciliation finds no mismatch.
async fn a_restatement_racing_nats_ingest_loses_nothing(backend: Backend) {
    use crate::projection::oracle::{assert_matches_priced_oracle, OraclePrice};
    let (url, _dir) = support::database(backend, "restate_race");
    let store = support::open(&url).await;
    let nats = crate::support::proc::nats();
    let env = [
        ("TALLY_FAILPOINTS", "restate.before_commit=1"),
        ("TALLY_LATE_ARRIVAL_HORIZON", "3650d"),
        ("TALLY_RETENTION_REJECTED", "forever"),
        ("TALLY_PROJECTOR_POLL", "20ms"),
    ];
    let mut tally = TallyProc::start(&url, &nats.url(), &env).await;
    let (_client, js) = crate::support::proc::jetstream(&nats.url()).await;
    // The seed's anchors include dates after today: ingest would refuse those.
    let past = |v: Vec<Event>| -> Vec<Event> {
        let limit = chrono::Utc::now() - chrono::Duration::hours(1);
        v.into_iter().filter(|e| e.ts < limit).collect()
    };
    let mut events = past(seeded_events("rn", 2000, 41));
    let n_first = events.len();
    publish_all(&js, &events).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.log().counts().await.expect("counts").events < n_first as i64 {
        assert!(
            Instant::now() < deadline,
            "NATS events not stored: {:?}\n{}",
            store.log().counts().await,
            tally.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_caught_up(&store).await;
    // More events for the same buckets keep arriving over NATS throughout.
    let later = past(seeded_events("rn2", 3000, 42));
    let publisher = {
        let js = js.clone();
        let later = later.clone();
        tokio::spawn(async move {
            for part in later.chunks(300) {
                publish_all(&js, part).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (from, to) = ("2026-11-24T08:00:00Z", "2026-11-24T11:00:00Z");
    // Recorded straight through the library, so both are queued before the
    // server's restater (woken by its poll) takes the first one and dies.
    let price: tally::price::PriceInput = serde_json::from_value(json!({
        "model": "m1", "effective_from": "2024-01-01T00:00:00Z",
        "input_per_mtok": "0.75", "output_per_mtok": "3.125"}))
    .expect("price");
    tally::price::Pricer::new(store.clone(), None)
        .put(&[price], "tester")
        .await
        .expect("put price");
    let correction: tally::correction::CorrectionRequest = serde_json::from_value(json!({
        "id": "race", "reason": "test traffic", "void": {"key": "k2", "from": from, "to": to}}))
    .expect("correction");
    tally::correction::Corrector::new(
        store.clone(),
        specs().iter().map(|s| s.name.clone()).collect(),
        Duration::from_secs(3650 * 86_400),
        std::sync::Arc::new(tokio::sync::Notify::new()),
    )
    .submit(&correction, "tester")
    .await
    .expect("submit");
    // The first restatement's commit kills the process (as `kill -9` would).
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.running() {
        assert!(Instant::now() < deadline, "the failpoint did not fire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tally.log_text().contains("failpoint restate.before_commit"));
    tally.set_env("TALLY_FAILPOINTS", "");
    tally.spawn().await;
    publisher.await.expect("publisher");
    events.extend(later);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored = store.log().counts().await.expect("counts").events;
        let queued = store.corrections().pending(10).await.expect("queue");
        if stored == events.len() as i64 && queued.is_empty() && lag(&store).await == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {stored} stored, {} queued",
            queued.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tally.kill9();
    // Voided: the first 2,000 events' k2 events in the range (stored when
    // the correction was accepted); those published later count.
    let in_range = |e: &Event| {
        e.key.as_deref() == Some("k2") && e.ts >= support_time(from) && e.ts < support_time(to)
    };
    let accepted: HashSet<String> = store
        .corrections()
        .events_of("race", 100_000)
        .await
        .expect("voided ids")
        .into_iter()
        .collect();
    let first: HashSet<String> = events[..n_first]
        .iter()
        .filter(|e| in_range(e))
        .map(|e| e.id.clone())
        .collect();
    assert!(
        !first.is_empty() && first.is_subset(&accepted),
        "every stored match is voided"
    );
    let counted: Vec<Event> = events
        .iter()
        .filter(|e| !accepted.contains(&e.id))
        .cloned()
        .collect();
    let prices = vec![OraclePrice {
        api: None,
        model: "m1".into(),
        from: support_time("2024-01-01T00:00:00Z"),
        input: 750_000_000,
        output: 3_125_000_000,
        cached_input: None,
        per_request: None,
    }];
    for spec in specs() {
        assert_matches_priced_oracle(&store, &spec, &counted, &prices).await;
    }
    // Reconciliation (the scheduled job's check) agrees on every day with events.
    let days: std::collections::BTreeSet<chrono::NaiveDate> =
        events.iter().map(|e| e.ts.date_naive()).collect();
    for spec in specs() {
        // As the job does: the hour and day tables (a day's events are not a month).
        let grans: Vec<tally::aggregate::Granularity> = spec
            .granularities
            .iter()
            .copied()
            .filter(|g| {
                matches!(
                    g,
                    tally::aggregate::Granularity::Hour | tally::aggregate::Granularity::Day
                )
            })
            .collect();
        if grans.is_empty() {
            continue;
        }
        for day in &days {
            let (_, mismatch) = tally::jobs::reconcile_day(&store, &spec, &grans, *day)
                .await
                .expect("reconcile");
            assert!(mismatch.is_none(), "{} {day}: {mismatch:?}", spec.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restatement_racing_nats_ingest_loses_nothing_sqlite() {
    a_restatement_racing_nats_ingest_loses_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restatement_racing_nats_ingest_loses_nothing_postgres() {
    a_restatement_racing_nats_ingest_loses_nothing(Backend::Postgres).await;
}
