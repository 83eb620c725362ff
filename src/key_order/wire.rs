//! The key-order log's record format: what a `head`, `held` or `release` event looks like in
//! the value of a record of `{topic}.{group}.key-order` (the record's Kafka key is the source
//! record's key). See `docs/key-order.md` for who writes each event and when.
//!
//! It is separate from the state model because it is the one place bytes from the network are
//! trusted: a log partition can hold anything anyone produced to it, so [`decode`] treats its
//! input as hostile — every length is checked against the bytes that remain before anything is
//! allocated, counts are bounded, trailing bytes and unknown kinds or versions are errors, and
//! it never panics (a property test feeds it arbitrary and mutated bytes).
//!
//! Layout (integers big-endian; `bytes` is a `u32` length then that many bytes; `opt` is a
//! `u8` 0 = absent, 1 = present, then `bytes`):
//!
//! ```text
//! magic "SKO" · version u8 (1) · kind u8
//!   kind 1 head:    head i64 · since_ms i64
//!   kind 2 held:    offset i64 · head i64 · timestamp i64 (i64::MIN = none)
//!                   · payload opt · header count u32 · per header: name bytes · value opt
//!   kind 3 release: head i64 · outcome u8 (0 handled, 1 dead-lettered)
//! ```

use crate::handler::Header;

/// The first bytes of every event: tells a key-order record from anything else.
pub(crate) const MAGIC: &[u8; 3] = b"SKO";
/// The format version this build writes and reads.
pub(crate) const VERSION: u8 = 1;
/// Most headers a `held` event may carry (librdkafka itself has no lower limit; this only
/// keeps a hostile count from meaning anything).
pub(crate) const MAX_HEADERS: u32 = 65_536;

const KIND_HEAD: u8 = 1;
const KIND_HELD: u8 = 2;
const KIND_RELEASE: u8 = 3;
/// The `timestamp` of a held record that had none.
const NO_TIMESTAMP: i64 = i64::MIN;

/// How a head ended on its retry tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The handler returned `Ok`.
    Handled,
    /// The DLQ acknowledged it (exhausted, permanent, or a key-order cap).
    DeadLettered,
}

/// A record held behind its key's head: everything needed to hand it to the handler later as
/// if it were read from its source partition (topic and partition are the log partition's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldRecord {
    /// Its offset in the source partition.
    pub(crate) offset: i64,
    /// Its producer timestamp, if it had one.
    pub(crate) timestamp: Option<i64>,
    /// Its payload (`None`: a null payload, kept apart from an empty one).
    pub(crate) payload: Option<Vec<u8>>,
    /// Its headers, names and values as on the wire.
    pub(crate) headers: Vec<Header>,
}

/// One event of a key-order log partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Record `head` of the key failed and went to a retry tier: the key waits behind it,
    /// since `since_ms` (wall clock, ms since the epoch).
    Head {
        /// The head's source offset.
        head: i64,
        /// When the key started waiting.
        since_ms: i64,
    },
    /// A record of a waiting key, held behind the head at source offset `head`.
    Held {
        /// The head it waits behind (as the writer saw it).
        head: i64,
        /// The record itself.
        record: HeldRecord,
    },
    /// The head at source offset `head` ended on its retry tier.
    Release {
        /// The head that ended.
        head: i64,
        /// How it ended.
        ended: Ended,
    },
}

/// Why bytes are not a key-order event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DecodeError {
    /// The value does not start with the magic bytes: not written by sidetrack.
    #[error("not a key-order event (no `SKO` magic)")]
    NotKeyOrder,
    /// Written by a newer format this build cannot read.
    #[error("key-order event version {0} (this build reads {VERSION})")]
    Version(u8),
    /// An event kind this build does not know.
    #[error("unknown key-order event kind {0}")]
    Kind(u8),
    /// The value ends inside a field.
    #[error("key-order event truncated at byte {0}")]
    Truncated(usize),
    /// A field holds a value it may not (a negative offset, a bad flag, too many headers).
    #[error("key-order event field `{0}` is invalid")]
    Invalid(&'static str),
    /// Bytes follow the last field.
    #[error("{0} bytes after the end of a key-order event")]
    Trailing(usize),
}

impl Event {
    /// Writes the event's value (the record's key is the source key, written by the caller).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        match self {
            Event::Head { head, since_ms } => {
                out.push(KIND_HEAD);
                out.extend_from_slice(&head.to_be_bytes());
                out.extend_from_slice(&since_ms.to_be_bytes());
            }
            Event::Held { head, record } => {
                out.push(KIND_HELD);
                out.extend_from_slice(&record.offset.to_be_bytes());
                out.extend_from_slice(&head.to_be_bytes());
                out.extend_from_slice(&record.timestamp.unwrap_or(NO_TIMESTAMP).to_be_bytes());
                put_opt(&mut out, record.payload.as_deref());
                // A record has far fewer headers than u32::MAX (librdkafka's own count is an
                // int); saturating keeps `encode` total, and `decode` would then refuse it.
                out.extend_from_slice(
                    &u32::try_from(record.headers.len())
                        .unwrap_or(u32::MAX)
                        .to_be_bytes(),
                );
                for h in &record.headers {
                    put_bytes(&mut out, &h.key);
                    put_opt(&mut out, h.value.as_deref());
                }
            }
            Event::Release { head, ended } => {
                out.push(KIND_RELEASE);
                out.extend_from_slice(&head.to_be_bytes());
                out.push(match ended {
                    Ended::Handled => 0,
                    Ended::DeadLettered => 1,
                });
            }
        }
        out
    }

    /// The exact length [`Event::encode`] writes (one allocation per event).
    fn encoded_len(&self) -> usize {
        5 + match self {
            Event::Head { .. } => 16,
            Event::Held { record, .. } => {
                24 + 1
                    + record.payload.as_ref().map_or(0, |p| 4 + p.len())
                    + 4
                    + record
                        .headers
                        .iter()
                        .map(|h| 4 + h.key.len() + 1 + h.value.as_ref().map_or(0, |v| 4 + v.len()))
                        .sum::<usize>()
            }
            Event::Release { .. } => 9,
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Kafka caps a record far below 4 GiB; a longer field cannot reach here.
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

/// A cursor over untrusted bytes: every read checks what remains first.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(DecodeError::Truncated(self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }
    fn offset(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        let v = self.i64()?;
        if v < 0 {
            return Err(DecodeError::Invalid(field));
        }
        Ok(v)
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn opt(&mut self, field: &'static str) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.bytes().map(Some),
            _ => Err(DecodeError::Invalid(field)),
        }
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// Reads one event from a record's value. Never panics, and allocates no more than the input's
/// length whatever its length fields say.
pub(crate) fn decode(value: &[u8]) -> Result<Event, DecodeError> {
    if value.len() < MAGIC.len() || &value[..MAGIC.len()] != MAGIC {
        return Err(DecodeError::NotKeyOrder);
    }
    let mut r = Reader {
        bytes: value,
        at: MAGIC.len(),
    };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let event = match r.u8()? {
        KIND_HEAD => Event::Head {
            head: r.offset("head")?,
            since_ms: r.i64()?,
        },
        KIND_HELD => {
            let offset = r.offset("offset")?;
            let head = r.offset("head")?;
            let timestamp = match r.i64()? {
                NO_TIMESTAMP => None,
                t => Some(t),
            };
            let payload = r.opt("payload")?.map(<[u8]>::to_vec);
            let count = r.u32()?;
            // Each header takes at least 5 bytes: a count above what remains is a lie, and
            // must not size an allocation.
            if count > MAX_HEADERS || count as usize > r.remaining() / 5 {
                return Err(DecodeError::Invalid("header count"));
            }
            let mut headers = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let key = r.bytes()?.to_vec();
                let value = r.opt("header value")?.map(<[u8]>::to_vec);
                headers.push(Header { key, value });
            }
            // `offset` may be below `head`: a record re-read from the source after a crash,
            // already handled before its key's head failed, is held (a duplicate) rather than
            // run beside the key's held records.
            Event::Held {
                head,
                record: HeldRecord {
                    offset,
                    timestamp,
                    payload,
                    headers,
                },
            }
        }
        KIND_RELEASE => Event::Release {
            head: r.offset("head")?,
            ended: match r.u8()? {
                0 => Ended::Handled,
                1 => Ended::DeadLettered,
                _ => return Err(DecodeError::Invalid("outcome")),
            },
        },
        other => return Err(DecodeError::Kind(other)),
    };
    match r.remaining() {
        0 => Ok(event),
        n => Err(DecodeError::Trailing(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> impl Strategy<Value = Header> {
        (
            proptest::collection::vec(any::<u8>(), 0..16),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        )
            .prop_map(|(key, value)| Header { key, value })
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0..i64::MAX, any::<i64>()).prop_map(|(head, since_ms)| Event::Head { head, since_ms }),
            (
                0..i64::MAX - 1,
                1..1_000i64,
                proptest::option::of(any::<i64>().prop_filter("none marker", |t| *t != i64::MIN)),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                proptest::collection::vec(header(), 0..6),
            )
                .prop_map(|(head, gap, timestamp, payload, headers)| Event::Held {
                    head,
                    record: HeldRecord {
                        offset: head.saturating_add(gap),
                        timestamp,
                        payload,
                        headers,
                    },
                }),
            (0..i64::MAX, any::<bool>()).prop_map(|(head, dead)| Event::Release {
                head,
                ended: if dead {
                    Ended::DeadLettered
                } else {
                    Ended::Handled
                },
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// What is written reads back the same, and `encoded_len` is exact.
        #[test]
        fn round_trip(e in event()) {
            let bytes = e.encode();
            prop_assert_eq!(bytes.len(), e.encoded_len());
            prop_assert_eq!(decode(&bytes), Ok(e));
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        /// Arbitrary bytes behind a valid prefix (the hard case: they get past the magic and
        /// the version) never panic, and whatever decodes re-encodes to the same bytes.
        #[test]
        fn hostile_bodies_decode_or_fail_cleanly(
            kind in 0u8..5,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = b"SKO\x01".to_vec();
            bytes.push(kind);
            bytes.extend_from_slice(&body);
            if let Ok(e) = decode(&bytes) {
                prop_assert_eq!(e.encode(), bytes);
            }
        }

        /// A valid event with one byte changed, cut short or extended never panics; cut short
        /// it is always an error.
        #[test]
        fn mutated_events_fail_cleanly(
            e in event(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            extra in proptest::collection::vec(any::<u8>(), 1..8),
        ) {
            let bytes = e.encode();
            let i = at.index(bytes.len());
            let mut flipped = bytes.clone();
            flipped[i] = byte;
            let _ = decode(&flipped);
            prop_assert!(decode(&bytes[..i]).is_err());
            let mut longer = bytes.clone();
            longer.extend_from_slice(&extra);
            prop_assert!(matches!(decode(&longer), Err(DecodeError::Trailing(_))));
        }
    }

    #[test]
    fn a_lying_header_count_allocates_nothing_and_fails() {
        let mut bytes = b"SKO\x01\x02".to_vec();
        bytes.extend_from_slice(&5i64.to_be_bytes());
        bytes.extend_from_slice(&1i64.to_be_bytes());
        bytes.extend_from_slice(&NO_TIMESTAMP.to_be_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::Invalid("header count")));
    }

    #[test]
    fn a_lying_length_fails_as_truncated() {
        let mut bytes = b"SKO\x01\x02".to_vec();
        bytes.extend_from_slice(&5i64.to_be_bytes());
        bytes.extend_from_slice(&1i64.to_be_bytes());
        bytes.extend_from_slice(&7i64.to_be_bytes());
        bytes.push(1);
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode(&bytes), Err(DecodeError::Truncated(_))));
    }

    #[test]
    fn other_writers_versions_and_kinds_are_named() {
        assert_eq!(decode(b"{\"json\":1}"), Err(DecodeError::NotKeyOrder));
        assert_eq!(decode(b""), Err(DecodeError::NotKeyOrder));
        assert_eq!(decode(b"SKO\x02\x01"), Err(DecodeError::Version(2)));
        assert_eq!(decode(b"SKO\x01\x09"), Err(DecodeError::Kind(9)));
        let mut neg = b"SKO\x01\x03".to_vec();
        neg.extend_from_slice(&(-1i64).to_be_bytes());
        neg.push(0);
        assert_eq!(decode(&neg), Err(DecodeError::Invalid("head")));
    }

    #[test]
    fn null_and_empty_payloads_stay_apart() {
        let held = |payload| Event::Held {
            head: 1,
            record: HeldRecord {
                offset: 2,
                timestamp: None,
                payload,
                headers: vec![Header::null("n"), Header::new(vec![0xff, 0xfe], "v")],
            },
        };
        for e in [held(None), held(Some(Vec::new()))] {
            assert_eq!(decode(&e.encode()), Ok(e));
        }
    }
}
