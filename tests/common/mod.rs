//! The integration tests' one support module (`mod common;` in every suite): where a scenario
//! runs (the [`Backend`]s, a scenario's [`Env`]), the broker matrix [`on_every_broker!`] that
//! turns one scenario into a test per back end, [`within_limit`], a fast test config, and
//! handlers that record what they saw. Its submodules hold what only some suites use:
//! [`recording`] (a metrics recorder), [`proxy`] (a bare broker, a proxy and an HTTP client for
//! the proxy suites), [`kafka_cluster`] (the three-broker cluster of the replication-fault
//! tests and its faults).
//!
//! Every test binary compiles all of it, and each uses a part: hence `allow(dead_code)`.
#![allow(dead_code)]

pub mod kafka_cluster;
#[cfg(feature = "otel")]
pub mod otlp;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod recording;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sidetrack::config::RetryConfig;
use sidetrack::testing::{wait_until, EmbeddedCluster};
use sidetrack::{Config, Context, Handler, HandlerError, Message, Tier};

pub const TOPIC: &str = "orders";
pub const GROUP: &str = "billing";
pub const WAIT: Duration = Duration::from_secs(30);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,librdkafka=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A cluster with the source topic created.
pub fn cluster(partitions: i32) -> EmbeddedCluster {
    cluster_with(TOPIC, partitions)
}

/// A cluster with `topic` created.
pub fn cluster_with(topic: &str, partitions: i32) -> EmbeddedCluster {
    init_tracing();
    let cluster = EmbeddedCluster::start().expect("embedded cluster");
    cluster.create_topic(topic, partitions).expect("topic");
    cluster
}

/// Short tiers (200ms × 2, 500ms × 1) and consumer settings that make group joins quick.
pub fn config() -> Config {
    config_for(TOPIC, GROUP)
}

/// [`config`] for another topic and group.
pub fn config_for(topic: &str, group: &str) -> Config {
    let mut c = Config::new("unused", group, [topic]);
    c.retry = RetryConfig::tiers([
        Tier::new(Duration::from_millis(200), 2),
        Tier::new(Duration::from_millis(500), 1),
    ]);
    c.shutdown_timeout = Duration::from_secs(5);
    c.handoff.timeout = Duration::from_millis(500);
    c.handoff.backoff_initial = Duration::from_millis(50);
    c.handoff.backoff_max = Duration::from_millis(200);
    c.consumer
        .insert("session.timeout.ms".into(), "6000".into());
    c.consumer
        .insert("heartbeat.interval.ms".into(), "500".into());
    c
}

/// One handler attempt as seen by [`Recorder`].
#[derive(Debug, Clone)]
pub struct Attempt {
    pub payload: String,
    pub attempt: u32,
    pub at_ms: i64,
    pub due_ms: Option<i64>,
    pub partition: i32,
    pub offset: i64,
}

type Rule = dyn Fn(&Message) -> Result<(), HandlerError> + Send + Sync;

/// Records every attempt; its behaviour per payload is given by `rule`.
#[derive(Clone)]
pub struct Recorder {
    pub attempts: Arc<Mutex<Vec<Attempt>>>,
    rule: Arc<Rule>,
}

impl Recorder {
    pub fn new(
        rule: impl Fn(&Message) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Self {
        Recorder {
            attempts: Arc::new(Mutex::new(Vec::new())),
            rule: Arc::new(rule),
        }
    }

    pub fn all(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }

    /// Payloads whose attempt ended in success, with how often.
    pub fn by_payload(&self) -> HashMap<String, Vec<Attempt>> {
        let mut m: HashMap<String, Vec<Attempt>> = HashMap::new();
        for a in self.all() {
            m.entry(a.payload.clone()).or_default().push(a);
        }
        m
    }
}

impl Handler for Recorder {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        self.attempts.lock().unwrap().push(Attempt {
            payload: String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned(),
            attempt: msg.attempt(),
            at_ms: now,
            due_ms: msg.envelope().and_then(|e| e.due),
            partition: msg.partition(),
            offset: msg.offset(),
        });
        (self.rule)(msg)
    }
}

/// Counts handler calls in progress per record (its payload) or per key in one instance;
/// every call waits at an async gate (it yields while it waits).
#[derive(Clone)]
pub struct Gated {
    pub gate: Arc<tokio::sync::Semaphore>,
    pub active: Arc<Mutex<HashMap<String, usize>>>,
    /// Most calls at once for one record (or key).
    pub most: Arc<std::sync::atomic::AtomicUsize>,
    pub calls: Arc<std::sync::atomic::AtomicUsize>,
    by_key: bool,
}

impl Gated {
    /// Counted per record (its payload), waiting at `gate`.
    pub fn new(gate: Arc<tokio::sync::Semaphore>) -> Self {
        Gated {
            gate,
            active: Arc::default(),
            most: Arc::default(),
            calls: Arc::default(),
            by_key: false,
        }
    }
    /// Counted per record, waiting at a gate that stays closed until permits are added.
    pub fn closed() -> Self {
        Self::new(Arc::new(tokio::sync::Semaphore::new(0)))
    }
    /// Counted per key, waiting at a closed gate.
    pub fn by_key() -> Self {
        Gated {
            by_key: true,
            ..Self::closed()
        }
    }
    /// Calls in progress now.
    pub fn running(&self) -> usize {
        self.active.lock().unwrap().values().sum()
    }
}

impl Handler for Gated {
    async fn handle(&self, msg: &Message, _cx: &Context) -> Result<(), HandlerError> {
        use std::sync::atomic::Ordering;
        let bytes = if self.by_key {
            msg.key()
        } else {
            msg.payload()
        };
        let id = String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned();
        {
            let mut active = self.active.lock().unwrap();
            let n = active.entry(id.clone()).or_default();
            *n += 1;
            self.most.fetch_max(*n, Ordering::SeqCst);
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Decrements also when the call is abandoned (its future dropped).
        struct Done(Arc<Mutex<HashMap<String, usize>>>, String);
        impl Drop for Done {
            fn drop(&mut self) {
                if let Some(n) = self.0.lock().unwrap().get_mut(&self.1) {
                    *n -= 1;
                }
            }
        }
        let _done = Done(Arc::clone(&self.active), id);
        drop(self.gate.acquire().await);
        Ok(())
    }
}

/// Produces `payloads` to `TOPIC` (round-robin over partitions if `partitions` > 0).
pub async fn produce_all(
    cluster: &EmbeddedCluster,
    payloads: &[String],
    partitions: i32,
) -> Vec<(i32, i64)> {
    produce_to(cluster, TOPIC, payloads, partitions).await
}

/// Produces `payloads` (also used as keys) to `topic`.
pub async fn produce_to(
    cluster: &EmbeddedCluster,
    topic: &str,
    payloads: &[String],
    partitions: i32,
) -> Vec<(i32, i64)> {
    produce_each(&cluster.producer().unwrap(), topic, payloads, partitions).await
}

/// Produces each payload (also its key), round-robin over `partitions` if > 0.
pub async fn produce_each(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    payloads: &[String],
    partitions: i32,
) -> Vec<(i32, i64)> {
    let mut out = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        let part = (partitions > 0).then(|| i as i32 % partitions);
        let b = Some(p.as_bytes());
        out.push(
            sidetrack::testing::produce(producer, topic, part, b, b, &[])
                .await
                .unwrap(),
        );
    }
    out
}

pub async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    assert!(
        wait_until(WAIT, || std::future::ready(cond())).await,
        "timed out waiting for: {what}"
    );
}

/// What a test HTTP server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    ServerError,
    /// Read the request, never answer.
    Hang,
}

/// A minimal HTTP/1.1 server on 127.0.0.1 that stores each request body.
pub async fn http_server(reply: Reply) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let store = bodies.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break String::from_utf8_lossy(&buf[end + 4..end + 4 + len])
                                .into_owned();
                        }
                    }
                };
                store.lock().unwrap().push(body);
                let status = match reply {
                    Reply::Ok => "200 OK",
                    Reply::ServerError => "500 Internal Server Error",
                    Reply::Hang => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let _ = sock
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (addr, bodies)
}

/// GET `path` from `addr`; returns the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    sock.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// `builder.started().await`: build and start, panicking on a configuration or start error.
pub trait StartExt {
    fn started(self) -> impl std::future::Future<Output = sidetrack::RuntimeHandle>;
}

impl StartExt for sidetrack::RuntimeBuilder {
    async fn started(self) -> sidetrack::RuntimeHandle {
        self.build().unwrap().start().await.unwrap()
    }
}

/// Collects dead-letter alerts in memory.
#[derive(Clone, Default)]
pub struct Collect(pub Arc<Mutex<Vec<sidetrack::dead_letter::DeadLetterAlert>>>);

impl sidetrack::dead_letter::DeadLetterNotifier for Collect {
    fn name(&self) -> &str {
        "collect"
    }
    async fn notify(
        &self,
        alert: &sidetrack::dead_letter::DeadLetterAlert,
    ) -> Result<(), sidetrack::dead_letter::NotifyError> {
        self.0.lock().unwrap().push(alert.clone());
        Ok(())
    }
}

/// Where a scenario runs.
#[derive(Clone)]
pub enum Broker {
    /// librdkafka's mock cluster, one per test.
    Embedded(EmbeddedCluster),
    /// Tansu 0.6 at `SIDETRACK_TEST_TANSU`.
    Tansu(String),
    /// franz-go's kfake (an in-memory Kafka cluster) at `SIDETRACK_TEST_KFAKE`.
    Kfake(String),
    /// Apache Kafka (the reference broker) at `SIDETRACK_TEST_APACHE_KAFKA`.
    ApacheKafka(String),
    /// Three Apache Kafka brokers at `SIDETRACK_TEST_KAFKA_CLUSTER` (replication factor 3,
    /// `min.insync.replicas=2`): the replication-fault tests only.
    KafkaCluster(String),
}

/// The back ends a scenario can run on; the external ones are read from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    /// `SIDETRACK_TEST_TANSU`.
    Tansu,
    /// `SIDETRACK_TEST_KFAKE`.
    Kfake,
    /// `SIDETRACK_TEST_APACHE_KAFKA`.
    ApacheKafka,
    /// `SIDETRACK_TEST_KAFKA_CLUSTER` (three brokers; the replication-fault tests).
    KafkaCluster,
}

impl Backend {
    /// The environment variable naming this back end's bootstrap servers.
    pub fn variable(self) -> Option<&'static str> {
        match self {
            Backend::Embedded => None,
            Backend::Tansu => Some("SIDETRACK_TEST_TANSU"),
            Backend::Kfake => Some("SIDETRACK_TEST_KFAKE"),
            Backend::ApacheKafka => Some("SIDETRACK_TEST_APACHE_KAFKA"),
            Backend::KafkaCluster => Some("SIDETRACK_TEST_KAFKA_CLUSTER"),
        }
    }

    /// A short name for messages and worker processes.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Tansu => "tansu",
            Backend::Kfake => "kfake",
            Backend::ApacheKafka => "apache_kafka",
            Backend::KafkaCluster => "kafka_cluster",
        }
    }

    /// The back end a worker process was told (`Backend::name`).
    pub fn from_name(name: &str) -> Backend {
        match name {
            "tansu" => Backend::Tansu,
            "kfake" => Backend::Kfake,
            "apache_kafka" => Backend::ApacheKafka,
            "kafka_cluster" => Backend::KafkaCluster,
            _ => Backend::Embedded,
        }
    }

    /// The bootstrap servers of an external back end, or a printed reason to skip.
    pub fn bootstrap(self) -> Option<String> {
        let var = self.variable()?;
        match std::env::var(var) {
            Ok(b) if !b.trim().is_empty() => Some(b),
            _ => {
                eprintln!(
                    "skipped on {}: {var} is not set (see CONTRIBUTING.md or .ci/run)",
                    self.name()
                );
                None
            }
        }
    }
}

/// One scenario's broker, topic and group. On an external broker (shared by every test of a
/// run, and by earlier runs) names are made unique per test.
#[derive(Clone)]
pub struct Env {
    pub broker: Broker,
    topic: String,
    group: String,
}

impl Env {
    pub fn embedded(partitions: i32) -> Env {
        Env::embedded_named(TOPIC, GROUP, partitions)
    }

    /// The embedded broker with `topic` (created) and `group`.
    pub fn embedded_named(topic: &str, group: &str, partitions: i32) -> Env {
        Env {
            broker: Broker::Embedded(cluster_with(topic, partitions)),
            topic: topic.into(),
            group: group.into(),
        }
    }

    /// The scenario's environment on `backend`, with `topic` created; `None` (after printing
    /// why) when that back end is not configured. On an external broker `topic` and `group`
    /// get a unique suffix.
    pub async fn on(backend: Backend, topic: &str, group: &str, partitions: i32) -> Option<Env> {
        init_tracing();
        let broker = match backend {
            Backend::Embedded => return Some(Env::embedded_named(topic, group, partitions)),
            Backend::Tansu => Broker::Tansu(backend.bootstrap()?),
            Backend::Kfake => Broker::Kfake(backend.bootstrap()?),
            Backend::ApacheKafka => Broker::ApacheKafka(backend.bootstrap()?),
            Backend::KafkaCluster => Broker::KafkaCluster(backend.bootstrap()?),
        };
        let unique = format!("{:08x}", fastrand::u32(..));
        let env = Env {
            broker,
            topic: format!("{topic}-{unique}"),
            group: format!("{group}-{unique}"),
        };
        env.create_topic(&env.topic.clone(), partitions).await;
        Some(env)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
    pub fn group(&self) -> &str {
        &self.group
    }
    pub fn dlq(&self) -> String {
        format!("{}.{}.dlq", self.topic, self.group)
    }
    pub fn retry(&self, delay: &str) -> String {
        format!("{}.{}.retry.{delay}", self.topic, self.group)
    }
    pub fn is_embedded(&self) -> bool {
        matches!(self.broker, Broker::Embedded(_))
    }
    pub fn bootstrap(&self) -> String {
        match &self.broker {
            Broker::Embedded(c) => c.bootstrap_servers().to_owned(),
            Broker::Tansu(b)
            | Broker::Kfake(b)
            | Broker::ApacheKafka(b)
            | Broker::KafkaCluster(b) => b.clone(),
        }
    }

    /// The back end this scenario runs on.
    pub fn backend(&self) -> Backend {
        match self.broker {
            Broker::Embedded(_) => Backend::Embedded,
            Broker::Tansu(_) => Backend::Tansu,
            Broker::Kfake(_) => Backend::Kfake,
            Broker::ApacheKafka(_) => Backend::ApacheKafka,
            Broker::KafkaCluster(_) => Backend::KafkaCluster,
        }
    }
    /// A name unique to this scenario on its broker, derived from its topic: for extra
    /// topics a scenario creates itself.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.topic)
    }

    /// [`config`] for this scenario's topic and group.
    pub fn config(&self) -> Config {
        config_for(&self.topic, &self.group)
    }

    pub fn builder(&self, config: Config) -> sidetrack::RuntimeBuilder {
        match &self.broker {
            Broker::Embedded(c) => sidetrack::Runtime::builder(config).embedded(c),
            Broker::Tansu(b) => {
                let mut config = config;
                config.brokers = b.clone();
                // Tansu is slower to settle a group than the embedded broker.
                config.provisioning.timeout = Duration::from_secs(30);
                // With Tansu, librdkafka gets the idempotent producer's id only on its 500 ms
                // retry timer ("No brokers available for Idempotent producer" at start): the
                // first hand-offs wait 0.5-1 s and would time out at the fast test setting.
                config.handoff.timeout = Duration::from_secs(5);
                // Tansu 0.6 counts a multi-record batch as one offset: hand-offs sent in one
                // batch would not all be readable from the side topics.
                config
                    .producer
                    .insert("batch.num.messages".into(), "1".into());
                sidetrack::Runtime::builder(config)
            }
            // kfake and Apache Kafka need none of Tansu's settings: they answer promptly and
            // store batches as librdkafka sends them.
            Broker::Kfake(b) | Broker::ApacheKafka(b) | Broker::KafkaCluster(b) => {
                let mut config = config;
                config.brokers = b.clone();
                sidetrack::Runtime::builder(config)
            }
        }
    }

    /// Sets topic-level configuration on an external broker (`incrementalAlterConfigs`' older
    /// sibling `AlterConfigs`, which librdkafka offers); nothing on the embedded one.
    pub async fn alter_topic(&self, name: &str, entries: &[(&str, &str)]) {
        use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
        if self.is_embedded() {
            return;
        }
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", self.bootstrap())
                .create()
                .unwrap();
        let mut change = AlterConfig::new(ResourceSpecifier::Topic(name));
        for (k, v) in entries {
            change = change.set(k, v);
        }
        let r = admin
            .alter_configs(
                [&change],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(20))),
            )
            .await
            .unwrap();
        assert!(r[0].is_ok(), "altering {name}: {:?}", r[0]);
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        match &self.broker {
            Broker::Embedded(c) => c.create_topic(name, partitions).unwrap(),
            Broker::Tansu(b) | Broker::Kfake(b) | Broker::ApacheKafka(b) => {
                create_topic_on(b, name, partitions, 1).await
            }
            // Every replica on the three-broker cluster: its tests kill partition leaders.
            Broker::KafkaCluster(b) => create_topic_on(b, name, partitions, 3).await,
        }
    }

    /// A producer of test records. On the real broker each record goes in a batch of its
    /// own (Tansu cannot fetch from the middle of a multi-record batch).
    pub fn producer(&self) -> rdkafka::producer::FutureProducer {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap())
            .set("linger.ms", "0");
        if let Broker::Tansu(_) = self.broker {
            c.set("batch.num.messages", "1");
        }
        c.create().unwrap()
    }

    pub async fn produce(
        &self,
        producer: &rdkafka::producer::FutureProducer,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[sidetrack::Header],
    ) -> Result<(i32, i64), sidetrack::Error> {
        // The embedded helper works with any producer and broker.
        produce_with(producer, topic, partition, key, payload, headers).await
    }

    /// Produces `payloads` (also used as keys) to the scenario's topic.
    pub async fn produce_all(&self, payloads: &[String], partitions: i32) -> Vec<(i32, i64)> {
        produce_each(&self.producer(), &self.topic, payloads, partitions).await
    }

    /// Produces `payloads` (also used as keys) to `topic`.
    pub async fn produce_to(
        &self,
        topic: &str,
        payloads: &[String],
        partitions: i32,
    ) -> Vec<(i32, i64)> {
        produce_each(&self.producer(), topic, payloads, partitions).await
    }

    pub async fn read_all(&self, topic: &str) -> Vec<sidetrack::testing::Record> {
        sidetrack::testing::read_all(&self.bootstrap(), topic)
            .await
            .unwrap()
    }

    pub async fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        sidetrack::testing::committed_offset(&self.bootstrap(), group, topic, partition)
            .await
            .unwrap()
    }
}

/// Runs the `sidetrack` CLI against `bootstrap` with `--timeout timeout` (and without the
/// caller's `KAFKA_BROKERS`); returns (exit code, stdout, stderr).
pub fn sidetrack_cli(bootstrap: &str, timeout: &str, args: &[&str]) -> (i32, String, String) {
    // `option_env!`: the binary needs the `cli` feature; every test binary compiles without it.
    let Some(bin) = option_env!("CARGO_BIN_EXE_sidetrack") else {
        panic!("the sidetrack binary is built only with the `cli` feature");
    };
    let out = std::process::Command::new(bin)
        .env_remove("KAFKA_BROKERS")
        .args(["--brokers", bootstrap, "--timeout", timeout])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Produces one record with any producer and waits for its ack.
pub use sidetrack::testing::produce as produce_with;

/// A scenario that hangs fails with its name instead of stalling the whole test run.
///
/// The one limit of every suite (the proxy suites had 240 s of their own before; a hang is a
/// failure either way, and a longer limit cannot fail a test that passed).
pub async fn within_limit(scenario: impl std::future::Future<Output = ()>) {
    const LIMIT: Duration = Duration::from_secs(300);
    if tokio::time::timeout(LIMIT, scenario).await.is_err() {
        panic!("scenario still running after {LIMIT:?}: hung");
    }
}

/// The broker matrix: one scenario, one test per back end, in a module named after it:
/// `NAME::embedded` (librdkafka's mock cluster, always runs), `NAME::apache_kafka`
/// (`SIDETRACK_TEST_APACHE_KAFKA`), `NAME::tansu` (`SIDETRACK_TEST_TANSU`) and `NAME::kfake`
/// (`SIDETRACK_TEST_KFAKE`). A test on an external back end whose variable is unset passes
/// after printing why ([`Backend::bootstrap`]). Every test runs on a two-thread tokio runtime.
///
/// Three forms, by what the scenario is given:
///
/// - `on_every_broker!(NAME, PARTITIONS, BODY)`: `BODY(env: Env)`, an async fn, with the
///   scenario's topic made (`PARTITIONS` partitions) and a group to use; on an external broker
///   both names get a unique suffix. `, names = (TOPIC, GROUP)` after `BODY` chooses the base
///   names (default [`TOPIC`], [`GROUP`]), for scenarios that share global state by name.
///   `BODY` runs [`within_limit`].
/// - `on_every_broker!(NAME, BODY)`: `BODY(broker: proxy::Broker)`, a bare broker with no
///   topic made (the proxy suites make their own); also [`within_limit`].
/// - `on_every_broker!(NAME, |backend| FUTURE)`: anything else; `FUTURE` is awaited with
///   `backend` bound to the [`Backend`], and does its own setup, skipping and time limit (the
///   crash ledgers, which run longer than [`within_limit`] allows, and scenarios that must
///   install something before the broker is set up).
///
/// One test on one back end: `cargo test --all-features --test SUITE NAME::kfake`.
#[macro_export]
macro_rules! on_every_broker {
    ($name:ident, |$backend:ident| $test:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let $backend = $crate::common::Backend::Embedded;
                $test.await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn apache_kafka() {
                let $backend = $crate::common::Backend::ApacheKafka;
                $test.await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tansu() {
                let $backend = $crate::common::Backend::Tansu;
                $test.await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kfake() {
                let $backend = $crate::common::Backend::Kfake;
                $test.await
            }
        }
    };
    ($name:ident, $partitions:expr, $body:ident $(,)?) => {
        $crate::on_every_broker!(
            $name,
            $partitions,
            $body,
            names = ($crate::common::TOPIC, $crate::common::GROUP)
        );
    };
    ($name:ident, $partitions:expr, $body:ident, names = ($topic:expr, $group:expr) $(,)?) => {
        $crate::on_every_broker!($name, |backend| async move {
            if let Some(env) = $crate::common::Env::on(backend, $topic, $group, $partitions).await {
                $crate::common::within_limit($body(env)).await
            }
        });
    };
    ($name:ident, $body:ident $(,)?) => {
        $crate::on_every_broker!($name, |backend| async move {
            if let Some(broker) = $crate::common::proxy::Broker::on(backend) {
                $crate::common::within_limit($body(broker)).await
            }
        });
    };
}

/// Creates `name` with `partitions` partitions and `replicas` replicas on the broker at
/// `bootstrap`, and waits until metadata shows every partition (a producer that looks a topic
/// up too early sees it missing, or with fewer partitions than asked).
pub async fn create_topic_on(bootstrap: &str, name: &str, partitions: i32, replicas: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(replicas));
    let r = admin
        .create_topics(
            [&t],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap();
    assert!(r[0].is_ok(), "creating {name}: {:?}", r[0]);
    let (b, name) = (bootstrap.to_owned(), name.to_owned());
    let ok = wait_until(WAIT, || {
        let (b, name) = (b.clone(), name.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::Consumer;
                let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &b)
                    .create()
                    .unwrap();
                c.fetch_metadata(Some(&name), Duration::from_secs(5))
                    .map(|m| {
                        m.topics()
                            .iter()
                            .any(|t| t.name() == name && t.partitions().len() as i32 == partitions)
                    })
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;
    assert!(ok, "topic {name} never appeared");
}
