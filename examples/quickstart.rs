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
use sidetrack::testing::{read_all, EmbeddedCluster};
use sidetrack::{Config, Context, DeadLetterReason, Handler, HandlerError, Message, Runtime, Tier};

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
    let stats = handle.shutdown().await?;

    println!();
    println!(
        "== sidetrack quickstart summary ({:.1}s) ==",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<44}{}",
        "records consumed (source + retry):", stats.consumed
    );
    println!("{:<44}{}", "handled:", stats.handled);
    for (name, n) in tiers.iter().zip(&stats.retried) {
        let label = format!("retried via {name}:");
        println!("{label:<44}{n}");
    }
    for reason in DeadLetterReason::ALL {
        let label = format!("dead-lettered ({reason}):");
        println!("{label:<44}{}", stats.dead_lettered(reason));
    }
    println!("{:<44}{}", "hand-off failures:", stats.handoff_failures);

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
            println!("  {:<30} {}", h.key, value);
        }
    }
    Ok(())
}

/// The runtime stops on its own after Ctrl-C; the loop above then ends.
fn handle_alive(handle: &sidetrack::RuntimeHandle) -> bool {
    !handle.is_shutting_down()
}
