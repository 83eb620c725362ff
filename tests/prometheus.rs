//! The built-in Prometheus endpoint (its own test binary: it installs the global recorder).
#![cfg(feature = "prometheus")]

mod common;

use common::*;
use sidetrack::{HandlerError, Runtime};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_prometheus_text() {
    let (topic, group) = ("prom", "g-prom");
    let cluster = cluster_with(topic, 1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cfg = config_for(topic, group);
    cfg.metrics.listen = Some(addr);
    cfg.metrics.lag_interval = std::time::Duration::from_millis(200);
    let rt = Runtime::builder(cfg)
        .embedded(&cluster)
        .handler(Recorder::new(|m| match m.payload_str()? {
            "bad" => Err(HandlerError::permanent("no")),
            _ => Ok(()),
        }))
        .started()
        .await;
    produce_to(&cluster, topic, &["a".into(), "b".into(), "bad".into()], 0).await;
    wait_for("resolved", || {
        rt.stats().handled == 2 && rt.stats().total_dead_lettered() == 1
    })
    .await;
    let body = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let ok = sidetrack::testing::wait_until(WAIT, || {
        let body = body.clone();
        async move {
            let text = http_get(addr, "/metrics").await;
            let found = text.contains("sidetrack_consumer_lag{");
            *body.lock().unwrap() = text;
            found
        }
    })
    .await;
    let body = body.lock().unwrap().clone();
    assert!(ok, "no lag gauge in:\n{body}");
    for needle in [
        "sidetrack_records_handled_total{source=\"prom\"} 2",
        "sidetrack_dead_lettered_total{source=\"prom\",reason=\"permanent\"} 1",
        "sidetrack_bytes_consumed_total",
        "sidetrack_end_to_end_latency_seconds",
        "sidetrack_processing_seconds",
        "# HELP sidetrack_consumer_lag",
    ] {
        assert!(body.contains(needle), "missing `{needle}` in:\n{body}");
    }
    rt.shutdown().await.unwrap();
}
