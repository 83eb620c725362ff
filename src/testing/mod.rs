//! Testing support: an [`EmbeddedCluster`] (librdkafka's in-process mock broker) for
//! integration tests and demos, and [`TestRuntime`], which runs a handler through the same
//! retry/dead-letter decisions as the real runtime without any broker.
//!
//! ```
//! use sidetrack::testing::{Outcome, TestRuntime};
//! use sidetrack::{handler_fn, Reason, HandlerError, Message, Context};
//!
//! # tokio_test_block_on(async {
//! let rt = TestRuntime::new(handler_fn(|msg: Message, _cx: Context| async move {
//!     let n: i64 = msg.json()?;
//!     if n < 0 { return Err(HandlerError::permanent("negative")); }
//!     Ok(())
//! }));
//! assert_eq!(rt.deliver(&Message::new("orders", "5")).await, Outcome::Handled);
//! assert!(matches!(
//!     rt.deliver(&Message::new("orders", "-1")).await,
//!     Outcome::DeadLettered { reason: Reason::Permanent, .. }
//! ));
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

mod harness;

pub use crate::dead_letter::Record;
/// Re-exported from [`crate::mocking`], where the embedded cluster lives (so the runtime does
/// not depend on the test kit); these paths keep working.
pub use crate::mocking::{committed_offset, produce, read_all, EmbeddedCluster};
pub use harness::{Outcome, TestRuntime};

use std::future::Future;
use std::time::Duration;

/// Polls `condition` every 20 ms until it is true or `timeout` passes; returns whether it
/// became true. Use it instead of fixed sleeps in tests.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
