//! Due-time arithmetic for the retry consumer.
//!
//! The retry consumer never polls for due records: when the head record of a tier partition is
//! not yet due, that partition is paused and the partition task sleeps until the due time, then
//! resumes it. These functions decide how long to wait and reject due times that no sidetrack
//! producer could have written.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far in the future, beyond the tier delay and jitter, a due time may lie before the
/// record is treated as forged. Covers clock skew between instances.
pub(crate) const DUE_SLACK: Duration = Duration::from_secs(60);

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How long to wait for a record due at `due_ms`, seen at `now_ms`, on a tier whose records
/// can be due at most `max_delay` after they were written.
///
/// `Ok(None)` means due now; `Err` says why the due time cannot be genuine.
pub(crate) fn wait_for(
    due_ms: Option<i64>,
    now_ms: i64,
    max_delay: Duration,
) -> Result<Option<Duration>, String> {
    let due = due_ms.ok_or_else(|| "retry record has no due time".to_owned())?;
    if due <= now_ms {
        return Ok(None);
    }
    let wait = Duration::from_millis((due - now_ms) as u64);
    if wait > max_delay + DUE_SLACK {
        return Err(format!(
            "due time {due} is {}s away, more than this tier can schedule ({}s)",
            wait.as_secs(),
            (max_delay + DUE_SLACK).as_secs()
        ));
    }
    Ok(Some(wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_in_the_past_is_now() {
        assert_eq!(
            wait_for(Some(1_000), 5_000, Duration::from_secs(1)),
            Ok(None)
        );
        assert_eq!(
            wait_for(Some(5_000), 5_000, Duration::from_secs(1)),
            Ok(None)
        );
    }

    #[test]
    fn due_in_the_future_waits_exactly() {
        assert_eq!(
            wait_for(Some(6_500), 5_000, Duration::from_secs(30)),
            Ok(Some(Duration::from_millis(1_500)))
        );
    }

    #[test]
    fn forged_due_times_are_rejected() {
        assert!(wait_for(None, 5_000, Duration::from_secs(1)).is_err());
        let far = 5_000 + (Duration::from_secs(1) + DUE_SLACK).as_millis() as i64 + 1;
        assert!(wait_for(Some(far), 5_000, Duration::from_secs(1)).is_err());
        assert!(wait_for(Some(i64::MAX), 5_000, Duration::from_secs(600)).is_err());
    }
}
