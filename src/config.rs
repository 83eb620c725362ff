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

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::{RetryPolicy, Tier, Topology};

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field holds a value that cannot work; `field` is its dotted path.
    #[error("{field}: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `retry.tiers[1].delay`.
        field: String,
        /// Why the value was rejected.
        reason: String,
    },
    /// The TOML text could not be parsed into a [`Config`].
    #[error("cannot parse configuration: {0}")]
    Parse(String),
    /// The configuration file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The whole runtime configuration.
///
/// Everything has a default except `brokers`, `group` and `topics`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Bootstrap servers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Consumer group of the main consumer. Also written into every envelope.
    pub group: String,
    /// Topics to consume. Each gets its own retry tier topics and dead-letter topic.
    pub topics: Vec<String>,
    /// Retry policy and retry topic naming.
    pub retry: RetryConfig,
    /// Dead-letter topic naming.
    pub dead_letter: DeadLetterConfig,
    /// Whether and how missing retry/DLQ topics are created at start.
    pub provisioning: ProvisioningConfig,
    /// How records are handed to retry and dead-letter topics.
    pub handoff: HandoffConfig,
    /// Metrics: an optional Prometheus endpoint and the lag sampling interval.
    pub metrics: MetricsConfig,
    /// Dead-letter alerts.
    pub alerts: AlertsConfig,
    /// How long shutdown waits for in-flight handlers before abandoning them (their offsets are
    /// then not stored, so they are delivered again after a restart).
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
    /// and retry tier partitions. See [`Ordering`].
    pub ordering: Ordering,
    /// Handler calls at once per partition in `key` and `unordered` ordering (ignored for
    /// `partition`, which runs one).
    pub max_in_flight: usize,
    /// Records per partition that may wait behind a record of the same key (`key` ordering).
    /// When it is full the partition takes no new record until one starts.
    pub max_waiting: usize,
    /// Records per partition that may be taken past the oldest one still without a durable
    /// outcome (in a handler call, waiting, or its hand-off not acknowledged). It bounds memory
    /// and the records handled again after a crash; when it is reached the partition takes no
    /// new record until the oldest is done.
    pub max_ahead: usize,
    /// Raw librdkafka properties for both consumers (main and retry). Properties that would void
    /// a guarantee (`group.id`, `bootstrap.servers`, offset storing and committing) are
    /// rejected by [`Config::validate`] with the reason. `auto.offset.reset` applies to the main
    /// consumer only: the retry consumer always starts from the earliest offset.
    pub consumer: BTreeMap<String, String>,
    /// Raw librdkafka properties for the hand-off producer. Properties that would void a
    /// guarantee (`acks` other than `all`, `enable.idempotence=false`, timeouts that
    /// `handoff.timeout` sets, transactions) are rejected by [`Config::validate`] with the
    /// reason.
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
    /// Explicit tiers, in order.
    pub tiers: Option<Vec<Tier>>,
    /// Exponential shorthand.
    pub exponential: Option<ExponentialConfig>,
    /// Retry topic name pattern; `{topic}`, `{group}` and `{delay}` are replaced
    /// (`{delay}` is written compactly: `500ms`, `30s`, `1m30s`, `2h`).
    pub topic: String,
    /// Consumer group of the retry consumer; `{group}` is replaced. A separate group keeps the
    /// retry consumer's rebalances from disturbing the main consumer.
    pub group: String,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            tiers: None,
            exponential: None,
            topic: "{topic}.{group}.retry.{delay}".to_owned(),
            group: "{group}.retry".to_owned(),
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

    /// Resolves the configured policy (tiers, exponential shorthand or the default).
    pub fn policy(&self) -> Result<RetryPolicy, ConfigError> {
        match (&self.tiers, &self.exponential) {
            (Some(_), Some(_)) => Err(ConfigError::invalid(
                "retry",
                "set either `tiers` or `exponential`, not both",
            )),
            (Some(tiers), None) => {
                if tiers.len() > MAX_TIERS {
                    return Err(ConfigError::invalid(
                        "retry.tiers",
                        format!("at most {MAX_TIERS} tiers (each is a topic)"),
                    ));
                }
                let total = tiers
                    .iter()
                    .fold(0u64, |n, t| n.saturating_add(u64::from(t.attempts)));
                if total > u64::from(MAX_RETRIES) {
                    return Err(ConfigError::invalid(
                        "retry.tiers",
                        format!("at most {MAX_RETRIES} retries in total, not {total}"),
                    ));
                }
                for (i, tier) in tiers.iter().enumerate() {
                    if tier.delay > MAX_TIER_DELAY {
                        return Err(ConfigError::invalid(
                            format!("retry.tiers[{i}].delay"),
                            "must be at most 365d",
                        ));
                    }
                    if tier.delay.is_zero() {
                        return Err(ConfigError::invalid(
                            format!("retry.tiers[{i}].delay"),
                            "must be greater than zero",
                        ));
                    }
                    if tier.attempts == 0 {
                        return Err(ConfigError::invalid(
                            format!("retry.tiers[{i}].attempts"),
                            "must be at least 1 (remove the tier instead)",
                        ));
                    }
                    if let Some(j) = tiers[..i].iter().position(|t| t.delay == tier.delay) {
                        return Err(ConfigError::invalid(
                            format!("retry.tiers[{i}].delay"),
                            format!(
                                "same delay as retry.tiers[{j}]; each tier is its own topic, \
                                 merge them by adding up their attempts"
                            ),
                        ));
                    }
                }
                Ok(RetryPolicy::new(tiers.clone(), 0.0))
            }
            (None, Some(exp)) => exp.policy(),
            (None, None) => Ok(RetryPolicy::default()),
        }
    }
}

/// Exponential backoff shorthand: delay `n` (0-based) is `initial × factor^n`, capped at
/// `max_delay`, for `max_attempts` retries. Equal consecutive delays share one tier (one
/// topic). `jitter` adds up to that fraction of the delay, at random, to each due time; it
/// never makes a record due earlier than its tier's delay.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExponentialConfig {
    /// First retry delay.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Growth factor between retries (≥ 1).
    pub factor: f64,
    /// Upper bound on any delay.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Number of retries after the first delivery (the first delivery is not counted).
    pub max_attempts: u32,
    /// Extra random delay, as a fraction of the delay, in `[0, 1]`.
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

impl ExponentialConfig {
    fn policy(&self) -> Result<RetryPolicy, ConfigError> {
        let f = |name: &str| format!("retry.exponential.{name}");
        if self.initial < Duration::from_millis(1) {
            return Err(ConfigError::invalid(f("initial"), "must be at least 1ms"));
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(ConfigError::invalid(f("factor"), "must be a number ≥ 1"));
        }
        if self.max_delay > MAX_TIER_DELAY {
            return Err(ConfigError::invalid(f("max_delay"), "must be at most 365d"));
        }
        if self.max_attempts > MAX_RETRIES {
            return Err(ConfigError::invalid(
                f("max_attempts"),
                format!("must be at most {MAX_RETRIES}"),
            ));
        }
        if self.max_delay < self.initial {
            return Err(ConfigError::invalid(
                f("max_delay"),
                "must be at least `initial`",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                f("max_attempts"),
                "must be at least 1 (use `tiers = []` to disable retries)",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::invalid(f("jitter"), "must be within [0, 1]"));
        }
        Ok(RetryPolicy::new(
            crate::retry::expand_exponential(
                self.initial,
                self.factor,
                self.max_delay,
                self.max_attempts,
            ),
            self.jitter,
        ))
    }
}

/// Dead-letter topic naming and the dead-letter flood breaker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Dead-letter topic name pattern; `{topic}` and `{group}` are replaced.
    pub topic: String,
    /// When a partition dead-letters too much, pause it instead of draining it into the DLQ.
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
    /// On (the default) or off.
    pub enabled: bool,
    /// Dead letters in a row that trip the breaker (at least 1).
    pub consecutive: u32,
    /// Outcomes looked at for `window_dead_letters` (1 to 65,536).
    pub window: u32,
    /// Dead letters among the last `window` outcomes that trip the breaker (1 to `window`).
    pub window_dead_letters: u32,
    /// How long an open breaker keeps its partition paused before trying one record.
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
    /// The cool-down doubles each time the record tried is dead-lettered again, up to this.
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
    /// Create missing retry/DLQ topics (with the source topic's partition count). When false,
    /// start-up fails with an error naming the missing topics.
    pub auto_create: bool,
    /// Replication factor for created topics; `-1` means the broker's default.
    pub replication_factor: i32,
    /// How long topic checks and creation may take.
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
    /// (librdkafka `message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// First pause after a failed hand-off.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest pause between hand-off attempts.
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
    /// How often consumer lag is sampled (a watermark query per owned partition).
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
    /// Log each alert at WARN (target `sidetrack::alert`).
    pub log: bool,
    /// Also POST each alert to this webhook (JSON with a Slack-compatible `text`). Needs the
    /// `webhook` feature.
    pub webhook: Option<String>,
    /// Aggregation window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Records shown per alert.
    pub max_examples: usize,
    /// Longest time one notifier call may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How the CLI is invoked in the commands an alert shows.
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

/// A librdkafka property sidetrack sets itself, and why another value is refused.
struct Managed {
    key: &'static str,
    /// The only value accepted (compared trimmed, case-insensitively); `None`: never set by
    /// hand.
    keeps: Option<&'static [&'static str]>,
    why: &'static str,
}

const fn managed(key: &'static str, why: &'static str) -> Managed {
    Managed {
        key,
        keeps: None,
        why,
    }
}

const fn keeps(key: &'static str, values: &'static [&'static str], why: &'static str) -> Managed {
    Managed {
        key,
        keeps: Some(values),
        why,
    }
}

/// Consumer properties that would void a guarantee. `auto.offset.reset` is not here: the main
/// consumer takes the user's choice, the retry consumer always reads from the earliest offset
/// (a record waiting in a tier across a restart must not be skipped).
const MANAGED_CONSUMER_PROPS: &[Managed] = &[
    managed(
        "offset.store.method",
        "offsets are stored in the group coordinator, as sidetrack commits them",
    ),
    managed("bootstrap.servers", "use the top-level `brokers`"),
    managed("metadata.broker.list", "use the top-level `brokers`"),
    managed("group.id", "use the top-level `group` (and `retry.group`)"),
    keeps(
        "enable.auto.offset.store",
        &["false"],
        "sidetrack stores an offset only after the record has a durable outcome; librdkafka \
         storing it on delivery would commit records that were never handled",
    ),
    keeps(
        "enable.auto.commit",
        &["true"],
        "the offsets sidetrack stores are committed by auto-commit (tune it with \
         `auto.commit.interval.ms`); without it nothing is committed until shutdown, and a \
         crash hands everything handled since the start to the next owner",
    ),
    keeps(
        "enable.partition.eof",
        &["false"],
        "partition tasks read records, not end-of-partition events",
    ),
];

/// Producer properties of the hand-off producer that would void a guarantee.
const MANAGED_PRODUCER_PROPS: &[Managed] = &[
    managed("bootstrap.servers", "use the top-level `brokers`"),
    managed("metadata.broker.list", "use the top-level `brokers`"),
    // Also `request.required.acks`: `canonical_property` resolves aliases before the lookup.
    keeps(
        "acks",
        &["all", "-1"],
        "a retry or dead letter counts as durable, and its source offset is stored, only once \
         every in-sync replica has it; with fewer acknowledgements it can be lost with a broker",
    ),
    keeps(
        "enable.idempotence",
        &["true"],
        "hand-offs are resent after failures; without idempotence a resend can duplicate or \
         reorder records on the side topics, and an acknowledgement of a record in no log \
         cannot be told apart",
    ),
    managed("message.timeout.ms", "set `handoff.timeout` instead"),
    managed("delivery.timeout.ms", "set `handoff.timeout` instead"),
    managed(
        "transactional.id",
        "hand-offs are acknowledged one by one, not in transactions",
    ),
];

/// The property librdkafka will set for `key`: without surrounding blanks, without the
/// `topic.` prefix (librdkafka applies `topic.x` to the default topic configuration, where
/// `x` lives, so both spellings set the same property), and with aliases resolved.
pub(crate) fn canonical_property(key: &str) -> &str {
    let key = key.trim();
    let key = key.strip_prefix("topic.").unwrap_or(key);
    match key {
        "max.in.flight" => "max.in.flight.requests.per.connection",
        "request.required.acks" => "acks",
        "auto.commit.enable" => "enable.auto.commit",
        other => other,
    }
}

/// The first property of `props` that a managed rule refuses, as a config error.
fn check_managed(
    section: &str,
    props: &BTreeMap<String, String>,
    rules: &[Managed],
) -> Result<(), ConfigError> {
    for (key, value) in props {
        let name = canonical_property(key);
        let Some(rule) = rules.iter().find(|r| r.key == name) else {
            continue;
        };
        let value = value.trim();
        match rule.keeps {
            Some(ok) if ok.iter().any(|v| v.eq_ignore_ascii_case(value)) => {}
            Some(ok) => {
                return Err(ConfigError::invalid(
                    format!("{section}.\"{key}\""),
                    format!("must stay \"{}\": {}", ok[0], rule.why),
                ))
            }
            None => {
                return Err(ConfigError::invalid(
                    format!("{section}.\"{key}\""),
                    format!("is managed by sidetrack: {}", rule.why),
                ))
            }
        }
    }
    for (key, value) in props {
        let bad = |reason: &str| {
            Err(ConfigError::invalid(
                format!("{section}.\"{key}\""),
                reason.to_owned(),
            ))
        };
        match (section, canonical_property(key)) {
            ("producer", "max.in.flight.requests.per.connection")
                if !matches!(value.trim().parse::<u32>(), Ok(1..=5)) =>
            {
                return bad(
                    "must be 1 to 5: the idempotent producer keeps order and avoids duplicates \
                     only within that bound",
                )
            }
            ("consumer", "auto.commit.interval.ms")
                if !matches!(value.trim().parse::<u32>(), Ok(1..)) =>
            {
                return bad(
                    "must be at least 1: 0 switches the periodic commit of stored offsets off, \
                     and a crash would hand everything handled since the start to the next owner",
                )
            }
            _ => {}
        }
    }
    Ok(())
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

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

    /// Checks every field, including the topic names the patterns produce.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "brokers",
                "must name at least one broker (host:port)",
            ));
        }
        if self.group.trim().is_empty() {
            return Err(ConfigError::invalid("group", "must not be empty"));
        }
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                "topics",
                "must list at least one topic to consume",
            ));
        }
        let mut seen = HashSet::new();
        for (i, topic) in self.topics.iter().enumerate() {
            check_topic_name(topic).map_err(|r| ConfigError::invalid(format!("topics[{i}]"), r))?;
            if !seen.insert(topic) {
                return Err(ConfigError::invalid(
                    format!("topics[{i}]"),
                    format!("`{topic}` is listed twice"),
                ));
            }
        }
        let policy = self.retry.policy()?;
        if !self.retry.group.contains("{group}") && self.retry.group.trim().is_empty() {
            return Err(ConfigError::invalid("retry.group", "must not be empty"));
        }
        if self.retry.group.replace("{group}", &self.group) == self.group {
            return Err(ConfigError::invalid(
                "retry.group",
                "must differ from `group`, so the two consumers do not share a group",
            ));
        }
        // Building the topology renders every name and checks them for clashes.
        Topology::new(self, &policy)?;
        for (field, value) in [
            ("handoff.timeout", self.handoff.timeout),
            ("handoff.backoff_initial", self.handoff.backoff_initial),
            ("handoff.backoff_max", self.handoff.backoff_max),
            ("provisioning.timeout", self.provisioning.timeout),
            ("alerts.timeout", self.alerts.timeout),
            ("handler_timeout", self.handler_timeout),
            ("handler_warn_after", self.handler_warn_after),
        ] {
            if value < Duration::from_millis(1) {
                return Err(ConfigError::invalid(field, "must be at least 1ms"));
            }
        }
        for (field, value) in [
            ("metrics.lag_interval", self.metrics.lag_interval),
            ("alerts.window", self.alerts.window),
            ("handler_blocking_after", self.handler_blocking_after),
        ] {
            if value < Duration::from_millis(100) {
                return Err(ConfigError::invalid(field, "must be at least 100ms"));
            }
        }
        // Upper bounds: librdkafka takes at most 2^31-1 ms for a timeout, and deadlines are
        // computed by adding these to the clock, which must not overflow.
        for (field, value, max, text) in [
            ("handoff.timeout", self.handoff.timeout, DAY * 24, "24d"),
            (
                "handoff.backoff_initial",
                self.handoff.backoff_initial,
                HOUR,
                "1h",
            ),
            ("handoff.backoff_max", self.handoff.backoff_max, HOUR, "1h"),
            (
                "provisioning.timeout",
                self.provisioning.timeout,
                HOUR,
                "1h",
            ),
            ("alerts.timeout", self.alerts.timeout, HOUR, "1h"),
            ("shutdown_timeout", self.shutdown_timeout, DAY, "24h"),
            (
                "metrics.lag_interval",
                self.metrics.lag_interval,
                DAY,
                "24h",
            ),
            ("alerts.window", self.alerts.window, DAY, "24h"),
            ("handler_timeout", self.handler_timeout, DAY, "24h"),
            ("handler_warn_after", self.handler_warn_after, DAY, "24h"),
            (
                "handler_blocking_after",
                self.handler_blocking_after,
                HOUR,
                "1h",
            ),
        ] {
            if value > max {
                return Err(ConfigError::invalid(
                    field,
                    format!("must be at most {text}"),
                ));
            }
        }
        if self.alerts.webhook.is_some() && !cfg!(feature = "webhook") {
            return Err(ConfigError::invalid(
                "alerts.webhook",
                "this build has no webhook support; enable the `webhook` feature",
            ));
        }
        if self.metrics.listen.is_some() && !cfg!(feature = "prometheus") {
            return Err(ConfigError::invalid(
                "metrics.listen",
                "this build has no Prometheus exporter; enable the `prometheus` feature",
            ));
        }
        if self.handoff.backoff_max < self.handoff.backoff_initial {
            return Err(ConfigError::invalid(
                "handoff.backoff_max",
                "must be at least handoff.backoff_initial",
            ));
        }
        self.dead_letter.breaker.validate()?;
        if self.provisioning.replication_factor == 0 || self.provisioning.replication_factor < -1 {
            return Err(ConfigError::invalid(
                "provisioning.replication_factor",
                "must be -1 (broker default) or at least 1",
            ));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            return Err(ConfigError::invalid(
                "max_in_flight",
                format!("must be 1 to {MAX_IN_FLIGHT}"),
            ));
        }
        if self.max_waiting > MAX_QUEUED {
            return Err(ConfigError::invalid(
                "max_waiting",
                format!("must be at most {MAX_QUEUED}"),
            ));
        }
        if !(1..=MAX_QUEUED).contains(&self.max_ahead) {
            return Err(ConfigError::invalid(
                "max_ahead",
                format!("must be 1 to {MAX_QUEUED}"),
            ));
        }
        check_managed("consumer", &self.consumer, MANAGED_CONSUMER_PROPS)?;
        check_managed("producer", &self.producer, MANAGED_PRODUCER_PROPS)?;
        Ok(())
    }
}

impl BreakerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let field = |f: &str| format!("dead_letter.breaker.{f}");
        if self.consecutive == 0 {
            return Err(ConfigError::invalid(
                field("consecutive"),
                "must be at least 1",
            ));
        }
        if !(1..=MAX_BREAKER_WINDOW).contains(&self.window) {
            return Err(ConfigError::invalid(
                field("window"),
                format!("must be 1 to {MAX_BREAKER_WINDOW}"),
            ));
        }
        if !(1..=self.window).contains(&self.window_dead_letters) {
            return Err(ConfigError::invalid(
                field("window_dead_letters"),
                "must be 1 to `window`",
            ));
        }
        // Deadlines are the clock plus these: they must not overflow.
        for (f, value) in [
            ("cool_down", self.cool_down),
            ("max_cool_down", self.max_cool_down),
        ] {
            if value < Duration::from_millis(1) || value > DAY {
                return Err(ConfigError::invalid(field(f), "must be 1ms to 24h"));
            }
        }
        if self.max_cool_down < self.cool_down {
            return Err(ConfigError::invalid(
                field("max_cool_down"),
                "must be at least `cool_down`",
            ));
        }
        Ok(())
    }
}

/// Kafka's own rule for topic names.
pub(crate) fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name must not be empty".into());
    }
    if name.len() > 249 {
        return Err(format!("`{name}` is longer than 249 characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{name}` contains `{c}`; topic names use only a-z A-Z 0-9 . _ -"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::new("localhost:9092", "billing", ["orders"])
    }

    fn field_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn defaults_validate() {
        base().validate().unwrap();
        let policy = base().retry.policy().unwrap();
        assert_eq!(policy.tiers().len(), 3);
        assert_eq!(policy.max_retries(), 6);
    }

    #[test]
    fn breaker_limits_are_checked_when_enabled() {
        let b = BreakerConfig::default();
        assert!(b.enabled);
        assert_eq!(
            (b.consecutive, b.window, b.window_dead_letters),
            (100, 200, 100)
        );
        type Change = fn(&mut BreakerConfig);
        let bad: [(&str, Change); 7] = [
            ("consecutive", |b| b.consecutive = 0),
            ("window", |b| b.window = 0),
            ("window", |b| b.window = MAX_BREAKER_WINDOW + 1),
            ("window_dead_letters", |b| b.window_dead_letters = 201),
            ("window_dead_letters", |b| b.window_dead_letters = 0),
            ("cool_down", |b| b.cool_down = Duration::ZERO),
            ("max_cool_down", |b| {
                b.max_cool_down = Duration::from_secs(59)
            }),
        ];
        for (field, change) in bad {
            let mut c = base();
            change(&mut c.dead_letter.breaker);
            assert_eq!(
                field_of(c.validate().unwrap_err()),
                format!("dead_letter.breaker.{field}")
            );
            // Off: its limits are not looked at.
            c.dead_letter.breaker.enabled = false;
            c.validate().unwrap();
        }
        let c = Config::from_toml_str(
            r#"
            brokers = "k:9092"
            group = "g"
            topics = ["t"]
            [dead_letter.breaker]
            consecutive = 5
            cool_down = "2s"
            max_cool_down = "1m"
            "#,
        )
        .unwrap();
        assert_eq!(c.dead_letter.breaker.consecutive, 5);
        assert_eq!(c.dead_letter.breaker.cool_down, Duration::from_secs(2));
        assert_eq!(c.dead_letter.breaker.window, 200);
        c.validate().unwrap();
    }

    #[test]
    fn toml_with_tiers_and_raw_properties() {
        let c = Config::from_toml_str(
            r#"
            brokers = "b:9092"
            group = "g"
            topics = ["t"]
            shutdown_timeout = "5s"
            [retry]
            tiers = [{ delay = "1s", attempts = 3 }, { delay = "30s", attempts = 2 }, { delay = "10m", attempts = 1 }]
            [consumer]
            "session.timeout.ms" = "6000"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        let p = c.retry.policy().unwrap();
        assert_eq!(
            p.tiers()
                .iter()
                .map(|t| (t.delay.as_secs(), t.attempts))
                .collect::<Vec<_>>(),
            vec![(1, 3), (30, 2), (600, 1)]
        );
        assert_eq!(c.consumer["session.timeout.ms"], "6000");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let err = Config::from_toml_str("brokers = \"b\"\ngroupp = \"g\"").unwrap_err();
        assert!(err.to_string().contains("groupp"), "{err}");
        let err = Config::from_toml_str("[retry]\ntiers = [{ delay = \"1s\", atempts = 3 }]")
            .unwrap_err();
        assert!(err.to_string().contains("atempts"), "{err}");
    }

    #[test]
    fn bad_duration_is_a_parse_error() {
        let err = Config::from_toml_str("shutdown_timeout = \"soon\"").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut c = base();
        c.brokers.clear();
        assert_eq!(field_of(c.validate().unwrap_err()), "brokers");

        let mut c = base();
        c.topics = vec!["orders".into(), "bad topic".into()];
        assert_eq!(field_of(c.validate().unwrap_err()), "topics[1]");

        let mut c = base();
        c.retry = RetryConfig::tiers([
            Tier::new(Duration::from_secs(1), 2),
            Tier::new(Duration::from_secs(1), 1),
        ]);
        assert_eq!(field_of(c.validate().unwrap_err()), "retry.tiers[1].delay");

        let mut c = base();
        c.retry = RetryConfig::tiers([Tier::new(Duration::from_secs(1), 0)]);
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "retry.tiers[0].attempts"
        );

        let mut c = base();
        c.retry.exponential = Some(ExponentialConfig::default());
        c.retry.tiers = Some(vec![]);
        assert_eq!(field_of(c.validate().unwrap_err()), "retry");

        let mut c = base();
        c.retry = RetryConfig::exponential(ExponentialConfig {
            factor: 0.5,
            ..Default::default()
        });
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "retry.exponential.factor"
        );

        let mut c = base();
        c.retry.topic = "{topic}.retry".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "retry.topic");

        let mut c = base();
        c.consumer
            .insert("enable.auto.offset.store".into(), "true".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "consumer.\"enable.auto.offset.store\""
        );

        let mut c = base();
        c.retry.group = "{group}".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "retry.group");

        let mut c = base();
        c.topics = vec!["a".into(), "b".into()];
        c.dead_letter.topic = "all.dlq".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "dead_letter.topic");
    }

    fn reason_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { field, reason } => format!("{field}: {reason}"),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    /// Properties that would void a guarantee are refused with the reason; the values
    /// sidetrack sets itself are accepted.
    #[test]
    fn managed_properties_are_refused_with_their_reason() {
        let refused = |section: &str, key: &str, value: &str| {
            let mut c = base();
            let props = if section == "consumer" {
                &mut c.consumer
            } else {
                &mut c.producer
            };
            props.insert(key.into(), value.into());
            reason_of(c.validate().unwrap_err())
        };
        let r = refused("producer", "acks", "0");
        assert!(
            r.starts_with("producer.\"acks\": must stay \"all\": "),
            "{r}"
        );
        assert!(refused("producer", "acks", "1").contains("in-sync replica"));
        assert!(refused("producer", "request.required.acks", "1").contains("in-sync replica"));
        assert!(refused("producer", "enable.idempotence", "false").contains("must stay \"true\""));
        assert!(refused("producer", "transactional.id", "x").contains("is managed"));
        assert!(refused("producer", "message.timeout.ms", "5").contains("handoff.timeout"));
        assert!(
            refused("producer", "max.in.flight.requests.per.connection", "6").contains("1 to 5")
        );
        assert!(refused("consumer", "enable.auto.commit", "false").contains("must stay \"true\""));
        assert!(refused("consumer", "enable.auto.offset.store", "true").contains("durable"));
        assert!(refused("consumer", "group.id", "x").contains("`group`"));

        let mut c = base();
        c.producer.insert("acks".into(), "ALL".into());
        c.producer
            .insert("enable.idempotence".into(), "true".into());
        c.producer
            .insert("max.in.flight.requests.per.connection".into(), "1".into());
        c.producer.insert("compression.type".into(), "lz4".into());
        c.consumer
            .insert("enable.auto.commit".into(), "true".into());
        // A legitimate choice for the source topics; the retry consumer ignores it.
        c.consumer
            .insert("auto.offset.reset".into(), "latest".into());
        c.validate().unwrap();
    }

    #[test]
    fn absurd_sizes_are_refused_before_they_overflow() {
        let mut c = base();
        c.retry = RetryConfig::tiers([Tier::new(Duration::from_secs(400 * 24 * 3600), 1)]);
        assert_eq!(field_of(c.validate().unwrap_err()), "retry.tiers[0].delay");
        let mut c = base();
        c.retry = RetryConfig::tiers([Tier::new(Duration::from_secs(1), u32::MAX)]);
        assert_eq!(field_of(c.validate().unwrap_err()), "retry.tiers");
        let mut c = base();
        c.retry = RetryConfig::exponential(ExponentialConfig {
            max_attempts: u32::MAX,
            ..Default::default()
        });
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "retry.exponential.max_attempts"
        );
        let mut c = base();
        c.shutdown_timeout = Duration::MAX;
        assert_eq!(field_of(c.validate().unwrap_err()), "shutdown_timeout");
        let mut c = base();
        c.handoff.timeout = Duration::from_secs(30 * 24 * 3600);
        assert_eq!(field_of(c.validate().unwrap_err()), "handoff.timeout");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn duration_text() -> impl Strategy<Value = String> {
            prop_oneof![
                "[0-9]{1,25}(ns|us|ms|s|m|h|d|w|y)",
                "[0-9a-z .]{0,12}",
                Just("18446744073709551615s".to_owned()),
                Just("584942417355y".to_owned()),
            ]
        }

        fn number_text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|n| format!("{n:?}")),
                Just("nan".to_owned()),
                Just("inf".to_owned()),
            ]
        }

        proptest! {
            /// Any text: parsed or refused with a reason, never a panic.
            #[test]
            fn any_text_parses_or_is_refused(text in "\\PC{0,300}") {
                if let Ok(c) = Config::from_toml_str(&text) {
                    let _ = c.validate();
                }
            }

            /// Any durations and numbers in every field that takes them: validated (and the
            /// policy resolved) or refused with a reason, never a panic or an overflow.
            #[test]
            fn any_values_validate_or_are_refused(
                d in proptest::collection::vec(duration_text(), 12),
                n in proptest::collection::vec(number_text(), 4),
                attempts in any::<u32>(),
            ) {
                let text = format!(
                    r#"
                    brokers = "b:9092"
                    group = "g"
                    topics = ["t"]
                    shutdown_timeout = "{}"
                    [retry]
                    exponential = {{ initial = "{}", factor = {}, max_delay = "{}", max_attempts = {attempts}, jitter = {} }}
                    [handoff]
                    timeout = "{}"
                    backoff_initial = "{}"
                    backoff_max = "{}"
                    [metrics]
                    lag_interval = "{}"
                    [alerts]
                    window = "{}"
                    timeout = "{}"
                    "#,
                    d[0], d[1], n[0], d[2], n[1], d[3], d[4], d[5], d[6], d[7], d[8],
                );
                if let Ok(c) = Config::from_toml_str(&text) {
                    if c.validate().is_ok() {
                        let policy = c.retry.policy().unwrap();
                        for tier in 0..policy.tiers().len() {
                            let _ = policy.max_due_delay(tier);
                        }
                    }
                }
                let tiers = format!(
                    r#"
                    brokers = "b:9092"
                    group = "g"
                    topics = ["t"]
                    [retry]
                    tiers = [{{ delay = "{}", attempts = {attempts} }}, {{ delay = "{}", attempts = 1 }}]
                    "#,
                    d[9], d[10],
                );
                if let Ok(c) = Config::from_toml_str(&tiers) {
                    if c.validate().is_ok() {
                        let policy = c.retry.policy().unwrap();
                        prop_assert!(policy.max_retries() <= MAX_RETRIES);
                        let _ = policy.max_due_delay(0);
                    }
                }
            }
        }
    }

    #[test]
    fn disabled_retries_validate() {
        let mut c = base();
        c.retry = RetryConfig::disabled();
        c.validate().unwrap();
        assert_eq!(c.retry.policy().unwrap().max_retries(), 0);
    }
}
