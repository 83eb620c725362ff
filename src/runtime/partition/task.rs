//! The partition task's state and the steps both record loops share: taking a record, what a
//! finished record leaves to do (the breaker's say, durable or handed off), settling hand-offs,
//! flushing (store the frontier, publish the batch), and ending (drain, or why not).
//!
//! A file below the loops, so that [`super::sequential`] and [`super::concurrent`] depend on the
//! task's state without depending on the file that builds the task and dispatches to them
//! (`partition/mod.rs`): the partition's files form a strict order (see the parent module).
//! Every stage the task holds is a field of its own type, built once per task; the per-record
//! path only reads them.

use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::Message as _;

use crate::config::Ordering as RecordOrdering;
use crate::outcome::Disposition;
use crate::retry::scheduler::now_ms;
use crate::runtime::breaker::{Breaker, BreakerControl};
use crate::runtime::consumer::{GroupConsumer, GroupContext};
use crate::runtime::handoff::{Abandoned, HandOff, MAX_PENDING};
use crate::runtime::shared::Shared;
use crate::runtime::signal::Signal;

use crate::key_order::wire::Ended;

use super::call::{Caller, DueWait, Step};
use super::intake::{Intake, Raw, Taken};
use super::key_order_state::KeyOrderStage;
use super::meters::{Batch, Meters};
use super::offsets::{Frontier, Offsets, Seq};

/// Offsets are stored, and batched counters flushed, at least this often (in records) while
/// the queue never runs dry; always when it does. Only stored offsets are committed, so
/// storing the highest durable one in batches is as safe as storing each.
pub(super) const FLUSH_EVERY: u32 = 256;

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
    /// Its place in the offsets window, to mark it done (or handed off).
    pub(super) seq: Seq,
    /// Its key's hash: in `key` ordering, the next record of that key may start now.
    pub(super) key: Option<u64>,
    /// The watchdog slot its call used, free again.
    pub(super) slot: usize,
    /// Views into `raw`: declared (and so dropped) before it.
    pub(super) outcome: Result<Step, Abandoned>,
    /// The consumed librdkafka message, kept alive until the record's hand-off is done with it.
    pub(super) raw: Raw,
}

/// One partition's task: its stages, and what both record loops share.
pub(crate) struct PartitionTask {
    /// The runtime's shared state: config, policy, topology, handler, producer, stats.
    pub(super) shared: Arc<Shared>,
    /// The group's consumer, for the partition's queue, pauses and the offset store.
    pub(super) consumer: Arc<GroupConsumer>,
    /// Which record loop runs (`partition`: sequential; `key` or `unordered`: concurrent) and
    /// its bounds.
    pub(super) ordering: RecordOrdering,
    /// Cancelled on shutdown: finish the current record, take no new ones.
    pub(super) stop: Signal,
    /// Cancelled on revoke: drop the queue at once, abandon the current record.
    pub(super) revoked: Signal,
    /// Where records come from and how they are read.
    pub(super) intake: Intake,
    /// Waits for retry records to be due.
    pub(super) due: DueWait,
    /// Calls the handler.
    pub(super) caller: Caller,
    /// Sends failed records to their retry tier or the DLQ.
    pub(super) handoff: HandOff,
    /// Marks records durable and stores the frontier.
    pub(super) offsets: Offsets,
    /// Metric handles registered once: the per-record path only increments them.
    pub(super) meters: Meters,
    /// The breaker state this task starts with, and its partition's control.
    pub(super) breaker: Breaker,
    /// The partition's entry in the runtime's breaker registry: how
    /// [`RuntimeHandle::close_breaker`](crate::RuntimeHandle::close_breaker) reaches this task.
    pub(super) breaker_control: Arc<BreakerControl>,
    /// `keep_key_order`: the key-order stage (`None` otherwise: one branch per record).
    pub(super) key_order: Option<KeyOrderStage>,
}

impl PartitionTask {
    /// Whether the partition may take another record: room for hand-offs, no hand-off
    /// failing, and not too far past the oldest record without a durable outcome.
    #[inline]
    pub(super) fn has_room(&self, frontier: &Frontier, handoffs: usize) -> bool {
        handoffs < MAX_PENDING
            && !self.handoff.is_failing()
            && frontier.window() < self.shared.config.max_ahead
    }

    /// Takes a record: its place in the frontier, its key, and what it decodes to.
    #[inline]
    pub(super) fn take(&self, raw: Raw, frontier: &mut Frontier, batch: &mut Batch) -> Taken {
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
    pub(super) fn mark_taken(&self, raw: &Raw, frontier: &mut Frontier, batch: &mut Batch) -> Seq {
        batch.since_flush += 1;
        batch.breaker.taken();
        self.offsets.taken(raw.offset(), frontier)
    }

    /// What to do with a finished record: durable, or handed off. `Err(End::Stopped)` when
    /// the record was abandoned because the task is stopping (the caller drains).
    pub(super) fn finished<'a>(
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
    pub(super) fn step<'a>(
        &'a self,
        seq: Seq,
        step: Step,
        raw: Raw,
        frontier: &mut Frontier,
        batch: &mut Batch,
        handoffs: &mut FuturesUnordered<HandOffFuture<'a>>,
    ) {
        // `keep_key_order`'s own dead letters are not the handler failing: a hot key behind a
        // slow head makes `key-order-full` by design, and must not open the breaker for every
        // key of the partition.
        let dead = matches!(
            step,
            Step::HandOff(_, Disposition::DeadLetter(r), _) if !r.is_key_order()
        );
        if !self
            .breaker_control
            .admits(&self.shared.alerts, &mut batch.breaker, dead, raw.offset())
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
            Step::HandOff(msg, decision, error) if self.key_order.is_none() => {
                handoffs.push(Box::pin(async move {
                    let settled = self.handoff.hand_off(&msg, decision, &error).await;
                    // The message's views into librdkafka's buffer go before the buffer.
                    drop(msg);
                    drop(raw);
                    (seq, settled)
                }));
            }
            Step::HandOff(msg, decision, error) => {
                // `keep_key_order`: decided now, before the scheduler lets the key's next
                // record start (it must see the key waiting).
                let (mark, head) = self.key_order_failed(&msg, decision);
                // Its place in the log's order is taken now, with the decision.
                let ticket = head.then(|| self.key_order_ticket()).flatten();
                handoffs.push(Box::pin(async move {
                    let settled = async {
                        if head {
                            self.append_head(&msg, mark.since.unwrap_or_default(), ticket)
                                .await?;
                        }
                        let went = self
                            .handoff
                            .hand_off_marked(&msg, decision, &error, mark)
                            .await?;
                        // Decided from where it went, not where it was sent: a record its key
                        // waits on that ended in the DLQ (too large for its tier, say) owes
                        // its key a release.
                        if let Some(ticket) = self.key_order_releases_dead(&msg, went) {
                            self.append_release(&msg, Ended::DeadLettered, ticket)
                                .await?;
                        }
                        Ok(())
                    }
                    .await;
                    drop(msg);
                    drop(raw);
                    (seq, settled)
                }));
            }
            Step::Hold(msg, head) => {
                let ticket = self.key_order_ticket();
                handoffs.push(Box::pin(async move {
                    let settled = self.append_held(&msg, head, ticket).await;
                    drop(msg);
                    drop(raw);
                    (seq, settled)
                }));
            }
            Step::Release(msg, ended) => {
                batch.handled += 1;
                let ticket = self.key_order_ticket();
                handoffs.push(Box::pin(async move {
                    let settled = self.append_release(&msg, ended, ticket).await;
                    drop(msg);
                    drop(raw);
                    (seq, settled)
                }));
            }
        }
    }

    /// Settles the hand-offs that are done, without waiting.
    pub(super) fn settle(
        &self,
        handoffs: &mut FuturesUnordered<HandOffFuture<'_>>,
        frontier: &mut Frontier,
    ) -> Result<(), End> {
        self.offsets
            .settle(handoffs, frontier)
            .map_err(|a| self.end(a))
    }

    /// A hand-off resolved: durable, or the task ends.
    pub(super) fn settled(
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
    pub(super) fn flush(
        &self,
        frontier: &mut Frontier,
        batch: &mut Batch,
        in_flight: usize,
        waiting: usize,
    ) {
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
        if let Some(KeyOrderStage::Source(s)) = &self.key_order {
            s.publish();
        }
        batch.consumed = 0;
        batch.bytes = 0;
        batch.handled = 0;
        batch.since_flush = 0;
    }

    /// How the task ends after `abandoned`.
    pub(super) fn end(&self, abandoned: Abandoned) -> End {
        match abandoned {
            Abandoned::Failed(reason) => End::Failed(reason),
            Abandoned::Told if self.revoked.is_cancelled() => End::Revoked,
            Abandoned::Told => End::Stopped,
        }
    }

    /// Shutdown: waits for the hand-offs sent, storing the frontier as it moves. Bounded by
    /// the group's shutdown deadline, which aborts the task.
    pub(super) async fn drain(
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
        self.key_order_commit();
        if batch.breaker.is_open() {
            End::BreakerOpen(batch.breaker.clone())
        } else {
            End::Stopped
        }
    }

    /// A fresh batch, starting with the breaker state the task was given.
    pub(super) fn batch(&self) -> Batch {
        Batch {
            now: now_ms(),
            breaker: self.breaker.clone(),
            ..Batch::default()
        }
    }

    /// Logs a failed fetch (the loop goes on: librdkafka retries by itself).
    pub(super) fn fetch_error(&self, e: &rdkafka::error::KafkaError) {
        tracing::warn!(topic = %self.intake.topic, partition = self.intake.partition, error = %e, "fetch error");
    }
}
