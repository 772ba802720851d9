//! # Tally — event-sourced usage metering
//!
//! Services emit one *usage event* per API call. Tally stores each event
//! exactly once in an append-only log and derives everything else from it.
//! Read the modules in the order an event travels through them:
//!
//! 1. [`event`] — the wire contract: the [`event::Event`] model, validation
//!    (every rule names its field) and codecs (JSON, NDJSON, MessagePack,
//!    CloudEvents).
//! 2. [`ingest`] — bodies from HTTP (and, next, NATS JetStream) are decoded,
//!    validated and appended in one transaction; the sender hears "accepted"
//!    only after the commit.
//! 3. [`store`] — the event log (`usage_events`, `rejected_events`) behind the
//!    [`store::EventStore`] trait, one backend per file: PostgreSQL and SQLite.
//!    Deduplication by id is exact and has no time window.
//!
//! 4. [`projection`] — projector tasks fold the log, in commit-safe order, into
//!    the aggregate tables declared in `projections/*.toml`, exactly once,
//!    with a checkpoint moved in the same transaction as the rows.
//!
//! 5. [`query`] — `/v1/stats`, `/v1/keys` and the key page, answered from the
//!    narrowest projection that covers the question, never from the raw log.
//!
//! 6. [`alert`] — rules and per-key quotas evaluated over the projections
//!    after each projector commit and on a tick; each transition is written
//!    to an outbox with the state change and relayed to NATS exactly once.
//!
//! Around the data flow: [`config`] (flags and `TALLY_*` variables),
//! [`telemetry`] (logging), [`metrics`] (`/metrics`), [`auth`] (API tokens),
//! [`jobs`] (retention, reconciliation, housekeeping on a cron schedule),
//! [`transfer`] (export, import, copy between backends),
//! [`http`] (router, errors, health), [`app`]
//! (wiring and shutdown), [`cli`] (the `tally` command), [`bench`], [`demo`],
//! [`synth`] (seeded synthetic events) and [`devserver`] (throwaway
//! PostgreSQL for tests and benchmarks).

pub mod aggregate;
pub mod alert;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devserver;
pub mod duration;
pub mod emit;
pub mod event;
pub mod health;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod metrics;
pub mod projection;
pub mod query;
pub mod store;
pub mod synth;
pub mod telemetry;
pub mod transfer;
