//! The record loop of `key` and `unordered` ordering: up to `max_in_flight` handler calls at
//! once; in `key` ordering the records of one key one at a time, in offset order (which
//! records may start is decided by [`Scheduler`]).
//!
//! Only the loop lives here, and [`PartitionTask::process`], the future each record runs in;
//! every stage they drive is in a file of its own (see the parent module), and the top of the
//! loop (fenced wait, taking a record or waiting for one) is [`next`](super::next), shared
//! with the sequential loop.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tracing::Instrument;

use crate::config::Ordering as RecordOrdering;
use crate::handler::Handler;
use crate::runtime::handoff::Abandoned;
use crate::runtime::scheduler::Scheduler;

use super::call::{self, Nothing, Step};
use super::intake::{detach, Decoded, Invalid, Taken};
use super::next::{Next, Waits};
use super::offsets::Frontier;
use super::task::{End, Finished, PartitionTask, Queue, FLUSH_EVERY};

impl PartitionTask {
    /// `key` and `unordered` ordering: up to `max_in_flight` handler calls at once; in `key`
    /// ordering the records of one key one at a time, in offset order.
    ///
    /// Every record runs in a future of its own ([`process`](Self::process)): its due-time
    /// wait and its call, so a slow record never holds up the others. The loop only takes
    /// records (while `max_in_flight`, `max_waiting` and `max_ahead` leave room), starts the
    /// ones whose key is free, and concludes the finished ones in whatever order they end.
    /// The frontier still stores offsets in offset order: a record that finished early waits,
    /// unstored, behind any earlier record still running, so a crash redoes at most the
    /// window and never skips a record without a durable outcome.
    pub(super) async fn run_concurrent<H: Handler>(self, handler: &H, queue: Arc<Queue>) -> End {
        let stop = self.stop.clone();
        let revoked = self.revoked.clone();
        let mut waits = Waits {
            stopped: pin!(stop.cancelled()),
            revoked: pin!(revoked.cancelled()),
        };
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
        let mut batch = self.batch();
        // `keep_key_order`: the held records running (one per key at most), and the log read
        // first (see `key_order`).
        let mut held = FuturesUnordered::new();
        if let Err(end) = self.key_order_open().await {
            return end;
        }
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
                // Held records running are dropped, not waited for: a later ticket of theirs
                // must not wait for one no longer polled; their log positions stay open, so
                // the next owner runs them again.
                drop(held);
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
            if let Err(end) = self.key_order_poll(handler, &mut held) {
                return end;
            }
            let take_more = self.key_order_may_take(held.len())
                && scheduler.has_room()
                && self.has_room(&frontier, handoffs.len())
                && !self.due.is_waiting()
                && batch.breaker.may_take();
            let calls_running = !running.is_empty();
            let key_order = self.key_order.is_some();
            // The loop's own events: a finished handler call, or (keep_key_order) the
            // key-order log.
            let own = async {
                tokio::select! {
                    biased;
                    Some(f) = running.next(), if calls_running => Some(Ok(f)),
                    r = self.key_order_next(handler, &mut held), if key_order => Some(Err(r)),
                    else => None,
                }
            };
            let next = self
                .next(
                    &queue,
                    take_more,
                    &mut waits,
                    &mut handoffs,
                    &mut frontier,
                    &mut batch,
                    || (scheduler.in_flight(), scheduler.waiting()),
                    (own, calls_running || key_order),
                )
                .await;
            let raw = match next {
                Next::Record(Ok(raw)) => raw,
                Next::Record(Err(e)) => {
                    self.fetch_error(&e);
                    continue;
                }
                // The top of the loop deals with them.
                Next::Stopped | Next::Revoked | Next::Again => continue,
                Next::End(end) => return end,
                Next::Other(Err(Err(end))) => return end,
                Next::Other(Err(Ok(()))) => continue,
                Next::Other(Ok(finished)) => {
                    let (key, slot) = (finished.key, finished.slot);
                    if let Err(end) =
                        self.finished(finished, &mut frontier, &mut batch, &mut handoffs)
                    {
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
            };
            let taken = self.take(detach(raw), &mut frontier, &mut batch);
            if let Some(start) = scheduler.offer(taken.key, taken) {
                // A free slot exists: the scheduler runs at most `max_in_flight` calls.
                let slot = free.pop().unwrap_or(0);
                running.push(self.process(handler, start, slot));
            }
        }
    }

    /// Runs one record in a future of its own: waits until it is due (retry tiers), calls the
    /// handler, decides what comes next.
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
        let span = self.intake.record_span(&raw, &decoded);
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

    /// The due-time wait and the call of one record (its span is already entered).
    async fn outcome<H: Handler>(
        &self,
        handler: &H,
        decoded: Result<Decoded, Box<Invalid>>,
        slot: usize,
    ) -> Result<Step, Abandoned> {
        let (msg, due) = match decoded {
            Ok(Decoded { msg, due }) => (msg, due),
            Err(invalid) => return Ok(call::invalid(*invalid)),
        };
        if let Some((due, written_at)) = due {
            // Boxed: the wait (timers and cancellation futures) is large, and only retried
            // records need it; inline it would make every record's future that large.
            Box::pin(self.due.until_due(due, written_at)).await?;
            call::retried_metrics(&self.meters, &msg, due);
        }
        // `keep_key_order`: decided when the record starts (the scheduler starts a key's next
        // record only after the previous one's step, which marks its key waiting).
        let msg = match self.key_order_before_call(msg) {
            Ok(msg) => msg,
            Err(step) => return Ok(step),
        };
        let timer = pin!(None);
        let concluded = self
            .caller
            .call(
                handler,
                &msg,
                (&self.shared.cx, &self.shared.policy),
                slot,
                None,
                timer,
                &mut Nothing,
            )
            .await;
        Ok(match concluded {
            Ok(None) => self.key_order_done(msg),
            Ok(Some((decision, error))) => Step::HandOff(msg, decision, error),
            Err(never) => match never {},
        })
    }
}
