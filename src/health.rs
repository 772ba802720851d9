//! Readiness state shared by the background tasks (which see failures first)
//! and `/readyz` (which reports them). Each change is logged once, not on every
//! probe or retry.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// What Tally knows about its dependencies. Share it in an `Arc`.
#[derive(Debug)]
pub struct Health {
    db_up: AtomicBool,
    nats: AtomicU8,
}

/// State of the NATS connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsState {
    /// `TALLY_NATS_URL` is not set: HTTP ingest only.
    Disabled,
    /// Connected and consuming.
    Up,
    /// Disconnected; the client reconnects by itself.
    Down,
}

impl NatsState {
    /// The word `/readyz` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            NatsState::Disabled => "disabled",
            NatsState::Up => "up",
            NatsState::Down => "down",
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Self {
            db_up: AtomicBool::new(true),
            nats: AtomicU8::new(NatsState::Disabled as u8),
        }
    }
}

impl Health {
    /// Records the database state; logs when it changed.
    pub fn note_database(&self, up: bool, error: Option<&str>) {
        if self.db_up.swap(up, Ordering::Relaxed) != up {
            database_state_changed(up, error);
        }
    }

    /// Last known database state.
    pub fn database_up(&self) -> bool {
        self.db_up.load(Ordering::Relaxed)
    }

    /// Records the NATS state; logs when it changed.
    pub fn note_nats(&self, state: NatsState, detail: &str) {
        let old = self.nats.swap(state as u8, Ordering::Relaxed);
        if old != state as u8 {
            nats_state_changed(state, detail);
        }
    }

    /// Last known NATS state.
    pub fn nats(&self) -> NatsState {
        match self.nats.load(Ordering::Relaxed) {
            x if x == NatsState::Up as u8 => NatsState::Up,
            x if x == NatsState::Down as u8 => NatsState::Down,
            _ => NatsState::Disabled,
        }
    }
}

/// The database changed between reachable and unreachable; logged once per change.
fn database_state_changed(up: bool, error: Option<&str>) {
    if up {
        tracing::info!("database is reachable again");
    } else {
        tracing::warn!(error = error.unwrap_or(""), "database is unreachable");
    }
}

/// The NATS connection changed state; logged once per change.
fn nats_state_changed(state: NatsState, detail: &str) {
    match state {
        NatsState::Up => tracing::info!(detail, "NATS is connected"),
        NatsState::Down => {
            tracing::warn!(
                detail,
                "NATS is unreachable; HTTP ingest keeps working, NATS ingest resumes on reconnect"
            )
        }
        NatsState::Disabled => {}
    }
}
