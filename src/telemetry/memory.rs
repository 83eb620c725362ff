//! An in-memory span exporter for tests (feature `otel`).
//!
//! Tests should read what would have been exported, not sidetrack's own structs: this exporter
//! keeps the SDK's finished [`SpanData`] (names, kinds, attributes, parents, links) exactly as
//! the OTLP exporter would receive it. It is ours rather than the SDK's `InMemorySpanExporter`
//! because that one sits behind the SDK's `testing` feature, which drags its metrics and logs
//! signals into every `otel` build.

use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Value;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::subscriber::DefaultGuard;
use tracing_subscriber::layer::SubscriberExt;

/// Collects every exported span. Clones share one buffer.
#[derive(Debug, Clone, Default)]
pub struct MemoryExporter {
    spans: Arc<Mutex<Vec<SpanData>>>,
}

impl MemoryExporter {
    /// An empty exporter.
    pub fn new() -> Self {
        Self::default()
    }

    /// The spans exported so far, in the order they ended.
    pub fn spans(&self) -> Vec<SpanData> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forgets the spans exported so far.
    pub fn clear(&self) {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl SpanExporter for MemoryExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(batch);
        Ok(())
    }
}

/// A thread-local `tracing` subscriber recording into a [`MemoryExporter`], for one test.
///
/// Spans are exported as they end (simple processor, sampling always on), so a test reads them
/// right after the code under test returns. The subscriber is the default only on the thread
/// that called [`MemoryTracing::install`] until the value is dropped: use a current-thread tokio
/// runtime, or enter `dispatch()` on other threads.
pub struct MemoryTracing {
    /// What was exported.
    pub exporter: MemoryExporter,
    provider: SdkTracerProvider,
    dispatch: tracing::Dispatch,
    _guard: DefaultGuard,
}

impl std::fmt::Debug for MemoryTracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTracing")
            .field("exporter", &self.exporter)
            .finish_non_exhaustive()
    }
}

impl MemoryTracing {
    /// Installs the recording subscriber on this thread.
    pub fn install() -> Self {
        let exporter = MemoryExporter::new();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = super::export::layer(provider.tracer(super::export::SCOPE));
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        let guard = tracing::dispatcher::set_default(&dispatch);
        super::export::set_active(true);
        MemoryTracing {
            exporter,
            provider,
            dispatch,
            _guard: guard,
        }
    }

    /// The subscriber, to enter on other threads (`tracing::dispatcher::with_default`).
    pub fn dispatch(&self) -> &tracing::Dispatch {
        &self.dispatch
    }

    /// The spans exported so far (ended spans only).
    pub fn spans(&self) -> Vec<SpanData> {
        let _ = self.provider.force_flush();
        self.exporter.spans()
    }

    /// The ended spans named `name`.
    pub fn named(&self, name: &str) -> Vec<SpanData> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }
}

/// The value of attribute `key` of `span`, if set.
pub fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanKind, TraceContextExt};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use crate::handler::Header;
    use crate::telemetry::carrier;

    /// What the exporter receives: kind, attributes and links of a span, and a nested span
    /// as its child in the same trace.
    #[test]
    fn spans_nest_link_and_carry_attributes() {
        let t = MemoryTracing::install();
        let headers = vec![Header::new(
            carrier::TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )];
        let producer = carrier::span_context(&headers).unwrap();
        {
            let span = tracing::info_span!(
                "process",
                otel.name = "process orders",
                otel.kind = "consumer",
                messaging.system = "kafka",
                messaging.destination.name = "orders",
            );
            span.add_link(producer.clone());
            let _e = span.enter();
            tracing::info_span!("handler.work").in_scope(|| {});
            let cx = tracing::Span::current().context();
            assert!(cx.span().span_context().is_valid());
        }
        let process = &t.named("process orders")[0];
        assert_eq!(process.span_kind, SpanKind::Consumer);
        assert_eq!(
            attribute(process, "messaging.destination.name").map(|v| v.as_str().into_owned()),
            Some("orders".into())
        );
        assert_eq!(process.links.links[0].span_context, producer);
        let work = &t.named("handler.work")[0];
        assert_eq!(work.parent_span_id, process.span_context.span_id());
        assert_eq!(
            work.span_context.trace_id(),
            process.span_context.trace_id()
        );
    }

    /// A span made a child of a record's context continues its trace, and injecting its
    /// context replaces the record's `traceparent`.
    #[test]
    fn a_child_continues_the_producers_trace_and_injection_replaces() {
        let t = MemoryTracing::install();
        let mut headers = vec![Header::new(
            carrier::TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )];
        let producer = carrier::span_context(&headers).unwrap();
        let span = tracing::info_span!(
            "hand-off",
            otel.name = "send orders-retry-1",
            otel.kind = "producer"
        );
        let parent = opentelemetry::Context::new().with_remote_span_context(producer.clone());
        span.set_parent(parent).unwrap();
        let sent = span.in_scope(|| {
            tracing::Span::current()
                .context()
                .span()
                .span_context()
                .clone()
        });
        carrier::inject_span_context(&mut headers, &sent);
        drop(span);
        let send = &t.named("send orders-retry-1")[0];
        assert_eq!(send.span_context.trace_id(), producer.trace_id());
        assert_eq!(send.parent_span_id, producer.span_id());
        assert_eq!(headers.len(), 1, "replaced, not stacked");
        assert_eq!(
            carrier::span_context(&headers).unwrap().span_id(),
            send.span_context.span_id()
        );
    }
}
