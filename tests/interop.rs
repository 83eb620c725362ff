//! Interop with the Java ecosystem, with the real libraries: Spring Kafka's
//! `DeadLetterPublishingRecoverer` writes dead letters that `sidetrack dlq list/show/replay` read
//! and replay; a plain Java `KafkaConsumer` reads what `sidetrack proxy` produced and what the
//! runtime dead-lettered; Kafka's own `kafka-consumer-groups --describe` reports the offsets and
//! lag `sidetrack lag` reports.
//!
//! Needs Apache Kafka (`SIDETRACK_TEST_APACHE_KAFKA`) and the Java probe of `tests/interop`
//! (`mvn -B -q -f tests/interop/pom.xml package`, then `SIDETRACK_INTEROP_CLASSPATH` naming the
//! `target/classpath.txt` it writes; `.ci/run` does both). Without either variable every test
//! passes after printing why, and touches no network.
#![cfg(all(feature = "cli", feature = "proxy"))]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{sidetrack_cli, wait_for, within_limit, Backend, Env, Recorder, StartExt};
use serde::Deserialize;
use sidetrack::proxy::ProxyConfig;
use sidetrack::{HandlerError, Header};

/// The Java probe and the broker it talks to.
struct Java {
    classpath: String,
    bootstrap: String,
}

impl Java {
    /// The probe, or `None` (after printing why) when the broker or the probe is not
    /// configured. Reads only the environment and the classpath file: no network.
    fn get() -> Option<Java> {
        common::init_tracing();
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let Some(bootstrap) = var("SIDETRACK_TEST_APACHE_KAFKA") else {
            eprintln!("skipped: SIDETRACK_TEST_APACHE_KAFKA is not set (see .ci/run)");
            return None;
        };
        let Some(file) = var("SIDETRACK_INTEROP_CLASSPATH") else {
            eprintln!(
                "skipped: SIDETRACK_INTEROP_CLASSPATH is not set: build the Java probe with \
                 `mvn -B -q -f tests/interop/pom.xml package` and point it at \
                 tests/interop/target/classpath.txt (see .ci/run)"
            );
            return None;
        };
        // Set but wrong is a broken set-up, not a reason to pass.
        let file = PathBuf::from(file);
        let deps = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "SIDETRACK_INTEROP_CLASSPATH={}: {e}; build tests/interop first",
                file.display()
            )
        });
        let classes = file.parent().unwrap().join("classes");
        assert!(
            classes.join("dev/sidetrack/interop/Probe.class").exists(),
            "{} holds no compiled probe; build tests/interop first",
            classes.display()
        );
        Some(Java {
            classpath: format!("{}:{}", classes.display(), deps.trim()),
            bootstrap,
        })
    }

    /// Runs `class` with `args`; returns (exit code, stdout, stderr).
    async fn run(&self, class: &str, args: &[&str]) -> (i32, String, String) {
        let mut c = std::process::Command::new(
            std::env::var_os("JAVA_HOME")
                .map(|h| PathBuf::from(h).join("bin/java"))
                .unwrap_or_else(|| "java".into()),
        );
        c.arg("-cp")
            .arg(&self.classpath)
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
            .arg(class)
            .args(args);
        let out = tokio::task::spawn_blocking(move || c.output().expect("running java"))
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a probe subcommand that prints records; panics with its stderr if it fails.
    async fn records(&self, args: &[&str]) -> Vec<JRecord> {
        let (code, out, err) = self.run("dev.sidetrack.interop.Probe", args).await;
        assert_eq!(code, 0, "probe {args:?} failed:\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("probe output ({e}): {out}"))
    }

    /// Every committed record of `topic`, as a plain Java `KafkaConsumer` sees it.
    async fn consume(&self, topic: &str) -> Vec<JRecord> {
        self.records(&["consume", &self.bootstrap, topic, "read_committed"])
            .await
    }
}

/// A record as the Java client saw it (bytes as hex in the probe's output).
#[derive(Debug, Clone, Deserialize)]
struct JRecord {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp: i64,
    timestamp_type: String,
    key: Option<String>,
    value: Option<String>,
    headers: Vec<(String, Option<String>)>,
}

impl JRecord {
    fn key(&self) -> Option<Vec<u8>> {
        self.key.as_deref().map(unhex)
    }
    fn value(&self) -> Option<Vec<u8>> {
        self.value.as_deref().map(unhex)
    }
    /// Headers with their values decoded.
    fn headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.as_deref().map(unhex)))
            .collect()
    }
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.headers()
            .into_iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v)
    }
    fn header_str(&self, name: &str) -> String {
        String::from_utf8(
            self.header(name)
                .unwrap_or_else(|| panic!("no header {name}")),
        )
        .unwrap()
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs the `sidetrack` binary; returns (exit code, stdout, stderr).
fn sidetrack(bootstrap: &str, args: &[&str]) -> (i32, String, String) {
    sidetrack_cli(bootstrap, "10s", args)
}

fn ok(bootstrap: &str, args: &[&str]) -> String {
    let (code, out, err) = sidetrack(bootstrap, args);
    assert_eq!(code, 0, "sidetrack {args:?}: {err}");
    out
}

/// `sidetrack dlq list --format json`.
fn list_json(bootstrap: &str, dlq: &str) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(
        bootstrap,
        &["dlq", "list", "--topic", dlq, "--format", "json"],
    ))
    .unwrap()
}

/// The test's environment on Apache Kafka with the Java probe, or `None` after saying why.
async fn setup(topic: &str, group: &str, partitions: i32) -> Option<(Java, Env)> {
    let java = Java::get()?;
    let env = Env::on(Backend::ApacheKafka, topic, group, partitions).await?;
    Some((java, env))
}

/// Spring's `kafka_dlt-*` headers, as Spring Kafka 4.1 writes them (in this order, after the
/// original record's headers).
const SPRING_HEADERS: [&str; 10] = [
    "kafka_dlt-exception-fqcn",
    "kafka_dlt-exception-cause-fqcn",
    "kafka_dlt-exception-message",
    "kafka_dlt-exception-stacktrace",
    "kafka_dlt-original-topic",
    "kafka_dlt-original-partition",
    "kafka_dlt-original-offset",
    "kafka_dlt-original-timestamp",
    "kafka_dlt-original-timestamp-type",
    "kafka_dlt-original-consumer-group",
];

/// `sidetrack dlq list/show/replay` on dead letters written by Spring Kafka's real
/// `DeadLetterPublishingRecoverer` (KafkaTemplate over a DefaultKafkaProducerFactory), called by
/// a `DefaultErrorHandler` when the listener of a `KafkaMessageListenerContainer` throws, as in
/// a Spring application: a key that is not UTF-8, a null key, binary/empty/null/duplicate
/// headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spring_dead_letters_are_listed_shown_and_replayed() {
    let Some((java, env)) = setup("spring-orders", "spring-app", 2).await else {
        return;
    };
    within_limit(async {
        let b = env.bootstrap();
        let topic = env.topic().to_owned();
        // Spring's default destination: `<topic>-dlt`, same partition.
        let dlt = format!("{topic}-dlt");
        env.create_topic(&dlt, 2).await;
        let originals = java
            .records(&["spring-container", &b, &topic, env.group(), "p"])
            .await;
        assert_eq!(originals.len(), 3);

        // What Spring wrote, as the Java client reads it: the original's headers, then its own.
        let written = java.consume(&dlt).await;
        assert_eq!(written.len(), 3);
        for w in &written {
            let names: Vec<&str> = w.headers.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(&names[names.len() - SPRING_HEADERS.len()..], SPRING_HEADERS);
        }

        let rows = list_json(&b, &dlt);
        assert_eq!(rows.len(), 3, "{rows:?}");
        for (i, o) in originals.iter().enumerate() {
            let row = rows
                .iter()
                .find(|r| r["original_partition"] == o.partition && r["original_offset"] == o.offset)
                .unwrap_or_else(|| panic!("no row for {}[{}]@{}: {rows:?}", topic, o.partition, o.offset));
            assert_eq!(row["envelope"], "spring");
            assert_eq!(row["original_topic"], topic.as_str());
            assert_eq!(row["group"], env.group());
            assert_eq!(row["partition"], o.partition, "same partition on the DLT");
            // The root cause names what failed; Spring's wrapper says only that a listener did.
            assert_eq!(
                row["error"],
                format!("java.lang.IllegalStateException: Listener failed; declined #{} (p)", i + 1)
            );
            match o.key() {
                None => assert!(row["key"].is_null()),
                Some(k) => match String::from_utf8(k) {
                    Ok(text) => assert_eq!(row["key"], text.as_str()),
                    Err(_) => assert!(row["key"].is_string()),
                },
            }
        }
        // The table shows the odd key escaped, never its raw bytes (a NUL on a terminal).
        let table = ok(&b, &["dlq", "list", "--topic", &dlt]);
        assert!(table.contains(r"\xff\x00\xfek"), "{table}");
        assert!(!table.contains('\0') && !table.contains('\u{fffd}'), "{table:?}");
        for o in &originals {
            let at = format!("{topic}[{}]@{}", o.partition, o.offset);
            assert!(table.contains(&at), "{table}");
        }
        let by_error = |text: &str| {
            list_json(&b, &dlt)
                .into_iter()
                .filter(|r| {
                    r["error"]
                        .as_str()
                        .unwrap()
                        .to_lowercase()
                        .contains(&text.to_lowercase())
                })
                .count()
        };
        assert_eq!(by_error("IllegalStateException"), 3);
        let (code, out, _) = sidetrack(
            &b,
            &["dlq", "list", "--topic", &dlt, "--error-contains", "declined #2", "--format", "json"],
        );
        assert_eq!(code, 0);
        let picked: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        assert_eq!(picked.len(), 1);
        let second = &originals[1];
        assert_eq!(picked[0]["original_partition"], second.partition);
        assert_eq!(picked[0]["original_offset"], second.offset, "#2: the second consumed");

        // `show` on the odd-key record: Spring's headers read, the user's shown apart, escaped.
        // In the order consumed, which is also the order Spring numbered the failures in.
        let (n, odd) = originals
            .iter()
            .enumerate()
            .find(|(_, o)| o.key().is_some_and(|k| k.starts_with(b"\xff")))
            .unwrap();
        let w = written
            .iter()
            .find(|w| w.key() == odd.key() && w.partition == odd.partition)
            .unwrap();
        let shown = ok(&b, &["dlq", "show", "--topic", &dlt, &format!("{}:{}", w.partition, w.offset)]);
        for line in [
            "Spring Kafka dead letter (kafka_dlt-* headers):".to_owned(),
            "  exception          org.springframework.kafka.listener.ListenerExecutionFailedException".to_owned(),
            "  cause              java.lang.IllegalStateException".to_owned(),
            format!("  message            Listener failed; declined #{} (p)", n + 1),
            format!("  original topic     {topic}"),
            format!("  original partition {}", odd.partition),
            format!("  original offset    {}", odd.offset),
            format!("  group              {}", env.group()),
            "  timestamp type     CreateTime".to_owned(),
            "user headers (2):".to_owned(),
            "  trace              t-1".to_owned(),
            r"  bin                \x00\xff\x80".to_owned(),
            r"key: \xff\x00\xfek".to_owned(),
        ] {
            assert!(shown.lines().any(|l| l == line), "no line {line:?} in:\n{shown}");
        }
        assert!(
            shown.contains(&format!(
                "Caused by: java.lang.IllegalStateException: declined #{} (p)",
                n + 1
            )),
            "the stack trace is shown:\n{shown}"
        );
        let original_time = odd.timestamp;
        assert!(
            shown.contains(&format!(
                "  original time      {}",
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(original_time as u64)
                )
            )),
            "{shown}"
        );

        // Replay: each record back to its original topic and partition, key, value and the
        // original's headers byte for byte, Spring's own headers left behind.
        let out = ok(&b, &["dlq", "replay", "--topic", &dlt, "--yes"]);
        assert!(out.contains(&format!("replayed 3 records from `{dlt}` to {topic}")), "{out}");
        let back = java.consume(&topic).await;
        let replayed: Vec<&JRecord> = back
            .iter()
            .filter(|r| r.header("sidetrack-replayed-from").is_some())
            .collect();
        assert_eq!(replayed.len(), 3, "{back:?}");
        for o in &originals {
            let w = written
                .iter()
                .find(|w| {
                    w.header("kafka_dlt-original-offset") == Some(o.offset.to_be_bytes().to_vec())
                        && w.partition == o.partition
                })
                .unwrap();
            let from = format!("{dlt}:{}:{}", w.partition, w.offset);
            let r = replayed
                .iter()
                .find(|r| r.header_str("sidetrack-replayed-from") == from)
                .unwrap_or_else(|| panic!("{from} not replayed: {replayed:?}"));
            assert_eq!(r.partition, o.partition);
            assert_eq!(r.key(), o.key());
            assert_eq!(r.value(), o.value());
            let mut want = o.headers();
            let got = r.headers();
            want.extend(
                ["sidetrack-replay-id", "sidetrack-replayed-at", "sidetrack-replayed-from"]
                    .iter()
                    .map(|n| (n.to_string(), r.header(n))),
            );
            assert_eq!(got, want, "replayed {from}");
        }
        // Run again: nothing new.
        let out = ok(&b, &["dlq", "replay", "--topic", &dlt, "--yes"]);
        assert!(out.contains("replayed 0 records"), "{out}");
        assert_eq!(java.consume(&topic).await.len(), back.len());
    })
    .await
}

/// Dead letters written by Spring's recoverer inside Kafka transactions on `<topic>-dlt`: one
/// transaction that commits, then one that aborts. Returns the originals of each.
async fn spring_transactions(java: &Java, env: &Env) -> (String, Vec<JRecord>, Vec<JRecord>) {
    let b = env.bootstrap();
    let topic = env.topic().to_owned();
    let dlt = format!("{topic}-dlt");
    env.create_topic(&dlt, 2).await;
    let committed = java
        .records(&["spring-dlt", &b, &topic, env.group(), "tx-commit", "c"])
        .await;
    let aborted = java
        .records(&["spring-dlt", &b, &topic, env.group(), "tx-abort", "a"])
        .await;
    assert_eq!((committed.len(), aborted.len()), (3, 3));
    // The aborted dead letters are in the log; read_committed skips them.
    let all = java
        .records(&["consume", &b, &dlt, "read_uncommitted"])
        .await;
    assert_eq!(all.len(), 6);
    let visible = java.consume(&dlt).await;
    assert_eq!(visible.len(), 3);
    for v in &visible {
        let value = v.value().unwrap();
        assert!(
            value.starts_with(b"c: ") || value.ends_with(b"\"c\"}"),
            "from the aborted transaction: {v:?}"
        );
    }
    (dlt, committed, aborted)
}

/// Spring's recoverer inside a Kafka transaction that commits and one that aborts: `dlq show`
/// reads each committed dead letter where the Java client found it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spring_dead_letters_written_in_transactions_are_shown() {
    let Some((java, env)) = setup("spring-tx-show", "spring-tx-app", 2).await else {
        return;
    };
    within_limit(async {
        let b = env.bootstrap();
        let (dlt, committed, _) = spring_transactions(&java, &env).await;
        for w in java.consume(&dlt).await {
            let o = committed
                .iter()
                .find(|o| o.value() == w.value() && o.key() == w.key())
                .unwrap();
            let shown = ok(
                &b,
                &[
                    "dlq",
                    "show",
                    "--topic",
                    &dlt,
                    &format!("{}:{}", w.partition, w.offset),
                ],
            );
            assert!(shown.contains("Spring Kafka dead letter"), "{shown}");
            assert!(
                shown.contains(&format!("  original offset    {}\n", o.offset))
                    && shown.contains(&format!("  original partition {}\n", o.partition)),
                "{shown}"
            );
            assert!(shown.contains("(c)\n"), "{shown}");
        }
    })
    .await
}

/// The same, then `dlq list` and `dlq replay`: the committed dead letters are listed and
/// replayed; the aborted ones, still in the log, never. The DLT's partitions end in transaction
/// markers, which the CLI's reading loop once waited for as if they were records (`dlq list`
/// exited "reading records: no progress" on Apache Kafka 4.3.1 before the read_committed fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spring_dead_letters_written_in_transactions_are_listed_and_replayed() {
    let Some((java, env)) = setup("spring-tx", "spring-tx-app", 2).await else {
        return;
    };
    within_limit(async {
        let b = env.bootstrap();
        let topic = env.topic().to_owned();
        let (dlt, committed, aborted) = spring_transactions(&java, &env).await;
        let rows = list_json(&b, &dlt);
        let mut listed: Vec<(i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r["original_partition"].as_i64().unwrap(),
                    r["original_offset"].as_i64().unwrap(),
                )
            })
            .collect();
        listed.sort();
        let mut want: Vec<(i64, i64)> = committed
            .iter()
            .map(|o| (i64::from(o.partition), o.offset))
            .collect();
        want.sort();
        assert_eq!(
            listed, want,
            "only the committed transaction's dead letters"
        );
        for r in &rows {
            assert!(r["error"].as_str().unwrap().ends_with("(c)"), "{r}");
        }

        let before = java.consume(&topic).await.len();
        let out = ok(&b, &["dlq", "replay", "--topic", &dlt, "--yes"]);
        assert!(out.contains("replayed 3 records"), "{out}");
        let back = java.consume(&topic).await;
        assert_eq!(back.len(), before + 3);
        let values: Vec<Vec<u8>> = back[..]
            .iter()
            .filter(|r| r.header("sidetrack-replayed-from").is_some())
            .map(|r| r.value().unwrap())
            .collect();
        for o in &committed {
            assert!(values.contains(&o.value().unwrap()));
        }
        for o in &aborted {
            assert!(
                !values.contains(&o.value().unwrap()),
                "an aborted dead letter was replayed"
            );
        }
    })
    .await
}

/// A plain Java `KafkaConsumer` reads what `sidetrack proxy` produced: key, value, headers
/// (binary, empty, null, repeated) and an explicit timestamp, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_consumer_reads_what_the_proxy_produced() {
    use common::proxy::{b64, request, BINARY_V2};
    let Some((java, env)) = setup("proxied", "unused", 2).await else {
        return;
    };
    within_limit(async {
        let topic = env.topic().to_owned();
        let broker = common::proxy::Broker::Real(Backend::ApacheKafka, env.bootstrap());
        let proxy = broker.start(ProxyConfig::default()).await;
        let addr = proxy.local_addr();
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
        };

        // v2 binary: a key that is not UTF-8, a payload that is not either, headers.
        let key: &[u8] = b"\x00\xffkey\x80";
        let value: &[u8] = b"\xde\xad\xbe\xef\x00payload";
        let before = now();
        let body = serde_json::json!({"records": [
            {"key": b64(key), "value": b64(value), "partition": 1, "headers": [
                {"key": "trace", "value": b64(b"t-1")},
                {"key": "bin", "value": b64(b"\x00\xff\x80")},
                {"key": "empty", "value": b64(b"")},
                {"key": "none", "value": null},
                {"key": "dup", "value": b64(b"a")},
                {"key": "dup", "value": b64(b"b")},
            ]},
            {"value": b64(b"no key"), "partition": 0},
        ]});
        let a = request(
            addr,
            "POST",
            &format!("/topics/{topic}"),
            &[("content-type", BINARY_V2)],
            serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(a.status.as_u16(), 200, "{:?}", a.json());
        let after = now();
        let v2 = a.offsets();

        // v3: an explicit timestamp, to the millisecond.
        let cluster = proxy.cluster_id().to_owned();
        let v3 = serde_json::json!({"partition_id": 0,
            "key": {"type": "BINARY", "data": b64(b"\x01\x02")},
            "value": {"type": "BINARY", "data": b64(b"\xff\xfe")},
            "headers": [{"name": "h3", "value": b64(b"\x00x")}],
            "timestamp": "2026-01-02T03:04:05.678Z"});
        let a = request(
            addr,
            "POST",
            &format!("/v3/clusters/{cluster}/topics/{topic}/records"),
            &[("content-type", "application/json")],
            serde_json::to_vec(&v3).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(a.status.as_u16(), 200, "{:?}", a.json());
        let v3_at = (0, a.json()["offset"].as_i64().unwrap());
        proxy.shutdown().await;

        let got = java.consume(&topic).await;
        assert_eq!(got.len(), 3, "{got:?}");
        let at = |p: i32, o: i64| {
            got.iter()
                .find(|r| r.partition == p && r.offset == o)
                .unwrap_or_else(|| panic!("no record at {p}:{o}: {got:?}"))
        };
        let (p, o) = v2[0].unwrap();
        let r = at(p, o.unwrap());
        assert_eq!(r.key().as_deref(), Some(key));
        assert_eq!(r.value().as_deref(), Some(value));
        let s = |b: &[u8]| Some(b.to_vec());
        assert_eq!(
            r.headers(),
            vec![
                ("trace".to_owned(), s(b"t-1")),
                ("bin".to_owned(), s(b"\x00\xff\x80")),
                ("empty".to_owned(), s(b"")),
                ("none".to_owned(), None),
                ("dup".to_owned(), s(b"a")),
                ("dup".to_owned(), s(b"b")),
            ]
        );
        // Without a timestamp in the request: the time the proxy queued it, as CreateTime.
        assert_eq!(r.timestamp_type, "CreateTime");
        assert!(
            (before..=after).contains(&r.timestamp),
            "{} not in {before}..={after}",
            r.timestamp
        );
        let (p, o) = v2[1].unwrap();
        let r = at(p, o.unwrap());
        assert_eq!(r.key(), None);
        assert_eq!(r.value().as_deref(), Some(&b"no key"[..]));
        assert!(r.headers.is_empty(), "{:?}", r.headers);

        let r = at(v3_at.0, v3_at.1);
        assert_eq!(r.key().as_deref(), Some(&b"\x01\x02"[..]));
        assert_eq!(r.value().as_deref(), Some(&b"\xff\xfe"[..]));
        assert_eq!(r.headers(), vec![("h3".to_owned(), s(b"\x00x"))]);
        assert_eq!(
            (r.timestamp, r.timestamp_type.as_str()),
            (1_767_323_045_678, "CreateTime")
        );
        assert_eq!(r.topic, topic);
    })
    .await
}

/// A plain Java `KafkaConsumer` reads the runtime's dead letters: the user's headers as they
/// were, then the envelope, header by header as `src/retry/envelope.rs` documents it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_consumer_reads_the_runtimes_dead_letters() {
    let Some((java, env)) = setup("java-dl", "java-dl-app", 1).await else {
        return;
    };
    within_limit(async {
        let rt = env
            .builder(env.config())
            .handler(Recorder::new(|_| {
                Err(HandlerError::permanent(
                    "card declined: «ünïcödé» \"quoted\"",
                ))
            }))
            .started()
            .await;
        let producer = env.producer();
        let t0 = now_ms();
        let sent = [
            (
                Some(&b"k\xff1"[..]),
                &b"{\"amount\": -1}"[..],
                vec![
                    Header::new("trace", b"t-1".to_vec()),
                    Header::new("bin", b"\x00\xff".to_vec()),
                ],
            ),
            (None, &b"\x00\x01"[..], vec![]),
        ];
        let mut at = Vec::new();
        for (key, payload, headers) in &sent {
            at.push(
                env.produce(
                    &producer,
                    env.topic(),
                    Some(0),
                    *key,
                    Some(payload),
                    headers,
                )
                .await
                .unwrap(),
            );
        }
        wait_for("2 dead letters", || rt.stats().total_dead_lettered() == 2).await;
        rt.shutdown().await.unwrap();
        let t1 = now_ms();
        let originals = java.consume(env.topic()).await;

        let got = java.consume(&env.dlq()).await;
        assert_eq!(got.len(), 2, "{got:?}");
        for ((key, payload, headers), (p, o)) in sent.iter().zip(&at) {
            let original = originals.iter().find(|r| r.offset == *o).unwrap();
            let r = got
                .iter()
                .find(|r| r.header_str("sidetrack-original-offset") == o.to_string())
                .unwrap();
            assert_eq!(r.key().as_deref(), *key);
            assert_eq!(r.value().as_deref(), Some(*payload));
            assert_eq!(r.partition, *p, "the DLQ keeps the partition");
            let all = r.headers();
            let (user, envelope) = all.split_at(headers.len());
            let want_user: Vec<(String, Option<Vec<u8>>)> = headers
                .iter()
                .map(|h| (String::from_utf8(h.key.clone()).unwrap(), h.value.clone()))
                .collect();
            assert_eq!(user, &want_user[..]);
            let first_failure: i64 = r.header_str("sidetrack-first-failure").parse().unwrap();
            assert!(
                (t0..=t1).contains(&first_failure),
                "{first_failure} not in {t0}..={t1}"
            );
            let text = |s: &str| Some(s.as_bytes().to_vec());
            assert_eq!(
                envelope,
                &[
                    ("sidetrack-version".to_owned(), text("1")),
                    ("sidetrack-original-topic".to_owned(), text(env.topic())),
                    (
                        "sidetrack-original-partition".to_owned(),
                        text(&p.to_string())
                    ),
                    ("sidetrack-original-offset".to_owned(), text(&o.to_string())),
                    (
                        "sidetrack-original-timestamp".to_owned(),
                        text(&original.timestamp.to_string())
                    ),
                    ("sidetrack-group".to_owned(), text(env.group())),
                    ("sidetrack-attempts".to_owned(), text("1")),
                    (
                        "sidetrack-first-failure".to_owned(),
                        text(&first_failure.to_string())
                    ),
                    ("sidetrack-error-kind".to_owned(), text("permanent")),
                    (
                        "sidetrack-error".to_owned(),
                        text("card declined: «ünïcödé» \"quoted\"")
                    ),
                ][..],
                "envelope of {p}:{o}"
            );
        }
    })
    .await
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Rows of a table keyed by (topic, partition): (committed, end, lag), as text.
type Offsets = BTreeMap<(String, i32), (String, String, String)>;

/// `sidetrack lag` rows of `group` (TOPIC PARTITION GROUP COMMITTED END LAG).
fn sidetrack_lag(out: &str, group: &str) -> Offsets {
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6 && f[2] == group).then(|| {
                (
                    (f[0].to_owned(), f[1].parse().unwrap()),
                    (f[3].to_owned(), f[4].to_owned(), f[5].to_owned()),
                )
            })
        })
        .collect()
}

/// `kafka-consumer-groups --describe` rows (GROUP TOPIC PARTITION CURRENT-OFFSET
/// LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID).
fn kafka_describe(out: &str, group: &str) -> Offsets {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[0] == group).then(|| {
                (
                    (f[1].to_owned(), f[2].parse().unwrap()),
                    (f[3].to_owned(), f[4].to_owned(), f[5].to_owned()),
                )
            })
        })
        .collect()
}

/// Kafka's own `kafka-consumer-groups --describe` (ConsumerGroupCommand of kafka-tools 4.3.1)
/// and `sidetrack lag` agree on the committed offsets, end offsets and lag of the runtime's
/// main group and its retry group, partition by partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_consumer_groups_and_sidetrack_lag_agree() {
    let Some((java, env)) = setup("lagging", "lag-app", 2).await else {
        return;
    };
    within_limit(async {
        let b = env.bootstrap();
        // Payloads `retry:*` fail once (through the first retry tier), `twice:*` twice (both
        // attempts of tier 0), `perm:*` permanently; the rest succeed.
        let rt = env
            .builder(env.config())
            .handler(Recorder::new(|m| {
                let text = m.payload_str()?;
                let fails = match text.split(':').next() {
                    Some("retry") => 1,
                    Some("twice") => 2,
                    Some("perm") => return Err(HandlerError::permanent("no")),
                    _ => 0,
                };
                if m.attempt() <= fails {
                    Err(HandlerError::retryable("not yet"))
                } else {
                    Ok(())
                }
            }))
            .started()
            .await;
        let payloads: Vec<String> = (0..12)
            .map(|i| match i % 4 {
                0 => format!("retry:{i}"),
                1 => format!("twice:{i}"),
                2 => format!("perm:{i}"),
                _ => format!("ok:{i}"),
            })
            .collect();
        env.produce_all(&payloads, 2).await;
        // Every record done: 6 retried to succeed (3 after one failure, 3 after two), 3
        // dead-lettered, 3 at once.
        wait_for("every record handled", || {
            let s = rt.stats();
            s.handled == 9 && s.total_dead_lettered() == 3
        })
        .await;
        rt.shutdown().await.unwrap();

        // Lag to report: records no one has consumed, on the source and on a retry tier.
        let tier = env.retry("200ms");
        let producer = env.producer();
        for (topic, partition, n) in [(env.topic().to_owned(), 0, 3), (tier.clone(), 1, 2)] {
            for i in 0..n {
                env.produce(
                    &producer,
                    &topic,
                    Some(partition),
                    None,
                    Some(format!("late {i}").as_bytes()),
                    &[],
                )
                .await
                .unwrap();
            }
        }

        let ours = ok(&b, &["lag", "--group", env.group(), "--topic", env.topic()]);
        let retry_group = format!("{}.retry", env.group());
        for group in [env.group(), retry_group.as_str()] {
            let (code, out, err) = java
                .run(
                    "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
                    &["--bootstrap-server", &b, "--describe", "--group", group],
                )
                .await;
            assert_eq!(code, 0, "kafka-consumer-groups: {err}");
            let theirs = kafka_describe(&out, group);
            let mine: Offsets = sidetrack_lag(&ours, group)
                .into_iter()
                .filter(|(_, (committed, _, _))| committed != "-")
                .collect();
            assert!(
                !theirs.is_empty(),
                "kafka-consumer-groups shows no offsets for {group}:\n{out}"
            );
            assert_eq!(
                mine, theirs,
                "group {group}\nsidetrack lag:\n{ours}\nkafka-consumer-groups:\n{out}"
            );
        }
        // Both groups committed, on the source and on the retry tiers, with lag where it was made.
        let main = sidetrack_lag(&ours, env.group());
        assert_eq!(main[&(env.topic().to_owned(), 0)].2, "3", "{ours}");
        assert_eq!(main[&(env.topic().to_owned(), 1)].2, "0", "{ours}");
        let retry = sidetrack_lag(&ours, &retry_group);
        assert_eq!(retry[&(tier.clone(), 1)].2, "2", "{ours}");
        assert!(
            retry
                .values()
                .any(|(c, _, _)| c.parse::<i64>().is_ok_and(|c| c > 0)),
            "the retry group committed: {ours}"
        );
    })
    .await
}
