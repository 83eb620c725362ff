//! Memory under backlog: a slow handler (1 ms per record) drains a backlog of 1 KB records for
//! a fixed time, twice: with a small backlog and with a 5× larger one. Resident memory is
//! sampled every 100 ms; the runtime's share is the peak minus what the process held just
//! before it started (the embedded broker lives in the same process and holds the backlog).
//!
//! ```text
//! cargo bench --bench memory                              # 200,000 and 1,000,000 records
//! SIDETRACK_BENCH_RECORDS=1000000 SIDETRACK_BENCH_SECONDS=20 cargo bench --bench memory
//! ```
//!
//! Target: peak ≤ 150 MB and flat, not growing with the backlog. Asserts nothing.

mod common;

use std::time::{Duration, Instant};

use common::{rss_mib, Bench};
use sidetrack::{handler_fn, Config, Context, HandlerError, Message};

const PARTITIONS: i32 = 4;
const SIZE: usize = 1024;

/// (RSS before start, peak RSS while draining, RSS at the end of the window), MiB.
async fn drain(bench: &Bench, topic: &str, seconds: u64) -> (f64, f64, f64, u64) {
    let before = rss_mib();
    let mut config = Config::new("", format!("mem-{topic}"), [topic]);
    config.shutdown_timeout = Duration::from_secs(2);
    let h = bench
        .start_runtime(
            config,
            handler_fn(|_m: Message, _cx: Context| async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<(), HandlerError>(())
            }),
        )
        .await;
    let mut peak = before;
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_mib());
    }
    let last = rss_mib();
    let handled = h.stats().handled;
    let _ = h.shutdown().await;
    (before, peak, last, handled)
}

#[tokio::main]
async fn main() {
    let big = common::env_u64("SIDETRACK_BENCH_RECORDS", 1_000_000);
    let seconds = common::env_u64("SIDETRACK_BENCH_SECONDS", 15);
    let bench = Bench::start(format_args!(
        "memory: 1 ms handler draining {SIZE} B records for {seconds} s, {PARTITIONS} partitions"
    ));
    let mut first: Option<f64> = None;
    for n in [big / 5, big] {
        let topic = bench.fresh_topic(&format!("memory-{n}"), PARTITIONS).await;
        bench
            .backlog(&topic, PARTITIONS, n, SIZE, |_| Vec::new())
            .await;
        let (before, peak, last, handled) = drain(&bench, &topic, seconds).await;
        let grew = peak - before;
        let base = *first.get_or_insert(grew);
        println!(
            "  backlog {n:>8}: RSS before {before:.0} MiB, peak {peak:.0} MiB, at end {last:.0} MiB; runtime's share {grew:.1} MiB ({:.2}x the small backlog's); {handled} handled",
            grew / base.max(0.1)
        );
    }
}
