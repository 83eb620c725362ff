//! The owner of one assigned partition's task: it starts the task, notices an unexpected end
//! (a panic outside the handler, or an error the task cannot get past), reports it and starts
//! the task again from the last stored offset, with backoff. No assigned partition is left
//! without a task while the process looks healthy.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;

use crate::handler::panic_text;
use crate::metrics as m;
use crate::metrics::lag::Progress;

use super::group::{GroupConsumer, GroupContext, Role};
use super::partition::{End, PartitionTask};
use super::Shared;

/// First pause before a failed partition task is started again; doubled per consecutive
/// failure up to [`MAX_RESTART_BACKOFF`].
const FIRST_RESTART_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

/// Everything needed to (re)start the task of one partition.
pub(crate) struct Supervisor {
    pub(crate) shared: Arc<Shared>,
    pub(crate) role: Role,
    pub(crate) group_id: String,
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) revoked: CancellationToken,
    pub(crate) progress: Arc<Progress>,
    pub(crate) queue: StreamPartitionQueue<GroupContext>,
    /// Cancelled when this partition's previous task in this process has ended (it may still
    /// be finishing a handler call after a revoke): a record must never be in two handler
    /// calls at once.
    pub(crate) previous: Option<CancellationToken>,
    /// Cancelled when this supervisor ends, however it ends.
    pub(crate) finished: CancellationToken,
}

impl Supervisor {
    pub(crate) async fn run(self) {
        let _finished = self.finished.clone().drop_guard();
        let stop = self.shared.shutdown.clone();
        let mut queue = Some(Arc::new(self.queue));
        if let Some(previous) = &self.previous {
            if !previous.is_cancelled() {
                tracing::debug!(topic = %self.topic, partition = self.partition, "waiting for this partition's previous task to finish");
                tokio::select! {
                    _ = previous.cancelled() => {}
                    _ = self.revoked.cancelled() => return,
                    _ = stop.cancelled() => return,
                }
            }
        }
        let failures_metric = metrics::counter!(m::PARTITION_TASK_FAILURES, "group" => self.group_id.clone(), "topic" => self.topic.clone());
        let mut backoff = FIRST_RESTART_BACKOFF;
        let mut consecutive = 0u32;
        let mut stored_at_failure = None;
        loop {
            let Some(q) = queue.as_ref().map(Arc::clone) else {
                return;
            };
            let task = PartitionTask::new(
                Arc::clone(&self.shared),
                self.role,
                &self.group_id,
                Arc::clone(&self.consumer),
                &self.topic,
                self.partition,
                self.revoked.clone(),
                Arc::clone(&self.progress),
            );
            let run = AssertUnwindSafe(self.shared.handler.run(task, q)).catch_unwind();
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
                Err(panic) => format!("panicked: {}", panic_text(&*panic)),
            };
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
            if let Some(offset) = stored_now {
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
}
