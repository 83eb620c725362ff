//! Retry timing: 10,000 records fail on their first attempt and go through one or two retry
//! tiers (5 s, then 10 s). For every retried attempt the handler records its lateness (handled
//! at − due at, from the envelope); the CPU the process uses while every record waits for its
//! due time is measured over that quiet window.
//!
//! ```text
//! cargo bench --bench retry_timing
//! SIDETRACK_BENCH_RECORDS=2000 cargo bench --bench retry_timing
//! ```
//!
//! Prints the lateness distribution (never negative is the promise; p99 ≤ 50 ms the target) and
//! CPU while waiting; asserts nothing.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cpu_seconds, cpu_seconds_without, now_ms, quantile, Bench};
use sidetrack::config::RetryConfig;
use sidetrack::{Config, Context, Handler, HandlerError, Message, Tier};

const PARTITIONS: i32 = 4;

struct Timing {
    first_attempts: AtomicU64,
    done: AtomicU64,
    lateness: Mutex<Vec<f64>>,
}

struct H(Arc<Timing>);

impl Handler for H {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let t = &self.0;
        let id: u64 = msg.payload_str()?.parse()?;
        if let Some(due) = msg.envelope().and_then(|e| e.due) {
            t.lateness
                .lock()
                .map_err(|_| HandlerError::permanent("poisoned"))?
                .push((now_ms() - due) as f64);
        }
        // Odd ids need one retry, even ids two.
        let failures = 1 + (id % 2) as u32;
        if msg.attempt() == 1 {
            t.first_attempts.fetch_add(1, Ordering::Relaxed);
        }
        if msg.attempt() <= failures {
            return Err(HandlerError::retryable("not yet"));
        }
        t.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let n = common::env_u64("SIDETRACK_BENCH_RECORDS", 10_000);
    let bench = Bench::start(format_args!(
        "retry timing: {n} records, tiers 5 s then 10 s, {PARTITIONS} partitions"
    ));
    let topic = bench.fresh_topic("retry-timing", PARTITIONS).await;
    let mut config = Config::new("", "timing", [topic.as_str()]);
    config.retry = RetryConfig::tiers([
        Tier::new(Duration::from_secs(5), 1),
        Tier::new(Duration::from_secs(10), 1),
    ]);
    let timing = Arc::new(Timing {
        first_attempts: AtomicU64::new(0),
        done: AtomicU64::new(0),
        lateness: Mutex::new(Vec::new()),
    });
    let h = bench.start_runtime(config, H(Arc::clone(&timing))).await;
    bench
        .backlog(&topic, PARTITIONS, n, 0, |i| i.to_string().into_bytes())
        .await;
    let started = Instant::now();
    while timing.first_attempts.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_pass = started.elapsed();
    // Every record now waits on the 5 s tier: measure CPU until the first retry is due.
    let quiet_from = Instant::now();
    let (cpu0, own0) = (cpu_seconds(), cpu_seconds_without("rdk:mock"));
    while timing.lateness.lock().map_or(0, |l| l.len()) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let quiet = quiet_from.elapsed();
    let (cpu, own) = (cpu_seconds() - cpu0, cpu_seconds_without("rdk:mock") - own0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while timing.done.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = h.shutdown().await.expect("shutdown");
    let mut late = timing
        .lateness
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    let min = late.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "  first attempts of {n} records took {:.2} s; {} retried attempts, {} done, {} dead-lettered",
        first_pass.as_secs_f64(),
        late.len(),
        timing.done.load(Ordering::Relaxed),
        stats.total_dead_lettered()
    );
    println!(
        "  lateness (handled − due): min {min:.0} ms, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        quantile(&mut late, 0.5),
        quantile(&mut late, 0.99),
        quantile(&mut late, 1.0)
    );
    println!(
        "  CPU while all records waited for their due time, over {:.2} s: whole process {:.1} % of one core; without the embedded broker's thread {:.1} %",
        quiet.as_secs_f64(),
        100.0 * cpu / quiet.as_secs_f64(),
        100.0 * own / quiet.as_secs_f64()
    );
}
