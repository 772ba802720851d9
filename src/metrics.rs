//! Prometheus metrics: process-wide counters and histograms that the data
//! path bumps as things happen, plus gauges read from the store at scrape
//! time (`GET /metrics`).
//!
//! Counters live in statics, like the `metrics` crate's facade: every stage
//! can count without threading a handle through, and there is one process,
//! one `/metrics`. Gauges that describe the database (projection lag, outbox
//! backlog) are read when scraped, so they are never stale and cost nothing
//! between scrapes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;

use crate::store::{Outcome, Store};

/// A metric family: series keyed by their label values ([`Counter`], [`Histogram`]).
pub struct Family<V> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, V>>,
}

impl<V> Family<V> {
    /// A family; `labels` names the label values passed when counting.
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            help,
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// The series map; a panic elsewhere while it was held leaves counts that are still valid.
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<String>, V>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the series with these label values (created empty).
    fn update(&self, label_values: &[&str], change: impl FnOnce(&mut V))
    where
        V: Default,
    {
        let key = label_values.iter().map(|s| s.to_string()).collect();
        change(self.lock().entry(key).or_default());
    }
}

/// A counter family with labels.
pub type Counter = Family<u64>;

impl Counter {
    /// Adds `n` to the series with these label values.
    pub fn add(&self, label_values: &[&str], n: u64) {
        if n > 0 {
            self.update(label_values, |v| *v += n);
        }
    }

    /// The current value of one series (tests).
    pub fn get(&self, label_values: &[&str]) -> u64 {
        let key: Vec<String> = label_values.iter().map(|s| s.to_string()).collect();
        self.lock().get(&key).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String) {
        let f = self;
        header(out, f.name, f.help, "counter");
        for (values, n) in f.lock().iter() {
            let _ = writeln!(out, "{}{} {n}", f.name, labels(f.labels, values));
        }
    }
}

/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One labelled series of a histogram: bucket counts, count, sum.
pub type Series = ([u64; BUCKETS.len()], u64, f64);

/// A histogram family with labels and fixed [`BUCKETS`], in seconds.
pub type Histogram = Family<Series>;

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, label_values: &[&str], d: Duration) {
        let secs = d.as_secs_f64();
        self.update(label_values, |entry| {
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    entry.0[i] += 1;
                }
            }
            entry.1 += 1;
            entry.2 += secs;
        });
    }

    fn render(&self, out: &mut String) {
        let f = self;
        header(out, f.name, f.help, "histogram");
        for (values, (buckets, count, sum)) in f.lock().iter() {
            let base = labels(f.labels, values);
            let with_le = |le: &str| {
                let inner = base.trim_start_matches('{').trim_end_matches('}');
                if inner.is_empty() {
                    format!("{{le=\"{le}\"}}")
                } else {
                    format!("{{{inner},le=\"{le}\"}}")
                }
            };
            for (le, n) in BUCKETS.iter().zip(buckets) {
                let _ = writeln!(out, "{}_bucket{} {n}", f.name, with_le(&le.to_string()));
            }
            let _ = writeln!(out, "{}_bucket{} {count}", f.name, with_le("+Inf"));
            let _ = writeln!(out, "{}_sum{base} {sum}", f.name);
            let _ = writeln!(out, "{}_count{base} {count}", f.name);
        }
    }
}

/// Events stored, by source (`http`, `nats`, `import`).
pub static INGESTED: Counter = Counter::new(
    "tally_events_ingested_total",
    "Events stored in the event log, by source.",
    &["source"],
);
/// Events whose id was already stored with the same content.
pub static DUPLICATES: Counter = Counter::new(
    "tally_events_duplicates_total",
    "Events not stored again because their id was already stored with the same content.",
    &["source"],
);
/// Events whose id was stored with different content.
pub static CONFLICTS: Counter = Counter::new(
    "tally_events_conflicts_total",
    "Events refused because their id was already stored with different content.",
    &["source"],
);
/// Payloads kept in `rejected_events`, by source and reason.
pub static REJECTED: Counter = Counter::new(
    "tally_events_rejected_total",
    "Items or bodies stored in rejected_events, by source and reason (unparseable, invalid, conflict).",
    &["source", "reason"],
);
/// Append transactions, by source.
pub static APPEND_SECONDS: Histogram = Histogram::new(
    "tally_append_batch_seconds",
    "Time to append one batch (one transaction) to the event log.",
    &["source"],
);
/// Messages JetStream delivered more than once.
pub static REDELIVERIES: Counter = Counter::new(
    "tally_nats_redeliveries_total",
    "JetStream messages received on a second or later delivery attempt.",
    &[],
);
/// Notifications published to the alert stream.
pub static ALERTS_SENT: Counter = Counter::new(
    "tally_alerts_sent_total",
    "Alert notifications acknowledged by the alert stream, by severity and state.",
    &["severity", "state"],
);
/// Job runs, by job and outcome.
pub static JOB_RUNS: Counter = Counter::new(
    "tally_job_runs_total",
    "Scheduled or manual job runs finished by this process, by job and outcome (ok, failed).",
    &["job", "outcome"],
);
/// Reconciliation mismatches found.
pub static RECONCILIATION_MISMATCHES: Counter = Counter::new(
    "tally_reconciliation_mismatches_total",
    "Aggregate rows that differed from a recomputation from the raw log, by projection.",
    &["projection"],
);
/// Rows deleted by retention.
pub static RETENTION_DELETED: Counter = Counter::new(
    "tally_retention_deleted_total",
    "Rows deleted by the retention job, by table.",
    &["table"],
);

/// Messages pending on the consumer at the last delivery (JetStream's count).
static NATS_PENDING: Mutex<Option<u64>> = Mutex::new(None);

/// Records the consumer's pending count that came with a delivery.
pub fn set_nats_pending(pending: u64) {
    *NATS_PENDING.lock().unwrap_or_else(|p| p.into_inner()) = Some(pending);
}

/// Counts one committed append.
pub fn record_append(
    source: &str,
    outcomes: &[Outcome],
    rejects: &[crate::store::Rejected],
    took: Duration,
) {
    let (mut inserted, mut dup, mut conflict) = (0, 0, 0);
    for o in outcomes {
        match o {
            Outcome::Inserted => inserted += 1,
            Outcome::Duplicate => dup += 1,
            Outcome::Conflict => conflict += 1,
            // Counted as a rejection when its record is appended.
            Outcome::Refused => {}
        }
    }
    INGESTED.add(&[source], inserted);
    DUPLICATES.add(&[source], dup);
    CONFLICTS.add(&[source], conflict);
    REJECTED.add(&[source, "conflict"], conflict);
    for r in rejects {
        REJECTED.add(&[source, r.kind.as_str()], 1);
    }
    APPEND_SECONDS.observe(&[source], took);
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `{a="x",b="y"}` with Prometheus escaping; empty when there are no labels.
fn labels(names: &[&str], values: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{n}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn gauge(out: &mut String, name: &str, help: &str, series: &[(String, f64)]) {
    header(out, name, help, "gauge");
    for (labels, v) in series {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The whole exposition: counters, then gauges read from `store` now.
/// A gauge the database cannot answer is left out (and `tally_up` says why).
pub async fn render(store: &Store) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for c in [
        &INGESTED,
        &DUPLICATES,
        &CONFLICTS,
        &REJECTED,
        &REDELIVERIES,
        &ALERTS_SENT,
        &JOB_RUNS,
        &RECONCILIATION_MISMATCHES,
        &RETENTION_DELETED,
    ] {
        c.render(&mut out);
    }
    APPEND_SECONDS.render(&mut out);
    if let Some(p) = *NATS_PENDING.lock().unwrap_or_else(|p| p.into_inner()) {
        gauge(
            &mut out,
            "tally_nats_consumer_pending",
            "Messages pending on the JetStream consumer, as of the last delivery.",
            &[(String::new(), p as f64)],
        );
    }
    let pools: Vec<(String, f64)> = store
        .pool_stats()
        .iter()
        .flat_map(|p| {
            let used = p.size.saturating_sub(p.idle);
            [
                (
                    labels(&["pool", "state"], &[p.pool.into(), "used".into()]),
                    f64::from(used),
                ),
                (
                    labels(&["pool", "state"], &[p.pool.into(), "idle".into()]),
                    f64::from(p.idle),
                ),
                (
                    labels(&["pool", "state"], &[p.pool.into(), "max".into()]),
                    f64::from(p.max),
                ),
            ]
        })
        .collect();
    gauge(
        &mut out,
        "tally_db_pool_connections",
        "Database pool connections: used, idle and the maximum.",
        &pools,
    );
    let tail = store.log_tail().stats();
    let _ = writeln!(
        out,
        "# HELP tally_projector_events_read_total Events the projectors folded, by where their columns came from: \
         `tail` (kept in memory since this process appended them) or `log` (read back from the event log).\n\
         # TYPE tally_projector_events_read_total counter\n\
         tally_projector_events_read_total{{source=\"tail\"}} {}\n\
         tally_projector_events_read_total{{source=\"log\"}} {}",
        tail.hits, tail.misses
    );
    gauge(
        &mut out,
        "tally_projector_log_tail_bytes",
        "Memory held by the log's tail: appended events waiting for the projectors (estimated).",
        &[(String::new(), tail.bytes as f64)],
    );
    let mut db_up = true;
    match store.projections().projection_states().await {
        Ok(states) => {
            let mut lag_events = Vec::new();
            let mut lag_seconds = Vec::new();
            // A projection's lag is its most behind tier's (`<name>~coarse`
            // beside `<name>`); a rebuild's shadow is not a projection.
            let mut by_projection: std::collections::BTreeMap<&str, (Option<i64>, Option<f64>)> =
                std::collections::BTreeMap::new();
            let (mut checkpoint_events, mut checkpoint_seconds) = (Vec::new(), Vec::new());
            for s in states.iter().filter(|s| !s.name.ends_with("~rebuild")) {
                let name = s.name.split('~').next().unwrap_or(&s.name);
                let entry = by_projection.entry(name).or_default();
                let l = labels(&["checkpoint"], std::slice::from_ref(&s.name));
                if let Ok(n) = store.projections().events_after(s.cursor).await {
                    entry.0 = Some(entry.0.map_or(n, |m| m.max(n)));
                    checkpoint_events.push((l.clone(), n as f64));
                }
                if let Some(as_of) = s.as_of {
                    let secs = (Utc::now() - as_of).num_milliseconds().max(0) as f64 / 1000.0;
                    entry.1 = Some(entry.1.map_or(secs, |m| m.max(secs)));
                    checkpoint_seconds.push((l, secs));
                }
            }
            for (name, (events, secs)) in by_projection {
                let l = labels(&["projection"], &[name.to_string()]);
                if let Some(n) = events {
                    lag_events.push((l.clone(), n as f64));
                }
                if let Some(secs) = secs {
                    lag_seconds.push((l, secs));
                }
            }
            gauge(
                &mut out,
                "tally_projection_lag_events",
                "Events stored but not yet folded into the projection.",
                &lag_events,
            );
            gauge(
                &mut out,
                "tally_projection_lag_seconds",
                "Seconds since the projection's as_of (every event committed before it is folded).",
                &lag_seconds,
            );
            gauge(
                &mut out,
                "tally_checkpoint_lag_events",
                "Events stored but not yet in the tables of one projection tier's checkpoint (`<name>`, `<name>~coarse`).",
                &checkpoint_events,
            );
            gauge(
                &mut out,
                "tally_checkpoint_lag_seconds",
                "Seconds since the as_of of one projection tier's checkpoint (`<name>`, `<name>~coarse`).",
                &checkpoint_seconds,
            );
        }
        Err(_) => db_up = false,
    }
    match store.alerts().outbox_backlog().await {
        Ok(n) => gauge(
            &mut out,
            "tally_alert_outbox_backlog",
            "Alert notifications written but not yet acknowledged by the alert stream.",
            &[(String::new(), n as f64)],
        ),
        Err(_) => db_up = false,
    }
    match store
        .table_rows(&[
            "rejected_events",
            "alert_outbox",
            "alert_instances",
            "alert_audit",
            "job_runs",
        ])
        .await
    {
        Ok(rows) => {
            let series: Vec<(String, f64)> = rows
                .iter()
                .map(|(t, n)| (labels(&["table"], std::slice::from_ref(t)), *n as f64))
                .collect();
            gauge(
                &mut out,
                "tally_table_rows",
                "Rows in the history tables the retention job trims (PostgreSQL: the planner's estimate).",
                &series,
            );
        }
        Err(_) => db_up = false,
    }
    match store.alerts().rule_failures().await {
        Ok(failures) => {
            let series: Vec<(String, f64)> = failures
                .iter()
                .map(|f| (labels(&["rule"], std::slice::from_ref(&f.rule)), 1.0))
                .collect();
            gauge(
                &mut out,
                "tally_alert_rules_failing",
                "Alert rules whose evaluation fails now (the reason is in GET /v1/alert-rules).",
                &[(String::new(), failures.len() as f64)],
            );
            gauge(
                &mut out,
                "tally_alert_rule_failing",
                "1 for each alert rule whose evaluation fails now.",
                &series,
            );
        }
        Err(_) => db_up = false,
    }
    gauge(
        &mut out,
        "tally_database_up",
        "1 when the database answered this scrape's queries.",
        &[(String::new(), if db_up { 1.0 } else { 0.0 })],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        static H: Histogram = Histogram::new("t_seconds", "test", &["source"]);
        H.observe(&["x"], Duration::from_millis(3));
        H.observe(&["x"], Duration::from_millis(300));
        let mut out = String::new();
        H.render(&mut out);
        assert!(
            out.contains("t_seconds_bucket{source=\"x\",le=\"0.005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{source=\"x\",le=\"0.5\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("t_seconds_bucket{source=\"x\",le=\"+Inf\"} 2"),
            "{out}"
        );
        assert!(out.contains("t_seconds_count{source=\"x\"} 2"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&["a"], &["x\"y\\z".into()]), "{a=\"x\\\"y\\\\z\"}");
        assert_eq!(labels(&[], &[]), "");
    }
}
