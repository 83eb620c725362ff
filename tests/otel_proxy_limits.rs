//! Review 18 #1: the proxy's trace headers count against its memory limits and stay small.
//!
//! With an exporter active, every produced record gets the `send` span's `traceparent` (and
//! the caller's `tracestate`). These headers used to be added after the admission check and
//! copied the caller's whole `tracestate` (up to ~16 KB) into every record, so one request of
//! many tiny records could make librdkafka hold far more than `max_in_flight_bytes`. Needs an
//! OTLP receiver (`SIDETRACK_TEST_OTLP`, started by `testbeds/otlp/start.sh`); skipped
//! without one. Its own test binary because the exporter is installed once per process.
#![cfg(all(feature = "otel", feature = "proxy"))]

mod common;

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message as _, TopicPartitionList};
use sidetrack::mocking::EmbeddedCluster;
use sidetrack::proxy::{Proxy, ProxyConfig};
use sidetrack::telemetry::{export, TracingConfig};

const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A valid `tracestate` at the grammar's limit: 32 members of 256-byte values (~8.5 KB).
fn huge_state() -> String {
    (0..32)
        .map(|i| format!("k{i}={}", "v".repeat(256)))
        .collect::<Vec<_>>()
        .join(",")
}

fn body(n: usize) -> String {
    let records = vec![r#"{"value":1}"#; n].join(",");
    format!(r#"{{"records":[{records}]}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_headers_are_charged_and_the_tracestate_is_capped() {
    let Some(base) = common::otlp::receiver() else {
        return;
    };
    let tracing_config = TracingConfig {
        endpoint: Some(base),
        service_name: Some("otel-limits".into()),
        ..TracingConfig::default()
    };
    let _telemetry = export::install(Some(&tracing_config), "otel-limits", false)
        .unwrap()
        .expect("tracing enabled");
    let cluster = EmbeddedCluster::start().expect("embedded cluster");
    cluster.create_topic("t", 1).unwrap();
    let start = |max_in_flight_bytes| {
        let config = ProxyConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_in_flight_bytes,
            ..ProxyConfig::default()
        };
        Proxy::builder(config)
            .embedded(&cluster)
            .build()
            .unwrap()
            .start()
    };

    // 100 records of 1 byte cost 100 × (1 + 512) = 51 300 bytes without headers: admitted
    // under 52 000 if the trace headers were not charged. With them (~66 bytes of
    // `traceparent` and 128 of overhead each), the request can never be admitted.
    let small = start(52_000).await.unwrap();
    let answer = ureq::post(&format!("{}/topics/t", small.url()))
        .header("traceparent", CALLER)
        .header("content-type", "application/vnd.kafka.json.v2+json")
        .config()
        .http_status_as_error(false)
        .build()
        .send(body(100))
        .unwrap();
    assert_eq!(
        answer.status(),
        413,
        "the injected trace headers are part of the admitted cost"
    );

    // A caller's 8.5 KB tracestate is cut to 512 bytes in each record.
    let proxy = start(64 * 1024 * 1024).await.unwrap();
    let answer = ureq::post(&format!("{}/topics/t", proxy.url()))
        .header("traceparent", CALLER)
        .header("tracestate", huge_state())
        .header("content-type", "application/vnd.kafka.json.v2+json")
        .send(body(3))
        .unwrap();
    assert_eq!(answer.status(), 200);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "otel-limits-reader")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("t", 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < 3 {
        assert!(Instant::now() < deadline, "only {seen} records on t");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let hs = m.headers().expect("trace headers");
            let state = hs
                .iter()
                .find(|h| h.key == "tracestate")
                .and_then(|h| h.value)
                .expect("the caller's state, cut");
            assert!(
                state.len() <= sidetrack::telemetry::w3c::TRACESTATE_COPY_MAX,
                "{} bytes of tracestate in a record",
                state.len()
            );
            assert!(state.starts_with(b"k0="), "the left-most member is kept");
            seen += 1;
        }
    }
    proxy.shutdown().await;
    small.shutdown().await;
}
