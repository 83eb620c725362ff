//! Record headers, read and written as bytes through librdkafka's C API.
//!
//! rdkafka's own header iterator turns every header name into `&str` with an `unwrap`: a name
//! that is not UTF-8 (legal on the wire; any non-Java producer can write one) panics the
//! caller. Here names and values are bytes end to end, so such a record is handled, retried and
//! dead-lettered like any other, and its headers reach the retry and dead-letter topics byte
//! for byte.

use std::borrow::Cow;
use std::ffi::CStr;
use std::os::raw::{c_char, c_void};

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

/// One record header. Kafka header names and values are bytes; values may be null.
///
/// Names are almost always UTF-8 text; [`Header::key_str`] reads them as such and
/// [`Header::key_lossy`] for display. One limit comes from librdkafka, which hands names over as
/// C strings: a name containing a NUL byte is read up to that byte.
///
/// # Example
///
/// ```
/// use sidetrack::Header;
///
/// let h = Header::new(b"tenant\xff".to_vec(), "acme"); // a name that is not UTF-8
/// assert_eq!(h.key_str(), None);
/// assert_eq!(h.key_lossy(), "tenant\u{fffd}");
/// assert!(!h.is("tenant"));
/// assert_eq!(Header::null("trace-id").value, None); // null, not empty
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// Header name, as on the wire.
    pub key: Vec<u8>,
    /// Header value, `None` for a null value.
    pub value: Option<Vec<u8>>,
}

impl Header {
    /// A header with a non-null value: `Header::new("trace-id", "abc")`.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Header {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// A header with a null value.
    pub fn null(key: impl Into<Vec<u8>>) -> Self {
        Header {
            key: key.into(),
            value: None,
        }
    }

    /// The name as text, or `None` if it is not UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.key).ok()
    }

    /// The name as text, invalid UTF-8 replaced by `U+FFFD` (for display).
    pub fn key_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.key)
    }

    /// True if the name is exactly `name`.
    pub fn is(&self, name: &str) -> bool {
        self.key == name.as_bytes()
    }
}

/// Copies the headers of a consumed record. Never panics, whatever the bytes.
pub(crate) fn headers_of(m: &BorrowedMessage<'_>) -> Vec<Header> {
    // SAFETY: `m.ptr()` is a valid message for the lifetime of `m`.
    unsafe { headers_of_ptr(m.ptr()) }
}

/// [`headers_of`] for a message pointer.
///
/// # Safety
/// `m` must be a valid consumed librdkafka message for the duration of the call.
pub(crate) unsafe fn headers_of_ptr(m: *mut rdsys::rd_kafka_message_t) -> Vec<Header> {
    let mut hdrs: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: see the contract; the headers it returns are owned by the message and only read
    // below.
    let err = unsafe { rdsys::rd_kafka_message_headers(m, &mut hdrs) };
    if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || hdrs.is_null() {
        // No headers (NOENT), or librdkafka could not parse them.
        return Vec::new();
    }
    // SAFETY: `hdrs` is valid while `m` is borrowed.
    unsafe { read_native(hdrs) }
}

/// Reads every header of a native header list.
///
/// # Safety
/// `hdrs` must be a valid `rd_kafka_headers_t` for the duration of the call.
unsafe fn read_native(hdrs: *const rdsys::rd_kafka_headers_t) -> Vec<Header> {
    let count = rdsys::rd_kafka_header_cnt(hdrs);
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        let err = rdsys::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size);
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        let key = CStr::from_ptr(name).to_bytes().to_vec();
        let value = (!value.is_null())
            .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec());
        out.push(Header { key, value });
    }
    out
}

/// Builds librdkafka headers from ours, in order, names and values as bytes (rdkafka's own
/// `OwnedHeaders::insert` takes names as `&str`). Public as `sidetrack::handler::rdkafka_headers`.
pub fn to_owned_headers<'a>(headers: impl IntoIterator<Item = &'a Header>) -> OwnedHeaders {
    let headers = headers.into_iter();
    let owned = OwnedHeaders::new_with_capacity(headers.size_hint().0.max(1));
    let native = native_ptr(owned.as_borrowed()).cast_mut();
    for h in headers {
        let (value, value_len) = match &h.value {
            Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is the list `owned` owns, not shared with anything yet; the name and
        // value are copied by librdkafka during the call. Adding to a writable list (one we
        // created) cannot fail; its result is not an error path.
        unsafe {
            rdsys::rd_kafka_header_add(
                native,
                h.key.as_ptr().cast::<c_char>(),
                h.key.len() as isize,
                value,
                value_len,
            );
        }
    }
    owned
}

/// The native list behind rdkafka's `BorrowedHeaders`.
///
/// rdkafka 0.39 represents `&BorrowedHeaders` as the native `rd_kafka_headers_t*` itself
/// (a zero-sized type whose reference is the C pointer; see `BorrowedHeaders::from_native_ptr`
/// and `OwnedHeaders::as_borrowed`), which it does not expose.
fn native_ptr(h: &BorrowedHeaders) -> *const rdsys::rd_kafka_headers_t {
    (h as *const BorrowedHeaders).cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(headers: &[Header]) -> Vec<Header> {
        let owned = to_owned_headers(headers);
        // SAFETY: `owned` is alive for the call.
        unsafe { read_native(native_ptr(owned.as_borrowed())) }
    }

    #[test]
    fn non_utf8_names_and_null_values_round_trip() {
        let hs = vec![
            Header::new(vec![0xff, 0xfe, b'x'], b"v".to_vec()),
            Header::null("null-one"),
            Header::new("", Vec::new()),
        ];
        assert_eq!(round_trip(&hs), hs);
        assert_eq!(hs[0].key_str(), None);
        assert_eq!(hs[0].key_lossy(), "\u{fffd}\u{fffd}x");
        assert!(hs[1].is("null-one"));
    }

    #[test]
    fn a_nul_in_a_name_cuts_it_there() {
        let hs = [Header::new(b"ab\0cd".to_vec(), b"v".to_vec())];
        assert_eq!(round_trip(&hs)[0].key, b"ab");
    }

    proptest! {
        /// Any bytes (without NUL) as names, any values or null: read back exactly, in order.
        #[test]
        fn headers_round_trip_as_bytes(
            hs in proptest::collection::vec(
                (
                    proptest::collection::vec(1u8..=255, 0..40),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
                ),
                0..12,
            )
        ) {
            let hs: Vec<Header> = hs.into_iter().map(|(key, value)| Header { key, value }).collect();
            prop_assert_eq!(round_trip(&hs), hs);
        }
    }
}
