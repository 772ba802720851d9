//! Crash-test hooks: named points where `tally serve` aborts the way
//! `kill -9` would, with a probability set by `TALLY_FAILPOINTS`. Only the
//! crash tests set them; every point is off by default.

use std::sync::OnceLock;

/// Probabilities of aborting the process at its crash points,
/// set by `TALLY_FAILPOINTS=projector.before_commit=0.2,projector.after_commit=0.2`
/// (and `restate.before_commit`, `restate.between_tiers`, `restate.after_commit`,
/// `projector.drop_ring_feed`, `projector.fail_background_commit`).
/// Only the crash tests set them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Failpoints {
    /// Between writing the rows and committing.
    pub before_commit: f64,
    /// Right after the commit.
    pub after_commit: f64,
    /// A restatement, between writing its rows and committing.
    pub restate_before_commit: f64,
    /// A restatement, after one tier's commit and before the next tier's.
    pub restate_between_tiers: f64,
    /// A restatement on SQLite that wrote rows, after its last commit
    /// (aggregates file) and before its queue row is deleted (main file).
    pub restate_after_commit: f64,
    /// SQLite, opening a projection whose tables lack measure columns: after
    /// queueing its restatement (main file), before adding the columns
    /// (aggregates file) (`store.upgrade_queued`).
    pub upgrade_queued: f64,
    /// Not a crash: a committed minute slice is not handed to the alert
    /// ring, which must notice the gap and reload (`projector.drop_ring_feed`).
    pub drop_ring_feed: f64,
    /// Not a crash: a commit running in the background fails without
    /// writing, a while after it began (as when its connection is lost);
    /// the rows folded after it meanwhile must be read again
    /// (`projector.fail_background_commit`).
    pub fail_background_commit: f64,
}

impl Failpoints {
    /// Parses `name=probability` pairs; unknown names are an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut f = Failpoints::default();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, p) = pair
                .split_once('=')
                .ok_or_else(|| format!("failpoint `{pair}`: expected name=probability"))?;
            let p: f64 = p
                .parse()
                .map_err(|_| format!("failpoint `{pair}`: probability must be a number"))?;
            match name {
                "projector.before_commit" => f.before_commit = p,
                "projector.after_commit" => f.after_commit = p,
                "restate.before_commit" => f.restate_before_commit = p,
                "restate.between_tiers" => f.restate_between_tiers = p,
                "restate.after_commit" => f.restate_after_commit = p,
                "store.upgrade_queued" => f.upgrade_queued = p,
                "projector.drop_ring_feed" => f.drop_ring_feed = p,
                "projector.fail_background_commit" => f.fail_background_commit = p,
                _ => return Err(format!("unknown failpoint `{name}`; known: projector.before_commit, projector.after_commit, restate.before_commit, restate.between_tiers, restate.after_commit, store.upgrade_queued, projector.drop_ring_feed, projector.fail_background_commit")),
            }
        }
        Ok(f)
    }

    pub fn fires(p: f64) -> bool {
        p > 0.0 && rand::random::<f64>() < p
    }
}

/// The process's failpoints, for the layers that are not handed a config
/// (the store). Set once at start-up by [`arm`]; off until then.
static ARMED: OnceLock<Failpoints> = OnceLock::new();

/// Arms `f` for this process (the first call wins).
pub fn arm(f: Failpoints) {
    let _ = ARMED.set(f);
}

/// The armed failpoints (all off when none were armed).
pub fn armed() -> Failpoints {
    ARMED.get().copied().unwrap_or_default()
}

/// Test hook: stops the process the way `kill -9` would, at a named point.
pub fn abort(point: &str) -> ! {
    eprintln!("failpoint {point}: aborting");
    std::process::abort()
}
