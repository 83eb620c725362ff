//! Framework overhead: sidetrack with a no-op handler, in each ordering, against the fastest
//! raw rdkafka loops on the same pre-produced backlog in the same run: split partition queues
//! with one tokio task per partition (as is, and doing what any at-least-once loop must: an
//! owned copy of each record and an offset store after it), and a plain `BaseConsumer` poll
//! loop. Then a handler that awaits 1 ms per record (an I/O-bound handler), 4 partitions,
//! 1,024 keys, in `partition` ordering and in `key` and `unordered` ordering with 64 and 256
//! handler calls in flight per partition.
//!
//! ```text
//! cargo bench --bench overhead                          # 1,000,000 records, 100 B and 1 KB
//! SIDETRACK_BENCH_RECORDS=200000 SIDETRACK_BENCH_ROUNDS=1 cargo bench --bench overhead
//! SIDETRACK_BENCH_BROKERS=127.0.0.1:9092 cargo bench --bench overhead
//! SIDETRACK_BENCH_CONSUMER_PROPS=fetch.wait.max.ms=10 cargo bench --bench overhead
//! SIDETRACK_BENCH_ONLY=sidetrack cargo bench --bench overhead   # one side alone (profiling)
//! # OpenTelemetry on (feature `otel`): a `[tracing]` section sampling this ratio of traces,
//! # spans exported over OTLP/HTTP to SIDETRACK_BENCH_OTLP (default http://localhost:4318)
//! SIDETRACK_BENCH_OTEL_SAMPLING=0.01 cargo bench --features otel --bench overhead
//! ```
//!
//! The raw loops get the runtime's prefetch bounds and the benchmark's consumer properties
//! (`Bench::consumer_props`: `fetch.wait.max.ms=10` on the embedded broker), so both sides
//! fetch alike.
//!
//! Rates are measured from 10 % to 100 % of the backlog (the group join and first fetches are
//! left out). Prints figures and ratios; asserts nothing.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use common::{quantile, steady_rate, Bench};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientConfig, ClientContext};
use sidetrack::config::Ordering as RecordOrdering;
use sidetrack::{Config, Context, Handler, HandlerError, Message};

const PARTITIONS: i32 = 4;
/// The benchmark's consumer properties, for the raw loops (the runtime gets them from
/// `Bench::builder`).
static PROPS: OnceLock<Vec<(String, String)>> = OnceLock::new();
/// Feature `otel`: the runtime's `[tracing]` section when `SIDETRACK_BENCH_OTEL_SAMPLING` is set.
#[cfg(feature = "otel")]
static OTEL: OnceLock<Option<sidetrack::telemetry::TracingConfig>> = OnceLock::new();

#[derive(Default)]
struct SplitContext {
    consumer: OnceLock<Weak<StreamConsumer<SplitContext>>>,
    count: Arc<AtomicU64>,
    /// Do what any at-least-once loop must: take the record out of librdkafka's buffer (an
    /// owned copy of key, payload and headers) and store its offset once it is handled.
    at_least_once: bool,
}

impl ClientContext for SplitContext {}

impl ConsumerContext for SplitContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else {
            return;
        };
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        for e in tpl.elements() {
            if let Some(queue) = consumer.split_partition_queue(e.topic(), e.partition()) {
                let count = Arc::clone(&self.count);
                let at_least_once = self.at_least_once;
                let consumer = Arc::clone(&consumer);
                tokio::spawn(async move {
                    while let Ok(m) = queue.recv().await {
                        if at_least_once {
                            let owned = m.detach();
                            std::hint::black_box(&owned);
                            let _ = consumer.store_offset_from_message(&m);
                        }
                        drop(m);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }
}

fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // The stored loop stores offsets itself, as the runtime does.
        .set("enable.auto.offset.store", "false")
        .set("fetch.queue.backoff.ms", "10")
        .set("partition.assignment.strategy", "cooperative-sticky");
    // The same prefetch bounds as the runtime's consumers, so both read alike.
    c.set("queued.max.messages.kbytes", "8192")
        .set("queued.min.messages", "10000");
    for (k, v) in PROPS.get().into_iter().flatten() {
        c.set(k, v);
    }
    c
}

async fn raw_split(bootstrap: &str, topic: &str, n: u64, at_least_once: bool, round: u64) -> f64 {
    let context = SplitContext {
        at_least_once,
        ..SplitContext::default()
    };
    let count = Arc::clone(&context.count);
    let consumer: StreamConsumer<SplitContext> =
        consumer_config(bootstrap, &format!("raw-{at_least_once}-{round}-{topic}"))
            .create_with_context(context)
            .expect("raw consumer");
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer.subscribe(&[topic]).expect("subscribe");
    // The main queue must be served for rebalances to happen.
    let main = Arc::clone(&consumer);
    let poller = tokio::spawn(async move {
        loop {
            let _ = main.recv().await;
        }
    });
    let rate = steady_rate(n, || count.load(Ordering::Relaxed)).await;
    poller.abort();
    rate
}

/// The plain loop: one thread polling one `BaseConsumer`.
async fn raw_poll(bootstrap: &str, topic: &str, n: u64, round: u64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        let consumer: BaseConsumer = consumer_config(&bootstrap, &format!("poll-{round}-{topic}"))
            .create()
            .expect("poll consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        while !stop2.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                drop(m);
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let rate = steady_rate(n, || count.load(Ordering::Relaxed)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    rate
}

/// The no-op handler: returns at once.
struct NoOp;

impl Handler for NoOp {
    async fn handle(&self, _msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A handler that awaits `0` per record.
struct Work(Duration);

impl Handler for Work {
    async fn handle(&self, _msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        tokio::time::sleep(self.0).await;
        Ok(())
    }
}

/// sidetrack with a handler that awaits `work` per record, in `mode`.
async fn sidetrack(
    bench: &Bench,
    topic: &str,
    n: u64,
    work: Duration,
    round: u64,
    (ordering, max_in_flight): (RecordOrdering, usize),
) -> f64 {
    let mut config = Config::new(
        "",
        format!("st-{round}-{}-{max_in_flight}-{topic}", ordering.as_str()),
        [topic],
    );
    config.shutdown_timeout = Duration::from_secs(5);
    config.ordering = ordering;
    config.max_in_flight = max_in_flight;
    #[cfg(feature = "otel")]
    {
        config.tracing = OTEL.get().cloned().flatten();
    }
    let handle = if work.is_zero() {
        bench.start_runtime(config, NoOp).await
    } else {
        bench.start_runtime(config, Work(work)).await
    };
    let rate = steady_rate(n, || handle.stats().handled).await;
    let _ = handle.shutdown().await;
    rate
}

#[tokio::main]
async fn main() {
    let n = common::env_u64("SIDETRACK_BENCH_RECORDS", 1_000_000);
    let bench = Bench::start(format_args!(
        "overhead: {n} records, {PARTITIONS} partitions, median of {} rounds",
        common::env_u64("SIDETRACK_BENCH_ROUNDS", 5).max(1)
    ));
    let _ = PROPS.set(bench.consumer_props());
    #[cfg(feature = "otel")]
    let _telemetry = {
        let tracing = std::env::var("SIDETRACK_BENCH_OTEL_SAMPLING")
            .ok()
            .map(|r| sidetrack::telemetry::TracingConfig {
                sampling_ratio: Some(r.parse().expect("SIDETRACK_BENCH_OTEL_SAMPLING: a ratio")),
                endpoint: std::env::var("SIDETRACK_BENCH_OTLP").ok(),
                service_name: Some("sidetrack-bench".into()),
                ..Default::default()
            });
        if let Some(t) = &tracing {
            println!(
                "otel on: sampling {:?}, endpoint {:?}",
                t.sampling_ratio, t.endpoint
            );
        }
        let _ = OTEL.set(tracing.clone());
        tracing.as_ref().map(|t| {
            sidetrack::telemetry::export::install(Some(t), "sidetrack-bench", false)
                .expect("tracing config")
        })
    };
    let rounds = common::env_u64("SIDETRACK_BENCH_ROUNDS", 5).max(1);
    for size in [100usize, 1024] {
        let topic = bench
            .fresh_topic(&format!("overhead-{size}"), PARTITIONS)
            .await;
        bench
            .backlog(&topic, PARTITIONS, n, size, |_| Vec::new())
            .await;
        // SIDETRACK_BENCH_ONLY=split|stored|poll|sidetrack runs one side alone, for profiling it.
        let only = std::env::var("SIDETRACK_BENCH_ONLY").unwrap_or_default();
        let runs = |side: &str| only.is_empty() || only == side;
        // Rounds interleave the sides, and each side's median is reported: on a shared
        // machine one run of one side can be off by a third.
        let (mut split, mut stored, mut poll) = (vec![], vec![], vec![]);
        let modes = [
            (RecordOrdering::Partition, 1),
            (RecordOrdering::Key, 64),
            (RecordOrdering::Unordered, 64),
        ];
        let mut st: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for round in 0..rounds {
            let b = &bench.bootstrap;
            if runs("split") {
                split.push(raw_split(b, &topic, n, false, round).await);
            }
            if runs("stored") {
                stored.push(raw_split(b, &topic, n, true, round).await);
            }
            if runs("poll") {
                poll.push(raw_poll(b, &topic, n, round).await);
            }
            for (i, mode) in modes.iter().enumerate() {
                if runs("sidetrack") || runs(mode.0.as_str()) {
                    st[i].push(sidetrack(&bench, &topic, n, Duration::ZERO, round, *mode).await);
                }
            }
        }
        let [split, stored, poll] = [&mut split, &mut stored, &mut poll].map(|v| quantile(v, 0.5));
        let fastest = split.max(poll);
        println!("  {size:>5} B  raw split-queue loop      {split:>10.0} records/s");
        println!("  {size:>5} B  raw split-queue, stored   {stored:>10.0} records/s (owned copy + offset store)");
        println!("  {size:>5} B  raw BaseConsumer poll     {poll:>10.0} records/s");
        for ((ordering, in_flight), rates) in modes.iter().zip(&mut st) {
            let rate = quantile(rates, 0.5);
            let name = format!("{}/{in_flight}", ordering.as_str());
            println!(
                "  {size:>5} B  sidetrack {name:<13} {rate:>10.0} records/s, {:.2} of the fastest raw loop, {:.2} of the stored loop",
                rate / fastest,
                rate / stored
            );
        }
    }
    // 1 ms of awaited work per record (an I/O-bound handler), 4 partitions, 1,024 keys: one
    // record at a time per partition, against key-ordered and unordered concurrency.
    let slow = common::env_u64("SIDETRACK_BENCH_SLOW_RECORDS", 300_000);
    if slow == 0 {
        return;
    }
    let work = Duration::from_millis(1);
    let mut base = f64::NAN;
    for (mode, records) in [
        ((RecordOrdering::Partition, 1), 8_000.min(slow)),
        ((RecordOrdering::Key, 64), slow),
        ((RecordOrdering::Key, 256), slow),
        ((RecordOrdering::Unordered, 64), slow),
        ((RecordOrdering::Unordered, 256), slow),
    ] {
        let name = format!("{}/{}", mode.0.as_str(), mode.1);
        let topic = bench
            .fresh_topic(
                &format!("overhead-slow-{}-{}", mode.0.as_str(), mode.1),
                PARTITIONS,
            )
            .await;
        bench
            .backlog(&topic, PARTITIONS, records, 100, |_| Vec::new())
            .await;
        let rate = sidetrack(&bench, &topic, records, work, 0, mode).await;
        if mode.0 == RecordOrdering::Partition {
            base = rate;
            println!("  1 ms handler, {PARTITIONS} partitions, 1,024 keys: {name:<13} {rate:>10.0} records/s ({records} records)");
        } else {
            println!(
                "  1 ms handler, {PARTITIONS} partitions, 1,024 keys: {name:<13} {rate:>10.0} records/s ({records} records), {:.1}x partition ordering",
                rate / base
            );
        }
    }
}
