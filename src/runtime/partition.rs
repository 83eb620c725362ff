//! The task that owns one assigned partition: handle each record, hand failures to a retry
//! tier or the DLQ, and store the offset only after a durable outcome.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;

use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{Message as _, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dead_letter::{DeadLetterEvent, DeadLetterReason};
use crate::handler::{headers_of, invoke, to_owned_headers, Header, Message};
use crate::metrics as m;
use crate::metrics::lag::Progress;
use crate::retry::scheduler::{self, now_ms};
use crate::retry::{next_envelope, Decision, Envelope, ErrorKind};

use super::group::{GroupConsumer, GroupContext, Role};
use super::Shared;

/// The task was told to stop (shutdown or revoke) before the record had a durable outcome.
/// Its offset is not stored.
struct Abandoned;

/// What handling a record left to do.
enum Step {
    /// Handled: the offset may be stored once every earlier record is durable.
    Done,
    /// Failed: to be handed to a retry tier or the DLQ, with the error text.
    HandOff(Message, Decision, String),
}

/// A hand-off in flight: resolves once the record is durable on its side topic, or abandoned.
type HandOffFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Abandoned>> + Send + 'a>>;

/// Hand-offs waiting for the broker's acknowledgement, in offset order, and how far records
/// after them were handled.
struct Pending<'a> {
    sends: FuturesOrdered<HandOffFuture<'a>>,
    /// Told where the oldest waiting hand-off is, for the count of records a revocation
    /// leaves to the next owner.
    progress: Arc<Progress>,
    /// Offsets of `sends`, in the same order.
    offsets: VecDeque<i64>,
    /// The last offset handled (or handed off).
    through: i64,
}

impl<'a> Pending<'a> {
    fn new(progress: Arc<Progress>) -> Self {
        Pending {
            sends: FuturesOrdered::new(),
            progress,
            offsets: VecDeque::new(),
            through: -1,
        }
    }
    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
    fn len(&self) -> usize {
        self.offsets.len()
    }
    fn hand_off(&mut self, offset: i64, send: HandOffFuture<'a>) {
        self.sends.push_back(send);
        if self.offsets.is_empty() {
            self.progress.waiting_from(Some(offset));
        }
        self.offsets.push_back(offset);
        self.through = offset;
    }
    fn handled(&mut self, offset: i64) {
        self.through = offset;
    }
    /// Waits for the oldest hand-off (`None`: none waits). Once it is durable, the offset
    /// that may now be stored: everything up to the next hand-off still waiting, or up to the
    /// last record handled. Cancel-safe: nothing changes until the hand-off has resolved.
    async fn next(&mut self) -> Option<Result<i64, Abandoned>> {
        if let Err(Abandoned) = self.sends.next().await? {
            return Some(Err(Abandoned));
        }
        self.offsets.pop_front();
        let next = self.offsets.front().copied();
        self.progress.waiting_from(next);
        Some(Ok(next.map_or(self.through, |next| next - 1)))
    }
}

/// What the partition task does next.
enum Next<'q> {
    Record(Result<BorrowedMessage<'q>, KafkaError>),
    /// The oldest hand-off resolved: the offset to store now, or abandoned.
    Settled(Result<i64, Abandoned>),
    Stop,
}

/// At most this many hand-offs of one partition wait for their ack at a time (each holds its
/// record in memory); then the partition takes no new record until the oldest is durable.
const MAX_PENDING: usize = 64;

pub(crate) struct PartitionTask {
    shared: Arc<Shared>,
    /// Consumer group of this consumer (main or retry), for metric labels.
    group_id: String,
    /// Next offset to handle, read by the lag sampler.
    progress: Arc<Progress>,
    /// Metric handles registered once: the per-record path only increments them.
    meters: Meters,
    consumer: Arc<GroupConsumer>,
    /// Shared with every [`Message`] read here.
    topic: Arc<str>,
    partition: i32,
    /// Index of the source topic this partition belongs to.
    source: usize,
    /// Tier index, for retry topics.
    tier: Option<usize>,
    /// Cancelled on shutdown: finish the current record, take no new ones.
    stop: CancellationToken,
    /// Cancelled on revoke: drop the queue at once, abandon the current record.
    revoked: CancellationToken,
    /// Hand-offs of this partition being retried after a failure. While any is, the partition
    /// is paused and takes no new record.
    failing: AtomicUsize,
}

impl PartitionTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        role: Role,
        group_id: String,
        consumer: Arc<GroupConsumer>,
        topic: &str,
        partition: i32,
        revoked: CancellationToken,
        progress: Arc<Progress>,
    ) -> Self {
        let (source, tier) = match role {
            Role::Main => (
                shared
                    .topology
                    .sources()
                    .iter()
                    .position(|s| s.topic == topic)
                    .unwrap_or(0),
                None,
            ),
            Role::Retry => {
                let (s, t) = shared.topology.locate_retry(topic).unwrap_or((0, 0));
                (s, Some(t))
            }
        };
        let meters = Meters::new(
            &group_id,
            topic,
            &shared.topology.sources()[source].topic,
            tier.is_some(),
        );
        PartitionTask {
            meters,
            stop: shared.shutdown.clone(),
            shared,
            group_id,
            progress,
            consumer,
            topic: Arc::from(topic),
            partition,
            source,
            tier,
            revoked,
            failing: AtomicUsize::new(0),
        }
    }

    /// Takes records one at a time, in offset order. A record that failed is handed to its
    /// retry tier or the DLQ without waiting for the broker's acknowledgement: the next records
    /// are handled meanwhile, up to [`MAX_PENDING`] hand-offs waiting. Offsets are still stored
    /// strictly in order, each only once it and every record before it have a durable outcome.
    /// While a hand-off is being retried after a failure, no new record is taken.
    pub(crate) async fn run(self, queue: StreamPartitionQueue<GroupContext>) {
        // Registered once, polled only when the queue is empty: a fresh cancellation future
        // per record takes the token's lock twice.
        let stop = self.stop.clone();
        let revoked = self.revoked.clone();
        let stopped = stop.cancelled();
        let revoked_wait = revoked.cancelled();
        tokio::pin!(stopped, revoked_wait);
        let mut pending = Pending::new(Arc::clone(&self.progress));
        loop {
            // Per record, the cheap checks first: a backlog keeps `recv` ready, so the
            // cancellation futures are only polled when there is nothing else to do.
            if revoked.is_cancelled() {
                return;
            }
            if stop.is_cancelled() {
                // Shutdown: the hand-offs already sent get their acknowledgement.
                self.drain(&mut pending).await;
                return;
            }
            // Settle the hand-offs that are done, in order, without waiting; storing the last
            // of them covers the ones before.
            let mut settled = None;
            while !pending.is_empty() {
                match pending.next().now_or_never() {
                    Some(Some(Ok(offset))) => settled = Some(offset),
                    Some(Some(Err(Abandoned))) => {
                        if let Some(offset) = settled {
                            self.store(offset);
                        }
                        return;
                    }
                    _ => break,
                }
            }
            if let Some(offset) = settled {
                self.store(offset);
            }
            let take_more =
                pending.len() < MAX_PENDING && self.failing.load(Ordering::Relaxed) == 0;
            if take_more {
                self.consumer.context().wait_unfenced().await;
            }
            let next = {
                let recv = queue.recv();
                tokio::pin!(recv);
                let ready = if take_more {
                    futures_util::poll!(recv.as_mut())
                } else {
                    Poll::Pending
                };
                match ready {
                    Poll::Ready(r) => Next::Record(r),
                    Poll::Pending => tokio::select! {
                        biased;
                        _ = &mut stopped => Next::Stop,
                        _ = &mut revoked_wait => return,
                        Some(settled) = pending.next(), if !pending.is_empty() => Next::Settled(settled),
                        r = recv, if take_more => Next::Record(r),
                    },
                }
            };
            let raw = match next {
                Next::Record(Ok(raw)) => raw,
                Next::Record(Err(e)) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "fetch error");
                    continue;
                }
                Next::Settled(Ok(offset)) => {
                    self.store(offset);
                    continue;
                }
                Next::Settled(Err(Abandoned)) => return,
                Next::Stop => {
                    self.drain(&mut pending).await;
                    return;
                }
            };
            let (offset, msg_or_invalid) = (raw.offset(), self.decode(&raw));
            self.progress.at(offset);
            let span = tracing::debug_span!(
                "record",
                topic = %self.topic,
                partition = self.partition,
                offset,
                attempt = tracing::field::Empty,
                key_hash = tracing::field::Empty,
            );
            if !span.is_disabled() {
                if let Ok(msg) = &msg_or_invalid {
                    span.record("attempt", msg.attempt());
                    if let Some(key) = msg.key() {
                        span.record("key_hash", format!("{:016x}", key_hash(key)));
                    }
                }
            }
            let work = self.process(msg_or_invalid).instrument(span);
            tokio::pin!(work);
            // Earlier hand-offs keep settling while this record is handled.
            let outcome = loop {
                tokio::select! {
                    // Work first: a handler that finishes at once polls nothing else.
                    biased;
                    outcome = &mut work => break outcome,
                    Some(settled) = pending.next(), if !pending.is_empty() => {
                        match settled {
                            Ok(offset) => self.store(offset),
                            // Only a stop, a revoke or a DLQ refusing even an empty record
                            // abandons a hand-off; nothing after it may be stored.
                            Err(Abandoned) => return,
                        }
                    }
                    _ = &mut revoked_wait => {
                        // Drop the queue now: a new queue for this partition may be split
                        // soon, and an old handle alive beside it stops its wake-ups.
                        drop(queue);
                        let _ = work.await;
                        return;
                    }
                }
            };
            match outcome {
                Err(Abandoned) => {
                    if !revoked.is_cancelled() {
                        self.drain(&mut pending).await;
                    }
                    return;
                }
                Ok(Step::Done) if pending.is_empty() => {
                    // From the message itself: storing by topic name looks the topic up each
                    // time.
                    if let Err(e) = self.consumer.store_offset_from_message(&raw) {
                        // Revoked in the meantime: the new owner gets the record again.
                        tracing::debug!(topic = %self.topic, partition = self.partition, offset, error = %e, "offset not stored");
                    }
                }
                // Stored once the hand-offs before it are durable.
                Ok(Step::Done) => pending.handled(offset),
                Ok(Step::HandOff(msg, decision, error)) => {
                    let this = &self;
                    pending.hand_off(
                        offset,
                        Box::pin(async move { this.hand_off(&msg, decision, &error).await }),
                    );
                }
            }
            self.progress.at(offset + 1);
        }
    }

    /// Waits for the pending hand-offs, storing offsets in order, until one is abandoned.
    async fn drain(&self, pending: &mut Pending<'_>) {
        while let Some(Ok(offset)) = pending.next().await {
            self.store(offset);
        }
    }

    /// Stores `offset` as handled (by topic name: the message is gone by now).
    fn store(&self, offset: i64) {
        if let Err(e) = self
            .consumer
            .store_offset(&self.topic, self.partition, offset)
        {
            // Revoked in the meantime: the new owner gets the record again.
            tracing::debug!(topic = %self.topic, partition = self.partition, offset, error = %e, "offset not stored");
        }
    }

    /// Copies the record out of librdkafka's buffer and, on a retry topic, reads its envelope.
    fn decode(&self, raw: &BorrowedMessage<'_>) -> Result<Message, Invalid> {
        let shared = &self.shared;
        shared.stats.consumed();
        let key = raw.key().map(<[u8]>::to_vec);
        let payload = raw.payload().map(<[u8]>::to_vec);
        let bytes = key.as_ref().map_or(0, Vec::len) + payload.as_ref().map_or(0, Vec::len);
        let source_topic = &shared.topology.sources()[self.source].topic;
        self.meters.consumed.increment(1);
        self.meters.bytes.increment(bytes as u64);
        let mut headers: Vec<Header> = headers_of(raw);
        let received = (&self.topic, self.partition, raw.offset());
        let timestamp = raw.timestamp().to_millis();
        let now = now_ms();
        if let Some(ts) = timestamp {
            self.meters
                .e2e_record
                .record((now - ts).max(0) as f64 / 1000.0);
        }
        let Some(tier) = self.tier else {
            return Ok(Message::from_parts(
                received, timestamp, key, payload, headers, None,
            ));
        };
        let invalid = |reason: String, headers: Vec<Header>, key, payload| {
            Err(Invalid {
                msg: Message::from_parts(received, timestamp, key, payload, headers, None),
                reason,
            })
        };
        let (user, envelope) = match Envelope::split(&headers) {
            Ok(split) => split,
            Err(e) => return invalid(e.to_string(), headers, key, payload),
        };
        headers.truncate(user);
        let max_retries = shared.policy.max_retries();
        let problem = if envelope.group != shared.topology.group() {
            Some(format!(
                "envelope group `{}` is not this runtime's group `{}`",
                envelope.group,
                shared.topology.group()
            ))
        } else if envelope.original_topic != *source_topic {
            Some(format!(
                "envelope original topic `{}` does not belong to retry topic `{}`",
                envelope.original_topic, self.topic
            ))
        } else if envelope.attempts == 0 || envelope.attempts > max_retries {
            Some(format!(
                "envelope attempt count {} is outside 1..={max_retries}",
                envelope.attempts
            ))
        } else if envelope.error_kind != ErrorKind::Retryable {
            Some(format!(
                "envelope error kind `{}` on a retry topic",
                envelope.error_kind
            ))
        } else {
            scheduler::wait_for(envelope.due, now_ms(), shared.policy.max_due_delay(tier)).err()
        };
        match problem {
            Some(reason) => invalid(reason, headers, key, payload),
            None => Ok(Message::from_parts(
                received,
                timestamp,
                key,
                payload,
                headers,
                Some(envelope),
            )),
        }
    }

    async fn process(&self, decoded: Result<Message, Invalid>) -> Result<Step, Abandoned> {
        let msg = match decoded {
            Ok(msg) => msg,
            Err(Invalid { msg, reason }) => {
                tracing::warn!(topic = %self.topic, partition = self.partition, reason, "invalid retry envelope");
                return Ok(Step::HandOff(
                    msg,
                    Decision::DeadLetter(DeadLetterReason::InvalidEnvelope),
                    reason,
                ));
            }
        };
        if let Some(envelope) = msg.envelope() {
            if let Some(due) = envelope.due {
                self.wait_until_due(due).await?;
            }
            // Only retry tier partitions read records with an envelope.
            if let Some(meters) = &self.meters.retry {
                let now = now_ms();
                if let Some(due) = envelope.due {
                    meters.lateness.record((now - due).max(0) as f64 / 1000.0);
                }
                // The whole cost of the retries so far: from the original record to here.
                if let Some(ts) = envelope.original_timestamp {
                    meters
                        .e2e_original
                        .record((now - ts).max(0) as f64 / 1000.0);
                }
            }
        }

        let shared = &self.shared;
        let in_flight = &self.meters.in_flight;
        in_flight.increment(1.0);
        let started = Instant::now();
        let result = invoke(&*shared.handler, &msg, &shared.cx).await;
        let elapsed = started.elapsed().as_secs_f64();
        in_flight.decrement(1.0);
        match result {
            Ok(()) => {
                self.meters.processing_handled.record(elapsed);
                self.meters.handled.increment(1);
                shared.stats.handled();
                Ok(Step::Done)
            }
            Err(error) => {
                let decision = shared.policy.decide(msg.attempt(), &error);
                match decision {
                    Decision::Retry { .. } => self.meters.processing_retry.record(elapsed),
                    Decision::DeadLetter(_) => self.meters.processing_dead_letter.record(elapsed),
                }
                tracing::debug!(
                    topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    attempt = msg.attempt(), error = %error, ?decision, "handler failed"
                );
                Ok(Step::HandOff(msg, decision, error.message().to_owned()))
            }
        }
    }

    /// Waits until the record is due. For longer waits the partition is paused, so nothing is
    /// fetched (or polled) meanwhile, and resumed [`resume_ahead`] before the due time:
    /// pausing drops librdkafka's prefetched records, and refetching them after a resume takes
    /// up to one fetch long-poll, which would otherwise make every retry that late.
    async fn wait_until_due(&self, due: i64) -> Result<(), Abandoned> {
        let due_at = |ms: i64| {
            tokio::time::Instant::now()
                + Duration::from_millis(ms.saturating_sub(now_ms()).max(0) as u64)
        };
        let ahead = resume_ahead(&self.shared.config);
        let pause_until = due_at(due - ahead.as_millis() as i64);
        let paused = pause_until > tokio::time::Instant::now();
        if paused {
            self.set_paused(true);
            let slept = self.sleep_until(pause_until).await;
            self.set_paused(false);
            if !slept {
                return Err(Abandoned);
            }
        }
        // Due already: no timer at all. Tokio's timer rounds up to the next millisecond tick,
        // and a burst of records due within the same few milliseconds would otherwise wait
        // for one tick each, in turn (measured: p50 lateness 667 ms on a 10k burst).
        if due <= now_ms() {
            return Ok(());
        }
        if self.sleep_until(due_at(due)).await {
            Ok(())
        } else {
            Err(Abandoned)
        }
    }

    /// Sleeps until `deadline`; false if the task was stopped or revoked first.
    async fn sleep_until(&self, deadline: tokio::time::Instant) -> bool {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => true,
            _ = self.stop.cancelled() => false,
            _ = self.revoked.cancelled() => false,
        }
    }

    fn set_paused(&self, paused: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        let result = if paused {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        // Counted whatever librdkafka answered: a revoked partition cannot be resumed, but it
        // is no longer paused by us either.
        metrics::gauge!(m::PARTITIONS_PAUSED, "group" => self.group_id.clone())
            .increment(if paused { 1.0 } else { -1.0 });
        if let Err(e) = result {
            tracing::debug!(topic = %self.topic, partition = self.partition, paused, error = %e, "pause/resume failed");
        }
    }

    /// Publishes the record to its retry tier or the DLQ and waits for the broker's ack,
    /// retrying with backoff (partition paused) until it succeeds or the task is stopped.
    ///
    /// A record too large for the target (its envelope adds up to ~2 KiB) cannot succeed by
    /// retrying: it is dead-lettered as `oversized` without its payload (and, if still too
    /// large, without its user headers, then its key). The original stays readable at its
    /// source position, which the envelope names.
    async fn hand_off(
        &self,
        msg: &Message,
        decision: Decision,
        error: &str,
    ) -> Result<(), Abandoned> {
        let shared = &self.shared;
        let source = &shared.topology.sources()[self.source];
        let target_of = |d: Decision| match d {
            Decision::Retry { tier, .. } => source.retry[tier].name.as_str(),
            Decision::DeadLetter(_) => source.dead_letter.as_str(),
        };
        let envelope_for = |d: Decision, error: &str| {
            next_envelope(
                msg,
                shared.topology.group(),
                d,
                error,
                &shared.policy,
                now_ms(),
                fastrand::f64(),
            )
        };
        let mut decision = decision;
        let mut error = error.to_owned();
        let mut target = target_of(decision);
        let envelope = envelope_for(decision, &error);
        let mut delivery = match self
            .send_durably(
                target,
                msg.key(),
                msg.payload(),
                msg.headers(),
                &envelope,
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
                decision = Decision::DeadLetter(DeadLetterReason::Oversized);
                target = target_of(decision);
                None
            }
        };
        if delivery.is_none() {
            let envelope = envelope_for(decision, &error);
            let attempts: [(Option<&[u8]>, &[Header]); 3] =
                [(msg.key(), msg.headers()), (msg.key(), &[]), (None, &[])];
            for (key, headers) in attempts {
                if let Sent::Acked(d) = self
                    .send_durably(target, key, None, headers, &envelope, msg)
                    .await?
                {
                    delivery = Some(d);
                    break;
                }
            }
        }
        let Some(delivery) = delivery else {
            // An envelope alone is a few KiB at most; a broker refusing that is misconfigured.
            tracing::error!(
                dlq = target,
                topic = msg.topic(),
                offset = msg.offset(),
                "even an empty record with an envelope is too large for the dead-letter topic"
            );
            return Err(Abandoned);
        };
        let error = error.as_str();
        match decision {
            Decision::Retry { tier, .. } => {
                shared.stats.retried(tier);
                metrics::counter!(m::RETRIES_SCHEDULED, "source" => source.topic.clone(), "tier" => tier.to_string()).increment(1);
                tracing::debug!(
                    target_topic = target,
                    topic = msg.topic(),
                    offset = msg.offset(),
                    attempt = msg.attempt(),
                    "retry scheduled"
                );
            }
            Decision::DeadLetter(reason) => {
                shared.stats.dead_lettered(reason);
                metrics::counter!(m::DEAD_LETTERED, "source" => source.topic.clone(), "reason" => reason.as_str()).increment(1);
                tracing::warn!(
                    dlq = target, dlq_partition = delivery.0, dlq_offset = delivery.1,
                    topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    attempts = msg.attempt(), %reason, error, "record dead-lettered"
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
    /// source partition is paused. Only "too large" is returned instead of retried.
    async fn send_durably(
        &self,
        target: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        user_headers: &[Header],
        envelope: &Envelope,
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
        let mut paused = false;
        let outcome = loop {
            // Set explicitly (not left to the producer) so alerts know the exact timestamp the
            // CLI's --since/--until filters will see.
            let produced_at = now_ms();
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
            let sent = shared
                .producer
                .send(record, Timeout::After(shared.config.handoff.timeout))
                .await;
            let failure = match sent {
                Ok(d) if d.offset >= 0 => {
                    break Ok(Sent::Acked((d.partition, d.offset, produced_at)))
                }
                // An ack without an offset. librdkafka's idempotent producer reports some
                // deliveries so (a batch the broker called a duplicate, for one). Seen on the
                // embedded broker with several hand-offs in flight during produce errors, and
                // that record was in no log. Sending again costs at most a duplicate on the
                // side topic; trusting it lost the record.
                Ok(d) => format!(
                    "acknowledged without an offset (partition {}, offset {}); not trusted",
                    d.partition, d.offset
                ),
                Err((e, _)) if is_too_large(&e) => break Ok(Sent::TooLarge(e)),
                // Revoked: the new owner will handle the record again; stop here.
                Err(_) if self.revoked.is_cancelled() => break Err(Abandoned),
                Err((e, _)) => e.to_string(),
            };
            shared.stats.handoff_failed();
            let source = &shared.topology.sources()[self.source].topic;
            metrics::counter!(m::HANDOFF_FAILURES, "source" => source.clone()).increment(1);
            tracing::warn!(
                target_topic = target, topic = msg.topic(), partition = msg.partition(),
                offset = msg.offset(), error = %failure, retry_in = ?backoff,
                "hand-off failed; partition paused, retrying"
            );
            if !paused {
                paused = true;
                // The first failing hand-off pauses the partition; others may be failing
                // beside it.
                if self.failing.fetch_add(1, Ordering::SeqCst) == 0 {
                    self.set_paused(true);
                }
            }
            let go_on = tokio::select! {
                _ = tokio::time::sleep(backoff) => true,
                _ = self.stop.cancelled() => false,
                _ = self.revoked.cancelled() => false,
            };
            if !go_on {
                break Err(Abandoned);
            }
            backoff = (backoff * 2).min(shared.config.handoff.backoff_max);
        };
        if paused && self.failing.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.set_paused(false);
        }
        outcome
    }
}

/// Metrics of records read from a retry tier.
struct RetryMeters {
    e2e_original: metrics::Histogram,
    lateness: metrics::Histogram,
}

/// The metric handles of one partition task.
struct Meters {
    consumed: metrics::Counter,
    bytes: metrics::Counter,
    e2e_record: metrics::Histogram,
    /// Only on retry tier partitions.
    retry: Option<RetryMeters>,
    in_flight: metrics::Gauge,
    processing_handled: metrics::Histogram,
    processing_retry: metrics::Histogram,
    processing_dead_letter: metrics::Histogram,
    handled: metrics::Counter,
}

impl Meters {
    fn new(group: &str, topic: &str, source: &str, retry_tier: bool) -> Self {
        let (g, t, s) = (group.to_owned(), topic.to_owned(), source.to_owned());
        let processing = |outcome: &'static str| metrics::histogram!(m::PROCESSING_SECONDS, "source" => s.clone(), "outcome" => outcome);
        Meters {
            consumed: metrics::counter!(m::RECORDS_CONSUMED, "group" => g.clone(), "topic" => t.clone()),
            bytes: metrics::counter!(m::BYTES_CONSUMED, "group" => g.clone(), "topic" => t.clone()),
            e2e_record: metrics::histogram!(m::END_TO_END_SECONDS, "topic" => t.clone(), "from" => "record"),
            retry: retry_tier.then(|| RetryMeters {
                e2e_original: metrics::histogram!(m::END_TO_END_SECONDS, "topic" => t.clone(), "from" => "original"),
                lateness: metrics::histogram!(m::RETRY_LATENESS_SECONDS, "topic" => t.clone()),
            }),
            in_flight: metrics::gauge!(m::RECORDS_IN_FLIGHT, "group" => g),
            processing_handled: processing("handled"),
            processing_retry: processing("retry"),
            processing_dead_letter: processing("dead_letter"),
            handled: metrics::counter!(m::RECORDS_HANDLED, "source" => s.clone()),
        }
    }
}

/// Result of [`PartitionTask::send_durably`].
enum Sent {
    /// Acknowledged: (partition, offset, timestamp we set).
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

/// How long before a retry record is due its paused partition is resumed: the retry consumer's
/// fetch long-poll (`fetch.wait.max.ms`, 100 ms unless overridden) plus room for a round trip.
fn resume_ahead(config: &crate::Config) -> Duration {
    let fetch_wait = config
        .consumer
        .get("fetch.wait.max.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(super::client::RETRY_FETCH_WAIT_MS);
    Duration::from_millis(fetch_wait + 200)
}

/// A stable, non-reversible stand-in for a key in traces (keys may carry personal data).
fn key_hash(key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// A retry-topic record whose envelope cannot be trusted.
struct Invalid {
    msg: Message,
    reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked() -> HandOffFuture<'static> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn abandoned() -> HandOffFuture<'static> {
        Box::pin(std::future::ready(Err(Abandoned)))
    }

    /// The offset stored after each hand-off settles never passes a hand-off still waiting.
    #[tokio::test]
    async fn settled_hand_offs_store_up_to_the_next_waiting_one() {
        let mut p = Pending::new(Progress::new());
        p.handled(9);
        p.hand_off(10, acked());
        p.handled(11);
        p.handled(12);
        p.hand_off(13, acked());
        p.handled(14);
        assert_eq!(p.len(), 2);
        // 10 is durable; 13 is not yet: store through 12.
        assert!(matches!(p.next().await, Some(Ok(12))));
        assert_eq!(p.len(), 1);
        p.handled(15);
        // 13 is durable and nothing waits: store through the last record handled.
        assert!(matches!(p.next().await, Some(Ok(15))));
        assert!(p.is_empty());
        assert!(p.next().await.is_none());
    }

    #[tokio::test]
    async fn back_to_back_hand_offs_store_one_at_a_time() {
        let mut p = Pending::new(Progress::new());
        p.hand_off(3, acked());
        p.hand_off(4, acked());
        p.hand_off(5, acked());
        for expected in 3..=5 {
            assert!(matches!(p.next().await, Some(Ok(o)) if o == expected));
        }
    }

    /// An abandoned hand-off stores nothing, and the records behind it stay unstored.
    #[tokio::test]
    async fn an_abandoned_hand_off_stores_nothing() {
        let progress = Progress::new();
        let mut p = Pending::new(Arc::clone(&progress));
        progress.at(7);
        p.hand_off(7, abandoned());
        p.handled(8);
        progress.at(9);
        assert!(matches!(p.next().await, Some(Err(Abandoned))));
        // What a revocation now reports as to be handled again: 7 and 8.
        assert_eq!(progress.unstored(), 2);
    }
}
