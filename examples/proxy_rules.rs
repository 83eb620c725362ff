//! The proxy embedded as a library, with a company rule: every record must name its tenant
//! (`X-Tenant`), which is checked against a list, written as a record header with the W3C
//! `traceparent` of the request, and decides the partition (one tenant, one partition).
//!
//! ```sh
//! cargo run --example proxy_rules            # embedded broker; sends three requests, prints the answers
//! cargo run --example proxy_rules -- --serve # and keeps serving on 127.0.0.1:8082 until Ctrl-C
//! ```

use http_body_util::{BodyExt, Full};
use sidetrack::mocking::EmbeddedCluster;
use sidetrack::proxy::{ProduceRecord, Proxy, ProxyConfig, RecordRule, Rejection, RequestInfo};
use sidetrack::Header;

/// The company's rule.
struct TenantRule {
    tenants: Vec<&'static str>,
    partitions: i32,
}

impl RecordRule for TenantRule {
    fn check(&self, req: &RequestInfo<'_>, record: &mut ProduceRecord) -> Result<(), Rejection> {
        let tenant = req
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Rejection::new("send the tenant in an X-Tenant header"))?;
        if !self.tenants.contains(&tenant) {
            return Err(
                Rejection::new(format!("unknown tenant `{tenant}`")).with_status(axum_status(403))
            );
        }
        record.headers.push(Header::new("tenant", tenant));
        if let Some(tp) = req.headers.get("traceparent") {
            record
                .headers
                .push(Header::new("traceparent", tp.as_bytes()));
        }
        // A stable hash (FNV-1a), so a tenant keeps its partition across releases.
        let h = tenant.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        record.partition = Some((h % self.partitions as u64) as i32);
        Ok(())
    }

    /// The rule decides on the tenant: an `Idempotency-Key` is replayed only to a request of
    /// the same tenant. Not `traceparent`: it only travels into the record, and a retry
    /// carries a new one.
    fn decides_on_headers(&self) -> Vec<String> {
        vec!["x-tenant".into()]
    }
}

fn axum_status(code: u16) -> hyper::StatusCode {
    hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::UNPROCESSABLE_ENTITY)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve = std::env::args().any(|a| a == "--serve");
    let cluster = EmbeddedCluster::start()?;
    cluster.create_topic("orders", 4)?;
    let config = ProxyConfig {
        listen: if serve {
            "127.0.0.1:8082"
        } else {
            "127.0.0.1:0"
        }
        .parse()?,
        ..ProxyConfig::default()
    };
    let proxy = Proxy::builder(config)
        .embedded(&cluster)
        .rule(TenantRule {
            tenants: vec!["acme", "globex"],
            partitions: 4,
        })
        .build()?
        .start()
        .await?;
    println!("proxy with the tenant rule on {}", proxy.url());
    let body = r#"{"records":[{"key":"order-1","value":{"amount":5}}]}"#;
    for (tenant, traceparent) in [
        (
            Some("acme"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ),
        (Some("initech"), None),
        (None, None),
    ] {
        let stream = tokio::net::TcpStream::connect(proxy.local_addr()).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::post("/topics/orders")
            .header("host", "localhost")
            .header("content-type", "application/vnd.kafka.json.v2+json");
        if let Some(t) = tenant {
            req = req.header("x-tenant", t);
        }
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let resp = sender
            .send_request(req.body(Full::new(bytes::Bytes::from_static(body.as_bytes())))?)
            .await?;
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        println!(
            "X-Tenant {:<8} -> {} {}",
            tenant.unwrap_or("(none)"),
            status.as_u16(),
            String::from_utf8_lossy(&text)
        );
    }
    for r in cluster.read_all("orders").await? {
        let headers: Vec<String> = r
            .headers
            .iter()
            .map(|h| {
                format!(
                    "{}={}",
                    h.key_lossy(),
                    String::from_utf8_lossy(h.value.as_deref().unwrap_or_default())
                )
            })
            .collect();
        println!(
            "in the log: orders[{}]@{} headers {}",
            r.partition,
            r.offset,
            headers.join(", ")
        );
    }
    if serve {
        println!("serving until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
    proxy.shutdown().await;
    Ok(())
}
