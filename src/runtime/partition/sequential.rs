//! The record loop of `partition` ordering: records one at a time, in offset order.
//!
//! Only the loop lives here; every stage it drives is in a file of its own (see the parent
//! module), and the top of the loop (fenced wait, taking a record or waiting for one) is
//! [`next`](super::next), shared with the concurrent loop. A record is handled right in the
//! loop, not in a future of its own: nothing to allocate and nothing large to move per record.
//! A record that failed is handed to its retry tier or the DLQ without waiting for the
//! broker's acknowledgement: the next records are handled meanwhile, up to
//! [`MAX_PENDING`](crate::runtime::handoff::MAX_PENDING) hand-offs waiting, and they keep
//! settling while a handler call or a due-time wait waits.

use std::pin::{pin, Pin};
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::WaitForCancellationFuture;

use crate::handler::Handler;

use super::call::{self, Interrupt, Meanwhile, Step};
use super::intake::{detach, Decoded};
use super::meters::Batch;
use super::next::{Next, Waits};
use super::offsets::Frontier;
use super::task::{End, HandOffFuture, PartitionTask, Queue, FLUSH_EVERY};

impl PartitionTask {
    /// `partition` ordering: records one at a time, in offset order.
    ///
    /// Each turn of the loop, in this order: a revoke ends the task at once (the next owner
    /// starts from the stored offset); a stop or an open breaker drains the hand-offs still
    /// waiting and stores the frontier ([`drain`](PartitionTask::drain)); acknowledged
    /// hand-offs are settled; the frontier is stored every [`FLUSH_EVERY`] records; then
    /// [`next`](PartitionTask::next) takes one record when there is room (at most
    /// [`MAX_PENDING`](crate::runtime::handoff::MAX_PENDING) hand-offs waiting, the breaker
    /// closed, the key-order stage willing) or waits for whatever comes first.
    ///
    /// A taken record is marked in the frontier *before* its call, so its offset cannot be
    /// stored until its step (handled, held, or handed off and acknowledged) settles it. A
    /// record on a retry tier first waits until it is due, with hand-offs settling meanwhile;
    /// a stop or revoke during that wait leaves it without an outcome, so it is read again.
    pub(super) async fn run_sequential<H: Handler>(self, handler: &H, queue: Arc<Queue>) -> End {
        let stop = self.stop.clone();
        let revoked = self.revoked.clone();
        // Registered once, polled only when the queue is empty: a fresh cancellation future
        // per record takes the token's lock twice.
        let mut waits = Waits {
            stopped: pin!(stop.cancelled()),
            revoked: pin!(revoked.cancelled()),
        };
        // One timer for the task, set again for each handler call that waits.
        let mut timer = pin!(None);
        let mut frontier = Frontier::default();
        let mut handoffs = FuturesUnordered::new();
        let mut batch = self.batch();
        let mut queue = Some(queue);
        // `keep_key_order`: the held records running (one at a time here), and the log read
        // first (see `key_order`).
        let mut held = FuturesUnordered::new();
        if let Err(end) = self.key_order_open().await {
            return end;
        }
        loop {
            if revoked.is_cancelled() {
                return End::Revoked;
            }
            // An open breaker ends the task like a shutdown (see `drain`).
            if stop.is_cancelled() || batch.breaker.is_open() {
                // Held records running are dropped, not waited for: a later ticket of theirs
                // must not wait for one no longer polled; their log positions stay open, so
                // the next owner runs them again.
                drop(held);
                return self.drain(&mut handoffs, &mut frontier, &mut batch).await;
            }
            if let Err(end) = self.settle(&mut handoffs, &mut frontier) {
                return end;
            }
            if batch.since_flush >= FLUSH_EVERY {
                self.flush(&mut frontier, &mut batch, 0, 0);
            }
            if let Err(end) = self.key_order_poll(handler, &mut held) {
                return end;
            }
            let take_more = self.has_room(&frontier, handoffs.len())
                && batch.breaker.may_take()
                && self.key_order_may_take(held.len());
            let Some(q) = queue.as_deref() else {
                return End::Revoked;
            };
            let next = self
                .next(
                    q,
                    take_more,
                    &mut waits,
                    &mut handoffs,
                    &mut frontier,
                    &mut batch,
                    || (0, 0),
                    // The loop's own event: the key-order log (never without the stage).
                    (
                        async { Some(self.key_order_next(handler, &mut held).await) },
                        self.key_order.is_some(),
                    ),
                )
                .await;
            let raw = match next {
                Next::Record(Ok(raw)) => raw,
                Next::Record(Err(e)) => {
                    self.fetch_error(&e);
                    continue;
                }
                Next::Stopped => {
                    drop(held);
                    return self.drain(&mut handoffs, &mut frontier, &mut batch).await;
                }
                Next::Revoked => return End::Revoked,
                Next::Again => continue,
                Next::End(end) => return end,
                Next::Other(Err(end)) => return end,
                Next::Other(Ok(())) => continue,
            };
            let raw = detach(raw);
            let seq = self.mark_taken(&raw, &mut frontier, &mut batch);
            let decoded = self.intake.decode(&raw, &mut batch, &self.meters);
            let span = self.intake.record_span(&raw, &decoded);
            let step = match decoded {
                Err(invalid) => call::invalid(*invalid),
                Ok(Decoded { msg, due }) => 'call: {
                    if let Some((due, written_at)) = due {
                        // Retry tiers: wait until the record is due, hand-offs settling meanwhile.
                        let mut wait = pin!(self.due.until_due(due, written_at));
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
                                    drop(held);
                                    self.drain(&mut handoffs, &mut frontier, &mut batch).await
                                }
                                end => end,
                            };
                        }
                        call::retried_metrics(&self.meters, &msg, due);
                    }
                    let msg = match self.key_order_before_call(msg) {
                        Ok(msg) => msg,
                        Err(step) => break 'call step,
                    };
                    let mut meanwhile = Settling {
                        task: &self,
                        handoffs: &mut handoffs,
                        frontier: &mut frontier,
                        batch: &mut batch,
                        revoked: waits.revoked.as_mut(),
                        queue: &mut queue,
                    };
                    let concluded = self
                        .caller
                        .call(
                            handler,
                            &msg,
                            (&self.shared.cx, &self.shared.policy),
                            0,
                            span,
                            timer.as_mut(),
                            &mut meanwhile,
                        )
                        .await;
                    match concluded {
                        Ok(None) => self.key_order_done(msg),
                        Ok(Some((decision, error))) => Step::HandOff(msg, decision, error),
                        Err(end) => return end,
                    }
                }
            };
            self.step(seq, step, raw, &mut frontier, &mut batch, &mut handoffs);
        }
    }
}

/// What the sequential loop does while its handler call waits: store the frontier once, settle
/// earlier hand-offs as they are acknowledged, and watch for a revoke.
struct Settling<'t, 'a, 'w> {
    task: &'t PartitionTask,
    handoffs: &'t mut FuturesUnordered<HandOffFuture<'a>>,
    frontier: &'t mut Frontier,
    batch: &'t mut Batch,
    revoked: Pin<&'t mut WaitForCancellationFuture<'w>>,
    queue: &'t mut Option<Arc<Queue>>,
}

impl Meanwhile for Settling<'_, '_, '_> {
    type End = End;

    fn call_waits(&mut self) {
        // The handler waits: a good moment to store the frontier (with slow handlers and a
        // full queue, every 256 records could be seconds of work redone after a crash).
        self.task.flush(self.frontier, self.batch, 1, 0);
    }

    async fn interrupted(&mut self) -> Interrupt<End> {
        loop {
            tokio::select! {
                biased;
                Some((seq, settled)) = self.handoffs.next(), if !self.handoffs.is_empty() => {
                    if let Err(end) = self.task.settled(seq, settled, self.frontier) {
                        return Interrupt::Abandon(end);
                    }
                }
                _ = self.revoked.as_mut() => {
                    // Drop the queue now: a new queue for this partition may be split
                    // soon, and an old handle alive beside it stops its wake-ups. The next
                    // owner in this process waits for this task to end before it takes a
                    // record, so the record is never in two handler calls at once.
                    drop(self.queue.take());
                    return Interrupt::Finish(End::Revoked);
                }
            }
        }
    }
}
