//! The consumer side of a group member: the consumer type, its context (the rebalance hook,
//! the table of owned partitions, fencing, commit results) and what a partition's start is
//! given. librdkafka calls the rebalance hook on the thread that polls the consumer's main
//! queue. On assign we split each new partition into its own queue and have its supervisor
//! started; on revoke we tell the task to drop its queue at once and abandon its in-flight
//! record (its offset is not stored; the new owner handles it again).
//!
//! Separate from `group.rs` (which creates the member, serves its main queue and stops it) so
//! that the stages below a group member — supervisor, partition task, pause — depend on this
//! file and not on the file that starts them: the context does not name the supervisor, it
//! calls a [`StartPartition`] that `group.rs` gives it (once per assignment, never per record).
//!
//! The rebalance bookkeeping every consumer-group member of the crate needs — counting
//! assignments and revocations, keeping the last rebalance error, waking whoever waits for a
//! change — is written once here, as the [`Member`] context around a member's own
//! [`MemberHooks`]. Two members use it: the runtime's ([`GroupState`]) and the replay lock of
//! `sidetrack dlq replay` ([`ProgressGroup`](crate::admin::ProgressGroup)), which owns
//! partitions without reading them.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::metrics::lag;

use super::client::{forward_error, forward_log};
use super::partition::offsets::Progress;
use super::shared::Shared;
use super::signal::Signal;

/// The runtime's consumer: a stream consumer whose partitions are each split into a queue.
pub(crate) type GroupConsumer = StreamConsumer<GroupContext>;

/// Which consumer this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Reads the source topics.
    Main,
    /// Reads the retry tier topics.
    Retry,
}

/// One owned partition in the member's table.
pub(super) struct Slot {
    /// Raised when the partition is revoked.
    pub(super) revoked: Signal,
    /// The partition's supervisor (which runs the partition task). It ends only after its
    /// predecessor for the same partition in this process has ended.
    pub(super) task: JoinHandle<()>,
    /// The partition's progress, kept across the tasks of one assignment.
    pub(super) progress: Arc<Progress>,
}

/// A partition queue handle, one per partition for the life of the consumer while any task
/// holds it.
pub(crate) type Queue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<GroupContext>;

/// The runtime consumer's context: the shared [`Member`] bookkeeping around [`GroupState`].
pub(crate) type GroupContext = Member<GroupState>;

/// The runtime member's own state, behind its [`Member`] context: the rebalance hooks (see
/// [`MemberHooks`]) and the table of partition tasks.
pub(crate) struct GroupState {
    pub(super) role: Role,
    pub(super) group_id: String,
    pub(super) shared: Arc<Shared>,
    /// Set right after the consumer is wrapped in an `Arc`: splitting a partition queue needs
    /// the `Arc`, but the rebalance hook only gets the inner `BaseConsumer`.
    pub(super) consumer: OnceLock<Weak<GroupConsumer>>,
    pub(super) slots: Mutex<HashMap<(String, i32), Slot>>,
    /// Revoked partitions whose supervisor may still be finishing a handler call: a new one
    /// for the same partition waits for it (see [`Assigned::previous`]), and shutdown waits
    /// for the rest.
    pub(super) retiring: Mutex<HashMap<(String, i32), JoinHandle<()>>>,
    /// The queue handle of each partition. A second handle on the same librdkafka queue
    /// disables the first one's wake-ups when either is dropped, so a partition assigned back
    /// while its previous task still holds its handle (a handler call blocking its thread)
    /// gets that same handle again. Cleared before the consumer closes (each handle holds the
    /// consumer).
    pub(super) queues: Mutex<HashMap<(String, i32), Arc<Queue>>>,
    /// Starts a partition's supervisor on assignment (see [`StartPartition`]).
    pub(super) starter: Box<dyn StartPartition>,
    /// Set when a commit says this member is no longer in the group (unknown member, stale
    /// generation): offsets stored now would never be committed, and the new owner would
    /// handle those records again. Partition tasks take no new record until the next
    /// rebalance or successful commit clears it.
    pub(super) fenced: std::sync::atomic::AtomicBool,
    pub(super) unfenced: tokio::sync::Notify,
    /// Set when the group member starts stopping; see [`Group::stop`].
    pub(super) closing: std::sync::atomic::AtomicBool,
    /// Revoked partitions whose handled records wait for the commit sent on revocation, with
    /// how many records that is: if that commit fails, the next owner handles them again.
    pub(super) revoke_commits: Mutex<HashMap<(String, i32), i64>>,
}

impl GroupState {
    pub(super) fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Slot>> {
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
    pub(super) fn stop_if_fatal(&self, consumer: &GroupConsumer) -> bool {
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
        let handle = self.starter.start(Assigned {
            consumer: Arc::clone(&consumer),
            topic: topic.to_owned(),
            partition,
            revoked: revoked.clone(),
            progress: Arc::clone(&progress),
            queue,
            previous,
        });
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

    fn revoke(&self, base: &BaseConsumer<GroupContext>, topic: &str, partition: i32, lost: bool) {
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

impl MemberHooks for GroupState {
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

    fn before_rebalance(&self, base: &BaseConsumer<GroupContext>, rebalance: &Rebalance<'_>) {
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

    fn after_rebalance(&self, base: &BaseConsumer<GroupContext>, rebalance: &Rebalance<'_>) {
        // A partition paused by a previous owner-task (hand-off failing, or a retry record not
        // yet due) must not stay paused when it comes back to us.
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() > 0 {
                let _ = base.resume(tpl);
            }
        }
    }

    fn commit_result(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
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

/// What a newly assigned partition's supervisor is started with.
pub(crate) struct Assigned {
    /// The member's consumer (each task pauses, resumes and stores offsets through it).
    pub(crate) consumer: Arc<GroupConsumer>,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    /// Raised when the partition is revoked.
    pub(crate) revoked: Signal,
    /// The partition's progress, kept across the tasks of one assignment.
    pub(crate) progress: Arc<Progress>,
    /// The partition's queue handle (shared with a previous task still holding it).
    pub(crate) queue: Arc<Queue>,
    /// This partition's previous supervisor in this process, if it may still be running (it
    /// may be finishing a handler call after a revoke): a record must never be in two handler
    /// calls at once, so nothing starts before it ends.
    pub(crate) previous: Option<JoinHandle<()>>,
}

/// Starts the supervisor of a newly assigned partition; implemented by `group.rs`, which
/// knows the supervisor and the handler. Called from the rebalance hook, once per assigned
/// partition: the dynamic call costs nothing on the per-record path.
pub(crate) trait StartPartition: Send + Sync + 'static {
    /// Spawns the partition's supervisor and returns its handle.
    fn start(&self, assigned: Assigned) -> JoinHandle<()>;
}

/// The consumer context of every consumer-group member of the crate: the member's own hooks
/// (`H`), and the rebalance bookkeeping they all share ([`Membership`]). librdkafka calls it
/// on the thread that polls the consumer; nothing here is on the per-record path.
pub(crate) struct Member<H> {
    hooks: H,
    membership: Membership,
}

impl<H: MemberHooks> Member<H> {
    /// Wraps a member's hooks.
    pub(crate) fn new(hooks: H) -> Self {
        Member {
            hooks,
            membership: Membership::default(),
        }
    }

    /// What the rebalances of this member were so far.
    pub(crate) fn membership(&self) -> &Membership {
        &self.membership
    }
}

impl<H> std::ops::Deref for Member<H> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.hooks
    }
}

/// What a member does on its group's events, inside the shared [`Member`] context. Every
/// method has a default: do nothing, or librdkafka's own handling for logs and errors.
pub(crate) trait MemberHooks: Send + Sync + Sized + 'static {
    /// A log line of librdkafka's.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        DefaultClientContext.log(level, fac, message);
    }
    /// A client error.
    fn error(&self, error: KafkaError, reason: &str) {
        DefaultClientContext.error(error, reason);
    }
    /// Before librdkafka applies a rebalance (after the bookkeeping counted it).
    fn before_rebalance(&self, _base: &BaseConsumer<Member<Self>>, _rebalance: &Rebalance<'_>) {}
    /// After librdkafka applied a rebalance (before the bookkeeping counts an assignment, so
    /// whoever waits for one sees what this did).
    fn after_rebalance(&self, _base: &BaseConsumer<Member<Self>>, _rebalance: &Rebalance<'_>) {}
    /// The result of an offset commit.
    fn commit_result(&self, _result: KafkaResult<()>, _offsets: &TopicPartitionList) {}
}

impl<H: MemberHooks> ClientContext for Member<H> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.hooks.log(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.hooks.error(error, reason);
    }
}

impl<H: MemberHooks> ConsumerContext for Member<H> {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) if tpl.count() > 0 => self.membership.update(|r| r.revokes += 1),
            Rebalance::Error(e) => self.membership.update(|r| {
                r.revokes += 1;
                r.error = Some(e.to_string());
            }),
            _ => {}
        }
        self.hooks.before_rebalance(base, rebalance);
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.hooks.after_rebalance(base, rebalance);
        if let Rebalance::Assign(_) = rebalance {
            self.membership.update(|r| r.assigns += 1);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.hooks.commit_result(result, offsets);
    }
}

/// A member's rebalances so far, guarded by a mutex and signalled by a condition variable
/// (the callbacks run on the thread polling the consumer; a waiter may be any thread).
#[derive(Default)]
pub(crate) struct Membership {
    rebalances: Mutex<Rebalances>,
    changed: Condvar,
}

/// See [`Membership`].
#[derive(Default)]
pub(crate) struct Rebalances {
    /// Assignments received (each rebalance ends with one, possibly empty).
    pub(crate) assigns: u32,
    /// Revocations (or losses) of partitions, and rebalance errors: another member joined,
    /// or this one was dropped.
    pub(crate) revokes: u32,
    /// The last rebalance error: this member cannot be trusted with the group any more.
    pub(crate) error: Option<String>,
    /// The last error polling the member, if its poller records one (shown if joining takes
    /// too long).
    pub(crate) poll_error: Option<String>,
}

impl Membership {
    /// The rebalances so far (a lock held only while read or changed).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Rebalances> {
        // Only counters and texts behind it: still consistent after a panic elsewhere.
        self.rebalances.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for a change; the guard back, relocked.
    pub(crate) fn wait<'a>(
        &self,
        guard: MutexGuard<'a, Rebalances>,
        timeout: Duration,
    ) -> MutexGuard<'a, Rebalances> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Waits up to `timeout` until `until` holds.
    pub(crate) fn wait_until(&self, timeout: Duration, mut until: impl FnMut(&Rebalances) -> bool) {
        let guard = self.lock();
        let _ = self
            .changed
            .wait_timeout_while(guard, timeout, |r| !until(r));
    }

    fn update(&self, change: impl FnOnce(&mut Rebalances)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }
}
