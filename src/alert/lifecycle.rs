//! The life of one alert instance (rule + level + group), as a pure function
//! of its stored state, whether the condition holds now, and the time:
//!
//! ```text
//! inactive ──holds──▶ pending ──held for `for`──▶ firing ──stopped for `keep_firing_for`──▶ resolved
//!     ▲                  │ (for = 0: straight to firing)   │ repeat_every: firing again          │
//!     └──────────────────┘ stops holding                   ▼                                     │
//!                                                     (notify)            holds again ◀──────────┘
//! ```
//!
//! Only `firing` (first or repeated) and `resolved` send a notification; each
//! has the instance's next `sequence` number, so `<fingerprint>:<sequence>`
//! names one transition forever.

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use crate::store::alerts::{AlertState, Life};

/// The timing settings of a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// Hold this long before firing.
    pub for_: Duration,
    /// Stay firing this long after the condition stops.
    pub keep_firing_for: Duration,
    /// Re-notify a firing alert this often.
    pub repeat_every: Option<Duration>,
}

/// What [`advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The persisted fields changed (the instance must be written).
    pub dirty: bool,
    /// A notification to send, with `life.sequence` as its number.
    pub notify: Option<AlertState>,
}

fn elapsed(since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Duration {
    since
        .and_then(|s| (now - s).to_std().ok())
        .unwrap_or(Duration::ZERO)
}

/// Moves `life` on by one evaluation at `now`.
pub fn advance(life: &mut Life, timing: &Timing, holds: bool, now: DateTime<Utc>) -> Change {
    let quiet = |dirty| Change {
        dirty,
        notify: None,
    };
    let fire = |life: &mut Life| {
        life.state = AlertState::Firing;
        life.firing_since = Some(now);
        life.last_sent = Some(now);
        life.resolved_at = None;
        life.sequence += 1;
        Change {
            dirty: true,
            notify: Some(AlertState::Firing),
        }
    };
    match (life.state, holds) {
        (AlertState::Inactive | AlertState::Resolved, false) => quiet(false),
        (AlertState::Inactive | AlertState::Resolved, true) => {
            life.active_since = Some(now);
            life.last_true = Some(now);
            if timing.for_.is_zero() {
                fire(life)
            } else {
                life.state = AlertState::Pending;
                quiet(true)
            }
        }
        (AlertState::Pending, true) => {
            life.last_true = Some(now);
            if elapsed(life.active_since, now) >= timing.for_ {
                fire(life)
            } else {
                // last_true only matters once firing: no write needed.
                quiet(false)
            }
        }
        (AlertState::Pending, false) => {
            life.state = AlertState::Inactive;
            life.active_since = None;
            quiet(true)
        }
        (AlertState::Firing, true) => {
            life.last_true = Some(now);
            if let Some(every) = timing.repeat_every {
                if elapsed(life.last_sent, now) >= every {
                    life.last_sent = Some(now);
                    life.sequence += 1;
                    return Change {
                        dirty: true,
                        notify: Some(AlertState::Firing),
                    };
                }
            }
            // Persisted only when a restart needs it to time keep_firing_for.
            quiet(!timing.keep_firing_for.is_zero())
        }
        (AlertState::Firing, false) => {
            if elapsed(life.last_true, now) >= timing.keep_firing_for {
                life.state = AlertState::Resolved;
                life.resolved_at = Some(now);
                life.last_sent = Some(now);
                life.sequence += 1;
                Change {
                    dirty: true,
                    notify: Some(AlertState::Resolved),
                }
            } else {
                quiet(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("valid time")
    }

    /// Runs a sequence of (second, holds) and returns the notifications sent.
    fn run(timing: Timing, steps: &[(i64, bool)]) -> Vec<(i64, AlertState, i64)> {
        let mut life = Life::default();
        let mut sent = Vec::new();
        for &(s, holds) in steps {
            if let Some(n) = advance(&mut life, &timing, holds, t(s)).notify {
                sent.push((s, n, life.sequence));
            }
        }
        sent
    }

    #[test]
    fn fires_and_resolves_once_each() {
        let sent = run(
            Timing::default(),
            &[
                (0, false),
                (1, true),
                (2, true),
                (3, true),
                (4, false),
                (5, false),
            ],
        );
        assert_eq!(
            sent,
            vec![(1, AlertState::Firing, 1), (4, AlertState::Resolved, 2)]
        );
    }

    #[test]
    fn a_spike_shorter_than_for_sends_nothing() {
        let timing = Timing {
            for_: Duration::from_secs(10),
            ..Timing::default()
        };
        assert!(run(timing, &[(0, true), (5, true), (9, false), (12, false)]).is_empty());
        let sent = run(timing, &[(0, true), (5, true), (10, true), (11, false)]);
        assert_eq!(
            sent,
            vec![(10, AlertState::Firing, 1), (11, AlertState::Resolved, 2)]
        );
    }

    #[test]
    fn keep_firing_for_absorbs_flapping() {
        let timing = Timing {
            keep_firing_for: Duration::from_secs(30),
            ..Timing::default()
        };
        let steps: Vec<(i64, bool)> = (0..20)
            .map(|i| (i * 5, i % 2 == 0))
            .chain([(200, false)])
            .collect();
        let sent = run(timing, &steps);
        assert_eq!(
            sent,
            vec![(0, AlertState::Firing, 1), (200, AlertState::Resolved, 2)]
        );
    }

    #[test]
    fn repeat_every_renotifies_with_new_sequence_numbers() {
        let timing = Timing {
            repeat_every: Some(Duration::from_secs(60)),
            ..Timing::default()
        };
        let sent = run(
            timing,
            &[
                (0, true),
                (30, true),
                (60, true),
                (90, true),
                (120, true),
                (121, false),
            ],
        );
        assert_eq!(
            sent,
            vec![
                (0, AlertState::Firing, 1),
                (60, AlertState::Firing, 2),
                (120, AlertState::Firing, 3),
                (121, AlertState::Resolved, 4)
            ]
        );
    }
}
