//! The OpenTelemetry pipeline (feature `otel`): a tracer provider exporting over OTLP/HTTP,
//! and the `tracing` layer that turns sidetrack's spans into OpenTelemetry spans.
//!
//! Separate from the configuration ([`config`](super::config)) because only this part needs the
//! OpenTelemetry crates. Export runs on the SDK's batch processor thread, off the record path:
//! a handler call only records its span into a bounded queue, and a full queue drops spans
//! rather than blocking a partition. The HTTP client is ureq (blocking, rustls), the same one the
//! webhook notifier uses, which suits the batch processor's own thread and keeps reqwest, hyper's
//! client and tonic out of the build.

use std::fmt;
use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use super::config::{ResolvedTracing, Sampling, TracingConfig};

/// Name of the instrumentation scope of sidetrack's spans.
pub const SCOPE: &str = "sidetrack";

/// Whether spans are being recorded by an OpenTelemetry layer of ours (see [`active`]).
static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once an exporter was started ([`Telemetry::start`], [`install`], or the in-memory test
/// subscriber). The proxy makes its request spans only then: without it a build with `otel`
/// behaves (and logs) like one without. An embedder that installs its own OpenTelemetry layer
/// calls [`set_active`].
pub fn active() -> bool {
    ACTIVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Declares that an OpenTelemetry layer records sidetrack's spans (or no longer does).
pub fn set_active(on: bool) {
    ACTIVE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Largest response body read from the receiver; OTLP answers are a few bytes (partial
/// success), so anything bigger is a misconfigured endpoint, not a reason to buffer.
const MAX_RESPONSE: u64 = 64 * 1024;

/// Why the pipeline could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The OTLP exporter rejected its configuration (endpoint, headers).
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
    /// The `[tracing]` section or an `OTEL_*` variable is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// An [`HttpClient`] over ureq: blocking, rustls, a time limit per request. The batch span
/// processor calls it from its own thread, so blocking there stalls no async task.
pub struct UreqClient {
    agent: ureq::Agent,
}

impl fmt::Debug for UreqClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UreqClient").finish_non_exhaustive()
    }
}

impl UreqClient {
    /// A client whose requests each end after `timeout`, answered or not.
    pub fn new(timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // OTLP's 4xx/5xx bodies carry the receiver's reason; the exporter reads them.
            .http_status_as_error(false)
            .build()
            .into();
        UreqClient { agent }
    }
}

#[async_trait::async_trait]
impl HttpClient for UreqClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = request.map(|body| body.to_vec());
        let response = self.agent.run(request)?;
        let (parts, body) = response.into_parts();
        let mut buf = Vec::new();
        body.into_reader()
            .take(MAX_RESPONSE)
            .read_to_end(&mut buf)?;
        Ok(Response::from_parts(parts, Bytes::from(buf)))
    }
}

/// The sampler for `sampling`: `parentbased(traceidratio)` unless the environment asked for a
/// root-only sampler.
pub fn sampler(sampling: Sampling) -> Sampler {
    let root = if sampling.ratio >= 1.0 {
        Sampler::AlwaysOn
    } else if sampling.ratio <= 0.0 {
        Sampler::AlwaysOff
    } else {
        Sampler::TraceIdRatioBased(sampling.ratio)
    };
    if sampling.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}

/// The resource of every span: `service.name`, the configured attributes, and
/// `telemetry.sdk.*` from the SDK.
pub fn resource(cfg: &ResolvedTracing) -> Resource {
    Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attributes(
            cfg.resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

/// A tracer provider exporting to `cfg.traces_url` in batches.
///
/// # Errors
/// [`ExportError::Build`] if the exporter rejects the endpoint or a header.
pub fn provider(cfg: &ResolvedTracing) -> Result<SdkTracerProvider, ExportError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(UreqClient::new(cfg.timeout))
        .with_endpoint(cfg.traces_url.clone())
        .with_timeout(cfg.timeout)
        .with_headers(cfg.headers.clone().into_iter().collect())
        .build()
        .map_err(|e| ExportError::Build(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_sampler(sampler(cfg.sampling))
        .with_resource(resource(cfg))
        .with_batch_exporter(exporter)
        .build())
}

/// sidetrack's tracer from `provider`.
pub fn tracer(provider: &SdkTracerProvider) -> SdkTracer {
    provider.tracer(SCOPE)
}

/// The `tracing` layer that records sidetrack's spans (and the handler's, nested in them) as
/// OpenTelemetry spans through `tracer`. Add it to the subscriber next to the log layer.
pub fn layer<S>(tracer: SdkTracer) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Thread names and code locations would add attributes to every span for no reader.
        .with_threads(false)
        .with_location(false)
        // `busy_ns`/`idle_ns` and the `target` attribute: per-span bookkeeping no trace reader
        // needs, paid on every enter and exit.
        .with_tracked_inactivity(false)
        .with_target(false)
}

/// Owns the provider; flushes queued spans and stops the export thread when dropped (or on
/// [`Telemetry::shutdown`]), so the spans of the last records before a shutdown are not lost.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Builds the pipeline for `cfg`; `None` when export is turned off.
    ///
    /// # Errors
    /// As [`provider`].
    pub fn start(cfg: &ResolvedTracing) -> Result<Option<(Self, SdkTracer)>, ExportError> {
        if !cfg.enabled {
            return Ok(None);
        }
        let provider = provider(cfg)?;
        let tracer = tracer(&provider);
        set_active(true);
        Ok(Some((
            Telemetry {
                provider: Some(provider),
            },
            tracer,
        )))
    }

    /// Wraps an already built provider (tests use an in-memory one).
    pub fn from_provider(provider: SdkTracerProvider) -> Self {
        Telemetry {
            provider: Some(provider),
        }
    }

    /// Exports every finished span now (blocking until the receiver answered or timed out).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.force_flush() {
                tracing::warn!(error = %e, "flushing spans failed");
            }
        }
    }

    /// Flushes and stops the pipeline. Blocking: call it from a blocking context at exit.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "stopping the span exporter failed");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the process-wide `tracing` subscriber for a service built on sidetrack: log lines
/// on stderr (`json`: one JSON object per line), filtered by `RUST_LOG` (default `info`,
/// librdkafka at `warn`), and, when `tracing` is set and enabled, spans exported over OTLP.
/// Log lines inside a span carry its `trace_id` and `span_id` (text: in the span prefix; JSON:
/// in `span`/`spans`). `default_service` names the service when neither the section nor
/// `OTEL_SERVICE_NAME` does (a runtime passes its consumer group).
///
/// Keep the returned guard until exit: dropping it (or [`Telemetry::shutdown`]) exports the
/// spans still queued. A subscriber already installed is left in place (then nothing of ours
/// records spans).
///
/// # Errors
/// [`ExportError`] when the section or an `OTEL_*` variable is invalid, or the exporter
/// cannot be built.
pub fn install(
    tracing: Option<&TracingConfig>,
    default_service: &str,
    json: bool,
) -> Result<Option<Telemetry>, ExportError> {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let started = match tracing {
        Some(t) => Telemetry::start(&t.resolve(default_service)?)?,
        None => None,
    };
    let (telemetry, tracer) = match started {
        Some((t, tracer)) => (Some(t), Some(tracer)),
        None => (None, None),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,librdkafka=warn".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_current_span(true).boxed()
    } else {
        fmt.boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(tracer.map(|t| layer(t).with_filter(LevelFilter::INFO)))
        .try_init();
    Ok(telemetry)
}
