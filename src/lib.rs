//! # sidetrack
//!
//! A runtime for Kafka consumers. You implement one [`Handler`]; sidetrack runs it on a
//! partition-aware, at-least-once consumer loop, moves failing records onto side **retry
//! topics** with backoff so the records behind them keep flowing, and routes poison pills and
//! exhausted records to a **dead-letter topic** (DLQ) with an envelope of headers that says
//! where the record came from and why it failed.
//!
//! ```no_run
//! use serde::Deserialize;
//! use sidetrack::{Config, Context, Handler, HandlerError, Message, Runtime};
//!
//! #[derive(Deserialize)]
//! struct Order { id: String, amount_cents: i64 }
//!
//! struct Billing;
//!
//! impl Handler for Billing {
//!     async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
//!         let order: Order = msg.json()?; // undecodable => poison => DLQ at once
//!         if order.amount_cents < 0 {
//!             return Err(HandlerError::permanent(format!("negative amount on {}", order.id)));
//!         }
//!         // `?` on an ordinary error means "retry me later".
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), sidetrack::Error> {
//! let config = Config::from_toml_str(r#"
//!     brokers = "localhost:9092"
//!     group = "billing"
//!     topics = ["orders"]
//!     [retry]
//!     tiers = [{ delay = "1s", attempts = 3 }, { delay = "30s", attempts = 2 }]
//! "#)?;
//! Runtime::builder(config)
//!     .handler(Billing)
//!     .shutdown_signal(async { let _ = tokio::signal::ctrl_c().await; })
//!     .build()?
//!     .run()
//!     .await
//! # }
//! ```
//!
//! The crate is laid out one module per concern: [`config`], [`handler`], [`runtime`],
//! [`outcome`] (the words for what happens to a failed record: [`Disposition`], [`Reason`]),
//! [`retry`] (policy, topic names, envelope headers, the next hop), [`dead_letter`],
//! [`metrics`], [`telemetry`] (W3C trace context in record headers; with the `otel` feature,
//! OpenTelemetry spans over OTLP), [`admin`] (what the `sidetrack` CLI needs from the library),
//! [`mocking`] (an embedded broker) and [`testing`] (a broker-free handler harness, and the
//! embedded broker re-exported).
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod admin;
pub mod config;
pub mod dead_letter;
mod error;
pub mod escape;
pub mod handler;
mod key_order;
pub mod metrics;
pub mod mocking;
pub mod outcome;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod retry;
pub mod runtime;
pub mod telemetry;
pub mod testing;

pub use config::Config;
pub use error::Error;
pub use handler::{handler_fn, Context, Handler, HandlerError, Header, Message, ResultExt};
pub use outcome::{Disposition, FailureKind, Reason};
pub use retry::{Envelope, RetryPolicy, Tier};
pub use runtime::{Runtime, RuntimeBuilder, RuntimeHandle, StatsSnapshot};

/// The code blocks of the README and of the pages under `docs/`, compiled (and, unless marked
/// `no_run`, run) by `cargo test --doc`, so the documentation cannot drift from the API. Blocks
/// that are not Rust carry their language (`toml`, `sh`, `text`); those needing a broker are
/// `no_run`. Only built for doc-tests: nothing here is part of the crate.
#[cfg(doctest)]
mod doc_pages {
    #[doc = include_str!("../README.md")]
    struct Readme;
    #[doc = include_str!("../CONTRIBUTING.md")]
    struct Contributing;
    #[doc = include_str!("../ARCHITECTURE.md")]
    struct Architecture;
    #[doc = include_str!("../docs/guide.md")]
    struct Guide;
    #[doc = include_str!("../docs/guarantees.md")]
    struct Guarantees;
    #[doc = include_str!("../docs/configuration.md")]
    struct Configuration;
    #[doc = include_str!("../docs/monitoring.md")]
    struct Monitoring;
    #[doc = include_str!("../docs/runbook.md")]
    struct Runbook;
    #[doc = include_str!("../docs/proxy.md")]
    struct Proxy;
    #[doc = include_str!("../docs/performance.md")]
    struct Performance;
    #[doc = include_str!("../docs/brokers.md")]
    struct Brokers;
    #[doc = include_str!("../docs/key-order.md")]
    struct KeyOrder;
    #[doc = include_str!("../docs/tracing.md")]
    struct Tracing;
}
