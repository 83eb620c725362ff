//! Runtime configuration: a serde struct with defaults, loadable from TOML, checked by
//! [`Config::validate`].
//!
//! Durations are written the human way (`"500ms"`, `"30s"`, `"10m"`). Unknown fields are
//! rejected so that a typo does not silently fall back to a default.
//!
//! ```
//! let config = sidetrack::Config::from_toml_str(r#"
//!     brokers = "localhost:9092"
//!     group = "billing"
//!     topics = ["orders"]
//!
//!     [retry]
//!     tiers = [{ delay = "1s", attempts = 3 }, { delay = "30s", attempts = 2 }]
//!
//!     [consumer]            # raw librdkafka properties, passed through
//!     "session.timeout.ms" = "10000"
//! "#).unwrap();
//! assert_eq!(config.retry.policy().unwrap().max_retries(), 5);
//! ```
//!
//! # Layout
//!
//! The module is split by what a reader comes for:
//!
//! - this file: the structs a user writes (one per TOML section), with their serde defaults,
//!   and the public limits; every field's doc says its default, what it means and what it
//!   costs to change it;
//! - `managed.rs`: the librdkafka properties sidetrack sets itself and refuses to let a
//!   `[consumer]`/`[producer]` table override, each with the guarantee it protects;
//! - `validate.rs`: [`Config::validate`], [`RetryConfig::policy`] and [`ConfigError`]: every
//!   rule a value must meet before anything connects.
//!
//! The structs stay plain data so that a config can be built in code, parsed from TOML or
//! cloned and edited (the CLI does all three); nothing here talks to a broker.

mod managed;
#[cfg(test)]
mod tests;
mod validate;

pub use crate::telemetry::config::{ProcessParent, TracingConfig};
pub(crate) use managed::canonical_property;
pub(crate) use validate::check_topic_name;
pub use validate::ConfigError;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::Tier;

/// The whole runtime configuration.
///
/// Everything has a default except `brokers`, `group` and `topics`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Bootstrap servers, comma separated (`host:port,host:port`). Required (no default).
    /// Used by both consumers and the hand-off producer; security settings go in
    /// [`consumer`](Config::consumer) and [`producer`](Config::producer).
    pub brokers: String,
    /// Consumer group of the main consumer. Required. Also written into every envelope and
    /// rendered into the retry and dead-letter topic names (`{group}`), so renaming the group
    /// starts new side topics: records waiting in the old tiers are not read any more.
    pub group: String,
    /// Topics to consume. Required, at least one, each a legal Kafka topic name, none twice.
    /// Each gets its own retry tier topics and dead-letter topic.
    pub topics: Vec<String>,
    /// Retry policy and retry topic naming. Default: tiers `1s × 3, 30s × 2, 10m × 1`, topics
    /// `{topic}.{group}.retry.{delay}`, retry consumer group `{group}.retry`.
    pub retry: RetryConfig,
    /// Dead-letter topic naming (default `{topic}.{group}.dlq`) and the flood breaker (on by
    /// default).
    pub dead_letter: DeadLetterConfig,
    /// Whether and how missing retry/DLQ topics are created at start.
    pub provisioning: ProvisioningConfig,
    /// How records are handed to retry and dead-letter topics.
    pub handoff: HandoffConfig,
    /// Metrics: an optional Prometheus endpoint and the lag sampling interval.
    pub metrics: MetricsConfig,
    /// Dead-letter alerts.
    pub alerts: AlertsConfig,
    /// `[tracing]`: OpenTelemetry spans over OTLP (feature `otel`); absent, nothing is
    /// exported. See [`TracingConfig`] and `docs/tracing.md`.
    pub tracing: Option<TracingConfig>,
    /// How long shutdown waits for in-flight handlers before abandoning them (their offsets are
    /// then not stored, so they are delivered again after a restart). Default 30 s, at most
    /// 24 h. Longer lets slow handlers finish (fewer records handled twice) but delays a
    /// deploy; keep it below your orchestrator's kill grace period, or the process is killed
    /// before the final commit and more records are handled again.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Longest one handler call may run (default 60 s). When it passes, the call's future is
    /// dropped and the record is a retryable failure ("timed out after …"): it goes to its
    /// retry tier, or to the DLQ as `exhausted` when no retry is left, like any other failure,
    /// and is counted in `sidetrack_handler_timeouts_total`. A handler may set its own limit
    /// with [`Handler::timeout`](crate::Handler::timeout). A call that blocks its thread cannot
    /// be cancelled (see `handler_blocking_after`). 1 ms to 24 h.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// A handler call still running after this long is logged once at WARN, with its topic,
    /// partition, offset and key (default 10 s; no warning when it is not shorter than the
    /// call's time limit). 1 ms to 24 h.
    #[serde(with = "humantime_serde")]
    pub handler_warn_after: Duration,
    /// A handler that holds its thread this long inside one poll of its future (a blocking
    /// call, not an `.await`) is reported once at ERROR and counted in
    /// `sidetrack_handler_blocking_total` (default 2 s; checked every 100 ms). 100 ms to 1 h.
    #[serde(with = "humantime_serde")]
    pub handler_blocking_after: Duration,
    /// Which records of one partition may be handled at the same time; the same for source
    /// and retry tier partitions. Default `partition` (one at a time, in offset order); `key`
    /// and `unordered` trade order for throughput. See [`Ordering`].
    pub ordering: Ordering,
    /// Handler calls at once per partition in `key` and `unordered` ordering (ignored for
    /// `partition`, which runs one). Default 64, 1 to 10,000. Higher helps handlers that wait
    /// on I/O; it also raises the load a partition can put on whatever the handler calls.
    pub max_in_flight: usize,
    /// Records per partition that may wait behind a record of the same key (`key` ordering).
    /// When it is full the partition takes no new record until one starts. Default 1,024, at
    /// most 1,000,000; it bounds the memory a hot key can hold.
    pub max_waiting: usize,
    /// Records per partition that may be taken past the oldest one still without a durable
    /// outcome (in a handler call, waiting, or its hand-off not acknowledged). It bounds memory
    /// and the records handled again after a crash; when it is reached the partition takes no
    /// new record until the oldest is done. Default 10,000, 1 to 1,000,000.
    pub max_ahead: usize,
    /// Raw librdkafka properties for both consumers (main and retry). Properties that would void
    /// a guarantee (`group.id`, `bootstrap.servers`, offset storing and committing) are
    /// rejected by [`Config::validate`] with the reason. `auto.offset.reset` applies to the main
    /// consumer only: the retry consumer always starts from the earliest offset. Default:
    /// empty (librdkafka's defaults, plus what sidetrack sets).
    pub consumer: BTreeMap<String, String>,
    /// Raw librdkafka properties for the hand-off producer. Properties that would void a
    /// guarantee (`acks` other than `all`, `enable.idempotence=false`, timeouts that
    /// `handoff.timeout` sets, transactions) are rejected by [`Config::validate`] with the
    /// reason. Default: empty.
    pub producer: BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            brokers: String::new(),
            group: String::new(),
            topics: Vec::new(),
            retry: RetryConfig::default(),
            dead_letter: DeadLetterConfig::default(),
            provisioning: ProvisioningConfig::default(),
            handoff: HandoffConfig::default(),
            metrics: MetricsConfig::default(),
            alerts: AlertsConfig::default(),
            tracing: None,
            shutdown_timeout: Duration::from_secs(30),
            handler_timeout: DEFAULT_HANDLER_TIMEOUT,
            handler_warn_after: Duration::from_secs(10),
            handler_blocking_after: Duration::from_secs(2),
            ordering: Ordering::Partition,
            max_in_flight: 64,
            max_waiting: 1024,
            max_ahead: 10_000,
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// Which records of one partition may be handled at the same time.
///
/// Whatever the mode, offsets are committed only up to the contiguous frontier: one past the
/// last record of the longest prefix of the partition whose records all have a durable outcome
/// (handled, or acknowledged on a retry tier or the DLQ). Nothing past a record still in flight
/// is committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Ordering {
    /// One record at a time per partition, in offset order (the default).
    #[default]
    Partition,
    /// Records with the same key one at a time, in offset order; records with different keys
    /// concurrently, up to `max_in_flight` per partition. A record without a key is a key of
    /// its own. A failing record leaves for its retry tier without holding back the later
    /// records of its key (they are not parked behind it).
    Key,
    /// Any record concurrently with any other, up to `max_in_flight` per partition.
    Unordered,
}

impl Ordering {
    /// The config value (`partition`, `key`, `unordered`).
    pub fn as_str(self) -> &'static str {
        match self {
            Ordering::Partition => "partition",
            Ordering::Key => "key",
            Ordering::Unordered => "unordered",
        }
    }
}

/// Retry policy: either explicit tiers, or an exponential shorthand expanded into tiers.
///
/// Each tier is one topic with one fixed delay, so records in a tier become due in the order
/// they were written (first-in-first-due). When neither `tiers` nor `exponential` is set the
/// default is `1s × 3, 30s × 2, 10m × 1`. `tiers = []` disables retries: every failure goes to
/// the dead-letter topic as `exhausted` (or `permanent`/`poison`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Explicit tiers, in order (default: unset). At most 32 tiers and 1,000 retries in all;
    /// each delay is above zero, at most 365 d, and differs from the others (a tier is a
    /// topic). Set either this or `exponential`, not both.
    pub tiers: Option<Vec<Tier>>,
    /// Exponential shorthand, expanded into tiers (default: unset).
    pub exponential: Option<ExponentialConfig>,
    /// Retry topic name pattern; `{topic}`, `{group}` and `{delay}` are replaced
    /// (`{delay}` is written compactly: `500ms`, `30s`, `1m30s`, `2h`). Default
    /// `{topic}.{group}.retry.{delay}`, which `sidetrack lag` and `dlq replay` recognise
    /// without a config; another pattern needs `--config` there.
    pub topic: String,
    /// Consumer group of the retry consumer; `{group}` is replaced (default `{group}.retry`;
    /// must differ from `group`). A separate group keeps the retry consumer's rebalances from
    /// disturbing the main consumer.
    pub group: String,
    /// Keep each key's order through retries (default `false`; `partition` and `key`
    /// ordering only). While a record is on a retry tier its key *waits*: the key's later
    /// records are held in the source partition's key-order log
    /// (`{topic}.{group}.key-order`) instead of being handled, and follow in order when it
    /// ends. Costs one small write per failure, one write and one read per held record, and
    /// one log partition per source partition; a partition where nothing fails pays one branch
    /// per record. See `docs/key-order.md`.
    pub keep_key_order: bool,
    /// What happens to the held records of a key whose head is dead-lettered (default
    /// `release`). Only with `keep_key_order`.
    pub on_dead_letter: OnDeadLetter,
    /// Keys that may wait at once per partition (default 1,000; 1 to 1,000,000). At the cap
    /// the partition takes no new record until a key is released; held records never count.
    pub max_waiting_keys: usize,
    /// Records that may be held behind one key (default 1,000; 1 to 1,000,000). A record past
    /// it is dead-lettered as `key-order-full` and its key keeps waiting, so one hot key never
    /// freezes its partition.
    pub max_held_per_key: usize,
    /// Longest a key may wait (default 24 h; 1 s to 365 d). A head whose key waited longer is
    /// dead-lettered as `key-order-timeout` by its retry tier when it next comes due, which
    /// releases the key: the wait is bounded by this plus one tier delay.
    #[serde(with = "humantime_serde")]
    pub max_key_wait: Duration,
}

/// What happens to the records held behind a head that is dead-lettered
/// (`[retry] on_dead_letter`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OnDeadLetter {
    /// The held records are handled, in order; the envelope of the key's next record, if it
    /// is retried or dead-lettered, says that an earlier record of its key was dead-lettered
    /// (the default).
    #[default]
    Release,
    /// Every record held behind the head is dead-lettered with it, in order
    /// (`key-dead-lettered`).
    DeadLetterKey,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            tiers: None,
            exponential: None,
            topic: "{topic}.{group}.retry.{delay}".to_owned(),
            group: "{group}.retry".to_owned(),
            keep_key_order: false,
            on_dead_letter: OnDeadLetter::Release,
            max_waiting_keys: 1_000,
            max_held_per_key: 1_000,
            max_key_wait: Duration::from_secs(24 * 3600),
        }
    }
}

impl RetryConfig {
    /// Explicit tiers, with default topic naming.
    pub fn tiers(tiers: impl IntoIterator<Item = Tier>) -> Self {
        RetryConfig {
            tiers: Some(tiers.into_iter().collect()),
            ..RetryConfig::default()
        }
    }

    /// The exponential shorthand, with default topic naming.
    pub fn exponential(exponential: ExponentialConfig) -> Self {
        RetryConfig {
            exponential: Some(exponential),
            ..RetryConfig::default()
        }
    }

    /// No retries at all: every failure is dead-lettered.
    pub fn disabled() -> Self {
        Self::tiers([])
    }
}

/// Exponential backoff shorthand: delay `n` (0-based) is `initial × factor^n`, capped at
/// `max_delay`, for `max_attempts` retries. Equal consecutive delays share one tier (one
/// topic). `jitter` adds up to that fraction of the delay, at random, to each due time; it
/// never makes a record due earlier than its tier's delay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExponentialConfig {
    /// First retry delay (default 1 s, at least 1 ms).
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Growth factor between retries (default 2, ≥ 1). Each distinct delay is a tier, and a
    /// tier is a topic: a small factor with many attempts makes many topics.
    pub factor: f64,
    /// Upper bound on any delay (default 10 min, at most 365 d, at least `initial`). Delays
    /// that reach it share its tier.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Number of retries after the first delivery (default 5, 1 to 1,000; the first delivery
    /// is not counted).
    pub max_attempts: u32,
    /// Extra random delay, as a fraction of the delay, in `[0, 1]` (default 0.1). Spreads the
    /// retries of records that failed together (an outage) so they do not all come due in the
    /// same instant; 0 keeps due times exact.
    pub jitter: f64,
}

impl Default for ExponentialConfig {
    fn default() -> Self {
        ExponentialConfig {
            initial: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(600),
            max_attempts: 5,
            jitter: 0.1,
        }
    }
}

/// Dead-letter topic naming and the dead-letter flood breaker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Dead-letter topic name pattern; `{topic}` and `{group}` are replaced. Default
    /// `{topic}.{group}.dlq`, the name the CLI and alerts derive without a config.
    pub topic: String,
    /// When a partition dead-letters too much, pause it instead of draining it into the DLQ
    /// (on by default; see [`BreakerConfig`]).
    pub breaker: BreakerConfig,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            topic: "{topic}.{group}.dlq".to_owned(),
            breaker: BreakerConfig::default(),
        }
    }
}

/// The dead-letter flood breaker, per partition (source and retry tier partitions alike).
///
/// Every record outcome of a partition (handled, sent to a retry tier, dead-lettered, for any
/// reason) is counted. The breaker *trips* when a dead letter makes `consecutive` dead letters
/// in a row, or `window_dead_letters` among the last `window` outcomes. The record that trips
/// it is dead-lettered; nothing after it is: the partition is paused (records in handler calls
/// finish, and one that would be dead-lettered is not, and stays in the topic), an ERROR is
/// logged, the notifiers get an alert and `sidetrack_dead_letter_breaker_open` is 1. After
/// `cool_down` one record is tried (half-open): handled or sent to a retry tier closes the
/// breaker; dead-lettered opens it again for twice as long, up to `max_cool_down`.
/// `RuntimeHandle::close_breaker` closes it at once.
///
/// The defaults (on; 100 in a row or 100 of the last 200) leave a steady poison rate of up to
/// tens of percent alone: at 10% the chance of 100 in 200 is below 1e-40. They stop a bad
/// deploy, where every record fails, after 100 dead letters per partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// On (the default) or off. Off drains a partition into the DLQ however fast it fails:
    /// nothing stops, and a bad deploy dead-letters everything it reads.
    pub enabled: bool,
    /// Dead letters in a row that trip the breaker (default 100, at least 1). Lower stops a
    /// bad deploy sooner and trips on shorter runs of genuinely bad records.
    pub consecutive: u32,
    /// Outcomes looked at for `window_dead_letters` (default 200, 1 to 65,536; one bit each
    /// per partition).
    pub window: u32,
    /// Dead letters among the last `window` outcomes that trip the breaker (default 100, 1 to
    /// `window`).
    pub window_dead_letters: u32,
    /// How long an open breaker keeps its partition paused before trying one record (default
    /// 60 s, 1 ms to 24 h).
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
    /// The cool-down doubles each time the record tried is dead-lettered again, up to this
    /// (default 10 min, 1 ms to 24 h, at least `cool_down`).
    #[serde(with = "humantime_serde")]
    pub max_cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            consecutive: 100,
            window: 200,
            window_dead_letters: 100,
            cool_down: Duration::from_secs(60),
            max_cool_down: Duration::from_secs(600),
        }
    }
}

/// Longest outcome window of the breaker: its bits are kept per partition.
pub(crate) const MAX_BREAKER_WINDOW: u32 = 65_536;

/// Creation of retry and dead-letter topics at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    /// Create missing retry/DLQ topics (with the source topic's partition count). Default
    /// true. When false, start-up fails with an error naming the missing topics: for clusters
    /// where topics are created by a pipeline, not by applications.
    pub auto_create: bool,
    /// Replication factor for created topics; `-1` (the default) means the broker's default.
    /// Otherwise at least 1; a retry or dead letter is only as durable as this allows.
    pub replication_factor: i32,
    /// How long topic checks and creation may take (default 10 s, 1 ms to 1 h).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        ProvisioningConfig {
            auto_create: true,
            replication_factor: -1,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The hand-off of a failed record to a retry or dead-letter topic.
///
/// A hand-off that fails is retried with exponential backoff between `backoff_initial` and
/// `backoff_max`, forever, with the source partition paused: the source offset is never
/// stored past a record that has not been durably handed off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    /// How long one produce attempt may take before it counts as failed
    /// (librdkafka `message.timeout.ms`). Default 10 s, 1 ms to 24 d. Shorter notices a broker
    /// outage sooner; too short fails hand-offs that a slow but healthy cluster would take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First pause after a failed hand-off (default 100 ms, 1 ms to 1 h).
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest pause between hand-off attempts (default 10 s, up to 1 h, at least
    /// `backoff_initial`): also how long recovery may lag behind a broker coming back.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Metrics settings. Metrics are always recorded through the `metrics` facade; these only
/// control what sidetrack itself serves and samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus `/metrics` on this address (e.g. `"127.0.0.1:9464"`); installs the
    /// process-wide recorder. Off by default: install your own recorder instead if you like.
    /// Needs the `prometheus` feature (on by default).
    pub listen: Option<std::net::SocketAddr>,
    /// How often consumer lag is sampled (a watermark query per owned partition). Default
    /// 5 s, 100 ms to 24 h; shorter costs broker requests, longer makes lag alerts slower.
    #[serde(with = "humantime_serde")]
    pub lag_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            lag_interval: Duration::from_secs(5),
        }
    }
}

/// Dead-letter alerts: one per (topic, group) and window, with a count, the first few records
/// and the `sidetrack dlq` commands to inspect and replay them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Log each alert at WARN (target `sidetrack::alert`). Default true.
    pub log: bool,
    /// Also POST each alert to this webhook (JSON with a Slack-compatible `text`). Needs the
    /// `webhook` feature. Default: none.
    pub webhook: Option<String>,
    /// Aggregation window (default 1 min, 100 ms to 24 h): at most one alert per (topic,
    /// group) per window. Longer means fewer pages and a later first one.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Records shown per alert (default 5); the count covers all of them.
    pub max_examples: usize,
    /// Longest time one notifier call may take (default 10 s, 1 ms to 1 h), so a hanging
    /// webhook cannot hold alerts back.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How the CLI is invoked in the commands an alert shows (default `sidetrack`; e.g.
    /// `kubectl exec deploy/billing -- sidetrack` for commands that can be pasted as they are).
    pub command: String,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            log: true,
            webhook: None,
            window: Duration::from_secs(60),
            max_examples: 5,
            timeout: Duration::from_secs(10),
            command: "sidetrack".to_owned(),
        }
    }
}

/// Longest retry delay a tier may have: a retry topic must keep its records that long, and
/// delays beyond it are typos more often than plans.
pub const MAX_TIER_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most retries a policy may make in total.
pub const MAX_RETRIES: u32 = 1000;
/// Default of [`Config::handler_timeout`].
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest handler time limit (config or [`Handler::timeout`](crate::Handler::timeout)).
pub const MAX_HANDLER_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Most handler calls at once per partition.
pub const MAX_IN_FLIGHT: usize = 10_000;
/// Most records waiting or ahead of the frontier per partition.
pub const MAX_QUEUED: usize = 1_000_000;
/// Most tiers a policy may have (each is a topic per source topic).
pub const MAX_TIERS: usize = 32;

/// Reads a configuration file as text; the error names the path (shared with the proxy's
/// configuration, which lives in the same kind of file).
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl Config {
    /// A configuration with defaults for everything but the three required fields.
    pub fn new(
        brokers: impl Into<String>,
        group: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Config {
            brokers: brokers.into(),
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            ..Config::default()
        }
    }

    /// Parses TOML text. The result is not validated yet; see [`Config::validate`].
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Reads and parses a TOML file. The result is not validated yet.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::from_toml_str(&read_file(path.as_ref())?)
    }
}
