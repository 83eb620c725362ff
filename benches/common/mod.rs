//! What every benchmark needs: a broker (the embedded one, or `SIDETRACK_BENCH_BROKERS`), a
//! pre-produced backlog, steady-state rates, percentiles, CPU time and resident memory.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sidetrack::testing::EmbeddedCluster;
use sidetrack::RuntimeBuilder;

/// The broker a benchmark runs against.
pub struct Bench {
    /// Kept alive for the run when embedded.
    pub embedded: Option<EmbeddedCluster>,
    pub bootstrap: String,
    /// Topic names get this suffix so runs against a real broker do not collide.
    pub run_id: String,
}

impl Bench {
    /// Starts the broker and prints the benchmark's header line: `what`, then the broker, the
    /// cores, the consumer properties every consumer of the run gets and the hand-off
    /// producer's.
    pub fn start(what: impl std::fmt::Display) -> Bench {
        let bench = Bench::connect();
        println!(
            "{what}; {}, {} cores, consumer properties {:?}, hand-off producer properties {:?}",
            bench.broker_name(),
            cores(),
            bench.consumer_props(),
            bench.producer_props()
        );
        bench
    }

    fn connect() -> Bench {
        let run_id = format!(
            "{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        match std::env::var("SIDETRACK_BENCH_BROKERS") {
            Ok(b) if !b.is_empty() => Bench {
                embedded: None,
                bootstrap: b,
                run_id,
            },
            _ => {
                let cluster = EmbeddedCluster::start().expect("embedded cluster");
                Bench {
                    bootstrap: cluster.bootstrap_servers().to_owned(),
                    embedded: Some(cluster),
                    run_id,
                }
            }
        }
    }

    pub fn broker_name(&self) -> &'static str {
        if self.embedded.is_some() {
            "embedded broker"
        } else {
            "SIDETRACK_BENCH_BROKERS"
        }
    }

    /// librdkafka consumer properties for every consumer of a benchmark, runtime and baselines
    /// alike: `SIDETRACK_BENCH_CONSUMER_PROPS` (comma-separated `key=value`), else on the
    /// embedded broker `fetch.wait.max.ms=10`: the mock broker ends a fetch long-poll only
    /// when `fetch.wait.max.ms` runs out, not when records arrive, so with the default 500 ms
    /// every consumer stalls up to half a second whenever its queue runs dry.
    pub fn consumer_props(&self) -> Vec<(String, String)> {
        let spec = match std::env::var("SIDETRACK_BENCH_CONSUMER_PROPS") {
            Ok(v) => v,
            Err(_) if self.embedded.is_some() => "fetch.wait.max.ms=10".to_owned(),
            Err(_) => String::new(),
        };
        parse_props(&spec)
    }

    /// librdkafka properties for the runtime's hand-off producer:
    /// `SIDETRACK_BENCH_PRODUCER_PROPS` (comma-separated `key=value`), else none. On Tansu use
    /// `batch.num.messages=1`: it counts a multi-record batch as one offset, and hand-offs sent
    /// in one batch would not all be readable from the retry topics.
    pub fn producer_props(&self) -> Vec<(String, String)> {
        parse_props(&std::env::var("SIDETRACK_BENCH_PRODUCER_PROPS").unwrap_or_default())
    }

    /// Creates a topic named `name` plus this run's suffix; returns its full name.
    pub async fn fresh_topic(&self, name: &str, partitions: i32) -> String {
        let topic = self.topic(name);
        self.create_topic(&topic, partitions).await;
        topic
    }

    /// A fresh topic name for this run.
    pub fn topic(&self, name: &str) -> String {
        format!("{name}-{}", self.run_id)
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        if let Some(c) = &self.embedded {
            c.create_topic(name, partitions).expect("create topic");
            return;
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        admin
            .create_topics([&topic], &AdminOptions::new())
            .await
            .expect("create topic");
    }

    /// A runtime builder wired to this broker (side topics created by the runtime on a real
    /// broker, up front on the embedded one, which has no CreateTopics).
    /// Builds and starts a runtime on this broker with `handler`.
    pub async fn start_runtime(
        &self,
        config: sidetrack::Config,
        handler: impl sidetrack::Handler,
    ) -> sidetrack::RuntimeHandle {
        self.builder(config)
            .handler(handler)
            .build()
            .expect("config")
            .start()
            .await
            .expect("runtime")
    }

    fn builder(&self, config: sidetrack::Config) -> RuntimeBuilder {
        let mut config = config;
        config.brokers = self.bootstrap.clone();
        for (k, v) in self.consumer_props() {
            config.consumer.insert(k, v);
        }
        for (k, v) in self.producer_props() {
            config.producer.insert(k, v);
        }
        let b = sidetrack::Runtime::builder(config);
        match &self.embedded {
            Some(c) => b.embedded(c),
            None => b,
        }
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            // The embedded broker keeps ~5 MiB per partition uncompressed.
            .set("compression.type", "lz4")
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .expect("producer")
    }

    /// Produces `n` records of `size` bytes round-robin over `partitions`, key = i % 1024.
    /// `payload(i)` may replace the filler bytes (its output is padded to `size`).
    pub async fn backlog(
        &self,
        topic: &str,
        partitions: i32,
        n: u64,
        size: usize,
        payload: impl Fn(u64) -> Vec<u8>,
    ) {
        let producer = self.producer();
        let mut pending = Vec::with_capacity(10_000);
        for i in 0..n {
            let key = (i % 1024).to_string();
            let mut body = payload(i);
            if body.len() < size {
                body.resize(size, b'x');
            }
            let rec = FutureRecord::to(topic)
                .key(&key)
                .payload(&body)
                .partition((i % partitions as u64) as i32);
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
    }
}

/// Records per second between 10 % and 100 % of `n` (the first 10 % absorb the group join
/// and the first fetches).
pub async fn steady_rate(n: u64, count: impl Fn() -> u64) -> f64 {
    steady_rate_within(n, Duration::MAX, count).await
}

/// [`steady_rate`], measured for at most `window` after 10 %. NaN when the records were all
/// counted before the window opened (a backlog too small to measure).
pub async fn steady_rate_within(n: u64, window: Duration, count: impl Fn() -> u64) -> f64 {
    let from = n / 10;
    while count() < from.max(1) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let first = count();
    while count() < n && started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let counted = count().min(n) - first.min(n);
    if counted == 0 {
        return f64::NAN;
    }
    counted as f64 / started.elapsed().as_secs_f64()
}

/// The `q` quantile (0..=1) of `v` (sorted in place).
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// CPU seconds (user + system) this process has used.
pub fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu(&s))
        .map_or(f64::NAN, |(_, cpu)| cpu)
}

/// CPU seconds used by this process's threads whose name does not start with `prefix` (the
/// embedded broker's thread is `rdk:mock`: it shares the process but is not the runtime).
pub fn cpu_seconds_without(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| stat_cpu(&s))
        .filter(|(name, _)| !name.starts_with(prefix))
        .map(|(_, cpu)| cpu)
        .sum()
}

/// The thread or process name and its CPU seconds (user + system) from a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Option<(String, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    // utime and stime, in clock ticks (USER_HZ, 100 on Linux).
    Some((name, (field(11)? + field(12)?) / 100.0))
}

/// Resident set size now, in MiB.
pub fn rss_mib() -> f64 {
    status_kib("VmRSS:") / 1024.0
}

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |c| c.get())
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Comma-separated `key=value` pairs.
fn parse_props(spec: &str) -> Vec<(String, String)> {
    spec.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Produces `n` records to `topic` at `rate`/s (record `i` to partition `i % partitions`, key
/// `key(i)`, payload `i`), then waits up to `window` until `handled()` reaches the number of
/// records `failing(i)` called healthy, and returns that number. The paced half of the
/// failure benchmarks; [`latency_summary`] reads the result.
#[allow(dead_code)] // each bench binary compiles this module; not all use it
pub async fn produce_paced(
    producer: &FutureProducer,
    topic: &str,
    (n, rate, partitions): (u64, u64, i32),
    key: impl Fn(u64) -> String,
    failing: impl Fn(u64) -> bool,
    (handled, window): (impl Fn() -> u64, Duration),
) -> u64 {
    let started = Instant::now();
    let mut healthy = 0;
    for i in 0..n {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        if !failing(i) {
            healthy += 1;
        }
        let (key, body) = (key(i), i.to_string());
        let rec = FutureRecord::to(topic)
            .key(&key)
            .payload(&body)
            .partition((i % partitions as u64) as i32);
        let _ = producer.send_result(rec);
    }
    let deadline = Instant::now() + window;
    while handled() < healthy && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    healthy
}

/// The p50 and p99 of `latencies` (ms), and the share of the `healthy` records they cover.
#[allow(dead_code)]
pub fn latency_summary(latencies: &std::sync::Mutex<Vec<f64>>, healthy: u64) -> (f64, f64, f64) {
    let mut l = latencies.lock().map(|v| v.clone()).unwrap_or_default();
    let share = l.len() as f64 / healthy as f64;
    (quantile(&mut l, 0.5), quantile(&mut l, 0.99), share)
}
