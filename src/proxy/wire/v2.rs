//! Confluent REST v2 produce bodies (`POST /topics/{topic}` and
//! `/topics/{topic}/partitions/{partition}`): one or more records, keys and values as JSON
//! text or base64 by the request's `Content-Type`.
//!
//! ```text
//! Content-Type: application/vnd.kafka.json.v2+json
//! {"records":[{"key":"k1","value":{"hello":"world"},"partition":1,
//!              "headers":[{"key":"trace","value":"YWJj"}]}]}
//! ```
//!
//! With `application/vnd.kafka.binary.v2+json` the key and value are base64 strings. The
//! decoding is strict (unknown fields are 422 42202) and bounded before it allocates: the
//! record count is capped at `max_in_flight_records` while the array is read, headers at
//! `max_headers_per_record`, JSON nesting at [`MAX_JSON_DEPTH`](super::MAX_JSON_DEPTH), and
//! keys and values stay borrowed from the body until they are copied into the record.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::json::{headers_capped, object_body, seq_capped, Capped};
use super::{base64_decode, check_depth, check_header_name, partition_of, truncate, ProduceRecord};
use crate::proxy::status::{ApiError, ErrorKind};
use crate::Header;

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

/// The top level of a v2 body: `records` and the schema fields Confluent's other formats
/// send. Unknown fields are refused (422 42202) rather than ignored: a misspelt field would
/// otherwise be silently dropped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Body<'a> {
    // Kept as text and parsed by `records_capped`, which stops at the record cap instead of
    // allocating whatever count a body spells out (`{}` is 2 bytes, a record ~100).
    /// `records`: a non-empty array of [`V2Record`]s (422 42202 when missing or empty).
    #[serde(borrow)]
    records: &'a RawValue,
    // Schema fields of the Avro/Protobuf formats, meaningless for JSON and binary: accepted
    // and ignored, as Confluent's proxy does.
    /// `key_schema`, ignored.
    #[serde(default, rename = "key_schema")]
    _key_schema: serde::de::IgnoredAny,
    #[serde(default, rename = "value_schema")]
    _value_schema: serde::de::IgnoredAny,
    #[serde(default, rename = "key_schema_id")]
    _key_schema_id: serde::de::IgnoredAny,
    #[serde(default, rename = "value_schema_id")]
    _value_schema_id: serde::de::IgnoredAny,
}

/// The records of a v2 body, parsed up to the record cap.
struct V2Records<'a> {
    /// At most `max_in_flight_records` of them: more is 413 41303 before any is decoded.
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

/// One v2 record as sent: key and value kept as raw JSON until the format says how to read
/// them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Record<'a> {
    /// `key`: JSON text (`application/vnd.kafka.json.v2+json`) or a base64 string (binary
    /// format, 422 42203 when not base64); absent or `null` is a null key.
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
    /// `value`, read like the key; absent or `null` produces a tombstone.
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    /// `partition`: an integer in `[0, 2^31)` (422 42204 otherwise), equal to the path's when the
    /// path names one; absent lets the key (or librdkafka's partitioner) decide.
    #[serde(default)]
    partition: Option<serde_json::Number>,
    // Kept as text and parsed by `headers_capped`.
    /// `headers`: an array of [`V2Header`], at most `max_headers_per_record` (413 41304).
    #[serde(borrow, default)]
    headers: Option<&'a RawValue>,
}

/// One v2 record header: a name and an optional base64 value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Header<'a> {
    /// The header name: no NUL and not starting with `sidetrack-` (422 42205), borrowed from the
    /// body unless it had escapes.
    #[serde(borrow)]
    key: Cow<'a, str>,
    /// The value as base64 (422 42203 otherwise); absent or `null` is a null header value.
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

/// `decode_v2_capped` (tests only), also refusing (413 41304) a record with more than `max_headers`
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
