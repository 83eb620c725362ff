//! The owner of one assigned partition's task: it starts the task, notices an unexpected end
//! (a panic outside the handler, or an error the task cannot get past), reports it and starts
//! the task again from the last stored offset, with backoff. No assigned partition is left
//! without a task while the process looks healthy.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use super::signal::Signal;
use futures_util::FutureExt;
use rdkafka::consumer::Consumer;
use rdkafka::Offset;
use tokio::task::JoinHandle;

use crate::escape;
use crate::handler::panic_text;
use crate::metrics as m;

use super::breaker::{self, Breaker, BreakerControl};
use super::consumer::{GroupConsumer, Queue, Role};
use super::partition::offsets::Progress;
use super::partition::{End, PartitionTask, Parts, RunPartition};
use super::pause::Pause;
use super::shared::Shared;

/// First pause before a failed partition task is started again; doubled per consecutive
/// failure up to [`MAX_RESTART_BACKOFF`].
const FIRST_RESTART_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// Everything needed to (re)start the task of one partition.
pub(crate) struct Supervisor {
    pub(crate) shared: Arc<Shared>,
    /// The handler, erased once (see [`RunPartition`]): each (re)start of the task runs it.
    pub(crate) handler: Arc<dyn RunPartition>,
    pub(crate) role: Role,
    pub(crate) group_id: String,
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) revoked: Signal,
    pub(crate) progress: Arc<Progress>,
    pub(crate) queue: Arc<Queue>,
    /// This partition's previous supervisor in this process, if it may still be running (it
    /// may be finishing a handler call after a revoke): a record must never be in two handler
    /// calls at once, so nothing starts before it ends.
    pub(crate) previous: Option<JoinHandle<()>>,
}

/// While a partition assigned back waits for its previous task, a warning this often.
const WAIT_WARNING: Duration = Duration::from_secs(30);

/// Aborts the task when dropped (a supervisor aborted at shutdown takes its predecessor along).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Supervisor {
    pub(crate) async fn run(mut self) {
        let stop = self.shared.shutdown.clone();
        if let Some(previous) = self.previous.take() {
            // Waited for even if this partition is revoked again or the runtime stops
            // meanwhile: this supervisor's end must mean that no handler call of this
            // partition is running in this process, for the next one that waits for it (and
            // for shutdown, which aborts this one, and with it the previous, at its deadline).
            let mut previous = AbortOnDrop(previous);
            let mut waited = Duration::ZERO;
            while tokio::time::timeout(WAIT_WARNING, &mut previous.0)
                .await
                .is_err()
            {
                waited += WAIT_WARNING;
                tracing::warn!(
                    topic = %self.topic, partition = self.partition, ?waited,
                    "partition assigned back is waiting for its previous task's handler call to end"
                );
            }
            if self.revoked.is_cancelled() || stop.is_cancelled() {
                return;
            }
        }
        let registered = self.shared.breakers.register(Arc::new(BreakerControl::new(
            &self.group_id,
            &self.topic,
            self.partition,
        )));
        let control = Arc::clone(&registered.control);
        let mut breaker = Breaker::new(&self.shared.config.dead_letter.breaker);
        let mut queue = Some(Arc::clone(&self.queue));
        let failures_metric = metrics::counter!(m::PARTITION_TASK_FAILURES, "group" => self.group_id.clone(), "topic" => self.topic.clone());
        let mut backoff = FIRST_RESTART_BACKOFF;
        let mut consecutive = 0u32;
        let mut stored_at_failure = None;
        loop {
            let Some(q) = queue.as_ref().map(Arc::clone) else {
                return;
            };
            if !control.is_open() {
                // Closed by its last task's probe (or never opened).
                breaker.close();
            } else {
                // Opened by a task that then failed (a hand-off it could not finish): its
                // state went with it; try one record.
                breaker.resume_after_failure();
            }
            let task = PartitionTask::new(Parts {
                shared: Arc::clone(&self.shared),
                role: self.role,
                group_id: self.group_id.clone(),
                consumer: Arc::clone(&self.consumer),
                topic: self.topic.clone(),
                partition: self.partition,
                revoked: self.revoked.clone(),
                progress: Arc::clone(&self.progress),
                breaker: breaker.clone(),
                breaker_control: Arc::clone(&control),
            });
            let run = AssertUnwindSafe(self.handler.run(task, q)).catch_unwind();
            tokio::pin!(run);
            let ended = tokio::select! {
                ended = &mut run => ended,
                _ = self.revoked.cancelled() => {
                    // Drop our handle of the queue at once (the task drops its own): a new
                    // queue for this partition may be split soon, and an old handle alive
                    // beside it stops its wake-ups.
                    queue = None;
                    run.await
                }
            };
            let cause = match ended {
                Ok(End::Stopped) | Ok(End::Revoked) => return,
                Ok(End::Failed(reason)) => reason,
                Ok(End::BreakerOpen(open)) => {
                    breaker = open;
                    // Paused while open: nothing is fetched. The task held no pause of its
                    // own any more (it ended), so this is the only hold.
                    let pause = Pause::new(
                        Arc::clone(&self.consumer),
                        Arc::from(self.topic.as_str()),
                        self.partition,
                        &self.group_id,
                    );
                    let letting_go = self.revoked.is_cancelled() || stop.is_cancelled();
                    let hold = (!letting_go).then(|| pause.hold());
                    let resumed = hold.is_some()
                        && breaker::wait_out(
                            (&self.shared.alerts, &self.shared.shutdown),
                            &control,
                            &mut breaker,
                            &self.revoked,
                        )
                        .await;
                    if !resumed {
                        // Not silent: the breaker's state stays here, and the partition's next
                        // owner (or the next start of this process) begins closed.
                        tracing::warn!(
                            topic = %self.topic, partition = self.partition,
                            revoked = self.revoked.is_cancelled(),
                            "partition let go while its dead-letter breaker was open; its next owner starts with the breaker closed"
                        );
                        return;
                    }
                    drop(hold);
                    // The task stored every durable outcome before it ended: start from the
                    // first record without one (held records included).
                    self.seek_to_stored();
                    continue;
                }
                Err(panic) => format!("panicked: {}", panic_text(&*panic)),
            };
            // A panic message or failure can quote record bytes (a handler's panic, a key).
            let cause = escape::for_terminal(&cause, escape::LOG_FIELD_CHARS);
            if self.revoked.is_cancelled() || stop.is_cancelled() {
                tracing::warn!(topic = %self.topic, partition = self.partition, %cause, "partition task ended while stopping");
                return;
            }
            failures_metric.increment(1);
            // A restarted task that stored progress before failing again is a new problem,
            // not the same one: start the backoff over.
            let stored_now = self.progress.restart_from();
            if consecutive > 0 && stored_now != stored_at_failure {
                consecutive = 0;
                backoff = FIRST_RESTART_BACKOFF;
            }
            consecutive = consecutive.saturating_add(1);
            stored_at_failure = stored_now;
            tracing::error!(
                role = ?self.role, topic = %self.topic, partition = self.partition, %cause,
                consecutive, restart_in = ?backoff, from_offset = ?stored_now,
                "partition task failed; restarting it from the last stored offset"
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.revoked.cancelled() => return,
                _ = stop.cancelled() => return,
            }
            backoff = backoff.saturating_mul(2).min(MAX_RESTART_BACKOFF);
            self.seek_to_stored();
        }
    }

    /// Seeks the partition back to where a new task starts: past the last stored record.
    fn seek_to_stored(&self) {
        if let Some(offset) = self.progress.restart_from() {
            // Asynchronous (no timeout): records fetched before the seek are discarded by
            // librdkafka, and fetching resumes at `offset`.
            if let Err(e) = self.consumer.seek(
                &self.topic,
                self.partition,
                Offset::Offset(offset),
                Duration::ZERO,
            ) {
                tracing::error!(topic = %self.topic, partition = self.partition, offset, error = %e, "seek before restarting the partition task failed");
            }
        }
    }
}
