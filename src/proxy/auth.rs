//! Who may produce where: bearer tokens (kept as SHA-256 hashes in memory, whatever their
//! source), per-token topic patterns, and the topics nobody may produce to.
//!
//! Two questions, asked in this order by the extractors: *who is it* ([`Access::authenticate`]:
//! 401 when the bearer token is missing or unknown) and *may they write here*
//! ([`Access::authorize`]: 403 40301 for a topic outside the token's patterns, 403 40302 for a
//! topic nobody may write: Kafka's internal `__*` topics and `denied_topics`, which by default
//! hold sidetrack's own retry and dead-letter topics, so a client cannot forge a retry).
//!
//! Tokens are compared by their SHA-256, in constant time: the configuration may hold the
//! hash only (`sha256 = "…"`, see [`token_sha256`]), and a token read from `env` or `file`
//! is hashed when loaded, so the process never keeps one to leak.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::config::{glob_match, ProxyConfig};
use super::status::{ApiError, ErrorKind};
use crate::config::ConfigError;

/// The caller a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name from the configuration; `None` when authentication is off.
    pub token: Option<String>,
}

/// One configured token, as held in memory: its name (for logs and `Caller`), the SHA-256
/// of its secret (never the secret itself, whatever its source), and the topic patterns it
/// may produce to.
struct Token {
    /// The name logs and rules see (`Caller::token`).
    name: String,
    /// SHA-256 of the secret, compared in constant time.
    hash: [u8; 32],
    /// Glob patterns of the topics it may produce to.
    topics: Vec<String>,
}

/// The access rules of one proxy instance.
pub(crate) struct Access {
    /// The configured tokens; empty means authentication is off (every caller anonymous).
    tokens: Vec<Token>,
    /// `denied_topics`: patterns nobody may produce to, whatever their token allows.
    denied: Vec<String>,
    /// `allow_internal_topics`: whether `__`-prefixed topics may be written.
    allow_internal: bool,
}

impl Access {
    /// Loads the tokens (reading `env` and `file` sources now, once).
    pub(crate) fn new(config: &ProxyConfig) -> Result<Self, ConfigError> {
        let mut tokens = Vec::with_capacity(config.auth.tokens.len());
        for (i, t) in config.auth.tokens.iter().enumerate() {
            let field = |f: &str| format!("proxy.auth.tokens[{i}].{f}");
            let hash = if let Some(hex) = &t.sha256 {
                parse_hex(hex)
                    .ok_or_else(|| ConfigError::invalid(field("sha256"), "must be 64 hex digits"))?
            } else if let Some(var) = &t.env {
                let v = std::env::var(var).map_err(|_| {
                    ConfigError::invalid(
                        field("env"),
                        format!("environment variable `{var}` is not set or not UTF-8"),
                    )
                })?;
                secret_hash(v.trim(), &field("env"))?
            } else if let Some(path) = &t.file {
                let v = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                secret_hash(v.trim(), &field("file"))?
            } else {
                return Err(ConfigError::invalid(
                    field("sha256"),
                    "set exactly one of `sha256`, `env`, `file`",
                ));
            };
            tokens.push(Token {
                name: t.name.clone(),
                hash,
                topics: t.topics.clone(),
            });
        }
        Ok(Access {
            tokens,
            denied: config.denied_topics.clone(),
            allow_internal: config.allow_internal_topics,
        })
    }

    /// Whether requests must carry a token.
    pub(crate) fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Authenticates a request from its `Authorization` header.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if !self.enabled() {
            return Ok(Caller { token: None });
        }
        let presented = bearer_token(headers).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unauthenticated,
                "send `Authorization: Bearer <token>`",
            )
        })?;
        let hash: [u8; 32] = Sha256::digest(presented).into();
        // Compare against every token without stopping early, so timing says nothing about
        // which (or whether a) token matched.
        let mut found = None;
        for t in &self.tokens {
            if ct_eq(&t.hash, &hash) {
                found = Some(t.name.clone());
            }
        }
        match found {
            Some(name) => Ok(Caller { token: Some(name) }),
            None => Err(ApiError::new(
                ErrorKind::Unauthenticated,
                "unknown bearer token",
            )),
        }
    }

    /// Whether `caller` may produce to `topic`.
    pub(crate) fn authorize(&self, caller: &Caller, topic: &str) -> Result<(), ApiError> {
        if !self.allow_internal && topic.starts_with("__") {
            return Err(ApiError::new(
                ErrorKind::TopicRefused,
                format!("`{topic}` is a Kafka internal topic; the proxy does not produce to it"),
            ));
        }
        if let Some(p) = self.denied.iter().find(|p| glob_match(p, topic)) {
            return Err(ApiError::new(
                ErrorKind::TopicRefused,
                format!("`{topic}` matches denied pattern `{p}` (retry and dead-letter topics are written by sidetrack itself)"),
            ));
        }
        if let Some(name) = &caller.token {
            let allowed = self
                .tokens
                .iter()
                .find(|t| &t.name == name)
                .is_some_and(|t| t.topics.iter().any(|p| glob_match(p, topic)));
            if !allowed {
                return Err(ApiError::new(
                    ErrorKind::Forbidden,
                    format!("token `{name}` may not produce to `{topic}`"),
                ));
            }
        }
        Ok(())
    }
}

/// The SHA-256 of a token's secret as read from the configuration or a file.
///
/// # Errors
/// An empty secret, named by `field` (an empty bearer token would let anyone in).
fn secret_hash(token: &str, field: &str) -> Result<[u8; 32], ConfigError> {
    if token.is_empty() {
        return Err(ConfigError::invalid(field, "the token is empty"));
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// The token of an `Authorization: Bearer <token>` header, as bytes (any bytes a client sent;
/// `None` when there is no such header or it is not a bearer token).
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// 64 hex digits (either case) as 32 bytes; `None` for anything else (`sha256` in the
/// configuration).
fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Equality in constant time: how long a comparison takes says nothing about how many
/// leading bytes of a guessed token's hash matched.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 of a token, hex: what goes into `proxy.auth.tokens[].sha256`.
///
/// The same as `printf %s "$TOKEN" | sha256sum`, so the hash can be made either way and the
/// token itself never has to be written into a configuration file.
///
/// # Example
///
/// ```
/// use sidetrack::proxy::token_sha256;
///
/// assert_eq!(
///     token_sha256("abc"),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// ```
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::TokenConfig;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn access() -> Access {
        let mut c = ProxyConfig::default();
        c.auth.tokens.push(TokenConfig {
            name: "billing".into(),
            sha256: Some(token_sha256("s3cret")),
            topics: vec!["orders".into(), "invoices.*".into()],
            ..Default::default()
        });
        Access::new(&c).unwrap()
    }

    fn with_auth(v: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_bytes(v).unwrap(),
        );
        h
    }

    #[test]
    fn tokens_and_topics() {
        let a = access();
        let caller = a.authenticate(&with_auth(b"Bearer s3cret")).unwrap();
        assert_eq!(caller.token.as_deref(), Some("billing"));
        a.authorize(&caller, "orders").unwrap();
        a.authorize(&caller, "invoices.eu").unwrap();
        assert_eq!(
            a.authorize(&caller, "payments").unwrap_err().kind,
            ErrorKind::Forbidden
        );
        assert_eq!(
            a.authenticate(&with_auth(b"Bearer nope")).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            a.authenticate(&HeaderMap::new()).unwrap_err().kind,
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            a.authenticate(&with_auth(b"Basic s3cret"))
                .unwrap_err()
                .kind,
            ErrorKind::Unauthenticated
        );
        assert_eq!(
            a.authorize(&caller, "__consumer_offsets").unwrap_err().kind,
            ErrorKind::TopicRefused
        );
        assert_eq!(
            a.authorize(&caller, "orders.billing.dlq").unwrap_err().kind,
            ErrorKind::TopicRefused
        );
    }

    #[test]
    fn tokens_from_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let mut c = ProxyConfig::default();
        c.auth.tokens.push(TokenConfig {
            name: "f".into(),
            file: Some(path),
            topics: vec!["*".into()],
            ..Default::default()
        });
        let a = Access::new(&c).unwrap();
        assert!(a.authenticate(&with_auth(b"bearer from-file")).is_ok());
        c.auth.tokens[0].file = None;
        c.auth.tokens[0].env = Some("SIDETRACK_PROXY_TEST_TOKEN_UNSET_XYZ".into());
        assert!(Access::new(&c).is_err());
    }

    proptest! {
        /// Any header bytes: authenticated only by the exact token, never a panic.
        #[test]
        fn any_authorization_bytes(v in proptest::collection::vec(any::<u8>(), 0..80)) {
            let a = access();
            if let Ok(h) = HeaderValue::from_bytes(&v) {
                let mut m = HeaderMap::new();
                m.insert(axum::http::header::AUTHORIZATION, h);
                let ok = a.authenticate(&m).is_ok();
                let expected = v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") && v[7..].trim_ascii() == b"s3cret";
                prop_assert_eq!(ok, expected);
            }
        }
    }
}
