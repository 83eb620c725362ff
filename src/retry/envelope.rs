//! The envelope: the `sidetrack-*` headers every retry and dead-letter record carries after
//! the user's own, saying where the record came from, how often it failed, when it is due and
//! why it is where it is. It is the only state a retry tier has (the tier topic is the queue),
//! so reading it is strict ([`Envelope::split`]) and its wire format is versioned; the
//! `sidetrack-error-kind` values come from [`crate::outcome`] and never change.

use std::collections::HashSet;
use std::str::FromStr;

use crate::handler::Header;
use crate::outcome::{error_kind_str, parse_error_kind, Reason};

/// Header names of envelope version 1. Values are UTF-8 text; times are milliseconds since the
/// Unix epoch, written in decimal.
pub(super) mod names {
    /// Every envelope header starts with this prefix.
    pub const PREFIX: &str = "sidetrack-";
    /// Envelope schema version (`1`). Always the first envelope header.
    pub const VERSION: &str = "sidetrack-version";
    /// Topic the record was first consumed from.
    pub const ORIGINAL_TOPIC: &str = "sidetrack-original-topic";
    /// Partition the record was first consumed from.
    pub const ORIGINAL_PARTITION: &str = "sidetrack-original-partition";
    /// Offset of the record in its original partition.
    pub const ORIGINAL_OFFSET: &str = "sidetrack-original-offset";
    /// Timestamp of the original record (absent if it had none).
    pub const ORIGINAL_TIMESTAMP: &str = "sidetrack-original-timestamp";
    /// Consumer group that failed to handle the record.
    pub const GROUP: &str = "sidetrack-group";
    /// Number of handler attempts made so far (all failed).
    pub const ATTEMPTS: &str = "sidetrack-attempts";
    /// Time of the first failure.
    pub const FIRST_FAILURE: &str = "sidetrack-first-failure";
    /// Time at which the record becomes due (retry topics only).
    pub const DUE: &str = "sidetrack-due";
    /// `retryable`, `permanent`, `poison`, `exhausted`, `invalid-envelope` or `oversized`.
    pub const ERROR_KIND: &str = "sidetrack-error-kind";
    /// The last error, as text, truncated to [`MAX_ERROR_TEXT`](super::MAX_ERROR_TEXT) bytes.
    pub const ERROR: &str = "sidetrack-error";
    /// `keep_key_order` only: this record is its key's *head* — the key's later records wait
    /// behind it, since this time (ms since the epoch). Its retry tier appends a `release` to
    /// the source partition's key-order log when it ends (see `docs/key-order.md`).
    pub const KEY_ORDER_HEAD: &str = "sidetrack-key-order-head";
    /// `keep_key_order` only: an earlier record of this record's key (at this original offset)
    /// was dead-lettered, and this record was released after it.
    pub const KEY_ORDER_AFTER_DEAD_LETTER: &str = "sidetrack-key-order-after-dead-letter";
}

/// The envelope schema version this build writes and reads.
pub(super) const ENVELOPE_VERSION: u32 = 1;

/// Longest error text, in bytes, stored in the `sidetrack-error` header. Longer texts are cut
/// at a character boundary and end with `…`.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Why an envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The record has no `sidetrack-version` header.
    #[error("no sidetrack envelope")]
    Missing,
    /// The envelope was written by a version this build does not read.
    #[error("unsupported envelope version `{0}`")]
    UnsupportedVersion(String),
    /// A header is missing, repeated or unreadable.
    #[error("corrupt envelope: {0}")]
    Corrupt(String),
}

/// The envelope carried by every retry and dead-letter record.
///
/// It is written after the user's own headers and replaced, never appended to, on each hop.
/// Reading takes the last `sidetrack-version` header as the start of the envelope, so user
/// headers whose names collide with envelope names are kept as user headers.
///
/// # Example
///
/// Written after the user's headers, read back with the user's headers told apart:
///
/// ```
/// use sidetrack::{Envelope, Header};
///
/// let envelope = Envelope {
///     original_topic: "orders".into(),
///     original_partition: 2,
///     original_offset: 41,
///     original_timestamp: Some(1_700_000_000_000),
///     group: "billing".into(),
///     attempts: 1,
///     first_failure: 1_700_000_000_500,
///     due: Some(1_700_000_030_500),
///     reason: None, // on a retry tier: `sidetrack-error-kind: retryable`
///     error: "timeout".into(),
///     key_order_since: None,   // set only with `keep_key_order`, on a key's head
///     after_dead_letter: None, // set only with `keep_key_order`, after a dead-lettered head
/// };
/// let mut headers = vec![Header::new("trace-id", "abc")];
/// headers.extend(envelope.to_headers());
/// assert!(headers[1].is("sidetrack-version"));
///
/// let (user, read) = Envelope::split(&headers).unwrap();
/// assert_eq!(user, 1); // headers[..1] are the user's
/// assert_eq!(read, envelope);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Topic the record was first consumed from.
    pub original_topic: String,
    /// Partition the record was first consumed from.
    pub original_partition: i32,
    /// Offset in the original partition.
    pub original_offset: i64,
    /// Original record timestamp, ms since the epoch.
    pub original_timestamp: Option<i64>,
    /// The consumer group that handled it.
    pub group: String,
    /// Handler attempts made so far, all failed (≥ 1 on a retry topic).
    pub attempts: u32,
    /// First failure, ms since the epoch.
    pub first_failure: i64,
    /// When the record becomes due, ms since the epoch (retry topics only).
    pub due: Option<i64>,
    /// Why the record is where it is: `None` on a retry tier (header value `retryable`), the
    /// dead-letter [`Reason`] on the dead-letter topic. Written as `sidetrack-error-kind`
    /// (see [`error_kind_str`](crate::outcome::error_kind_str)).
    pub reason: Option<Reason>,
    /// The last error as text (at most [`MAX_ERROR_TEXT`] bytes).
    pub error: String,
    /// `keep_key_order`: the record is its key's head, and the key waits since this time (ms
    /// since the epoch); `None` otherwise. Carried from hop to hop.
    pub key_order_since: Option<i64>,
    /// `keep_key_order`: the original offset of an earlier record of the same key that was
    /// dead-lettered before this one was released; `None` otherwise. Carried from hop to hop.
    pub after_dead_letter: Option<i64>,
}

impl Envelope {
    /// Encodes the envelope as headers, in a fixed order, starting with `sidetrack-version`.
    pub fn to_headers(&self) -> Vec<Header> {
        use names::*;
        let mut out = Vec::with_capacity(13);
        let mut put = |k: &str, v: String| out.push(Header::new(k, v.into_bytes()));
        put(VERSION, ENVELOPE_VERSION.to_string());
        put(ORIGINAL_TOPIC, self.original_topic.clone());
        put(ORIGINAL_PARTITION, self.original_partition.to_string());
        put(ORIGINAL_OFFSET, self.original_offset.to_string());
        if let Some(ts) = self.original_timestamp {
            put(ORIGINAL_TIMESTAMP, ts.to_string());
        }
        put(GROUP, self.group.clone());
        put(ATTEMPTS, self.attempts.to_string());
        put(FIRST_FAILURE, self.first_failure.to_string());
        if let Some(due) = self.due {
            put(DUE, due.to_string());
        }
        put(ERROR_KIND, error_kind_str(self.reason).to_owned());
        put(ERROR, truncate_error(&self.error));
        if let Some(since) = self.key_order_since {
            put(KEY_ORDER_HEAD, since.to_string());
        }
        if let Some(offset) = self.after_dead_letter {
            put(KEY_ORDER_AFTER_DEAD_LETTER, offset.to_string());
        }
        out
    }

    /// Splits `headers` into the user's headers and the envelope.
    ///
    /// On success returns how many leading headers are the user's (`headers[..n]`).
    pub fn split(headers: &[Header]) -> Result<(usize, Envelope), EnvelopeError> {
        use names::*;
        let start = headers
            .iter()
            .rposition(|h| h.is(VERSION))
            .ok_or(EnvelopeError::Missing)?;
        let block = &headers[start..];
        let mut seen = HashSet::new();
        for h in block {
            if !h.key.starts_with(PREFIX.as_bytes()) {
                return Err(corrupt(format!(
                    "unexpected header `{}` inside the envelope",
                    h.key_lossy()
                )));
            }
            if !seen.insert(h.key.as_slice()) {
                return Err(corrupt(format!("header `{}` appears twice", h.key_lossy())));
            }
        }
        let get = |name: &str| -> Result<Option<&str>, EnvelopeError> {
            match block.iter().find(|h| h.is(name)) {
                None => Ok(None),
                Some(h) => match &h.value {
                    None => Err(corrupt(format!("header `{name}` has a null value"))),
                    Some(v) => std::str::from_utf8(v)
                        .map(Some)
                        .map_err(|_| corrupt(format!("header `{name}` is not UTF-8"))),
                },
            }
        };
        let required = |name: &str| -> Result<&str, EnvelopeError> {
            get(name)?.ok_or_else(|| corrupt(format!("header `{name}` is missing")))
        };
        fn parse<T: FromStr>(name: &str, v: &str) -> Result<T, EnvelopeError> {
            v.trim()
                .parse()
                .map_err(|_| corrupt(format!("header `{name}` has an unreadable value `{v}`")))
        }
        let version = required(VERSION)?;
        if version.trim() != ENVELOPE_VERSION.to_string() {
            return Err(EnvelopeError::UnsupportedVersion(version.to_owned()));
        }
        let envelope = Envelope {
            key_order_since: get(KEY_ORDER_HEAD)?
                .map(|v| parse(KEY_ORDER_HEAD, v))
                .transpose()?,
            after_dead_letter: get(KEY_ORDER_AFTER_DEAD_LETTER)?
                .map(|v| parse(KEY_ORDER_AFTER_DEAD_LETTER, v))
                .transpose()?,
            original_topic: required(ORIGINAL_TOPIC)?.to_owned(),
            original_partition: parse(ORIGINAL_PARTITION, required(ORIGINAL_PARTITION)?)?,
            original_offset: parse(ORIGINAL_OFFSET, required(ORIGINAL_OFFSET)?)?,
            original_timestamp: get(ORIGINAL_TIMESTAMP)?
                .map(|v| parse(ORIGINAL_TIMESTAMP, v))
                .transpose()?,
            group: required(GROUP)?.to_owned(),
            attempts: parse(ATTEMPTS, required(ATTEMPTS)?)?,
            first_failure: parse(FIRST_FAILURE, required(FIRST_FAILURE)?)?,
            due: get(DUE)?.map(|v| parse(DUE, v)).transpose()?,
            reason: parse_error_kind(required(ERROR_KIND)?)
                .map_err(|e| corrupt(format!("header `{ERROR_KIND}`: {e}")))?,
            error: get(ERROR)?.unwrap_or_default().to_owned(),
        };
        if envelope.original_partition < 0 || envelope.original_offset < 0 {
            return Err(corrupt("negative original partition or offset".to_owned()));
        }
        Ok((start, envelope))
    }
}

fn corrupt(msg: String) -> EnvelopeError {
    EnvelopeError::Corrupt(msg)
}

/// One line, control characters replaced, cut to [`MAX_ERROR_TEXT`] bytes.
pub(crate) fn truncate_error(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= MAX_ERROR_TEXT {
        return clean;
    }
    const ELLIPSIS: &str = "…";
    let mut cut = MAX_ERROR_TEXT - ELLIPSIS.len();
    while !clean.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{ELLIPSIS}", &clean[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            key_order_since: None,
            after_dead_letter: None,
            original_topic: "orders".into(),
            original_partition: 3,
            original_offset: 42,
            original_timestamp: Some(1_700_000_000_000),
            group: "billing".into(),
            attempts: 2,
            first_failure: 1_700_000_001_000,
            due: Some(1_700_000_031_000),
            reason: None,
            error: "connection refused".into(),
        }
    }

    #[test]
    fn key_order_marks_round_trip_and_are_absent_by_default() {
        let plain = sample().to_headers();
        assert!(!plain
            .iter()
            .any(|h| h.key.starts_with(b"sidetrack-key-order")));
        let marked = Envelope {
            key_order_since: Some(1_700_000_000_500),
            after_dead_letter: Some(7),
            ..sample()
        };
        let (_, back) = Envelope::split(&marked.to_headers()).unwrap();
        assert_eq!(back, marked);
        let mut bad = marked.to_headers();
        bad.last_mut().unwrap().value = Some(b"x".to_vec());
        assert!(Envelope::split(&bad).is_err());
    }

    #[test]
    fn round_trip_after_user_headers() {
        let mut headers = vec![
            Header::new("trace-id", b"abc".to_vec()),
            Header::null("null-one"),
        ];
        headers.extend(sample().to_headers());
        let (n, env) = Envelope::split(&headers).unwrap();
        assert_eq!(n, 2);
        assert_eq!(env, sample());
    }

    #[test]
    fn header_values_are_readable_text() {
        let headers = sample().to_headers();
        let text: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                (
                    String::from_utf8(h.key.clone()).unwrap(),
                    String::from_utf8(h.value.clone().unwrap()).unwrap(),
                )
            })
            .collect();
        assert_eq!(text[0], ("sidetrack-version".into(), "1".into()));
        assert!(text.contains(&("sidetrack-attempts".into(), "2".into())));
        assert!(text.contains(&("sidetrack-error-kind".into(), "retryable".into())));
        assert!(text.contains(&("sidetrack-due".into(), "1700000031000".into())));
    }

    #[test]
    fn optional_fields_may_be_absent() {
        let env = Envelope {
            key_order_since: None,
            after_dead_letter: None,
            original_timestamp: None,
            due: None,
            reason: Some(Reason::Exhausted),
            ..sample()
        };
        let (_, back) = Envelope::split(&env.to_headers()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn colliding_user_headers_stay_user_headers() {
        let mut headers = vec![
            Header::new("sidetrack-version", b"user's own".to_vec()),
            Header::new("sidetrack-attempts", b"lots".to_vec()),
        ];
        headers.extend(sample().to_headers());
        let (n, env) = Envelope::split(&headers).unwrap();
        assert_eq!(n, 2);
        assert_eq!(env.attempts, 2);
    }

    #[test]
    fn missing_and_corrupt_envelopes_are_rejected() {
        assert_eq!(Envelope::split(&[]), Err(EnvelopeError::Missing));
        let plain = [Header::new("x", b"y".to_vec())];
        assert_eq!(Envelope::split(&plain), Err(EnvelopeError::Missing));

        let replace = |name: &str, value: &[u8]| {
            let mut h = sample().to_headers();
            for x in h.iter_mut().filter(|x| x.is(name)) {
                x.value = Some(value.to_vec());
            }
            Envelope::split(&h)
        };
        assert!(matches!(
            replace(names::ATTEMPTS, b"-1"),
            Err(EnvelopeError::Corrupt(_))
        ));
        assert!(matches!(
            replace(names::ATTEMPTS, b"99999999999999"),
            Err(EnvelopeError::Corrupt(_))
        ));
        assert!(matches!(
            replace(names::DUE, b"tomorrow"),
            Err(EnvelopeError::Corrupt(_))
        ));
        assert!(matches!(
            replace(names::ERROR_KIND, b"meh"),
            Err(EnvelopeError::Corrupt(_))
        ));
        assert!(matches!(
            replace(names::ORIGINAL_TOPIC, &[0xff, 0xfe]),
            Err(EnvelopeError::Corrupt(_))
        ));
        assert!(matches!(
            replace(names::ORIGINAL_OFFSET, b"-5"),
            Err(EnvelopeError::Corrupt(_))
        ));
        assert_eq!(
            replace(names::VERSION, b"2"),
            Err(EnvelopeError::UnsupportedVersion("2".into()))
        );

        let mut dup = sample().to_headers();
        dup.push(Header::new(names::ATTEMPTS, b"1".to_vec()));
        assert!(
            matches!(Envelope::split(&dup), Err(EnvelopeError::Corrupt(m)) if m.contains("twice"))
        );

        let mut missing = sample().to_headers();
        missing.retain(|h| !h.is(names::GROUP));
        assert!(
            matches!(Envelope::split(&missing), Err(EnvelopeError::Corrupt(m)) if m.contains("missing"))
        );

        let mut trailing = sample().to_headers();
        trailing.push(Header::new("user-after", b"x".to_vec()));
        assert!(matches!(
            Envelope::split(&trailing),
            Err(EnvelopeError::Corrupt(_))
        ));
    }

    #[test]
    fn error_text_is_bounded_and_one_line() {
        let long = "é".repeat(2000);
        let cut = truncate_error(&long);
        assert!(cut.len() <= MAX_ERROR_TEXT);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate_error("a\nb\tc"), "a b c");
        let env = Envelope {
            key_order_since: None,
            after_dead_letter: None,
            error: "x".repeat(5000),
            ..sample()
        };
        let (_, back) = Envelope::split(&env.to_headers()).unwrap();
        assert!(back.error.len() <= MAX_ERROR_TEXT);
    }
}
