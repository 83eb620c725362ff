//! The no-loss ledger: worker processes (this test binary re-run in worker mode) are killed
//! with SIGKILL at random points, a second instance joins and leaves, and the embedded broker
//! injects faults; at the end every record is in the success ledger or the DLQ, the DLQ holds
//! exactly the records that should be there, and the duplicates are printed next to the records
//! each killed process had handled without a committed offset.
//!
//! Each ledger runs on the embedded broker (with its injected faults) and, without them (an
//! external broker cannot be told to fail), on Apache Kafka at `SIDETRACK_TEST_APACHE_KAFKA`,
//! on Tansu at `SIDETRACK_TEST_TANSU` and on kfake at `SIDETRACK_TEST_KFAKE`: the kills and rebalances against real group and offset
//! handling. kfake as vendored never expires a member killed while its join is waiting in the
//! broker (its partitions then wait for the next rebalance to time out on it); `.ci/run`
//! builds it with `.ci/kfake-expire-parked-members.patch`. Tansu 0.6's group coordinator is
//! not faithful enough for the duplicate bound (see `ledger`), so on Tansu the ledger asserts no loss and the exact DLQ, and prints the duplicates next to the bound.
//!
//! Size and seed: `SIDETRACK_LEDGER_RECORDS` (default 4000) and `SIDETRACK_LEDGER_SEED`.
//!
//! `replication_faults_lose_nothing_on_three_brokers` runs the same workers and assertions on
//! a three-broker Apache Kafka cluster (`SIDETRACK_TEST_KAFKA_CLUSTER`,
//! `SIDETRACK_TEST_KAFKA_CLUSTER_DIR`) while partition leaders are SIGKILLed and the group's
//! coordinator is SIGSTOPped; see there.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sidetrack::config::RetryConfig;
use sidetrack::{Context, Handler, HandlerError, Message, Runtime, Tier};

const PARTITIONS: i32 = 4;
/// Handler time per record: keeps the run long enough to crash in the middle of it.
const WORK: Duration = Duration::from_millis(4);
/// Offsets are committed this often in the workers; it bounds the duplicates per crash.
const COMMIT_INTERVAL_MS: u64 = 100;

/// What the handler does with record `id` (deterministic from the seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Ok,
    /// Fails (retryable) on its first `n` attempts. With 2 retries, n = 3 is exhausted.
    Transient(u32),
    Permanent,
    /// Produced as invalid JSON.
    Undecodable,
}

fn fate(seed: u64, id: u64) -> Fate {
    let mut x = seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    match x % 1000 {
        0..=49 => Fate::Transient(1 + (x / 1000 % 3) as u32),
        50..=59 => Fate::Permanent,
        60..=69 => Fate::Undecodable,
        _ => Fate::Ok,
    }
}

fn expected_in_dlq(f: Fate) -> bool {
    matches!(f, Fate::Permanent | Fate::Undecodable | Fate::Transient(3))
}

fn retry_config() -> RetryConfig {
    RetryConfig::tiers([
        Tier::new(Duration::from_millis(100), 1),
        Tier::new(Duration::from_millis(200), 1),
    ])
}

// ---------------------------------------------------------------- worker process side

struct LedgerHandler {
    seed: u64,
    /// Every record succeeds (the shutdown test).
    healthy: bool,
    instance: String,
    ledger: std::sync::Mutex<std::fs::File>,
    /// Every handler call, whatever its outcome (`LW_CALLS`; not synced): where the record
    /// was read from and when. The replication ledger's measure of progress per partition.
    calls: Option<std::sync::Mutex<std::fs::File>>,
}

#[derive(serde::Deserialize)]
struct Rec {
    id: u64,
}

impl Handler for LedgerHandler {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        if let Some(calls) = &self.calls {
            let (rtopic, rpart, roff) = msg.received_from();
            let line = format!("{rtopic} {rpart} {roff} {}\n", now_ms());
            calls.lock().unwrap().write_all(line.as_bytes())?;
        }
        let rec: Rec = msg.json()?;
        tokio::time::sleep(WORK).await;
        let fate = if self.healthy {
            Fate::Ok
        } else {
            fate(self.seed, rec.id)
        };
        match fate {
            Fate::Permanent => return Err(HandlerError::permanent("permanently rejected")),
            Fate::Transient(n) if msg.attempt() <= n => {
                return Err(HandlerError::retryable("transient failure"))
            }
            _ => {}
        }
        let (rtopic, rpart, roff) = msg.received_from();
        let line = format!(
            "{} {} {} {} {rtopic} {rpart} {roff}\n",
            rec.id,
            self.instance,
            msg.attempt(),
            now_ms()
        );
        let mut f = self.ledger.lock().unwrap();
        // One write per line (O_APPEND) and an fsync: a success is durable before we return.
        f.write_all(line.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Entry point of the worker processes; the parent runs it with `--ignored --exact`.
#[test]
#[ignore = "entry point of the worker processes spawned by the ledger tests"]
fn ledger_worker() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    // A worker outlives its test process if that one dies (an abort, a kill): watch the parent
    // and leave with it.
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(3);
        }
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        if let Ok(path) = std::env::var("LW_LOGFILE") {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    // Lost partitions and failed commits on revocation are warnings with the
                    // records that were not committed, revocations with hand-offs waiting are
                    // info lines with the records not stored: the test adds them up for the
                    // bound.
                    std::env::var("LW_LOG").unwrap_or_else(|_| {
                        "warn,sidetrack::runtime::group=info,sidetrack::runtime::consumer=info"
                            .into()
                    }),
                ))
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init();
        } else {
            init_tracing();
        }
        let mut config = config_for(&var("LW_TOPIC"), &var("LW_GROUP"));
        config.brokers = var("LW_BROKERS");
        config.retry = retry_config();
        config.shutdown_timeout = Duration::from_secs(5);
        // The replication ledger lets the runtime create its retry and dead-letter topics (with
        // the broker's default replication factor); the others create them up front.
        config.provisioning.auto_create = std::env::var("LW_AUTO_CREATE").is_ok();
        match std::env::var("LW_ORDERING").as_deref() {
            Ok("key") => config.ordering = sidetrack::config::Ordering::Key,
            Ok("key-keep") => {
                config.ordering = sidetrack::config::Ordering::Key;
                config.retry.keep_key_order = true;
            }
            _ => {}
        }
        // The group's rebalance timeout (librdkafka's `max.poll.interval.ms`, 60 s by
        // default here): a worker killed while its join waits at the coordinator holds every
        // later rebalance that long, on Kafka as on kfake. 15 s keeps each such kill within
        // the test's wait; the mechanism is the same. Not on the embedded broker: librdkafka
        // re-sends a JoinGroup that took longer than this + 3 s, and the mock aborts the whole
        // test process on a second JoinGroup from a member whose first is still pending
        // (`rd_kafka_mock_cgrp_classic_member_add: Assertion '!member->resp'`, seen once).
        if var("LW_BACKEND") != "embedded" {
            config
                .consumer
                .insert("max.poll.interval.ms".into(), "15000".into());
        }
        if let Ok(debug) = std::env::var("LEDGER_RDKAFKA_DEBUG") {
            // librdkafka's own debug contexts (e.g. `cgrp`) in the worker logs.
            config.consumer.insert("debug".into(), debug);
        }
        match var("LW_BACKEND").as_str() {
            // The workers reach the embedded broker by its address, not through
            // `RuntimeBuilder::embedded`, so they set what it sets: the mock broker does not
            // check idempotent sequence numbers, and with several produce requests in flight a
            // failed batch can be acknowledged implicitly by a later one and be in no log (a
            // record lost here that Kafka would have kept). One request at a time keeps it
            // honest.
            "embedded" => {
                config
                    .producer
                    .insert("max.in.flight.requests.per.connection".into(), "1".into());
            }
            // What `Env::builder` sets for Tansu (see there): a slower group, a late producer
            // id, one record per batch.
            "tansu" => {
                config.provisioning.timeout = Duration::from_secs(30);
                config.handoff.timeout = Duration::from_secs(5);
                config
                    .producer
                    .insert("batch.num.messages".into(), "1".into());
            }
            _ => {}
        }
        config.consumer.insert(
            "auto.commit.interval.ms".into(),
            COMMIT_INTERVAL_MS.to_string(),
        );
        let ledger = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(var("LW_LEDGER"))
            .unwrap();
        let handler = LedgerHandler {
            seed: var("LW_SEED").parse().unwrap(),
            healthy: std::env::var("LW_HEALTHY").is_ok(),
            instance: var("LW_INSTANCE"),
            ledger: std::sync::Mutex::new(ledger),
            calls: std::env::var("LW_CALLS").ok().map(|path| {
                std::sync::Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .unwrap(),
                )
            }),
        };
        Runtime::builder(config)
            .handler(handler)
            .shutdown_signal(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .unwrap();
                term.recv().await;
            })
            .build()
            .unwrap()
            .run()
            .await
            .unwrap();
    });
}

// ---------------------------------------------------------------- test side

struct Run {
    dir: tempfile::TempDir,
    backend: Backend,
    brokers: String,
    /// The source topic and group (unique per test on an external broker).
    topic: String,
    group: String,
    seed: u64,
    healthy: bool,
    /// `key` runs the workers with `ordering = "key"` (every record has a key of its own, so
    /// up to `max_in_flight` records per partition are in handler calls at once).
    ordering: &'static str,
    /// The workers create the retry and dead-letter topics (`provisioning.auto_create`).
    auto_create: bool,
    /// The workers' log filter, when not the default one.
    log: Option<&'static str>,
    /// The workers write every handler call to `calls` (see [`LedgerHandler::calls`]).
    calls: bool,
}

impl Run {
    fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger")
    }

    /// The records every worker reported as handled but not committed when it lost a
    /// partition, when the commit sent on a revocation failed, or behind hand-offs still
    /// waiting at a revocation (`uncommitted=N`).
    fn uncommitted_at_revocations(&self) -> usize {
        self.worker_logs()
            .iter()
            .flat_map(|text| text.lines())
            .filter(|l| l.contains("will be handled again"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("uncommitted="))
                    .and_then(|n| n.parse::<usize>().ok())
            })
            .sum()
    }

    /// The text of every worker's log file (`*.log` in the run's folder).
    fn worker_logs(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    /// Hand-offs the workers sent again after a failed attempt (`hand-off failed` warnings).
    fn handoffs_resent(&self) -> usize {
        self.worker_logs()
            .iter()
            .flat_map(|text| text.lines())
            .filter(|l| l.contains("hand-off failed; partition paused, retrying"))
            .count()
    }

    fn spawn(&self, instance: &str) -> Worker {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        if self.healthy {
            cmd.env("LW_HEALTHY", "1");
        }
        if self.auto_create {
            cmd.env("LW_AUTO_CREATE", "1");
        }
        if let Some(filter) = self.log {
            cmd.env("LW_LOG", filter);
        }
        if self.calls {
            cmd.env("LW_CALLS", self.dir.path().join("calls"));
        }
        cmd.args([
            "--ignored",
            "--exact",
            "ledger_worker",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("LW_BROKERS", &self.brokers)
        .env("LW_BACKEND", self.backend.name())
        .env("LW_TOPIC", &self.topic)
        .env("LW_GROUP", &self.group)
        .env("LW_LEDGER", self.ledger())
        .env("LW_SEED", self.seed.to_string())
        .env("LW_INSTANCE", instance)
        .env("LW_ORDERING", self.ordering)
        .env(
            "LW_LOGFILE",
            self.dir.path().join(format!("{instance}.log")),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(|c| Worker(c, instance.to_owned()))
        .unwrap()
    }
}

/// A worker process and its instance name, killed if the test ends (or panics) while it
/// still runs.
struct Worker(Child, String);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One ledger line: id, instance, attempt, time, and where the record was read from.
type Line = (u64, String, u32, u128, (String, i32, i64));

fn read_ledger(path: &Path) -> Vec<Line> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            Some((
                w.next()?.parse().ok()?,
                w.next()?.to_owned(),
                w.next()?.parse().ok()?,
                w.next()?.parse().ok()?,
                (
                    w.next()?.to_owned(),
                    w.next()?.parse().ok()?,
                    w.next()?.parse().ok()?,
                ),
            ))
        })
        .collect()
}

/// Records the killed incarnation took past the committed offset, per partition: from the
/// committed offset up to the last record it wrote to the ledger there. Handed-off records in
/// between count too (the next owner hands them off again, and a second copy on a retry topic
/// is a second success later). Exactly what a crash may hand to the next owner again.
async fn uncommitted_at_kill(env: &Env, ledger: &[Line], incarnation: &str) -> usize {
    let mut last: HashMap<(String, i32), i64> = HashMap::new();
    for l in ledger.iter().filter(|l| l.1 == incarnation) {
        let (t, p, o) = &l.4;
        let e = last.entry((t.clone(), *p)).or_insert(*o);
        *e = (*e).max(*o);
    }
    let mut n = 0;
    for ((t, p), o) in last {
        let group = if t == env.topic() {
            env.group().to_owned()
        } else {
            format!("{}.retry", env.group())
        };
        let committed = env.committed_offset(&group, &t, p).await;
        let first_uncommitted = committed.unwrap_or(0);
        n += (o + 1 - first_uncommitted).max(0) as usize;
    }
    n
}

/// `keep_key_order`: the events of the key-order logs past their committed position (held
/// records, and their markers) — each held record among them may be run again by the next
/// owner, so they join the duplicate bound beside the source's uncommitted records.
async fn log_uncommitted(env: &Env) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = sidetrack::retry::key_order_topic(env.topic(), env.group());
    let group = format!("{}.key-order", env.group());
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", env.bootstrap())
        .set("group.id", format!("{group}-watermarks"))
        .create()
        .unwrap();
    let mut n = 0;
    for p in 0..PARTITIONS {
        let Ok((low, high)) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)) else {
            continue;
        };
        // A broker may answer a group that never committed as unknown (kfake): nothing
        // committed, then.
        let committed = sidetrack::testing::committed_offset(&env.bootstrap(), &group, &topic, p)
            .await
            .ok()
            .flatten()
            .unwrap_or(low);
        n += (high - committed.max(low)).max(0) as usize;
    }
    n
}

/// Fails the test (with the end of its log) if worker `name` is no longer running: the
/// runtime must never exit on its own.
fn assert_alive(run: &Run, w: &mut Worker) {
    if let Some(status) = w.0.try_wait().unwrap() {
        let name = &w.1;
        let log =
            std::fs::read_to_string(run.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "worker {name} exited on its own ({status}); its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

fn sigkill(w: &mut Worker) {
    w.0.kill().unwrap();
    w.0.wait().unwrap();
}

fn sigterm(w: &mut Worker) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &w.0.id().to_string()])
        .status()
        .unwrap();
    w.0.wait().unwrap()
}

/// Topics created up front: the workers cannot create topics on the embedded broker. `None`
/// (after printing why) when `backend` is not configured.
async fn prepare(backend: Backend) -> Option<(Env, Run)> {
    let env = Env::on(backend, TOPIC, GROUP, PARTITIONS).await?;
    for t in [env.retry("100ms"), env.retry("200ms"), env.dlq()] {
        env.create_topic(&t, PARTITIONS).await;
    }
    let seed = std::env::var("SIDETRACK_LEDGER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let run = Run {
        dir: tempfile::tempdir().unwrap(),
        backend,
        brokers: env.bootstrap(),
        topic: env.topic().to_owned(),
        group: env.group().to_owned(),
        seed,
        healthy: false,
        ordering: "partition",
        auto_create: false,
        log: None,
        calls: false,
    };
    Some((env, run))
}

/// The id of a record (a dead letter): its key, or, where records share keys
/// (`keep_key_order`), the number after `"id": ` in its payload (undecodable ones included).
fn id_of(r: &sidetrack::testing::Record) -> Option<u64> {
    if let Some(id) = r
        .key
        .as_deref()
        .and_then(|k| String::from_utf8_lossy(k).parse().ok())
    {
        return Some(id);
    }
    let payload = String::from_utf8_lossy(r.payload.as_deref()?).into_owned();
    let rest = payload.split("\"id\":").nth(1)?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Keys shared by many records in the `key-keep` ledger (`keep_key_order`): id % this.
const SHARED_KEYS: u64 = 64;

/// The key of record `id`: its id, or in the `key-keep` ledger one of [`SHARED_KEYS`] keys.
fn key_of(id: u64, shared: bool) -> String {
    if shared {
        format!("k{}", id % SHARED_KEYS)
    } else {
        id.to_string()
    }
}

async fn produce_ids(env: &Env, n: u64, seed: Option<u64>) {
    produce_ids_keyed(env, n, seed, false).await
}

async fn produce_ids_keyed(env: &Env, n: u64, seed: Option<u64>, shared_keys: bool) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", env.bootstrap());
    if matches!(env.broker, Broker::Tansu(_)) {
        // Tansu 0.6 cannot fetch from the middle of a multi-record batch.
        config.set("batch.num.messages", "1");
    } else {
        config.set("compression.type", "lz4");
    }
    let producer: FutureProducer = config.create().unwrap();
    let mut pending = Vec::new();
    for id in 0..n {
        let key = key_of(id, shared_keys);
        let payload = match seed.map(|s| fate(s, id)) {
            Some(Fate::Undecodable) => format!("{{\"id\": {id}, "),
            _ => format!("{{\"id\": {id}}}"),
        };
        let rec = FutureRecord::to(env.topic())
            .key(&key)
            .payload(&payload)
            .partition((id % PARTITIONS as u64) as i32);
        pending.push(producer.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
}

/// With `LEDGER_KEEP_LOGS`: copies the workers' logs and the ledger there, one folder per test
/// (they run at once).
fn keep_logs(run: &Run) {
    if let Ok(keep) = std::env::var("LEDGER_KEEP_LOGS") {
        let keep = Path::new(&keep).join(format!("{:?}-{}", run.backend, run.ordering));
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(run.dir.path()).unwrap().flatten() {
            let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
        }
    }
}

/// Waits until the main group's committed offset moved on every partition that is not done.
async fn commits_resumed(env: &Env, run: &Run) {
    let mut before = HashMap::new();
    for p in 0..PARTITIONS {
        before.insert(p, env.committed_offset(env.group(), env.topic(), p).await);
    }
    let ok = sidetrack::testing::wait_until(Duration::from_secs(60), || {
        let before = before.clone();
        async move {
            let mut all = true;
            for p in 0..PARTITIONS {
                let now = env.committed_offset(env.group(), env.topic(), p).await;
                let end = env
                    .read_all(env.topic())
                    .await
                    .iter()
                    .filter(|r| r.partition == p)
                    .count() as i64;
                let done = now.is_some_and(|o| o >= end);
                all &= done || now > before[&p];
            }
            all
        }
    })
    .await;
    if !ok {
        keep_logs(run);
    }
    assert!(ok, "offset commits did not resume after the faults");
}

// One ledger per back end (`on_every_broker!`): `NAME::embedded` with injected broker faults;
// `NAME::apache_kafka`, `NAME::tansu` and `NAME::kfake` with crashes and rebalances only (each
// passes after printing why when its variable is unset). No `within_limit`: a ledger runs
// longer than a scenario may.
on_every_broker!(
    nothing_is_lost_across_crashes_rebalances_and_broker_faults,
    |backend| ledger(backend, "partition")
);
// The same ledger with `ordering = "key"`: many records per partition in handler calls at
// once, finishing out of order, across the same crashes, rebalances and faults.
on_every_broker!(nothing_is_lost_in_key_ordering, |backend| ledger(
    backend, "key"
));

// The same ledger with `ordering = "key"` and `[retry] keep_key_order = true`, records sharing
// 64 keys: a failing record's key waits (its later records held in the key-order log) across
// the same kills, rebalances and faults. Also asserted: per key, the first successful
// handlings are in offset order.
on_every_broker!(
    nothing_is_lost_and_key_order_kept_with_keep_key_order,
    |backend| ledger(backend, "key-keep")
);

async fn ledger(backend: Backend, ordering: &'static str) {
    let n: u64 = std::env::var("SIDETRACK_LEDGER_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let Some((env, mut run)) = prepare(backend).await else {
        return;
    };
    run.ordering = ordering;
    let keep = ordering == "key-keep";
    if keep && std::env::var("LEDGER_KEY_ORDER_DEBUG").is_ok() {
        run.log = Some("warn,sidetrack::runtime::group=info,sidetrack::runtime::consumer=info,sidetrack::runtime::partition::key_order=debug,sidetrack::key_order=debug");
    }
    if keep {
        env.create_topic(
            &sidetrack::retry::key_order_topic(env.topic(), env.group()),
            PARTITIONS,
        )
        .await;
    }
    produce_ids_keyed(&env, n, Some(run.seed), keep).await;
    let (expected_ok, _) = expected(run.seed, n);

    // Crash points: random fractions of the successes, from the seed.
    let mut rng = fastrand::Rng::with_seed(run.seed);
    let mut points: Vec<f64> = (0..3)
        .map(|i| 0.1 + 0.25 * i as f64 + rng.f64() * 0.15)
        .collect();
    points.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let started = Instant::now();
    let mut incarnation = 1;
    let mut a = run.spawn("a1");
    let mut uncommitted = Vec::new();
    let mut b: Option<Worker> = None;
    let mut crashes = 0;
    let mut faults = Vec::new();
    let ok_count = |run: &Run| read_ledger(&run.ledger()).len() as f64 / expected_ok.len() as f64;
    for (i, point) in points.iter().enumerate() {
        assert!(
            sidetrack::testing::wait_until(Duration::from_secs(120), || std::future::ready(
                ok_count(&run) >= *point
            ))
            .await,
            "no progress to {point:.2} (ledger {:.2})",
            ok_count(&run)
        );
        if matches!(backend, Backend::Tansu | Backend::Embedded) {
            // Tansu 0.6 (CI's real broker) cannot survive a member killed during its first
            // join: it keeps the dead member as the group's leader, answers the others'
            // SyncGroup at once with an empty assignment and never rebalances again, so
            // every partition of that group stays unowned while the survivors heartbeat
            // happily (seen in 3 of 4 runs of seed 11 with all ledgers at once). Kafka makes
            // the followers wait for the leader and drops it after the rebalance timeout;
            // kills during a join are exercised on Apache Kafka and kfake.
            // The embedded broker survives it but can take the whole test process down:
            // the others' JoinGroup waits for the dead member up to the rebalance timeout
            // (60 s), librdkafka sends it again 3 s after that, and on a loaded machine the
            // mock's answer slips past those 3 s and it aborts on the second JoinGroup
            // (`rd_kafka_mock_cgrp_classic_member_add: Assertion '!member->resp'`, seen twice
            // in about 150 runs with 5 ledgers and 2 CPU burners on 2 cores).
            let log = run.dir.path().join(format!("a{incarnation}.log"));
            let joined = sidetrack::testing::wait_until(Duration::from_secs(60), || {
                std::future::ready(std::fs::read_to_string(&log).is_ok_and(|s| {
                    s.contains("partition assigned role=Main")
                        && s.contains("partition assigned role=Retry")
                }))
            })
            .await;
            if !joined {
                keep_logs(&run);
            }
            assert!(joined, "a{incarnation} did not join both groups in 60 s");
        }
        assert_alive(&run, &mut a);
        sigkill(&mut a);
        crashes += 1;
        let log = if keep { log_uncommitted(&env).await } else { 0 };
        uncommitted.push(
            uncommitted_at_kill(
                &env,
                &read_ledger(&run.ledger()),
                &format!("a{incarnation}"),
            )
            .await
                + log,
        );
        incarnation += 1;
        a = run.spawn(&format!("a{incarnation}"));
        // Broker faults can only be injected into the embedded broker.
        let cluster = match &env.broker {
            Broker::Embedded(c) => Some(c),
            _ => None,
        };
        match (i, cluster) {
            (0, _) => {
                if let Some(cluster) = cluster {
                    // Hand-offs to retry/DLQ topics fail for a while.
                    cluster.fail_requests(
                        RDKafkaApiKey::Produce,
                        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 30],
                    );
                    faults.push("30 produce errors");
                }
                b = Some(run.spawn("b"));
                faults.push("instance b joins");
            }
            (1, None) => {}
            (1, Some(cluster)) => {
                // Commits fail, then the broker stalls for 2 s (every answer 2 s late: hand-offs
                // time out and are retried, commits and fetches wait). Not `broker_down`: the
                // mock re-binds its listener when it comes back and aborts the whole test
                // process when that fails, which happened here on a loaded machine. Nothing is
                // killed until commits work again: the duplicate bound is about crashes (see
                // docs/guarantees.md).
                cluster.fail_requests(
                    RDKafkaApiKey::OffsetCommit,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10],
                );
                faults.push("10 offset-commit errors");
                cluster.set_broker_rtt(1, Duration::from_secs(2)).unwrap();
                // The fault's length, not a synchronisation: the broker is slow this long.
                tokio::time::sleep(Duration::from_secs(2)).await;
                cluster.set_broker_rtt(1, Duration::ZERO).unwrap();
                faults.push("broker stalled 2 s");
                commits_resumed(&env, &run).await;
            }
            _ => {
                if let Some(mut bb) = b.take() {
                    let status = sigterm(&mut bb);
                    assert!(
                        status.success(),
                        "instance b did not stop cleanly: {status}"
                    );
                    faults.push("instance b leaves");
                }
            }
        }
    }
    let settled = settle(&env, &run, n, a, b).await;
    let extra = if keep {
        key_order_kept(&settled.lines)
    } else {
        String::new()
    };
    check(
        &run,
        &settled,
        &Crashes {
            crashes,
            uncommitted,
            faults,
        },
        started,
        &extra,
    );
}

/// `keep_key_order`: per key, the ids in the order of their first successful handling (the
/// ledger's line order) are increasing. Returns the figures for the ledger's line.
fn key_order_kept(lines: &[Line]) -> String {
    let mut seen = HashSet::new();
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut out_of_order = Vec::new();
    for l in lines {
        if !seen.insert(l.0) {
            continue;
        }
        let key = l.0 % SHARED_KEYS;
        if let Some(prev) = last.insert(key, l.0) {
            if prev > l.0 {
                out_of_order.push((key, prev, l.0));
            }
        }
    }
    assert!(
        out_of_order.is_empty(),
        "first successful handlings out of key order (key, earlier handled, later id): {out_of_order:?}"
    );
    format!(" key-order: {SHARED_KEYS} keys, first handlings in order")
}

/// The ids that must end in the success ledger and the ids that must end in the DLQ, of a
/// run of `n` records with `seed`.
fn expected(seed: u64, n: u64) -> (HashSet<u64>, HashSet<u64>) {
    (0..n).partition(|id| !expected_in_dlq(fate(seed, *id)))
}

/// The crashes of a run and the faults injected, for [`check`].
struct Crashes {
    crashes: usize,
    /// Records past the committed offset at each kill (see `uncommitted_at_kill`).
    uncommitted: Vec<usize>,
    faults: Vec<&'static str>,
}

/// A run that finished: every worker stopped, the final ledger and DLQ read.
struct Settled {
    n: u64,
    expected_ok: HashSet<u64>,
    expected_dlq: HashSet<u64>,
    lines: Vec<Line>,
    dlq: Vec<sidetrack::testing::Record>,
}

/// Waits until every record of `0..n` is in the ledger or the DLQ (4 minutes at most), stops
/// the workers with SIGTERM (each must exit cleanly) and reads the outcome. Fails the test,
/// with what is missing, if the records do not all resolve.
async fn settle(env: &Env, run: &Run, n: u64, mut a: Worker, mut b: Option<Worker>) -> Settled {
    let (expected_ok, expected_dlq) = expected(run.seed, n);
    // Everything resolves: every id in the ledger or the DLQ.
    let done = sidetrack::testing::wait_until(Duration::from_secs(240), || async {
        let ok: HashSet<u64> = read_ledger(&run.ledger())
            .into_iter()
            .map(|l| l.0)
            .collect();
        if !expected_ok.is_subset(&ok) {
            return false;
        }
        let dead: HashSet<u64> = env
            .read_all(&env.dlq())
            .await
            .iter()
            .filter_map(id_of)
            .collect();
        expected_dlq.is_subset(&dead)
    })
    .await;
    // Still running: a worker that stopped on its own would be a runtime that exits.
    assert_alive(run, &mut a);
    if let Some(bb) = b.as_mut() {
        assert_alive(run, bb);
    }
    let status = sigterm(&mut a);
    if let Some(mut bb) = b.take() {
        sigterm(&mut bb);
    }
    keep_logs(run);
    if !done {
        let ok: HashSet<u64> = read_ledger(&run.ledger())
            .into_iter()
            .map(|l| l.0)
            .collect();
        let dlq = env.read_all(&env.dlq()).await;
        let dead: HashSet<u64> = dlq.iter().filter_map(id_of).collect();
        let mut per_partition: HashMap<i32, (usize, i64)> = HashMap::new();
        for r in &dlq {
            let e = per_partition.entry(r.partition).or_default();
            e.0 += 1;
            e.1 = e.1.max(r.offset);
        }
        eprintln!(
            "missing from the ledger: {:?}\nmissing from the DLQ: {:?}\nDLQ (records, last offset) per partition: {per_partition:?}",
            expected_ok.difference(&ok).collect::<Vec<_>>(),
            expected_dlq.difference(&dead).collect::<Vec<_>>(),
        );
    }
    assert!(done, "not every record reached the ledger or the DLQ");
    assert!(status.success(), "final stop: {status}");
    Settled {
        n,
        expected_ok,
        expected_dlq,
        lines: read_ledger(&run.ledger()),
        dlq: env.read_all(&env.dlq()).await,
    }
}

/// The ledger's assertions on a settled run, with its figures printed on one line (`extra`
/// appended): lost = 0, the DLQ holds exactly the expected ids, no record that must fail was
/// handled, and duplicates within the bound (printed, not asserted, on Tansu).
fn check(run: &Run, settled: &Settled, crashes: &Crashes, started: Instant, extra: &str) {
    let Settled {
        n,
        expected_ok,
        expected_dlq,
        lines,
        dlq,
    } = settled;
    let (n, backend, ordering) = (*n, run.backend, run.ordering);
    let Crashes {
        crashes,
        uncommitted,
        faults,
    } = crashes;
    let crashes = *crashes;
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for l in lines {
        *seen.entry(l.0).or_default() += 1;
    }
    let dead: Vec<u64> = dlq.iter().filter_map(id_of).collect();
    let dead_set: HashSet<u64> = dead.iter().copied().collect();
    let lost: Vec<u64> = (0..n)
        .filter(|i| !seen.contains_key(i) && !dead_set.contains(i))
        .collect();
    let healthy_in_dlq: Vec<u64> = dead_set.difference(expected_dlq).copied().collect();
    let poison_handled: Vec<u64> = expected_dlq
        .iter()
        .filter(|i| seen.contains_key(i))
        .copied()
        .collect();
    let duplicates: usize =
        seen.values().map(|c| c - 1).sum::<usize>() + (dead.len() - dead_set.len());
    // The documented bound: a record is handled again only if its offset was not committed
    // when its partition changed owner. Per crash, the records the killed process handled
    // past the committed offset (measured right after each kill); per revocation or lost
    // session in a live process, the records it had handled past its last commit (logged by
    // the runtime); plus one record in flight on each of the 12 partitions (4 source, 8 tier)
    // per rebalance (each crash, b joining, b leaving); plus one per hand-off sent again after
    // a failure (logged as a warning): a produce that timed out may have been written all the
    // same (its acknowledgement lost with a dying leader), and the copy sent again is a second
    // retry attempt or dead letter. (On three brokers nearly every such resend was a copy.)
    let owned = 3 * PARTITIONS as usize;
    let crash_share = uncommitted.iter().sum::<usize>();
    let revoke_share = run.uncommitted_at_revocations();
    let resent = run.handoffs_resent();
    let bound = crash_share + revoke_share + (crashes + 2) * owned + resent;
    println!(
        "ledger: backend={backend:?} ordering={ordering} records={n} seed={} crashes(SIGKILL)={crashes} faults=[{}] ok={} dead-lettered={} lost={} duplicates={duplicates} bound={bound} (uncommitted at each kill {uncommitted:?}, at revocations {revoke_share}, in flight {}, hand-offs resent {resent}){extra} in {:.1}s",
        run.seed,
        faults.join(", "),
        expected_ok.len(),
        expected_dlq.len(),
        lost.len(),
        (crashes + 2) * owned,
        started.elapsed().as_secs_f64()
    );
    if std::env::var("LEDGER_DEBUG").is_ok() {
        let mut first: HashMap<u64, (String, u128)> = HashMap::new();
        for l in lines {
            if let Some((inst, t)) = first.get(&l.0) {
                eprintln!(
                    "DUP id={} first={inst}@{t} again={}@{} attempt={}",
                    l.0, l.1, l.3, l.2
                );
            } else {
                first.insert(l.0, (l.1.clone(), l.3));
            }
        }
    }
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(
        healthy_in_dlq.is_empty(),
        "healthy records in the DLQ: {healthy_in_dlq:?}"
    );
    assert_eq!(
        &dead_set, expected_dlq,
        "the DLQ holds exactly the permanent, undecodable and exhausted records"
    );
    assert!(
        poison_handled.is_empty(),
        "records that must fail were handled: {poison_handled:?}"
    );
    // The bound assumes one owner per partition at a time. Tansu 0.6 (CI's real broker) does
    // not keep to that: with seed 12 it gave partition 1 to a3 and to b at once for 3 s (both
    // handled the same 289 records; 738 duplicates against a bound of 489, nothing lost). So
    // on Tansu the bound is printed, not asserted; on Apache Kafka, the reference, it is
    // asserted, as on kfake and the embedded broker.
    if !matches!(backend, Backend::Tansu) {
        assert!(
            duplicates <= bound,
            "{duplicates} duplicates, more than the {bound} records that were uncommitted when their partition changed owner"
        );
    } else if duplicates > bound {
        println!(
            "ledger: backend=Tansu: {duplicates} duplicates exceed the bound {bound} (not asserted on this broker: a partition had two owners at once)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_handles_nothing_twice() {
    let n = 1500;
    let (env, run) = prepare(Backend::Embedded).await.unwrap();
    // Only healthy records here: the point is shutdown, not failures.
    let run = Run {
        healthy: true,
        ..run
    };
    produce_ids(&env, n, None).await;
    let mut a = run.spawn("a");
    assert!(
        sidetrack::testing::wait_until(Duration::from_secs(60), || std::future::ready(
            read_ledger(&run.ledger()).len() >= 300
        ))
        .await,
        "worker made no progress"
    );
    let signalled = now_ms();
    let begun = Instant::now();
    let status = sigterm(&mut a);
    let took = begun.elapsed();
    assert!(status.success(), "{status}");
    // Documented bound: shutdown_timeout (5 s here) plus leaving the group.
    assert!(took < Duration::from_secs(8), "graceful stop took {took:?}");
    let after_signal = read_ledger(&run.ledger())
        .iter()
        .filter(|l| l.3 > signalled)
        .count();
    let mut b = run.spawn("b");
    let done = sidetrack::testing::wait_until(Duration::from_secs(120), || {
        let ids: HashSet<u64> = read_ledger(&run.ledger())
            .into_iter()
            .map(|l| l.0)
            .collect();
        std::future::ready(ids.len() as u64 == n)
    })
    .await;
    sigterm(&mut b);
    assert!(done, "records lost");
    let lines = read_ledger(&run.ledger());
    let by_a: Vec<u64> = lines.iter().filter(|l| l.1 == "a").map(|l| l.0).collect();
    let unique_a: HashSet<u64> = by_a.iter().copied().collect();
    let all: HashSet<u64> = lines.iter().map(|l| l.0).collect();
    println!(
        "sigterm: records={n} handled-by-a={} finished-after-signal={after_signal} stop-took={took:?} duplicates={}",
        by_a.len(),
        lines.len() - all.len()
    );
    assert_eq!(
        by_a.len(),
        unique_a.len(),
        "instance a handled a record twice"
    );
    // Only the records in flight at the signal (one per partition, retries included) finish
    // after it, and their offsets are committed: nothing is handled again by b.
    assert!(
        after_signal <= 2 * PARTITIONS as usize,
        "{after_signal} records finished after SIGTERM"
    );
    assert_eq!(lines.len(), all.len(), "duplicates after a graceful stop");
}

// ------------------------------------------------- the replication-fault ledger (3 brokers)

use common::kafka_cluster::{self, KafkaCluster};

/// How long the stalled broker stays stopped: longer than the brokers' own session
/// (`broker.session.timeout.ms`, 9 s by default: the controller fences it and moves its
/// leaderships) and than the workers' group session (`session.timeout.ms`, 6 s).
const STALL: Duration = Duration::from_secs(12);

/// The longest a partition may go without progress after a fault (`SIDETRACK_REPLICATION_STALL_BOUND`
/// seconds overrides it). What it has to cover, at most: the controller noticing a dead or
/// stopped broker (9 s) or the stall itself (12 s); the group noticing the killed worker
/// (`session.timeout.ms`, 6 s) or waiting for a member killed during its join (the rebalance
/// timeout, 15 s); librdkafka's next metadata refresh after a request to the old leader
/// timed out; and a machine whose two cores are shared with other builds.
fn stall_bound() -> Duration {
    Duration::from_secs(
        std::env::var("SIDETRACK_REPLICATION_STALL_BOUND")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(90),
    )
}

/// Produces ids 0, 1, 2, … to the source topic at a steady rate in the background (partition
/// `id % PARTITIONS`, the seed's fate in the payload), so records arrive before, during and
/// after every fault. Idempotent, `acks=all`, and patient (5 minutes per record): a leader
/// election only delays it, and nothing is written twice.
struct Feeder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Feeder {
    fn start(env: &Env, seed: u64, per_second: u64) -> Feeder {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", env.bootstrap())
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "300000")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .create()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let topic = env.topic().to_owned();
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut pending = Vec::new();
            let per_tick = per_second.div_ceil(10).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut id = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                tick.tick().await;
                for _ in 0..per_tick {
                    let key = id.to_string();
                    let payload = match fate(seed, id) {
                        Fate::Undecodable => format!("{{\"id\": {id}, "),
                        _ => format!("{{\"id\": {id}}}"),
                    };
                    let rec = FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .partition((id % PARTITIONS as u64) as i32);
                    pending.push((id, producer.send_result(rec).map_err(|(e, _)| e).unwrap()));
                    id += 1;
                }
                sent2.store(id, Ordering::SeqCst);
            }
            for (id, p) in pending {
                match p.await {
                    Ok(Ok(_)) => {}
                    other => panic!("the test's producer could not write record {id}: {other:?}"),
                }
            }
            id
        });
        Feeder { stop, sent, task }
    }

    /// Ids handed to the producer so far.
    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops producing; waits for every record to be acknowledged; returns how many.
    async fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("the test's producer failed")
    }
}

/// A fault of the replication ledger.
#[derive(Debug, Clone, Copy)]
enum ClusterFault {
    /// SIGKILL the leader of a partition of the source topic, a retry tier or the DLQ; restart
    /// it once every source partition is handled again.
    KillLeader(SideTopic),
    /// SIGSTOP the broker coordinating the main group for [`STALL`], then SIGCONT it.
    StallCoordinator,
}

#[derive(Debug, Clone, Copy)]
enum SideTopic {
    Source,
    Retry,
    Dlq,
}

/// One fault as it happened.
struct FaultRecord {
    what: String,
    /// When it began, ms since the epoch.
    at_ms: u128,
    /// Until the partition it aimed at had another leader (a broker's part of the recovery).
    leader_moved: Option<f64>,
    /// Until every source partition had a record handled again (measured while it ran).
    sources_handled: f64,
    /// Until every replica was back in sync after the restart or the resume.
    in_sync: f64,
}

/// A record's place: topic, partition, offset.
type Position = (String, i32, i64);

/// An acknowledged hand-off as a worker logged it: where it went and what it carried.
#[derive(Debug, Clone)]
struct Ack {
    at_ms: u128,
    dlq: bool,
    target: Position,
    /// The original record and the attempts its envelope counts.
    original: Position,
    attempts: u32,
}

/// `key=value` fields of a tracing line (values quoted with Debug escapes or bare).
fn log_fields(line: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key_start = rest[..eq].rfind(' ').map_or(0, |i| i + 1);
        let key = rest[key_start..eq].to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            // Up to the closing quote, skipping escaped ones.
            let mut end = None;
            let mut escaped = false;
            for (i, c) in q.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.unwrap_or(q.len());
            (q[..end].to_owned(), &q[(end + 1).min(q.len())..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        out.insert(key, value);
        rest = next;
    }
    out
}

/// Ms since the epoch of a tracing line's RFC 3339 UTC timestamp (`2026-12-01T22:40:00.123456Z`).
fn log_time_ms(line: &str) -> Option<u128> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + h * 3600 + min * 60) * 1000) as f64 + sec * 1000.0;
    Some(ms as u128)
}

/// Every hand-off acknowledgement the workers logged (`retry scheduled` at debug, `record
/// dead-lettered` at warn, both with where the broker put the record).
fn logged_acks(run: &Run) -> Vec<Ack> {
    let mut out = Vec::new();
    for text in run.worker_logs() {
        for line in text.lines() {
            let dlq = line.contains("record dead-lettered");
            if !dlq && !line.contains("retry scheduled") {
                continue;
            }
            let f = log_fields(line);
            let get = |k: &str| {
                f.get(k)
                    .unwrap_or_else(|| panic!("no {k} in hand-off log line: {line}"))
            };
            let num = |k: &str| -> i64 { get(k).parse().unwrap() };
            let (tt, tp, to, attempts) = if dlq {
                ("dlq", "dlq_partition", "dlq_offset", "attempts")
            } else {
                (
                    "target_topic",
                    "target_partition",
                    "target_offset",
                    "attempt",
                )
            };
            out.push(Ack {
                at_ms: log_time_ms(line).unwrap_or_else(|| panic!("no time in {line}")),
                dlq,
                target: (get(tt).clone(), num(tp) as i32, num(to)),
                original: (get("topic").clone(), num("partition") as i32, num("offset")),
                attempts: num(attempts) as u32,
            });
        }
    }
    out
}

/// Counts lines of the workers' logs that contain `needle` and were written at or after
/// `from_ms` and before `to_ms`.
fn logged_between(run: &Run, needle: &str, from_ms: u128, to_ms: u128) -> usize {
    let mut n = 0;
    for text in run.worker_logs() {
        n += text
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(log_time_ms)
            .filter(|t| (from_ms..to_ms).contains(t))
            .count();
    }
    n
}

/// The ledger on three brokers (replication factor 3, `min.insync.replicas=2`, unclean leader
/// election off) at `SIDETRACK_TEST_KAFKA_CLUSTER` / `SIDETRACK_TEST_KAFKA_CLUSTER_DIR`, while
/// records arrive at a steady rate (`SIDETRACK_REPLICATION_RATE` per second, default 40; seed
/// `SIDETRACK_LEDGER_SEED`; `SIDETRACK_REPLICATION_ROUNDS` rounds of faults, default 1):
/// the broker leading a source partition is SIGKILLed, then the one leading a retry
/// partition, then the one leading a DLQ partition (each restarted with its `run` script once
/// every source partition is handled again), then the group's coordinator is SIGSTOPped for
/// 12 s and resumed; before each fault a worker is SIGKILLed and another started, and a
/// second instance joins at the first fault and leaves before the third. Asserts, besides the
/// ledger's own (lost = 0, the exact DLQ, duplicates within the bound): the retry and DLQ
/// topics the runtime created have three replicas; every hand-off the producer acknowledged
/// (the workers log each with its target partition and offset) is in the log with its
/// envelope; no partition goes without progress for longer than [`stall_bound`] after a
/// fault; and no worker ever exits on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_faults_lose_nothing_on_three_brokers() {
    let Some(cluster) = KafkaCluster::from_env() else {
        return;
    };
    let env = Env::on(Backend::KafkaCluster, TOPIC, GROUP, PARTITIONS)
        .await
        .expect("SIDETRACK_TEST_KAFKA_CLUSTER is set");
    let seed = std::env::var("SIDETRACK_LEDGER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let rate: u64 = std::env::var("SIDETRACK_REPLICATION_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let rounds: usize = std::env::var("SIDETRACK_REPLICATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let run = Run {
        dir: tempfile::tempdir().unwrap(),
        backend: Backend::KafkaCluster,
        brokers: env.bootstrap(),
        topic: env.topic().to_owned(),
        group: env.group().to_owned(),
        seed,
        healthy: false,
        ordering: "partition",
        auto_create: true,
        // Each retry hand-off's acknowledgement is a debug line of the hand-off module.
        log: Some("warn,sidetrack::runtime::group=info,sidetrack::runtime::consumer=info,sidetrack::runtime::handoff=debug"),
        calls: true,
    };
    let source = env.topic().to_owned();
    let (retry1, retry2, dlq) = (env.retry("100ms"), env.retry("200ms"), env.dlq());
    let topics = vec![source.clone(), retry1.clone(), retry2.clone(), dlq.clone()];
    let bound = stall_bound();

    let started = Instant::now();
    let feeder = Feeder::start(&env, seed, rate);
    let mut a = run.spawn("a1");
    let mut incarnation = 1;
    // The runtime created its retry and dead-letter topics, each partition on all three
    // brokers (`provisioning.replication_factor` -1: the broker's default).
    for t in &topics[1..] {
        let replicas: Vec<usize> = kafka_cluster::poll(Duration::from_secs(60), || async {
            let ps = cluster.partitions(t).await?;
            Some(ps.iter().map(|p| p.replicas.len()).collect())
        })
        .await
        .unwrap_or_else(|| panic!("the runtime did not create {t}"));
        assert_eq!(
            replicas,
            vec![3; PARTITIONS as usize],
            "replicas per partition of {t}"
        );
    }

    let mut rng = fastrand::Rng::with_seed(seed);
    // One round is the four faults; more rounds repeat them (other partitions, other
    // brokers as it falls out).
    let faults: Vec<ClusterFault> = (0..rounds)
        .flat_map(|_| {
            [
                ClusterFault::KillLeader(SideTopic::Source),
                ClusterFault::KillLeader(SideTopic::Retry),
                ClusterFault::KillLeader(SideTopic::Dlq),
                ClusterFault::StallCoordinator,
            ]
        })
        .collect();
    let mut records: Vec<FaultRecord> = Vec::new();
    let mut uncommitted = Vec::new();
    let mut crashes = 0;
    let mut b: Option<Worker> = None;
    let mut events = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        // Records flow (a few hundred handled since the last fault) and every replica is in
        // sync before the next fault.
        let before = read_ledger(&run.ledger()).len();
        let want = before + 4 * rate as usize;
        assert!(
            sidetrack::testing::wait_until(bound, || std::future::ready(
                read_ledger(&run.ledger()).len() >= want
            ))
            .await,
            "no progress before fault {i} ({} of {want} handled)",
            read_ledger(&run.ledger()).len()
        );
        assert!(
            cluster
                .wait_fully_replicated(&topics, Duration::from_secs(180))
                .await
                .is_some(),
            "not in sync before fault {i}: {:?}",
            cluster.under_replicated(&topics).await
        );

        // A worker crash, and the second instance joining (first fault) or leaving (third).
        assert_alive(&run, &mut a);
        if let Some(bb) = b.as_mut() {
            assert_alive(&run, bb);
        }
        sigkill(&mut a);
        crashes += 1;
        uncommitted.push(uncommitted_at_kill(&env, &read_ledger(&run.ledger()), &a.1).await);
        incarnation += 1;
        a = run.spawn(&format!("a{incarnation}"));
        match i {
            0 => {
                b = Some(run.spawn("b"));
                events.push("b joins");
            }
            2 => {
                if let Some(mut bb) = b.take() {
                    let status = sigterm(&mut bb);
                    assert!(
                        status.success(),
                        "instance b did not stop cleanly: {status}"
                    );
                    events.push("b leaves");
                }
            }
            _ => {}
        }

        // The victim first (metadata requests take a while), then the fault and its clock.
        let p = rng.i32(0..PARTITIONS);
        let (what, node, aimed) = match fault {
            ClusterFault::KillLeader(side) => {
                let topic = match side {
                    SideTopic::Source => &source,
                    SideTopic::Retry => {
                        if rng.bool() {
                            &retry1
                        } else {
                            &retry2
                        }
                    }
                    SideTopic::Dlq => &dlq,
                };
                let node = cluster.leader(topic, p).await;
                (
                    format!("SIGKILL node {node} (leader of {side:?} partition {p})"),
                    node,
                    (topic.clone(), p),
                )
            }
            ClusterFault::StallCoordinator => {
                let offsets = (
                    "__consumer_offsets".to_owned(),
                    cluster.offsets_partition(env.group()),
                );
                let node = cluster.coordinator(env.group()).await;
                (
                    format!(
                        "SIGSTOP node {node} for {}s (coordinator of the group)",
                        STALL.as_secs()
                    ),
                    node,
                    offsets,
                )
            }
        };
        let at = Instant::now();
        let at_ms = now_ms();
        match fault {
            ClusterFault::KillLeader(_) => cluster.kill(node),
            ClusterFault::StallCoordinator => cluster.stop(node),
        }
        // The broker's part: until the partition aimed at has another leader.
        // (A stopped broker is resumed at the end of the stall whether or not it moved.)
        let limit = match fault {
            ClusterFault::StallCoordinator => STALL,
            ClusterFault::KillLeader(_) => bound,
        };
        let moved = kafka_cluster::poll(limit, || async {
            let ps = cluster.partitions(&aimed.0).await?;
            let x = ps.iter().find(|x| x.partition == aimed.1)?;
            (x.leader >= 0 && x.leader != node).then(|| at.elapsed().as_secs_f64())
        })
        .await;
        if matches!(fault, ClusterFault::KillLeader(_)) {
            // Kafka's part, without which nothing else here can be judged.
            assert!(
                moved.is_some(),
                "after {what}: no other leader within {bound:?}"
            );
        }
        if matches!(fault, ClusterFault::StallCoordinator) {
            // The fault's length, not a synchronisation: the broker is stopped this long.
            tokio::time::sleep(STALL.saturating_sub(at.elapsed())).await;
            cluster.resume(node);
        }
        // Every source partition handled again: records written after the fault began (the
        // feeder writes to every partition) are in the ledger.
        let sources_handled = sidetrack::testing::wait_until(bound, || {
            let lines = read_ledger(&run.ledger());
            let fresh: HashSet<i32> = lines
                .iter()
                .filter(|l| l.3 > at_ms && l.4 .0 == source)
                .map(|l| l.4 .1)
                .collect();
            std::future::ready(fresh.len() == PARTITIONS as usize)
        })
        .await;
        if !sources_handled {
            // A worker that died says so first.
            assert_alive(&run, &mut a);
            if let Some(bb) = b.as_mut() {
                assert_alive(&run, bb);
            }
        }
        assert!(
            sources_handled,
            "after {what}: not every source partition was handled again within {bound:?}"
        );
        let sources_handled = at.elapsed().as_secs_f64();
        if matches!(fault, ClusterFault::KillLeader(_)) {
            cluster.restart(node);
        }
        let back = Instant::now();
        let in_sync = cluster
            .wait_fully_replicated(&topics, Duration::from_secs(180))
            .await;
        assert!(
            in_sync.is_some(),
            "after {what}: replicas not back in sync in 180 s: {:?}",
            cluster.under_replicated(&topics).await
        );
        records.push(FaultRecord {
            what,
            at_ms,
            leader_moved: moved,
            sources_handled,
            in_sync: back.elapsed().as_secs_f64(),
        });
    }
    // Records keep coming for a while after the last fault, then stop.
    let after = feeder.sent() + 4 * rate;
    assert!(
        sidetrack::testing::wait_until(bound, || std::future::ready(feeder.sent() >= after)).await
    );
    let n = feeder.finish().await;
    let settled = settle(&env, &run, n, a, b).await;

    // Every acknowledged hand-off is in the log, at the offset the broker gave, with the
    // envelope of the record it carries.
    let acks = logged_acks(&run);
    let mut side: HashMap<Position, (Position, u32)> = HashMap::new();
    for t in [&retry1, &retry2, &dlq] {
        let recs = if *t == dlq {
            settled.dlq.clone()
        } else {
            env.read_all(t).await
        };
        for r in recs {
            let (_, e) = r
                .envelope()
                .unwrap_or_else(|e| panic!("{t}/{}@{}: no envelope: {e}", r.partition, r.offset));
            side.insert(
                (r.topic.clone(), r.partition, r.offset),
                (
                    (
                        e.original_topic.clone(),
                        e.original_partition,
                        e.original_offset,
                    ),
                    e.attempts,
                ),
            );
        }
    }
    // A hand-off that timed out after the broker had written it is sent again: its record is
    // then on the side topic twice (a second attempt or dead letter, counted in the
    // duplicates).
    let mut copies: HashMap<&((String, i32, i64), u32), usize> = HashMap::new();
    for v in side.values() {
        *copies.entry(v).or_default() += 1;
    }
    let written_twice: usize = copies.values().map(|c| c - 1).sum();
    let mut implicit = 0;
    let mut missing = Vec::new();
    for ack in &acks {
        let want = (ack.original.clone(), ack.attempts);
        let found = if ack.target.2 >= 0 {
            side.get(&ack.target) == Some(&want)
        } else {
            // librdkafka's implicit acknowledgement has no offset: the record is somewhere in
            // the partition.
            implicit += 1;
            side.iter()
                .any(|(k, v)| k.0 == ack.target.0 && k.1 == ack.target.1 && *v == want)
        };
        if !found {
            missing.push(ack.clone());
        }
    }
    let dlq_acks = acks.iter().filter(|a| a.dlq).count();
    assert!(
        acks.len() > dlq_acks && dlq_acks > 0,
        "hand-offs to both retry tiers and the DLQ were logged ({} retry, {dlq_acks} DLQ)",
        acks.len() - dlq_acks
    );

    // Time to recover per fault, from the outcome: for each partition (source and retry
    // partitions handled, retry and DLQ partitions acknowledging hand-offs) that had any
    // progress after the fault began, the first such progress.
    let short = |t: &str| -> String {
        if t == source {
            "source".into()
        } else if t == dlq {
            "dlq".into()
        } else if t == retry1 {
            "retry.100ms".into()
        } else if t == retry2 {
            "retry.200ms".into()
        } else {
            t.into()
        }
    };
    let mut progress: HashMap<String, Vec<u128>> = HashMap::new();
    for l in std::fs::read_to_string(run.dir.path().join("calls"))
        .unwrap_or_default()
        .lines()
    {
        let w: Vec<&str> = l.split(' ').collect();
        // A line cut short by a SIGKILL is skipped.
        if let [topic, partition, _, at] = w[..] {
            if let Ok(at) = at.parse() {
                progress
                    .entry(format!("handled {}/{partition}", short(topic)))
                    .or_default()
                    .push(at);
            }
        }
    }
    for ack in &acks {
        progress
            .entry(format!("acked {}/{}", short(&ack.target.0), ack.target.1))
            .or_default()
            .push(ack.at_ms);
    }
    let mut figures = Vec::new();
    let mut stalled = Vec::new();
    for (k, f) in records.iter().enumerate() {
        let end = records.get(k + 1).map_or(u128::MAX, |n| n.at_ms);
        let (mut worst, mut worst_at) = (0u128, String::new());
        for (what, times) in &progress {
            if let Some(first) = times.iter().copied().filter(|t| *t >= f.at_ms).min() {
                let gap = first - f.at_ms;
                if gap > worst {
                    (worst, worst_at) = (gap, what.clone());
                }
            }
        }
        if Duration::from_millis(worst as u64) > bound {
            stalled.push(format!("{}: {worst_at} after {worst} ms", f.what));
        }
        let warned = logged_between(&run, "hand-off failed", f.at_ms, end);
        figures.push(format!(
            "{} → leader moved {}, every source partition handled {:.1}s, every partition progressing {:.1}s (last: {worst_at}), {warned} hand-off retries logged, in sync {:.1}s after restart",
            f.what,
            f.leader_moved
                .map_or("not during the stall".into(), |s| format!("{s:.1}s")),
            f.sources_handled,
            worst as f64 / 1000.0,
            f.in_sync
        ));
    }
    let extra = format!(
        " rate={rate}/s rounds={rounds} hand-offs acknowledged={} (retry {}, DLQ {dlq_acks}; implicit {implicit}) not in the log={} on a side topic twice={written_twice} stall bound={}s faults:[{}] events:[{}]",
        acks.len(),
        acks.len() - dlq_acks,
        missing.len(),
        bound.as_secs(),
        figures.join("; "),
        events.join(", ")
    );
    check(
        &run,
        &settled,
        &Crashes {
            crashes,
            uncommitted,
            faults: vec!["leader kills and a stalled coordinator on three brokers"],
        },
        started,
        &extra,
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged hand-offs are not in the log: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        stalled.is_empty(),
        "partitions without progress for longer than {bound:?} after a fault: {stalled:?}"
    );
}
