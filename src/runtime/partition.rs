//! The task that owns one assigned partition: take its records in offset order, run the
//! handler, hand failures to a retry tier or the DLQ (see [`super::handoff`]), and store the
//! offset only after a durable outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dead_letter::DeadLetterReason;
use crate::handler::{headers_of, invoke, Header, Message};
use crate::metrics as m;
use crate::metrics::lag::Progress;
use crate::retry::decode::{read_retry_envelope, Expected};
use crate::retry::scheduler::{self, elapsed_secs, now_ms};
use crate::retry::Decision;

use super::group::{GroupConsumer, GroupContext, Role};
use super::handoff::{Pending, MAX_PENDING};
use super::pause::{Pause, PauseHold};
use super::Shared;

/// Why a piece of work ended without a durable outcome. Its offset is not stored.
#[derive(Debug)]
pub(crate) enum Abandoned {
    /// The task was told to stop (shutdown, revoke, or the runtime is failing).
    Told,
    /// Something went wrong that the task cannot get past; its supervisor restarts it.
    Failed(String),
}

/// How a partition task ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Shutdown: in-flight work finished or was abandoned.
    Stopped,
    /// The partition was revoked.
    Revoked,
    /// An unexpected end: the supervisor reports it and restarts the task.
    Failed(String),
}

/// What handling a record left to do.
enum Step {
    /// Handled: the offset may be stored once every earlier record is durable.
    Done,
    /// Failed: to be handed to a retry tier or the DLQ, with the error text.
    HandOff(Message, Decision, String),
}

/// What the partition task does next.
enum Next<'q> {
    Record(Result<BorrowedMessage<'q>, KafkaError>),
    /// The oldest hand-off resolved: the offset to store now, or abandoned.
    Settled(Result<i64, Abandoned>),
    Stop,
}

/// A decoded record: the message and, on a retry tier, when it is due and the retry record's
/// own timestamp (the writer's clock; see [`scheduler::wait_for`]).
struct Decoded {
    msg: Message,
    due: Option<(i64, Option<i64>)>,
}

/// A retry-topic record whose envelope cannot be trusted.
struct Invalid {
    msg: Message,
    reason: String,
}

/// Held while a hand-off of this partition fails: the partition is paused and takes no new
/// record.
pub(crate) struct Failing<'a> {
    count: &'a AtomicUsize,
    _pause: PauseHold<'a>,
}

impl Drop for Failing<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) struct PartitionTask {
    pub(super) shared: Arc<Shared>,
    /// Next offset to handle, read by the lag sampler.
    progress: Arc<Progress>,
    /// Metric handles registered once: the per-record path only increments them.
    meters: Meters,
    consumer: Arc<GroupConsumer>,
    /// Shared with every [`Message`] read here.
    topic: Arc<str>,
    partition: i32,
    /// Index of the source topic this partition belongs to.
    pub(super) source: usize,
    /// Tier index, for retry topics.
    tier: Option<usize>,
    /// Cancelled on shutdown: finish the current record, take no new ones.
    pub(super) stop: CancellationToken,
    /// Cancelled on revoke: drop the queue at once, abandon the current record.
    pub(super) revoked: CancellationToken,
    /// Hand-offs of this partition being retried after a failure. While any is, the partition
    /// is paused and takes no new record.
    failing: AtomicUsize,
    /// Pause holds of this partition (failing hand-offs, retry records not yet due).
    pause: Pause,
}

impl PartitionTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        role: Role,
        group_id: &str,
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
            group_id,
            topic,
            &shared.topology.sources()[source].topic,
            tier.is_some(),
        );
        let topic: Arc<str> = Arc::from(topic);
        PartitionTask {
            meters,
            stop: shared.shutdown.clone(),
            shared,
            progress,
            pause: Pause::new(
                Arc::clone(&consumer),
                Arc::clone(&topic),
                partition,
                group_id,
            ),
            consumer,
            topic,
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
    pub(crate) async fn run(self, queue: Arc<StreamPartitionQueue<GroupContext>>) -> End {
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
                return End::Revoked;
            }
            if stop.is_cancelled() {
                // Shutdown: the hand-offs already sent get their acknowledgement.
                return self.drain(&mut pending).await;
            }
            // Settle the hand-offs that are done, in order, without waiting; storing the last
            // of them covers the ones before.
            let mut settled = None;
            while !pending.is_empty() {
                match pending.next().now_or_never() {
                    Some(Some(Ok(offset))) => settled = Some(offset),
                    Some(Some(Err(abandoned))) => {
                        if let Some(offset) = settled {
                            self.store(offset);
                        }
                        return self.end(abandoned);
                    }
                    _ => break,
                }
            }
            if let Some(offset) = settled {
                self.store(offset);
            }
            let take_more =
                pending.len() < MAX_PENDING && self.failing.load(Ordering::Relaxed) == 0;
            if take_more && !self.consumer.context().wait_unfenced(&stop, &revoked).await {
                continue;
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
                        _ = &mut revoked_wait => return End::Revoked,
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
                Next::Settled(Err(abandoned)) => return self.end(abandoned),
                Next::Stop => return self.drain(&mut pending).await,
            };
            // Marked as taken before anything that could fail: a task restarted after a panic
            // in decoding starts again from this record, not after it.
            let offset = raw.offset();
            self.progress.at(offset);
            let decoded = self.decode(&raw);
            let span = tracing::debug_span!(
                "record",
                topic = %self.topic,
                partition = self.partition,
                offset,
                attempt = tracing::field::Empty,
                key_hash = tracing::field::Empty,
            );
            if !span.is_disabled() {
                if let Ok(d) = &decoded {
                    span.record("attempt", d.msg.attempt());
                    if let Some(key) = d.msg.key() {
                        span.record("key_hash", format!("{:016x}", key_hash(key)));
                    }
                }
            }
            let work = self.process(decoded).instrument(span);
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
                            // Nothing after an abandoned hand-off may be stored.
                            Err(abandoned) => return self.end(abandoned),
                        }
                    }
                    _ = &mut revoked_wait => {
                        // Drop the queue now: a new queue for this partition may be split
                        // soon, and an old handle alive beside it stops its wake-ups. The
                        // next owner in this process waits for this task to end before it
                        // takes a record, so the record is never in two handler calls at once.
                        drop(queue);
                        let _ = work.await;
                        return End::Revoked;
                    }
                }
            };
            match outcome {
                Err(abandoned) => {
                    if matches!(abandoned, Abandoned::Told) && !revoked.is_cancelled() {
                        return self.drain(&mut pending).await;
                    }
                    return self.end(abandoned);
                }
                Ok(Step::Done) if pending.is_empty() => {
                    // From the message itself: storing by topic name looks the topic up each
                    // time.
                    match self.consumer.store_offset_from_message(&raw) {
                        Ok(()) => self.progress.stored(offset),
                        // Revoked in the meantime: the new owner gets the record again.
                        Err(e) => {
                            tracing::debug!(topic = %self.topic, partition = self.partition, offset, error = %e, "offset not stored")
                        }
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
            self.progress.at(offset.saturating_add(1));
        }
    }

    /// How the task ends after `abandoned`.
    fn end(&self, abandoned: Abandoned) -> End {
        match abandoned {
            Abandoned::Failed(reason) => End::Failed(reason),
            Abandoned::Told if self.revoked.is_cancelled() => End::Revoked,
            Abandoned::Told => End::Stopped,
        }
    }

    /// Waits for the pending hand-offs, storing offsets in order, until one is abandoned.
    async fn drain(&self, pending: &mut Pending<'_>) -> End {
        while let Some(settled) = pending.next().await {
            match settled {
                Ok(offset) => self.store(offset),
                Err(abandoned) => return self.end(abandoned),
            }
        }
        End::Stopped
    }

    /// Stores `offset` as handled (by topic name: the message is gone by now).
    fn store(&self, offset: i64) {
        match self
            .consumer
            .store_offset(&self.topic, self.partition, offset)
        {
            Ok(()) => self.progress.stored(offset),
            // Revoked in the meantime: the new owner gets the record again.
            Err(e) => {
                tracing::debug!(topic = %self.topic, partition = self.partition, offset, error = %e, "offset not stored")
            }
        }
    }

    /// Marks a hand-off of this partition as failing until the returned guard is dropped.
    pub(super) fn failing(&self) -> Failing<'_> {
        self.failing.fetch_add(1, Ordering::SeqCst);
        Failing {
            count: &self.failing,
            _pause: self.pause.hold(),
        }
    }

    /// Copies the record out of librdkafka's buffer and, on a retry topic, reads its envelope.
    fn decode(&self, raw: &BorrowedMessage<'_>) -> Result<Decoded, Invalid> {
        let shared = &self.shared;
        shared.stats.consumed();
        let key = raw.key().map(<[u8]>::to_vec);
        let payload = raw.payload().map(<[u8]>::to_vec);
        let bytes = key.as_ref().map_or(0, Vec::len) + payload.as_ref().map_or(0, Vec::len);
        self.meters.consumed.increment(1);
        self.meters.bytes.increment(bytes as u64);
        let mut headers: Vec<Header> = headers_of(raw);
        let received = (&self.topic, self.partition, raw.offset());
        let timestamp = raw.timestamp().to_millis();
        let now = now_ms();
        if let Some(ts) = timestamp {
            self.meters.e2e_record.record(elapsed_secs(ts, now));
        }
        let Some(tier) = self.tier else {
            return Ok(Decoded {
                msg: Message::from_parts(received, timestamp, key, payload, headers, None),
                due: None,
            });
        };
        let source = &shared.topology.sources()[self.source];
        let expected = Expected {
            group: shared.topology.group(),
            source_topic: &source.topic,
            tier_topic: &self.topic,
            max_retries: shared.policy.max_retries(),
            max_due_delay: shared.policy.max_due_delay(tier),
        };
        match read_retry_envelope(&headers, timestamp, now, &expected) {
            Ok((user, envelope)) => {
                headers.truncate(user);
                let due = envelope.due.map(|due| (due, timestamp));
                Ok(Decoded {
                    msg: Message::from_parts(
                        received,
                        timestamp,
                        key,
                        payload,
                        headers,
                        Some(envelope),
                    ),
                    due,
                })
            }
            Err(reason) => Err(Invalid {
                msg: Message::from_parts(received, timestamp, key, payload, headers, None),
                reason,
            }),
        }
    }

    async fn process(&self, decoded: Result<Decoded, Invalid>) -> Result<Step, Abandoned> {
        let (msg, due) = match decoded {
            Ok(Decoded { msg, due }) => (msg, due),
            Err(Invalid { msg, reason }) => {
                tracing::warn!(topic = %self.topic, partition = self.partition, reason, "invalid retry envelope");
                return Ok(Step::HandOff(
                    msg,
                    Decision::DeadLetter(DeadLetterReason::InvalidEnvelope),
                    reason,
                ));
            }
        };
        if let Some((due, written_at)) = due {
            self.wait_until_due(due, written_at).await?;
            // Only retry tier partitions read records with an envelope.
            if let Some(meters) = &self.meters.retry {
                let now = now_ms();
                meters.lateness.record(elapsed_secs(due, now));
                // The whole cost of the retries so far: from the original record to here.
                if let Some(ts) = msg.timestamp() {
                    meters.e2e_original.record(elapsed_secs(ts, now));
                }
            }
        }

        let shared = &self.shared;
        // Decremented however the call ends (also when it is abandoned at shutdown).
        let _in_flight = InFlight::new(&self.meters.in_flight);
        let started = Instant::now();
        let result = invoke(&*shared.handler, &msg, &shared.cx).await;
        let elapsed = started.elapsed().as_secs_f64();
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

    /// Waits until the record is due (see [`scheduler::wait_for`]). For longer waits the
    /// partition is paused, so nothing is fetched (or polled) meanwhile, and resumed
    /// [`resume_ahead`] before the due time: pausing drops librdkafka's prefetched records, and
    /// refetching them after a resume takes up to one fetch long-poll, which would otherwise
    /// make every retry that late.
    async fn wait_until_due(&self, due: i64, written_at: Option<i64>) -> Result<(), Abandoned> {
        let wait = scheduler::wait_for(due, written_at, now_ms());
        // Due already: no timer at all. Tokio's timer rounds up to the next millisecond tick,
        // and a burst of records due within the same few milliseconds would otherwise wait
        // for one tick each, in turn (measured: p50 lateness 667 ms on a 10k burst).
        if wait.is_zero() {
            return Ok(());
        }
        let start = tokio::time::Instant::now();
        let ahead = resume_ahead(&self.shared.config);
        if let Some(paused_for) = wait.checked_sub(ahead).filter(|d| !d.is_zero()) {
            let _paused = self.pause.hold();
            if !self.sleep_until(start + paused_for).await {
                return Err(Abandoned::Told);
            }
        }
        if self.sleep_until(start + wait).await {
            Ok(())
        } else {
            Err(Abandoned::Told)
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

/// One handler call counted in the in-flight gauge for as long as it lives.
struct InFlight<'a>(&'a metrics::Gauge);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a metrics::Gauge) -> Self {
        gauge.increment(1.0);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// How long before a retry record is due its paused partition is resumed: the retry consumer's
/// fetch long-poll (`fetch.wait.max.ms`, 100 ms unless overridden) plus room for a round trip.
fn resume_ahead(config: &crate::Config) -> Duration {
    let fetch_wait = config
        .consumer
        .get("fetch.wait.max.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(super::client::RETRY_FETCH_WAIT_MS);
    Duration::from_millis(fetch_wait.saturating_add(200))
}

/// A stable, non-reversible stand-in for a key in traces (keys may carry personal data).
fn key_hash(key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}
