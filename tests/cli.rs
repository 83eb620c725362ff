//! The `sidetrack` binary on the embedded broker and, when configured, on a real broker and on
//! kfake (`on_every_broker!`): the CLI's admin and offset-by-time paths only run on those.
#![cfg(feature = "cli")]

mod common;

use std::collections::HashSet;

use assert_cmd::Command;
use common::*;
use sidetrack::testing::EmbeddedCluster;
use sidetrack::{HandlerError, Header, Runtime};

/// The DLQ of the embedded-only replay scenarios (topic `orders`, group `billing`).
const DLQ: &str = "orders.billing.dlq";

fn cli(cluster: &Env) -> Command {
    let mut c = Command::cargo_bin("sidetrack").unwrap();
    c.arg("--brokers")
        .arg(cluster.bootstrap())
        .arg("--timeout")
        .arg("5s");
    c
}

/// Runs the CLI; returns (exit code, stdout, stderr).
fn run(cluster: &Env, args: &[&str]) -> (i32, String, String) {
    let mut c = cli(cluster);
    // Tansu 0.6 cannot read a multi-record batch past its first record: replay sends one
    // record per batch there, as docs/brokers.md tells Tansu users to.
    if matches!(cluster.broker, Broker::Tansu(_)) && args.starts_with(&["dlq", "replay"]) {
        c.args(["-X", "batch.num.messages=1"]);
    }
    let out = c.args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_rows(cluster: &Env, extra: &[&str]) -> Vec<serde_json::Value> {
    let dlq = cluster.dlq();
    let mut args = vec!["dlq", "list", "--topic", &dlq, "--format", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run(cluster, &args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("list --format json parses")
}

/// Runs the CLI with `args` exactly (an alert's command line); returns stdout of a success.
fn succeed(args: &[&str]) -> Vec<u8> {
    let out = Command::cargo_bin("sidetrack")
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A DLQ with three records dead-lettered by the runtime: two permanent, one poison.
async fn dead_lettered(cluster: &Env) -> Vec<(i32, i64)> {
    let rt = cluster
        .builder(cluster.config())
        .handler(Recorder::new(|m| {
            let text = m.payload_str()?;
            if let Some(why) = text.strip_prefix("perm:") {
                return Err(HandlerError::permanent(why.to_owned()));
            }
            m.json::<serde_json::Value>().map(|_| ())
        }))
        .started()
        .await;
    let producer = cluster.producer();
    let mut sent = Vec::new();
    for (key, payload, headers) in [
        (
            "ka",
            "perm:bad amount",
            vec![Header::new("trace", b"t-1".to_vec())],
        ),
        ("kb", "perm:card DECLINED", vec![]),
        ("kc", "{\"broken\": ", vec![]),
    ] {
        sent.push(
            cluster
                .produce(
                    &producer,
                    cluster.topic(),
                    Some(0),
                    Some(key.as_bytes()),
                    Some(payload.as_bytes()),
                    &headers,
                )
                .await
                .unwrap(),
        );
    }
    wait_for("3 dead letters", || rt.stats().total_dead_lettered() == 3).await;
    rt.shutdown().await.unwrap();
    sent
}

async fn list_and_show_read_the_envelope_and_filters_select_exactly(cluster: Env) {
    let sent = dead_lettered(&cluster).await;
    let (topic, dlq) = (cluster.topic(), cluster.dlq());

    let rows = json_rows(&cluster, &[]);
    assert_eq!(rows.len(), 3);
    let a = rows.iter().find(|r| r["key"] == "ka").unwrap();
    assert_eq!(a["original_topic"], topic);
    assert_eq!(a["original_partition"], 0);
    assert_eq!(a["original_offset"], sent[0].1);
    assert_eq!(a["attempts"], 1);
    assert_eq!(a["reason"], "permanent");
    assert_eq!(a["error"], "bad amount");
    assert_eq!(a["group"], cluster.group());
    assert_eq!(a["envelope"], "sidetrack");
    assert!(a["age_seconds"].as_i64().unwrap() >= 0);

    let (code, table, _) = run(&cluster, &["dlq", "list", "--topic", &dlq]);
    assert_eq!(code, 0);
    assert!(table.starts_with("POSITION"), "{table}");
    assert!(
        table.contains(&format!("{topic}[0]@{}", sent[1].1)),
        "{table}"
    );
    assert!(table.contains("card DECLINED"), "{table}");

    let keys = |extra: &[&str]| -> HashSet<String> {
        json_rows(&cluster, extra)
            .iter()
            .map(|r| r["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
    assert_eq!(keys(&["--reason", "poison"]), set(&["kc"]));
    assert_eq!(keys(&["--reason", "permanent"]), set(&["ka", "kb"]));
    assert_eq!(keys(&["--reason", "exhausted"]), set(&[]));
    assert_eq!(keys(&["--key", "kb"]), set(&["kb"]));
    assert_eq!(keys(&["--error-contains", "declined"]), set(&["kb"]));
    assert_eq!(keys(&["--since", "1h"]), set(&["ka", "kb", "kc"]));
    assert_eq!(keys(&["--until", "2020-01-01T00:00:00Z"]), set(&[]));
    assert_eq!(json_rows(&cluster, &["--limit", "2"]).len(), 2);

    let pos = format!("0:{}", a["offset"]);
    let (code, shown, err) = run(&cluster, &["dlq", "show", "--topic", &dlq, &pos]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "envelope (sidetrack, version 1)",
        "reason             permanent",
        "error              bad amount",
        &format!("original           {topic}[0]@{}", sent[0].1),
        &format!("group              {}", cluster.group()),
        "user headers (1):",
        "trace              t-1",
        "key: ka",
        "payload (15 bytes, not JSON):",
    ] {
        assert!(shown.contains(needle), "missing `{needle}` in:\n{shown}");
    }
    let c = rows.iter().find(|r| r["key"] == "kc").unwrap();
    let (_, shown, _) = run(
        &cluster,
        &[
            "dlq",
            "show",
            "--topic",
            &dlq,
            &format!("0:{}", c["offset"]),
        ],
    );
    assert!(shown.contains("reason             poison"), "{shown}");

    let (code, _, err) = run(&cluster, &["dlq", "show", "--topic", &dlq, "0:999"]);
    assert_eq!(code, 5, "{err}");
}

async fn replay_writes_only_with_yes_exactly_once_and_the_runtime_handles_it(cluster: Env) {
    dead_lettered(&cluster).await;
    let (topic, dlq) = (cluster.topic(), cluster.dlq());
    let before = cluster.read_all(topic).await.len();

    // Without --yes: a dry run, nothing written.
    let (code, out, err) = run(
        &cluster,
        &["dlq", "replay", "--topic", &dlq, "--reason", "permanent"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dry run: 2 records would be replayed"),
        "{out}"
    );
    assert!(
        out.contains("nothing was sent (add --yes to send)"),
        "{out}"
    );
    assert_eq!(cluster.read_all(topic).await.len(), before);

    let (code, out, err) = run(
        &cluster,
        &[
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--reason",
            "permanent",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 2 records"), "{out}");
    let after = cluster.read_all(topic).await;
    assert_eq!(after.len(), before + 2);
    let replayed: Vec<_> = after[before..].to_vec();
    let keys: HashSet<_> = replayed.iter().map(|r| r.key.clone().unwrap()).collect();
    assert_eq!(keys, HashSet::from([b"ka".to_vec(), b"kb".to_vec()]));
    let ka = replayed
        .iter()
        .find(|r| r.key.as_deref() == Some(b"ka"))
        .unwrap();
    assert_eq!(ka.payload.as_deref(), Some(&b"perm:bad amount"[..]));
    assert_eq!(
        ka.headers[0],
        Header::new("trace", b"t-1".to_vec()),
        "user headers kept"
    );
    assert!(ka.header_str("sidetrack-replay-id").is_some());
    assert!(ka
        .header_str("sidetrack-replayed-from")
        .unwrap()
        .starts_with(&format!("{dlq}:0:")));
    assert!(
        ka.envelope().is_err(),
        "replayed to the original topic without an envelope"
    );

    // The same replay again sends nothing.
    let (code, out, _) = run(
        &cluster,
        &[
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--reason",
            "permanent",
            "--yes",
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("replayed 0 records"), "{out}");
    assert_eq!(cluster.read_all(topic).await.len(), before + 2);

    // The fixed handler takes them: exactly the two replayed records.
    let fixed = Recorder::new(|_| Ok(()));
    let rt = cluster
        .builder(cluster.config())
        .handler(fixed.clone())
        .started()
        .await;
    wait_for("replayed records handled", || rt.stats().handled == 2).await;
    rt.shutdown().await.unwrap();
    let seen: HashSet<String> = fixed.all().into_iter().map(|a| a.payload).collect();
    assert_eq!(
        seen,
        HashSet::from([
            "perm:bad amount".to_string(),
            "perm:card DECLINED".to_string()
        ])
    );
}

async fn replay_to_first_retry_carries_a_fresh_envelope(cluster: Env) {
    dead_lettered(&cluster).await;
    let (dlq, tier) = (cluster.dlq(), cluster.retry("200ms"));
    let (code, out, err) = run(
        &cluster,
        &[
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--key",
            "ka",
            "--to",
            "first-retry",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("to {tier}")), "{out}");
    let tier = cluster.read_all(&tier).await;
    let r = tier.last().unwrap();
    let (user, env) = r.envelope().unwrap();
    assert_eq!(env.attempts, 1);
    assert_eq!(sidetrack::outcome::error_kind_str(env.reason), "retryable");
    assert_eq!(env.original_topic, cluster.topic());
    assert_eq!(user[0], Header::new("trace", b"t-1".to_vec()));

    let fixed = Recorder::new(|_| Ok(()));
    let rt = cluster
        .builder(cluster.config())
        .handler(fixed.clone())
        .started()
        .await;
    wait_for("retried record handled", || rt.stats().handled == 1).await;
    rt.shutdown().await.unwrap();
    let seen = fixed.all();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].payload, "perm:bad amount");
    assert_eq!(seen[0].attempt, 2);
}

async fn spring_dead_letters_and_records_without_envelope_are_shown(cluster: Env) {
    let legacy = cluster.name(".DLT");
    cluster.create_topic(&legacy, 1).await;
    let producer = cluster.producer();
    let spring = vec![
        Header::new("kafka_dlt-original-topic", b"payments".to_vec()),
        Header::new("kafka_dlt-original-partition", 2i32.to_be_bytes().to_vec()),
        Header::new("kafka_dlt-original-offset", 77i64.to_be_bytes().to_vec()),
        Header::new(
            "kafka_dlt-exception-fqcn",
            b"java.lang.IllegalStateException".to_vec(),
        ),
        Header::new("kafka_dlt-exception-message", b"boom".to_vec()),
    ];
    cluster
        .produce(&producer, &legacy, None, None, Some(b"{}"), &spring)
        .await
        .unwrap();
    cluster
        .produce(&producer, &legacy, None, None, Some(&[0xff, 0x00]), &[])
        .await
        .unwrap();
    let mut c = cli(&cluster);
    let out = c
        .args(["dlq", "list", "--topic", &legacy, "--format", "json"])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["envelope"], "spring");
    assert_eq!(rows[0]["original_topic"], "payments");
    assert_eq!(rows[0]["original_partition"], 2);
    assert_eq!(rows[0]["original_offset"], 77);
    assert_eq!(rows[0]["error"], "java.lang.IllegalStateException: boom");
    assert_eq!(rows[1]["envelope"], "none");
    assert_eq!(
        rows[1]["error"],
        "no sidetrack envelope (no sidetrack envelope)"
    );
    let (code, shown, _) = run(&cluster, &["dlq", "show", "--topic", &legacy, "0:1"]);
    assert_eq!(code, 0);
    assert!(shown.contains("no sidetrack envelope"), "{shown}");
    assert!(
        shown.contains("payload (2 bytes, not JSON):\n\\xff\\x00"),
        "{shown}"
    );
}

async fn errors_have_clear_messages_and_exit_codes(cluster: Env) {
    let nope = cluster.name("-nope.dlq");
    let (code, _, err) = run(&cluster, &["dlq", "list", "--topic", &nope]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains(&format!("topic `{nope}` does not exist")),
        "{err}"
    );

    let (code, _, err) = run(
        &cluster,
        &[
            "dlq",
            "list",
            "--topic",
            cluster.topic(),
            "--since",
            "yesterday-ish",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("neither a duration"), "{err}");

    // A group that never committed (kfake answers GROUP_ID_NOT_FOUND, Kafka no offsets).
    let (code, _, err) = run(&cluster, &["lag", "--group", &nope]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains(&format!("group `{nope}` has no committed offsets")),
        "{err}"
    );

    let out = Command::cargo_bin("sidetrack")
        .unwrap()
        .args([
            "--brokers",
            "127.0.0.1:1",
            "--timeout",
            "2s",
            "dlq",
            "list",
            "--topic",
            "x",
        ])
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot reach brokers at 127.0.0.1:1 within 2s"));

    let out = Command::cargo_bin("sidetrack")
        .unwrap()
        .env_remove("KAFKA_BROKERS")
        .args(["lag", "--group", "g"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no brokers"));
}

async fn topology_creates_missing_topics_and_lag_reports_them(cluster: Env) {
    let topic = cluster.topic();
    let topology = ["topology", "--topic", topic, "--group", "ops"];
    let side = ["retry.1s", "retry.30s", "retry.10m", "dlq"].map(|s| format!("{topic}.ops.{s}"));
    let (code, out, err) = run(&cluster, &topology);
    assert_eq!(code, 0, "{err}");
    for t in &side {
        let line = out.lines().find(|l| l.contains(t.as_str()));
        assert!(line.is_some_and(|l| l.ends_with("MISSING")), "{t}:\n{out}");
    }
    assert!(err.contains("run again with --create"), "{err}");
    let (code, out, err) = run(&cluster, &[&topology[..], &["--create"]].concat());
    if cluster.is_embedded() {
        // The embedded broker has no CreateTopics API: --create must fail clearly, not hang.
        assert_ne!(code, 0);
        assert!(err.contains(&format!("{topic}.ops")), "{err}");
    } else {
        // Every side topic is created with the source topic's partition count ...
        assert_eq!(code, 0, "{err}");
        for t in &side {
            let line = out.lines().find(|l| l.contains(t.as_str()));
            assert!(
                line.is_some_and(|l| l.ends_with("created (2 partitions)")),
                "{t}:\n{out}"
            );
        }
        // ... and the next look finds all five, creating nothing.
        let (code, out, err) = run(&cluster, &topology);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.matches("exists (2 partitions)").count(), 5, "{out}");
        assert!(
            !out.contains("MISSING") && !out.contains("created"),
            "{out}"
        );
        assert!(!err.contains("--create"), "{err}");
    }

    // Lag: a runtime commits on the main topic; `lag` shows it with its retry tiers.
    let rt = cluster
        .builder(cluster.config())
        .handler(Recorder::new(|_| Ok(())))
        .started()
        .await;
    cluster
        .produce_all(&["a".into(), "b".into(), "c".into()], 2)
        .await;
    wait_for("handled", || rt.stats().handled == 3).await;
    rt.shutdown().await.unwrap();
    let (code, out, err) = run(&cluster, &["lag", "--group", cluster.group()]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(&format!("{topic} ")))
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| l.trim_end().ends_with(" 0")), "{out}");
    assert!(out.contains(&cluster.retry("200ms")), "{out}");
    assert!(out.contains(&cluster.dlq()), "{out}");
}

#[test]
fn the_example_config_is_valid() {
    let c = sidetrack::Config::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/billing.toml"
    ))
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.retry.policy().unwrap().max_retries(), 3);
}

async fn the_command_in_an_alert_lists_exactly_its_records(cluster: Env) {
    let collect = Collect::default();
    let mut cfg = cluster.config();
    cfg.alerts.window = std::time::Duration::from_secs(600);
    let rt = cluster
        .builder(cfg)
        .handler(Recorder::new(|_| Err(HandlerError::permanent("rejected"))))
        .dead_letter_notifier(collect.clone())
        .started()
        .await;
    let sent: Vec<String> = (0..7).map(|i| format!("r{i}")).collect();
    cluster.produce_all(&sent, 2).await;
    wait_for("7 dead letters", || rt.stats().total_dead_lettered() == 7).await;
    rt.shutdown().await.unwrap();
    // One alert per 10-minute window (two if the records straddle a boundary); each alert's
    // command lists exactly its own records, and together they list all seven.
    let alerts = collect.0.lock().unwrap().clone();
    assert_eq!(alerts.iter().map(|a| a.count).sum::<u64>(), 7);
    for alert in &alerts {
        let words: Vec<&str> = alert.inspect_command.split_whitespace().collect();
        assert_eq!(words[0], "sidetrack");
        let mut args: Vec<&str> = words[1..].to_vec();
        args.extend(["--format", "json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&succeed(&args)).unwrap();
        assert_eq!(rows.len() as u64, alert.count, "{}", alert.inspect_command);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_commands_of_a_window_replay_its_records_once() {
    let cluster = cluster(2);
    let collect = Collect::default();
    let mut cfg = config();
    cfg.alerts.window = std::time::Duration::from_millis(300);
    // Partition 0 gets only bad records, up to 3000 dead letters in a row: to the dead-letter
    // flood breaker that is a bad deploy, and it would pause the partition after 100.
    cfg.dead_letter.breaker.enabled = false;
    let rt = Runtime::builder(cfg)
        .embedded(&cluster)
        .handler(Recorder::new(|m| match m.payload_str()? {
            p if p.starts_with("bad") => Err(HandlerError::permanent("rejected")),
            _ => Ok(()),
        }))
        .dead_letter_notifier(collect.clone())
        .started()
        .await;
    // A sustained rate of dead letters for 1.5 s (five windows).
    let producer = cluster.producer().unwrap();
    let mut bad = 0u64;
    let begun = std::time::Instant::now();
    while begun.elapsed() < std::time::Duration::from_millis(1500) && bad < 3000 {
        produce_each(
            &producer,
            TOPIC,
            &[format!("bad-{bad}"), format!("ok-{bad}")],
            2,
        )
        .await;
        bad += 1;
    }
    wait_for("every dead letter", || {
        rt.stats().total_dead_lettered() == bad
    })
    .await;
    rt.shutdown().await.unwrap();
    let alerts = collect.0.lock().unwrap().clone();
    eprintln!("{bad} dead letters in {} alerts", alerts.len());
    assert_eq!(alerts.iter().map(|a| a.count).sum::<u64>(), bad);
    // Windows are disjoint: no two alerts share a window unless one is a follow-up.
    let firsts: Vec<i64> = alerts
        .iter()
        .filter(|a| !a.follow_up)
        .map(|a| a.window_start_ms)
        .collect();
    let distinct: HashSet<i64> = firsts.iter().copied().collect();
    assert_eq!(distinct.len(), firsts.len(), "{alerts:?}");
    // The dead letters span several windows, or the check above says nothing.
    assert!(distinct.len() >= 2, "{alerts:?}");
    // Every alert's replay command, each run twice (an alert seen on two instances, or
    // re-run by a second engineer), sends each record once.
    for alert in alerts.iter().chain(alerts.iter()) {
        let words: Vec<&str> = alert.replay_command.split_whitespace().collect();
        let mut args: Vec<&str> = words[1..]
            .iter()
            .copied()
            .filter(|w| *w != "--dry-run")
            .collect();
        args.push("--yes");
        succeed(&args);
    }
    assert_each_replayed_once(&cluster).await;
}

// ---------------------------------------------------------------------------------------------
// Replay under concurrency, oversized dead letters, progress groups, hostile records (issue 10).

use std::collections::HashMap;
use std::process::{Child, Stdio};

use rdkafka::producer::{FutureProducer, FutureRecord};
use sidetrack::Envelope;
use sidetrack::Reason;

/// The CLI as a child process (stdout and stderr captured).
fn spawn(cluster: &EmbeddedCluster, args: &[&str]) -> Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("sidetrack"))
        .arg("--brokers")
        .arg(cluster.bootstrap_servers())
        .arg("--timeout")
        .arg("5s")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// (exit code, stdout, stderr) of a finished child.
fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn envelope(kind: Reason, original: (&str, i32, i64)) -> Envelope {
    Envelope {
        key_order_since: None,
        after_dead_letter: None,
        original_topic: original.0.to_owned(),
        original_partition: original.1,
        original_offset: original.2,
        original_timestamp: None,
        group: GROUP.to_owned(),
        attempts: 1,
        first_failure: 1_700_000_000_000,
        due: None,
        reason: Some(kind),
        error: "rejected".to_owned(),
    }
}

/// Writes one dead letter (user headers, then the envelope) the way the runtime does.
async fn dead_letter(
    producer: &FutureProducer,
    partition: Option<i32>,
    key: &[u8],
    payload: Option<&[u8]>,
    user: &[Header],
    env: &Envelope,
) -> (i32, i64) {
    let mut headers = user.to_vec();
    headers.extend(env.to_headers());
    sidetrack::testing::produce(producer, DLQ, partition, Some(key), payload, &headers)
        .await
        .unwrap()
}

/// How often each DLQ position (`dlq:partition:offset`) was replayed into `topic`.
async fn replayed_from(cluster: &EmbeddedCluster, topic: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in cluster.read_all(topic).await.unwrap() {
        if let Some(from) = r.header_str("sidetrack-replayed-from") {
            *seen.entry(from.to_owned()).or_insert(0) += 1;
        }
    }
    seen
}

/// Every DLQ record, as `dlq:partition:offset`.
async fn dlq_positions(cluster: &EmbeddedCluster) -> Vec<String> {
    cluster
        .read_all(DLQ)
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{DLQ}:{}:{}", r.partition, r.offset))
        .collect()
}

/// Asserts that every DLQ record was replayed exactly once into `orders`.
async fn assert_each_replayed_once(cluster: &EmbeddedCluster) {
    let seen = replayed_from(cluster, TOPIC).await;
    let all = dlq_positions(cluster).await;
    let missing: Vec<&String> = all.iter().filter(|p| !seen.contains_key(*p)).collect();
    let twice: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "{} DLQ records: {} never replayed (first: {:?}), {} replayed more than once (first: {:?})",
        all.len(),
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first()
    );
    assert_eq!(seen.len(), all.len());
}

/// `n` permanent dead letters of `orders[0]`, spread over the DLQ's partitions by key.
async fn dead_letters(producer: &FutureProducer, from: usize, n: usize) {
    for i in from..from + n {
        let key = format!("k{i}");
        dead_letter(
            producer,
            None,
            key.as_bytes(),
            Some(format!("payload {i}").as_bytes()),
            &[],
            &envelope(Reason::Permanent, (TOPIC, 0, i as i64)),
        )
        .await;
    }
}

fn group_of(out: &str) -> String {
    out.split("consumer group `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap_or_else(|| panic!("no progress group in: {out}"))
        .to_owned()
}

/// [`run`] on an embedded cluster directly (the replay scenarios that need its fault injection
/// or several processes at once run on it only).
fn run_on(cluster: &EmbeddedCluster, args: &[&str]) -> (i32, String, String) {
    sidetrack_cli(cluster.bootstrap_servers(), "5s", args)
}

fn json_rows_on(cluster: &EmbeddedCluster, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["dlq", "list", "--topic", DLQ, "--format", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run_on(cluster, &args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("list --format json parses")
}

/// [`dead_lettered`] on a fresh embedded cluster (topic `orders`, group `billing`).
async fn dead_lettered_embedded() -> (EmbeddedCluster, Vec<(i32, i64)>) {
    let env = Env::embedded(1);
    let sent = dead_lettered(&env).await;
    let Broker::Embedded(cluster) = env.broker else {
        unreachable!("embedded")
    };
    (cluster, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_dead_lettered_during_a_replay_are_replayed_by_the_next_run() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 2).unwrap();
    let producer = cluster.producer().unwrap();
    dead_letters(&producer, 0, 3).await;
    let child = spawn(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    // Keep dead-lettering while the replay runs.
    let mut child = child;
    let mut n = 3;
    while child.try_wait().unwrap().is_none() {
        dead_letters(&producer, n, 1).await;
        n += 1;
    }
    let (code, out, err) = finish(child);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out2, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 0, "{err}");
    eprintln!("{n} dead letters; first run: {out}second run: {out2}");
    assert_each_replayed_once(&cluster).await;
    // And a third run has nothing left.
    let (code, out3, _) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 0);
    assert!(out3.contains("replayed 0 records"), "{out3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_replay_saves_progress_only_up_to_what_it_considered() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 2).unwrap();
    let producer = cluster.producer().unwrap();
    dead_letters(&producer, 0, 30).await;
    // Each run sends at most 7 and saves progress only past those: 7, 7, 7, 7, 2, then 0.
    let mut sent = Vec::new();
    loop {
        let (code, out, err) = run_on(
            &cluster,
            &["dlq", "replay", "--topic", DLQ, "--yes", "--limit", "7"],
        );
        assert_eq!(code, 0, "{err}");
        let n: usize = out
            .split("replayed ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `replayed N` in {out}"));
        sent.push(n);
        if n == 0 || sent.len() > 10 {
            break;
        }
    }
    assert_eq!(sent, [7, 7, 7, 7, 2, 0], "records replayed per run");
    assert_each_replayed_once(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_relative_since_replay_run_twice_sends_nothing_new() {
    let (cluster, _) = dead_lettered_embedded().await;
    let args = ["dlq", "replay", "--topic", DLQ, "--since", "1h", "--yes"];
    let (code, out, err) = run_on(&cluster, &args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 3 records"), "{out}");
    let before = cluster.read_all(TOPIC).await.unwrap().len();
    let (code, again, err) = run_on(&cluster, &args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(group_of(&out), group_of(&again));
    assert!(again.contains("replayed 0 records"), "{again}");
    assert_eq!(cluster.read_all(TOPIC).await.unwrap().len(), before);
    // Another window is another selection: its own group.
    let (code, other, _) = run_on(
        &cluster,
        &["dlq", "replay", "--topic", DLQ, "--since", "2h"],
    );
    assert_eq!(code, 0);
    assert!(
        other.contains("dry run: 3 records would be replayed"),
        "{other}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replay_of_the_same_selection_refuses_while_the_first_runs() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 1).unwrap();
    let producer = cluster.producer().unwrap();
    dead_letters(&producer, 0, 300).await;
    let args = ["dlq", "replay", "--topic", DLQ, "--yes", "--rate", "30/s"];
    let first = spawn(&cluster, &args);
    wait_for_async("the first replay sends", || async {
        !replayed_from(&cluster, TOPIC).await.is_empty()
    })
    .await;
    let (code, out, err) = finish(spawn(&cluster, &args));
    assert_ne!(code, 0, "the second replay must not run: {out}{err}");
    assert!(
        err.contains("another replay with progress group"),
        "{out}{err}"
    );
    let (code, out, err) = finish(first);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("replayed 300 records"), "{out}");
    assert_each_replayed_once(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replays_started_at_once_send_each_record_once() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 2).unwrap();
    let producer = cluster.producer().unwrap();
    dead_letters(&producer, 0, 200).await;
    let args = ["dlq", "replay", "--topic", DLQ, "--yes", "--rate", "40/s"];
    let (a, b) = (spawn(&cluster, &args), spawn(&cluster, &args));
    let (a, b) = (finish(a), finish(b));
    eprintln!("A: {a:?}\nB: {b:?}");
    let seen = replayed_from(&cluster, TOPIC).await;
    assert!(
        seen.values().all(|n| *n == 1),
        "a record was sent twice:\nA: {a:?}\nB: {b:?}"
    );
    let reported = |r: &(i32, String, String)| r.2.contains("another replay");
    if a.0 == 0 || b.0 == 0 {
        // One finished (the other refused, or found nothing left): all sent, once.
        assert_each_replayed_once(&cluster).await;
    }
    if a.0 != 0 || b.0 != 0 {
        assert!(
            reported(&a) || reported(&b),
            "a failure that is not the other replay:\nA: {a:?}\nB: {b:?}"
        );
        for r in [&a, &b] {
            assert!(r.0 == 0 || reported(r), "{r:?}");
        }
    }
    // Whatever happened, running it again finishes the job, once.
    let (code, _, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert_each_replayed_once(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_progress_commit_is_refused_does_not_claim_success() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 1).unwrap();
    let producer = cluster.producer().unwrap();
    dead_letters(&producer, 0, 5).await;
    // The member was dropped from its group: the broker no longer knows it.
    cluster.fail_requests(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID; 4],
    );
    let (code, out, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!out.contains("replayed"), "{out}");
    assert!(err.contains("saving replay progress"), "{err}");
    assert!(err.contains("Unknown member"), "{err}");
    cluster.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    // Progress was not saved: the next run sends the batch again (the documented bound).
    let (code, out, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 5 records"), "{out}");
    let seen = replayed_from(&cluster, TOPIC).await;
    assert_eq!(seen.len(), 5);
    assert!(seen.values().all(|n| *n == 2), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replay_resumes_with_at_most_one_batch_sent_twice() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 2).unwrap();
    let producer = cluster.producer().unwrap();
    dead_letters(&producer, 0, 400).await;
    let args = ["dlq", "replay", "--topic", DLQ, "--yes", "--rate", "100/s"];
    let mut first = spawn(&cluster, &args);
    wait_for_async("more than a batch sent", || async {
        replayed_from(&cluster, TOPIC).await.len() > 150
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no leave, no last commit
    let _ = first.wait();
    let sent_before = replayed_from(&cluster, TOPIC).await.len();
    // The dead member holds the group until its session expires; the new run waits for it.
    let (code, out, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    let seen = replayed_from(&cluster, TOPIC).await;
    assert_eq!(seen.len(), 400, "every record replayed");
    let twice = seen.values().filter(|n| **n > 1).count();
    eprintln!("killed after {sent_before} sent; {twice} sent twice");
    assert!(seen.values().all(|n| *n <= 2));
    assert!(twice <= 100, "{twice} sent twice: more than one batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_dead_letters_are_replayed_from_their_original_or_skipped() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 1).unwrap();
    // The original: larger than a producer's default message.max.bytes (1 MB), binary, with a
    // user header whose name is not UTF-8.
    let big: Vec<u8> = (0..1_200_000u32).map(|i| (i % 251) as u8).collect();
    let user = vec![
        Header::new(vec![0xff, b'h'], vec![0u8, 1, 2]),
        Header::null("trace"),
    ];
    let big_producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("message.max.bytes", "5000000")
        .create()
        .unwrap();
    let filler = cluster.producer().unwrap();
    sidetrack::testing::produce(&filler, TOPIC, Some(0), Some(b"other"), Some(b"x"), &[])
        .await
        .unwrap();
    let original = sidetrack::testing::produce(
        &big_producer,
        TOPIC,
        Some(0),
        Some(b"big-key"),
        Some(&big),
        &user,
    )
    .await
    .unwrap();
    let producer = cluster.producer().unwrap();
    let cases: [(&[u8], _); 4] = [
        // 0: the original is there.
        (b"big-key", (TOPIC, 0, original.1)),
        // 1: past the end of the source partition.
        (b"big-key", (TOPIC, 0, 999)),
        // 2: a topic that does not exist.
        (b"k2", ("gone", 0, 0)),
        // 3: the position holds another record (its key differs).
        (b"big-key", (TOPIC, 0, 0)),
    ];
    for (key, at) in cases {
        let env = envelope(Reason::Oversized, at);
        dead_letter(&producer, Some(0), key, None, &[], &env).await;
    }
    let before = cluster.read_all(TOPIC).await.unwrap().len();

    let (code, dry, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        dry.contains("would send 0:0 -> orders[0] key=big-key"),
        "{dry}"
    );
    assert!(dry.contains("dry run: 1 record would be replayed"), "{dry}");
    assert!(dry.contains("3 skipped"), "{dry}");
    for pos in ["0:1", "0:2", "0:3"] {
        assert!(dry.contains(&format!("would skip {pos} ")), "{pos}: {dry}");
    }

    let (code, out, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 1 record "), "{out}");
    assert!(out.contains("3 skipped"), "{out}");
    assert!(err.contains("skipped 0:1 "), "{err}");
    let after = cluster.read_all(TOPIC).await.unwrap();
    assert_eq!(after.len(), before + 1, "only the one with its original");
    let r = after.last().unwrap();
    assert_eq!(r.key.as_deref(), Some(&b"big-key"[..]));
    assert!(
        r.payload.as_deref() == Some(&big[..]),
        "the original payload"
    );
    assert_eq!(&r.headers[..2], &user[..], "the original user headers");
    assert_eq!(
        r.header_str("sidetrack-replayed-from"),
        Some("orders.billing.dlq:0:0")
    );
    assert!(
        after.iter().all(|r| r.payload.is_some()),
        "never a tombstone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_dead_letters_are_listed_shown_and_replayed_byte_for_byte() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 1).unwrap();
    let producer = cluster.producer().unwrap();
    let odd = Header::new(vec![0xc3, 0x28, b'-', 0xff], vec![0xfe, 0x00, 0x41]);
    let mut env = envelope(Reason::Permanent, (TOPIC, 0, 5));
    env.first_failure = i64::MIN;
    env.original_timestamp = Some(i64::MAX);
    env.due = Some(i64::MAX);
    dead_letter(
        &producer,
        Some(0),
        b"odd",
        Some(b"p"),
        std::slice::from_ref(&odd),
        &env,
    )
    .await;
    // DLQ records stamped at the ends of time.
    for ts in [i64::MIN, i64::MAX, -2] {
        let mut headers = vec![odd.clone()];
        headers.extend(envelope(Reason::Permanent, (TOPIC, 0, 6)).to_headers());
        let rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(DLQ)
            .partition(0)
            .key(&b"t"[..])
            .payload(&b"p"[..])
            .timestamp(ts)
            .headers(sidetrack::handler::rdkafka_headers(&headers));
        producer
            .send(rec, std::time::Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Envelopes naming topics no broker can have.
    for bad in ["", "no such/topic"] {
        let env = envelope(Reason::Permanent, (bad, 0, 7));
        dead_letter(&producer, Some(0), b"bad", Some(b"p"), &[], &env).await;
    }
    let rows = json_rows_on(&cluster, &[]);
    assert_eq!(rows.len(), 6);
    let (code, table, err) = run_on(&cluster, &["dlq", "list", "--topic", DLQ]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("0:3"), "{table}");
    for pos in ["0:0", "0:1", "0:2", "0:3"] {
        let (code, shown, err) = run_on(&cluster, &["dlq", "show", "--topic", DLQ, pos]);
        assert_eq!(code, 0, "{pos}: {err}");
        assert!(shown.contains(r"\xc3(-\xff"), "{shown}");
    }
    let (code, _, err) = run_on(&cluster, &["dlq", "list", "--topic", DLQ, "--since", "1h"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_on(&cluster, &["dlq", "replay", "--topic", DLQ, "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 4 records"), "{out}");
    assert!(out.contains("2 skipped"), "{out}");
    assert!(
        err.contains("skipped 0:4 its target `` is not a legal topic name"),
        "{err}"
    );
    assert!(
        err.contains("skipped 0:5 its target `no such/topic` is not a legal topic name"),
        "{err}"
    );
    let back = cluster.read_all(TOPIC).await.unwrap();
    assert_eq!(back.len(), 4);
    assert!(back.iter().all(|r| r.headers[0] == odd), "{back:?}");
}

/// What a terminal would obey, or a reader could not see: C0 controls but the newline ending
/// each line, DEL, C1 controls, U+FFFD (a non-UTF-8 byte shown as such, not as itself).
fn unsafe_chars(out: &str) -> Vec<char> {
    out.chars()
        .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{fffd}' || *c == '\u{202e}')
        .collect()
}

/// Issue 17: keys and errors reached the terminal raw. `dlq list` printed ESC/BEL sequences
/// (OSC 52 writes the clipboard, `ESC [2J` clears the screen), `dlq show` too, and a newline
/// in a key forged a `would send …` line in the replay dry run that on-call reads before
/// `--yes`. Now every record-derived byte is escaped by `sidetrack::escape` and capped with a
/// visible marker; `--format json` keeps the exact values with `\uXXXX` escapes.
async fn hostile_keys_and_errors_are_escaped_in_list_show_and_the_replay_dry_run(cluster: Env) {
    let (topic, dlq) = (cluster.topic().to_owned(), cluster.dlq());
    cluster.create_topic(&dlq, 1).await;
    let producer = cluster.producer();
    let osc52: &[u8] = b"\x1b]52;c;ZXZpbA==\x07";
    let forged: &[u8] = b"k\nwould send 0:99 -> payments[0] key=admin (permanent)";
    let not_utf8: &[u8] = b"n\xff\xfe";
    let csi8 = "c\u{9b}2J\u{202e}".as_bytes();
    let long = vec![b'L'; 10_000];
    let keys: [&[u8]; 5] = [osc52, forged, not_utf8, csi8, &long];
    let mut positions = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        // The runtime writes error texts on one line; another writer (or a forged record)
        // need not: the error header is written raw here.
        let error = match i {
            0 => "\x1b[2J\x1b[Hcleared\x1bc".to_owned(),
            4 => "E".repeat(100_000),
            _ => "rejected\r\nforged line".to_owned(),
        };
        let mut headers = envelope(Reason::Permanent, (&topic, 0, i as i64)).to_headers();
        for h in headers.iter_mut() {
            if h.is(sidetrack::retry::headers::ERROR) {
                h.value = Some(error.clone().into_bytes());
            }
        }
        let at = cluster
            .produce(&producer, &dlq, Some(0), Some(key), Some(b"p"), &headers)
            .await
            .unwrap();
        positions.push(format!("{}:{}", at.0, at.1));
    }

    let (code, table, err) = run(&cluster, &["dlq", "list", "--topic", &dlq]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(unsafe_chars(&table), vec![], "{table:?}");
    assert_eq!(
        table.lines().count(),
        1 + keys.len(),
        "one line per record:\n{table}"
    );
    for needle in [
        r"\x1b]52;c;ZXZpbA==\x07",
        r"\x1b[2J\x1b[Hcleared\x1bc",
        r"k\nwould send 0:99 -> payments[0] key=a…",
        r"n\xff\xfe",
        r"c\u{009b}2J\u{202e}",
        r"rejected\r\nforged line",
        &format!("{}…", "L".repeat(39)),
        &format!("{}…", "E".repeat(49)),
    ] {
        assert!(table.contains(needle), "missing `{needle}` in:\n{table}");
    }

    for (i, key_shown) in [
        r"\x1b]52;c;ZXZpbA==\x07".to_owned(),
        r"k\nwould send 0:99 -> payments[0] key=admin (permanent)".to_owned(),
        r"n\xff\xfe".to_owned(),
        r"c\u{009b}2J\u{202e}".to_owned(),
        format!("{}…[{} more bytes]", "L".repeat(2048), 10_000 - 2048),
    ]
    .iter()
    .enumerate()
    {
        let pos = &positions[i];
        let (code, shown, err) = run(&cluster, &["dlq", "show", "--topic", &dlq, pos]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(unsafe_chars(&shown), vec![], "{shown:?}");
        assert!(shown.contains(&format!("key: {key_shown}\n")), "{shown}");
        if i == 4 {
            let cut = format!("{}…[{} more bytes]", "E".repeat(2048), 100_000 - 2048);
            assert!(shown.contains(&cut), "a long error is capped visibly");
        }
    }

    // JSON: the same values, escaped so a terminal shows them instead of obeying them.
    let (code, json, err) = run(
        &cluster,
        &["dlq", "list", "--topic", &dlq, "--format", "json"],
    );
    assert_eq!(code, 0, "{err}");
    let printable: Vec<char> = unsafe_chars(&json)
        .into_iter()
        .filter(|c| *c != '\u{fffd}') // `key` is lossy UTF-8 by design; shown as a character
        .collect();
    assert_eq!(printable, vec![], "{json:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows[0]["key"], "\x1b]52;c;ZXZpbA==\x07");
    assert_eq!(rows[3]["key"], "c\u{9b}2J\u{202e}");

    let (code, out, err) = run(&cluster, &["dlq", "replay", "--topic", &dlq]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(unsafe_chars(&out), vec![], "{out:?}");
    let would: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("would send"))
        .collect();
    assert_eq!(would.len(), keys.len(), "a key cannot forge a line:\n{out}");
    assert!(
        would[1]
            .ends_with(r"key=k\nwould send 0:99 -> payments[0] key=admin (permanent) (permanent)"),
        "{out}"
    );
    assert!(!out.contains("\nwould send 0:99"), "{out}");
    assert_eq!(out.lines().count(), keys.len() + 1, "{out}");
}

/// Issue 17: `--rate 1e-20/s` passed the argument check, then the pacing interval overflowed
/// a `Duration` and the replay panicked (exit 101). The parser refuses it now (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_too_slow_to_pace_is_refused_by_the_argument_parser() {
    let cluster = cluster(1);
    cluster.create_topic(DLQ, 1).unwrap();
    for rate in ["1e-20/s", "1e-300", "0.0001/s"] {
        let (code, out, err) = run_on(
            &cluster,
            &["dlq", "replay", "--topic", DLQ, "--yes", "--rate", rate],
        );
        assert_eq!(code, 2, "{rate}: {out}{err}");
        assert!(err.contains("--rate"), "{err}");
        assert!(
            err.contains("too slow: the lowest rate is 0.001/s"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, out, err) = run_on(
        &cluster,
        &[
            "dlq", "replay", "--topic", DLQ, "--yes", "--rate", "0.001/s",
        ],
    );
    assert_eq!(code, 0, "the slowest rate accepted runs: {out}{err}");
}

async fn wait_for_async<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        sidetrack::testing::wait_until(WAIT, cond).await,
        "timed out waiting for: {what}"
    );
}

on_every_broker!(
    list_and_show_read_the_envelope_and_filters_select_exactly,
    1,
    list_and_show_read_the_envelope_and_filters_select_exactly
);
on_every_broker!(
    replay_writes_only_with_yes_exactly_once_and_the_runtime_handles_it,
    1,
    replay_writes_only_with_yes_exactly_once_and_the_runtime_handles_it
);
on_every_broker!(
    replay_to_first_retry_carries_a_fresh_envelope,
    1,
    replay_to_first_retry_carries_a_fresh_envelope
);
on_every_broker!(
    spring_dead_letters_and_records_without_envelope_are_shown,
    1,
    spring_dead_letters_and_records_without_envelope_are_shown
);
on_every_broker!(
    errors_have_clear_messages_and_exit_codes,
    1,
    errors_have_clear_messages_and_exit_codes
);
on_every_broker!(
    topology_creates_missing_topics_and_lag_reports_them,
    2,
    topology_creates_missing_topics_and_lag_reports_them
);
on_every_broker!(
    the_command_in_an_alert_lists_exactly_its_records,
    2,
    the_command_in_an_alert_lists_exactly_its_records
);
on_every_broker!(
    hostile_keys_and_errors_are_escaped_in_list_show_and_the_replay_dry_run,
    1,
    hostile_keys_and_errors_are_escaped_in_list_show_and_the_replay_dry_run
);
