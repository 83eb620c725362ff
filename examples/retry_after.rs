//! `HandlerError::retry_after`: a handler that knows when to try again (a rate limit's
//! `Retry-After`, a maintenance window) says so, and the record goes to the first retry tier
//! whose delay is at least that long. Broker-free: `cargo run --example retry_after`.
use std::time::Duration;

use sidetrack::testing::{Outcome, TestRuntime};
use sidetrack::{handler_fn, Config, Context, HandlerError, Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Three tiers; the payload is how long the (pretend) upstream service asks us to wait.
    let config = Config::from_toml_str(
        r#"
        brokers = "unused"
        group = "billing"
        topics = ["orders"]
        [retry]
        tiers = [{ delay = "1s", attempts = 2 }, { delay = "30s", attempts = 2 }, { delay = "10m", attempts = 1 }]
        "#,
    )?;
    let handler = handler_fn(|msg: Message, _cx: Context| async move {
        let wait_secs: u64 = msg.json()?;
        if msg.attempt() > 1 {
            return Ok(()); // the upstream service answers on the second try
        }
        Err(
            HandlerError::retryable(format!("429 Too Many Requests, Retry-After: {wait_secs}"))
                .retry_after(Duration::from_secs(wait_secs)),
        )
    });
    let rt = TestRuntime::with_config(handler, &config)?;

    for wait_secs in [0, 5, 30, 120, 3600] {
        let outcomes = rt
            .deliver_until_done(Message::new("orders", wait_secs.to_string()))
            .await;
        match &outcomes[0] {
            Outcome::Retry { tier, topic, delay } => println!(
                "Retry-After {wait_secs:>4}s -> tier {tier} `{topic}`, due in {delay:?}; then {:?}",
                outcomes[1]
            ),
            other => println!("Retry-After {wait_secs:>4}s -> {other:?}"),
        }
    }
    println!("each went to the first tier whose delay is >= the request, due at the request");
    println!("(capped at that tier's delay); attempts left are unchanged.");
    Ok(())
}
