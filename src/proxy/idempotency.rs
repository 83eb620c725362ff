//! `Idempotency-Key`: the first answer to a request is remembered per instance, so a client
//! that retries the same request with the same key (after a timeout, a dropped connection)
//! gets that answer and nothing is written twice by this instance.
//!
//! * The key is scoped to the caller's token and bound to a fingerprint of the request
//!   (method, path, content type, body): the same key with another request is 422.
//! * While the first request runs, a retry with its key is answered 409 with `Retry-After`.
//! * An answer is remembered only when at least one record of the request was written. When
//!   nothing was written (429, 503 before anything was acknowledged, any 4xx), the key is
//!   free again and a retry runs anew.
//! * Remembered for `idempotency.window`, at most `idempotency.max_keys` answers (the oldest
//!   go first). Another instance does not know the key: every record carries it as the
//!   `sidetrack-idempotency-key` header (and its index in the request as
//!   `sidetrack-idempotency-record`), so consumers can de-duplicate across instances.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::status::{ApiError, ErrorKind};

/// The request header clients send.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The record header carrying the key.
pub const KEY_HEADER: &str = "sidetrack-idempotency-key";
/// The record header carrying the record's index within its request (decimal).
pub const RECORD_HEADER: &str = "sidetrack-idempotency-record";

/// Reads the `Idempotency-Key` header: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    let bad = |why: &str| {
        Err(ApiError::new(
            ErrorKind::BadRequestHeader,
            format!("Idempotency-Key: {why}"),
        ))
    };
    if values.next().is_some() {
        return bad("sent more than once");
    }
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 255 {
        return bad("must be 1 to 255 characters");
    }
    if !b.iter().all(|c| (0x21..=0x7e).contains(c)) {
        return bad("must be visible ASCII characters (no spaces)");
    }
    // Checked above: ASCII.
    Ok(Some(String::from_utf8_lossy(b).into_owned()))
}

/// A finished answer, as sent.
#[derive(Clone, Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

enum State {
    Running,
    Done(Answer),
}

struct Entry {
    fingerprint: [u8; 32],
    state: State,
    at: Instant,
}

struct Inner {
    entries: HashMap<String, Entry>,
    /// Keys in insertion order, for expiry and the size bound.
    order: VecDeque<(String, Instant)>,
}

/// The remembered answers of one instance.
pub(crate) struct Idempotency {
    inner: Arc<Mutex<Inner>>,
    window: Duration,
    max: usize,
}

/// What to do with a request that carries a key.
pub(crate) enum Begin {
    /// First time: run it; the guard records the answer (or frees the key when dropped).
    New(Guard),
    /// Seen before: send this answer again.
    Replay(Answer),
    /// Still running.
    Running,
    /// Same key, different request.
    Mismatch,
}

/// Holds a running key; frees it when dropped without [`Guard::finish`].
pub(crate) struct Guard {
    inner: Arc<Mutex<Inner>>,
    key: Option<String>,
}

impl Guard {
    /// Records the answer if `remember`, else frees the key.
    pub(crate) fn finish(mut self, answer: Answer, remember: bool) {
        let Some(key) = self.key.take() else { return };
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if remember {
            // The window runs from the answer; the entry gets a fresh place in the order
            // (its first one may already be gone under size pressure).
            let now = Instant::now();
            if let Some(e) = inner.entries.get_mut(&key) {
                e.state = State::Done(answer);
                e.at = now;
                inner.order.push_back((key, now));
            }
        } else {
            inner.entries.remove(&key);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            if let Ok(mut inner) = self.inner.lock() {
                inner.entries.remove(&key);
            }
        }
    }
}

impl Idempotency {
    pub(crate) fn new(window: Duration, max: usize) -> Self {
        Idempotency {
            inner: Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
            })),
            window,
            max: max.max(1),
        }
    }

    /// The fingerprint of a request.
    pub(crate) fn fingerprint(
        method: &str,
        path: &str,
        content_type: &[u8],
        body: &[u8],
    ) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [method.as_bytes(), path.as_bytes(), content_type, body] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }

    /// Looks the key up (scoped by `scope`, the caller's token name) and claims it if new.
    pub(crate) fn begin(&self, scope: &str, key: &str, fingerprint: [u8; 32]) -> Begin {
        let full = format!("{}\u{0}{key}", scope);
        let Ok(mut inner) = self.inner.lock() else {
            // A poisoned lock means a panic elsewhere; run the request without the cache.
            return Begin::New(Guard {
                inner: self.inner.clone(),
                key: None,
            });
        };
        let now = Instant::now();
        // Expire from the front; the queue may hold keys removed or re-added since, so an
        // entry is dropped only if it is the same generation (same insertion time).
        while let Some((k, at)) = inner.order.front().cloned() {
            let expired = now.duration_since(at) >= self.window;
            if !expired && inner.order.len() < self.max {
                break;
            }
            inner.order.pop_front();
            let same = inner.entries.get(&k).is_some_and(|e| e.at == at);
            if same
                && !matches!(
                    inner.entries.get(&k).map(|e| &e.state),
                    Some(State::Running)
                )
            {
                inner.entries.remove(&k);
            }
        }
        if let Some(e) = inner.entries.get(&full) {
            if now.duration_since(e.at) < self.window {
                if e.fingerprint != fingerprint {
                    return Begin::Mismatch;
                }
                return match &e.state {
                    State::Running => Begin::Running,
                    State::Done(a) => Begin::Replay(a.clone()),
                };
            }
        }
        inner.entries.insert(
            full.clone(),
            Entry {
                fingerprint,
                state: State::Running,
                at: now,
            },
        );
        inner.order.push_back((full.clone(), now));
        Begin::New(Guard {
            inner: self.inner.clone(),
            key: Some(full),
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn answer(s: u16) -> Answer {
        Answer {
            status: StatusCode::from_u16(s).unwrap(),
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn replay_running_mismatch_and_release() {
        let c = Idempotency::new(Duration::from_secs(60), 10);
        let f1 = Idempotency::fingerprint("POST", "/topics/a", b"x", b"1");
        let f2 = Idempotency::fingerprint("POST", "/topics/a", b"x", b"2");
        let Begin::New(g) = c.begin("", "k", f1) else {
            panic!()
        };
        assert!(matches!(c.begin("", "k", f1), Begin::Running));
        assert!(matches!(c.begin("", "k", f2), Begin::Mismatch));
        // Another caller's key space.
        assert!(matches!(c.begin("other", "k", f1), Begin::New(_)));
        g.finish(answer(200), true);
        assert!(matches!(c.begin("", "k", f1), Begin::Replay(a) if a.status == 200));
        // Not remembered: the key is free again.
        let Begin::New(g) = c.begin("", "k2", f1) else {
            panic!()
        };
        g.finish(answer(503), false);
        assert!(matches!(c.begin("", "k2", f1), Begin::New(_)));
        // Dropped (client went away): free again.
        let Begin::New(g) = c.begin("", "k3", f1) else {
            panic!()
        };
        drop(g);
        assert!(matches!(c.begin("", "k3", f1), Begin::New(_)));
    }

    #[test]
    fn bounded_and_expiring() {
        let c = Idempotency::new(Duration::from_millis(300), 3);
        let f = [0u8; 32];
        for i in 0..10 {
            if let Begin::New(g) = c.begin("", &i.to_string(), f) {
                g.finish(answer(200), true);
            }
        }
        assert!(c.len() <= 3, "{}", c.len());
        // Remembered within the window…
        assert!(matches!(c.begin("", "9", f), Begin::Replay(_)));
        // …and forgotten after it (polled, with a bound, rather than slept).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut forgotten = false;
        while !forgotten && Instant::now() < deadline {
            match c.begin("", "9", f) {
                Begin::New(g) => {
                    drop(g);
                    forgotten = true;
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        assert!(forgotten, "an answer older than the window is forgotten");
    }

    #[test]
    fn header_rules() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h).unwrap(), None);
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("abc-123"));
        assert_eq!(idempotency_key(&h).unwrap().as_deref(), Some("abc-123"));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("again"));
        assert!(idempotency_key(&h).is_err());
    }

    proptest! {
        /// Any header bytes: a key of visible ASCII, or a 400.
        #[test]
        fn any_key_bytes(v in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(hv) = HeaderValue::from_bytes(&v) {
                let mut h = HeaderMap::new();
                h.insert(IDEMPOTENCY_KEY, hv);
                match idempotency_key(&h) {
                    Ok(Some(k)) => prop_assert_eq!(k.as_bytes(), &v[..]),
                    Ok(None) => prop_assert!(false, "header present"),
                    Err(e) => prop_assert_eq!(e.kind, ErrorKind::BadRequestHeader),
                }
            }
        }
    }
}
