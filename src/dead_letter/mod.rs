//! The dead-letter topic: why a record ends up there, and the alerts on-call receives.
//!
//! A dead-letter record keeps the original key, payload and user headers byte for byte and
//! carries the [`Envelope`](crate::Envelope) headers with `sidetrack-error-kind` set to the
//! [`Reason`](crate::Reason) (defined in [`crate::outcome`], which both this module and
//! [`crate::retry`] use, so neither imports the other for it). It is written only after the
//! broker acknowledged it; the source offset is stored only then.

mod alert;
mod breaker;
mod record;
#[cfg(feature = "webhook")]
mod webhook;

pub(crate) use alert::{Alerts, DeadLetterEvent, ErasedNotifier};
pub use alert::{DeadLetterAlert, DeadLetterExample, DeadLetterNotifier, LogNotifier, NotifyError};
pub use breaker::{BreakerAlert, BreakerTransition};
pub use record::{
    scan, scan_report, OpenTransaction, Provenance, Record, Scanned, SpringDlt, StartAt,
};
#[cfg(feature = "webhook")]
pub use webhook::WebhookNotifier;
