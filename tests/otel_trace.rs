//! One trace from the HTTP request to the dead letter, read back from an OTLP receiver that
//! decodes with the official protobuf definitions (`testbeds/otlp/receiver.py`, started by
//! `.ci/run` as `SIDETRACK_TEST_OTLP`; without it the test prints why it skipped).
//!
//! A client sends a request carrying the W3C spec's example `traceparent` (what a Java service
//! with the OpenTelemetry agent sends) to the proxy on the embedded broker; the record fails
//! its first attempt, is retried once, fails again and is dead-lettered. With
//! `process_parent = "child"` every span is in the client's trace, each a child of the one
//! before, and each attempt links back to the producer's span. The same flow runs in link mode
//! (the default) on a second topic: each attempt is then a trace of its own, connected by links
//! to the span that wrote the record and to the origin; its dead letter is then replayed with
//! `sidetrack dlq replay`, and the replayed record's attempt links to the dead letter's hand-off.
//! A record produced directly by a
//! "Java client" (its `traceparent`/`tracestate` headers as the agent writes them) is continued
//! too.
#![cfg(all(feature = "otel", feature = "proxy", feature = "cli"))]

mod common;

use std::time::{Duration, Instant};

use common::otlp::{receiver, spans_of};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header as KHeader, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _, TopicPartitionList};
use serde_json::Value;
use sidetrack::config::ProcessParent;
use sidetrack::handler::Header;
use sidetrack::mocking::EmbeddedCluster;
use sidetrack::proxy::{Proxy, ProxyConfig};
use sidetrack::retry::Tier;
use sidetrack::telemetry::{carrier, export, TracingConfig};
use sidetrack::{handler_fn, Config, Context, HandlerError, Message};

/// A trace id of this run's own (the receiver keeps every run's spans): the W3C spec's
/// example id with its first 8 digits replaced by the clock.
fn run_trace_id(spec_id: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    format!("{nanos:08x}{}", &spec_id[8..])
}

/// One retry tier of 200 ms: a failing record is tried twice, then dead-lettered.
fn config_retry() -> sidetrack::config::RetryConfig {
    sidetrack::config::RetryConfig::tiers([Tier::new(Duration::from_millis(200), 1)])
}

/// Every span the receiver holds (all runs, all traces).
fn all_spans(base: &str) -> Vec<Value> {
    ureq::get(&format!("{base}/spans"))
        .call()
        .expect("receiver answers")
        .into_body()
        .read_to_string()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn find<'a>(spans: &'a [Value], what: &str, f: impl Fn(&Value) -> bool) -> &'a Value {
    spans.iter().find(|s| f(s)).unwrap_or_else(|| {
        let names: Vec<_> = spans.iter().map(|s| s["name"].to_string()).collect();
        panic!("no {what} among {names:?}")
    })
}

fn linked_to(span: &Value, other: &Value) -> bool {
    span["links"]
        .as_array()
        .is_some_and(|ls| ls.iter().any(|l| l["span_id"] == other["span_id"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_request_to_the_dead_letter() {
    let Some(base) = receiver() else { return };
    // The spec's example `traceparent` (section 3.2.2.5) as a caller sends it, and a record
    // header as the OpenTelemetry Java agent's Kafka instrumentation writes it.
    let caller_trace = run_trace_id("0af7651916cd43dd8448eb211c80319c");
    let caller = format!("00-{caller_trace}-b7ad6b7169203331-01");
    let java_trace = run_trace_id("4bf92f3577b34da6a3ce929d0e0e4736");
    let java = format!("00-{java_trace}-00f067aa0ba902b7-01");
    let tracing_config = TracingConfig {
        endpoint: Some(base.clone()),
        service_name: Some("otel-e2e".into()),
        process_parent: ProcessParent::Child,
        ..TracingConfig::default()
    };
    let telemetry = export::install(Some(&tracing_config), "otel-e2e", false)
        .unwrap()
        .expect("tracing enabled");

    let cluster = EmbeddedCluster::start().expect("embedded cluster");
    cluster.create_topic("orders", 1).unwrap();
    let mut config = Config::new("unused", "billing", ["orders"]);
    config.retry = config_retry();
    config.handoff.timeout = Duration::from_secs(2);
    config.shutdown_timeout = Duration::from_secs(5);
    config.tracing = Some(tracing_config.clone());
    config
        .consumer
        .insert("session.timeout.ms".into(), "6000".into());
    let handler = handler_fn(|msg: Message, cx: Context| async move {
        // The handler's own span nests in the process span, and the context it would pass on
        // to another service is that span's.
        let span = tracing::info_span!("charge card");
        let _e = span.enter();
        assert!(
            cx.traceparent().is_some(),
            "the handler sees the trace context"
        );
        if msg.payload() == Some(&b"\"ok\""[..]) {
            return Ok(());
        }
        Err(HandlerError::retryable("payment service down"))
    });
    let runtime = sidetrack::Runtime::builder(config)
        .embedded(&cluster)
        .handler(handler)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    // The same flow in link mode (the default) on a second topic and group.
    cluster.create_topic("payments", 1).unwrap();
    let mut link_config = Config::new("unused", "billing-link", ["payments"]);
    link_config.retry = config_retry();
    link_config.handoff.timeout = Duration::from_secs(2);
    link_config.shutdown_timeout = Duration::from_secs(5);
    link_config.tracing = Some(TracingConfig {
        process_parent: ProcessParent::Link,
        ..tracing_config.clone()
    });
    let link_runtime = sidetrack::Runtime::builder(link_config)
        .embedded(&cluster)
        .handler(handler_fn(|_: Message, _: Context| async move {
            Err(HandlerError::retryable("payment service down"))
        }))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    let proxy_config = ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ProxyConfig::default()
    };
    let proxy = Proxy::builder(proxy_config)
        .embedded(&cluster)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let answer = ureq::post(&format!("{}/topics/orders", proxy.url()))
        .header("traceparent", &caller)
        .header("tracestate", "congo=t61rcWkgMzE")
        .header("content-type", "application/vnd.kafka.json.v2+json")
        .send(r#"{"records":[{"key":"customer-7","value":{"amount":12}}]}"#)
        .unwrap();
    assert_eq!(answer.status(), 200);
    let link_trace = run_trace_id("4bf92f3577b34da6a3ce929d0e0e4736");
    let answer = ureq::post(&format!("{}/topics/payments", proxy.url()))
        .header(
            "traceparent",
            &format!("00-{link_trace}-b7ad6b7169203331-01"),
        )
        .header("content-type", "application/vnd.kafka.json.v2+json")
        .send(r#"{"records":[{"value":{"amount":5}}]}"#)
        .unwrap();
    assert_eq!(answer.status(), 200);

    // A record produced by a Java client with the OpenTelemetry agent: handled at once.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to("orders")
                .key("java-1")
                .payload("\"ok\"")
                .headers(
                    OwnedHeaders::new()
                        .insert(KHeader {
                            key: "traceparent",
                            value: Some(java.as_str()),
                        })
                        .insert(KHeader {
                            key: "tracestate",
                            value: Some("rojo=00f067aa0ba902b7"),
                        }),
                ),
            Duration::from_secs(5),
        )
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while runtime
        .stats()
        .dead_lettered
        .iter()
        .map(|(_, n)| n)
        .sum::<u64>()
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "no dead letter: {:?}",
            runtime.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while link_runtime.stats().dead_lettered.is_empty()
        || link_runtime
            .stats()
            .dead_lettered
            .iter()
            .all(|(_, n)| *n == 0)
    {
        assert!(Instant::now() < deadline, "no dead letter in link mode");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Replay the link-mode dead letter (`sidetrack dlq replay`): it fails again, and its new
    // attempt links to the dead letter's hand-off span.
    let bootstrap = cluster.bootstrap_servers().to_owned();
    let replay = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sidetrack"))
            .args(["--brokers", &bootstrap, "dlq", "replay"])
            .args(["--topic", "payments.billing-link.dlq", "--yes"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        replay.status.success(),
        "{}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while link_runtime
        .stats()
        .dead_lettered
        .iter()
        .map(|(_, n)| n)
        .sum::<u64>()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the replayed record was not dead-lettered again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.shutdown().await;
    runtime.shutdown().await.unwrap();
    link_runtime.shutdown().await.unwrap();
    tokio::task::spawn_blocking(move || telemetry.flush())
        .await
        .unwrap();

    let spans = spans_of(&base, caller_trace.as_str(), |s| s.len() >= 7);
    let server = find(&spans, "server span", |s| s["kind"] == "SPAN_KIND_SERVER");
    assert_eq!(server["name"], "POST /topics/{topic}");
    assert_eq!(
        server["parent_span_id"], "b7ad6b7169203331",
        "the caller's span continued"
    );
    assert_eq!(server["resource"]["service.name"], "otel-e2e");
    let send = find(&spans, "send orders", |s| s["name"] == "send orders");
    assert_eq!(send["kind"], "SPAN_KIND_PRODUCER");
    assert_eq!(send["parent_span_id"], server["span_id"]);
    assert_eq!(send["attributes"]["messaging.system"], "kafka");
    assert_eq!(send["attributes"]["messaging.destination.name"], "orders");
    assert_eq!(
        send["attributes"]["messaging.destination.partition.id"],
        "0"
    );

    let first = find(&spans, "first process", |s| s["name"] == "process orders");
    assert_eq!(first["kind"], "SPAN_KIND_CONSUMER");
    assert_eq!(
        first["parent_span_id"], send["span_id"],
        "child of the producer's span"
    );
    assert!(linked_to(first, send), "and linked to it");
    let a = &first["attributes"];
    assert_eq!(a["messaging.system"], "kafka");
    assert_eq!(a["messaging.destination.partition.id"], "0");
    assert_eq!(a["messaging.kafka.offset"], 0);
    assert_eq!(a["messaging.consumer.group.name"], "billing");
    assert_eq!(a["sidetrack.attempt"], 1);
    assert_eq!(a["sidetrack.ordering"], "partition");
    assert_eq!(a["sidetrack.outcome"], "retry");
    assert_eq!(a["error.type"], "retryable");
    assert!(
        a.get("messaging.kafka.message.key").is_none(),
        "keys are opt-in"
    );
    assert_eq!(first["status"]["code"], "STATUS_CODE_ERROR");
    let work = find(&spans, "handler span", |s| {
        s["name"] == "charge card" && s["parent_span_id"] == first["span_id"]
    });
    assert_eq!(work["trace_id"], caller_trace.as_str());

    let hop = find(&spans, "retry hand-off", |s| {
        s["kind"] == "SPAN_KIND_PRODUCER" && s["attributes"]["sidetrack.hop"] == "retry"
    });
    assert_eq!(hop["parent_span_id"], first["span_id"]);
    let retry_topic = hop["attributes"]["messaging.destination.name"]
        .as_str()
        .unwrap();
    assert_eq!(hop["name"], format!("send {retry_topic}"));

    let second = find(&spans, "second process", |s| {
        s["name"] == format!("process {retry_topic}")
    });
    assert_eq!(
        second["parent_span_id"], hop["span_id"],
        "child of the hand-off"
    );
    assert!(linked_to(second, send), "every attempt links to the origin");
    assert_eq!(second["attributes"]["sidetrack.attempt"], 2);
    assert_eq!(second["attributes"]["sidetrack.outcome"], "dead_letter");
    assert_eq!(second["attributes"]["error.type"], "exhausted");

    let dead = find(&spans, "dead-letter hand-off", |s| {
        s["attributes"]["sidetrack.hop"] == "dead_letter"
    });
    assert_eq!(dead["parent_span_id"], second["span_id"]);
    assert_eq!(
        dead["attributes"]["sidetrack.dead_letter.reason"],
        "exhausted"
    );
    let dlq = dead["attributes"]["messaging.destination.name"]
        .as_str()
        .unwrap()
        .to_owned();

    // The dead letter: one traceparent (the dead-letter hand-off's) and the origin's context.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "otel-e2e-reader")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&dlq, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let headers: Vec<Header> = loop {
        assert!(Instant::now() < deadline, "no record on {dlq}");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let hs = m.headers().expect("headers");
            break hs
                .iter()
                .map(|h| Header {
                    key: h.key.as_bytes().to_vec(),
                    value: h.value.map(<[u8]>::to_vec),
                })
                .collect();
        }
    };
    assert_eq!(
        headers.iter().filter(|h| h.is("traceparent")).count(),
        1,
        "replaced, never stacked: {headers:?}"
    );
    let own = carrier::extract(&headers).unwrap();
    assert_eq!(
        own.parent.parent_id.to_hex(),
        dead["span_id"].as_str().unwrap()
    );
    assert_eq!(
        carrier::origin_trace_id(&headers).as_deref(),
        Some(caller_trace.as_str())
    );
    let origin = carrier::extract_origin(&headers).unwrap();
    assert_eq!(
        origin.parent.parent_id.to_hex(),
        send["span_id"].as_str().unwrap()
    );

    // The Java client's record: continued (child mode), its tracestate kept.
    let java_spans = spans_of(&base, &java_trace, |s| !s.is_empty());
    let process = find(&java_spans, "process of the Java record", |s| {
        s["name"] == "process orders"
    });
    assert_eq!(process["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(process["trace_state"], "rojo=00f067aa0ba902b7");
    assert_eq!(process["attributes"]["sidetrack.outcome"], "success");

    // Link mode: each attempt is a trace of its own, connected by links to the span that wrote
    // the record and to the origin; hand-offs are children of the attempt that failed.
    let caller_side = spans_of(&base, &link_trace, |s| s.len() >= 2);
    let send2 = find(&caller_side, "send payments", |s| {
        s["name"] == "send payments"
    });
    let all = all_spans(&base);
    let p1 = find(&all, "first process (link mode)", |s| {
        s["name"] == "process payments" && linked_to(s, send2)
    });
    assert_ne!(p1["trace_id"], link_trace.as_str(), "a trace of its own");
    assert_eq!(p1["parent_span_id"], "");
    assert_eq!(p1["links"][0]["attributes"]["sidetrack.link"], "producer");
    let hop1 = find(&all, "retry hand-off (link mode)", |s| {
        s["parent_span_id"] == p1["span_id"] && s["attributes"]["sidetrack.hop"] == "retry"
    });
    assert_eq!(hop1["trace_id"], p1["trace_id"]);
    let p2 = find(&all, "second process (link mode)", |s| {
        s["kind"] == "SPAN_KIND_CONSUMER" && linked_to(s, hop1)
    });
    assert!(linked_to(p2, send2), "the retry links back to the origin");
    assert_ne!(p2["trace_id"], p1["trace_id"]);
    let dead2 = find(&all, "dead-letter hand-off (link mode)", |s| {
        s["parent_span_id"] == p2["span_id"]
    });
    assert_eq!(dead2["attributes"]["sidetrack.hop"], "dead_letter");

    // The replayed record's first attempt links to the dead letter it came from.
    let replayed = find(&all, "process of the replayed record", |s| {
        s["kind"] == "SPAN_KIND_CONSUMER" && linked_to(s, dead2)
    });
    assert!(linked_to(replayed, send2), "and still to the origin");
}
