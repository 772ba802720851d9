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
    for chunk in events.chunks(1_000) {
        store
            .log()
            .append(chunk, &[], &origin())
            .await
            .expect("append");
    }
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
