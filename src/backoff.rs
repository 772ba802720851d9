//! Capped exponential backoff for loops that retry an outage (database, NATS),
//! with jitter: each wait is drawn between half and all of its step, so
//! instances that failed together (one database outage) do not retry in
//! lockstep.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// 100 ms doubling to 5 s, each wait drawn in `[step/2, step]`; reset after a success.
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

    /// The next wait (the step, jittered), and the step after it.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Sleeps; `true` when `stop` fired instead.
    pub async fn sleep(&mut self, stop: &CancellationToken) -> bool {
        let d = self.next_wait();
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop.cancelled() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_jittered_within_their_step() {
        let mut firsts = Vec::new();
        for _ in 0..64 {
            let mut b = Backoff::new();
            let mut step = Duration::from_millis(100);
            for i in 0..10 {
                let w = b.next_wait();
                assert!(
                    w >= step / 2 && w <= step,
                    "wait {i}: {w:?} outside [{:?}, {step:?}]",
                    step / 2
                );
                if i == 0 {
                    firsts.push(w);
                }
                step = (step * 2).min(Duration::from_secs(5));
            }
        }
        firsts.sort();
        firsts.dedup();
        assert!(
            firsts.len() > 32,
            "instances would retry in lockstep: {firsts:?}"
        );
    }
}
