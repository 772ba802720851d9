//! Seeded synthetic usage events, for the demo, benchmarks and tests.
//!
//! The same seed gives the same events, so a benchmark's baseline and Tally's
//! path insert identical rows, and a failing test can be replayed.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use tally::event::{ErrorType, Event};

const APIS: &[(&str, &[&str])] = &[
    (
        "openai",
        &["/v1/chat/completions", "/v1/embeddings", "/v1/responses"],
    ),
    ("anthropic", &["/v1/messages", "/v1/complete"]),
    ("serpapi", &["/search", "/account"]),
    ("polygon", &["/v2/aggs", "/v3/trades", "/v3/quotes"]),
    ("mistral", &["/v1/chat/completions", "/v1/embeddings"]),
    ("cohere", &["/v1/rerank", "/v1/embed"]),
    ("exa", &["/search", "/contents"]),
    ("alphavantage", &["/query"]),
    ("brave", &["/res/v1/web/search"]),
    ("deepgram", &["/v1/listen"]),
];

const MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "claude-sonnet-4",
    "claude-haiku-4",
    "mistral-large",
    "command-r",
    "text-embedding-3-small",
    "rerank-3",
    "nova-2",
    "gpt-4.1",
    "o4-mini",
    "claude-opus-4",
    "mistral-small",
    "command-r-plus",
    "embed-v3",
    "gpt-5",
    "gpt-5-mini",
    "claude-3-5-haiku",
    "codestral",
];

/// Shape of a synthetic stream.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// RNG seed.
    pub seed: u64,
    /// Distinct APIs (at most 10).
    pub apis: usize,
    /// Distinct API keys.
    pub keys: usize,
    /// Distinct models (at most 20).
    pub models: usize,
    /// Timestamps spread over `[now - span, now]`.
    pub span: Duration,
    /// The "now" timestamps are relative to.
    pub now: DateTime<Utc>,
    /// Prefix of generated ids, so separate runs do not collide.
    pub id_prefix: String,
    /// Keys behave like real customers: each key calls one API with one or
    /// two models, and each user belongs to one key. Off: every field is drawn
    /// independently (the worst case for aggregation: almost every event has
    /// its own row in every table).
    pub correlated: bool,
    /// `Some(n)`: the stream holds `n` events arriving in time order, as live
    /// traffic does: event `i` is stamped `i/n` of the way through the span,
    /// up to 30 s early, and 1% are late by up to an hour. `None`: timestamps
    /// are drawn uniformly over the span, in no order.
    pub arrival_order: Option<usize>,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            apis: 5,
            keys: 50,
            models: 8,
            span: Duration::from_secs(6 * 3600),
            now: Utc::now(),
            id_prefix: "evt".into(),
            correlated: false,
            arrival_order: None,
        }
    }
}

/// Generates `count` valid events, ids `{prefix}-{offset+i}`.
pub fn events(cfg: &SynthConfig, offset: u64, count: usize) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ offset.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let span_us = i64::try_from(cfg.span.as_micros())
        .unwrap_or(i64::MAX)
        .max(1);
    (0..count)
        .map(|i| {
            let n_apis = cfg.apis.clamp(1, APIS.len());
            let n_models = cfg.models.clamp(1, MODELS.len());
            let key_index = rng.random_range(0..cfg.keys.max(1));
            let (api_index, model_index) = if cfg.correlated {
                let h = key_index.wrapping_mul(2_654_435_761);
                (
                    h % n_apis,
                    (h / 7 + usize::from(rng.random_bool(0.3)) * 5) % n_models,
                )
            } else {
                (rng.random_range(0..n_apis), rng.random_range(0..n_models))
            };
            let (api, endpoints) = APIS[api_index];
            let endpoint = endpoints[rng.random_range(0..endpoints.len())];
            let model = MODELS[model_index];
            let user_index = if cfg.correlated {
                key_index * 10 + rng.random_range(0..10)
            } else {
                rng.random_range(0..cfg.keys.max(1) * 10)
            };
            let roll: u32 = rng.random_range(0..1000);
            let status = match roll {
                0..=29 => 429,
                30..=49 => 500,
                50..=59 => 504,
                60..=69 => 400,
                70..=74 => 404,
                75..=79 => 503,
                _ => 200,
            };
            let success = status < 400;
            let tokens_in: i64 = rng.random_range(0..4000);
            let tokens_out: i64 = if success {
                rng.random_range(0..1200)
            } else {
                0
            };
            let back_us = match cfg.arrival_order {
                Some(total) => {
                    let position = (offset + i as u64) as f64 / total.max(1) as f64;
                    let late = if rng.random_bool(0.01) {
                        rng.random_range(0..3_600_000_000i64)
                    } else {
                        rng.random_range(0..30_000_000i64)
                    };
                    ((1.0 - position.min(1.0)) * span_us as f64) as i64 + late
                }
                None => rng.random_range(0..span_us),
            };
            let ts = cfg.now - chrono::Duration::microseconds(back_us);
            let mut metadata = BTreeMap::new();
            if rng.random_bool(0.1) {
                metadata.insert(
                    "region".to_string(),
                    ["us-east-1", "eu-west-1"][i % 2].to_string(),
                );
            }
            Event {
                id: format!("{}-{}", cfg.id_prefix, offset + i as u64),
                ts: ts.trunc_subsecs(6),
                api: api.to_string(),
                endpoint: Some(endpoint.to_string()),
                method: Some(
                    if endpoint.contains("search") {
                        "GET"
                    } else {
                        "POST"
                    }
                    .to_string(),
                ),
                key: Some(format!("key_{key_index:04}")),
                user: Some(format!("user_{user_index:05}")),
                model: Some(model.to_string()),
                status: Some(status),
                success,
                error_type: (!success).then(|| ErrorType::from_status(Some(status))),
                error_message: (!success).then(|| format!("upstream answered {status}")),
                latency_ms: Some(f64::from(rng.random_range(5_000u32..2_500_000)) / 1000.0),
                request_bytes: Some(rng.random_range(100..20_000)),
                response_bytes: Some(if success {
                    rng.random_range(100..60_000)
                } else {
                    120
                }),
                tokens_in: Some(tokens_in),
                tokens_out: Some(tokens_out),
                // Price per token in nano-units: exact integer arithmetic.
                cost_nanos: Some(tokens_in * 2_500 + tokens_out * 10_000),
                cached: rng.random_bool(0.1),
                metadata,
            }
        })
        .collect()
}
