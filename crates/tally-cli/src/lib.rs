//! The `tally` command ([`cli`]) and the developer tooling it offers
//! ([`dev`]: benchmarks, the load generator, the demo, synthetic events and
//! throwaway PostgreSQL/NATS servers for tests and benchmarks).
//!
//! The service itself is the `tally` library crate; this crate depends on it,
//! never the other way round, so the product cannot import its tooling.

pub mod cli;
pub mod dev;
