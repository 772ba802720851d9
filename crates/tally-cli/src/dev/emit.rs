//! `tally emit`: a load generator and self-check for the NATS path.
//!
//! Publishes synthetic events (or an NDJSON file) to JetStream with pipelined
//! publish acks, mixing in the traffic that breaks metering systems —
//! republished ids, late timestamps, malformed payloads — and computes the
//! exact totals Tally must end up with, so a user can check Tally's numbers.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use crate::dev::synth::{self, SynthConfig};
use tally::event::codec::{to_msgpack, to_wire_json};
use tally::event::cost::format_nanos;
use tally::event::{validate, ErrorType, Event, ValidationRules};

/// Wire encoding of published messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmitEncoding {
    /// `application/json`.
    Json,
    /// `application/msgpack`.
    Msgpack,
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct EmitConfig {
    /// Distinct valid events (duplicates and invalid payloads come on top).
    pub count: usize,
    /// Messages per second; `None`: as fast as the acks come back.
    pub rate: Option<f64>,
    /// Distinct APIs, keys and models of synthetic events.
    pub apis: usize,
    /// Distinct API keys.
    pub keys: usize,
    /// Distinct models.
    pub models: usize,
    /// Fraction of events published a second time (half with the same
    /// `Nats-Msg-Id`, half with a new one that JetStream cannot deduplicate).
    pub duplicates: f64,
    /// Fraction of events with a timestamp hours to days back.
    pub late: f64,
    /// Fraction of extra malformed payloads.
    pub invalid: f64,
    /// Message encoding.
    pub encoding: EmitEncoding,
    /// RNG seed: the same seed publishes the same traffic.
    pub seed: u64,
    /// Events per message (1 = one event per message; up to 1,000).
    pub batch: usize,
    /// Subject prefix; the API name is appended.
    pub subject_prefix: String,
    /// Publish these NDJSON events instead of synthetic ones.
    pub input: Option<PathBuf>,
    /// Prefix of synthetic ids, so runs do not collide.
    pub id_prefix: String,
    /// Publishes awaiting their JetStream ack at once.
    pub window: usize,
    /// Print progress to stderr.
    pub progress: bool,
    /// Realistic traffic: keys call one API with one or two models, users
    /// belong to keys, and events arrive in time order (see [`SynthConfig`]).
    pub realistic: bool,
    /// Realistic timestamps spread over this span ending now, instead of the
    /// time the run takes at its rate (`bench e2e`'s 30-day live shape).
    pub span: Option<Duration>,
    /// With `realistic`: still in time order, but every field drawn
    /// independently (`bench e2e`'s high-cardinality shape).
    pub independent: bool,
}

impl Default for EmitConfig {
    fn default() -> Self {
        Self {
            count: 10_000,
            rate: None,
            apis: 5,
            keys: 50,
            models: 8,
            duplicates: 0.0,
            late: 0.0,
            invalid: 0.0,
            encoding: EmitEncoding::Json,
            seed: 42,
            batch: 1,
            subject_prefix: "usage.events".into(),
            input: None,
            id_prefix: format!("emit-{:08x}", rand::random::<u32>()),
            window: 2048,
            progress: false,
            realistic: false,
            span: None,
            independent: false,
        }
    }
}

/// Why emitting failed.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The input file could not be read.
    #[error("cannot read {path}: {source}")]
    Input {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A publish could not even be sent (connection closed).
    #[error("publish failed: {0}")]
    Publish(String),
}

/// What was sent, as the publisher saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EmitSummary {
    /// Messages handed to NATS.
    pub published: u64,
    /// Messages JetStream acknowledged (stored, or recognised as duplicates).
    pub acked: u64,
    /// Messages whose publish ack failed or timed out.
    pub failed: u64,
    /// Acks that said JetStream dropped the message as a duplicate `Nats-Msg-Id`.
    pub jetstream_duplicates: u64,
    /// Distinct valid events sent.
    pub events: u64,
    /// Re-published events.
    pub duplicate_events: u64,
    /// Events with late timestamps.
    pub late_events: u64,
    /// Malformed payloads sent.
    pub invalid_messages: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Per-group measures Tally must report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Events.
    pub requests: u64,
    /// Successful events.
    pub successes: u64,
    /// Failed events.
    pub errors: u64,
    /// Failed events per `error_type`.
    pub errors_by_type: BTreeMap<String, u64>,
    /// Sum of `tokens_in`.
    pub tokens_in: i64,
    /// Sum of `tokens_out`.
    pub tokens_out: i64,
    /// Sum of cost in nano-units.
    pub cost_nanos: i64,
    /// The same as an exact decimal string.
    pub cost: String,
}

impl Totals {
    fn add(&mut self, e: &Event) {
        self.requests += 1;
        if e.success {
            self.successes += 1;
        } else {
            self.errors += 1;
            let t = e.error_type.unwrap_or(ErrorType::Other);
            *self
                .errors_by_type
                .entry(t.as_str().to_string())
                .or_default() += 1;
        }
        self.tokens_in += e.tokens_in.unwrap_or(0);
        self.tokens_out += e.tokens_out.unwrap_or(0);
        self.cost_nanos += e.cost_nanos.unwrap_or(0);
        self.cost = format_nanos(self.cost_nanos);
    }
}

/// The totals Tally should end up with (written by `--expect FILE`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Expectation {
    /// Distinct events Tally must count.
    pub events: u64,
    /// Messages that must land in `rejected_events`.
    pub rejected_messages: u64,
    /// All events.
    pub totals: Totals,
    /// Per api, then per key (`""` for events without a key).
    pub by_api_key: BTreeMap<String, BTreeMap<String, Totals>>,
}

impl Expectation {
    fn count(&mut self, e: &Event) {
        self.events += 1;
        self.totals.add(e);
        self.by_api_key
            .entry(e.api.clone())
            .or_default()
            .entry(e.key.clone().unwrap_or_default())
            .or_default()
            .add(e);
    }
}

/// One message to publish.
struct Outgoing {
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
    content_type: &'static str,
}

/// Publishes according to `cfg`; returns what was sent and what Tally must count.
pub async fn emit(js: &Context, cfg: &EmitConfig) -> Result<(EmitSummary, Expectation), EmitError> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut summary = EmitSummary::default();
    let mut expect = Expectation::default();
    // Realistic timestamps span the time the run takes at its rate (in
    // messages a second, `batch` events each), ending when it ends: each
    // event is stamped about when it is published, as live traffic is.
    let (span, now) = match (cfg.span, cfg.realistic, cfg.rate) {
        (Some(span), _, _) => (span, chrono::Utc::now()),
        (None, true, Some(rate)) if rate > 0.0 => {
            let run = Duration::from_secs_f64(
                (cfg.count as f64 / (rate * cfg.batch.clamp(1, 1000) as f64)).max(1.0),
            );
            let end = chrono::TimeDelta::from_std(run).unwrap_or_default();
            (run, chrono::Utc::now() + end)
        }
        _ => (SynthConfig::default().span, chrono::Utc::now()),
    };
    let events = match &cfg.input {
        Some(path) => read_ndjson(path, &mut expect)?,
        None => {
            let synth_cfg = SynthConfig {
                seed: cfg.seed,
                apis: cfg.apis,
                keys: cfg.keys,
                models: cfg.models,
                id_prefix: cfg.id_prefix.clone(),
                correlated: cfg.realistic && !cfg.independent,
                arrival_order: cfg.realistic.then_some(cfg.count),
                span,
                now,
            };
            EventSource::Synthetic(synth_cfg)
        }
    };
    let total = match &events {
        EventSource::Synthetic(_) => cfg.count,
        EventSource::File(v) => v.len(),
    };
    let batch = cfg.batch.clamp(1, 1000);
    let mut in_flight = FuturesUnordered::new();
    // Recently sent events, to re-publish as duplicates (bounded memory).
    let mut recent: VecDeque<Value> = VecDeque::with_capacity(4096);
    let mut sent = 0usize;
    let mut seq = 0u64;
    let mut last_report = Instant::now();
    let interval = cfg
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    const CHUNK: usize = 10_000;
    while sent < total {
        let n = CHUNK.min(total - sent);
        let chunk: Vec<Event> = match &events {
            EventSource::Synthetic(sc) => synth::events(sc, sent as u64, n),
            EventSource::File(v) => v[sent..sent + n].to_vec(),
        };
        let mut pending_group: Vec<Value> = Vec::with_capacity(batch);
        let mut outgoing: Vec<Outgoing> = Vec::new();
        for mut e in chunk {
            if matches!(events, EventSource::Synthetic(_)) {
                if rng.random_bool(cfg.late.clamp(0.0, 1.0)) {
                    let back = chrono::Duration::minutes(rng.random_range(60..3 * 24 * 60));
                    e.ts -= back;
                    summary.late_events += 1;
                }
                expect.count(&e);
            }
            summary.events += 1;
            let wire = to_wire_json(&e);
            if rng.random_bool(cfg.invalid.clamp(0.0, 1.0)) {
                outgoing.push(malformed(&mut rng, cfg, seq));
                summary.invalid_messages += 1;
                expect.rejected_messages += 1;
            }
            if rng.random_bool(cfg.duplicates.clamp(0.0, 1.0)) && !recent.is_empty() {
                let again = recent[rng.random_range(0..recent.len())].clone();
                let id = again["id"].as_str().unwrap_or_default().to_string();
                // Half reuse the id as Nats-Msg-Id (JetStream may drop them), half
                // do not: those reach Tally, whose event log must deduplicate.
                let msg_id = if rng.random_bool(0.5) {
                    id
                } else {
                    format!("{id}#again-{seq}")
                };
                outgoing.push(encode(cfg, &api_of(&again), msg_id, &again));
                summary.duplicate_events += 1;
            }
            if recent.len() == recent.capacity() {
                recent.pop_front();
            }
            recent.push_back(wire.clone());
            pending_group.push(wire);
            if pending_group.len() == batch {
                outgoing.push(group(cfg, std::mem::take(&mut pending_group)));
            }
            seq += 1;
        }
        if !pending_group.is_empty() {
            outgoing.push(group(cfg, pending_group));
        }
        for out in outgoing {
            if let Some(iv) = interval {
                let due = started + iv.mul_f64(summary.published as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            while in_flight.len() >= cfg.window.max(1) {
                settle(in_flight.next().await, &mut summary);
            }
            let publish = PublishMessage::build()
                .payload(out.payload.into())
                .header("Content-Type", out.content_type)
                .message_id(out.msg_id);
            let ack = js
                .send_publish(out.subject, publish)
                .await
                .map_err(|e| EmitError::Publish(e.to_string()))?;
            summary.published += 1;
            in_flight.push(ack.into_future());
            if cfg.progress && last_report.elapsed() > Duration::from_secs(2) {
                last_report = Instant::now();
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "  published {} messages ({} of {total} events), {:.0} msg/s",
                    summary.published,
                    summary.events,
                    summary.published as f64 / secs
                );
            }
        }
        sent += n;
    }
    while let Some(r) = in_flight.next().await {
        settle(Some(r), &mut summary);
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok((summary, expect))
}

fn settle(
    result: Option<
        Result<
            async_nats::jetstream::publish::PublishAck,
            async_nats::jetstream::context::PublishError,
        >,
    >,
    summary: &mut EmitSummary,
) {
    match result {
        Some(Ok(ack)) => {
            summary.acked += 1;
            if ack.duplicate {
                summary.jetstream_duplicates += 1;
            }
        }
        Some(Err(e)) => {
            summary.failed += 1;
            tracing::warn!(error = %e, "publish not acknowledged");
        }
        None => {}
    }
}

enum EventSource {
    Synthetic(SynthConfig),
    File(Vec<Event>),
}

/// Reads and validates an NDJSON file; invalid lines are published too (and expected rejected).
fn read_ndjson(path: &PathBuf, expect: &mut Expectation) -> Result<EventSource, EmitError> {
    let text = std::fs::read_to_string(path).map_err(|source| EmitError::Input {
        path: path.clone(),
        source,
    })?;
    let rules = ValidationRules::now(Duration::from_secs(35 * 86_400));
    let mut seen = HashSet::new();
    let mut events = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let parsed = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| validate(&v, &rules).ok());
        match parsed {
            Some(e) => {
                if seen.insert(e.id.clone()) {
                    expect.count(&e);
                }
                events.push(e);
            }
            None => expect.rejected_messages += 1,
        }
    }
    Ok(EventSource::File(events))
}

fn api_of(v: &Value) -> String {
    v["api"].as_str().unwrap_or("unknown").to_string()
}

/// Subject tokens may not contain `.`, `*`, `>` or whitespace.
fn subject_token(api: &str) -> String {
    api.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn encode(cfg: &EmitConfig, api: &str, msg_id: String, body: &Value) -> Outgoing {
    let (payload, content_type) = match cfg.encoding {
        EmitEncoding::Json => (body.to_string().into_bytes(), "application/json"),
        EmitEncoding::Msgpack => (to_msgpack(body), "application/msgpack"),
    };
    Outgoing {
        subject: format!("{}.{}", cfg.subject_prefix, subject_token(api)),
        msg_id,
        payload,
        content_type,
    }
}

fn group(cfg: &EmitConfig, mut events: Vec<Value>) -> Outgoing {
    if events.len() == 1 {
        let e = events.remove(0);
        let id = e["id"].as_str().unwrap_or_default().to_string();
        return encode(cfg, &api_of(&e), id, &e);
    }
    let api = api_of(&events[0]);
    let id = format!(
        "{}..{}",
        events[0]["id"].as_str().unwrap_or_default(),
        events[events.len() - 1]["id"].as_str().unwrap_or_default()
    );
    encode(cfg, &api, id, &Value::Array(events))
}

/// A payload Tally must reject: broken JSON, a missing field, a wrong type, bad MessagePack.
fn malformed(rng: &mut StdRng, cfg: &EmitConfig, seq: u64) -> Outgoing {
    let id = format!("{}-invalid-{seq}", cfg.id_prefix);
    let (payload, content_type): (Vec<u8>, &'static str) = match rng.random_range(0..4) {
        0 => (
            format!("{{\"id\":\"{id}\",\"api\":\"openai\",").into_bytes(),
            "application/json",
        ),
        1 => (
            format!("{{\"id\":\"{id}\",\"api\":\"openai\",\"tokens_in\":5}}").into_bytes(),
            "application/json",
        ),
        2 => (
            format!(
                "{{\"id\":\"{id}\",\"ts\":\"{}\",\"api\":\"openai\",\"tokens_in\":\"many\"}}",
                chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
            )
            .into_bytes(),
            "application/json",
        ),
        _ => (vec![0xc1, 0x00, 0xff], "application/msgpack"),
    };
    Outgoing {
        subject: format!("{}.invalid", cfg.subject_prefix),
        msg_id: id,
        payload,
        content_type,
    }
}

/// True when progress lines are worth printing.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
