//! The HTTP produce proxy: Confluent REST v2 compatible produce over HTTP, with Kafka errors
//! as real HTTP status codes (feature `proxy`, on by default; the `sidetrack proxy` command).
//!
//! A request returns when every record is acknowledged by all in-sync replicas (200) or has
//! failed: then the status is that of the worst failure, and the per-record `offsets` say
//! which records were written. One idempotent producer per instance batches the records of
//! concurrent requests (a short `linger`); at most `max_in_flight_records`/`_bytes` are
//! pending, beyond that the answer is 429 at once.
//!
//! Embedding it, with a company rule:
//!
//! ```no_run
//! use sidetrack::proxy::{Proxy, ProxyConfig, ProduceRecord, Rejection, RequestInfo};
//! use sidetrack::Header;
//!
//! # async fn run() -> Result<(), sidetrack::proxy::ProxyError> {
//! let mut config = ProxyConfig::default();
//! config.brokers = "localhost:9092".into();
//! Proxy::builder(config)
//!     .rule(|req: &RequestInfo<'_>, record: &mut ProduceRecord| {
//!         if record.value.is_none() {
//!             return Err(Rejection::new("tombstones are not accepted here"));
//!         }
//!         record.headers.push(Header::new("produced-by", req.caller.token.as_deref().unwrap_or("anonymous")));
//!         Ok(())
//!     })
//!     .shutdown_signal(async { let _ = tokio::signal::ctrl_c().await; })
//!     .build()?
//!     .run()
//!     .await
//! # }
//! ```
//!
//! `docs/proxy.md` has the status table, the configuration and
//! how to deploy several instances.

#![warn(unreachable_pub)]

// The stages of a request, outside in: `listener` (accept loop, connections, with `tls`),
// `routes` (the router and its layers; `observe` logs and counts every answer), `extract`
// (authentication, the path, admission, the body: everything that refuses a request before
// a rule sees it), `produce` (rules, idempotency, the producer), `render` (every answer's
// bytes). Beside them: `app` (the state they share), `wire` (the body formats), `status`
// (the error table), `auth`, `idempotency`, `rules`, `producer`, `config`, `openapi`.
mod app;
mod auth;
mod config;
mod extract;
mod idempotency;
mod listener;
mod observe;
mod openapi;
mod produce;
mod producer;
mod render;
mod routes;
mod rules;
mod status;
mod tls;
#[cfg(feature = "otel")]
mod trace;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

// The public surface is what an application embedding the proxy needs: the builder and
// its handle, the configuration (and the types its fields are made of), and a record rule
// with what it is shown. Everything wire-level (decoders, error codes, the OpenAPI text,
// idempotency headers) is crate-private: the HTTP API is the contract, not these types.
pub use auth::{token_sha256, Caller};
pub use config::{AuthConfig, IdempotencyConfig, ProxyConfig, TlsConfig, TokenConfig};
pub use listener::Connections;
pub use rules::{RecordRule, Rejection, RequestInfo};
pub use wire::ProduceRecord;
/// What holding a record or a header costs in flight besides its bytes. Not part of the API:
/// exported only so that `tests/proxy.rs` can check the accounting to the byte.
#[doc(hidden)]
pub use wire::{HEADER_OVERHEAD, RECORD_OVERHEAD};

use crate::config::ConfigError;
use crate::mocking::EmbeddedCluster;

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The configuration is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The producer could not be created.
    #[error("creating the producer: {0}")]
    Kafka(#[from] KafkaError),
}

/// A shutdown signal as stored by the builder (boxed: its type is the caller's future).
type Signal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Builds a [`Proxy`]: configuration, rules, an embedded broker, a shutdown signal.
///
/// Nothing is checked until [`build`](Self::build), which validates the whole configuration
/// at once (so the error names the first bad field, as the `sidetrack proxy` command does).
pub struct ProxyBuilder {
    /// The configuration, as given and then amended by `embedded` / `producer_property`.
    config: ProxyConfig,
    /// The record rules, in the order added.
    rules: Vec<Arc<dyn RecordRule>>,
    /// librdkafka properties the embedding adds before the user's `[proxy.producer]` ones.
    extra: Vec<(String, String)>,
    /// Kept alive as long as the proxy runs.
    embedded: Option<EmbeddedCluster>,
    /// For [`Proxy::run`].
    signal: Option<Signal>,
    /// `Some(Some(h))` from [`prometheus`](Self::prometheus): render `/metrics` from `h`;
    /// `None`: the process's recorder, installed on first use, when `metrics` is on.
    prometheus: Option<Option<metrics_exporter_prometheus::PrometheusHandle>>,
}

impl ProxyBuilder {
    /// Adds a rule every record passes before it is produced (in the order added).
    pub fn rule(mut self, rule: impl RecordRule) -> Self {
        self.rules.push(Arc::new(rule));
        self
    }

    /// Produces to this embedded broker (its bootstrap servers replace `brokers`). The mock
    /// broker does not check the idempotent producer's sequence numbers, so an implicit
    /// acknowledgement there may stand for a record that is in no log; the proxy's producer
    /// therefore sends one request at a time per connection
    /// (`max.in.flight.requests.per.connection=1`) on it, where no implicit ack was seen.
    pub fn embedded(mut self, cluster: &EmbeddedCluster) -> Self {
        self.config.brokers = cluster.bootstrap_servers().to_owned();
        self.extra
            .push(("max.in.flight.requests.per.connection".into(), "1".into()));
        self.embedded = Some(cluster.clone());
        self
    }

    /// Sets a raw librdkafka property of the producer, as `[proxy.producer]` does; the
    /// properties [`ProxyConfig::validate`] refuses are refused by `build()` here too.
    pub fn producer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.producer.insert(key.into(), value.into());
        self
    }

    /// Serves `/metrics` from this Prometheus handle instead of installing a recorder (use it
    /// when the application installs its own Prometheus recorder).
    pub fn prometheus(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.prometheus = Some(Some(handle));
        self
    }

    /// Shuts the proxy down gracefully when `signal` completes (for [`Proxy::run`]).
    pub fn shutdown_signal(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.signal = Some(Box::pin(signal));
        self
    }

    /// Validates the configuration and loads the tokens (reading `env` and `file` token
    /// sources now, so a missing one fails here and not on the first request).
    ///
    /// # Errors
    /// [`ProxyError::Config`] naming the field: no `brokers` (and no embedded broker), a
    /// value out of range, a refused producer property, a token that is empty, malformed or
    /// unreadable (then [`ConfigError::Io`] inside).
    pub fn build(self) -> Result<Proxy, ProxyError> {
        if self.config.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "proxy.brokers",
                "must name at least one broker (host:port), or use an embedded broker",
            )
            .into());
        }
        self.config.validate()?;
        let access = auth::Access::new(&self.config)?;
        Ok(Proxy {
            builder: self,
            access,
        })
    }
}

/// A configured proxy, not started yet: [`start`](Self::start) it to get a
/// [`ProxyHandle`], or [`run`](Self::run) it until its shutdown signal.
pub struct Proxy {
    /// What the builder was given (consumed by `start`).
    builder: ProxyBuilder,
    /// The tokens, loaded by `build`.
    access: auth::Access,
}

/// A running proxy: its address, its gauges, and [`shutdown`](Self::shutdown).
///
/// Dropping the handle does not stop the proxy (its accept loop is a task of its own); call
/// `shutdown` to stop it gracefully.
pub struct ProxyHandle {
    /// The bound address.
    addr: SocketAddr,
    /// As served by `GET /v3/clusters`.
    cluster_id: String,
    /// Cancelled by `shutdown`.
    stop: CancellationToken,
    /// The accept loop; ends when shutdown has finished.
    task: tokio::task::JoinHandle<()>,
    /// For `in_flight`.
    producer: Arc<producer::SharedProducer>,
    /// The body budget and its size, for `buffered_bytes`.
    buffered: (Arc<tokio::sync::Semaphore>, usize),
    /// For `idempotency_usage`.
    idempotency: idempotency::Idempotency,
    /// For `connections`.
    gate: Arc<listener::Gate>,
    /// Kept alive as long as the proxy runs.
    _embedded: Option<EmbeddedCluster>,
}

impl Proxy {
    /// A builder for `config`.
    pub fn builder(config: ProxyConfig) -> ProxyBuilder {
        ProxyBuilder {
            config,
            rules: Vec::new(),
            extra: Vec::new(),
            embedded: None,
            signal: None,
            prometheus: None,
        }
    }

    /// Binds the listener, creates the producer and starts serving. Returns once requests
    /// are accepted. Without a configured `cluster_id`, asks the brokers for theirs (at most
    /// `metadata_timeout`, 5 s at most) and falls back to `sidetrack`.
    ///
    /// # Errors
    /// [`ProxyError::Tls`] when the certificate or key cannot be used,
    /// [`ProxyError::Kafka`] when librdkafka refuses the producer's configuration,
    /// [`ProxyError::Bind`] when `listen` cannot be bound.
    pub async fn start(self) -> Result<ProxyHandle, ProxyError> {
        let Proxy {
            mut builder,
            access,
        } = self;
        let config = builder.config.clone();
        let tls = tls::tls_acceptor(&config).map_err(ProxyError::Tls)?;
        let client =
            producer::SharedProducer::client_config(&config, &config.brokers, &builder.extra);
        let producer = Arc::new(producer::SharedProducer::new(&config, &client)?);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
        let cluster_id = match &config.cluster_id {
            Some(id) => id.clone(),
            None => producer
                .cluster_id(config.metadata_timeout.min(Duration::from_secs(5)))
                .await
                .filter(|id| {
                    !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
                })
                .unwrap_or_else(|| "sidetrack".to_owned()),
        };
        crate::metrics::describe_proxy();
        let prometheus = match builder.prometheus.take() {
            Some(h) => h,
            None if config.metrics => global_prometheus(),
            None => None,
        };
        let app = Arc::new(app::App::new(
            config,
            producer.clone(),
            access,
            std::mem::take(&mut builder.rules),
            cluster_id.clone(),
            prometheus,
        ));
        let buffered = (app.buffered.clone(), app.config.max_buffered_bytes);
        let idempotency = app.idempotency.clone();
        let stop = CancellationToken::new();
        let gate = listener::Gate::new(&app.config);
        let task = tokio::spawn(listener::serve(
            listener,
            app,
            tls,
            gate.clone(),
            stop.clone(),
        ));
        tracing::info!(%addr, cluster_id, "proxy listening");
        Ok(ProxyHandle {
            addr,
            cluster_id,
            stop,
            task,
            producer,
            buffered,
            idempotency,
            gate,
            _embedded: builder.embedded.take(),
        })
    }

    /// Starts and serves until the shutdown signal (if none was given, forever), then shuts
    /// down gracefully.
    ///
    /// # Errors
    /// As [`start`](Self::start); once serving, it does not fail.
    pub async fn run(mut self) -> Result<(), ProxyError> {
        let signal = self.builder.signal.take();
        let handle = self.start().await?;
        match signal {
            Some(s) => s.await,
            None => std::future::pending().await,
        }
        handle.shutdown().await;
        Ok(())
    }
}

impl ProxyHandle {
    /// The address the proxy listens on (with the port chosen when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Records and bytes admitted and not yet acknowledged or failed (what
    /// `max_in_flight_records` and `max_in_flight_bytes` bound).
    pub fn in_flight(&self) -> (usize, usize) {
        self.producer.in_flight()
    }

    /// Bytes of request bodies reserved now (being read or decoded, or their decoded records
    /// waiting to be admitted; what `max_buffered_bytes` bounds).
    pub fn buffered_bytes(&self) -> usize {
        let (sem, max) = &self.buffered;
        max - sem.available_permits().min(*max)
    }

    /// `Idempotency-Key` entries held now (running or answered) and the bytes they are
    /// charged (what `idempotency.max_keys` and `idempotency.max_bytes` bound).
    pub fn idempotency_usage(&self) -> (usize, usize) {
        self.idempotency.usage()
    }

    /// Client connections open now, and how many of them are unproven (see
    /// `max_unproven_connections`).
    pub fn connections(&self) -> Connections {
        self.gate.stats()
    }

    /// The cluster id named by `GET /v3/clusters`.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Stops accepting, finishes (or, after `shutdown_timeout`, abandons) the requests in
    /// flight, flushes the producer, and returns when all that is done.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The process's Prometheus recorder, installed the first time a proxy needs one; `None` if
/// the application installed another recorder.
fn global_prometheus() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => Some(handle),
                Err(_) => {
                    tracing::info!("a metrics recorder is already installed; the proxy's /metrics is off (use ProxyBuilder::prometheus)");
                    None
                }
            }
        })
        .clone()
}
