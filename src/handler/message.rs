//! [`Message`]: the record a handler sees, as a view of librdkafka's buffer.
//!
//! The per-record path hands the handler a message that points into the consumed librdkafka
//! message (key, payload, topic name) instead of copying them: reading a record costs no
//! allocation. The price is the `unsafe` contract of `Message::from_consumed` (the buffer
//! outlives the message), which the partition task upholds by keeping the consumed message
//! (its `Raw`) until the record's call and hand-off are over. A clone owns its
//! bytes, so a handler may keep one past its call.
//!
//! Headers are parsed lazily (`OnceLock`): most handlers never read them, and asking
//! librdkafka for them costs an allocation per record. On a retried record the envelope
//! headers are not the user's: [`Message::headers`] shows only the user's own, and the
//! envelope is [`Message::envelope`].

use std::sync::{Arc, OnceLock};

use rdkafka::bindings as rdsys;
use serde::de::DeserializeOwned;

use crate::retry::Envelope;

use super::{HandlerError, Header};

/// A record as the handler sees it.
///
/// `topic()`, `partition()`, `offset()` and `timestamp()` describe the **original** record,
/// also when it is being retried from a retry topic, so they make a stable identity for
/// idempotency. Where the record was actually read from is [`Message::received_from`].
///
/// The runtime hands the handler a view of librdkafka's own buffer: reading the key, payload
/// and headers copies nothing. Cloning a message copies the key, payload and topic name once
/// (the clone owns its bytes and may outlive the handler call); cloning a clone is cheap.
/// (`handler_fn` clones each message it passes on: a `Handler` implementation reads it in
/// place.)
pub struct Message {
    /// The partition task's own name for it, borrowed: no copy or count per record.
    topic: Topic,
    /// Partition of the original record (from the envelope when retried).
    partition: i32,
    /// Offset of the original record: with topic and partition, the record's stable identity.
    offset: i64,
    /// The original record's timestamp, ms since the epoch (`None`: the producer set none).
    timestamp: Option<i64>,
    /// The key: borrowed from librdkafka's buffer in the runtime, owned in a clone or a test.
    key: Bytes,
    /// The value, like the key; `Null` for a tombstone.
    payload: Bytes,
    /// The user's headers, read from `raw` on first use (most handlers never ask: reading
    /// costs librdkafka an allocation per record). `None` when there are none.
    headers: OnceLock<Option<Arc<[Header]>>>,
    /// The consumed librdkafka message the headers are read from; null once they are.
    raw: *mut rdsys::rd_kafka_message_t,
    /// Which handler call this is for the record: 1 on the source topic, then one more per
    /// retry tier hop (from the envelope's `attempts`).
    attempt: u32,
    /// Envelope and where it was read from, for a retried record (boxed: most are not).
    retry: Option<Arc<Retried>>,
    /// Feature `otel`: the context of this record's `process` span, set when the span starts,
    /// so that its hand-off (which runs after the call, outside the span) is the span's child.
    /// A `OnceBox` (one pointer): the message stays as small as without the feature.
    #[cfg(feature = "otel")]
    trace: once_cell::race::OnceBox<opentelemetry::trace::SpanContext>,
}

/// What only a retried record has, kept apart so a first attempt carries one `None`.
struct Retried {
    /// The envelope it was read with, trusted (see `retry::decode`).
    envelope: Envelope,
    /// The retry tier topic, partition and offset it was actually read from, for
    /// [`Message::received_from`] and the logs.
    received_from: (Arc<str>, i32, i64),
}

// SAFETY: the only non-thread-safe parts are the raw pointers of `Bytes::Borrowed` and `raw`,
// which point into a librdkafka message that, by the contract of `Message::from_consumed`,
// outlives the message. Its key and payload are immutable; its headers are parsed by librdkafka
// at most once, under `OnceLock` (one thread at a time).
unsafe impl Send for Message {}
// SAFETY: see `Send`.
unsafe impl Sync for Message {}

/// A topic name: borrowed from the partition task (the runtime's messages; same contract as
/// `Bytes::Borrowed`) or shared.
enum Topic {
    /// The partition task's `&str`, as a pointer and a length (no lifetime: see `Send`).
    Borrowed { ptr: *const u8, len: usize },
    /// An owned name shared by clones (a clone of a clone only counts a reference).
    Shared(Arc<str>),
}

impl Topic {
    /// The name, whichever way it is held.
    fn as_str(&self) -> &str {
        match self {
            // SAFETY: see `Message::from_consumed`: the task's topic name outlives the message;
            // it was a `&str`, so the bytes are UTF-8.
            Topic::Borrowed { ptr, len } => unsafe {
                std::str::from_utf8_unchecked(std::slice::from_raw_parts(*ptr, *len))
            },
            Topic::Shared(t) => t,
        }
    }

    /// A name a clone can keep: a borrowed one is copied into an `Arc<str>` (once), a shared one
    /// only gains a reference.
    fn shared(&self) -> Self {
        match self {
            Topic::Borrowed { .. } => Topic::Shared(Arc::from(self.as_str())),
            Topic::Shared(t) => Topic::Shared(Arc::clone(t)),
        }
    }
}

/// Key or payload bytes.
enum Bytes {
    /// No bytes (a null key, or a tombstone's payload): not the same as empty bytes.
    Null,
    /// Inside a consumed librdkafka message that the runtime keeps alive for longer than the
    /// message (see `Message::from_consumed`).
    Borrowed { ptr: *const u8, len: usize },
    /// Bytes the message owns, shared by its clones.
    Owned(Arc<[u8]>),
}

impl Bytes {
    /// Owned bytes from a vector (`None` is `Null`): messages built by tests and tools.
    fn of(bytes: Option<Vec<u8>>) -> Self {
        bytes.map_or(Bytes::Null, |b| Bytes::Owned(Arc::from(b)))
    }

    /// The bytes, whichever way they are held (`None` for `Null`).
    fn get(&self) -> Option<&[u8]> {
        match self {
            Bytes::Null => None,
            // SAFETY: see `Message::from_consumed`: the buffer outlives the message.
            Bytes::Borrowed { ptr, len } => Some(unsafe { std::slice::from_raw_parts(*ptr, *len) }),
            Bytes::Owned(b) => Some(b),
        }
    }

    /// Bytes that own their data (a copy of borrowed ones).
    fn owned(&self) -> Self {
        match self {
            Bytes::Null => Bytes::Null,
            Bytes::Borrowed { .. } => Bytes::Owned(Arc::from(self.get().unwrap_or_default())),
            Bytes::Owned(b) => Bytes::Owned(Arc::clone(b)),
        }
    }

    /// A view of bytes that outlive the message, without copying them (the runtime's intake;
    /// the caller upholds `Message::from_consumed`'s contract).
    fn borrowed(bytes: Option<&[u8]>) -> Self {
        match bytes {
            None => Bytes::Null,
            Some(b) => Bytes::Borrowed {
                ptr: b.as_ptr(),
                len: b.len(),
            },
        }
    }
}

impl Clone for Message {
    /// The clone owns its key and payload (copied from librdkafka's buffer the first time).
    fn clone(&self) -> Self {
        Message {
            topic: self.topic.shared(),
            partition: self.partition,
            offset: self.offset,
            timestamp: self.timestamp,
            key: self.key.owned(),
            payload: self.payload.owned(),
            headers: OnceLock::from(self.header_list().clone()),
            raw: std::ptr::null_mut(),
            attempt: self.attempt,
            retry: self.retry.clone(),
            #[cfg(feature = "otel")]
            trace: once_cell::race::OnceBox::new(),
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic.as_str())
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("attempt", &self.attempt)
            .field("key_len", &self.key().map(<[u8]>::len))
            .field("payload_len", &self.payload().map(<[u8]>::len))
            .field("headers", &self.headers().len())
            .finish()
    }
}

impl Message {
    /// Feature `otel`: remembers the context of this record's `process` span (first call wins).
    #[cfg(feature = "otel")]
    pub(crate) fn set_trace(&self, cx: opentelemetry::trace::SpanContext) {
        let _ = self.trace.set(Box::new(cx));
    }

    /// Feature `otel`: the context of this record's `process` span, if one was recorded.
    #[cfg(feature = "otel")]
    pub(crate) fn trace(&self) -> Option<&opentelemetry::trace::SpanContext> {
        self.trace.get()
    }

    /// A message for tests: partition 0, offset 0, attempt 1, no key, no headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            topic: Topic::Shared(Arc::from(topic.into())),
            partition: 0,
            offset: 0,
            timestamp: None,
            key: Bytes::Null,
            payload: Bytes::of(Some(payload.into())),
            headers: OnceLock::from(None),
            raw: std::ptr::null_mut(),
            attempt: 1,
            retry: None,
            #[cfg(feature = "otel")]
            trace: once_cell::race::OnceBox::new(),
        }
    }

    /// A test message whose payload is `value` as JSON.
    pub fn json_payload(topic: impl Into<String>, value: &impl serde::Serialize) -> Self {
        // Serializing plain data into a Vec cannot fail short of a broken Serialize impl.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        Self::new(topic, bytes)
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Bytes::of(Some(key.into()));
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        let mut headers = self.headers().to_vec();
        headers.push(Header::new(key, value));
        self.headers = OnceLock::from(Some(Arc::from(headers)));
        self.raw = std::ptr::null_mut();
        self
    }

    /// Sets partition and offset.
    pub fn with_position(mut self, partition: i32, offset: i64) -> Self {
        self.partition = partition;
        self.offset = offset;
        self
    }

    /// Sets the timestamp (ms since the epoch).
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }

    /// Removes the payload (a tombstone).
    pub fn without_payload(mut self) -> Self {
        self.payload = Bytes::Null;
        self
    }

    /// A message over a consumed record's own bytes (nothing copied). `headers`: the user's
    /// headers when the caller read them already (retry tiers), else they are read from `raw`
    /// when first asked for.
    ///
    /// # Safety
    /// `raw`, `key` and `payload` (which must belong to `raw`) must stay valid and unchanged
    /// for as long as the returned message (not its clones, which own their bytes) is alive:
    /// the runtime keeps the librdkafka message alive for longer than this message, and lends
    /// the message to the handler only by reference.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn from_consumed(
        raw: *mut rdsys::rd_kafka_message_t,
        received: (&Arc<str>, i32, i64),
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<Vec<Header>>,
        envelope: Option<Envelope>,
    ) -> Self {
        let (key, payload) = (Bytes::borrowed(key), Bytes::borrowed(payload));
        let topic = Topic::Borrowed {
            ptr: received.0.as_ptr(),
            len: received.0.len(),
        };
        let mut msg = Self::build(received, topic, timestamp, key, payload, headers, envelope);
        if msg.headers.get().is_none() {
            msg.raw = raw;
        }
        msg
    }

    /// A message that owns its bytes, read from `received` (a retry topic when `envelope` is
    /// given).
    pub(crate) fn from_parts(
        received: (&Arc<str>, i32, i64),
        timestamp: Option<i64>,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Vec<Header>,
        envelope: Option<Envelope>,
    ) -> Self {
        Self::build(
            received,
            Topic::Shared(Arc::clone(received.0)),
            timestamp,
            Bytes::of(key),
            Bytes::of(payload),
            Some(headers),
            envelope,
        )
    }

    /// `topic`: the name of the topic the record was read from, as the message keeps it.
    #[allow(clippy::too_many_arguments)]
    fn build(
        received: (&Arc<str>, i32, i64),
        topic: Topic,
        timestamp: Option<i64>,
        key: Bytes,
        payload: Bytes,
        headers: Option<Vec<Header>>,
        envelope: Option<Envelope>,
    ) -> Self {
        let (received_topic, partition, offset) = received;
        let headers = match headers {
            Some(h) => OnceLock::from((!h.is_empty()).then(|| Arc::from(h))),
            None => OnceLock::new(),
        };
        match envelope {
            None => Message {
                topic,
                partition,
                offset,
                timestamp,
                key,
                payload,
                headers,
                raw: std::ptr::null_mut(),
                attempt: 1,
                retry: None,
                #[cfg(feature = "otel")]
                trace: once_cell::race::OnceBox::new(),
            },
            Some(env) => Message {
                topic: Topic::Shared(Arc::from(env.original_topic.as_str())),
                partition: env.original_partition,
                offset: env.original_offset,
                timestamp: env.original_timestamp,
                key,
                payload,
                headers,
                raw: std::ptr::null_mut(),
                attempt: env.attempts.saturating_add(1),
                retry: Some(Arc::new(Retried {
                    envelope: env,
                    received_from: (Arc::clone(received_topic), partition, offset),
                })),
                #[cfg(feature = "otel")]
                trace: once_cell::race::OnceBox::new(),
            },
        }
    }

    /// The headers, read from librdkafka's message the first time.
    fn header_list(&self) -> &Option<Arc<[Header]>> {
        self.headers.get_or_init(|| {
            if self.raw.is_null() {
                return None;
            }
            // SAFETY: `raw` outlives this message (see `from_consumed`).
            let headers = unsafe { super::headers_of_ptr(self.raw) };
            (!headers.is_empty()).then(|| Arc::from(headers))
        })
    }

    /// Original topic.
    pub fn topic(&self) -> &str {
        self.topic.as_str()
    }

    /// Original partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Original offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Original timestamp, ms since the Unix epoch, if the record had one.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }

    /// Where this delivery was read from: the original coordinates on the first attempt, a
    /// retry topic's on later ones.
    pub fn received_from(&self) -> (&str, i32, i64) {
        match &self.retry {
            Some(r) => (&r.received_from.0, r.received_from.1, r.received_from.2),
            None => (self.topic.as_str(), self.partition, self.offset),
        }
    }

    /// Attempt number, 1 on the first delivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The envelope of a retried record (`None` on the first attempt).
    pub fn envelope(&self) -> Option<&Envelope> {
        self.retry.as_deref().map(|r| &r.envelope)
    }

    /// The key bytes.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.get()
    }

    /// The key as UTF-8; a key that is not UTF-8 is a poison error.
    pub fn key_str(&self) -> Result<Option<&str>, HandlerError> {
        self.key()
            .map(std::str::from_utf8)
            .transpose()
            .map_err(|e| HandlerError::poison(format!("key is not UTF-8: {e}")))
    }

    /// The payload bytes (`None` for a tombstone).
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.get()
    }

    /// The payload as UTF-8; a missing or non-UTF-8 payload is a poison error.
    pub fn payload_str(&self) -> Result<&str, HandlerError> {
        let bytes = self
            .payload()
            .ok_or_else(|| HandlerError::poison("payload is null (tombstone)"))?;
        std::str::from_utf8(bytes)
            .map_err(|e| HandlerError::poison(format!("payload is not UTF-8: {e}")))
    }

    /// Decodes the payload as JSON. A failure is a poison error: the record is dead-lettered
    /// at once, since retrying cannot make bad bytes good.
    ///
    /// # Example
    ///
    /// ```
    /// use serde::Deserialize;
    /// use sidetrack::{FailureKind, Message};
    ///
    /// #[derive(Debug, Deserialize)]
    /// struct Order { id: String }
    ///
    /// let good = Message::new("orders", r#"{"id":"o-1"}"#);
    /// assert_eq!(good.json::<Order>().unwrap().id, "o-1");
    /// // Bytes that are not an `Order` are poison: dead-lettered at once, never retried.
    /// let bad = Message::new("orders", "not json");
    /// assert_eq!(bad.json::<Order>().unwrap_err().kind(), FailureKind::Poison);
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let bytes = self
            .payload()
            .ok_or_else(|| HandlerError::poison("payload is null (tombstone)"))?;
        serde_json::from_slice(bytes).map_err(|e| {
            HandlerError::poison(format!(
                "payload is not a valid {}: {e}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// The user's headers, in order, byte for byte (envelope headers are not included).
    pub fn headers(&self) -> &[Header] {
        self.header_list().as_deref().unwrap_or(&[])
    }

    /// The value of the first user header named `key` (`Some(None)` for a null value). `key`
    /// may be text or bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use sidetrack::Message;
    ///
    /// let msg = Message::new("orders", "{}").with_header("trace-id", "abc");
    /// assert_eq!(msg.header("trace-id"), Some(Some(b"abc".as_slice())));
    /// assert_eq!(msg.header(b"tenant".as_slice()), None); // no such header
    /// ```
    pub fn header(&self, key: impl AsRef<[u8]>) -> Option<Option<&[u8]>> {
        let key = key.as_ref();
        self.headers()
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::FailureKind;

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Order {
        id: String,
        amount_cents: i64,
    }

    #[test]
    fn json_decoding() {
        let order = Order {
            id: "a".into(),
            amount_cents: 5,
        };
        let m = Message::json_payload("orders", &order);
        assert_eq!(m.json::<Order>().unwrap(), order);
        let bad = Message::new("orders", b"{not json".to_vec());
        assert_eq!(bad.json::<Order>().unwrap_err().kind(), FailureKind::Poison);
        let tomb = Message::new("orders", b"".to_vec()).without_payload();
        let err = tomb.json::<Order>().unwrap_err();
        assert_eq!(err.kind(), FailureKind::Poison);
        assert!(err.message().contains("tombstone"));
    }

    #[test]
    fn keys_and_headers() {
        let m = Message::new("t", b"x".to_vec())
            .with_key(vec![0xff, 0x00])
            .with_header("a", b"1".to_vec())
            .with_header("a", b"2".to_vec());
        assert_eq!(m.key(), Some(&[0xff, 0x00][..]));
        assert_eq!(m.key_str().unwrap_err().kind(), FailureKind::Poison);
        assert_eq!(m.header("a"), Some(Some(&b"1"[..])));
        assert_eq!(m.header("b"), None);
        assert_eq!(m.headers().len(), 2);
        assert_eq!(m.attempt(), 1);
        assert_eq!(m.received_from(), ("t", 0, 0));
    }
}
