//! Property: appending any shuffled, duplicated sequence of events, in any
//! batch sizes, leaves exactly the set of distinct ids, each with the content
//! of its first delivery, and reports every later delivery as a duplicate
//! (same content) or a conflict (different content).

use std::collections::HashMap;

use chrono::Utc;
use proptest::prelude::*;
use tally::event::Event;
use tally::store::{Backend, Origin, Outcome};

use crate::support::{self, full_event};

/// A delivery: which id (0..ids), and which content variant (0 is the original).
fn deliveries() -> impl Strategy<Value = (Vec<(u8, u8)>, Vec<usize>)> {
    (
        prop::collection::vec((0u8..30, prop_oneof![6 => Just(0u8), 1 => 1u8..3]), 1..120),
        prop::collection::vec(1usize..40, 1..20),
    )
}

fn variant(id: u8, v: u8) -> Event {
    let mut e = full_event(&format!("p-{id}"), Utc::now());
    e.ts = chrono::DateTime::from_timestamp(1_790_000_000 + i64::from(id), 0).expect("ts");
    e.cost_nanos = Some(1000 * i64::from(id) + i64::from(v));
    e
}

fn run(backend: Backend, seq: &[(u8, u8)], sizes: &[usize]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let s = support::store(backend).await;
        let events: Vec<Event> = seq.iter().map(|&(id, v)| variant(id, v)).collect();
        // Oracle: the first delivery of an id wins; later ones compare against it.
        let mut winner: HashMap<String, &Event> = HashMap::new();
        let mut expected = Vec::new();
        for e in &events {
            expected.push(match winner.get(&e.id) {
                None => {
                    winner.insert(e.id.clone(), e);
                    Outcome::Inserted
                }
                Some(w) if *w == e => Outcome::Duplicate,
                Some(_) => Outcome::Conflict,
            });
        }
        let origin = Origin {
            source: "prop",
            subject: None,
        };
        let mut got = Vec::new();
        let mut rest = events.as_slice();
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (batch, tail) = rest.split_at((*size).min(rest.len()));
            got.extend(
                s.store
                    .log()
                    .append(batch, &[], &origin)
                    .await
                    .expect("append"),
            );
            rest = tail;
        }
        prop_assert_eq!(&got, &expected);
        let counts = s.store.log().counts().await.expect("counts");
        prop_assert_eq!(counts.events as usize, winner.len());
        let conflicts = expected.iter().filter(|o| **o == Outcome::Conflict).count();
        prop_assert_eq!(counts.rejected as usize, conflicts);
        for (id, w) in &winner {
            let stored = s.store.log().get_event(id).await.expect("get");
            prop_assert_eq!(stored.as_ref(), Some(*w));
        }
        s.store.close().await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn sqlite_append_is_exact_for_any_delivery_order((seq, sizes) in deliveries()) {
        run(Backend::Sqlite, &seq, &sizes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn postgres_append_is_exact_for_any_delivery_order((seq, sizes) in deliveries()) {
        run(Backend::Postgres, &seq, &sizes)?;
    }
}
