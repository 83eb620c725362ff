//! Reading records back from a topic (the DLQ, mostly): a bounded scan from a start position to
//! the end offsets seen when the scan began, and a view of a dead-letter record that understands
//! sidetrack's envelope and Spring Kafka's `kafka_dlt-*` headers.
//!
//! The library's, not the CLI's, because the runtime's tests, the test kit
//! ([`read_all`](crate::mocking::read_all)) and every `sidetrack dlq` command read dead letters
//! the same way. Two rules make a scan safe to resume from:
//! - **Bounded.** A scan stops at the end offsets taken when it began, so a DLQ that keeps
//!   growing (a replay whose records fail again) still ends.
//! - **Committed only.** It reads with `isolation.level=read_committed` up to each partition's
//!   last stable offset; records of an open transaction are not skipped but *held back*
//!   ([`Scanned::open`]), and [`Scanned::reached`] never passes them, so progress saved there
//!   cannot jump over a record that commits later.
//!
//! A [`Record`] holds any bytes a producer wrote: its [`Provenance`] is sidetrack's envelope,
//! Spring's headers, or neither (with why), and nothing here panics on what it reads.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

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
    /// `kafka_dlt-exception-fqcn`: the exception the error handler got, which a listener
    /// container wraps (`ListenerExecutionFailedException`).
    pub exception: Option<String>,
    /// `kafka_dlt-exception-cause-fqcn`: the root cause's class (recent Spring Kafka versions).
    pub cause: Option<String>,
    /// `kafka_dlt-exception-message`: Spring joins the exception's and the root cause's
    /// messages with `; `.
    pub message: Option<String>,
    /// `kafka_dlt-exception-stacktrace`.
    pub stacktrace: Option<String>,
    /// `kafka_dlt-original-timestamp-type` (`CreateTime` or `LogAppendTime`).
    pub original_timestamp_type: Option<String>,
}

impl SpringDlt {
    /// The class that failed: the root cause when Spring recorded one (a listener container's
    /// wrapper says only that a listener failed), else the exception.
    pub fn failed_class(&self) -> Option<&str> {
        self.cause.as_deref().or(self.exception.as_deref())
    }
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

    /// The value of the last header named `key`: the last, because an envelope comes after the
    /// user's headers and a user header may carry the same name.
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
    /// `kafka_dlt-*` headers included: Spring appends them after the original's headers, and
    /// they are the user's wherever a record carries a sidetrack envelope as well).
    pub fn user_headers(&self) -> &[Header] {
        match Envelope::split(&self.headers) {
            Ok((n, _)) => &self.headers[..n],
            Err(_) => &self.headers,
        }
    }

    /// Spring Kafka's `kafka_dlt-*` headers, read field by field: each one missing or unreadable
    /// (Spring writes numbers as big-endian binary) is `None`, never an error, since a partial
    /// record of where it came from is still worth showing.
    fn spring(&self) -> SpringDlt {
        let int = |k: &str| self.header_bytes(k).and_then(spring_int);
        let text = |k: &str| {
            self.header_bytes(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        SpringDlt {
            original_topic: text("kafka_dlt-original-topic"),
            // Out of range is unreadable, not wrapped into another partition number.
            original_partition: int("kafka_dlt-original-partition")
                .and_then(|p| i32::try_from(p).ok()),
            original_offset: int("kafka_dlt-original-offset"),
            original_timestamp: int("kafka_dlt-original-timestamp"),
            group: text("kafka_dlt-original-consumer-group"),
            // A key that failed to deserialize (ErrorHandlingDeserializer) is recorded under
            // `kafka_dlt-key-exception-*` instead: without it the record would show no error.
            exception: text("kafka_dlt-exception-fqcn")
                .or_else(|| text("kafka_dlt-key-exception-fqcn")),
            cause: text("kafka_dlt-exception-cause-fqcn"),
            message: text("kafka_dlt-exception-message")
                .or_else(|| text("kafka_dlt-key-exception-message")),
            stacktrace: text("kafka_dlt-exception-stacktrace")
                .or_else(|| text("kafka_dlt-key-exception-stacktrace")),
            original_timestamp_type: text("kafka_dlt-original-timestamp-type"),
        }
    }
}

/// A number in a `kafka_dlt-*` header: Spring writes big-endian binary (4 bytes for the
/// partition, 8 for offsets and times); other producers write decimal text. Text is tried
/// first, even for 4 or 8 bytes: binary bytes that read as decimal text (digits, spaces, a
/// sign: every byte 0x09 or more) would be a partition above 150 million or an offset above
/// 6·10^17, never a real one. Anything else is unreadable (`None`).
fn spring_int(v: &[u8]) -> Option<i64> {
    if let Some(n) = std::str::from_utf8(v)
        .ok()
        .and_then(|t| t.trim().parse().ok())
    {
        return Some(n);
    }
    match v.len() {
        4 => Some(i64::from(i32::from_be_bytes(v.try_into().ok()?))),
        8 => Some(i64::from_be_bytes(v.try_into().ok()?)),
        _ => None,
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

/// Reads the committed records of `topic` from `start` up to the last stable offsets seen when
/// the scan begins; see [`scan_report`], of which this returns the per-partition progress.
/// Blocking.
pub fn scan(
    config: &ClientConfig,
    topic: &str,
    start: &StartAt,
    timeout: Duration,
    f: impl FnMut(Record) -> ControlFlow<()>,
) -> Result<HashMap<i32, i64>, Error> {
    scan_report(config, topic, start, timeout, f).map(|s| s.reached)
}

/// What a [`scan_report`] read, and what it could not read yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Scanned {
    /// Per partition, the offset before which every record from the start position on was
    /// passed to `f` (see [`scan_report`]). Progress may be saved there, never further.
    pub reached: HashMap<i32, i64>,
    /// Partitions whose end was held back by a transaction still open when the scan began
    /// (absent: nothing held back).
    pub open: HashMap<i32, OpenTransaction>,
}

/// A partition whose readable end (its last stable offset) stops short of its high watermark:
/// a transaction that has neither committed nor aborted holds the offsets from
/// `stable_end` on. A read-committed reader sees none of them, committed or not, until it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenTransaction {
    /// The last stable offset: the first offset of the oldest open transaction, where reading
    /// stopped.
    pub stable_end: i64,
    /// The high watermark, read just before `stable_end`: the partition's end, open
    /// transactions included.
    pub high_watermark: i64,
}

impl OpenTransaction {
    /// Offsets held back (records of the open transaction, later records and their markers).
    pub fn held(&self) -> i64 {
        self.high_watermark.saturating_sub(self.stable_end)
    }
}

/// Reads `topic` from `start` up to the end offsets seen when the scan begins, calling `f` for
/// each record, in offset order within a partition (partitions interleave). `f` may stop the
/// scan early. Blocking.
///
/// Reads committed data only (`isolation.level=read_committed`, whatever `config` says):
/// records of aborted transactions are never passed to `f`, nor are transaction markers
/// (control records, which take an offset each). The end of a partition is its *last stable
/// offset*: the high watermark, unless a transaction is still open there, in which case the
/// first offset of that transaction; [`Scanned::open`] says where and how many offsets that
/// held back. A partition is done when the reader's position reaches its end, not when a
/// record at the end offset minus one arrives: that offset is a transaction marker whenever
/// the last write was transactional, and is never delivered.
///
/// `config` must carry `bootstrap.servers` (and any security settings); a `group.id` is only
/// used to label the connection, nothing is committed.
///
/// [`Scanned::reached`] is, per partition, how far the scan got: the offset before which every
/// record from the start position on was passed to `f`. That is the end offset seen when the
/// scan began (never the end as it is later: records written during the scan were not read),
/// or, when `f` stopped the scan, the offset after the last record passed to `f` in that
/// partition (the start position for a partition it did not reach). Saving progress at these
/// offsets, and never at watermarks read afterwards, is what keeps records written during a
/// scan from being skipped.
pub fn scan_report(
    config: &ClientConfig,
    topic: &str,
    start: &StartAt,
    timeout: Duration,
    mut f: impl FnMut(Record) -> ControlFlow<()>,
) -> Result<Scanned, Error> {
    let mut config = config.clone();
    if config.get("group.id").is_none() {
        config.set("group.id", "sidetrack-reader");
    }
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    // The high watermark, open transactions included: read by a client of its own, since the
    // isolation level is per client and also decides what the reader's own watermark query
    // answers (the last stable offset under read_committed).
    let mut uncommitted = config.clone();
    uncommitted.set("isolation.level", "read_uncommitted");
    // A DLQ reader must never show, or replay, what a transaction aborted.
    config.set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create().map_err(Error::kafka("creating a reader"))?;
    let marks: BaseConsumer = uncommitted
        .create()
        .map_err(Error::kafka("creating a reader"))?;
    let partitions = partitions_of(&consumer, topic, timeout)?;
    let mut ends = HashMap::new();
    let mut open = HashMap::new();
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
    // How far each partition was read: every record before it was passed to `f`.
    let mut reached = HashMap::new();
    for p in &partitions {
        if let StartAt::Offsets(m) = start {
            // Not asked for (e.g. added since the caller listed the partitions): neither read
            // nor reported, so a caller saving progress from the result does not pass over
            // records it never saw.
            if !m.contains_key(p) {
                continue;
            }
        }
        // The high watermark first, then the last stable offset: a stable offset below a high
        // watermark read earlier is an open transaction for sure (the two only grow), never a
        // record that arrived between the two queries.
        let (_, hwm) = marks
            .fetch_watermarks(topic, *p, timeout)
            .map_err(Error::kafka("reading watermarks"))?;
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(Error::kafka("reading watermarks"))?;
        if high < hwm {
            open.insert(
                *p,
                OpenTransaction {
                    stable_end: high,
                    high_watermark: hwm,
                },
            );
        }
        ends.insert(*p, high);
        let from = match (start, &times) {
            (StartAt::Offsets(m), _) => m.get(p).copied().unwrap_or(low).max(low),
            (StartAt::Time(_), Some(t)) => t.get(p).copied().unwrap_or(low).max(low),
            // ^ a -1 from the lookup becomes `low` here.
            _ => low,
        };
        if from < high {
            pending.insert(*p);
            reached.insert(*p, from);
            tpl.add_partition_offset(topic, *p, Offset::Offset(from))
                .map_err(Error::kafka("building the assignment"))?;
        } else {
            // Nothing to read (a start at or past the end; past it only if the partition was
            // truncated or the topic recreated, where the end is the truthful position).
            reached.insert(*p, high);
        }
    }
    drop(marks);
    if pending.is_empty() {
        return Ok(Scanned { reached, open });
    }
    consumer
        .assign(&tpl)
        .map_err(Error::kafka("assigning partitions"))?;
    drop(tpl);
    let mut last_progress = Instant::now();
    let mut checked = Instant::now();
    // The reader's position per partition when last looked at.
    let mut positions: HashMap<i32, i64> = HashMap::new();
    while !pending.is_empty() {
        let polled = consumer.poll(Duration::from_millis(200));
        let idle = polled.is_none();
        match polled {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let end = ends.get(&m.partition()).copied().unwrap_or(0);
                if m.offset().saturating_add(1) >= end {
                    pending.remove(&m.partition());
                }
                if m.offset() >= end || !reached.contains_key(&m.partition()) {
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
                let (partition, next) = (m.partition(), m.offset().saturating_add(1));
                let flow = f(record);
                reached.insert(partition, next);
                // `f` may take its time (a caller applying backpressure): that is not the
                // broker failing to make progress.
                last_progress = Instant::now();
                if flow.is_break() {
                    break;
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "reader error"),
            None => {}
        }
        // Transaction markers and aborted records are never delivered, but the consumer's
        // position moves past them as it serves them: a partition whose last offsets are such
        // is done once its position reaches the end. Looked at when the reader is idle, and
        // now and then while other partitions stream.
        if idle || checked.elapsed() >= POSITION_CHECK {
            checked = Instant::now();
            let now = consumer
                .position()
                .map_err(Error::kafka("reading the reader's position"))?;
            for e in now.elements() {
                let (p, Offset::Offset(at)) = (e.partition(), e.offset()) else {
                    continue;
                };
                if !pending.contains(&p) {
                    continue;
                }
                if positions.insert(p, at).is_none_or(|before| at > before) {
                    last_progress = Instant::now();
                }
                let end = ends.get(&p).copied().unwrap_or(0);
                if at >= end {
                    // Every record before `end` was served in order, so passed to `f`.
                    pending.remove(&p);
                    reached.insert(p, end);
                }
            }
            drop(now);
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
    Ok(Scanned { reached, open })
}

/// How often a scan looks at its reader's position while records keep arriving.
const POSITION_CHECK: Duration = Duration::from_millis(100);

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

    /// A partition missing from `StartAt::Offsets` is neither read nor reported: `dlq replay`
    /// saved progress from the result, and a DLQ partition added after it listed the
    /// partitions was reported read up to its end, so its records were never replayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_not_asked_for_are_not_reported() {
        let cluster = crate::mocking::EmbeddedCluster::start().unwrap();
        cluster.create_topic("d.dlq", 2).unwrap();
        let producer = cluster.producer().unwrap();
        for p in [0, 1, 1] {
            cluster
                .produce(&producer, "d.dlq", Some(p), None, Some(b"x"), &[])
                .await
                .unwrap();
        }
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", cluster.bootstrap_servers());
        let (reached, seen) = tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            let start = StartAt::Offsets(HashMap::from([(0, 0)]));
            let reached = scan(&config, "d.dlq", &start, Duration::from_secs(10), |r| {
                seen.push(r.partition);
                ControlFlow::Continue(())
            });
            (reached, seen)
        })
        .await
        .unwrap();
        assert_eq!(reached.unwrap(), HashMap::from([(0, 1)]));
        assert_eq!(seen, [0]);
    }

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
    fn a_spring_key_deserialization_failure_is_the_error() {
        let r = record(vec![
            Header::new("kafka_dlt-original-topic", b"orders".to_vec()),
            Header::new(
                "kafka_dlt-key-exception-fqcn",
                b"org.springframework.kafka.support.serializer.DeserializationException".to_vec(),
            ),
            Header::new(
                "kafka_dlt-key-exception-message",
                b"failed to deserialize".to_vec(),
            ),
        ]);
        match r.provenance() {
            Provenance::Spring(s) => {
                assert_eq!(
                    s.failed_class(),
                    Some("org.springframework.kafka.support.serializer.DeserializationException")
                );
                assert_eq!(s.message.as_deref(), Some("failed to deserialize"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spring_numbers_keep_their_meaning_or_are_unreadable() {
        assert_eq!(spring_int(&7i32.to_be_bytes()), Some(7));
        assert_eq!(spring_int(&(-1i32).to_be_bytes()), Some(-1));
        assert_eq!(spring_int(&42i64.to_be_bytes()), Some(42));
        // Four or eight decimal digits are text, not binary.
        assert_eq!(spring_int(b"1234"), Some(1234));
        assert_eq!(spring_int(b"12345678"), Some(12_345_678));
        assert_eq!(spring_int(b" 17 "), Some(17));
        assert_eq!(spring_int(b""), None);
        assert_eq!(spring_int(b"12x"), None);
        assert_eq!(spring_int(b"99999999999999999999"), None);
        // A partition out of i32's range is unreadable, not another partition.
        let r = record(vec![Header::new(
            "kafka_dlt-original-partition",
            b"99999999999".to_vec(),
        )]);
        match r.provenance() {
            Provenance::Spring(s) => assert_eq!(s.original_partition, None),
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        /// Spring's binary numbers and decimal text keep their value; a binary value that
        /// happens to read as decimal text (an absurd partition or offset) is the only exception.
        #[test]
        fn spring_numbers_round_trip(p in proptest::prelude::any::<i32>(), o in proptest::prelude::any::<i64>(), text in proptest::prelude::any::<bool>()) {
            let (pb, ob) = if text {
                (p.to_string().into_bytes(), o.to_string().into_bytes())
            } else {
                (p.to_be_bytes().to_vec(), o.to_be_bytes().to_vec())
            };
            let reads_as_text = |b: &[u8]| {
                std::str::from_utf8(b).ok().and_then(|t| t.trim().parse::<i64>().ok()).is_some()
            };
            proptest::prop_assume!(text || (!reads_as_text(&pb) && !reads_as_text(&ob)));
            let r = record(vec![
                Header::new("kafka_dlt-original-partition", pb),
                Header::new("kafka_dlt-original-offset", ob),
            ]);
            match r.provenance() {
                Provenance::Spring(s) => {
                    proptest::prop_assert_eq!(s.original_partition, Some(p));
                    proptest::prop_assert_eq!(s.original_offset, Some(o));
                }
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }

    #[test]
    fn plain_record_has_unknown_provenance() {
        let r = record(vec![Header::new("app", b"x".to_vec())]);
        assert_eq!(r.provenance(), Provenance::Unknown(EnvelopeError::Missing));
        assert_eq!(r.user_headers().len(), 1);
    }
}
