//! Trace context of proxy requests (feature `otel`): a server span per request, continuing
//! the caller's W3C `traceparent`/`tracestate`, and a `send` span per produce whose context
//! every produced record carries in its `traceparent` header.
//!
//! A stage of its own so that `observe` and `produce` only call it under `#[cfg(feature =
//! "otel")]`: without the feature the request path has no span, no header parsing and no
//! header written. A `traceparent` the client put in a record's own headers is kept unchanged
//! (the messaging conventions: a context the user put in the message is not modified), so a
//! client that traces each record itself keeps its own producer spans.

use axum::http::{HeaderMap, Method};
use tracing::field::Empty;
use tracing::Span;

use super::status::ErrorKind;
use super::wire::ProduceRecord;
use crate::telemetry::{carrier, span};

/// Routes with no span: probes and scrapes would bury the requests in traces.
fn untraced(route: &str) -> bool {
    matches!(route, "/healthz" | "/readyz" | "/metrics")
}

/// The server span of one request (`{method} {route}`, kind server), child of the caller's
/// context when its headers carry a valid one (several differing `traceparent` headers, or an
/// invalid one, start a new trace, as the W3C rules say). `None` for probe routes.
pub(crate) fn server_span(method: &Method, route: &str, headers: &HeaderMap) -> Option<Span> {
    // No exporter started: no span, so the proxy logs and costs what it does without `otel`.
    if untraced(route) || !crate::telemetry::export::active() {
        return None;
    }
    let name = format!("{method} {route}");
    let span = tracing::info_span!(
        parent: None,
        "http.server",
        otel.name = name.as_str(),
        otel.kind = "server",
        http.request.method = method.as_str(),
        http.route = route,
        http.response.status_code = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let caller = carrier::extract_values(
        headers
            .get_all(carrier::TRACEPARENT)
            .iter()
            .map(|v| Some(v.as_bytes())),
        headers
            .get_all(carrier::TRACESTATE)
            .iter()
            .map(|v| Some(v.as_bytes())),
    );
    if let Ok(Some(cx)) = caller {
        span::set_remote_parent(&span, &cx);
    }
    span::record_ids(&span);
    Some(span)
}

/// Records the answer on the server span: the status code, and an error status for a 5xx
/// (a 4xx is the client's error, not the server's, in the HTTP conventions).
pub(crate) fn finish_server(span: &Span, status: u16, error: Option<ErrorKind>) {
    span.record("http.response.status_code", i64::from(status));
    if status >= 500 {
        span::set_error(span, error.map_or("_OTHER", ErrorKind::label));
    }
}

/// The `send {topic}` span (kind producer) of one produce, child of the request's span, with
/// the messaging conventions' attributes; each record without a `traceparent` of its own gets
/// this span's. A disabled span when no exporter was started.
pub(crate) fn send_span(topic: &str, records: &mut [ProduceRecord]) -> Span {
    if !crate::telemetry::export::active() {
        return Span::none();
    }
    let name = format!("send {topic}");
    let span = tracing::info_span!(
        "send",
        otel.name = name.as_str(),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = topic,
        messaging.batch.message_count = Empty,
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    if records.len() > 1 {
        span.record("messaging.batch.message_count", records.len() as i64);
    }
    span::record_ids(&span);
    if let Some(cx) = span::context_of(&span) {
        for r in records.iter_mut() {
            carrier::inject_if_absent(&mut r.headers, &cx.parent, &cx.state);
        }
    }
    span
}

/// Records the outcome on the send span: partition and offset of a single record, and
/// `error.type` (the worst record's error kind) when any record failed.
pub(crate) fn finish_send(
    span: &Span,
    outcomes: &[super::producer::Outcome],
    worst: Option<ErrorKind>,
) {
    if let [super::producer::Outcome::Acked {
        partition, offset, ..
    }] = outcomes
    {
        span.record(
            "messaging.destination.partition.id",
            partition.to_string().as_str(),
        );
        if let Some(o) = offset {
            span.record("messaging.kafka.offset", *o);
        }
    }
    if let Some(kind) = worst {
        span::set_error(span, kind.label());
    }
}
