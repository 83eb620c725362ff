//! Tests of the decoders: examples for every refusal, and properties (any bytes decode or
//! are refused, never a panic).
//!
//! The examples pin the answer a client gets for each fault (status and `error_code`, see
//! `status.rs`), several of them found by schemathesis against `openapi.json`; the properties
//! pin that the decoders are total over their input (a body, a path partition, a
//! `Content-Type` header of any bytes) and that binary keys and values survive a round trip
//! byte for byte.

use super::v2::*;
use super::v3::*;
use super::*;
use crate::proxy::status::ErrorKind;
use proptest::prelude::*;

/// Standard padded base64, as a binary-format client writes keys, values and header values.
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

/// The [`ErrorKind`] a v2 body is refused with: the tests assert the kind (and so the status
/// and `error_code` a client sees), not the wording of the message.
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

/// Any JSON value up to four levels deep, strings of any characters included: what a client
/// may send as a JSON-format key or value.
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
