//! Non-blocking retry: the policy (tiers and delays), the topic topology, the envelope
//! headers carried by retry and dead-letter records, and the due-time scheduler.
//!
//! ```text
//!                 fails (retryable)            fails again              exhausted
//!  orders ──▶ handler ──────────▶ orders.billing.retry.1s ──▶ … retry.30s ──────▶ orders.billing.dlq
//!               │  permanent / poison                                              ▲
//!               └──────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Every tier is its own topic with one fixed delay, so records become due in the order they
//! were written. The retry consumer pauses a tier partition until its head record is due.

pub(crate) mod decode;
mod envelope;
mod policy;
pub(crate) mod scheduler;
mod topics;

pub(crate) use envelope::truncate_error;
pub use envelope::{Envelope, EnvelopeError, ErrorKind, MAX_ERROR_TEXT};
pub use policy::{expand_exponential, jittered, Decision, RetryPolicy, Tier};
pub use topics::{format_delay, SourceTopology, TierTopic, Topology};

/// Names of the envelope headers (all start with `sidetrack-`).
pub mod headers {
    pub use super::envelope::names::*;
}

use crate::handler::Message;

/// The envelope a failed record carries on its next hop, as decided by `decision`.
///
/// `unit` is a random number in `[0, 1)` for jitter (the runtime draws one per record; the
/// test harness passes 0 for reproducible due times).
pub(crate) fn next_envelope(
    msg: &Message,
    group: &str,
    decision: Decision,
    error: &str,
    policy: &RetryPolicy,
    now_ms: i64,
    unit: f64,
) -> Envelope {
    let (error_kind, due) = match decision {
        Decision::Retry { delay, .. } => (
            ErrorKind::Retryable,
            Some(now_ms.saturating_add(scheduler::millis(jittered(delay, policy.jitter(), unit)))),
        ),
        Decision::DeadLetter(reason) => (reason.into(), None),
    };
    Envelope {
        original_topic: msg.topic().to_owned(),
        original_partition: msg.partition(),
        original_offset: msg.offset(),
        original_timestamp: msg.timestamp(),
        group: group.to_owned(),
        attempts: msg.attempt(),
        first_failure: msg.envelope().map_or(now_ms, |e| e.first_failure),
        due,
        error_kind,
        error: error.to_owned(),
    }
}
