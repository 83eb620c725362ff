//! The hand-off of a failed record to its retry tier or the dead-letter topic: the shared
//! producer (rebuilt after a fatal error) and sending until the broker acknowledges. Hand-offs
//! are pipelined: the partition goes on while up to [`MAX_PENDING`] of them wait for their
//! acknowledgement, and the frontier (see [`super::frontier`]) keeps the stored offset before
//! every one still waiting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use crate::dead_letter::DeadLetterEvent;
use crate::error::Error;
use crate::escape;
use crate::handler::{to_owned_headers, Header, Message};
use crate::metrics as m;
use crate::outcome::{Disposition, Reason};
use crate::retry::scheduler::now_ms;
use crate::retry::{next_hop, Envelope, Hop};

use super::client::TracingContext;
use super::partition::{Abandoned, PartitionTask};

/// At most this many hand-offs of one partition wait for their ack at a time (each holds its
/// record in memory); then the partition takes no new record until the oldest is durable.
pub(crate) const MAX_PENDING: usize = 64;

/// After this many producer rebuilds within [`REBUILD_WINDOW`], a fatal error is taken as one
/// a new producer cannot get past: the runtime stops with an error instead of spinning.
const MAX_REBUILDS: usize = 5;
const REBUILD_WINDOW: Duration = Duration::from_secs(600);

/// One producer instance; replaced as a whole after a fatal error.
pub(crate) struct Generation {
    id: u64,
    pub(crate) producer: FutureProducer<TracingContext>,
}

/// The hand-off producer shared by every partition task (idempotent, `acks=all`).
///
/// An idempotent producer that hits a fatal error (e.g. a sequence the broker rejects) fails
/// every later send for ever. The first send that sees it replaces the producer with a new one
/// (a new producer id), and the waiting hand-offs are sent again on it. A producer that keeps
/// failing fatally (more than [`MAX_REBUILDS`] replacements in [`REBUILD_WINDOW`]) cannot be
/// helped by another one: [`HandoffProducer::recover`] then returns the error, and the runtime
/// stops with it.
pub(crate) struct HandoffProducer {
    config: ClientConfig,
    current: RwLock<Arc<Generation>>,
    next_id: AtomicU64,
    rebuilds: Mutex<VecDeque<Instant>>,
}

impl HandoffProducer {
    pub(crate) fn new(config: ClientConfig) -> Result<Self, Error> {
        let first = Self::create(&config, 0)?;
        Ok(HandoffProducer {
            config,
            current: RwLock::new(Arc::new(first)),
            next_id: AtomicU64::new(1),
            rebuilds: Mutex::new(VecDeque::new()),
        })
    }

    fn create(config: &ClientConfig, id: u64) -> Result<Generation, Error> {
        let producer = config
            .create_with_context(TracingContext)
            .map_err(Error::kafka("creating the hand-off producer"))?;
        Ok(Generation { id, producer })
    }

    /// The producer to send with now.
    pub(crate) fn current(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// A send on `used` failed: if that producer hit a fatal error, replace it (once, whoever
    /// asks first). `Ok(true)`: replaced or already replaced, send again; `Ok(false)`: not a
    /// fatal error; `Err`: not recoverable.
    ///
    /// librdkafka reports the first failed send with the broker's error (e.g.
    /// OUT_OF_ORDER_SEQUENCE_NUMBER) and later ones with `Fatal`; only the client knows which
    /// errors were fatal, so it is asked (failures are rare; this is off the per-record path).
    pub(crate) fn recover(&self, used: &Generation) -> Result<bool, Error> {
        let Some((code, text)) = used.producer.client().fatal_error() else {
            return Ok(false);
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.id != used.id {
            return Ok(true);
        }
        let reason = format!("{code:?}: {text}");
        metrics::counter!(m::CLIENT_FATAL_ERRORS, "client" => "producer").increment(1);
        {
            let mut recent = self.rebuilds.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > REBUILD_WINDOW)
            {
                recent.pop_front();
            }
            if recent.len() >= MAX_REBUILDS {
                return Err(Error::Fatal {
                    client: "hand-off producer",
                    reason: format!(
                        "{reason} (still failing after {MAX_REBUILDS} new producers in {}s)",
                        REBUILD_WINDOW.as_secs()
                    ),
                });
            }
            recent.push_back(now);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fresh = Self::create(&self.config, id).map_err(|e| Error::Fatal {
            client: "hand-off producer",
            reason: format!("{reason}; a new producer could not be created: {e}"),
        })?;
        let old = std::mem::replace(&mut *current, Arc::new(fresh));
        drop(current);
        tracing::error!(%reason, generation = id, "hand-off producer replaced after a fatal error; waiting hand-offs are sent again");
        // Dropping a producer purges and flushes for up to 500 ms: not on this thread.
        std::thread::spawn(move || drop(old));
        Ok(true)
    }

    /// Flushes the current producer (shutdown).
    pub(crate) fn flush(&self, timeout: Duration) {
        let _ = self.current().producer.flush(timeout);
    }
}

/// Result of [`PartitionTask::send_durably`].
enum Sent {
    /// Acknowledged: (partition, offset, timestamp we set). The offset is negative when
    /// librdkafka acknowledged the record implicitly (see `send_durably`).
    Acked((i32, i64, i64)),
    /// The broker or librdkafka refused the record's size.
    TooLarge(KafkaError),
}

fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
    )
}

impl PartitionTask {
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
        let mut delivery = match self
            .send_durably(
                target,
                msg.key(),
                msg.payload(),
                msg.headers(),
                (&envelope, written_at),
                msg,
            )
            .await?
        {
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
            let attempts: [(Option<&[u8]>, &[Header]); 3] =
                [(msg.key(), msg.headers()), (msg.key(), &[]), (None, &[])];
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
                });
            }
        }
        Ok(())
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
