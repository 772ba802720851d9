//! Alert rules and quotas end to end: `tally serve` as a child process, a
//! real nats-server with JetStream, PostgreSQL and SQLite. Every test reads
//! what an alert consumer would: the messages stored in the `USAGE_ALERTS`
//! stream (what any JetStream subscriber receives), and counts them exactly.

use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Timelike, Utc};
use serde_json::{json, Value};
use tally_cli::dev::devserver::TempNats;

use crate::support::postgres;
use crate::support::proc::{jetstream, nats, TallyProc};

/// One message of the alert stream.
#[derive(Debug, Clone)]
struct Alert {
    subject: String,
    msg_id: String,
    body: Value,
}

/// Fast evaluation and short leases so the tests see transitions quickly.
const ENV: [(&str, &str); 3] = [
    ("TALLY_ALERTS_TICK", "300ms"),
    ("TALLY_PROJECTOR_POLL", "50ms"),
    ("TALLY_PROJECTOR_LEASE", "3s"),
];

fn sqlite_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!("sqlite://{}", dir.path().join(name).display())
}

/// Every message in the alert stream, in order (empty while the stream does not exist).
async fn stream_alerts(nats_url: &str) -> Vec<Alert> {
    let (_c, js) = jetstream(nats_url).await;
    let Ok(mut stream) = js.get_stream("USAGE_ALERTS").await else {
        return Vec::new();
    };
    let last = match stream.info().await {
        Ok(info) => info.state.last_sequence,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        out.push(Alert {
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            body: serde_json::from_slice(&m.payload).expect("alert payload is JSON"),
        });
    }
    out
}

/// Waits until the stream holds at least `n` messages matching `rule`; returns them.
async fn wait_alerts(nats_url: &str, rule: &str, n: usize, timeout: Duration) -> Vec<Alert> {
    let deadline = Instant::now() + timeout;
    loop {
        let got: Vec<Alert> = stream_alerts(nats_url)
            .await
            .into_iter()
            .filter(|a| a.body["rule"] == rule)
            .collect();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn event(id: &str, key: &str, ts: DateTime<Utc>, success: bool) -> Value {
    let mut e = json!({
        "id": id, "ts": ts.to_rfc3339(), "api": "openai", "key": key, "model": "gpt-4o",
        "success": success, "tokens_in": 10, "tokens_out": 5, "cost": "0.25", "latency_ms": 100.0,
    });
    if !success {
        e["error_type"] = json!("server_error");
        e["status"] = json!(500);
    }
    e
}

async fn post_events(base: &str, events: &[Value]) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/events"))
        .json(&events)
        .send()
        .await
        .expect("post");
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert!(status.is_success(), "POST /v1/events: {status} {text}");
}

async fn send(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .header("x-tally-actor", "alice");
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn create_rule(base: &str, rule: Value) {
    let (status, body) = send(
        reqwest::Method::POST,
        format!("{base}/v1/alert-rules"),
        Some(rule),
    )
    .await;
    assert_eq!(status, 201, "create rule: {body}");
}

/// Waits until the second of the minute is within `[2, latest]`, so a test's
/// events share one minute bucket that is still current when evaluated.
async fn early_in_minute(latest: u32) {
    let s = Utc::now().second();
    if !(2..=latest).contains(&s) {
        let wait = (62 - s as u64) % 60;
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

fn assert_transition(a: &Alert, subject: &str, state: &str, sequence: i64) {
    assert_eq!(a.subject, subject, "{a:?}");
    assert_eq!(a.body["state"], state, "{a:?}");
    assert_eq!(a.body["sequence"], sequence, "{a:?}");
    let id = a.body["alert_id"].as_str().expect("alert_id");
    assert_eq!(
        a.msg_id,
        format!("{id}:{sequence}"),
        "Nats-Msg-Id is <fingerprint>:<sequence>"
    );
}

/// Test 1: events published concurrently over NATS push a key across its
/// threshold: exactly one `firing`; the one-minute window slides past them:
/// exactly one `resolved`. Both backends at once (they share the wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_fires_once_and_sliding_resolves_once() {
    let dir = tempfile::tempdir().expect("dir");
    let pg = postgres().create_database("alert_cross").expect("db");
    let sqlite = sqlite_url(&dir, "cross.db");
    early_in_minute(35).await;
    let runs = [pg, sqlite].map(|db| async move {
        let n = nats();
        let tally = TallyProc::start(&db, &n.url(), &ENV).await;
        create_rule(
            &tally.base,
            json!({"name": "k1-burst", "severity": "critical", "measure": "requests", "window": "1m",
                   "scope": {"key": "k1"}, "group_by": ["key"], "threshold": 20, "labels": {"team": "billing"}}),
        )
        .await;
        let (_c, js) = jetstream(&n.url()).await;
        let ts = Utc::now();
        let publishers = (0..4).map(|p| {
            let js = js.clone();
            async move {
                for i in 0..8 {
                    let e = event(&format!("c-{p}-{i}"), "k1", ts, true);
                    js.publish("usage.events.openai", e.to_string().into())
                        .await
                        .expect("publish")
                        .await
                        .expect("ack");
                }
            }
        });
        futures::future::join_all(publishers).await;
        let fired = wait_alerts(&n.url(), "k1-burst", 1, Duration::from_secs(20)).await;
        assert_eq!(fired.len(), 1, "{db}: one firing: {fired:?}");
        assert_transition(&fired[0], "usage.alerts.critical.k1-burst", "firing", 1);
        // The value when the crossing was first seen: the events may fold in several commits.
        let value = fired[0].body["value"].as_i64().unwrap_or_default();
        assert!((21..=32).contains(&value), "{db}: value {value}");
        assert_eq!(fired[0].body["threshold"], 20);
        assert_eq!(fired[0].body["group"], json!({"key": "k1"}));
        assert_eq!(fired[0].body["labels"], json!({"team": "billing"}));
        assert_eq!(fired[0].body["window"], "1m");
        let both = wait_alerts(&n.url(), "k1-burst", 2, Duration::from_secs(90)).await;
        assert_eq!(both.len(), 2, "{db}: firing then resolved: {both:?}");
        assert_transition(&both[1], "usage.alerts.critical.k1-burst", "resolved", 2);
        assert_eq!(both[1].body["alert_id"], both[0].body["alert_id"]);
        assert!(both[1].body["resolved_at"].is_string());
        // Nothing more arrives on later evaluations.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(stream_alerts(&n.url()).await.len(), 2, "{db}: no extra messages");
        let (status, alerts) = send(reqwest::Method::GET, format!("{}/v1/alerts?rule=k1-burst", tally.base), None).await;
        assert_eq!(status, 200);
        assert_eq!(alerts["active"], json!([]), "{alerts}");
        let history = alerts["history"].as_array().expect("history");
        assert_eq!(history.len(), 2, "{alerts}");
        assert!(history.iter().all(|h| h["sent_at"].is_string()), "{alerts}");
        // Group and state filters.
        for (query, want) in [
            ("group=key:k1", 2),
            ("group=key:other", 0),
            ("state=resolved", 1),
            ("rule=k1-burst&state=firing&group=key:k1", 1),
        ] {
            let (status, a) = send(reqwest::Method::GET, format!("{}/v1/alerts?{query}", tally.base), None).await;
            assert_eq!(status, 200, "{query}: {a}");
            assert_eq!(a["history"].as_array().map(Vec::len), Some(want), "{query}: {a}");
        }
        let (status, a) = send(reqwest::Method::GET, format!("{}/v1/alerts?state=bogus", tally.base), None).await;
        assert_eq!(status, 400, "{a}");
        drop(tally);
    });
    futures::future::join_all(runs).await;
}

/// Tests 2 and 3: a key with a limit of 1,000 requests per hour gets 850, then
/// 1,050: one warning at 80% and one critical at 100%. Then kill -9 and
/// restart, rebuild the projection, and run a second instance: still exactly
/// those two messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_limit_warns_at_80_and_100_percent_once_through_restarts_rebuilds_and_two_instances() {
    let dir = tempfile::tempdir().expect("dir");
    let pg = postgres().create_database("alert_seed").expect("db");
    let sqlite = sqlite_url(&dir, "seed.db");
    let runs = [pg, sqlite].map(|db| async move {
        let n = nats();
        let mut tally = TallyProc::start(&db, &n.url(), &ENV).await;
        create_rule(
            &tally.base,
            json!({"name": "hourly-limit", "measure": "requests", "window": "1h",
                   "scope": {"key": "seed"}, "group_by": ["key"], "limit": 1000, "warn_at": [0.8, 1.0]}),
        )
        .await;
        let ts = Utc::now() - chrono::Duration::seconds(30);
        let batch = |from: usize, to: usize| -> Vec<Value> {
            (from..to).map(|i| event(&format!("s-{i}"), "seed", ts, true)).collect()
        };
        post_events(&tally.base, &batch(0, 850)).await;
        let warned = wait_alerts(&n.url(), "hourly-limit", 1, Duration::from_secs(20)).await;
        assert_eq!(warned.len(), 1, "{db}: {warned:?}");
        assert_transition(&warned[0], "usage.alerts.warning.hourly-limit", "firing", 1);
        assert_eq!(warned[0].body["threshold"], 800);
        assert_eq!(warned[0].body["value"], 850);
        assert_eq!(warned[0].body["level"], 0.8);
        post_events(&tally.base, &batch(850, 1050)).await;
        let both = wait_alerts(&n.url(), "hourly-limit", 2, Duration::from_secs(20)).await;
        assert_eq!(both.len(), 2, "{db}: {both:?}");
        assert_transition(&both[1], "usage.alerts.critical.hourly-limit", "firing", 1);
        assert_eq!(both[1].body["value"], 1050);
        assert_eq!(both[1].body["threshold"], 1000);
        assert_ne!(both[0].body["alert_id"], both[1].body["alert_id"]);

        // Crash and restart while firing.
        tally.kill9();
        tally.spawn().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Rebuild the minute projection (and by_key) while firing and serving.
        for name in ["alerts_minute", "by_key"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["projections", "rebuild", name])
                .env("TALLY_DATABASE_URL", &db)
                .env("TALLY_PROJECTIONS_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections"))
                .output()
                .expect("run rebuild");
            assert!(out.status.success(), "rebuild {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        // A second instance on the same database and NATS.
        let second = TallyProc::start(&db, &n.url(), &ENV).await;
        post_events(&second.base, &batch(1050, 1060)).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let all: Vec<Alert> = stream_alerts(&n.url()).await;
        assert_eq!(all.len(), 2, "{db}: still exactly two messages: {all:?}\nlog:\n{}", tally.log_text());
        let (_, alerts) = send(reqwest::Method::GET, format!("{}/v1/alerts?state=firing", second.base), None).await;
        assert_eq!(alerts["active"].as_array().map(Vec::len), Some(2), "{alerts}");
        // Deleting the rule resolves both of its firing alerts, once each.
        let (status, _) = send(reqwest::Method::DELETE, format!("{}/v1/alert-rules/hourly-limit", second.base), None).await;
        assert_eq!(status, 204);
        let all = wait_alerts(&n.url(), "hourly-limit", 4, Duration::from_secs(20)).await;
        assert_eq!(all.len(), 4, "{db}: {all:?}");
        assert_transition(&all[2], all[2].subject.as_str(), "resolved", 2);
        assert_transition(&all[3], all[3].subject.as_str(), "resolved", 2);
        assert_eq!(all[2].body["reason"], "rule_removed");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(stream_alerts(&n.url()).await.len(), 4, "{db}: nothing more");
        drop(second);
        drop(tally);
    });
    futures::future::join_all(runs).await;
}

/// Test 4: NATS is down when the alert fires; the notification waits in the
/// outbox and is delivered, once, when NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_when_firing_delays_the_message_and_never_loses_it() {
    let db = postgres().create_database("alert_down").expect("db");
    let mut n: TempNats = nats();
    let tally = TallyProc::start(&db, &n.url(), &ENV).await;
    create_rule(
        &tally.base,
        json!({"name": "down", "measure": "errors", "window": "1h", "group_by": ["key"], "threshold": 2}),
    )
    .await;
    // The relay has connected and created the stream before the outage.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_c, js) = jetstream(&n.url()).await;
        if js.get_stream("USAGE_ALERTS").await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alert stream never created; log:\n{}",
            tally.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    n.kill_server().expect("stop nats");
    let ts = Utc::now();
    let events: Vec<Value> = (0..3)
        .map(|i| event(&format!("d-{i}"), "kd", ts, false))
        .collect();
    post_events(&tally.base, &events).await;
    // Fired and waiting in the outbox, unsent.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, a) = send(
            reqwest::Method::GET,
            format!("{}/v1/alerts?rule=down", tally.base),
            None,
        )
        .await;
        if let Some(h) = a["history"].as_array().filter(|h| !h.is_empty()) {
            assert_eq!(h.len(), 1, "{a}");
            assert!(
                h[0]["sent_at"].is_null(),
                "not sent while NATS is down: {a}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never fired: {a}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    n.start_server().expect("restart nats");
    let got = wait_alerts(&n.url(), "down", 1, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1, "{got:?}\nlog:\n{}", tally.log_text());
    assert_transition(&got[0], "usage.alerts.warning.down", "firing", 1);
    assert_eq!(got[0].body["group"], json!({"key": "kd"}));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stream_alerts(&n.url()).await.len(), 1, "delivered once");
}

/// Test 5: a spike shorter than `for` sends nothing (the instance is only
/// pending); an error rate flapping around its threshold with
/// `keep_firing_for` sends one firing and one resolved. Test 6 (first half):
/// the error rate does not fire below `min_requests`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_and_keep_firing_for_and_min_requests() {
    let dir = tempfile::tempdir().expect("dir");
    let db = sqlite_url(&dir, "flap.db");
    let n = nats();
    let tally = TallyProc::start(&db, &n.url(), &ENV).await;
    create_rule(
        &tally.base,
        json!({"name": "slow-burn", "measure": "requests", "window": "1h", "scope": {"key": "kf"},
               "threshold": 3, "for": "1h"}),
    )
    .await;
    create_rule(
        &tally.base,
        json!({"name": "flappy", "severity": "critical", "measure": "error_rate", "window": "1h",
               "scope": {"key": "kr"}, "group_by": ["key"], "threshold": 0.5, "min_requests": 4,
               "keep_firing_for": "4s"}),
    )
    .await;
    let ts = Utc::now() - chrono::Duration::seconds(5);
    let mut id = 0;
    let mut batch = |key: &str, count: usize, success: bool| -> Vec<Value> {
        (0..count)
            .map(|_| {
                id += 1;
                event(&format!("f-{id}"), key, ts, success)
            })
            .collect()
    };
    create_rule(
        &tally.base,
        json!({"name": "spike", "severity": "critical", "measure": "error_rate", "window": "5m",
               "scope": {"key": ["kb1", "kb2"]}, "group_by": ["key"], "threshold": 3,
               "baseline": "previous_window", "min_requests": 50}),
    )
    .await;
    // Error-rate spike against the previous 5 minutes, in one body (one commit):
    // kb1 goes from 2% to 10% (> 3 × 2%: fires), kb2 from 5% to 10% (< 3 × 5%: quiet).
    let earlier = Utc::now() - chrono::Duration::minutes(7);
    let recent = Utc::now() - chrono::Duration::seconds(20);
    let mut spike = Vec::new();
    for (key, before_errors) in [("kb1", 2), ("kb2", 5)] {
        for i in 0..100 {
            spike.push(event(
                &format!("sp-{key}-a{i}"),
                key,
                earlier,
                i >= before_errors,
            ));
            spike.push(event(&format!("sp-{key}-b{i}"), key, recent, i >= 10));
        }
    }
    post_events(&tally.base, &spike).await;
    post_events(&tally.base, &batch("kf", 10, true)).await;
    // Three errors: rate 1.0 but only 3 requests < min_requests.
    post_events(&tally.base, &batch("kr", 3, false)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let early: Vec<Alert> = stream_alerts(&n.url())
        .await
        .into_iter()
        .filter(|a| a.body["rule"] != "spike")
        .collect();
    assert!(
        early.is_empty(),
        "nothing but the spike fires yet: {early:?}"
    );
    let (_, a) = send(
        reqwest::Method::GET,
        format!("{}/v1/alerts?state=pending", tally.base),
        None,
    )
    .await;
    let pending = a["active"].as_array().expect("active");
    assert_eq!(pending.len(), 1, "slow-burn is pending: {a}");
    assert_eq!(pending[0]["rule"], "slow-burn");
    // Flap: 4/4 errors (fires), 4/12 (holds no more), 14/22, 14/42, 44/72, 44/112.
    for (count, success) in [
        (1, false),
        (8, true),
        (10, false),
        (20, true),
        (30, false),
        (40, true),
    ] {
        post_events(&tally.base, &batch("kr", count, success)).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let spiked = wait_alerts(&n.url(), "spike", 1, Duration::from_secs(20)).await;
    assert_eq!(spiked.len(), 1, "{spiked:?}");
    assert_transition(&spiked[0], "usage.alerts.critical.spike", "firing", 1);
    assert_eq!(spiked[0].body["group"], json!({"key": "kb1"}));
    assert_eq!(spiked[0].body["value"], json!(0.1));
    let got = wait_alerts(&n.url(), "flappy", 2, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_transition(&got[0], "usage.alerts.critical.flappy", "firing", 1);
    assert_transition(&got[1], "usage.alerts.critical.flappy", "resolved", 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = stream_alerts(&n.url()).await;
    assert_eq!(
        all.len(),
        3,
        "slow-burn never fired, flappy once each, spike once (kb1 only): {all:?}"
    );
}

/// Test 6 (second half): calendar_month in America/New_York at the month
/// boundary. Events one hour before and after the start of this month in New
/// York: the UTC month holds both, the New York month only the later ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_month_follows_the_rules_timezone_at_the_boundary() {
    let db = postgres().create_database("alert_month").expect("db");
    let n = nats();
    let tally = TallyProc::start(&db, &n.url(), &ENV).await;
    let ny: chrono_tz::Tz = "America/New_York".parse().expect("tz");
    let month_start = tally::aggregate::bucket::month_start(Utc::now(), ny);
    for (name, tz) in [("cost-ny", "America/New_York"), ("cost-utc", "UTC")] {
        create_rule(
            &tally.base,
            json!({"name": name, "measure": "cost", "window": "calendar_month", "timezone": tz,
                   "scope": {"key": "km"}, "threshold": 2.0}),
        )
        .await;
    }
    let mut events = Vec::new();
    for i in 0..10 {
        events.push(event(
            &format!("m-before-{i}"),
            "km",
            month_start - chrono::Duration::hours(1),
            true,
        ));
    }
    for i in 0..5 {
        events.push(event(
            &format!("m-after-{i}"),
            "km",
            month_start + chrono::Duration::hours(1),
            true,
        ));
    }
    post_events(&tally.base, &events).await;
    let utc = wait_alerts(&n.url(), "cost-utc", 1, Duration::from_secs(20)).await;
    assert_eq!(utc.len(), 1, "{utc:?}");
    assert_eq!(
        utc[0].body["value"],
        json!(3.75),
        "15 × 0.25 in the UTC month"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = stream_alerts(&n.url()).await;
    assert_eq!(
        all.len(),
        1,
        "the New York month holds 5 × 0.25 = 1.25 < 2: {all:?}"
    );
}

/// Oracle for a quota: the last `window_min` minute buckets up to `now`'s.
fn quota_oracle(
    events: &[(DateTime<Utc>, i64)],
    now: DateTime<Utc>,
    window_min: i64,
    limit: i64,
) -> Value {
    let minute = chrono::Duration::minutes(1);
    let end = now.duration_trunc(minute).expect("trunc") + minute;
    let start = end - minute * window_min as i32;
    let inside: Vec<_> = events
        .iter()
        .filter(|(ts, _)| {
            let b = ts.duration_trunc(minute).expect("trunc");
            b >= start && b < end
        })
        .collect();
    let used: i64 = inside.iter().map(|(_, t)| t).sum();
    let oldest = inside
        .iter()
        .map(|(ts, _)| ts.duration_trunc(minute).expect("trunc"))
        .min();
    json!({
        "used": used,
        "remaining": (limit - used).max(0),
        "exceeded": used > limit,
        "resets_at": oldest.map(|b| (b + minute * window_min as i32).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
    })
}

/// Test 7: a quota's used/remaining/resets_at match an oracle over the raw
/// events at minute precision, now and after the window slid by a minute;
/// crossing it fires `quota_exceeded` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_matches_a_minute_precision_oracle_as_the_window_slides() {
    let dir = tempfile::tempdir().expect("dir");
    let pg = postgres().create_database("alert_quota").expect("db");
    let sqlite = sqlite_url(&dir, "quota.db");
    early_in_minute(40).await;
    let runs = [pg, sqlite].map(|db| async move {
        let n = nats();
        let tally = TallyProc::start(&db, &n.url(), &ENV).await;
        let url = format!("{}/v1/keys/kq/quota", tally.base);
        let (status, body) = send(
            reqwest::Method::PUT,
            url.clone(),
            Some(json!({"measure": "tokens", "limit": 400, "window": "5m"})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let now = Utc::now();
        // 15 tokens per event; minutes 0..=6 ago, 5 events each.
        let mut events = Vec::new();
        let mut raw: Vec<(DateTime<Utc>, i64)> = Vec::new();
        for m in 0..7 {
            let ts = now - chrono::Duration::minutes(m) - chrono::Duration::seconds(1);
            for i in 0..5 {
                events.push(event(&format!("q-{m}-{i}"), "kq", ts, true));
                raw.push((ts, 15));
            }
        }
        events.push(event("other-key", "kz", now, true));
        post_events(&tally.base, &events).await;
        let posted = Utc::now();
        let check = |raw: Vec<(DateTime<Utc>, i64)>, url: String| async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let before = Utc::now();
                let (status, q) = send(reqwest::Method::GET, url.clone(), None).await;
                let after = Utc::now();
                assert_eq!(status, 200, "{q}");
                let fresh = q["as_of"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t >= posted);
                let minute = chrono::Duration::minutes(1);
                if fresh && before.duration_trunc(minute).ok() == after.duration_trunc(minute).ok()
                {
                    let want = quota_oracle(&raw, before, 5, 400);
                    for f in ["used", "remaining", "exceeded", "resets_at"] {
                        assert_eq!(q[f], want[f], "{f}: {q} vs oracle {want}");
                    }
                    assert_eq!(q["limit"], 400);
                    assert_eq!(q["window"], "5m");
                    return q;
                }
                assert!(Instant::now() < deadline, "quota never fresh: {q}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let first = check(raw.clone(), url.clone()).await;
        assert_eq!(first["used"], 375, "5 minutes × 5 events × 15 tokens");
        // Over the limit: 30 more tokens now.
        let over = Utc::now();
        post_events(
            &tally.base,
            &[
                event("q-over-1", "kq", over, true),
                event("q-over-2", "kq", over, true),
            ],
        )
        .await;
        raw.extend([(over, 15), (over, 15)]);
        let fired = wait_alerts(&n.url(), "quota_exceeded", 1, Duration::from_secs(20)).await;
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_transition(
            &fired[0],
            "usage.alerts.critical.quota_exceeded",
            "firing",
            1,
        );
        assert_eq!(fired[0].body["group"], json!({"key": "kq"}));
        // The key page carries the quota.
        let (_, page) = send(
            reqwest::Method::GET,
            format!("{}/v1/keys/kq/stats", tally.base),
            None,
        )
        .await;
        assert_eq!(page["quota"]["limit"], 400, "{page}");
        // Slide: wait for the next minute and compare again.
        let next = (Utc::now()
            .duration_trunc(chrono::Duration::minutes(1))
            .expect("trunc")
            + chrono::Duration::seconds(61)
            - Utc::now())
        .to_std()
        .unwrap_or_default();
        tokio::time::sleep(next).await;
        let later = check(raw, url.clone()).await;
        assert!(
            later["used"].as_i64() < Some(405),
            "the oldest minute left the window: {later}"
        );
        drop(tally);
    });
    futures::future::join_all(runs).await;
}

/// Rules over HTTP and from files: CRUD with an audit trail, bad input answered
/// with 400 and what to fix, `tally alerts apply` idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_crud_audit_bad_input_and_apply() {
    let dir = tempfile::tempdir().expect("dir");
    let db = sqlite_url(&dir, "crud.db");
    let tally = TallyProc::start_http(&db, &ENV).await;
    let base = &tally.base;
    let rule = json!({"name": "errs", "measure": "errors", "window": "5m", "group_by": ["key"], "threshold": 10});
    create_rule(base, rule.clone()).await;
    let (status, body) = send(
        reqwest::Method::POST,
        format!("{base}/v1/alert-rules"),
        Some(rule.clone()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "name_taken");
    let bad = [
        (
            json!({"name": "a", "measure": "bogus", "window": "5m", "threshold": 1}),
            "bogus",
        ),
        (
            json!({"name": "a", "measure": "errors", "window": "5m", "group_by": ["colour"], "threshold": 1}),
            "colour",
        ),
        (
            json!({"name": "a", "measure": "errors", "window": "10s", "threshold": 1}),
            "shorter",
        ),
        (
            json!({"name": "a", "measure": "errors", "window": "5m", "limit": 100}),
            "warn_at",
        ),
        (
            json!({"name": "a", "measure": "errors", "window": "5m", "threshold": 1, "sql": "DROP TABLE x"}),
            "sql",
        ),
        (
            json!({"name": "Bad Name", "measure": "errors", "window": "5m", "threshold": 1}),
            "name",
        ),
    ];
    for (body, want) in bad {
        let (status, answer) = send(
            reqwest::Method::POST,
            format!("{base}/v1/alert-rules"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {answer}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(want),
            "{body}: message {msg:?} should mention {want:?}"
        );
    }
    let mut changed = rule.clone();
    changed["threshold"] = json!(20);
    let (status, body) = send(
        reqwest::Method::PUT,
        format!("{base}/v1/alert-rules/errs"),
        Some(changed),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    assert_eq!(body["updated_by"], "alice");
    let (status, audit) = send(
        reqwest::Method::GET,
        format!("{base}/v1/alert-rules/errs/audit"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let entries = audit["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{audit}");
    assert_eq!(entries[0]["action"], "rule.update");
    assert_eq!(entries[0]["before"]["threshold"], 10.0);
    assert_eq!(entries[0]["after"]["threshold"], 20.0);
    assert_eq!(entries[0]["actor"], "alice");
    let (status, _) = send(
        reqwest::Method::DELETE,
        format!("{base}/v1/alert-rules/errs"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = send(
        reqwest::Method::GET,
        format!("{base}/v1/alert-rules/errs"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // GitOps: apply twice; the second run changes nothing.
    let file = dir.path().join("rules.toml");
    std::fs::write(
        &file,
        r#"
[[rule]]
name = "openai-rate-limit"
measure = "requests"
window = "1h"
scope = { api = "openai" }
group_by = ["key"]
limit = 10000
warn_at = [0.8, 1.0]

[[rule]]
name = "error-spike"
severity = "critical"
measure = "error_rate"
window = "5m"
group_by = ["api"]
threshold = 3.0
baseline = "previous_window"
min_requests = 50
"#,
    )
    .expect("write rules");
    let apply = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["alerts", "apply"])
            .arg(&file)
            .env("TALLY_DATABASE_URL", &db)
            .env(
                "TALLY_PROJECTIONS_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../../projections"),
            )
            .output()
            .expect("run apply");
        assert!(
            out.status.success(),
            "apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = apply();
    assert!(
        first.contains("created: openai-rate-limit, error-spike"),
        "{first}"
    );
    let second = apply();
    assert!(
        second.contains("created: -") && second.contains("updated: -"),
        "{second}"
    );
    let (_, list) = send(reqwest::Method::GET, format!("{base}/v1/alert-rules"), None).await;
    assert_eq!(list["rules"].as_array().map(Vec::len), Some(2), "{list}");
    let (_, audit) = send(
        reqwest::Method::GET,
        format!("{base}/v1/alert-rules/error-spike/audit"),
        None,
    )
    .await;
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(1),
        "applying twice audits once: {audit}"
    );
    // Quotas: bad input, 404 without one.
    let (status, body) = send(
        reqwest::Method::GET,
        format!("{base}/v1/keys/nokey/quota"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = send(
        reqwest::Method::PUT,
        format!("{base}/v1/keys/k/quota"),
        Some(json!({"measure": "latency_p95", "limit": 1, "window": "5h"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = send(
        reqwest::Method::PUT,
        format!("{base}/v1/keys/k/quota"),
        Some(json!({"measure": "tokens", "limit": 1, "window": "90s"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

/// Rules that differ only in one scope value share one read (grouped by
/// that dimension too) and each sees only its own part: the alerts equal an
/// oracle over the events, on both backends, with a baseline rule, a minute
/// window and a quota in the same shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_sharing_a_read_each_see_their_own_scope() {
    for backend in [
        tally::store::Backend::Sqlite,
        tally::store::Backend::Postgres,
    ] {
        let s = crate::support::store(backend).await;
        let mut config = crate::support::server_config();
        config.alerts.alerts_tick = Duration::from_millis(300);
        config.alerts.alerts_min_interval = Duration::from_millis(50);
        let srv = crate::support::TestServer::start(s.store.clone(), config).await;
        let now = Utc::now();
        // (api, key, count)
        let load = [
            ("a", "k1", 5),
            ("b", "k2", 5),
            ("a", "k3", 1),
            ("b", "k3", 4),
            ("c", "k1", 9),
        ];
        let mut events = Vec::new();
        for (api, key, n) in load {
            for i in 0..n {
                let mut e = event(&format!("{api}-{key}-{i}"), key, now, true);
                e["api"] = json!(api);
                events.push(e);
            }
        }
        post_events(&srv.base, &events).await;
        for (name, api, window) in [
            ("hot-a", "a", "1h"),
            ("hot-b", "b", "1h"),
            ("hot-b-5m", "b", "5m"),
            ("hot-d", "d", "1h"),
        ] {
            create_rule(
                &srv.base,
                json!({"name": name, "measure": "requests", "window": window, "scope": {"api": api}, "group_by": ["key"], "threshold": 3}),
            )
            .await;
        }
        let (status, body) = srv
            .send_as(
                "t",
                "PUT",
                "/v1/keys/k3/quota",
                json!({"measure": "requests", "limit": 4, "window": "1h"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = srv
            .send_as(
                "t",
                "PUT",
                "/v1/keys/k2/quota",
                json!({"measure": "requests", "limit": 100, "window": "1h"}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        // The oracle: per rule, the keys whose count in its api reaches 3.
        let want: [(&str, Vec<&str>); 4] = [
            ("hot-a", vec!["k1"]),
            ("hot-b", vec!["k2", "k3"]),
            ("hot-b-5m", vec!["k2", "k3"]),
            ("hot-d", vec![]),
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut got = Vec::new();
            for (rule, _) in &want {
                let (_, a) = srv.get(&format!("/v1/alerts?rule={rule}")).await;
                let mut keys: Vec<String> = a["active"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x["group"]["key"].as_str().map(str::to_string))
                    .collect();
                keys.sort();
                got.push(keys);
            }
            let (_, q) = srv.get("/v1/alerts?rule=quota_exceeded").await;
            let quota_keys: Vec<String> = q["active"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["rule"].as_str().map(str::to_string))
                .collect();
            let matches = want
                .iter()
                .zip(&got)
                .all(|((_, w), g)| w.iter().map(|s| s.to_string()).collect::<Vec<_>>() == *g);
            // k3 used 5 of 4; k2 5 of 100.
            if matches && quota_keys.len() == 1 {
                let (_, failing) = srv.get("/v1/alert-rules").await;
                assert!(!failing.to_string().contains("\"failing\""), "{failing}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{backend:?}: alerts {got:?} (want {want:?}), quota alerts {q}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let (_, q) = srv.get("/v1/keys/k3/quota").await;
        assert_eq!(q["used"], 5, "{q}");
    }
}

/// Waits until `tally` logs more ring loads than `loads` (then counts them).
async fn wait_ring_loaded(tally: &TallyProc, loads: &mut usize) {
    let count = || tally.log_text().matches("ring_loaded=1").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() <= *loads {
        assert!(Instant::now() < deadline, "the alert ring never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    *loads = count();
}

/// The alert ring through a feed that loses half the projector's commits
/// (`projector.drop_ring_feed`) and `kill -9` at whatever point the process
/// is, commit and feed included: keys just over the threshold fire exactly
/// once, keys at it never (a ring that chained over a lost commit would
/// undercount them), on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_ring_counts_exactly_through_lost_feeds_and_kill9() {
    let dir = tempfile::tempdir().expect("dir");
    let pg = postgres().create_database("alert_ring").expect("db");
    let sqlite = sqlite_url(&dir, "ring.db");
    let runs = [pg, sqlite].map(|db| async move {
        let n = nats();
        let env = [
            ("TALLY_ALERTS_TICK", "300ms"),
            ("TALLY_PROJECTOR_POLL", "20ms"),
            ("TALLY_PROJECTOR_LEASE", "1s"),
            ("TALLY_PROJECTOR_BATCH", "7"),
            ("TALLY_FAILPOINTS", "projector.drop_ring_feed=0.5"),
        ];
        let mut tally = TallyProc::start(&db, &n.url(), &env).await;
        create_rule(
            &tally.base,
            json!({"name": "ring-hot", "measure": "requests", "window": "1h",
                   "group_by": ["key"], "threshold": 30}),
        )
        .await;
        // Over the threshold of 30: k1 and k3; at or under it: k2 and k4.
        let counts = [("k1", 31), ("k2", 30), ("k3", 45), ("k4", 29)];
        let ts = Utc::now();
        let mut events: Vec<Value> = counts
            .iter()
            .flat_map(|(key, n)| {
                (0..*n).map(move |i| event(&format!("ring-{key}-{i}"), key, ts, true))
            })
            .collect();
        // Interleaved, so each commit holds rows of several keys.
        events.sort_by_key(|e| {
            let id = e["id"].as_str().unwrap_or_default().to_string();
            (id.len() * 7919 + id.bytes().map(usize::from).sum::<usize>()) % 101
        });
        let client = reqwest::Client::new();
        // Each process serves the windows from its ring only once it loaded it.
        post_events(&tally.base, &[event("ring-warm-up", "k0", ts, true)]).await;
        let mut loads = 0;
        wait_ring_loaded(&tally, &mut loads).await;
        for (i, chunk) in events.chunks(5).enumerate() {
            if i % 10 == 9 {
                tally.kill9();
                tally.spawn().await;
                wait_ring_loaded(&tally, &mut loads).await;
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
            // Re-sent after a crash: duplicates count once.
            loop {
                let sent = client
                    .post(format!("{}/v1/events", tally.base))
                    .json(&chunk)
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                if !tally.running() {
                    tally.spawn().await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let fired = |alerts: &[Alert]| -> Vec<String> {
            let mut keys: Vec<String> = alerts
                .iter()
                .filter(|a| a.body["state"] == "firing")
                .filter_map(|a| a.body["group"]["key"].as_str().map(str::to_string))
                .collect();
            keys.sort();
            keys
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = wait_alerts(&n.url(), "ring-hot", 2, Duration::from_secs(1)).await;
            if fired(&got) == ["k1", "k3"] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{db}: firing for {:?}, want k1 and k3",
                fired(&got)
            );
        }
        // Settled: every event folded, a few more rounds, nothing else fires.
        let (status, projections) = send(
            reqwest::Method::GET,
            format!("{}/v1/projections", tally.base),
            None,
        )
        .await;
        assert_eq!(status, 200, "{projections}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let all = wait_alerts(&n.url(), "ring-hot", 3, Duration::from_secs(1)).await;
        assert_eq!(fired(&all), ["k1", "k3"], "{db}: {all:?}");
        assert_eq!(
            all.len(),
            2,
            "{db}: exactly one message per crossing: {all:?}"
        );
        let log = tally.log_text();
        assert!(
            log.contains("does not chain onto the ring") || log.contains("still ahead of the ring"),
            "{db}: the lost feeds were never noticed: {}",
            log.lines()
                .filter(|l| l.contains("alert evaluation"))
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
        drop(tally);
    });
    futures::future::join_all(runs).await;
}
