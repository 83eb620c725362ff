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
//! | [`next`]        | the top both loops share: take a record or wait for one      |
//! | [`task`]        | the task's state and the steps both loops share               |
//! | [`key_order`], [`key_order_state`] | `keep_key_order`: route, hold, read the key-order log, release; its state (below the task) |
//!
//! This file builds the task from one struct of its parts ([`Parts`]) and erases the handler
//! type once per task ([`RunPartition`]), which dispatches to the loop of the configured
//! ordering. The task's state and the few steps both loops share (taking a record, what a
//! finished record leaves to do, flushing, draining) are in [`task`].
//!
//! The files depend on each other in one direction only (no import circles):
//! `offsets`, `meters` ← `intake` ← `call` ← `task` ← `next` ← `sequential`, `concurrent` ←
//! `mod.rs`.
//!
//! The per-record path is kept lean: the handler is called through static dispatch (the
//! handler type is erased once per task, not per record), it reads the record in librdkafka's
//! own buffer (nothing is copied unless the record is kept), offsets and counters are flushed
//! in batches (when the queue runs dry, and every [`task::FLUSH_EVERY`] records), the wall
//! clock is read once per batch and the handler's duration is sampled for handlers that finish
//! without waiting.

pub(crate) mod call;
mod concurrent;
mod intake;
mod key_order;
mod key_order_state;
pub(crate) mod meters;
mod next;
pub(crate) mod offsets;
mod sequential;
mod task;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::config::Ordering as RecordOrdering;
use crate::handler::Handler;

use super::breaker::{Breaker, BreakerControl};
use super::consumer::{GroupConsumer, Role};
use super::handoff::HandOff;
use super::pause::Pause;
use super::shared::Shared;
use super::signal::Signal;

use call::{Caller, DueWait, Limits};
use intake::Intake;
use key_order_state::{KeyOrderStage, SourceStage};
use meters::{CallMeters, Meters};
use offsets::{Offsets, Progress};
pub(crate) use task::{End, PartitionTask, Queue};

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
        // Feature `otel`: the `process` span of every handler call, when `[tracing]` is set.
        #[cfg(feature = "otel")]
        let intake = intake.traced(crate::telemetry::runtime::ProcessTracing::new(
            config.tracing.as_ref(),
            group_id,
            match config.ordering {
                RecordOrdering::Partition => "partition",
                RecordOrdering::Key => "key",
                _ => "unordered",
            },
        ));
        let pause = Arc::new(Pause::new(
            Arc::clone(&consumer),
            Arc::clone(&topic),
            partition,
            group_id,
        ));
        let key_order = match (role, shared.topology.sources()[source].key_order.as_deref()) {
            (_, None) => None,
            (Role::Main, Some(log)) => {
                // Held records' calls are watched under the log's name: they run beside the
                // partition's own calls (`key` ordering), in slots of their own.
                let held_caller = Caller::new(
                    Limits::new(config, config.handler_timeout),
                    CallMeters::new(group_id, log, source_topic),
                    shared
                        .watchdog
                        .watch(group_id, log, partition, config.max_in_flight.max(1)),
                );
                Some(KeyOrderStage::Source(Box::new(SourceStage::new(
                    config,
                    (group_id, Arc::clone(&topic), partition),
                    log,
                    held_caller,
                ))))
            }
            (Role::Retry, Some(log)) => Some(KeyOrderStage::Tier {
                log_topic: Arc::from(log),
                max_wait_ms: i64::try_from(config.retry.max_key_wait.as_millis())
                    .unwrap_or(i64::MAX),
            }),
        };
        PartitionTask {
            key_order,
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
}
