//! What a tool acting on sidetrack's topics from outside a runtime needs from the library:
//! the `sidetrack` CLI uses this module, and holds no copy of library logic.
//!
//! Before this module existed the CLI carried its own copies of crate-private helpers (Kafka's
//! topic-name rule, the FNV-1a hash, the wall clock in milliseconds) and a group-membership
//! implementation of its own. Copies drift: a fix to one is not a fix to the other. So what
//! the CLI needs is public here, in one small module, documented like the rest of the API:
//!
//! - [`is_legal_topic`]: Kafka's rule for topic names, the one [`Config::validate`] applies,
//!   so a name read from a record (an envelope can hold any bytes) is checked before a broker
//!   is asked about it;
//! - [`fnv1a64`]: the stable 64-bit hash the runtime orders keys by, for names that must be
//!   the same on every build and Rust release (`DefaultHasher` promises neither);
//! - [`now_ms`] and [`epoch_ms`]: the wall clock as envelopes and timestamps write it;
//! - [`ProgressGroup`] and [`committed_offsets`]: a consumer-group membership used as a lock
//!   over a topic's partitions, with the group's committed offsets as the progress it guards
//!   (what makes `sidetrack dlq replay` safe to run twice, or from two places at once).
//!
//! Nothing here is on the per-record path of a runtime; it is separate from [`runtime`]
//! because a tool uses it without running handlers, and from [`dead_letter`] because it is
//! not about the dead-letter format (reading a DLQ is [`dead_letter::scan_report`]).
//!
//! [`Config::validate`]: crate::Config::validate
//! [`runtime`]: crate::runtime
//! [`dead_letter`]: crate::dead_letter
//! [`dead_letter::scan_report`]: crate::dead_letter::scan_report

mod progress;

pub use progress::{committed_offsets, ProgressError, ProgressGroup};

use std::time::{SystemTime, UNIX_EPOCH};

/// Whether `name` is a legal Kafka topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`, and
/// neither `.` nor `..`.
///
/// The same rule [`Config::validate`](crate::Config::validate) applies to configured topics
/// (it also says what is wrong; this only answers yes or no). Useful for names that come from
/// records: asking a broker about an illegal name gives an error that looks like an outage.
///
/// # Example
///
/// ```
/// use sidetrack::admin::is_legal_topic;
///
/// assert!(is_legal_topic("orders.billing.retry.30s"));
/// assert!(!is_legal_topic(".."));
/// assert!(!is_legal_topic("orders billing")); // a space: not in [a-zA-Z0-9._-]
/// assert!(!is_legal_topic(&"x".repeat(250))); // longer than 249
/// ```
pub fn is_legal_topic(name: &str) -> bool {
    crate::config::check_topic_name(name).is_ok()
}

/// 64-bit FNV-1a of `bytes`.
///
/// Stable across builds, platforms and Rust releases (unlike `DefaultHasher`), so it may name
/// things that must stay the same from one run to the next: the CLI derives a replay's default
/// progress group from it. Not a cryptographic hash: it only has to tell honest inputs apart.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// `t` in milliseconds since the Unix epoch, the unit of Kafka timestamps and of every time in
/// a sidetrack envelope: 0 for a time before the epoch, `i64::MAX` past what an `i64` holds
/// (saturating, so a clock set to the far future cannot make a time negative).
///
/// # Example
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use sidetrack::admin::epoch_ms;
///
/// assert_eq!(epoch_ms(UNIX_EPOCH + Duration::from_millis(1_500)), 1_500);
/// assert_eq!(epoch_ms(UNIX_EPOCH - Duration::from_secs(1)), 0); // before the epoch
/// ```
pub fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The wall clock now, in milliseconds since the Unix epoch (see [`epoch_ms`]).
pub fn now_ms() -> i64 {
    epoch_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_legal_topic_names_pass() {
        assert!(is_legal_topic("orders.billing-retry_1"));
        assert!(is_legal_topic(&"a".repeat(249)));
        for bad in ["", ".", "..", "a b", "a/b", "ü", "a\0b", &"a".repeat(250)] {
            assert!(!is_legal_topic(bad), "{bad:?}");
        }
    }

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn epoch_ms_saturates_at_both_ends() {
        use std::time::Duration;
        assert_eq!(epoch_ms(UNIX_EPOCH), 0);
        assert_eq!(epoch_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(epoch_ms(UNIX_EPOCH + Duration::from_millis(1_700)), 1_700);
        assert!(now_ms() > 1_600_000_000_000);
    }
}
