//! The HTTP produce proxy through a real HTTP client: every row of the status table, records
//! read back at their acknowledged offsets, faults, saturation, auth, idempotency keys,
//! rules, and graceful shutdown under load. Scenarios without fault injection also run on
//! Apache Kafka (`SIDETRACK_TEST_APACHE_KAFKA`), Tansu (`SIDETRACK_TEST_TANSU`) and kfake
//! (`SIDETRACK_TEST_KFAKE`).
#![cfg(feature = "proxy")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::proxy::*;
use hyper::StatusCode;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;
use sidetrack::proxy::{ProduceRecord, ProxyConfig, Rejection, RequestInfo, TokenConfig};
use sidetrack::testing::wait_until;
use sidetrack::Header;

fn header<'a>(r: &'a sidetrack::testing::Record, name: &str) -> Option<&'a [u8]> {
    r.headers
        .iter()
        .find(|h| h.is(name))
        .and_then(|h| h.value.as_deref())
}

/// Records of every format come back byte for byte at the offsets the proxy answered.
async fn produce_and_read_back(broker: Broker) {
    let topic = broker.topic("orders", 3).await;
    let proxy = broker.start(ProxyConfig::default()).await;
    let addr = proxy.local_addr();

    // JSON format: key and value written as their JSON text; headers base64.
    let a = post_json(
        &proxy,
        &topic,
        json!({"records": [
            {"key": "k1", "value": {"amount": 5, "items": [1, 2]}, "headers": [{"key": "trace", "value": b64(b"\x00\xffabc")}]},
            {"value": [1, "two"], "partition": 2},
            {"key": "k3", "value": null},
        ]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.json());
    let json_offsets = a.offsets();
    assert_eq!(json_offsets.len(), 3);
    assert!(json_offsets.iter().all(Option::is_some), "{:?}", a.json());
    assert_eq!(json_offsets[1].unwrap().0, 2, "explicit partition");

    // Binary format, to a partition in the path.
    let bin = json!({"records": [{"key": b64(b"\x01\x02"), "value": b64(b"\xde\xad\xbe\xef")}]});
    let a = request(
        addr,
        "POST",
        &format!("/topics/{topic}/partitions/1"),
        &[("content-type", BINARY_V2)],
        serde_json::to_vec(&bin).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.json());
    let (bin_p, bin_o) = a.offsets()[0].unwrap();
    assert_eq!(bin_p, 1);

    // Plain application/json is the JSON format.
    let a = request(
        addr,
        "POST",
        &format!("/topics/{topic}"),
        &[("content-type", "application/json; charset=utf-8")],
        r#"{"records":[{"value":"plain"}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    let plain = a.offsets()[0].unwrap();

    // v3 single record.
    let clusters = get(&proxy, "/v3/clusters").await.json();
    let cluster = clusters["data"][0]["cluster_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(cluster, proxy.cluster_id());
    let v3 = json!({"partition_id": 0, "key": {"type": "STRING", "data": "v3-key"},
        "value": {"type": "JSON", "data": {"v": 3}},
        "headers": [{"name": "h3", "value": b64(b"x")}]});
    let a = request(
        addr,
        "POST",
        &format!("/v3/clusters/{cluster}/topics/{topic}/records"),
        &[("content-type", "application/json")],
        serde_json::to_vec(&v3).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.json());
    let v3a = a.json();
    assert_eq!(v3a["error_code"], 200);
    assert_eq!(v3a["partition_id"], 0);
    assert_eq!(v3a["value"]["size"], 7);

    let records = broker.read_all(&topic).await;
    let at = |p: i32, o: Option<i64>| {
        let o = o.expect("an offset (no implicit ack expected here)");
        records
            .iter()
            .find(|r| r.partition == p && r.offset == o)
            .unwrap_or_else(|| panic!("nothing at {p}:{o} in {records:?}"))
    };
    let (p, o) = json_offsets[0].unwrap();
    let r = at(p, o);
    assert_eq!(r.key.as_deref(), Some(&b"\"k1\""[..]));
    assert_eq!(
        r.payload.as_deref(),
        Some(&br#"{"amount":5,"items":[1,2]}"#[..])
    );
    assert_eq!(header(r, "trace"), Some(&b"\x00\xffabc"[..]));
    let (p, o) = json_offsets[1].unwrap();
    assert_eq!(at(p, o).payload.as_deref(), Some(&br#"[1,"two"]"#[..]));
    let (p, o) = json_offsets[2].unwrap();
    assert_eq!(at(p, o).payload, None, "a null value is a tombstone");
    let r = at(bin_p, bin_o);
    assert_eq!(r.key.as_deref(), Some(&b"\x01\x02"[..]));
    assert_eq!(r.payload.as_deref(), Some(&b"\xde\xad\xbe\xef"[..]));
    assert_eq!(
        at(plain.0, plain.1).payload.as_deref(),
        Some(&b"\"plain\""[..])
    );
    let r = at(0, v3a["offset"].as_i64());
    assert_eq!(r.key.as_deref(), Some(&b"v3-key"[..]));
    assert_eq!(r.payload.as_deref(), Some(&br#"{"v":3}"#[..]));
    assert_eq!(header(r, "h3"), Some(&b"x"[..]));
    assert_eq!(records.len(), 6, "nothing else written");
    proxy.shutdown().await;
}
on_every_broker!(produce_and_read_back, produce_and_read_back);

/// Every client error of the status table: status, error code, and nothing written.
async fn client_errors(broker: Broker) {
    let topic = broker.topic("orders", 2).await;
    let config = ProxyConfig {
        max_body_bytes: 1024,
        max_in_flight_records: 5,
        ..ProxyConfig::default()
    };
    let proxy = broker.start(config).await;
    let addr = proxy.local_addr();
    let path = format!("/topics/{topic}");
    let one = r#"{"records":[{"value":1}]}"#;
    // (what, path, request headers, body, expected status, expected error_code)
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, Bytes, u16, u64);
    let cases: Vec<Case<'_>> = vec![
        ("no content type", path.clone(), vec![], one.into(), 415, 41501),
        ("form", path.clone(), vec![("content-type", "application/x-www-form-urlencoded")], one.into(), 415, 41501),
        ("avro", path.clone(), vec![("content-type", "application/vnd.kafka.avro.v2+json")], one.into(), 415, 41502),
        ("malformed", path.clone(), vec![("content-type", JSON_V2)], "{\"records\":[".into(), 422, 42201),
        ("not utf-8", path.clone(), vec![("content-type", JSON_V2)], Bytes::from_static(b"{\"records\":[{\"value\":\"\xff\xfe\"}]}"), 422, 42201),
        ("no records", path.clone(), vec![("content-type", JSON_V2)], "{\"recs\":[]}".into(), 422, 42202),
        ("empty records", path.clone(), vec![("content-type", JSON_V2)], "{\"records\":[]}".into(), 422, 42202),
        ("bad base64", path.clone(), vec![("content-type", BINARY_V2)], "{\"records\":[{\"value\":\"!!\"}]}".into(), 422, 42203),
        // 1e400 is valid JSON (RFC 8259 sets numbers no range): the value is wrong, not the syntax.
        ("huge partition", path.clone(), vec![("content-type", JSON_V2)], "{\"records\":[{\"value\":1,\"partition\":1e400}]}".into(), 422, 42202),
        ("record as an array", path.clone(), vec![("content-type", BINARY_V2)], "{\"records\":[[null,null]]}".into(), 422, 42202),
        ("partition on the partition route", format!("{path}/partitions/0"), vec![("content-type", JSON_V2)], "{\"records\":[{\"value\":1,\"partition\":0}]}".into(), 422, 42204),
        ("negative partition", path.clone(), vec![("content-type", JSON_V2)], "{\"records\":[{\"value\":1,\"partition\":-1}]}".into(), 422, 42204),
        ("bad path partition", format!("{path}/partitions/x"), vec![("content-type", JSON_V2)], one.into(), 422, 42204),
        ("reserved header", path.clone(), vec![("content-type", JSON_V2)], "{\"records\":[{\"value\":1,\"headers\":[{\"key\":\"sidetrack-error\",\"value\":null}]}]}".into(), 422, 42205),
        ("deep json", path.clone(), vec![("content-type", JSON_V2)], format!("{{\"records\":[{{\"value\":{}{}}}]}}", "[".repeat(200), "]".repeat(200)).into(), 422, 42201),
        ("unknown topic", "/topics/no-such-topic".into(), vec![("content-type", JSON_V2)], one.into(), 404, 40401),
        ("invalid topic name", "/topics/a%20b".into(), vec![("content-type", JSON_V2)], one.into(), 404, 40401),
        ("unknown partition", format!("{path}/partitions/7"), vec![("content-type", JSON_V2)], one.into(), 404, 40402),
        ("unknown partition in body", path.clone(), vec![("content-type", JSON_V2)], "{\"records\":[{\"value\":1},{\"value\":2,\"partition\":2}]}".into(), 404, 40402),
        ("unknown cluster", format!("/v3/clusters/other/topics/{topic}/records"), vec![("content-type", "application/json")], "{}".into(), 404, 40403),
        ("no route", "/nope".into(), vec![], Bytes::new(), 404, 40404),
        ("dead-letter topic", "/topics/orders.billing.dlq".into(), vec![("content-type", JSON_V2)], one.into(), 403, 40302),
        ("retry topic", "/topics/orders.billing.retry.1s".into(), vec![("content-type", JSON_V2)], one.into(), 403, 40302),
        ("internal topic", "/topics/__consumer_offsets".into(), vec![("content-type", JSON_V2)], one.into(), 403, 40302),
        ("body too large", path.clone(), vec![("content-type", JSON_V2)], format!("{{\"records\":[{{\"value\":\"{}\"}}]}}", "x".repeat(2000)).into(), 413, 41301),
        ("more records than can ever be admitted", path.clone(), vec![("content-type", JSON_V2)], format!("{{\"records\":[{}]}}", ["{\"value\":1}"; 6].join(",")).into(), 413, 41303),
        ("bad idempotency key", path.clone(), vec![("content-type", JSON_V2), ("idempotency-key", "has space")], one.into(), 400, 40001),
    ];
    for (what, path, headers, body, status, code) in cases {
        let a = request(addr, "POST", &path, &headers, body).await.unwrap();
        assert_eq!(
            a.status.as_u16(),
            status,
            "{what}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(
            a.code(),
            Some(code),
            "{what}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert!(
            a.json()["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    // Wrong method on a route.
    let a = request(addr, "GET", &path, &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!((a.status.as_u16(), a.code()), (405, Some(40501)));
    // A body larger than the limit without Content-Length (chunked) is cut off too.
    let chunks =
        futures_util::stream::iter((0..40).map(|_| {
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![b' '; 100])))
        }));
    let a = request_streamed(addr, &path, http_body_util::StreamBody::new(chunks)).await;
    assert_eq!((a.0, a.1), (413, Some(41301)));
    // Nothing of all that was written.
    assert!(broker.read_all(&topic).await.is_empty());
    proxy.shutdown().await;
}
on_every_broker!(client_errors, client_errors);

async fn request_streamed<B>(addr: std::net::SocketAddr, path: &str, body: B) -> (u16, Option<u64>)
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", JSON_V2)
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (status, v["error_code"].as_u64())
}

/// Bearer tokens: 401 without or with a wrong token, 403 outside the token's topics, 200
/// inside; tokens never appear in answers.
async fn auth(broker: Broker) {
    let topic = broker.topic("payments", 1).await;
    let other = broker.topic("ledger", 1).await;
    let mut config = ProxyConfig::default();
    config.auth.tokens.push(TokenConfig {
        name: "payments-team".into(),
        sha256: Some(sidetrack::proxy::token_sha256("tok-123")),
        topics: vec!["payments*".into()],
        ..Default::default()
    });
    let proxy = broker.start(config).await;
    let addr = proxy.local_addr();
    let body = r#"{"records":[{"value":1}]}"#;
    let post = |path: String, auth: Option<&'static str>| async move {
        let mut h = vec![("content-type", JSON_V2)];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        request(addr, "POST", &path, &h, body).await.unwrap()
    };
    let a = post(format!("/topics/{topic}"), None).await;
    assert_eq!((a.status.as_u16(), a.code()), (401, Some(40101)));
    assert!(a.headers.get("www-authenticate").is_some());
    let a = post(format!("/topics/{topic}"), Some("Bearer wrong")).await;
    assert_eq!((a.status.as_u16(), a.code()), (401, Some(40101)));
    assert!(!String::from_utf8_lossy(&a.body).contains("wrong"));
    let a = post(format!("/topics/{other}"), Some("Bearer tok-123")).await;
    assert_eq!((a.status.as_u16(), a.code()), (403, Some(40301)));
    assert!(!String::from_utf8_lossy(&a.body).contains("tok-123"));
    let a = post(format!("/topics/{topic}"), Some("Bearer tok-123")).await;
    assert_eq!(a.status, StatusCode::OK);
    // Unauthenticated v3 cluster listing is refused too; health is open.
    assert_eq!(get(&proxy, "/v3/clusters").await.status.as_u16(), 401);
    assert_eq!(get(&proxy, "/healthz").await.status, StatusCode::OK);
    assert_eq!(broker.read_all(&topic).await.len(), 1);
    assert!(broker.read_all(&other).await.is_empty());
    proxy.shutdown().await;
}
on_every_broker!(auth, auth);

/// A record too large for the producer fails the request with 413 after the records before
/// it were written: their offsets are in the answer, the rest are marked not sent, and the
/// client can send exactly those again.
async fn partial_failure(broker: Broker) {
    let topic = broker.topic("orders", 1).await;
    let proxy = broker
        .proxy(ProxyConfig::default())
        .producer_property("message.max.bytes", "2000")
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let big = "x".repeat(5000);
    let a = post_json(
        &proxy,
        &topic,
        json!({"records": [{"value": "a"}, {"value": "b"}, {"value": big}, {"value": "d"}]}),
    )
    .await;
    assert_eq!(a.status.as_u16(), 413, "{:?}", a.json());
    assert_eq!(a.code(), Some(41302));
    let offsets = a.offsets();
    assert!(
        offsets[0].is_some() && offsets[1].is_some(),
        "{:?}",
        a.json()
    );
    assert!(
        offsets[2].is_none() && offsets[3].is_none(),
        "{:?}",
        a.json()
    );
    let entries = a.json()["offsets"].as_array().unwrap().clone();
    assert_eq!(entries[2]["error_code"], 41302);
    assert!(entries[3]["error"].as_str().unwrap().contains("not sent"));
    // The client retries exactly the failed one it can fix, and the one not sent.
    let a = post_json(
        &proxy,
        &topic,
        json!({"records": [{"value": "c"}, {"value": "d"}]}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let payloads: Vec<String> = broker
        .read_all(&topic)
        .await
        .iter()
        .map(|r| String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(payloads, ["\"a\"", "\"b\"", "\"c\"", "\"d\""]);
    proxy.shutdown().await;
}
on_every_broker!(partial_failure, partial_failure);

/// The same request with the same Idempotency-Key is answered from memory and written once;
/// the key travels as record headers; the same key with another body is refused.
async fn idempotency_key(broker: Broker) {
    let topic = broker.topic("orders", 2).await;
    let proxy = broker.start(ProxyConfig::default()).await;
    let addr = proxy.local_addr();
    let body = serde_json::to_vec(
        &json!({"records": [{"key": "a", "value": 1}, {"key": "b", "value": 2}]}),
    )
    .unwrap();
    let path = format!("/topics/{topic}");
    let send = |key: &'static str, body: Vec<u8>| {
        let path = path.clone();
        async move {
            request(
                addr,
                "POST",
                &path,
                &[("content-type", JSON_V2), ("idempotency-key", key)],
                body,
            )
            .await
            .unwrap()
        }
    };
    let first = send("order-77", body.clone()).await;
    assert_eq!(first.status, StatusCode::OK);
    let again = send("order-77", body.clone()).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, first.body, "the first answer, offsets included");
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    let other = send("order-77", b"{\"records\":[{\"value\":3}]}".to_vec()).await;
    assert_eq!((other.status.as_u16(), other.code()), (422, Some(42206)));
    let records = broker.read_all(&topic).await;
    assert_eq!(records.len(), 2, "written once");
    let mut idx: Vec<&[u8]> = records
        .iter()
        .map(|r| {
            assert_eq!(
                header(r, "sidetrack-idempotency-key"),
                Some(&b"order-77"[..])
            );
            header(r, "sidetrack-idempotency-record").unwrap()
        })
        .collect();
    idx.sort();
    assert_eq!(idx, [&b"0"[..], &b"1"[..]]);
    proxy.shutdown().await;
}
on_every_broker!(idempotency_key, idempotency_key);

/// Graceful shutdown under load: every record answered 200 is in the log at its acknowledged
/// offset, and no record is in the log twice.
async fn shutdown_under_load(broker: Broker) {
    let topic = broker.topic("load", 2).await;
    let proxy = broker.start(ProxyConfig::default()).await;
    let addr = proxy.local_addr();
    let path = format!("/topics/{topic}");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (stop, ok, path) = (stop.clone(), ok.clone(), path.clone());
        clients.push(tokio::spawn(async move {
            let mut acked: Vec<(String, i32, i64)> = Vec::new();
            let mut i = 0;
            // Bounded: at most 2,000 requests per client.
            while !stop.load(Ordering::Relaxed) && i < 2000 {
                let ids: Vec<String> = (0..5).map(|j| format!("c{c}-r{i}-{j}")).collect();
                let body = json!({"records": ids.iter().map(|id| json!({"key": id, "value": id})).collect::<Vec<_>>()});
                i += 1;
                match request(addr, "POST", &path, &[("content-type", JSON_V2)], serde_json::to_vec(&body).unwrap()).await {
                    Ok(a) if a.status == StatusCode::OK => {
                        for (id, o) in ids.iter().zip(a.offsets()) {
                            let (p, o) = o.expect("a 200 has every offset");
                            acked.push((id.clone(), p, o.expect("an offset")));
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => assert!(
                        a.status == StatusCode::SERVICE_UNAVAILABLE,
                        "only 503 while shutting down, got {} {:?}",
                        a.status,
                        String::from_utf8_lossy(&a.body)
                    ),
                    // Connection refused or closed once the listener is gone.
                    Err(_) => {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            acked
        }));
    }
    assert!(
        wait_until(WAIT, || {
            let n = ok.load(Ordering::Relaxed);
            async move { n >= 40 }
        })
        .await,
        "requests succeed under load"
    );
    // Shut down while requests are in flight.
    proxy.shutdown().await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    let records = broker.read_all(&topic).await;
    let by_pos: HashMap<(i32, i64), &[u8]> = records
        .iter()
        .map(|r| {
            (
                (r.partition, r.offset),
                r.key.as_deref().unwrap_or_default(),
            )
        })
        .collect();
    for (id, p, o) in &acked {
        let key = by_pos
            .get(&(*p, *o))
            .unwrap_or_else(|| panic!("{id} acknowledged at {p}:{o} but not there"));
        assert_eq!(*key, format!("\"{id}\"").as_bytes(), "at {p}:{o}");
    }
    let mut seen = HashSet::new();
    for r in &records {
        assert!(seen.insert(r.key.clone()), "written twice: {:?}", r.key);
    }
    assert!(acked.len() >= 200, "{} acknowledged", acked.len());
}
on_every_broker!(shutdown_under_load, shutdown_under_load);

/// Broker down: 503 with Retry-After at the request deadline (nothing written), readyz 503;
/// after it is back, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_is_503_then_200() {
    within_limit(async {
        let config = ProxyConfig {
            request_timeout: Duration::from_millis(1500),
            ..ProxyConfig::default()
        };
        let (broker, cluster, topic, proxy) = embedded_with(1, config).await;
        assert_eq!(
            post_json(&proxy, &topic, json!({"records": [{"value": "before"}]}))
                .await
                .status,
            StatusCode::OK
        );
        cluster.broker_down(-1).unwrap();
        let a = post_json(&proxy, &topic, json!({"records": [{"value": "during"}]})).await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (503, Some(50301)),
            "{:?}",
            a.json()
        );
        assert!(a.headers.get("retry-after").is_some());
        assert!(a.offsets()[0].is_none());
        assert!(
            wait_until(WAIT, || async {
                get(&proxy, "/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE
            })
            .await,
            "readyz turns red"
        );
        cluster.broker_up(-1).unwrap();
        eventually_ok(&proxy, &topic, json!("after")).await;
        // Readiness is cached for a second.
        assert!(
            wait_until(WAIT, || async {
                get(&proxy, "/readyz").await.status == StatusCode::OK
            })
            .await
        );
        let payloads: Vec<Vec<u8>> = broker
            .read_all(&topic)
            .await
            .into_iter()
            .filter_map(|r| r.payload)
            .collect();
        assert_eq!(
            payloads.first().map(Vec::as_slice),
            Some(&b"\"before\""[..])
        );
        assert!(
            !payloads.iter().any(|p| p == b"\"during\""),
            "a 503'd record was not written"
        );
        proxy.shutdown().await;
    })
    .await
}

/// Retriable broker errors still failing at the deadline: 503; a non-retriable one: its own
/// status at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_map_to_statuses() {
    within_limit(async {
        let config = ProxyConfig {
            request_timeout: Duration::from_millis(1000),
            ..ProxyConfig::default()
        };
        let (_broker, cluster, topic, proxy) = embedded_with(1, config).await;
        assert_eq!(
            post_json(&proxy, &topic, json!({"records": [{"value": 0}]}))
                .await
                .status,
            StatusCode::OK
        );
        cluster.fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 500],
        );
        let a = post_json(&proxy, &topic, json!({"records": [{"value": 1}]})).await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (503, Some(50301)),
            "{:?}",
            a.json()
        );
        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        cluster.fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        let a = post_json(&proxy, &topic, json!({"records": [{"value": 3}]})).await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (413, Some(41302)),
            "{:?}",
            a.json()
        );
        eventually_ok(&proxy, &topic, json!(4)).await;
        for (err, status, code) in [
            (RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD, 422, 42207),
            (
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS,
                500,
                50001,
            ),
        ] {
            cluster.fail_requests(RDKafkaApiKey::Produce, &[err]);
            let a = post_json(&proxy, &topic, json!({"records": [{"value": 5}]})).await;
            assert_eq!(
                (a.status.as_u16(), a.code()),
                (status, Some(code)),
                "{err:?}: {:?}",
                a.json()
            );
            assert!(a.headers.get("retry-after").is_none());
            eventually_ok(&proxy, &topic, json!(6)).await;
        }
        // Last: librdkafka remembers a topic it was refused on and refuses later sends to it
        // locally until its next metadata refresh (40303 as well).
        cluster.fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let a = post_json(&proxy, &topic, json!({"records": [{"value": 2}]})).await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (403, Some(40303)),
            "{:?}",
            a.json()
        );
        proxy.shutdown().await;
    })
    .await
}

/// A fatal error of the idempotent producer (one OUT_OF_ORDER_SEQUENCE_NUMBER answer): every
/// later send fails, so the instance must be replaced. librdkafka reports the error with its
/// underlying code, so readiness asks the client: `/readyz` turns 503 at once (it stayed green
/// before, while every request failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_turns_readiness_red() {
    within_limit(async {
        let config = ProxyConfig {
            request_timeout: Duration::from_millis(1000),
            ..ProxyConfig::default()
        };
        let (_broker, cluster, topic, proxy) = embedded_with(1, config).await;
        assert_eq!(
            post_json(&proxy, &topic, json!({"records": [{"value": 0}]}))
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(get(&proxy, "/readyz").await.status, StatusCode::OK);
        cluster.fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
        );
        let failed = post_json(&proxy, &topic, json!({"records": [{"value": 1}]})).await;
        assert_ne!(failed.status, StatusCode::OK, "{:?}", failed.json());
        assert!(
            sidetrack::testing::wait_until(Duration::from_secs(10), || async {
                get(&proxy, "/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE
            })
            .await,
            "readyz turns red after a fatal producer error"
        );
        proxy.shutdown().await;
    })
    .await
}

/// Saturation: with the in-flight bound taken by a request waiting on a down broker, the
/// next request is answered 429 with Retry-After at once; after it, requests are admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_is_429() {
    within_limit(async {
        let config = ProxyConfig {
            request_timeout: Duration::from_secs(3),
            max_in_flight_records: 10,
            ..ProxyConfig::default()
        };
        let (_broker, cluster, topic, proxy) = embedded_with(1, config).await;
        // Warm the metadata cache, then take the broker away.
        assert_eq!(
            post_json(&proxy, &topic, json!({"records": [{"value": 0}]}))
                .await
                .status,
            StatusCode::OK
        );
        cluster.broker_down(-1).unwrap();
        let ten = json!({"records": (0..10).map(|i| json!({"value": i})).collect::<Vec<_>>()});
        let handle = tokio::spawn({
            let addr = proxy.local_addr();
            let topic = topic.clone();
            async move {
                request(
                    addr,
                    "POST",
                    &format!("/topics/{topic}"),
                    &[("content-type", JSON_V2)],
                    serde_json::to_vec(&ten).unwrap(),
                )
                .await
                .unwrap()
            }
        });
        assert!(
            wait_until(WAIT, || {
                let n = proxy.in_flight().0;
                async move { n == 10 }
            })
            .await,
            "the 10-record request is admitted"
        );
        let a = post_json(&proxy, &topic, json!({"records": [{"value": "more"}]})).await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (429, Some(42901)),
            "{:?}",
            a.json()
        );
        assert_eq!(a.headers.get("retry-after").unwrap(), "1");
        assert_eq!(handle.await.unwrap().status.as_u16(), 503);
        cluster.broker_up(-1).unwrap();
        eventually_ok(&proxy, &topic, json!("later")).await;
        proxy.shutdown().await;
    })
    .await
}

/// A company rule rejects (with its status), adds headers and picks the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reject_add_headers_and_pick_partitions() {
    within_limit(async {
        let broker = Broker::embedded();
        let topic = broker.topic("orders", 4).await;
        let proxy = broker
            .proxy(ProxyConfig::default())
            .rule(|req: &RequestInfo<'_>, r: &mut ProduceRecord| {
                let tenant = req.headers.get("x-tenant").ok_or_else(|| {
                    Rejection::new("send X-Tenant").with_status(StatusCode::FORBIDDEN)
                })?;
                r.headers.push(Header::new("tenant", tenant.as_bytes()));
                // A rule can set any partition, also a negative one: refused like too high.
                r.partition = Some(if req.headers.contains_key("x-negative") {
                    -1
                } else {
                    3
                });
                Ok(())
            })
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let addr = proxy.local_addr();
        let body = r#"{"records":[{"value":1},{"value":2}]}"#;
        let a = request(
            addr,
            "POST",
            &format!("/topics/{topic}"),
            &[("content-type", JSON_V2)],
            body,
        )
        .await
        .unwrap();
        assert_eq!((a.status.as_u16(), a.code()), (403, Some(42208)));
        assert!(a.json()["message"]
            .as_str()
            .unwrap()
            .contains("send X-Tenant"));
        let a = request(
            addr,
            "POST",
            &format!("/topics/{topic}"),
            &[("content-type", JSON_V2), ("x-tenant", "acme")],
            body,
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK);
        let a = request(
            addr,
            "POST",
            &format!("/topics/{topic}"),
            &[
                ("content-type", JSON_V2),
                ("x-tenant", "acme"),
                ("x-negative", "1"),
            ],
            body,
        )
        .await
        .unwrap();
        assert_eq!((a.status.as_u16(), a.code()), (404, Some(40402)));
        let records = broker.read_all(&topic).await;
        assert_eq!(records.len(), 2);
        for r in &records {
            assert_eq!(r.partition, 3);
            assert_eq!(header(r, "tenant"), Some(&b"acme"[..]));
        }
        proxy.shutdown().await;
    })
    .await
}

/// Health, readiness, metrics and the OpenAPI document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_endpoints() {
    within_limit(async {
        let broker = Broker::embedded();
        let topic = broker.topic("orders", 1).await;
        let proxy = broker.start(ProxyConfig::default()).await;
        assert_eq!(get(&proxy, "/healthz").await.json()["status"], "ok");
        assert_eq!(get(&proxy, "/readyz").await.json()["status"], "ready");
        let doc = get(&proxy, "/openapi.json").await.json();
        assert!(doc["paths"]["/topics/{topic}"]["post"].is_object());
        assert_eq!(post_json(&proxy, &topic, json!({"records": [{"value": 1}]})).await.status, StatusCode::OK);
        let _ = post_json(&proxy, "missing", json!({"records": [{"value": 1}]})).await;
        let text = String::from_utf8(get(&proxy, "/metrics").await.body.to_vec()).unwrap();
        for needle in [
            "sidetrack_proxy_requests_total{route=\"/topics/{topic}\",status=\"200\",topic=\"orders\"}",
            "sidetrack_proxy_requests_total{route=\"/topics/{topic}\",status=\"404\",topic=\"-\"}",
            "sidetrack_proxy_records_total{topic=\"orders\",outcome=\"acknowledged\"}",
            "sidetrack_proxy_rejections_total{reason=\"unknown_topic\"}",
            "sidetrack_proxy_request_seconds",
            "sidetrack_proxy_in_flight_records",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let addr = proxy.local_addr();
        assert!(request(addr, "GET", "/healthz", &[], Bytes::new()).await.is_ok());
        proxy.shutdown().await;
        // After shutdown nothing listens on its port.
        assert!(request(addr, "GET", "/healthz", &[], Bytes::new()).await.is_err());
    })
    .await
}

/// An embedded broker with topic `orders` of `partitions` partitions, and a proxy on it.
async fn embedded_with(
    partitions: i32,
    config: ProxyConfig,
) -> (
    Broker,
    sidetrack::testing::EmbeddedCluster,
    String,
    sidetrack::proxy::ProxyHandle,
) {
    let broker = Broker::embedded();
    let cluster = broker.cluster().unwrap().clone();
    let topic = broker.topic("orders", partitions).await;
    let proxy = broker.start(config).await;
    (broker, cluster, topic, proxy)
}

/// Posts `{"records":[{"value": value}]}` until it is answered 200 (a broker coming back).
async fn eventually_ok(
    proxy: &sidetrack::proxy::ProxyHandle,
    topic: &str,
    value: serde_json::Value,
) {
    let ok = wait_until(WAIT, || {
        let body = json!({"records": [{"value": value.clone()}]});
        async move { post_json(proxy, topic, body).await.status == StatusCode::OK }
    })
    .await;
    assert!(ok, "no 200 within {WAIT:?}");
}

/// Hostile bytes in header values and the body over a raw socket: a 4xx, and the proxy
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_4xx() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within_limit(async {
        let broker = Broker::embedded();
        let topic = broker.topic("orders", 1).await;
        let proxy = broker.start(ProxyConfig::default()).await;
        let addr = proxy.local_addr();
        let raw = |head: Vec<u8>, body: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut req = head;
            req.extend_from_slice(
                format!(
                    "content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            req.extend_from_slice(&body);
            s.write_all(&req).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        let head = |extra: &[u8]| {
            let mut h =
                format!("POST /topics/{topic} HTTP/1.1\r\nhost: x\r\ncontent-type: {JSON_V2}\r\n")
                    .into_bytes();
            h.extend_from_slice(extra);
            h
        };
        let one = br#"{"records":[{"value":1}]}"#.to_vec();
        let r = raw(head(b"idempotency-key: \xff\xfe\r\n"), one.clone()).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("40001"), "{r}");
        let r = raw(head(b"authorization: Bearer \xff\r\n"), one.clone()).await;
        assert!(r.starts_with("HTTP/1.1 200"), "no auth configured: {r}");
        let r = raw(head(b""), vec![0xff, 0x00, 0x7b, 0xc3]).await;
        assert!(r.starts_with("HTTP/1.1 422"), "{r}");
        let r = raw(
            b"POST /topics/%ff%fe HTTP/1.1\r\nhost: x\r\n".to_vec(),
            one.clone(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        assert_eq!(get(&proxy, "/healthz").await.status, StatusCode::OK);
        proxy.shutdown().await;
    })
    .await
}

/// TLS with rustls: the proxy answers over HTTPS with a certificate from the configuration.
#[cfg(feature = "proxy-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener() {
    use http_body_util::BodyExt;
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    within_limit(async {
        let broker = Broker::embedded();
        let topic = broker.topic("orders", 1).await;
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let config = ProxyConfig {
            tls: Some(sidetrack::proxy::TlsConfig {
                cert: data.join("proxy-test-cert.pem"),
                key: data.join("proxy-test-key.pem"),
            }),
            ..ProxyConfig::default()
        };
        let proxy = broker.start(config).await;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                rustls_pki_types::CertificateDer::from_pem_file(data.join("proxy-test-ca.pem"))
                    .unwrap(),
            )
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .unwrap();
        let tls = connector
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post(format!("/topics/{topic}"))
            .header("host", "localhost")
            .header("content-type", JSON_V2)
            .body(http_body_util::Full::new(Bytes::from_static(
                br#"{"records":[{"value":"secret"}]}"#,
            )))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = resp.into_body().collect().await.unwrap();
        // Plain HTTP to the TLS port gets no answer.
        assert!(
            request(proxy.local_addr(), "GET", "/healthz", &[], Bytes::new())
                .await
                .is_err()
        );
        assert_eq!(broker.read_all(&topic).await.len(), 1);
        proxy.shutdown().await;
    })
    .await
}

/// Connection handling: head and idle deadlines whatever the protocol, and the bounded share
/// of unproven connections. Real sockets on loopback, on the embedded broker (connection
/// handling does not depend on the broker).
mod connections {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// An empty SETTINGS frame (length 0, type 4, no flags, stream 0).
    const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

    /// Reads (and drops whatever the server sends) until the server closes the connection:
    /// true on EOF or a reset, false if it is still open after `WAIT`.
    async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(mut s: S) -> bool {
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(WAIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// A request head larger than the 64 KiB transport buffer is refused (431) and the
    /// connection closed, instead of hyper's default ~400 KiB per connection being held by
    /// every unproven socket (found by review: at 5,000 unproven connections, ~2 GiB).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_head_over_64_kib_is_refused_and_closed() {
        within_limit(async {
            let (_broker, _, topic, proxy) = embedded_with(1, ProxyConfig::default()).await;
            let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let head = format!(
                "POST /topics/{topic} HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n",
                "a".repeat(100 * 1024)
            );
            // The server may stop reading (and answer) before the whole head is sent.
            let _ = s.write_all(head.as_bytes()).await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer)).await;
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 431"), "{text}");
        })
        .await
    }

    /// `sidetrack_proxy_connections_closed_total{reason}` as the proxy's /metrics shows it
    /// (the recorder is shared by the tests of this binary: compare before and after).
    async fn closes(proxy: &sidetrack::proxy::ProxyHandle, reason: &str) -> f64 {
        let text = String::from_utf8(get(proxy, "/metrics").await.body.to_vec()).unwrap();
        let label = format!("reason=\"{reason}\"");
        text.lines()
            .filter(|l| {
                l.starts_with("sidetrack_proxy_connections_closed_total{") && l.contains(&label)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[derive(Clone, Copy, Debug)]
    enum Idle {
        /// Connects and sends nothing.
        Silent,
        /// Half the HTTP/2 connection preface.
        HalfPreface,
        /// The whole preface and a SETTINGS frame, then no stream.
        H2NoStream,
        /// An HTTP/1 head that never ends: a header line now and then (slowloris).
        Slowloris,
    }

    /// Opens an idle socket of `kind`; returns its reading half (the slowloris keeps writing
    /// on its own until the connection is gone).
    async fn open_idle(addr: std::net::SocketAddr, kind: Idle) -> tokio::net::tcp::OwnedReadHalf {
        let s = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = s.into_split();
        match kind {
            Idle::Silent => {
                // Keep the writing half open: dropping it would send FIN.
                tokio::spawn(async move {
                    let _w = w;
                    std::future::pending::<()>().await
                });
            }
            Idle::HalfPreface => {
                w.write_all(&H2_PREFACE[..12]).await.unwrap();
                tokio::spawn(async move {
                    let _w = w;
                    std::future::pending::<()>().await
                });
            }
            Idle::H2NoStream => {
                w.write_all(H2_PREFACE).await.unwrap();
                w.write_all(H2_SETTINGS).await.unwrap();
                tokio::spawn(async move {
                    let _w = w;
                    std::future::pending::<()>().await
                });
            }
            Idle::Slowloris => {
                w.write_all(b"POST /topics/orders HTTP/1.1\r\nhost: x\r\n")
                    .await
                    .unwrap();
                // The attacker's pace, not a synchronisation: one header line every 200 ms
                // until the server hangs up.
                tokio::spawn(async move {
                    let mut i = 0u64;
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        i += 1;
                        if w.write_all(format!("x-{i}: y\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        }
        r
    }

    /// With `max_connections = 4`, four idle sockets of each kind (nothing sent, half an
    /// HTTP/2 preface, an HTTP/2 connection with no stream, an HTTP/1 head that never ends)
    /// are closed by the server within `head_timeout`, and a normal client then gets 200.
    /// (Before: only an HTTP/1 head had a deadline; four such sockets kept every client out
    /// for as long as they stayed open.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_sockets_of_every_kind_are_closed_within_the_head_timeout() {
        within_limit(async {
            let config = ProxyConfig {
                max_connections: 4,
                // Every slot may be unproven: only the head deadline can free them here.
                max_unproven_connections: Some(4),
                // Long enough for a normal client's head on a loaded machine.
                head_timeout: Duration::from_secs(3),
                ..ProxyConfig::default()
            };
            let (broker, _, topic, proxy) = embedded_with(1, config).await;
            let addr = proxy.local_addr();
            let before = closes(&proxy, "head_timeout").await;
            for kind in [
                Idle::Silent,
                Idle::HalfPreface,
                Idle::H2NoStream,
                Idle::Slowloris,
            ] {
                let mut sockets = Vec::new();
                for _ in 0..4 {
                    sockets.push(open_idle(addr, kind).await);
                }
                for (i, s) in sockets.into_iter().enumerate() {
                    assert!(
                        closed_by_server(s).await,
                        "{kind:?} socket {i} still open after {WAIT:?}"
                    );
                }
                let a = post_json(
                    &proxy,
                    &topic,
                    json!({"records": [{"value": format!("{kind:?}")}]}),
                )
                .await;
                assert_eq!(a.status, StatusCode::OK, "{kind:?}: {:?}", a.json());
            }
            assert!(closes(&proxy, "head_timeout").await >= before + 16.0);
            assert_eq!(broker.read_all(&topic).await.len(), 4);
            proxy.shutdown().await;
        })
        .await
    }

    /// HTTP/1: a kept-alive connection whose next request head starts but never ends is
    /// closed `head_timeout` after its first byte, long before `idle_timeout`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_later_http1_head_that_never_ends_is_closed() {
        within_limit(async {
            let config = ProxyConfig {
                head_timeout: Duration::from_secs(2),
                // Only the head rule can close it within this test.
                idle_timeout: Duration::from_secs(600),
                ..ProxyConfig::default()
            };
            let (_broker, _, _topic, proxy) = embedded_with(1, config).await;
            let before = closes(&proxy, "head_timeout").await;
            let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            // The whole answer: its head, then the body its Content-Length announces.
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed before answering");
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    if body.len() >= len {
                        assert!(head.starts_with("HTTP/1.1 200"), "{text}");
                        break;
                    }
                }
            }
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                .await
                .unwrap();
            assert!(
                closed_by_server(s).await,
                "the unfinished head is still open"
            );
            assert!(closes(&proxy, "head_timeout").await >= before + 1.0);
            proxy.shutdown().await;
        })
        .await
    }

    /// HTTP/2 keep-alive: a peer with a request in progress (so neither the head nor the idle
    /// deadline applies) that stops answering the proxy's PINGs is closed once
    /// `http2_keep_alive_timeout` passes. Hand-made frames: a real client answers PINGs itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http2_peer_that_does_not_answer_pings_is_closed() {
        within_limit(async {
            let config = ProxyConfig {
                head_timeout: Duration::from_secs(600),
                idle_timeout: Duration::from_secs(600),
                request_timeout: Duration::from_secs(600),
                http2_keep_alive_interval: Duration::from_secs(1),
                http2_keep_alive_timeout: Duration::from_secs(1),
                // The window must outlast request_timeout (validated).
                idempotency: sidetrack::proxy::IdempotencyConfig {
                    window: Duration::from_secs(601),
                    ..Default::default()
                },
                ..ProxyConfig::default()
            };
            let (_broker, _, topic, proxy) = embedded_with(1, config).await;
            let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
            // HEADERS (END_HEADERS, no END_STREAM: the body is still to come) on stream 1, HPACK
            // without Huffman: :method POST, :scheme http, :path, :authority, content-type.
            let mut block = vec![0x83, 0x86];
            for (index, value) in [
                (0x44u8, format!("/topics/{topic}")),
                (0x41, "x".to_owned()),
                (0x5f, JSON_V2.to_owned()),
            ] {
                block.push(index);
                block.push(u8::try_from(value.len()).unwrap());
                block.extend_from_slice(value.as_bytes());
            }
            let mut out = H2_PREFACE.to_vec();
            out.extend_from_slice(H2_SETTINGS);
            let len = block.len();
            out.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                1,
                4,
                0,
                0,
                0,
                1,
            ]);
            out.extend_from_slice(&block);
            s.write_all(&out).await.unwrap();
            // Frames until the server hangs up: it must have sent a PING (type 6) first.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let ended = tokio::time::timeout(WAIT, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            assert!(ended.is_ok(), "still open after {WAIT:?}");
            let mut types = Vec::new();
            let mut at = 0;
            while at + 9 <= got.len() {
                let len = (usize::from(got[at]) << 16)
                    | (usize::from(got[at + 1]) << 8)
                    | usize::from(got[at + 2]);
                let payload = &got[(at + 9).min(got.len())..(at + 9 + len).min(got.len())];
                let code = payload
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                types.push((got[at + 3], code));
                at += 9 + len;
            }
            assert!(
                types.iter().any(|(t, _)| *t == 6),
                "no PING before the close: frames {types:?}"
            );
            // The request was well formed and still in progress: no RST_STREAM, no GOAWAY with
            // an error code, no answer (HEADERS) yet.
            assert!(
                types
                    .iter()
                    .all(|(t, code)| *t != 3 && *t != 1 && (*t != 7 || *code == Some(0))),
                "{types:?}"
            );
            proxy.shutdown().await;
        })
        .await
    }

    /// The HTTP/2 frame types the server sent until it closed the connection, with the error
    /// code of each GOAWAY; `None` if it is still open after `WAIT`.
    async fn h2_frames_until_close(mut s: TcpStream) -> Option<Vec<(u8, Option<u32>)>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let ended = tokio::time::timeout(WAIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        ended.ok()?;
        let mut frames = Vec::new();
        let mut at = 0;
        while at + 9 <= got.len() {
            let len = (usize::from(got[at]) << 16)
                | (usize::from(got[at + 1]) << 8)
                | usize::from(got[at + 2]);
            let payload = &got[(at + 9).min(got.len())..(at + 9 + len).min(got.len())];
            let code = (got[at + 3] == 7)
                .then(|| payload.get(4..8))
                .flatten()
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            frames.push((got[at + 3], code));
            at += 9 + len;
        }
        Some(frames)
    }

    /// HTTP/2: a client that stops reading (its flow-control window kept at zero, so the
    /// answer to its request can never be sent) holds a stream open; it is closed once its
    /// answer has waited `idle_timeout` untaken. (Before: held for ever, its request counting
    /// as in progress.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http2_client_that_stops_reading_is_closed() {
        within_limit(async {
            let config = ProxyConfig {
                head_timeout: Duration::from_secs(600),
                idle_timeout: Duration::from_secs(2),
                http2_keep_alive_interval: Duration::from_secs(600),
                ..ProxyConfig::default()
            };
            let (_broker, _, _topic, proxy) = embedded_with(1, config).await;
            let before = closes(&proxy, "stalled").await;
            let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
            let mut out = H2_PREFACE.to_vec();
            // SETTINGS_INITIAL_WINDOW_SIZE = 0: no DATA may be sent on any stream.
            out.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
            // GET /openapi.json (HPACK, no Huffman), END_STREAM | END_HEADERS, stream 1.
            let mut block = vec![0x82, 0x86, 0x44, 13];
            block.extend_from_slice(b"/openapi.json");
            block.extend_from_slice(&[0x41, 1, b'x']);
            out.extend_from_slice(&[0, 0, block.len() as u8, 1, 5, 0, 0, 0, 1]);
            out.extend_from_slice(&block);
            s.write_all(&out).await.unwrap();
            let frames = h2_frames_until_close(s)
                .await
                .expect("a client that reads nothing is still connected");
            // The answer was ready (HEADERS) but none of its body could be sent (DATA).
            assert!(frames.iter().any(|(t, _)| *t == 1), "{frames:?}");
            assert!(!frames.iter().any(|(t, _)| *t == 0), "{frames:?}");
            assert!(closes(&proxy, "stalled").await >= before + 1.0);
            proxy.shutdown().await;
        })
        .await
    }

    /// A TLS client trusting the test CA.
    #[cfg(feature = "proxy-tls")]
    fn tls_connector() -> tokio_rustls::TlsConnector {
        use rustls_pki_types::pem::PemObject;
        use tokio_rustls::rustls;
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                rustls_pki_types::CertificateDer::from_pem_file(data.join("proxy-test-ca.pem"))
                    .unwrap(),
            )
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(client))
    }

    /// With TLS on and `max_connections = 4`: four sockets whose TLS handshake never
    /// completes, then four that complete it and send nothing, are closed within
    /// `head_timeout` (the handshake counts against it), and an HTTPS client then gets 200.
    /// (Before: a completed handshake followed by silence was never closed.)
    #[cfg(feature = "proxy-tls")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_tls_sockets_are_closed_within_the_head_timeout() {
        use http_body_util::BodyExt;
        within_limit(async {
            let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
            let config = ProxyConfig {
                tls: Some(sidetrack::proxy::TlsConfig {
                    cert: data.join("proxy-test-cert.pem"),
                    key: data.join("proxy-test-key.pem"),
                }),
                max_connections: 4,
                max_unproven_connections: Some(4),
                // Long enough for a normal client's head on a loaded machine.
                head_timeout: Duration::from_secs(3),
                ..ProxyConfig::default()
            };
            let (broker, _, topic, proxy) = embedded_with(1, config).await;
            let addr = proxy.local_addr();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            // A TLS record header announcing a ClientHello that never comes.
            let mut half = Vec::new();
            for _ in 0..4 {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff]).await.unwrap();
                half.push(s);
            }
            for (i, s) in half.into_iter().enumerate() {
                assert!(closed_by_server(s).await, "half handshake {i} still open");
            }
            let mut silent = Vec::new();
            for _ in 0..4 {
                let tcp = TcpStream::connect(addr).await.unwrap();
                silent.push(tls_connector().connect(name.clone(), tcp).await.unwrap());
            }
            for (i, s) in silent.into_iter().enumerate() {
                assert!(
                    closed_by_server(s).await,
                    "silent TLS connection {i} still open"
                );
            }
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = tls_connector().connect(name, tcp).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::post(format!("/topics/{topic}"))
                .header("host", "localhost")
                .header("content-type", JSON_V2)
                .body(http_body_util::Full::new(Bytes::from_static(
                    br#"{"records":[{"value":"tls"}]}"#,
                )))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let _ = resp.into_body().collect().await.unwrap();
            assert_eq!(broker.read_all(&topic).await.len(), 1);
            proxy.shutdown().await;
        })
        .await
    }

    /// An HTTP/2 client connection.
    async fn h2(
        addr: std::net::SocketAddr,
    ) -> (
        hyper::client::conn::http2::SendRequest<
            http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
        >,
        tokio::task::JoinHandle<()>,
    ) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender, conn)
    }

    fn h2_post(
        addr: std::net::SocketAddr,
        topic: &str,
        body: http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
    ) -> hyper::Request<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
        hyper::Request::post(format!("http://{addr}/topics/{topic}"))
            .header("content-type", JSON_V2)
            .body(body)
            .unwrap()
    }

    fn full(
        s: impl Into<Bytes>,
    ) -> http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible> {
        use http_body_util::BodyExt;
        http_body_util::Full::new(s.into()).boxed()
    }

    async fn status_of(
        sender: &mut hyper::client::conn::http2::SendRequest<
            http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
        >,
        req: hyper::Request<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>,
    ) -> StatusCode {
        use http_body_util::BodyExt;
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let _ = resp.into_body().collect().await.unwrap();
        status
    }

    /// An HTTP/2 connection with no open stream for `idle_timeout` is closed (GOAWAY), while a
    /// slow but valid HTTP/2 client whose request is in progress all that time keeps its
    /// connection and goes on producing on it. The idle connection is opened after the slow
    /// request started, so the slow one would have been closed first by any timer that
    /// ignored its request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_http2_connection_is_closed_and_a_busy_one_is_not() {
        use http_body_util::BodyExt;
        within_limit(async {
            let config = ProxyConfig {
                head_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(2),
                // The slow body has all the time it needs.
                request_timeout: Duration::from_secs(120),
                ..ProxyConfig::default()
            };
            let (broker, _, topic, proxy) = embedded_with(1, config).await;
            let addr = proxy.local_addr();
            let before = closes(&proxy, "idle_timeout").await;
            // The slow client: a body sent in two parts, the second only at the end.
            let (mut slow, slow_conn) = h2(addr).await;
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| {
                    (
                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
                        rx,
                    )
                })
            });
            let body = http_body_util::StreamBody::new(stream).boxed();
            tx.send(Bytes::from_static(br#"{"records":[{"value":"slow"}"#))
                .await
                .unwrap();
            let mut sender = slow.clone();
            let slow_req = tokio::spawn({
                let req = h2_post(addr, &topic, body);
                async move { status_of(&mut sender, req).await }
            });
            // Its request is being read (it reserved body bytes).
            assert!(
                wait_until(WAIT, || {
                    let n = proxy.buffered_bytes();
                    async move { n > 0 }
                })
                .await
            );
            // Another HTTP/2 client: one request, then idle.
            let (mut idle, idle_conn) = h2(addr).await;
            let st = status_of(
                &mut idle,
                h2_post(addr, &topic, full(r#"{"records":[{"value":"idle"}]}"#)),
            )
            .await;
            assert_eq!(st, StatusCode::OK);
            // The server closes it: the client's connection task ends.
            tokio::time::timeout(WAIT, idle_conn)
                .await
                .expect("the idle HTTP/2 connection is closed")
                .unwrap();
            assert!(idle.is_closed() || idle.ready().await.is_err());
            assert!(closes(&proxy, "idle_timeout").await >= before + 1.0);
            // The slow client was busy all along: it finishes its request and goes on.
            assert!(!slow_conn.is_finished(), "the busy connection was closed");
            tx.send(Bytes::from_static(b"]}")).await.unwrap();
            drop(tx);
            assert_eq!(slow_req.await.unwrap(), StatusCode::OK);
            let st = status_of(
                &mut slow,
                h2_post(addr, &topic, full(r#"{"records":[{"value":"again"}]}"#)),
            )
            .await;
            assert_eq!(st, StatusCode::OK);
            let values: HashSet<Vec<u8>> = broker
                .read_all(&topic)
                .await
                .into_iter()
                .filter_map(|r| r.payload)
                .collect();
            for v in ["\"slow\"", "\"idle\"", "\"again\""] {
                assert!(values.contains(v.as_bytes()), "{v} missing");
            }
            proxy.shutdown().await;
        })
        .await
    }

    /// A kept-alive HTTP/1 connection.
    struct H1(hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>);

    impl H1 {
        async fn connect(addr: std::net::SocketAddr) -> H1 {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            H1(sender)
        }

        async fn post(&mut self, topic: &str, token: &str, value: &str) -> StatusCode {
            use http_body_util::BodyExt;
            self.0.ready().await.unwrap();
            let req = hyper::Request::post(format!("/topics/{topic}"))
                .header("host", "x")
                .header("content-type", JSON_V2)
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(Bytes::from(format!(
                    r#"{{"records":[{{"value":"{value}"}}]}}"#
                ))))
                .unwrap();
            let resp = self.0.send_request(req).await.unwrap();
            let status = resp.status();
            let _ = resp.into_body().collect().await.unwrap();
            status
        }
    }

    /// With auth on and `max_connections = 4`, ten unauthenticated sockets (silent, asking
    /// /healthz without a token, posting with a wrong token) hold at most the unproven share
    /// (half): the older ones are closed as newer ones arrive, a client with a token that was
    /// already connected keeps its connection, and a new client with a token gets in. (Before:
    /// the first sockets took every slot and the rest, authenticated or not, waited for ever.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unauthenticated_sockets_cannot_keep_a_client_with_a_token_out() {
        within_limit(async {
            let mut config = ProxyConfig {
                max_connections: 4,
                // Long enough that only the unproven share can free a slot in this test.
                head_timeout: Duration::from_secs(600),
                idle_timeout: Duration::from_secs(600),
                ..ProxyConfig::default()
            };
            config.auth.tokens.push(TokenConfig {
                name: "team".into(),
                sha256: Some(sidetrack::proxy::token_sha256("tok-1")),
                topics: vec!["*".into()],
                ..Default::default()
            });
            let (broker, _, topic, proxy) = embedded_with(1, config).await;
            let addr = proxy.local_addr();
            let before = closes(&proxy, "unproven_evicted").await;
            let mut early = H1::connect(addr).await;
            assert_eq!(early.post(&topic, "tok-1", "early").await, StatusCode::OK);
            let mut closed = Vec::new();
            for i in 0..10 {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let head = match i % 3 {
                    0 => String::new(),
                    1 => "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".to_owned(),
                    _ => format!("POST /topics/{topic} HTTP/1.1\r\nhost: x\r\ncontent-type: {JSON_V2}\r\nauthorization: Bearer wrong\r\ncontent-length: 2\r\n\r\n{{}}"),
                };
                s.write_all(head.as_bytes()).await.unwrap();
                closed.push(tokio::spawn(closed_by_server(s)));
            }
            // The oldest eight are closed by the server (the unproven share is half of 4).
            let mut n = 0;
            for c in closed.into_iter().take(8) {
                if c.await.unwrap() {
                    n += 1;
                }
            }
            assert_eq!(n, 8, "unauthenticated sockets still open: {:?}", proxy.connections());
            let c = proxy.connections();
            assert!(c.unproven <= 2, "{c:?}");
            // The client that was in keeps its connection; a new one gets in.
            assert_eq!(early.post(&topic, "tok-1", "early-again").await, StatusCode::OK);
            let mut late = H1::connect(addr).await;
            assert_eq!(late.post(&topic, "tok-1", "late").await, StatusCode::OK);
            assert!(closes(&proxy, "unproven_evicted").await >= before + 8.0);
            assert_eq!(broker.read_all(&topic).await.len(), 3);
            proxy.shutdown().await;
        })
        .await
    }
}

/// Bodies being read are bounded too: a slow chunked upload holding the whole body budget
/// makes the next request 429 at once; when it is gone, requests are read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_are_bounded() {
    use tokio::io::AsyncWriteExt;
    within_limit(async {
        let config = ProxyConfig {
            max_body_bytes: 1024,
            max_buffered_bytes: 1024,
            // Longer than the wait below: the slow upload must hold its reservation
            // throughout, however loaded the machine (its 408 would free it).
            request_timeout: Duration::from_secs(120),
            ..ProxyConfig::default()
        };
        let (_broker, _, topic, proxy) = embedded_with(1, config).await;
        // A chunked body (no Content-Length: it reserves max_body_bytes) that never ends.
        let mut slow = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
        slow.write_all(
            format!("POST /topics/{topic} HTTP/1.1\r\nhost: x\r\ncontent-type: {JSON_V2}\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{{\"rec\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        assert!(
            wait_until(WAIT, || {
                let n = proxy.buffered_bytes();
                async move { n == 1024 }
            })
            .await,
            "the slow upload reserves max_body_bytes"
        );
        let a = post_json(&proxy, &topic, json!({"records": [{"value": 1}]})).await;
        assert_eq!((a.status.as_u16(), a.code()), (429, Some(42901)), "{:?}", a.json());
        assert!(a.headers.get("retry-after").is_some());
        drop(slow);
        eventually_ok(&proxy, &topic, json!("after")).await;
        proxy.shutdown().await;
    })
    .await
}

/// A body that does not arrive within request_timeout: 408, and its reservation is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within_limit(async {
        let config = ProxyConfig {
            request_timeout: Duration::from_millis(500),
            ..ProxyConfig::default()
        };
        let (_broker, _, topic, proxy) = embedded_with(1, config).await;
        let mut slow = tokio::net::TcpStream::connect(proxy.local_addr()).await.unwrap();
        slow.write_all(
            format!("POST /topics/{topic} HTTP/1.1\r\nhost: x\r\ncontent-type: {JSON_V2}\r\ncontent-length: 100\r\n\r\n{{\"rec")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = vec![0u8; 4096];
        let n = tokio::time::timeout(WAIT, slow.read(&mut out)).await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&out[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("40801"), "{text}");
        eventually_ok(&proxy, &topic, json!("after")).await;
        proxy.shutdown().await;
    })
    .await
}

/// Starts a request with `key` and waits until its record is in flight; returns a function
/// that sends the same request again, and the first request's task.
async fn keyed_request_in_flight(
    proxy: &sidetrack::proxy::ProxyHandle,
    topic: &str,
    key: &'static str,
    body: &'static str,
) -> (
    impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>,
    tokio::task::JoinHandle<Answer>,
) {
    let addr = proxy.local_addr();
    let path = format!("/topics/{topic}");
    let send = move || -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>> {
        let path = path.clone();
        Box::pin(async move {
            request(
                addr,
                "POST",
                &path,
                &[("content-type", JSON_V2), ("idempotency-key", key)],
                body,
            )
            .await
            .unwrap()
        })
    };
    let first = tokio::spawn(send());
    assert!(
        wait_until(WAIT, || {
            let n = proxy.in_flight().0;
            async move { n == 1 }
        })
        .await
    );
    (send, first)
}

/// While a request with an Idempotency-Key runs, its retry is 409 with Retry-After; once the
/// first failed with nothing written, the key is free and the retry is produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_in_progress_is_409() {
    within_limit(async {
        // Long enough that the retry below comes while the first still waits for the broker,
        // however loaded the machine (2 s was not, once: the first had already been answered).
        let config = ProxyConfig {
            request_timeout: Duration::from_secs(10),
            ..ProxyConfig::default()
        };
        let (broker, cluster, topic, proxy) = embedded_with(1, config).await;
        eventually_ok(&proxy, &topic, json!("warm")).await;
        cluster.broker_down(-1).unwrap();
        let body = r#"{"records":[{"value":"once"}]}"#;
        let (send, first) = keyed_request_in_flight(&proxy, &topic, "k-409", body).await;
        let a = send().await;
        assert_eq!((a.status.as_u16(), a.code()), (409, Some(40901)));
        assert!(a.headers.get("retry-after").is_some());
        assert_eq!(first.await.unwrap().status.as_u16(), 503);
        cluster.broker_up(-1).unwrap();
        let ok = wait_until(WAIT, || async { send().await.status == StatusCode::OK }).await;
        assert!(ok, "the key is free again after a 503 that wrote nothing");
        let values: Vec<Vec<u8>> = broker
            .read_all(&topic)
            .await
            .into_iter()
            .filter_map(|r| r.payload)
            .collect();
        assert_eq!(
            values
                .iter()
                .filter(|v| v.as_slice() == b"\"once\"")
                .count(),
            1
        );
        proxy.shutdown().await;
    })
    .await
}

/// A panic while serving a request (here in a rule) is answered 500 50002, and the proxy
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_answered_500_and_the_proxy_keeps_serving() {
    within_limit(async {
        let broker = Broker::embedded();
        let topic = broker.topic("orders", 1).await;
        let proxy = broker
            .proxy(ProxyConfig::default())
            .rule(|req: &RequestInfo<'_>, _r: &mut ProduceRecord| {
                assert!(!req.headers.contains_key("x-panic"), "a bug in a rule");
                Ok(())
            })
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let addr = proxy.local_addr();
        let path = format!("/topics/{topic}");
        let body = r#"{"records":[{"value":1}]}"#;
        let a = request(
            addr,
            "POST",
            &path,
            &[("content-type", JSON_V2), ("x-panic", "1")],
            body,
        )
        .await
        .unwrap();
        assert_eq!((a.status.as_u16(), a.code()), (500, Some(50002)));
        let a = request(addr, "POST", &path, &[("content-type", JSON_V2)], body)
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(broker.read_all(&topic).await.len(), 1);
        proxy.shutdown().await;
    })
    .await
}

/// A client that hangs up while its records wait for the broker does not free its
/// Idempotency-Key: the records are still written, so its retry is 409 until they are, then
/// answered from memory. Nothing is written twice. (Before: hyper dropped the request's future
/// with the client, the key was freed, and the retry wrote the records again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_keeps_its_idempotency_key() {
    within_limit(async {
        let (broker, cluster, topic, proxy) = embedded_with(1, ProxyConfig::default()).await;
        eventually_ok(&proxy, &topic, json!("warm")).await;
        // Every answer of the broker 10 s late: the records wait for their acknowledgement.
        // (3 s was too short on a loaded machine: once, the retry below came after the
        // acknowledgement and was answered 200 from memory instead of 409.)
        cluster.set_broker_rtt(1, Duration::from_secs(10)).unwrap();
        let body = r#"{"records":[{"value":"gone"}]}"#;
        let (send, first) = keyed_request_in_flight(&proxy, &topic, "k-gone", body).await;
        // The client gives up: its connection closes with the records queued.
        first.abort();
        let a = send().await;
        assert_eq!((a.status.as_u16(), a.code()), (409, Some(40901)));
        cluster.set_broker_rtt(1, Duration::ZERO).unwrap();
        let replayed = wait_until(WAIT, || async {
            let a = send().await;
            a.status == StatusCode::OK && a.headers.get("idempotent-replayed").is_some()
        })
        .await;
        assert!(
            replayed,
            "the retry is answered from the first request's outcome"
        );
        let written = broker
            .read_all(&topic)
            .await
            .into_iter()
            .filter(|r| r.payload.as_deref() == Some(&b"\"gone\""[..]))
            .count();
        assert_eq!(written, 1);
        proxy.shutdown().await;
    })
    .await
}

/// A rule that lets tenants `acme` and `globex` write (their tenant as a record header) and
/// refuses every other tenant with 403. It decides on `x-tenant`.
struct Tenants;

impl sidetrack::proxy::RecordRule for Tenants {
    fn check(&self, req: &RequestInfo<'_>, r: &mut ProduceRecord) -> Result<(), Rejection> {
        let tenant = req
            .headers
            .get("x-tenant")
            .map(|v| v.as_bytes())
            .filter(|t| [&b"acme"[..], b"globex"].contains(t))
            .ok_or_else(|| {
                Rejection::new("this tenant may not write here").with_status(StatusCode::FORBIDDEN)
            })?;
        r.headers.push(Header::new("tenant", tenant));
        Ok(())
    }

    fn decides_on_headers(&self) -> Vec<String> {
        vec!["X-Tenant".into()]
    }
}

/// An Idempotency-Key is answered from memory only after authentication and the rules, and
/// only to a request with the same caller and the same values of the headers the rules
/// decide on: a tenant the rules refuse, repeating another tenant's key and body, gets the
/// rules' 403 (before: 200 with the other tenant's offsets), another accepted tenant gets
/// 422, an unauthenticated caller 401, another token runs its own request, and the first
/// caller's retry still gets its answer. Written once per caller.
async fn idempotency_replay_after_the_rules(broker: Broker) {
    let topic = broker.topic("orders", 2).await;
    let mut config = ProxyConfig::default();
    for (name, token) in [("a", "tok-a"), ("b", "tok-b")] {
        config.auth.tokens.push(TokenConfig {
            name: name.into(),
            sha256: Some(sidetrack::proxy::token_sha256(token)),
            topics: vec!["*".into()],
            ..Default::default()
        });
    }
    let proxy = broker
        .proxy(config)
        .rule(Tenants)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = proxy.local_addr();
    let path = format!("/topics/{topic}");
    let body = r#"{"records":[{"key":"a","value":1},{"key":"b","value":2}]}"#;
    let send = |auth: Option<&'static str>, tenant: Option<&'static str>| {
        let path = path.clone();
        async move {
            let mut h = vec![("content-type", JSON_V2), ("idempotency-key", "order-1")];
            h.extend(tenant.map(|t| ("x-tenant", t)));
            h.extend(auth.map(|a| ("authorization", a)));
            request(addr, "POST", &path, &h, body).await.unwrap()
        }
    };
    let a = Some("Bearer tok-a");
    let first = send(a, Some("acme")).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.json());
    for refused in [Some("mallory"), None] {
        let r = send(a, refused).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (403, Some(42208)),
            "{refused:?}: {:?}",
            r.json()
        );
        assert!(r.headers.get("idempotent-replayed").is_none());
        assert!(r.json().get("offsets").is_none(), "{:?}", r.json());
    }
    // Another tenant the rules accept: not the first tenant's answer either.
    let r = send(a, Some("globex")).await;
    assert_eq!(
        (r.status.as_u16(), r.code()),
        (422, Some(42206)),
        "{:?}",
        r.json()
    );
    // No caller: 401, whatever the key.
    let r = send(None, Some("acme")).await;
    assert_eq!((r.status.as_u16(), r.code()), (401, Some(40101)));
    // The first caller's retry is still answered from memory.
    let again = send(a, Some("acme")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(again.body, first.body);
    // Another token with the same key, tenant and body: its own request.
    let b = send(Some("Bearer tok-b"), Some("acme")).await;
    assert_eq!(b.status, StatusCode::OK);
    assert!(b.headers.get("idempotent-replayed").is_none());
    let records = broker.read_all(&topic).await;
    assert_eq!(records.len(), 4, "written once per caller");
    assert!(records
        .iter()
        .all(|r| header(r, "tenant") == Some(&b"acme"[..])));
    proxy.shutdown().await;
}
on_every_broker!(
    idempotency_replay_after_the_rules,
    idempotency_replay_after_the_rules
);

/// An Idempotency-Key whose request still runs after the window has passed is still
/// running: its retry is 409, then gets the first answer; the record is written once.
/// (Before, the entry counted as absent once older than the window: the retry got 200 and
/// the record was written twice.) Here the request waits for the topic's metadata, which
/// the broker answers 10 s late, with a 2.5 s window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_idempotency_key_older_than_the_window_is_409() {
    within_limit(async {
        let broker = Broker::embedded();
        let cluster = broker.cluster().unwrap().clone();
        let warm = broker.topic("warm", 1).await;
        let topic = broker.topic("orders", 1).await;
        let window = Duration::from_millis(2500);
        let mut config = ProxyConfig {
            request_timeout: Duration::from_secs(2),
            metadata_timeout: Duration::from_secs(30),
            ..ProxyConfig::default()
        };
        config.idempotency.window = window;
        config.listen = "127.0.0.1:0".parse().unwrap();
        let ruled = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let seen = ruled.clone();
        let proxy = sidetrack::proxy::Proxy::builder(config)
            .embedded(&cluster)
            .rule(move |req: &RequestInfo<'_>, _r: &mut ProduceRecord| {
                if req.topic.starts_with("orders") {
                    seen.lock()
                        .unwrap()
                        .get_or_insert_with(std::time::Instant::now);
                }
                Ok(())
            })
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        // The producer is connected and has its producer id; `orders` is not looked up yet.
        eventually_ok(&proxy, &warm, json!("warm")).await;
        cluster.set_broker_rtt(1, Duration::from_secs(10)).unwrap();
        let body = r#"{"records":[{"value":"once"}]}"#;
        let addr = proxy.local_addr();
        let path = format!("/topics/{topic}");
        let send = move || {
            let path = path.clone();
            async move {
                request(
                    addr,
                    "POST",
                    &path,
                    &[("content-type", JSON_V2), ("idempotency-key", "k-old")],
                    body,
                )
                .await
                .unwrap()
            }
        };
        let first = tokio::spawn(send());
        // The key is claimed right after the rules ran (no await between them): once the
        // window has passed since then, the entry is older than the window.
        let old = wait_until(WAIT, || {
            let at = *ruled.lock().unwrap();
            async move { at.is_some_and(|t| t.elapsed() > window + Duration::from_millis(100)) }
        })
        .await;
        assert!(old);
        let a = send().await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (409, Some(40901)),
            "{:?}",
            a.json()
        );
        assert!(!first.is_finished(), "the first request still runs");
        cluster.set_broker_rtt(1, Duration::ZERO).unwrap();
        let first = first.await.unwrap();
        assert_eq!(first.status, StatusCode::OK, "{:?}", first.json());
        let again = send().await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.body, first.body);
        let written = broker
            .read_all(&topic)
            .await
            .into_iter()
            .filter(|r| r.payload.as_deref() == Some(&b"\"once\""[..]))
            .count();
        assert_eq!(written, 1);
        proxy.shutdown().await;
    })
    .await
}

/// Remembered answers are bounded by bytes as well as count: 20 requests with large answers
/// leave at most `idempotency.max_bytes` accounted, the oldest forgotten and the newest kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_answers_are_bounded_by_bytes() {
    within_limit(async {
        let max = 256 * 1024;
        let mut config = ProxyConfig::default();
        config.idempotency.max_bytes = max;
        let (_broker, _, topic, proxy) = embedded_with(1, config).await;
        let body = serde_json::to_vec(
            &json!({"records": (0..500).map(|i| json!({"value": i})).collect::<Vec<_>>()}),
        )
        .unwrap();
        let keys: Vec<String> = (0..20).map(|i| format!("big-{i}")).collect();
        let mut answer_len = 0;
        for k in &keys {
            let a = request(
                proxy.local_addr(),
                "POST",
                &format!("/topics/{topic}"),
                &[("content-type", JSON_V2), ("idempotency-key", k)],
                body.clone(),
            )
            .await
            .unwrap();
            assert_eq!(a.status, StatusCode::OK);
            answer_len = a.body.len();
            let (_, bytes) = proxy.idempotency_usage();
            assert!(bytes <= max, "{bytes} bytes remembered, bound {max}");
        }
        assert!(
            answer_len * 20 > 2 * max,
            "the answers are large: {answer_len}"
        );
        let (entries, bytes) = proxy.idempotency_usage();
        assert!(entries < 20 && entries > 0, "{entries} answers remembered");
        assert!(
            bytes >= entries * answer_len,
            "{bytes} for {entries} answers of {answer_len}"
        );
        proxy.shutdown().await;
    })
    .await
}

/// A record with more headers than `max_headers_per_record` is refused with 413 41304 before
/// its headers are decoded (10 requests of one record with 300,000 empty headers were
/// admitted as "10 bytes in flight" before), and a record's headers are charged what they
/// hold: in flight (`max_in_flight_bytes`) and, decoded and waiting for admission, against
/// `max_buffered_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_capped_and_charged_what_they_hold() {
    use sidetrack::proxy::{HEADER_OVERHEAD, RECORD_OVERHEAD};
    within_limit(async {
        let broker = Broker::embedded();
        let cluster = broker.cluster().unwrap().clone();
        let topic = broker.topic("orders", 1).await;
        let unlooked = broker.topic("fresh", 1).await;
        let mut config = ProxyConfig {
            request_timeout: Duration::from_secs(60),
            metadata_timeout: Duration::from_secs(60),
            ..ProxyConfig::default()
        };
        config.listen = "127.0.0.1:0".parse().unwrap();
        let proxy = sidetrack::proxy::Proxy::builder(config)
            .embedded(&cluster)
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        let addr = proxy.local_addr();
        let headers = |n: usize| {
            let h = vec![r#"{"key":""}"#; n].join(",");
            format!(r#"{{"records":[{{"value":1,"headers":[{h}]}}]}}"#)
        };
        let flood = headers(300_000);
        for _ in 0..10 {
            let a = request(
                addr,
                "POST",
                &format!("/topics/{topic}"),
                &[("content-type", JSON_V2)],
                flood.clone(),
            )
            .await
            .unwrap();
            assert_eq!(
                (a.status.as_u16(), a.code()),
                (413, Some(41304)),
                "{:?}",
                a.json()
            );
        }
        // v3 too.
        let v3 = format!(
            r#"{{"value":{{"data":1}},"headers":[{}]}}"#,
            vec![r#"{"name":"h"}"#; 257].join(",")
        );
        let a = request(
            addr,
            "POST",
            &format!("/v3/clusters/{}/topics/{topic}/records", proxy.cluster_id()),
            &[("content-type", "application/json")],
            v3,
        )
        .await
        .unwrap();
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (413, Some(41304)),
            "{:?}",
            a.json()
        );
        assert_eq!(proxy.in_flight(), (0, 0));
        assert_eq!(proxy.buffered_bytes(), 0);
        // At the cap: accepted, and charged what it holds.
        let at_cap = headers(256);
        eventually_ok(&proxy, &topic, json!("warm")).await;
        cluster.set_broker_rtt(1, Duration::from_secs(10)).unwrap();
        let cost = 1 + RECORD_OVERHEAD + 256 * HEADER_OVERHEAD;
        let post = |t: String| {
            let body = at_cap.clone();
            tokio::spawn(async move {
                request(
                    addr,
                    "POST",
                    &format!("/topics/{t}"),
                    &[("content-type", JSON_V2)],
                    body,
                )
                .await
                .unwrap()
            })
        };
        // Admitted, waiting for the broker's acknowledgement: in flight.
        let queued = post(topic.clone());
        assert!(
            wait_until(WAIT, || {
                let f = proxy.in_flight();
                async move { f == (1, cost) }
            })
            .await,
            "charged {:?}, expected (1, {cost})",
            proxy.in_flight()
        );
        // Decoded, waiting for the topic's metadata: held against max_buffered_bytes at its
        // decoded cost, not its body's length.
        assert!(cost > at_cap.len() * 4);
        let waiting = post(unlooked.clone());
        assert!(
            wait_until(WAIT, || {
                let b = proxy.buffered_bytes();
                async move { b == cost }
            })
            .await,
            "buffered {}, expected {cost}",
            proxy.buffered_bytes()
        );
        cluster.set_broker_rtt(1, Duration::ZERO).unwrap();
        assert_eq!(queued.await.unwrap().status, StatusCode::OK);
        assert_eq!(waiting.await.unwrap().status, StatusCode::OK);
        assert_eq!(proxy.in_flight(), (0, 0));
        assert_eq!(proxy.buffered_bytes(), 0);
        let r = broker.read_all(&topic).await;
        assert_eq!(r.iter().filter(|r| r.headers.len() == 256).count(), 1);
        proxy.shutdown().await;
    })
    .await
}

/// Authentication comes before anything derived from the path, on every produce route: an
/// unauthenticated request to a wrong cluster id or a bad partition is 401, and no answer to
/// an unauthenticated caller names the cluster id (before: 404 naming it, and 422 for the
/// partition). With a token, the same requests get their 404 and 422.
async fn authentication_before_path_checks(broker: Broker) {
    let topic = broker.topic("orders", 1).await;
    let mut config = ProxyConfig::default();
    config.auth.tokens.push(TokenConfig {
        name: "t".into(),
        sha256: Some(sidetrack::proxy::token_sha256("tok")),
        topics: vec!["*".into()],
        ..Default::default()
    });
    let proxy = broker.start(config).await;
    let addr = proxy.local_addr();
    let id = proxy.cluster_id().to_owned();
    let v3 = ("content-type", "application/json");
    let v2 = ("content-type", JSON_V2);
    let one = r#"{"records":[{"value":1}]}"#;
    let cases = [
        (
            "POST",
            format!("/v3/clusters/not-{id}/topics/{topic}/records"),
            v3,
            r#"{"value":{"data":1}}"#,
            404,
            40403,
        ),
        (
            "POST",
            format!("/v3/clusters/{id}/topics/{topic}/records"),
            v3,
            r#"{"value":{"data":1}}"#,
            200,
            200,
        ),
        (
            "POST",
            format!("/topics/{topic}/partitions/x"),
            v2,
            one,
            422,
            42204,
        ),
        (
            "POST",
            format!("/topics/{topic}/partitions/99"),
            v2,
            one,
            404,
            40402,
        ),
        ("POST", "/topics/a%20b".to_owned(), v2, one, 404, 40401),
        ("GET", format!("/v3/clusters/not-{id}"), v3, "", 404, 40403),
    ];
    for (method, path, ct, body, status, code) in cases {
        for auth in [None, Some("Bearer wrong")] {
            let mut h = vec![ct];
            h.extend(auth.map(|a| ("authorization", a)));
            let a = request(addr, method, &path, &h, body).await.unwrap();
            let text = String::from_utf8_lossy(&a.body).into_owned();
            assert_eq!(
                (a.status.as_u16(), a.code()),
                (401, Some(40101)),
                "{method} {path} {auth:?}: {text}"
            );
            assert!(!text.contains(&id), "{path}: {text} names the cluster id");
        }
        let a = request(
            addr,
            method,
            &path,
            &[ct, ("authorization", "Bearer tok")],
            body,
        )
        .await
        .unwrap();
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (status, Some(code)),
            "{method} {path}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    assert_eq!(broker.read_all(&topic).await.len(), 1);
    proxy.shutdown().await;
}
on_every_broker!(
    authentication_before_path_checks,
    authentication_before_path_checks
);

/// A partition added after the count was cached is seen within about a second (on a broker
/// with CreatePartitions: kfake; the embedded broker and Tansu 0.6 have none).
async fn added_partitions_are_seen(broker: Broker) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    if broker.cluster().is_some() {
        eprintln!("skipped on the embedded broker: it cannot add partitions");
        return;
    }
    let topic = broker.topic("grow", 1).await;
    let proxy = broker.start(ProxyConfig::default()).await;
    let to = |p: i32| {
        let path = format!("/topics/{topic}/partitions/{p}");
        let addr = proxy.local_addr();
        async move {
            request(
                addr,
                "POST",
                &path,
                &[("content-type", JSON_V2)],
                r#"{"records":[{"value":1}]}"#,
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(to(0).await.status, StatusCode::OK);
    assert_eq!(to(1).await.code(), Some(40402));
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let r = match admin
        .create_partitions([&NewPartitions::new(&topic, 2)], &AdminOptions::new())
        .await
    {
        Err(rdkafka::error::KafkaError::AdminOp(
            rdkafka::types::RDKafkaErrorCode::UnsupportedFeature,
        )) => {
            eprintln!("skipped: this broker has no CreatePartitions API (Tansu 0.6)");
            proxy.shutdown().await;
            return;
        }
        other => other.unwrap(),
    };
    assert!(r[0].is_ok(), "{r:?}");
    let ok = wait_until(WAIT, || async { to(1).await.status == StatusCode::OK }).await;
    assert!(ok, "partition 1 becomes writable through the proxy");
    proxy.shutdown().await;
}
on_every_broker!(added_partitions_are_seen, added_partitions_are_seen);

/// HTTP/2 (prior knowledge, as a gRPC-style client or a service mesh sends it): several
/// concurrent streams on one connection, each answered with its own offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams() {
    use http_body_util::BodyExt;
    within_limit(async {
        let (broker, _, topic, proxy) = embedded_with(2, ProxyConfig::default()).await;
        let tcp = tokio::net::TcpStream::connect(proxy.local_addr())
            .await
            .unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut streams = Vec::new();
        for i in 0..10 {
            let mut sender = sender.clone();
            let uri = format!("http://{}/topics/{topic}", proxy.local_addr());
            streams.push(tokio::spawn(async move {
                let req = hyper::Request::post(uri)
                    .header("content-type", JSON_V2)
                    .body(http_body_util::Full::new(Bytes::from(format!(
                        r#"{{"records":[{{"value":{i}}}]}}"#
                    ))))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.version(), hyper::Version::HTTP_2);
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            }));
        }
        for s in streams {
            let (status, body) = s.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        }
        assert_eq!(broker.read_all(&topic).await.len(), 10);
        proxy.shutdown().await;
    })
    .await
}
