//! Distributed tracing: W3C trace context carried in HTTP and record headers, and (feature
//! `otel`) spans exported over OTLP.
//!
//! One trace should lead from the HTTP request that produced a record, through every handler
//! attempt and retry hop, to the dead letter. That needs two things the `tracing` spans alone do
//! not give: the context must cross Kafka (in the record's `traceparent` header, as the Java,
//! Go and Python instrumentations carry it), and the spans must leave the process (OTLP). The
//! parts, each its own stage:
//!
//! - [`w3c`]: parse and write `traceparent`/`tracestate` values, strictly, from untrusted bytes.
//! - [`carrier`]: the rules for a record's headers: one context per record (replaced, never
//!   stacked), the client's own context kept, the origin's context kept in the envelope.
//! - [`config`]: the `[tracing]` section and the `OTEL_*` variables.
//! - `export` (feature `otel`): the OTLP pipeline and the `tracing` layer.
//! - `memory` (feature `otel`): an in-memory exporter for tests.
//! - `runtime` (feature `otel`): the consumer runtime's `process` and hand-off `send` spans.
//! - `span` (feature `otel`): a `tracing` span's parent, links and ids from and to trace
//!   context.
//!
//! Without the `otel` feature only the first three are built; they cost nothing on the record
//! path unless a record is handed off (the origin header is copied then).

pub mod carrier;
pub mod config;
#[cfg(feature = "otel")]
pub mod export;
#[cfg(feature = "otel")]
pub mod memory;
#[cfg(feature = "otel")]
pub mod runtime;
#[cfg(feature = "otel")]
pub mod span;
pub mod w3c;

pub use carrier::RecordContext;
pub use config::{ProcessParent, TracingConfig};
pub use w3c::{SpanId, TraceFlags, TraceId, TraceParent, TraceState};
