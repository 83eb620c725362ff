//! Extraction: from an HTTP request to a checked, decoded produce request, as axum extractors
//! (the shape of axum's `examples/jwt`: a type that implements `FromRequestParts` or
//! `FromRequest`, whose rejection renders the proxy's own error answer).
//!
//! Everything that can refuse a produce request before a rule has seen a record happens
//! here, in this order; the order is behaviour (it decides which error a request with
//! several faults gets), so it is kept exactly:
//! 1. **authentication** ([`Authenticated`]): 401 before anything derived from the path is
//!    looked at or named in an answer;
//! 2. **the path** ([`Target`]): the topic, the partition of `/topics/{t}/partitions/{p}`,
//!    the cluster id of a v3 path;
//! 3. **admission** ([`ProduceRequest`]): shutting down (503), the topic name, authorisation
//!    (403), the content type (415), the `Idempotency-Key` header;
//! 4. **the body**: a reservation of `max_body_bytes` or its `Content-Length` against
//!    `max_buffered_bytes` (429), reading within `request_timeout` (408, 413), decoding
//!    (413, 415, 422), then growing the reservation to what the decoded records cost (413,
//!    429).
//!
//! The produce handler thus receives records it may run rules on and produce, and nothing
//! else. This stage runs on the connection's task: a client that hangs up here simply
//! drops it (nothing has been queued or remembered yet). The handler's work, from the rules
//! on, runs on a task of its own (see `produce`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;

use super::app::App;
use super::auth::Caller;
use super::idempotency::{self, Fingerprint};
use super::observe::Note;
use super::status::{ApiError, ErrorKind};
use super::wire::{self, ProduceRecord, V3Type};

/// The authenticated caller of a request: the one place requests are authenticated. Every
/// route that needs a caller extracts it first, so nothing derived from the path (cluster
/// id, partition, topic) is looked at, or named in an answer, before the caller is known: an
/// unauthenticated request is 401 whatever its path.
///
/// Rejection: 401 (no or unknown bearer token) as the proxy's error body, with
/// `WWW-Authenticate`.
pub(crate) struct Authenticated(pub(crate) Caller);

impl FromRequestParts<Arc<App>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        app.access.authenticate(&parts.headers).map(Authenticated)
    }
}

/// How a produce request's body is read: a v2 body (one or more records; on
/// `/topics/{t}/partitions/{p}` all go to that partition) or a v3 body (one record).
#[derive(Clone, Copy)]
pub(crate) enum Shape {
    /// `POST /topics/{topic}` or `/topics/{topic}/partitions/{partition}`.
    V2 {
        /// The partition named by the path, if any.
        partition: Option<i32>,
    },
    /// `POST /v3/clusters/{cluster_id}/topics/{topic}/records`.
    V3,
}

/// Where a produce request goes, from its path: the topic (not yet checked) and the
/// [`Shape`] of its body.
///
/// Rejections: 404 40401 for a path segment that is not UTF-8 after percent-decoding (no
/// topic can have such a name), 422 42204 for a partition segment that is not a partition
/// number, 404 40403 for a v3 cluster id that is not this proxy's.
pub(crate) struct Target {
    /// The topic named by the path, as sent.
    pub(crate) topic: String,
    /// How the body is read.
    pub(crate) shape: Shape,
}

/// The parameters of the three produce routes, by name: `partition` only on the v2
/// partition route, `cluster_id` only on the v3 route.
#[derive(Deserialize)]
struct ProduceParams {
    /// `{topic}`, every produce route.
    topic: String,
    /// `{partition}`, `/topics/{topic}/partitions/{partition}` only.
    #[serde(default)]
    partition: Option<String>,
    /// `{cluster_id}`, the v3 route only.
    #[serde(default)]
    cluster_id: Option<String>,
}

impl FromRequestParts<Arc<App>> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let Path(params) = Path::<ProduceParams>::from_request_parts(parts, app)
            .await
            // The only way a matched path fails to extract is bad percent-encoding (not
            // UTF-8): no topic can have such a name.
            .map_err(|e| {
                ApiError::new(ErrorKind::UnknownTopic, format!("bad topic in path: {e}"))
            })?;
        let shape = match (params.cluster_id, params.partition) {
            (Some(cluster), _) => {
                if cluster != app.cluster_id {
                    return Err(ApiError::new(
                        ErrorKind::UnknownCluster,
                        format!(
                            "this proxy serves cluster `{}` (GET /v3/clusters)",
                            app.cluster_id
                        ),
                    ));
                }
                Shape::V3
            }
            (None, Some(p)) => Shape::V2 {
                partition: Some(wire::partition_from_path(&p)?),
            },
            (None, None) => Shape::V2 { partition: None },
        };
        Ok(Target {
            topic: params.topic,
            shape,
        })
    }
}

/// A refused request with what the access log and the metrics should know of it (the
/// caller's token name once authenticated, the records once decoded): renders as the
/// [`ApiError`]'s answer with that [`Note`].
pub(crate) struct Refused {
    /// Why.
    pub(crate) error: ApiError,
    /// What was known of the request when it was refused.
    pub(crate) note: Note,
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Refused {
            error,
            note: Note::default(),
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let Refused { error, mut note } = self;
        note.error = Some(error.kind);
        let mut resp = error.into_response();
        resp.extensions_mut().insert(note);
        resp
    }
}

/// A produce request authenticated, authorised, read and decoded: what the produce handler
/// needs and nothing it has to check again. See the module doc for the order of the checks.
///
/// Holds the request's share of `max_buffered_bytes` (`reservation`) until the handler has
/// its records admitted by the producer, so the memory bound holds while the rules run and
/// while the broker is slow to answer metadata.
pub(crate) struct ProduceRequest {
    /// Who sent it.
    pub(crate) caller: Caller,
    /// The topic, valid as a name and allowed for `caller`.
    pub(crate) topic: String,
    /// v2 or v3 (for the answer).
    pub(crate) shape: Shape,
    /// The request's headers (the rules may read them).
    pub(crate) headers: HeaderMap,
    /// The `Idempotency-Key`, if sent.
    pub(crate) key: Option<String>,
    /// With a key: the digest of every input a rule may read (see [`Fingerprint`]).
    pub(crate) fingerprint: Option<[u8; 32]>,
    /// The decoded records (one for v3), in request order.
    pub(crate) records: Vec<ProduceRecord>,
    /// v3 only: what the key and the value were sent as.
    pub(crate) v3_types: (Option<V3Type>, Option<V3Type>),
    /// The bytes of `max_buffered_bytes` held for the decoded records.
    pub(crate) reservation: OwnedSemaphorePermit,
    /// What the access log knows so far (token name, record count).
    pub(crate) note: Note,
}

impl FromRequest<Arc<App>> for ProduceRequest {
    type Rejection = Refused;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Self, Refused> {
        let (mut parts, body) = req.into_parts();
        let Authenticated(caller) = Authenticated::from_request_parts(&mut parts, app).await?;
        let Target { topic, shape } = Target::from_request_parts(&mut parts, app).await?;
        let mut note = Note::default();
        match read(app, caller, topic, shape, parts, body, &mut note).await {
            Ok(request) => Ok(request),
            Err(error) => Err(Refused { error, note }),
        }
    }
}

/// Steps 3 and 4 of the module doc: admission, then the body. Fills `note` as it learns
/// (the token name after the shutdown check, the record count once decoded) so that a
/// refusal is logged with what was known.
async fn read(
    app: &App,
    caller: Caller,
    topic: String,
    shape: Shape,
    parts: Parts,
    body: Body,
    note: &mut Note,
) -> Result<ProduceRequest, ApiError> {
    if app.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            ErrorKind::ShuttingDown,
            "this instance is shutting down; retry",
        ));
    }
    note.token.clone_from(&caller.token);
    crate::config::check_topic_name(&topic)
        .map_err(|why| ApiError::new(ErrorKind::UnknownTopic, format!("no such topic: {why}")))?;
    app.access.authorize(&caller, &topic)?;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes);
    let format = match shape {
        Shape::V2 { .. } => Some(wire::format_of(content_type)?),
        Shape::V3 => {
            wire::check_v3_content_type(content_type)?;
            None
        }
    };
    let key = idempotency::idempotency_key(&parts.headers)?;
    // Reserve the body's size (or the most it may be) before reading it: bodies in memory are
    // bounded by `max_buffered_bytes`, like records by `max_in_flight_*`.
    let limit = app.config.max_body_bytes;
    let reserve = content_length(&parts.headers).map_or(limit, |n| n.min(limit as u64) as usize);
    let mut reservation = app
        .buffered
        .clone()
        .try_acquire_many_owned(u32::try_from(reserve.max(1)).unwrap_or(u32::MAX))
        .map_err(|_| {
            ApiError::new(
                ErrorKind::Saturated,
                "the proxy is reading as many request bodies as it may hold; retry after Retry-After seconds",
            )
        })?;
    // A body trickling in would hold its reservation forever.
    let body = tokio::time::timeout(
        app.config.request_timeout,
        read_body(body, &parts.headers, limit),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            ErrorKind::BodyTimeout,
            "the request body did not arrive within request_timeout",
        )
    })??;
    let max_headers = app.config.max_headers_per_record;
    let mut v3_types = (None, None);
    let records = match (shape, format) {
        (Shape::V2 { partition }, Some(f)) => wire::decode_v2_limited(
            &body,
            f,
            partition,
            app.config.max_in_flight_records,
            max_headers,
        )?,
        _ => {
            let (r, kt, vt) = wire::decode_v3_limited(&body, max_headers)?;
            v3_types = (kt, vt);
            vec![r]
        }
    };
    note.records = records.len();
    // Decoded records may cost more than the body they came in (a header of 10 bytes in JSON
    // holds 128 decoded): the reservation grows to their cost until they are admitted.
    charge_decoded(app, &mut reservation, &records)?;
    // The fingerprint covers every input a rule may read: the caller, the path (topic and
    // partition), the body, and the request headers the rules decide on.
    let fingerprint = key.as_ref().map(|_| {
        let mut fp = Fingerprint::new()
            .part(caller.token.as_deref().unwrap_or("").as_bytes())
            .part(parts.method.as_str().as_bytes())
            .part(parts.uri.path().as_bytes())
            .part(content_type.unwrap_or_default())
            .part(&body);
        for h in &app.decided_headers {
            fp = fp.header(&parts.headers, h);
        }
        fp.finish()
    });
    // The body is decoded; from here the reservation covers the decoded records until they
    // are admitted (after the rules and the metadata lookup, which may wait): the memory
    // bound holds while the broker is slow to answer metadata too.
    drop(body);
    Ok(ProduceRequest {
        caller,
        topic,
        shape,
        headers: parts.headers,
        key,
        fingerprint,
        records,
        v3_types,
        reservation,
        note: std::mem::take(note),
    })
}

/// Grows a request's body reservation to the cost of its decoded records when that is more.
///
/// # Errors
/// 413 41303 when the records can never fit `max_buffered_bytes`, 429 42901 when they do
/// not fit now.
fn charge_decoded(
    app: &App,
    buffered: &mut OwnedSemaphorePermit,
    records: &[ProduceRecord],
) -> Result<(), ApiError> {
    let cost = records
        .iter()
        .map(ProduceRecord::cost)
        .fold(0usize, usize::saturating_add);
    let held = buffered.num_permits();
    if cost <= held {
        return Ok(());
    }
    let max = app.config.max_buffered_bytes;
    if cost > max {
        return Err(ApiError::new(
            ErrorKind::RequestTooLarge,
            format!("the request's records cost {cost} bytes decoded, more than max_buffered_bytes ({max}) can ever hold; split the request"),
        ));
    }
    let more = app
        .buffered
        .clone()
        .try_acquire_many_owned(u32::try_from(cost - held).unwrap_or(u32::MAX))
        .map_err(|_| {
            ApiError::new(
                ErrorKind::Saturated,
                "the proxy holds as many decoded requests as it may; retry after Retry-After seconds",
            )
        })?;
    buffered.merge(more);
    Ok(())
}

/// Reads the body, refusing more than `limit` bytes: at once from `Content-Length`, else as
/// soon as the limit is passed while reading. A body in one frame (the usual case) is kept
/// as is, without a copy.
///
/// # Errors
/// 413 41301 past `limit`; 422 42201 when the connection fails while the body is read.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::BodyTooLarge,
            format!("the body is larger than max_body_bytes ({limit})"),
        )
    };
    if let Some(len) = content_length(headers) {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    let mut first: Option<Bytes> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                ErrorKind::MalformedJson,
                format!("could not read the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let have = first.as_ref().map_or(0, Bytes::len) + buf.len();
        if have + data.len() > limit {
            linger(&mut body).await;
            return Err(too_large());
        }
        // One frame (the usual case) is kept as is; more are copied together.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(buf)))
}

/// The `Content-Length` a client announced, if it is a number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Reads (and drops) a little more of a body refused as too large, so that the client, which
/// may still be sending, reads the 413 instead of a connection reset. Bounded: 64 KiB, 100 ms.
async fn linger(body: &mut Body) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut extra = 0usize;
    while extra < 64 * 1024 {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => extra += frame.data_ref().map_or(0, Bytes::len),
            _ => break,
        }
    }
}
