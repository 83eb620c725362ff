//! The top of both record loops, written once: wait while the member is fenced, take the next
//! record at once if the queue has one, and otherwise publish the batch and wait for whichever
//! comes first — shutdown, revocation, the loop's own event (a finished handler call in the
//! concurrent loop), a hand-off acknowledged, or a record.
//!
//! A file of its own because [`super::sequential`] and [`super::concurrent`] both drive it and
//! differ only in what they do with its answer ([`Next`]); it sits beside [`super::task`],
//! below the loops. It costs the per-record path nothing: it is generic over the loop's own
//! event (no boxing, no dynamic call), borrows what the loop owns, and when a record is ready
//! it is one poll of the queue, as before.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::Poll;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use tokio_util::sync::WaitForCancellationFuture;

use crate::retry::scheduler::now_ms;

use super::meters::Batch;
use super::offsets::Frontier;
use super::task::{End, HandOffFuture, PartitionTask, Queue};

/// What [`PartitionTask::next`] found.
pub(super) enum Next<'q, X> {
    /// A record, or the error fetching one.
    Record(KafkaResult<BorrowedMessage<'q>>),
    /// Shutdown began while the queue was empty.
    Stopped,
    /// The partition was revoked while the queue was empty.
    Revoked,
    /// The loop's own event (see [`PartitionTask::next`]'s `other`).
    Other(X),
    /// Something was done (a fenced wait, a hand-off settled): go round the loop again.
    Again,
    /// Settling a hand-off ended the task.
    End(End),
}

/// The waits [`PartitionTask::next`] polls, registered once per task by the loop (a fresh
/// cancellation future per record takes the token's lock twice).
pub(super) struct Waits<'p, 'w> {
    /// Completes on shutdown.
    pub(super) stopped: Pin<&'p mut WaitForCancellationFuture<'w>>,
    /// Completes on revocation.
    pub(super) revoked: Pin<&'p mut WaitForCancellationFuture<'w>>,
}

impl PartitionTask {
    /// The next thing the record loop must deal with (see the module docs). `take_more` says
    /// whether the loop may take a record now; `busy` tells what it has in flight and waiting
    /// (for the gauges flushed when the queue is empty; asked only then); `other` is the loop's own event,
    /// polled after shutdown and revocation and before hand-offs, only if `other_ready` (its
    /// precondition).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn next<'q, X>(
        &self,
        queue: &'q Queue,
        take_more: bool,
        waits: &mut Waits<'_, '_>,
        handoffs: &mut FuturesUnordered<HandOffFuture<'_>>,
        frontier: &mut Frontier,
        batch: &mut Batch,
        busy: impl FnOnce() -> (usize, usize),
        (other, other_ready): (impl Future<Output = Option<X>>, bool),
    ) -> Next<'q, X> {
        let ctx = self.consumer.context();
        if take_more && ctx.is_fenced() && !ctx.wait_unfenced(&self.stop, &self.revoked).await {
            return Next::Again;
        }
        let mut recv = pin!(queue.recv());
        let ready = if take_more {
            futures_util::poll!(recv.as_mut())
        } else {
            Poll::Pending
        };
        if let Poll::Ready(r) = ready {
            return Next::Record(r);
        }
        // Nothing to do right now: publish what the batch did, then wait.
        let (in_flight, waiting) = busy();
        self.flush(frontier, batch, in_flight, waiting);
        tokio::select! {
            biased;
            _ = waits.stopped.as_mut() => Next::Stopped,
            _ = waits.revoked.as_mut() => Next::Revoked,
            Some(x) = other, if other_ready => Next::Other(x),
            Some((seq, settled)) = handoffs.next(), if !handoffs.is_empty() => {
                match self.settled(seq, settled, frontier) {
                    Ok(()) => Next::Again,
                    Err(end) => Next::End(end),
                }
            }
            r = recv, if take_more => {
                batch.now = now_ms();
                Next::Record(r)
            }
        }
    }
}
