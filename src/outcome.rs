//! The outcome vocabulary: what a handler's failure asks for ([`FailureKind`]), where a record
//! that did not succeed goes next ([`Disposition`]) and why a record was dead-lettered
//! ([`Reason`]).
//!
//! This file is the one place those words are defined, and it imports nothing from the crate:
//! the retry policy, the envelope, the dead-letter alerts, the metrics, the CLI and the test kit
//! all speak it, so none of them has to import another to name an outcome (this is what keeps
//! `retry/` and `dead_letter/` from importing each other).
//!
//! The wire strings live in one table beside the enum ([`Reason::as_str`], [`FromStr`], the
//! CLI's `--reason` values and help), the way async-nats keeps `AckKind` beside its bytes. They
//! are written into Kafka headers (`sidetrack-error-kind`) and metric labels, so they never
//! change: a dead letter written by any earlier version parses with this one.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Why a record was dead-lettered.
///
/// Its [`as_str`](Reason::as_str) form is the `sidetrack-error-kind` header value of a dead
/// letter, the `reason` label of the dead-letter metric and the value of the CLI's `--reason`.
///
/// # Example
///
/// The wire form round-trips, and is what a `sidetrack-error-kind` header, a metric label and
/// `sidetrack dlq list --reason` use:
///
/// ```
/// use sidetrack::Reason;
///
/// for reason in Reason::ALL {
///     assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
/// }
/// assert_eq!(Reason::InvalidEnvelope.to_string(), "invalid-envelope");
/// assert!("Exhausted".parse::<Reason>().is_err()); // exact, as the header is written
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Reason {
    /// The handler returned a permanent error.
    Permanent,
    /// The payload could not be decoded (a poison pill).
    Poison,
    /// Every retry failed.
    Exhausted,
    /// A record on a retry topic had a missing or corrupt envelope.
    InvalidEnvelope,
    /// The record was too large for its retry or dead-letter topic; it was dead-lettered
    /// without its payload, which stays readable at its original position while retained.
    Oversized,
    /// `keep_key_order`: the record would have been held behind its key's head, but the key
    /// already holds `max_held_per_key` records.
    KeyOrderFull,
    /// `keep_key_order`: the record was its key's head and the key had waited longer than
    /// `max_key_wait` when it came due; dead-lettering it releases the key.
    KeyOrderTimeout,
    /// `keep_key_order` with `on_dead_letter = "dead-letter-key"`: the record was held behind
    /// its key's head, and that head was dead-lettered.
    KeyDeadLettered,
}

/// The one table of reasons: the variant, its wire string, and a one-line description (CLI
/// help, no final period: clap prints it in a list). In declaration order, so `REASONS[r as usize].0 == r` (a test checks it); that makes
/// [`Reason::as_str`] an index, not a search.
const REASONS: [(Reason, &str, &str); 8] = [
    (
        Reason::Permanent,
        "permanent",
        "The handler said the failure is permanent",
    ),
    (Reason::Poison, "poison", "The payload could not be decoded"),
    (Reason::Exhausted, "exhausted", "All retries failed"),
    (
        Reason::InvalidEnvelope,
        "invalid-envelope",
        "A retry record had a missing or corrupt envelope",
    ),
    (
        Reason::Oversized,
        "oversized",
        "Too large for the retry/dead-letter topic; dead-lettered without its payload",
    ),
    (
        Reason::KeyOrderFull,
        "key-order-full",
        "Its key already held max_held_per_key records behind a retried record (keep_key_order)",
    ),
    (
        Reason::KeyOrderTimeout,
        "key-order-timeout",
        "Its key waited longer than max_key_wait behind it (keep_key_order)",
    ),
    (
        Reason::KeyDeadLettered,
        "key-dead-lettered",
        "Held behind a record of its key that was dead-lettered (on_dead_letter = dead-letter-key)",
    ),
];

/// The `sidetrack-error-kind` value of a record on a retry tier (it failed, and is not dead):
/// the one header value that is not a [`Reason`]. See [`error_kind_str`] and
/// [`parse_error_kind`].
pub const RETRYABLE: &str = "retryable";

impl Reason {
    /// Every reason, in a stable order (the declaration order).
    pub const ALL: [Reason; 8] = [
        Reason::Permanent,
        Reason::Poison,
        Reason::Exhausted,
        Reason::InvalidEnvelope,
        Reason::Oversized,
        Reason::KeyOrderFull,
        Reason::KeyOrderTimeout,
        Reason::KeyDeadLettered,
    ];

    /// The wire form: `sidetrack-error-kind` header value, metric label, CLI value.
    pub fn as_str(self) -> &'static str {
        REASONS[self as usize].1
    }

    /// A one-line description, for help texts.
    pub fn description(self) -> &'static str {
        REASONS[self as usize].2
    }

    /// Whether `keep_key_order`'s rules made this dead letter (a cap, or a dead-lettered
    /// head's followers), not the handler failing: the dead-letter breaker does not count
    /// these, or one hot key would pause every key of its partition.
    pub(crate) fn is_key_order(self) -> bool {
        matches!(
            self,
            Reason::KeyOrderFull | Reason::KeyOrderTimeout | Reason::KeyDeadLettered
        )
    }

    /// Index into per-reason arrays (`0..ALL.len()`).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not the wire form of a [`Reason`] (or, for [`parse_error_kind`], of
/// [`RETRYABLE`]). Holds the string as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error kind `{0}`")]
#[non_exhaustive]
pub struct UnknownReason(pub String);

impl FromStr for Reason {
    type Err = UnknownReason;

    /// The inverse of [`Reason::as_str`]; exact and case-sensitive, as the header is written.
    fn from_str(s: &str) -> Result<Self, UnknownReason> {
        REASONS
            .iter()
            .find(|(_, wire, _)| *wire == s)
            .map(|(r, _, _)| *r)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

/// The `sidetrack-error-kind` header value for a record dead-lettered for `reason`, or on a
/// retry tier (`None`: [`RETRYABLE`]).
pub fn error_kind_str(reason: Option<Reason>) -> &'static str {
    reason.map_or(RETRYABLE, Reason::as_str)
}

/// Reads a `sidetrack-error-kind` header value: `Ok(None)` for [`RETRYABLE`], `Ok(Some(_))` for
/// a dead-letter reason. The inverse of [`error_kind_str`].
///
/// # Example
///
/// ```
/// use sidetrack::outcome::{error_kind_str, parse_error_kind, RETRYABLE};
/// use sidetrack::Reason;
///
/// assert_eq!(parse_error_kind(RETRYABLE), Ok(None));
/// assert_eq!(parse_error_kind("exhausted"), Ok(Some(Reason::Exhausted)));
/// assert_eq!(error_kind_str(Some(Reason::Poison)), "poison");
/// // Exact and case-sensitive, as the header is written.
/// assert!(parse_error_kind("Exhausted").is_err());
/// ```
pub fn parse_error_kind(s: &str) -> Result<Option<Reason>, UnknownReason> {
    if s == RETRYABLE {
        Ok(None)
    } else {
        s.parse().map(Some)
    }
}

/// What a handler's failure asks for: what the handler *says*, before the retry policy
/// decides where the record *goes* (a [`Disposition`]).
///
/// Kept apart from [`Disposition`] because a handler chooses among these three only: it
/// cannot name a tier (the policy does, from the attempt count and any requested delay) nor
/// a reason the runtime finds for itself (`exhausted`, `invalid-envelope`, `oversized`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// Try again later on a retry tier (the default for `?` on ordinary errors).
    Retryable,
    /// Trying again cannot help: dead-letter at once with reason `permanent`.
    Permanent,
    /// The input itself is unreadable: dead-letter at once with reason `poison`.
    Poison,
}

impl FailureKind {
    /// The reason a record failing this way is dead-lettered for at once, or `None` if it is
    /// worth retrying.
    ///
    /// # Example
    ///
    /// ```
    /// use sidetrack::{FailureKind, Reason};
    ///
    /// assert_eq!(FailureKind::Retryable.dead_letter_reason(), None);
    /// assert_eq!(FailureKind::Poison.dead_letter_reason(), Some(Reason::Poison));
    /// ```
    pub fn dead_letter_reason(self) -> Option<Reason> {
        match self {
            FailureKind::Retryable => None,
            FailureKind::Permanent => Some(Reason::Permanent),
            FailureKind::Poison => Some(Reason::Poison),
        }
    }
}

/// Where a record that did not succeed goes next.
///
/// Decided by [`RetryPolicy::decide`](crate::RetryPolicy::decide) (or by the runtime itself for
/// `invalid-envelope` and `oversized`), and turned into a topic and an envelope by
/// [`next_hop`](crate::retry::next_hop).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::{Disposition, Reason};
///
/// let retry = Disposition::Retry { tier: 0, delay: Duration::from_secs(1) };
/// assert_eq!(retry.reason(), None); // written as `sidetrack-error-kind: retryable`
/// assert_eq!(Disposition::DeadLetter(Reason::Exhausted).reason(), Some(Reason::Exhausted));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Publish to retry tier `tier` (0-based), due `delay` from now (before jitter).
    Retry {
        /// Index of the tier topic.
        tier: usize,
        /// Delay until the record is due.
        delay: Duration,
    },
    /// Publish to the dead-letter topic.
    DeadLetter(Reason),
}

impl Disposition {
    /// The reason, for a dead letter; `None` for a retry. Also what the envelope records
    /// (see [`error_kind_str`]).
    pub fn reason(self) -> Option<Reason> {
        match self {
            Disposition::Retry { .. } => None,
            Disposition::DeadLetter(r) => Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The wire strings written to Kafka and metrics by earlier versions: they must never
    /// change, or old dead letters stop parsing and dashboards lose their series.
    const FROZEN: [(&str, Option<Reason>); 9] = [
        ("retryable", None),
        ("permanent", Some(Reason::Permanent)),
        ("poison", Some(Reason::Poison)),
        ("exhausted", Some(Reason::Exhausted)),
        ("invalid-envelope", Some(Reason::InvalidEnvelope)),
        ("oversized", Some(Reason::Oversized)),
        ("key-order-full", Some(Reason::KeyOrderFull)),
        ("key-order-timeout", Some(Reason::KeyOrderTimeout)),
        ("key-dead-lettered", Some(Reason::KeyDeadLettered)),
    ];

    #[test]
    fn the_table_is_in_declaration_order_and_complete() {
        assert_eq!(REASONS.len(), Reason::ALL.len());
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(REASONS[i].0, r);
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn wire_strings_are_frozen_and_round_trip() {
        for (wire, reason) in FROZEN {
            assert_eq!(parse_error_kind(wire), Ok(reason), "{wire}");
            assert_eq!(error_kind_str(reason), wire);
            if let Some(r) = reason {
                assert_eq!(r.as_str(), wire);
                assert_eq!(r.to_string(), wire);
                assert_eq!(wire.parse::<Reason>(), Ok(r));
            }
        }
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            assert!(!r.description().is_empty());
        }
    }

    #[test]
    fn retryable_is_not_a_reason() {
        assert_eq!(
            "retryable".parse::<Reason>(),
            Err(UnknownReason("retryable".into()))
        );
        assert_eq!(
            "Permanent".parse::<Reason>().unwrap_err().to_string(),
            "unknown error kind `Permanent`"
        );
    }

    #[test]
    fn failure_kinds_map_onto_reasons() {
        assert_eq!(FailureKind::Retryable.dead_letter_reason(), None);
        assert_eq!(
            FailureKind::Permanent.dead_letter_reason(),
            Some(Reason::Permanent)
        );
        assert_eq!(
            FailureKind::Poison.dead_letter_reason(),
            Some(Reason::Poison)
        );
        let retry = Disposition::Retry {
            tier: 0,
            delay: Duration::from_secs(1),
        };
        assert_eq!(retry.reason(), None);
        assert_eq!(
            Disposition::DeadLetter(Reason::Oversized).reason(),
            Some(Reason::Oversized)
        );
    }

    proptest! {
        /// Any string (header values are any bytes from the network) parses to a reason whose
        /// wire form is that string, or to a typed error holding it: never a panic.
        #[test]
        fn any_string_parses_exactly_or_is_a_typed_error(s in ".{0,24}") {
            match s.parse::<Reason>() {
                Ok(r) => prop_assert_eq!(r.as_str(), s.as_str()),
                Err(e) => prop_assert_eq!(e, UnknownReason(s.clone())),
            }
            match parse_error_kind(&s) {
                Ok(k) => prop_assert_eq!(error_kind_str(k), s.as_str()),
                Err(e) => prop_assert_eq!(e.0, s),
            }
        }
    }
}
