//! The baselines' own SQL: the database's bulk-load limit for the same
//! events, written here rather than borrowed from the store, so a benchmark
//! measures the store against the database, not against itself.

use std::fmt::Write as _;

use sqlx::{QueryBuilder, Sqlite};
use tally::event::{format_ts, Event};

/// The columns of `usage_events` that carry an event, in the order
/// [`copy_text`] and [`sqlite_insert`] write them.
pub const COLUMNS: &str = "id, ts, api, endpoint, method, key, \"user\", model, status, success, \
     error_type, error_message, latency_ms, request_bytes, response_bytes, tokens_in, tokens_out, \
     cost_nanos, cached, metadata";

/// Rows per multi-row SQLite `INSERT` (21 binds each, under SQLite's 32,766).
pub const SQLITE_ROWS_PER_STATEMENT: usize = 500;

/// `metadata` as stored: JSON text, NULL when empty.
fn metadata(e: &Event) -> Option<String> {
    (!e.metadata.is_empty()).then(|| serde_json::to_string(&e.metadata).unwrap_or_default())
}

/// COPY text format: tab-separated, `\N` for NULL, backslash escapes.
pub fn copy_text(events: &[Event]) -> String {
    fn field(out: &mut String, v: Option<&str>) {
        match v {
            None => out.push_str("\\N"),
            Some(s) => {
                for c in s.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\t' => out.push_str("\\t"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        c => out.push(c),
                    }
                }
            }
        }
        out.push('\t');
    }
    let num = |v: Option<i64>| v.map(|n| n.to_string());
    let mut out = String::with_capacity(events.len() * 400);
    for e in events {
        field(&mut out, Some(&e.id));
        field(&mut out, Some(&format_ts(&e.ts)));
        field(&mut out, Some(&e.api));
        field(&mut out, e.endpoint.as_deref());
        field(&mut out, e.method.as_deref());
        field(&mut out, e.key.as_deref());
        field(&mut out, e.user.as_deref());
        field(&mut out, e.model.as_deref());
        field(&mut out, e.status.map(|s| s.to_string()).as_deref());
        field(&mut out, Some(if e.success { "t" } else { "f" }));
        field(&mut out, e.error_type.map(|t| t.as_str()));
        field(&mut out, e.error_message.as_deref());
        field(&mut out, e.latency_ms.map(|l| l.to_string()).as_deref());
        field(&mut out, num(e.request_bytes).as_deref());
        field(&mut out, num(e.response_bytes).as_deref());
        field(&mut out, num(e.tokens_in).as_deref());
        field(&mut out, num(e.tokens_out).as_deref());
        field(&mut out, num(e.cost_nanos).as_deref());
        field(&mut out, Some(if e.cached { "t" } else { "f" }));
        field(&mut out, metadata(e).as_deref());
        out.pop();
        let _ = writeln!(out);
    }
    out
}

/// A bare multi-row `INSERT INTO usage_events … VALUES (…), (…)` (no
/// conflict clause, no read-back): SQLite's fastest path for these rows.
pub fn sqlite_insert<'a>(rows: &'a [Event], ingested_at: &'a str) -> QueryBuilder<'a, Sqlite> {
    let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
        "INSERT INTO usage_events ({COLUMNS}, ingested_at) "
    ));
    qb.push_values(rows, |mut b, e| {
        b.push_bind(e.id.as_str())
            .push_bind(format_ts(&e.ts))
            .push_bind(e.api.as_str())
            .push_bind(e.endpoint.as_deref())
            .push_bind(e.method.as_deref())
            .push_bind(e.key.as_deref())
            .push_bind(e.user.as_deref())
            .push_bind(e.model.as_deref())
            .push_bind(e.status)
            .push_bind(e.success)
            .push_bind(e.error_type.map(|t| t.as_str()))
            .push_bind(e.error_message.as_deref())
            .push_bind(e.latency_ms)
            .push_bind(e.request_bytes)
            .push_bind(e.response_bytes)
            .push_bind(e.tokens_in)
            .push_bind(e.tokens_out)
            .push_bind(e.cost_nanos)
            .push_bind(e.cached)
            .push_bind(metadata(e))
            .push_bind(ingested_at);
    });
    qb
}
