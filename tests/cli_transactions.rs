//! `dlq list`, `dlq show` and `dlq replay` on a DLQ written by a transactional producer (how
//! Spring Kafka writes its DLT inside a listener's transaction): committed records are read,
//! aborted ones and transaction markers are stepped over, a partition ending in a marker ends,
//! and a transaction left open holds back what follows it without a hang or an error.
//!
//! Runs on kfake (`SIDETRACK_TEST_KFAKE`) and Apache Kafka (`SIDETRACK_TEST_APACHE_KAFKA`). The
//! embedded broker (librdkafka's mock cluster) writes no transaction markers and aborts
//! nothing; Tansu 0.6 has no EndTxn: both are skipped with a printed reason.
#![cfg(feature = "cli")]

mod common;

use std::time::Duration;

use common::*;
use rdkafka::producer::{FutureProducer, Producer};
use sidetrack::Reason;
use sidetrack::{Envelope, Header};

const T: Duration = Duration::from_secs(30);

/// Runs the CLI against `cluster`; returns (exit code, stdout, stderr).
fn run(cluster: &Env, args: &[&str]) -> (i32, String, String) {
    sidetrack_cli(&cluster.bootstrap(), "5s", args)
}

/// Whether `cluster` can write transactions; if not, prints why the scenario is skipped.
fn transactional(cluster: &Env) -> bool {
    let why = match cluster.backend() {
        Backend::Embedded => "librdkafka's mock cluster accepts EndTxn but writes no transaction markers and aborts nothing",
        Backend::Tansu => "Tansu 0.6 does not implement EndTxn",
        Backend::Kfake | Backend::ApacheKafka | Backend::KafkaCluster => return true,
    };
    eprintln!(
        "skipped on {}: {why}; this scenario needs transactions",
        cluster.backend().name()
    );
    false
}

/// A transactional producer, its transactions initialised.
async fn txn_producer(cluster: &Env, id: &str) -> FutureProducer {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap())
        .set("transactional.id", cluster.name(&format!("-txn-{id}")))
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(T))
        .await
        .unwrap()
        .unwrap();
    producer
}

/// Writes one dead letter per key to `partition` of the scenario's DLQ, in one transaction
/// that is then committed, aborted, or left open (`None`). Keys name the originals: the
/// scenario's topic, partition 0, offset = the key's index in `keys`.
async fn in_transaction(
    cluster: &Env,
    producer: &FutureProducer,
    partition: i32,
    keys: &[&str],
    end: Option<bool>,
) {
    producer.begin_transaction().unwrap();
    for (i, key) in keys.iter().enumerate() {
        let mut headers = vec![Header::new("trace", key.as_bytes().to_vec())];
        headers.extend(
            Envelope {
                key_order_since: None,
                after_dead_letter: None,
                original_topic: cluster.topic().to_owned(),
                original_partition: 0,
                original_offset: i as i64,
                original_timestamp: None,
                group: cluster.group().to_owned(),
                attempts: 1,
                first_failure: 1_700_000_000_000,
                due: None,
                reason: Some(Reason::Permanent),
                error: format!("rejected {key}"),
            }
            .to_headers(),
        );
        cluster
            .produce(
                producer,
                &cluster.dlq(),
                Some(partition),
                Some(key.as_bytes()),
                Some(format!("payload of {key}").as_bytes()),
                &headers,
            )
            .await
            .unwrap();
    }
    let p = producer.clone();
    match end {
        Some(true) => tokio::task::spawn_blocking(move || p.commit_transaction(T)),
        Some(false) => tokio::task::spawn_blocking(move || p.abort_transaction(T)),
        None => return,
    }
    .await
    .unwrap()
    .unwrap();
}

/// Keys of `dlq list --format json` (exit 0 asserted), and its stderr.
fn listed(cluster: &Env) -> (Vec<String>, String) {
    let dlq = cluster.dlq();
    let (code, out, err) = run(
        cluster,
        &["dlq", "list", "--topic", &dlq, "--format", "json"],
    );
    assert_eq!(code, 0, "dlq list exited {code}: {err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON rows");
    let keys = rows
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect();
    (keys, err)
}

/// Keys of the records in `topic`, in offset order.
async fn keys_in(cluster: &Env, topic: &str) -> Vec<String> {
    cluster
        .read_all(topic)
        .await
        .iter()
        .map(|r| String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned())
        .collect()
}

/// Committed, aborted, committed in partition 0 (which ends in a commit marker), nothing but
/// an aborted transaction in partition 1: list shows exactly the committed records, show finds
/// the one after the aborted ones, replay sends exactly those, and a second replay sends
/// nothing new.
async fn committed_records_are_read_and_aborted_ones_stepped_over(cluster: Env) {
    if !transactional(&cluster) {
        return;
    }
    let dlq = cluster.dlq();
    cluster.create_topic(&dlq, 2).await;
    let producer = txn_producer(&cluster, "a").await;
    in_transaction(&cluster, &producer, 0, &["c1", "c2"], Some(true)).await;
    in_transaction(&cluster, &producer, 0, &["a1", "a2"], Some(false)).await;
    in_transaction(&cluster, &producer, 0, &["c3"], Some(true)).await;
    in_transaction(&cluster, &producer, 1, &["a3"], Some(false)).await;

    let (keys, err) = listed(&cluster);
    assert_eq!(keys, ["c1", "c2", "c3"]);
    assert!(!err.contains("held back"), "{err}");
    // Asking for uncommitted reads changes nothing: a DLQ reader never shows aborted records.
    let (code, out, err) = run(
        &cluster,
        &[
            "-X",
            "isolation.level=read_uncommitted",
            "dlq",
            "list",
            "--topic",
            &dlq,
            "--format",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 3, "{out}");

    // `sidetrack::testing::read_all` reads the same: aborted records are not there, markers
    // take offsets (c1 0, c2 1, marker 2, a1 3, a2 4, marker 5, c3 6, marker 7).
    let back = cluster.read_all(&dlq).await;
    let at: Vec<(String, i64)> = back
        .iter()
        .map(|r| {
            (
                String::from_utf8_lossy(r.key.as_deref().unwrap()).into(),
                r.offset,
            )
        })
        .collect();
    assert_eq!(
        at,
        [("c1".into(), 0), ("c2".into(), 1), ("c3".into(), 6)],
        "the DLQ as written"
    );

    // A committed record after the aborted ones, and an offset that is a marker.
    let (code, shown, err) = run(&cluster, &["dlq", "show", "--topic", &dlq, "0:6"]);
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("key: c3"), "{shown}");
    let (code, _, err) = run(&cluster, &["dlq", "show", "--topic", &dlq, "0:7"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("no record at 0:7"), "{err}");

    let (code, out, err) = run(&cluster, &["dlq", "replay", "--topic", &dlq]);
    assert_eq!(code, 0, "dry run: {err}");
    assert!(out.contains("3 records would be replayed"), "{out}");
    assert!(!out.contains("key=a1") && !out.contains("key=a2"), "{out}");

    let (code, out, err) = run(&cluster, &["dlq", "replay", "--topic", &dlq, "--yes"]);
    assert_eq!(code, 0, "replay: {err}");
    assert!(out.contains("replayed 3 records"), "{out}");
    assert_eq!(
        keys_in(&cluster, cluster.topic()).await,
        ["c1", "c2", "c3"],
        "replayed into the original topic"
    );
    // Progress is past the final marker: the next run has nothing to send.
    let (code, out, err) = run(&cluster, &["dlq", "replay", "--topic", &dlq, "--yes"]);
    assert_eq!(code, 0, "second replay: {err}");
    assert!(out.contains("replayed 0 records"), "{out}");
    assert_eq!(keys_in(&cluster, cluster.topic()).await.len(), 3);
}

/// A transaction left open: list shows the committed records before it and says what is held
/// back (exit 0, no wait for `--timeout`), replay sends those and saves progress at the last
/// stable offset, and once the transaction commits the next replay sends its records.
async fn an_open_transaction_holds_back_only_what_follows_it(cluster: Env) {
    if !transactional(&cluster) {
        return;
    }
    let dlq = cluster.dlq();
    cluster.create_topic(&dlq, 1).await;
    let done = txn_producer(&cluster, "done").await;
    in_transaction(&cluster, &done, 0, &["c1"], Some(true)).await;
    in_transaction(&cluster, &done, 0, &["c2"], Some(true)).await;
    // c1 0, marker 1, c2 2, marker 3, then the open transaction from 4.
    let open = txn_producer(&cluster, "open").await;
    in_transaction(&cluster, &open, 0, &["o1"], None).await;

    let (keys, err) = listed(&cluster);
    assert_eq!(keys, ["c1", "c2"]);
    assert!(
        err.contains(&format!(
            "`{dlq}` partition 0: read up to offset 4 only; 1 offset from there on is held back by a transaction that is still open"
        )),
        "{err}"
    );
    // The table form says the same.
    let (code, _, err) = run(&cluster, &["dlq", "list", "--topic", &dlq]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("held back by a transaction"), "{err}");
    // The held record cannot be shown yet, and why.
    let (code, _, err) = run(&cluster, &["dlq", "show", "--topic", &dlq, "0:4"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("offsets from 4 on are held back by a transaction that is still open"),
        "{err}"
    );

    // A run stopped by --limit before the stable end was not held back, and does not say so.
    let (code, out, err) = run(
        &cluster,
        &["dlq", "replay", "--topic", &dlq, "--limit", "1"],
    );
    assert_eq!(code, 0, "dry run: {err}");
    assert!(out.contains("1 record would be replayed"), "{out}");
    assert!(!err.contains("held back"), "{err}");

    let (code, out, err) = run(&cluster, &["dlq", "replay", "--topic", &dlq, "--yes"]);
    assert_eq!(code, 0, "replay: {err}");
    assert!(out.contains("replayed 2 records"), "{out}");
    assert!(
        err.contains("run the same command again once it commits"),
        "{err}"
    );
    assert_eq!(keys_in(&cluster, cluster.topic()).await, ["c1", "c2"]);

    // The transaction commits: its record is listed and the next replay sends only it.
    let p = open.clone();
    tokio::task::spawn_blocking(move || p.commit_transaction(T))
        .await
        .unwrap()
        .unwrap();
    let (keys, err) = listed(&cluster);
    assert_eq!(keys, ["c1", "c2", "o1"]);
    assert!(!err.contains("held back"), "{err}");
    let (code, out, err) = run(&cluster, &["dlq", "replay", "--topic", &dlq, "--yes"]);
    assert_eq!(code, 0, "replay after the commit: {err}");
    assert!(out.contains("replayed 1 record "), "{out}");
    assert_eq!(keys_in(&cluster, cluster.topic()).await, ["c1", "c2", "o1"]);
}

on_every_broker!(
    committed_records_are_read_and_aborted_ones_stepped_over,
    1,
    committed_records_are_read_and_aborted_ones_stepped_over
);
on_every_broker!(
    an_open_transaction_holds_back_only_what_follows_it,
    1,
    an_open_transaction_holds_back_only_what_follows_it
);
