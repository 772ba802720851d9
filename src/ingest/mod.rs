//! Ingest: bodies from the outside world → validated events → the event log.
//!
//! [`Intake::ingest`] is the one path every source takes (HTTP, NATS and `tally import`):
//! decode ([`crate::event::codec`]), validate ([`crate::event::validate`]) and
//! append valid events *and* rejected items in one store transaction. A caller
//! reports success (HTTP 200, NATS ack) only after it returns `Ok`, i.e. after
//! the commit: an answered event is never lost, and a retried one is a duplicate.

pub mod nats;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::codec::{decode_body, to_wire_json, CodecError, Encoding};
use crate::event::{escape_controls, Event, ValidationRules};
use crate::store::{Origin, Outcome, RejectKind, Rejected, Store, StoreError};

/// Limits applied to every body, whatever its source.
#[derive(Debug, Clone)]
pub struct IntakeLimits {
    /// Oldest accepted `ts`, relative to now.
    pub late_arrival_horizon: Duration,
    /// Newest accepted `ts`, relative to now.
    pub max_future_skew: Duration,
    /// Most events in one body.
    pub max_events: usize,
}

/// Decodes, validates and appends bodies. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    store: Store,
    limits: IntakeLimits,
    /// Signalled after every commit that stored an event (see [`Intake::appended`]).
    appended: Arc<tokio::sync::Notify>,
}

/// The answer to one body: what was counted, and why each other item was not.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct IngestReport {
    /// Events stored now.
    pub accepted: usize,
    /// Events whose id was already stored with the same content.
    pub duplicates: usize,
    /// Events whose id was already stored with different content (kept in `rejected_events`).
    pub conflicts: usize,
    /// Items that failed decoding or validation.
    pub rejected: Vec<ItemError>,
    /// The conflicting items, with what differs.
    #[serde(default)]
    pub conflicting: Vec<ItemError>,
}

/// Why one item of a body was not counted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ItemError {
    /// 0-based position in the body (for NDJSON: among the non-blank lines).
    pub index: usize,
    /// The item's `id` when it had a readable one.
    pub id: Option<String>,
    /// What is wrong and how to fix it.
    pub error: String,
}

/// Why a body as a whole was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body could not be split into items (stored in `rejected_events` when possible).
    #[error(transparent)]
    Body(#[from] CodecError),
    /// The event log could not commit; nothing from this body was stored.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Intake {
    /// An intake writing to `store`.
    pub fn new(store: Store, limits: IntakeLimits) -> Self {
        Self {
            store,
            limits,
            appended: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Notified after each commit that stored at least one event: this
    /// process's projectors fold it at once instead of at their next poll.
    pub fn appended(&self) -> Arc<tokio::sync::Notify> {
        self.appended.clone()
    }

    /// The store this intake appends to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends through the store and counts what was committed in `/metrics`.
    pub async fn append(
        &self,
        events: &[Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError> {
        let started = std::time::Instant::now();
        let rejects = storable(rejects);
        let outcomes = self.store.log().append(events, &rejects, origin).await?;
        crate::metrics::record_append(origin.source, &outcomes, &rejects, started.elapsed());
        if outcomes.contains(&Outcome::Inserted) {
            // One stored permit: a projector busy folding runs again right after.
            self.appended.notify_one();
        }
        Ok(outcomes)
    }

    /// [`Intake::append`], except that one row the database refuses (a data
    /// error that validation did not foresee) does not refuse its neighbours:
    /// the batch is appended again event by event, and each refused event is
    /// kept in `rejected_events` (kind `refused`) with the database's reason;
    /// its outcome is [`Outcome::Refused`]. Transient errors are returned as
    /// they are, for the caller to retry (a retry sees duplicates, never a
    /// second copy).
    pub async fn append_isolating(
        &self,
        events: &[Event],
        rejects: &[Rejected],
        origin: &Origin,
    ) -> Result<Vec<Outcome>, StoreError> {
        let first = match self.append(events, rejects, origin).await {
            Err(e) if e.is_data_error() => e,
            other => return other,
        };
        tracing::warn!(error = %first, events = events.len(), "the database refused a batch; appending its events one by one");
        let mut outcomes = Vec::with_capacity(events.len());
        let mut records = rejects.to_vec();
        for (i, event) in events.iter().enumerate() {
            match self.append(std::slice::from_ref(event), &[], origin).await {
                Ok(o) => outcomes.extend(o),
                Err(e) if e.is_data_error() => {
                    outcomes.push(Outcome::Refused);
                    records.push(refused_record(event, i, &e));
                }
                Err(e) => return Err(e),
            }
        }
        // The records themselves are refused only if a text field is beyond
        // the database's reach; then each is kept in its plainest form.
        if let Err(e) = self.append(&[], &records, origin).await {
            if !e.is_data_error() {
                return Err(e);
            }
            for r in &records {
                let one = std::slice::from_ref(r);
                if let Err(e) = self.append(&[], one, origin).await {
                    if !e.is_data_error() {
                        return Err(e);
                    }
                    self.append(&[], &[plainest(r, &e)], origin).await?;
                }
            }
        }
        Ok(outcomes)
    }

    /// Validation rules as of now (the horizon moves with the clock).
    pub fn rules(&self) -> ValidationRules {
        ValidationRules {
            max_future_skew: self.limits.max_future_skew,
            ..ValidationRules::now(self.limits.late_arrival_horizon)
        }
    }

    /// Decodes and validates one body without touching the store.
    ///
    /// Split from the append so that a NATS batch of many messages is appended
    /// in one transaction, and so that decoding the next batch overlaps the
    /// write of this one.
    pub fn prepare(
        &self,
        body: &[u8],
        content_type: Option<&str>,
        subject: Option<&str>,
        rules: &ValidationRules,
    ) -> Prepared {
        let decoded = Encoding::detect(content_type, body).and_then(|enc| {
            decode_body(body, enc, self.limits.max_events).map(|items| (enc, items))
        });
        let (encoding, items) = match decoded {
            Ok(ok) => ok,
            Err(e) => {
                // The whole body is refused, but it is still kept, with the reason.
                let reject = Rejected {
                    kind: RejectKind::Unparseable,
                    event_id: None,
                    item_index: None,
                    reason: e.to_string(),
                    content_type: content_type.map(str::to_string),
                    payload: body.to_vec(),
                    subject: subject.map(str::to_string),
                };
                return Prepared {
                    events: Vec::new(),
                    positions: Vec::new(),
                    rejects: vec![reject],
                    rejected: Vec::new(),
                    body_error: Some(e),
                };
            }
        };

        let mut prepared = Prepared {
            events: Vec::with_capacity(items.len()),
            positions: Vec::with_capacity(items.len()),
            rejects: Vec::new(),
            rejected: Vec::new(),
            body_error: None,
        };
        for (index, item) in items.into_iter().enumerate() {
            let result = match item.value {
                Err(e) => Err((None, e)),
                Ok(v) => v.validate(rules).map_err(|e| (readable_id(v.id()), e)),
            };
            match result {
                Ok(event) => {
                    prepared.events.push(event);
                    prepared.positions.push(index);
                }
                Err((id, error)) => {
                    let message = error.to_string();
                    prepared.rejected.push(ItemError {
                        index,
                        id: id.clone(),
                        error: message.clone(),
                    });
                    prepared.rejects.push(Rejected {
                        kind: RejectKind::Invalid,
                        event_id: id,
                        item_index: i32::try_from(index).ok(),
                        reason: message,
                        content_type: Some(encoding.content_type().to_string()),
                        payload: item.raw.into_owned(),
                        subject: subject.map(str::to_string),
                    });
                }
            }
        }
        prepared
    }

    /// Ingests one body. `Ok` means every accepted event and every rejected item is committed.
    pub async fn ingest(
        &self,
        body: &[u8],
        content_type: Option<&str>,
        origin: &Origin,
    ) -> Result<IngestReport, IngestError> {
        let mut prepared = self.prepare(body, content_type, None, &self.rules());
        let outcomes = self
            .append_isolating(&prepared.events, &prepared.rejects, origin)
            .await?;
        if let Some(e) = prepared.body_error.take() {
            tracing::info!(source = origin.source, error = %e, "body rejected");
            return Err(e.into());
        }
        let report = prepared.report(&outcomes);
        tracing::debug!(
            source = origin.source,
            accepted = report.accepted,
            duplicates = report.duplicates,
            conflicts = report.conflicts,
            rejected = report.rejected.len(),
            "batch committed"
        );
        Ok(report)
    }
}

/// One decoded and validated body, ready to append.
#[derive(Debug)]
pub struct Prepared {
    /// Valid events, in body order.
    pub events: Vec<Event>,
    /// Body position of each valid event.
    positions: Vec<usize>,
    /// Items (or the whole body) to keep in `rejected_events`.
    pub rejects: Vec<Rejected>,
    /// What the sender is told about each rejected item.
    rejected: Vec<ItemError>,
    /// Set when the body as a whole could not be decoded.
    pub body_error: Option<CodecError>,
}

impl Prepared {
    /// True when nothing in the body can be counted: a producer bug, not a transient failure.
    pub fn all_rejected(&self) -> bool {
        self.events.is_empty() && !self.rejects.is_empty()
    }

    /// The sender's report, given the store's outcome for each of `events`.
    pub fn report(&self, outcomes: &[Outcome]) -> IngestReport {
        let mut report = IngestReport {
            rejected: self.rejected.clone(),
            ..IngestReport::default()
        };
        if let Some(e) = &self.body_error {
            report.rejected.push(ItemError {
                index: 0,
                id: None,
                error: e.to_string(),
            });
        }
        for ((outcome, event), &index) in outcomes.iter().zip(&self.events).zip(&self.positions) {
            match outcome {
                Outcome::Inserted => report.accepted += 1,
                Outcome::Duplicate => report.duplicates += 1,
                Outcome::Refused => report.rejected.push(ItemError {
                    index,
                    id: Some(event.id.clone()),
                    error: "the database refused this event; it is kept in rejected_events (kind `refused`) with the database's reason".into(),
                }),
                Outcome::Conflict => {
                    report.conflicts += 1;
                    report.conflicting.push(ItemError {
                        index,
                        id: Some(event.id.clone()),
                        error: format!(
                            "id `{}` is already stored with different content; the stored event is kept (details in rejected_events)",
                            event.id
                        ),
                    });
                }
            }
        }
        report
    }
}

/// The item's `id` when it is a string, so the sender can match the error:
/// at most 128 characters, control characters escaped.
fn readable_id(id: Option<&str>) -> Option<String> {
    id.map(|s| {
        let head: String = s.chars().take(128).collect();
        escape_controls(&head).into_owned()
    })
}

/// The record of an event the database refused: its wire JSON and the reason.
pub fn refused_record(event: &Event, index: usize, error: &StoreError) -> Rejected {
    Rejected {
        kind: RejectKind::Refused,
        event_id: Some(event.id.clone()),
        item_index: i32::try_from(index).ok(),
        reason: format!("the database refused this event: {error}"),
        content_type: Some("application/json".into()),
        payload: to_wire_json(event).to_string().into_bytes(),
        subject: None,
    }
}

/// A record with nothing but the bytes and a plain reason, for when the
/// database refuses even a record's text (its bytes are a `bytea`/`BLOB`).
fn plainest(r: &Rejected, error: &StoreError) -> Rejected {
    let plain = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(256)
            .collect()
    };
    Rejected {
        kind: r.kind,
        event_id: r.event_id.as_deref().map(plain),
        item_index: r.item_index,
        reason: format!(
            "{} (the database refused the full reason: {})",
            plain(&r.reason),
            plain(&error.to_string())
        ),
        content_type: r.content_type.as_deref().map(plain),
        payload: r.payload.clone(),
        subject: r.subject.as_deref().map(plain),
    }
}

/// `rejects` with control characters escaped in every text column, because
/// PostgreSQL refuses NUL in `text`; borrowed when nothing needs escaping.
fn storable(rejects: &[Rejected]) -> std::borrow::Cow<'_, [Rejected]> {
    let dirty = |s: &str| s.chars().any(char::is_control);
    let needs = |r: &Rejected| {
        dirty(&r.reason)
            || r.event_id.as_deref().is_some_and(dirty)
            || r.content_type.as_deref().is_some_and(dirty)
            || r.subject.as_deref().is_some_and(dirty)
    };
    if !rejects.iter().any(needs) {
        return std::borrow::Cow::Borrowed(rejects);
    }
    let esc = |s: &str| escape_controls(s).into_owned();
    std::borrow::Cow::Owned(
        rejects
            .iter()
            .map(|r| Rejected {
                reason: esc(&r.reason),
                event_id: r.event_id.as_deref().map(esc),
                content_type: r.content_type.as_deref().map(esc),
                subject: r.subject.as_deref().map(esc),
                ..r.clone()
            })
            .collect(),
    )
}
