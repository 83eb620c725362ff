//! A broker that stops answering after a client connected (a paused process, a stalled
//! machine: the socket stays open, nothing comes back) must not stop a runtime from starting
//! while other connections work. Found by the replication-fault ledger on three brokers: a
//! worker started as a broker was SIGSTOPped failed at start-up ("fetching topic metadata:
//! OperationTimedOut") and exited.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP forwarder to `upstream`. Its first connection passes the client's first request (a
/// Kafka client's ApiVersions) and every answer, then swallows whatever the client sends and
/// never closes: the broker looks alive and answers nothing more. Later connections are
/// forwarded both ways. Returns its address and the number of connections accepted.
async fn stalling_forwarder(upstream: String) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                if n > 0 {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
                // The first request: a 4-byte size, then that many bytes.
                let mut size = [0u8; 4];
                if client.read_exact(&mut size).await.is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(size) as usize];
                if client.read_exact(&mut body).await.is_err() {
                    return;
                }
                let _ = server.write_all(&size).await;
                let _ = server.write_all(&body).await;
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, _server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                });
                // Swallowed, for as long as the client keeps the connection.
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut client_rx, &mut sink).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_starts_while_the_broker_it_asked_first_stalls() {
    let cluster = cluster(1);
    for t in [
        format!("{TOPIC}.{GROUP}.retry.200ms"),
        format!("{TOPIC}.{GROUP}.retry.500ms"),
        format!("{TOPIC}.{GROUP}.dlq"),
    ] {
        cluster.create_topic(&t, 1).unwrap();
    }
    let (addr, accepted) = stalling_forwarder(cluster.bootstrap_servers().to_owned()).await;
    let mut config = config();
    // Every client of the runtime bootstraps through the forwarder; the first connection
    // (the start-up topic check's) stalls after the handshake.
    config.brokers = addr.to_string();
    config.provisioning.auto_create = false;
    config.provisioning.timeout = Duration::from_secs(10);
    let recorder = Recorder::new(|_| Ok(()));
    let began = Instant::now();
    let started = sidetrack::Runtime::builder(config)
        .handler(recorder.clone())
        .build()
        .unwrap()
        .start()
        .await;
    let took = began.elapsed();
    let handle = match started {
        Ok(h) => h,
        Err(e) => panic!("the runtime did not start ({e}) after {took:?}"),
    };
    assert!(
        accepted.load(Ordering::SeqCst) >= 2,
        "the start-up check went on a new connection"
    );
    produce_all(&cluster, &["after the stall".to_owned()], 1).await;
    wait_for("the record is handled", || recorder.count() == 1).await;
    println!("started in {took:?} past a stalled first connection");
    handle.shutdown().await.unwrap();
}
