//! Rendering: every byte the proxy answers with is written here, from the error body of a
//! refused request to the per-record `offsets` of a v2 produce and the single-record answer
//! of v3.
//!
//! Kept apart from the handlers so that the shape of an answer (its status, its JSON, the
//! `Retry-After` and `WWW-Authenticate` headers) has one author: a handler decides *what*
//! happened and hands over an [`ApiError`] or the producer's [`Outcome`]s; this file decides
//! how that looks on the wire, as `openapi.json` documents it. Rendering never fails: a body
//! that cannot be serialised (it cannot happen with these types) is sent empty rather than
//! turning an answer into a panic.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

use super::observe::Note;
use super::producer::Outcome;
use super::status::{ApiError, ErrorKind};
use super::wire::V3Type;

/// The error body of a request that failed as a whole (`ErrorBody` in `openapi.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ErrorBody {
    /// The code of the status table.
    pub(crate) error_code: u32,
    /// What went wrong.
    pub(crate) message: String,
}

/// One entry of a v2 response's `offsets`: where a record went, or why it failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct OffsetEntry {
    /// Partition written to (`null` when it failed before a partition was chosen).
    pub(crate) partition: Option<i32>,
    /// Offset of the record; `null` when it failed, or when the broker acknowledged it without
    /// an offset (librdkafka's implicit acknowledgement on an idempotent producer).
    pub(crate) offset: Option<i64>,
    /// `null` on success, else the code of the status table.
    pub(crate) error_code: Option<u32>,
    /// `null` on success, else what went wrong.
    pub(crate) error: Option<String>,
}

/// The v2 produce response. On failure it also carries the request's `error_code` and
/// `message` (the worst failure among its records).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct V2Response {
    /// Always `null` (no schema registry).
    pub(crate) key_schema_id: Option<i64>,
    /// Always `null` (no schema registry).
    pub(crate) value_schema_id: Option<i64>,
    /// One entry per record, in request order.
    pub(crate) offsets: Vec<OffsetEntry>,
    /// The request's error code when not every record was acknowledged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error_code: Option<u32>,
    /// The request's error message when not every record was acknowledged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
}

/// A refused request, whatever refused it (an extractor, a handler, the fallback routes or
/// the panic layer): the status of its kind, an [`ErrorBody`], the headers of
/// [`decorate`], and a [`Note`] naming the error for the access log and the metrics.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = json_response(
            status,
            &ErrorBody {
                error_code: self.kind.code(),
                message: self.message.clone(),
            },
        );
        decorate(&mut resp, self.kind);
        resp.extensions_mut().insert(Note {
            error: Some(self.kind),
            ..Note::default()
        });
        resp
    }
}

/// Adds the headers an error of `kind` carries: `Retry-After` on retriable answers (so a
/// client backs off by what the proxy knows, not a guess), `WWW-Authenticate` on 401 (RFC
/// 6750 asks for it). Also used on produce answers whose worst record failed with `kind`.
pub(crate) fn decorate(resp: &mut Response, kind: ErrorKind) {
    if let Some(secs) = kind.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if kind == ErrorKind::Unauthenticated {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"sidetrack\""),
        );
    }
}

/// `body` as JSON with `status`. A value that does not serialise (none of ours can fail)
/// is sent as `{}` rather than failing the answer.
pub(crate) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    json_bytes(status, Bytes::from(bytes))
}

/// Already-serialised JSON with `status` (a produce answer, also kept as is for an
/// `Idempotency-Key` replay, or the OpenAPI document).
pub(crate) fn json_bytes(status: StatusCode, body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The v2 produce answer: one `offsets` entry per record in request order and, when some
/// failed, the request's `error_code` and a `message` counting them and quoting the worst.
pub(crate) fn v2_body(outcomes: &[Outcome], worst: Option<&ApiError>) -> Bytes {
    let offsets = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Acked {
                partition, offset, ..
            } => OffsetEntry {
                partition: Some(*partition),
                offset: *offset,
                error_code: None,
                error: None,
            },
            Outcome::Failed { partition, error } => OffsetEntry {
                partition: *partition,
                offset: None,
                error_code: Some(error.kind.code()),
                error: Some(error.message.clone()),
            },
        })
        .collect();
    let resp = V2Response {
        key_schema_id: None,
        value_schema_id: None,
        offsets,
        error_code: worst.map(|e| e.kind.code()),
        message: worst.map(|e| {
            let failed = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Failed { .. }))
                .count();
            format!(
                "{failed} of {} records failed; the worst: {}",
                outcomes.len(),
                e.message
            )
        }),
    };
    Bytes::from(serde_json::to_vec(&resp).unwrap_or_default())
}

/// What a v3 key or value was sent as, and its size in bytes (the v3 answer echoes both).
pub(crate) type V3Sent = Option<(V3Type, usize)>;

/// A v3 key or value in the answer: its type and size.
#[derive(Serialize)]
struct V3Data {
    /// `type`: as the client sent it (`BINARY`, `JSON` or `STRING`).
    #[serde(rename = "type")]
    kind: V3Type,
    /// `size`: its bytes as produced (after base64 decoding and the embedder's record rules).
    size: usize,
}

/// The v3 produce answer of an acknowledged record (`V3Result` in `openapi.json`).
#[derive(Serialize)]
struct V3Response<'a> {
    /// 200: Confluent's v3 answers carry the HTTP status in the body too.
    error_code: u16,
    /// The cluster from the path, which the proxy checked is its own.
    cluster_id: &'a str,
    /// The topic written to.
    topic_name: &'a str,
    /// The partition the record landed in.
    partition_id: i32,
    /// Its offset; `null` when the acknowledgement carried none (an idempotent producer's
    /// implicit ack).
    offset: Option<i64>,
    /// RFC 3339 with milliseconds: the broker's time on a `LogAppendTime` topic, else the
    /// queueing time.
    timestamp: Option<String>,
    /// The key's type and size, `null` for a null key.
    key: Option<V3Data>,
    /// The value's type and size, `null` for a tombstone.
    value: Option<V3Data>,
}

/// The v3 produce answer for its one record: where it was written (partition, offset, the
/// broker's timestamp, the key's and value's types and sizes), or the [`ErrorBody`] of why
/// it was not.
pub(crate) fn v3_body(
    cluster_id: &str,
    topic: &str,
    outcomes: &[Outcome],
    types: (V3Sent, V3Sent),
    worst: Option<&ApiError>,
) -> Bytes {
    let bytes = match (outcomes.first(), worst) {
        (
            Some(Outcome::Acked {
                partition,
                offset,
                timestamp,
            }),
            None,
        ) => {
            let ts = timestamp.and_then(|t| u64::try_from(t).ok()).map(|t| {
                humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(t))
                    .to_string()
            });
            serde_json::to_vec(&V3Response {
                error_code: 200,
                cluster_id,
                topic_name: topic,
                partition_id: *partition,
                offset: *offset,
                timestamp: ts,
                key: types.0.map(|(kind, size)| V3Data { kind, size }),
                value: types.1.map(|(kind, size)| V3Data { kind, size }),
            })
        }
        (_, w) => {
            let e = w
                .cloned()
                .unwrap_or_else(|| ApiError::new(ErrorKind::Internal, "no outcome"));
            serde_json::to_vec(&ErrorBody {
                error_code: e.kind.code(),
                message: e.message,
            })
        }
    };
    Bytes::from(bytes.unwrap_or_default())
}
