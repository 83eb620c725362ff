//! Intake: a record leaves the partition queue and becomes a [`Message`] the handler can read.
//!
//! A stage of its own because it owns the one `unsafe` lifetime extension of the task
//! ([`detach`]) and the zero-copy views built on it: the message points into librdkafka's own
//! buffer, nothing is copied unless the handler keeps the record. It also checks the retry
//! envelope of records read from a retry tier: a record whose envelope cannot be trusted never
//! reaches the handler (it goes to the DLQ as `invalid_envelope`).
//!
//! Invariant: every view into a record (its [`Message`]) is dropped before the record's
//! [`Raw`] handle; [`Taken`] and the futures that carry a record declare the views first.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::BorrowedMessage;
use rdkafka::Message as _;

use crate::handler::{headers_of, Message};
use crate::retry::decode::{read_retry_envelope, Expected};
use crate::retry::scheduler::elapsed_secs;
use crate::runtime::scheduler::key_hash;

use super::meters::{Batch, Meters};
use super::offsets::Seq;

/// A consumed librdkafka message whose lifetime is no longer tied to the queue borrow.
///
/// It must not outlive the consumer (its client handle). The partition task guarantees it:
/// every message it takes lives in the task's own futures, and the task holds an `Arc` of the
/// consumer until they are all dropped (the consumer is closed only after its tasks ended).
pub(crate) type Raw = BorrowedMessage<'static>;

/// Extends a message's lifetime to the task's (see [`Raw`]).
#[inline]
pub(crate) fn detach(raw: BorrowedMessage<'_>) -> Raw {
    // SAFETY: see `Raw`. A `BorrowedMessage` is a pointer into a librdkafka event it keeps
    // alive itself (an `Arc`); its lifetime only stands for the client it came from.
    unsafe { std::mem::transmute::<BorrowedMessage<'_>, Raw>(raw) }
}

/// A record taken from the partition.
pub(crate) struct Taken {
    /// Its place in the partition's [`Frontier`](super::offsets::Frontier) window: the frontier
    /// moves past it only when it has a durable outcome.
    pub(crate) seq: Seq,
    /// Its key's identity for `key` ordering.
    pub(crate) key: Option<u64>,
    /// Views into `raw`: declared (and so dropped) before it.
    pub(crate) decoded: Result<Decoded, Box<Invalid>>,
    /// The consumed librdkafka message the views point into; dropped last, once the record's
    /// handler call and hand-off are done with it.
    pub(crate) raw: Raw,
}

/// A decoded record: the message and, on a retry tier, when it is due and the retry record's
/// own timestamp (the writer's clock; see [`crate::retry::scheduler::wait_for`]).
pub(crate) struct Decoded {
    /// The message the handler sees (the original's identity on a retry tier).
    pub(crate) msg: Message,
    /// On a retry tier: the envelope's due time and the retry record's timestamp, both ms since
    /// the epoch; `None` on a source topic.
    pub(crate) due: Option<(i64, Option<i64>)>,
}

/// A retry-topic record whose envelope cannot be trusted (boxed where it travels: rare).
pub(crate) struct Invalid {
    /// The record as read (its own topic and offset: the envelope could not say otherwise).
    pub(crate) msg: Message,
    /// Why the envelope is refused (e.g. missing, another group's, more retries than
    /// configured, a due time too far ahead): the dead letter's error text.
    pub(crate) reason: String,
}

/// What a retry tier's envelopes must match (copied once per task, read per record).
struct TierCheck {
    /// The consumer group the envelope must name: a record another group wrote is not ours.
    group: String,
    /// The source topic this tier belongs to, which the envelope's original topic must be.
    source_topic: String,
    /// More attempts than the policy allows means the envelope was tampered with or is stale.
    max_retries: u32,
    /// The furthest ahead a due time may be (tier delay plus the most jitter): a later one would
    /// hold the partition for as long as it says.
    max_due_delay: Duration,
}

/// The intake of one partition: where records come from and how they are read.
pub(crate) struct Intake {
    /// Shared with every [`Message`] read here.
    pub(crate) topic: Arc<str>,
    /// The partition read.
    pub(crate) partition: i32,
    /// `key` ordering: each record carries its key's hash for the scheduler.
    by_key: bool,
    /// Retry tier partitions only.
    tier: Option<TierCheck>,
    /// Feature `otel`: how to make each call's `process` span; `None` without `[tracing]`.
    #[cfg(feature = "otel")]
    otel: Option<Arc<crate::telemetry::runtime::ProcessTracing>>,
}

impl Intake {
    /// The intake of a source partition.
    pub(crate) fn source(topic: Arc<str>, partition: i32, by_key: bool) -> Self {
        Intake {
            topic,
            partition,
            by_key,
            tier: None,
            #[cfg(feature = "otel")]
            otel: None,
        }
    }

    /// The intake of a partition of a retry tier of `source_topic`, whose envelopes were
    /// written by `group` under a policy of `max_retries` retries in all, due at most
    /// `max_due_delay` (that tier's) after they were written.
    pub(crate) fn retry_tier(
        topic: Arc<str>,
        partition: i32,
        by_key: bool,
        (group, source_topic): (&str, &str),
        (max_retries, max_due_delay): (u32, Duration),
    ) -> Self {
        Intake {
            topic,
            partition,
            by_key,
            tier: Some(TierCheck {
                group: group.to_owned(),
                source_topic: source_topic.to_owned(),
                max_retries,
                max_due_delay,
            }),
            #[cfg(feature = "otel")]
            otel: None,
        }
    }

    /// Feature `otel`: makes a `process` span per handler call with `tracing` (see
    /// [`ProcessTracing`](crate::telemetry::runtime::ProcessTracing)).
    #[cfg(feature = "otel")]
    pub(crate) fn traced(
        mut self,
        tracing: Option<Arc<crate::telemetry::runtime::ProcessTracing>>,
    ) -> Self {
        self.otel = tracing;
        self
    }

    /// The key's identity for `key` ordering (`None` in other orderings, or without a key).
    #[inline]
    pub(crate) fn key_of(&self, raw: &Raw) -> Option<u64> {
        self.by_key.then(|| raw.key().map(key_hash)).flatten()
    }

    /// Reads the record in librdkafka's buffer and, on a retry topic, its envelope; counts it
    /// in `batch`.
    pub(crate) fn decode(
        &self,
        raw: &Raw,
        batch: &mut Batch,
        meters: &Meters,
    ) -> Result<Decoded, Box<Invalid>> {
        let (key, payload) = (raw.key(), raw.payload());
        batch.consumed += 1;
        batch.bytes += (key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len)) as u64;
        let received = (&self.topic, self.partition, raw.offset());
        let timestamp = raw.timestamp().to_millis();
        if let Some(ts) = timestamp {
            meters.e2e_record.record(elapsed_secs(ts, batch.now));
        }
        // SAFETY (every `from_consumed` below): the views point into `raw`, which the record's
        // `Taken`/`Finished`/hand-off future keeps alive, declared after the message so that
        // it is dropped after it, and into this task's topic name, which outlives every record
        // the task takes; the handler only gets the message by reference, and its clones own
        // their bytes.
        let Some(check) = &self.tier else {
            return Ok(Decoded {
                msg: unsafe {
                    Message::from_consumed(raw.ptr(), received, timestamp, key, payload, None, None)
                },
                due: None,
            });
        };
        let mut headers = headers_of(raw);
        let expected = Expected {
            group: &check.group,
            source_topic: &check.source_topic,
            tier_topic: &self.topic,
            max_retries: check.max_retries,
            max_due_delay: check.max_due_delay,
        };
        match read_retry_envelope(&headers, timestamp, batch.now, &expected) {
            Ok((user, envelope)) => {
                headers.truncate(user);
                let due = envelope.due.map(|due| (due, timestamp));
                Ok(Decoded {
                    msg: unsafe {
                        Message::from_consumed(
                            raw.ptr(),
                            received,
                            timestamp,
                            key,
                            payload,
                            Some(headers),
                            Some(envelope),
                        )
                    },
                    due,
                })
            }
            Err(reason) => Err(Box::new(Invalid {
                msg: unsafe {
                    Message::from_consumed(
                        raw.ptr(),
                        received,
                        timestamp,
                        key,
                        payload,
                        Some(headers),
                        None,
                    )
                },
                reason,
            })),
        }
    }

    /// The record's span, only when someone listens: wrapping every record's future in a
    /// disabled span still costs an enter and an exit per poll.
    pub(crate) fn record_span(
        &self,
        raw: &Raw,
        decoded: &Result<Decoded, Box<Invalid>>,
    ) -> Option<tracing::Span> {
        // Feature `otel` with `[tracing]`: the conventions' `process` span (INFO, so it is
        // exported under the default filter), instead of the debug `record` span.
        #[cfg(feature = "otel")]
        if let (Some(otel), Ok(d)) = (&self.otel, decoded) {
            if tracing::enabled!(tracing::Level::INFO) {
                return Some(otel.process_span(&self.topic, self.partition, raw.offset(), &d.msg));
            }
        }
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return None;
        }
        let span = tracing::debug_span!(
            "record",
            topic = %self.topic,
            partition = self.partition,
            offset = raw.offset(),
            attempt = tracing::field::Empty,
            key_hash = tracing::field::Empty,
        );
        if let Ok(d) = decoded {
            span.record("attempt", d.msg.attempt());
            if let Some(key) = d.msg.key() {
                span.record("key_hash", format!("{:016x}", key_hash(key)));
            }
        }
        Some(span)
    }
}
