//! The outbox relay: publishes unsent notifications to JetStream, in outbox
//! order, and marks each sent only after the stream acknowledged it.
//!
//! A crash between the ack and the mark re-publishes the row on restart with
//! the same `Nats-Msg-Id` (`<fingerprint>:<sequence>`), which the stream
//! drops as a duplicate within its duplicate window (`--alerts-dedup-window`,
//! default 1h). NATS being down only delays the rows: they stay unsent and
//! the relay retries with backoff. One instance relays at a time (the
//! `alerts.relay` lease).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::lease::{Lease, LeaseKind};
use crate::nats::NatsConnection;
use crate::store::{Alerts, Store};

/// The lease name of the relay.
pub const RELAY_LEASE: &str = "alerts.relay";

/// Where notifications go.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// NATS server and credentials.
    pub connection: NatsConnection,
    /// Stream name (`USAGE_ALERTS`).
    pub stream: String,
    /// Subjects of the stream: `<prefix>.>`.
    pub subject_prefix: String,
    /// The stream's duplicate window (how long a re-publish is recognised).
    pub dedup_window: Duration,
    /// Lease length.
    pub lease_ttl: Duration,
}

/// Most notifications published before their acks are awaited.
const BATCH: i64 = 256;

/// The stream Tally creates when it is missing.
pub fn wanted_stream(cfg: &RelayConfig) -> stream::Config {
    stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        duplicate_window: cfg.dedup_window,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Publishes up to [`BATCH`] unsent rows; returns how many were acknowledged.
/// Stops at the first failure (the rest stay unsent, in order).
pub async fn publish_some(store: &Alerts, js: &jetstream::Context) -> Result<usize, String> {
    let rows = store
        .unsent_notifications(BATCH)
        .await
        .map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut pending = Vec::with_capacity(rows.len());
    let mut failure = None;
    for row in &rows {
        let msg = PublishMessage::build()
            .payload(row.n.payload.clone().into_bytes().into())
            .message_id(format!("{}:{}", row.n.fingerprint, row.n.sequence))
            .header("Tally-Alert-State", row.n.state.as_str());
        match js.send_publish(row.n.subject.clone(), msg).await {
            Ok(ack) => pending.push((row.id, ack)),
            Err(e) => {
                failure = Some(format!("publish to {}: {e}", row.n.subject));
                break;
            }
        }
    }
    let mut acked = Vec::with_capacity(pending.len());
    for ((id, ack), row) in pending.into_iter().zip(&rows) {
        match ack.await {
            Ok(a) => {
                crate::metrics::ALERTS_SENT.add(&[&row.n.severity, row.n.state.as_str()], 1);
                if a.duplicate {
                    tracing::debug!(
                        id,
                        "notification was already in the stream (re-publish after a crash)"
                    );
                }
                acked.push(id);
            }
            Err(e) => {
                failure.get_or_insert(format!("no ack from the stream: {e}"));
                break;
            }
        }
    }
    store
        .mark_sent(&acked, Utc::now())
        .await
        .map_err(|e| e.to_string())?;
    match failure {
        Some(f) if acked.is_empty() => Err(f),
        Some(f) => {
            tracing::warn!(error = %f, sent = acked.len(), "alert relay stopped mid-batch; retrying");
            Ok(acked.len())
        }
        None => Ok(acked.len()),
    }
}

/// Runs until `shutdown`: connects (retrying), makes sure the stream exists,
/// and publishes the outbox whenever woken or every half second.
pub async fn run(
    store: Store,
    cfg: RelayConfig,
    owner: String,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let js = loop {
        match crate::nats::connect(&cfg.connection, "tally-alerts", None).await {
            Ok(client) => {
                let js = jetstream::new(client);
                match js.get_or_create_stream(wanted_stream(&cfg)).await {
                    Ok(_) => break js,
                    Err(e) => {
                        tracing::warn!(stream = %cfg.stream, error = %e, "alert stream unavailable; notifications wait in the outbox")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "NATS unreachable; alert notifications wait in the outbox")
            }
        }
        if backoff.sleep(&shutdown).await {
            return;
        }
    };
    backoff.reset();
    let mut lease = Lease::new(LeaseKind::Named, RELAY_LEASE, &owner, cfg.lease_ttl);
    while !shutdown.is_cancelled() {
        if !lease.keep(store.leases()).await.held() {
            lease.wait(&shutdown).await;
            continue;
        }
        match publish_some(store.alerts(), &js).await {
            Ok(n) if n as i64 == BATCH => {
                backoff.reset();
                continue;
            }
            Ok(_) => {
                backoff.reset();
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "alert relay cannot publish; retrying");
                if backoff.sleep(&shutdown).await {
                    break;
                }
            }
        }
    }
    lease.release(store.leases()).await;
}
