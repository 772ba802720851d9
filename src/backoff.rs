//! Capped exponential backoff for loops that retry an outage (database, NATS).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// 100 ms doubling to 5 s; reset after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }

    /// Back to 100 ms after a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    /// Sleeps; `true` when `stop` fired instead.
    pub async fn sleep(&mut self, stop: &CancellationToken) -> bool {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop.cancelled() => true,
        }
    }
}
