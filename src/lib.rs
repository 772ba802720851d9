//! # Tally — event-sourced usage metering
//!
//! Services emit one *usage event* per API call. Tally stores each event
//! exactly once in an append-only log and derives everything else from it.
//! Read the modules in the order an event travels through them:
//!
//! 1. [`event`] — the wire contract: the [`event::Event`] model, validation
//!    (every rule names its field) and codecs (JSON, NDJSON, MessagePack,
//!    CloudEvents).
//! 2. [`ingest`] — bodies from HTTP and NATS JetStream are decoded, validated
//!    and appended in one transaction; the sender hears "accepted" only after
//!    the commit.
//! 3. [`aggregate`] — the model every later stage shares: projection specs,
//!    buckets, latency sketches and the measures of an aggregate row. No I/O.
//! 4. [`store`] — the event log (`usage_events`, `rejected_events`), the
//!    aggregate tables, alert state and operations tables; one backend per
//!    file: PostgreSQL and SQLite. Deduplication by id is exact and has no
//!    time window.
//! 5. [`projection`] — projector tasks fold the log, in commit-safe order,
//!    into the aggregate tables declared in `projections/*.toml`, exactly
//!    once, with a checkpoint moved in the same transaction as the rows.
//! 6. [`query`] — stats, key rankings and key pages, answered from the
//!    narrowest projection that covers the question, never from the raw log;
//!    [`query::window`] is the one reader of a time window.
//! 7. [`alert`] — rules and per-key quotas evaluated over the projections
//!    after each projector commit and on a tick; each transition is written
//!    to an outbox with the state change and relayed to NATS exactly once.
//! 8. [`correction`] — corrections: voiding events by id or by range
//!    without touching the log; the affected buckets are restated by
//!    [`projection::restate`].
//! 9. [`price`] — the price catalog: versioned prices per model (and api),
//!    audited; a change reprices the folded events through the same
//!    restatement. The cost rule itself is [`aggregate::price`].
//! 10. [`http`] — the HTTP API: the only layer that knows axum, status codes
//!     and JSON response shapes.
//!
//! Around the data flow: [`config`] (flags and `TALLY_*` variables),
//! [`app`] (wiring and shutdown), [`auth`] (API tokens), [`jobs`] (retention,
//! reconciliation, housekeeping on a cron schedule), [`transfer`] (export,
//! import, copy between backends), [`metrics`] (`/metrics`), [`health`]
//! (dependency states for `/readyz`), [`nats`] (connecting to NATS, shared by
//! ingest, the alert relay and `tally emit`), [`telemetry`] (logging), and the small
//! helpers [`backoff`] and [`duration`].
//!
//! The `tally` command line and the developer tooling (benchmarks, load
//! generator, demo, synthetic data, throwaway servers) live in the
//! `tally-cli` crate (`crates/tally-cli`), which depends on this one; nothing
//! here can import them.

pub mod aggregate;
pub mod alert;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod config;
pub mod correction;
pub mod duration;
pub mod event;
pub mod failpoint;
pub mod health;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod lease;
pub mod metrics;
pub mod nats;
pub mod price;
pub mod projection;
pub mod query;
pub mod store;
pub mod telemetry;
pub mod transfer;
