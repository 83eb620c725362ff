use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::retry::Envelope;

use super::{HandlerError, Header};

/// A record as the handler sees it.
///
/// `topic()`, `partition()`, `offset()` and `timestamp()` describe the **original** record,
/// also when it is being retried from a retry topic, so they make a stable identity for
/// idempotency. Where the record was actually read from is [`Message::received_from`].
///
/// Cloning is cheap (the record is shared).
#[derive(Clone)]
pub struct Message {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug)]
struct Inner {
    /// Shared with the partition task: no copy of the topic name per record.
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<Header>,
    attempt: u32,
    envelope: Option<Envelope>,
    received_from: Option<(Arc<str>, i32, i64)>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("Message")
            .field("topic", &i.topic)
            .field("partition", &i.partition)
            .field("offset", &i.offset)
            .field("attempt", &i.attempt)
            .field("key_len", &i.key.as_ref().map(Vec::len))
            .field("payload_len", &i.payload.as_ref().map(Vec::len))
            .field("headers", &i.headers.len())
            .finish()
    }
}

impl Message {
    /// A message for tests: partition 0, offset 0, attempt 1, no key, no headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            inner: Arc::new(Inner {
                topic: Arc::from(topic.into()),
                partition: 0,
                offset: 0,
                timestamp: None,
                key: None,
                payload: Some(payload.into()),
                headers: Vec::new(),
                attempt: 1,
                envelope: None,
                received_from: None,
            }),
        }
    }

    /// A test message whose payload is `value` as JSON.
    pub fn json_payload(topic: impl Into<String>, value: &impl serde::Serialize) -> Self {
        // Serializing plain data into a Vec cannot fail short of a broken Serialize impl.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        Self::new(topic, bytes)
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Sets the key.
    pub fn with_key(self, key: impl Into<Vec<u8>>) -> Self {
        self.edit(|i| i.key = Some(key.into()))
    }

    /// Adds a header.
    pub fn with_header(self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.edit(|i| i.headers.push(Header::new(key, value)))
    }

    /// Sets partition and offset.
    pub fn with_position(self, partition: i32, offset: i64) -> Self {
        self.edit(|i| {
            i.partition = partition;
            i.offset = offset;
        })
    }

    /// Sets the timestamp (ms since the epoch).
    pub fn with_timestamp(self, timestamp_ms: i64) -> Self {
        self.edit(|i| i.timestamp = Some(timestamp_ms))
    }

    /// Removes the payload (a tombstone).
    pub fn without_payload(self) -> Self {
        self.edit(|i| i.payload = None)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        received: (&Arc<str>, i32, i64),
        timestamp: Option<i64>,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Vec<Header>,
        envelope: Option<Envelope>,
    ) -> Self {
        let (topic, partition, offset) = received;
        let inner = match envelope {
            None => Inner {
                topic: Arc::clone(topic),
                partition,
                offset,
                timestamp,
                key,
                payload,
                headers,
                attempt: 1,
                envelope: None,
                received_from: None,
            },
            Some(env) => Inner {
                topic: Arc::from(env.original_topic.as_str()),
                partition: env.original_partition,
                offset: env.original_offset,
                timestamp: env.original_timestamp,
                key,
                payload,
                headers,
                attempt: env.attempts.saturating_add(1),
                envelope: Some(env),
                received_from: Some((Arc::clone(topic), partition, offset)),
            },
        };
        Message {
            inner: Arc::new(inner),
        }
    }

    /// Original topic.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// Original partition.
    pub fn partition(&self) -> i32 {
        self.inner.partition
    }

    /// Original offset.
    pub fn offset(&self) -> i64 {
        self.inner.offset
    }

    /// Original timestamp, ms since the Unix epoch, if the record had one.
    pub fn timestamp(&self) -> Option<i64> {
        self.inner.timestamp
    }

    /// Where this delivery was read from: the original coordinates on the first attempt, a
    /// retry topic's on later ones.
    pub fn received_from(&self) -> (&str, i32, i64) {
        match &self.inner.received_from {
            Some((t, p, o)) => (t, *p, *o),
            None => (&self.inner.topic, self.inner.partition, self.inner.offset),
        }
    }

    /// Attempt number, 1 on the first delivery.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The envelope of a retried record (`None` on the first attempt).
    pub fn envelope(&self) -> Option<&Envelope> {
        self.inner.envelope.as_ref()
    }

    /// The key bytes.
    pub fn key(&self) -> Option<&[u8]> {
        self.inner.key.as_deref()
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
        self.inner.payload.as_deref()
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
        &self.inner.headers
    }

    /// The value of the first user header named `key` (`Some(None)` for a null value). `key`
    /// may be text or bytes.
    pub fn header(&self, key: impl AsRef<[u8]>) -> Option<Option<&[u8]>> {
        let key = key.as_ref();
        self.inner
            .headers
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
