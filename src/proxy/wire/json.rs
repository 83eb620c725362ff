//! Reading untrusted JSON: the building blocks both body formats decode with.
//!
//! Separate because these are the defences, not the formats: a body is a JSON object and
//! never an array (serde's derived structs would take `[a, b]`), and every array a client
//! controls (records, headers) is read element by element up to its cap, so a small body
//! cannot make the proxy allocate what it spells out. serde's errors become the status
//! table's: syntax 42201, wrong shape 42202.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::proxy::status::{ApiError, ErrorKind};

/// A JSON object and never an array. serde's derived structs also take `[a, b]` (fields by
/// position), which neither the API nor its OpenAPI document allows: `[[null, null]]` was
/// produced as a record with no key and no value.
pub(super) struct Obj<T>(pub(super) T);

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
pub(super) fn object_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
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
pub(super) fn json_error(e: serde_json::Error) -> ApiError {
    let kind = match e.classify() {
        serde_json::error::Category::Data => ErrorKind::InvalidRequest,
        _ => ErrorKind::MalformedJson,
    };
    ApiError::new(kind, format!("request body: {e}"))
}

/// Parses a record's `headers` array, stopping at `cap` elements (`max_headers_per_record`):
/// a body of 4 MB holds 400,000 empty headers, each costing far more decoded than sent.
pub(super) fn headers_capped<'a, T: Deserialize<'a>>(
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

/// Why a capped array was not read.
pub(super) enum Capped {
    /// It has more elements than the cap (the caller names the limit in its error).
    Over,
    /// It is not an array of the expected elements.
    Bad(ApiError),
}

/// Parses a JSON array of `T`, stopping at `cap` elements before allocating more.
pub(super) fn seq_capped<'a, T: Deserialize<'a>>(
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
