//! The hand-off of a failed record to its retry tier or the dead-letter topic: sending until
//! the broker acknowledges, on the shared producer (`producer.rs`, rebuilt after a fatal
//! error). Hand-offs
//! are pipelined: the partition goes on while up to [`MAX_PENDING`] of them wait for their
//! acknowledgement, and the frontier (see `partition::offsets`) keeps the stored offset before
//! every one still waiting.
//!
//! [`HandOff`] is a stage of its own: it gets what it needs of the partition it serves (which
//! source, its stop and revoke signals, its pause) when the partition task is built, and never
//! names the task. The partition task depends on it, not the other way round, so the
//! hand-off can be read (and tested) without the record loops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::dead_letter::DeadLetterEvent;
use crate::escape;
use crate::handler::{to_owned_headers, Header, Message};
use crate::metrics as m;
use crate::outcome::{Disposition, Reason};
use crate::retry::scheduler::now_ms;
use crate::retry::{next_hop, Envelope, Hop};

use super::pause::{Pause, PauseHold};
use super::shared::Shared;
use super::signal::Signal;

/// At most this many hand-offs of one partition wait for their ack at a time (each holds its
/// record in memory); then the partition takes no new record until the oldest is durable.
pub(crate) const MAX_PENDING: usize = 64;

/// What a hand-off adds to the envelope for `keep_key_order` (see `docs/key-order.md`): both
/// `None` for every other record, so the envelope is what it always was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    /// The record is its key's head, waiting since this time (ms): `sidetrack-key-order-head`.
    pub(crate) since: Option<i64>,
    /// An earlier record of its key (this original offset) was dead-lettered before it was
    /// released: `sidetrack-key-order-after-dead-letter`.
    pub(crate) after_dead_letter: Option<i64>,
}

/// Why a piece of work of a partition ended without a durable outcome. Its offset is not
/// stored (see `partition::offsets`): the record is handled again by whoever reads the
/// partition next.
#[derive(Debug)]
pub(crate) enum Abandoned {
    /// The task was told to stop (shutdown, revoke, or the runtime is failing).
    Told,
    /// Something went wrong that the task cannot get past; its supervisor restarts it.
    Failed(String),
}

/// The hand-off stage of one partition task: sends its failed records to their retry tier or
/// the DLQ, and pauses the partition while a send keeps failing.
///
/// Built once per partition task (off the per-record path); each hand-off borrows it.
pub(crate) struct HandOff {
    /// The runtime's shared state: the producer to send on, the topology and policy of the
    /// next hop, the stats and the alerts a durable dead letter feeds.
    shared: Arc<Shared>,
    /// Index of the source topic the partition belongs to (its tiers and DLQ).
    source: usize,
    /// Raised on shutdown: a failing send stops retrying, the record gets no outcome.
    stop: Signal,
    /// Raised on revoke: likewise, and the new owner handles the record again.
    revoked: Signal,
    /// The partition's pause, held while a hand-off fails.
    pause: Arc<Pause>,
    /// Hand-offs of this partition being retried after a failure. While any is, the partition
    /// is paused and takes no new record.
    failing: AtomicUsize,
}

/// Held while a hand-off of this partition fails: the partition is paused and takes no new
/// record.
struct Failing<'a> {
    /// The partition's `failing` count, taken back when this hand-off stops failing.
    count: &'a AtomicUsize,
    /// Keeps the partition paused while the hand-off is retried (released on drop).
    _pause: PauseHold<'a>,
}

impl Drop for Failing<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Result of [`HandOff::send_durably`].
enum Sent {
    /// Acknowledged: (partition, offset, timestamp we set). The offset is negative when
    /// librdkafka acknowledged the record implicitly (see `send_durably`).
    Acked((i32, i64, i64)),
    /// The broker or librdkafka refused the record's size.
    TooLarge(KafkaError),
}

/// Whether a send failed because of the record's size (librdkafka's own limit or the
/// broker's): resending cannot help, so the record is dead-lettered as `oversized` (without
/// its payload) instead of being retried for ever.
pub(crate) fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

impl HandOff {
    /// The hand-off stage of the partition of source `source` (an index into the topology's
    /// sources), stopping on `stop` or `revoked` and pausing through `pause`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        source: usize,
        stop: Signal,
        revoked: Signal,
        pause: Arc<Pause>,
    ) -> Self {
        HandOff {
            shared,
            source,
            stop,
            revoked,
            pause,
            failing: AtomicUsize::new(0),
        }
    }

    /// Whether a hand-off of this partition is failing (the partition then takes no new
    /// record); one relaxed load, checked per record.
    #[inline]
    pub(crate) fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed) != 0
    }

    /// Marks a hand-off of this partition as failing until the returned guard is dropped.
    fn failing(&self) -> Failing<'_> {
        self.failing.fetch_add(1, Ordering::SeqCst);
        Failing {
            count: &self.failing,
            _pause: self.pause.hold(),
        }
    }

    /// Publishes the record to its retry tier or the DLQ and waits for the broker's ack,
    /// retrying with backoff (partition paused) until it succeeds or the task is stopped.
    ///
    /// A record too large for the target (its envelope adds up to ~2 KiB) cannot succeed by
    /// retrying: it is dead-lettered as `oversized` without its payload (and, if still too
    /// large, without its user headers, then its key). The original stays readable at its
    /// source position, which the envelope names. A DLQ that refuses even that is misconfigured:
    /// the task fails (reported, restarted by its supervisor with backoff).
    pub(crate) async fn hand_off(
        &self,
        msg: &Message,
        decision: Disposition,
        error: &str,
    ) -> Result<(), Abandoned> {
        self.hand_off_marked(msg, decision, error, Mark::default())
            .await
            .map(|_| ())
    }

    /// [`HandOff::hand_off`], with `mark` laid over the envelope `next_hop` makes (which
    /// already carries the marks of a retried record's own envelope forward). Returns where
    /// the record went: `decision`, or the DLQ (`oversized`) when it was too large for its
    /// retry tier — `keep_key_order` must know, since a record its key waits on that ends in
    /// the DLQ owes a `release`.
    pub(crate) async fn hand_off_marked(
        &self,
        msg: &Message,
        decision: Disposition,
        error: &str,
        mark: Mark,
    ) -> Result<Disposition, Abandoned> {
        let shared = &self.shared;
        let source = &shared.topology.sources()[self.source];
        // One clock reading for the envelope and the record's timestamp, kept across resends:
        // a retry tier checks the due time against the record's own timestamp, and a resend
        // after an outage must not look like a due time from the past.
        let hop_for = |d: Disposition, error: &str| -> Result<(Hop<'_>, i64), Abandoned> {
            let now = now_ms();
            let hop = next_hop(
                msg,
                d,
                error,
                &shared.topology,
                &shared.policy,
                now,
                fastrand::f64(),
            )
            .map_err(|e| Abandoned::Failed(e.to_string()))?;
            let mut hop = hop;
            if mark.since.is_some() {
                hop.envelope.key_order_since = mark.since;
            }
            if mark.after_dead_letter.is_some() {
                hop.envelope.after_dead_letter = mark.after_dead_letter;
            }
            Ok((hop, now))
        };
        let mut decision = decision;
        let mut error = error.to_owned();
        let (
            Hop {
                topic: mut target,
                envelope,
                ..
            },
            written_at,
        ) = hop_for(decision, &error)?;
        // Feature `otel` with `[tracing]`, sampled record: the hand-off's `send` span (child of the failed
        // attempt's `process` span); the record written carries its `traceparent`, replacing
        // the one it had, and keeps its origin's context in `sidetrack-origin-traceparent`.
        #[cfg(feature = "otel")]
        // Only a record whose attempt was traced (sampled, see `telemetry::runtime`): an
        // unsampled record is written with its headers as they were (its own `traceparent`,
        // whose flag keeps the next attempt unsampled, and its origin headers if any).
        let traced = (shared.config.tracing.is_some() && msg.trace().is_some()).then(|| {
            let span = crate::telemetry::runtime::hand_off_span(msg, target, decision);
            let headers = crate::telemetry::runtime::stamp(msg.headers(), &span);
            (span, headers)
        });
        #[cfg(feature = "otel")]
        let user_headers: &[Header] = traced.as_ref().map_or(msg.headers(), |(_, h)| h.as_slice());
        #[cfg(not(feature = "otel"))]
        let user_headers: &[Header] = msg.headers();
        let first = self.send_durably(
            target,
            msg.key(),
            msg.payload(),
            user_headers,
            (&envelope, written_at),
            msg,
        );
        #[cfg(feature = "otel")]
        let first = tracing::Instrument::instrument(
            first,
            traced
                .as_ref()
                .map_or_else(tracing::Span::none, |(span, _)| span.clone()),
        );
        let mut delivery = match first.await? {
            Sent::Acked(d) => Some(d),
            Sent::TooLarge(e) => {
                let size = msg.payload().map_or(0, <[u8]>::len);
                error = format!(
                    "record too large for `{target}` ({size} payload bytes: {e}); dead-lettered without its payload, \
                     the original stays at {}[{}]@{}; last error: {error}",
                    msg.topic(),
                    msg.partition(),
                    msg.offset()
                );
                decision = Disposition::DeadLetter(Reason::Oversized);
                None
            }
        };
        if delivery.is_none() {
            let (hop, written_at) = hop_for(decision, &error)?;
            let envelope = hop.envelope;
            target = hop.topic;
            // Feature `otel`: the middle attempt keeps the trace context headers, rebuilt
            // from parsed values only (`carrier::rebuilt_trace_headers`: 55-byte
            // `traceparent`s and `tracestate`s cut to `TRACESTATE_COPY_MAX`), so about
            // 1.2 KB at most whatever the record carried, even without an exporter.
            // The last attempt has no header and no key: an envelope alone always fits, so an
            // oversized record always reaches its target.
            #[cfg(feature = "otel")]
            let stripped: Vec<Header> = traced.as_ref().map_or_else(Vec::new, |(_, h)| {
                crate::telemetry::carrier::rebuilt_trace_headers(h)
            });
            #[cfg(not(feature = "otel"))]
            let stripped: [Header; 0] = [];
            let attempts: [(Option<&[u8]>, &[Header]); 3] = [
                (msg.key(), user_headers),
                (msg.key(), &stripped[..]),
                (None, &[]),
            ];
            for (key, headers) in attempts {
                if let Sent::Acked(d) = self
                    .send_durably(target, key, None, headers, (&envelope, written_at), msg)
                    .await?
                {
                    delivery = Some(d);
                    break;
                }
            }
        }
        let Some(delivery) = delivery else {
            return Err(Abandoned::Failed(format!(
                "even an empty record with an envelope is too large for `{target}` (record {}[{}]@{}); \
                 the topic or the producer's message.max.bytes is misconfigured",
                msg.topic(),
                msg.partition(),
                msg.offset()
            )));
        };
        let error = error.as_str();
        // The log lines below are written in the hand-off's span (they name its trace).
        #[cfg(feature = "otel")]
        let _in_span = traced.as_ref().map(|(span, _)| {
            crate::telemetry::runtime::record_delivery(span, delivery.0, delivery.1);
            span.enter()
        });
        match decision {
            Disposition::Retry { tier, .. } => {
                shared.stats.retried(tier);
                metrics::counter!(m::RETRIES_SCHEDULED, "source" => source.topic.clone(), "tier" => tier.to_string()).increment(1);
                // Where the broker acknowledged it, like the dead-letter line: what was
                // acknowledged can be checked against the log (the replication-fault ledger
                // does). A negative offset is librdkafka's implicit acknowledgement.
                tracing::debug!(
                    target_topic = target,
                    target_partition = delivery.0,
                    target_offset = delivery.1,
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    attempt = msg.attempt(),
                    "retry scheduled"
                );
            }
            Disposition::DeadLetter(reason) => {
                shared.stats.dead_lettered(reason);
                metrics::counter!(m::DEAD_LETTERED, "source" => source.topic.clone(), "reason" => reason.as_str()).increment(1);
                tracing::warn!(
                    dlq = target, dlq_partition = delivery.0, dlq_offset = delivery.1,
                    topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    attempts = msg.attempt(), %reason,
                    error = %escape::for_terminal(error, escape::LOG_FIELD_CHARS),
                    "record dead-lettered"
                );
                // The origin's trace id, so on-call goes from the alert to the trace.
                let trace_id = crate::telemetry::carrier::origin_trace_id(msg.headers());
                shared.alerts.record(DeadLetterEvent {
                    topic: &source.topic,
                    dlq: target,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    dlq_partition: delivery.0,
                    dlq_offset: delivery.1,
                    dlq_timestamp: Some(delivery.2),
                    key: msg.key(),
                    reason,
                    attempts: msg.attempt(),
                    error,
                    trace_id: trace_id.as_deref(),
                });
            }
        }
        Ok(decision)
    }

    /// Produces one record and waits for its ack, retrying failures with backoff while the
    /// source partition is paused. Only "too large" is returned instead of retried. Every
    /// attempt carries `written_at` as its timestamp, the time the envelope was made.
    async fn send_durably(
        &self,
        target: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        user_headers: &[Header],
        (envelope, written_at): (&Envelope, i64),
        msg: &Message,
    ) -> Result<Sent, Abandoned> {
        let shared = &self.shared;
        let envelope_headers = envelope.to_headers();
        let headers = to_owned_headers(user_headers.iter().chain(&envelope_headers));
        // Same partition number as the original when the side topic has it: keeps a key's
        // records together for per-key ordering later.
        let partition = (msg.partition() < shared.partitions.get(target).copied().unwrap_or(0))
            .then_some(msg.partition());
        let mut backoff = shared.config.handoff.backoff_initial;
        // Held while this hand-off fails: the partition is paused and takes no new record.
        let mut failing = None;
        loop {
            // Set explicitly (not left to the producer) so alerts know the exact timestamp the
            // CLI's --since/--until filters will see, and so a retry tier can check its due
            // time against the writer's own clock.
            let produced_at = written_at;
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(target)
                .headers(headers.clone())
                .timestamp(produced_at);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            let generation = shared.producer.current();
            let sent = generation
                .producer
                .send(record, Timeout::After(shared.config.handoff.timeout))
                .await;
            let failure = match sent {
                // Trusted whatever the offset: librdkafka reports a delivery only once the
                // broker acknowledged it. An offset of -1001 is its *implicit* ack (a later
                // batch of this idempotent producer was acknowledged, and Kafka checks the
                // sequence numbers, so the earlier one is in the log too). Sending again
                // would only add a duplicate (a second retry attempt or dead letter).
                Ok(d) => return Ok(Sent::Acked((d.partition, d.offset, produced_at))),
                Err((e, _)) if is_too_large(&e) => return Ok(Sent::TooLarge(e)),
                // Revoked: the new owner will handle the record again; stop here.
                Err(_) if self.revoked.is_cancelled() => return Err(Abandoned::Told),
                Err((e, _)) => match shared.producer.recover(&generation) {
                    // Sent again at once on the new producer.
                    Ok(true) => continue,
                    Ok(false) => e.to_string(),
                    Err(fatal) => {
                        shared.fail(fatal);
                        return Err(Abandoned::Told);
                    }
                },
            };
            shared.stats.handoff_failed();
            let source = &shared.topology.sources()[self.source].topic;
            metrics::counter!(m::HANDOFF_FAILURES, "source" => source.clone()).increment(1);
            tracing::warn!(
                target_topic = target, topic = msg.topic(), partition = msg.partition(),
                offset = msg.offset(), error = %failure, retry_in = ?backoff,
                "hand-off failed; partition paused, retrying"
            );
            if failing.is_none() {
                failing = Some(self.failing());
            }
            let go_on = tokio::select! {
                _ = tokio::time::sleep(backoff) => true,
                _ = self.stop.cancelled() => false,
                _ = self.revoked.cancelled() => false,
            };
            if !go_on {
                return Err(Abandoned::Told);
            }
            backoff = backoff
                .saturating_mul(2)
                .min(shared.config.handoff.backoff_max);
        }
    }
}
