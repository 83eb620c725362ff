//! librdkafka client settings and the tracing bridge shared by every client we create.
//!
//! One place for every property sidetrack sets on librdkafka, with the reason next to each:
//! the consumers store offsets themselves (`enable.auto.offset.store=false`) and let
//! auto-commit send what was stored; the hand-off producer is idempotent with `acks=all`; no
//! client ever creates a topic by asking about it. The user's `consumer`/`producer` tables
//! are applied after these, and validation (`config/managed.rs`) has already refused any that
//! would break a guarantee, so what remains there is tuning and security.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use crate::config::Config;

/// Forwards librdkafka's log lines and errors to `tracing` (target `librdkafka`).
pub(crate) fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// Client-level errors (broker down, all brokers down, …) are transient for us: librdkafka
/// reconnects on its own, and hand-offs that fail meanwhile are retried.
pub(crate) fn forward_error(error: KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", %error, "{reason}");
}

/// The context of the hand-off producer and admin clients.
#[derive(Clone, Default)]
pub(crate) struct TracingContext;

impl ClientContext for TracingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason);
    }
}

/// `fetch.wait.max.ms` of the retry consumer: a resumed tier partition is refetched within
/// one such long-poll, so it bounds how early a paused partition must be resumed.
pub(crate) const RETRY_FETCH_WAIT_MS: u64 = 100;

/// Settings of both consumers. Offsets are stored by us after a durable outcome and
/// committed by librdkafka's auto-commit (also on revoke) and by a final commit at shutdown.
pub(crate) fn consumer_config(config: &Config, group_id: &str, retry: bool) -> ClientConfig {
    let mut c = ClientConfig::new();
    if retry {
        c.set("fetch.wait.max.ms", RETRY_FETCH_WAIT_MS.to_string());
    }
    c.set("bootstrap.servers", &config.brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("allow.auto.create.topics", "false")
        // Measured on the embedded broker: the default 1 s backoff on a full fetch queue
        // throttles throughput badly; 10 ms keeps partitions fed.
        .set("fetch.queue.backoff.ms", "10")
        // librdkafka backs off reconnects up to 10 s; after a short broker outage that can
        // outlast the group session and cost a rebalance (and duplicates). 1 s is plenty.
        .set("reconnect.backoff.max.ms", "1000")
        // With one queue per partition these bounds apply per partition: prefetch at most
        // 8 MiB or 10k records ahead of the handler (librdkafka's defaults are 64 MiB and
        // 100k, per partition).
        .set("queued.max.messages.kbytes", "8192")
        .set("queued.min.messages", "10000")
        .set(
            "max.poll.interval.ms",
            max_poll_interval_ms(config).to_string(),
        )
        .set_log_level(RDKafkaLogLevel::Info);
    for (k, v) in &config.consumer {
        // Applied to the main consumer only, under any spelling (librdkafka's `topic.` prefix
        // sets the same property, and the configuration map is applied in no fixed order).
        if retry && crate::config::canonical_property(k) == "auto.offset.reset" {
            continue;
        }
        c.set(k, v);
    }
    if config
        .consumer
        .keys()
        .any(|k| crate::config::canonical_property(k) == "debug")
    {
        // The user asked for librdkafka's debug contexts: let its debug lines through.
        c.set_log_level(RDKafkaLogLevel::Debug);
    }
    if retry {
        // A record waiting in a tier across a restart has no committed offset yet on a
        // brand-new tier partition: `latest` would skip it for ever. The user's choice applies
        // to the source topics only.
        c.set("auto.offset.reset", "earliest");
    }
    c
}

/// `max.poll.interval.ms` of both consumers unless the user sets it.
///
/// librdkafka sends it as the group's rebalance timeout: how long the coordinator waits for
/// the members to rejoin before it completes a rebalance without them. A member killed while
/// its JoinGroup or SyncGroup is waiting at the coordinator is kept that long (Kafka keeps a
/// member awaiting a join or sync alive until the rebalance timeout, not the session timeout),
/// and the partitions moving in that rebalance have no owner meanwhile: with librdkafka's
/// 300 s default, 5 minutes of silence (seen in the crash ledger on kfake). Handler
/// time does not count against it here: the runtime polls each consumer's main queue at least
/// every second whatever the handlers do, so it only trips when the process is starved, which
/// should be loud anyway. librdkafka refuses a value below `session.timeout.ms`, hence the max.
pub(crate) const MAX_POLL_INTERVAL_MS: u64 = 60_000;

fn max_poll_interval_ms(config: &Config) -> u64 {
    // librdkafka's default session timeout.
    const SESSION_TIMEOUT_MS: u64 = 45_000;
    let session = config
        .consumer
        .iter()
        .find(|(k, _)| crate::config::canonical_property(k) == "session.timeout.ms")
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .unwrap_or(SESSION_TIMEOUT_MS);
    MAX_POLL_INTERVAL_MS.max(session)
}

/// Settings of the hand-off producer: every send is acknowledged by all in-sync replicas and
/// idempotent, and one send may take at most `handoff.timeout` before we retry it ourselves.
pub(crate) fn producer_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set(
            "message.timeout.ms",
            config.handoff.timeout.as_millis().max(1).to_string(),
        )
        // Hand-offs are sent as soon as a record fails; lingering only adds latency (measured
        // on the embedded broker: 1 ms of linger made a 0.1 ms acknowledgement 1.2 ms).
        .set("linger.ms", "0")
        .set("reconnect.backoff.max.ms", "1000")
        .set("allow.auto.create.topics", "false")
        .set_log_level(RDKafkaLogLevel::Info);
    for (k, v) in &config.producer {
        c.set(k, v);
    }
    c
}

/// Settings of the admin client used at start-up: the brokers plus the user's producer
/// properties (which carry security settings), nothing that changes produce semantics.
pub(crate) fn admin_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        // A metadata lookup must not create the topic it asks about.
        .set("allow.auto.create.topics", "false")
        .set_log_level(RDKafkaLogLevel::Info);
    for (k, v) in &config.producer {
        c.set(k, v);
    }
    c
}

/// Review (adversarial): the guarantees "the retry consumer always reads a tier from its
/// earliest offset" and "`message.timeout.ms` is set by `handoff.timeout`" can be voided by
/// spelling the property with librdkafka's `topic.` prefix.
#[cfg(test)]
mod review {
    use super::*;

    /// What librdkafka resolves `key` to, for 32 configs built by `build` (rdkafka's
    /// `ClientConfig` is a `HashMap`, applied in a random order per instance).
    fn resolved(build: impl Fn() -> ClientConfig, key: &str) -> Vec<String> {
        (0..32)
            .map(|_| build().create_native_config().unwrap().get(key).unwrap())
            .collect()
    }

    /// librdkafka strips a `topic.` prefix and sets the default topic config
    /// (`rd_kafka_topic_conf_set`, rdkafka_conf.c:2576), where `auto.offset.reset` lives. So
    /// `consumer."topic.auto.offset.reset" = "latest"` (accepted by `validate`) and the
    /// `auto.offset.reset = earliest` forced on the retry consumer are two keys of rdkafka's
    /// `ClientConfig`: whichever is applied last wins, so about every other retry consumer
    /// starts a brand-new tier partition at `latest` and skips the retries waiting in it (the
    /// scenario of hardening.rs `a_retry_waiting_across_a_restart_is_not_skipped`).
    #[test]
    fn a_topic_prefixed_offset_reset_does_not_reach_the_retry_consumer() {
        let mut config = Config::new("localhost:9092", "billing", ["orders"]);
        config
            .consumer
            .insert("topic.auto.offset.reset".into(), "latest".into());
        if config.validate().is_err() {
            return; // refused: fine too
        }
        let got = resolved(
            || consumer_config(&config, "billing-retry", true),
            "auto.offset.reset",
        );
        let latest = got.iter().filter(|v| *v != "smallest").count();
        assert_eq!(
            latest, 0,
            "{latest} of 32 retry consumers would start at `latest`: {got:?}"
        );
    }

    /// A member killed in the middle of a rebalance holds the group for the rebalance
    /// timeout, which librdkafka takes from `max.poll.interval.ms`: 60 s rather than 300 s,
    /// never below the session timeout (librdkafka refuses that), and the user's value wins.
    #[test]
    fn the_rebalance_timeout_is_a_minute_unless_set() {
        let get = |config: &Config, retry: bool| {
            resolved(
                || consumer_config(config, "billing", retry),
                "max.poll.interval.ms",
            )
        };
        let mut config = Config::new("localhost:9092", "billing", ["orders"]);
        for retry in [false, true] {
            assert!(get(&config, retry).iter().all(|v| v == "60000"));
        }
        config
            .consumer
            .insert("session.timeout.ms".into(), "90000".into());
        assert!(get(&config, false).iter().all(|v| v == "90000"));
        config
            .consumer
            .insert("max.poll.interval.ms".into(), "300000".into());
        assert!(get(&config, false).iter().all(|v| v == "300000"));
        config
            .consumer
            .insert("session.timeout.ms".into(), "6000".into());
        config.consumer.remove("max.poll.interval.ms");
        assert!(get(&config, true).iter().all(|v| v == "60000"));
        config.validate().unwrap();
        consumer_config(&config, "billing", false)
            .create_native_config()
            .unwrap();
    }

    /// librdkafka's debug lines are dropped below the client's log level: asking for debug
    /// contexts must lower it, or `debug` does nothing.
    #[test]
    fn debug_contexts_reach_the_log() {
        let mut config = Config::new("localhost:9092", "billing", ["orders"]);
        let level = |c: &Config| consumer_config(c, "billing", false).log_level;
        assert!(matches!(level(&config), RDKafkaLogLevel::Info));
        config.consumer.insert("debug".into(), "cgrp".into());
        assert!(matches!(level(&config), RDKafkaLogLevel::Debug));
    }

    /// The same prefix gets past the managed producer timeout: `handoff.timeout` is meant to be
    /// the only way to set `message.timeout.ms` ("set `handoff.timeout` instead"), but
    /// `producer."topic.message.timeout.ms" = "0"` (no timeout at all: a send to a broker that
    /// never answers waits for ever) is accepted and wins about every other time.
    #[test]
    fn a_topic_prefixed_message_timeout_does_not_reach_the_hand_off_producer() {
        let mut config = Config::new("localhost:9092", "billing", ["orders"]);
        config
            .producer
            .insert("topic.message.timeout.ms".into(), "0".into());
        if config.validate().is_err() {
            return; // refused: fine too
        }
        let want = config.handoff.timeout.as_millis().to_string();
        let got = resolved(|| producer_config(&config), "message.timeout.ms");
        let overridden = got.iter().filter(|v| **v != want).count();
        assert_eq!(
            overridden, 0,
            "{overridden} of 32 hand-off producers would not use handoff.timeout ({want} ms): {got:?}"
        );
    }
}
