//! The shared state of one proxy instance ([`App`]): what every request reads, built once
//! at start.
//!
//! Its own file because every stage takes it (the extractors, the produce handler, the
//! routes, the listener) and none of them owns it; the per-request path only reads it, so it
//! is shared as an `Arc<App>` with no lock on that path (the one `Mutex` caches `/readyz`).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::auth::Access;
use super::config::ProxyConfig;
use super::idempotency::Idempotency;
use super::producer::SharedProducer;
use super::rules::RecordRule;

/// Shared state of one proxy instance, the router's state.
pub(crate) struct App {
    /// The validated configuration.
    pub(crate) config: ProxyConfig,
    /// The one producer of this instance (batches the records of concurrent requests).
    pub(crate) producer: Arc<SharedProducer>,
    /// Tokens and topic permissions.
    pub(crate) access: Access,
    /// Answers remembered by `Idempotency-Key`.
    pub(crate) idempotency: Idempotency,
    /// The embedder's rules, in the order added.
    pub(crate) rules: Vec<Arc<dyn RecordRule>>,
    /// The request headers the rules decide on (lowercase, sorted, once each): part of an
    /// `Idempotency-Key`'s fingerprint.
    pub(crate) decided_headers: Vec<String>,
    /// The cluster id named by `GET /v3/clusters` and required in v3 paths.
    pub(crate) cluster_id: String,
    /// Set when shutdown begins: new produce requests are refused with 503, `/readyz` fails.
    pub(crate) shutting_down: AtomicBool,
    /// Bytes of bodies being read or decoded (`max_buffered_bytes`).
    pub(crate) buffered: Arc<tokio::sync::Semaphore>,
    /// Where `/metrics` renders from; `None` serves 404.
    pub(crate) prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The last broker reachability check of `/readyz` and when it was made (at most one
    /// broker round trip per second, whatever the probe rate).
    pub(crate) ready: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl App {
    /// The state of an instance; the body budget and the idempotency store are sized from
    /// `config`, and the headers the rules decide on are collected once here rather than
    /// per request.
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
