//! The v3 produce body (`POST /v3/clusters/{cluster_id}/topics/{topic}/records`): one
//! record whose key and value each say their type (`BINARY`, `JSON`, `STRING`), with an
//! optional RFC 3339 timestamp.
//!
//! ```text
//! {"partition_id":0,"headers":[{"name":"trace","value":"YWJj"}],
//!  "key":{"type":"STRING","data":"k1"},"value":{"type":"JSON","data":{"hello":"world"}},
//!  "timestamp":"2026-11-25T15:40:00Z"}
//! ```
//!
//! The answer echoes each part's type and size, so the decoder reports them ([`V3Type`]).
//! Schema-registry fields (`schema_id`, `subject`, …) are recognised only to be answered 415
//! 41502: this proxy does not use a registry, and silently writing the data without its
//! schema would hand consumers bytes they cannot read.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::json::{headers_capped, object_body, Obj};
use super::{base64_decode, check_depth, check_header_name, partition_of, truncate, ProduceRecord};
use crate::proxy::status::{ApiError, ErrorKind};
use crate::Header;

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

/// Milliseconds since the epoch of an RFC 3339 `date-time` (section 5.6: `T` and `Z` in either
/// case, any fraction of a second, `Z` or a `+hh:mm`/`-hh:mm` offset, a leap second `:60`),
/// `None` for anything else, as the OpenAPI document's `format: date-time` says. (humantime's
/// "weak" parser took a space for `T` and no offset, and no offset but `Z`.) Years 0000-9999.
pub(super) fn rfc3339_millis(s: &str) -> Option<i64> {
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

/// A v3 body: one record, unknown fields refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V3Body<'a> {
    /// `partition_id`: an integer in `[0, 2^31)` (422 42204 otherwise); absent lets the key decide.
    #[serde(default)]
    partition_id: Option<serde_json::Number>,
    // Kept as text and parsed by `headers_capped`.
    /// `headers`: an array of [`V3Header`], at most `max_headers_per_record` (413 41304).
    #[serde(borrow, default)]
    headers: Option<&'a RawValue>,
    /// `key`: a typed [`V3Data`] object; absent or `null` is a null key.
    #[serde(borrow, default)]
    key: Option<Obj<V3Data<'a>>>,
    /// `value`: a typed [`V3Data`] object; absent or `null` produces a tombstone.
    #[serde(borrow, default)]
    value: Option<Obj<V3Data<'a>>>,
    /// `timestamp`: RFC 3339, not before 1970 (422 42202 otherwise); absent lets the producer
    /// stamp the record.
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
}

/// One v3 record header: a name and an optional base64 value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V3Header<'a> {
    /// The header name: no NUL and not starting with `sidetrack-` (422 42205).
    #[serde(borrow)]
    name: Cow<'a, str>,
    /// The value as base64 (422 42203 otherwise); absent or `null` is a null header value.
    #[serde(borrow, default)]
    value: Option<Cow<'a, str>>,
}

/// A v3 key or value: its type (JSON when absent) and its data; the schema-registry fields
/// are recognised only to be refused with 415.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V3Data<'a> {
    /// `type`: `BINARY` (base64 data), `JSON` (any JSON value, the default) or `STRING`.
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
    /// `data`, read as `type` says; kept as raw text so JSON data is written as sent.
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

/// `decode_v3` (tests only), refusing (413 41304) more than `max_headers` headers before allocating
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
