//! One consumer group member (main or retry) and its partition tasks.
//!
//! librdkafka calls our rebalance hook on the thread that polls the consumer's main queue. On
//! assign we split each new partition into its own queue and spawn its task; on revoke we tell
//! the task to drop its queue at once and abandon its in-flight record (its offset is not
//! stored; the new owner handles it again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::metrics::lag;

use super::client::{consumer_config, forward_error, forward_log};
use super::partition::offsets::Progress;
use super::shared::Shared;
use super::signal::Signal;
use super::supervisor::Supervisor;

pub(crate) type GroupConsumer = StreamConsumer<GroupContext>;

/// Which consumer this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Reads the source topics.
    Main,
    /// Reads the retry tier topics.
    Retry,
}

struct Slot {
    revoked: Signal,
    /// The partition's supervisor (which runs the partition task). It ends only after its
    /// predecessor for the same partition in this process has ended.
    task: JoinHandle<()>,
    progress: Arc<Progress>,
}

/// A partition queue handle, one per partition for the life of the consumer while any task
/// holds it.
type Queue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<GroupContext>;

/// The consumer's context: rebalance hook and the table of partition tasks.
pub(crate) struct GroupContext {
    role: Role,
    group_id: String,
    shared: Arc<Shared>,
    /// Set right after the consumer is wrapped in an `Arc`: splitting a partition queue needs
    /// the `Arc`, but the rebalance hook only gets the inner `BaseConsumer`.
    consumer: OnceLock<Weak<GroupConsumer>>,
    slots: Mutex<HashMap<(String, i32), Slot>>,
    /// Revoked partitions whose supervisor may still be finishing a handler call: a new one
    /// for the same partition waits for it (see [`Supervisor::previous`]), and shutdown waits
    /// for the rest.
    retiring: Mutex<HashMap<(String, i32), JoinHandle<()>>>,
    /// The queue handle of each partition. A second handle on the same librdkafka queue
    /// disables the first one's wake-ups when either is dropped, so a partition assigned back
    /// while its previous task still holds its handle (a handler call blocking its thread)
    /// gets that same handle again. Cleared before the consumer closes (each handle holds the
    /// consumer).
    queues: Mutex<HashMap<(String, i32), Arc<Queue>>>,
    runtime: tokio::runtime::Handle,
    /// Set when a commit says this member is no longer in the group (unknown member, stale
    /// generation): offsets stored now would never be committed, and the new owner would
    /// handle those records again. Partition tasks take no new record until the next
    /// rebalance or successful commit clears it.
    fenced: std::sync::atomic::AtomicBool,
    unfenced: tokio::sync::Notify,
    /// Set when the group member starts stopping; see [`Group::stop`].
    closing: std::sync::atomic::AtomicBool,
    /// Revoked partitions whose handled records wait for the commit sent on revocation, with
    /// how many records that is: if that commit fails, the next owner handles them again.
    revoke_commits: Mutex<HashMap<(String, i32), i64>>,
}

impl GroupContext {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Slot>> {
        // A panic while holding this lock can only come from our own code between two map
        // operations; the map is still consistent, so keep going.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_fenced(&self, fenced: bool) {
        let was = self
            .fenced
            .swap(fenced, std::sync::atomic::Ordering::SeqCst);
        if was && !fenced {
            self.unfenced.notify_waiters();
            tracing::info!(role = ?self.role, "back in the group; taking records again");
        } else if !was && fenced {
            tracing::warn!(role = ?self.role, "no longer a group member (commit refused); holding records until the group is rejoined");
        }
    }

    /// Whether this member is fenced right now (see `fenced`); one atomic load.
    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits while this member is fenced (see `fenced`); false if `stop` or `revoked` was
    /// cancelled first.
    pub(crate) async fn wait_unfenced(&self, stop: &Signal, revoked: &Signal) -> bool {
        // Per-record fast path: no waiter registered while we are in the group.
        if !self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        loop {
            let notified = self.unfenced.notified();
            if !self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
                return true;
            }
            // Also re-check now and then: a rejoin without a rebalance event is possible.
            tokio::select! {
                _ = tokio::time::timeout(Duration::from_millis(200), notified) => {}
                _ = stop.cancelled() => return false,
                _ = revoked.cancelled() => return false,
            }
        }
    }

    /// Stops the runtime if the consumer hit a fatal error (e.g. this static member was fenced
    /// by another instance with the same `group.instance.id`): the consumer cannot go on, and
    /// a healthy-looking process that consumes nothing is the worst outcome. librdkafka
    /// reports such an error with the underlying code, as a client error or as a consumer
    /// error; only the client knows it was fatal, so it is asked (errors are rare).
    fn stop_if_fatal(&self, consumer: &GroupConsumer) -> bool {
        let Some((code, text)) = consumer.client().fatal_error() else {
            return false;
        };
        if self.shared.shutdown.is_cancelled() {
            return true;
        }
        let detail = format!("{code:?}: {text}");
        metrics::counter!(crate::metrics::CLIENT_FATAL_ERRORS, "client" => "consumer").increment(1);
        tracing::error!(role = ?self.role, reason = %detail, "fatal consumer error; the runtime stops");
        self.shared.fail(Error::Fatal {
            client: match self.role {
                Role::Main => "consumer (main)",
                Role::Retry => "consumer (retry)",
            },
            reason: detail,
        });
        true
    }

    fn assign(&self, topic: &str, partition: i32) {
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::debug!(role = ?self.role, topic, partition, "partition assigned while closing; not started");
            return;
        }
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let key = (topic.to_owned(), partition);
        let queue = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.get(&key) {
                // Still held by the previous task: share it (see `queues`).
                Some(q) if Arc::strong_count(q) > 1 => Arc::clone(q),
                _ => {
                    // Only we hold it: drop it before splitting anew, so that the new
                    // handle's wake-ups are the ones enabled.
                    queues.remove(&key);
                    let Some(q) = consumer.split_partition_queue(topic, partition) else {
                        tracing::error!(topic, partition, "cannot split partition queue");
                        return;
                    };
                    let q = Arc::new(q);
                    queues.insert(key.clone(), Arc::clone(&q));
                    q
                }
            }
        };
        let revoked = Signal::new();
        let progress = Progress::new();
        let mut slots = self.slots();
        // The previous supervisor of this partition, if it may still be running: revoked
        // earlier (and finishing its handler call), or still in the table (assigned twice).
        let previous = match slots.remove(&key) {
            Some(old) => {
                old.revoked.cancel();
                Some(old.task)
            }
            None => self
                .retiring
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key),
        }
        .filter(|t| !t.is_finished());
        let supervisor = Supervisor {
            shared: Arc::clone(&self.shared),
            role: self.role,
            group_id: self.group_id.clone(),
            consumer: Arc::clone(&consumer),
            topic: topic.to_owned(),
            partition,
            revoked: revoked.clone(),
            progress: Arc::clone(&progress),
            queue,
            previous,
        };
        let handle = self.runtime.spawn(supervisor.run());
        slots.insert(
            key,
            Slot {
                revoked,
                task: handle,
                progress,
            },
        );
        drop(slots);
        tracing::info!(role = ?self.role, topic, partition, "partition assigned");
    }

    fn revoke(
        &self,
        base: &rdkafka::consumer::BaseConsumer<Self>,
        topic: &str,
        partition: i32,
        lost: bool,
    ) {
        let slot = self.slots().remove(&(topic.to_owned(), partition));
        if !lost {
            // The task stores its frontier in batches; store the latest one now, while the
            // partition is still ours, so the commit sent below covers it.
            if let Some(durable) = slot.as_ref().and_then(|s| s.progress.durable()) {
                if base.store_offset(topic, partition, durable).is_ok() {
                    if let Some(s) = &slot {
                        s.progress.stored(durable);
                    }
                }
            }
        }
        let uncommitted = slot.as_ref().map_or(0, |s| s.progress.uncommitted());
        let unstored = slot.as_ref().map_or(0, |s| s.progress.unstored());
        if let Some(slot) = slot {
            slot.revoked.cancel();
            if !slot.task.is_finished() {
                self.retiring
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((topic.to_owned(), partition), slot.task);
            }
        }
        lag::forget(&self.group_id, topic, partition);
        if lost && uncommitted > 0 {
            // The session ran out (broker unreachable, or a stalled rebalance): nothing more
            // can be committed, so the next owner handles these records again.
            tracing::warn!(role = ?self.role, topic, partition, uncommitted, "partition lost; records handled since the last commit will be handled again");
        } else {
            if uncommitted > 0 && !self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                self.revoke_commits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((topic.to_owned(), partition), uncommitted);
            }
            tracing::info!(role = ?self.role, topic, partition, uncommitted, "partition revoked");
            if unstored > 0 {
                // Records past the durable frontier (in a handler call, waiting behind a key,
                // or their hand-off unacknowledged) were never stored: the commit sent now
                // cannot cover them.
                tracing::info!(
                    role = ?self.role, topic, partition, uncommitted = unstored,
                    "partition revoked with records not yet durable; those past the frontier will be handled again"
                );
            }
        }
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = self
            .consumer
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|c| self.stop_if_fatal(&c));
        if !fatal {
            forward_error(error, reason);
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(
        &self,
        base: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        self.set_fenced(false);
        match rebalance {
            Rebalance::Assign(tpl) => {
                for e in tpl.elements() {
                    self.assign(e.topic(), e.partition());
                }
            }
            Rebalance::Revoke(tpl) => {
                let lost = base.assignment_lost();
                for e in tpl.elements() {
                    self.revoke(base, e.topic(), e.partition(), lost);
                }
                // Commits refused while the group was rebalancing (a member joined, or one died
                // and its session had not run out) leave handled records uncommitted; the next
                // owner of these partitions would handle them again. The group is stable again
                // now, so commit before letting them go. Async: this thread serves the group;
                // the request is queued before the partitions are released, and the commit
                // callback reports a failure (see `revoke_commits`). After a lost assignment the
                // broker refuses it; those records were reported as lost above.
                if !self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Err(e) = base.commit_consumer_state(CommitMode::Async) {
                        tracing::debug!(role = ?self.role, error = %e, "commit on revoke not sent");
                    }
                }
            }
            Rebalance::Error(e) => tracing::warn!(role = ?self.role, error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(
        &self,
        base: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        // A partition paused by a previous owner-task (hand-off failing, or a retry record not
        // yet due) must not stay paused when it comes back to us.
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() > 0 {
                let _ = base.resume(tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        use rdkafka::types::RDKafkaErrorCode as C;
        match &result {
            Ok(()) => self.set_fenced(false),
            Err(KafkaError::ConsumerCommit(
                C::UnknownMemberId | C::IllegalGeneration | C::FencedInstanceId,
            )) => self.set_fenced(true),
            Err(_) => {}
        }
        {
            let mut pending = self
                .revoke_commits
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !pending.is_empty() {
                for e in offsets.elements() {
                    let key = (e.topic().to_owned(), e.partition());
                    let Some(uncommitted) = pending.remove(&key) else {
                        continue;
                    };
                    if let Err(err) = &result {
                        tracing::warn!(role = ?self.role, topic = key.0, partition = key.1, uncommitted, error = %err, "commit on revocation failed; records handled since the last commit will be handled again");
                    }
                }
            }
        }
        if result.is_ok() {
            let slots = self.slots();
            for e in offsets.elements() {
                if let (Offset::Offset(o), Some(slot)) = (
                    e.offset(),
                    slots.get(&(e.topic().to_owned(), e.partition())),
                ) {
                    slot.progress.committed(o);
                }
            }
        }
        match result {
            Ok(()) => {
                tracing::trace!(role = ?self.role, count = offsets.count(), "offsets committed")
            }
            // Nothing new stored since the last commit.
            Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(role = ?self.role, error = %e, "offset commit failed; will retry")
            }
        }
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
    /// Creates the consumer, subscribes and starts serving its main queue.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        role: Role,
        topics: &[String],
    ) -> Result<Group, Error> {
        let group_id = match role {
            Role::Main => shared.topology.group(),
            Role::Retry => shared.topology.retry_group(),
        };
        let context = GroupContext {
            role,
            group_id: group_id.to_owned(),
            shared: Arc::clone(shared),
            consumer: OnceLock::new(),
            slots: Mutex::new(HashMap::new()),
            retiring: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            fenced: std::sync::atomic::AtomicBool::new(false),
            unfenced: tokio::sync::Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            revoke_commits: Mutex::new(HashMap::new()),
        };
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
