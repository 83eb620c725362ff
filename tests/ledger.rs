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
}

#[derive(serde::Deserialize)]
struct Rec {
    id: u64,
}

impl Handler for LedgerHandler {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
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
                    std::env::var("LW_LOG")
                        .unwrap_or_else(|_| "warn,sidetrack::runtime::group=info".into()),
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
        config.provisioning.auto_create = false;
        if std::env::var("LW_ORDERING").as_deref() == Ok("key") {
            config.ordering = sidetrack::config::Ordering::Key;
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
}

impl Run {
    fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger")
    }

    /// The records every worker reported as handled but not committed when it lost a
    /// partition, when the commit sent on a revocation failed, or behind hand-offs still
    /// waiting at a revocation (`uncommitted=N`).
    fn uncommitted_at_revocations(&self) -> usize {
        let mut total = 0;
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_none_or(|e| e != "log") {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("will be handled again")) {
                total += line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("uncommitted="))
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
            }
        }
        total
    }

    fn spawn(&self, instance: &str) -> Worker {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        if self.healthy {
            cmd.env("LW_HEALTHY", "1");
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
        .map(Worker)
        .unwrap()
    }
}

/// A worker process, killed if the test ends (or panics) while it still runs.
struct Worker(Child);

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
    };
    Some((env, run))
}

async fn produce_ids(env: &Env, n: u64, seed: Option<u64>) {
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
        let key = id.to_string();
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

/// Waits until the main group's committed offset moved on every partition that is not done.
async fn commits_resumed(env: &Env) {
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
    assert!(ok, "offset commits did not resume after the faults");
}

/// One ledger per back end: `NAME::embedded` (with injected broker faults), `NAME::apache_kafka`,
/// `NAME::tansu` and `NAME::kfake` (crashes and rebalances only; each passes after printing why when its
/// variable is unset).
macro_rules! ledger_on_every_broker {
    ($name:ident, $ordering:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                ledger(Backend::Embedded, $ordering).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn apache_kafka() {
                ledger(Backend::ApacheKafka, $ordering).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tansu() {
                ledger(Backend::Tansu, $ordering).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kfake() {
                ledger(Backend::Kfake, $ordering).await
            }
        }
    };
}

ledger_on_every_broker!(
    nothing_is_lost_across_crashes_rebalances_and_broker_faults,
    "partition"
);
// The same ledger with `ordering = "key"`: many records per partition in handler calls at
// once, finishing out of order, across the same crashes, rebalances and faults.
ledger_on_every_broker!(nothing_is_lost_in_key_ordering, "key");

async fn ledger(backend: Backend, ordering: &'static str) {
    let n: u64 = std::env::var("SIDETRACK_LEDGER_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let Some((env, mut run)) = prepare(backend).await else {
        return;
    };
    run.ordering = ordering;
    produce_ids(&env, n, Some(run.seed)).await;
    let fates: HashMap<u64, Fate> = (0..n).map(|id| (id, fate(run.seed, id))).collect();
    let expected_dlq: HashSet<u64> = fates
        .iter()
        .filter(|(_, f)| expected_in_dlq(**f))
        .map(|(i, _)| *i)
        .collect();
    let expected_ok: HashSet<u64> = fates
        .keys()
        .copied()
        .filter(|i| !expected_dlq.contains(i))
        .collect();

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
        if matches!(backend, Backend::Tansu) {
            // Tansu 0.6 (CI's real broker) cannot survive a member killed during its first
            // join: it keeps the dead member as the group's leader, answers the others'
            // SyncGroup at once with an empty assignment and never rebalances again, so
            // every partition of that group stays unowned while the survivors heartbeat
            // happily (seen in 3 of 4 runs of seed 11 with all ledgers at once). Kafka makes
            // the followers wait for the leader and drops it after the rebalance timeout;
            // kills during a join are exercised on the embedded broker and on kfake.
            let log = run.dir.path().join(format!("a{incarnation}.log"));
            let joined = sidetrack::testing::wait_until(Duration::from_secs(60), || {
                std::future::ready(std::fs::read_to_string(&log).is_ok_and(|s| {
                    s.contains("partition assigned role=Main")
                        && s.contains("partition assigned role=Retry")
                }))
            })
            .await;
            assert!(joined, "a{incarnation} did not join both groups in 60 s");
        }
        sigkill(&mut a);
        crashes += 1;
        uncommitted.push(
            uncommitted_at_kill(
                &env,
                &read_ledger(&run.ledger()),
                &format!("a{incarnation}"),
            )
            .await,
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
                // README).
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
                commits_resumed(&env).await;
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
            .filter_map(|r| String::from_utf8_lossy(r.key.as_deref()?).parse().ok())
            .collect();
        expected_dlq.is_subset(&dead)
    })
    .await;
    let status = sigterm(&mut a);
    if let Some(mut bb) = b.take() {
        sigterm(&mut bb);
    }
    if let Ok(keep) = std::env::var("LEDGER_KEEP_LOGS") {
        // The workers' logs and the ledger, one folder per test (they run at once).
        let keep = Path::new(&keep).join(format!("{backend:?}-{ordering}"));
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(run.dir.path()).unwrap().flatten() {
            let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
        }
    }
    if !done {
        let ok: HashSet<u64> = read_ledger(&run.ledger())
            .into_iter()
            .map(|l| l.0)
            .collect();
        let dlq = env.read_all(&env.dlq()).await;
        let dead: HashSet<u64> = dlq
            .iter()
            .filter_map(|r| String::from_utf8_lossy(r.key.as_deref()?).parse().ok())
            .collect();
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

    let lines = read_ledger(&run.ledger());
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for l in &lines {
        *seen.entry(l.0).or_default() += 1;
    }
    let dlq = env.read_all(&env.dlq()).await;
    let dead: Vec<u64> = dlq
        .iter()
        .filter_map(|r| String::from_utf8_lossy(r.key.as_deref()?).parse().ok())
        .collect();
    let dead_set: HashSet<u64> = dead.iter().copied().collect();
    let lost: Vec<u64> = (0..n)
        .filter(|i| !seen.contains_key(i) && !dead_set.contains(i))
        .collect();
    let healthy_in_dlq: Vec<u64> = dead_set.difference(&expected_dlq).copied().collect();
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
    // per rebalance (each crash, b joining, b leaving).
    let owned = 3 * PARTITIONS as usize;
    let crash_share = uncommitted.iter().sum::<usize>();
    let revoke_share = run.uncommitted_at_revocations();
    let bound = crash_share + revoke_share + (crashes + 2) * owned;
    println!(
        "ledger: backend={backend:?} ordering={ordering} records={n} seed={} crashes(SIGKILL)={crashes} faults=[{}] ok={} dead-lettered={} lost={} duplicates={duplicates} bound={bound} (uncommitted at each kill {uncommitted:?}, at revocations {revoke_share}, in flight {}) in {:.1}s",
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
        for l in &lines {
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
        dead_set, expected_dlq,
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
