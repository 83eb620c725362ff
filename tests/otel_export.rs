//! The OTLP pipeline, read back from an independent receiver: spans built through sidetrack's
//! `tracing` layer and exporter are posted over OTLP/HTTP to `testbeds/otlp/receiver.py`, which
//! decodes them with the official protobuf definitions (`opentelemetry-proto`), and the test
//! reads the decoded spans. Needs `SIDETRACK_TEST_OTLP` (the receiver's base URL, set by
//! `.ci/run`); without it each test prints why it skipped.
#![cfg(feature = "otel")]

mod common;

use std::collections::BTreeMap;

use common::otlp::{receiver, spans_of};
use opentelemetry::trace::TraceContextExt;
use serde_json::Value;
use sidetrack::handler::Header;
use sidetrack::telemetry::carrier;
use sidetrack::telemetry::export::{layer, Telemetry};
use sidetrack::telemetry::TracingConfig;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

fn by_name<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
}

/// A pipeline exporting to the receiver, its subscriber, and the guard that flushes it.
fn pipeline(base: &str, service: &str) -> (Telemetry, tracing::Dispatch) {
    let mut cfg: TracingConfig = TracingConfig {
        endpoint: Some(base.to_owned()),
        service_name: Some(service.to_owned()),
        ..TracingConfig::default()
    };
    cfg.resource = BTreeMap::from([("deployment.environment.name".into(), "ci".into())]);
    let resolved = cfg.resolve_with("unused", |_| None).unwrap();
    let (telemetry, tracer) = Telemetry::start(&resolved).unwrap().unwrap();
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer(tracer)));
    (telemetry, dispatch)
}

#[test]
fn producer_and_consumer_spans_reach_the_receiver_linked() {
    let Some(base) = receiver() else { return };
    let (telemetry, dispatch) = pipeline(&base, "otel-export-test");
    let mut headers: Vec<Header> = Vec::new();
    let trace_id = tracing::dispatcher::with_default(&dispatch, || {
        let send = tracing::info_span!(
            "send",
            otel.name = "send orders",
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.destination.name = "orders",
            messaging.operation.type = "send",
        );
        let cx = send.context().span().span_context().clone();
        carrier::inject_span_context(&mut headers, &cx);
        drop(send);

        let producer = carrier::span_context(&headers).unwrap();
        let process = tracing::info_span!(
            "process",
            otel.name = "process orders",
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.destination.name = "orders",
            messaging.destination.partition.id = "0",
            messaging.kafka.offset = 42_i64,
        );
        process.add_link(producer.clone());
        process.in_scope(|| tracing::info_span!("charge card").in_scope(|| {}));
        producer.trace_id().to_string()
    });
    telemetry.flush();

    let spans = spans_of(&base, &trace_id, |s| !s.is_empty());
    let send = by_name(&spans, "send orders");
    assert_eq!(send["kind"], "SPAN_KIND_PRODUCER");
    assert_eq!(send["attributes"]["messaging.system"], "kafka");
    assert_eq!(send["attributes"]["messaging.destination.name"], "orders");
    assert_eq!(send["resource"]["service.name"], "otel-export-test");
    assert_eq!(send["resource"]["deployment.environment.name"], "ci");
    assert_eq!(send["scope"], "sidetrack");

    // The consumer span starts its own trace (the conventions' default) and links back.
    let all = ureq::get(&format!("{base}/spans"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let all: Vec<Value> = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let process = all
        .iter()
        .find(|s| s["name"] == "process orders" && s["links"][0]["span_id"] == send["span_id"])
        .expect("process span linked to the send span");
    assert_eq!(process["kind"], "SPAN_KIND_CONSUMER");
    assert_eq!(process["links"][0]["trace_id"], trace_id.as_str());
    assert_eq!(process["attributes"]["messaging.kafka.offset"], 42);
    assert_eq!(
        process["attributes"]["messaging.destination.partition.id"],
        "0"
    );
    let work = all
        .iter()
        .find(|s| s["name"] == "charge card" && s["trace_id"] == process["trace_id"])
        .expect("the handler's span");
    assert_eq!(work["parent_span_id"], process["span_id"]);
    telemetry.shutdown();
}

#[test]
fn a_w3c_spec_traceparent_is_continued() {
    let Some(base) = receiver() else { return };
    let (telemetry, dispatch) = pipeline(&base, "otel-continue-test");
    // The spec's example header, as a Java client with the OpenTelemetry agent writes it.
    let headers = vec![
        Header::new(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        Header::new("tracestate", "congo=t61rcWkgMzE"),
    ];
    tracing::dispatcher::with_default(&dispatch, || {
        let producer = carrier::span_context(&headers).unwrap();
        let process = tracing::info_span!(
            "process",
            otel.name = "process payments",
            otel.kind = "consumer"
        );
        process
            .set_parent(opentelemetry::Context::new().with_remote_span_context(producer.clone()))
            .unwrap();
        process.add_link(producer);
        process.in_scope(|| {});
    });
    telemetry.flush();
    let spans = spans_of(&base, "0af7651916cd43dd8448eb211c80319c", |s| !s.is_empty());
    let process = by_name(&spans, "process payments");
    assert_eq!(process["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(process["trace_state"], "congo=t61rcWkgMzE");
    assert_eq!(process["links"][0]["span_id"], "b7ad6b7169203331");
    telemetry.shutdown();
}
