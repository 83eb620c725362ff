//! The dead-letter topic: why a record ends up there, and the alerts on-call receives.
//!
//! A dead-letter record keeps the original key, payload and user headers byte for byte and
//! carries the [`Envelope`](crate::Envelope) headers with `sidetrack-error-kind` set to the
//! reason below. It is written only after the broker acknowledged it; the source offset is
//! stored only then.

mod alert;
mod breaker;
mod record;
#[cfg(feature = "webhook")]
mod webhook;

use std::fmt;

pub(crate) use alert::{Alerts, DeadLetterEvent, ErasedNotifier};
pub use alert::{DeadLetterAlert, DeadLetterExample, DeadLetterNotifier, LogNotifier, NotifyError};
pub use breaker::{BreakerAlert, BreakerTransition};
pub use record::{
    scan, scan_report, OpenTransaction, Provenance, Record, Scanned, SpringDlt, StartAt,
};
#[cfg(feature = "webhook")]
pub use webhook::WebhookNotifier;

/// Why a record was dead-lettered. The header value is [`DeadLetterReason::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DeadLetterReason {
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
}

impl DeadLetterReason {
    /// Every reason, in a stable order.
    pub const ALL: [DeadLetterReason; 5] = [
        DeadLetterReason::Permanent,
        DeadLetterReason::Poison,
        DeadLetterReason::Exhausted,
        DeadLetterReason::InvalidEnvelope,
        DeadLetterReason::Oversized,
    ];

    /// The `sidetrack-error-kind` header value and metric label.
    pub fn as_str(self) -> &'static str {
        crate::retry::ErrorKind::from(self).as_str()
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
