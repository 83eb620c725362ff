//! The produce handler: a decoded request's records through the rules, the
//! `Idempotency-Key` store and the producer, to an answer.
//!
//! It receives a [`ProduceRequest`] that the extractors have already authenticated,
//! authorised, read and decoded (see `extract`), and renders with `render`; what is left
//! here is producing, in this order:
//! 1. the embedder's [`RecordRule`](super::RecordRule)s, on every record (422 42208 or the
//!    rule's status);
//! 2. the `Idempotency-Key`: a remembered answer is replayed (with `Idempotent-Replayed:
//!    true`), a running one is 409, a different request under the same key is 422;
//! 3. the partitions the records name, against the topic's partition count (404 40402);
//! 4. admission into the producer's in-flight budget (413 when the request could never fit,
//!    429 when it does not fit now), then the produce itself;
//! 5. the answer, whose status is that of the worst failed record (200 when all were
//!    acknowledged), remembered under the key when there is one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::app::App;
use super::extract::{ProduceRequest, Refused, Shape};
use super::idempotency::{self, Answer, Begin};
use super::observe::Note;
use super::producer::Outcome;
use super::render;
use super::rules::RequestInfo;
use super::status::{ApiError, ErrorKind};
use super::wire::ProduceRecord;
use crate::Header;

/// `POST /topics/{topic}`, `/topics/{topic}/partitions/{partition}` and
/// `/v3/clusters/{cluster_id}/topics/{topic}/records`.
///
/// The request runs to its end on a task of its own: hyper drops this future when the
/// client hangs up, and a request cut off with its records queued would free its
/// `Idempotency-Key` while they are still written (the retry would write them again).
/// Dropping a task's handle does not cancel the task.
pub(crate) async fn produce(State(app): State<Arc<App>>, request: ProduceRequest) -> Response {
    let work = async move {
        let mut note = Note::default();
        let result = produce_records(&app, request, &mut note).await;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(error) => return Refused { error, note }.into_response(),
        };
        resp.extensions_mut().insert(note);
        resp
    };
    // A spawned task does not inherit the current span: the request's server span is passed
    // on explicitly, so the send span below is its child.
    #[cfg(feature = "otel")]
    let work = tracing::Instrument::in_current_span(work);
    let task = tokio::spawn(work);
    match task.await {
        Ok(resp) => resp,
        // A panic goes on to the panic layer, which answers 500 50002.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: only when the runtime itself shuts down.
        Err(_) => ApiError::new(
            ErrorKind::ShuttingDown,
            "this instance is shutting down; retry",
        )
        .into_response(),
    }
}

/// Steps 1 to 5 of the module doc. `note` starts as the extractor left it and is filled
/// for the access log as the request goes (the topic once it is known to exist, the
/// records acknowledged, the worst error).
async fn produce_records(
    app: &App,
    request: ProduceRequest,
    note: &mut Note,
) -> Result<Response, ApiError> {
    let ProduceRequest {
        caller,
        topic,
        shape,
        headers,
        key,
        fingerprint,
        mut records,
        v3_types,
        reservation,
        note: known,
    } = request;
    *note = known;
    let topic = topic.as_str();
    // The rules run before a remembered answer is given: a request they refuse is refused,
    // whatever another request with its key was answered.
    for (index, r) in records.iter_mut().enumerate() {
        let info = RequestInfo {
            topic,
            caller: &caller,
            headers: &headers,
            index,
        };
        for rule in &app.rules {
            rule.check(&info, r)
                .map_err(|rej| rej.into_api_error(index))?;
        }
    }
    let guard = match (&key, fingerprint) {
        (Some(k), Some(fp)) => {
            match app
                .idempotency
                .begin(caller.token.as_deref().unwrap_or(""), k, fp)
            {
                Begin::New(g) => Some(g),
                Begin::Replay(a) => {
                    note.records = 0;
                    let mut resp = render::json_bytes(a.status, a.body);
                    resp.headers_mut()
                        .insert("idempotent-replayed", HeaderValue::from_static("true"));
                    return Ok(resp);
                }
                Begin::Running => return Err(ApiError::new(
                    ErrorKind::IdempotencyInProgress,
                    "a request with this Idempotency-Key is still running; retry after Retry-After",
                )),
                Begin::Mismatch => {
                    return Err(ApiError::new(
                        ErrorKind::IdempotencyMismatch,
                        "this Idempotency-Key was used for a different request",
                    ))
                }
            }
        }
        _ => None,
    };
    if let Some(k) = &key {
        for (index, r) in records.iter_mut().enumerate() {
            r.headers
                .push(Header::new(idempotency::KEY_HEADER, k.as_bytes()));
            r.headers
                .push(Header::new(idempotency::RECORD_HEADER, index.to_string()));
        }
    }
    let mut partitions = app.producer.partitions(topic, None).await?;
    if records
        .iter()
        .any(|r| r.partition.is_some_and(|p| !(0..partitions).contains(&p)))
    {
        // Partitions may have been added since the count was cached: look again (at most
        // once a second per topic) before answering 404.
        partitions = app
            .producer
            .partitions(topic, Some(Duration::from_secs(1)))
            .await?;
    }
    let topic: Arc<str> = Arc::from(topic);
    note.topic = Some(topic.clone());
    if let Some((i, p)) = records.iter().enumerate().find_map(|(i, r)| {
        // A rule may set any i32; the wire refuses negative partitions already.
        r.partition
            .filter(|p| !(0..partitions).contains(p))
            .map(|p| (i, p))
    }) {
        return Err(ApiError::new(
            ErrorKind::UnknownPartition,
            format!("records[{i}]: partition {p} does not exist; `{topic}` has {partitions}"),
        ));
    }
    // The v3 answer echoes the size of the key and value as produced (after the rules).
    let sizes = records.first().map_or((0, 0), |r| {
        (
            r.key.as_ref().map_or(0, Vec::len),
            r.value.as_ref().map_or(0, Vec::len),
        )
    });
    let v3_types = (
        v3_types.0.map(|t| (t, sizes.0)),
        v3_types.1.map(|t| (t, sizes.1)),
    );
    note.bytes = records.iter().map(ProduceRecord::size).sum();
    // Feature `otel`: the `send` span, whose context the records carry (unless they carry
    // their own). Written before the cost is taken, so the admission charges the trace
    // headers too (`max_in_flight_bytes`/`max_buffered_bytes` bound what librdkafka holds).
    #[cfg(feature = "otel")]
    let send_span = super::trace::send_span(&topic, &mut records);
    let cost = records
        .iter()
        .map(ProduceRecord::cost)
        .fold(0usize, usize::saturating_add);
    let admission = app.producer.admit(records.len(), cost)?;
    // Admitted: the records are now bounded by `max_in_flight_*`, no longer by
    // `max_buffered_bytes`.
    drop(reservation);
    let produced = app.producer.produce(
        topic.clone(),
        records,
        admission,
        app.config.request_timeout + Duration::from_secs(10),
    );
    #[cfg(feature = "otel")]
    let produced = tracing::Instrument::instrument(produced, send_span.clone());
    let outcomes = produced.await;
    note.acked = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Acked { .. }))
        .count();
    let worst = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Failed { error, .. } => Some(error),
            Outcome::Acked { .. } => None,
        })
        .max_by_key(|e| e.kind.severity())
        .cloned();
    #[cfg(feature = "otel")]
    super::trace::finish_send(&send_span, &outcomes, worst.as_ref().map(|e| e.kind));
    let status = worst.as_ref().map_or(StatusCode::OK, ApiError::status);
    note.error = worst.as_ref().map(|e| e.kind);
    let body = match shape {
        Shape::V2 { .. } => render::v2_body(&outcomes, worst.as_ref()),
        Shape::V3 => render::v3_body(&app.cluster_id, &topic, &outcomes, v3_types, worst.as_ref()),
    };
    if let Some(g) = guard {
        g.finish(
            Answer {
                status,
                body: body.clone(),
            },
            note.acked > 0,
        );
    }
    let mut resp = render::json_bytes(status, body);
    if let Some(w) = &worst {
        render::decorate(&mut resp, w.kind);
    }
    Ok(resp)
}
