//! Projections on both backends: property test against the oracle, the slow
//! committer, spec changes and rebuilds (also during live ingest), backfill of
//! a new projection, `as_of`; child-process crash and takeover tests in `procs`.

pub mod oracle;
mod procs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use proptest::prelude::*;
use tally::aggregate::spec::{Granularity, Spec};
use tally::event::Event;
use tally::projection::rebuild::rebuild;
use tally::projection::{ProjectionError, ProjectorConfig};
use tally::store::{Backend, Cursor, Store};
use tokio_util::sync::CancellationToken;

use self::oracle::{
    append_all, assert_matches_oracle, event, fold_all, projector, seeded_events, shipped, tz_specs,
};
use crate::support::{self, both_backends, TestStore};

fn spec(name: &str) -> Spec {
    shipped()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("shipped spec {name}"))
}

/// Waits until every tier checkpoint of `name` (`name`, `name~coarse`) has
/// nothing after it.
async fn wait_caught_up(store: &Store, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let coarse = format!("{name}~coarse");
    loop {
        let states = store
            .projections()
            .projection_states()
            .await
            .expect("states");
        let mut behind = 0;
        let mut found = false;
        for s in states.iter().filter(|s| s.name == name || s.name == coarse) {
            found = true;
            behind += store
                .projections()
                .events_after(s.cursor)
                .await
                .expect("lag");
        }
        if found && behind == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} did not catch up in 60s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------- property ---

type Raw = (usize, i64, u32, [u8; 8], Option<f64>);

fn raw_events() -> impl Strategy<Value = Vec<Raw>> {
    prop::collection::vec(
        (
            0usize..10,
            -7200i64..7200,
            any::<u32>(),
            any::<[u8; 8]>(),
            prop_oneof![
                2 => Just(None),
                1 => Just(Some(0.0)),
                8 => (0.0f64..5000.0).prop_map(Some),
            ],
        ),
        1..160,
    )
}

/// How a property case folds: batch limits, and per projector whether its
/// coarse tier keeps its rows pending between steps (committed only on an
/// idle step or at its row budget), and after which rounds a projector is
/// dropped and opened again (a crash: its pending rows are lost).
struct Cadence<'a> {
    limits: &'a [i64],
    pending: &'a [bool],
    crashes: &'a [bool],
}

fn run_case(
    backend: Backend,
    raw: &[Raw],
    chunks: &[usize],
    dups: &[usize],
    cadence: Cadence<'_>,
) -> Result<(), TestCaseError> {
    let Cadence {
        limits,
        pending,
        crashes,
    } = cadence;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = support::store(backend).await;
        let store = s.store.clone();
        let specs: Vec<Spec> = shipped().into_iter().chain(tz_specs()).collect();
        let open = |i: usize| {
            let store = store.clone();
            let spec = specs[i].clone();
            let every = if pending[i % pending.len()] {
                Duration::from_secs(3600)
            } else {
                Duration::ZERO
            };
            async move { projector(&store, &spec).await.with_coarse_every(every) }
        };
        let mut projectors = Vec::new();
        for i in 0..specs.len() {
            projectors.push(open(i).await);
        }
        let events: Vec<Event> = raw
            .iter()
            .enumerate()
            .map(|(i, &(a, o, us, pick, lat))| event(format!("p-{i}"), a, o, us, pick, lat))
            .collect();
        // Deliver in random chunk sizes; after each chunk, re-deliver a few
        // earlier events (duplicates) and let every projector fold one batch of
        // a random size, so later chunks carry late events into folded buckets.
        let mut start = 0;
        let mut round = 0;
        while start < events.len() {
            let size = chunks[round % chunks.len()].min(events.len() - start);
            let mut delivery: Vec<Event> = events[start..start + size].to_vec();
            if start > 0 {
                delivery.push(events[dups[round % dups.len()] % start].clone());
            }
            oracle::append_all(&store, &delivery, delivery.len()).await;
            for p in &mut projectors {
                p.step(limits[round % limits.len()]).await.expect("step");
            }
            if crashes[round % crashes.len()] {
                let i = round % projectors.len();
                projectors[i] = open(i).await;
            }
            start += size;
            round += 1;
        }
        for p in &mut projectors {
            fold_all(p, &store, limits[0]).await;
        }
        for spec in &specs {
            assert_matches_oracle(&store, spec, &events).await;
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, max_shrink_iters: 20, ..ProptestConfig::default() })]

    #[test]
    fn aggregates_equal_the_oracle_postgres(
        raw in raw_events(),
        chunks in prop::collection::vec(1usize..40, 1..6),
        limits in prop::collection::vec(1i64..60, 1..6),
        dups in prop::collection::vec(any::<usize>(), 1..6),
        pending in prop::collection::vec(any::<bool>(), 1..5),
        crashes in prop::collection::vec(any::<bool>(), 1..6),
    ) {
        run_case(Backend::Postgres, &raw, &chunks, &dups, Cadence { limits: &limits, pending: &pending, crashes: &crashes })?;
    }

    #[test]
    fn aggregates_equal_the_oracle_sqlite(
        raw in raw_events(),
        chunks in prop::collection::vec(1usize..40, 1..6),
        limits in prop::collection::vec(1i64..60, 1..6),
        dups in prop::collection::vec(any::<usize>(), 1..6),
        pending in prop::collection::vec(any::<bool>(), 1..5),
        crashes in prop::collection::vec(any::<bool>(), 1..6),
    ) {
        run_case(Backend::Sqlite, &raw, &chunks, &dups, Cadence { limits: &limits, pending: &pending, crashes: &crashes })?;
    }
}

// ------------------------------------------------------- slow committer ---

/// A PostgreSQL cluster of the test's own with a migrated store on database
/// `db`: a transaction the test leaves open holds back xmin cluster-wide,
/// which would stall (never corrupt) the other tests' projectors.
async fn own_cluster(
    db: &str,
) -> (
    tally_cli::dev::devserver::TempPostgres,
    String,
    tally::store::Store,
) {
    let pg = tally_cli::dev::devserver::TempPostgres::start(false).expect("own PostgreSQL");
    let url = pg.create_database(db).expect("database");
    let store = tally::store::connect(&url, &Default::default())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    (pg, url, store)
}

/// PostgreSQL: a transaction of this process that writes aggregates only (a
/// restatement of `by_api`, held open here) does not hold back the log's
/// horizon: events appended while it runs are folded into `by_key` at once,
/// and exactly. Before, the fold waited for it like for any open transaction
/// (a transaction that may append still holds it back:
/// `slow_committer_is_folded_exactly_once`). Fails if the fold waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_restatement_of_this_process_does_not_hold_the_fold_back() {
    let (_pg, _url, store) = own_cluster("derived").await;
    let by_api = spec("by_api");
    let by_key = spec("by_key");
    let mut p = projector(&store, &by_key).await;
    let _ = projector(&store, &by_api).await;
    let before = seeded_events("derived-a", 50, 3);
    append_all(&store, &before, 50).await;
    fold_all(&mut p, &store, 100).await;
    let tier = by_api.tiers().into_iter().next().expect("a tier");
    let restating = store
        .projections()
        .begin_restatement(&tier.state, &tier.spec.hash())
        .await
        .expect("begin")
        .expect("by_api's checkpoint");
    let during = seeded_events("derived-b", 40, 4);
    append_all(&store, &during, 40).await;
    // One step finds them: no transaction but the restatement is open.
    let step = p.step(100).await.expect("step");
    assert_eq!(
        (step.folded, step.held_back),
        (40, false),
        "the fold waited for this process's own restatement"
    );
    restating.abandon().await.expect("abandon");
    let all: Vec<Event> = before.iter().chain(&during).cloned().collect();
    fold_all(&mut p, &store, 100).await;
    assert_matches_oracle(&store, &by_key, &all).await;
}

/// Transaction A inserts first (smaller seq) and stays open while B inserts and
/// commits and the projector runs; then A commits. A `seq > last` cursor would
/// skip A forever; the (tx, seq) cursor below xmin folds it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_committer_is_folded_exactly_once() {
    let (_pg, url, store) = own_cluster("slow").await;
    let spec = spec("by_key");
    let mut p = projector(&store, &spec).await;
    let raw = sqlx::PgPool::connect(&url).await.expect("raw pool");

    let a = seeded_events("slow-a", 3, 1);
    let b = seeded_events("slow-b", 5, 2);
    let mut tx_a = raw.begin().await.expect("begin A");
    for e in &a {
        sqlx::query(
            "INSERT INTO usage_events (id, ts, api, key, model, success, error_type, latency_ms, cost_nanos) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&e.id)
        .bind(e.ts)
        .bind(&e.api)
        .bind(&e.key)
        .bind(&e.model)
        .bind(e.success)
        .bind(e.error_type.map(|t| t.as_str()))
        .bind(e.latency_ms)
        .bind(e.cost_nanos)
        .execute(&mut *tx_a)
        .await
        .expect("insert A");
    }
    let before_b = Utc::now();
    append_all(&store, &b, 100).await;
    // What is foldable while A is open (`catch_up` would wait for A).
    while !p.step(100).await.expect("fold while A is open").caught_up {}

    // A's rows sort first by seq yet are not committed; B's are. Nothing may be
    // folded past A: not B (it would move the cursor beyond A's tx), not A.
    let (a_seq, b_seq): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT max(seq) FROM usage_events WHERE id LIKE 'slow-a%'), \
                (SELECT min(seq) FROM usage_events WHERE id LIKE 'slow-b%')",
    )
    .fetch_one(&mut *tx_a)
    .await
    .expect("seqs");
    assert!(
        a_seq < b_seq,
        "A must hold the smaller seq for this test to mean anything"
    );
    let folded: i64 = store
        .projections()
        .read_agg(&spec, Granularity::Day, "")
        .await
        .expect("read")
        .iter()
        .map(|r| r.measures.requests)
        .sum();
    assert_eq!(folded, 0, "B was folded past the still-open A");
    let state = store
        .projections()
        .projection_states()
        .await
        .expect("states");
    let as_of = state
        .iter()
        .find(|s| s.name == "by_key")
        .and_then(|s| s.as_of);
    assert!(
        as_of.is_none_or(|t| t < before_b),
        "as_of {as_of:?} claims B (committed after {before_b}) is folded"
    );

    tx_a.commit().await.expect("commit A");
    fold_all(&mut p, &store, 100).await;
    p.catch_up(100).await.expect("fold again: idempotent");
    let all: Vec<Event> = b.iter().chain(a.iter()).cloned().collect();
    // A was inserted with only some columns; the oracle must see the same rows.
    let stored: Vec<Event> = {
        let mut v = Vec::new();
        for e in &all {
            v.push(
                store
                    .log()
                    .get_event(&e.id)
                    .await
                    .expect("get")
                    .expect("stored"),
            );
        }
        v
    };
    assert_matches_oracle(&store, &spec, &stored).await;
}

/// `tally copy` folds and then verifies: a transaction left open anywhere on
/// the cluster (another database here) holds back committed events, and
/// `catch_up` must wait for them rather than return with them unfolded
/// (the verification then failed in CI under the suite's load).
#[tokio::test]
async fn catch_up_waits_for_events_held_back_by_another_transaction() {
    let (pg, _url, store) = own_cluster("held").await;
    let other = pg.create_database("other").expect("other database");
    let spec = spec("by_key");
    let mut p = projector(&store, &spec).await;
    let raw = sqlx::PgPool::connect(&other).await.expect("raw pool");
    let mut open = raw.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .expect("take a transaction id");
    let events = seeded_events("held", 50, 3);
    append_all(&store, &events, 10).await;
    let ends = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        open.commit().await.expect("commit");
    });
    let folded = p.catch_up(100).await.expect("catch up");
    ends.await.expect("commit task");
    assert_eq!(folded, events.len() as u64, "events left unfolded");
    assert_matches_oracle(&store, &spec, &events).await;
}

// ------------------------------------------------------------- as_of ------

async fn as_of_covers_every_committed_event(s: &TestStore) {
    let spec = spec("by_user");
    let mut p = projector(&s.store, &spec).await;
    append_all(&s.store, &seeded_events("asof", 50, 3), 50).await;
    let committed = Utc::now();
    fold_all(&mut p, &s.store, 1000).await;
    // as_of needs a read whose snapshot has no transaction older than the commit.
    tokio::time::sleep(Duration::from_millis(600)).await;
    p.catch_up(1000).await.expect("idle step");
    let states = s
        .store
        .projections()
        .projection_states()
        .await
        .expect("states");
    let state = states.iter().find(|s| s.name == "by_user").expect("state");
    let as_of = state.as_of.expect("as_of set once caught up");
    assert!(
        as_of >= committed,
        "as_of {as_of} is older than a commit at {committed} that is folded"
    );
    assert_eq!(state.events_folded, 50);
}

// ------------------------------------------------------ spec change -------

async fn changed_spec_refuses_to_start_until_rebuilt(s: &TestStore) {
    let v1 = spec("by_key");
    let mut p = projector(&s.store, &v1).await;
    let events = seeded_events("chg", 400, 4);
    append_all(&s.store, &events, 100).await;
    fold_all(&mut p, &s.store, 150).await;

    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("by_key.toml"),
        "name = \"by_key\"\ndimensions = [\"api\", \"key\", \"model\", \"user\"]\ngranularities = [\"hour\", \"day\", \"month\"]\ntimezone = \"Europe/Berlin\"\n",
    )
    .expect("write spec");
    let err = match tally::app::open_projectors(&s.store, Some(dir.path())).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a changed spec must refuse to start"),
    };
    assert!(
        err.contains("by_key") && err.contains("tally projections rebuild by_key"),
        "{err}"
    );

    let v2 = tally::aggregate::spec::load_dir(dir.path())
        .expect("v2")
        .remove(0);
    let report = rebuild(s.store.clone(), Arc::new(v2.clone()), 77, "test", |_, _| {})
        .await
        .expect("rebuild");
    assert!(report.events <= 400, "{report:?}");
    let mut opened = tally::app::open_projectors(&s.store, Some(dir.path()))
        .await
        .expect("starts after rebuild");
    assert_eq!(opened.len(), 1);
    let p2 = opened[0].projector.as_mut().expect("opened");
    fold_all(p2, &s.store, 100).await;
    assert_matches_oracle(&s.store, &v2, &events).await;
    // The old projector's spec no longer matches: it must stop, not write v1 rows into v2 tables.
    append_all(&s.store, &seeded_events("chg2", 10, 5), 10).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match p.step(100).await {
            Err(ProjectionError::SpecChanged { .. }) => break,
            // Nothing foldable yet (another test's transaction holds back xmin).
            Ok(step) if step.folded == 0 && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("stale projector kept going: {other:?}"),
        }
    }
}

// ------------------------------------------------ rebuild during ingest ---

async fn rebuild_during_live_ingest_never_shows_an_empty_table(s: &TestStore) {
    let store = s.store.clone();
    let spec = Arc::new(spec("by_api"));
    let mut all = seeded_events("rb0", 1500, 6);
    append_all(&store, &all, 500).await;
    let mut live = projector(&store, &spec).await;
    fold_all(&mut live, &store, 500).await;

    let stop = CancellationToken::new();
    let config = ProjectorConfig {
        batch_size: 200,
        poll_interval: Duration::from_millis(10),
        ..ProjectorConfig::default()
    };
    let live_task = tokio::spawn(live.run(config, "live".into(), stop.clone()));
    let ingest = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for round in 0..30 {
                let batch = seeded_events(&format!("rb{}", round + 1), 60, 100 + round);
                append_all(&store, &batch, 60).await;
                sent.extend(batch);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            sent
        })
    };
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (store, spec, reading) = (store.clone(), spec.clone(), reading.clone());
        tokio::spawn(async move {
            let (mut reads, mut last) = (0u64, 0i64);
            while reading.load(Ordering::Relaxed) {
                let rows = store
                    .projections()
                    .read_agg(&spec, Granularity::Hour, "")
                    .await
                    .expect("read during rebuild");
                let total: i64 = rows.iter().map(|r| r.measures.requests).sum();
                assert!(
                    total >= 1500,
                    "a query saw {total} requests (empty or partial table)"
                );
                assert!(total >= last, "totals stepped back from {last} to {total}");
                last = total;
                reads += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        })
    };
    let report = rebuild(store.clone(), spec.clone(), 250, "rebuilder", |_, _| {})
        .await
        .expect("rebuild");
    assert!(report.events >= 1500);
    all.extend(ingest.await.expect("ingest task"));
    wait_caught_up(&store, "by_api").await;
    reading.store(false, Ordering::Relaxed);
    let reads = reader.await.expect("reader saw only full tables");
    assert!(reads > 10, "the reader ran only {reads} times");
    stop.cancel();
    live_task.await.expect("live projector");
    assert_matches_oracle(&store, &spec, &all).await;
    let states = store
        .projections()
        .projection_states()
        .await
        .expect("states");
    assert!(
        states.iter().all(|s| !s.name.ends_with("~rebuild")),
        "the shadow checkpoint was left behind"
    );
}

// ------------------------------------------------------- large applies ----

/// More rows in one apply than one upsert statement carries: every chunk is
/// written, and the second fold merges latency sketches into rows that
/// earlier chunks created.
async fn an_apply_larger_than_one_statement_writes_every_chunk(s: &TestStore) {
    let spec = Spec::parse(
        "name = \"wide\"\ndimensions = [\"key\"]\ngranularities = [\"hour\", \"day\"]\ntimezone = \"UTC\"\n",
        None,
    )
    .expect("spec");
    let keys = 3 * tally::store::UPSERT_CHUNK + 17;
    let with_keys = |prefix: &str, seed: u64| {
        let mut events = seeded_events(prefix, keys, seed);
        for (i, e) in events.iter_mut().enumerate() {
            e.key = Some(format!("k{i}"));
        }
        events
    };
    let mut all = with_keys("wide-a", 21);
    append_all(&s.store, &all, 5000).await;
    let mut p = projector(&s.store, &spec).await;
    let step = p.step(1_000_000).await.expect("step");
    // A transaction open elsewhere in the cluster may hold events back
    // (see `fold_all`); a step that folded them all wrote several chunks.
    assert!(
        step.folded < keys || step.rows > 2 * tally::store::UPSERT_CHUNK,
        "{} events folded into {} rows",
        step.folded,
        step.rows
    );
    fold_all(&mut p, &s.store, 1_000_000).await;
    let again = with_keys("wide-b", 22);
    append_all(&s.store, &again, 5000).await;
    all.extend(again);
    fold_all(&mut p, &s.store, 1_000_000).await;
    assert_matches_oracle(&s.store, &spec, &all).await;
}

// ---------------------------------------------------------- giving way ----

/// A fold holding a checkpoint lock a restatement of this process waits for
/// rolls back instead of finishing its upserts, but only once between two
/// of its commits: restatements one after another cannot starve it.
async fn a_fold_gives_way_to_a_waiting_restatement_once_between_commits(s: &TestStore) {
    let spec = spec("by_key");
    let signal = Arc::new(tally::projection::projector::FoldSignal::default());
    let mut all = seeded_events("gw-a", 500, 31);
    append_all(&s.store, &all, 500).await;
    let mut p = projector(&s.store, &spec).await.with_signal(signal.clone());
    let before = p.cursor();

    // Each step below waits for the restatement (at most 2 s) after giving way.
    let waiting = signal.restating("by_key");
    let gave_way = step_with_work(&mut p).await;
    assert!(gave_way.stale && gave_way.folded == 0, "{gave_way:?}");
    assert_eq!(
        checkpoint(&s.store, "by_key").await,
        before,
        "nothing committed"
    );

    // Still asked, but it has not committed since it gave way: it commits.
    let committed = step_with_work(&mut p).await;
    assert!(!committed.stale && committed.folded > 0, "{committed:?}");
    assert!(checkpoint(&s.store, "by_key").await > before);

    // Having committed, it gives way again.
    let more = seeded_events("gw-b", 200, 32);
    append_all(&s.store, &more, 200).await;
    all.extend(more);
    let gave_way = step_with_work(&mut p).await;
    assert!(gave_way.stale && gave_way.folded == 0, "{gave_way:?}");
    drop(waiting);
    fold_all(&mut p, &s.store, 1_000_000).await;
    assert_matches_oracle(&s.store, &spec, &all).await;
}

/// Steps until a step had something to apply (on PostgreSQL a transaction
/// open elsewhere in the cluster may hold the events back for a while).
async fn step_with_work(
    p: &mut tally::projection::Projector,
) -> tally::projection::projector::Step {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let step = p.step(1_000_000).await.expect("step");
        if step.stale || step.folded > 0 {
            return step;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing to fold in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn checkpoint(store: &Store, name: &str) -> Cursor {
    store
        .projections()
        .projection_states()
        .await
        .expect("states")
        .into_iter()
        .find(|st| st.name == name)
        .map(|st| st.cursor)
        .expect("checkpoint")
}

// ------------------------------------------------------------ backfill ----

async fn new_projection_backfills_a_100k_log_while_ingest_continues(s: &TestStore) {
    let store = s.store.clone();
    let mut all = seeded_events("bf", 100_000, 7);
    append_all(&store, &all, 5000).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("late_added.toml"),
        "name = \"late_added\"\ndimensions = [\"model\", \"api\"]\ngranularities = [\"day\", \"month\"]\ntimezone = \"America/New_York\"\n",
    )
    .expect("write spec");
    let mut config = support::server_config();
    config.projections.projections_dir = Some(dir.path().to_path_buf());
    let server = support::TestServer::start(store.clone(), config).await;
    for round in 0..10 {
        let batch = seeded_events(&format!("bf-live{round}"), 200, 200 + round);
        append_all(&store, &batch, 200).await;
        all.extend(batch);
    }
    wait_caught_up(&store, "late_added").await;
    let spec = tally::aggregate::spec::load_dir(dir.path())
        .expect("spec")
        .remove(0);
    assert_matches_oracle(&store, &spec, &all).await;
    drop(server);
}

// ---------------------------------------------------------------- tiers ---

/// Sum of `requests` over one table.
async fn requests_in(store: &Store, spec: &Spec, g: Granularity) -> i64 {
    store
        .projections()
        .read_agg(spec, g, "")
        .await
        .expect("read")
        .iter()
        .map(|r| r.measures.requests)
        .sum()
}

/// The hour table commits with every batch under its own checkpoint while
/// the day and month tables' rows wait in memory (their checkpoint does not
/// move); a process that dies with rows waiting loses nothing and counts
/// nothing twice: the next one reads them again from the coarse checkpoint.
async fn the_coarse_tier_waits_under_its_own_checkpoint_and_a_crash_loses_nothing(s: &TestStore) {
    let store = &s.store;
    let spec = spec("by_key");
    let events = seeded_events("tier", 300, 5);
    append_all(store, &events, 100).await;
    let mut p = projector(store, &spec)
        .await
        .with_coarse_every(Duration::from_secs(3600));
    for n in 1..=2 {
        // Batches smaller than the log: never idle, so the coarse rows wait.
        let step = p.step(100).await.expect("step");
        assert_eq!(step.folded, 100);
        assert_eq!(requests_in(store, &spec, Granularity::Hour).await, 100 * n);
        assert_eq!(requests_in(store, &spec, Granularity::Day).await, 0);
        assert_eq!(requests_in(store, &spec, Granularity::Month).await, 0);
    }
    let states = store
        .projections()
        .projection_states()
        .await
        .expect("states");
    let cursor = |name: &str| states.iter().find(|s| s.name == name).map(|s| s.cursor);
    assert!(cursor("by_key").expect("fine checkpoint") > Cursor::default());
    assert_eq!(
        cursor("by_key~coarse"),
        Some(Cursor::default()),
        "the coarse checkpoint moved without its rows"
    );
    // The process dies with 200 events' day and month rows in memory.
    drop(p);
    let mut p = projector(store, &spec).await;
    fold_all(&mut p, store, 1000).await;
    assert_matches_oracle(store, &spec, &events).await;
}

/// Caught up, the projector does not commit the coarse tier's rows at its
/// first step that finds nothing new (under a steady load it catches up
/// between batches, and committing then rewrote every active group's day
/// and month rows about once a second), but once it has found nothing for
/// [`tally::projection::projector::COARSE_IDLE_GRACE`].
async fn the_coarse_tier_commits_once_the_projector_stays_idle(s: &TestStore) {
    let store = &s.store;
    let spec = spec("by_key");
    let events = seeded_events("idle", 300, 6);
    append_all(store, &events, 100).await;
    let mut p = projector(store, &spec)
        .await
        .with_coarse_every(Duration::from_secs(3600));
    let mut folded = 0;
    while folded < 300 {
        folded += p.step(1000).await.expect("step").folded;
    }
    // Idle for half the grace (250 ms), stepping as the projector does (a
    // commit started by one step lands by a later one).
    let idle_from = std::time::Instant::now();
    while idle_from.elapsed() < Duration::from_millis(250) {
        assert_eq!(p.step(1000).await.expect("idle step").folded, 0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(requests_in(store, &spec, Granularity::Hour).await, 300);
    assert_eq!(
        requests_in(store, &spec, Granularity::Day).await,
        0,
        "the coarse rows committed at the first idle step"
    );
    tokio::time::sleep(tally::projection::projector::COARSE_IDLE_GRACE).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while requests_in(store, &spec, Granularity::Day).await != 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "the coarse rows never committed while idle"
        );
        p.step(1000).await.expect("step");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_matches_oracle(store, &spec, &events).await;
}

/// A checkpoint written before tiers (one row with the whole spec's hash,
/// every table committed with it) is split when a tiered projector opens it:
/// both tiers start at its cursor, nothing is folded again, and a fold by an
/// older binary still running is refused from then on.
async fn a_checkpoint_from_before_tiers_is_split_without_folding_again(s: &TestStore) {
    use tally::projection::fold::Fold;
    use tally::store::{Apply, ApplyOutcome};
    let store = &s.store;
    let spec = spec("by_api");
    let events = seeded_events("legacy", 200, 9);
    append_all(store, &events[..120], 60).await;
    let catalog = store.prices().catalog().await.expect("catalog");
    let row = store
        .projections()
        .ensure_projection(&spec, &spec.name, "")
        .await
        .expect("checkpoint of the whole spec");
    // What an older binary commits: every table under one checkpoint.
    let old_fold = |after: Cursor| {
        let store = store.clone();
        let spec = spec.clone();
        let catalog = catalog.clone();
        async move {
            let batch = store
                .projections()
                .read_log(after, 1000)
                .await
                .expect("read");
            let mut fold = Fold::new(&spec);
            for (_, e) in &batch.events {
                fold.add(e, catalog.charge(e));
            }
            let to = batch.events.last().map(|(c, _)| *c).unwrap_or(after);
            (fold.finish(), to)
        }
    };
    let (delta, legacy_cursor) = old_fold(Cursor::default()).await;
    let legacy = |from: Cursor, to: Cursor, generation: i64, delta| Apply {
        state: "by_api",
        spec: &spec,
        suffix: "",
        from,
        generation,
        to,
        as_of: None,
        delta,
        before_commit: None,
        give_way: None,
        newest: &[],
        after_commit: None,
        known: None,
    };
    let applied = store
        .projections()
        .apply_fold(&[legacy(
            Cursor::default(),
            legacy_cursor,
            row.generation,
            &delta,
        )])
        .await
        .expect("old commit");
    assert_eq!(applied, ApplyOutcome::Applied);

    let mut p = projector(store, &spec).await;
    let states = store
        .projections()
        .projection_states()
        .await
        .expect("states");
    for t in spec.tiers() {
        let s = states.iter().find(|s| s.name == t.state).expect("tier row");
        assert_eq!(s.cursor, legacy_cursor, "{}", t.state);
        assert_eq!(s.spec_hash, t.spec.hash(), "{}", t.state);
    }
    append_all(store, &events[120..], 40).await;
    // The older binary's next fold: refused, writing nothing.
    let (delta, to) = old_fold(legacy_cursor).await;
    let generation = states
        .iter()
        .find(|s| s.name == "by_api")
        .map(|s| s.generation)
        .expect("row");
    for g in [row.generation, generation] {
        let outcome = store
            .projections()
            .apply_fold(&[legacy(legacy_cursor, to, g, &delta)])
            .await
            .expect("old commit");
        assert_eq!(outcome, ApplyOutcome::Stale);
    }
    fold_all(&mut p, store, 1000).await;
    assert_matches_oracle(store, &spec, &events).await;
}

/// Sets the stored sketch of every row of `table` to one latency of
/// `ms`, as a writer that does not go through the checkpoint would.
async fn overwrite_sketches(s: &TestStore, table: &str, ms: f64) {
    let mut sketch = tally::aggregate::sketch::Sketch::default();
    sketch.add(ms);
    let hex: String = sketch.encode().iter().map(|b| format!("{b:02x}")).collect();
    let literal = match s.store.backend() {
        Backend::Postgres => format!("decode('{hex}', 'hex')"),
        Backend::Sqlite => format!("X'{hex}'"),
    };
    s.exec(&format!("UPDATE {table} SET latency_sketch = {literal}"))
        .await;
}

/// The one row of `spec`'s minute table: its requests and its sketch.
async fn the_minute_row(s: &TestStore, spec: &Spec) -> (i64, tally::aggregate::sketch::Sketch) {
    let rows = s
        .store
        .projections()
        .read_agg(spec, Granularity::Minute, "")
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    (rows[0].measures.requests, rows[0].measures.sketch.clone())
}

fn sketch_of(ms: &[f64]) -> tally::aggregate::sketch::Sketch {
    let mut s = tally::aggregate::sketch::Sketch::default();
    for &m in ms {
        s.add(m);
    }
    s
}

fn latency_event(id: &str, ts: chrono::DateTime<Utc>, ms: f64) -> Event {
    let mut e = support::full_event(id, ts);
    e.latency_ms = Some(ms);
    e
}

/// A fine tier upserts the rows its own commits wrote without reading their
/// sketches again (it knows them), and forgets what it knew as soon as
/// another writer moves the checkpoint's generation, as a restatement does:
/// the sketch that writer stored is then read and merged.
async fn known_sketches_are_used_until_another_writer_moves_the_generation(s: &TestStore) {
    let spec = Spec::parse(
        "name = \"kn\"\ndimensions = [\"key\"]\ngranularities = [\"minute\"]\ntimezone = \"UTC\"\n",
        None,
    )
    .expect("spec");
    let minute =
        tally::aggregate::bucket::bucket_start(Utc::now(), Granularity::Minute, spec.timezone)
            - chrono::Duration::minutes(1);
    let at = |s: i64| minute + chrono::Duration::seconds(s);
    let mut p = projector(&s.store, &spec).await;
    append_all(&s.store, &[latency_event("k1", at(1), 100.0)], 1).await;
    fold_all(&mut p, &s.store, 100).await;
    // A write that bypasses the checkpoint is not seen: the fold knows what
    // it stored.
    overwrite_sketches(s, "agg_kn_minute", 7.0).await;
    append_all(&s.store, &[latency_event("k2", at(2), 200.0)], 1).await;
    fold_all(&mut p, &s.store, 100).await;
    assert_eq!(
        the_minute_row(s, &spec).await,
        (2, sketch_of(&[100.0, 200.0])),
        "the second commit merged with the sketch its fold wrote, not the one read"
    );
    // The same write under a new generation (what a restatement commits)
    // makes the fold read the checkpoint again and forget what it knew.
    overwrite_sketches(s, "agg_kn_minute", 7.0).await;
    s.exec("UPDATE projection_checkpoints SET generation = generation + 1 WHERE name = 'kn'")
        .await;
    append_all(&s.store, &[latency_event("k3", at(3), 300.0)], 1).await;
    fold_all(&mut p, &s.store, 100).await;
    assert_eq!(
        the_minute_row(s, &spec).await,
        (3, sketch_of(&[7.0, 300.0])),
        "after a new generation the stored sketch is read again"
    );
}

/// A row the retention job may delete is never upserted from a known
/// sketch: after the job deleted it, the next event's row starts anew
/// rather than carrying the deleted row's latencies.
async fn known_sketches_skip_rows_retention_may_delete(s: &TestStore) {
    let spec = Spec::parse(
        "name = \"kr\"\ndimensions = [\"key\"]\ngranularities = [\"minute\"]\ntimezone = \"UTC\"\nretention = { minute = \"2m\" }\n",
        None,
    )
    .expect("spec");
    let minute =
        tally::aggregate::bucket::bucket_start(Utc::now(), Granularity::Minute, spec.timezone)
            - chrono::Duration::minutes(4);
    let at = |s: i64| minute + chrono::Duration::seconds(s);
    let mut p = projector(&s.store, &spec).await;
    append_all(&s.store, &[latency_event("r1", at(1), 100.0)], 1).await;
    fold_all(&mut p, &s.store, 100).await;
    assert_eq!(the_minute_row(s, &spec).await, (1, sketch_of(&[100.0])));
    let deleted = s
        .store
        .projections()
        .delete_agg_before(
            &spec,
            Granularity::Minute,
            Utc::now() - chrono::Duration::minutes(2),
            100,
        )
        .await
        .expect("retention");
    assert_eq!(deleted, 1);
    append_all(&s.store, &[latency_event("r2", at(2), 200.0)], 1).await;
    fold_all(&mut p, &s.store, 100).await;
    assert_eq!(
        the_minute_row(s, &spec).await,
        (1, sketch_of(&[200.0])),
        "the row retention deleted came back with its old latencies"
    );
}

/// The log's tail (`store::LogTail`) holds only what an append committed:
/// an append that rolls back after inserting its events leaves nothing, so
/// the events another writer commits next (on SQLite at the very positions
/// the rolled-back ones had) are folded as they are in the log.
async fn a_rolled_back_append_leaves_nothing_in_the_log_tail(s: &TestStore) {
    let spec = spec("by_api");
    s.store.log_tail().keep(1 << 20);
    let mut p = projector(&s.store, &spec).await;
    // A projector reads: from now on the tail keeps this store's appends.
    fold_all(&mut p, &s.store, 100).await;
    // The append's last statement (its rejected item) fails after its events went in.
    match s.store.backend() {
        Backend::Sqlite => {
            s.exec("CREATE TRIGGER refuse BEFORE INSERT ON rejected_events BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
                .await
        }
        Backend::Postgres => {
            s.exec("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
                .await;
            s.exec("CREATE TRIGGER refuse BEFORE INSERT ON rejected_events FOR EACH ROW EXECUTE FUNCTION refuse()")
                .await
        }
    }
    let rolled_back: Vec<Event> = seeded_events("rolled-back", 20, 7)
        .into_iter()
        .map(|mut e| {
            e.api = "rolled-back".into();
            e
        })
        .collect();
    let reject = tally::store::Rejected {
        kind: tally::store::RejectKind::Invalid,
        event_id: None,
        item_index: Some(20),
        reason: "bad".into(),
        content_type: None,
        payload: b"{}".to_vec(),
        subject: None,
    };
    s.store
        .log()
        .append(&rolled_back, &[reject], &oracle::origin())
        .await
        .expect_err("the trigger fails the append");
    s.exec(match s.store.backend() {
        Backend::Sqlite => "DROP TRIGGER refuse",
        Backend::Postgres => "DROP TRIGGER refuse ON rejected_events",
    })
    .await;
    // Another writer, without this tail, appends next.
    let other = support::open(&s.url).await;
    let committed = seeded_events("committed", 20, 8);
    append_all(&other, &committed, 20).await;
    fold_all(&mut p, &s.store, 100).await;
    assert_matches_oracle(&s.store, &spec, &committed).await;
}

/// With the tail on, a fold whose events come partly from the tail and
/// partly from the log (appended by another writer, or dropped for the
/// tail's budget) equals the fold of the log.
async fn the_log_tail_and_the_log_fold_the_same(s: &TestStore) {
    let spec = spec("by_key");
    // Room for about 40 events: most of a 50-event chunk overflows.
    s.store.log_tail().keep(40 * 400);
    let other = support::open(&s.url).await;
    let mut p = projector(&s.store, &spec).await;
    fold_all(&mut p, &s.store, 100).await;
    let events = seeded_events("tail", 600, 11);
    for (i, chunk) in events.chunks(30).enumerate() {
        let writer = if i % 3 == 2 { &other } else { &s.store };
        append_all(writer, chunk, 30).await;
        if i % 4 == 3 {
            p.catch_up(45).await.expect("catch up");
        }
    }
    fold_all(&mut p, &s.store, 70).await;
    assert_matches_oracle(&s.store, &spec, &events).await;
    let stats = s.store.log_tail().stats();
    assert!(stats.hits > 100, "the tail was used: {stats:?}");
    assert!(stats.misses > 100, "the log was read too: {stats:?}");
}

both_backends!(
    a_rolled_back_append_leaves_nothing_in_the_log_tail,
    the_log_tail_and_the_log_fold_the_same,
    known_sketches_are_used_until_another_writer_moves_the_generation,
    known_sketches_skip_rows_retention_may_delete,
    a_fold_gives_way_to_a_waiting_restatement_once_between_commits,
    the_coarse_tier_waits_under_its_own_checkpoint_and_a_crash_loses_nothing,
    the_coarse_tier_commits_once_the_projector_stays_idle,
    a_checkpoint_from_before_tiers_is_split_without_folding_again,
    an_apply_larger_than_one_statement_writes_every_chunk,
    an_ingested_event_wakes_a_sleeping_projector,
    as_of_covers_every_committed_event,
    changed_spec_refuses_to_start_until_rebuilt,
    rebuild_during_live_ingest_never_shows_an_empty_table,
    new_projection_backfills_a_100k_log_while_ingest_continues,
);

/// With a one-minute poll, an event ingested over HTTP still reaches the
/// hourly table within seconds (the intake's commit wakes the projector),
/// and the daily table too (its rows wait for the idle grace, not the poll).
async fn an_ingested_event_wakes_a_sleeping_projector(s: &TestStore) {
    let mut config = support::server_config();
    config.projections.projector_poll = Duration::from_secs(60);
    let srv = support::TestServer::start(s.store.clone(), config).await;
    let by_key = spec("by_key");
    let total = |store: Store, spec: Spec, g: Granularity| async move {
        store
            .projections()
            .read_agg(&spec, g, "")
            .await
            .expect("read")
            .iter()
            .map(|r| r.measures.requests)
            .sum::<i64>()
    };
    // The second event arrives while the projector sleeps after folding the
    // first (the first may still be folded by its start-up step). The day
    // table's rows (the coarse tier) wait for the idle grace, not the poll.
    for n in 1..=2i64 {
        let (status, body) = srv
            .post_json(&serde_json::json!([support::wire(&format!("wake-{n}"))]))
            .await;
        assert_eq!(status, 200, "{body}");
        let posted = std::time::Instant::now();
        for g in [Granularity::Hour, Granularity::Day] {
            while total(s.store.clone(), by_key.clone(), g).await < n {
                assert!(
                    posted.elapsed() < Duration::from_secs(15),
                    "event {n} not in the {g:?} table 15 s after its commit (poll is 60 s)"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// PostgreSQL: an event committed while an older transaction is still open is
/// not folded yet (the cursor's safety), and is folded within a second once
/// that transaction ends — even though no new append wakes the projector and
/// its poll is a minute.
#[tokio::test]
async fn an_event_held_back_by_an_open_transaction_is_folded_soon_after_it_ends() {
    let (url, _dir) = support::database(Backend::Postgres, "heldback");
    let store = support::open(&url).await;
    let mut config = support::server_config();
    config.projections.projector_poll = Duration::from_secs(60);
    let srv = support::TestServer::start(store.clone(), config).await;
    let by_key = spec("by_key");
    let total = || async {
        store
            .projections()
            .read_agg(&by_key, Granularity::Hour, "")
            .await
            .expect("read")
            .iter()
            .map(|r| r.measures.requests)
            .sum::<i64>()
    };
    // Let the projector fold its start-up step and go to sleep.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let mut older = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .await
        .expect("take a transaction id");
    let (status, body) = srv
        .post_json(&serde_json::json!([support::wire("held-1")]))
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(total().await, 0, "folded past a transaction still open");
    older.commit().await.expect("commit");
    let ended = std::time::Instant::now();
    while total().await < 1 {
        assert!(
            ended.elapsed() < Duration::from_secs(10),
            "event not folded 10 s after the older transaction ended (poll is 60 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reading from an empty log with any cursor is not an error.
#[tokio::test]
async fn empty_log_reads_nothing() {
    let s = support::store(Backend::Sqlite).await;
    let batch = s
        .store
        .projections()
        .read_log(Cursor { tx: 0, seq: 10 }, 10)
        .await
        .expect("read");
    assert!(batch.events.is_empty());
}

/// A minute table with a retention gets no rows for events past it (and its
/// day of margin): a late or backfilled event costs no minute row there,
/// while every other table counts it, through the server's fold and through a
/// rebuild alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minute_rows_past_the_retention_are_not_written() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = support::store(backend).await;
        let srv = support::TestServer::start(s.store.clone(), support::server_config()).await;
        let now = Utc::now();
        let at = |ago: chrono::Duration| (now - ago).to_rfc3339();
        let body = serde_json::json!([
            {"id": "recent", "ts": at(chrono::Duration::minutes(5)), "api": "a", "key": "k"},
            {"id": "inside", "ts": at(chrono::Duration::days(8)), "api": "a", "key": "k"},
            {"id": "past", "ts": at(chrono::Duration::days(9) + chrono::Duration::hours(1)), "api": "a", "key": "k"},
            {"id": "old", "ts": at(chrono::Duration::days(30)), "api": "a", "key": "k"},
        ]);
        let (status, answer) = srv.post_json(&body).await;
        assert_eq!(status, 200, "{answer}");
        srv.settled().await;
        let specs = oracle::shipped();
        let spec = |name: &str| specs.iter().find(|s| s.name == name).expect("spec").clone();
        let count =
            |rows: &[tally::store::AggRow]| rows.iter().map(|r| r.measures.requests).sum::<i64>();
        let minute = spec("alerts_minute");
        let rows = s
            .store
            .projections()
            .read_agg(&minute, Granularity::Minute, "")
            .await
            .expect("rows");
        assert_eq!(
            count(&rows),
            2,
            "{backend:?}: only the recent and 8-day-old events: {rows:?}"
        );
        let by_key = spec("by_key");
        let rows = s
            .store
            .projections()
            .read_agg(&by_key, Granularity::Hour, "")
            .await
            .expect("rows");
        assert_eq!(count(&rows), 4, "{backend:?}");
        // A rebuild draws the same line.
        rebuild(
            s.store.clone(),
            Arc::new(minute.clone()),
            1_000,
            "test",
            |_, _| {},
        )
        .await
        .expect("rebuild");
        let rows = s
            .store
            .projections()
            .read_agg(&minute, Granularity::Minute, "")
            .await
            .expect("rows");
        assert_eq!(count(&rows), 2, "{backend:?} after a rebuild");
    }
}
