//! Due-time arithmetic for the retry consumer.
//!
//! The retry consumer never polls for due records: when the head record of a tier partition is
//! not yet due, that partition is paused and the partition task sleeps until the due time, then
//! resumes it. These functions decide how long to wait and reject due times that no sidetrack
//! producer could have written. All of them are total: any `i64` from the wire gives an answer,
//! never an overflow.
//!
//! The due time was computed on the writer's clock, and so was the retry record's own
//! timestamp (the runtime sets it explicitly when it hands the record off). Comparing the two
//! is therefore free of clock skew between instances: a due time is genuine when it lies
//! between the record's timestamp and that timestamp plus the tier's longest delay. Only the
//! wait itself needs the reader's clock, and it is capped by the delay the writer meant
//! (`due − timestamp`): a reader whose clock is behind the writer's still handles the record
//! that long after reading it, which is at least that long after it was written.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far a due time may lie outside the range a tier can produce before the record is
/// treated as forged. Covers the gap between computing the due time and stamping the record,
/// and, for records without a usable timestamp, clock skew between instances.
pub(crate) const DUE_SLACK: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds of `d`, saturating at `i64::MAX`.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A non-negative millisecond difference as a `Duration` (0 if negative).
pub(crate) fn non_negative(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Seconds from `earlier` to `later` for a latency histogram: 0 if `later` is not after
/// `earlier`, saturating instead of overflowing (a record may carry any timestamp).
pub(crate) fn elapsed_secs(earlier: i64, later: i64) -> f64 {
    later.saturating_sub(earlier).max(0) as f64 / 1000.0
}

/// Checks that `due` is a due time a tier whose records are due at most `max_delay` after
/// they were written could have produced. `timestamp` is the retry record's own timestamp
/// (`None` or negative: unknown; then the reader's clock `now` is the reference).
pub(crate) fn check_due(
    due: Option<i64>,
    timestamp: Option<i64>,
    now: i64,
    max_delay: Duration,
) -> Result<i64, String> {
    let due = due.ok_or_else(|| "retry record has no due time".to_owned())?;
    let slack = millis(DUE_SLACK);
    let latest_delay = millis(max_delay).saturating_add(slack);
    match timestamp.filter(|t| *t >= 0) {
        Some(ts) => {
            let (earliest, latest) = (ts.saturating_sub(slack), ts.saturating_add(latest_delay));
            if due < earliest || due > latest {
                return Err(format!(
                    "due time {due} is outside what this tier schedules for a record written at \
                     {ts} ({earliest}..={latest})"
                ));
            }
        }
        None => {
            // Without a timestamp only the upper bound is checkable against our own clock; a
            // due time before the epoch is nothing sidetrack writes.
            if due < 0 || due > now.saturating_add(latest_delay) {
                return Err(format!(
                    "due time {due} is outside what this tier schedules (0..={})",
                    now.saturating_add(latest_delay)
                ));
            }
        }
    }
    Ok(due)
}

/// How long to wait, seen at `now`, for a record due at `due` (checked by [`check_due`])
/// whose own timestamp is `timestamp`: until the reader's clock passes the due time, but never
/// longer than the delay the writer meant (`due − timestamp`).
pub(crate) fn wait_for(due: i64, timestamp: Option<i64>, now: i64) -> Duration {
    let by_clock = due.saturating_sub(now);
    let meant = match timestamp.filter(|t| *t >= 0) {
        Some(ts) => due.saturating_sub(ts),
        None => by_clock,
    };
    non_negative(by_clock.min(meant))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: i64 = 1000;
    const TS: i64 = 1_700_000_000_000;

    #[test]
    fn due_within_the_tier_is_accepted() {
        let tier = Duration::from_secs(30);
        assert_eq!(
            check_due(Some(TS + 30 * SEC), Some(TS), TS, tier),
            Ok(TS + 30 * SEC)
        );
        // Replays write "due now", a hair before the record's own timestamp.
        assert!(check_due(Some(TS - 5), Some(TS), TS, tier).is_ok());
    }

    #[test]
    fn forged_due_times_are_rejected() {
        let tier = Duration::from_secs(1);
        assert!(check_due(None, Some(TS), TS, tier).is_err());
        assert!(check_due(Some(i64::MIN), Some(TS), TS, tier).is_err());
        assert!(check_due(Some(i64::MAX), Some(TS), TS, tier).is_err());
        let far = TS + millis(tier + DUE_SLACK) + 1;
        assert!(check_due(Some(far), Some(TS), TS, tier).is_err());
        let early = TS - millis(DUE_SLACK) - 1;
        assert!(check_due(Some(early), Some(TS), TS, tier).is_err());
        // No timestamp: checked against the reader's clock.
        assert!(check_due(Some(i64::MIN), None, TS, tier).is_err());
        assert!(check_due(Some(-1), Some(-1), TS, tier).is_err());
        assert!(check_due(Some(TS - 3_600 * SEC), None, TS, tier).is_ok());
    }

    /// The writer's clock is an hour ahead of the reader's: the due time is checked against the
    /// record's timestamp (same clock), so the retry is not dead-lettered as forged, and the
    /// wait is the tier's delay, not the delay plus the skew.
    #[test]
    fn clock_skew_between_instances_neither_rejects_nor_stretches() {
        let skew = 3_600 * SEC;
        let tier = Duration::from_secs(5);
        let (ts, due) = (TS + skew, TS + skew + 5 * SEC);
        assert!(check_due(Some(due), Some(ts), TS, tier).is_ok());
        assert_eq!(wait_for(due, Some(ts), TS), Duration::from_secs(5));
        // Reader ahead of the writer: due by the reader's clock already.
        assert_eq!(wait_for(TS + 5 * SEC, Some(TS), TS + skew), Duration::ZERO);
    }

    #[test]
    fn waits_until_due_by_the_clock() {
        assert_eq!(
            wait_for(TS + 1_500, Some(TS), TS),
            Duration::from_millis(1_500)
        );
        assert_eq!(
            wait_for(TS + 1_500, Some(TS), TS + 1_000),
            Duration::from_millis(500)
        );
        assert_eq!(wait_for(TS, Some(TS), TS + 1), Duration::ZERO);
        assert_eq!(wait_for(TS + 1_500, None, TS), Duration::from_millis(1_500));
    }

    #[test]
    fn latency_arithmetic_saturates() {
        assert_eq!(elapsed_secs(i64::MIN, i64::MAX), i64::MAX as f64 / 1000.0);
        assert_eq!(elapsed_secs(i64::MAX, i64::MIN), 0.0);
        assert_eq!(elapsed_secs(1_000, 3_000), 2.0);
    }

    proptest! {
        /// Any due time, timestamp and clock: an answer, never a panic; an accepted due time
        /// is never waited on for longer than the tier allows.
        #[test]
        fn any_input_gets_an_answer(
            due in proptest::option::of(any::<i64>()),
            ts in proptest::option::of(any::<i64>()),
            now in any::<i64>(),
            delay_ms in 0u64..=u64::MAX / 2,
        ) {
            let tier = Duration::from_millis(delay_ms);
            if let Ok(due) = check_due(due, ts, now, tier) {
                let wait = wait_for(due, ts, now);
                prop_assert!(wait <= tier.saturating_add(DUE_SLACK).saturating_add(DUE_SLACK));
            }
            let _ = elapsed_secs(due.unwrap_or(0), now);
        }
    }
}
