//! Human durations (`"30s"`, `"8d"`) with an upper bound, for every duration
//! Tally reads from flags, specs and rules.
//!
//! Without the bound, `"999999999999d"` parses (it fits in a `Duration`) but
//! overflows the first date subtraction it reaches, deep inside a job or a
//! validation, as a panic. Refusing it where it is read names the setting.

use std::time::Duration;

/// The longest duration accepted anywhere: 100 years.
pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a human duration and refuses one longer than [`MAX`]. The error
/// is meant to follow the name of the setting.
pub fn parse(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| e.to_string())?;
    if d > MAX {
        return Err(format!(
            "{text:?} is longer than {} years, the most Tally accepts",
            MAX.as_secs() / (365 * 86_400)
        ));
    }
    Ok(d)
}

/// A retention: how long to keep something, or forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Option<Duration>);

/// Parses a retention: a duration (as [`parse`]) or `forever`.
pub fn parse_keep(text: &str) -> Result<Keep, String> {
    match text.trim() {
        "forever" | "off" => Ok(Keep(None)),
        t => parse(t).map(|d| Keep(Some(d))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_durations_are_refused_and_sane_ones_read() {
        assert_eq!(parse("8d"), Ok(Duration::from_secs(8 * 86_400)));
        assert_eq!(parse(" 250ms "), Ok(Duration::from_millis(250)));
        assert!(parse("999999999999d").is_err_and(|e| e.contains("100 years")));
        assert!(parse("36501d").is_err());
        assert!(parse("soon").is_err());
    }
}
