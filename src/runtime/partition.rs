//! The task that owns one assigned partition: take its records in offset order, run the
//! handler on them — one at a time (`partition` ordering) or concurrently (`key`,
//! `unordered`; which records may start is decided by [`super::scheduler`]) — hand failures to
//! a retry tier or the DLQ (see [`super::handoff`]), and store the offset of the contiguous
//! frontier of durable outcomes (see [`super::frontier`]).
//!
//! The per-record path is kept lean: the handler is called through static dispatch (the
//! handler type is erased once per task, not per record), it reads the record in librdkafka's
//! own buffer (nothing is copied unless the record is kept), offsets and counters are flushed
//! in batches (when the queue runs dry, and every [`FLUSH_EVERY`] records), the wall clock is
//! read once per batch and the handler's duration is sampled for handlers that finish without
//! waiting.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Either};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;

use super::signal::Signal;
use super::watchdog::Calls;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::message::BorrowedMessage;
use rdkafka::Message as _;
use tracing::Instrument;

use crate::config::Ordering as RecordOrdering;
use crate::handler::{headers_of, invoke_static, Handler, Message};
use crate::metrics as m;
use crate::metrics::lag::Progress;
use crate::outcome::{Disposition, Reason};
use crate::retry::decode::{read_retry_envelope, Expected};
use crate::retry::scheduler::{self, elapsed_secs, now_ms};

use super::breaker::{Breaker, BreakerControl};
use super::frontier::{Frontier, Seq};
use super::group::{GroupConsumer, GroupContext, Role};
use super::handoff::MAX_PENDING;
use super::pause::{Pause, PauseHold};
use super::scheduler::{key_hash, Scheduler};
use super::Shared;

/// Offsets are stored, and batched counters flushed, at least this often (in records) while
/// the queue never runs dry; always when it does. Only stored offsets are committed, so
/// storing the highest durable one in batches is as safe as storing each.
const FLUSH_EVERY: u32 = 256;
/// One in this many handler calls that finish without waiting is timed (the others cost no
/// clock reads); calls that wait are always timed.
const SAMPLE_EVERY: u32 = 16;

/// The handler, erased once per partition task: the record loop itself is compiled for the
/// concrete handler type, so calling the handler costs no boxing per record.
pub(crate) trait RunPartition: Send + Sync + 'static {
    fn run<'a>(&'a self, task: PartitionTask, queue: Arc<Queue>) -> BoxFuture<'a, End>;
}

impl<H: Handler> RunPartition for H {
    fn run<'a>(&'a self, mut task: PartitionTask, queue: Arc<Queue>) -> BoxFuture<'a, End> {
        if let Some(timeout) = Handler::timeout(self) {
            task.limits = Limits::new(&task.shared.config, timeout);
        }
        Box::pin(async move {
            match task.ordering {
                RecordOrdering::Partition => task.run_sequential(self, queue).await,
                _ => task.run_concurrent(self, queue).await,
            }
        })
    }
}

pub(crate) type Queue = StreamPartitionQueue<GroupContext>;

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
    /// The dead-letter breaker opened: in-flight work finished or was held, the frontier is
    /// stored; the supervisor waits out the cool-down and starts the task again from it.
    BreakerOpen(Breaker),
}

/// What handling a record left to do.
pub(crate) enum Step {
    /// Handled: durable.
    Done,
    /// Failed: to be handed to a retry tier or the DLQ, with the error text.
    HandOff(Message, Disposition, String),
}

/// A consumed librdkafka message whose lifetime is no longer tied to the queue borrow.
///
/// It must not outlive the consumer (its client handle). The partition task guarantees it:
/// every message it takes lives in the task's own futures, and the task holds an `Arc` of the
/// consumer until they are all dropped (the consumer is closed only after its tasks ended).
pub(crate) type Raw = BorrowedMessage<'static>;

fn detach(raw: BorrowedMessage<'_>) -> Raw {
    // SAFETY: see `Raw`. A `BorrowedMessage` is a pointer into a librdkafka event it keeps
    // alive itself (an `Arc`); its lifetime only stands for the client it came from.
    unsafe { std::mem::transmute::<BorrowedMessage<'_>, Raw>(raw) }
}

/// A record taken from the partition.
pub(crate) struct Taken {
    seq: Seq,
    /// Its key's identity for `key` ordering.
    key: Option<u64>,
    /// Views into `raw`: declared (and so dropped) before it.
    decoded: Result<Decoded, Box<Invalid>>,
    raw: Raw,
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

/// A decoded record: the message and, on a retry tier, when it is due and the retry record's
/// own timestamp (the writer's clock; see [`scheduler::wait_for`]).
pub(crate) struct Decoded {
    msg: Message,
    due: Option<(i64, Option<i64>)>,
}

/// A retry-topic record whose envelope cannot be trusted (boxed where it travels: rare).
pub(crate) struct Invalid {
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

/// Counts kept locally and published in batches (see [`FLUSH_EVERY`]).
#[derive(Default)]
struct Batch {
    consumed: u64,
    bytes: u64,
    handled: u64,
    /// Records taken since the last flush.
    since_flush: u32,
    /// The wall clock, read once per batch (end-to-end latency, due checks).
    now: i64,
    /// The dead-letter breaker, kept here beside the counts: the task alone drives it.
    breaker: Breaker,
}

pub(crate) struct PartitionTask {
    pub(super) shared: Arc<Shared>,
    /// Next offset to handle and the durable frontier, read by the lag sampler and the
    /// rebalance hook.
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
    ordering: RecordOrdering,
    /// Cancelled on shutdown: finish the current record, take no new ones.
    pub(super) stop: Signal,
    /// Cancelled on revoke: drop the queue at once, abandon the current record.
    pub(super) revoked: Signal,
    /// Hand-offs of this partition being retried after a failure. While any is, the partition
    /// is paused and takes no new record.
    failing: AtomicUsize,
    /// Retry records waiting for their due time; while one does, no later record is taken (a
    /// tier is first-in-first-due, the later ones are not due earlier).
    waiting_due: AtomicUsize,
    /// Pause holds of this partition (failing hand-offs, retry records not yet due).
    pause: Pause,
    /// Handler calls so far, for sampling their duration.
    calls: AtomicU32,
    /// The handler calls as the watchdog sees them (oldest-call gauge, blocking polls).
    watched: Arc<Calls>,
    /// When a handler call is warned about and cancelled.
    limits: Limits,
    /// The breaker state this task starts with, and its partition's control (set by the
    /// supervisor; see [`super::breaker`]).
    pub(super) breaker: Breaker,
    pub(super) breaker_control: Arc<BreakerControl>,
}

/// When a handler call is warned about and when it is cancelled.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// `None` when not shorter than the limit (the timeout is reported instead).
    warn_after: Option<Duration>,
    timeout: Duration,
}

impl Limits {
    fn new(config: &crate::Config, timeout: Duration) -> Self {
        let timeout = timeout.clamp(Duration::from_millis(1), crate::config::MAX_HANDLER_TIMEOUT);
        Limits {
            warn_after: (config.handler_warn_after < timeout).then_some(config.handler_warn_after),
            timeout,
        }
    }
}

/// Which deadline a waiting handler call's timer is set to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The slow-call warning.
    Warn,
    /// The time limit.
    Limit,
}

/// At most this many characters of a key are shown in a log line.
const SHOWN_KEY_CHARS: usize = 64;

/// A record key as shown in a log line, through the one escaping rule for bytes a person reads
/// (`crate::escape`: control characters and bytes that are not UTF-8 escaped, cut visibly), so
/// two different keys never look alike and none can forge a log line.
fn shown_key(key: Option<&[u8]>) -> String {
    match key {
        None => "none".to_owned(),
        Some(k) => crate::escape::for_terminal(k, SHOWN_KEY_CHARS),
    }
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
        revoked: Signal,
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
            partition,
            &shared.topology.sources()[source].topic,
            tier.is_some(),
        );
        let slots = match shared.config.ordering {
            RecordOrdering::Partition => 1,
            _ => shared.config.max_in_flight,
        };
        let watched = shared.watchdog.watch(group_id, topic, partition, slots);
        let limits = Limits::new(&shared.config, shared.config.handler_timeout);
        let topic: Arc<str> = Arc::from(topic);
        PartitionTask {
            watched,
            limits,
            meters,
            stop: shared.shutdown.clone(),
            ordering: shared.config.ordering,
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
            waiting_due: AtomicUsize::new(0),
            calls: AtomicU32::new(0),
            breaker: Breaker::default(),
            breaker_control: Arc::new(BreakerControl::detached()),
        }
    }

    /// `partition` ordering: records one at a time, in offset order. A record that failed is
    /// handed to its retry tier or the DLQ without waiting for the broker's acknowledgement:
    /// the next records are handled meanwhile, up to [`MAX_PENDING`] hand-offs waiting.
    async fn run_sequential<H: Handler>(self, handler: &H, queue: Arc<Queue>) -> End {
        let stop = self.stop.clone();
        let revoked = self.revoked.clone();
        // Registered once, polled only when the queue is empty: a fresh cancellation future
        // per record takes the token's lock twice.
        let mut stopped = pin!(stop.cancelled());
        let mut revoked_wait = pin!(revoked.cancelled());
        // One timer for the task, set again for each handler call that waits.
        let mut timer = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
        let mut frontier = Frontier::default();
        let mut handoffs = FuturesUnordered::new();
        let mut batch = Batch {
            now: now_ms(),
            breaker: self.breaker.clone(),
            ..Batch::default()
        };
        let mut queue = Some(queue);
        loop {
            if revoked.is_cancelled() {
                return End::Revoked;
            }
            // An open breaker ends the task like a shutdown (see `drain`).
            if stop.is_cancelled() || batch.breaker.is_open() {
                return self.drain(&mut handoffs, &mut frontier, &mut batch).await;
            }
            if let Err(end) = self.settle(&mut handoffs, &mut frontier) {
                return end;
            }
            if batch.since_flush >= FLUSH_EVERY {
                self.flush(&mut frontier, &mut batch, 0, 0);
            }
            let take_more = self.has_room(&frontier, handoffs.len()) && batch.breaker.may_take();
            let ctx = self.consumer.context();
            if take_more && ctx.is_fenced() && !ctx.wait_unfenced(&stop, &revoked).await {
                continue;
            }
            let Some(q) = queue.as_deref() else {
                return End::Revoked;
            };
            let next = {
                let mut recv = pin!(q.recv());
                let ready = if take_more {
                    futures_util::poll!(recv.as_mut())
                } else {
                    Poll::Pending
                };
                match ready {
                    Poll::Ready(r) => Some(r),
                    Poll::Pending => {
                        // Nothing to do right now: publish what the batch did, then wait.
                        self.flush(&mut frontier, &mut batch, 0, 0);
                        tokio::select! {
                            biased;
                            _ = &mut stopped => None,
                            _ = &mut revoked_wait => return End::Revoked,
                            Some((seq, settled)) = handoffs.next(), if !handoffs.is_empty() => {
                                if let Err(end) = self.settled(seq, settled, &mut frontier) {
                                    return end;
                                }
                                continue;
                            }
                            r = recv, if take_more => {
                                batch.now = now_ms();
                                Some(r)
                            }
                        }
                    }
                }
            };
            let raw = match next {
                None => return self.drain(&mut handoffs, &mut frontier, &mut batch).await,
                Some(Ok(raw)) => raw,
                Some(Err(e)) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "fetch error");
                    continue;
                }
            };
            // The record is handled right here, not in a future of its own: nothing to
            // allocate, and nothing large to move per record.
            let raw = detach(raw);
            let seq = self.mark_taken(&raw, &mut frontier, &mut batch);
            let decoded = self.decode(&raw, &mut batch);
            let span = self.record_span(&raw, &decoded);
            let step = match decoded {
                Err(invalid) => self.invalid(*invalid),
                Ok(Decoded { msg, due }) => {
                    if let Some((due, written_at)) = due {
                        // Retry tiers: wait until the record is due, hand-offs settling meanwhile.
                        let mut wait = pin!(self.wait_until_due(due, written_at));
                        let waited = loop {
                            tokio::select! {
                                biased;
                                waited = &mut wait => break waited,
                                Some((seq, settled)) = handoffs.next(), if !handoffs.is_empty() => {
                                    if let Err(end) = self.settled(seq, settled, &mut frontier) {
                                        return end;
                                    }
                                }
                            }
                        };
                        if let Err(abandoned) = waited {
                            // Stopped or revoked while waiting: the record has no outcome.
                            drop(msg);
                            drop(raw);
                            return match self.end(abandoned) {
                                End::Stopped => {
                                    self.drain(&mut handoffs, &mut frontier, &mut batch).await
                                }
                                end => end,
                            };
                        }
                        self.retried_metrics(&msg, due);
                    }
                    let (sampled, started) = self.clock_for_call();
                    let (result, elapsed) = {
                        let call = self.watched.watched(0, msg.offset(), || {
                            invoke_static(handler, &msg, &self.shared.cx)
                        });
                        let mut call = pin!(match span {
                            Some(span) => Either::Left(call.instrument(span)),
                            None => Either::Right(call),
                        });
                        // A handler that returns at once costs nothing more; one that waits shows in
                        // the in-flight gauges while it does, and earlier hand-offs keep settling.
                        match futures_util::poll!(call.as_mut()) {
                            Poll::Ready(result) => (result, sampled.then(|| started.elapsed())),
                            Poll::Pending => {
                                let started = started.or_now();
                                // The handler waits: a good moment to store the frontier (with
                                // slow handlers and a full queue, every 256 records could be
                                // seconds of work redone after a crash).
                                self.flush(&mut frontier, &mut batch, 1, 0);
                                let (deadline, mut stage) = self.first_deadline(started);
                                timer.as_mut().reset(deadline);
                                let result = loop {
                                    tokio::select! {
                                        biased;
                                        result = &mut call => break result,
                                        _ = &mut timer => {
                                            if let Some(e) = self.timer_fired(&msg, &mut stage, timer.as_mut(), started) {
                                                break Err(e);
                                            }
                                        }
                                        Some((seq, settled)) = handoffs.next(), if !handoffs.is_empty() => {
                                            if let Err(end) = self.settled(seq, settled, &mut frontier) {
                                                return end;
                                            }
                                        }
                                        _ = &mut revoked_wait => {
                                            // Drop the queue now: a new queue for this partition
                                            // may be split soon, and an old handle alive beside it
                                            // stops its wake-ups. The next owner in this process
                                            // waits for this task to end before it takes a record,
                                            // so the record is never in two handler calls at once.
                                            drop(queue.take());
                                            // Bounded by the call's time limit, like any call.
                                            let limit = self.deadline(started, self.limits.timeout);
                                            let _ = tokio::time::timeout_at(limit, call).await;
                                            return End::Revoked;
                                        }
                                    }
                                };
                                (result, Some(started.elapsed()))
                            }
                        }
                    };
                    match self.conclude(&msg, result, elapsed) {
                        None => Step::Done,
                        Some((decision, error)) => Step::HandOff(msg, decision, error),
                    }
                }
            };
            self.step(seq, step, raw, &mut frontier, &mut batch, &mut handoffs);
        }
    }

    /// `key` and `unordered` ordering: up to `max_in_flight` handler calls at once; in `key`
    /// ordering the records of one key one at a time, in offset order.
    async fn run_concurrent<H: Handler>(self, handler: &H, queue: Arc<Queue>) -> End {
        let stop = self.stop.clone();
        let revoked = self.revoked.clone();
        let mut stopped = pin!(stop.cancelled());
        let mut revoked_wait = pin!(revoked.cancelled());
        let config = &self.shared.config;
        let mut scheduler = Scheduler::new(
            self.ordering == RecordOrdering::Key,
            config.max_in_flight,
            config.max_waiting,
        );
        let mut frontier = Frontier::default();
        let mut running = FuturesUnordered::new();
        // Watchdog slots of calls not running; the scheduler never runs more than there are.
        let mut free: Vec<usize> = (0..config.max_in_flight).rev().collect();
        let mut handoffs = FuturesUnordered::new();
        let mut batch = Batch {
            now: now_ms(),
            breaker: self.breaker.clone(),
            ..Batch::default()
        };
        loop {
            if revoked.is_cancelled() {
                // The queue goes at once (see `run_sequential`); handler calls in progress are
                // finished, nothing more is stored (the partition is no longer ours).
                drop(queue);
                while running.next().await.is_some() {}
                return End::Revoked;
            }
            if stop.is_cancelled() || batch.breaker.is_open() {
                // Shutdown, or an open breaker: the handler calls in progress finish (records
                // waiting behind a busy key are not started), then the hand-offs sent are
                // acknowledged.
                while let Some(finished) = running.next().await {
                    if let Err(end) =
                        self.finished(finished, &mut frontier, &mut batch, &mut handoffs)
                    {
                        if !matches!(end, End::Stopped) {
                            self.flush(&mut frontier, &mut batch, 0, 0);
                            return end;
                        }
                    }
                }
                return self.drain(&mut handoffs, &mut frontier, &mut batch).await;
            }
            // Completions first, without waiting: they free room for new records.
            while let Some(Some(finished)) = running.next().now_or_never() {
                let (key, slot) = (finished.key, finished.slot);
                if let Err(end) = self.finished(finished, &mut frontier, &mut batch, &mut handoffs)
                {
                    if matches!(end, End::Stopped) {
                        break;
                    }
                    return end;
                }
                match scheduler.finish(key) {
                    Some(next) if batch.breaker.may_take() => {
                        running.push(self.process(handler, next, slot))
                    }
                    // Not started once the breaker opened: no outcome, taken again later.
                    _ => free.push(slot),
                }
            }
            if let Err(end) = self.settle(&mut handoffs, &mut frontier) {
                return end;
            }
            if batch.since_flush >= FLUSH_EVERY {
                self.flush(
                    &mut frontier,
                    &mut batch,
                    scheduler.in_flight(),
                    scheduler.waiting(),
                );
            }
            let take_more = scheduler.has_room()
                && self.has_room(&frontier, handoffs.len())
                && self.waiting_due.load(Ordering::Relaxed) == 0
                && batch.breaker.may_take();
            let ctx = self.consumer.context();
            if take_more && ctx.is_fenced() && !ctx.wait_unfenced(&stop, &revoked).await {
                continue;
            }
            let next = {
                let mut recv = pin!(queue.recv());
                let ready = if take_more {
                    futures_util::poll!(recv.as_mut())
                } else {
                    Poll::Pending
                };
                match ready {
                    Poll::Ready(r) => r,
                    Poll::Pending => {
                        self.flush(
                            &mut frontier,
                            &mut batch,
                            scheduler.in_flight(),
                            scheduler.waiting(),
                        );
                        tokio::select! {
                            biased;
                            _ = &mut stopped => continue,
                            _ = &mut revoked_wait => continue,
                            Some(finished) = running.next(), if !running.is_empty() => {
                                let (key, slot) = (finished.key, finished.slot);
                                if let Err(end) = self.finished(finished, &mut frontier, &mut batch, &mut handoffs) {
                                    if !matches!(end, End::Stopped) {
                                        return end;
                                    }
                                }
                                match scheduler.finish(key) {
                                    Some(next) if batch.breaker.may_take() => {
                                        running.push(self.process(handler, next, slot))
                                    }
                                    // Not started once the breaker opened: no outcome, taken again later.
                                    _ => free.push(slot),
                                }
                                continue;
                            }
                            Some((seq, settled)) = handoffs.next(), if !handoffs.is_empty() => {
                                if let Err(end) = self.settled(seq, settled, &mut frontier) {
                                    return end;
                                }
                                continue;
                            }
                            r = recv, if take_more => {
                                batch.now = now_ms();
                                r
                            }
                        }
                    }
                }
            };
            let raw = match next {
                Ok(raw) => raw,
                Err(e) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "fetch error");
                    continue;
                }
            };
            let taken = self.take(detach(raw), &mut frontier, &mut batch);
            if let Some(start) = scheduler.offer(taken.key, taken) {
                // A free slot exists: the scheduler runs at most `max_in_flight` calls.
                let slot = free.pop().unwrap_or(0);
                running.push(self.process(handler, start, slot));
            }
        }
    }

    /// Whether the partition may take another record: room for hand-offs, no hand-off
    /// failing, and not too far past the oldest record without a durable outcome.
    fn has_room(&self, frontier: &Frontier, handoffs: usize) -> bool {
        handoffs < MAX_PENDING
            && self.failing.load(Ordering::Relaxed) == 0
            && frontier.window() < self.shared.config.max_ahead
    }

    /// Takes a record: its place in the frontier, its key, and what it decodes to.
    fn take(&self, raw: Raw, frontier: &mut Frontier, batch: &mut Batch) -> Taken {
        let seq = self.mark_taken(&raw, frontier, batch);
        let key = (self.ordering == RecordOrdering::Key)
            .then(|| raw.key().map(key_hash))
            .flatten();
        let decoded = self.decode(&raw, batch);
        Taken {
            seq,
            key,
            decoded,
            raw,
        }
    }

    /// Marks a record as taken (before anything that could fail: a task restarted after a
    /// panic starts again from it): its place in the frontier.
    fn mark_taken(&self, raw: &Raw, frontier: &mut Frontier, batch: &mut Batch) -> Seq {
        let offset = raw.offset();
        self.progress.at(offset);
        batch.since_flush += 1;
        batch.breaker.taken();
        frontier.take(offset)
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
        let dead = matches!(step, Step::HandOff(_, Disposition::DeadLetter(_), _));
        if !self.breaker_admits(&mut batch.breaker, dead, raw.offset()) {
            // Held by the open breaker: no outcome, so nothing at or past it is stored; the
            // task is started again from it after the cool-down.
            drop(step);
            drop(raw);
            return;
        }
        match step {
            Step::Done => {
                batch.handled += 1;
                self.durable(seq, frontier);
            }
            Step::HandOff(msg, decision, error) => {
                handoffs.push(Box::pin(async move {
                    let settled = self.hand_off(&msg, decision, &error).await;
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
        while !handoffs.is_empty() {
            let Some(Some((seq, settled))) = handoffs.next().now_or_never() else {
                break;
            };
            self.settled(seq, settled, frontier)?;
        }
        Ok(())
    }

    /// A hand-off resolved: durable, or the task ends.
    fn settled(
        &self,
        seq: Seq,
        settled: Result<(), Abandoned>,
        frontier: &mut Frontier,
    ) -> Result<(), End> {
        match settled {
            Ok(()) => {
                self.durable(seq, frontier);
                Ok(())
            }
            // Nothing past an abandoned hand-off may be stored: the frontier stays before it.
            Err(abandoned) => Err(self.end(abandoned)),
        }
    }

    fn durable(&self, seq: Seq, frontier: &mut Frontier) {
        if frontier.durable(seq) {
            if let Some(through) = frontier.through() {
                // Published at once for the rebalance hook, which stores it before the
                // partition is let go; the store itself is batched.
                self.progress.durable_through(through);
            }
        }
    }

    /// Stores the frontier if it moved and publishes the batch's counts and gauges.
    fn flush(&self, frontier: &mut Frontier, batch: &mut Batch, in_flight: usize, waiting: usize) {
        batch.now = now_ms();
        if let Some(offset) = frontier.take_store() {
            self.store(offset);
        }
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

    /// Stores `offset` as handled.
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

    /// Reads the record in librdkafka's buffer and, on a retry topic, its envelope.
    fn decode(&self, raw: &Raw, batch: &mut Batch) -> Result<Decoded, Box<Invalid>> {
        let (key, payload) = (raw.key(), raw.payload());
        batch.consumed += 1;
        batch.bytes += (key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len)) as u64;
        let received = (&self.topic, self.partition, raw.offset());
        let timestamp = raw.timestamp().to_millis();
        if let Some(ts) = timestamp {
            self.meters.e2e_record.record(elapsed_secs(ts, batch.now));
        }
        // SAFETY (every `from_consumed` below): the views point into `raw`, which the record's
        // `Taken`/`Finished`/hand-off future keeps alive, declared after the message so that
        // it is dropped after it, and into this task's topic name, which outlives every record
        // the task takes; the handler only gets the message by reference, and its clones own
        // their bytes.
        let Some(tier) = self.tier else {
            return Ok(Decoded {
                msg: unsafe {
                    Message::from_consumed(raw.ptr(), received, timestamp, key, payload, None, None)
                },
                due: None,
            });
        };
        let mut headers = headers_of(raw);
        let shared = &self.shared;
        let source = &shared.topology.sources()[self.source];
        let expected = Expected {
            group: shared.topology.group(),
            source_topic: &source.topic,
            tier_topic: &self.topic,
            max_retries: shared.policy.max_retries(),
            max_due_delay: shared.policy.max_due_delay(tier),
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

    /// Runs one record in a future of its own (`key` and `unordered` ordering): waits until
    /// it is due (retry tiers), calls the handler, decides what comes next.
    fn process<'a, H: Handler>(
        &'a self,
        handler: &'a H,
        taken: Taken,
        slot: usize,
    ) -> impl Future<Output = Finished> + Send + 'a {
        let Taken {
            seq,
            key,
            decoded,
            raw,
        } = taken;
        let span = self.record_span(&raw, &decoded);
        let run = async move {
            let outcome = self.outcome(handler, decoded, slot).await;
            Finished {
                seq,
                key,
                slot,
                outcome,
                raw,
            }
        };
        match span {
            Some(span) => Either::Left(run.instrument(span)),
            None => Either::Right(run),
        }
    }

    /// The record's span, only when someone listens: wrapping every record's future in a
    /// disabled span still costs an enter and an exit per poll.
    fn record_span(
        &self,
        raw: &Raw,
        decoded: &Result<Decoded, Box<Invalid>>,
    ) -> Option<tracing::Span> {
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

    async fn outcome<H: Handler>(
        &self,
        handler: &H,
        decoded: Result<Decoded, Box<Invalid>>,
        slot: usize,
    ) -> Result<Step, Abandoned> {
        let (msg, due) = match decoded {
            Ok(Decoded { msg, due }) => (msg, due),
            Err(invalid) => return Ok(self.invalid(*invalid)),
        };
        if let Some((due, written_at)) = due {
            // Boxed: the wait (timers and cancellation futures) is large, and only retried
            // records need it; inline it would make every record's future that large.
            Box::pin(self.wait_until_due(due, written_at)).await?;
            self.retried_metrics(&msg, due);
        }
        let (sampled, started) = self.clock_for_call();
        let (result, elapsed) = {
            let mut call = pin!(self.watched.watched(slot, msg.offset(), || invoke_static(
                handler,
                &msg,
                &self.shared.cx
            )));
            match futures_util::poll!(call.as_mut()) {
                Poll::Ready(result) => (result, sampled.then(|| started.elapsed())),
                Poll::Pending => {
                    // Only calls that wait get a timer: one, set to the warning and then to
                    // the time limit.
                    let started = started.or_now();
                    let (deadline, mut stage) = self.first_deadline(started);
                    let mut timer = pin!(tokio::time::sleep_until(deadline));
                    let result = loop {
                        tokio::select! {
                            biased;
                            result = &mut call => break result,
                            _ = &mut timer => {
                                if let Some(e) = self.timer_fired(&msg, &mut stage, timer.as_mut(), started) {
                                    break Err(e);
                                }
                            }
                        }
                    };
                    (result, Some(started.elapsed()))
                }
            }
        };
        Ok(match self.conclude(&msg, result, elapsed) {
            None => Step::Done,
            Some((decision, error)) => Step::HandOff(msg, decision, error),
        })
    }

    /// What to do with a record whose envelope cannot be trusted: the DLQ.
    fn invalid(&self, Invalid { msg, reason }: Invalid) -> Step {
        tracing::warn!(
            topic = %self.topic, partition = self.partition,
            reason = %crate::escape::for_terminal(&reason, crate::escape::LOG_FIELD_CHARS),
            "invalid retry envelope"
        );
        Step::HandOff(
            msg,
            Disposition::DeadLetter(Reason::InvalidEnvelope),
            reason,
        )
    }

    /// Lateness and end-to-end latency of a retried record, once it is due.
    fn retried_metrics(&self, msg: &Message, due: i64) {
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

    /// `started + after`, on tokio's clock.
    fn deadline(&self, started: Instant, after: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(started) + after
    }

    /// The first deadline of a call that waits: its slow-call warning, or its time limit.
    fn first_deadline(&self, started: Instant) -> (tokio::time::Instant, Stage) {
        match self.limits.warn_after {
            Some(warn) => (self.deadline(started, warn), Stage::Warn),
            None => (self.deadline(started, self.limits.timeout), Stage::Limit),
        }
    }

    /// A waiting call's timer fired: the warning (logged once; the timer is set to the time
    /// limit), or the time limit: the error the call ends with (its future is then dropped).
    fn timer_fired(
        &self,
        msg: &Message,
        stage: &mut Stage,
        timer: std::pin::Pin<&mut tokio::time::Sleep>,
        started: Instant,
    ) -> Option<crate::HandlerError> {
        let limit = self.limits.timeout;
        match *stage {
            Stage::Warn => {
                tracing::warn!(
                    topic = %self.topic, partition = self.partition, offset = msg.offset(),
                    key = %shown_key(msg.key()), attempt = msg.attempt(),
                    running_for = ?started.elapsed(), timeout = ?limit,
                    "slow handler call: still running; it is cancelled at its time limit (handler_timeout)"
                );
                *stage = Stage::Limit;
                timer.reset(self.deadline(started, limit));
                None
            }
            Stage::Limit => {
                self.meters.timeouts.increment(1);
                let error = format!("timed out after {}", humantime::format_duration(limit));
                tracing::warn!(
                    topic = %self.topic, partition = self.partition, offset = msg.offset(),
                    key = %shown_key(msg.key()), attempt = msg.attempt(), timeout = ?limit,
                    "handler call timed out: cancelled, the record goes to its retry tier (or the DLQ)"
                );
                Some(crate::HandlerError::retryable(error))
            }
        }
    }

    /// Whether this call is timed even if it returns at once (one in [`SAMPLE_EVERY`]), and
    /// when it started (read only then; a call that waits reads it after its first poll).
    fn clock_for_call(&self) -> (bool, LazyInstant) {
        let sampled = self.calls.fetch_add(1, Ordering::Relaxed) % SAMPLE_EVERY == 0;
        (sampled, LazyInstant(sampled.then(Instant::now)))
    }

    /// What the handler's result means: done (`None`), or a hand-off to a retry tier or the
    /// DLQ, with the error text.
    fn conclude(
        &self,
        msg: &Message,
        result: Result<(), crate::HandlerError>,
        elapsed: Option<Duration>,
    ) -> Option<(Disposition, String)> {
        let elapsed = elapsed.map(|d| d.as_secs_f64());
        match result {
            Ok(()) => {
                if let Some(e) = elapsed {
                    self.meters.processing_handled.record(e);
                }
                None
            }
            Err(error) => {
                let decision = self.shared.policy.decide(msg.attempt(), &error);
                if let Some(e) = elapsed {
                    match decision {
                        Disposition::Retry { .. } => self.meters.processing_retry.record(e),
                        Disposition::DeadLetter(_) => self.meters.processing_dead_letter.record(e),
                    }
                }
                tracing::debug!(
                    topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    attempt = msg.attempt(),
                    error = %crate::escape::for_terminal(error.message(), crate::escape::LOG_FIELD_CHARS),
                    ?decision, "handler failed"
                );
                Some((decision, error.message().to_owned()))
            }
        }
    }

    /// Waits until the record is due (see [`scheduler::wait_for`]). For longer waits the
    /// partition is paused, so nothing is fetched (or polled) meanwhile, and resumed
    /// [`resume_ahead`] before the due time: pausing drops librdkafka's prefetched records, and
    /// refetching them after a resume takes up to one fetch long-poll, which would otherwise
    /// make every retry that late. No later record is taken meanwhile.
    async fn wait_until_due(&self, due: i64, written_at: Option<i64>) -> Result<(), Abandoned> {
        let wait = scheduler::wait_for(due, written_at, now_ms());
        // Due already: no timer at all. Tokio's timer rounds up to the next millisecond tick,
        // and a burst of records due within the same few milliseconds would otherwise wait
        // for one tick each, in turn (measured: p50 lateness 667 ms on a 10k burst).
        if wait.is_zero() {
            return Ok(());
        }
        self.waiting_due.fetch_add(1, Ordering::SeqCst);
        let _waiting = DecrementOnDrop(&self.waiting_due);
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

/// When a handler call started: read up front for sampled calls, else on first use (after the
/// call's first poll, for calls that wait).
struct LazyInstant(Option<Instant>);

impl LazyInstant {
    /// Time since the start of a sampled call (zero for a call that was not sampled).
    fn elapsed(&self) -> Duration {
        self.0.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// The start, read now if it was not read up front (a call that waits is always timed).
    fn or_now(&self) -> Instant {
        self.0.unwrap_or_else(Instant::now)
    }
}

/// A hand-off in flight: the record's sequence number and whether it became durable.
pub(crate) type HandOffFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = (Seq, Result<(), Abandoned>)> + Send + 'a>>;

struct DecrementOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
    partition_in_flight: metrics::Gauge,
    partition_waiting: metrics::Gauge,
    partition_frontier_lag: metrics::Gauge,
    /// What was last added to the group's in-flight gauge.
    published_in_flight: std::sync::atomic::AtomicI64,
    processing_handled: metrics::Histogram,
    processing_retry: metrics::Histogram,
    processing_dead_letter: metrics::Histogram,
    handled: metrics::Counter,
    timeouts: metrics::Counter,
}

impl Meters {
    fn new(group: &str, topic: &str, partition: i32, source: &str, retry_tier: bool) -> Self {
        let (g, t, s) = (group.to_owned(), topic.to_owned(), source.to_owned());
        let p = partition.to_string();
        let processing = |outcome: &'static str| metrics::histogram!(m::PROCESSING_SECONDS, "source" => s.clone(), "outcome" => outcome);
        let per_partition = |name: &'static str| metrics::gauge!(name, "group" => g.clone(), "topic" => t.clone(), "partition" => p.clone());
        Meters {
            consumed: metrics::counter!(m::RECORDS_CONSUMED, "group" => g.clone(), "topic" => t.clone()),
            bytes: metrics::counter!(m::BYTES_CONSUMED, "group" => g.clone(), "topic" => t.clone()),
            e2e_record: metrics::histogram!(m::END_TO_END_SECONDS, "topic" => t.clone(), "from" => "record"),
            retry: retry_tier.then(|| RetryMeters {
                e2e_original: metrics::histogram!(m::END_TO_END_SECONDS, "topic" => t.clone(), "from" => "original"),
                lateness: metrics::histogram!(m::RETRY_LATENESS_SECONDS, "topic" => t.clone()),
            }),
            partition_in_flight: per_partition(m::PARTITION_IN_FLIGHT),
            partition_waiting: per_partition(m::PARTITION_WAITING),
            partition_frontier_lag: per_partition(m::PARTITION_FRONTIER_LAG),
            in_flight: metrics::gauge!(m::RECORDS_IN_FLIGHT, "group" => g.clone()),
            published_in_flight: std::sync::atomic::AtomicI64::new(0),
            processing_handled: processing("handled"),
            processing_retry: processing("retry"),
            processing_dead_letter: processing("dead_letter"),
            handled: metrics::counter!(m::RECORDS_HANDLED, "source" => s.clone()),
            timeouts: metrics::counter!(m::HANDLER_TIMEOUTS, "group" => g.clone(), "topic" => t.clone()),
        }
    }

    /// Sets the per-partition gauges, and moves the group's in-flight gauge by the change.
    fn publish(&self, in_flight: usize, waiting: usize, frontier_lag: usize) {
        let now = in_flight as i64;
        let before = self.published_in_flight.swap(now, Ordering::Relaxed);
        if now != before {
            self.in_flight.increment((now - before) as f64);
        }
        self.partition_in_flight.set(in_flight as f64);
        self.partition_waiting.set(waiting as f64);
        self.partition_frontier_lag.set(frontier_lag as f64);
    }
}

impl Drop for Meters {
    /// A task that ends leaves nothing in flight behind in the gauges.
    fn drop(&mut self) {
        self.publish(0, 0, 0);
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
