//! The wire format of produce requests: what a request body is decoded into
//! ([`ProduceRecord`]), what holding one costs, and the field checks both API versions share.
//!
//! Split by format, each a stage of its own that takes any bytes and answers a clear
//! [`ApiError`](crate::proxy::status::ApiError) for anything it cannot use, never a panic (property-tested in `tests`):
//! - `json`: reading untrusted JSON: objects never arrays, arrays capped before they are
//!   allocated;
//! - `v2`: Confluent REST v2 bodies (`/topics/...`) in their three content types;
//! - `v3`: the v3 single-record body (`/v3/clusters/.../records`).
//!
//! Answers are not here: every response body is written by `render`.

use base64::Engine as _;

use crate::Header;

mod json;
mod v2;
mod v3;

#[cfg(test)]
mod tests;

pub(crate) use v2::{decode_v2_limited, format_of, partition_from_path};
pub(crate) use v3::{check_v3_content_type, decode_v3_limited, V3Type};

/// Header names starting with this are sidetrack's own (envelope, idempotency key); clients
/// may not send them.
pub(crate) const RESERVED_HEADER_PREFIX: &str = "sidetrack-";

/// One record to produce, as decoded from a request (and as a
/// [`RecordRule`](super::RecordRule) sees and may change it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProduceRecord {
    /// Key bytes; `None` for no key.
    pub key: Option<Vec<u8>>,
    /// Value bytes; `None` for a null value (a tombstone).
    pub value: Option<Vec<u8>>,
    /// Partition; `None` lets the producer's partitioner choose (by key hash).
    pub partition: Option<i32>,
    /// Record headers, in order.
    pub headers: Vec<Header>,
    /// Record timestamp, ms since the epoch; `None` for the time of sending.
    pub timestamp: Option<i64>,
}

/// What holding one record costs besides its key, value and header bytes, charged against
/// `max_in_flight_bytes` (and `max_buffered_bytes` while it waits to be admitted).
///
/// Derived from what is held per record until its acknowledgement (x86-64, librdkafka
/// 2.12, glibc): librdkafka's `rd_kafka_msg_t` (176 bytes, key and value copied into the same
/// allocation, plus the allocator's header: 192), its place in the serialised batch (about
/// 30), our [`ProduceRecord`] (96), the delivery slot (40 with its allocation), the outcome
/// slot (48) and the record's entry in the JSON answer (about 60): 466, rounded up to 512.
/// Measured: 50,000 one-byte records in flight grew the proxy's RSS by 373 bytes each
/// (request bodies included).
pub const RECORD_OVERHEAD: usize = 512;

/// What holding one header costs besides its name and value bytes, charged like
/// [`RECORD_OVERHEAD`]: librdkafka's `rd_kafka_header_t` (40 bytes and the two NULs, in a
/// 64-byte allocation) and its slot in the record's header list (8), held until the record
/// is acknowledged, plus our [`Header`] (48), held until it is queued: 120, rounded up to
/// 128. Measured: 20 records of 100,000 empty headers in flight grew the proxy's RSS by 88
/// bytes per header (request bodies included); before, a header was charged only its name
/// and value (0 bytes here).
pub const HEADER_OVERHEAD: usize = 128;

impl ProduceRecord {
    /// Key + value + header bytes (what the record writes; the `bytes` metric).
    pub fn size(&self) -> usize {
        let opt = |v: &Option<Vec<u8>>| v.as_ref().map_or(0, Vec::len);
        opt(&self.key)
            + opt(&self.value)
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + opt(&h.value))
                .sum::<usize>()
    }

    /// What the record costs in memory while the proxy holds it: [`size`](Self::size) plus
    /// [`RECORD_OVERHEAD`] and [`HEADER_OVERHEAD`] per header. This is what
    /// `max_in_flight_bytes` bounds.
    pub fn cost(&self) -> usize {
        self.size()
            .saturating_add(RECORD_OVERHEAD)
            .saturating_add(self.headers.len().saturating_mul(HEADER_OVERHEAD))
    }
}

/// At most `max` characters of client text quoted in an error message, `…` when cut: an
/// answer (and the log) never grows with what a client sent.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Deepest nesting of arrays and objects accepted in a JSON key or value: serde_json's own
/// limit, so whatever the proxy writes, a consumer using serde_json can read. (serde_json does
/// not apply its limit to the raw values the proxy keeps as text.)
pub(crate) const MAX_JSON_DEPTH: usize = 128;

/// Checks the nesting depth of valid JSON text without recursion.
fn check_depth(json: &str) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(format!("JSON nested deeper than {MAX_JSON_DEPTH} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A partition number: an integer in `[0, 2^31)`, nothing else (no fraction, no exponent).
pub(crate) fn partition_of(n: &serde_json::Number) -> Result<i32, String> {
    n.as_u64()
        .and_then(|v| i32::try_from(v).ok())
        .ok_or_else(|| format!("`{n}` is not a partition number (an integer from 0 to 2147483647)"))
}

/// Standard padded base64 (Confluent's binary format), the error ready for a message.
fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("not valid base64 (standard alphabet, padded): {e}"))
}

/// A record header name a client may send: no NUL (librdkafka would cut it there), and not
/// under [`RESERVED_HEADER_PREFIX`] (a client could otherwise forge sidetrack's envelope or
/// idempotency headers).
fn check_header_name(name: &str) -> Result<(), String> {
    if name.contains('\0') {
        // librdkafka takes names as C strings: the name would be cut at the NUL.
        return Err("a header name may not contain NUL".into());
    }
    if name
        .get(..RESERVED_HEADER_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
    {
        return Err(format!(
            "header names starting with `{RESERVED_HEADER_PREFIX}` are reserved"
        ));
    }
    Ok(())
}
