//! The proxy tests' side of the support module: a bare broker to point a proxy at (a
//! [`Broker`]: the embedded cluster or an external back end, with topics made on demand rather
//! than one per scenario as [`super::Env`] does), a proxy on a free loopback port, and a small
//! real HTTP/1.1 client (hyper). Separate from `common`'s root because only the proxy suites
//! (and one interop test) use it, and it needs the `proxy` feature.
//!
//! The helpers every suite shares (the broker matrix, [`within_limit`], [`WAIT`],
//! [`init_tracing`], [`Backend`]) live in `common` and are re-exported here, so a proxy suite
//! needs one `use common::proxy::*;`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::StatusCode;
use sidetrack::proxy::{Proxy, ProxyBuilder, ProxyConfig, ProxyHandle};
use sidetrack::testing::{EmbeddedCluster, Record};

// Re-exported for the proxy suites' `use common::proxy::*`; a suite that does not use one of
// them must not warn.
#[allow(unused_imports)]
pub use super::{init_tracing, within_limit, Backend, WAIT};

/// The broker a scenario runs on.
#[derive(Clone)]
pub enum Broker {
    Embedded(EmbeddedCluster),
    /// An external back end and its bootstrap servers.
    Real(Backend, String),
}

impl Broker {
    pub fn embedded() -> Broker {
        init_tracing();
        Broker::Embedded(EmbeddedCluster::start().expect("embedded cluster"))
    }

    /// The broker of `backend`, or `None` when it is an external one whose variable is unset
    /// (after printing why the test passes anyway: [`Backend::bootstrap`]).
    pub fn on(backend: Backend) -> Option<Broker> {
        init_tracing();
        match backend {
            Backend::Embedded => Some(Broker::embedded()),
            external => Some(Broker::Real(external, external.bootstrap()?)),
        }
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Embedded(c) => c.bootstrap_servers().to_owned(),
            Broker::Real(_, b) => b.clone(),
        }
    }

    pub fn cluster(&self) -> Option<&EmbeddedCluster> {
        match self {
            Broker::Embedded(c) => Some(c),
            Broker::Real(..) => None,
        }
    }

    /// A fresh topic name (unique per test on a shared real broker), created.
    pub async fn topic(&self, name: &str, partitions: i32) -> String {
        let name = match self {
            Broker::Embedded(_) => name.to_owned(),
            Broker::Real(..) => format!("{name}-{:08x}", fastrand::u32(..)),
        };
        self.create_topic(&name, partitions).await;
        name
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        match self {
            Broker::Embedded(c) => c.create_topic(name, partitions).unwrap(),
            Broker::Real(backend, b) => {
                // Every replica on the three-broker cluster: its tests kill partition leaders.
                let replicas = if *backend == Backend::KafkaCluster {
                    3
                } else {
                    1
                };
                super::create_topic_on(b, name, partitions, replicas).await
            }
        }
    }

    /// A proxy builder on this broker, on a free loopback port.
    pub fn proxy(&self, mut config: ProxyConfig) -> ProxyBuilder {
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.metadata_timeout = Duration::from_secs(5);
        match self {
            Broker::Embedded(c) => Proxy::builder(config).embedded(c),
            Broker::Real(backend, b) => {
                config.brokers = b.clone();
                let builder = Proxy::builder(config);
                if *backend == Backend::Tansu {
                    // Tansu 0.6 makes only the first record of a multi-record batch readable.
                    builder.producer_property("batch.num.messages", "1")
                } else {
                    builder
                }
            }
        }
    }

    pub async fn start(&self, config: ProxyConfig) -> ProxyHandle {
        self.proxy(config).build().unwrap().start().await.unwrap()
    }

    pub async fn read_all(&self, topic: &str) -> Vec<Record> {
        sidetrack::testing::read_all(&self.bootstrap(), topic)
            .await
            .unwrap()
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn code(&self) -> Option<u64> {
        self.json()["error_code"].as_u64()
    }
    /// `(partition, offset)` of each record of a v2 answer (`None` where it failed).
    pub fn offsets(&self) -> Vec<Option<(i32, Option<i64>)>> {
        self.json()["offsets"]
            .as_array()
            .expect("offsets")
            .iter()
            .map(|o| {
                o["error_code"].is_null().then(|| {
                    (
                        o["partition"].as_i64().unwrap() as i32,
                        o["offset"].as_i64(),
                    )
                })
            })
            .collect()
    }
}

/// Sends one request on a new connection.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub const JSON_V2: &str = "application/vnd.kafka.json.v2+json";
pub const BINARY_V2: &str = "application/vnd.kafka.binary.v2+json";

/// POST a v2 JSON body to `/topics/{topic}`.
pub async fn post_json(handle: &ProxyHandle, topic: &str, body: serde_json::Value) -> Answer {
    request(
        handle.local_addr(),
        "POST",
        &format!("/topics/{topic}"),
        &[("content-type", JSON_V2)],
        serde_json::to_vec(&body).unwrap(),
    )
    .await
    .unwrap()
}

pub async fn get(handle: &ProxyHandle, path: &str) -> Answer {
    request(handle.local_addr(), "GET", path, &[], Bytes::new())
        .await
        .unwrap()
}

pub fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
