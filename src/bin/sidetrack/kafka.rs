//! Broker access shared by the subcommands.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sidetrack::dead_letter::{scan_report, Record, Scanned, StartAt};

use crate::Failure;

/// Connection settings, checked against the brokers once.
pub struct Kafka {
    pub brokers: String,
    pub config: ClientConfig,
    pub timeout: Duration,
}

impl Kafka {
    /// Parses `-X` properties and checks that the brokers answer within `timeout`.
    pub async fn connect(
        brokers: &str,
        props: &[String],
        timeout: Duration,
    ) -> Result<Self, Failure> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        for p in props {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| Failure::Usage(format!("-X {p}: expected KEY=VALUE")))?;
            config.set(k.trim(), v.trim());
        }
        let kafka = Kafka {
            brokers: brokers.to_owned(),
            config,
            timeout,
        };
        let probe = kafka.clone_config();
        let brokers = brokers.to_owned();
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = probe
                .create()
                .map_err(|e| Failure::Usage(format!("bad client settings: {e}")))?;
            c.fetch_metadata(None, timeout).map(|_| ()).map_err(|e| {
                Failure::Unreachable(format!(
                    "cannot reach brokers at {brokers} within {}: {e}",
                    humantime::format_duration(timeout)
                ))
            })
        })
        .await
        .map_err(|e| Failure::Other(e.to_string()))??;
        Ok(kafka)
    }

    pub fn clone_config(&self) -> ClientConfig {
        self.config.clone()
    }

    /// Partition ids of `topic`, or `UnknownTopic`.
    pub async fn partitions(&self, topic: &str) -> Result<Vec<i32>, Failure> {
        let config = self.clone_config();
        let (topic, timeout) = (topic.to_owned(), self.timeout);
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(other)?;
            let md = c.fetch_metadata(Some(&topic), timeout).map_err(other)?;
            md.topics()
                .iter()
                .find(|t| t.name() == topic)
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.partitions().iter().map(|p| p.id()).collect())
                .ok_or_else(|| Failure::UnknownTopic(format!("topic `{topic}` does not exist")))
        })
        .await
    }

    /// Every topic name on the cluster.
    pub async fn topic_names(&self) -> Result<Vec<String>, Failure> {
        let config = self.clone_config();
        let timeout = self.timeout;
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(other)?;
            let md = c.fetch_metadata(None, timeout).map_err(other)?;
            Ok(md.topics().iter().map(|t| t.name().to_owned()).collect())
        })
        .await
    }

    /// (low, high) watermarks per partition.
    pub async fn watermarks(&self, topic: &str) -> Result<HashMap<i32, (i64, i64)>, Failure> {
        let parts = self.partitions(topic).await?;
        let config = self.clone_config();
        let (topic, timeout) = (topic.to_owned(), self.timeout);
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(other)?;
            parts
                .into_iter()
                .map(|p| {
                    c.fetch_watermarks(&topic, p, timeout)
                        .map(|w| (p, w))
                        .map_err(other)
                })
                .collect()
        })
        .await
    }

    /// Committed offsets of `group` on `topic` (partitions without one are absent).
    pub async fn committed(&self, group: &str, topic: &str) -> Result<HashMap<i32, i64>, Failure> {
        let parts = self.partitions(topic).await?;
        let mut config = self.clone_config();
        config.set("group.id", group);
        let (topic, timeout) = (topic.to_owned(), self.timeout);
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(other)?;
            committed_of(&c, &topic, &parts, timeout)
        })
        .await
    }

    /// Scans `topic` from `start`, calling `f` per committed record, until the last stable
    /// offsets seen at the start (or `f` breaks). Returns how far each partition was read (see
    /// [`sidetrack::dead_letter::scan_report`]): progress may be saved there, never further;
    /// and which partitions an open transaction held back ([`held_back`] says so to the user).
    pub async fn scan<F>(&self, topic: &str, start: StartAt, f: F) -> Result<Scanned, Failure>
    where
        F: FnMut(Record) -> ControlFlow<()> + Send + 'static,
    {
        self.partitions(topic).await?;
        let config = self.clone_config();
        let (topic, timeout) = (topic.to_owned(), self.timeout);
        blocking(move || scan_report(&config, &topic, &start, timeout, f).map_err(Failure::from))
            .await
    }

    /// The record at exactly `topic[partition]@offset`, or why it is not there (the topic or
    /// partition does not exist, the offset is past the end or no longer retained). Broker
    /// failures are errors, not absence.
    pub async fn read_at(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Result<Record, String>, Failure> {
        match self.partitions(topic).await {
            Err(Failure::UnknownTopic(_)) => {
                return Ok(Err(format!("topic `{topic}` does not exist")))
            }
            Err(e) => return Err(e),
            Ok(parts) if !parts.contains(&partition) => {
                return Ok(Err(format!("`{topic}` has no partition {partition}")))
            }
            Ok(_) => {}
        }
        let found = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&found);
        let scanned = self
            .scan(
                topic,
                StartAt::Offsets(HashMap::from([(partition, offset)])),
                move |r| {
                    *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    ControlFlow::Break(())
                },
            )
            .await?;
        let first = found.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(match first {
            Some(r) if r.offset == offset => Ok(r),
            Some(r) => Err(format!(
                "no record at {topic}[{partition}]@{offset} (the next one is @{}; it is no longer retained, or was a transaction marker or an aborted record)",
                r.offset
            )),
            None => Err(match scanned.open.get(&partition) {
                Some(t) if offset >= t.stable_end => format!(
                    "no record at {topic}[{partition}]@{offset} yet (offsets from {} on are held back by a transaction that is still open)",
                    t.stable_end
                ),
                _ => format!(
                    "no record at {topic}[{partition}]@{offset} (the partition ends before it, or the offset is a transaction marker or an aborted record)"
                ),
            }),
        })
    }
}

/// What an open transaction held back from a scan of `topic`, one line per partition (none
/// when nothing was held back), for stderr. `then` ends each line: what a later run does.
///
/// An open transaction is a normal moment for a transactional producer (Spring Kafka writes
/// its DLT inside the listener's transaction); one whose producer died is aborted by the broker
/// after the producer's `transaction.timeout.ms`. So this is reported, not an error: what was
/// read is every committed record before it, and nothing past it is lost to a later run.
pub fn held_back(topic: &str, scanned: &Scanned, then: &str) -> Vec<String> {
    // Only where the scan got to the stable end: one stopped earlier (`--limit`) was not held.
    let mut parts: Vec<_> = scanned
        .open
        .iter()
        .filter(|(p, t)| scanned.reached.get(p).is_some_and(|r| *r >= t.stable_end))
        .collect();
    parts.sort_by_key(|(p, _)| **p);
    parts
        .into_iter()
        .map(|(p, t)| {
            let n = t.held();
            format!(
                "`{topic}` partition {p}: read up to offset {} only; {n} offset{} from there on {} held back by a transaction that is still open (neither committed nor aborted); {then}",
                t.stable_end,
                if n == 1 { "" } else { "s" },
                if n == 1 { "is" } else { "are" },
            )
        })
        .collect()
}

/// Consumer settings of a progress-group member that the user's `-X` may change.
const MEMBER_DEFAULTS: &[(&str, &str)] = &[
    // How long a replay that died (kill -9) keeps its group: a new run waits that long.
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];

/// A replay's membership of its progress group: the lock that keeps two replays of the same
/// selection from both sending.
///
/// The member subscribes to the DLQ (cooperative-sticky, no auto commit) but never reads from
/// it: its partitions are paused as they are assigned; the records are read by a scan. A
/// thread of its own polls it all the time (rebalances are served and `max.poll.interval.ms`
/// is met through scans and `--rate` waits). Progress is read and committed through it, so a
/// commit from a member that lost the group fails instead of overwriting the new owner's.
///
/// A revocation stops sending before the next batch ([`Member::check`]). The batch in flight
/// still finishes and commits: no one else sends meanwhile, since a replay sends only while it
/// owns every partition and the sticky assignor leaves a live member at least one (a member
/// dropped from the group gets its commit refused instead: an error). The newcomer, owning
/// only some partitions, refuses and leaves; this replay goes on once it owns every partition
/// again and the group's progress is still its own ([`Member::regain`]).
pub struct Member {
    consumer: Option<Arc<BaseConsumer<MemberContext>>>,
    state: Arc<MemberState>,
    stop: Arc<AtomicBool>,
    keeper: Option<std::thread::JoinHandle<()>>,
    group: String,
    topic: String,
    partitions: BTreeSet<i32>,
    timeout: Duration,
    /// Revocations already accounted for by [`Member::regain`].
    cleared: AtomicU32,
    /// How long commits refused during a rebalance are tried again.
    settle: Duration,
}

#[derive(Default)]
struct MemberState {
    flags: Mutex<Flags>,
    changed: Condvar,
}

#[derive(Default)]
struct Flags {
    /// Assignments received (each rebalance ends with one, possibly empty).
    assigns: u32,
    /// Revocations (or losses) of partitions: another member joined, or this one was dropped.
    revokes: u32,
    /// A rebalance error: this member cannot be trusted with the group any more.
    error: Option<String>,
    /// The last error polling the member (shown if joining takes too long).
    poll_error: Option<String>,
}

impl MemberState {
    fn flags(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct MemberContext {
    state: Arc<MemberState>,
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) if tpl.count() > 0 => {
                // Not waiting here for the batch in flight: this member could not rejoin until
                // it ends, and a commit during a rebalance may be refused until it rejoins
                // (the embedded broker refuses every commit while members are rejoining).
                self.state.flags().revokes += 1;
                self.state.changed.notify_all();
            }
            Rebalance::Error(e) => {
                let mut f = self.state.flags();
                f.revokes += 1;
                f.error = Some(e.to_string());
                self.state.changed.notify_all();
            }
            _ => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Only the ownership matters; the scan reads the records.
            if tpl.count() > 0 {
                let _ = consumer.pause(tpl);
            }
            let mut f = self.state.flags();
            f.assigns += 1;
            self.state.changed.notify_all();
        }
    }
}

impl Member {
    /// Joins `group` as a member subscribed to `topic` and waits for this member's first
    /// assignment. Refuses (an error naming the group) unless it owns every partition in
    /// `partitions`: another replay of the same selection is running.
    pub async fn join(
        kafka: &Kafka,
        group: &str,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Member, Failure> {
        let mut config = kafka.clone_config();
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
        let (group, topic, timeout) = (group.to_owned(), topic.to_owned(), kafka.timeout);
        let want: BTreeSet<i32> = partitions.iter().copied().collect();
        blocking(move || {
            let state = Arc::new(MemberState::default());
            let consumer: BaseConsumer<MemberContext> = config
                .create_with_context(MemberContext {
                    state: Arc::clone(&state),
                })
                .map_err(|e| Failure::Usage(format!("bad client settings: {e}")))?;
            let consumer = Arc::new(consumer);
            consumer.subscribe(&[&topic]).map_err(other)?;
            let stop = Arc::new(AtomicBool::new(false));
            let keeper = {
                let (consumer, stop, state) =
                    (Arc::clone(&consumer), Arc::clone(&stop), Arc::clone(&state));
                std::thread::Builder::new()
                    .name("replay-member".into())
                    .spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            match consumer.poll(Duration::from_millis(100)) {
                                // Paused on assignment: nothing is expected; drop it if so.
                                Some(Ok(_)) | None => {}
                                Some(Err(e)) => state.flags().poll_error = Some(e.to_string()),
                            }
                        }
                    })
                    .map_err(other)?
            };
            let member = Member {
                consumer: Some(consumer),
                state,
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
            let mut told = false;
            {
                let mut f = member.state.flags();
                while f.assigns == 0 {
                    if let Some(e) = &f.error {
                        return Err(Failure::Other(format!(
                            "joining progress group `{}` failed: {e}; nothing was sent",
                            member.group
                        )));
                    }
                    if !told && begun.elapsed() > Duration::from_secs(3) {
                        told = true;
                        eprintln!(
                            "waiting to join progress group `{}`: another replay of this selection is running, or one that stopped without leaving holds it for up to {}…",
                            member.group,
                            humantime::format_duration(session)
                        );
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Failure::Other(format!(
                            "could not join progress group `{}` within {}{}; nothing was sent",
                            member.group,
                            humantime::format_duration(within),
                            f.poll_error
                                .as_deref()
                                .map(|e| format!(" (last error: {e})"))
                                .unwrap_or_default()
                        )));
                    }
                    f = member
                        .state
                        .changed
                        .wait_timeout(f, left.min(Duration::from_millis(200)))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            let owned = member.owned()?;
            if owned != want {
                return Err(Failure::Other(format!(
                    "another replay with progress group `{}` is running (this run was given {} of the {} partitions of `{}`); nothing was sent",
                    member.group,
                    owned.intersection(&want).count(),
                    want.len(),
                    member.topic
                )));
            }
            Ok(member)
        })
        .await
    }

    fn consumer(&self) -> Result<Arc<BaseConsumer<MemberContext>>, Failure> {
        self.consumer
            .clone()
            .ok_or_else(|| Failure::Other("the progress-group member is closed".into()))
    }

    /// Partitions of the topic this member owns now.
    fn owned(&self) -> Result<BTreeSet<i32>, Failure> {
        let tpl = self.consumer()?.assignment().map_err(other)?;
        let owned = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        drop(tpl);
        Ok(owned)
    }

    /// Committed progress per partition (partitions without one are absent).
    pub async fn committed(&self, partitions: &[i32]) -> Result<HashMap<i32, i64>, Failure> {
        let consumer = self.consumer()?;
        let (topic, timeout, parts) = (self.topic.clone(), self.timeout, partitions.to_vec());
        blocking(move || committed_of(&consumer, &topic, &parts, timeout)).await
    }

    /// Whether this member still owns every partition it was given; if not, why this replay
    /// must not send.
    pub fn check(&self) -> Result<(), String> {
        let f = self.state.flags();
        if f.revokes == self.cleared.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(match &f.error {
            Some(e) => format!("the progress group `{}` failed: {e}", self.group),
            None => format!("another replay joined progress group `{}`", self.group),
        })
    }

    /// After a revocation: waits until this member owns every partition again (the newcomer
    /// refused and left) and the group's committed progress is still `ours` (nobody else
    /// sent). Gives up with the reason after the time a rebalance may take.
    pub async fn regain(&self, ours: &HashMap<i32, i64>) -> Result<(), String> {
        let deadline = Instant::now() + self.settle + self.settle;
        loop {
            let (revokes, error) = {
                let f = self.state.flags();
                (f.revokes, f.error.clone())
            };
            if let Some(e) = error {
                return Err(format!("the progress group `{}` failed: {e}", self.group));
            }
            if self.owned().map_err(|f| f.message().to_owned())? == self.partitions {
                let now: Vec<i32> = self.partitions.iter().copied().collect();
                let theirs = self
                    .committed(&now)
                    .await
                    .map_err(|f| f.message().to_owned())?;
                if &theirs != ours {
                    return Err(format!(
                        "another replay sent from progress group `{}` meanwhile",
                        self.group
                    ));
                }
                if self.state.flags().revokes == revokes {
                    self.cleared.store(revokes, Ordering::SeqCst);
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "another replay joined progress group `{}` and did not leave",
                    self.group
                ));
            }
            let state = Arc::clone(&self.state);
            let _ = tokio::task::spawn_blocking(move || {
                let f = state.flags();
                let assigns = f.assigns;
                let _ = state
                    .changed
                    .wait_timeout_while(f, Duration::from_millis(200), |f| f.assigns == assigns);
            })
            .await;
        }
    }

    /// Commits `offsets` (next offset to consider, per partition). A commit refused while the
    /// group rebalances is tried again; a member that lost the group gets an error.
    pub async fn commit(&self, offsets: &HashMap<i32, i64>) -> Result<(), Failure> {
        let consumer = self.consumer()?;
        let (topic, group, settle) = (self.topic.clone(), self.group.clone(), self.settle);
        let offsets = offsets.clone();
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &offsets {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(*o))
                    .map_err(other)?;
            }
            let deadline = Instant::now() + settle;
            loop {
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => return Ok(()),
                    Err(KafkaError::ConsumerCommit(code))
                        if retriable(code) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        return Err(Failure::Other(format!(
                            "saving replay progress under consumer group `{group}` failed: {e}"
                        )))
                    }
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

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        // The last reference: closing leaves the group (a revocation with no batch in flight).
        drop(self.consumer.take());
    }
}

/// Committed offsets of `c`'s group on `topic` (partitions without one are absent).
fn committed_of<C: ConsumerContext>(
    c: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<HashMap<i32, i64>, Failure> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let got = match c.committed_offsets(tpl, timeout) {
        Ok(got) => got,
        // Apache Kafka answers an unknown group with no offsets; kfake (franz-go's test
        // broker) answers GROUP_ID_NOT_FOUND. Both mean nothing was committed.
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::GroupIdNotFound)) => {
            return Ok(HashMap::new())
        }
        Err(e) => return Err(other(e)),
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

fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Other(e.to_string()))?
}
