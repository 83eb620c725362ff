//! The wire format: Confluent REST v2 produce bodies in three content types, the v3
//! single-record body, and the responses. Decoding takes any bytes and answers a clear
//! [`ApiError`] for anything it cannot use; it never panics (property-tested below).

use std::borrow::Cow;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::status::{ApiError, ErrorKind};
use crate::Header;

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

/// How keys and values are written in a v2 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `application/vnd.kafka.json.v2+json` and `application/json`: any JSON, written as its
    /// JSON text.
    Json,
    /// `application/vnd.kafka.binary.v2+json`: base64 strings.
    Binary,
}

/// Reads the `Content-Type` of a v2 produce request (parameters such as `charset` ignored,
/// case-insensitive).
pub(crate) fn format_of(content_type: Option<&[u8]>) -> Result<Format, ApiError> {
    let hint = "send Content-Type: application/vnd.kafka.json.v2+json (JSON keys and values), \
                application/vnd.kafka.binary.v2+json (base64) or application/json";
    let Some(raw) = content_type else {
        return Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            format!("no Content-Type: {hint}"),
        ));
    };
    let essence = raw.split(|&b| b == b';').next().unwrap_or_default();
    let essence = String::from_utf8_lossy(essence).trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/vnd.kafka.json.v2+json" | "application/json" => Ok(Format::Json),
        "application/vnd.kafka.binary.v2+json" => Ok(Format::Binary),
        "application/vnd.kafka.avro.v2+json"
        | "application/vnd.kafka.protobuf.v2+json"
        | "application/vnd.kafka.jsonschema.v2+json" => Err(ApiError::new(
            ErrorKind::SchemaFormat,
            format!("`{essence}` needs a schema registry, which this proxy does not use: {hint}"),
        )),
        _ => Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            format!(
                "unsupported Content-Type `{}`: {hint}",
                truncate(&essence, 100)
            ),
        )),
    }
}

/// Checks that a v3 request is JSON.
pub(crate) fn check_v3_content_type(content_type: Option<&[u8]>) -> Result<(), ApiError> {
    let essence = content_type
        .and_then(|raw| raw.split(|&b| b == b';').next())
        .map(|e| String::from_utf8_lossy(e).trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        other => Err(ApiError::new(
            ErrorKind::UnsupportedMediaType,
            format!(
                "unsupported Content-Type `{}`: v3 takes application/json",
                truncate(other.unwrap_or(""), 100)
            ),
        )),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// A JSON object and never an array. serde's derived structs also take `[a, b]` (fields by
/// position), which neither the API nor its OpenAPI document allows: `[[null, null]]` was
/// produced as a record with no key and no value.
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Other("a JSON value that is not an object"),
                &"a JSON object",
            ));
        }
        serde_json::from_str(raw.get())
            .map(Obj)
            .map_err(serde::de::Error::custom)
    }
}

/// The top level of a body, which must be a JSON object (see [`Obj`]).
fn object_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        // Let serde say what is wrong with text that is not JSON at all.
        serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(json_error)?;
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            "request body: expected a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(json_error)
}

/// A serde failure as a client error: syntax (and encoding, depth) is 42201, the wrong shape
/// is 42202.
fn json_error(e: serde_json::Error) -> ApiError {
    let kind = match e.classify() {
        serde_json::error::Category::Data => ErrorKind::InvalidRequest,
        _ => ErrorKind::MalformedJson,
    };
    ApiError::new(kind, format!("request body: {e}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Body<'a> {
    // Kept as text and parsed by `records_capped`, which stops at the record cap instead of
    // allocating whatever count a body spells out (`{}` is 2 bytes, a record ~100).
    #[serde(borrow)]
    records: &'a RawValue,
    // Schema fields of the Avro/Protobuf formats, meaningless for JSON and binary: accepted
    // and ignored, as Confluent's proxy does.
    #[serde(default, rename = "key_schema")]
    _key_schema: serde::de::IgnoredAny,
    #[serde(default, rename = "value_schema")]
    _value_schema: serde::de::IgnoredAny,
    #[serde(default, rename = "key_schema_id")]
    _key_schema_id: serde::de::IgnoredAny,
    #[serde(default, rename = "value_schema_id")]
    _value_schema_id: serde::de::IgnoredAny,
}

struct V2Records<'a> {
    records: Vec<V2Record<'a>>,
}

/// Parses the `records` array, stopping at `cap` elements.
fn records_capped(raw: &RawValue, cap: usize) -> Result<Vec<V2Record<'_>>, ApiError> {
    seq_capped(raw, cap, "records").map_err(|e| match e {
        Capped::Over => ApiError::new(
            ErrorKind::RequestTooLarge,
            format!("more than {cap} records (max_in_flight_records) can never be admitted; split the request"),
        ),
        Capped::Bad(e) => e,
    })
}

/// Parses a record's `headers` array, stopping at `cap` elements (`max_headers_per_record`):
/// a body of 4 MB holds 400,000 empty headers, each costing far more decoded than sent.
fn headers_capped<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    cap: usize,
    at: &str,
) -> Result<Vec<T>, ApiError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    seq_capped(raw, cap, at).map_err(|e| match e {
        Capped::Over => ApiError::new(
            ErrorKind::TooManyHeaders,
            format!("{at}: more than {cap} headers on one record (max_headers_per_record)"),
        ),
        Capped::Bad(e) => e,
    })
}

enum Capped {
    Over,
    Bad(ApiError),
}

/// Parses a JSON array of `T`, stopping at `cap` elements before allocating more.
fn seq_capped<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    cap: usize,
    what: &str,
) -> Result<Vec<T>, Capped> {
    use serde::de::{Deserializer as _, SeqAccess, Visitor};
    struct Seq<'c, T> {
        cap: usize,
        over: &'c std::cell::Cell<bool>,
        _t: std::marker::PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Seq<'_, T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(Obj(r)) = seq.next_element()? {
                if out.len() == self.cap {
                    self.over.set(true);
                    return Err(serde::de::Error::custom("too many elements"));
                }
                out.push(r);
            }
            Ok(out)
        }
    }
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let res = (&mut de).deserialize_seq(Seq {
        cap,
        over: &over,
        _t: std::marker::PhantomData,
    });
    match res {
        Ok(v) => Ok(v),
        Err(_) if over.get() => Err(Capped::Over),
        Err(e) => Err(Capped::Bad(ApiError::new(
            match e.classify() {
                serde_json::error::Category::Data => ErrorKind::InvalidRequest,
                _ => ErrorKind::MalformedJson,
            },
            format!("request body: {what}: {e}"),
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Record<'a> {
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(default)]
    partition: Option<serde_json::Number>,
    // Kept as text and parsed by `headers_capped`.
    #[serde(borrow, default)]
    headers: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Header<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow, default)]
    value: Option<Cow<'a, str>>,
}

/// Decodes a v2 produce body. `path_partition` (from `/topics/{t}/partitions/{p}`) applies
/// to every record; a record may not name another one.
#[cfg(test)]
pub(crate) fn decode_v2(
    body: &[u8],
    format: Format,
    path_partition: Option<i32>,
) -> Result<Vec<ProduceRecord>, ApiError> {
    decode_v2_capped(body, format, path_partition, usize::MAX)
}

/// [`decode_v2`], refusing (413 41303) a body with more than `max_records` records before
/// allocating them.
#[cfg(test)]
pub(crate) fn decode_v2_capped(
    body: &[u8],
    format: Format,
    path_partition: Option<i32>,
    max_records: usize,
) -> Result<Vec<ProduceRecord>, ApiError> {
    decode_v2_limited(body, format, path_partition, max_records, usize::MAX)
}

/// [`decode_v2_capped`], also refusing (413 41304) a record with more than `max_headers`
/// headers before allocating them.
pub(crate) fn decode_v2_limited(
    body: &[u8],
    format: Format,
    path_partition: Option<i32>,
    max_records: usize,
    max_headers: usize,
) -> Result<Vec<ProduceRecord>, ApiError> {
    let body: V2Body<'_> = object_body(body)?;
    let records = records_capped(body.records, max_records)?;
    let parsed = V2Records { records };
    if parsed.records.is_empty() {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            "`records` is empty",
        ));
    }
    let mut out = Vec::with_capacity(parsed.records.len());
    for (i, r) in parsed.records.into_iter().enumerate() {
        let at = |what: &str| format!("records[{i}].{what}");
        let data = |v: Option<&RawValue>, what: &str| -> Result<Option<Vec<u8>>, ApiError> {
            let Some(v) = v else { return Ok(None) };
            match format {
                // `null` already became `None`; anything else is written as its JSON text.
                Format::Json => {
                    check_depth(v.get()).map_err(|m| {
                        ApiError::new(ErrorKind::MalformedJson, format!("{}: {m}", at(what)))
                    })?;
                    Ok(Some(v.get().as_bytes().to_vec()))
                }
                Format::Binary => {
                    let s: Cow<'_, str> = serde_json::from_str(v.get()).map_err(|_| {
                        ApiError::new(
                            ErrorKind::InvalidBase64,
                            format!("{}: binary format takes a base64 string or null", at(what)),
                        )
                    })?;
                    base64_decode(&s).map(Some).map_err(|m| {
                        ApiError::new(ErrorKind::InvalidBase64, format!("{}: {m}", at(what)))
                    })
                }
            }
        };
        let key = data(r.key, "key")?;
        let value = data(r.value, "value")?;
        let partition = match &r.partition {
            None => path_partition,
            Some(n) => {
                let p = partition_of(n).map_err(|m| {
                    ApiError::new(
                        ErrorKind::InvalidPartition,
                        format!("{}: {m}", at("partition")),
                    )
                })?;
                // On `/topics/{t}/partitions/{p}` the path names the partition, as in
                // Confluent's PartitionProduceRequest, whose records have no `partition`. One
                // rule, stated by the OpenAPI document: records there name none (even the same).
                if path_partition.is_some() {
                    return Err(ApiError::new(
                        ErrorKind::InvalidPartition,
                        format!(
                            "{}: records sent to /topics/{{topic}}/partitions/{{partition}} take the partition of the path and may not name one ({p})",
                            at("partition")
                        ),
                    ));
                }
                Some(p)
            }
        };
        let sent: Vec<V2Header<'_>> = headers_capped(r.headers, max_headers, &at("headers"))?;
        let mut headers = Vec::with_capacity(sent.len());
        for (j, h) in sent.into_iter().enumerate() {
            let hat = |what: &str| at(&format!("headers[{j}].{what}"));
            check_header_name(&h.key).map_err(|m| {
                ApiError::new(ErrorKind::InvalidHeader, format!("{}: {m}", hat("key")))
            })?;
            let value = match h.value {
                None => None,
                Some(v) => Some(base64_decode(&v).map_err(|m| {
                    ApiError::new(ErrorKind::InvalidBase64, format!("{}: {m}", hat("value")))
                })?),
            };
            headers.push(Header {
                key: h.key.into_owned().into_bytes(),
                value,
            });
        }
        out.push(ProduceRecord {
            key,
            value,
            partition,
            headers,
            timestamp: None,
        });
    }
    Ok(out)
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

/// A partition number from a URL path segment.
pub(crate) fn partition_from_path(s: &str) -> Result<i32, ApiError> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::new(
            ErrorKind::InvalidPartition,
            format!("`{}` is not a partition number", truncate(s, 20)),
        ));
    }
    s.parse::<i32>().map_err(|_| {
        ApiError::new(
            ErrorKind::InvalidPartition,
            format!("`{s}` is not a partition number"),
        )
    })
}

fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("not valid base64 (standard alphabet, padded): {e}"))
}

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

/// Milliseconds since the epoch of an RFC 3339 `date-time` (section 5.6: `T` and `Z` in either
/// case, any fraction of a second, `Z` or a `+hh:mm`/`-hh:mm` offset, a leap second `:60`),
/// `None` for anything else, as the OpenAPI document's `format: date-time` says. (humantime's
/// "weak" parser took a space for `T` and no offset, and no offset but `Z`.) Years 0000-9999.
fn rfc3339_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0i64, |n, c| n * 10 + i64::from(c - b'0')))
    };
    let at = |i: usize, c: u8| b.get(i).is_some_and(|x| x.eq_ignore_ascii_case(&c));
    if !(at(4, b'-') && at(7, b'-') && at(10, b'T') && at(13, b':') && at(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        // Milliseconds: the first three digits, the rest dropped.
        for k in 0..3 {
            millis = millis * 10
                + b.get(start + k)
                    .filter(|_| start + k < i)
                    .map_or(0, |c| i64::from(c - b'0'));
        }
    }
    let offset_minutes = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && at(i + 3, b':') => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if *sign == b'-' {
                -m
            } else {
                m
            }
        }
        _ => return None,
    };
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(secs * 1000 + millis)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V3Body<'a> {
    #[serde(default)]
    partition_id: Option<serde_json::Number>,
    // Kept as text and parsed by `headers_capped`.
    #[serde(borrow, default)]
    headers: Option<&'a RawValue>,
    #[serde(borrow, default)]
    key: Option<Obj<V3Data<'a>>>,
    #[serde(borrow, default)]
    value: Option<Obj<V3Data<'a>>>,
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V3Header<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    value: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V3Data<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    // Schema-registry fields: answered with 415.
    #[serde(default)]
    schema_id: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    schema_version: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    subject: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    subject_name_strategy: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    schema: Option<serde::de::IgnoredAny>,
}

/// What a v3 key or value was sent as, for the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum V3Type {
    /// base64 bytes
    Binary,
    /// any JSON, written as its text
    Json,
    /// a string, written as UTF-8
    String,
}

/// Decodes a v3 single-record body. Returns the record and the types of key and value.
#[cfg(test)]
pub(crate) fn decode_v3(
    body: &[u8],
) -> Result<(ProduceRecord, Option<V3Type>, Option<V3Type>), ApiError> {
    decode_v3_limited(body, usize::MAX)
}

/// [`decode_v3`], refusing (413 41304) more than `max_headers` headers before allocating
/// them.
pub(crate) fn decode_v3_limited(
    body: &[u8],
    max_headers: usize,
) -> Result<(ProduceRecord, Option<V3Type>, Option<V3Type>), ApiError> {
    let parsed: V3Body<'_> = object_body(body)?;
    let partition = match &parsed.partition_id {
        None => None,
        Some(n) => Some(partition_of(n).map_err(|m| {
            ApiError::new(ErrorKind::InvalidPartition, format!("partition_id: {m}"))
        })?),
    };
    let data = |d: Option<V3Data<'_>>,
                what: &str|
     -> Result<(Option<Vec<u8>>, Option<V3Type>), ApiError> {
        let Some(d) = d else { return Ok((None, None)) };
        if d.schema_id.is_some()
            || d.schema_version.is_some()
            || d.subject.is_some()
            || d.subject_name_strategy.is_some()
            || d.schema.is_some()
        {
            return Err(ApiError::new(
                ErrorKind::SchemaFormat,
                format!("{what}: schemas need a schema registry, which this proxy does not use"),
            ));
        }
        // Upper case only, as Confluent's v3 API spells its enum (and the OpenAPI document).
        let kind = match d.kind.as_deref() {
            None | Some("JSON") => V3Type::Json,
            Some("BINARY") => V3Type::Binary,
            Some("STRING") => V3Type::String,
            Some("AVRO" | "PROTOBUF" | "JSONSCHEMA") => {
                return Err(ApiError::new(
                    ErrorKind::SchemaFormat,
                    format!("{what}.type: schema formats need a schema registry, which this proxy does not use"),
                ))
            }
            Some(other) => {
                return Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("{what}.type: `{}` is not BINARY, JSON or STRING", truncate(other, 40)),
                ))
            }
        };
        let Some(raw) = d.data else {
            return Ok((None, Some(kind)));
        };
        let bytes = match kind {
            V3Type::Json => {
                check_depth(raw.get()).map_err(|m| {
                    ApiError::new(ErrorKind::MalformedJson, format!("{what}.data: {m}"))
                })?;
                raw.get().as_bytes().to_vec()
            }
            V3Type::Binary | V3Type::String => {
                let s: Cow<'_, str> = serde_json::from_str(raw.get()).map_err(|_| {
                    ApiError::new(
                        ErrorKind::InvalidRequest,
                        format!("{what}.data: must be a string for {kind:?}"),
                    )
                })?;
                if kind == V3Type::String {
                    s.into_owned().into_bytes()
                } else {
                    base64_decode(&s).map_err(|m| {
                        ApiError::new(ErrorKind::InvalidBase64, format!("{what}.data: {m}"))
                    })?
                }
            }
        };
        Ok((Some(bytes), Some(kind)))
    };
    let (key, key_type) = data(parsed.key.map(|o| o.0), "key")?;
    let (value, value_type) = data(parsed.value.map(|o| o.0), "value")?;
    let sent: Vec<V3Header<'_>> = headers_capped(parsed.headers, max_headers, "headers")?;
    let mut headers = Vec::with_capacity(sent.len());
    for (j, h) in sent.into_iter().enumerate() {
        check_header_name(&h.name).map_err(|m| {
            ApiError::new(ErrorKind::InvalidHeader, format!("headers[{j}].name: {m}"))
        })?;
        let value = match h.value {
            None => None,
            Some(v) => Some(base64_decode(&v).map_err(|m| {
                ApiError::new(ErrorKind::InvalidBase64, format!("headers[{j}].value: {m}"))
            })?),
        };
        headers.push(Header {
            key: h.name.into_owned().into_bytes(),
            value,
        });
    }
    let timestamp = match parsed.timestamp {
        None => None,
        Some(t) => {
            let ms = rfc3339_millis(&t).ok_or_else(|| {
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!("timestamp: `{}` is not an RFC 3339 time", truncate(&t, 40)),
                )
            })?;
            if ms < 0 {
                return Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    "timestamp: before 1970",
                ));
            }
            Some(ms)
        }
    };
    Ok((
        ProduceRecord {
            key,
            value,
            partition,
            headers,
            timestamp,
        },
        key_type,
        value_type,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// Found by schemathesis against the OpenAPI document: serde's derived structs took JSON
    /// arrays (fields by position), so `[[null, null]]` was produced as an empty record.
    #[test]
    fn objects_are_objects_never_arrays() {
        for (body, format) in [
            (&br#"{"records":[[null,null]]}"#[..], Format::Binary),
            (br#"{"records":[{"headers":[["h",null]]}]}"#, Format::Json),
            (br#"[{"value":1}]"#, Format::Json),
        ] {
            let e = decode_v2(body, format, None).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidRequest, "{}", e.message);
        }
        for body in [
            &br#"{"value":[null,null]}"#[..],
            br#"{"headers":[["h",null]]}"#,
            br#"[null]"#,
        ] {
            let e = decode_v3(body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidRequest, "{}", e.message);
        }
        // Not JSON at all stays a syntax error.
        assert_eq!(
            decode_v2(b"[{", Format::Json, None).unwrap_err().kind,
            ErrorKind::MalformedJson
        );
    }

    #[test]
    fn records_on_the_partition_route_name_no_partition() {
        let body = br#"{"records":[{"value":1,"partition":2}]}"#;
        let e = decode_v2(body, Format::Json, Some(2)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidPartition);
        let ok = decode_v2(
            br#"{"records":[{"value":1},{"partition":null}]}"#,
            Format::Json,
            Some(2),
        )
        .unwrap();
        assert!(ok.iter().all(|r| r.partition == Some(2)));
    }

    #[test]
    fn v3_types_are_upper_case() {
        let e = decode_v3(br#"{"value":{"type":"binary","data":"AA=="}}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert!(decode_v3(br#"{"value":{"type":"BINARY","data":"AA=="}}"#).is_ok());
    }

    #[test]
    fn rfc3339_times() {
        let epoch_2026 = 1_767_225_600_000;
        for (text, ms) in [
            ("2026-01-01T00:00:00Z", epoch_2026),
            ("2026-01-01t00:00:00z", epoch_2026),
            ("2026-01-01T01:21:00+01:21", epoch_2026),
            ("2025-12-31T18:39:00-05:21", epoch_2026),
            ("2026-01-01T00:00:00.731268Z", epoch_2026 + 731),
            ("2026-01-01T00:00:00.7Z", epoch_2026 + 700),
            ("1970-01-01T00:00:00Z", 0),
            ("2024-02-29T00:00:00Z", 1_709_164_800_000),
            // A leap second reads as the next second.
            ("2016-12-31T23:59:60Z", 1_483_228_800_000),
            ("1969-12-31T23:59:59Z", -1000),
        ] {
            assert_eq!(rfc3339_millis(text), Some(ms), "{text}");
        }
        for text in [
            "2026-01-01 00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+0100",
            "2026-01-01T00:00:00.Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00+24:00",
            "2026-01-01T00:00:00Zx",
            "२०२६-01-01T00:00:00Z",
            "",
        ] {
            assert_eq!(rfc3339_millis(text), None, "{text}");
        }
        let e = decode_v3(br#"{"timestamp":"1969-12-31T23:59:59Z"}"#).unwrap_err();
        assert!(e.message.contains("before 1970"), "{}", e.message);
    }

    proptest! {
        #[test]
        fn rfc3339_never_panics(s in ".{0,40}") {
            let _ = rfc3339_millis(&s);
        }
        #[test]
        fn rfc3339_agrees_with_humantime_on_utc_times(secs in 0i64..253_402_300_799, millis in 0i64..1000) {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis((secs * 1000 + millis) as u64);
            let text = humantime::format_rfc3339_millis(t).to_string();
            prop_assert_eq!(rfc3339_millis(&text), Some(secs * 1000 + millis));
        }
    }

    #[test]
    fn json_format_writes_json_text() {
        let body = br#"{"records":[{"key":"k1","value":{"a":[1,2]}},{"value":null},{"key":7,"value":"x","partition":3}]}"#;
        let r = decode_v2(body, Format::Json, None).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].key.as_deref(), Some(&b"\"k1\""[..]));
        assert_eq!(r[0].value.as_deref(), Some(&br#"{"a":[1,2]}"#[..]));
        assert_eq!(r[1].key, None);
        assert_eq!(r[1].value, None);
        assert_eq!(r[2].partition, Some(3));
    }

    #[test]
    fn binary_format_and_headers() {
        let body = format!(
            r#"{{"records":[{{"key":"{}","value":"{}","headers":[{{"key":"trace","value":"{}"}},{{"key":"n","value":null}}]}}]}}"#,
            b64(b"\xff\x00"),
            b64(b"payload"),
            b64(b"\x01\x02")
        );
        let r = decode_v2(body.as_bytes(), Format::Binary, None).unwrap();
        assert_eq!(r[0].key.as_deref(), Some(&b"\xff\x00"[..]));
        assert_eq!(
            r[0].headers,
            vec![
                Header::new("trace", b"\x01\x02".to_vec()),
                Header::null("n")
            ]
        );
        assert_eq!(r[0].size(), 2 + 7 + 5 + 2 + 1);
    }

    fn kind(body: &[u8], f: Format) -> ErrorKind {
        decode_v2(body, f, None).map(|r| r.len()).unwrap_err().kind
    }

    #[test]
    fn bad_bodies_have_clear_codes() {
        assert_eq!(kind(b"{", Format::Json), ErrorKind::MalformedJson);
        assert_eq!(kind(b"\xff\xfe", Format::Json), ErrorKind::MalformedJson);
        assert_eq!(kind(b"{}", Format::Json), ErrorKind::InvalidRequest);
        assert_eq!(
            kind(br#"{"records":[]}"#, Format::Json),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(br#"{"records":[{"vaule":1}]}"#, Format::Json),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            kind(br#"{"records":[{"value":"%%%"}]}"#, Format::Binary),
            ErrorKind::InvalidBase64
        );
        assert_eq!(
            kind(br#"{"records":[{"value":5}]}"#, Format::Binary),
            ErrorKind::InvalidBase64
        );
        for p in [
            "-1",
            "2147483648",
            "1.5",
            "1e3",
            "99999999999999999999999",
            "\"1\"",
        ] {
            let body = format!(r#"{{"records":[{{"value":1,"partition":{p}}}]}}"#);
            let k = kind(body.as_bytes(), Format::Json);
            assert!(
                matches!(k, ErrorKind::InvalidPartition | ErrorKind::InvalidRequest),
                "{p}: {k:?}"
            );
        }
        let deep = |n: usize| {
            format!(
                "{{\"records\":[{{\"value\":{}{}}}]}}",
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        for n in [10_000, MAX_JSON_DEPTH + 1] {
            let r = decode_v2(deep(n).as_bytes(), Format::Json, None);
            assert_eq!(r.map_err(|e| e.kind).err(), Some(ErrorKind::MalformedJson));
        }
        assert!(decode_v2(deep(MAX_JSON_DEPTH).as_bytes(), Format::Json, None).is_ok());
        // Brackets inside strings (and escaped quotes) do not count.
        let in_string = format!(
            "{{\"records\":[{{\"value\":\"{}\\\"\"}}]}}",
            "[".repeat(500)
        );
        assert!(decode_v2(in_string.as_bytes(), Format::Json, None).is_ok());
        assert_eq!(
            kind(
                br#"{"records":[{"value":1,"headers":[{"key":"a\u0000b","value":null}]}]}"#,
                Format::Json
            ),
            ErrorKind::InvalidHeader
        );
        assert_eq!(
            kind(br#"{"records":[{"value":1,"headers":[{"key":"Sidetrack-Idempotency-Key","value":null}]}]}"#, Format::Json),
            ErrorKind::InvalidHeader
        );
    }

    #[test]
    fn record_count_is_capped_before_allocating() {
        let body = format!("{{\"records\":[{}]}}", vec!["{}"; 100].join(","));
        assert_eq!(
            decode_v2_capped(body.as_bytes(), Format::Json, None, 100)
                .unwrap()
                .len(),
            100
        );
        let e = decode_v2_capped(body.as_bytes(), Format::Json, None, 99).unwrap_err();
        assert_eq!(e.kind, ErrorKind::RequestTooLarge);
        // Other errors inside the array keep their codes.
        let e = decode_v2_capped(br#"{"records":[{"x":1}]}"#, Format::Json, None, 9).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        let e = decode_v2_capped(br#"{"records":{}}"#, Format::Json, None, 9).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
    }

    #[test]
    fn path_partition_applies_and_conflicts_are_refused() {
        let r = decode_v2(br#"{"records":[{"value":1}]}"#, Format::Json, Some(2)).unwrap();
        assert_eq!(r[0].partition, Some(2));
        let e = decode_v2(
            br#"{"records":[{"value":1,"partition":1}]}"#,
            Format::Json,
            Some(2),
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidPartition);
        assert!(partition_from_path("01").is_ok());
        for p in ["", "-1", "x", "2147483648", "99999999999", "1 "] {
            assert!(partition_from_path(p).is_err(), "{p}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            format_of(Some(b"application/vnd.kafka.binary.v2+json")).unwrap(),
            Format::Binary
        );
        assert_eq!(
            format_of(Some(b"Application/JSON; charset=utf-8")).unwrap(),
            Format::Json
        );
        assert_eq!(
            format_of(None).unwrap_err().kind,
            ErrorKind::UnsupportedMediaType
        );
        assert_eq!(
            format_of(Some(b"text/plain")).unwrap_err().kind,
            ErrorKind::UnsupportedMediaType
        );
        assert_eq!(
            format_of(Some(b"application/vnd.kafka.avro.v2+json"))
                .unwrap_err()
                .kind,
            ErrorKind::SchemaFormat
        );
        assert_eq!(
            format_of(Some(b"\xff\xfe;")).unwrap_err().kind,
            ErrorKind::UnsupportedMediaType
        );
    }

    #[test]
    fn v3_body() {
        let body = format!(
            r#"{{"partition_id":1,"headers":[{{"name":"h","value":"{}"}}],"key":{{"type":"STRING","data":"k"}},"value":{{"type":"BINARY","data":"{}"}},"timestamp":"2026-01-01T00:00:00Z"}}"#,
            b64(b"v"),
            b64(b"\x00\xff")
        );
        let (r, kt, vt) = decode_v3(body.as_bytes()).unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.value.as_deref(), Some(&b"\x00\xff"[..]));
        assert_eq!((kt, vt), (Some(V3Type::String), Some(V3Type::Binary)));
        assert_eq!(r.partition, Some(1));
        assert_eq!(r.timestamp, Some(1_767_225_600_000));
        let (r, _, vt) = decode_v3(br#"{"value":{"data":{"a":1}}}"#).unwrap();
        assert_eq!(r.value.as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(vt, Some(V3Type::Json));
        assert_eq!(
            decode_v3(br#"{"value":{"type":"AVRO","data":1}}"#)
                .unwrap_err()
                .kind,
            ErrorKind::SchemaFormat
        );
        assert_eq!(
            decode_v3(br#"{"value":{"schema_id":3,"data":1}}"#)
                .unwrap_err()
                .kind,
            ErrorKind::SchemaFormat
        );
        assert_eq!(
            decode_v3(br#"{"timestamp":"yesterday"}"#).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            ".*".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(".*", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any bytes, in any format: a record list or a clear error, never a panic.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            for f in [Format::Json, Format::Binary] {
                if let Err(e) = decode_v2(&body, f, None) {
                    prop_assert!(e.status().is_client_error());
                }
            }
            if let Err(e) = decode_v3(&body) {
                prop_assert!(e.status().is_client_error());
            }
        }

        /// Any JSON document in the `records` position, or as a record: decoded or refused
        /// with a 4xx.
        #[test]
        fn any_json_shape_decodes_or_fails_cleanly(v in json_value()) {
            let bodies = [
                serde_json::json!({"records": v.clone()}),
                serde_json::json!({"records": [v.clone()]}),
                serde_json::json!({"records": [{"key": v.clone(), "value": v.clone(), "partition": v.clone(), "headers": v.clone()}]}),
                serde_json::json!({"records": [{"value": 1, "headers": [{"key": v.clone(), "value": v.clone()}]}]}),
                serde_json::json!({"partition_id": v.clone(), "key": v.clone(), "value": {"type": v.clone(), "data": v.clone()}, "headers": v.clone()}),
            ];
            for b in bodies {
                let text = serde_json::to_vec(&b).unwrap();
                for f in [Format::Json, Format::Binary] {
                    if let Err(e) = decode_v2(&text, f, None) {
                        prop_assert!(e.status().is_client_error());
                    }
                }
                if let Err(e) = decode_v3(&text) {
                    prop_assert!(e.status().is_client_error());
                }
            }
        }

        /// Binary records round-trip: whatever bytes a client base64-encodes come out as sent.
        #[test]
        fn binary_round_trip(
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256)),
            hname in "[^\u{0}]{0,20}",
            hvalue in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
            partition in proptest::option::of(0i32..=i32::MAX),
        ) {
            let enc = |v: &Option<Vec<u8>>| v.as_ref().map(|b| b64(b));
            let body = serde_json::json!({"records": [{
                "key": enc(&key), "value": enc(&value), "partition": partition,
                "headers": [{"key": hname, "value": enc(&hvalue)}],
            }]});
            let text = serde_json::to_vec(&body).unwrap();
            match decode_v2(&text, Format::Binary, None) {
                Ok(r) => {
                    prop_assert_eq!(&r[0].key, &key);
                    prop_assert_eq!(&r[0].value, &value);
                    prop_assert_eq!(r[0].partition, partition);
                    prop_assert_eq!(&r[0].headers, &vec![Header { key: hname.clone().into_bytes(), value: hvalue.clone() }]);
                }
                Err(e) => {
                    // Only a reserved header name is refused.
                    prop_assert_eq!(e.kind, ErrorKind::InvalidHeader);
                    prop_assert!(hname.to_ascii_lowercase().starts_with(RESERVED_HEADER_PREFIX));
                }
            }
        }

        /// Any JSON number as a partition: accepted exactly when it is an integer in range.
        #[test]
        fn partition_numbers(text in "-?[0-9]{1,25}(\\.[0-9]{1,3})?([eE][-+]?[0-9]{1,3})?") {
            if let Ok(n) = serde_json::from_str::<serde_json::Number>(&text) {
                let expect = text.bytes().all(|b| b.is_ascii_digit())
                    && text.parse::<u64>().ok().is_some_and(|v| v <= i32::MAX as u64);
                prop_assert_eq!(partition_of(&n).is_ok(), expect, "{}", text);
            }
        }

        /// Any path segment: a partition or a 422.
        #[test]
        fn path_partitions(s in ".{0,14}") {
            match partition_from_path(&s) {
                Ok(p) => {
                    let text = p.to_string();
                    prop_assert_eq!(text.trim_start_matches('0'), s.trim_start_matches('0'));
                }
                Err(e) => prop_assert_eq!(e.kind, ErrorKind::InvalidPartition),
            }
        }

        /// Any Content-Type bytes: a format or a 415.
        #[test]
        fn content_type_bytes(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Err(e) = format_of(Some(&raw)) {
                prop_assert_eq!(e.status().as_u16(), 415);
            }
            if let Err(e) = check_v3_content_type(Some(&raw)) {
                prop_assert_eq!(e.status().as_u16(), 415);
            }
        }
    }
}
