//! `Idempotency-Key`: the first answer to a request is remembered per instance, so a client
//! that retries the same request with the same key (after a timeout, a dropped connection)
//! gets that answer and nothing is written twice by this instance.
//!
//! * Looked up only after the request is authenticated, authorized and passed by the rules:
//!   a caller the rules refuse gets their refusal, never another request's answer.
//! * The key is scoped to the caller's token and bound to a fingerprint of the request
//!   (caller, method, path, content type, body, and the values of the request headers the
//!   rules decide on, [`RecordRule::decides_on_headers`](super::RecordRule::decides_on_headers)):
//!   the same key with another request is 422.
//! * While the first request runs, a retry with its key is answered 409 with `Retry-After`.
//! * An answer is remembered only when at least one record of the request was written. When
//!   nothing was written (429, 503 before anything was acknowledged, any 4xx), the key is
//!   free again and a retry runs anew.
//! * Remembered for `idempotency.window` after the answer, at most `idempotency.max_keys`
//!   answers and `idempotency.max_bytes` bytes (the oldest go first). A key whose request
//!   still runs is never forgotten, whatever its age. Another instance does not know the key: every record carries it as the
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
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The record header carrying the key.
pub(crate) const KEY_HEADER: &str = "sidetrack-idempotency-key";
/// The record header carrying the record's index within its request (decimal).
pub(crate) const RECORD_HEADER: &str = "sidetrack-idempotency-record";

/// Reads the `Idempotency-Key` header: 1 to 255 visible ASCII characters.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
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
    /// The status it was sent with.
    pub(crate) status: StatusCode,
    /// The JSON body, byte for byte (a replay sends exactly this).
    pub(crate) body: Bytes,
}

/// Where the request that first used a key is.
enum State {
    /// Still producing: a second request with the key is 409 until it ends.
    Running,
    /// Answered: a second identical request gets this answer again.
    Done(Answer),
}

/// What is remembered under one key.
struct Entry {
    /// Of the request that first used the key: another request under the key is 422.
    fingerprint: [u8; 32],
    /// Running or answered.
    state: State,
    /// When the key was first used (the `window` runs from here).
    at: Instant,
    /// What this entry is charged in `Inner::bytes`.
    cost: usize,
}

/// What an entry holds besides its key (twice: in the map and in the order) and its answer:
/// the map's slot, the order's slot and the allocations' headers, rounded up.
const ENTRY_OVERHEAD: usize =
    std::mem::size_of::<(String, Entry)>() + std::mem::size_of::<(String, Instant)>() + 64;

/// What an entry is charged against `idempotency.max_bytes`.
fn entry_cost(key: &str, answer: usize) -> usize {
    2 * key.len() + answer + ENTRY_OVERHEAD
}

/// The store behind the lock: the entries, their order of arrival, and what they cost.
struct Inner {
    /// Each key in use, scoped to its caller (`caller NUL key`, so two tokens never share a
    /// key), with its fingerprint and state.
    entries: HashMap<String, Entry>,
    /// Keys in insertion order, for expiry and the size bounds.
    order: VecDeque<(String, Instant)>,
    /// Sum of the entries' costs.
    bytes: usize,
    /// How long an answer is remembered (`idempotency.window`).
    window: Duration,
    /// `idempotency.max_keys`.
    max_keys: usize,
    /// `idempotency.max_bytes`.
    max_bytes: usize,
}

impl Inner {
    /// Forgets `key` and gives back what it was charged (its slot in `order` goes when it
    /// reaches the front).
    fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            self.bytes = self.bytes.saturating_sub(e.cost);
        }
    }

    /// Forgets answers older than the window, then the oldest answers while more than
    /// `max_keys` entries or `max_bytes` are held, keeping room for `room_keys` more entries
    /// and `room_bytes` more bytes. A running entry is never forgotten: its request may still
    /// write, and a retry must be 409, not a second write. (The queue may hold keys removed or
    /// re-added since, so an entry is dropped only if it is the same generation.)
    fn evict(&mut self, now: Instant, room_keys: usize, room_bytes: usize) {
        while let Some((k, at)) = self.order.front().cloned() {
            let expired = now.duration_since(at) >= self.window;
            let over = self.order.len() + room_keys > self.max_keys
                || self.bytes + room_bytes > self.max_bytes;
            if !expired && !over {
                break;
            }
            self.order.pop_front();
            let forget = self
                .entries
                .get(&k)
                .is_some_and(|e| e.at == at && matches!(e.state, State::Done(_)));
            if forget {
                self.remove(&k);
            }
        }
    }
}

/// The remembered answers of one instance.
#[derive(Clone)]
pub(crate) struct Idempotency {
    /// Shared with every [`Guard`], which must be able to free its key after the request's
    /// handler is gone.
    inner: Arc<Mutex<Inner>>,
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
    /// The store the key is in.
    inner: Arc<Mutex<Inner>>,
    /// The key as stored (the caller's scope, NUL, the key); `None` once finished or when
    /// the store was unusable (then the drop does nothing).
    key: Option<String>,
}

impl Guard {
    /// Records the answer if `remember`, else frees the key.
    pub(crate) fn finish(mut self, answer: Answer, remember: bool) {
        let Some(key) = self.key.take() else { return };
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let cost = entry_cost(&key, answer.body.len());
        if remember && cost > inner.max_bytes {
            tracing::warn!(
                answer_bytes = answer.body.len(),
                max_bytes = inner.max_bytes,
                "an answer larger than idempotency.max_bytes is not remembered: a retry with its Idempotency-Key runs again"
            );
        }
        if remember && cost <= inner.max_bytes {
            // The window runs from the answer; the entry gets a fresh place in the order
            // (its first one may already be gone under size pressure).
            let now = Instant::now();
            let old = inner.entries.get(&key).map_or(0, |e| e.cost);
            inner.bytes = inner.bytes.saturating_sub(old);
            // Room for the answer first: older answers go, never this one.
            inner.evict(now, 1, cost);
            if let Some(e) = inner.entries.get_mut(&key) {
                e.state = State::Done(answer);
                e.at = now;
                e.cost = cost;
                inner.bytes += cost;
                inner.order.push_back((key, now));
            }
        } else {
            inner.remove(&key);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            if let Ok(mut inner) = self.inner.lock() {
                inner.remove(&key);
            }
        }
    }
}

/// The fingerprint of a request: every part it is made of, each length-prefixed so that no
/// two different sequences of parts hash alike.
pub(crate) struct Fingerprint(Sha256);

impl Fingerprint {
    /// An empty fingerprint.
    pub(crate) fn new() -> Self {
        Fingerprint(Sha256::new())
    }

    /// Adds one part.
    pub(crate) fn part(mut self, part: &[u8]) -> Self {
        self.0.update((part.len() as u64).to_be_bytes());
        self.0.update(part);
        self
    }

    /// Adds the values of request header `name` (how many, then each), so an absent header,
    /// an empty one and two of them differ.
    pub(crate) fn header(mut self, headers: &HeaderMap, name: &str) -> Self {
        let values = headers.get_all(name);
        self = self.part(name.as_bytes());
        self.0.update((values.iter().count() as u64).to_be_bytes());
        for v in values {
            self = self.part(v.as_bytes());
        }
        self
    }

    /// The digest of every part added.
    pub(crate) fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl Idempotency {
    /// An empty store remembering answers for `window`, at most `max_keys` keys costing at
    /// most `max_bytes` in all (the oldest are forgotten first).
    pub(crate) fn new(window: Duration, max_keys: usize, max_bytes: usize) -> Self {
        Idempotency {
            inner: Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                window,
                max_keys: max_keys.max(1),
                max_bytes,
            })),
        }
    }

    /// Entries held (running or answered) and the bytes they are charged.
    pub(crate) fn usage(&self) -> (usize, usize) {
        self.inner
            .lock()
            .map_or((0, 0), |i| (i.entries.len(), i.bytes))
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
        let window = inner.window;
        if let Some(e) = inner.entries.get(&full) {
            // A running entry has no age: its request may still write.
            let live = matches!(e.state, State::Running) || now.duration_since(e.at) < window;
            if live {
                if e.fingerprint != fingerprint {
                    return Begin::Mismatch;
                }
                return match &e.state {
                    State::Running => Begin::Running,
                    State::Done(a) => Begin::Replay(a.clone()),
                };
            }
            inner.remove(&full);
        }
        let cost = entry_cost(&full, 0);
        inner.evict(now, 1, cost);
        inner.entries.insert(
            full.clone(),
            Entry {
                fingerprint,
                state: State::Running,
                at: now,
                cost,
            },
        );
        inner.bytes += cost;
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
        let c = Idempotency::new(Duration::from_secs(60), 10, 1 << 20);
        let fp = |body: &[u8]| {
            Fingerprint::new()
                .part(b"POST")
                .part(b"/topics/a")
                .part(body)
                .finish()
        };
        let (f1, f2) = (fp(b"1"), fp(b"2"));
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
        let c = Idempotency::new(Duration::from_millis(300), 3, 1 << 20);
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

    /// A running entry older than the window is still running: its retry is told so (409),
    /// not run a second time. (Before, it counted as absent and the retry wrote again.)
    #[test]
    fn a_running_entry_never_expires() {
        let window = Duration::from_millis(50);
        let c = Idempotency::new(window, 10, 1 << 20);
        let f = [1u8; 32];
        let Begin::New(g) = c.begin("", "k", f) else {
            panic!()
        };
        let started = Instant::now();
        while started.elapsed() <= window {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Other keys come and go meanwhile (they run the expiry).
        for i in 0..20 {
            if let Begin::New(o) = c.begin("", &format!("o{i}"), f) {
                o.finish(answer(200), true);
            }
        }
        assert!(matches!(c.begin("", "k", f), Begin::Running));
        assert!(matches!(c.begin("", "k", [2u8; 32]), Begin::Mismatch));
        g.finish(answer(200), true);
        assert!(matches!(c.begin("", "k", f), Begin::Replay(_)));
    }

    /// Answers are bounded by bytes as well as by count: the oldest go first, the accounted
    /// bytes never pass the bound, and an answer larger than the bound is not kept.
    #[test]
    fn answers_are_bounded_by_bytes() {
        let max = 64 * 1024;
        let c = Idempotency::new(Duration::from_secs(60), 1000, max);
        let big = Answer {
            status: StatusCode::OK,
            body: Bytes::from(vec![b'x'; 10_000]),
        };
        for i in 0..20 {
            let Begin::New(g) = c.begin("", &i.to_string(), [0; 32]) else {
                panic!()
            };
            g.finish(big.clone(), true);
            let (_, bytes) = c.usage();
            assert!(bytes <= max, "{bytes} > {max}");
        }
        let (n, bytes) = c.usage();
        assert!((5..20).contains(&n), "{n} answers kept");
        assert_eq!(bytes, n * entry_cost("\u{0}10", 10_000));
        // The newest are kept, the oldest forgotten.
        assert!(matches!(c.begin("", "19", [0; 32]), Begin::Replay(_)));
        assert!(matches!(c.begin("", "0", [0; 32]), Begin::New(_)));
        // Too large to keep at all.
        let Begin::New(g) = c.begin("", "huge", [0; 32]) else {
            panic!()
        };
        g.finish(
            Answer {
                status: StatusCode::OK,
                body: Bytes::from(vec![b'x'; max]),
            },
            true,
        );
        assert!(c.usage().1 <= max);
        assert!(matches!(c.begin("", "huge", [0; 32]), Begin::New(_)));
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
