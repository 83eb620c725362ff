//! A consumer-group membership used as a lock over a topic's partitions, and the group's
//! committed offsets as the progress that lock guards.
//!
//! `sidetrack dlq replay` keeps its progress (the next DLQ offset to consider, per partition)
//! under a consumer group of its own, and sends only while it is a member of that group owning
//! every partition: so a second replay of the same selection is refused instead of sending
//! everything again, and a replay that loses a partition stops before its next batch.
//!
//! This is not the runtime's partition-reading member: that one owns partitions to *read*
//! them, splitting each into a queue with a task of its own; this one owns them and never
//! reads (its partitions are paused as they are assigned), it only holds the group so that its
//! commits are refused once someone else owns the progress. The group membership itself — the
//! consumer context, the rebalance bookkeeping (assignments, revocations, rebalance errors)
//! and waiting for a change — is the runtime's one implementation
//! ([`Member`](crate::runtime::consumer::Member)); this file adds only what the lock does with
//! it (pause what is assigned, refuse unless every partition is owned, regain after a
//! revocation). It lives in the library so the CLI holds no copy of group logic.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::runtime::consumer::{Member, MemberHooks, Membership};

/// Why a [`ProgressGroup`] could not be joined, read, or committed through, or why it may not
/// send any more. The texts are written for the person running the replay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProgressError {
    /// librdkafka refused the client settings (a bad `-X` property, say): a usage error.
    #[error("bad client settings: {0}")]
    Settings(#[source] KafkaError),
    /// A broker or client error, as librdkafka words it.
    #[error("{0}")]
    Kafka(#[from] KafkaError),
    /// The group reported a rebalance error while joining.
    #[error("joining progress group `{group}` failed: {error}; nothing was sent")]
    JoinFailed {
        /// The progress group.
        group: String,
        /// librdkafka's rebalance error.
        error: String,
    },
    /// No assignment arrived in time.
    #[error(
        "could not join progress group `{group}` within {}{}; nothing was sent",
        humantime::format_duration(*within),
        last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    JoinTimeout {
        /// The progress group.
        group: String,
        /// How long the join was given.
        within: Duration,
        /// The last error polling the member, if any.
        last_error: Option<String>,
    },
    /// Another member owns some of the partitions: another replay of this selection runs.
    #[error(
        "another replay with progress group `{group}` is running (this run was given {owned} of the {wanted} partitions of `{topic}`); nothing was sent"
    )]
    Taken {
        /// The progress group.
        group: String,
        /// The topic whose partitions were wanted.
        topic: String,
        /// How many of the wanted partitions this member got.
        owned: usize,
        /// How many it needed.
        wanted: usize,
    },
    /// The group failed (a rebalance error) after this member had joined.
    #[error("the progress group `{group}` failed: {error}")]
    Failed {
        /// The progress group.
        group: String,
        /// librdkafka's rebalance error.
        error: String,
    },
    /// Another member joined and took partitions; see [`ProgressGroup::check`].
    #[error("another replay joined progress group `{group}`")]
    Joined {
        /// The progress group.
        group: String,
    },
    /// Another member joined and still holds partitions after the time a rebalance may take.
    #[error("another replay joined progress group `{group}` and did not leave")]
    DidNotLeave {
        /// The progress group.
        group: String,
    },
    /// The group's committed progress changed while this member did not own it.
    #[error("another replay sent from progress group `{group}` meanwhile")]
    SentMeanwhile {
        /// The progress group.
        group: String,
    },
    /// A commit of progress failed for good.
    #[error("saving replay progress under consumer group `{group}` failed: {source}")]
    Commit {
        /// The progress group.
        group: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The member was used after it was closed.
    #[error("the progress-group member is closed")]
    Closed,
    /// A thread could not be started, or a blocking task panicked.
    #[error("{0}")]
    Thread(String),
}

/// Consumer settings of a progress-group member that the caller's properties may change.
const MEMBER_DEFAULTS: &[(&str, &str)] = &[
    // How long a replay that died (kill -9) keeps its group: a new run waits that long.
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];

/// A replay's membership of its progress group: the lock that keeps two replays of the same
/// selection from both sending.
///
/// The member subscribes to the topic (cooperative-sticky, no auto commit) but never reads
/// from it: its partitions are paused as they are assigned; the records are read by a scan
/// ([`scan_report`](crate::dead_letter::scan_report)). A thread of its own polls it all the
/// time (rebalances are served and `max.poll.interval.ms` is met through scans and rate
/// waits). Progress is read and committed through it, so a commit from a member that lost the
/// group fails instead of overwriting the new owner's.
///
/// A revocation stops sending before the next batch ([`ProgressGroup::check`]). The batch in
/// flight still finishes and commits: no one else sends meanwhile, since a replay sends only
/// while it owns every partition and the sticky assignor leaves a live member at least one (a
/// member dropped from the group gets its commit refused instead: an error). The newcomer,
/// owning only some partitions, refuses and leaves; this replay goes on once it owns every
/// partition again and the group's progress is still its own ([`ProgressGroup::regain`]).
pub struct ProgressGroup {
    consumer: Option<Arc<LockConsumer>>,
    stop: Arc<AtomicBool>,
    keeper: Option<std::thread::JoinHandle<()>>,
    group: String,
    topic: String,
    partitions: BTreeSet<i32>,
    timeout: Duration,
    /// Revocations already accounted for by [`ProgressGroup::regain`].
    cleared: AtomicU32,
    /// How long commits refused during a rebalance are tried again.
    settle: Duration,
}

/// The lock's consumer: the shared member context around the lock's one hook.
type LockConsumer = BaseConsumer<Member<ReplayLock>>;

/// What the replay lock does on its group's events beyond the shared bookkeeping: pause what
/// it gets (only the ownership matters; the scan reads the records).
struct ReplayLock;

impl MemberHooks for ReplayLock {
    // Revocations are only counted (by the shared bookkeeping); not waiting there for the
    // batch in flight: this member could not rejoin until it ends, and a commit during a
    // rebalance may be refused until it rejoins (the embedded broker refuses every commit
    // while members are rejoining).
    fn after_rebalance(&self, consumer: &LockConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() > 0 {
                let _ = consumer.pause(tpl);
            }
        }
    }
}

impl ProgressGroup {
    /// Joins `group` as a member subscribed to `topic` and waits for this member's first
    /// assignment. Refuses ([`ProgressError::Taken`]) unless it owns every partition in
    /// `partitions`: another replay of the same selection is running.
    ///
    /// `config` holds the connection settings (`bootstrap.servers` and any security
    /// properties); the group, assignment strategy and offset handling are set here, and
    /// `session.timeout.ms`/`heartbeat.interval.ms` default to 6 s/1 s unless `config` sets
    /// them (a replay killed with `kill -9` holds the group for a session). `timeout` bounds
    /// each broker request. `waiting` is called once, with a sentence for the user, if the join
    /// takes more than 3 s (another member holds the group, or one that died has not timed out).
    pub async fn join(
        config: &ClientConfig,
        timeout: Duration,
        group: &str,
        topic: &str,
        partitions: &[i32],
        waiting: impl FnOnce(String) + Send + 'static,
    ) -> Result<ProgressGroup, ProgressError> {
        let mut config = config.clone();
        for (k, v) in MEMBER_DEFAULTS {
            if config.get(k).is_none() {
                config.set(*k, *v);
            }
        }
        config
            .set("group.id", group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let session = config
            .get("session.timeout.ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(45));
        if config.get("max.poll.interval.ms").is_none() {
            // The group's rebalance timeout: a replay killed while its join waits (Ctrl-C on a
            // run "waiting to join") holds the next joins this long, 300 s by librdkafka's
            // default. The keeper thread below polls every 100 ms, so it never trips otherwise;
            // librdkafka refuses a value below the session timeout.
            let ms = session.max(Duration::from_secs(10)).as_millis();
            config.set("max.poll.interval.ms", ms.to_string());
        }
        let (group, topic) = (group.to_owned(), topic.to_owned());
        let want: BTreeSet<i32> = partitions.iter().copied().collect();
        blocking(move || {
            let consumer: LockConsumer = config
                .create_with_context(Member::new(ReplayLock))
                .map_err(ProgressError::Settings)?;
            let consumer = Arc::new(consumer);
            consumer.subscribe(&[&topic])?;
            let stop = Arc::new(AtomicBool::new(false));
            let keeper = {
                let (consumer, stop) = (Arc::clone(&consumer), Arc::clone(&stop));
                std::thread::Builder::new()
                    .name("replay-member".into())
                    .spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            match consumer.poll(Duration::from_millis(100)) {
                                // Paused on assignment: nothing is expected; drop it if so.
                                Some(Ok(_)) | None => {}
                                Some(Err(e)) => {
                                    consumer.context().membership().lock().poll_error =
                                        Some(e.to_string())
                                }
                            }
                        }
                    })
                    .map_err(|e| ProgressError::Thread(e.to_string()))?
            };
            let member = ProgressGroup {
                consumer: Some(consumer),
                stop,
                keeper: Some(keeper),
                group,
                topic,
                partitions: want.clone(),
                timeout,
                cleared: AtomicU32::new(0),
                settle: timeout + session,
            };
            // A join waits for the members already there to rejoin, or for a dead one's
            // session to expire (a replay killed a moment ago), then for a rebalance or two.
            let within = timeout + session * 3;
            let begun = Instant::now();
            let deadline = begun + within;
            let mut waiting = Some(waiting);
            {
                let membership = member.membership();
                let mut f = membership.lock();
                while f.assigns == 0 {
                    if let Some(e) = &f.error {
                        return Err(ProgressError::JoinFailed {
                            group: member.group.clone(),
                            error: e.clone(),
                        });
                    }
                    if begun.elapsed() > Duration::from_secs(3) {
                        if let Some(tell) = waiting.take() {
                            tell(format!(
                                "waiting to join progress group `{}`: another replay of this selection is running, or one that stopped without leaving holds it for up to {}…",
                                member.group,
                                humantime::format_duration(session)
                            ));
                        }
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ProgressError::JoinTimeout {
                            group: member.group.clone(),
                            within,
                            last_error: f.poll_error.clone(),
                        });
                    }
                    f = membership.wait(f, left.min(Duration::from_millis(200)));
                }
            }
            let owned = member.owned()?;
            if owned != want {
                return Err(ProgressError::Taken {
                    group: member.group.clone(),
                    topic: member.topic.clone(),
                    owned: owned.intersection(&want).count(),
                    wanted: want.len(),
                });
            }
            Ok(member)
        })
        .await
    }

    fn consumer(&self) -> Result<Arc<LockConsumer>, ProgressError> {
        self.consumer.clone().ok_or(ProgressError::Closed)
    }

    /// The member's rebalances so far (the consumer is there until the member is dropped).
    fn membership(&self) -> &Membership {
        self.consumer
            .as_deref()
            .expect("the consumer is kept until drop")
            .context()
            .membership()
    }

    /// Partitions of the topic this member owns now.
    fn owned(&self) -> Result<BTreeSet<i32>, ProgressError> {
        let tpl = self.consumer()?.assignment()?;
        let owned = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        drop(tpl);
        Ok(owned)
    }

    /// The group's committed progress per partition (partitions without one are absent).
    pub async fn committed(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, ProgressError> {
        let consumer = self.consumer()?;
        let (topic, timeout, parts) = (self.topic.clone(), self.timeout, partitions.to_vec());
        blocking(move || Ok(committed_offsets(&consumer, &topic, &parts, timeout)?)).await
    }

    /// Whether this member still owns every partition it was given; if not, why the caller
    /// must not send ([`ProgressError::Failed`] or [`ProgressError::Joined`]). One lock and one
    /// atomic load: cheap enough before every batch.
    pub fn check(&self) -> Result<(), ProgressError> {
        let f = self.membership().lock();
        if f.revokes == self.cleared.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(match &f.error {
            Some(e) => ProgressError::Failed {
                group: self.group.clone(),
                error: e.clone(),
            },
            None => ProgressError::Joined {
                group: self.group.clone(),
            },
        })
    }

    /// After a revocation: waits until this member owns every partition again (the newcomer
    /// refused and left) and the group's committed progress is still `ours` (nobody else
    /// sent). Gives up with the reason after twice the time a rebalance may take (`timeout`
    /// plus the session timeout).
    pub async fn regain(&self, ours: &HashMap<i32, i64>) -> Result<(), ProgressError> {
        let deadline = Instant::now() + self.settle + self.settle;
        loop {
            let (revokes, error) = {
                let f = self.membership().lock();
                (f.revokes, f.error.clone())
            };
            if let Some(error) = error {
                return Err(ProgressError::Failed {
                    group: self.group.clone(),
                    error,
                });
            }
            if self.owned()? == self.partitions {
                let now: Vec<i32> = self.partitions.iter().copied().collect();
                let theirs = self.committed(&now).await?;
                if &theirs != ours {
                    return Err(ProgressError::SentMeanwhile {
                        group: self.group.clone(),
                    });
                }
                if self.membership().lock().revokes == revokes {
                    self.cleared.store(revokes, Ordering::SeqCst);
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(ProgressError::DidNotLeave {
                    group: self.group.clone(),
                });
            }
            let consumer = self.consumer()?;
            let _ = tokio::task::spawn_blocking(move || {
                let membership = consumer.context().membership();
                let assigns = membership.lock().assigns;
                membership.wait_until(Duration::from_millis(200), |r| r.assigns != assigns);
            })
            .await;
        }
    }

    /// Commits `offsets` (next offset to consider, per partition). A commit refused while the
    /// group rebalances is tried again for the time two rebalances may take (a second replay
    /// joining makes two: its join, then its leave once it finds it may not send — as
    /// [`regain`](Self::regain) allows); a member that lost the group gets
    /// [`ProgressError::Commit`].
    pub async fn commit(&self, offsets: &HashMap<i32, i64>) -> Result<(), ProgressError> {
        let consumer = self.consumer()?;
        let (topic, group, settle) = (self.topic.clone(), self.group.clone(), self.settle);
        let offsets = offsets.clone();
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &offsets {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(*o))?;
            }
            // One rebalance's worth was too short on a loaded machine: the batch was sent, the
            // commit gave up while the newcomer was still leaving, and the replay failed
            // although it still owned its progress (`two_replays_started_at_once_send_each_record_once`).
            let deadline = Instant::now() + settle + settle;
            loop {
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => return Ok(()),
                    Err(KafkaError::ConsumerCommit(code))
                        if retriable(code) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(source) => return Err(ProgressError::Commit { group, source }),
                }
            }
        })
        .await
    }

    /// Leaves the group (on a blocking thread: closing a consumer waits for the broker).
    pub async fn leave(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

/// Commit errors that go away once a rebalance or coordinator move has settled.
///
/// `IllegalGeneration` is among them: a commit built just before this member rejoined carries
/// the old generation (seen on the embedded broker whenever a second replay joins); librdkafka
/// itself ignores it while rebalancing. A member that was dropped from the group gets
/// `UnknownMemberId` instead, which is final.
fn retriable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        RebalanceInProgress
            | IllegalGeneration
            | CoordinatorLoadInProgress
            | CoordinatorNotAvailable
            | NotCoordinator
            | RequestTimedOut
            | WaitingForCoordinator
            | OperationTimedOut
            | BrokerTransportFailure
            | AllBrokersDown
    )
}

impl Drop for ProgressGroup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        // The last reference: closing leaves the group (a revocation with no batch in flight).
        drop(self.consumer.take());
    }
}

/// Committed offsets of `consumer`'s group on `topic` (partitions without one are absent).
///
/// Blocks for up to `timeout`. A group the broker does not know answers as a group with
/// nothing committed: Apache Kafka answers an unknown group with no offsets, kfake (franz-go's
/// test broker) with `GROUP_ID_NOT_FOUND`, and both mean the same.
pub fn committed_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let got = match consumer.committed_offsets(tpl, timeout) {
        Ok(got) => got,
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::GroupIdNotFound)) => {
            return Ok(HashMap::new())
        }
        Err(e) => return Err(e),
    };
    let map = got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    // Dropped before the consumer: a list outliving it can hang its drop.
    drop(got);
    Ok(map)
}

/// Runs `f` on the blocking pool: every librdkafka call here may wait for a broker.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProgressError> + Send + 'static,
) -> Result<T, ProgressError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProgressError::Thread(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock on the embedded broker: the first member owns every partition and its
    /// progress round-trips; a second member of the same group is refused and leaves; the
    /// first notices the revocation, then regains every partition with its progress intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_member_is_refused_and_the_first_goes_on() {
        let cluster = crate::mocking::EmbeddedCluster::start().unwrap();
        cluster.create_topic("p.dlq", 2).unwrap();
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", cluster.bootstrap_servers());
        let timeout = Duration::from_secs(10);
        let first = ProgressGroup::join(&config, timeout, "g", "p.dlq", &[0, 1], |_| {})
            .await
            .unwrap();
        first.check().unwrap();
        assert_eq!(first.committed(&[0, 1]).await.unwrap(), HashMap::new());
        let ours = HashMap::from([(0, 5), (1, 7)]);
        first.commit(&ours).await.unwrap();
        assert_eq!(first.committed(&[0, 1]).await.unwrap(), ours);

        let second = ProgressGroup::join(&config, timeout, "g", "p.dlq", &[0, 1], |_| {}).await;
        match second {
            Err(ProgressError::Taken { owned, wanted, .. }) => {
                assert!(owned < wanted, "{owned} of {wanted}")
            }
            Err(e) => panic!("expected Taken, got {e}"),
            Ok(_) => panic!("a second member owned every partition"),
        }
        // The first member lost partitions while the second was in the group.
        let lost = first.check().unwrap_err();
        assert!(matches!(lost, ProgressError::Joined { .. }), "{lost}");
        first.regain(&ours).await.unwrap();
        first.check().unwrap();
        first.commit(&HashMap::from([(0, 6)])).await.unwrap();
        first.leave().await;
    }

    #[test]
    fn messages_are_the_ones_the_cli_always_printed() {
        let taken = ProgressError::Taken {
            group: "g".into(),
            topic: "t".into(),
            owned: 1,
            wanted: 2,
        };
        assert_eq!(
            taken.to_string(),
            "another replay with progress group `g` is running (this run was given 1 of the 2 partitions of `t`); nothing was sent"
        );
        let late = ProgressError::JoinTimeout {
            group: "g".into(),
            within: Duration::from_secs(28),
            last_error: Some("down".into()),
        };
        assert_eq!(
            late.to_string(),
            "could not join progress group `g` within 28s (last error: down); nothing was sent"
        );
    }
}
