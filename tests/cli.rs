//! The `sidetrack` binary on the embedded broker and, when configured, on a real broker and on
//! kfake (`on_every_broker!`): the CLI's admin and offset-by-time paths only run on those.
#![cfg(feature = "cli")]

mod common;

use std::collections::HashSet;

use assert_cmd::Command;
use common::*;
use sidetrack::{HandlerError, Header};

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
    // record per batch there, as the README tells Tansu users to.
    if matches!(cluster.broker, Broker::Real(_)) && args.starts_with(&["dlq", "replay"]) {
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
    assert_eq!(env.error_kind.as_str(), "retryable");
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
    let alert = collect.0.lock().unwrap()[0].clone();
    assert_eq!(alert.count, 7);
    let words: Vec<&str> = alert.inspect_command.split_whitespace().collect();
    assert_eq!(words[0], "sidetrack");
    let mut args: Vec<&str> = words[1..].to_vec();
    args.extend(["--format", "json"]);
    let out = Command::cargo_bin("sidetrack")
        .unwrap()
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 7, "{}", alert.inspect_command);
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
