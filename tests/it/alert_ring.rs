//! The alert ring against the tables it caches: after every kind of change
//! to a minute table (commits it is fed, commits it is not, another
//! instance's folds, a correction's restatement, a price change), each
//! window it serves equals the same window read from the database.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DurationRound, Utc};
use rand::{Rng, SeedableRng};
use tally::aggregate::spec::{Dimension, Spec};
use tally::aggregate::Measures;
use tally::alert::ring::{Ring, Want};
use tally::projection::projector::{Failpoints, FoldSignal, Projector};
use tally::query::output::Group;
use tally::query::{window, Catalog};
use tally::store::corrections::{NewCorrection, VoidTarget};
use tally::store::{Backend, Store};

use crate::projection::oracle::{append_all, fold_all, seeded_events, shipped};
use crate::support;

/// What one round of the test does to the table before the ring syncs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    /// Commits the ring is fed.
    Fed,
    /// A commit whose rows never reach the ring, then one that does.
    Dropped,
    /// A commit whose rows never reach the ring, and nothing after it.
    DroppedLast,
    /// Another instance (not feeding this ring) folds a batch.
    Elsewhere,
    /// A correction voids events; the restatement rewrites their buckets.
    Voided,
    /// A price change; the restatement reprices every bucket.
    Repriced,
}

async fn ring_equals_the_tables(backend: Backend) {
    let st = support::store(backend).await;
    let store = &st.store;
    let spec: Arc<Spec> = Arc::new(
        shipped()
            .into_iter()
            .find(|s| s.name == "alerts_minute")
            .expect("alerts_minute"),
    );
    let catalog = Catalog::new(vec![spec.clone()]);
    let signal = Arc::new(FoldSignal::default());
    let mut projector = Projector::open(store.clone(), spec.clone(), &spec.name, "")
        .await
        .expect("open")
        .with_signal(signal.clone());
    let now = Utc::now();
    let end = now
        .duration_trunc(chrono::Duration::minutes(1))
        .expect("minute")
        + chrono::Duration::minutes(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(34);
    let mut events = Vec::new();
    let batch = |round: usize, rng: &mut rand::rngs::StdRng| {
        let mut out = seeded_events(&format!("ring{round}"), 120, round as u64);
        for e in &mut out {
            // Mostly the last 100 minutes, some a minute ahead; a few
            // before the ring's horizon (never in it).
            e.ts = now - chrono::Duration::seconds(rng.random_range(-60..6000));
        }
        out
    };
    let first = batch(0, &mut rng);
    append_all(store, &first, 60).await;
    events.extend(first);
    fold_all(&mut projector, store, 50).await;
    let apis: Vec<String> = {
        let mut a: Vec<String> = events.iter().map(|e| e.api.clone()).collect();
        a.sort();
        a.dedup();
        a.truncate(2);
        a
    };
    let wants: HashMap<String, Want> = HashMap::from([
        (
            "by-key-of-two-apis".to_string(),
            Want {
                spec: spec.clone(),
                scope: vec![(Dimension::Api, apis.clone())],
                group_by: vec![Dimension::Key, Dimension::Api],
                sketch: false,
                from: end - chrono::Duration::minutes(60),
            },
        ),
        (
            "by-model-with-sketches".to_string(),
            Want {
                spec: spec.clone(),
                scope: vec![],
                group_by: vec![Dimension::Model],
                sketch: true,
                from: end - chrono::Duration::minutes(90),
            },
        ),
    ]);
    let mut ring = Ring::new();
    let synced = ring
        .sync(store, &signal, &wants, &states(store).await)
        .await
        .expect("sync");
    assert_eq!(synced.loaded, 2, "the first sync loads both shapes");
    let changes = [
        Change::Fed,
        Change::Dropped,
        Change::Fed,
        Change::DroppedLast,
        Change::Elsewhere,
        Change::Fed,
        Change::Voided,
        Change::Fed,
        Change::Repriced,
        Change::Fed,
    ];
    for (round, change) in changes.into_iter().enumerate() {
        let round = round + 1;
        let more = batch(round, &mut rng);
        let (a, b) = more.split_at(more.len() / 2);
        append_all(store, a, 30).await;
        match change {
            Change::Elsewhere => {
                let mut other = Projector::open(store.clone(), spec.clone(), &spec.name, "")
                    .await
                    .expect("open");
                fold_all(&mut other, store, 50).await;
                // This projector's next compare-and-set finds the moved
                // checkpoint and reads again.
                fold_all(&mut projector, store, 50).await;
            }
            Change::Dropped | Change::DroppedLast => {
                fold_all(&mut projector, store, 50).await;
                // Taken and thrown away, as if never published.
                let (dropped, _) = signal.take_commits();
                assert!(!dropped.is_empty(), "round {round}: nothing folded");
            }
            _ => fold_all(&mut projector, store, 50).await,
        }
        if change != Change::DroppedLast {
            append_all(store, b, 30).await;
            fold_all(&mut projector, store, 50).await;
        }
        match change {
            Change::Voided => {
                let ids: Vec<String> = events.iter().step_by(7).map(|e| e.id.clone()).collect();
                let target = VoidTarget::Ids(ids);
                let request = format!("ring-void-{round}");
                store
                    .corrections()
                    .record(&NewCorrection {
                        id: &request,
                        reason: "test",
                        request: &request,
                        actor: "t",
                        target: &target,
                        projections: std::slice::from_ref(&spec.name),
                    })
                    .await
                    .expect("correction");
                restate_all(store, &spec).await;
            }
            Change::Repriced => {
                let model = events[0].model.clone().unwrap_or_default();
                let price = tally::aggregate::price::Price {
                    api: String::new(),
                    model,
                    effective_from: now - chrono::Duration::days(1),
                    input: 1_000_000_000,
                    output: 3_000_000_000,
                    cached_input: None,
                    per_request: Some(7),
                };
                store
                    .prices()
                    .put(
                        &[tally::store::prices::NewPrice {
                            id: Some(format!("ring-{round}")),
                            price,
                        }],
                        "t",
                    )
                    .await
                    .expect("price");
                restate_all(store, &spec).await;
            }
            _ => {}
        }
        events.extend(more);
        let synced = ring
            .sync(store, &signal, &wants, &states(store).await)
            .await
            .expect("sync");
        for (key, want) in &wants {
            for minutes in [5, 15, 60, 90] {
                let range = (end - chrono::Duration::minutes(minutes), end);
                if range.0 < want.from {
                    continue;
                }
                let held = ring
                    .values(key, range)
                    .unwrap_or_else(|| panic!("round {round}: {key} {minutes}m not served"));
                let (rows, _) = window::read_range(
                    store,
                    &catalog,
                    chrono_tz::Tz::UTC,
                    &want.scope,
                    &want.group_by,
                    range,
                    now,
                    want.sketch,
                )
                .await
                .expect("read");
                let read: HashMap<Group, Measures> = rows.into_iter().collect();
                assert!(!read.is_empty(), "round {round}: {key} {minutes}m is empty");
                let brief = |m: &HashMap<Group, Measures>| {
                    let mut v: Vec<String> = m
                        .iter()
                        .map(|(g, m)| format!("{:?}={}", g.0, m.requests))
                        .collect();
                    v.sort();
                    v.join(" ")
                };
                assert_eq!(
                    brief(&held),
                    brief(&read),
                    "round {round} ({change:?}): {key} over the last {minutes} minutes"
                );
                assert_eq!(
                    held, read,
                    "round {round} ({change:?}): {key} over the last {minutes} minutes"
                );
            }
        }
        match change {
            Change::Fed => {
                assert_eq!(synced.loaded, 0, "round {round}: fed commits chain on");
                assert!(synced.commits > 0, "round {round}: no commit taken");
            }
            _ => assert_eq!(
                synced.loaded, 2,
                "round {round}: {change:?} must reload both shapes"
            ),
        }
    }
    // Windows before the ring's start are not served (the evaluator reads them).
    assert!(ring
        .values(
            "by-key-of-two-apis",
            (end - chrono::Duration::minutes(61), end)
        )
        .is_none());
}

async fn states(store: &Store) -> Vec<tally::store::ProjectionState> {
    store
        .projections()
        .projection_states()
        .await
        .expect("states")
}

/// Runs every queued restatement of `spec`.
async fn restate_all(store: &Store, spec: &Arc<Spec>) {
    let specs = vec![spec.clone()];
    while tally::projection::restate::step(store, &specs, None, Failpoints::default())
        .await
        .expect("restate")
    {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_ring_equals_the_tables_through_gaps_takeovers_and_restatements_sqlite() {
    ring_equals_the_tables(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_ring_equals_the_tables_through_gaps_takeovers_and_restatements_postgres() {
    ring_equals_the_tables(Backend::Postgres).await;
}

async fn rules(evaluator: &mut tally::alert::eval::Evaluator) -> usize {
    evaluator.evaluate(Utc::now()).await.expect("round").rules
}

/// Each round reads the rules version before anything else and loads the
/// rules again only when it moved; a trigger moves it for every change,
/// through the API or by hand in SQL.
async fn the_evaluator_loads_rules_again_whenever_they_change(backend: Backend) {
    let s = support::store(backend).await;
    let store = s.store.clone();
    let catalog = Arc::new(Catalog::new(shipped().into_iter().map(Arc::new).collect()));
    let mut evaluator =
        tally::alert::eval::Evaluator::new(store.clone(), catalog, "usage.alerts", None);
    let rule = |name: &str, threshold: u32| {
        format!(
            r#"{{"name": "{name}", "measure": "errors", "window": "5m", "group_by": ["key"], "threshold": {threshold}}}"#
        )
    };
    let write = |name: &'static str, threshold: u32| {
        let (store, spec) = (store.clone(), rule(name, threshold));
        async move {
            store
                .alerts()
                .write_rule(name, &spec, "test", tally::store::alerts::WriteMode::Upsert)
                .await
                .expect("write rule");
        }
    };
    write("a", 10).await;
    assert_eq!(rules(&mut evaluator).await, 1);
    assert_eq!(rules(&mut evaluator).await, 1, "nothing changed");
    write("b", 10).await;
    assert_eq!(
        rules(&mut evaluator).await,
        2,
        "a rule created through the store"
    );
    s.exec("DELETE FROM alert_rules WHERE name = 'b'").await;
    assert_eq!(rules(&mut evaluator).await, 1, "a rule deleted in SQL");
    s.exec(
        "UPDATE alert_rules SET spec = replace(spec, '\"measure\": \"errors\"', '\"measure\": \"bogus\"') WHERE name = 'a'",
    )
    .await;
    assert_eq!(
        rules(&mut evaluator).await,
        0,
        "a rule changed in SQL (to one that no longer validates)"
    );
    write("a", 20).await;
    assert_eq!(rules(&mut evaluator).await, 1, "the rule repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evaluator_loads_rules_again_whenever_they_change_sqlite() {
    the_evaluator_loads_rules_again_whenever_they_change(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_evaluator_loads_rules_again_whenever_they_change_postgres() {
    the_evaluator_loads_rules_again_whenever_they_change(Backend::Postgres).await;
}
