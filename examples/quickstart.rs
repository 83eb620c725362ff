//! sidetrack quickstart.
//!
//! With no broker given, starts the embedded broker, produces 1,000 demo orders, runs the
//! handler until every order is handled or dead-lettered, prints a summary and exits:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! With `--brokers HOST:PORT` (or `KAFKA_BROKERS`) it consumes `--topic` with `--group` from
//! that broker until Ctrl-C or `--idle-exit SECS` without traffic; `--produce-demo` also
//! produces the demo orders first.
//!
//! Demo semantics: the payload is JSON `{"id": string, "amount_cents": integer, "flaky":
//! optional integer}`. Invalid JSON is poison (DLQ at once); `amount_cents < 0` is a permanent
//! error (DLQ at once); `flaky: n` fails (retryable) on its first `n` attempts, then succeeds.

use std::time::{Duration, Instant};

use clap::Parser;
use serde::Deserialize;
use sidetrack::config::RetryConfig;
use sidetrack::mocking::{read_all, EmbeddedCluster};
use sidetrack::{Config, Context, Handler, HandlerError, Message, Reason, Runtime, Tier};

#[derive(Parser, Debug)]
#[command(about = "sidetrack quickstart: a handler with retry topics and a dead-letter topic")]
struct Args {
    /// Kafka bootstrap servers; without them the embedded broker is started.
    #[arg(long, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Topic to consume.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Consumer group.
    #[arg(long, default_value = "quickstart")]
    group: String,
    /// Produce the 1,000 demo orders first (always done on the embedded broker).
    #[arg(long)]
    produce_demo: bool,
    /// Number of demo orders.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// With a real broker: exit after this many seconds without traffic.
    #[arg(long, value_name = "SECS")]
    idle_exit: Option<u64>,
    /// Serve Prometheus metrics here while running.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: std::net::SocketAddr,
    /// Keep each customer's order through retries (`ordering = "key"`, `[retry]
    /// keep_key_order = true`): a retried order holds its customer's later orders back.
    #[arg(long)]
    keep_key_order: bool,
}

#[derive(Deserialize)]
struct Order {
    id: String,
    amount_cents: i64,
    flaky: Option<u32>,
}

struct Billing;

impl Handler for Billing {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let order: Order = msg.json()?;
        if order.amount_cents < 0 {
            return Err(HandlerError::permanent(format!(
                "order {} has a negative amount ({} cents)",
                order.id, order.amount_cents
            )));
        }
        if let Some(n) = order.flaky {
            if msg.attempt() <= n {
                return Err(HandlerError::retryable(format!(
                    "payment service timed out for order {} (attempt {} of {} failing)",
                    order.id,
                    msg.attempt(),
                    n
                )));
            }
        }
        Ok(())
    }
}

/// The demo stream: mostly good orders, some flaky, some negative, some not JSON at all.
fn demo_payload(i: usize) -> String {
    if i % 50 == 7 {
        return format!("{{\"id\": \"order-{i}\", \"amount_cents\": ");
    }
    let amount = if i % 40 == 3 {
        -100
    } else {
        100 + (i as i64 % 900)
    };
    if i % 10 == 1 {
        let n = 1 + (i / 10) % 3;
        format!(r#"{{"id":"order-{i}","amount_cents":{amount},"flaky":{n}}}"#)
    } else {
        format!(r#"{{"id":"order-{i}","amount_cents":{amount}}}"#)
    }
}

async fn produce_demo(
    brokers: &str,
    topic: &str,
    count: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // One record per batch: Tansu 0.6 mis-reports watermarks and fetches from the middle
        // of a multi-record batch (see docs/brokers.md).
        .set("batch.num.messages", "1")
        .create()?;
    let mut pending = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("customer-{}", i % 97);
        let payload = demo_payload(i);
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for p in pending {
        p.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let started = Instant::now();

    let embedded = match &args.brokers {
        Some(_) => None,
        None => {
            let cluster = EmbeddedCluster::start()?;
            cluster.create_topic(&args.topic, 4)?;
            println!(
                "embedded broker listening on {}",
                cluster.bootstrap_servers()
            );
            Some(cluster)
        }
    };
    let brokers = match (&args.brokers, &embedded) {
        (Some(b), _) => b.clone(),
        (None, Some(c)) => c.bootstrap_servers().to_owned(),
        (None, None) => unreachable!("one of the two is set above"),
    };

    let mut config = Config::new(&brokers, &args.group, [&args.topic]);
    // Short demo delays so the retries visibly pass.
    config.retry = RetryConfig::tiers([
        Tier::new(Duration::from_millis(500), 2),
        Tier::new(Duration::from_secs(2), 1),
    ]);
    config.shutdown_timeout = Duration::from_secs(10);
    if args.keep_key_order {
        config.ordering = sidetrack::config::Ordering::Key;
        config.retry.keep_key_order = true;
    }
    if args.brokers.is_some() {
        // Portable across brokers: Tansu 0.6 counts a multi-record batch as one offset, so
        // hand-offs sent in one batch would not all be readable from its DLQ.
        config
            .producer
            .insert("batch.num.messages".into(), "1".into());
    }
    config.metrics.listen = Some(args.metrics_listen);
    config.metrics.lag_interval = Duration::from_secs(1);

    let produce = embedded.is_some() || args.produce_demo;
    let mut builder = Runtime::builder(config)
        .handler(Billing)
        .shutdown_signal(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    if let Some(cluster) = &embedded {
        builder = builder.embedded(cluster);
    }
    let runtime = builder.build()?;
    let dlq_topic = runtime.topology().sources()[0].dead_letter.clone();
    let tiers: Vec<String> = runtime.topology().sources()[0]
        .retry
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let handle = runtime.start().await?;
    println!("metrics: http://{}/metrics", args.metrics_listen);
    let consuming_since = Instant::now();

    if produce {
        produce_demo(&brokers, &args.topic, args.count).await?;
        println!("produced {} demo orders to `{}`", args.count, args.topic);
    }

    // Run until every demo record is resolved (embedded), or until idle / Ctrl-C.
    let idle_limit = args.idle_exit.map(Duration::from_secs);
    let mut last_consumed = 0;
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = handle.stats();
        if embedded.is_some() && s.handled + s.total_dead_lettered() >= args.count as u64 {
            break;
        }
        if s.consumed != last_consumed {
            last_consumed = s.consumed;
            last_change = Instant::now();
        }
        if idle_limit.is_some_and(|limit| last_change.elapsed() >= limit) {
            println!(
                "no traffic for {}s, stopping",
                last_change.elapsed().as_secs()
            );
            break;
        }
        if embedded.is_some() && started.elapsed() > Duration::from_secs(90) {
            return Err("demo did not finish within 90 s".into());
        }
        if !handle_alive(&handle) {
            break;
        }
    }
    // Scrape our own endpoint before stopping, for the four signals below.
    let consuming = consuming_since.elapsed().as_secs_f64();
    let mut scraped = scrape(args.metrics_listen).unwrap_or_default();
    if embedded.is_some() {
        // Everything is handled; give the lag sampler (every 1 s) a moment to see it.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && total_lag(&scraped, &args.group) > 0.0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            scraped = scrape(args.metrics_listen).unwrap_or_default();
        }
    }
    let stats = handle.shutdown().await?;

    println!();
    println!(
        "== sidetrack quickstart summary ({:.1}s) ==",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<50}{}",
        "records consumed (source + retry):", stats.consumed
    );
    println!("{:<50}{}", "handled:", stats.handled);
    for (name, n) in tiers.iter().zip(&stats.retried) {
        let label = format!("retried via {name}:");
        println!("{label:<50}{n}");
    }
    for reason in Reason::ALL {
        let label = format!("dead-lettered ({reason}):");
        println!("{label:<50}{}", stats.dead_lettered(reason));
    }
    println!("{:<50}{}", "hand-off failures:", stats.handoff_failures);

    print_signals(&scraped, &args.group, &args.topic, &tiers, consuming);
    if args.keep_key_order {
        print_key_order(&scraped, &args.group, &args.topic);
    }

    let dead = read_all(&brokers, &dlq_topic).await?;
    if let Some(record) = dead
        .iter()
        .find(|r| r.header_str("sidetrack-error-kind") == Some("permanent"))
        .or(dead.first())
    {
        println!();
        println!(
            "one record from `{dlq_topic}` (partition {}, offset {}):",
            record.partition, record.offset
        );
        println!(
            "  key:     {}",
            String::from_utf8_lossy(record.key.as_deref().unwrap_or_default())
        );
        println!(
            "  payload: {}",
            String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default())
        );
        for h in &record.headers {
            let value = h
                .value
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or("(null)".into());
            println!("  {:<30} {}", h.key_lossy(), value);
        }
    }
    Ok(())
}

/// `GET /metrics` with a plain socket (the example needs no HTTP client).
fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sum of every max-lag gauge of our two groups.
fn total_lag(text: &str, group: &str) -> f64 {
    let retry_group = format!("{group}.retry");
    text.lines()
        .filter(|l| l.starts_with("sidetrack_consumer_max_lag{"))
        .filter(|l| {
            l.contains(&format!("group=\"{group}\""))
                || l.contains(&format!("group=\"{retry_group}\""))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

/// The value of the first series named `name` whose labels include every `labels` pair.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(s, _)| {
            s.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| s.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// `--keep-key-order`: how many orders waited behind a retried order of their customer, and
/// what the gauges showed last.
fn print_key_order(text: &str, group: &str, topic: &str) {
    println!();
    println!("== keep_key_order (scraped from /metrics) ==");
    let labels = [("group", group), ("topic", topic)];
    let total = |name: &str| -> f64 {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(s, _)| {
                s.split('{').next() == Some(name)
                    && labels
                        .iter()
                        .all(|(k, v)| s.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
            .sum()
    };
    println!(
        "{:<50}{}",
        "orders held behind their customer's retry:",
        total("sidetrack_key_order_held_total")
    );
    println!(
        "{:<50}{} / {}",
        "customers waiting / orders held now:",
        total("sidetrack_key_order_waiting_keys"),
        total("sidetrack_key_order_held_records")
    );
    println!(
        "{:<50}{:.1} s",
        "oldest wait (at the last scrape):",
        text.lines()
            .filter(|l| l.starts_with("sidetrack_key_order_oldest_wait_seconds{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .fold(0.0, f64::max)
    );
}

/// The four signals the platform watches: max offset lag, bytes/s, producer→consumer latency,
/// consumer→processed latency.
fn print_signals(text: &str, group: &str, topic: &str, tiers: &[String], seconds: f64) {
    let ms = |v: Option<f64>| v.map_or("n/a".to_owned(), |s| format!("{:.3} ms", s * 1000.0));
    println!();
    println!("== the four signals (scraped from /metrics) ==");
    let retry_group = format!("{group}.retry");
    let mut lags = vec![format!(
        "{topic}={}",
        series(
            text,
            "sidetrack_consumer_max_lag",
            &[("group", group), ("topic", topic)]
        )
        .unwrap_or(0.0)
    )];
    for t in tiers {
        let lag = series(
            text,
            "sidetrack_consumer_max_lag",
            &[("group", &retry_group), ("topic", t)],
        );
        lags.push(format!("{t}={}", lag.unwrap_or(0.0)));
    }
    println!(
        "{:<50}{}",
        "max offset lag (sampled every 1s):",
        lags.join(", ")
    );
    let bytes = series(
        text,
        "sidetrack_bytes_consumed_total",
        &[("group", group), ("topic", topic)],
    )
    .unwrap_or(0.0);
    println!(
        "{:<50}{:.0} B/s ({bytes:.0} bytes in {seconds:.1}s)",
        format!("bytes consumed per second ({topic}):"),
        bytes / seconds.max(0.001)
    );
    let q = |metric: &str, extra: (&str, &str), quantile: &str| {
        series(text, metric, &[extra, ("quantile", quantile)])
    };
    let e2e = "sidetrack_end_to_end_latency_seconds";
    println!(
        "{:<50}p50 {}, p99 {}",
        "producer→consumer latency:",
        ms(series(
            text,
            e2e,
            &[("topic", topic), ("from", "record"), ("quantile", "0.5")]
        )),
        ms(series(
            text,
            e2e,
            &[("topic", topic), ("from", "record"), ("quantile", "0.99")]
        )),
    );
    if let Some(first) = tiers.first() {
        println!(
            "{:<50}p50 {}, p99 {}",
            "original→retry handled latency:",
            ms(series(
                text,
                e2e,
                &[("topic", first), ("from", "original"), ("quantile", "0.5")]
            )),
            ms(series(
                text,
                e2e,
                &[("topic", first), ("from", "original"), ("quantile", "0.99")]
            )),
        );
    }
    for t in tiers {
        let late = "sidetrack_retry_lateness_seconds";
        println!(
            "{:<50}p50 {}, p99 {}",
            format!("retry lateness ({t}):"),
            ms(series(text, late, &[("topic", t), ("quantile", "0.5")])),
            ms(series(text, late, &[("topic", t), ("quantile", "0.99")])),
        );
    }
    let proc = "sidetrack_processing_seconds";
    println!(
        "{:<50}p50 {}, p99 {}",
        "consumer→processed latency (handled):",
        ms(q(proc, ("source", topic), "0.5")),
        ms(q(proc, ("source", topic), "0.99")),
    );
}

/// The runtime stops on its own after Ctrl-C; the loop above then ends.
fn handle_alive(handle: &sidetrack::RuntimeHandle) -> bool {
    !handle.is_shutting_down()
}
