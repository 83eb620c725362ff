//! The topology: every retry-tier and dead-letter topic name, rendered once from the configured
//! patterns and checked to be legal and distinct, plus the inverse ([`tier_delay_of`]) for tools
//! that find tiers by name. Kept apart from the policy because names depend on the
//! configuration's patterns, group and source topics, delays do not.

use std::collections::HashMap;
use std::time::Duration;

use crate::config::{check_topic_name, Config, ConfigError};

use super::RetryPolicy;

/// One retry tier topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierTopic {
    /// Topic name.
    pub name: String,
    /// The tier's delay.
    pub delay: Duration,
    /// Retries made from this tier.
    pub attempts: u32,
}

/// The side topics that belong to one source topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTopology {
    /// The source topic.
    pub topic: String,
    /// Its retry tiers, in order.
    pub retry: Vec<TierTopic>,
    /// Its dead-letter topic.
    pub dead_letter: String,
    /// Its key-order log (`{topic}.{group}.key-order`, as many partitions as the source:
    /// partition *p* serves source partition *p*), when `retry.keep_key_order` is set.
    pub key_order: Option<String>,
}

/// The key-order log's name for source `topic` read by `group` (see `docs/key-order.md`).
pub fn key_order_topic(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.key-order")
}

/// Every topic name the runtime uses, rendered from the configured patterns.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::config::RetryConfig;
/// use sidetrack::retry::Topology;
/// use sidetrack::{Config, Tier};
///
/// # fn main() -> Result<(), sidetrack::config::ConfigError> {
/// let mut config = Config::new("localhost:9092", "billing", ["orders"]);
/// config.retry = RetryConfig::tiers([
///     Tier::new(Duration::from_secs(1), 3),
///     Tier::new(Duration::from_secs(30), 2),
/// ]);
/// let topology = Topology::new(&config, &config.retry.policy()?)?;
/// assert_eq!(topology.retry_group(), "billing.retry");
/// assert_eq!(
///     topology.retry_topics(),
///     ["orders.billing.retry.1s", "orders.billing.retry.30s"]
/// );
/// assert_eq!(topology.source("orders").unwrap().dead_letter, "orders.billing.dlq");
/// // A record read from the second tier belongs to source 0, tier 1.
/// assert_eq!(topology.locate_retry("orders.billing.retry.30s"), Some((0, 1)));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The main consumer group.
    group: String,
    /// The retry consumer group, rendered from `retry.group`.
    retry_group: String,
    /// Each source topic with its tier topics and dead-letter topic, in configuration order.
    sources: Vec<SourceTopology>,
    /// Tier topic name to (source index, tier index): what a record read from a tier belongs
    /// to, answered without a scan ([`Topology::locate_retry`]).
    by_retry_topic: HashMap<String, (usize, usize)>,
}

impl Topology {
    /// Renders the names for `config` and checks that they are valid and distinct.
    pub fn new(config: &Config, policy: &RetryPolicy) -> Result<Self, ConfigError> {
        let mut sources = Vec::with_capacity(config.topics.len());
        let mut owner: HashMap<String, String> = config
            .topics
            .iter()
            .map(|t| (t.clone(), "a source topic".to_owned()))
            .collect();
        let mut claim = |name: String, field: &str, what: String| -> Result<String, ConfigError> {
            check_topic_name(&name).map_err(|r| ConfigError::invalid(field, r))?;
            if let Some(other) = owner.get(&name) {
                return Err(ConfigError::invalid(
                    field,
                    format!("renders `{name}` for {what}, which is already {other}"),
                ));
            }
            owner.insert(name.clone(), what);
            Ok(name)
        };
        for topic in &config.topics {
            let mut retry = Vec::with_capacity(policy.tiers().len());
            for (i, tier) in policy.tiers().iter().enumerate() {
                let name = render(&config.retry.topic, topic, &config.group, Some(tier.delay));
                let name = claim(name, "retry.topic", format!("retry tier {i} of `{topic}`"))?;
                retry.push(TierTopic {
                    name,
                    delay: tier.delay,
                    attempts: tier.attempts,
                });
            }
            let dead_letter = claim(
                render(&config.dead_letter.topic, topic, &config.group, None),
                "dead_letter.topic",
                format!("the dead-letter topic of `{topic}`"),
            )?;
            let key_order = config
                .retry
                .keep_key_order
                .then(|| {
                    claim(
                        key_order_topic(topic, &config.group),
                        "retry.keep_key_order",
                        format!("the key-order log of `{topic}`"),
                    )
                })
                .transpose()?;
            sources.push(SourceTopology {
                topic: topic.clone(),
                retry,
                dead_letter,
                key_order,
            });
        }
        let by_retry_topic = sources
            .iter()
            .enumerate()
            .flat_map(|(s, src)| {
                src.retry
                    .iter()
                    .enumerate()
                    .map(move |(t, tier)| (tier.name.clone(), (s, t)))
            })
            .collect();
        Ok(Topology {
            group: config.group.clone(),
            retry_group: config.retry.group.replace("{group}", &config.group),
            sources,
            by_retry_topic,
        })
    }

    /// The main consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The retry consumer's group.
    pub fn retry_group(&self) -> &str {
        &self.retry_group
    }

    /// Per source topic: its tiers and dead-letter topic.
    pub fn sources(&self) -> &[SourceTopology] {
        &self.sources
    }

    /// The source topology for `topic`, if it is a source topic.
    pub fn source(&self, topic: &str) -> Option<&SourceTopology> {
        self.sources.iter().find(|s| s.topic == topic)
    }

    /// For a retry topic: (index of its source, index of its tier).
    pub fn locate_retry(&self, topic: &str) -> Option<(usize, usize)> {
        self.by_retry_topic.get(topic).copied()
    }

    /// All retry tier topics of all sources.
    pub fn retry_topics(&self) -> Vec<&str> {
        self.sources
            .iter()
            .flat_map(|s| s.retry.iter().map(|t| t.name.as_str()))
            .collect()
    }

    /// All retry and dead-letter topics (and key-order logs), each with its source topic.
    pub fn side_topics(&self) -> Vec<(&str, &str)> {
        self.sources
            .iter()
            .flat_map(|s| {
                s.retry
                    .iter()
                    .map(|t| t.name.as_str())
                    .chain(std::iter::once(s.dead_letter.as_str()))
                    .chain(s.key_order.as_deref())
                    .map(move |name| (name, s.topic.as_str()))
            })
            .collect()
    }

    /// The consumer group whose committed offsets are the key-order logs' read positions
    /// (`{group}.key-order`; it never has members: the logs are read by assignment).
    pub fn key_order_group(&self) -> String {
        format!("{}.key-order", self.group)
    }
}

/// A naming pattern with `{topic}`, `{group}` and, for a tier, `{delay}` (as
/// [`format_delay`] writes it) filled in. Checked for legality and uniqueness by the caller.
fn render(pattern: &str, topic: &str, group: &str, delay: Option<Duration>) -> String {
    let mut out = pattern.replace("{topic}", topic).replace("{group}", group);
    if let Some(delay) = delay {
        out = out.replace("{delay}", &format_delay(delay));
    }
    out
}

/// The delay a retry tier's topic name encodes: `Some(delay)` if `name` is exactly what
/// `pattern` (a [`RetryConfig::topic`](crate::config::RetryConfig::topic) pattern) renders for
/// `topic`, `group` and that delay, written the way [`format_delay`] writes it.
///
/// The inverse of the naming [`Topology::new`] uses, for tools that must find existing tiers
/// by name without the configuration that created them (`sidetrack dlq replay --to
/// first-retry` without `--config`). `None` for any other name, and for a pattern without
/// `{delay}` (its tiers cannot be told apart by name).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::retry::tier_delay_of;
///
/// let pattern = "{topic}.{group}.retry.{delay}";
/// let tier = tier_delay_of(pattern, "orders", "billing", "orders.billing.retry.30s");
/// assert_eq!(tier, Some(Duration::from_secs(30)));
/// // `60s` is not how the runtime writes a minute (`1m`): not one of its tiers.
/// assert_eq!(tier_delay_of(pattern, "orders", "billing", "orders.billing.retry.60s"), None);
/// assert_eq!(tier_delay_of(pattern, "orders", "billing", "orders.billing.dlq"), None);
/// ```
pub fn tier_delay_of(pattern: &str, topic: &str, group: &str, name: &str) -> Option<Duration> {
    let rendered = pattern.replace("{topic}", topic).replace("{group}", group);
    let (prefix, suffix) = rendered.split_once("{delay}")?;
    let written = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let delay = humantime::parse_duration(written).ok()?;
    // One spelling per delay: `60s` is not the tier `1m`.
    (format_delay(delay) == written).then_some(delay)
}

/// Writes a delay compactly and usably in a topic name: `500ms`, `30s`, `1m30s`, `2h`,
/// `1s250ms`.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::retry::format_delay;
///
/// assert_eq!(format_delay(Duration::from_millis(500)), "500ms");
/// assert_eq!(format_delay(Duration::from_secs(90)), "1m30s");
/// assert_eq!(format_delay(Duration::from_millis(1250)), "1s250ms");
/// assert_eq!(format_delay(Duration::from_secs(7200)), "2h");
/// ```
pub fn format_delay(delay: Duration) -> String {
    let total_ms = delay.as_millis();
    if total_ms == 0 {
        return "0s".to_owned();
    }
    let units = [(3_600_000u128, "h"), (60_000, "m"), (1_000, "s"), (1, "ms")];
    let mut rest = total_ms;
    let mut out = String::new();
    for (size, unit) in units {
        let n = rest / size;
        if n > 0 {
            out.push_str(&n.to_string());
            out.push_str(unit);
            rest -= n * size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;
    use crate::retry::Tier;

    #[test]
    fn delays_are_compact() {
        let ms = Duration::from_millis;
        assert_eq!(format_delay(ms(500)), "500ms");
        assert_eq!(format_delay(ms(30_000)), "30s");
        assert_eq!(format_delay(ms(90_000)), "1m30s");
        assert_eq!(format_delay(ms(7_200_000)), "2h");
        assert_eq!(format_delay(ms(1_250)), "1s250ms");
        assert_eq!(format_delay(ms(600_000)), "10m");
    }

    #[test]
    fn default_names() {
        let config = Config::new("b", "billing", ["orders"]);
        let policy = config.retry.policy().unwrap();
        let t = Topology::new(&config, &policy).unwrap();
        assert_eq!(
            t.retry_topics(),
            vec![
                "orders.billing.retry.1s",
                "orders.billing.retry.30s",
                "orders.billing.retry.10m"
            ]
        );
        assert_eq!(t.sources()[0].dead_letter, "orders.billing.dlq");
        assert_eq!(t.retry_group(), "billing.retry");
        assert_eq!(t.locate_retry("orders.billing.retry.30s"), Some((0, 1)));
        assert_eq!(t.locate_retry("orders"), None);
        assert_eq!(t.side_topics().len(), 4);
    }

    #[test]
    fn custom_patterns_and_clashes() {
        let mut config = Config::new("b", "g", ["a", "b"]);
        config.retry = RetryConfig::tiers([Tier::new(Duration::from_secs(5), 1)]);
        config.retry.topic = "retry-{topic}".into();
        config.dead_letter.topic = "dlq-{topic}-{group}".into();
        let policy = config.retry.policy().unwrap();
        let t = Topology::new(&config, &policy).unwrap();
        assert_eq!(t.retry_topics(), vec!["retry-a", "retry-b"]);
        assert_eq!(t.sources()[1].dead_letter, "dlq-b-g");

        config.dead_letter.topic = "retry-{topic}".into();
        let err = Topology::new(&config, &policy).unwrap_err();
        assert!(err.to_string().contains("dead_letter.topic"), "{err}");
    }

    #[test]
    fn tier_names_parse_back_to_their_delay() {
        let pattern = RetryConfig::default().topic;
        for ms in [1u64, 500, 1_000, 30_000, 90_000, 600_000, 7_200_000, 1_250] {
            let d = Duration::from_millis(ms);
            let name = render(&pattern, "orders", "billing", Some(d));
            assert_eq!(
                tier_delay_of(&pattern, "orders", "billing", &name),
                Some(d),
                "{name}"
            );
        }
        let parse = |name: &str| tier_delay_of(&pattern, "orders", "billing", name);
        assert_eq!(
            parse("orders.billing.retry.60s"),
            None,
            "not how 1m is written"
        );
        assert_eq!(parse("orders.other.retry.1s"), None);
        assert_eq!(parse("orders.billing.retry."), None);
        assert_eq!(parse("orders.billing.dlq"), None);
        assert_eq!(
            tier_delay_of("{topic}-retry-{delay}-x", "o", "g", "o-retry-2h-x"),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(tier_delay_of("{topic}.retry", "o", "g", "o.retry"), None);
    }
}
