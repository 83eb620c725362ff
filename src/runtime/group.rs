//! One consumer group member (main or retry): creates its consumer, subscribes, serves its
//! main queue, samples its lag, starts a supervisor for each partition assigned to it, and
//! stops it (tasks, final commit, close). The consumer's context — the rebalance hook and the
//! table of partition tasks — is in [`consumer`](super::consumer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, Offset};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::metrics::lag;

use super::client::consumer_config;
use super::consumer::{
    Assigned, GroupConsumer, GroupContext, GroupState, Member, Role, Slot, StartPartition,
};
use super::partition::offsets::Progress;
use super::partition::RunPartition;
use super::shared::Shared;
use super::supervisor::Supervisor;

/// Starts the supervisor of each partition assigned to one member, on the async runtime the
/// member was started on.
struct Starter {
    shared: Arc<Shared>,
    role: Role,
    group_id: String,
    handler: Arc<dyn RunPartition>,
    runtime: tokio::runtime::Handle,
}

impl StartPartition for Starter {
    fn start(&self, assigned: Assigned) -> JoinHandle<()> {
        let supervisor = Supervisor {
            shared: Arc::clone(&self.shared),
            handler: Arc::clone(&self.handler),
            role: self.role,
            group_id: self.group_id.clone(),
            consumer: assigned.consumer,
            topic: assigned.topic,
            partition: assigned.partition,
            revoked: assigned.revoked,
            progress: assigned.progress,
            queue: assigned.queue,
            previous: assigned.previous,
        };
        self.runtime.spawn(supervisor.run())
    }
}

/// A running group member.
pub(crate) struct Group {
    consumer: Arc<GroupConsumer>,
    poller: JoinHandle<()>,
    sampler: JoinHandle<()>,
    /// Stops the main-queue poller and the lag sampler.
    poller_stop: CancellationToken,
}

impl Group {
    /// Creates the consumer, subscribes and starts serving its main queue. `handler` is what
    /// each partition's task runs.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        handler: &Arc<dyn RunPartition>,
        role: Role,
        topics: &[String],
    ) -> Result<Group, Error> {
        let group_id = match role {
            Role::Main => shared.topology.group(),
            Role::Retry => shared.topology.retry_group(),
        };
        let context = Member::new(GroupState {
            role,
            group_id: group_id.to_owned(),
            shared: Arc::clone(shared),
            consumer: OnceLock::new(),
            slots: Mutex::new(HashMap::new()),
            retiring: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            starter: Box::new(Starter {
                shared: Arc::clone(shared),
                role,
                group_id: group_id.to_owned(),
                handler: Arc::clone(handler),
                runtime: tokio::runtime::Handle::current(),
            }),
            fenced: std::sync::atomic::AtomicBool::new(false),
            unfenced: tokio::sync::Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            revoke_commits: Mutex::new(HashMap::new()),
        });
        let consumer: GroupConsumer =
            consumer_config(&shared.config, group_id, role == Role::Retry)
                .create_with_context(context)
                .map_err(Error::kafka("creating the consumer"))?;
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topic_refs)
            .map_err(Error::kafka("subscribing"))?;
        let poller_stop = CancellationToken::new();
        let poller = tokio::spawn(serve_main_queue(
            Arc::clone(&consumer),
            role,
            poller_stop.clone(),
        ));
        let sampler = tokio::spawn(sample_lag(
            Arc::clone(&consumer),
            topics.to_vec(),
            shared.config.metrics.lag_interval,
            poller_stop.clone(),
        ));
        Ok(Group {
            consumer,
            poller,
            sampler,
            poller_stop,
        })
    }

    /// The partitions this member currently owns.
    pub(crate) fn assigned(&self) -> Vec<(String, i32)> {
        let mut v: Vec<_> = self.consumer.context().slots().keys().cloned().collect();
        v.sort();
        v
    }

    /// Waits for the partition tasks (which stop taking records once shutdown begins) up to
    /// `timeout`, abandons the rest, commits stored offsets and leaves the group.
    ///
    /// Every step that calls into librdkafka and may block runs on a thread of its own with a
    /// deadline: closing a consumer while a rebalance lands can block forever inside
    /// librdkafka (librdkafka #4884, #4041). A stuck close is logged and left behind on its
    /// thread; the group notices the member is gone after its session timeout, as after a crash.
    pub(crate) async fn stop(self, timeout: Duration) {
        let ctx = self.consumer.context();
        let role = ctx.role;
        // From here on a rebalance may still assign partitions to us, but no task is started
        // for them: nothing would stop it, and it would keep the consumer alive.
        ctx.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        // Kept past the tasks' end: if the final commit fails, each partition's records since
        // its last commit are handled again by the next owner, and that is reported.
        let owned: Vec<((String, i32), Arc<Progress>)> = ctx
            .slots()
            .iter()
            .map(|(k, s)| (k.clone(), Arc::clone(&s.progress)))
            .collect();
        finish_tasks(ctx, deadline).await;
        if !self.final_commit(role).await {
            for ((topic, partition), progress) in owned {
                let uncommitted = progress.uncommitted();
                if uncommitted > 0 {
                    tracing::warn!(?role, topic, partition, uncommitted, "final commit failed; records handled since the last commit will be handled again");
                }
            }
        }
        self.poller_stop.cancel();
        let _ = self.poller.await;
        let _ = self.sampler.await;
        // A task started by a rebalance racing with `closing` sees the shutdown at once.
        finish_tasks(ctx, tokio::time::Instant::now() + Duration::from_secs(1)).await;
        // Each queue handle holds the consumer: let them go, so the close below is the last.
        ctx.queues.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // Dropping the last handle closes the consumer: it revokes, commits and leaves the group.
        let consumer = self.consumer;
        if Arc::strong_count(&consumer) > 1 {
            tracing::debug!(?role, "consumer still referenced at close");
        }
        if off_thread("close", CLOSE_TIMEOUT, move || drop(consumer))
            .await
            .is_none()
        {
            tracing::warn!(?role, timeout = ?CLOSE_TIMEOUT, "consumer close did not finish in time; leaving it behind (the group will time the member out)");
        } else {
            tracing::debug!(?role, "consumer closed");
        }
    }

    /// Commits the stored offsets. A commit refused because the group is rebalancing (another
    /// member joined or left) is tried again once the poller has served the rebalance, until
    /// [`CLOSE_TIMEOUT`]: every offset not committed here is a record handled twice later. False
    /// if it failed.
    async fn final_commit(&self, role: Role) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        loop {
            let consumer = Arc::clone(&self.consumer);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let committed = off_thread("commit", left, move || {
                consumer.commit_consumer_state(CommitMode::Sync)
            })
            .await;
            match committed {
                Some(Ok(())) | Some(Err(KafkaError::ConsumerCommit(C::NoOffset))) => return true,
                Some(Err(KafkaError::ConsumerCommit(C::RebalanceInProgress)))
                    if tokio::time::Instant::now() + Duration::from_millis(200) < deadline =>
                {
                    tracing::debug!(
                        ?role,
                        "final commit refused during a rebalance; trying again"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(Err(e)) => {
                    tracing::warn!(?role, error = %e, "final commit failed");
                    return false;
                }
                None => {
                    tracing::warn!(?role, timeout = ?CLOSE_TIMEOUT, "final commit did not answer in time");
                    return false;
                }
            }
        }
    }
}

/// How long a final commit or a consumer close may take before shutdown moves on.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits for every partition task until `deadline`, then aborts the rest (their in-flight
/// record has no durable outcome, so its offset is not stored and it is delivered again).
async fn finish_tasks(ctx: &GroupContext, deadline: tokio::time::Instant) {
    let slots: Vec<Slot> = ctx.slots().drain().map(|(_, s)| s).collect();
    // Revoked partitions whose handler call is still running are waited for too: the member
    // must not leave with work going on (and the consumer must not close under it).
    let retiring: Vec<JoinHandle<()>> = ctx
        .retiring
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, t)| t)
        .collect();
    let tasks = slots
        .into_iter()
        .map(|s| (Some(s.revoked), s.task))
        .chain(retiring.into_iter().map(|t| (None, t)));
    for (revoked, mut task) in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            tracing::warn!(role = ?ctx.role, "in-flight record abandoned at shutdown; it will be delivered again");
            if let Some(revoked) = revoked {
                revoked.cancel();
            }
            task.abort();
            let _ = task.await;
        }
    }
}

/// Runs `f` on a thread of its own and waits for it up to `timeout`; `None` if it did not
/// finish in time (the thread is then left to finish or block on its own). Not the blocking
/// pool: the async runtime waits for its threads when it is dropped.
pub(crate) async fn off_thread<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("sidetrack-{what}"))
        .spawn(move || {
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, what, "cannot start a thread");
        return None;
    }
    tokio::time::timeout(timeout, rx).await.ok()?.ok()
}

/// Samples consumer lag every `interval` on a blocking thread; see [`crate::metrics::lag`].
async fn sample_lag(
    consumer: Arc<GroupConsumer>,
    topics: Vec<String>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let owned: Vec<_> = consumer
            .context()
            .slots()
            .iter()
            .map(|(k, s)| (k.clone(), Arc::clone(&s.progress)))
            .collect();
        let c = Arc::clone(&consumer);
        let timeout = interval.min(Duration::from_secs(5));
        let sampled = tokio::task::spawn_blocking(move || lag::sample(&*c, &owned, timeout)).await;
        if let Ok(sampled) = sampled {
            if !stop.is_cancelled() {
                lag::publish(&consumer.context().group_id, &topics, &sampled);
            }
        }
    }
}

/// Serves the consumer's main queue: rebalances, errors and the poll-interval clock. Records
/// should never arrive here, since every partition is split off before it is fetched; if one
/// does, we seek back to it so its partition task gets it, rather than skip it.
async fn serve_main_queue(consumer: Arc<GroupConsumer>, role: Role, stop: CancellationToken) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            // Time out regularly so the consumer is polled even when idle.
            r = tokio::time::timeout(Duration::from_secs(1), consumer.recv()) => r,
        };
        match next {
            Err(_idle) => {}
            Ok(Ok(msg)) => {
                let (topic, partition, offset) =
                    (msg.topic().to_owned(), msg.partition(), msg.offset());
                drop(msg);
                tracing::error!(
                    ?role,
                    topic,
                    partition,
                    offset,
                    "record on the main queue; seeking back to it"
                );
                if let Err(e) = consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(5),
                ) {
                    tracing::error!(?role, topic, partition, error = %e, "seek failed");
                }
            }
            Ok(Err(e)) => {
                if !consumer.context().stop_if_fatal(&consumer) {
                    tracing::warn!(?role, error = %e, "consumer error");
                }
            }
        }
    }
}
