//! The key-order log of one source partition, as Kafka sees it: appending an event (acked by
//! all in-sync replicas, on the shared hand-off producer) and reading the partition in order
//! from its committed position, storing that position only past events that are done.
//!
//! Separate from the state model (pure) and from the record loops (which decide *when* to
//! append or read): this file is the only one that knows the log is a Kafka partition, read by
//! an assign-only consumer of its own group (`{group}.key-order`, which never has members, so
//! its commits are a plain position store and never take part in a rebalance).

use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::Config;
use crate::error::Error;
use crate::runtime::client::{consumer_config, forward_error, forward_log};

use super::wire::{decode, DecodeError, Event};

/// The reader's client context: librdkafka's logs and errors go to `tracing`, like every
/// other client of the runtime; nothing else (no rebalance: the reader is assign-only).
pub(crate) struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason);
    }
}

impl ConsumerContext for LogContext {}

/// One record read from the log.
pub(crate) struct Read {
    /// Its offset in the log partition.
    pub(crate) offset: i64,
    /// The source record's key (`None`: a record without a key, which no sidetrack writes).
    pub(crate) key: Option<Vec<u8>>,
    /// The event, or why its value is not one.
    pub(crate) event: Result<Event, DecodeError>,
}

/// The reader of one log partition, from its committed position.
pub(crate) struct LogReader {
    consumer: StreamConsumer<LogContext>,
    topic: String,
    partition: i32,
    /// The log's end when the partition was assigned: the source takes no record until the
    /// reader has passed it ("read first").
    end_at_start: i64,
    /// Whether the reader passed `end_at_start`.
    caught_up: bool,
}

impl LogReader {
    /// Opens the log partition `partition` of `topic` for reading from the group's committed
    /// position (the beginning if none), and notes its end as of now.
    ///
    /// # Errors
    /// The consumer could not be created, or the log's end could not be read within
    /// `timeout` (the caller's task fails and is restarted: nothing may be taken before the
    /// log is known).
    pub(crate) fn open(
        config: &Config,
        group: &str,
        topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let mut cc = consumer_config(config, group, true);
        // Assign-only: no subscription, no rebalance; the position is committed like the
        // runtime's own (stored after a durable outcome, auto-committed).
        cc.set("enable.partition.eof", "false");
        let consumer: StreamConsumer<LogContext> = cc
            .create_with_context(LogContext)
            .map_err(Error::kafka("creating the key-order log reader"))?;
        // The group's committed position, asked for explicitly: an assign-only consumer with
        // `Offset::Stored` fails for ever on a broker that answers a group without members as
        // unknown (kfake), where Kafka answers "no offset". No position: the log's beginning.
        let mut ask = TopicPartitionList::new();
        ask.add_partition(topic, partition);
        let start = consumer
            .committed_offsets(ask, timeout)
            .ok()
            .and_then(|tpl| {
                tpl.find_partition(topic, partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) if o >= 0 => Some(o),
                        _ => None,
                    })
            })
            .map_or(Offset::Beginning, Offset::Offset);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, start)
            .map_err(Error::kafka("assigning the key-order log"))?;
        consumer
            .assign(&tpl)
            .map_err(Error::kafka("assigning the key-order log"))?;
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(Error::kafka("reading the key-order log's end"))?;
        // Caught up at once when nothing is left to read from where the reader starts. Decided
        // here, from the offsets asked for, not later from the consumer's position: that is
        // unknown until its first fetch, and a log with nothing past the committed position
        // delivers no record that could say so — the partition would wait for an event that
        // never comes (seen: a partition that took no record after a restart, under load).
        // (A committed position below the log's start, after retention, reads from its start.)
        let from = match start {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        tracing::debug!(
            topic,
            partition,
            ?start,
            low,
            end = high,
            "key-order log opened"
        );
        Ok(LogReader {
            consumer,
            topic: topic.to_owned(),
            partition,
            end_at_start: high,
            caught_up: from >= high,
        })
    }

    /// Whether everything in the log when it was opened has been read (or the log was empty):
    /// until then the source partition takes no record.
    pub(crate) fn caught_up(&self) -> bool {
        self.caught_up
    }

    /// Marks the reader caught up if the log holds nothing past `position` (the next offset it
    /// would read), e.g. when its committed position is already the end.
    pub(crate) fn check_position(&mut self) {
        if self.caught_up {
            return;
        }
        if let Ok(tpl) = self.consumer.position() {
            let at = tpl
                .find_partition(&self.topic, self.partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            if at.is_some_and(|o| o >= self.end_at_start) {
                self.caught_up = true;
            }
        }
    }

    /// The next record of the log partition (waits for one).
    pub(crate) async fn next(&mut self) -> Result<Read, KafkaError> {
        let m = self.consumer.recv().await?;
        let offset = m.offset();
        if offset + 1 >= self.end_at_start {
            self.caught_up = true;
        }
        Ok(Read {
            offset,
            key: m.key().map(<[u8]>::to_vec),
            event: m.payload().map_or(Err(DecodeError::NotKeyOrder), decode),
        })
    }

    /// Stores `offset` as done (with everything before it): committed one past it.
    pub(crate) fn store(&self, offset: i64) {
        if let Err(e) = self
            .consumer
            .store_offset(&self.topic, self.partition, offset)
        {
            tracing::debug!(topic = %self.topic, partition = self.partition, offset, error = %e, "key-order log position not stored");
        }
    }

    /// Commits the stored position now (revoke, shutdown); errors are logged, not returned:
    /// an uncommitted position only means events are read again.
    pub(crate) fn commit(&self) {
        if let Err(e) = self
            .consumer
            .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        {
            tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "key-order log position not committed");
        }
    }
}

/// Appends `event` for `key` to partition `partition` of the log `topic` and waits for the
/// broker's acknowledgement (one attempt: the caller retries with its own backoff and stop
/// signals, as it does for hand-offs). Returns the event's offset in the log.
pub(crate) async fn append<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    (topic, partition): (&str, i32),
    key: &[u8],
    event: &Event,
    timeout: Duration,
) -> Result<i64, KafkaError> {
    let value = event.encode();
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(&value);
    producer
        .send(record, Timeout::After(timeout))
        .await
        .map(|d| d.offset)
        .map_err(|(e, _)| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_order::wire::Ended;

    /// "Read first" ends by itself when nothing is past the committed position: a reader that
    /// starts at the log's end is caught up as soon as it is open, before any fetch. (It used to
    /// wait for the consumer's position, unknown until a fetch, and a partition with nothing
    /// left in its log then took no record until an unrelated event arrived.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_at_the_logs_end_is_caught_up_when_opened() {
        let cluster = crate::mocking::EmbeddedCluster::start().unwrap();
        let topic = "t.g.key-order";
        cluster.create_topic(topic, 1).unwrap();
        let producer = cluster.producer().unwrap();
        let timeout = Duration::from_secs(10);
        for head in 0..3 {
            let event = Event::Release {
                head,
                ended: Ended::Handled,
            };
            append(&producer, (topic, 0), b"k", &event, timeout)
                .await
                .unwrap();
        }
        let config = Config {
            brokers: cluster.bootstrap_servers().to_owned(),
            ..Config::default()
        };
        let open = |config: &Config| {
            let config = config.clone();
            tokio::task::spawn_blocking(move || {
                LogReader::open(&config, "g.key-order", topic, 0, Duration::from_secs(10))
            })
        };

        // No committed position: three events to read before the source may take a record.
        let mut reader = open(&config).await.unwrap().unwrap();
        assert!(!reader.caught_up(), "three events are left to read");
        for expected in 0..3 {
            let read = tokio::time::timeout(timeout, reader.next())
                .await
                .expect("an event within 10 s")
                .unwrap();
            assert_eq!(read.offset, expected);
        }
        assert!(reader.caught_up(), "the last event was read");
        reader.store(2);
        reader.commit();
        drop(reader);

        // Committed at the end: caught up at once, with no record ever coming to say so.
        let reader = open(&config).await.unwrap().unwrap();
        assert!(
            reader.caught_up(),
            "a reader whose committed position is the log's end has nothing to read first"
        );
    }
}
