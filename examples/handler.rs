//! A typed JSON handler on the embedded broker: `cargo run --example handler`.
//!
//! Four orders go in; the handler decodes each into `Order`, refuses a negative amount as a
//! permanent error and the one that is not JSON is poison. Prints what the runtime did.
use std::time::Duration;

use serde::Deserialize;
use sidetrack::mocking::EmbeddedCluster;
use sidetrack::{Config, Context, Handler, HandlerError, Message, Runtime};

#[derive(Deserialize)]
struct Order {
    id: String,
    amount_cents: i64,
}

struct Billing;

impl Handler for Billing {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let order: Order = msg.json()?; // not an `Order` => poison => DLQ at once
        if order.amount_cents < 0 {
            let why = format!("negative amount on {}", order.id);
            return Err(HandlerError::permanent(why)); // retrying cannot fix it => DLQ at once
        }
        println!("charged {} cents for {}", order.amount_cents, order.id);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = EmbeddedCluster::start()?;
    cluster.create_topic("orders", 1)?;
    let config = Config::new(cluster.bootstrap_servers(), "billing", ["orders"]);
    let runtime = Runtime::builder(config).handler(Billing).embedded(&cluster);
    let handle = runtime.build()?.start().await?;

    let producer = cluster.producer()?;
    for (i, amount) in ["500", "-100", "250", "?"].iter().enumerate() {
        let body = format!(r#"{{"id":"o-{i}","amount_cents":{amount}}}"#); // "?": not JSON
        let body = Some(body.as_bytes());
        cluster
            .produce(&producer, "orders", None, None, body, &[])
            .await?;
    }
    while handle.stats().handled + handle.stats().total_dead_lettered() < 4 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = handle.shutdown().await?;
    let dead = stats.total_dead_lettered();
    println!("handled {}, dead-lettered {dead}", stats.handled);
    let text = |b: Option<Vec<u8>>| String::from_utf8_lossy(&b.unwrap_or_default()).into_owned();
    for r in cluster.read_all("orders.billing.dlq").await? {
        let kind = r.headers.iter().find(|h| h.is("sidetrack-error-kind"));
        let kind = kind.and_then(|h| h.value.clone());
        println!("dead letter ({}): {}", text(kind), text(r.payload));
    }
    Ok(())
}
