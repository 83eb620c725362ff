//! The shared producer: one idempotent `acks=all` librdkafka producer per instance, admission
//! against the in-flight bounds, cached topic metadata, and the produce of one request's
//! records (in order, awaited together).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::statistics::Statistics;
use rdkafka::ClientConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::config::ProxyConfig;
use super::status::{ApiError, ErrorKind};
use super::wire::ProduceRecord;
use crate::metrics as m;

/// Forwards librdkafka's logs to `tracing`, notes fatal errors (the idempotent producer is
/// unusable after one: readiness turns red so the instance is replaced) and publishes the
/// broker batch sizes from librdkafka's statistics.
pub(crate) struct ProxyContext {
    /// Set on any client error; read by readiness, which then asks the client whether the
    /// error was fatal (shared with [`SharedProducer`]).
    fatal: Arc<AtomicBool>,
}

impl ClientContext for ProxyContext {
    /// librdkafka's log lines to `tracing` (target `librdkafka`), as the runtime's clients do.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        crate::runtime::forward_log(level, fac, message);
    }

    /// Notes the error for readiness, then logs it as the runtime's clients do.
    fn error(&self, error: KafkaError, reason: &str) {
        // A fatal error arrives here with its underlying code (e.g. OutOfOrderSequenceNumber),
        // not as `Fatal`: only the client knows it was fatal, and `Shared::is_fatal` asks it.
        // This flag only makes the next readiness check ask at once.
        self.fatal.store(true, Ordering::Relaxed);
        crate::runtime::forward_error(error, reason);
    }

    /// Publishes the average broker batch per topic ([`m::PROXY_BROKER_BATCH_RECORDS`],
    /// [`m::PROXY_BROKER_BATCH_BYTES`]) from librdkafka's statistics: the evidence that records
    /// of many requests share broker batches.
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            let labels = [("topic", topic.clone())];
            metrics::gauge!(m::PROXY_BROKER_BATCH_RECORDS, &labels).set(t.batchcnt.avg as f64);
            metrics::gauge!(m::PROXY_BROKER_BATCH_BYTES, &labels).set(t.batchsize.avg as f64);
        }
    }
}

impl ProducerContext for ProxyContext {
    /// Each record carries its [`Slot`] through librdkafka and back to `delivery`: one box
    /// per record, the price of settling without a lookup table or a lock per record.
    type DeliveryOpaque = Box<Slot>;

    /// Runs on the producer's polling thread, once per record: settles the record in its
    /// request's batch, and wakes the request when it was the last one.
    fn delivery(&self, result: &DeliveryResult<'_>, slot: Box<Slot>) {
        let outcome = match result {
            Ok(m) => Outcome::Acked {
                partition: m.partition(),
                offset: (m.offset() >= 0).then_some(m.offset()),
                // The broker's time on a LogAppendTime topic (the embedded broker reports a
                // made-up one, before 2001), else the record's.
                timestamp: match m.timestamp() {
                    rdkafka::Timestamp::LogAppendTime(t) if t > 1_000_000_000_000 => Some(t),
                    _ => Some(slot.created),
                },
            },
            Err((e, m)) => {
                let p = m.partition();
                Outcome::Failed {
                    partition: (p >= 0).then_some(p),
                    error: ApiError::new(ErrorKind::of_kafka(e), e.to_string()),
                }
            }
        };
        slot.batch.settle(slot.index, outcome);
    }
}

/// One request's records in the producer. Holds the request's admission: the in-flight
/// bounds are released when the last record is settled (the batch is dropped with the last
/// slot), also when the client has hung up meanwhile.
struct Batch {
    /// One slot per record, in request order, filled by the delivery callbacks.
    outcomes: Mutex<Vec<Option<Outcome>>>,
    /// Records not settled yet, plus one while records are still being queued.
    remaining: std::sync::atomic::AtomicUsize,
    /// Fired when `remaining` reaches zero (the request's task waits on it).
    done: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// The request's in-flight budget, given back when the batch is dropped.
    _admission: Admission,
}

impl Batch {
    /// Stores one record's outcome in its slot and counts it settled. A poisoned lock (a panic
    /// elsewhere) leaves the slot empty, which the request reports as a failure, never a success.
    fn settle(&self, index: usize, outcome: Outcome) {
        if let Ok(mut outcomes) = self.outcomes.lock() {
            if let Some(o) = outcomes.get_mut(index) {
                *o = Some(outcome);
            }
        }
        self.release();
    }

    /// Counts one settlement (or the end of queueing) off `remaining`, and wakes the request
    /// when it was the last.
    fn release(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(tx) = self.done.lock().ok().and_then(|mut d| d.take()) {
                let _ = tx.send(());
            }
        }
    }
}

/// The delivery opaque of one record: its batch and index.
pub(crate) struct Slot {
    /// The request's batch: the last slot dropped releases its admission.
    batch: Arc<Batch>,
    /// The record's position in the request, so the answer keeps request order.
    index: usize,
    /// When the record was queued (ms since the epoch): the timestamp the answer reports unless
    /// the topic uses broker time.
    created: i64,
}

/// Where one record ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Acknowledged by the broker; the offset is `None` for an acknowledgement without one
    /// (librdkafka's implicit ack on an idempotent producer, offset -1001).
    Acked {
        /// The partition it was written to.
        partition: i32,
        /// Its offset, when the acknowledgement carried one.
        offset: Option<i64>,
        /// The broker's time on a `LogAppendTime` topic, else the time it was queued.
        timestamp: Option<i64>,
    },
    /// Not acknowledged.
    Failed {
        /// The partition it was meant for, when librdkafka had chosen one.
        partition: Option<i32>,
        /// Why, classified for the answer ([`ErrorKind::of_kafka`]).
        error: ApiError,
    },
}

/// Records and bytes admitted for one request; released when its records are settled.
pub(crate) struct Admission {
    /// The request's records out of `max_in_flight_records`.
    _records: OwnedSemaphorePermit,
    /// Its bytes (see `ProduceRecord::cost`) out of `max_in_flight_bytes`.
    _bytes: OwnedSemaphorePermit,
    /// Records admitted, taken back off [`m::PROXY_IN_FLIGHT_RECORDS`] on drop.
    records: usize,
    /// Bytes admitted, taken back off [`m::PROXY_IN_FLIGHT_BYTES`] on drop.
    bytes: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        metrics::gauge!(m::PROXY_IN_FLIGHT_RECORDS).decrement(self.records as f64);
        metrics::gauge!(m::PROXY_IN_FLIGHT_BYTES).decrement(self.bytes as f64);
    }
}

/// What the proxy knows of a topic's partitions, and since when (cached: the count
/// checks every record's partition, and asking the broker per request would cost a round
/// trip each).
#[derive(Clone)]
struct Known {
    /// Partition count; `None` for a topic the broker said does not exist.
    partitions: Option<i32>,
    /// When the broker said so.
    at: Instant,
}

/// Unknown topics are remembered this long, so a client hammering a missing topic costs one
/// metadata request per second, not one per request.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Most topics remembered (unknown names first to go), against clients inventing names.
const MAX_KNOWN: usize = 10_000;

/// The one producer of an instance, shared by every request: one idempotent producer batches
/// the records of concurrent requests (a short `linger`), and its in-flight budgets bound
/// what all requests together may have pending.
pub(crate) struct SharedProducer {
    /// librdkafka's producer (its own polling thread delivers the outcomes).
    producer: Arc<ThreadedProducer<ProxyContext>>,
    /// Records admitted and not yet settled (`max_in_flight_records` permits).
    records: Arc<Semaphore>,
    /// Bytes (records' cost) admitted and not yet settled (`max_in_flight_bytes` permits).
    bytes: Arc<Semaphore>,
    /// `max_in_flight_records`, for [`in_flight`](Self::in_flight).
    max_records: usize,
    /// `max_in_flight_bytes`, for [`in_flight`](Self::in_flight).
    max_bytes: usize,
    /// Partition counts by topic (see [`Known`]), at most `MAX_KNOWN`.
    known: Mutex<HashMap<String, Known>>,
    /// Metadata lookups running at once (4): a flood of unknown names waits here, not on
    /// the broker.
    lookups: Semaphore,
    /// How long a known partition count is trusted.
    metadata_max_age: Duration,
    /// How long a metadata lookup may take.
    metadata_timeout: Duration,
    /// Set by the context on a fatal producer error.
    fatal: Arc<AtomicBool>,
}

impl SharedProducer {
    /// librdkafka settings of the shared producer; `extra` are properties the embedding adds
    /// (e.g. for the embedded broker), then the user's.
    pub(crate) fn client_config(
        config: &ProxyConfig,
        brokers: &str,
        extra: &[(String, String)],
    ) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers)
            // A 200 means every in-sync replica has the record; broker-side retries of a batch
            // do not duplicate it.
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // The request deadline: a record not acknowledged by then fails (503), and
            // librdkafka stops retrying it.
            .set(
                "message.timeout.ms",
                config.request_timeout.as_millis().max(1).to_string(),
            )
            // Concurrent requests share broker batches within the linger.
            .set(
                "linger.ms",
                format!("{}", config.linger.as_secs_f64() * 1000.0),
            )
            // Admission bounds what is queued; librdkafka's own bounds sit above it so a
            // send is never refused for a full queue the admission allowed.
            .set(
                "queue.buffering.max.messages",
                (config.max_in_flight_records + 1000).to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                (config.max_in_flight_bytes / 1024 + 1024)
                    .min(i32::MAX as usize)
                    .to_string(),
            )
            .set("allow.auto.create.topics", "false")
            .set("reconnect.backoff.max.ms", "1000")
            .set("statistics.interval.ms", "5000")
            .set_log_level(RDKafkaLogLevel::Info);
        for (k, v) in extra {
            c.set(k, v);
        }
        for (k, v) in &config.producer {
            c.set(k, v);
        }
        c
    }

    /// The producer of an instance, with its in-flight budgets (`max_in_flight_records`,
    /// `max_in_flight_bytes`) and an empty partition cache.
    ///
    /// # Errors
    /// librdkafka refused the client configuration (`ProxyError::Kafka` from `start`).
    pub(crate) fn new(config: &ProxyConfig, client: &ClientConfig) -> Result<Self, KafkaError> {
        let fatal = Arc::new(AtomicBool::new(false));
        let producer = Arc::new(client.create_with_context(ProxyContext {
            fatal: fatal.clone(),
        })?);
        Ok(SharedProducer {
            producer,
            records: Arc::new(Semaphore::new(config.max_in_flight_records)),
            bytes: Arc::new(Semaphore::new(config.max_in_flight_bytes)),
            max_records: config.max_in_flight_records,
            max_bytes: config.max_in_flight_bytes,
            known: Mutex::new(HashMap::new()),
            lookups: Semaphore::new(4),
            metadata_max_age: config.metadata_max_age,
            metadata_timeout: config.metadata_timeout,
            fatal,
        })
    }

    /// Records and bytes admitted and not yet settled.
    pub(crate) fn in_flight(&self) -> (usize, usize) {
        (
            self.max_records - self.records.available_permits().min(self.max_records),
            self.max_bytes - self.bytes.available_permits().min(self.max_bytes),
        )
    }

    /// Whether the producer hit a fatal error (it is unusable: every later send fails).
    /// Asked of the client itself, after any client error: librdkafka reports a fatal error
    /// with its underlying code, so the code alone cannot tell.
    pub(crate) fn is_fatal(&self) -> bool {
        if !self.fatal.load(Ordering::Relaxed) {
            return false;
        }
        match self.producer.client().fatal_error() {
            Some((code, reason)) => {
                tracing::error!(?code, %reason, "fatal producer error; this proxy instance must be restarted (readyz fails)");
                true
            }
            None => false,
        }
    }

    /// Admits `records` records of `bytes` bytes, or answers at once: 413 if the request can
    /// never fit, 429 if the proxy is full now. Never waits.
    pub(crate) fn admit(&self, records: usize, bytes: usize) -> Result<Admission, ApiError> {
        if records > self.max_records || bytes > self.max_bytes {
            return Err(ApiError::new(
                ErrorKind::RequestTooLarge,
                format!(
                    "{records} records of {bytes} bytes can never be admitted (max_in_flight_records {}, max_in_flight_bytes {}); split the request",
                    self.max_records, self.max_bytes
                ),
            ));
        }
        let saturated = || {
            ApiError::new(
                ErrorKind::Saturated,
                "the proxy is at its in-flight limit; retry after Retry-After seconds",
            )
        };
        // Both bounds fit in u32: validated as ≤ 10M records and < 2 GiB.
        let n_records = u32::try_from(records).map_err(|_| saturated())?;
        let n_bytes = u32::try_from(bytes).map_err(|_| saturated())?;
        let r = self
            .records
            .clone()
            .try_acquire_many_owned(n_records)
            .map_err(|_| saturated())?;
        let b = self
            .bytes
            .clone()
            .try_acquire_many_owned(n_bytes)
            .map_err(|_| saturated())?;
        metrics::gauge!(m::PROXY_IN_FLIGHT_RECORDS).increment(records as f64);
        metrics::gauge!(m::PROXY_IN_FLIGHT_BYTES).increment(bytes as f64);
        Ok(Admission {
            _records: r,
            _bytes: b,
            records,
            bytes,
        })
    }

    /// Partition count of `topic`, from the cache or the broker (at most `metadata_timeout`).
    /// `max_age` overrides `metadata_max_age` for this lookup (e.g. 1 s to see a partition
    /// just added, without letting a client force a lookup per request).
    pub(crate) async fn partitions(
        &self,
        topic: &str,
        max_age: Option<Duration>,
    ) -> Result<i32, ApiError> {
        let cached = self.known.lock().ok().and_then(|k| k.get(topic).cloned());
        let fresh = |k: &Known| {
            let ttl = if k.partitions.is_some() {
                max_age.unwrap_or(self.metadata_max_age)
            } else {
                NEGATIVE_TTL
            };
            k.at.elapsed() < ttl
        };
        if let Some(k) = &cached {
            if fresh(k) {
                return known_partitions(topic, k.partitions);
            }
        }
        let looked_up = self.lookup(topic).await;
        match looked_up {
            Ok(partitions) => {
                if let Ok(mut known) = self.known.lock() {
                    if known.len() >= MAX_KNOWN {
                        known.retain(|_, k| k.partitions.is_some());
                        if known.len() >= MAX_KNOWN {
                            known.clear();
                        }
                    }
                    known.insert(
                        topic.to_owned(),
                        Known {
                            partitions,
                            at: Instant::now(),
                        },
                    );
                }
                known_partitions(topic, partitions)
            }
            // A stale answer beats none while the broker is unreachable.
            Err(e) => match cached {
                Some(Known {
                    partitions: Some(n),
                    ..
                }) => Ok(n),
                _ => Err(e),
            },
        }
    }

    /// Asks the broker about `topic`: `Some(partitions)`, `None` if it does not exist.
    async fn lookup(&self, topic: &str) -> Result<Option<i32>, ApiError> {
        let unavailable = |why: String| {
            ApiError::new(
                ErrorKind::Unavailable,
                format!("cannot read metadata of `{topic}` from the brokers: {why}"),
            )
        };
        let deadline = self.metadata_timeout;
        // At most four lookups at a time: a flood of unknown names waits here, not on the
        // broker.
        let _permit = tokio::time::timeout(deadline, self.lookups.acquire())
            .await
            .map_err(|_| unavailable("too many metadata lookups waiting".into()))?
            .map_err(|_| unavailable("closed".into()))?;
        let client = self.producer.clone();
        let name = topic.to_owned();
        let res = tokio::task::spawn_blocking(move || {
            let md = client.client().fetch_metadata(Some(&name), deadline)?;
            let t = md.topics().iter().find(|t| t.name() == name).map(|t| {
                let err = t.error().map(RDKafkaErrorCode::from);
                (err, t.partitions().len())
            });
            Ok::<_, KafkaError>(t)
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
        match res {
            Ok(None) => Ok(None),
            Ok(Some((
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic),
                _,
            ))) => Ok(None),
            Ok(Some((None, n))) if n > 0 => Ok(Some(i32::try_from(n).unwrap_or(i32::MAX))),
            Ok(Some((err, n))) => Err(unavailable(format!("{err:?} ({n} partitions)"))),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    /// Whether the brokers answer a metadata request within `timeout`.
    pub(crate) async fn reachable(&self, timeout: Duration) -> Result<(), String> {
        let client = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            client.client().fetch_metadata(None, timeout).map(|_| ())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// The cluster id the brokers report, if they do.
    pub(crate) async fn cluster_id(&self, timeout: Duration) -> Option<String> {
        let client = self.producer.clone();
        tokio::task::spawn_blocking(move || client.client().fetch_cluster_id(timeout))
            .await
            .ok()
            .flatten()
    }

    /// Produces `records` to `topic` in order and waits for every one to be settled (or
    /// `deadline`, a safety net past librdkafka's own `message.timeout.ms`). Every record is
    /// queued before any is awaited, so they keep their order within a partition; the request
    /// is woken once, by the last delivery report.
    pub(crate) async fn produce(
        &self,
        topic: Arc<str>,
        records: Vec<ProduceRecord>,
        admission: Admission,
        deadline: Duration,
    ) -> Vec<Outcome> {
        let started = Instant::now();
        let n = records.len();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = Arc::new(Batch {
            outcomes: Mutex::new(vec![None; n]),
            remaining: std::sync::atomic::AtomicUsize::new(1),
            done: Mutex::new(Some(tx)),
            _admission: admission,
        });
        // Records without a timestamp get the time they were queued (what librdkafka would
        // give them), set here so the answer can tell it.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut local: Vec<Option<Outcome>> = vec![None; n];
        let mut refused: Option<ApiError> = None;
        for (index, r) in records.iter().enumerate() {
            if let Some(e) = &refused {
                local[index] = Some(Outcome::Failed {
                    partition: r.partition,
                    error: e.clone(),
                });
                continue;
            }
            let created = r.timestamp.unwrap_or(now_ms);
            let slot = Box::new(Slot {
                batch: batch.clone(),
                index,
                created,
            });
            let mut rec: BaseRecord<'_, [u8], [u8], Box<Slot>> =
                BaseRecord::with_opaque_to(&topic, slot).timestamp(created);
            // No header list at all for a record without headers: librdkafka allocates one
            // per record otherwise.
            if !r.headers.is_empty() {
                rec = rec.headers(crate::handler::rdkafka_headers(&r.headers));
            }
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                rec = rec.payload(v.as_slice());
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p);
            }
            batch.remaining.fetch_add(1, Ordering::AcqRel);
            if let Err((e, _record)) = self.producer.send(rec) {
                // Not queued: no delivery report will come for it. Later records are not
                // sent: they would overtake this one if the client retries it.
                batch.remaining.fetch_sub(1, Ordering::AcqRel);
                let err = ApiError::new(ErrorKind::of_kafka(&e), format!("not queued: {e}"));
                refused = Some(ApiError::new(
                    err.kind,
                    "not sent: an earlier record of this request could not be queued",
                ));
                local[index] = Some(Outcome::Failed {
                    partition: r.partition,
                    error: err,
                });
            }
        }
        drop(records);
        // The queueing is over: from here the last delivery report completes the batch.
        batch.release();
        if tokio::time::timeout(deadline, rx).await.is_err() {
            tracing::error!(
                records = n,
                "no delivery report within the deadline; answering 500 for the records without one"
            );
        }
        let settled = batch
            .outcomes
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default();
        drop(batch);
        metrics::histogram!(m::PROXY_PRODUCE_SECONDS).record(started.elapsed().as_secs_f64());
        local
            .into_iter()
            .zip(settled.into_iter().chain(std::iter::repeat(None)))
            .map(|(l, s)| {
                l.or(s).unwrap_or_else(|| Outcome::Failed {
                    partition: None,
                    error: ApiError::new(ErrorKind::Internal, "no delivery report for this record"),
                })
            })
            .collect()
    }

    /// Waits up to `timeout` for every queued record to be settled.
    pub(crate) async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.flush(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Records librdkafka still holds (queued or in flight).
    pub(crate) fn queued(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

/// The partition count of a topic looked up, or 404 40401 when the broker said it does not
/// exist.
fn known_partitions(topic: &str, partitions: Option<i32>) -> Result<i32, ApiError> {
    partitions.ok_or_else(|| {
        ApiError::new(
            ErrorKind::UnknownTopic,
            format!("topic `{topic}` does not exist"),
        )
    })
}
