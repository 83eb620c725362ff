//! Key-ordered and unordered concurrency inside a partition: per-key order and exclusion,
//! overlap across keys, offsets committed only at the contiguous frontier, failing records
//! leaving for their tier while other keys flow, and a partition assigned back never running
//! a key twice at once. Each scenario runs on the embedded broker and, when configured, on a
//! real broker.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::producer::FutureRecord;
use sidetrack::config::Ordering as RecordOrdering;
use sidetrack::{Context, Handler, HandlerError, Message};

/// Produces `(key, payload)` records to `partition` of the scenario's topic, many in flight
/// at once (an idempotent producer keeps them in order); returns their offsets.
async fn produce_keyed(env: &Env, records: &[(String, String)], partition: i32) -> Vec<i64> {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", env.bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // Tansu 0.6 cannot fetch from the middle of a multi-record batch (see the notes).
        .set(
            "batch.num.messages",
            if env.is_embedded() { "10000" } else { "1" },
        )
        .create()
        .unwrap();
    let mut sends = FuturesUnordered::new();
    for (i, (k, v)) in records.iter().enumerate() {
        let record: FutureRecord<'_, str, str> = FutureRecord::to(env.topic())
            .key(k.as_str())
            .payload(v.as_str())
            .partition(partition);
        let fut = producer.send_result(record).map_err(|(e, _)| e).unwrap();
        sends.push(async move { (i, fut.await) });
    }
    let mut offsets = vec![0; records.len()];
    while let Some((i, done)) = sends.next().await {
        offsets[i] = done.unwrap().map_err(|(e, _)| e).unwrap().offset;
    }
    offsets
}

/// One handler call as seen by [`Tracker`].
#[derive(Debug, Clone)]
struct Call {
    key: String,
    offset: i64,
    attempt: u32,
    /// Order in which calls started and ended (one counter for both).
    start: usize,
    end: usize,
}

/// Records every call's start and end (in one global sequence), sleeps a random 0–3 ms, and
/// tracks how many calls run at once, overall and per key.
#[derive(Clone, Default)]
struct Tracker {
    clock: Arc<AtomicUsize>,
    calls: Arc<Mutex<Vec<Call>>>,
    active: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    per_key: Arc<Mutex<HashMap<String, usize>>>,
    most_per_key: Arc<AtomicUsize>,
    /// A key whose first attempt fails (retryable).
    failing_key: Option<String>,
}

impl Handler for Tracker {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let start = self.clock.fetch_add(1, Ordering::SeqCst);
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        {
            let mut per_key = self.per_key.lock().unwrap();
            let n = per_key.entry(key.clone()).or_default();
            *n += 1;
            self.most_per_key.fetch_max(*n, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3000))).await;
        *self.per_key.lock().unwrap().get_mut(&key).unwrap() -= 1;
        self.active.fetch_sub(1, Ordering::SeqCst);
        let end = self.clock.fetch_add(1, Ordering::SeqCst);
        self.calls.lock().unwrap().push(Call {
            key: key.clone(),
            offset: msg.offset(),
            attempt: msg.attempt(),
            start,
            end,
        });
        if self.failing_key.as_deref() == Some(key.as_str()) && msg.attempt() == 1 {
            return Err(HandlerError::retryable("this key fails its first attempt"));
        }
        Ok(())
    }
}

fn keyed(n: usize, keys: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("k{}", fastrand::usize(0..keys)), format!("v{i}")))
        .collect()
}

/// `key` ordering: thousands of records over hundreds of keys on one partition. Records of a
/// key are first handled in offset order and never two at once; different keys overlap.
async fn key_order_holds_and_keys_overlap(env: Env) {
    let mut config = env.config();
    config.ordering = RecordOrdering::Key;
    config.max_in_flight = 64;
    let tracker = Tracker::default();
    let rt = env.builder(config).handler(tracker.clone()).started().await;
    let n = if env.is_embedded() { 3000 } else { 1000 };
    let records = keyed(n, 200);
    produce_keyed(&env, &records, 0).await;
    wait_for("every record handled", || rt.stats().handled == n as u64).await;
    rt.shutdown().await.unwrap();
    let calls = tracker.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), n, "each record handled once");
    assert_eq!(
        tracker.most_per_key.load(Ordering::SeqCst),
        1,
        "a key in two handler calls at once"
    );
    let mut by_key: HashMap<&str, Vec<&Call>> = HashMap::new();
    for c in &calls {
        by_key.entry(&c.key).or_default().push(c);
    }
    for (key, mut calls) in by_key {
        calls.sort_by_key(|c| c.start);
        let offsets: Vec<i64> = calls.iter().map(|c| c.offset).collect();
        let mut sorted = offsets.clone();
        sorted.sort();
        assert_eq!(offsets, sorted, "key {key} handled out of offset order");
        for pair in calls.windows(2) {
            assert!(pair[0].end < pair[1].start, "key {key}: calls overlap");
        }
    }
    let most = tracker.most.load(Ordering::SeqCst);
    assert!(
        most > 1,
        "different keys ran concurrently (most at once: {most})"
    );
}
on_every_broker!(key_order, 1, key_order_holds_and_keys_overlap);

/// `unordered`: records overlap, even of the same key.
async fn unordered_records_overlap(env: Env) {
    let mut config = env.config();
    config.ordering = RecordOrdering::Unordered;
    config.max_in_flight = 16;
    let tracker = Tracker::default();
    let rt = env.builder(config).handler(tracker.clone()).started().await;
    let records = keyed(400, 1);
    produce_keyed(&env, &records, 0).await;
    wait_for("every record handled", || rt.stats().handled == 400).await;
    rt.shutdown().await.unwrap();
    assert!(tracker.most.load(Ordering::SeqCst) > 1);
    assert!(
        tracker.most.load(Ordering::SeqCst) <= 16,
        "max_in_flight is a bound"
    );
    assert!(tracker.most_per_key.load(Ordering::SeqCst) > 1);
}
on_every_broker!(unordered, 1, unordered_records_overlap);

/// Blocks records whose payload is `slow` until the gate opens; everything else is handled at
/// once.
#[derive(Clone)]
struct SlowOne {
    gate: Arc<tokio::sync::Semaphore>,
    handled: Arc<AtomicUsize>,
}

impl Handler for SlowOne {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        if msg.payload() == Some(b"slow") {
            drop(self.gate.acquire().await);
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A slow record pins the committed offset while the records after it finish: nothing past a
/// record in flight is committed. Once it finishes, the offset moves to the end.
async fn a_slow_record_pins_the_committed_offset(env: Env) {
    let mut config = env.config();
    config.ordering = RecordOrdering::Unordered;
    let handler = SlowOne {
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        handled: Arc::default(),
    };
    let rt = env.builder(config).handler(handler.clone()).started().await;
    let mut records: Vec<(String, String)> =
        (0..5).map(|i| (format!("a{i}"), "fast".into())).collect();
    records.push(("b".into(), "slow".into()));
    records.extend((0..20).map(|i| (format!("c{i}"), "fast".to_string())));
    let offsets = produce_keyed(&env, &records, 0).await;
    let slow_at = offsets[5];
    wait_for("every record but the slow one handled", || {
        handler.handled.load(Ordering::SeqCst) == records.len() - 1
    })
    .await;
    let (group, topic) = (env.group().to_owned(), env.topic().to_owned());
    // The frontier reaches the slow record (everything before it is committed)…
    let reached = sidetrack::testing::wait_until(WAIT, || {
        let (env, group, topic) = (env.clone(), group.clone(), topic.clone());
        async move { env.committed_offset(&group, &topic, 0).await == Some(slow_at) }
    })
    .await;
    assert!(reached, "committed up to the slow record");
    // …and stays there while it is in flight (watched over several commit intervals).
    let passed = sidetrack::testing::wait_until(Duration::from_secs(4), || {
        let (env, group, topic) = (env.clone(), group.clone(), topic.clone());
        async move {
            env.committed_offset(&group, &topic, 0)
                .await
                .is_some_and(|o| o > slow_at)
        }
    })
    .await;
    assert!(!passed, "committed past a record still in flight");
    handler.gate.add_permits(1);
    let end = offsets.last().unwrap() + 1;
    let done = sidetrack::testing::wait_until(WAIT, || {
        let (env, group, topic) = (env.clone(), group.clone(), topic.clone());
        async move { env.committed_offset(&group, &topic, 0).await == Some(end) }
    })
    .await;
    assert!(done, "committed to the end once the slow record is done");
    rt.shutdown().await.unwrap();
}
on_every_broker!(slow_pins, 1, a_slow_record_pins_the_committed_offset);

/// `key` ordering with one failing key: its record leaves for the retry tier without holding
/// back other keys, and is handled on its retry.
async fn a_failing_key_leaves_for_its_tier_while_others_flow(env: Env) {
    let mut config = env.config();
    config.ordering = RecordOrdering::Key;
    let tracker = Tracker {
        failing_key: Some("k0".into()),
        ..Tracker::default()
    };
    let rt = env.builder(config).handler(tracker.clone()).started().await;
    let mut records = vec![("k0".to_string(), "bad".to_string())];
    records.extend((1..60).map(|i| (format!("k{i}"), format!("v{i}"))));
    produce_keyed(&env, &records, 0).await;
    wait_for("every record handled, the failing one on its retry", || {
        rt.stats().handled == 60
    })
    .await;
    let stats = rt.shutdown().await.unwrap();
    assert_eq!(stats.total_retried(), 1);
    assert_eq!(stats.total_dead_lettered(), 0);
    let calls = tracker.calls.lock().unwrap().clone();
    let retry = calls
        .iter()
        .find(|c| c.key == "k0" && c.attempt == 2)
        .expect("k0 retried");
    let others_before_retry = calls
        .iter()
        .filter(|c| c.key != "k0" && c.end < retry.start)
        .count();
    assert!(
        others_before_retry > 0,
        "other keys were handled while k0 waited in its tier"
    );
}
on_every_broker!(
    failing_key,
    1,
    a_failing_key_leaves_for_its_tier_while_others_flow
);

/// `key` ordering: a partition revoked from an instance while several keys are in handler
/// calls, then assigned back to it, never runs one key twice at once in that instance.
async fn a_partition_assigned_back_never_runs_a_key_twice(env: Env) {
    let mut config = env.config();
    config.ordering = RecordOrdering::Key;
    config.shutdown_timeout = Duration::from_millis(500);
    let in_a = Gated::by_key();
    let a = env
        .builder(config.clone())
        .handler(in_a.clone())
        .started()
        .await;
    wait_for("both partitions on A", || {
        a.assigned_partitions().len() == 2
    })
    .await;
    // Keys are ordered per partition: each partition gets keys of its own.
    for (p, prefix) in [(0, "a"), (1, "b")] {
        let records: Vec<(String, String)> = (0..6)
            .map(|i| (format!("{prefix}{i}"), format!("v{i}")))
            .collect();
        produce_keyed(&env, &records, p).await;
    }
    wait_for("twelve calls in A", || {
        in_a.calls.load(Ordering::SeqCst) == 12
    })
    .await;
    let b = env.builder(config).handler(Gated::by_key()).started().await;
    wait_for("one partition moved to B", || {
        a.assigned_partitions().len() == 1 && b.assigned_partitions().len() == 1
    })
    .await;
    b.shutdown().await.unwrap();
    wait_for("both partitions back on A", || {
        a.assigned_partitions().len() == 2
    })
    .await;
    let overlapped = sidetrack::testing::wait_until(Duration::from_secs(5), || {
        std::future::ready(in_a.most.load(Ordering::SeqCst) > 1)
    })
    .await;
    assert!(
        !overlapped,
        "a key was in two handler calls at once in one instance"
    );
    in_a.gate.add_permits(10_000);
    wait_for("the moved partition's records handled again by A", || {
        in_a.calls.load(Ordering::SeqCst) == 18
    })
    .await;
    a.shutdown().await.unwrap();
    assert_eq!(in_a.most.load(Ordering::SeqCst), 1);
}
on_every_broker!(
    assigned_back_keys,
    2,
    a_partition_assigned_back_never_runs_a_key_twice
);

/// `max_ahead` bounds how far past a record in flight the partition reads: with a record stuck
/// at the front, at most `max_ahead` records are taken.
async fn max_ahead_bounds_the_records_taken_past_a_stuck_one(env: Env) {
    let mut config = env.config();
    config.ordering = RecordOrdering::Unordered;
    config.max_ahead = 50;
    let handler = SlowOne {
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        handled: Arc::default(),
    };
    let rt = env.builder(config).handler(handler.clone()).started().await;
    let mut records = vec![("s".to_string(), "slow".to_string())];
    records.extend((0..200).map(|i| (format!("f{i}"), "fast".to_string())));
    produce_keyed(&env, &records, 0).await;
    wait_for("the window filled", || {
        handler.handled.load(Ordering::SeqCst) == 49
    })
    .await;
    let more = sidetrack::testing::wait_until(Duration::from_secs(2), || {
        std::future::ready(handler.handled.load(Ordering::SeqCst) > 49)
    })
    .await;
    assert!(!more, "took more than max_ahead records past a stuck one");
    handler.gate.add_permits(1);
    wait_for("everything handled", || rt.stats().handled == 201).await;
    rt.shutdown().await.unwrap();
}
on_every_broker!(
    max_ahead,
    1,
    max_ahead_bounds_the_records_taken_past_a_stuck_one
);
