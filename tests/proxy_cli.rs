//! `sidetrack proxy` as a process: zero setup (embedded broker, demo topic), a produce over
//! HTTP, graceful exit on SIGTERM; configuration errors name the field.
#![cfg(feature = "proxy")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::proxy::*;

fn sidetrack() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sidetrack"));
    c.env_remove("KAFKA_BROKERS").env("RUST_LOG", "warn");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_without_brokers_starts_the_embedded_broker() {
    within_limit(async {
        let mut child = sidetrack()
            .args(["proxy", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut said_embedded = false;
        let url = loop {
            let line = rx
                .recv_timeout(WAIT)
                .expect("the proxy says where it listens");
            said_embedded |= line.contains("started an embedded broker");
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        assert!(said_embedded, "says it started the embedded broker");
        let addr: std::net::SocketAddr = url.parse().unwrap();
        let a = request(
            addr,
            "POST",
            "/topics/demo",
            &[("content-type", JSON_V2)],
            r#"{"records":[{"key":"k1","value":{"hello":"world"}}]}"#,
        )
        .await
        .unwrap();
        assert_eq!(a.status.as_u16(), 200, "{:?}", a.json());
        assert!(a.offsets()[0].is_some());
        // SIGTERM: graceful exit, status 0.
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let mut lines = Vec::new();
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(20)) {
            lines.push(l);
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "{status:?}");
        assert!(
            lines.iter().any(|l| l.contains("shutting down")),
            "{lines:?}"
        );
    })
    .await
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[proxy]\nbrokers = \"127.0.0.1:1\"\n[proxy.producer]\nacks = \"1\"\n",
    )
    .unwrap();
    let out = sidetrack()
        .args(["proxy", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proxy.producer.\"acks\""), "{err}");
    let out = sidetrack()
        .args([
            "proxy",
            "-X",
            "enable.idempotence=false",
            "--brokers",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("enable.idempotence"));
}
