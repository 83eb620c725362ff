//! Configuration validation: [`Config::validate`], retry policy resolution and [`ConfigError`].
//!
//! Separate from the structs in `mod.rs` because the rules are what changes when a guarantee
//! changes, and they read best together: the lower bounds (a zero timeout would spin), the
//! upper bounds (deadlines are `Instant + value`, and librdkafka takes at most 2^31-1 ms), the
//! cross-field rules (`retry.group` differs from `group`, back-off bounds are ordered) and the
//! managed librdkafka properties (see `managed.rs`). Every error names the field by its dotted
//! TOML path, so the message points at the line to fix.
//!
//! Validation only reads the config; it never connects. Topic names produced by the naming
//! patterns are checked by building the [`Topology`], which renders each of them.

use std::collections::HashSet;
use std::time::Duration;

use crate::retry::{RetryPolicy, Topology};

use super::managed::{check_consumer, check_producer};
use super::{
    BreakerConfig, Config, ExponentialConfig, RetryConfig, MAX_BREAKER_WINDOW, MAX_IN_FLIGHT,
    MAX_QUEUED, MAX_RETRIES, MAX_TIERS, MAX_TIER_DELAY,
};

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
    /// An [`Invalid`](ConfigError::Invalid) error for `field` (its dotted TOML path) with the
    /// reason shown to the user.
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Upper bound of the back-off and provisioning timeouts (a longer one is a typo, not a plan).
const HOUR: Duration = Duration::from_secs(3600);
/// Upper bound of the timeouts and windows that are added to the clock.
const DAY: Duration = Duration::from_secs(24 * 3600);

impl Config {
    /// Checks every field, including the topic names the patterns produce.
    ///
    /// Called by the runtime builder before anything connects; call it yourself to check a
    /// config file in CI. It checks, in this order: the required fields; every source topic
    /// name (Kafka's rule, none twice); the retry policy ([`RetryConfig::policy`]); the retry
    /// group (it must differ from `group`: the two consumers must not share a group);
    /// every rendered retry and dead-letter topic name, for legality and clashes (by building
    /// the [`Topology`]); the lower and upper bound of every duration; features the config
    /// asks for but this build lacks; the back-off order; the breaker; the replication factor;
    /// the per-partition limits; and last the managed librdkafka properties.
    ///
    /// # Errors
    ///
    /// The first rule broken, as [`ConfigError::Invalid`] naming the field by its dotted path.
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
        if let Some(tracing) = &self.tracing {
            tracing.validate()?;
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
        self.check_key_order()?;
        check_consumer(&self.consumer)?;
        check_producer(&self.producer)?;
        Ok(())
    }
}

impl Config {
    /// The `keep_key_order` rules: an ordering that has an order to keep, a tier to wait on,
    /// and caps in range.
    fn check_key_order(&self) -> Result<(), ConfigError> {
        let r = &self.retry;
        if !r.keep_key_order {
            return Ok(());
        }
        if self.ordering == super::Ordering::Unordered {
            return Err(ConfigError::invalid(
                "retry.keep_key_order",
                "needs `ordering = \"partition\"` or `\"key\"`: `unordered` keeps no order",
            ));
        }
        if r.tiers.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::invalid(
                "retry.keep_key_order",
                "needs at least one retry tier (with `tiers = []` nothing ever waits)",
            ));
        }
        for (field, value) in [
            ("retry.max_waiting_keys", r.max_waiting_keys),
            ("retry.max_held_per_key", r.max_held_per_key),
        ] {
            if !(1..=MAX_QUEUED).contains(&value) {
                return Err(ConfigError::invalid(
                    field,
                    format!("must be 1 to {MAX_QUEUED}"),
                ));
            }
        }
        if r.max_key_wait < Duration::from_secs(1) || r.max_key_wait > MAX_TIER_DELAY {
            return Err(ConfigError::invalid(
                "retry.max_key_wait",
                "must be 1s to 365d",
            ));
        }
        Ok(())
    }
}

impl RetryConfig {
    /// Resolves the configured policy (tiers, exponential shorthand or the default), checking
    /// it on the way: it lives with validation because every rule about tiers is here.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] when both `tiers` and `exponential` are set, when there are
    /// more than [`MAX_TIERS`] tiers or [`MAX_RETRIES`] retries, when a delay is zero, above
    /// [`MAX_TIER_DELAY`] or repeated (two tiers with one delay would be one topic), when a
    /// tier has no attempts, or when the exponential shorthand is out of its bounds.
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

impl ExponentialConfig {
    /// Checks the shorthand's bounds, then expands it into tiers (equal consecutive delays
    /// share one tier); the jitter goes to the policy, not to the tiers.
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

impl BreakerConfig {
    /// The breaker's own rules; nothing to check when it is off (its values are then unused).
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

/// Kafka's own rule for topic names: 1 to 249 characters of `[a-zA-Z0-9._-]`, and neither `.`
/// nor `..`; the error says which part is broken. The one implementation of the rule:
/// configured topics, rendered side-topic names, the proxy's URL paths and the CLI
/// ([`crate::admin::is_legal_topic`]) all come here.
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
