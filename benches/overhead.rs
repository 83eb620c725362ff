//! Framework overhead: sidetrack with a no-op handler against the fastest raw rdkafka loop
//! (one split partition queue and one tokio task per partition), on the same pre-produced
//! backlog in the same run.
//!
//! ```text
//! cargo bench --bench overhead                       # 200,000 records of 100 bytes
//! SIDETRACK_BENCH_RECORDS=1000000 cargo bench --bench overhead
//! ```
//!
//! Runs on the embedded broker (lz4, since it keeps only ~5 MiB per partition). Prints records/s
//! for both and the ratio; asserts nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext};
use sidetrack::testing::EmbeddedCluster;
use sidetrack::{handler_fn, Config, Context, HandlerError, Message, Runtime};

const TOPIC: &str = "bench";
const PARTITIONS: i32 = 4;

#[derive(Default)]
struct SplitContext {
    consumer: OnceLock<Weak<StreamConsumer<SplitContext>>>,
    count: Arc<AtomicU64>,
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
                tokio::spawn(async move {
                    while let Ok(m) = queue.recv().await {
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
        .set("fetch.queue.backoff.ms", "10")
        .set("partition.assignment.strategy", "cooperative-sticky");
    c
}

/// Records per second from the first record seen to the last, polling `count`.
async fn measure(n: u64, count: impl Fn() -> u64) -> f64 {
    while count() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let first = count();
    while count() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (n - first) as f64 / started.elapsed().as_secs_f64()
}

async fn raw(bootstrap: &str, n: u64) -> f64 {
    let context = SplitContext::default();
    let count = Arc::clone(&context.count);
    let consumer: StreamConsumer<SplitContext> = consumer_config(bootstrap, "raw")
        .create_with_context(context)
        .expect("raw consumer");
    let consumer = Arc::new(consumer);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    // The main queue must be served for rebalances to happen.
    let main = Arc::clone(&consumer);
    let poller = tokio::spawn(async move {
        loop {
            let _ = main.recv().await;
        }
    });
    let rate = measure(n, || count.load(Ordering::Relaxed)).await;
    poller.abort();
    rate
}

async fn runtime(cluster: &EmbeddedCluster, n: u64) -> f64 {
    let mut config = Config::new("embedded", "st", [TOPIC]);
    config.shutdown_timeout = Duration::from_secs(5);
    let handle = Runtime::builder(config)
        .embedded(cluster)
        .handler(handler_fn(|_m: Message, _cx: Context| async {
            Ok::<(), HandlerError>(())
        }))
        .build()
        .expect("config")
        .start()
        .await
        .expect("runtime");
    let rate = measure(n, || handle.stats().handled).await;
    let _ = handle.shutdown().await;
    rate
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::var("SIDETRACK_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let cluster = EmbeddedCluster::start().expect("embedded cluster");
    cluster.create_topic(TOPIC, PARTITIONS).expect("topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("compression.type", "lz4")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let payload = [b'x'; 100];
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let key = (i % 1024).to_string();
        let rec = FutureRecord::to(TOPIC).key(&key).payload(&payload[..]);
        match producer.send_result(rec) {
            Ok(f) => pending.push(f),
            Err((e, _)) => panic!("produce: {e}"),
        }
        if pending.len() == 10_000 {
            for f in pending.drain(..) {
                let _ = f.await;
            }
        }
    }
    for f in pending {
        let _ = f.await;
    }
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!("overhead: {n} records of 100 bytes, {PARTITIONS} partitions, embedded broker, {cores} cores");
    let raw_rate = raw(cluster.bootstrap_servers(), n).await;
    println!("  raw split-queue loop      {raw_rate:>12.0} records/s");
    let st_rate = runtime(&cluster, n).await;
    println!("  sidetrack, no-op handler  {st_rate:>12.0} records/s");
    println!("  ratio sidetrack/raw       {:>12.2}", st_rate / raw_rate);
}
