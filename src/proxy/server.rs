//! Routes, request handling, access logs and metrics, and the TLS acceptor (the accept loop
//! and connections are in `listener`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Serialize;

use super::auth::{Access, Caller};
use super::config::ProxyConfig;
use super::idempotency::{self, Answer, Begin, Fingerprint, Idempotency};
use super::producer::{Outcome, SharedProducer};
use super::rules::{RecordRule, RequestInfo};
use super::status::{ApiError, ErrorKind};
use super::wire::{self, ErrorBody, OffsetEntry, ProduceRecord, V2Response, V3Type};
use crate::metrics as m;
use crate::Header;

/// Shared state of one proxy instance.
pub(crate) struct App {
    pub(crate) config: ProxyConfig,
    pub(crate) producer: Arc<SharedProducer>,
    pub(crate) access: Access,
    pub(crate) idempotency: Idempotency,
    pub(crate) rules: Vec<Arc<dyn RecordRule>>,
    /// The request headers the rules decide on (lowercase, sorted, once each): part of an
    /// `Idempotency-Key`'s fingerprint.
    decided_headers: Vec<String>,
    pub(crate) cluster_id: String,
    pub(crate) shutting_down: AtomicBool,
    /// Bytes of bodies being read or decoded (`max_buffered_bytes`).
    pub(crate) buffered: Arc<tokio::sync::Semaphore>,
    pub(crate) prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ready: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl App {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: ProxyConfig,
        producer: Arc<SharedProducer>,
        access: Access,
        rules: Vec<Arc<dyn RecordRule>>,
        cluster_id: String,
        prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Self {
        let idempotency = Idempotency::new(
            config.idempotency.window,
            config.idempotency.max_keys,
            config.idempotency.max_bytes,
        );
        let mut decided_headers: Vec<String> = rules
            .iter()
            .flat_map(|r| r.decides_on_headers())
            .map(|h| h.to_ascii_lowercase())
            .collect();
        decided_headers.sort();
        decided_headers.dedup();
        App {
            decided_headers,
            buffered: Arc::new(tokio::sync::Semaphore::new(config.max_buffered_bytes)),
            config,
            producer,
            access,
            idempotency,
            rules,
            cluster_id,
            shutting_down: AtomicBool::new(false),
            prometheus,
            ready: Mutex::new(None),
        }
    }
}

/// What the access log and the metrics need to know about a request, attached to its
/// response by the handlers.
#[derive(Clone, Default)]
struct Note {
    /// Set once the topic is known to be valid and allowed (bounded label cardinality).
    topic: Option<Arc<str>>,
    records: usize,
    acked: usize,
    bytes: usize,
    error: Option<ErrorKind>,
    token: Option<String>,
}

/// The peer address of a connection.
#[derive(Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// The authenticated caller of a request: the one place requests are authenticated. Every
/// route that needs a caller takes it as its first extractor, so nothing derived from the
/// path (cluster id, partition, topic) is looked at, or named in an answer, before the
/// caller is known: an unauthenticated request is 401 whatever its path.
pub(crate) struct Authenticated(Caller);

impl FromRequestParts<Arc<App>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Self, ApiError> {
        app.access.authenticate(&parts.headers).map(Authenticated)
    }
}

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

/// `Retry-After` on retriable answers, `WWW-Authenticate` on 401.
fn decorate(resp: &mut Response, kind: ErrorKind) {
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

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    json_bytes(status, Bytes::from(bytes))
}

fn json_bytes(status: StatusCode, body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The router of one instance.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/topics/{topic}", post(produce_v2))
        .route(
            "/topics/{topic}/partitions/{partition}",
            post(produce_v2_partition),
        )
        .route("/v3/clusters", get(clusters))
        .route("/v3/clusters/{cluster_id}", get(cluster))
        .route(
            "/v3/clusters/{cluster_id}/topics/{topic}/records",
            post(produce_v3),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .fallback(|| async {
            ApiError::new(ErrorKind::NotFound, "no such route; see /openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorKind::MethodNotAllowed,
                "method not allowed on this route; see /openapi.json",
            )
        })
        .layer(axum::middleware::from_fn(observe))
        // A panic anywhere below becomes a 500, never a dropped connection (there should be
        // none: decoders are property-tested).
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(ErrorKind::Internal, "internal error").into_response()
        }))
        // Keeps the Authorization header out of any debug output of the request.
        .layer(
            tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
            ]),
        )
        .with_state(app)
}

/// Access log and request metrics. Logs no payload and no token (only the token's name).
async fn observe(req: Request, next: axum::middleware::Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    metrics::gauge!(m::PROXY_REQUESTS_IN_FLIGHT).increment(1.0);
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

/// How a produce request reads its body.
enum Shape {
    V2 { partition: Option<i32> },
    V3,
}

async fn produce_v2(
    State(app): State<Arc<App>>,
    Authenticated(caller): Authenticated,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    match path {
        Ok(Path(topic)) => produce(app, caller, topic, Shape::V2 { partition: None }, req).await,
        Err(e) => bad_path(e),
    }
}

async fn produce_v2_partition(
    State(app): State<Arc<App>>,
    Authenticated(caller): Authenticated,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    match path {
        Ok(Path((topic, partition))) => match wire::partition_from_path(&partition) {
            Ok(p) => produce(app, caller, topic, Shape::V2 { partition: Some(p) }, req).await,
            Err(e) => e.into_response(),
        },
        Err(e) => bad_path(e),
    }
}

async fn produce_v3(
    State(app): State<Arc<App>>,
    Authenticated(caller): Authenticated,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Response {
    match path {
        Ok(Path((cluster, topic))) => {
            if cluster != app.cluster_id {
                return ApiError::new(
                    ErrorKind::UnknownCluster,
                    format!(
                        "this proxy serves cluster `{}` (GET /v3/clusters)",
                        app.cluster_id
                    ),
                )
                .into_response();
            }
            produce(app, caller, topic, Shape::V3, req).await
        }
        Err(e) => bad_path(e),
    }
}

fn bad_path(e: PathRejection) -> Response {
    // The only way a matched path fails to extract is bad percent-encoding (not UTF-8): no
    // topic can have such a name.
    ApiError::new(ErrorKind::UnknownTopic, format!("bad topic in path: {e}")).into_response()
}

async fn produce(
    app: Arc<App>,
    caller: Caller,
    topic: String,
    shape: Shape,
    req: Request,
) -> Response {
    // The request runs to its end on a task of its own: hyper drops this future when the
    // client hangs up, and a request cut off with its records queued would free its
    // Idempotency-Key while they are still written (the retry would write them again).
    // Dropping a task's handle does not cancel the task.
    let task = tokio::spawn(async move {
        let mut note = Note::default();
        let result = produce_inner(&app, &caller, &topic, shape, req, &mut note).await;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                note.error = Some(e.kind);
                e.into_response()
            }
        };
        resp.extensions_mut().insert(note);
        resp
    });
    match task.await {
        Ok(resp) => resp,
        // A panic goes on to the panic layer, which answers 500 50002 as before.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: only when the runtime itself shuts down.
        Err(_) => ApiError::new(
            ErrorKind::ShuttingDown,
            "this instance is shutting down; retry",
        )
        .into_response(),
    }
}

async fn produce_inner(
    app: &Arc<App>,
    caller: &Caller,
    topic: &str,
    shape: Shape,
    req: Request,
    note: &mut Note,
) -> Result<Response, ApiError> {
    if app.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            ErrorKind::ShuttingDown,
            "this instance is shutting down; retry",
        ));
    }
    let (parts, body) = req.into_parts();
    note.token.clone_from(&caller.token);
    crate::config::check_topic_name(topic)
        .map_err(|why| ApiError::new(ErrorKind::UnknownTopic, format!("no such topic: {why}")))?;
    app.access.authorize(caller, topic)?;
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
    let mut buffered = app
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
    let mut records = match (&shape, format) {
        (Shape::V2 { partition }, Some(f)) => wire::decode_v2_limited(
            &body,
            f,
            *partition,
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
    charge_decoded(app, &mut buffered, &records)?;
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
    // The body is decoded; its reservation now covers the decoded records until they are
    // admitted (below, after the rules and the metadata lookup, which may wait): the memory
    // bound holds while the broker is slow to answer metadata too.
    drop(body);
    // The rules run before a remembered answer is given: a request they refuse is refused,
    // whatever another request with its key was answered.
    for (index, r) in records.iter_mut().enumerate() {
        let info = RequestInfo {
            topic,
            caller,
            headers: &parts.headers,
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
                    let mut resp = json_bytes(a.status, a.body);
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
    let cost = records
        .iter()
        .map(ProduceRecord::cost)
        .fold(0usize, usize::saturating_add);
    let admission = app.producer.admit(records.len(), cost)?;
    drop(buffered);
    let outcomes = app
        .producer
        .produce(
            topic.clone(),
            records,
            admission,
            app.config.request_timeout + Duration::from_secs(10),
        )
        .await;
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
    let status = worst.as_ref().map_or(StatusCode::OK, ApiError::status);
    note.error = worst.as_ref().map(|e| e.kind);
    let body = match shape {
        Shape::V2 { .. } => v2_body(&outcomes, worst.as_ref()),
        Shape::V3 => v3_body(app, &topic, &outcomes, v3_types, worst.as_ref()),
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
    let mut resp = json_bytes(status, body);
    if let Some(w) = &worst {
        decorate(&mut resp, w.kind);
    }
    Ok(resp)
}

/// Grows a request's body reservation to the cost of its decoded records when that is more:
/// 413 when it can never fit `max_buffered_bytes`, 429 when it does not fit now.
fn charge_decoded(
    app: &App,
    buffered: &mut tokio::sync::OwnedSemaphorePermit,
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

fn v2_body(outcomes: &[Outcome], worst: Option<&ApiError>) -> Bytes {
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

/// What a v3 key or value was sent as, and its size in bytes.
type V3Sent = Option<(V3Type, usize)>;

#[derive(Serialize)]
struct V3Data {
    #[serde(rename = "type")]
    kind: V3Type,
    size: usize,
}

#[derive(Serialize)]
struct V3Response<'a> {
    error_code: u16,
    cluster_id: &'a str,
    topic_name: &'a str,
    partition_id: i32,
    offset: Option<i64>,
    timestamp: Option<String>,
    key: Option<V3Data>,
    value: Option<V3Data>,
}

fn v3_body(
    app: &App,
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
                cluster_id: &app.cluster_id,
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

/// Reads the body, refusing more than `limit` bytes: at once from `Content-Length`, else as
/// soon as the limit is passed while reading.
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

async fn clusters(State(app): State<Arc<App>>, _: Authenticated) -> Response {
    let c = cluster_json(&app);
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "kind": "KafkaClusterList",
            "metadata": {"self": "/v3/clusters", "next": null},
            "data": [c],
        }),
    )
}

async fn cluster(
    State(app): State<Arc<App>>,
    _: Authenticated,
    Path(id): Path<String>,
) -> Response {
    if id != app.cluster_id {
        return ApiError::new(
            ErrorKind::UnknownCluster,
            format!("this proxy serves cluster `{}`", app.cluster_id),
        )
        .into_response();
    }
    json_response(StatusCode::OK, &cluster_json(&app))
}

fn cluster_json(app: &App) -> serde_json::Value {
    serde_json::json!({
        "kind": "KafkaCluster",
        "metadata": {"self": format!("/v3/clusters/{}", app.cluster_id)},
        "cluster_id": app.cluster_id,
    })
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let not_ready = |why: String| {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "not ready", "reason": why}),
        )
    };
    if app.shutting_down.load(Ordering::Relaxed) {
        return not_ready("shutting down".into());
    }
    if app.producer.is_fatal() {
        return not_ready("the producer hit a fatal error; restart this instance".into());
    }
    // One broker round trip per second at most, whatever the probe rate.
    let cached = app
        .ready
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .filter(|(at, _)| at.elapsed() < Duration::from_secs(1));
    let result = match cached {
        Some((_, r)) => r,
        None => {
            let timeout = app.config.metadata_timeout.min(Duration::from_secs(2));
            let r = app.producer.reachable(timeout).await;
            if let Ok(mut slot) = app.ready.lock() {
                *slot = Some((Instant::now(), r.clone()));
            }
            r
        }
    };
    match result {
        Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Err(e) => not_ready(format!("brokers unreachable: {e}")),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    match &app.prometheus {
        Some(h) if app.config.metrics => {
            h.run_upkeep();
            let mut resp = Response::new(Body::from(h.render()));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            resp
        }
        _ => ApiError::new(
            ErrorKind::NotFound,
            "metrics are not served here (proxy.metrics = false, or the application installed its own recorder)",
        )
        .into_response(),
    }
}

async fn openapi() -> Response {
    json_bytes(
        StatusCode::OK,
        Bytes::from_static(super::openapi::DOCUMENT.as_bytes()),
    )
}

/// The TLS acceptor, when TLS is configured.
#[cfg(feature = "proxy-tls")]
pub(crate) type Tls = Option<tokio_rustls::TlsAcceptor>;
/// No TLS in this build (`validate` refuses a TLS configuration).
#[cfg(not(feature = "proxy-tls"))]
pub(crate) type Tls = Option<std::convert::Infallible>;

/// Builds the TLS acceptor from the configured PEM files.
#[cfg(feature = "proxy-tls")]
pub(crate) fn tls_acceptor(config: &ProxyConfig) -> Result<Tls, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("proxy.tls.cert {}: {e}", tls.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "proxy.tls.cert {}: no certificate",
            tls.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("proxy.tls.key {}: {e}", tls.key.display()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("proxy.tls: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

/// Builds the TLS acceptor: this build has none.
#[cfg(not(feature = "proxy-tls"))]
pub(crate) fn tls_acceptor(config: &ProxyConfig) -> Result<Tls, String> {
    match config.tls {
        Some(_) => Err("this build has no TLS support; enable the `proxy-tls` feature".into()),
        None => Ok(None),
    }
}

/// The method and path of every route, for tests and the OpenAPI document.
#[cfg(test)]
pub(crate) const ROUTES: &[(axum::http::Method, &str)] = &[
    (axum::http::Method::POST, "/topics/{topic}"),
    (
        axum::http::Method::POST,
        "/topics/{topic}/partitions/{partition}",
    ),
    (axum::http::Method::GET, "/v3/clusters"),
    (axum::http::Method::GET, "/v3/clusters/{cluster_id}"),
    (
        axum::http::Method::POST,
        "/v3/clusters/{cluster_id}/topics/{topic}/records",
    ),
    (axum::http::Method::GET, "/healthz"),
    (axum::http::Method::GET, "/readyz"),
    (axum::http::Method::GET, "/metrics"),
    (axum::http::Method::GET, "/openapi.json"),
];
