//! Routes: the [`Router`] of one instance, its layers, and the handlers of the small routes
//! (cluster discovery, health, readiness, metrics, the OpenAPI document).
//!
//! The one place to read which paths exist and what wraps them; the produce handler lives in
//! `produce` and the request checks in `extract`. Every path here is documented in
//! `openapi.json`, and a unit test (in `openapi`) checks that `ROUTES` (below) and the document
//! agree.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;

use super::app::App;
use super::extract::Authenticated;
use super::observe::observe;
use super::produce::produce;
use super::render::{json_bytes, json_response};
use super::status::{ApiError, ErrorKind};

/// The router of one instance, with its layers, outermost last: the access log and metrics
/// ([`observe`]) see every answer, including a panic's 500 and the fallbacks' 404 and 405.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/topics/{topic}", post(produce))
        .route("/topics/{topic}/partitions/{partition}", post(produce))
        .route("/v3/clusters", get(clusters))
        .route("/v3/clusters/{cluster_id}", get(cluster))
        .route(
            "/v3/clusters/{cluster_id}/topics/{topic}/records",
            post(produce),
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

/// `GET /v3/clusters`: the one cluster this proxy serves (authenticated, like every v3
/// route: 401 without a valid token when auth is on).
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

/// `GET /v3/clusters/{cluster_id}`: 404 40403 for any other id.
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

/// The `KafkaCluster` object of this proxy's one cluster.
fn cluster_json(app: &App) -> serde_json::Value {
    serde_json::json!({
        "kind": "KafkaCluster",
        "metadata": {"self": format!("/v3/clusters/{}", app.cluster_id)},
        "cluster_id": app.cluster_id,
    })
}

/// `GET /healthz`: the process answers (liveness; no broker is asked).
async fn healthz() -> Response {
    json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: 503 while shutting down, after a fatal producer error, or when no broker
/// answered within `metadata_timeout` (at most 2 s); the broker check is cached for a second.
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

/// `GET /metrics`: the Prometheus text, or 404 when metrics are off here.
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

/// `GET /openapi.json`: the document, as compiled in.
async fn openapi() -> Response {
    json_bytes(
        StatusCode::OK,
        Bytes::from_static(super::openapi::DOCUMENT.as_bytes()),
    )
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
