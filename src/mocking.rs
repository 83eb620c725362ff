//! An embedded Kafka cluster: librdkafka's in-process mock broker ([`EmbeddedCluster`]), and
//! a few helpers to produce to it and read it back.
//!
//! A module of its own, like rust-rdkafka's `mocking`, because both the runtime
//! ([`RuntimeBuilder::embedded`](crate::RuntimeBuilder::embedded)) and the test kit use it:
//! production code depends on this module, never on [`crate::testing`], which only re-exports
//! it (`sidetrack::testing::EmbeddedCluster` keeps working).

use std::ffi::{CStr, CString};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{
    BaseProducer, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::dead_letter::{scan, Record, StartAt};
use crate::error::Error;
use crate::handler::Header;
use std::ops::ControlFlow;

/// librdkafka's in-process mock Kafka cluster, listening on loopback.
///
/// Any Kafka client (this crate, `kcat`, …) can use [`EmbeddedCluster::bootstrap_servers`]
/// while it is alive. Topics are created with [`EmbeddedCluster::create_topic`] (the mock has
/// no CreateTopics API; [`RuntimeBuilder::embedded`](crate::RuntimeBuilder::embedded) makes
/// the runtime use this method). Faults can be injected per request type. The cluster keeps
/// about 5 MiB per partition. Cloning shares the same cluster; it stops when the last clone is
/// dropped.
/// # Example
///
/// A topic on the embedded cluster, a record produced to it and read back (what an
/// integration test does before pointing a runtime at it with
/// [`RuntimeBuilder::embedded`](crate::RuntimeBuilder::embedded)):
///
/// ```
/// use sidetrack::mocking::{produce, read_all, EmbeddedCluster};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), sidetrack::Error> {
/// let cluster = EmbeddedCluster::start()?;
/// cluster.create_topic("orders", 3)?;
/// let producer = cluster.producer()?;
/// let (partition, _offset) =
///     produce(&producer, "orders", Some(1), Some(b"k".as_slice()), Some(b"{}".as_slice()), &[])
///         .await?;
/// assert_eq!(partition, 1);
/// let records = read_all(cluster.bootstrap_servers(), "orders").await?;
/// assert_eq!(records.len(), 1);
/// assert_eq!(records[0].key.as_deref(), Some(b"k".as_slice()));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EmbeddedCluster {
    /// Shared by every clone: the cluster is destroyed when the last clone (and so the last
    /// `Arc`) is dropped, never while a handle can still reach it.
    inner: Arc<Inner>,
}

/// The owned mock cluster and the client handle it lives in.
struct Inner {
    /// The cluster, created by `rd_kafka_mock_cluster_new`, destroyed in `Drop` (exactly once:
    /// `Inner` is never cloned).
    mock: *mut rdsys::rd_kafka_mock_cluster_t,
    /// Its `host:port` list, copied out once (the C string belongs to the cluster).
    bootstrap: String,
    // The client handle the mock cluster belongs to; must outlive `mock`.
    _owner: BaseProducer<Quiet>,
}

// SAFETY: librdkafka's mock cluster API is thread-safe: every call locks the cluster or posts
// an operation to the mock cluster's own thread. The pointer is owned by `Inner` and destroyed
// exactly once, in `Drop`, before the owning client handle.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_mock_cluster_new and not destroyed elsewhere.
        unsafe { rdsys::rd_kafka_mock_cluster_destroy(self.mock) }
    }
}

/// Silences the owner handle, which has no brokers of its own and would warn about it.
struct Quiet;
impl ClientContext for Quiet {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
}
impl ProducerContext for Quiet {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// librdkafka's mock API answers with a response code, not a `Result`: `NO_ERROR` becomes
/// `Ok`, anything else an [`Error::Kafka`] naming what was being done.
fn mock_err(context: &'static str, code: rdsys::rd_kafka_resp_err_t) -> Result<(), Error> {
    if code == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(Error::Kafka {
            context,
            source: KafkaError::MockCluster(code.into()),
        })
    }
}

impl EmbeddedCluster {
    /// Starts a one-broker cluster.
    pub fn start() -> Result<Self, Error> {
        Self::with_brokers(1)
    }

    /// Starts a cluster of `brokers` brokers (ids 1..=brokers).
    pub fn with_brokers(brokers: i32) -> Result<Self, Error> {
        let owner: BaseProducer<Quiet> = ClientConfig::new()
            .create_with_context(Quiet)
            .map_err(Error::kafka("creating the embedded cluster's client"))?;
        // SAFETY: `owner` is a valid client handle and outlives the cluster (see Inner).
        let mock =
            unsafe { rdsys::rd_kafka_mock_cluster_new(owner.client().native_ptr(), brokers) };
        if mock.is_null() {
            return Err(Error::Kafka {
                context: "starting the embedded cluster",
                source: KafkaError::MockCluster(rdkafka::types::RDKafkaErrorCode::Fail),
            });
        }
        // SAFETY: `mock` is valid; the returned string is owned by the cluster.
        let bootstrap = unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(mock)) }
            .to_string_lossy()
            .into_owned();
        // The mock waits 3 s before the first rebalance of a group, like a real broker's
        // group.initial.rebalance.delay.ms. Tests and demos do not need that wait.
        // SAFETY: `mock` is valid.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(mock, 0) };
        Ok(EmbeddedCluster {
            inner: Arc::new(Inner {
                mock,
                bootstrap,
                _owner: owner,
            }),
        })
    }

    /// The `host:port` list to give clients.
    pub fn bootstrap_servers(&self) -> &str {
        &self.inner.bootstrap
    }

    /// Creates a topic (replication factor 1). Creating an existing topic is an error.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), Error> {
        let c_name = CString::new(name).map_err(|_| Error::TopicCreation {
            topic: name.to_owned(),
            reason: "name contains a NUL byte".to_owned(),
        })?;
        // SAFETY: valid cluster and NUL-terminated name.
        let code = unsafe {
            rdsys::rd_kafka_mock_topic_create(self.inner.mock, c_name.as_ptr(), partitions, 1)
        };
        mock_err("creating a topic on the embedded cluster", code)
    }

    /// Makes the next `errors.len()` requests of type `api` fail with these errors, in order,
    /// whichever client sends them.
    pub fn fail_requests(&self, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        // SAFETY: valid cluster; the array is read during the call only.
        unsafe {
            rdsys::rd_kafka_mock_push_request_errors_array(
                self.inner.mock,
                api as i16,
                errors.len(),
                errors.as_ptr(),
            )
        }
    }

    /// Removes errors queued by [`EmbeddedCluster::fail_requests`] for `api`.
    pub fn clear_request_errors(&self, api: RDKafkaApiKey) {
        // SAFETY: valid cluster.
        unsafe { rdsys::rd_kafka_mock_clear_request_errors(self.inner.mock, api as i16) }
    }

    /// Takes broker `id` down (-1: all brokers): connections are closed and refused.
    pub fn broker_down(&self, id: i32) -> Result<(), Error> {
        // SAFETY: valid cluster.
        mock_err("taking a broker down", unsafe {
            rdsys::rd_kafka_mock_broker_set_down(self.inner.mock, id)
        })
    }

    /// Makes broker `id` (-1: all brokers) answer every request `rtt` late (zero: at once
    /// again): a slow or stalled broker, with connections kept open.
    ///
    /// Prefer it to [`EmbeddedCluster::broker_down`] in tests that run many clients at once:
    /// taking a mock broker down closes and re-binds its listening socket, and librdkafka's
    /// mock aborts the whole process when that re-bind fails (seen on a loaded machine).
    pub fn set_broker_rtt(&self, id: i32, rtt: std::time::Duration) -> Result<(), Error> {
        let ms = i32::try_from(rtt.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: valid cluster.
        mock_err("setting a broker's round-trip time", unsafe {
            rdsys::rd_kafka_mock_broker_set_rtt(self.inner.mock, id, ms)
        })
    }

    /// Brings broker `id` back up (-1: all brokers).
    pub fn broker_up(&self, id: i32) -> Result<(), Error> {
        // SAFETY: valid cluster.
        mock_err("bringing a broker up", unsafe {
            rdsys::rd_kafka_mock_broker_set_up(self.inner.mock, id)
        })
    }

    /// A producer connected to this cluster (for test data).
    pub fn producer(&self) -> Result<FutureProducer, Error> {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap_servers())
            .set("linger.ms", "0")
            .create()
            .map_err(Error::kafka("creating a producer"))
    }

    /// Produces one record; see [`produce`].
    pub async fn produce(
        &self,
        producer: &FutureProducer,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[Header],
    ) -> Result<(i32, i64), Error> {
        produce(producer, topic, partition, key, payload, headers).await
    }

    /// Reads every record currently in `topic`; see [`read_all`].
    pub async fn read_all(&self, topic: &str) -> Result<Vec<Record>, Error> {
        read_all(self.bootstrap_servers(), topic).await
    }

    /// The committed offset of `group`; see [`committed_offset`].
    pub async fn committed_offset(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, Error> {
        committed_offset(self.bootstrap_servers(), group, topic, partition).await
    }
}

/// The committed offset of `group` on `topic`/`partition` (`None` if nothing committed), on
/// any broker.
pub async fn committed_offset(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, Error> {
    {
        let bootstrap = bootstrap.to_owned();
        let (group, topic) = (group.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &group)
                .create()
                .map_err(Error::kafka("creating an offset reader"))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            let offset = {
                let committed = consumer
                    .committed_offsets(tpl, Duration::from_secs(10))
                    .map_err(Error::kafka("reading committed offsets"))?;
                // Read the value out and drop the list before the consumer: a list that
                // outlives its consumer can hang the consumer's drop.
                let offset = committed
                    .find_partition(&topic, partition)
                    .map(|e| e.offset());
                drop(committed);
                offset
            };
            Ok(match offset {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            })
        })
        .await
        .unwrap_or(Ok(None))
    }
}

/// Produces one record with any producer, on any broker, and waits for its acknowledgement.
/// Returns (partition, offset).
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[Header],
) -> Result<(i32, i64), Error> {
    let mut record: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(topic).headers(crate::handler::to_owned_headers(headers));
    if let Some(k) = key {
        record = record.key(k);
    }
    if let Some(p) = payload {
        record = record.payload(p);
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer
        .send(record, Timeout::After(Duration::from_secs(10)))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| Error::Kafka {
            context: "producing a test record",
            source: e,
        })
}

/// Reads every committed record currently in `topic` (all partitions, from the low watermark
/// to the last stable offset seen at the start; see [`scan_report`](crate::dead_letter::scan_report):
/// aborted records and transaction markers are skipped, a transaction still open ends the read
/// where it begins) from any broker, sorted by partition and offset. Meant for tests and
/// demos: it holds everything in memory.
pub async fn read_all(bootstrap: &str, topic: &str) -> Result<Vec<Record>, Error> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    match tokio::task::spawn_blocking(move || read_all_blocking(&bootstrap, &topic)).await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// [`read_all`] on the calling thread: the scan polls a `BaseConsumer`, which blocks, so
/// the async wrapper runs this on a blocking thread. A 10 s bound per poll: the data is local
/// or a test broker's.
fn read_all_blocking(bootstrap: &str, topic: &str) -> Result<Vec<Record>, Error> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    let mut out = Vec::new();
    scan(
        &config,
        topic,
        &StartAt::Beginning,
        Duration::from_secs(10),
        |r| {
            out.push(r);
            ControlFlow::Continue(())
        },
    )?;
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}
