//! The cost of `[retry] keep_key_order`: `key` ordering, 1 % of records failing once (to a
//! 100 ms retry tier), with and without `keep_key_order`, in the same run. Reports healthy-record
//! throughput on a backlog and healthy end-to-end latency (p50/p99, record timestamp to handled)
//! on a paced stream, side by side, and the ratio of each to the run without it (the baseline).
//!
//! With `keep_key_order` the later records of a failing record's key are held (written to the
//! key-order log and read back) until it is retried, so their latency includes the retry delay:
//! that is the point of the feature, and what the p99 shows. Other keys are not held.
//!
//! ```text
//! cargo bench --bench key_order
//! SIDETRACK_BENCH_RECORDS=20000 SIDETRACK_BENCH_RATE=1000 cargo bench --bench key_order
//! ```
//!
//! Prints figures and ratios; asserts nothing.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{now_ms, Bench};
use sidetrack::config::{Ordering as RecordOrdering, RetryConfig};
use sidetrack::{Config, Context, Handler, HandlerError, Message, Tier};

const PARTITIONS: i32 = 4;
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// One record in this many fails once.
const FAIL_EVERY: u64 = 100;
/// Keys of the stream (records of one key are spread over the stream).
const KEYS: u64 = 1024;
/// Longest a throughput window may last.
const WINDOW: Duration = Duration::from_secs(20);

struct Counts {
    healthy: AtomicU64,
    latencies: Mutex<Vec<f64>>,
}

/// Record `id` fails on its first attempt when `id % FAIL_EVERY == 0`; every other handled
/// record counts as healthy, with its end-to-end latency.
struct H(Arc<Counts>);

impl Handler for H {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let id: u64 = msg.payload_str()?.trim_end_matches('x').parse()?;
        if id % FAIL_EVERY == 0 {
            if msg.attempt() == 1 {
                return Err(HandlerError::retryable("first attempt fails"));
            }
            return Ok(());
        }
        if let Some(ts) = msg.timestamp() {
            self.0
                .latencies
                .lock()
                .map_err(|_| HandlerError::permanent("poisoned"))?
                .push((now_ms() - ts) as f64);
        }
        self.0.healthy.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn config(bench: &Bench, topic: &str, group: &str, keep: bool) -> Config {
    let mut c = Config::new(&bench.bootstrap, group, [topic]);
    c.ordering = RecordOrdering::Key;
    c.max_in_flight = 64;
    c.retry = RetryConfig {
        keep_key_order: keep,
        ..RetryConfig::tiers([Tier::new(RETRY_DELAY, 3)])
    };
    c.shutdown_timeout = Duration::from_secs(1);
    c
}

fn counts() -> Arc<Counts> {
    Arc::new(Counts {
        healthy: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
    })
}

/// Healthy records handled per second between 10 % of them and the end (or `WINDOW`).
async fn throughput(bench: &Bench, topic: &str, group: &str, keep: bool, healthy: u64) -> f64 {
    let c = counts();
    let h = bench
        .start_runtime(config(bench, topic, group, keep), H(Arc::clone(&c)))
        .await;
    let rate =
        common::steady_rate_within(healthy, WINDOW, || c.healthy.load(Ordering::Relaxed)).await;
    let _ = h.shutdown().await;
    rate
}

/// Produces `n` records at `rate`/s while the runtime runs; returns (p50, p99) of the healthy
/// records' end-to-end latency and the share of them handled.
async fn latency(
    bench: &Bench,
    topic: &str,
    group: &str,
    keep: bool,
    n: u64,
    rate: u64,
) -> (f64, f64, f64) {
    let c = counts();
    let h = bench
        .start_runtime(config(bench, topic, group, keep), H(Arc::clone(&c)))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let healthy = common::produce_paced(
        &bench.producer(),
        topic,
        (n, rate, PARTITIONS),
        |i| (i % KEYS).to_string(),
        |i| i % FAIL_EVERY == 0,
        (|| c.healthy.load(Ordering::Relaxed), WINDOW),
    )
    .await;
    let _ = h.shutdown().await;
    common::latency_summary(&c.latencies, healthy)
}

#[tokio::main]
async fn main() {
    let n = common::env_u64("SIDETRACK_BENCH_RECORDS", 100_000);
    let paced = common::env_u64("SIDETRACK_BENCH_PACED", 5_000);
    let rate = common::env_u64("SIDETRACK_BENCH_RATE", 1_000);
    let bench = Bench::start(format_args!(
        "key_order: `key` ordering, 1 record in {FAIL_EVERY} failing once (retry after {RETRY_DELAY:?}); backlog of {n} records, then {paced} paced at {rate}/s; {PARTITIONS} partitions, {KEYS} keys"
    ));
    let healthy = (0..n).filter(|i| i % FAIL_EVERY != 0).count() as u64;
    let mut base: Option<(f64, f64)> = None;
    for keep in [false, true] {
        let tag = if keep { "keep" } else { "base" };
        let topic = bench
            .fresh_topic(&format!("key-order-{tag}"), PARTITIONS)
            .await;
        bench
            .backlog(&topic, PARTITIONS, n, 0, |i| i.to_string().into_bytes())
            .await;
        let tput = throughput(&bench, &topic, &format!("ko-{tag}"), keep, healthy).await;
        let live = bench
            .fresh_topic(&format!("key-order-live-{tag}"), PARTITIONS)
            .await;
        let (p50, p99, share) =
            latency(&bench, &live, &format!("kol-{tag}"), keep, paced, rate).await;
        let (t0, p0) = *base.get_or_insert((tput, p99));
        println!(
            "  keep_key_order = {keep:<5}  healthy {tput:>9.0} records/s ({:.2}x baseline), e2e p50 {p50:>6.0} ms, p99 {p99:>6.0} ms ({:.2}x baseline){}",
            tput / t0,
            p99 / p0,
            if share < 1.0 {
                format!(", only {:.0}% of healthy records handled within {WINDOW:?} of the last send", share * 100.0)
            } else {
                String::new()
            }
        );
    }
}
