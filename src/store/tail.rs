//! The log's tail in memory: the events this process appended, by log
//! position, kept for the projector so it need not read their columns back.
//!
//! The projector still reads **positions** from the log, in commit-safe
//! order (the cursor, PostgreSQL's horizon and the voided-event lookup are
//! unchanged), so the set of events a fold covers is exactly the log's;
//! only the columns of each position come from here when this process
//! appended it. A position not here (appended by another process or
//! instance, before a restart, or dropped for the byte budget) is read from
//! the log in the same snapshot.
//!
//! Safe because an entry is the event committed at its position: entries are
//! added only after the append's commit returned, with the positions its
//! `INSERT … RETURNING` reported. (Added before the commit, a rolled-back
//! append would leave its events at positions SQLite gives to the next
//! append: `a_rolled_back_append_leaves_nothing_in_the_log_tail`.) The tail
//! is only a cache: a crash loses it and the log is read instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Cursor, StoreError};
use crate::event::Event;

/// The tail's default byte budget in `serve`: at 20,000 events a second
/// the projector reads what was appended within about half a second,
/// ~10,000 events, ~4 MiB.
pub const DEFAULT_TAIL_BYTES: usize = 8 << 20;

/// See the module documentation. Off (budget 0) until [`LogTail::keep`].
#[derive(Debug, Default)]
pub struct LogTail {
    budget: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    events: BTreeMap<Cursor, Event>,
    bytes: usize,
    hits: u64,
    misses: u64,
    /// When a projector last read the log. Appends are kept only while one
    /// reads: an instance whose projectors lost their leases keeps nothing.
    last_read: Option<Instant>,
}

/// How long after the last log read appends are still kept.
const READER_GONE: Duration = Duration::from_secs(10);

/// What the tail answered, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TailStats {
    /// Positions the projector found here.
    pub hits: u64,
    /// Positions it read from the log.
    pub misses: u64,
    /// Bytes held now (estimated).
    pub bytes: usize,
}

/// An estimate of the memory an entry holds, allocator overhead included.
fn size_of(e: &Event) -> usize {
    // What malloc takes for `n` bytes: a header, rounded up to 16.
    let alloc = |n: usize| if n == 0 { 0 } else { (n + 8).div_ceil(16) * 16 };
    let text = |s: &Option<String>| s.as_ref().map_or(0, |s| alloc(s.capacity()));
    std::mem::size_of::<(Cursor, Event)>()
        + 64 // the map's share of a node
        + alloc(e.api.capacity())
        + text(&e.endpoint)
        + text(&e.method)
        + text(&e.key)
        + text(&e.user)
        + text(&e.model)
}

impl LogTail {
    /// Keeps up to `bytes` of appended events (0 turns the tail off and empties it).
    pub fn keep(&self, bytes: usize) {
        self.budget.store(bytes, Ordering::Relaxed);
        if bytes == 0 {
            let mut inner = self.lock();
            inner.events.clear();
            inner.bytes = 0;
        }
    }

    /// Whether the tail is on.
    pub fn is_on(&self) -> bool {
        self.budget.load(Ordering::Relaxed) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a map that is still
        // consistent (every operation is a map insert or removal).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the events an append committed, at the positions its insert
    /// returned. Only what the projector folds is kept (no id, message or
    /// metadata). A full tail takes nothing more: the projector reads the
    /// lowest positions first, so when it is behind (a backlog) the events
    /// it will read next are the ones worth keeping.
    pub(crate) fn push(&self, committed: impl IntoIterator<Item = (Cursor, Event)>) {
        let budget = self.budget.load(Ordering::Relaxed);
        if budget == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.last_read.is_none_or(|t| t.elapsed() > READER_GONE) {
            inner.events.clear();
            inner.bytes = 0;
            return;
        }
        for (at, mut e) in committed {
            e.id = String::new();
            e.error_message = None;
            e.metadata = Default::default();
            let size = size_of(&e);
            if inner.bytes + size > budget {
                break;
            }
            inner.bytes += size;
            if let Some(old) = inner.events.insert(at, e) {
                inner.bytes -= size_of(&old);
            }
        }
    }

    /// The events at `positions` (ascending), each taken out of the tail or
    /// `None` when it is not here; everything at or below the last position
    /// is dropped too (no later read asks for it).
    pub(crate) fn take(&self, positions: &[Cursor]) -> Vec<Option<Event>> {
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(positions.len());
        for at in positions {
            let e = inner.events.remove(at);
            match &e {
                Some(e) => {
                    inner.bytes -= size_of(e);
                    inner.hits += 1;
                }
                None => inner.misses += 1,
            }
            out.push(e);
        }
        if let Some(last) = positions.last() {
            let keep = inner.events.split_off(last);
            let dropped = std::mem::replace(&mut inner.events, keep);
            inner.bytes -= dropped.values().map(size_of).sum::<usize>();
        }
        out
    }

    /// Notes that a projector reads the log now; whether the tail holds
    /// anything (when it does not, the log is read in one statement, as
    /// without the tail).
    pub(crate) fn reading(&self) -> bool {
        let mut inner = self.lock();
        inner.last_read = Some(Instant::now());
        !inner.events.is_empty()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().events.is_empty()
    }

    /// Counters and size.
    pub fn stats(&self) -> TailStats {
        let inner = self.lock();
        TailStats {
            hits: inner.hits,
            misses: inner.misses,
            bytes: inner.bytes,
        }
    }
}

/// The events at `positions` (a log read's, ascending): each from the tail
/// when it holds it, the others from `read_range(first, last)`, the log's
/// rows from the first to the last missing position in the same snapshot.
pub(crate) async fn fill(
    tail: &LogTail,
    positions: Vec<Cursor>,
    read_range: impl AsyncFnOnce(Cursor, Cursor) -> Result<Vec<(Cursor, Event)>, StoreError>,
) -> Result<Vec<(Cursor, Event)>, StoreError> {
    let slots = tail.take(&positions);
    let read = match missing_range(&positions, &slots) {
        Some((first, last)) => read_range(first, last).await?,
        None => Vec::new(),
    };
    assemble(positions, slots, read)
}

/// The positions a log read found, each with its event: from the tail
/// (`slots`) or, where the tail had none, from `read` (the log's rows over
/// [`missing_range`], in cursor order, from the same snapshot).
fn assemble(
    positions: Vec<Cursor>,
    slots: Vec<Option<Event>>,
    read: Vec<(Cursor, Event)>,
) -> Result<Vec<(Cursor, Event)>, StoreError> {
    let mut read = read.into_iter().peekable();
    positions
        .into_iter()
        .zip(slots)
        .map(|(at, slot)| match slot {
            Some(e) => Ok((at, e)),
            None => {
                while read.next_if(|(c, _)| *c < at).is_some() {}
                match read.next_if(|(c, _)| *c == at) {
                    Some(found) => Ok(found),
                    None => Err(StoreError::CorruptRow {
                        id: format!("position {}:{}", at.tx, at.seq),
                        reason: "the log read found this position but not its event".into(),
                    }),
                }
            }
        })
        .collect()
}

/// The first and last of `positions` the tail had no event for.
fn missing_range(positions: &[Cursor], slots: &[Option<Event>]) -> Option<(Cursor, Cursor)> {
    let mut missing = positions
        .iter()
        .zip(slots)
        .filter(|(_, s)| s.is_none())
        .map(|(c, _)| *c);
    let first = missing.next()?;
    Some((first, missing.next_back().unwrap_or(first)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn event(api: &str) -> Event {
        Event {
            id: "id".into(),
            ts: Utc::now(),
            api: api.into(),
            endpoint: None,
            method: None,
            key: Some("k".into()),
            user: None,
            model: None,
            status: None,
            success: true,
            error_type: None,
            error_message: Some("m".into()),
            latency_ms: None,
            request_bytes: None,
            response_bytes: None,
            tokens_in: None,
            tokens_out: None,
            cost_nanos: None,
            cached: false,
            metadata: Default::default(),
        }
    }

    fn at(seq: i64) -> Cursor {
        Cursor { tx: 0, seq }
    }

    #[test]
    fn takes_what_it_holds_and_drops_what_no_read_will_ask_for() {
        let tail = LogTail::default();
        tail.push([(at(1), event("a"))]);
        assert!(tail.is_empty(), "off until kept");
        tail.keep(1 << 20);
        tail.push([(at(1), event("a"))]);
        assert!(tail.is_empty(), "nothing is kept before a projector reads");
        tail.reading();
        tail.push((1..=5).map(|s| (at(s), event(&format!("a{s}")))));
        let got = tail.take(&[at(2), at(3), at(9)]);
        let apis: Vec<Option<String>> = got.into_iter().map(|e| e.map(|e| e.api)).collect();
        assert_eq!(apis, [Some("a2".into()), Some("a3".into()), None]);
        // 1 and 4, 5 were below the last position asked for (9): dropped.
        assert!(tail.is_empty());
        assert_eq!(tail.stats().hits, 2);
        assert_eq!(tail.stats().misses, 1);
        assert_eq!(tail.stats().bytes, 0);
    }

    #[test]
    fn keeps_the_oldest_within_its_budget_and_only_the_folded_columns() {
        let tail = LogTail::default();
        let mut stripped = event("a1");
        stripped.error_message = None;
        tail.keep(3 * size_of(&stripped));
        tail.reading();
        tail.push((1..=5).map(|s| (at(s), event(&format!("a{s}")))));
        let got = tail.take(&[at(1), at(2), at(3), at(4), at(5)]);
        let kept: Vec<&str> = got.iter().flatten().map(|e| e.api.as_str()).collect();
        assert_eq!(
            kept,
            ["a1", "a2", "a3"],
            "what the projector reads next is kept"
        );
        let e = got[2].as_ref().expect("kept");
        assert!(e.id.is_empty() && e.error_message.is_none());
    }
}
