//! `tally demo`: Tally's main job in one command, on the embedded default.
//!
//! Starts the server, sends a few hundred realistic events over HTTP — with
//! duplicates, a conflicting resend and broken events among them — prints what
//! Tally accepted and rejected and why, and leaves the server running.

use std::time::Duration;

use serde_json::{json, Value};

use crate::dev::synth::{self, SynthConfig};
use tally::event::codec::to_wire_json;
use tally::ingest::IngestReport;

/// Errors of the demo's client side.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The HTTP request failed.
    #[error("request to Tally failed: {0}")]
    Http(#[from] reqwest::Error),
    /// Tally answered something unexpected.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

/// What the demo sent and what Tally answered, summed over requests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DemoSummary {
    /// Events sent (items, including broken ones).
    pub sent: usize,
    /// Accepted (stored) events.
    pub accepted: usize,
    /// Duplicates recognised.
    pub duplicates: usize,
    /// Conflicts recognised.
    pub conflicts: usize,
    /// Items rejected by validation.
    pub rejected: usize,
    /// Whole bodies refused with 4xx.
    pub bodies_refused: usize,
}

/// Sends the demo traffic to a running Tally at `base` (e.g. `http://127.0.0.1:8080`).
pub async fn send_sample_traffic(base: &str, count: usize) -> Result<DemoSummary, DemoError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{base}/v1/events");
    let cfg = SynthConfig {
        id_prefix: format!("demo-{:06x}", rand::random::<u32>() & 0xff_ffff),
        // Inside the last hour, which the report reads back.
        span: Duration::from_secs(50 * 60),
        ..SynthConfig::default()
    };
    let events = synth::events(&cfg, 0, count);
    let mut summary = DemoSummary::default();
    let post = |body: Vec<Value>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let resp = client.post(&url).json(&body).send().await?;
            let status = resp.status();
            let text = resp.text().await?;
            if !status.is_success() {
                return Err(DemoError::Unexpected(format!("{status}: {text}")));
            }
            serde_json::from_str::<IngestReport>(&text)
                .map(|r| (body.len(), r))
                .map_err(|e| DemoError::Unexpected(format!("{e}: {text}")))
        }
    };

    println!("Sending {count} events in batches of 100 to {url} …");
    let mut samples: Vec<String> = Vec::new();
    let add =
        |summary: &mut DemoSummary, (n, r): (usize, IngestReport), samples: &mut Vec<String>| {
            summary.sent += n;
            summary.accepted += r.accepted;
            summary.duplicates += r.duplicates;
            summary.conflicts += r.conflicts;
            summary.rejected += r.rejected.len();
            for e in r.rejected.iter().chain(&r.conflicting).take(8) {
                samples.push(format!(
                    "  #{:<3} {:<28} {}",
                    e.index,
                    e.id.as_deref().unwrap_or("(no id)"),
                    e.error
                ));
            }
        };
    for chunk in events.chunks(100) {
        let out = post(chunk.iter().map(to_wire_json).collect()).await?;
        add(&mut summary, out, &mut samples);
    }

    // A retrying producer resends a batch: every event is a duplicate, none counted twice.
    let resend: Vec<Value> = events.iter().take(40).map(to_wire_json).collect();
    println!("Resending 40 events, as a producer retrying after a timeout would …");
    let out = post(resend).await?;
    add(&mut summary, out, &mut samples);

    let broken = broken_batch(&cfg.id_prefix, &events[0]);
    println!("Sending a conflicting resend and five broken events beside a valid one …");
    let out = post(broken).await?;
    add(&mut summary, out, &mut samples);

    let resp = client
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"id\": \"half")
        .send()
        .await?;
    println!(
        "Sending a truncated body … {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    summary.bodies_refused += 1;

    print_summary(&summary, &samples);
    Ok(summary)
}

fn print_summary(summary: &DemoSummary, samples: &[String]) {
    println!("\n  sent        {:>6}", summary.sent + 1);
    println!("  accepted    {:>6}", summary.accepted);
    println!("  duplicates  {:>6}  (counted once)", summary.duplicates);
    println!(
        "  conflicts   {:>6}  (same id, different content: kept in rejected_events)",
        summary.conflicts
    );
    println!(
        "  rejected    {:>6}  (kept in rejected_events with the reason)",
        summary.rejected
    );
    println!(
        "  bodies refused {:>3}  (unparseable, kept in rejected_events)",
        summary.bodies_refused
    );
    if !samples.is_empty() {
        println!("\nWhy events were not counted:");
        for s in samples.iter().take(12) {
            println!("{s}");
        }
    }
}

/// The same traffic as [`send_sample_traffic`], published to JetStream
/// (`usage.events.<api>`), the main ingest path. The summary is read back from
/// the event log and the notices on `usage.rejected`, so it shows what Tally did.
pub async fn send_sample_traffic_nats(
    client: &async_nats::Client,
    store: &tally::store::Store,
    count: usize,
) -> Result<DemoSummary, DemoError> {
    use futures::StreamExt;
    let nats_err = |e: &dyn std::fmt::Display| DemoError::Unexpected(format!("NATS: {e}"));
    let js = async_nats::jetstream::new(client.clone());
    let mut notices = client
        .subscribe("usage.rejected")
        .await
        .map_err(|e| nats_err(&e))?;
    let before = store
        .log()
        .counts()
        .await
        .map_err(|e| DemoError::Unexpected(e.to_string()))?;
    let cfg = SynthConfig {
        id_prefix: format!("demo-{:06x}", rand::random::<u32>() & 0xff_ffff),
        // Inside the last hour, which the report reads back.
        span: Duration::from_secs(50 * 60),
        ..SynthConfig::default()
    };
    let events = synth::events(&cfg, 0, count);
    let publish = |subject: String, msg_id: String, body: Vec<u8>| {
        let js = js.clone();
        async move {
            let msg = async_nats::jetstream::message::PublishMessage::build()
                .payload(body.into())
                .header("Content-Type", "application/json")
                .message_id(msg_id);
            js.send_publish(subject, msg)
                .await
                .map_err(|e| nats_err(&e))?
                .await
                .map_err(|e| nats_err(&e))
        }
    };
    let mut summary = DemoSummary::default();
    println!("Publishing {count} events to usage.events.<api>, 100 per message …");
    for (i, chunk) in events.chunks(100).enumerate() {
        let body: Vec<Value> = chunk.iter().map(to_wire_json).collect();
        let subject = format!("usage.events.{}", chunk[0].api);
        publish(
            subject,
            format!("{}-{i}", cfg.id_prefix),
            serde_json::to_vec(&body).unwrap_or_default(),
        )
        .await?;
        summary.sent += chunk.len();
    }
    println!("Re-publishing 40 events with a new Nats-Msg-Id, as a retrying producer would …");
    let resend: Vec<Value> = events.iter().take(40).map(to_wire_json).collect();
    publish(
        "usage.events.openai".into(),
        format!("{}-resend", cfg.id_prefix),
        serde_json::to_vec(&resend).unwrap_or_default(),
    )
    .await?;
    summary.sent += 40;
    let broken = broken_batch(&cfg.id_prefix, &events[0]);
    println!("Publishing a conflicting resend and five broken events beside a valid one …");
    publish(
        "usage.events.openai".into(),
        format!("{}-broken", cfg.id_prefix),
        serde_json::to_vec(&broken).unwrap_or_default(),
    )
    .await?;
    summary.sent += broken.len();
    println!("Publishing a truncated body …");
    publish(
        "usage.events.openai".into(),
        format!("{}-truncated", cfg.id_prefix),
        b"{\"id\": \"half".to_vec(),
    )
    .await?;

    // Tally answers producers on usage.rejected; wait for the 7 notices and the commits.
    let mut samples = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while seen < 7 {
        match tokio::time::timeout_at(deadline, notices.next()).await {
            Ok(Some(m)) => {
                seen += 1;
                let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                match v["kind"].as_str() {
                    Some("conflict") => summary.conflicts += 1,
                    Some("unparseable") => summary.bodies_refused += 1,
                    _ => summary.rejected += 1,
                }
                samples.push(format!(
                    "  {:<12} {:<28} {}",
                    v["kind"].as_str().unwrap_or(""),
                    v["event_id"].as_str().unwrap_or("(no id)"),
                    v["reason"].as_str().unwrap_or("")
                ));
            }
            _ => {
                return Err(DemoError::Unexpected(format!(
                    "only {seen} of 7 rejection notices arrived within 30s"
                )))
            }
        }
    }
    let want = before.events + count as i64 + 1;
    loop {
        let now = store
            .log()
            .counts()
            .await
            .map_err(|e| DemoError::Unexpected(e.to_string()))?;
        if now.events >= want {
            summary.accepted = (now.events - before.events) as usize;
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DemoError::Unexpected(format!(
                "{} of {} events counted after 30s",
                now.events - before.events,
                want - before.events
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    summary.duplicates = summary.sent - summary.accepted - summary.conflicts - summary.rejected;
    print_summary(&summary, &samples);
    Ok(summary)
}

/// A conflicting resend of `first` (same id, other cost), five broken events
/// and one valid event: the mix every demo path sends.
fn broken_batch(prefix: &str, first: &tally::event::Event) -> Vec<Value> {
    let mut changed = to_wire_json(first);
    changed["cost"] = json!("99.5");
    let now = chrono::Utc::now();
    vec![
        changed,
        json!({"id": format!("{prefix}-typo"), "ts": now.to_rfc3339(), "api": "openai", "latencyMs": 120}),
        json!({"id": format!("{prefix}-neg"), "ts": now.to_rfc3339(), "api": "openai", "cost": "-0.01"}),
        json!({"id": format!("{prefix}-noapi"), "ts": now.to_rfc3339()}),
        json!({"id": format!("{prefix}-future"), "ts": (now + chrono::Duration::hours(2)).to_rfc3339(), "api": "openai"}),
        json!({"id": format!("{prefix}-precise"), "ts": now.timestamp_millis(), "api": "openai", "cost": "0.0000000001"}),
        json!({"id": format!("{prefix}-ok"), "ts": now.timestamp_millis(), "api": "openai", "status": 429, "tokens_in": 12}),
    ]
}

/// The rule the demo installs; it fires on the sample traffic.
pub const DEMO_RULE: &str = "demo-busy-api";

/// What Tally is for, read back through the query API after the traffic:
/// the last hour by api, the top keys by cost, and an alert rule firing.
/// Waits (up to 30 s) for the projections to fold the traffic first.
pub async fn report(base: &str) -> Result<(), DemoError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{base}{path}");
        async move {
            let resp = client.get(&url).send().await?;
            let status = resp.status();
            let body: Value = resp.json().await?;
            if !status.is_success() {
                return Err(DemoError::Unexpected(format!("GET {url}: {status} {body}")));
            }
            Ok::<_, DemoError>(body)
        }
    };
    let rule = json!({"name": DEMO_RULE, "severity": "warning", "measure": "requests",
        "window": "1h", "group_by": ["api"], "threshold": 20,
        "labels": {"from": "tally demo"}});
    let resp = client
        .put(format!("{base}/v1/alert-rules/{DEMO_RULE}"))
        .json(&rule)
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(DemoError::Unexpected(format!(
            "creating the demo rule: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        )));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p = get("/v1/projections".into()).await?;
        let caught_up = p["projections"]
            .as_array()
            .is_some_and(|a| a.iter().all(|p| p["lag_events"].as_i64() == Some(0)));
        if caught_up || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let from = (chrono::Utc::now() - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:00Z")
        .to_string();
    let stats = get(format!(
        "/v1/stats?granularity=minute&group_by=api&order_by=cost&from={from}"
    ))
    .await?;
    println!(
        "\nThe last hour by api (GET /v1/stats?granularity=minute&group_by=api&order_by=cost):"
    );
    println!(
        "  {:<12} {:>9} {:>7} {:>10} {:>14}",
        "api", "requests", "errors", "p95 ms", "cost"
    );
    for t in stats["totals"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} {:>9} {:>7} {:>10} {:>14}",
            t["group"]["api"].as_str().unwrap_or(""),
            t["requests"].to_string(),
            t["errors"].to_string(),
            t["latency_ms"]["p95"]
                .as_f64()
                .map_or("-".to_string(), |v| format!("{v:.1}")),
            t["cost"].as_str().unwrap_or("0")
        );
    }
    let keys = get(format!("/v1/keys?order_by=cost&limit=5&from={from}")).await?;
    println!("\nTop keys by cost, last hour (GET /v1/keys?order_by=cost&limit=5):");
    println!("  {:<16} {:>9} {:>14}", "key", "requests", "cost");
    for k in keys["keys"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:>9} {:>14}",
            k["key"].as_str().unwrap_or(""),
            k["requests"].to_string(),
            k["cost"].as_str().unwrap_or("0")
        );
    }
    println!(
        "\nAlert rule `{DEMO_RULE}`: more than 20 requests per api in 1h (PUT /v1/alert-rules/{DEMO_RULE}) …"
    );
    loop {
        let alerts = get(format!("/v1/alerts?rule={DEMO_RULE}")).await?;
        let active = alerts["active"].as_array().cloned().unwrap_or_default();
        if !active.is_empty() {
            for a in &active {
                println!(
                    "  {} {} {}: value {} > threshold {}",
                    a["state"].as_str().unwrap_or(""),
                    a["severity"].as_str().unwrap_or(""),
                    a["group"],
                    a["value"],
                    a["threshold"]
                );
            }
            println!("  (each transition is also published once on usage.alerts.warning.{DEMO_RULE} when NATS is configured)");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            println!("  not firing yet; see GET /v1/alerts?rule={DEMO_RULE}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}
