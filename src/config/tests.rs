//! Tests of the configuration: TOML parsing, defaults, every validation rule and the managed
//! properties, including property tests that any text parses or is refused without a panic.
//!
//! What they pin, because users depend on it: an invalid configuration is refused at load
//! with the dotted name of the field at fault (`handoff.timeout`, `retry.tiers[1].delay`), a
//! property that would void a guarantee is refused with the reason, and no text, however
//! absurd (a duration of 584,942,417,355 years, a `NaN` jitter), makes loading panic or
//! overflow later when the runtime adds a duration to an `Instant`.

use super::*;

/// The smallest valid configuration (one broker, group `billing`, topic `orders`): each test
/// changes one field of it, so a failure names that field's rule.
fn base() -> Config {
    Config::new("localhost:9092", "billing", ["orders"])
}

/// The dotted field an `Invalid` error names: what the tests assert, since the message
/// wording may change but the field it points at may not.
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

/// The breaker's defaults (100 in a row, or 100 of the last 200), and each bound of its
/// limits refused under its own dotted name: a zero count, a window past
/// `MAX_BREAKER_WINDOW`, more dead letters than the window holds, a zero cool-down, a maximum
/// below the cool-down.
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

/// A configuration file as the guide writes one: durations as text, tiers in order, and a
/// raw librdkafka property passed through untouched.
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

/// A misspelt field (`groupp`, `atempts`) is an error naming it, at any depth: a typo must
/// not silently fall back to a default.
#[test]
fn unknown_field_is_rejected_with_its_name() {
    let err = Config::from_toml_str("brokers = \"b\"\ngroupp = \"g\"").unwrap_err();
    assert!(err.to_string().contains("groupp"), "{err}");
    let err =
        Config::from_toml_str("[retry]\ntiers = [{ delay = \"1s\", atempts = 3 }]").unwrap_err();
    assert!(err.to_string().contains("atempts"), "{err}");
}

/// A duration that does not parse is refused at load, as a parse error (not a validation one).
#[test]
fn bad_duration_is_a_parse_error() {
    let err = Config::from_toml_str("shutdown_timeout = \"soon\"").unwrap_err();
    assert!(matches!(err, ConfigError::Parse(_)), "{err}");
}

/// Each validation rule names the field at fault by its dotted path, list index included
/// (`topics[1]`, `retry.tiers[1].delay`), so the message points at the line to fix.
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

/// `field: reason` of an `Invalid` error, for tests that also check why.
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
    assert!(refused("producer", "max.in.flight.requests.per.connection", "6").contains("1 to 5"));
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

/// Values that are legal numbers but would overflow later (a delay of 400 days added to an
/// `Instant`, `u32::MAX` attempts summed over tiers) are refused at validation, naming the
/// field, instead of panicking in the runtime.
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

    /// Text a duration field may hold: well-formed durations of every unit (some far too long
    /// for a `Duration`), near-misses, and the exact overflow edges humantime must refuse.
    fn duration_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{1,25}(ns|us|ms|s|m|h|d|w|y)",
            "[0-9a-z .]{0,12}",
            Just("18446744073709551615s".to_owned()),
            Just("584942417355y".to_owned()),
        ]
    }

    /// Text a numeric field may hold: any integer, any float (NaN and infinities included).
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

/// `RetryConfig::disabled()` is a valid configuration with no tiers: every failure goes
/// straight to the dead-letter topic (a retryable one as `exhausted`).
#[test]
fn disabled_retries_validate() {
    let mut c = base();
    c.retry = RetryConfig::disabled();
    c.validate().unwrap();
    assert_eq!(c.retry.policy().unwrap().max_retries(), 0);
}

#[test]
fn keep_key_order_parses_and_its_rules_name_their_field() {
    let c = Config::from_toml_str(
        r#"
        brokers = "b:9092"
        group = "g"
        topics = ["t"]
        ordering = "key"
        [retry]
        keep_key_order = true
        on_dead_letter = "dead-letter-key"
        max_waiting_keys = 10
        max_held_per_key = 5
        max_key_wait = "1h"
        "#,
    )
    .unwrap();
    assert!(c.retry.keep_key_order);
    assert_eq!(c.retry.on_dead_letter, OnDeadLetter::DeadLetterKey);
    assert_eq!(
        (c.retry.max_waiting_keys, c.retry.max_held_per_key),
        (10, 5)
    );
    assert_eq!(c.retry.max_key_wait, Duration::from_secs(3600));
    c.validate().unwrap();
    let d = RetryConfig::default();
    assert!(!d.keep_key_order);
    assert_eq!(d.on_dead_letter, OnDeadLetter::Release);
    assert!(Config::from_toml_str(
        "brokers = \"b\"\ngroup = \"g\"\ntopics = [\"t\"]\n[retry]\non_dead_letter = \"drop\"\n"
    )
    .is_err());

    type Change = fn(&mut Config);
    let bad: [(&str, Change); 6] = [
        ("retry.keep_key_order", |c| c.ordering = Ordering::Unordered),
        ("retry.keep_key_order", |c| c.retry.tiers = Some(Vec::new())),
        ("retry.max_waiting_keys", |c| c.retry.max_waiting_keys = 0),
        ("retry.max_held_per_key", |c| {
            c.retry.max_held_per_key = MAX_QUEUED + 1
        }),
        ("retry.max_key_wait", |c| {
            c.retry.max_key_wait = Duration::from_millis(10)
        }),
        ("retry.max_key_wait", |c| {
            c.retry.max_key_wait = MAX_TIER_DELAY + Duration::from_secs(1)
        }),
    ];
    for (field, change) in bad {
        let mut c = base();
        c.retry.keep_key_order = true;
        change(&mut c);
        assert_eq!(field_of(c.validate().unwrap_err()), field);
        // Without keep_key_order the same values are not looked at.
        c.retry.keep_key_order = false;
        if field != "retry.keep_key_order" {
            c.validate().unwrap();
        }
    }
    // Partition ordering keeps it too.
    let mut c = base();
    c.retry.keep_key_order = true;
    c.validate().unwrap();
}
