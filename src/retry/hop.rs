//! The next hop of a record that did not succeed: from a [`Disposition`] to the topic it is
//! written to and the envelope it carries there.
//!
//! This is the one place that answers "where does it go next, and with what headers". The
//! runtime's hand-off, [`TestRuntime`](crate::testing::TestRuntime) and `sidetrack dlq replay
//! --to first-retry` all call [`next_hop`], so the test kit and the CLI route exactly as
//! production does. It is pure: no I/O and no clock reads. The caller passes the time and the
//! random jitter draw, which is what makes it testable to the millisecond and what lets the
//! hand-off keep one time for the envelope and the record's timestamp across resends.
//!
//! The partition is not decided here: it needs the target topic's partition count, which only
//! the caller's broker metadata knows (the hand-off keeps the original partition number when the
//! side topic has it).

use crate::handler::Message;
use crate::outcome::Disposition;

use super::envelope::Envelope;
use super::policy::{jittered, RetryPolicy};
use super::scheduler::millis;
use super::topics::{SourceTopology, Topology};

/// Where a failed record goes and what it carries: the result of [`next_hop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop<'t> {
    /// The decision this hop carries out (unchanged from the input).
    pub disposition: Disposition,
    /// The target topic: a retry tier of the record's source, or its dead-letter topic.
    pub topic: &'t str,
    /// The record's source topic and its side topics.
    pub source: &'t SourceTopology,
    /// The envelope to write after the record's user headers (replacing any it had).
    pub envelope: Envelope,
}

/// Why [`next_hop`] found no target. Neither happens when the topology and the policy were
/// built from the same configuration as the runtime that read the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HopError {
    /// The record's topic is neither a source nor a retry topic of the topology.
    #[error("`{0}` is not a source or retry topic of this topology")]
    UnknownSource(String),
    /// The disposition names a tier the source does not have.
    #[error("retry tier {tier} does not exist for `{source_topic}` (it has {tiers})")]
    NoSuchTier {
        /// The tier asked for (0-based).
        tier: usize,
        /// The source topic.
        source_topic: String,
        /// How many tiers the source has.
        tiers: usize,
    },
}

/// Decides the target topic and envelope of the next hop of `msg`, which failed with `error`
/// and was given `disposition`.
///
/// - The source is `msg.topic()`: the original topic (for a retried record, the one its
///   envelope names), or, for a record read from a retry tier whose envelope could not be
///   read, the source that tier belongs to.
/// - [`Disposition::Retry`]: the tier's topic; the envelope is due at `now_ms` plus the delay
///   lengthened by the policy's jitter times `jitter_unit` (a random number in `[0, 1)`, drawn
///   by the caller: [`jittered`] never shortens a delay).
/// - [`Disposition::DeadLetter`]: the source's dead-letter topic, no due time, the reason as
///   the error kind.
///
/// The envelope keeps the original position, counts `msg.attempt()` failed attempts and keeps
/// the first failure time of the record's current envelope (`now_ms` if it has none).
///
/// # Errors
/// [`HopError`] if `msg`'s topic or the tier is not in `topology`.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use sidetrack::config::RetryConfig;
/// use sidetrack::retry::{next_hop, Topology};
/// use sidetrack::{Config, Disposition, Message, Reason, Tier};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config = Config::new("localhost:9092", "billing", ["orders"]);
/// config.retry = RetryConfig::tiers([Tier::new(Duration::from_secs(30), 3)]);
/// let policy = config.retry.policy()?;
/// let topology = Topology::new(&config, &policy)?;
/// let msg = Message::new("orders", "{}").with_position(2, 41);
/// let now = 1_700_000_000_000;
///
/// let retry = Disposition::Retry { tier: 0, delay: Duration::from_secs(30) };
/// let hop = next_hop(&msg, retry, "timeout", &topology, &policy, now, 0.0)?;
/// assert_eq!(hop.topic, "orders.billing.retry.30s");
/// assert_eq!(hop.envelope.due, Some(now + 30_000)); // a jitter draw of 0 adds nothing
/// assert_eq!((hop.envelope.original_partition, hop.envelope.original_offset), (2, 41));
/// assert_eq!(hop.envelope.attempts, 1);
///
/// let dead = Disposition::DeadLetter(Reason::Permanent);
/// let hop = next_hop(&msg, dead, "negative amount", &topology, &policy, now, 0.0)?;
/// assert_eq!(hop.topic, "orders.billing.dlq");
/// assert_eq!((hop.envelope.reason, hop.envelope.due), (Some(Reason::Permanent), None));
/// # Ok(())
/// # }
/// ```
pub fn next_hop<'t>(
    msg: &Message,
    disposition: Disposition,
    error: &str,
    topology: &'t Topology,
    policy: &RetryPolicy,
    now_ms: i64,
    jitter_unit: f64,
) -> Result<Hop<'t>, HopError> {
    let source = topology
        .source(msg.topic())
        .or_else(|| {
            let (s, _) = topology.locate_retry(msg.topic())?;
            topology.sources().get(s)
        })
        .ok_or_else(|| HopError::UnknownSource(msg.topic().to_owned()))?;
    let (topic, due) = match disposition {
        Disposition::Retry { tier, delay } => {
            let tier_topic = source.retry.get(tier).ok_or_else(|| HopError::NoSuchTier {
                tier,
                source_topic: source.topic.clone(),
                tiers: source.retry.len(),
            })?;
            let wait = jittered(delay, policy.jitter(), jitter_unit);
            (
                tier_topic.name.as_str(),
                Some(now_ms.saturating_add(millis(wait))),
            )
        }
        Disposition::DeadLetter(_) => (source.dead_letter.as_str(), None),
    };
    let envelope = Envelope {
        key_order_since: msg.envelope().and_then(|e| e.key_order_since),
        after_dead_letter: msg.envelope().and_then(|e| e.after_dead_letter),
        original_topic: msg.topic().to_owned(),
        original_partition: msg.partition(),
        original_offset: msg.offset(),
        original_timestamp: msg.timestamp(),
        group: topology.group().to_owned(),
        attempts: msg.attempt(),
        first_failure: msg.envelope().map_or(now_ms, |e| e.first_failure),
        due,
        reason: disposition.reason(),
        error: error.to_owned(),
    };
    Ok(Hop {
        disposition,
        topic,
        source,
        envelope,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, RetryConfig};
    use crate::handler::HandlerError;
    use crate::outcome::Reason;
    use crate::retry::Tier;

    const NOW: i64 = 1_700_000_000_000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// `orders` read by group `billing`: tiers 1s × 2, 30s × 1; 20 % jitter.
    fn setup() -> (Topology, RetryPolicy) {
        let mut config = Config::new("b", "billing", ["orders", "payments"]);
        config.retry = RetryConfig::tiers([Tier::new(secs(1), 2), Tier::new(secs(30), 1)]);
        let policy = RetryPolicy::new(config.retry.policy().unwrap().tiers().to_vec(), 0.2);
        (Topology::new(&config, &policy).unwrap(), policy)
    }

    /// The message a retry tier hands the handler for attempt `attempt` (> 1).
    fn retried(attempt: u32, first_failure: i64) -> Message {
        let envelope = Envelope {
            key_order_since: None,
            after_dead_letter: None,
            original_topic: "orders".into(),
            original_partition: 3,
            original_offset: 42,
            original_timestamp: Some(NOW - 5_000),
            group: "billing".into(),
            attempts: attempt - 1,
            first_failure,
            due: Some(NOW - 1),
            reason: None,
            error: "before".into(),
        };
        Message::from_parts(
            (&Arc::from("orders.billing.retry.1s"), 0, 9),
            Some(NOW - 1_000),
            None,
            Some(b"x".to_vec()),
            vec![],
            Some(envelope),
        )
    }

    /// Where `attempt` goes after failing with `error`, decided by the policy as the runtime
    /// does.
    fn hop_after(attempt: u32, error: &HandlerError) -> (String, Envelope) {
        let (topology, policy) = setup();
        let msg = if attempt == 1 {
            Message::new("orders", "x").with_position(3, 42)
        } else {
            retried(attempt, NOW - 60_000)
        };
        let d = policy.decide(msg.attempt(), error);
        let hop = next_hop(&msg, d, error.message(), &topology, &policy, NOW, 0.0).unwrap();
        assert_eq!(hop.disposition, d);
        assert_eq!(hop.source.topic, "orders");
        (hop.topic.to_owned(), hop.envelope)
    }

    #[test]
    fn retryable_failures_walk_the_tiers_then_exhaust() {
        let boom = HandlerError::retryable("boom");
        let walk: Vec<_> = (1..=4)
            .map(|a| {
                let (topic, e) = hop_after(a, &boom);
                (topic, e.reason, e.due.map(|d| d - NOW), e.attempts)
            })
            .collect();
        assert_eq!(
            walk,
            vec![
                ("orders.billing.retry.1s".into(), None, Some(1_000), 1),
                ("orders.billing.retry.1s".into(), None, Some(1_000), 2),
                ("orders.billing.retry.30s".into(), None, Some(30_000), 3),
                (
                    "orders.billing.dlq".into(),
                    Some(Reason::Exhausted),
                    None,
                    4
                ),
            ]
        );
    }

    #[test]
    fn the_envelope_keeps_the_origin_and_the_first_failure() {
        let (_, first) = hop_after(1, &HandlerError::retryable("boom"));
        assert_eq!(
            (
                first.original_topic.as_str(),
                first.original_partition,
                first.original_offset
            ),
            ("orders", 3, 42)
        );
        assert_eq!(first.group, "billing");
        assert_eq!(
            first.first_failure, NOW,
            "no envelope yet: the first failure is now"
        );
        assert_eq!(first.error, "boom");
        let (_, later) = hop_after(3, &HandlerError::retryable("again"));
        assert_eq!(later.first_failure, NOW - 60_000);
        assert_eq!(later.original_timestamp, Some(NOW - 5_000));
        assert_eq!(later.error, "again");
    }

    #[test]
    fn permanent_and_poison_go_to_the_dead_letter_topic_at_once() {
        for (error, reason) in [
            (HandlerError::permanent("no"), Reason::Permanent),
            (HandlerError::poison("bad json"), Reason::Poison),
        ] {
            let (topic, e) = hop_after(1, &error);
            assert_eq!(topic, "orders.billing.dlq");
            assert_eq!(e.reason, Some(reason));
            assert_eq!(e.due, None);
            assert_eq!(e.attempts, 1);
        }
    }

    #[test]
    fn a_requested_delay_beyond_a_tier_picks_a_longer_tier_capped_at_its_delay() {
        let (topic, e) = hop_after(1, &HandlerError::retryable("later").retry_after(secs(10)));
        assert_eq!(topic, "orders.billing.retry.30s");
        assert_eq!(e.due, Some(NOW + 10_000));
        let (topic, e) = hop_after(1, &HandlerError::retryable("much").retry_after(secs(3600)));
        assert_eq!(topic, "orders.billing.retry.30s");
        assert_eq!(e.due, Some(NOW + 30_000));
        // A requested delay never buys attempts beyond the last.
        let (topic, e) = hop_after(4, &HandlerError::retryable("x").retry_after(secs(1)));
        assert_eq!(topic, "orders.billing.dlq");
        assert_eq!(e.reason, Some(Reason::Exhausted));
    }

    #[test]
    fn jitter_lengthens_within_its_bound_and_never_shortens() {
        let (topology, policy) = setup();
        let msg = Message::new("orders", "x");
        let retry = Disposition::Retry {
            tier: 1,
            delay: secs(30),
        };
        let due = |unit: f64| {
            next_hop(&msg, retry, "e", &topology, &policy, NOW, unit)
                .unwrap()
                .envelope
                .due
                .unwrap()
        };
        assert_eq!(due(0.0), NOW + 30_000);
        assert_eq!(due(0.5), NOW + 33_000);
        for i in 0..=100 {
            let d = due(i as f64 / 100.0) - NOW;
            assert!((30_000..=36_000).contains(&d), "{d}");
        }
        // Out-of-range draws are clamped, never shorten, never panic.
        assert_eq!(due(-3.0), NOW + 30_000);
        assert_eq!(due(f64::NAN), NOW + 30_000);
        assert_eq!(due(9.0), NOW + 36_000);
    }

    #[test]
    fn a_record_with_an_unreadable_envelope_dead_letters_to_its_tiers_source() {
        let (topology, policy) = setup();
        let raw = Message::from_parts(
            (&Arc::from("payments.billing.retry.30s"), 1, 7),
            None,
            None,
            None,
            vec![],
            None,
        );
        let d = Disposition::DeadLetter(Reason::InvalidEnvelope);
        let hop = next_hop(&raw, d, "corrupt", &topology, &policy, NOW, 0.5).unwrap();
        assert_eq!(hop.topic, "payments.billing.dlq");
        assert_eq!(hop.envelope.original_topic, "payments.billing.retry.30s");
        assert_eq!(hop.envelope.reason, Some(Reason::InvalidEnvelope));
    }

    #[test]
    fn unknown_topics_and_tiers_are_typed_errors() {
        let (topology, policy) = setup();
        let d = Disposition::DeadLetter(Reason::Permanent);
        let stranger = Message::new("invoices", "x");
        assert_eq!(
            next_hop(&stranger, d, "e", &topology, &policy, NOW, 0.0),
            Err(HopError::UnknownSource("invoices".into()))
        );
        let far = Disposition::Retry {
            tier: 2,
            delay: secs(1),
        };
        let msg = Message::new("orders", "x");
        assert_eq!(
            next_hop(&msg, far, "e", &topology, &policy, NOW, 0.0),
            Err(HopError::NoSuchTier {
                tier: 2,
                source_topic: "orders".into(),
                tiers: 2
            })
        );
    }
}
