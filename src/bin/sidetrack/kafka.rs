//! Broker access shared by the subcommands.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sidetrack::dead_letter::{scan, Record, StartAt};

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
            let mut tpl = TopicPartitionList::new();
            for p in parts {
                tpl.add_partition(&topic, p);
            }
            let got = match c.committed_offsets(tpl, timeout) {
                Ok(got) => got,
                // Apache Kafka answers an unknown group with no offsets; kfake (franz-go's
                // test broker) answers GROUP_ID_NOT_FOUND. Both mean nothing was committed.
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
        })
        .await
    }

    /// Commits `offsets` (next offset to read, per partition) for `group` on `topic`.
    pub async fn commit(
        &self,
        group: &str,
        topic: &str,
        offsets: &HashMap<i32, i64>,
    ) -> Result<(), Failure> {
        let mut config = self.clone_config();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let topic = topic.to_owned();
        let offsets = offsets.clone();
        blocking(move || {
            let c: BaseConsumer = config.create().map_err(other)?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in offsets {
                tpl.add_partition_offset(&topic, p, Offset::Offset(o))
                    .map_err(other)?;
            }
            c.commit(&tpl, CommitMode::Sync)
                .map_err(|e| Failure::Other(format!("saving replay progress: {e}")))
        })
        .await
    }

    /// Scans `topic` from `start`, calling `f` per record, until the end offsets seen at the
    /// start (or `f` breaks).
    pub async fn scan<F>(
        &self,
        topic: &str,
        start: StartAt,
        f: F,
    ) -> Result<HashMap<i32, i64>, Failure>
    where
        F: FnMut(Record) -> ControlFlow<()> + Send + 'static,
    {
        self.partitions(topic).await?;
        let config = self.clone_config();
        let (topic, timeout) = (topic.to_owned(), self.timeout);
        blocking(move || scan(&config, &topic, &start, timeout, f).map_err(Failure::from)).await
    }
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
