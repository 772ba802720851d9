//! Conformance suite of the event log: every test runs on PostgreSQL and SQLite.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;
use tally::store::{Origin, Outcome, RejectKind, Rejected};

use crate::support::{both_backends, full_event, TestStore};

fn origin() -> Origin {
    Origin {
        source: "test",
        subject: Some("unit".into()),
    }
}

both_backends!(
    migrate_is_idempotent,
    every_field_round_trips,
    duplicate_in_later_batch_changes_nothing,
    same_id_twice_in_one_batch_is_stored_once,
    conflict_keeps_the_stored_event_and_records_the_newcomer,
    rejects_commit_with_the_batch,
    empty_append_is_a_no_op,
    concurrent_appends_store_each_id_once,
    alert_transitions_commit_all_or_nothing,
);

async fn migrate_is_idempotent(s: &TestStore) {
    s.store.migrate().await.expect("second migrate");
    assert_eq!(s.store.log().counts().await.expect("counts").events, 0);
}

async fn every_field_round_trips(s: &TestStore) {
    let full = full_event("full-1", Utc::now());
    let mut bare = full_event("bare-1", Utc::now());
    bare.endpoint = None;
    bare.method = None;
    bare.key = None;
    bare.user = None;
    bare.model = None;
    bare.status = None;
    bare.success = true;
    bare.error_type = None;
    bare.error_message = None;
    bare.latency_ms = None;
    bare.request_bytes = None;
    bare.response_bytes = None;
    bare.tokens_in = None;
    bare.tokens_out = None;
    bare.cost_nanos = None;
    bare.cached = false;
    bare.metadata.clear();
    let out = s
        .store
        .log()
        .append(&[full.clone(), bare.clone()], &[], &origin())
        .await
        .expect("append");
    assert_eq!(out, vec![Outcome::Inserted, Outcome::Inserted]);
    assert_eq!(
        s.store.log().get_event("full-1").await.expect("get"),
        Some(full)
    );
    assert_eq!(
        s.store.log().get_event("bare-1").await.expect("get"),
        Some(bare)
    );
    assert_eq!(s.store.log().get_event("nope").await.expect("get"), None);
}

async fn duplicate_in_later_batch_changes_nothing(s: &TestStore) {
    let a = full_event("d-1", Utc::now());
    let b = full_event("d-2", Utc::now());
    let first = s
        .store
        .log()
        .append(std::slice::from_ref(&a), &[], &origin())
        .await
        .expect("append");
    assert_eq!(first, vec![Outcome::Inserted]);
    let second = s
        .store
        .log()
        .append(&[a.clone(), b], &[], &origin())
        .await
        .expect("append");
    assert_eq!(second, vec![Outcome::Duplicate, Outcome::Inserted]);
    let counts = s.store.log().counts().await.expect("counts");
    assert_eq!((counts.events, counts.rejected), (2, 0));
}

async fn same_id_twice_in_one_batch_is_stored_once(s: &TestStore) {
    let a = full_event("twice", Utc::now());
    let out = s
        .store
        .log()
        .append(&[a.clone(), a.clone(), a], &[], &origin())
        .await
        .expect("append");
    assert_eq!(
        out,
        vec![Outcome::Inserted, Outcome::Duplicate, Outcome::Duplicate]
    );
    assert_eq!(s.store.log().counts().await.expect("counts").events, 1);
}

async fn conflict_keeps_the_stored_event_and_records_the_newcomer(s: &TestStore) {
    let original = full_event("c-1", Utc::now());
    let mut changed = original.clone();
    changed.cost_nanos = Some(99);
    changed.tokens_in = Some(1);
    s.store
        .log()
        .append(std::slice::from_ref(&original), &[], &origin())
        .await
        .expect("append");
    let out = s
        .store
        .log()
        .append(&[changed.clone(), original.clone()], &[], &origin())
        .await
        .expect("append");
    assert_eq!(out, vec![Outcome::Conflict, Outcome::Duplicate]);
    assert_eq!(
        s.store.log().get_event("c-1").await.expect("get"),
        Some(original)
    );
    let rejected = s.store.log().recent_rejected(10).await.expect("rejected");
    assert_eq!(rejected.len(), 1);
    let r = &rejected[0];
    assert_eq!(r.kind, "conflict");
    assert_eq!(r.event_id.as_deref(), Some("c-1"));
    assert_eq!(r.item_index, Some(0));
    assert_eq!(r.source, "test");
    assert!(
        r.reason.contains("cost") && r.reason.contains("tokens_in"),
        "{}",
        r.reason
    );
    let payload: serde_json::Value = serde_json::from_slice(&r.payload).expect("payload is JSON");
    assert_eq!(payload["cost"], "0.000000099");
}

async fn rejects_commit_with_the_batch(s: &TestStore) {
    let reject = Rejected {
        kind: RejectKind::Invalid,
        event_id: Some("bad-1".into()),
        item_index: Some(1),
        reason: "field `status`: must be between 100 and 599, got 600".into(),
        content_type: Some("application/json".into()),
        payload: b"{\"id\":\"bad-1\",\"status\":600}".to_vec(),
        subject: None,
    };
    let out = s
        .store
        .log()
        .append(
            &[full_event("ok-1", Utc::now())],
            std::slice::from_ref(&reject),
            &origin(),
        )
        .await
        .expect("append");
    assert_eq!(out, vec![Outcome::Inserted]);
    let rows = s.store.log().recent_rejected(10).await.expect("rejected");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].payload, reject.payload);
    assert_eq!(rows[0].reason, reject.reason);
    assert_eq!(rows[0].subject.as_deref(), Some("unit"));
}

async fn empty_append_is_a_no_op(s: &TestStore) {
    let out = s
        .store
        .log()
        .append(&[], &[], &origin())
        .await
        .expect("append");
    assert!(out.is_empty());
    assert_eq!(s.store.log().counts().await.expect("counts").events, 0);
}

/// Eight writers append overlapping batches at once: every id is inserted by
/// exactly one of them and the log holds each id once.
async fn concurrent_appends_store_each_id_once(s: &TestStore) {
    let now = Utc::now();
    let events: Vec<_> = (0..400)
        .map(|i| full_event(&format!("cc-{i}"), now))
        .collect();
    let events = Arc::new(events);
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let store = s.store.clone();
        let events = events.clone();
        tasks.push(tokio::spawn(async move {
            // Each writer takes a different, overlapping slice, in its own order.
            let mut mine: Vec<_> = events.iter().skip(w * 25).take(200).cloned().collect();
            if w % 2 == 1 {
                mine.reverse();
            }
            let mut inserted = Vec::new();
            for chunk in mine.chunks(50) {
                let out = store
                    .log()
                    .append(
                        chunk,
                        &[],
                        &Origin {
                            source: "test",
                            subject: None,
                        },
                    )
                    .await
                    .expect("append");
                for (e, o) in chunk.iter().zip(out) {
                    assert_ne!(
                        o,
                        Outcome::Conflict,
                        "identical content is never a conflict"
                    );
                    if o == Outcome::Inserted {
                        inserted.push(e.id.clone());
                    }
                }
            }
            inserted
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    let distinct: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(
        all.len(),
        distinct.len(),
        "an id was reported inserted twice"
    );
    let expected: HashSet<String> = (0..(7 * 25 + 200)).map(|i| format!("cc-{i}")).collect();
    assert_eq!(distinct, expected);
    assert_eq!(
        s.store.log().counts().await.expect("counts").events as usize,
        expected.len()
    );
}

/// The projector's idle poll stays on the cursor index under a cached
/// generic plan. Its "do committed events wait above xmin?" check was an
/// `EXISTS`, whose generic plan expects a third of the log to match and so
/// scanned the whole log whenever nothing did: on every idle poll.
#[tokio::test]
async fn a_caught_up_log_read_never_scans_the_log() {
    use sqlx::Row;
    let (url, _dir) = crate::support::database(tally::store::Backend::Postgres, "caught_up_read");
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    // PostgreSQL switches a prepared statement to its generic plan after
    // five runs; force it from the first, for every connection opened next.
    sqlx::query(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET plan_cache_mode = force_generic_plan', \
         current_database()); END $$",
    )
    .execute(&admin)
    .await
    .expect("force generic plans");
    let store = crate::support::open(&url).await;
    let events: Vec<_> = (0..20_000)
        .map(|i| full_event(&format!("idle-{i}"), Utc::now()))
        .collect();
    crate::projection::oracle::append_all(&store, &events, 1_000).await;
    sqlx::query("ANALYZE usage_events")
        .execute(&admin)
        .await
        .expect("analyze");
    let mut after = tally::store::Cursor::default();
    loop {
        let batch = store
            .projections()
            .read_log(after, 5_000)
            .await
            .expect("read");
        match batch.events.last() {
            Some((c, _)) => after = *c,
            None => break,
        }
    }
    // Table statistics reach pg_stat_user_tables within ten seconds of a
    // backend going idle (PGSTAT_IDLE_INTERVAL): wait that out for a
    // baseline (the migrations scan the empty table), then until the
    // polls' two scans each show.
    let scans = || async {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&admin)
            .await
            .expect("clear");
        let r = sqlx::query(
            "SELECT seq_scan, coalesce(idx_scan, 0) AS idx_scan FROM pg_stat_user_tables \
             WHERE relname = 'usage_events'",
        )
        .fetch_one(&admin)
        .await
        .expect("stats");
        (r.get::<i64, _>("seq_scan"), r.get::<i64, _>("idx_scan"))
    };
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let (seq_before, idx_before) = scans().await;
    let polls = 10;
    for _ in 0..polls {
        let batch = store
            .projections()
            .read_log(after, 5_000)
            .await
            .expect("poll");
        assert!(batch.events.is_empty() && !batch.held_back);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (seq, idx) = loop {
        let (seq, idx) = scans().await;
        if seq + idx >= seq_before + idx_before + 2 * polls || std::time::Instant::now() > deadline
        {
            break (seq, idx);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert!(
        seq + idx >= seq_before + idx_before + 2 * polls,
        "the polls' scans never showed: {seq_before}+{idx_before} -> {seq}+{idx}"
    );
    assert_eq!(seq, seq_before, "a log read scanned usage_events whole");
}

/// A restatement's read of a few users over a day finds their events in
/// the `ts` index, which carries `user` and `key`, and fetches only those
/// rows: `by_user`'s finest table is daily, and restating one key's hour
/// used to read every event of the day to find the ten users it touched.
/// The read also keeps the events without a user when '' is asked for.
#[tokio::test]
async fn a_restatement_reads_its_groups_not_the_whole_day() {
    use sqlx::Row;
    use tally::aggregate::Dimension;
    let (url, _dir) = crate::support::database(tally::store::Backend::Postgres, "group_read");
    let admin = sqlx::PgPool::connect(&url).await.expect("connect");
    let store = crate::support::open(&url).await;
    let day = chrono::DateTime::parse_from_rfc3339("2026-11-20T00:00:00Z")
        .expect("day")
        .with_timezone(&Utc);
    let users = 200;
    let per_user = 50;
    let events: Vec<_> = (0..users * per_user)
        .map(|i| {
            let mut e = full_event(
                &format!("day-{i}"),
                day + chrono::Duration::seconds((i * 86_399 / (users * per_user)) as i64),
            );
            e.user = (i % users != 0).then(|| format!("u{}", i % users));
            e
        })
        .collect();
    crate::projection::oracle::append_all(&store, &events, 1_000).await;
    let spec = crate::projection::oracle::shipped()
        .into_iter()
        .find(|s| s.name == "by_user")
        .expect("by_user is shipped");
    let mut p = crate::projection::oracle::projector(&store, &spec).await;
    crate::projection::oracle::fold_all(&mut p, &store, 5_000).await;
    // A backend reports its statistics when it exits: closing the pools
    // settles the counts of the fold before the baseline and of the reads
    // after them, with no wait on the ten-second idle flush.
    drop(p);
    store.close().await;
    // What autovacuum does after 1% of the table is inserted (schema 0008):
    // it marks the pages all-visible, so an index-only scan skips the rows.
    // A page is marked only once no session can see it otherwise and the
    // commits of its rows are flushed (the closed pool's backends exit, and
    // the harness's cluster commits asynchronously, a moment later).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        sqlx::query("VACUUM (ANALYZE) usage_events")
            .execute(&admin)
            .await
            .expect("vacuum");
        let (pages, visible): (i32, i32) = sqlx::query_as(
            "SELECT relpages, relallvisible FROM pg_class WHERE relname = 'usage_events'",
        )
        .fetch_one(&admin)
        .await
        .expect("pages");
        if pages > 0 && visible == pages {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VACUUM left {visible} of {pages} pages all-visible"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Rows fetched through an index; an index-only scan fetches none.
    let fetched = || async {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&admin)
            .await
            .expect("clear");
        sqlx::query(
            "SELECT coalesce(idx_tup_fetch, 0) AS n, coalesce(idx_scan, 0) AS scans \
             FROM pg_stat_user_tables WHERE relname = 'usage_events'",
        )
        .fetch_one(&admin)
        .await
        .map(|r| (r.get::<i64, _>("n"), r.get::<i64, _>("scans")))
        .expect("stats")
    };
    let settled = || async {
        let mut last = fetched().await;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let now = fetched().await;
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let (before, scans_before) = settled().await;
    let store = crate::support::open(&url).await;
    let folded = store
        .projections()
        .read_folded(&spec.name, &spec.hash())
        .await
        .expect("snapshot")
        .expect("by_user has a checkpoint");
    let mut read = 0usize;
    let mut absent = 0usize;
    for hour in 0..24 {
        let from = day + chrono::Duration::hours(hour);
        let filter = [(Dimension::User, vec!["u7".to_string(), String::new()])];
        folded
            .read_events(from, from + chrono::Duration::hours(1), &filter, |chunk| {
                read += chunk.len();
                absent += chunk.iter().filter(|e| e.user.is_none()).count();
            })
            .await
            .expect("read");
    }
    assert_eq!(
        (read, absent),
        (2 * per_user, per_user),
        "u7's and the user-less events"
    );
    drop(folded);
    store.close().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (after, scans) = loop {
        let (n, scans) = settled().await;
        if scans >= scans_before + 24 || std::time::Instant::now() > deadline {
            break (n, scans);
        }
    };
    assert!(
        scans >= scans_before + 24,
        "the reads never showed: {scans_before} -> {scans} index scans"
    );
    assert!(
        after - before <= 2 * read as i64,
        "the reads fetched {} rows of the log for {read} events of a {}-event day",
        after - before,
        users * per_user
    );
}

/// `commit_transitions` writes hundreds of instances in a few statements:
/// all of them with their notifications, or none when one instance was
/// created or moved by another evaluator first.
async fn alert_transitions_commit_all_or_nothing(s: &TestStore) {
    use tally::alert::lifecycle::AlertState;
    use tally::store::alerts::{InstanceRow, InstanceWrite, Life, NewNotification};
    let alerts = s.store.alerts();
    let now = chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now");
    let row = |i: usize, state: AlertState, sequence: i64| InstanceRow {
        fingerprint: format!("fp{i:04}"),
        rule: "r".into(),
        rule_uid: "u".into(),
        level: String::new(),
        group: format!(r#"{{"key":"k{i}"}}"#),
        severity: "warning".into(),
        value: (!i.is_multiple_of(3)).then_some(i as f64 + 0.5),
        threshold: Some(10.0),
        life: Life {
            state,
            active_since: Some(now),
            firing_since: (sequence > 0).then_some(now),
            last_true: Some(now),
            last_sent: (sequence > 0).then_some(now),
            resolved_at: None,
            sequence,
        },
        version: 0,
        updated_at: now,
    };
    let note = |i: usize, sequence: i64| NewNotification {
        fingerprint: format!("fp{i:04}"),
        sequence,
        rule: "r".into(),
        state: AlertState::Firing,
        severity: "warning".into(),
        subject: "usage.alerts.warning.r".into(),
        payload: format!(r#"{{"i":{i},"sequence":{sequence}}}"#),
        created_at: now,
    };
    // 450 new instances: more than one statement's rows.
    let n = 450;
    let created: Vec<InstanceWrite> = (0..n)
        .map(|i| InstanceWrite {
            row: row(i, AlertState::Pending, 0),
            expected_version: None,
        })
        .collect();
    assert!(alerts
        .commit_transitions(&created, &[])
        .await
        .expect("create"));
    let fps: Vec<String> = (0..n).map(|i| format!("fp{i:04}")).collect();
    let stored = alerts.instances_by_fingerprint(&fps).await.expect("read");
    assert_eq!(stored.len(), n);
    for r in &stored {
        let i: usize = r.fingerprint[2..].parse().expect("index");
        let want = InstanceRow {
            version: 1,
            ..row(i, AlertState::Pending, 0)
        };
        assert_eq!(r, &want);
    }
    // All fire, each with its notification.
    let fire: Vec<InstanceWrite> = (0..n)
        .map(|i| InstanceWrite {
            row: row(i, AlertState::Firing, 1),
            expected_version: Some(1),
        })
        .collect();
    let notes: Vec<NewNotification> = (0..n).map(|i| note(i, 1)).collect();
    assert!(alerts
        .commit_transitions(&fire, &notes)
        .await
        .expect("fire"));
    let unsent = alerts.unsent_notifications(10_000).await.expect("outbox");
    assert_eq!(unsent.len(), n);
    let stored = alerts.instances_by_fingerprint(&fps).await.expect("read");
    assert!(stored
        .iter()
        .all(|r| r.version == 2 && r.life.state == AlertState::Firing && r.life.sequence == 1));
    // One stale version among 300 writes: nothing of the round is written.
    let mut stale: Vec<InstanceWrite> = (0..300)
        .map(|i| InstanceWrite {
            row: row(i, AlertState::Resolved, 2),
            expected_version: Some(2),
        })
        .collect();
    stale[250].expected_version = Some(1);
    let notes: Vec<NewNotification> = (0..300).map(|i| note(i, 2)).collect();
    assert!(!alerts
        .commit_transitions(&stale, &notes)
        .await
        .expect("stale"));
    // An instance another evaluator created first: nothing written either.
    let mut again = vec![InstanceWrite {
        row: row(n, AlertState::Pending, 0),
        expected_version: None,
    }];
    again.push(InstanceWrite {
        row: row(3, AlertState::Pending, 0),
        expected_version: None,
    });
    assert!(!alerts
        .commit_transitions(&again, &[])
        .await
        .expect("exists"));
    let stored = alerts.instances_by_fingerprint(&fps).await.expect("read");
    assert!(
        stored
            .iter()
            .all(|r| r.version == 2 && r.life.state == AlertState::Firing),
        "a refused round changed an instance"
    );
    assert!(alerts
        .instances_by_fingerprint(&[format!("fp{n:04}")])
        .await
        .expect("read")
        .is_empty());
    assert_eq!(
        alerts
            .unsent_notifications(10_000)
            .await
            .expect("outbox")
            .len(),
        n,
        "a refused round added notifications"
    );
}
