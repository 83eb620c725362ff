//! Reading records back from a topic (the DLQ, mostly): a bounded scan from a start position to
//! the end offsets seen when the scan began, and a view of a dead-letter record that understands
//! sidetrack's envelope and Spring Kafka's `kafka_dlt-*` headers.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

use crate::error::Error;
use crate::handler::Header;
use crate::retry::{Envelope, EnvelopeError};

/// A record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Timestamp, ms since the epoch (for a DLQ record: when it was dead-lettered).
    pub timestamp: Option<i64>,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Payload bytes.
    pub payload: Option<Vec<u8>>,
    /// All headers, envelope included, in order.
    pub headers: Vec<Header>,
}

/// What a dead-letter record says about where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// A sidetrack envelope.
    Sidetrack(Envelope),
    /// Spring Kafka's `kafka_dlt-*` headers.
    Spring(SpringDlt),
    /// Neither (the reason says why a sidetrack envelope could not be read).
    Unknown(EnvelopeError),
}

/// The `kafka_dlt-*` headers Spring Kafka's `DeadLetterPublishingRecoverer` writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpringDlt {
    /// `kafka_dlt-original-topic`.
    pub original_topic: Option<String>,
    /// `kafka_dlt-original-partition`.
    pub original_partition: Option<i32>,
    /// `kafka_dlt-original-offset`.
    pub original_offset: Option<i64>,
    /// `kafka_dlt-original-timestamp`.
    pub original_timestamp: Option<i64>,
    /// `kafka_dlt-original-consumer-group`.
    pub group: Option<String>,
    /// `kafka_dlt-exception-fqcn`.
    pub exception: Option<String>,
    /// `kafka_dlt-exception-message`.
    pub message: Option<String>,
}

impl Record {
    /// The sidetrack envelope, and the user's headers before it.
    pub fn envelope(&self) -> Result<(&[Header], Envelope), EnvelopeError> {
        Envelope::split(&self.headers).map(|(n, e)| (&self.headers[..n], e))
    }

    /// The value of the last header named `key`, as text (envelope headers come last).
    pub fn header_str(&self, key: &str) -> Option<&str> {
        self.header_bytes(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn header_bytes(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.is(key))
            .and_then(|h| h.value.as_deref())
    }

    /// Where the record came from: a sidetrack envelope, Spring's headers, or neither.
    pub fn provenance(&self) -> Provenance {
        match Envelope::split(&self.headers) {
            Ok((_, e)) => Provenance::Sidetrack(e),
            Err(err) => {
                if self
                    .headers
                    .iter()
                    .any(|h| h.key.starts_with(b"kafka_dlt-"))
                {
                    Provenance::Spring(self.spring())
                } else {
                    Provenance::Unknown(err)
                }
            }
        }
    }

    /// The user's headers: before the envelope, or all headers without one (Spring's
    /// `kafka_dlt-*` headers excluded).
    pub fn user_headers(&self) -> &[Header] {
        match Envelope::split(&self.headers) {
            Ok((n, _)) => &self.headers[..n],
            Err(_) => &self.headers,
        }
    }

    fn spring(&self) -> SpringDlt {
        // Spring writes numbers as big-endian binary; accept decimal text too.
        let int = |k: &str| -> Option<i64> {
            let v = self.header_bytes(k)?;
            match v.len() {
                4 => Some(i32::from_be_bytes(v.try_into().ok()?) as i64),
                8 => Some(i64::from_be_bytes(v.try_into().ok()?)),
                _ => std::str::from_utf8(v).ok()?.trim().parse().ok(),
            }
        };
        let text = |k: &str| {
            self.header_bytes(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        SpringDlt {
            original_topic: text("kafka_dlt-original-topic"),
            original_partition: int("kafka_dlt-original-partition").map(|p| p as i32),
            original_offset: int("kafka_dlt-original-offset"),
            original_timestamp: int("kafka_dlt-original-timestamp"),
            group: text("kafka_dlt-original-consumer-group"),
            exception: text("kafka_dlt-exception-fqcn"),
            message: text("kafka_dlt-exception-message"),
        }
    }
}

/// Where a scan starts in each partition.
#[derive(Debug, Clone)]
pub enum StartAt {
    /// The first retained offset.
    Beginning,
    /// The given offset per partition; partitions missing from the map are not read.
    Offsets(HashMap<i32, i64>),
    /// The first offset whose timestamp is at or after this time (ms since the epoch), as far
    /// as the broker can tell; where it cannot, the beginning. Filter by time as well.
    Time(i64),
}

/// Reads `topic` from `start` up to the end offsets seen when the scan begins, calling `f` for
/// each record in partition order. `f` may stop the scan early. Blocking.
///
/// `config` must carry `bootstrap.servers` (and any security settings); a `group.id` is only
/// used to label the connection, nothing is committed. Returns the end offset of each partition
/// as seen at the start.
pub fn scan(
    config: &ClientConfig,
    topic: &str,
    start: &StartAt,
    timeout: Duration,
    mut f: impl FnMut(Record) -> ControlFlow<()>,
) -> Result<HashMap<i32, i64>, Error> {
    let mut config = config.clone();
    if config.get("group.id").is_none() {
        config.set("group.id", "sidetrack-reader");
    }
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = config.create().map_err(Error::kafka("creating a reader"))?;
    let partitions = partitions_of(&consumer, topic, timeout)?;
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    let times: Option<HashMap<i32, i64>> = match start {
        StartAt::Time(ms) => {
            let mut q = TopicPartitionList::new();
            for p in &partitions {
                q.add_partition_offset(topic, *p, Offset::Offset(*ms))
                    .map_err(Error::kafka("building a time query"))?;
            }
            let found = consumer
                .offsets_for_times(q, timeout)
                .map_err(Error::kafka("looking up offsets by time"))?;
            let map = found
                .elements()
                .iter()
                .map(|e| {
                    let o = match e.offset() {
                        Offset::Offset(o) => o,
                        // No offset found (or a broker that cannot look offsets up by time,
                        // like the embedded one): read from the start; callers filter by time.
                        _ => -1,
                    };
                    (e.partition(), o)
                })
                .collect();
            drop(found);
            Some(map)
        }
        _ => None,
    };
    let mut pending = std::collections::HashSet::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(Error::kafka("reading watermarks"))?;
        ends.insert(*p, high);
        let from = match (start, &times) {
            (StartAt::Offsets(m), _) => m.get(p).copied().unwrap_or(high).max(low),
            (StartAt::Time(_), Some(t)) => t.get(p).copied().unwrap_or(low).max(low),
            // ^ a -1 from the lookup becomes `low` here.
            _ => low,
        };
        if from < high {
            pending.insert(*p);
            tpl.add_partition_offset(topic, *p, Offset::Offset(from))
                .map_err(Error::kafka("building the assignment"))?;
        }
    }
    if pending.is_empty() {
        return Ok(ends);
    }
    consumer
        .assign(&tpl)
        .map_err(Error::kafka("assigning partitions"))?;
    drop(tpl);
    let mut last_progress = std::time::Instant::now();
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = std::time::Instant::now();
                let end = ends.get(&m.partition()).copied().unwrap_or(0);
                if m.offset() + 1 >= end {
                    pending.remove(&m.partition());
                }
                if m.offset() >= end {
                    continue;
                }
                let record = Record {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: crate::handler::headers_of(&m),
                };
                if f(record).is_break() {
                    break;
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "reader error"),
            None => {}
        }
        if last_progress.elapsed() > timeout {
            return Err(Error::Kafka {
                context: "reading records: no progress",
                source: rdkafka::error::KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ),
            });
        }
    }
    Ok(ends)
}

/// Partition ids of `topic`; `Error::SourceTopicMissing` if the broker does not know it.
fn partitions_of(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, Error> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(Error::kafka("reading metadata"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| Error::SourceTopicMissing(topic.to_owned()))?;
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: Vec<Header>) -> Record {
        Record {
            topic: "t.dlq".into(),
            partition: 0,
            offset: 0,
            timestamp: None,
            key: None,
            payload: None,
            headers,
        }
    }

    #[test]
    fn spring_headers_are_read_binary_or_text() {
        let r = record(vec![
            Header::new("app", b"x".to_vec()),
            Header::new("kafka_dlt-original-topic", b"orders".to_vec()),
            Header::new("kafka_dlt-original-partition", 3i32.to_be_bytes().to_vec()),
            Header::new("kafka_dlt-original-offset", 42i64.to_be_bytes().to_vec()),
            Header::new("kafka_dlt-original-timestamp", b"1700000000000".to_vec()),
            Header::new("kafka_dlt-exception-message", b"boom".to_vec()),
        ]);
        match r.provenance() {
            Provenance::Spring(s) => {
                assert_eq!(s.original_topic.as_deref(), Some("orders"));
                assert_eq!(s.original_partition, Some(3));
                assert_eq!(s.original_offset, Some(42));
                assert_eq!(s.original_timestamp, Some(1_700_000_000_000));
                assert_eq!(s.message.as_deref(), Some("boom"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plain_record_has_unknown_provenance() {
        let r = record(vec![Header::new("app", b"x".to_vec())]);
        assert_eq!(r.provenance(), Provenance::Unknown(EnvelopeError::Missing));
        assert_eq!(r.user_headers().len(), 1);
    }
}
