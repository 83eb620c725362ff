//! The built-in Prometheus exporter (feature `prometheus`), installed when
//! `metrics.listen` is set.
//!
//! A file of its own so that everything else in [`crate::metrics`] stays exporter-agnostic:
//! the runtime only records through the `metrics` facade, and an application that uses
//! StatsD, Datadog or OpenTelemetry installs its own recorder and never compiles this.

use std::net::SocketAddr;

use crate::error::Error;

/// Installs the Prometheus recorder as the process's global `metrics` recorder and serves
/// `GET /metrics` on `listen`. Histograms are exposed as summaries (quantiles 0, 0.5, 0.9,
/// 0.99, 0.999, 1).
///
/// Fails if another recorder is already installed or the address cannot be bound.
pub fn install_prometheus(listen: SocketAddr) -> Result<(), Error> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()
        .map_err(|e| Error::Metrics(format!("cannot serve /metrics on {listen}: {e}")))
}
