//! Envelope decoding on arbitrary headers: names and values as any bytes, null values, any
//! order. Never a panic; an envelope that is read back is written back to the same headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidetrack::{Envelope, Header};

fuzz_target!(|headers: Vec<(Vec<u8>, Option<Vec<u8>>)>| {
    let headers: Vec<Header> = headers
        .into_iter()
        .map(|(key, value)| Header { key, value })
        .collect();
    if let Ok((user, envelope)) = Envelope::split(&headers) {
        assert!(user <= headers.len());
        let again = Envelope::split(&envelope.to_headers()).expect("a written envelope reads back");
        assert_eq!(again.1.attempts, envelope.attempts);
        assert_eq!(again.1.due, envelope.due);
    }
});
