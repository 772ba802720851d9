//! Developer tooling, outside the product: [`bench`] (`tally bench …`),
//! [`emit`] (`tally emit`, a NATS load generator and self-check), [`demo`]
//! (`tally demo`), [`synth`] (seeded synthetic events) and [`devserver`]
//! (throwaway PostgreSQL and NATS servers for tests and benchmarks).
//! They reach the database through the store's public interfaces or their
//! own SQL.

pub mod bench;
pub mod demo;
pub mod devserver;
pub mod emit;
pub mod synth;
