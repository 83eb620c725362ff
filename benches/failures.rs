//! The cost of failures: the same stream with 0 %, 1 % and 10 % of records failing once, on
//! sidetrack (failed records go to a 100 ms retry topic) and on a blocking in-place retry
//! baseline (the same handler sleeping 100 ms and retrying on the partition, as teams write by
//! hand). Reports healthy-record throughput on a backlog and healthy end-to-end latency
//! (p50/p99, record timestamp to handled) on a paced stream.
//!
//! ```text
//! cargo bench --bench failures
//! SIDETRACK_BENCH_RECORDS=20000 SIDETRACK_BENCH_RATE=1000 cargo bench --bench failures
//! SIDETRACK_BENCH_ONLY=sidetrack cargo bench --bench failures    # one side alone
//! ```
//!
//! Prints figures and ratios; asserts nothing.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{now_ms, Bench};
use sidetrack::config::RetryConfig;
use sidetrack::{Config, Context, Handler, HandlerError, Message, Tier};

const PARTITIONS: i32 = 4;
const RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest a throughput window may last (the blocking baseline can take minutes at 10 %).
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Sidetrack,
    Blocking,
}

struct Bad {
    every: u64,
    mode: Mode,
    healthy: AtomicU64,
    latencies: Mutex<Vec<f64>>,
}

impl Bad {
    fn failing(&self, id: u64) -> bool {
        self.every > 0 && id % self.every == 0
    }
}

/// The handler, sharing its counters with the benchmark.
struct H(Arc<Bad>);

impl Handler for H {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let bad = &self.0;
        let id: u64 = msg.payload_str()?.trim_end_matches('x').parse()?;
        if bad.failing(id) {
            match bad.mode {
                // Fails once; the runtime moves it to the retry topic.
                Mode::Sidetrack if msg.attempt() == 1 => {
                    return Err(HandlerError::retryable("first attempt fails"))
                }
                Mode::Sidetrack => {}
                // Sleeps and tries again in place: the partition waits.
                Mode::Blocking => tokio::time::sleep(RETRY_DELAY).await,
            }
            return Ok(());
        }
        if let Some(ts) = msg.timestamp() {
            bad.latencies
                .lock()
                .map_err(|_| HandlerError::permanent("poisoned"))?
                .push((now_ms() - ts) as f64);
        }
        bad.healthy.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn config(bench: &Bench, topic: &str, group: &str) -> Config {
    let mut c = Config::new(&bench.bootstrap, group, [topic]);
    c.retry = RetryConfig::tiers([Tier::new(RETRY_DELAY, 3)]);
    c.shutdown_timeout = Duration::from_secs(1);
    c
}

/// Healthy records handled per second between 10 % of them and the end (or `WINDOW`).
async fn throughput(bench: &Bench, topic: &str, group: &str, bad: Arc<Bad>, healthy: u64) -> f64 {
    let h = bench
        .start_runtime(config(bench, topic, group), H(Arc::clone(&bad)))
        .await;
    let rate =
        common::steady_rate_within(healthy, WINDOW, || bad.healthy.load(Ordering::Relaxed)).await;
    let _ = h.shutdown().await;
    rate
}

/// Produces `n` records at `rate`/s while the runtime runs; returns (p50, p99, handled share)
/// of the healthy records' end-to-end latency.
async fn latency(
    bench: &Bench,
    topic: &str,
    group: &str,
    bad: Arc<Bad>,
    n: u64,
    rate: u64,
) -> (f64, f64, f64) {
    let h = bench
        .start_runtime(config(bench, topic, group), H(Arc::clone(&bad)))
        .await;
    // Let the group settle before the clock matters.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let healthy = common::produce_paced(
        &bench.producer(),
        topic,
        (n, rate, PARTITIONS),
        |i| i.to_string(),
        |i| bad.failing(i),
        (|| bad.healthy.load(Ordering::Relaxed), WINDOW),
    )
    .await;
    let _ = h.shutdown().await;
    common::latency_summary(&bad.latencies, healthy)
}

#[tokio::main]
async fn main() {
    let n = common::env_u64("SIDETRACK_BENCH_RECORDS", 100_000);
    let paced = common::env_u64("SIDETRACK_BENCH_PACED", 5_000);
    let rate = common::env_u64("SIDETRACK_BENCH_RATE", 1_000);
    let bench = Bench::start(format_args!(
        "failures: backlog of {n} records, then {paced} records paced at {rate}/s; {PARTITIONS} partitions, retry after {RETRY_DELAY:?}"
    ));
    let mut base: Option<(f64, f64)> = None;
    // SIDETRACK_BENCH_ONLY=sidetrack|blocking runs one side alone, for profiling it.
    let only = std::env::var("SIDETRACK_BENCH_ONLY").unwrap_or_default();
    for mode in [Mode::Sidetrack, Mode::Blocking] {
        let side = if mode == Mode::Sidetrack {
            "sidetrack"
        } else {
            "blocking"
        };
        if !only.is_empty() && only != side {
            continue;
        }
        let name = match mode {
            Mode::Sidetrack => "sidetrack (retry topic)",
            Mode::Blocking => "blocking in-place retry",
        };
        for (pct, every) in [(0, 0u64), (1, 100), (10, 10)] {
            let tag = format!(
                "{}-{pct}",
                if mode == Mode::Sidetrack { "st" } else { "blk" }
            );
            let topic = bench
                .fresh_topic(&format!("failures-{tag}"), PARTITIONS)
                .await;
            bench
                .backlog(&topic, PARTITIONS, n, 0, |i| i.to_string().into_bytes())
                .await;
            let bad = |every| {
                Arc::new(Bad {
                    every,
                    mode,
                    healthy: AtomicU64::new(0),
                    latencies: Mutex::new(Vec::new()),
                })
            };
            let healthy = (0..n).filter(|i| every == 0 || i % every != 0).count() as u64;
            let tput = throughput(&bench, &topic, &format!("g-{tag}"), bad(every), healthy).await;
            let live = bench
                .fresh_topic(&format!("failures-live-{tag}"), PARTITIONS)
                .await;
            let (p50, p99, share) =
                latency(&bench, &live, &format!("gl-{tag}"), bad(every), paced, rate).await;
            let (t0, p0) = *base.get_or_insert((tput, p99));
            println!(
                "  {name:<24} {pct:>2}% failing: healthy {tput:>9.0} records/s ({:.2}x its 0% run), e2e p50 {p50:>6.0} ms, p99 {p99:>6.0} ms ({:.2}x its 0% run){}",
                tput / t0,
                p99 / p0,
                if share < 1.0 {
                    format!(", only {:.0}% of healthy records handled within {WINDOW:?} of the last send", share * 100.0)
                } else {
                    String::new()
                }
            );
        }
        base = None;
    }
}
