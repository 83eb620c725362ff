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
//!
//! What a failure *means* (retry or dead letter, and why) is the vocabulary of
//! [`crate::outcome`]; [`RetryPolicy::decide`] picks a [`Disposition`](crate::Disposition) and
//! [`next_hop`] turns it into a topic and an envelope. This module never imports
//! [`crate::dead_letter`].

pub(crate) mod decode;
mod envelope;
mod hop;
mod policy;
pub(crate) mod scheduler;
mod topics;

pub(crate) use envelope::truncate_error;
pub use envelope::{Envelope, EnvelopeError, MAX_ERROR_TEXT};
pub use hop::{next_hop, Hop, HopError};
pub use policy::{expand_exponential, jittered, RetryPolicy, Tier};
pub use topics::{
    format_delay, key_order_topic, tier_delay_of, SourceTopology, TierTopic, Topology,
};

/// Names of the envelope headers (all start with `sidetrack-`).
pub mod headers {
    pub use super::envelope::names::*;
}
