//! The aggregate model, shared by every stage after the log: what a
//! projection declares ([`spec`]: dimensions, granularities, time zone), how
//! time is cut into buckets ([`bucket`]), the latency sketch ([`sketch`]),
//! the measures of one row ([`measures`]) and the cost rule with its price
//! catalog ([`price`]). It holds no I/O and knows no stage: the store writes these types, the projector produces them, queries
//! and alerts read them.

pub mod bucket;
pub mod measures;
pub mod price;
pub mod sketch;
pub mod spec;

pub use measures::{Delta, Measures, RowKey, Rows};
pub use spec::{Dimension, Granularity, Spec, SpecError};
