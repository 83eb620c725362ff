//! The HTTP produce proxy against a raw rdkafka producer sending the same records, in the same
//! run (the raw producer is the limit: the proxy adds HTTP, JSON and a synchronous answer).
//!
//! * raw producer, pipelined: records/s with everything in flight at once;
//! * raw producer, 16 concurrent senders each awaiting its record: latency p50/p99;
//! * proxy, single-record requests over 1, 16 and 64 keep-alive connections;
//! * proxy, 100-record requests over 16 connections.
//!
//! Every client is closed-loop (sends its next request when the last is answered) and runs in
//! this process, on the same cores as the proxy and the embedded broker. Both producers get
//! the proxy's settings (acks=all, idempotence, linger, lz4; on the embedded broker one request
//! in flight per connection, see `ProxyBuilder::embedded`).
//!
//! `SIDETRACK_BENCH_SECS` (default 5) per scenario, `SIDETRACK_BENCH_LINGER_MS` (default: the proxy's, 1),
//! `SIDETRACK_BENCH_BROKERS` for a real broker.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{cores, cpu_seconds, env_u64, quantile, Bench};
use http_body_util::{BodyExt, Full};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sidetrack::proxy::{Proxy, ProxyConfig, ProxyHandle};

const PARTITIONS: i32 = 4;
const VALUE_BYTES: usize = 100;

struct Figures {
    requests: u64,
    records: u64,
    secs: f64,
    latencies_ms: Vec<f64>,
    cpu: f64,
    errors: u64,
}

impl Figures {
    fn print(&mut self, what: &str, raw_records_per_sec: f64) {
        let rps = self.records as f64 / self.secs;
        let p50 = quantile(&mut self.latencies_ms, 0.5);
        let p99 = quantile(&mut self.latencies_ms, 0.99);
        println!(
            "{what:<44} {:>9.0} req/s {:>10.0} records/s  p50 {:>6.2} ms  p99 {:>6.2} ms  {:>5.2}x raw  cpu {:>4.0}%  non-200 {}",
            self.requests as f64 / self.secs,
            rps,
            p50,
            p99,
            rps / raw_records_per_sec,
            100.0 * self.cpu / self.secs,
            self.errors
        );
    }
}

fn value(i: u64) -> Vec<u8> {
    let mut v = format!("{i:020}").into_bytes();
    v.resize(VALUE_BYTES, b'x');
    v
}

fn raw_producer(bench: &Bench, linger_ms: u64) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &bench.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms.to_string())
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000");
    if bench.embedded.is_some() {
        c.set("max.in.flight.requests.per.connection", "1");
    }
    c.create().expect("raw producer")
}

/// Raw producer, everything pipelined: the records/s limit.
async fn raw_pipelined(p: &FutureProducer, topic: &str, secs: f64) -> Figures {
    let started = Instant::now();
    let cpu0 = cpu_seconds();
    let mut sent = 0u64;
    let mut pending = std::collections::VecDeque::new();
    while started.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            let v = value(sent);
            let key = (sent % 1024).to_string();
            let r = FutureRecord::to(topic).key(&key).payload(&v);
            match p.send_result(r) {
                Ok(f) => pending.push_back(f),
                Err(_) => break,
            }
            sent += 1;
        }
        while pending.len() > 20_000 {
            if let Some(f) = pending.pop_front() {
                let _ = f.await;
            }
        }
    }
    for f in pending {
        let _ = f.await;
    }
    let secs = started.elapsed().as_secs_f64();
    Figures {
        requests: sent,
        records: sent,
        secs,
        latencies_ms: Vec::new(),
        cpu: cpu_seconds() - cpu0,
        errors: 0,
    }
}

/// Raw producer, `n` senders each awaiting its own record: the latency floor.
async fn raw_closed_loop(p: &FutureProducer, topic: &str, n: usize, secs: f64) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..n {
        let (p, topic, stop) = (p.clone(), topic.to_owned(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c as u64 * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                let v = value(i);
                let key = (i % 1024).to_string();
                let t = Instant::now();
                let r = FutureRecord::to(&topic).key(&key).payload(&v);
                if let Ok(f) = p.send_result(r) {
                    let _ = f.await;
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    Figures {
        requests: lat.len() as u64,
        records: lat.len() as u64,
        secs,
        latencies_ms: lat,
        cpu: cpu_seconds() - cpu0,
        errors: 0,
    }
}

/// `conns` keep-alive HTTP/1.1 connections, each sending `per_request`-record requests in a
/// closed loop for `secs`.
async fn http_load(
    proxy: &ProxyHandle,
    topic: &str,
    conns: usize,
    per_request: usize,
    secs: f64,
) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let addr = proxy.local_addr();
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (stop, path) = (stop.clone(), format!("/topics/{topic}"));
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            // Bodies are built before the clock starts: building JSON is the client's cost, not
            // the proxy's (the raw producer's per-record allocations are measured, though).
            let bodies: Vec<Bytes> = (0..16u64)
                .map(|b| {
                    let mut body = String::from("{\"records\":[");
                    for j in 0..per_request as u64 {
                        if j > 0 {
                            body.push(',');
                        }
                        let i = c as u64 * 1_000_000 + b * per_request as u64 + j;
                        let v = String::from_utf8(value(i)).unwrap_or_default();
                        body.push_str(&format!("{{\"key\":\"{}\",\"value\":\"{v}\"}}", i % 1024));
                    }
                    body.push_str("]}");
                    Bytes::from(body)
                })
                .collect();
            let (mut lat, mut errors, mut n) = (Vec::new(), 0u64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let body = bodies[n % bodies.len()].clone();
                n += 1;
                let req = hyper::Request::post(path.as_str())
                    .header("host", "bench")
                    .header("content-type", "application/vnd.kafka.json.v2+json")
                    .body(Full::new(body))
                    .expect("request");
                let t = Instant::now();
                let Ok(resp) = sender.send_request(req).await else {
                    break;
                };
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                if !ok {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = lat.len() as u64 - errors;
    Figures {
        requests: lat.len() as u64,
        records: ok * per_request as u64,
        secs,
        latencies_ms: lat,
        cpu: cpu_seconds() - cpu0,
        errors,
    }
}

#[tokio::main]
async fn main() {
    let secs = env_u64("SIDETRACK_BENCH_SECS", 5) as f64;
    let linger = env_u64(
        "SIDETRACK_BENCH_LINGER_MS",
        ProxyConfig::default().linger.as_millis() as u64,
    );
    let bench = Bench::start(format!(
        "proxy: {VALUE_BYTES}-byte JSON-string values, {PARTITIONS} partitions, linger {linger} ms, {secs} s per scenario"
    ));
    println!("load: {:.2} (1 min), {} cores", load_avg(), cores());
    let topic = bench.fresh_topic("proxy-bench", PARTITIONS).await;

    let raw = raw_producer(&bench, linger);
    let mut pipelined = raw_pipelined(&raw, &topic, secs).await;
    let limit = pipelined.records as f64 / pipelined.secs;
    pipelined.print("raw producer, pipelined (the limit)", limit);
    raw_closed_loop(&raw, &topic, 16, secs)
        .await
        .print("raw producer, 16 senders awaiting each record", limit);

    let config = ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        linger: Duration::from_millis(linger),
        brokers: bench.bootstrap.clone(),
        ..ProxyConfig::default()
    };
    let mut builder = Proxy::builder(config).producer_property("compression.type", "lz4");
    if let Some(c) = &bench.embedded {
        builder = builder.embedded(c);
    }
    for (k, v) in bench.producer_props() {
        builder = builder.producer_property(k, v);
    }
    let proxy = builder
        .build()
        .expect("proxy")
        .start()
        .await
        .expect("start");
    // Warm up: connections, metadata.
    http_load(&proxy, &topic, 4, 1, 1.0).await;
    for conns in [1, 16, 64] {
        http_load(&proxy, &topic, conns, 1, secs).await.print(
            &format!("proxy, 1-record requests, {conns} connections"),
            limit,
        );
    }
    // The machine is shared: the raw producer is measured again right before each batched
    // scenario, and that scenario's ratio is to it.
    for conns in [16, 64] {
        let mut raw_now = raw_pipelined(&raw, &topic, secs).await;
        let limit_now = raw_now.records as f64 / raw_now.secs;
        raw_now.print("raw producer, pipelined (again)", limit_now);
        http_load(&proxy, &topic, conns, 100, secs).await.print(
            &format!("proxy, 100-record requests, {conns} connections"),
            limit_now,
        );
    }
    proxy.shutdown().await;
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}
