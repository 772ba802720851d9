//! Which bucket an instant falls in.
//!
//! Buckets are identified by their first instant, stored in UTC. Minutes are
//! UTC minutes. Hours are local hours: the instant minus the local minutes and
//! seconds past the hour, which also keeps the two 01:00 hours of a DST
//! fall-back apart (they are different instants) and gives `+05:30` zones
//! hours that start at :30 UTC, so local days are whole hours. Days and months
//! start at the first instant whose local date is that day (midnight, or the
//! end of the gap where a zone springs forward at midnight).

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use super::spec::Granularity;

/// The start of the bucket of `granularity` in `tz` that contains `ts`.
pub fn bucket_start(ts: DateTime<Utc>, granularity: Granularity, tz: Tz) -> DateTime<Utc> {
    if tz == Tz::UTC && granularity != Granularity::Month {
        // Fixed-length buckets: plain arithmetic, no zone lookups (the hot path).
        let len: i64 = match granularity {
            Granularity::Minute => 60_000_000,
            Granularity::Hour => 3_600_000_000,
            _ => 86_400_000_000,
        };
        let us = ts.timestamp_micros();
        return DateTime::from_timestamp_micros(us - us.rem_euclid(len)).unwrap_or(ts);
    }
    let local = ts.with_timezone(&tz);
    match granularity {
        Granularity::Minute => {
            ts - Duration::seconds(i64::from(ts.second()))
                - Duration::nanoseconds(i64::from(ts.nanosecond()))
        }
        Granularity::Hour => {
            ts - Duration::seconds(i64::from(local.minute() * 60 + local.second()))
                - Duration::nanoseconds(i64::from(local.nanosecond()))
        }
        Granularity::Day => day_start(local.date_naive(), tz),
        Granularity::Month => {
            let first = local.date_naive().with_day(1).unwrap_or(local.date_naive());
            day_start(first, tz)
        }
    }
}

/// The first instant of a local date.
pub fn day_start(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let midnight = date.and_time(chrono::NaiveTime::MIN);
    // A zone that springs forward at midnight has no 00:00 that day; the day
    // starts where the gap ends. Gaps are at most a few hours and 15-minute aligned.
    for quarter in 0..=4 * 24 {
        let candidate = midnight + Duration::minutes(15 * quarter);
        if let Some(t) = tz.from_local_datetime(&candidate).earliest() {
            return t.with_timezone(&Utc);
        }
    }
    midnight.and_utc()
}

/// The start of the bucket after the one starting at `start`.
pub fn next_bucket(start: DateTime<Utc>, granularity: Granularity, tz: Tz) -> DateTime<Utc> {
    match granularity {
        Granularity::Minute => start + Duration::minutes(1),
        Granularity::Hour => bucket_start(start + Duration::hours(1), granularity, tz),
        Granularity::Day => {
            let date = start.with_timezone(&tz).date_naive();
            day_start(date + Duration::days(1), tz)
        }
        Granularity::Month => {
            let date = start.with_timezone(&tz).date_naive();
            let (y, m) = if date.month() == 12 {
                (date.year() + 1, 1)
            } else {
                (date.year(), date.month() + 1)
            };
            let first = NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(date);
            day_start(first, tz)
        }
    }
}

/// The first instant of the month of `t` in `tz`.
pub fn month_start(t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let local = t.with_timezone(&tz).date_naive();
    let first = NaiveDate::from_ymd_opt(local.year(), local.month(), 1).unwrap_or(local);
    day_start(first, tz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("rfc3339")
            .with_timezone(&Utc)
    }

    #[test]
    fn new_york_fall_back_day_has_25_hours_and_two_one_oclock_hours() {
        let tz: Tz = "America/New_York".parse().expect("tz");
        // 2026-11-01: clocks go back from 02:00 EDT to 01:00 EST.
        let day = bucket_start(at("2026-11-01T12:00:00Z"), Granularity::Day, tz);
        assert_eq!(day, at("2026-11-01T04:00:00Z"));
        assert_eq!(
            next_bucket(day, Granularity::Day, tz),
            at("2026-11-02T05:00:00Z")
        );
        let first_one = bucket_start(at("2026-11-01T05:30:00Z"), Granularity::Hour, tz);
        let second_one = bucket_start(at("2026-11-01T06:30:00Z"), Granularity::Hour, tz);
        assert_eq!(first_one, at("2026-11-01T05:00:00Z"));
        assert_eq!(second_one, at("2026-11-01T06:00:00Z"));
    }

    #[test]
    fn berlin_spring_forward_day_has_23_hours() {
        let tz: Tz = "Europe/Berlin".parse().expect("tz");
        let day = bucket_start(at("2026-03-29T10:00:00Z"), Granularity::Day, tz);
        assert_eq!(day, at("2026-03-28T23:00:00Z"));
        assert_eq!(
            next_bucket(day, Granularity::Day, tz),
            at("2026-03-29T22:00:00Z")
        );
    }

    #[test]
    fn kolkata_hours_start_at_half_past_utc() {
        let tz: Tz = "Asia/Kolkata".parse().expect("tz");
        let hour = bucket_start(at("2026-02-28T20:10:00Z"), Granularity::Hour, tz);
        assert_eq!(hour, at("2026-02-28T19:30:00Z"));
        assert_eq!(
            next_bucket(hour, Granularity::Hour, tz),
            at("2026-02-28T20:30:00Z")
        );
        // 2026-02-28T20:10Z is 01:40 on 1 March in Kolkata.
        let month = bucket_start(at("2026-02-28T20:10:00Z"), Granularity::Month, tz);
        assert_eq!(month, at("2026-02-28T18:30:00Z"));
    }

    #[test]
    fn leap_day_and_month_end_in_utc() {
        let tz = Tz::UTC;
        assert_eq!(
            bucket_start(at("2028-02-29T23:59:59.999999Z"), Granularity::Day, tz),
            at("2028-02-29T00:00:00Z")
        );
        let month = bucket_start(at("2028-02-29T23:59:59Z"), Granularity::Month, tz);
        assert_eq!(month, at("2028-02-01T00:00:00Z"));
        assert_eq!(
            next_bucket(month, Granularity::Month, tz),
            at("2028-03-01T00:00:00Z")
        );
        assert_eq!(
            bucket_start(at("2026-12-31T23:59:30.5Z"), Granularity::Minute, tz),
            at("2026-12-31T23:59:00Z")
        );
    }

    #[test]
    fn santiago_day_starting_in_a_gap_starts_at_one() {
        // Chile springs forward at 24:00 → 01:00 on the first Sunday of September.
        let tz: Tz = "America/Santiago".parse().expect("tz");
        let day = bucket_start(at("2026-09-06T12:00:00Z"), Granularity::Day, tz);
        assert_eq!(day.with_timezone(&tz).hour(), 1);
    }
}
