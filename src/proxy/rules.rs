//! The extension point for a company's own rules: a [`RecordRule`] sees every record after
//! decoding and authentication, before anything is produced (and before an `Idempotency-Key`
//! is answered from memory), and may reject it, add headers or choose its partition.
//!
//! Rules run on every record of a request before the first is produced, so a request is
//! written whole or refused whole: one rejected record (422 42208, or the 4xx the rule chose)
//! means nothing of the request reaches Kafka. A rule is plain synchronous code on the
//! request's task: it should decide from the record and the [`RequestInfo`] (caller, topic,
//! headers) and not wait on I/O. `examples/proxy_rules.rs` is a complete one.

use axum::http::{HeaderMap, StatusCode};

use super::auth::Caller;
use super::status::{ApiError, ErrorKind};
use super::wire::ProduceRecord;

/// What a rule knows about the request a record came in.
#[derive(Debug)]
pub struct RequestInfo<'a> {
    /// The topic the request produces to.
    pub topic: &'a str,
    /// The authenticated caller.
    pub caller: &'a Caller,
    /// The HTTP request headers (e.g. `traceparent`, a tenant header).
    pub headers: &'a HeaderMap,
    /// The record's index in the request.
    pub index: usize,
}

/// A rule's refusal of a record: the whole request is answered with `status` (a 4xx; anything
/// else becomes 422) and `error_code` 42208, and nothing of it is produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    /// A 422 with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Rejection {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: message.into(),
        }
    }

    /// A rejection with another 4xx status (e.g. 403 for a tenant that may not write here).
    /// A status outside 400..=499 is replaced by 422.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        if status.is_client_error() {
            self.status = status;
        }
        self
    }

    /// The answer to a request one of whose records (`index`) was rejected: 42208 with the
    /// rule's status and message, the record named so a client knows which to fix.
    pub(crate) fn into_api_error(self, index: usize) -> ApiError {
        let mut e = ApiError::new(
            ErrorKind::Rejected,
            format!("records[{index}]: {}", self.message),
        );
        e.status = Some(self.status);
        e
    }
}

/// A company rule applied to every record before it is produced.
///
/// Rules run in the order they were added, synchronously, on the request's task: keep them
/// cheap (no I/O). A rule may change the record: add headers (tenant, trace context; the
/// `sidetrack-` prefix is allowed here), set `partition` (checked against the topic's
/// partitions afterwards), or rewrite key and value.
///
/// ```
/// use sidetrack::proxy::{ProduceRecord, RecordRule, Rejection, RequestInfo};
/// use sidetrack::Header;
///
/// struct Tenant;
/// impl RecordRule for Tenant {
///     fn check(&self, req: &RequestInfo<'_>, record: &mut ProduceRecord) -> Result<(), Rejection> {
///         let tenant = req
///             .headers
///             .get("x-tenant")
///             .ok_or_else(|| Rejection::new("send an X-Tenant header"))?;
///         record.headers.push(Header::new("tenant", tenant.as_bytes()));
///         Ok(())
///     }
/// }
/// ```
pub trait RecordRule: Send + Sync + 'static {
    /// Checks (and may change) one record.
    fn check(&self, request: &RequestInfo<'_>, record: &mut ProduceRecord)
        -> Result<(), Rejection>;

    /// The request headers this rule decides on (a tenant header, say). Rules run before an
    /// `Idempotency-Key` is answered from memory, and the key's fingerprint covers the values
    /// of these headers: a request with other values (another tenant repeating a key and a
    /// body) is never given the first request's answer (it is 422 42206, like another body).
    /// Headers that only travel into the record (trace context) do not belong here: a retry
    /// may carry new values. Asked once, when the proxy starts. Default: none (a closure rule
    /// has none; write a type to name them).
    fn decides_on_headers(&self) -> Vec<String> {
        Vec::new()
    }
}

impl<F> RecordRule for F
where
    F: Fn(&RequestInfo<'_>, &mut ProduceRecord) -> Result<(), Rejection> + Send + Sync + 'static,
{
    fn check(
        &self,
        request: &RequestInfo<'_>,
        record: &mut ProduceRecord,
    ) -> Result<(), Rejection> {
        self(request, record)
    }
}
