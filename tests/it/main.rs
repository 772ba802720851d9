//! Integration tests: one binary, real PostgreSQL (started by `support`) and SQLite files.

mod alert;
mod alert_ring;
mod architecture;
mod cli;
mod correction;
mod event;
mod hardening;
mod ingest_http;
mod ingest_nats;
mod ledger_prop;
mod ops;
mod price;
mod projection;
mod prop;
mod query;
mod security;
mod store;
mod support;
