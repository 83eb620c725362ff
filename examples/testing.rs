//! Testing a handler without Kafka: `TestRuntime` runs it through the runtime's retry and
//! dead-letter decisions, with no broker and no waiting. `cargo run --example testing`; in a
//! project the same lines go in a `#[tokio::test]`.
use sidetrack::testing::{Outcome, TestRuntime};
use sidetrack::{handler_fn, Context, HandlerError, Message, Reason};

#[tokio::main]
async fn main() {
    // The handler under test: a JSON amount; negative is refused, 13 fails twice, then works.
    let rt = TestRuntime::new(handler_fn(|msg: Message, _cx: Context| async move {
        let amount: i64 = msg.json()?;
        if amount < 0 {
            return Err(HandlerError::permanent(format!("negative amount {amount}")));
        }
        if amount == 13 && msg.attempt() <= 2 {
            return Err(HandlerError::retryable("payment service timed out"));
        }
        Ok(())
    }));

    // One delivery, one decision.
    let ok = rt.deliver(&Message::new("orders", "500")).await;
    assert_eq!(ok, Outcome::Handled);
    println!("500        -> {ok:?}");

    let refused = rt.deliver(&Message::new("orders", "-1")).await;
    assert!(matches!(
        refused,
        Outcome::DeadLettered {
            reason: Reason::Permanent,
            ..
        }
    ));
    println!("-1         -> {refused:?}");

    let poison = rt.deliver(&Message::new("orders", "not json")).await;
    assert!(matches!(
        poison,
        Outcome::DeadLettered {
            reason: Reason::Poison,
            ..
        }
    ));
    println!("not json   -> {poison:?}");

    // Every retry the runtime would make, without waiting for the delays (default tiers:
    // 1s x3, 30s x2, 10m x1), the envelope written and read back between attempts.
    let walk = rt
        .deliver_until_done(Message::new("orders", "13").with_key("customer-7"))
        .await;
    assert_eq!(walk.len(), 3);
    assert_eq!(walk.last(), Some(&Outcome::Handled));
    for (attempt, outcome) in walk.iter().enumerate() {
        println!("13, attempt {} -> {outcome:?}", attempt + 1);
    }
    println!("all assertions passed");
}
