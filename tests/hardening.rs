//! Faults that used to leave a partition without progress while the process looked healthy:
//! extreme numbers, fatal client errors, partition tasks that end unexpectedly, client
//! properties that void a guarantee, pauses that resumed each other, a partition revoked and
//! assigned back while its handler still ran, and clock skew between instances.
//!
//! One global recorder serves the whole binary (metrics are process-wide), so every test uses
//! its own topic and group and reads only its own labels. The recorder can also be told to
//! panic inside the runtime, outside the handler, to stand in for a bug in a partition task.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use rdkafka::producer::FutureRecord;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sidetrack::config::RetryConfig;
use sidetrack::metrics as m;
use sidetrack::{Context, Error, Handler, HandlerError, Message, Reason, Tier};

// ------------------------------------------------------------------ recorder

/// Keeps every value; a counter registered under a trapped (name, `source` or `topic` label)
/// panics on its first `n` increments.
struct Recording {
    registry: Registry<Key, AtomicStorage>,
    traps: Mutex<HashMap<(String, String), Arc<AtomicUsize>>>,
}

struct Trap {
    inner: Arc<AtomicU64>,
    left: Arc<AtomicUsize>,
}

impl CounterFn for Trap {
    fn increment(&self, value: u64) {
        if self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("injected fault in the partition task (a bug outside the handler)");
        }
        self.inner.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.inner.store(value, Ordering::SeqCst);
    }
}

impl metrics::Recorder for Recording {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let inner = self.registry.get_or_create_counter(key, Arc::clone);
        // Trapped by (name, value of its `source` or `topic` label).
        let trap = key
            .labels()
            .filter(|l| l.key() == "source" || l.key() == "topic")
            .find_map(|l| {
                self.traps
                    .lock()
                    .unwrap()
                    .get(&(key.name().to_owned(), l.value().to_owned()))
                    .cloned()
            });
        match trap {
            Some(left) => Counter::from_arc(Arc::new(Trap { inner, left })),
            None => Counter::from_arc(inner),
        }
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

fn recorder() -> &'static Recording {
    static R: OnceLock<&'static Recording> = OnceLock::new();
    R.get_or_init(|| {
        let r: &'static Recording = Box::leak(Box::new(Recording {
            registry: Registry::new(AtomicStorage),
            traps: Mutex::new(HashMap::new()),
        }));
        metrics::set_global_recorder(r).expect("no other recorder in this test binary");
        r
    })
}

fn labels_match(key: &Key, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

fn counter(name: &str, want: &[(&str, &str)]) -> u64 {
    recorder()
        .registry
        .get_counter_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == name && labels_match(k, want))
        .map(|(_, v)| v.load(Ordering::SeqCst))
        .sum()
}

fn gauge(name: &str, want: &[(&str, &str)]) -> f64 {
    recorder()
        .registry
        .get_gauge_handles()
        .into_iter()
        .filter(|(k, _)| k.name() == name && labels_match(k, want))
        .map(|(_, v)| f64::from_bits(v.load(Ordering::SeqCst)))
        .sum()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A scenario on its own topic and group (metrics are process-wide).
fn unique(name: &str, partitions: i32) -> (sidetrack::testing::EmbeddedCluster, sidetrack::Config) {
    recorder();
    let cluster = cluster_with(name, partitions);
    let config = config_for(name, &format!("{name}-g"));
    (cluster, config)
}

// ------------------------------------------------------------------ extreme numbers

/// CreateTime `i64::MIN` and `i64::MAX` on source records: end-to-end latency arithmetic used
/// to overflow (a panic in debug builds). Both records are handled, fail once, are retried
/// (the retry path computes latency from the original timestamp) and handled.
///
/// Apache Kafka (4.0 and later) refuses a CreateTime more than an hour ahead of its clock
/// (`message.timestamp.after.max.ms`, 1 h by default): there the source topic is configured to
/// take any timestamp, as a topic written by a far-off clock would have to be. The runtime's own
/// hand-offs carry the time they were made, so its retry topics need no such setting.
async fn extreme_timestamps_are_handled(env: Env) {
    recorder();
    if env.backend() == Backend::ApacheKafka {
        env.alter_topic(
            env.topic(),
            &[("message.timestamp.after.max.ms", &i64::MAX.to_string())],
        )
        .await;
    }
    let recorder = Recorder::new(|m| {
        if m.attempt() == 1 {
            return Err(HandlerError::retryable("once"));
        }
        Ok(())
    });
    let rt = env
        .builder(env.config())
        .handler(recorder.clone())
        .started()
        .await;
    let producer = env.producer();
    for (ts, name) in [(i64::MIN, "min"), (i64::MAX, "max"), (0, "zero")] {
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(env.topic())
            .payload(name.as_bytes())
            .key(name.as_bytes())
            .partition(0)
            .timestamp(ts);
        if let Err((e, _)) = producer.send(record, Duration::from_secs(10)).await {
            panic!("producing timestamp {ts}: {e}");
        }
    }
    wait_for("three records handled on their second attempt", || {
        rt.stats().handled == 3
    })
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_retried(), 3);
    assert_eq!(stats.total_dead_lettered(), 0);
}
on_every_broker!(extreme_timestamps, 1, extreme_timestamps_are_handled);

/// The writer's clock runs an hour ahead: its retry record's timestamp and due time are both
/// an hour in our future. Checked against the reader's clock, that used to be "further ahead
/// than the tier can schedule" and every retry went to the DLQ as `invalid-envelope`; waiting
/// by the reader's clock would hold it for an hour. Checked against the record's own timestamp
/// it is a 200 ms retry.
async fn a_fast_writer_clock_neither_dead_letters_nor_delays(env: Env) {
    let recorder = Recorder::new(|_| Ok(()));
    let rt = env
        .builder(env.config())
        .handler(recorder.clone())
        .started()
        .await;
    let skew = 3_600_000;
    let written = now_ms() + skew;
    let envelope = sidetrack::Envelope {
        key_order_since: None,
        after_dead_letter: None,
        original_topic: env.topic().into(),
        original_partition: 0,
        original_offset: 0,
        original_timestamp: Some(written - 1000),
        group: env.group().into(),
        attempts: 1,
        first_failure: written,
        due: Some(written + 200),
        reason: None,
        error: "x".into(),
    };
    let producer = env.producer();
    let tier = env.retry("200ms");
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&tier)
        .payload(&b"skewed"[..])
        .partition(0)
        .timestamp(written)
        .headers(sidetrack::handler::rdkafka_headers(&envelope.to_headers()));
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    wait_for("the skewed retry handled", || rt.stats().handled == 1).await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.dead_lettered(Reason::InvalidEnvelope), 0);
    assert_eq!(recorder.all()[0].attempt, 2);
}
on_every_broker!(
    fast_writer_clock,
    1,
    a_fast_writer_clock_neither_dead_letters_nor_delays
);

// ------------------------------------------------------------------ fatal client errors

/// Fails the first attempt of every record once `armed`; the test injects broker errors while
/// the handler holds.
#[derive(Clone)]
struct FailWhenReleased {
    release: Arc<tokio::sync::Semaphore>,
    attempts: Arc<AtomicUsize>,
    permanent: bool,
}

impl FailWhenReleased {
    /// Fails the first attempt (retryable), once released.
    fn new() -> Self {
        FailWhenReleased {
            release: Arc::new(tokio::sync::Semaphore::new(0)),
            attempts: Arc::new(AtomicUsize::new(0)),
            permanent: false,
        }
    }
    /// Fails every record permanently, once released.
    fn permanent() -> Self {
        FailWhenReleased {
            permanent: true,
            ..Self::new()
        }
    }
}

impl Handler for FailWhenReleased {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.permanent {
            let _ = self.release.acquire().await.map(|p| p.forget());
            return Err(HandlerError::permanent("to the DLQ"));
        }
        if msg.attempt() == 1 {
            let _ = self.release.acquire().await.map(|p| p.forget());
            return Err(HandlerError::retryable("first attempt fails"));
        }
        Ok(())
    }
}

/// One OUT_OF_ORDER_SEQUENCE_NUMBER answer to a hand-off puts the idempotent producer into a
/// fatal state: every later send failed with "Fatal" for ever, partitions paused and backed
/// off endlessly. Now the producer is replaced at once and the waiting hand-off sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_replaces_the_producer_and_the_hand_off_goes_through() {
    recorder();
    let (cluster, config) = unique("fatal-once", 1);
    let handler = FailWhenReleased::new();
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(handler.clone())
        .started()
        .await;
    let producer = cluster.producer().unwrap();
    cluster
        .produce(&producer, "fatal-once", Some(0), None, Some(b"r"), &[])
        .await
        .unwrap();
    wait_for("the record in the handler", || {
        handler.attempts.load(Ordering::SeqCst) == 1
    })
    .await;
    cluster.fail_requests(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    handler.release.add_permits(1);
    wait_for("retried and handled", || rt.stats().handled == 1).await;
    assert!(
        counter(m::CLIENT_FATAL_ERRORS, &[("client", "producer")]) >= 1,
        "the fatal error was seen and counted"
    );
    assert!(!rt.is_shutting_down(), "one fatal error is recovered from");
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_retried(), 1);
    assert_eq!(
        cluster
            .committed_offset("fatal-once-g", "fatal-once", 0)
            .await
            .unwrap(),
        Some(1)
    );
}

/// A producer that fails fatally again after every replacement cannot be helped by another
/// one: the runtime stops on its own and `wait()` returns the cause, instead of a process that
/// looks healthy and does nothing. The record's offset is not committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_keeps_failing_fatally_stops_the_runtime_with_the_cause() {
    recorder();
    let (cluster, config) = unique("fatal-always", 1);
    let handler = FailWhenReleased::new();
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(handler.clone())
        .started()
        .await;
    let producer = cluster.producer().unwrap();
    cluster
        .produce(&producer, "fatal-always", Some(0), None, Some(b"r"), &[])
        .await
        .unwrap();
    wait_for("the record in the handler", || {
        handler.attempts.load(Ordering::SeqCst) == 1
    })
    .await;
    cluster.fail_requests(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 50],
    );
    handler.release.add_permits(1);
    let ended = tokio::time::timeout(WAIT, rt.wait())
        .await
        .expect("the runtime stops on its own");
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    match ended {
        Err(Error::Fatal { client, reason }) => {
            assert_eq!(client, "hand-off producer");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a fatal error, got {other:?}"),
    }
    let committed = cluster
        .committed_offset("fatal-always-g", "fatal-always", 0)
        .await
        .unwrap();
    assert!(committed.unwrap_or(0) < 1, "not committed: {committed:?}");
}

// ------------------------------------------------------------------ supervision

/// A panic in the partition task outside the handler (here: in the records-handled counter,
/// which a batch's flush increments right after storing the batch's offsets) used to end the
/// task silently: the partition stayed assigned with nobody reading it. Now its supervisor
/// logs it, counts it, and restarts the task from the last stored offset; the records after it
/// flow and nothing is skipped.
///
/// Deterministic by construction (issue 17: it once counted one restart, not two): the first
/// two flushes that count a handled record panic, and a flush only counts records handled
/// since the last one. With all ten records produced at once, a loaded machine could handle
/// them all before the first flush: one panic, a restart at the stored offset 10, and no record
/// left to flush a second time. So each panic is given its own record, produced only once the
/// previous restart is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_task_that_panics_is_restarted_from_the_last_stored_offset() {
    let rec = recorder();
    let topic = "supervised-panic";
    rec.traps.lock().unwrap().insert(
        (m::RECORDS_HANDLED.to_owned(), topic.to_owned()),
        Arc::new(AtomicUsize::new(2)),
    );
    let (cluster, config) = unique(topic, 1);
    let recorder = Recorder::new(|_| Ok(()));
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(recorder.clone())
        .started()
        .await;
    let failures = || {
        counter(
            m::PARTITION_TASK_FAILURES,
            &[("topic", topic), ("group", "supervised-panic-g")],
        )
    };
    let payloads: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    // One record, one flush, the first injected panic.
    produce_to(&cluster, topic, &payloads[..1], 1).await;
    wait_for("the first panic", || failures() == 1).await;
    // The restarted task handles the next record; its flush is the second injected panic.
    produce_to(&cluster, topic, &payloads[1..2], 1).await;
    wait_for("the second panic", || failures() == 2).await;
    // No trap is left: the task restarted a second time takes the rest.
    produce_to(&cluster, topic, &payloads[2..], 1).await;
    wait_for("every record handled", || {
        let seen: std::collections::HashSet<String> =
            recorder.all().into_iter().map(|a| a.payload).collect();
        seen.len() == 10
    })
    .await;
    wait_for("every record counted", || {
        counter(m::RECORDS_HANDLED, &[("source", topic)]) >= 8
    })
    .await;
    assert_eq!(failures(), 2, "two injected panics, two restarts");
    rt.shutdown().await.unwrap();
    // Nothing was skipped (each restart resumed at the last stored offset) and everything is
    // committed.
    assert_eq!(
        cluster
            .committed_offset("supervised-panic-g", topic, 0)
            .await
            .unwrap(),
        Some(10)
    );
}

/// A DLQ that refuses even an empty record with its envelope (here the producer's
/// message.max.bytes is smaller than the envelope of a long error) used to end the partition
/// task for good. Now the failure is reported and counted, the task is restarted with backoff
/// (the record is tried again, not skipped), and the other partitions keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_keeps_failing_is_restarted_with_backoff_not_skipped() {
    recorder();
    let topic = "supervised-dlq";
    let (cluster, mut config) = unique(topic, 2);
    config
        .producer
        .insert("message.max.bytes".into(), "1000".into());
    let recorder = Recorder::new(|m| {
        if m.payload() == Some(b"poison") {
            return Err(HandlerError::permanent("x".repeat(2000)));
        }
        Ok(())
    });
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(recorder.clone())
        .started()
        .await;
    let producer = cluster.producer().unwrap();
    cluster
        .produce(&producer, topic, Some(0), None, Some(b"poison"), &[])
        .await
        .unwrap();
    wait_for("the partition task failed and was restarted twice", || {
        counter(m::PARTITION_TASK_FAILURES, &[("topic", topic)]) >= 2
    })
    .await;
    let tries = recorder
        .all()
        .iter()
        .filter(|a| a.payload == "poison")
        .count();
    assert!(
        tries >= 2,
        "the record is tried again after a restart: {tries}"
    );
    // The other partition is not held up.
    let payloads: Vec<String> = (0..5).map(|i| format!("ok{i}")).collect();
    for p in &payloads {
        cluster
            .produce(&producer, topic, Some(1), None, Some(p.as_bytes()), &[])
            .await
            .unwrap();
    }
    wait_for("the healthy partition flows", || rt.stats().handled == 5).await;
    rt.shutdown().await.unwrap();
    assert_eq!(
        cluster
            .committed_offset("supervised-dlq-g", topic, 0)
            .await
            .unwrap(),
        None,
        "nothing past the record is committed"
    );
}

// ------------------------------------------------------------------ managed properties

/// `auto.offset.reset = latest` is a legitimate choice for the source topics, but it also
/// applied to the retry consumer: a record waiting in a tier across a restart, on a tier
/// partition with no committed offset yet, was never read again. The retry consumer now
/// always starts from the earliest offset.
async fn a_retry_waiting_across_a_restart_is_not_skipped(env: Env) {
    let mut config = env.config();
    config.retry = RetryConfig::tiers([Tier::new(Duration::from_secs(5), 1)]);
    let first = Recorder::new(|_| Err(HandlerError::retryable("not yet")));
    let rt = env
        .builder(config.clone())
        .handler(first.clone())
        .started()
        .await;
    env.produce_all(&["wait".into()], 1).await;
    wait_for("handed off to the 5 s tier", || {
        rt.stats().total_retried() == 1
    })
    .await;
    // Stop before it is due: nothing on the tier partition is committed.
    rt.shutdown().await.unwrap();
    assert_eq!(first.count(), 1, "stopped before the retry was due");
    // The second instance prefers `latest` for its source topics.
    config
        .consumer
        .insert("auto.offset.reset".into(), "latest".into());
    let second = Recorder::new(|_| Ok(()));
    let rt = env.builder(config).handler(second.clone()).started().await;
    wait_for("the waiting retry handled after the restart", || {
        rt.stats().handled == 1
    })
    .await;
    rt.shutdown().await.unwrap();
    assert_eq!(second.all()[0].attempt, 2);
}
on_every_broker!(
    retry_across_restart,
    1,
    a_retry_waiting_across_a_restart_is_not_skipped
);

// ------------------------------------------------------------------ pauses

/// A hand-off failing when its partition is revoked used to leave +1 in
/// `sidetrack_partitions_paused` for ever (the suggested alert in docs/monitoring.md fires on it). Pauses
/// are now counted holds released on every way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_mid_backoff_leaves_no_pause_behind() {
    recorder();
    let topic = "paused-revoke";
    let group = "paused-revoke-g";
    let (cluster, config) = unique(topic, 2);
    let handler = FailWhenReleased::permanent();
    let a = sidetrack::Runtime::builder(config.clone())
        .embedded(&cluster)
        .handler(handler.clone())
        .started()
        .await;
    wait_for("both partitions on the first instance", || {
        a.assigned_partitions().len() == 2
    })
    .await;
    let producer = cluster.producer().unwrap();
    for p in 0..2 {
        cluster
            .produce(&producer, topic, Some(p), None, Some(b"x"), &[])
            .await
            .unwrap();
    }
    wait_for("both records in the handler", || {
        handler.attempts.load(Ordering::SeqCst) == 2
    })
    .await;
    cluster.fail_requests(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 2000],
    );
    handler.release.add_permits(1000);
    wait_for("both partitions paused by failing hand-offs", || {
        gauge(m::PARTITIONS_PAUSED, &[("group", group)]) == 2.0
    })
    .await;
    // A second instance joins: the first one loses a partition while its hand-off backs off.
    let b = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(handler.clone())
        .started()
        .await;
    wait_for("partitions split between the two", || {
        a.assigned_partitions().len() == 1 && b.assigned_partitions().len() == 1
    })
    .await;
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    wait_for("both records dead-lettered", || {
        a.stats().total_dead_lettered() + b.stats().total_dead_lettered() >= 2
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    assert_eq!(
        gauge(m::PARTITIONS_PAUSED, &[("group", group)]),
        0.0,
        "no pause left behind"
    );
}

// ------------------------------------------------------------------ revoke and assign back

/// A partition revoked from an instance and assigned back to it while its old task was still
/// in a handler call used to have one record in two handler calls at once in that instance
/// (the new task re-read from the committed offset). The new task now waits for the old one.
async fn a_partition_assigned_back_waits_for_its_previous_task(env: Env) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let in_a = Gated::new(Arc::clone(&gate));
    let mut config = env.config();
    config.shutdown_timeout = Duration::from_millis(500);
    let a = env
        .builder(config.clone())
        .handler(in_a.clone())
        .started()
        .await;
    wait_for("both partitions on A", || {
        a.assigned_partitions().len() == 2
    })
    .await;
    env.produce_all(&["r0".into(), "r1".into()], 2).await;
    wait_for("both records in A's handler", || {
        in_a.calls.load(Ordering::SeqCst) == 2
    })
    .await;
    // B joins and takes one partition; A's task for it is revoked mid-call.
    let in_b = Gated::new(Arc::new(tokio::sync::Semaphore::new(0)));
    // B's call never ends: B's shutdown abandons it, without a durable outcome.
    let b = env.builder(config).handler(in_b.clone()).started().await;
    wait_for("one partition moved to B", || {
        a.assigned_partitions().len() == 1 && b.assigned_partitions().len() == 1
    })
    .await;
    // B leaves (abandoning its call): the partition comes back to A while A's old call for
    // that record still waits at the gate.
    b.shutdown().await.unwrap();
    wait_for("both partitions back on A", || {
        a.assigned_partitions().len() == 2
    })
    .await;
    // Watch for a second call of the moved record in A while the first still waits at the
    // gate: before the fix it came within one fetch. Nothing to wait for when all is well, so
    // the window simply ends.
    let overlapped = sidetrack::testing::wait_until(Duration::from_secs(5), || {
        std::future::ready(in_a.most.load(Ordering::SeqCst) > 1)
    })
    .await;
    assert!(
        !overlapped,
        "a record was in two handler calls at once in one instance"
    );
    gate.add_permits(1000);
    // The record that moved is taken again by A's new task, once its old call has ended.
    wait_for("A's new task handled the record that came back", || {
        in_a.calls.load(Ordering::SeqCst) == 3
    })
    .await;
    a.shutdown().await.unwrap();
    assert_eq!(
        in_a.most.load(Ordering::SeqCst),
        1,
        "a record was in two handler calls at once in one instance"
    );
}
on_every_broker!(
    assigned_back,
    2,
    a_partition_assigned_back_waits_for_its_previous_task
);

/// Two instances configured with the same `group.instance.id` (static membership): the newer
/// one fences the older, whose consumer then has a fatal error and can never consume again.
/// The fenced runtime stops on its own and `wait()` names the cause.
async fn a_fenced_static_member_stops_with_the_cause(env: Env) {
    let mut config = env.config();
    config
        .consumer
        .insert("group.instance.id".into(), "static-1".into());
    let a = env
        .builder(config.clone())
        .handler(Recorder::new(|_| Ok(())))
        .started()
        .await;
    wait_for("A has the partition", || {
        !a.assigned_partitions().is_empty()
    })
    .await;
    let b = env
        .builder(config)
        .handler(Recorder::new(|_| Ok(())))
        .started()
        .await;
    let ended = tokio::time::timeout(WAIT, a.wait())
        .await
        .expect("the fenced runtime stops on its own");
    match ended {
        Err(Error::Fatal { client, reason }) => {
            assert!(client.starts_with("consumer"), "{client}");
            assert!(!reason.is_empty());
        }
        other => panic!("expected a fatal consumer error, got {other:?}"),
    }
    b.shutdown().await.unwrap();
}

/// kfake (like Kafka) fences a duplicate static member itself; the mock broker does not, so on
/// it the broker's answer is injected: FENCED_INSTANCE_ID on a heartbeat.
mod fenced_static_member {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        recorder();
        within_limit(async {
            let env = Env::embedded(1);
            let Broker::Embedded(cluster) = &env.broker else {
                unreachable!()
            };
            let mut config = env.config();
            config
                .consumer
                .insert("group.instance.id".into(), "static-1".into());
            let a = env
                .builder(config)
                .handler(Recorder::new(|_| Ok(())))
                .started()
                .await;
            wait_for("A has the partition", || {
                !a.assigned_partitions().is_empty()
            })
            .await;
            cluster.fail_requests(
                RDKafkaApiKey::Heartbeat,
                &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID; 4],
            );
            let ended = tokio::time::timeout(WAIT, a.wait())
                .await
                .expect("the fenced runtime stops on its own");
            match ended {
                Err(Error::Fatal { client, reason }) => {
                    assert!(client.starts_with("consumer"), "{client}");
                    assert!(reason.contains("Fenced"), "{reason}");
                }
                other => panic!("expected a fatal consumer error, got {other:?}"),
            }
            assert!(counter(m::CLIENT_FATAL_ERRORS, &[("client", "consumer")]) >= 1);
        })
        .await
    }
    /// Not on Tansu: Tansu 0.6 does not fence a duplicate static member (seen here: the older
    /// instance goes on consuming).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kfake() {
        if let Some(env) = Env::on(Backend::Kfake, TOPIC, GROUP, 1).await {
            within_limit(a_fenced_static_member_stops_with_the_cause(env)).await
        }
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apache_kafka() {
        if let Some(env) = Env::on(Backend::ApacheKafka, TOPIC, GROUP, 1).await {
            within_limit(a_fenced_static_member_stops_with_the_cause(env)).await
        }
    }
}

// ------------------------------------------------------------------ found by review
// An adversarial review of the first version of this hardening found each of these; every
// test failed on that version.

/// Starts a member with `handler` on `topic` (two partitions), produces one record to each
/// partition and waits until both records are in its handler (`calls` counts the calls).
async fn two_calls_in(
    cluster: &sidetrack::testing::EmbeddedCluster,
    config: &sidetrack::Config,
    topic: &str,
    handler: impl Handler,
    calls: impl Fn() -> usize,
) -> sidetrack::RuntimeHandle {
    let a = sidetrack::Runtime::builder(config.clone())
        .embedded(cluster)
        .handler(handler)
        .started()
        .await;
    wait_for("both partitions on A", || {
        a.assigned_partitions().len() == 2
    })
    .await;
    produce_to(cluster, topic, &payloads("r", 2), 2).await;
    wait_for("both records in A's handler", || calls() == 2).await;
    a
}

/// Starts a member B with `handler` and waits until it has one of A's two partitions.
async fn join_and_take_one(
    cluster: &sidetrack::testing::EmbeddedCluster,
    config: &sidetrack::Config,
    a: &sidetrack::RuntimeHandle,
    handler: impl Handler,
) -> sidetrack::RuntimeHandle {
    let b = sidetrack::Runtime::builder(config.clone())
        .embedded(cluster)
        .handler(handler)
        .started()
        .await;
    wait_for("one partition moved to B", || {
        a.assigned_partitions().len() == 1 && b.assigned_partitions().len() == 1
    })
    .await;
    b
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A gate a thread can block on (a synchronous call inside a handler).
#[derive(Clone, Default)]
struct BlockingGate(Arc<(Mutex<bool>, Condvar)>);

impl BlockingGate {
    fn wait(&self) {
        let (open, cv) = &*self.0;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
    }
    fn open(&self) {
        let (open, cv) = &*self.0;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

// ------------------------------------------------------------------ 1. loss: a panic before `progress.at`

/// A panic in the partition task outside the handler is supposed to restart the task "from
/// the last stored offset" without skipping anything. `Progress::restart_from` returns `None`
/// ("no record was taken yet, the consumer's position is still right") when nothing was stored
/// and `progress.at()` was never called. But the task calls `progress.at(offset)` only after
/// `decode()` (partition.rs:254-255): a panic inside `decode` (here a metrics call, as in the
/// hardening tests; any bug there does the same) on the first record of an assignment happens
/// after librdkafka handed that record out and before it was marked as taken. The supervisor
/// then restarts without a seek, the new task reads the next record from the queue, handles it
/// and stores its offset: the first record is never handled and its offset is committed past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_decoding_the_first_record_does_not_skip_it() {
    let topic = "rv-first-panic";
    let group = "rv-first-panic-g";
    let (cluster, config) = unique(topic, 1);
    recorder().traps.lock().unwrap().insert(
        (m::RECORDS_CONSUMED.to_owned(), topic.to_owned()),
        Arc::new(AtomicUsize::new(1)),
    );
    let rec = Recorder::new(|_| Ok(()));
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(rec.clone())
        .started()
        .await;
    produce_to(&cluster, topic, &payloads("p", 3), 1).await;
    wait_for("the task failed once and was restarted", || {
        counter(m::PARTITION_TASK_FAILURES, &[("topic", topic)]) >= 1
    })
    .await;
    wait_for("the last record handled", || {
        rec.all().iter().any(|a| a.payload == "p2")
    })
    .await;
    rt.shutdown().await.unwrap();
    let committed = cluster.committed_offset(group, topic, 0).await.unwrap();
    let seen: HashSet<String> = rec.all().into_iter().map(|a| a.payload).collect();
    assert!(
        seen.contains("p0"),
        "record 0 was never handled, yet the committed offset is {committed:?}; handled: {seen:?}"
    );
}

// ------------------------------------------------------------------ 2. wrong outcome: a long hand-off outage

/// The due time is checked against the retry record's own timestamp: it must lie in
/// `timestamp − 60 s ..= timestamp + tier delay + 60 s` (scheduler.rs `check_due`). But
/// `hand_off` computes the envelope (and its due time) once, before the first send
/// (handoff.rs:247), while `send_durably` stamps every *attempt* with a fresh `now_ms()`
/// (handoff.rs:361). A hand-off that keeps failing for longer than the tier delay + 60 s (a
/// broker or retry-topic outage of a minute) is finally written with a timestamp more than
/// 60 s after its own due time: the retry consumer takes the genuine retry for a forged one
/// and dead-letters it as `invalid-envelope` instead of retrying it.
///
/// Takes ~70 s: the outage has to outlast the 60 s slack (`DUE_SLACK`, a constant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sent_after_a_minute_long_outage_is_retried_not_dead_lettered() {
    let topic = "rv-long-outage";
    let (cluster, config) = unique(topic, 1);
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = Arc::clone(&release);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&attempts);
    let handler = sidetrack::handler_fn(move |msg: Message, _cx: Context| {
        let gate = Arc::clone(&gate);
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().unwrap().push(msg.attempt());
            if msg.attempt() == 1 {
                drop(gate.acquire().await);
                return Err(HandlerError::retryable("fails once"));
            }
            Ok(())
        }
    });
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(handler)
        .started()
        .await;
    produce_to(&cluster, topic, &["r".to_owned()], 1).await;
    wait_for("the record in the handler", || {
        attempts.lock().unwrap().len() == 1
    })
    .await;
    // The retry tier cannot be written to for 65 s (every Produce fails with a retriable
    // error); the group itself stays healthy.
    cluster.fail_requests(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 20_000],
    );
    release.add_permits(1);
    wait_for("the hand-off failing", || rt.stats().handoff_failures > 0).await;
    // The outage itself (the scenario), not a synchronisation.
    tokio::time::sleep(Duration::from_secs(65)).await;
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    wait_for("the record retried or dead-lettered", || {
        let s = rt.stats();
        s.handled + s.total_dead_lettered() >= 1
    })
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(
        stats.dead_lettered(Reason::InvalidEnvelope),
        0,
        "a genuine retry was dead-lettered as forged: {stats:?}"
    );
    assert_eq!(stats.handled, 1, "{stats:?}");
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2]);
}

// ------------------------------------------------------------------ 3. config: auto-commit switched off

/// `enable.auto.commit=false` is refused because "without it nothing is committed until
/// shutdown, and a crash hands everything handled since the start to the next owner". librdkafka
/// also switches the periodic commit off with `auto.commit.interval.ms=0` ("0 = disable",
/// rdkafka_conf.c; the timer is only started when it is > 0, rdkafka_cgrp.c:552): the same
/// effect, accepted.
#[test]
fn switching_auto_commit_off_through_its_interval_is_refused() {
    let mut c = sidetrack::Config::new("localhost:9092", "billing", ["orders"]);
    c.consumer
        .insert("auto.commit.interval.ms".into(), "0".into());
    assert!(
        c.validate().is_err(),
        "auto.commit.interval.ms=0 disables auto-commit and was accepted"
    );
}

// ------------------------------------------------------------------ 4. stall: shutdown leaves a retiring task running

/// A partition revoked while its handler call still runs is kept in `retiring` (its
/// supervisor's `JoinHandle` is dropped). `Group::stop` waits for and aborts only the tasks in
/// `slots`, never the retiring ones; such a task keeps an `Arc` of the consumer (and of
/// `Shared`), so the "close" in `stop` only drops one reference: the consumer is not closed and
/// does not leave the group. `run()` returns while (a) that handler call still runs, past
/// `shutdown_timeout`, and (b) the member stays in the group holding its other partitions
/// until librdkafka's `max.poll.interval.ms` (5 min by default) runs out: for that long
/// nobody handles them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_leave_a_revoked_call_running_and_the_member_in_the_group() {
    let topic = "rv-retiring-shutdown";
    let (cluster, mut config) = unique(topic, 2);
    config.shutdown_timeout = Duration::from_millis(500);
    let in_a = Gated::closed();
    let a = two_calls_in(&cluster, &config, topic, in_a.clone(), || {
        in_a.calls.load(Ordering::SeqCst)
    })
    .await;
    // B joins and takes one partition: A's task for it is revoked mid-call (retiring).
    let in_b = Recorder::new(|_| Ok(()));
    let b = join_and_take_one(&cluster, &config, &a, in_b.clone()).await;
    let stays = a.assigned_partitions()[0].1;
    // A stops: its remaining call is abandoned after shutdown_timeout, so the record of the
    // partition A keeps belongs to B next.
    a.shutdown().await.unwrap();
    let still_running = in_a.running();
    let taken_over = sidetrack::testing::wait_until(WAIT, || {
        std::future::ready(in_b.all().iter().any(|x| x.partition == stays))
    })
    .await;
    in_a.gate.add_permits(1000);
    b.shutdown().await.unwrap();
    assert!(
        taken_over,
        "{WAIT:?} after A's graceful shutdown, partition {stays} was still A's (A never left \
         the group); A handler calls still running after run() returned: {still_running}"
    );
    assert_eq!(
        still_running, 0,
        "a handler call of A still ran after its shutdown had returned"
    );
}

// ------------------------------------------------------------------ 5. double run: a partition moved twice

/// "When a partition comes back to the same process while its old task is still in a handler
/// call, the new task waits for the old one to end." The wait is one link deep: the new
/// supervisor takes the old one's `finished` token out of `retiring`. If the partition moves
/// away again while the new supervisor is still waiting, `revoke` puts the *waiting*
/// supervisor's token into `retiring`, and that supervisor ends at once (its wait selects on
/// `revoked`). When the partition comes back a second time, the third task finds an ended
/// predecessor and starts, while the first task's handler call is still running: the record
/// is in two handler calls at once in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_away_twice_still_waits_for_its_first_task() {
    let topic = "rv-moved-twice";
    let (cluster, mut config) = unique(topic, 2);
    config.shutdown_timeout = Duration::from_millis(500);
    let in_a = Gated::closed();
    let a = two_calls_in(&cluster, &config, topic, in_a.clone(), || {
        in_a.calls.load(Ordering::SeqCst)
    })
    .await;
    // Each round a new member joins (takes one partition; its call never ends, so nothing is
    // committed) and leaves again (the partition comes back to A). With two partitions, by
    // the third round one of them has moved away a second time.
    let mut overlapped = false;
    for round in 1..=3 {
        let b = join_and_take_one(&cluster, &config, &a, Gated::closed()).await;
        b.shutdown().await.unwrap();
        wait_for(&format!("round {round}: both partitions back on A"), || {
            a.assigned_partitions().len() == 2
        })
        .await;
        // Nothing to wait for when all is well, so the window simply ends.
        overlapped = sidetrack::testing::wait_until(Duration::from_secs(5), || {
            std::future::ready(in_a.most.load(Ordering::SeqCst) > 1)
        })
        .await;
        if overlapped {
            eprintln!("overlap seen in round {round}");
            break;
        }
    }
    in_a.gate.add_permits(1000);
    a.shutdown().await.unwrap();
    assert!(
        !overlapped,
        "a record was in two handler calls at once in one instance"
    );
}

// ------------------------------------------------------------------ 6. stall: a blocking handler across revoke and assign back

/// A handler that makes a synchronous call (`tokio::task::block_in_place`, the documented way
/// to block inside a multi-threaded runtime; plain blocking does the same) cannot see a
/// revocation until the call returns, so its task keeps its handle of the partition queue. If
/// the partition comes back to this process meanwhile, `assign` splits a new handle of the
/// same librdkafka queue for the new task. When the old task ends it drops its handle, and
/// rdkafka's `StreamPartitionQueue::drop` disables the queue's wake-up callback, which the
/// queue shares with the new handle (`rd_kafka_queue_cb_event_enable` sets it on the
/// underlying queue; the project's own notes, pitfall 2). The new task is never woken for a
/// record again: the partition is assigned, healthy-looking, and silent for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_assigned_back_during_a_blocking_call_keeps_flowing() {
    let topic = "rv-blocking-back";
    let (cluster, mut config) = unique(topic, 2);
    config.shutdown_timeout = Duration::from_millis(500);
    let gate = BlockingGate::default();
    let blocking = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::<(i32, String)>::new()));
    let handler = {
        let (gate, blocking, seen) = (gate.clone(), Arc::clone(&blocking), Arc::clone(&seen));
        sidetrack::handler_fn(move |msg: Message, _cx: Context| {
            let (gate, blocking, seen) = (gate.clone(), Arc::clone(&blocking), Arc::clone(&seen));
            async move {
                let id = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
                seen.lock().unwrap().push((msg.partition(), id));
                if blocking.load(Ordering::SeqCst) {
                    // A synchronous call that takes a while (a blocking client library).
                    tokio::task::block_in_place(|| gate.wait());
                }
                Ok(())
            }
        })
    };
    let a = two_calls_in(&cluster, &config, topic, handler, || {
        seen.lock().unwrap().len()
    })
    .await;
    // B joins (takes one partition) and leaves again (it comes back to A) while A's calls
    // still block.
    let b = join_and_take_one(&cluster, &config, &a, Recorder::new(|_| Ok(()))).await;
    b.shutdown().await.unwrap();
    wait_for("both partitions back on A", || {
        a.assigned_partitions().len() == 2
    })
    .await;
    // The blocking calls return; from now on the handler does not block.
    blocking.store(false, Ordering::SeqCst);
    gate.open();
    let fresh = payloads("n", 10);
    produce_to(&cluster, topic, &fresh, 2).await;
    let handled = sidetrack::testing::wait_until(WAIT, || {
        let got: HashSet<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| p.clone())
            .collect();
        std::future::ready(fresh.iter().all(|p| got.contains(p)))
    })
    .await;
    let got: HashSet<(i32, String)> = seen.lock().unwrap().iter().cloned().collect();
    let missing: Vec<&String> = fresh
        .iter()
        .filter(|p| !got.iter().any(|(_, q)| q == *p))
        .collect();
    a.shutdown().await.unwrap();
    assert!(
        handled,
        "records produced after the partition came back were never handled: {missing:?}"
    );
}

// ------------------------------------------------------------------ max.poll.interval.ms

/// `max.poll.interval.ms` (60 s by default here, the group's rebalance timeout) is also
/// librdkafka's liveness check: a consumer not polled for that long leaves the group and its
/// partitions go elsewhere. The runtime polls each consumer's main queue whatever the handlers
/// do, so a handler call longer than it keeps its partition: one call, the offset committed
/// after it, no second delivery. (A runtime that polled only between records would leave the
/// group 6 s into the call and hand the record out again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_call_longer_than_max_poll_interval_keeps_its_partition() {
    // A runtime that stops polling hangs at shutdown: bounded, so that is a failure too.
    within_limit(a_long_call_keeps_its_partition()).await
}

async fn a_long_call_keeps_its_partition() {
    let topic = "long-call";
    let (cluster, mut config) = unique(topic, 1);
    // The lowest librdkafka accepts: not below `session.timeout.ms` (6 s in these tests).
    config
        .consumer
        .insert("max.poll.interval.ms".into(), "6000".into());
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        sidetrack::handler_fn(move |_msg: Message, _cx: Context| {
            let calls = Arc::clone(&calls);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(9)).await;
                Ok(())
            }
        })
    };
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(handler)
        .started()
        .await;
    wait_for("the partition assigned", || {
        rt.assigned_partitions().len() == 1
    })
    .await;
    produce_to(&cluster, topic, &payloads("slow", 1), 1).await;
    let group = format!("{topic}-g");
    let committed = sidetrack::testing::wait_until(WAIT, || async {
        cluster
            .committed_offset(&group, topic, 0)
            .await
            .ok()
            .flatten()
            == Some(1)
    })
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert!(committed, "the record's offset was never committed");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the record was delivered again"
    );
    assert_eq!(stats.handled, 1);
}

// ------------------------------------------------------------------ 7. leak: in-flight gauge

/// `sidetrack_records_in_flight` is incremented before the handler call and decremented after
/// it (partition.rs:453-457), with no guard: a call abandoned at shutdown (its future dropped
/// by `finish_tasks`' abort) leaves +1 for ever in this process. (Older than the reviewed
/// commits; the pause gauge got a guard in them, this one did not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_call_leaves_no_in_flight_count_behind() {
    let topic = "rv-in-flight";
    let group = "rv-in-flight-g";
    let (cluster, mut config) = unique(topic, 1);
    config.shutdown_timeout = Duration::from_millis(300);
    let in_a = Gated::closed();
    let rt = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(in_a.clone())
        .started()
        .await;
    produce_to(&cluster, topic, &payloads("r", 1), 1).await;
    wait_for("the record in the handler", || {
        gauge(m::RECORDS_IN_FLIGHT, &[("group", group)]) == 1.0
    })
    .await;
    rt.shutdown().await.unwrap();
    assert_eq!(in_a.running(), 0, "the call was abandoned");
    assert_eq!(
        gauge(m::RECORDS_IN_FLIGHT, &[("group", group)]),
        0.0,
        "in-flight gauge left behind by an abandoned call"
    );
}
