//! NATS JetStream intake: a durable pull consumer feeding the event log.
//!
//! Three stages joined by bounded channels, so memory is bounded by a few
//! batches whatever the backlog (the server holds the rest, and
//! `max_ack_pending` caps what it hands out):
//!
//! ```text
//! fetch + decode ──(1 batch)──▶ append (one transaction, retried) ──(2 batches)──▶ ack (confirmed)
//! ```
//!
//! Decoding batch n+1 overlaps the database write of batch n, and acking batch
//! n overlaps the write of n+1.
//!
//! **Delivery invariant:** a message is acked only after the transaction that
//! holds its events (or its rejection) has committed. A crash anywhere before
//! the ack means redelivery, and the event id makes a redelivered event a
//! duplicate that is not counted again. Acks are *confirmed*: each carries a
//! reply subject and the server answers once it has processed it (the "double
//! ack"), pipelined over one inbox per batch so a batch costs one round trip,
//! not one per message. An unconfirmed ack is harmless (redelivery, then
//! deduplication) but is logged, so an operator sees it.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, stream, AckKind, Context};
use async_nats::{Client, Subject};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::event::Event;
use crate::health::{Health, NatsState};
use crate::ingest::Intake;
use crate::nats::{connect, ConnectError, NatsConnection};
use crate::store::{Origin, Outcome, Rejected, StoreError};

/// Why NATS ingest could not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached, refused us, or a credentials file is unusable.
    #[error(transparent)]
    Connection(#[from] ConnectError),
    /// The stream could not be read, created or updated.
    #[error("JetStream stream `{stream}`: {reason}")]
    Stream {
        /// Stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
    /// The stream exists with settings other than Tally's.
    #[error(
        "JetStream stream `{stream}` exists with other settings:\n{}\nStart Tally with --nats-manage-stream (TALLY_NATS_MANAGE_STREAM=true) to update it, or change Tally's settings to match",
        differences.iter().map(|d| format!("  - {d}")).collect::<Vec<_>>().join("\n")
    )]
    StreamMismatch {
        /// Stream name.
        stream: String,
        /// One line per differing setting: what it is and what Tally wants.
        differences: Vec<String>,
    },
    /// The durable consumer could not be created or updated.
    #[error("JetStream consumer `{consumer}`: {reason}")]
    Consumer {
        /// Consumer name.
        consumer: String,
        /// What went wrong.
        reason: String,
    },
}

/// NATS JetStream ingest: connection, stream and consumer.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsConfig {
    /// Server and credentials.
    #[command(flatten)]
    pub connection: NatsConnection,

    /// JetStream stream holding usage events.
    #[arg(long, env = "TALLY_NATS_STREAM", default_value = "USAGE")]
    pub nats_stream: String,

    /// Subjects of that stream, comma-separated.
    #[arg(
        long,
        env = "TALLY_NATS_SUBJECTS",
        default_value = "usage.events.>",
        value_delimiter = ','
    )]
    pub nats_subjects: Vec<String>,

    /// Update an existing stream whose settings differ instead of refusing to start.
    #[arg(long, env = "TALLY_NATS_MANAGE_STREAM")]
    pub nats_manage_stream: bool,

    /// Drop stream messages older than this (e.g. `7d`); unset: keep until limits. Compared with an existing stream only when set.
    #[arg(long, env = "TALLY_NATS_STREAM_MAX_AGE", value_parser = crate::duration::parse)]
    pub nats_stream_max_age: Option<Duration>,

    /// Durable pull consumer shared by all Tally instances.
    #[arg(long, env = "TALLY_NATS_CONSUMER", default_value = "tally")]
    pub nats_consumer: String,

    /// Most messages delivered and not yet acked, across all instances (bounds memory and redelivery).
    #[arg(long, env = "TALLY_NATS_MAX_ACK_PENDING", default_value_t = 10_000)]
    pub nats_max_ack_pending: i64,

    /// How long the server waits for an ack before redelivering.
    #[arg(long, env = "TALLY_NATS_ACK_WAIT", default_value = "30s", value_parser = crate::duration::parse)]
    pub nats_ack_wait: Duration,

    /// Most messages appended in one transaction.
    #[arg(long, env = "TALLY_NATS_BATCH", default_value_t = 1_000)]
    pub nats_batch: usize,

    /// Most payload bytes pulled and appended in one batch (raised to the
    /// server's `max_payload` so one large message always fits).
    #[arg(long, env = "TALLY_NATS_BATCH_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub nats_batch_bytes: usize,

    /// How long to wait for a batch to fill once its first message arrived.
    #[arg(long, env = "TALLY_NATS_FETCH_WAIT", default_value = "5ms", value_parser = crate::duration::parse)]
    pub nats_fetch_wait: Duration,

    /// Subject that gets a JSON notice for every rejected message or item.
    #[arg(
        long,
        env = "TALLY_NATS_REJECTED_SUBJECT",
        default_value = "usage.rejected"
    )]
    pub nats_rejected_subject: String,
}

/// The stream Tally wants, from config.
pub fn wanted_stream(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: cfg.nats_stream.clone(),
        subjects: cfg.nats_subjects.clone(),
        storage: stream::StorageType::File,
        max_age: cfg.nats_stream_max_age.unwrap_or_default(),
        description: Some("Tally usage events".into()),
        ..Default::default()
    }
}

/// What differs between an existing stream and Tally's settings, one line each.
///
/// Only settings Tally relies on are compared: the subjects (exactly, so that
/// nothing else, such as `usage.rejected`, lands in the stream), file storage,
/// and the maximum age when one was configured.
pub fn stream_differences(existing: &stream::Config, cfg: &NatsConfig) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut have = existing.subjects.clone();
    let mut want = cfg.nats_subjects.clone();
    have.sort();
    want.sort();
    if have != want {
        diffs.push(format!("subjects are {have:?}; Tally wants {want:?}"));
    }
    if existing.storage != stream::StorageType::File {
        diffs.push(format!(
            "storage is {:?}; Tally wants File (messages must survive a NATS restart)",
            existing.storage
        ));
    }
    if let Some(age) = cfg.nats_stream_max_age {
        if existing.max_age != age {
            diffs.push(format!(
                "max_age is {}; Tally wants {}",
                humantime::format_duration(existing.max_age),
                humantime::format_duration(age)
            ));
        }
    }
    diffs
}

/// Makes sure the stream exists with Tally's settings: creates it, or checks it
/// (and updates it when `--nats-manage-stream` is set).
pub async fn ensure_stream(js: &Context, cfg: &NatsConfig) -> Result<(), NatsError> {
    let err = |reason: String| NatsError::Stream {
        stream: cfg.nats_stream.clone(),
        reason,
    };
    // Two instances starting together can race to create it: re-read once.
    for _ in 0..3 {
        match js.get_stream(&cfg.nats_stream).await {
            Ok(mut stream) => {
                let existing = stream
                    .info()
                    .await
                    .map_err(|e| err(e.to_string()))?
                    .config
                    .clone();
                let diffs = stream_differences(&existing, cfg);
                if diffs.is_empty() {
                    return Ok(());
                }
                if !cfg.nats_manage_stream {
                    return Err(NatsError::StreamMismatch {
                        stream: cfg.nats_stream.clone(),
                        differences: diffs,
                    });
                }
                if existing.storage != stream::StorageType::File {
                    return Err(err(
                        "its storage type cannot be changed in place; move its messages elsewhere and delete it (`nats stream rm`), then start Tally again".into(),
                    ));
                }
                let mut updated = existing;
                updated.subjects = cfg.nats_subjects.clone();
                if let Some(age) = cfg.nats_stream_max_age {
                    updated.max_age = age;
                }
                js.update_stream(updated)
                    .await
                    .map_err(|e| err(format!("update failed: {e}")))?;
                tracing::warn!(stream = %cfg.nats_stream, changes = ?diffs, "updated the JetStream stream to Tally's settings");
                return Ok(());
            }
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(je)
                    if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    match js.create_stream(wanted_stream(cfg)).await {
                        Ok(_) => {
                            tracing::info!(stream = %cfg.nats_stream, subjects = ?cfg.nats_subjects, "created the JetStream stream");
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "stream creation raced; reading it again");
                            continue;
                        }
                    }
                }
                _ => return Err(err(e.to_string())),
            },
        }
    }
    Err(err(
        "could neither create nor read it (another process keeps changing it?)".into(),
    ))
}

/// Creates or updates the durable pull consumer, so config changes apply on restart.
pub async fn ensure_consumer(js: &Context, cfg: &NatsConfig) -> Result<PullConsumer, NatsError> {
    let mut config = pull::Config {
        durable_name: Some(cfg.nats_consumer.clone()),
        description: Some("Tally event log writer".into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: cfg.nats_ack_wait,
        max_ack_pending: cfg.nats_max_ack_pending,
        ..Default::default()
    };
    // Filter on Tally's subjects so nothing else in a shared stream is read as events.
    match cfg.nats_subjects.as_slice() {
        [one] => config.filter_subject = one.clone(),
        many => config.filter_subjects = many.to_vec(),
    }
    js.create_consumer_on_stream(config, &cfg.nats_stream)
        .await
        .map_err(|e| NatsError::Consumer {
            consumer: cfg.nats_consumer.clone(),
            reason: e.to_string(),
        })
}

/// The running NATS intake. Build with [`NatsIntake::start`], then [`NatsIntake::run`].
pub struct NatsIntake {
    client: Client,
    js: Context,
    cfg: NatsConfig,
    intake: Intake,
    health: Arc<Health>,
}

/// Where a delivered message came from and how to ack it.
#[derive(Debug)]
struct Delivery {
    reply: Option<Subject>,
    subject: Subject,
    stream_seq: u64,
    msg_id: Option<String>,
}

/// A message's share of a batch.
#[derive(Debug)]
struct Span {
    events: Range<usize>,
    rejects: Range<usize>,
}

/// Messages decoded and validated, ready for one transaction.
#[derive(Debug, Default)]
struct Batch {
    deliveries: Vec<Delivery>,
    spans: Vec<Span>,
    events: Vec<Event>,
    rejects: Vec<Rejected>,
}

/// A committed batch: what to ack and what to tell producers.
struct Committed {
    acks: Vec<(Subject, AckKind)>,
    notices: Vec<RejectionNotice>,
}

/// The JSON published to the rejected subject for each refused message or item.
#[derive(Debug, Serialize)]
pub struct RejectionNotice {
    /// Subject the message was published on.
    pub subject: String,
    /// Its JetStream stream sequence.
    pub stream_sequence: u64,
    /// Its `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// `unparseable`, `invalid`, `conflict` or `refused` (the database refused it).
    pub kind: &'static str,
    /// The event id, when readable.
    pub event_id: Option<String>,
    /// Position of the item in the message body.
    pub index: Option<i32>,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl NatsIntake {
    /// Connects, makes sure the stream and consumer exist, and fails with a clear
    /// message when they cannot be set up as configured.
    pub async fn start(
        cfg: &NatsConfig,
        intake: Intake,
        health: Arc<Health>,
    ) -> Result<Self, NatsError> {
        let client = connect(&cfg.connection, "tally", Some(health.clone())).await?;
        let js = jetstream::new(client.clone());
        ensure_stream(&js, cfg).await?;
        ensure_consumer(&js, cfg).await?;
        tracing::info!(stream = %cfg.nats_stream, consumer = %cfg.nats_consumer, subjects = ?cfg.nats_subjects, "NATS ingest ready");
        Ok(Self {
            client,
            js,
            cfg: cfg.clone(),
            intake,
            health,
        })
    }

    /// Consumes until `shutdown`; then finishes and acks the batch in flight,
    /// giving up (without acking: JetStream redelivers) when `deadline` fires.
    pub async fn run(self, shutdown: CancellationToken, deadline: CancellationToken) {
        let this = Arc::new(self);
        let (to_writer, from_fetcher) = mpsc::channel::<Batch>(1);
        let (to_acker, from_writer) = mpsc::channel::<Committed>(2);
        let fetcher = tokio::spawn(this.clone().fetch_loop(to_writer, shutdown));
        let writer = tokio::spawn(this.clone().write_loop(from_fetcher, to_acker, deadline));
        this.ack_loop(from_writer).await;
        let _ = fetcher.await;
        let _ = writer.await;
        if let Err(e) = this.client.flush().await {
            tracing::warn!(error = %e, "could not flush NATS on shutdown");
        }
        tracing::info!("NATS ingest stopped");
    }

    /// Stage 1: pull messages, group them into batches, decode and validate.
    async fn fetch_loop(
        self: Arc<Self>,
        to_writer: mpsc::Sender<Batch>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        'subscribe: while !shutdown.is_cancelled() {
            let subscribed = async {
                let consumer = ensure_consumer(&self.js, &self.cfg)
                    .await
                    .map_err(|e| e.to_string())?;
                consumer
                    .stream()
                    .max_messages_per_batch(self.cfg.nats_batch.max(1))
                    .max_bytes_per_batch(self.batch_bytes())
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(|e| e.to_string())
            };
            let mut messages = match subscribed.await {
                Ok(m) => m,
                Err(e) => {
                    self.health.note_nats(NatsState::Down, &e);
                    if backoff.sleep(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            loop {
                let first = tokio::select! {
                    _ = shutdown.cancelled() => break 'subscribe,
                    next = messages.next() => next,
                };
                let mut pending = match first {
                    Some(Ok(m)) => vec![m],
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "pull stream error");
                        if matches!(
                            e.kind(),
                            pull::MessagesErrorKind::ConsumerDeleted
                                | pull::MessagesErrorKind::RequestLimitExceeded
                                | pull::MessagesErrorKind::PushBasedConsumer
                        ) {
                            continue 'subscribe;
                        }
                        if backoff.sleep(&shutdown).await {
                            break 'subscribe;
                        }
                        continue;
                    }
                    None => continue 'subscribe,
                };
                backoff.reset();
                // Fill the batch for at most `fetch_wait` after its first message.
                let until = tokio::time::Instant::now() + self.cfg.nats_fetch_wait;
                let mut broken = false;
                let budget = self.batch_bytes();
                let mut bytes = pending.iter().map(|m| m.payload.len()).sum::<usize>();
                while pending.len() < self.cfg.nats_batch && bytes < budget {
                    match tokio::time::timeout_at(until, messages.next()).await {
                        Ok(Some(Ok(m))) => {
                            bytes += m.payload.len();
                            pending.push(m);
                        }
                        Ok(Some(Err(e))) => {
                            tracing::debug!(error = %e, "pull stream error");
                            break;
                        }
                        Ok(None) => {
                            broken = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let batch = self.prepare(pending);
                if to_writer.send(batch).await.is_err() {
                    // The writer gave up (shutdown deadline): these are redelivered.
                    break 'subscribe;
                }
                if broken {
                    continue 'subscribe;
                }
            }
        }
    }

    /// The byte budget of one pull and one batch: the configured one, but
    /// never below the server's largest message, which must always fit.
    fn batch_bytes(&self) -> usize {
        let max_payload = self.client.server_info().max_payload;
        // JetStream counts subject and headers too: leave room for them.
        self.cfg.nats_batch_bytes.max(max_payload + 64 * 1024)
    }

    fn prepare(&self, messages: Vec<jetstream::Message>) -> Batch {
        let rules = self.intake.rules();
        let mut batch = Batch::default();
        for m in messages {
            if let Ok(info) = m.info() {
                if info.delivered > 1 {
                    crate::metrics::REDELIVERIES.add(&[], 1);
                }
                crate::metrics::set_nats_pending(info.pending);
            }
            let m = m.message;
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let content_type = header("Content-Type");
            let msg_id = header("Nats-Msg-Id");
            let stream_seq = m
                .reply
                .as_deref()
                .and_then(stream_sequence_of)
                .unwrap_or_default();
            let prepared = self.intake.prepare(
                &m.payload,
                content_type.as_deref(),
                Some(m.subject.as_str()),
                &rules,
            );
            let events = batch.events.len()..batch.events.len() + prepared.events.len();
            let rejects = batch.rejects.len()..batch.rejects.len() + prepared.rejects.len();
            batch.events.extend(prepared.events);
            batch.rejects.extend(prepared.rejects);
            batch.spans.push(Span { events, rejects });
            batch.deliveries.push(Delivery {
                reply: m.reply,
                subject: m.subject,
                stream_seq,
                msg_id,
            });
        }
        batch
    }

    /// Stage 2: append each batch in one transaction, retrying while the database is down.
    async fn write_loop(
        self: Arc<Self>,
        mut from_fetcher: mpsc::Receiver<Batch>,
        to_acker: mpsc::Sender<Committed>,
        deadline: CancellationToken,
    ) {
        while let Some(batch) = from_fetcher.recv().await {
            let Some(committed) = self.commit(batch, &deadline).await else {
                tracing::warn!("shutdown deadline reached with a batch not committed; JetStream will redeliver it");
                break;
            };
            if to_acker.send(committed).await.is_err() {
                break;
            }
        }
    }

    /// Commits a batch; `None` when the deadline fired first (nothing acked).
    async fn commit(&self, batch: Batch, deadline: &CancellationToken) -> Option<Committed> {
        let origin = batch_origin(&batch.deliveries);
        let started = Instant::now();
        let whole = self
            .retrying(&batch.deliveries, deadline, || {
                self.intake.append(&batch.events, &batch.rejects, &origin)
            })
            .await?;
        let outcomes = match whole {
            Ok(outcomes) => outcomes,
            // A row the database refuses (and validation did not catch) must not
            // block the stream: append message by message, isolating the row.
            Err(e) => {
                tracing::warn!(error = %e, messages = batch.deliveries.len(), "the database refused a batch; appending its messages one by one");
                self.commit_one_by_one(&batch, deadline).await?
            }
        };
        tracing::debug!(
            messages = batch.deliveries.len(),
            events = batch.events.len(),
            rejects = batch.rejects.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "NATS batch committed"
        );
        Some(verdicts(&batch, &outcomes))
    }

    /// Appends message by message, each with [`Intake::append_isolating`], so
    /// an event the database refuses is kept in `rejected_events` and its
    /// neighbours are counted. `None` only when the deadline fired.
    async fn commit_one_by_one(
        &self,
        batch: &Batch,
        deadline: &CancellationToken,
    ) -> Option<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.events.len());
        for (span, delivery) in batch.spans.iter().zip(&batch.deliveries) {
            let origin = Origin {
                source: "nats",
                subject: Some(delivery.subject.to_string()),
            };
            let events = &batch.events[span.events.clone()];
            let rejects = &batch.rejects[span.rejects.clone()];
            let one = std::slice::from_ref(delivery);
            match self
                .retrying(one, deadline, || {
                    self.intake.append_isolating(events, rejects, &origin)
                })
                .await?
            {
                Ok(o) => outcomes.extend(o),
                Err(e) => {
                    // Even the plainest record was refused: the message is
                    // terminated (it stays in the stream until its max age)
                    // rather than stopping ingest for every other message.
                    tracing::error!(error = %e, subject = %delivery.subject, stream_sequence = delivery.stream_seq, "the database refuses this message and its rejection record; terminating it, it stays in the stream");
                    outcomes.extend(events.iter().map(|_| Outcome::Refused));
                }
            }
        }
        Some(outcomes)
    }

    /// Runs one store call until it succeeds or fails on the data; transient
    /// failures (connection, pool, timeout) are retried with capped backoff and
    /// the deliveries kept alive meanwhile. `None` when the deadline fired.
    async fn retrying<T, F, Fut>(
        &self,
        deliveries: &[Delivery],
        deadline: &CancellationToken,
        mut op: F,
    ) -> Option<Result<T, StoreError>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = Backoff::new();
        let mut last_progress = Instant::now();
        loop {
            let result = tokio::select! {
                r = op() => r,
                _ = deadline.cancelled() => return None,
            };
            match result {
                Ok(v) => {
                    self.health.note_database(true, None);
                    return Some(Ok(v));
                }
                Err(e) if e.is_data_error() => return Some(Err(e)),
                Err(e) => {
                    self.health.note_database(false, Some(&e.to_string()));
                    // Tell the server we are still on it, so it does not redeliver
                    // these messages to another instance while we wait.
                    if last_progress.elapsed() >= self.cfg.nats_ack_wait / 3 {
                        for d in deliveries {
                            if let Some(reply) = &d.reply {
                                let _ = self
                                    .client
                                    .publish(reply.clone(), Bytes::from(AckKind::Progress))
                                    .await;
                            }
                        }
                        last_progress = Instant::now();
                    }
                    if backoff.sleep(deadline).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Stage 3: publish notices, then ack and wait for the server's confirmations.
    async fn ack_loop(&self, mut from_writer: mpsc::Receiver<Committed>) {
        while let Some(committed) = from_writer.recv().await {
            for notice in &committed.notices {
                match serde_json::to_vec(notice) {
                    Ok(body) => {
                        let _ = self
                            .client
                            .publish(self.cfg.nats_rejected_subject.clone(), body.into())
                            .await;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not encode a rejection notice"),
                }
            }
            let total = committed.acks.len();
            match confirm_acks(&self.client, &committed.acks, Duration::from_secs(10)).await {
                Ok(confirmed) if confirmed == total => {}
                Ok(confirmed) => tracing::warn!(
                    confirmed,
                    total,
                    "some acks were not confirmed; those messages will be redelivered and counted as duplicates, not twice"
                ),
                Err(e) => tracing::warn!(error = %e, total, "acks could not be sent; the messages will be redelivered and deduplicated"),
            }
        }
    }
}

/// Decides each message's ack and the notices to publish.
///
/// A message is terminated (`AckKind::Term`, never redelivered) when nothing
/// in it can be counted; a message with at least one stored event is acked,
/// and its invalid items are reported.
fn verdicts(batch: &Batch, outcomes: &[Outcome]) -> Committed {
    let mut acks = Vec::with_capacity(batch.deliveries.len());
    let mut notices = Vec::new();
    for (span, d) in batch.spans.iter().zip(&batch.deliveries) {
        let notice = |kind: &'static str,
                      event_id: Option<String>,
                      index: Option<i32>,
                      reason: String| RejectionNotice {
            subject: d.subject.to_string(),
            stream_sequence: d.stream_seq,
            msg_id: d.msg_id.clone(),
            kind,
            event_id,
            index,
            reason,
        };
        for r in &batch.rejects[span.rejects.clone()] {
            notices.push(notice(
                r.kind.as_str(),
                r.event_id.clone(),
                r.item_index,
                r.reason.clone(),
            ));
        }
        let mut counted = false;
        for (position, i) in span.events.clone().enumerate() {
            let id = &batch.events[i].id;
            match outcomes.get(i) {
                Some(Outcome::Conflict) => {
                    counted = true;
                    notices.push(notice(
                        "conflict",
                        Some(id.clone()),
                        None,
                        format!("id `{id}` is already stored with different content; the stored event is kept (details in rejected_events)"),
                    ));
                }
                Some(Outcome::Refused) => notices.push(notice(
                    "refused",
                    Some(id.clone()),
                    i32::try_from(position).ok(),
                    "the database refused this event; it is kept in rejected_events (kind `refused`) with the database's reason".into(),
                )),
                _ => counted = true,
            }
        }
        if let Some(reply) = &d.reply {
            // Terminated (never redelivered) when nothing in it can be counted.
            acks.push((
                reply.clone(),
                if counted { AckKind::Ack } else { AckKind::Term },
            ));
        }
    }
    Committed { acks, notices }
}

/// Sends every ack with a reply subject under one inbox and counts the
/// server's confirmations: one round trip for the whole batch.
async fn confirm_acks(
    client: &Client,
    acks: &[(Subject, AckKind)],
    timeout: Duration,
) -> Result<usize, async_nats::Error> {
    if acks.is_empty() {
        return Ok(0);
    }
    let inbox = client.new_inbox();
    let mut confirmations = client.subscribe(format!("{inbox}.*")).await?;
    for (i, (reply, kind)) in acks.iter().enumerate() {
        client
            .publish_with_reply(reply.clone(), format!("{inbox}.{i}"), Bytes::from(*kind))
            .await?;
    }
    client.flush().await?;
    let until = tokio::time::Instant::now() + timeout;
    let mut confirmed = 0;
    while confirmed < acks.len() {
        match tokio::time::timeout_at(until, confirmations.next()).await {
            Ok(Some(_)) => confirmed += 1,
            _ => break,
        }
    }
    let _ = confirmations.unsubscribe().await;
    Ok(confirmed)
}

/// The batch's subject when all its messages share one; rejects carry their own.
fn batch_origin(deliveries: &[Delivery]) -> Origin {
    let first = deliveries.first().map(|d| d.subject.as_str());
    let same = deliveries.iter().all(|d| Some(d.subject.as_str()) == first);
    Origin {
        source: "nats",
        subject: if same {
            first.map(str::to_string)
        } else {
            None
        },
    }
}

/// The stream sequence from a JetStream ack subject
/// (`$JS.ACK[.domain.hash].stream.consumer.delivered.sseq.cseq.ts.pending[.token]`).
fn stream_sequence_of(reply: &str) -> Option<u64> {
    let tokens: Vec<&str> = reply.split('.').collect();
    let n = tokens.len();
    // v1 has 9 tokens; v2 has 12 (or 11 without the trailing token after pending).
    let idx = match n {
        9 => 5,
        n if n >= 11 => 7,
        _ => return None,
    };
    tokens.get(idx)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::stream_sequence_of;

    #[test]
    fn stream_sequence_is_read_from_both_ack_subject_formats() {
        assert_eq!(
            stream_sequence_of("$JS.ACK.USAGE.tally.1.42.40.1700000000000000000.7"),
            Some(42)
        );
        assert_eq!(
            stream_sequence_of("$JS.ACK.dom.hash.USAGE.tally.2.43.41.1700000000000000000.0.tok"),
            Some(43)
        );
        assert_eq!(stream_sequence_of("_INBOX.abc"), None);
    }
}
