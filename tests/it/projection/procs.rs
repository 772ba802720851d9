//! `tally serve` child processes: crashes at the projector's commit points and
//! `kill -9` during a stream, and two instances sharing one database.

use std::time::{Duration, Instant};

use tally::store::{Backend, Store};

use super::oracle::{append_all, assert_matches_oracle, lag, seeded_events, shipped};
use crate::support::proc::TallyProc;
use crate::support::{database, open};

async fn crash_points_never_lose_or_double_count(backend: Backend) {
    let (url, _dir) = database(backend, "crash");
    let store = open(&url).await;
    let env = [
        (
            "TALLY_FAILPOINTS",
            "projector.before_commit=0.06,projector.after_commit=0.06",
        ),
        ("TALLY_PROJECTOR_BATCH", "120"),
        ("TALLY_PROJECTOR_LEASE", "400ms"),
        ("TALLY_PROJECTOR_POLL", "20ms"),
    ];
    let mut tally = TallyProc::start_http(&url, &env).await;
    let events = seeded_events("crash", 5000, 11);
    let mut restarts = 0;
    for (i, chunk) in events.chunks(250).enumerate() {
        append_all(&store, chunk, chunk.len()).await;
        if i % 6 == 5 {
            // A crash at whatever point the process happens to be.
            tally.kill9();
        }
        if !tally.running() {
            restarts += 1;
            tally.launch();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if !tally.running() {
            restarts += 1;
            tally.launch();
        }
        let log = tally.log_text();
        let before = log.matches("failpoint projector.before_commit").count();
        let after = log.matches("failpoint projector.after_commit").count();
        // Enough crashes of each kind, then caught up. (Once the stream is
        // folded, the idle `as_of` commits keep hitting the failpoints.)
        if lag(&store).await == Some(0) && before >= 2 && after >= 2 && restarts >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not caught up after 180s ({restarts} restarts, {before} before-commit and {after} after-commit crashes, lag {:?})",
            lag(&store).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tally.kill9();
    assert!(
        restarts >= 5,
        "only {restarts} restarts: the test did not crash the projector often"
    );
    for spec in shipped() {
        assert_matches_oracle(&store, &spec, &events).await;
    }
    let states = store
        .projections()
        .projection_states()
        .await
        .expect("states");
    for spec in shipped() {
        let s = states.iter().find(|s| s.name == spec.name).expect("state");
        assert_eq!(s.events_folded, 5000, "{}: events folded", spec.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_points_never_lose_or_double_count_postgres() {
    crash_points_never_lose_or_double_count(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_points_never_lose_or_double_count_sqlite() {
    crash_points_never_lose_or_double_count(Backend::Sqlite).await;
}

fn lease_takers(log: &str, projection: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("projector lease taken") && l.contains(&format!("projection={projection} "))
        })
        .count()
}

async fn two_instances_fold_one_at_a_time_and_take_over(backend: Backend) {
    let (url, _dir) = database(backend, "two");
    let store = open(&url).await;
    let env = [
        ("TALLY_PROJECTOR_LEASE", "3s"),
        ("TALLY_PROJECTOR_POLL", "20ms"),
        ("TALLY_PROJECTOR_BATCH", "300"),
    ];
    let mut a = TallyProc::start_http(&url, &env).await;
    let mut b = TallyProc::start_http(&url, &env).await;
    let mut events = seeded_events("two", 3000, 12);
    append_all(&store, &events, 200).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while lag(&store).await != Some(0) {
        assert!(Instant::now() < deadline, "two instances did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each projection was taken by exactly one instance, and is held by it.
    let (log_a, log_b) = (a.log_text(), b.log_text());
    let states = store
        .projections()
        .projection_states()
        .await
        .expect("states");
    let owner_of = |pid: u32| format!("-{pid}-");
    for spec in shipped() {
        let takers = (
            lease_takers(&log_a, &spec.name),
            lease_takers(&log_b, &spec.name),
        );
        assert!(
            takers == (1, 0) || takers == (0, 1),
            "{}: lease taken by a {} and b {} times",
            spec.name,
            takers.0,
            takers.1
        );
        let leader = states
            .iter()
            .find(|s| s.name == spec.name)
            .and_then(|s| s.leader.clone())
            .expect("a leader");
        let holder = if takers.0 == 1 { a.pid() } else { b.pid() };
        assert!(
            leader.contains(&owner_of(holder)),
            "{}: leader {leader}",
            spec.name
        );
    }
    // Kill the instance leading by_key; the other takes over within the lease.
    let by_key_leader = states
        .iter()
        .find(|s| s.name == "by_key")
        .and_then(|s| s.leader.clone())
        .expect("leader");
    let (dead, alive) = if by_key_leader.contains(&owner_of(a.pid())) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let survivor = owner_of(alive.pid());
    dead.kill9();
    let more = seeded_events("two-more", 1000, 13);
    append_all(&store, &more, 100).await;
    events.extend(more);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let states = store
            .projections()
            .projection_states()
            .await
            .expect("states");
        let all_led_by_survivor = shipped().iter().all(|spec| {
            states
                .iter()
                .find(|s| s.name == spec.name)
                .and_then(|s| s.leader.as_deref())
                .is_some_and(|l| l.contains(&survivor))
        });
        if all_led_by_survivor && lag(&store).await == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the surviving instance did not take over; log:\n{}",
            alive.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for spec in shipped() {
        assert_matches_oracle(&store, &spec, &events).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_fold_one_at_a_time_and_take_over_postgres() {
    two_instances_fold_one_at_a_time_and_take_over(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_fold_one_at_a_time_and_take_over_sqlite() {
    two_instances_fold_one_at_a_time_and_take_over(Backend::Sqlite).await;
}

/// The fine and coarse checkpoints of `by_key`.
async fn by_key_tiers(store: &Store) -> Option<(tally::store::Cursor, tally::store::Cursor)> {
    let states = store.projections().projection_states().await.ok()?;
    let cursor = |name: &str| states.iter().find(|s| s.name == name).map(|s| s.cursor);
    Some((cursor("by_key")?, cursor("by_key~coarse")?))
}

/// `kill -9` of `serve` while events stream in and only the fine tier has
/// committed them (the coarse tier's interval is an hour, and a stream
/// never leaves its reads idle, so its day and month rows wait in memory):
/// the restarted process folds them again from the coarse checkpoint, and
/// every table equals the oracle. Fails if a fine commit moved the coarse
/// checkpoint (those rows would be lost) or if pending rows were written
/// outside their own compare-and-set.
async fn a_kill_with_coarse_rows_pending_loses_nothing(backend: Backend) {
    let (url, _dir) = database(backend, "pending");
    let store = open(&url).await;
    let env = [
        ("TALLY_COARSE_COMMIT_INTERVAL", "1h"),
        ("TALLY_PROJECTOR_POLL", "20ms"),
        ("TALLY_PROJECTOR_BATCH", "200"),
    ];
    let mut tally = TallyProc::start_http(&url, &env).await;
    let events = seeded_events("pending", 3000, 17);
    let mut chunks = events.chunks(15);
    let mut sent = 0;
    let mut landed = false;
    'stream: for _attempt in 0..5 {
        for chunk in chunks.by_ref() {
            append_all(&store, chunk, chunk.len()).await;
            sent += chunk.len();
            tokio::time::sleep(Duration::from_millis(5)).await;
            if sent < 600 {
                continue;
            }
            if let Some((fine, coarse)) = by_key_tiers(&store).await {
                if fine > coarse {
                    tally.kill9();
                    // What the dead process left: did it die with rows pending?
                    let (fine, coarse) = by_key_tiers(&store).await.expect("tiers");
                    if fine > coarse {
                        landed = true;
                        break 'stream;
                    }
                    tally.launch();
                }
            }
        }
    }
    assert!(
        landed,
        "never killed with the coarse tier behind the fine one"
    );
    for chunk in chunks {
        append_all(&store, chunk, chunk.len()).await;
    }
    tally.launch();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lag(&store).await != Some(0) {
        assert!(Instant::now() < deadline, "not caught up after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tally.kill9();
    for spec in shipped() {
        assert_matches_oracle(&store, &spec, &events).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_with_coarse_rows_pending_loses_nothing_postgres() {
    a_kill_with_coarse_rows_pending_loses_nothing(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_with_coarse_rows_pending_loses_nothing_sqlite() {
    a_kill_with_coarse_rows_pending_loses_nothing(Backend::Sqlite).await;
}

/// A coarse commit runs in the background while the fold goes on, so the
/// rows folded meanwhile start where its rows end. Here half of those
/// commits fail a while after they began (as when the connection is lost
/// mid-commit): the projector must drop the rows folded on top of a failed
/// one and read them again from the checkpoint. Fails if it keeps them (its
/// next commit, from the old cursor, would leave the failed commit's events
/// out) or if the commits never run in the background.
async fn a_background_commit_that_fails_is_folded_again(backend: Backend) {
    let (url, _dir) = database(backend, "background");
    let store = open(&url).await;
    let env = [
        ("TALLY_FAILPOINTS", "projector.fail_background_commit=0.5"),
        ("TALLY_COARSE_COMMIT_INTERVAL", "50ms"),
        ("TALLY_PROJECTOR_POLL", "20ms"),
        ("TALLY_PROJECTOR_BATCH", "100"),
    ];
    let mut tally = TallyProc::start_http(&url, &env).await;
    let events = seeded_events("background", 4000, 23);
    for chunk in events.chunks(20) {
        append_all(&store, chunk, chunk.len()).await;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while lag(&store).await != Some(0) {
        assert!(Instant::now() < deadline, "not caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = tally
        .log_text()
        .matches("failpoint projector.fail_background_commit")
        .count();
    tally.kill9();
    assert!(
        failed >= 3,
        "only {failed} background commits failed: the test did not exercise them"
    );
    for spec in shipped() {
        assert_matches_oracle(&store, &spec, &events).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_commit_that_fails_is_folded_again_postgres() {
    a_background_commit_that_fails_is_folded_again(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_commit_that_fails_is_folded_again_sqlite() {
    a_background_commit_that_fails_is_folded_again(Backend::Sqlite).await;
}
