//! The librdkafka properties sidetrack manages itself, and why each one is refused.
//!
//! `[consumer]` and `[producer]` pass raw librdkafka properties through, which is what users
//! want for security, tuning and client ids; but a handful of properties would silently void
//! the at-least-once guarantee (offset storing and committing, `acks`, idempotence, timeouts
//! that `handoff.timeout` derives). These tables list them with the reason shown to the user.
//! They live apart from the structs because they are a policy about librdkafka, read against
//! librdkafka's own property list when it changes, not a part of the TOML schema.
//!
//! Keys are compared after [`canonical_property`], so an alias (`request.required.acks`) or a
//! `topic.` prefix cannot route around a rule.

use std::collections::BTreeMap;

use super::ConfigError;

/// A librdkafka property sidetrack sets itself, and why another value is refused.
struct Managed {
    /// The property, in its canonical spelling (see [`canonical_property`]).
    key: &'static str,
    /// The only value accepted (compared trimmed, case-insensitively); `None`: never set by
    /// hand.
    keeps: Option<&'static [&'static str]>,
    /// Why: shown to the user with the refusal, so it names the guarantee at stake and, where
    /// there is one, the sidetrack setting to use instead.
    why: &'static str,
}

/// A property sidetrack always sets itself: any value is refused.
const fn managed(key: &'static str, why: &'static str) -> Managed {
    Managed {
        key,
        keeps: None,
        why,
    }
}

/// A property whose only accepted values are `values` (the first is the one named in the
/// refusal).
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

/// The first property of `props` that a managed rule refuses, as a config error; `section`
/// (`consumer` or `producer`) names the table in the error's field path. After the tables,
/// two properties are checked for their range, since a value outside it (not the property
/// itself) is what would void the guarantee.
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

/// Refuses consumer properties (`[consumer]`) that would void a guarantee; see
/// [`MANAGED_CONSUMER_PROPS`].
pub(super) fn check_consumer(props: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    check_managed("consumer", props, MANAGED_CONSUMER_PROPS)
}

/// Refuses hand-off producer properties (`[producer]`) that would void a guarantee; see
/// [`MANAGED_PRODUCER_PROPS`].
pub(super) fn check_producer(props: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    check_managed("producer", props, MANAGED_PRODUCER_PROPS)
}
