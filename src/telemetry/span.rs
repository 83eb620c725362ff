//! Joining `tracing` spans to W3C trace context (feature `otel`).
//!
//! sidetrack's spans are ordinary `tracing` spans; the `tracing-opentelemetry` layer turns them
//! into OpenTelemetry spans. What the layer cannot know is where a span's context comes from
//! (an HTTP header, a record header) and where it goes (the headers of a record produced inside
//! it): these helpers do that, in the order the layer requires (parent and links before the
//! span's context is first read, since reading it starts the OpenTelemetry span).
//!
//! Spans that carry the fields `trace_id` and `span_id` (declared empty) get them recorded by
//! [`record_ids`], so every log line inside them, text or JSON, names the trace.

use opentelemetry::trace::TraceContextExt;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::carrier::RecordContext;

/// Makes `span` a child of the remote context `cx`. Call before anything reads the span's
/// context; a span already started keeps its parent (and this returns false).
pub fn set_remote_parent(span: &Span, cx: &RecordContext) -> bool {
    let parent = opentelemetry::Context::new().with_remote_span_context(cx.to_span_context());
    span.set_parent(parent).is_ok()
}

/// Links `span` to the remote context `cx` (the conventions' consumer-to-producer link).
pub fn link(span: &Span, cx: &RecordContext) {
    span.add_link(cx.to_span_context());
}

/// Links `span` to `cx` with one attribute naming the relation (e.g. the origin of a retried
/// record, or the dead letter a replayed record came from).
pub fn link_as(span: &Span, cx: &RecordContext, relation: &'static str) {
    span.add_link_with_attributes(
        cx.to_span_context(),
        vec![opentelemetry::KeyValue::new("sidetrack.link", relation)],
    );
}

/// The context of `span` as a record would carry it; `None` when no OpenTelemetry layer
/// records the span (tracing off, or the span filtered out).
pub fn context_of(span: &Span) -> Option<RecordContext> {
    let cx = span.context();
    RecordContext::from_span_context(cx.span().span_context())
}

/// Records `span`'s trace id and span id in its `trace_id` and `span_id` fields (when it
/// declares them), so log lines inside it name the trace. Starts the OpenTelemetry span.
pub fn record_ids(span: &Span) {
    if let Some(cx) = context_of(span) {
        span.record("trace_id", tracing::field::display(cx.parent.trace_id));
        span.record("span_id", tracing::field::display(cx.parent.parent_id));
    }
}

/// Sets the span's status to error with `error.type` (a low-cardinality kind, as the
/// conventions ask).
pub fn set_error(span: &Span, error_type: &'static str) {
    span.set_attribute("error.type", error_type);
    span.set_status(opentelemetry::trace::Status::error(error_type));
}
