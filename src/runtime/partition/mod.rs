//! The task that owns one assigned partition: take its records in offset order, run the
//! handler on them — one at a time (`partition` ordering, [`sequential`]) or concurrently
//! (`key`, `unordered`, [`concurrent`]; which records may start is decided by
//! [`crate::runtime::scheduler`]) — hand failures to a retry tier or the DLQ (see
//! [`crate::runtime::handoff`]), and store the offset of the contiguous frontier of durable
//! outcomes (see [`offsets`]).
//!
//! The task is split by the stage a record goes through, one file each:
//!
//! | file            | stage                                                        |
//! |-----------------|--------------------------------------------------------------|
//! | [`intake`]      | detach the record from the queue, decode it (and its envelope) |
//! | [`call`]        | due-time wait, invoke the handler, timing, time limit, conclude |
//! | hand-off        | [`crate::runtime::handoff::HandOff`], a type of its own       |
//! | [`offsets`]     | frontier, progress, settle, store: the at-least-once rule     |
//! | [`meters`]      | metric handles and the counts published in batches            |
//! | [`sequential`], [`concurrent`] | the two record loops, and nothing else         |
//!
//! This file builds the task from one struct of its parts ([`Parts`]), erases the handler
//! type once per task ([`RunPartition`]) and holds the few steps both loops share (taking a
//! record, what a finished record leaves to do, flushing, draining).
//!
//! The per-record path is kept lean: the handler is called through static dispatch (the
//! handler type is erased once per task, not per record), it reads the record in librdkafka's
//! own buffer (nothing is copied unless the record is kept), offsets and counters are flushed
//! in batches (when the queue runs dry, and every [`FLUSH_EVERY`] records), the wall clock is
//! read once per batch and the handler's duration is sampled for handlers that finish without
//! waiting.

pub(crate) mod call;
mod concurrent;
mod intake;
pub(crate) mod meters;
pub(crate) mod offsets;
mod sequential;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::Message as _;

use crate::config::Ordering as RecordOrdering;
use crate::handler::Handler;
use crate::retry::scheduler::now_ms;
use crate::retry::Decision;

use super::breaker::{Breaker, BreakerControl};
use super::group::{GroupConsumer, GroupContext, Role};
use super::handoff::{Abandoned, HandOff, MAX_PENDING};
use super::pause::Pause;
use super::signal::Signal;
use super::Shared;

use call::{Caller, DueWait, Limits, Step};
use intake::{Intake, Raw, Taken};
use meters::{Batch, CallMeters, Meters};
use offsets::{Frontier, Offsets, Progress, Seq};

/// Offsets are stored, and batched counters flushed, at least this often (in records) while
/// the queue never runs dry; always when it does. Only stored offsets are committed, so
/// storing the highest durable one in batches is as safe as storing each.
const FLUSH_EVERY: u32 = 256;

/// The handler, erased once per partition task: the record loop itself is compiled for the
/// concrete handler type, so calling the handler costs no boxing per record.
pub(crate) trait RunPartition: Send + Sync + 'static {
    /// Runs `task` on `queue` until it ends.
    fn run<'a>(&'a self, task: PartitionTask, queue: Arc<Queue>) -> BoxFuture<'a, End>;
}

impl<H: Handler> RunPartition for H {
    fn run<'a>(&'a self, mut task: PartitionTask, queue: Arc<Queue>) -> BoxFuture<'a, End> {
        if Handler::timeout(self).is_some() {
            task.caller
                .set_limits(Limits::of(&task.shared.config, self));
        }
        Box::pin(async move {
            match task.ordering {
                RecordOrdering::Partition => task.run_sequential(self, queue).await,
                _ => task.run_concurrent(self, queue).await,
            }
        })
    }
}

/// A partition's queue, split from its consumer.
pub(crate) type Queue = StreamPartitionQueue<GroupContext>;

/// A hand-off in flight: the record's sequence number and whether it became durable.
pub(crate) type HandOffFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Seq, Result<(), Abandoned>)> + Send + 'a>>;

/// How a partition task ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Shutdown: in-flight work finished or was abandoned.
    Stopped,
    /// The partition was revoked.
    Revoked,
    /// An unexpected end: the supervisor reports it and restarts the task.
    Failed(String),
    /// The dead-letter breaker opened: in-flight work finished or was held, the frontier is
    /// stored; the supervisor waits out the cool-down and starts the task again from it.
    BreakerOpen(Breaker),
}

/// A record whose handler call (or due-time wait) ended.
pub(crate) struct Finished {
    seq: Seq,
    key: Option<u64>,
    /// The watchdog slot its call used, free again.
    slot: usize,
    /// Views into `raw`: declared (and so dropped) before it.
    outcome: Result<Step, Abandoned>,
    raw: Raw,
}

/// What a partition task is built from: one struct, filled by its supervisor.
pub(crate) struct Parts {
    pub(crate) shared: Arc<Shared>,
    /// Whether the partition is of a source topic or a retry tier.
    pub(crate) role: Role,
    pub(crate) group_id: String,
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    /// Raised when the partition is revoked.
    pub(crate) revoked: Signal,
    /// The partition's progress, kept across the tasks of one assignment.
    pub(crate) progress: Arc<Progress>,
    /// The breaker state this task starts with, and its partition's control (see
    /// [`crate::runtime::breaker`]).
    pub(crate) breaker: Breaker,
    pub(crate) breaker_control: Arc<BreakerControl>,
}

/// One partition's task: its stages, and what both record loops share.
pub(crate) struct PartitionTask {
    shared: Arc<Shared>,
    consumer: Arc<GroupConsumer>,
    ordering: RecordOrdering,
    /// Cancelled on shutdown: finish the current record, take no new ones.
    stop: Signal,
    /// Cancelled on revoke: drop the queue at once, abandon the current record.
    revoked: Signal,
    /// Where records come from and how they are read.
    intake: Intake,
    /// Waits for retry records to be due.
    due: DueWait,
    /// Calls the handler.
    caller: Caller,
    /// Sends failed records to their retry tier or the DLQ.
    handoff: HandOff,
    /// Marks records durable and stores the frontier.
    offsets: Offsets,
    /// Metric handles registered once: the per-record path only increments them.
    meters: Meters,
    /// The breaker state this task starts with, and its partition's control.
    breaker: Breaker,
    breaker_control: Arc<BreakerControl>,
}

impl PartitionTask {
    /// Builds the task of one partition from its parts (off the per-record path: labels and
    /// handles are made here once).
    pub(crate) fn new(parts: Parts) -> Self {
        let Parts {
            shared,
            role,
            group_id,
            consumer,
            topic,
            partition,
            revoked,
            progress,
            breaker,
            breaker_control,
        } = parts;
        let group_id = group_id.as_str();
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
                let (s, t) = shared.topology.locate_retry(&topic).unwrap_or((0, 0));
                (s, Some(t))
            }
        };
        let source_topic = shared.topology.sources()[source].topic.as_str();
        let meters = Meters::new(group_id, &topic, partition, source_topic, tier.is_some());
        let config = &shared.config;
        let slots = match config.ordering {
            RecordOrdering::Partition => 1,
            _ => config.max_in_flight,
        };
        let caller = Caller::new(
            Limits::new(config, config.handler_timeout),
            CallMeters::new(group_id, &topic, source_topic),
            shared.watchdog.watch(group_id, &topic, partition, slots),
        );
        let stop = shared.shutdown.clone();
        let topic: Arc<str> = Arc::from(topic.as_str());
        let by_key = config.ordering == RecordOrdering::Key;
        let intake = match tier {
            None => Intake::source(Arc::clone(&topic), partition, by_key),
            Some(tier) => Intake::retry_tier(
                Arc::clone(&topic),
                partition,
                by_key,
                (shared.topology.group(), source_topic),
                (
                    shared.policy.max_retries(),
                    shared.policy.max_due_delay(tier),
                ),
            ),
        };
        let pause = Arc::new(Pause::new(
            Arc::clone(&consumer),
            Arc::clone(&topic),
            partition,
            group_id,
        ));
        PartitionTask {
            due: DueWait::new(config, Arc::clone(&pause), stop.clone(), revoked.clone()),
            handoff: HandOff::new(
                Arc::clone(&shared),
                source,
                stop.clone(),
                revoked.clone(),
                pause,
            ),
            offsets: Offsets::new(progress, topic, partition),
            ordering: config.ordering,
            intake,
            caller,
            meters,
            stop,
            revoked,
            consumer,
            breaker,
            breaker_control,
            shared,
        }
    }

    /// Whether the partition may take another record: room for hand-offs, no hand-off
    /// failing, and not too far past the oldest record without a durable outcome.
    #[inline]
    fn has_room(&self, frontier: &Frontier, handoffs: usize) -> bool {
        handoffs < MAX_PENDING
            && !self.handoff.is_failing()
            && frontier.window() < self.shared.config.max_ahead
    }

    /// Takes a record: its place in the frontier, its key, and what it decodes to.
    #[inline]
    fn take(&self, raw: Raw, frontier: &mut Frontier, batch: &mut Batch) -> Taken {
        let seq = self.mark_taken(&raw, frontier, batch);
        let key = self.intake.key_of(&raw);
        let decoded = self.intake.decode(&raw, batch, &self.meters);
        Taken {
            seq,
            key,
            decoded,
            raw,
        }
    }

    /// Marks a record as taken (before anything that could fail: a task restarted after a
    /// panic starts again from it): its place in the frontier.
    #[inline]
    fn mark_taken(&self, raw: &Raw, frontier: &mut Frontier, batch: &mut Batch) -> Seq {
        batch.since_flush += 1;
        batch.breaker.taken();
        self.offsets.taken(raw.offset(), frontier)
    }

    /// What to do with a finished record: durable, or handed off. `Err(End::Stopped)` when
    /// the record was abandoned because the task is stopping (the caller drains).
    fn finished<'a>(
        &'a self,
        finished: Finished,
        frontier: &mut Frontier,
        batch: &mut Batch,
        handoffs: &mut FuturesUnordered<HandOffFuture<'a>>,
    ) -> Result<(), End> {
        let Finished {
            seq, outcome, raw, ..
        } = finished;
        match outcome {
            Ok(step) => {
                self.step(seq, step, raw, frontier, batch, handoffs);
                Ok(())
            }
            Err(abandoned) => Err(self.end(abandoned)),
        }
    }

    /// What a handled record leaves to do: durable at once, or a hand-off to send.
    fn step<'a>(
        &'a self,
        seq: Seq,
        step: Step,
        raw: Raw,
        frontier: &mut Frontier,
        batch: &mut Batch,
        handoffs: &mut FuturesUnordered<HandOffFuture<'a>>,
    ) {
        let dead = matches!(step, Step::HandOff(_, Decision::DeadLetter(_), _));
        if !self
            .breaker_control
            .admits(&self.shared, &mut batch.breaker, dead, raw.offset())
        {
            // Held by the open breaker: no outcome, so nothing at or past it is stored; the
            // task is started again from it after the cool-down.
            drop(step);
            drop(raw);
            return;
        }
        match step {
            Step::Done => {
                batch.handled += 1;
                self.offsets.durable(seq, frontier);
            }
            Step::HandOff(msg, decision, error) => {
                handoffs.push(Box::pin(async move {
                    let settled = self.handoff.hand_off(&msg, decision, &error).await;
                    // The message's views into librdkafka's buffer go before the buffer.
                    drop(msg);
                    drop(raw);
                    (seq, settled)
                }));
            }
        }
    }

    /// Settles the hand-offs that are done, without waiting.
    fn settle(
        &self,
        handoffs: &mut FuturesUnordered<HandOffFuture<'_>>,
        frontier: &mut Frontier,
    ) -> Result<(), End> {
        self.offsets
            .settle(handoffs, frontier)
            .map_err(|a| self.end(a))
    }

    /// A hand-off resolved: durable, or the task ends.
    fn settled(
        &self,
        seq: Seq,
        settled: Result<(), Abandoned>,
        frontier: &mut Frontier,
    ) -> Result<(), End> {
        self.offsets
            .settled(seq, settled, frontier)
            .map_err(|a| self.end(a))
    }

    /// Stores the frontier if it moved and publishes the batch's counts and gauges.
    fn flush(&self, frontier: &mut Frontier, batch: &mut Batch, in_flight: usize, waiting: usize) {
        batch.now = now_ms();
        self.offsets.store(&*self.consumer, frontier);
        let stats = &self.shared.stats;
        if batch.consumed > 0 {
            stats.consumed(batch.consumed);
            self.meters.consumed.increment(batch.consumed);
            self.meters.bytes.increment(batch.bytes);
        }
        if batch.handled > 0 {
            stats.handled(batch.handled);
            self.meters.handled.increment(batch.handled);
        }
        self.meters
            .publish(in_flight, waiting, frontier.durable_ahead());
        batch.consumed = 0;
        batch.bytes = 0;
        batch.handled = 0;
        batch.since_flush = 0;
    }

    /// How the task ends after `abandoned`.
    fn end(&self, abandoned: Abandoned) -> End {
        match abandoned {
            Abandoned::Failed(reason) => End::Failed(reason),
            Abandoned::Told if self.revoked.is_cancelled() => End::Revoked,
            Abandoned::Told => End::Stopped,
        }
    }

    /// Shutdown: waits for the hand-offs sent, storing the frontier as it moves. Bounded by
    /// the group's shutdown deadline, which aborts the task.
    async fn drain(
        &self,
        handoffs: &mut FuturesUnordered<HandOffFuture<'_>>,
        frontier: &mut Frontier,
        batch: &mut Batch,
    ) -> End {
        while let Some((seq, settled)) = handoffs.next().await {
            if let Err(end) = self.settled(seq, settled, frontier) {
                self.flush(frontier, batch, 0, 0);
                return end;
            }
        }
        self.flush(frontier, batch, 0, 0);
        if batch.breaker.is_open() {
            End::BreakerOpen(batch.breaker.clone())
        } else {
            End::Stopped
        }
    }

    /// A fresh batch, starting with the breaker state the task was given.
    fn batch(&self) -> Batch {
        Batch {
            now: now_ms(),
            breaker: self.breaker.clone(),
            ..Batch::default()
        }
    }

    /// Logs a failed fetch (the loop goes on: librdkafka retries by itself).
    fn fetch_error(&self, e: &rdkafka::error::KafkaError) {
        tracing::warn!(topic = %self.intake.topic, partition = self.intake.partition, error = %e, "fetch error");
    }
}
