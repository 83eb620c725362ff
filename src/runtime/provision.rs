//! Start-up check of the topology: the source topics must exist; retry and dead-letter topics
//! are created with the source topic's partition count when allowed, otherwise start-up fails
//! naming them.
//!
//! Side topics get the source's partition count so that the hand-off can keep a record's
//! partition number (and with it per-key locality) on its way through the tiers. A side topic
//! that already exists is used as it is, whatever its count: the hand-off then keeps the
//! partition number only where the topic has it, and lets the key choose otherwise.
//! `sidetrack topology --create` runs this same code ([`check_topics`]), so the CLI makes
//! exactly the topics a runtime would. Metadata lookups are retried on a fresh client,
//! because one stalled broker can otherwise hold a lookup for librdkafka's socket timeout.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::error::Error;
use crate::mocking::EmbeddedCluster;
use crate::retry::Topology;

use super::client::{admin_config, consumer_config, TracingContext};

/// How missing topics get created.
#[derive(Clone)]
pub(crate) enum TopicCreator {
    /// Through the Kafka admin API.
    Admin,
    /// Directly in the embedded cluster, whose mock broker has no CreateTopics API.
    Embedded(EmbeddedCluster),
}

/// Partition count of a topic, `None` if the broker does not know it, asked within
/// `timeout`.
///
/// A broker that stopped answering after its connection was set up (a paused or stalled
/// process: the socket stays open) holds a metadata request until librdkafka's socket timeout
/// (60 s), and librdkafka sends the next one to the same broker (the one it used last). So
/// one attempt gets a third of `timeout` (at least 1 s); when it fails, the lookup is asked
/// again on a new client, whose new connections only count once a broker has answered them.
/// Without this, a runtime starting while one of three brokers stalls failed to start
/// ("fetching topic metadata: OperationTimedOut") though the cluster could serve it.
async fn partition_count(
    admin: &mut Arc<AdminClient<TracingContext>>,
    config: &Config,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, Error> {
    let deadline = Instant::now() + timeout;
    let attempt = (timeout / 3).max(Duration::from_secs(1));
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let error = match partition_count_once(admin, topic, attempt.min(left)).await {
            Ok(found) => return Ok(found),
            Err(e) => e,
        };
        if deadline.saturating_duration_since(Instant::now()) < Duration::from_millis(500) {
            return Err(error);
        }
        tracing::warn!(topic, %error, "topic metadata lookup failed; asking again on a new connection");
        let fresh = Arc::new(new_admin(config)?);
        let stale = std::mem::replace(admin, fresh);
        // Dropping a client waits for its broker threads: not on this task.
        std::thread::spawn(move || drop(stale));
    }
}

fn new_admin(config: &Config) -> Result<AdminClient<TracingContext>, Error> {
    admin_config(config)
        .create_with_context(TracingContext)
        .map_err(Error::kafka("creating the admin client"))
}

/// One metadata request for `topic`, within `timeout`.
async fn partition_count_once(
    admin: &Arc<AdminClient<TracingContext>>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, Error> {
    let admin = Arc::clone(admin);
    let topic = topic.to_owned();
    // Metadata calls block; they are few and only at start-up.
    tokio::task::spawn_blocking(move || {
        let md = admin
            .inner()
            .fetch_metadata(Some(&topic), timeout)
            .map_err(Error::kafka("fetching topic metadata"))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32))
    })
    .await
    .unwrap_or(Ok(None))
}

/// Checks (and maybe creates) every topic; returns the partition count of each.
pub(crate) async fn provision(
    config: &Config,
    topology: &Topology,
    creator: &TopicCreator,
) -> Result<HashMap<String, i32>, Error> {
    let timeout = config.provisioning.timeout;
    let mut admin: Arc<AdminClient<TracingContext>> = Arc::new(new_admin(config)?);

    let mut counts = HashMap::new();
    let mut missing: Vec<(String, i32)> = Vec::new();
    let lookups: Vec<(String, Option<String>)> = topology
        .sources()
        .iter()
        .map(|s| (s.topic.clone(), None))
        .chain(
            topology
                .side_topics()
                .into_iter()
                .map(|(t, src)| (t.to_owned(), Some(src.to_owned()))),
        )
        .collect();
    for (topic, source) in lookups {
        let found = partition_count(&mut admin, config, &topic, timeout).await?;
        match (found, source) {
            (Some(n), _) => {
                counts.insert(topic, n);
            }
            (None, None) => return Err(Error::SourceTopicMissing(topic)),
            (None, Some(src)) => {
                let n = counts.get(&src).copied().unwrap_or(1);
                missing.push((topic, n));
            }
        }
    }
    // A key-order log with fewer partitions than its source (the source grew) would leave the
    // extra partitions' tasks failing to open their log partition and restarting for ever:
    // refuse to start instead, saying what to do.
    for source in topology.sources() {
        let (Some(log), Some(&needs)) = (&source.key_order, counts.get(&source.topic)) else {
            continue;
        };
        if let Some(&has) = counts.get(log) {
            if has < needs {
                return Err(Error::KeyOrderLogTooSmall {
                    log: log.clone(),
                    has,
                    source_topic: source.topic.clone(),
                    needs,
                });
            }
        }
    }
    if missing.is_empty() {
        return Ok(counts);
    }
    if !config.provisioning.auto_create {
        return Err(Error::MissingTopics(
            missing.into_iter().map(|(t, _)| t).collect(),
        ));
    }
    for (topic, partitions) in &missing {
        tracing::info!(topic, partitions, "creating missing topic");
        match creator {
            TopicCreator::Embedded(cluster) => {
                cluster
                    .create_topic(topic, *partitions)
                    .map_err(|e| Error::TopicCreation {
                        topic: topic.clone(),
                        reason: e.to_string(),
                    })?;
            }
            TopicCreator::Admin => {
                let new = NewTopic::new(
                    topic,
                    *partitions,
                    TopicReplication::Fixed(config.provisioning.replication_factor),
                );
                let opts = AdminOptions::new()
                    .operation_timeout(Some(timeout))
                    .request_timeout(Some(timeout));
                let results =
                    admin
                        .create_topics([&new], &opts)
                        .await
                        .map_err(|e| Error::TopicCreation {
                            topic: topic.clone(),
                            reason: e.to_string(),
                        })?;
                for result in results {
                    match result {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            return Err(Error::TopicCreation {
                                topic: name,
                                reason: code.to_string(),
                            })
                        }
                    }
                }
            }
        }
    }
    // Wait until the broker's metadata shows the new topics, so the consumers do not start
    // with an unknown-topic subscription.
    let deadline = Instant::now() + timeout;
    for (topic, partitions) in missing {
        loop {
            let found = partition_count(&mut admin, config, &topic, Duration::from_secs(2)).await?;
            if let Some(n) = found {
                counts.insert(topic, n);
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::TopicCreation {
                    topic,
                    reason: format!(
                        "created with {partitions} partitions but not visible in metadata"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(counts)
}

/// `keep_key_order` off: fails if a key-order log this runtime used before still holds events
/// past its committed position. Turning the option off then would leave its held records
/// unread for ever (lost, though their source offsets are committed), and a `head` in it would
/// wait for a release no tier writes once the option is back on. A log that does not exist, or
/// is read to its end, is fine.
///
/// Run by the runtime at start, not by `sidetrack topology` (which looks, and may create).
pub(crate) async fn key_order_logs_done(config: &Config, topology: &Topology) -> Result<(), Error> {
    if config.retry.keep_key_order {
        return Ok(());
    }
    let timeout = config.provisioning.timeout;
    // Which logs exist: the same retried lookup as the other topics (one stalled broker must
    // not fail the start), and usually none does, so nothing more is asked.
    let mut admin = Arc::new(new_admin(config)?);
    let mut logs = Vec::new();
    for source in topology.sources() {
        let log = crate::retry::key_order_topic(&source.topic, topology.group());
        if let Some(partitions) = partition_count(&mut admin, config, &log, timeout).await? {
            logs.push((log, partitions));
        }
    }
    // Dropping a client waits for its broker threads: not on this task.
    std::thread::spawn(move || drop(admin));
    if logs.is_empty() {
        return Ok(());
    }
    let client = consumer_config(config, &topology.key_order_group(), true);
    // One client, on a blocking thread (its calls block, and dropping it waits for its
    // threads); only at start-up.
    let left = tokio::task::spawn_blocking(move || -> Result<Option<(String, i64)>, Error> {
        let consumer: BaseConsumer = client
            .create()
            .map_err(Error::kafka("creating a key-order log reader"))?;
        for (log, partitions) in logs {
            let mut ask = TopicPartitionList::new();
            for p in 0..partitions {
                ask.add_partition(&log, p);
            }
            // No answer (a broker that knows no member-less group): nothing committed.
            let committed = consumer.committed_offsets(ask, timeout).ok();
            let mut events = 0;
            for p in 0..partitions {
                let (low, high) = consumer
                    .fetch_watermarks(&log, p, timeout)
                    .map_err(Error::kafka("reading the key-order log's end"))?;
                let at = committed
                    .as_ref()
                    .and_then(|c| c.find_partition(&log, p))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(low)
                    .max(low);
                events += (high - at).max(0);
            }
            if events > 0 {
                return Ok(Some((log, events)));
            }
        }
        Ok(None)
    })
    .await
    // The blocking task only panics if librdkafka does: count nothing left rather than
    // refuse to start for it.
    .unwrap_or(Ok(None))?;
    match left {
        Some((log, events)) => Err(Error::KeyOrderLogNotDone { log, events }),
        None => Ok(()),
    }
}

/// One topic of a runtime's topology, as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStatus {
    /// Topic name.
    pub name: String,
    /// Partition count, `None` if the topic does not exist.
    pub partitions: Option<i32>,
    /// Whether this call created it.
    pub created: bool,
}

/// Checks every topic the runtime for `config` would use (sources, retry tiers, DLQs), in
/// topology order. With `create`, missing retry and dead-letter topics are created as the
/// runtime does at start (source partition count, `provisioning.replication_factor`).
pub async fn check_topics(config: &Config, create: bool) -> Result<Vec<TopicStatus>, Error> {
    config.validate()?;
    let policy = config.retry.policy()?;
    let topology = Topology::new(config, &policy)?;
    let mut admin: Arc<AdminClient<TracingContext>> = Arc::new(new_admin(config)?);
    let names: Vec<String> = topology
        .sources()
        .iter()
        .flat_map(|s| {
            std::iter::once(s.topic.clone())
                .chain(s.retry.iter().map(|t| t.name.clone()))
                .chain(std::iter::once(s.dead_letter.clone()))
                .chain(s.key_order.clone())
        })
        .collect();
    let mut before = Vec::with_capacity(names.len());
    for name in &names {
        before.push(partition_count(&mut admin, config, name, config.provisioning.timeout).await?);
    }
    drop(admin);
    let after = if create && before.iter().any(Option::is_none) {
        let mut c = config.clone();
        c.provisioning.auto_create = true;
        Some(provision(&c, &topology, &TopicCreator::Admin).await?)
    } else {
        None
    };
    Ok(names
        .into_iter()
        .zip(before)
        .map(|(name, was)| {
            let now = after.as_ref().and_then(|a| a.get(&name).copied()).or(was);
            TopicStatus {
                created: was.is_none() && now.is_some(),
                partitions: now,
                name,
            }
        })
        .collect())
}
