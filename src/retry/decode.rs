//! Reading the envelope of a record consumed from a retry tier, and deciding whether it can be
//! trusted. Everything here is pure: the headers and timestamp come from the network and may
//! be any bytes and any numbers; the answer is an envelope or a reason, never a panic.
//!
//! A retry tier is a topic anyone with write access can produce to, and its envelope decides
//! what the runtime does next (which group's record it is, how many attempts are left, how
//! long the partition waits). So an envelope is trusted only if it names this runtime's group
//! and the tier's own source topic, counts between 1 and the policy's retries, carries no
//! dead-letter reason, and is due no further ahead than the tier's delay plus jitter allow.
//! A record that fails any of these is dead-lettered as `invalid-envelope`, with the reason
//! as its error, instead of being handled or holding the partition.

use std::time::Duration;

use crate::handler::Header;

use super::envelope::Envelope;
use super::scheduler;

/// What a tier partition expects of the envelopes it reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected<'a> {
    /// The runtime's (main) group, written into every envelope.
    pub(crate) group: &'a str,
    /// The source topic this tier belongs to.
    pub(crate) source_topic: &'a str,
    /// The tier topic being read (for messages).
    pub(crate) tier_topic: &'a str,
    /// Total retries of the policy: attempt counts beyond it are forged.
    pub(crate) max_retries: u32,
    /// The latest a record on this tier can be due after it was written.
    pub(crate) max_due_delay: Duration,
}

/// Splits `headers` into the user's and a trusted envelope, or says why the envelope cannot
/// be trusted. `timestamp` is the retry record's own timestamp (written by the hand-off, on the
/// writer's clock), `now` the reader's clock; see [`scheduler::check_due`].
pub(crate) fn read_retry_envelope(
    headers: &[Header],
    timestamp: Option<i64>,
    now: i64,
    expected: &Expected<'_>,
) -> Result<(usize, Envelope), String> {
    let (user, envelope) = Envelope::split(headers).map_err(|e| e.to_string())?;
    if envelope.group != expected.group {
        return Err(format!(
            "envelope group `{}` is not this runtime's group `{}`",
            envelope.group, expected.group
        ));
    }
    if envelope.original_topic != expected.source_topic {
        return Err(format!(
            "envelope original topic `{}` does not belong to retry topic `{}`",
            envelope.original_topic, expected.tier_topic
        ));
    }
    if envelope.attempts == 0 || envelope.attempts > expected.max_retries {
        return Err(format!(
            "envelope attempt count {} is outside 1..={}",
            envelope.attempts, expected.max_retries
        ));
    }
    if let Some(reason) = envelope.reason {
        return Err(format!("envelope error kind `{reason}` on a retry topic"));
    }
    scheduler::check_due(envelope.due, timestamp, now, expected.max_due_delay)?;
    Ok((user, envelope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::envelope::names;
    use proptest::prelude::*;

    const TS: i64 = 1_700_000_000_000;

    fn expected() -> Expected<'static> {
        Expected {
            group: "billing",
            source_topic: "orders",
            tier_topic: "orders.billing.retry.1s",
            max_retries: 3,
            max_due_delay: Duration::from_secs(1),
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            key_order_since: None,
            after_dead_letter: None,
            original_topic: "orders".into(),
            original_partition: 0,
            original_offset: 7,
            original_timestamp: Some(TS - 10),
            group: "billing".into(),
            attempts: 1,
            first_failure: TS,
            due: Some(TS + 1000),
            reason: None,
            error: "boom".into(),
        }
    }

    fn with(name: &str, value: &[u8]) -> Vec<Header> {
        let mut h = envelope().to_headers();
        for x in h.iter_mut().filter(|x| x.is(name)) {
            x.value = Some(value.to_vec());
        }
        h
    }

    #[test]
    fn a_genuine_envelope_is_read() {
        let mut headers = vec![Header::new("app", "x")];
        headers.extend(envelope().to_headers());
        let (user, env) = read_retry_envelope(&headers, Some(TS), TS, &expected()).unwrap();
        assert_eq!(user, 1);
        assert_eq!(env, envelope());
    }

    #[test]
    fn forged_envelopes_say_why() {
        let e = expected();
        let read = |h: &[Header]| read_retry_envelope(h, Some(TS), TS, &e).unwrap_err();
        assert!(read(&with(names::GROUP, b"other")).contains("group"));
        assert!(read(&with(names::ORIGINAL_TOPIC, b"payments")).contains("original topic"));
        assert!(read(&with(names::ATTEMPTS, b"0")).contains("attempt count"));
        assert!(read(&with(names::ATTEMPTS, b"4")).contains("attempt count"));
        assert!(read(&with(names::ERROR_KIND, b"poison")).contains("error kind"));
        // The reported attack: a due time of i64::MIN passed as "due long ago".
        assert!(read(&with(names::DUE, b"-9223372036854775808")).contains("due time"));
        assert!(read(&with(names::DUE, b"9223372036854775807")).contains("due time"));
        assert!(read(&[]).contains("no sidetrack envelope"));
    }

    /// Envelope header values as any bytes, at any position, plus stray headers.
    fn hostile_headers() -> impl Strategy<Value = Vec<Header>> {
        let names = prop_oneof![
            Just(names::VERSION.as_bytes().to_vec()),
            Just(names::ORIGINAL_TOPIC.as_bytes().to_vec()),
            Just(names::ORIGINAL_PARTITION.as_bytes().to_vec()),
            Just(names::ORIGINAL_OFFSET.as_bytes().to_vec()),
            Just(names::ORIGINAL_TIMESTAMP.as_bytes().to_vec()),
            Just(names::GROUP.as_bytes().to_vec()),
            Just(names::ATTEMPTS.as_bytes().to_vec()),
            Just(names::FIRST_FAILURE.as_bytes().to_vec()),
            Just(names::DUE.as_bytes().to_vec()),
            Just(names::ERROR_KIND.as_bytes().to_vec()),
            Just(names::ERROR.as_bytes().to_vec()),
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        let values = prop_oneof![
            Just(None),
            any::<i64>().prop_map(|n| Some(n.to_string().into_bytes())),
            "[0-9 +-]{0,25}".prop_map(|s| Some(s.into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..30).prop_map(Some),
        ];
        proptest::collection::vec(
            (names, values).prop_map(|(key, value)| Header { key, value }),
            0..16,
        )
    }

    proptest! {
        /// Any headers, timestamp and clock: an envelope or a reason, never a panic; an
        /// accepted envelope satisfies every rule.
        #[test]
        fn any_headers_get_an_answer(
            headers in hostile_headers(),
            ts in proptest::option::of(any::<i64>()),
            now in any::<i64>(),
        ) {
            let e = expected();
            if let Ok((user, env)) = read_retry_envelope(&headers, ts, now, &e) {
                prop_assert!(user <= headers.len());
                prop_assert!(env.attempts >= 1 && env.attempts <= e.max_retries);
                prop_assert_eq!(env.group.as_str(), "billing");
                prop_assert!(env.due.is_some());
            }
        }

        /// Every value sidetrack itself writes is read back as written.
        #[test]
        fn written_envelopes_are_read_back(
            partition in 0i32..=i32::MAX,
            offset in 0i64..=i64::MAX,
            original_ts in proptest::option::of(any::<i64>()),
            first_failure in any::<i64>(),
            attempts in 1u32..=3,
            delay in 0i64..=1000,
            error in ".{0,64}",
        ) {
            let env = Envelope {
                key_order_since: None,
                after_dead_letter: None,
                original_partition: partition,
                original_offset: offset,
                original_timestamp: original_ts,
                first_failure,
                attempts,
                due: Some(TS + delay),
                error: crate::retry::truncate_error(&error),
                ..envelope()
            };
            let (_, back) = read_retry_envelope(&env.to_headers(), Some(TS), TS, &expected())
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(back, env);
        }
    }
}
