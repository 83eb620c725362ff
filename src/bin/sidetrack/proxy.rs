//! `sidetrack proxy`: the HTTP produce proxy as a service.
//!
//! Only the process around the library's [`Proxy`]: arguments, the log format, the config
//! file, and the demo mode. With `--brokers` it serves that cluster; without, it starts an
//! [`EmbeddedCluster`] with one demo topic, so `sidetrack proxy` alone answers real produce
//! requests on a laptop. Everything a request meets (authentication, decoding, rules,
//! producing, shutdown) is the library's, so an embedder and this command behave the same.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use sidetrack::mocking::EmbeddedCluster;
use sidetrack::proxy::{Proxy, ProxyConfig};
use sidetrack::telemetry::TracingConfig;

use crate::Failure;

/// How the proxy writes its logs (access logs included) on stderr. (The variants carry `//`
/// comments, not doc comments: clap would print doc comments in `--help`.)
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    // One human-readable line per event.
    Text,
    // One JSON object per line, for a log collector.
    Json,
}

/// `sidetrack proxy`'s own arguments (`--brokers` and `-X` are global).
#[derive(Args, Debug)]
pub(crate) struct ProxyArgs {
    /// Address to listen on [default: the config's `listen`, else 127.0.0.1:8082].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Configuration file with a [proxy] section (see docs/proxy.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Without brokers: the topic created on the embedded broker.
    #[arg(long, default_value = "demo", value_name = "TOPIC")]
    pub demo_topic: String,
    /// Without brokers: partitions of the demo topic.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub demo_partitions: i32,
    /// Log format on stderr (access logs included; `RUST_LOG` filters, default `info`).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Serves the proxy until Ctrl-C or SIGTERM, then drains it (requests in flight finish, the
/// producer is flushed).
///
/// The config file is read first; `--listen`, `-X` properties (added to the producer's) and
/// `--brokers` override it. Without brokers an embedded broker (librdkafka's mock cluster)
/// is started with one demo topic, so the proxy can be tried with nothing else running.
pub(crate) async fn run(
    brokers: Option<String>,
    props: &[String],
    args: ProxyArgs,
) -> Result<(), Failure> {
    let text = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let tracing_config = match &text {
        Some(t) => TracingConfig::from_toml_str(t).map_err(|e| Failure::Usage(e.to_string()))?,
        None => None,
    };
    let telemetry = init_logs(args.log_format, tracing_config.as_ref())?;
    let mut config = match &text {
        Some(t) => ProxyConfig::from_toml_str(t).map_err(|e| Failure::Usage(e.to_string()))?,
        None => ProxyConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    for p in props {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("-X {p}: expected KEY=VALUE")))?;
        config
            .producer
            .insert(k.trim().to_owned(), v.trim().to_owned());
    }
    if let Some(b) = brokers.filter(|b| !b.trim().is_empty()) {
        config.brokers = b;
    }
    let mut embedded = None;
    if config.brokers.trim().is_empty() {
        let cluster = EmbeddedCluster::start().map_err(|e| Failure::Other(e.to_string()))?;
        cluster
            .create_topic(&args.demo_topic, args.demo_partitions)
            .map_err(|e| {
                Failure::Usage(format!("creating demo topic `{}`: {e}", args.demo_topic))
            })?;
        println!(
            "no --brokers or KAFKA_BROKERS: started an embedded broker (librdkafka's mock cluster, \
             in memory, gone when the proxy stops) at {}",
            cluster.bootstrap_servers()
        );
        println!(
            "created topic `{}` ({} partitions); the embedded broker has no CreateTopics API, so \
             other topics answer 404 (use --demo-topic, or a real broker)",
            args.demo_topic, args.demo_partitions
        );
        embedded = Some(cluster);
    }
    let mut builder = Proxy::builder(config);
    if let Some(c) = &embedded {
        builder = builder.embedded(c);
    }
    let proxy = builder.build().map_err(|e| Failure::Usage(e.to_string()))?;
    let handle = proxy
        .start()
        .await
        .map_err(|e| Failure::Other(e.to_string()))?;
    println!(
        "sidetrack proxy listening on {} (cluster id `{}`); Ctrl-C to stop",
        handle.url(),
        handle.cluster_id()
    );
    if embedded.is_some() {
        println!(
            "try: curl -s -X POST {}/topics/{} -H 'Content-Type: application/vnd.kafka.json.v2+json' \
             --data '{{\"records\":[{{\"key\":\"k1\",\"value\":{{\"hello\":\"world\"}}}}]}}'",
            handle.url(),
            args.demo_topic
        );
    }
    shutdown_signal().await;
    println!("shutting down: finishing requests in flight, flushing the producer");
    handle.shutdown().await;
    drop(embedded);
    #[cfg(feature = "otel")]
    if let Some(t) = telemetry {
        // The last requests' spans are exported before the process exits (blocking).
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    #[cfg(not(feature = "otel"))]
    let _ = telemetry;
    Ok(())
}

/// What keeps the span exporter running (feature `otel`); nothing without the feature.
#[cfg(feature = "otel")]
type Telemetry = Option<sidetrack::telemetry::export::Telemetry>;
#[cfg(not(feature = "otel"))]
type Telemetry = Option<std::convert::Infallible>;

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`, librdkafka at `warn`),
/// and, with a `[tracing]` section (feature `otel`), exports spans over OTLP. Log lines written
/// inside a request carry its `trace_id` and `span_id` (text: in the span prefix; JSON: in
/// `span`).
fn init_logs(format: LogFormat, tracing: Option<&TracingConfig>) -> Result<Telemetry, Failure> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    if let Some(t) = tracing {
        t.validate().map_err(|e| Failure::Usage(e.to_string()))?;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,librdkafka=warn".into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().with_current_span(true).boxed(),
    };
    #[cfg(feature = "otel")]
    {
        use sidetrack::telemetry::export;
        use tracing_subscriber::filter::LevelFilter;
        let started = match tracing {
            Some(t) => {
                let resolved = t
                    .resolve("sidetrack-proxy")
                    .map_err(|e| Failure::Usage(e.to_string()))?;
                export::Telemetry::start(&resolved).map_err(|e| Failure::Other(e.to_string()))?
            }
            None => None,
        };
        let (telemetry, tracer) = match started {
            Some((t, tracer)) => (Some(t), Some(tracer)),
            None => (None, None),
        };
        let _ = tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(tracer.map(|t| export::layer(t).with_filter(LevelFilter::INFO)))
            .try_init();
        Ok(telemetry)
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .try_init();
        Ok(None)
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
