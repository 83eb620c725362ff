//! W3C Trace Context: the `traceparent` and `tracestate` values, parsed from and written to
//! bytes.
//!
//! This stage is pure (no I/O, no OpenTelemetry types, no feature gate) because three callers
//! need it whatever the build: the proxy reads the HTTP headers of a request, the runtime reads
//! record headers written by any client (Java, Go, Python instrumentations all write
//! `traceparent`), and the dead-letter tools print the origin trace id of a dead letter. Header
//! values arrive as bytes from the network, so parsing never panics, never allocates for a
//! `traceparent`, and rejects anything the W3C Trace Context specification (Level 2) does not
//! allow:
//!
//! - `traceparent` is `version-traceid-parentid-flags` in **lowercase** hex; version `ff`, an
//!   all-zero trace id or parent id, and any other length or character are invalid. Version
//!   `00` is exactly 55 bytes; a later version may be longer, but only if byte 55 is `-` (the
//!   spec's forward-compatibility rule). Leading and trailing spaces and tabs (HTTP's optional
//!   white space) are ignored.
//! - `tracestate` is a comma-separated list of at most 32 `key=value` members; keys and values
//!   follow the spec's grammar (simple keys up to 256 bytes, `tenant@system` keys up to
//!   241 + 1 + 14), empty members are skipped, and a duplicated key, a malformed member or a
//!   33rd member makes the **whole** value invalid: the spec says a `tracestate` that cannot be
//!   parsed is not propagated at all.
//!
//! The spec's test suite (w3c/trace-context `test/test.py`) is the table in this module's tests.

use std::fmt;

/// Length in bytes of a version-`00` `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// Most members a `tracestate` may hold.
pub const TRACESTATE_MAX_MEMBERS: usize = 32;
/// Most bytes of `tracestate` sidetrack ever writes into a record (see
/// [`TraceState::truncated`]). A valid `tracestate` can reach ~16 KB (32 members of 256-byte
/// values); copying that into every record of a batch, or into the envelope of an oversized
/// record, would let a caller multiply memory use past the configured limits. The W3C spec
/// lets a vendor truncate the list, and 512 bytes is the limit the spec names as the least a
/// platform should propagate (and what the other OpenTelemetry clients keep).
pub const TRACESTATE_COPY_MAX: usize = 512;

/// A 16-byte trace id. The all-zero id is invalid and never parsed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span (parent) id. The all-zero id is invalid and never parsed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId(pub [u8; 8]);

/// The `trace-flags` byte of a `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceFlags(pub u8);

impl TraceFlags {
    /// Bit 0: the caller may have recorded this trace.
    pub const SAMPLED: TraceFlags = TraceFlags(0x01);
    /// Bit 1 (Level 2): the trace id's right-most 7 bytes are random.
    pub const RANDOM: TraceFlags = TraceFlags(0x02);

    /// True if the `sampled` bit is set.
    pub fn sampled(self) -> bool {
        self.0 & Self::SAMPLED.0 != 0
    }
}

/// Writes `bytes` as lowercase hex into `out`, which must be twice as long.
fn write_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// One lowercase hex digit, or `None`. Upper case is rejected: the spec's grammar is
/// `HEXDIGLC`, and accepting `A-F` would let two spellings of one id through.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes `src` (exactly `2 * N` lowercase hex digits) into `N` bytes.
fn decode_hex<const N: usize>(src: &[u8]) -> Option<[u8; N]> {
    if src.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in src.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

macro_rules! hex_id {
    ($ty:ident, $n:literal) => {
        impl $ty {
            /// The id as lowercase hex.
            pub fn to_hex(&self) -> String {
                let mut buf = [0u8; 2 * $n];
                write_hex(&self.0, &mut buf);
                // Only ASCII hex digits were written.
                String::from_utf8_lossy(&buf).into_owned()
            }

            /// Parses exactly the lowercase hex of a valid (non-zero) id.
            pub fn from_hex(hex: &[u8]) -> Option<Self> {
                decode_hex::<$n>(hex).map($ty).filter(|id| id.is_valid())
            }

            /// False for the all-zero id, which the spec reserves as invalid.
            pub fn is_valid(&self) -> bool {
                self.0 != [0u8; $n]
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; 2 * $n];
                write_hex(&self.0, &mut buf);
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($ty))
            }
        }
    };
}

hex_id!(TraceId, 16);
hex_id!(SpanId, 8);

/// Why a `traceparent` value was rejected. A caller that gets one starts a new trace, as the
/// spec requires; the variant is for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParentError {
    /// Shorter than 55 bytes, or a version-`00` value that is not exactly 55 bytes.
    #[error("traceparent is {0} bytes long (version 00 is exactly 55)")]
    Length(usize),
    /// The version is not two lowercase hex digits.
    #[error("traceparent version is not two lowercase hex digits")]
    Version,
    /// Version `ff`, which the spec forbids.
    #[error("traceparent version ff is forbidden")]
    ForbiddenVersion,
    /// A field is not followed by `-` where the format puts one.
    #[error("traceparent fields are not separated by '-'")]
    Separator,
    /// The trace id is not 32 lowercase hex digits, or is all zeros.
    #[error("trace-id is not 32 lowercase hex digits, or is all zeros")]
    TraceId,
    /// The parent id is not 16 lowercase hex digits, or is all zeros.
    #[error("parent-id is not 16 lowercase hex digits, or is all zeros")]
    ParentId,
    /// The flags are not two lowercase hex digits.
    #[error("trace-flags is not two lowercase hex digits")]
    Flags,
}

/// A parsed `traceparent`: which trace, which span is the parent, and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The version read (`0` for today's format; a later one is parsed as the spec says).
    pub version: u8,
    /// The trace every span of the request shares.
    pub trace_id: TraceId,
    /// The span of the caller (the `parent-id` field).
    pub parent_id: SpanId,
    /// The `trace-flags` byte.
    pub flags: TraceFlags,
}

/// Strips HTTP's optional white space (space and horizontal tab) from both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

impl TraceParent {
    /// A version-00 value for these ids and flags.
    pub fn new(trace_id: TraceId, parent_id: SpanId, flags: TraceFlags) -> Self {
        TraceParent {
            version: 0,
            trace_id,
            parent_id,
            flags,
        }
    }

    /// Parses a `traceparent` value. Never panics and never allocates, whatever the bytes.
    ///
    /// # Errors
    /// [`TraceParentError`] for anything the spec does not allow (see the module docs).
    pub fn parse(raw: &[u8]) -> Result<Self, TraceParentError> {
        let s = trim_ows(raw);
        if s.len() < TRACEPARENT_LEN {
            return Err(TraceParentError::Length(s.len()));
        }
        let version = decode_hex::<1>(&s[0..2]).ok_or(TraceParentError::Version)?[0];
        if version == 0xff {
            return Err(TraceParentError::ForbiddenVersion);
        }
        if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
            return Err(TraceParentError::Separator);
        }
        if version == 0 && s.len() != TRACEPARENT_LEN {
            return Err(TraceParentError::Length(s.len()));
        }
        // A later version may append fields, but only after a dash: "the 2 characters [of
        // the flags] are either the end of the string or a dash".
        if s.len() > TRACEPARENT_LEN && s[TRACEPARENT_LEN] != b'-' {
            return Err(TraceParentError::Separator);
        }
        let trace_id = TraceId::from_hex(&s[3..35]).ok_or(TraceParentError::TraceId)?;
        let parent_id = SpanId::from_hex(&s[36..52]).ok_or(TraceParentError::ParentId)?;
        let flags = decode_hex::<1>(&s[53..55]).ok_or(TraceParentError::Flags)?[0];
        Ok(TraceParent {
            version,
            trace_id,
            parent_id,
            flags: TraceFlags(flags),
        })
    }

    /// The value to send: always version `00` (a vendor that read a later version writes the
    /// version it knows), 55 bytes, on the stack.
    pub fn to_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        write_hex(&self.trace_id.0, &mut out[3..35]);
        write_hex(&self.parent_id.0, &mut out[36..52]);
        write_hex(&[self.flags.0], &mut out[53..55]);
        out
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.to_bytes();
        f.write_str(std::str::from_utf8(&bytes).map_err(|_| fmt::Error)?)
    }
}

/// Why a `tracestate` value was rejected. The whole value is then dropped (not propagated), as
/// the spec requires; the trace itself continues from the `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceStateError {
    /// A list member is not `key=value`, its key breaks the key grammar or its value the
    /// value grammar. `index` counts non-empty members from 0.
    #[error("tracestate member {index} is not a valid key=value")]
    Member {
        /// Position of the member among the non-empty members.
        index: usize,
    },
    /// The same key appears twice.
    #[error("tracestate repeats the key {0:?}")]
    DuplicateKey(String),
    /// More than [`TRACESTATE_MAX_MEMBERS`] members.
    #[error("tracestate has more than 32 members")]
    TooManyMembers,
}

/// A validated `tracestate`: its members in order (left-most is the most recent vendor).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TraceState {
    members: Vec<(String, String)>,
}

/// Characters allowed after the first one of a key (and of a tenant or system id).
fn key_char(c: u8) -> bool {
    matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

/// The key grammar: `lcalpha 0*255(keychar)`, or `tenant@system` with the tenant
/// `(lcalpha / DIGIT) 0*240(keychar)` and the system `lcalpha 0*13(keychar)`.
fn valid_key(key: &[u8]) -> bool {
    fn part(s: &[u8], max: usize, digit_first: bool) -> bool {
        match s.split_first() {
            Some((&first, rest)) => {
                s.len() <= max
                    && (first.is_ascii_lowercase() || (digit_first && first.is_ascii_digit()))
                    && rest.iter().all(|&c| key_char(c))
            }
            None => false,
        }
    }
    match key.iter().position(|&c| c == b'@') {
        None => part(key, 256, false),
        Some(at) => part(&key[..at], 241, true) && part(&key[at + 1..], 14, false),
    }
}

/// The value grammar: 1 to 256 printable ASCII bytes other than `,` and `=`, not ending in a
/// space.
fn valid_value(value: &[u8]) -> bool {
    let chr = |c: u8| matches!(c, 0x20..=0x2b | 0x2d..=0x3c | 0x3e..=0x7e);
    match value.last() {
        Some(&last) => value.len() <= 256 && last != b' ' && value.iter().all(|&c| chr(c)),
        None => false,
    }
}

impl TraceState {
    /// Parses one `tracestate` value. See [`TraceState::parse_all`].
    ///
    /// # Errors
    /// [`TraceStateError`] if the value breaks the grammar.
    pub fn parse(raw: &[u8]) -> Result<Self, TraceStateError> {
        Self::parse_all([raw])
    }

    /// Parses the values of every `tracestate` header of one request or record, in order, as
    /// one list (the spec combines repeated headers as if joined by commas). Empty values and
    /// empty members are skipped. Never panics, whatever the bytes.
    ///
    /// # Errors
    /// [`TraceStateError`] if any member breaks the grammar, a key repeats, or there are more
    /// than 32 members: the whole state is then invalid.
    pub fn parse_all<'a>(
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, TraceStateError> {
        let mut members: Vec<(String, String)> = Vec::new();
        for value in values {
            for member in value.split(|&c| c == b',') {
                let member = trim_ows(member);
                if member.is_empty() {
                    continue;
                }
                let index = members.len();
                let bad = || TraceStateError::Member { index };
                let eq = member.iter().position(|&c| c == b'=').ok_or_else(bad)?;
                let (key, value) = (&member[..eq], &member[eq + 1..]);
                if !valid_key(key) || !valid_value(value) {
                    return Err(bad());
                }
                if members.len() == TRACESTATE_MAX_MEMBERS {
                    return Err(TraceStateError::TooManyMembers);
                }
                // Both were checked to be ASCII above.
                let key = String::from_utf8_lossy(key).into_owned();
                if members.iter().any(|(k, _)| *k == key) {
                    return Err(TraceStateError::DuplicateKey(key));
                }
                members.push((key, String::from_utf8_lossy(value).into_owned()));
            }
        }
        Ok(TraceState { members })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The members in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.members.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when there are no members (no `tracestate` header is then written).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// This state cut to a header value of at most `max` bytes, by the W3C truncation rule:
    /// members longer than 128 bytes go first (right-most first), then members from the right
    /// (the left-most is the most recent vendor, the one most worth keeping). Unchanged when it
    /// already fits.
    pub fn truncated(&self, max: usize) -> TraceState {
        // Length of `k=v` members joined by `,`.
        let len = |m: &[(String, String)]| {
            m.iter().map(|(k, v)| k.len() + v.len() + 1).sum::<usize>() + m.len().saturating_sub(1)
        };
        let mut members = self.members.clone();
        while len(&members) > max {
            match members
                .iter()
                .rposition(|(k, v)| k.len() + v.len() + 1 > 128)
            {
                Some(i) => {
                    members.remove(i);
                }
                None => {
                    members.pop();
                }
            }
        }
        TraceState { members }
    }

    /// The header value: members joined by `,` without white space.
    pub fn header_value(&self) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(v);
        }
        out
    }
}

impl fmt::Display for TraceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header_value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TP: &str = "00-12345678901234567890123456789012-1234567890123456-01";

    /// The `traceparent` values of the W3C test suite (test/test.py), with whether a vendor must
    /// continue the trace (`true`) or start a new one (`false`).
    const TRACEPARENT_VECTORS: &[(&str, bool)] = &[
        (TP, true),
        (
            "00-12345678901234567890123456789012-1234567890123456-00",
            true,
        ),
        // test_traceparent_version_0x00: nothing may follow a version-00 value.
        (
            "00-12345678901234567890123456789012-1234567890123456-01.",
            false,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like",
            false,
        ),
        // test_traceparent_version_0xcc: a future version is parsed, extra fields after '-'.
        (
            "cc-12345678901234567890123456789012-1234567890123456-01",
            true,
        ),
        (
            "cc-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like",
            true,
        ),
        (
            "cc-12345678901234567890123456789012-1234567890123456-01.what-the-future-will-be-like",
            false,
        ),
        (
            "ff-12345678901234567890123456789012-1234567890123456-01",
            false,
        ),
        (
            ".0-12345678901234567890123456789012-1234567890123456-01",
            false,
        ),
        (
            "0.-12345678901234567890123456789012-1234567890123456-01",
            false,
        ),
        (
            "000-12345678901234567890123456789012-1234567890123456-01",
            false,
        ),
        (
            "0000-12345678901234567890123456789012-1234567890123456-01",
            false,
        ),
        (
            "0-12345678901234567890123456789012-1234567890123456-01",
            false,
        ),
        (
            "00-00000000000000000000000000000000-1234567890123456-01",
            false,
        ),
        (
            "00-.2345678901234567890123456789012-1234567890123456-01",
            false,
        ),
        (
            "00-1234567890123456789012345678901.-1234567890123456-01",
            false,
        ),
        (
            "00-123456789012345678901234567890123-1234567890123456-01",
            false,
        ),
        (
            "00-1234567890123456789012345678901-1234567890123456-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-0000000000000000-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-.234567890123456-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-123456789012345.-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-12345678901234567-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-123456789012345-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-.0",
            false,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-0.",
            false,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-001",
            false,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-1",
            false,
        ),
        // test_traceparent_ows_handling
        (
            " 00-12345678901234567890123456789012-1234567890123456-01",
            true,
        ),
        (
            "\t00-12345678901234567890123456789012-1234567890123456-01",
            true,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-01 ",
            true,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-01\t",
            true,
        ),
        (
            "\t 00-12345678901234567890123456789012-1234567890123456-01 \t",
            true,
        ),
        // The spec's grammar is lowercase hex only.
        (
            "00-12345678901234567890123456789ABC-1234567890123456-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-123456789012345A-01",
            false,
        ),
        (
            "00-12345678901234567890123456789012-1234567890123456-0A",
            false,
        ),
        ("", false),
        // The spec's own examples (section 3.2.2.5).
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            true,
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            true,
        ),
    ];

    /// Every `traceparent` of the W3C test suite is accepted or refused as the suite expects,
    /// and an accepted one yields the trace id it spells.
    #[test]
    fn w3c_traceparent_vectors() {
        for &(value, valid) in TRACEPARENT_VECTORS {
            let got = TraceParent::parse(value.as_bytes());
            assert_eq!(got.is_ok(), valid, "{value:?}: {got:?}");
            if let Ok(tp) = got {
                let id = &value.trim_matches([' ', '\t'])[3..35];
                assert_eq!(tp.trace_id.to_hex(), id);
            }
        }
    }

    /// Fields read from a valid value, and the value written back: always version `00`, a
    /// future version's extra fields dropped.
    #[test]
    fn traceparent_fields_and_round_trip() {
        let tp = TraceParent::parse(TP.as_bytes()).unwrap();
        assert_eq!(tp.version, 0);
        assert_eq!(tp.trace_id.to_hex(), "12345678901234567890123456789012");
        assert_eq!(tp.parent_id.to_hex(), "1234567890123456");
        assert!(tp.flags.sampled());
        assert_eq!(tp.to_string(), TP);
        // A future version is written back as version 00, its extra fields dropped.
        let future = TraceParent::parse(
            b"cc-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like",
        )
        .unwrap();
        assert_eq!(future.version, 0xcc);
        assert_eq!(future.to_string(), TP);
    }

    /// (`tracestate` header values, the members expected or `None` when the state must be
    /// dropped): the W3C test suite's tracestate cases.
    #[allow(clippy::type_complexity)]
    fn tracestate_vectors() -> Vec<(Vec<String>, Option<Vec<(&'static str, &'static str)>>)> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let all_key = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
        let mut value = String::new();
        value.extend((0x20u8..=0x2b).map(char::from));
        value.extend((0x2du8..=0x3c).map(char::from));
        value.extend((0x3eu8..=0x7e).map(char::from));
        let value: &'static str = Box::leak(value.into_boxed_str());
        let vendor_key: &'static str = Box::leak(format!("{all_key}@a-z0-9_-*/").into_boxed_str());
        let many = |n: usize| {
            (1..=n)
                .map(|i| format!("bar{i:02}={i:02}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![
            (s(&["foo=1,bar=2"]), Some(vec![("foo", "1"), ("bar", "2")])),
            (s(&[""]), Some(vec![])),
            (s(&["foo=1", ""]), Some(vec![("foo", "1")])),
            (s(&["", "foo=1"]), Some(vec![("foo", "1")])),
            (
                s(&["foo=1,bar=2", "rojo=1,congo=2", "baz=3"]),
                Some(vec![
                    ("foo", "1"),
                    ("bar", "2"),
                    ("rojo", "1"),
                    ("congo", "2"),
                    ("baz", "3"),
                ]),
            ),
            (s(&["foo=1,foo=1"]), None),
            (s(&["foo=1,foo=2"]), None),
            (s(&["foo=1", "foo=1"]), None),
            (s(&["foo=1", "foo=2"]), None),
            (
                vec![format!("{all_key}={value}")],
                Some(vec![(all_key, value)]),
            ),
            (
                vec![format!("{vendor_key}={value}")],
                Some(vec![(vendor_key, value)]),
            ),
            (
                s(&["foo=1 \t , \t bar=2, \t baz=3"]),
                Some(vec![("foo", "1"), ("bar", "2"), ("baz", "3")]),
            ),
            (
                s(&["foo=1\t \t,\t \tbar=2,\t \tbaz=3"]),
                Some(vec![("foo", "1"), ("bar", "2"), ("baz", "3")]),
            ),
            (s(&[" foo=1"]), Some(vec![("foo", "1")])),
            (s(&["\tfoo=1"]), Some(vec![("foo", "1")])),
            (s(&["foo=1 "]), Some(vec![("foo", "1")])),
            (s(&["foo=1\t"]), Some(vec![("foo", "1")])),
            (s(&["\t foo=1 \t"]), Some(vec![("foo", "1")])),
            (s(&["foo =1"]), None),
            (s(&["FOO=1"]), None),
            (s(&["foo.bar=1"]), None),
            (s(&["foo@=1,bar=2"]), None),
            (s(&["@foo=1,bar=2"]), None),
            (s(&["foo@@bar=1,bar=2"]), None),
            (s(&["foo@bar@baz=1,bar=2"]), None),
            (vec![many(32)], Some(vec![])), // members checked by count below
            (vec![many(33)], None),
            (
                vec!["foo=1".into(), format!("{}=1", "z".repeat(256))],
                Some(vec![]),
            ),
            (vec!["foo=1".into(), format!("{}=1", "z".repeat(257))], None),
            (
                vec![
                    "foo=1".into(),
                    format!("{}@{}=1", "t".repeat(241), "v".repeat(14)),
                ],
                Some(vec![]),
            ),
            (
                vec!["foo=1".into(), format!("{}@v=1", "t".repeat(242))],
                None,
            ),
            (
                vec!["foo=1".into(), format!("t@{}=1", "v".repeat(15))],
                None,
            ),
            (s(&["foo=bar=baz"]), None),
            (s(&["foo=,bar=3"]), None),
        ]
    }

    /// Every `tracestate` case of the W3C test suite: combined in order, OWS ignored, and the
    /// whole state dropped on a duplicate key, a bad key or value, or a 33rd member.
    #[test]
    fn w3c_tracestate_vectors() {
        for (values, expected) in tracestate_vectors() {
            let got = TraceState::parse_all(values.iter().map(|v| v.as_bytes()));
            match (&got, expected) {
                (Err(_), None) => {}
                (Ok(state), Some(members)) if members.is_empty() => {
                    // Cases checked only for acceptance (and count, where the values tell).
                    let n: usize = values
                        .iter()
                        .map(|v| v.split(',').filter(|m| !m.trim().is_empty()).count())
                        .sum();
                    assert_eq!(state.len(), n, "{values:?}");
                }
                (Ok(state), Some(members)) => {
                    assert_eq!(state.iter().collect::<Vec<_>>(), members, "{values:?}");
                }
                _ => panic!("{values:?}: got {got:?}"),
            }
        }
    }

    /// The written value has no white space, keeps the order, and parses back to itself.
    /// The W3C truncation order: long members first, then from the right.
    #[test]
    fn truncated_drops_long_members_then_from_the_right() {
        let long = "l".repeat(200);
        let raw = format!("a=1,big={long},b=2,c=3");
        let state = TraceState::parse(raw.as_bytes()).unwrap();
        assert_eq!(state.truncated(1000), state);
        assert_eq!(state.truncated(11).header_value(), "a=1,b=2,c=3");
        assert_eq!(state.truncated(10).header_value(), "a=1,b=2");
        assert_eq!(state.truncated(2).header_value(), "");
    }

    #[test]
    fn tracestate_header_value_is_canonical() {
        let state = TraceState::parse(b" rojo=00f067aa0ba902b7 ,\tcongo=t61rcWkgMzE ").unwrap();
        assert_eq!(
            state.header_value(),
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        );
        assert_eq!(state.get("congo"), Some("t61rcWkgMzE"));
        assert_eq!(
            TraceState::parse(state.header_value().as_bytes()).unwrap(),
            state
        );
    }

    proptest! {
        /// Hostile bytes never panic either parser.
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = TraceParent::parse(&bytes);
            let _ = TraceState::parse(&bytes);
            let _ = TraceState::parse_all([&bytes[..bytes.len() / 2], &bytes[bytes.len() / 2..]]);
        }

        /// Near-misses of a valid value (one byte replaced) never panic, and are accepted only
        /// if the replacement still spells a valid traceparent.
        #[test]
        fn mutated_traceparent(pos in 0usize..TRACEPARENT_LEN, byte in any::<u8>()) {
            let mut v = TP.as_bytes().to_vec();
            v[pos] = byte;
            if let Ok(tp) = TraceParent::parse(&v) {
                prop_assert_eq!(&tp.to_bytes()[3..], &v[3..]);
            }
        }

        /// Every valid id and flags byte round-trips through the text form.
        #[test]
        fn traceparent_round_trip(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), flags in any::<u8>()) {
            prop_assume!(trace != [0; 16] && span != [0; 8]);
            let tp = TraceParent::new(TraceId(trace), SpanId(span), TraceFlags(flags));
            prop_assert_eq!(TraceParent::parse(&tp.to_bytes()), Ok(tp));
        }

        /// Valid states round-trip through their header value.
        #[test]
        fn tracestate_round_trip(members in proptest::collection::btree_map("[a-z][a-z0-9_*/-]{0,20}(@[a-z][a-z0-9]{0,5})?", "[!-+\\--<>-~]([ -+\\--<>-~]{0,30}[!-+\\--<>-~])?", 0..32)) {
            let value = members.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" , ");
            let state = TraceState::parse(value.as_bytes()).unwrap();
            prop_assert_eq!(state.len(), members.len());
            prop_assert_eq!(TraceState::parse(state.header_value().as_bytes()).unwrap(), state);
        }
    }
}
