//! The proxy's configuration: a serde struct with defaults, read from the `[proxy]` section of
//! a TOML file and checked by [`ProxyConfig::validate`].
//!
//! ```
//! let config = sidetrack::proxy::ProxyConfig::from_toml_str(r#"
//!     [proxy]
//!     brokers = "localhost:9092"
//!     listen = "0.0.0.0:8082"
//!     linger = "2ms"
//!     max_in_flight_records = 20000
//!
//!     [[proxy.auth.tokens]]
//!     name = "billing"
//!     sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//!     topics = ["orders", "invoices.*"]
//!
//!     [proxy.producer]          # raw librdkafka properties
//!     "compression.type" = "lz4"
//! "#).unwrap();
//! config.validate().unwrap();
//! assert_eq!(config.linger, std::time::Duration::from_millis(2));
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Everything a proxy instance needs. Every field has a default; `brokers` may stay empty only
/// when the proxy is given an embedded broker (the CLI starts one then).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Bootstrap servers, `host:port,…`.
    ///
    /// Default: empty (the CLI then starts an embedded broker for the demo).
    pub brokers: String,
    /// Address to listen on. Loopback by default: serving other hosts is a decision.
    ///
    /// Default: `127.0.0.1:8082`.
    pub listen: SocketAddr,
    /// How long the shared producer waits for more records before sending a batch
    /// (librdkafka `linger.ms`). Concurrent requests share broker batches within it.
    ///
    /// Default: 1 ms. Longer fills broker batches better under load, and adds that much
    /// latency to every request.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Longest time a produce request may take: records not acknowledged by then fail with
    /// 503 (librdkafka `message.timeout.ms` is set to it).
    ///
    /// Default: 10 s. Clients should time out later than this, or they retry requests that
    /// are still being written.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Records queued in the producer and not yet acknowledged, over all requests; a request
    /// that would go beyond it is answered 429 at once.
    ///
    /// Default: 50,000.
    pub max_in_flight_records: usize,
    /// What those records cost in memory, over all requests; a request that would go beyond
    /// it is answered 429 at once (413 if it never fits). A record costs its key, value and
    /// header bytes plus [`RECORD_OVERHEAD`](super::RECORD_OVERHEAD) (512) and
    /// [`HEADER_OVERHEAD`](super::HEADER_OVERHEAD) (128) per header: what librdkafka and the
    /// proxy hold for it besides its bytes ([`ProduceRecord::cost`](super::ProduceRecord::cost)).
    ///
    /// Default: 64 MiB.
    pub max_in_flight_bytes: usize,
    /// Most headers one record of a request may carry; a record with more is answered 413
    /// (error code 41304) before its headers are decoded. Default 256. Headers a
    /// [`RecordRule`](super::RecordRule) adds and the proxy's own idempotency headers do not
    /// count.
    pub max_headers_per_record: usize,
    /// Largest request body; a larger one is answered 413 before it is read.
    ///
    /// Default: 4 MiB.
    pub max_body_bytes: usize,
    /// Bytes of request bodies being read or decoded at once, over all requests (each request
    /// reserves its `Content-Length`, or `max_body_bytes` without one, and once decoded the
    /// [cost](super::ProduceRecord::cost) of its records if that is more, until they are
    /// admitted); beyond it, 429 at once. With the in-flight bounds this caps the memory
    /// requests can hold.
    ///
    /// Default: 128 MiB.
    pub max_buffered_bytes: usize,
    /// Open client connections. When all are taken, a new connection evicts the oldest
    /// unproven one (see `max_unproven_connections`); when every one is proven, new connections
    /// wait in the listen backlog.
    ///
    /// Default: 10,000.
    pub max_connections: usize,
    /// Connections that have not proven themselves yet: with authentication on, not yet sent a
    /// request with a valid bearer token; with it off, not yet completed a request head. Beyond
    /// it a new connection evicts the oldest unproven one, so idle or unauthenticated sockets
    /// can neither hold more than this share nor keep a client with a token out. By default
    /// half of `max_connections` (at least 1).
    pub max_unproven_connections: Option<usize>,
    /// Time from accepting a connection until its first request head is complete (TLS
    /// handshake included), whatever the protocol; on HTTP/1 also the time from the first byte
    /// of each later head to its end. A connection that misses it is closed.
    ///
    /// Default: 10 s.
    #[serde(with = "humantime_serde")]
    pub head_timeout: Duration,
    /// A connection with no request in progress (HTTP/2: no open stream) for this long is
    /// closed (HTTP/2: GOAWAY). Keep it above the idle timeout of a load balancer in front, so
    /// that the balancer, not the proxy, closes idle connections.
    ///
    /// Default: 120 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2: interval of the keep-alive PINGs the proxy sends.
    ///
    /// Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_interval: Duration,
    /// HTTP/2: a PING not answered within this is a dead peer; its connection is closed.
    ///
    /// Default: 20 s.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_timeout: Duration,
    /// How long topic metadata (partition counts) is trusted before it is looked up again.
    ///
    /// Default: 30 s. Shorter notices new partitions sooner, at the cost of a metadata
    /// request per topic that often.
    #[serde(with = "humantime_serde")]
    pub metadata_max_age: Duration,
    /// Longest wait for a metadata lookup (an unknown topic is answered within it).
    ///
    /// Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub metadata_timeout: Duration,
    /// How long shutdown waits for requests in flight and the producer's flush.
    ///
    /// Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Cluster id named by `GET /v3/clusters` and accepted in v3 paths; by default the
    /// broker's cluster id (or `sidetrack` when the broker does not tell).
    pub cluster_id: Option<String>,
    /// Topic patterns (`*` matches any run of characters) nobody may produce to. By default
    /// sidetrack's own retry and dead-letter topics; Kafka's internal topics (`__*`) are
    /// refused unless `allow_internal_topics` is set.
    ///
    /// Default: `["*.retry.*", "*.dlq"]`.
    pub denied_topics: Vec<String>,
    /// Allow producing to topics whose name starts with `__` (Kafka internals).
    ///
    /// Default: `false`.
    pub allow_internal_topics: bool,
    /// Serve Prometheus `GET /metrics` on the proxy's own listener.
    ///
    /// Default: `true`.
    pub metrics: bool,
    /// `Idempotency-Key` handling.
    pub idempotency: IdempotencyConfig,
    /// Bearer-token authentication; off when no token is configured.
    pub auth: AuthConfig,
    /// TLS for the listener (feature `proxy-tls`).
    pub tls: Option<TlsConfig>,
    /// Raw librdkafka properties for the shared producer. Properties the proxy's guarantees
    /// rest on are rejected by [`ProxyConfig::validate`], with the reason.
    ///
    /// Default: empty.
    pub producer: BTreeMap<String, String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            brokers: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            linger: Duration::from_millis(1),
            request_timeout: Duration::from_secs(10),
            max_in_flight_records: 50_000,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_headers_per_record: 256,
            max_body_bytes: 4 * 1024 * 1024,
            max_buffered_bytes: 128 * 1024 * 1024,
            max_connections: 10_000,
            max_unproven_connections: None,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            http2_keep_alive_interval: Duration::from_secs(30),
            http2_keep_alive_timeout: Duration::from_secs(20),
            metadata_max_age: Duration::from_secs(30),
            metadata_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            cluster_id: None,
            denied_topics: vec!["*.retry.*".to_owned(), "*.dlq".to_owned()],
            allow_internal_topics: false,
            metrics: true,
            idempotency: IdempotencyConfig::default(),
            auth: AuthConfig::default(),
            tls: None,
            producer: BTreeMap::new(),
        }
    }
}

/// `Idempotency-Key`: a retried request with the same key from the same caller (and the same
/// method, path, content type, body and values of the headers the rules decide on) within
/// `window` gets the first answer and writes nothing new. Per instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long an answer is remembered, from the time it was sent. Must be longer than
    /// `request_timeout`, so a client that retries after timing out finds it. A key whose
    /// request is still running is never forgotten (its retry is 409). Default 5 min.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Most answers remembered; the oldest goes first. Default 100,000.
    pub max_keys: usize,
    /// Most bytes the remembered answers may hold (their bodies and keys plus a fixed
    /// overhead per entry); the oldest go first. An answer larger than this on its own is not
    /// remembered (its retry runs again; the records carry the key as a header). Default
    /// 64 MiB, at least 64 KiB.
    pub max_bytes: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            window: Duration::from_secs(300),
            max_keys: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Bearer tokens and the topics each may produce to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The accepted tokens. Empty: no authentication (every caller may produce to every topic
    /// not denied).
    pub tokens: Vec<TokenConfig>,
}

/// One accepted bearer token. Exactly one of `sha256`, `env` and `file` gives it; the token
/// itself is never written in the configuration and never logged.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// A name for logs and metrics (never the token).
    pub name: String,
    /// SHA-256 of the token, hex (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: Option<String>,
    /// Environment variable holding the token.
    pub env: Option<String>,
    /// File holding the token (surrounding whitespace ignored).
    pub file: Option<PathBuf>,
    /// Topic patterns this token may produce to (`*` matches any run of characters).
    pub topics: Vec<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash is not secret, but there is no reason to print it either.
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("env", &self.env)
            .field("file", &self.file)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// PEM files of the listener's certificate chain and private key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Producer properties the proxy sets itself, and why a user value is refused.
const MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `brokers`"),
    ("metadata.broker.list", "use `brokers`"),
    (
        "acks",
        "always `all`: a 200 means every in-sync replica has the record",
    ),
    (
        "request.required.acks",
        "always `all`: a 200 means every in-sync replica has the record",
    ),
    (
        "enable.idempotence",
        "always `true`: broker-side retries must not duplicate records",
    ),
    (
        "transactional.id",
        "the proxy's producer is not transactional",
    ),
    ("message.timeout.ms", "set from `request_timeout`"),
    ("delivery.timeout.ms", "set from `request_timeout`"),
    ("linger.ms", "use `linger`"),
    ("queue.buffering.max.ms", "use `linger`"),
    (
        "queue.buffering.max.messages",
        "set from `max_in_flight_records`",
    ),
    (
        "queue.buffering.max.kbytes",
        "set from `max_in_flight_bytes`",
    ),
    ("allow.auto.create.topics", "the proxy never creates topics"),
];

/// A configuration file as the proxy reads it: only its `[proxy]` table (a runtime's
/// sections in the same file are not the proxy's to check).
#[derive(Deserialize)]
struct File {
    /// The `[proxy]` table, if any.
    proxy: Option<ProxyConfig>,
}

impl ProxyConfig {
    /// Parses the `[proxy]` section of TOML text; other top-level sections (a runtime
    /// configuration in the same file) are ignored. Not validated yet.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        file.proxy
            .ok_or_else(|| ConfigError::invalid("proxy", "the file has no [proxy] section"))
    }

    /// The unproven share in effect: `max_unproven_connections`, or half of `max_connections`.
    pub(crate) fn unproven_cap(&self) -> usize {
        self.max_unproven_connections
            .unwrap_or(self.max_connections / 2)
            .clamp(1, self.max_connections.max(1))
    }

    /// Reads the `[proxy]` section of a TOML file. Not validated yet.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::from_toml_str(&crate::config::read_file(path.as_ref())?)
    }

    /// Checks every field and names the first one at fault (`proxy.…`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |field: &str, reason: &str| Err(ConfigError::invalid(format!("proxy.{field}"), reason));
        for (field, v, min) in [
            (
                "request_timeout",
                self.request_timeout,
                Duration::from_millis(100),
            ),
            (
                "metadata_max_age",
                self.metadata_max_age,
                Duration::from_millis(100),
            ),
            (
                "metadata_timeout",
                self.metadata_timeout,
                Duration::from_millis(10),
            ),
            (
                "shutdown_timeout",
                self.shutdown_timeout,
                Duration::from_millis(1),
            ),
            (
                "idempotency.window",
                self.idempotency.window,
                Duration::from_millis(1),
            ),
        ] {
            if v < min {
                return bad(
                    field,
                    &format!("must be at least {}", humantime::format_duration(min)),
                );
            }
        }
        if self.request_timeout > Duration::from_secs(3600) {
            return bad("request_timeout", "must be at most 1h");
        }
        if self.linger > Duration::from_secs(1) {
            return bad(
                "linger",
                "must be at most 1s (a synchronous answer waits for it)",
            );
        }
        if self.max_in_flight_records == 0 || self.max_in_flight_records > 10_000_000 {
            return bad("max_in_flight_records", "must be within 1..=10000000");
        }
        // librdkafka's queue.buffering.max.kbytes is an int of KiB.
        if self.max_in_flight_bytes < 1024 || self.max_in_flight_bytes > (i32::MAX as usize) {
            return bad("max_in_flight_bytes", "must be within 1 KiB..2 GiB");
        }
        if self.max_body_bytes < 64 || self.max_body_bytes > (u32::MAX as usize) {
            return bad("max_body_bytes", "must be within 64 bytes..4 GiB");
        }
        if self.max_buffered_bytes < self.max_body_bytes
            || self.max_buffered_bytes > (u32::MAX as usize)
        {
            return bad(
                "max_buffered_bytes",
                "must be at least max_body_bytes and below 4 GiB",
            );
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if let Some(n) = self.max_unproven_connections {
            if n == 0 || n > self.max_connections {
                return bad(
                    "max_unproven_connections",
                    "must be within 1..=max_connections",
                );
            }
        }
        for (field, v, min, max) in [
            (
                "head_timeout",
                self.head_timeout,
                Duration::from_millis(10),
                Duration::from_secs(3600),
            ),
            (
                "idle_timeout",
                self.idle_timeout,
                Duration::from_millis(10),
                Duration::from_secs(24 * 3600),
            ),
            (
                "http2_keep_alive_interval",
                self.http2_keep_alive_interval,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ),
            (
                "http2_keep_alive_timeout",
                self.http2_keep_alive_timeout,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ),
        ] {
            if v < min || v > max {
                return bad(
                    field,
                    &format!(
                        "must be within {}..={}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
            }
        }
        if self.idempotency.max_keys == 0 {
            return bad("idempotency.max_keys", "must be at least 1");
        }
        if self.idempotency.window <= self.request_timeout {
            return bad(
                "idempotency.window",
                &format!(
                    "must be longer than request_timeout ({}): a client that retries after its request timed out must still find the answer, or its records are written twice",
                    humantime::format_duration(self.request_timeout)
                ),
            );
        }
        if self.idempotency.max_bytes < 64 * 1024 {
            return bad("idempotency.max_bytes", "must be at least 64 KiB");
        }
        if self.max_headers_per_record > 100_000 {
            return bad("max_headers_per_record", "must be at most 100000");
        }
        if let Some(id) = &self.cluster_id {
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return bad("cluster_id", "use only a-z A-Z 0-9 - _ .");
            }
        }
        for (i, p) in self.denied_topics.iter().enumerate() {
            if p.is_empty() {
                return bad(&format!("denied_topics[{i}]"), "must not be empty");
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let f = |name: &str| format!("auth.tokens[{i}].{name}");
            if t.name.trim().is_empty() {
                return bad(&f("name"), "must not be empty (it names the token in logs)");
            }
            if !names.insert(&t.name) {
                return bad(&f("name"), "is used by another token");
            }
            let sources = [t.sha256.is_some(), t.env.is_some(), t.file.is_some()];
            if sources.iter().filter(|s| **s).count() != 1 {
                return bad(&f("sha256"), "set exactly one of `sha256`, `env`, `file`");
            }
            if let Some(h) = &t.sha256 {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return bad(
                        &f("sha256"),
                        "must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)",
                    );
                }
            }
            if t.topics.is_empty() {
                return bad(
                    &f("topics"),
                    "must list at least one topic pattern (\"*\" for all)",
                );
            }
        }
        if self.tls.is_some() && !cfg!(feature = "proxy-tls") {
            return bad(
                "tls",
                "this build has no TLS support; enable the `proxy-tls` feature",
            );
        }
        for key in self.producer.keys() {
            // Under any spelling librdkafka accepts (`topic.` prefix, aliases).
            let name = crate::config::canonical_property(key);
            if let Some((_, why)) = MANAGED.iter().find(|(k, _)| *k == name) {
                return Err(ConfigError::invalid(
                    format!("proxy.producer.\"{key}\""),
                    format!("is managed by the proxy: {why}"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters (possibly
/// empty) and everything else for itself.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Iterative wildcard match with backtracking to the last `*`: linear in practice, and
    // never recursive, whatever the input.
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn defaults_validate_and_listen_on_loopback() {
        let c = ProxyConfig::default();
        c.validate().unwrap();
        assert!(c.listen.ip().is_loopback());
    }

    #[test]
    fn guarantees_cannot_be_overridden() {
        for key in [
            "acks",
            "enable.idempotence",
            "message.timeout.ms",
            "linger.ms",
            "transactional.id",
            // librdkafka's `topic.` prefix sets the same property.
            "topic.acks",
            "topic.message.timeout.ms",
        ] {
            let mut c = ProxyConfig::default();
            c.producer.insert(key.into(), "1".into());
            let err = c.validate().unwrap_err();
            assert_eq!(field_of(err), format!("proxy.producer.\"{key}\""));
        }
        let mut c = ProxyConfig::default();
        c.producer.insert("compression.type".into(), "lz4".into());
        c.validate().unwrap();
    }

    #[test]
    fn file_sections_and_unknown_fields() {
        let err = ProxyConfig::from_toml_str("brokers = \"x\"\ngroup = \"g\"").unwrap_err();
        assert!(err.to_string().contains("[proxy]"), "{err}");
        let err = ProxyConfig::from_toml_str("[proxy]\nlingr = \"1ms\"").unwrap_err();
        assert!(err.to_string().contains("lingr"), "{err}");
        // A runtime configuration may share the file.
        let c = ProxyConfig::from_toml_str(
            "brokers = \"b:1\"\ngroup = \"g\"\ntopics = [\"t\"]\n[proxy]\nlinger = \"1ms\"",
        )
        .unwrap();
        assert_eq!(c.linger, Duration::from_millis(1));
    }

    #[test]
    fn tokens_are_checked() {
        let mut c = ProxyConfig::default();
        c.auth.tokens.push(TokenConfig {
            name: "a".into(),
            sha256: Some("zz".into()),
            topics: vec!["*".into()],
            ..Default::default()
        });
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "proxy.auth.tokens[0].sha256"
        );
        c.auth.tokens[0].sha256 = None;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "proxy.auth.tokens[0].sha256"
        );
        c.auth.tokens[0].env = Some("T".into());
        c.validate().unwrap();
        c.auth.tokens[0].topics.clear();
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "proxy.auth.tokens[0].topics"
        );
        assert!(!format!("{:?}", c.auth.tokens[0]).contains("sha256"));
    }

    /// The idempotency window must outlast a request (a client retrying after its timeout
    /// must find the answer), the answer cache has a byte floor, and the header cap a
    /// ceiling; each refusal names its field.
    #[test]
    fn idempotency_window_outlasts_request_timeout() {
        let mut c = ProxyConfig::default();
        assert_eq!(c.max_headers_per_record, 256);
        assert_eq!(c.idempotency.max_bytes, 64 * 1024 * 1024);
        c.request_timeout = Duration::from_secs(30);
        c.idempotency.window = Duration::from_secs(30);
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("request_timeout"), "{err}");
        assert_eq!(field_of(err), "proxy.idempotency.window");
        c.idempotency.window = Duration::from_secs(31);
        c.validate().unwrap();
        c.idempotency.max_bytes = 1024;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "proxy.idempotency.max_bytes"
        );
        c.idempotency.max_bytes = 64 * 1024;
        c.max_headers_per_record = 100_001;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "proxy.max_headers_per_record"
        );
        c.max_headers_per_record = 0;
        c.validate().unwrap();
    }

    #[test]
    fn connection_limits_are_checked() {
        let mut c = ProxyConfig {
            max_connections: 4,
            ..ProxyConfig::default()
        };
        assert_eq!(c.unproven_cap(), 2);
        c.max_connections = 1;
        assert_eq!(c.unproven_cap(), 1);
        c.max_unproven_connections = Some(2);
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "proxy.max_unproven_connections"
        );
        c.max_unproven_connections = Some(0);
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "proxy.max_unproven_connections"
        );
        c.max_unproven_connections = Some(1);
        c.validate().unwrap();
        assert_eq!(c.unproven_cap(), 1);
        for f in [
            |c: &mut ProxyConfig| c.head_timeout = Duration::ZERO,
            |c: &mut ProxyConfig| c.idle_timeout = Duration::from_secs(100_000),
            |c: &mut ProxyConfig| c.http2_keep_alive_interval = Duration::ZERO,
            |c: &mut ProxyConfig| c.http2_keep_alive_timeout = Duration::ZERO,
        ] {
            let mut bad = c.clone();
            f(&mut bad);
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let c = ProxyConfig::from_toml_str(
            "[proxy]\nhead_timeout = \"2s\"\nidle_timeout = \"1m\"\nmax_unproven_connections = 7",
        )
        .unwrap();
        assert_eq!(
            (c.head_timeout, c.idle_timeout, c.max_unproven_connections),
            (Duration::from_secs(2), Duration::from_secs(60), Some(7))
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*.dlq", "orders.billing.dlq"));
        assert!(!glob_match("*.dlq", "orders.dlq.x"));
        assert!(glob_match("*.retry.*", "orders.billing.retry.1s"));
        assert!(glob_match("orders", "orders"));
        assert!(!glob_match("orders", "orders2"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("__*", "__consumer_offsets"));
    }
}
