//! Observation: the access log line and the request metrics of every answered request.
//!
//! One middleware around the whole router, so that every answer is counted once whoever
//! produced it (a handler, an extractor's rejection, the fallback routes, the panic layer).
//! Handlers do not log or count: they attach a [`Note`] to their response saying what only
//! they know (the topic, the records, the error), and [`observe`] reads it. Logs no payload
//! and no token, only the token's configured name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;

use super::status::ErrorKind;
use crate::metrics as m;

/// What the access log and the metrics need to know about a request, attached to its
/// response (as an extension) by whoever answered it. A response with none is logged as a
/// request without records, topic or error.
#[derive(Clone, Default)]
pub(crate) struct Note {
    /// Set once the topic is known to be valid and allowed, never before: a label made of
    /// whatever a client put in a path would make the metrics' cardinality unbounded.
    pub(crate) topic: Option<Arc<str>>,
    /// Records decoded from the body (0 for an `Idempotency-Key` replay, which produces
    /// none).
    pub(crate) records: usize,
    /// Records acknowledged; `records - acked` are counted as failed.
    pub(crate) acked: usize,
    /// Key, value and header bytes of the records.
    pub(crate) bytes: usize,
    /// The request's error (the worst record's for a produce that partly failed).
    pub(crate) error: Option<ErrorKind>,
    /// The name of the caller's token, once authenticated (not the token).
    pub(crate) token: Option<String>,
}

/// The peer address of a connection, set as a request extension by the listener.
#[derive(Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// Access log and request metrics: gauges the request in flight, then counts the answer by
/// route, status and topic, its records and bytes, and its rejection reason, from the
/// [`Note`] on the response.
pub(crate) async fn observe(req: Request, next: axum::middleware::Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    metrics::gauge!(m::PROXY_REQUESTS_IN_FLIGHT).increment(1.0);
    // The server span (feature `otel`): everything answering the request runs inside it, and
    // the access log line below is written in it, so it names the trace.
    #[cfg(feature = "otel")]
    let span = super::trace::server_span(&method, &route, req.headers());
    #[cfg(feature = "otel")]
    let resp = match &span {
        Some(span) => tracing::Instrument::instrument(next.run(req), span.clone()).await,
        None => next.run(req).await,
    };
    #[cfg(not(feature = "otel"))]
    let resp = next.run(req).await;
    metrics::gauge!(m::PROXY_REQUESTS_IN_FLIGHT).decrement(1.0);
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    let note = resp.extensions().get::<Note>().cloned().unwrap_or_default();
    let topic = note.topic.as_deref().unwrap_or("-").to_owned();
    metrics::counter!(m::PROXY_REQUESTS, "route" => route.clone(), "status" => status.to_string(), "topic" => topic.clone())
        .increment(1);
    metrics::histogram!(m::PROXY_REQUEST_SECONDS, "route" => route.clone())
        .record(elapsed.as_secs_f64());
    if note.records > 0 {
        metrics::histogram!(m::PROXY_REQUEST_RECORDS).record(note.records as f64);
        metrics::counter!(m::PROXY_RECORDS, "topic" => topic.clone(), "outcome" => "acknowledged")
            .increment(note.acked as u64);
        metrics::counter!(m::PROXY_RECORDS, "topic" => topic.clone(), "outcome" => "failed")
            .increment((note.records - note.acked) as u64);
        metrics::counter!(m::PROXY_BYTES, "topic" => topic.clone()).increment(note.bytes as u64);
    }
    if let Some(kind) = note.error {
        metrics::counter!(m::PROXY_REJECTIONS, "reason" => kind.label()).increment(1);
    }
    #[cfg(feature = "otel")]
    let _in_span = span.as_ref().map(|span| {
        super::trace::finish_server(span, status, note.error);
        span.enter()
    });
    tracing::info!(
        target: "sidetrack::proxy::access",
        method = %method,
        route = %route,
        status,
        error_code = note.error.map(ErrorKind::code),
        topic = %topic,
        records = note.records,
        acknowledged = note.acked,
        token = note.token.as_deref().unwrap_or("-"),
        peer = ?peer,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    resp
}
