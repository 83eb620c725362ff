//! Broker access shared by the subcommands: the connection settings, checked once, and the
//! metadata, offset and scan queries the subcommands make.
//!
//! Everything that is sidetrack logic rather than presentation lives in the library and is
//! called from here: reading a DLQ is [`sidetrack::dead_letter::scan_report`], committed
//! offsets are [`sidetrack::admin::committed_offsets`], and the replay's progress-group lock
//! is [`sidetrack::admin::ProgressGroup`]. This file holds the blocking-thread plumbing and
//! the user-facing wording.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use sidetrack::admin::{committed_offsets, ProgressError, ProgressGroup};
use sidetrack::dead_letter::{scan_report, Record, Scanned, StartAt};

use crate::Failure;

/// Connection settings, checked against the brokers once.
pub(crate) struct Kafka {
    /// `--brokers` as given (`host:port,..`).
    pub brokers: String,
    /// `bootstrap.servers` plus every `-X` property.
    pub config: ClientConfig,
    /// `--timeout`: the bound on each broker request.
    pub timeout: Duration,
}

impl Kafka {
    /// Parses `-X` properties and checks that the brokers answer within `timeout`.
    pub(crate) async fn connect(
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

    /// A copy of the client settings: each query creates a client of its own on a blocking
    /// thread (and `committed` sets the group it asks about).
    pub(crate) fn clone_config(&self) -> ClientConfig {
        self.config.clone()
    }

    /// Partition ids of `topic`, or `UnknownTopic`.
    pub(crate) async fn partitions(&self, topic: &str) -> Result<Vec<i32>, Failure> {
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
    pub(crate) async fn topic_names(&self) -> Result<Vec<String>, Failure> {
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
    pub(crate) async fn watermarks(
        &self,
        topic: &str,
    ) -> Result<HashMap<i32, (i64, i64)>, Failure> {
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
    pub(crate) async fn committed(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<HashMap<i32, i64>, Failure> {
        let parts = self.partitions(topic).await?;
        let mut config = self.clone_config();
        config.set("group.id", group);
        let (topic, timeout) = (topic.to_owned(), self.timeout);
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(other)?;
            committed_offsets(&c, &topic, &parts, timeout).map_err(other)
        })
        .await
    }

    /// Scans `topic` from `start`, calling `f` per committed record, until the last stable
    /// offsets seen at the start (or `f` breaks). Returns how far each partition was read (see
    /// [`sidetrack::dead_letter::scan_report`]): progress may be saved there, never further;
    /// and which partitions an open transaction held back ([`held_back`] says so to the user).
    pub(crate) async fn scan<F>(
        &self,
        topic: &str,
        start: StartAt,
        f: F,
    ) -> Result<Scanned, Failure>
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
    pub(crate) async fn read_at(
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
pub(crate) fn held_back(topic: &str, scanned: &Scanned, then: &str) -> Vec<String> {
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

/// A replay's membership of its progress group: the library's [`ProgressGroup`] (the lock that
/// keeps two replays of the same selection from both sending), joined with this tool's
/// connection settings. Everything else is the library's: see [`ProgressGroup`].
pub(crate) struct Member(ProgressGroup);

impl Member {
    /// Joins `group` on `topic`; refuses unless this member owns every partition in
    /// `partitions` (another replay of the same selection is running). Tells the user on
    /// stderr when the join has to wait.
    pub(crate) async fn join(
        kafka: &Kafka,
        group: &str,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Member, Failure> {
        let waiting = |text: String| eprintln!("{text}");
        ProgressGroup::join(
            &kafka.config,
            kafka.timeout,
            group,
            topic,
            partitions,
            waiting,
        )
        .await
        .map(Member)
        .map_err(Failure::from)
    }

    /// Leaves the group.
    pub(crate) async fn leave(self) {
        self.0.leave().await
    }
}

impl std::ops::Deref for Member {
    type Target = ProgressGroup;
    fn deref(&self) -> &ProgressGroup {
        &self.0
    }
}

impl From<ProgressError> for Failure {
    fn from(e: ProgressError) -> Self {
        match e {
            ProgressError::Settings(_) => Failure::Usage(e.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

/// Any other error, as its text (exit code 1).
fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(e.to_string())
}

/// Runs `f` on the blocking pool: every librdkafka call here may wait for a broker.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Other(e.to_string()))?
}
