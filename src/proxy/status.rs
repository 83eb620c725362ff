//! Every way a request can fail, with its HTTP status, Confluent-style `error_code` and
//! whether retrying the same request can succeed. The status table in `docs/proxy.md` is this file.
//!
//! Kafka and librdkafka errors are classified in [`ErrorKind::of_kafka`].

use axum::http::StatusCode;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What went wrong, as a client must react to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub(crate) enum ErrorKind {
    /// 401 40101: no bearer token, or an unknown one.
    Unauthenticated,
    /// 403 40301: the token may not produce to this topic.
    Forbidden,
    /// 403 40302: the topic is refused for everyone (Kafka internal, or sidetrack's own retry
    /// and dead-letter topics).
    TopicRefused,
    /// 403 40303: the broker refused the proxy's own principal (Kafka
    /// `TOPIC_AUTHORIZATION_FAILED`).
    BrokerForbidden,
    /// 404 40401: the topic does not exist.
    UnknownTopic,
    /// 404 40402: the partition does not exist.
    UnknownPartition,
    /// 404 40403: the v3 cluster id is not this cluster's.
    UnknownCluster,
    /// 404 40404: no such route.
    NotFound,
    /// 405 40501: the route exists, the method does not.
    MethodNotAllowed,
    /// 408 40801: the body did not arrive within `request_timeout`.
    BodyTimeout,
    /// 409 40901: a request with the same `Idempotency-Key` is still running.
    IdempotencyInProgress,
    /// 413 41301: the body is larger than `max_body_bytes`.
    BodyTooLarge,
    /// 413 41302: the broker (or librdkafka's `message.max.bytes`) refuses a record this large.
    RecordTooLarge,
    /// 413 41303: more records in one request than `max_in_flight_records` (or bytes) allows:
    /// it can never be admitted; split it.
    RequestTooLarge,
    /// 413 41304: a record carries more headers than `max_headers_per_record`.
    TooManyHeaders,
    /// 415 41501: the content type is not one the proxy reads.
    UnsupportedMediaType,
    /// 415 41502: Avro, Protobuf and JSON Schema need a schema registry, which this proxy
    /// does not use.
    SchemaFormat,
    /// 422 42201: the body is not valid JSON (syntax, depth, encoding).
    MalformedJson,
    /// 422 42202: valid JSON of the wrong shape (no `records`, an unknown field, a wrong type).
    InvalidRequest,
    /// 422 42203: a key, value or header value is not valid base64.
    InvalidBase64,
    /// 422 42204: a partition field is not an integer in `[0, 2^31)`.
    InvalidPartition,
    /// 422 42205: a header name or value is not acceptable (NUL in the name, a reserved name).
    InvalidHeader,
    /// 422 42206: the `Idempotency-Key` was used before for a different request.
    IdempotencyMismatch,
    /// 400 40001: a bad request header (an `Idempotency-Key` that is not 1–255 visible ASCII
    /// characters).
    BadRequestHeader,
    /// 422 42207: the broker refused the record as invalid (e.g. no key on a compacted topic).
    InvalidRecord,
    /// 4xx 42208 (status chosen by the rule): rejected by a [`RecordRule`](super::RecordRule).
    Rejected,
    /// 429 42901: the proxy holds `max_in_flight_*` already; retry after `Retry-After`.
    Saturated,
    /// 500 50001: a Kafka error retrying will not fix.
    Kafka,
    /// 500 50002: a fault of the proxy itself.
    Internal,
    /// 503 50301: the broker is unreachable, or a retriable error still failed at the request
    /// deadline; retry after `Retry-After`.
    Unavailable,
    /// 503 50302: the proxy is shutting down; retry (another instance answers).
    ShuttingDown,
}

impl ErrorKind {
    /// The HTTP status.
    pub(crate) fn status(self) -> StatusCode {
        use ErrorKind::*;
        match self {
            BadRequestHeader => StatusCode::BAD_REQUEST,
            Unauthenticated => StatusCode::UNAUTHORIZED,
            Forbidden | TopicRefused | BrokerForbidden => StatusCode::FORBIDDEN,
            UnknownTopic | UnknownPartition | UnknownCluster | NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            IdempotencyInProgress => StatusCode::CONFLICT,
            BodyTooLarge | RecordTooLarge | RequestTooLarge | TooManyHeaders => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            UnsupportedMediaType | SchemaFormat => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            MalformedJson | InvalidRequest | InvalidBase64 | InvalidPartition | InvalidHeader
            | IdempotencyMismatch | InvalidRecord | Rejected => StatusCode::UNPROCESSABLE_ENTITY,
            Saturated => StatusCode::TOO_MANY_REQUESTS,
            Kafka | Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Unavailable | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The Confluent-style error code: the status followed by two digits.
    pub(crate) fn code(self) -> u32 {
        use ErrorKind::*;
        match self {
            BadRequestHeader => 40001,
            Unauthenticated => 40101,
            Forbidden => 40301,
            TopicRefused => 40302,
            BrokerForbidden => 40303,
            UnknownTopic => 40401,
            UnknownPartition => 40402,
            UnknownCluster => 40403,
            NotFound => 40404,
            MethodNotAllowed => 40501,
            BodyTimeout => 40801,
            IdempotencyInProgress => 40901,
            BodyTooLarge => 41301,
            RecordTooLarge => 41302,
            RequestTooLarge => 41303,
            TooManyHeaders => 41304,
            UnsupportedMediaType => 41501,
            SchemaFormat => 41502,
            MalformedJson => 42201,
            InvalidRequest => 42202,
            InvalidBase64 => 42203,
            InvalidPartition => 42204,
            InvalidHeader => 42205,
            IdempotencyMismatch => 42206,
            InvalidRecord => 42207,
            Rejected => 42208,
            Saturated => 42901,
            Kafka => 50001,
            Internal => 50002,
            Unavailable => 50301,
            ShuttingDown => 50302,
        }
    }

    /// Whether sending the same request again later can succeed.
    pub(crate) fn retriable(self) -> bool {
        use ErrorKind::*;
        matches!(
            self,
            IdempotencyInProgress | Saturated | Unavailable | ShuttingDown
        )
    }

    /// Seconds for `Retry-After`, on the retriable statuses.
    pub(crate) fn retry_after(self) -> Option<u32> {
        use ErrorKind::*;
        match self {
            Saturated | IdempotencyInProgress | ShuttingDown => Some(1),
            Unavailable => Some(2),
            _ => None,
        }
    }

    /// A short label for metrics (`reason`).
    pub(crate) fn label(self) -> &'static str {
        use ErrorKind::*;
        match self {
            BadRequestHeader => "bad_request_header",
            Unauthenticated => "unauthenticated",
            Forbidden => "forbidden",
            TopicRefused => "topic_refused",
            BrokerForbidden => "broker_forbidden",
            UnknownTopic => "unknown_topic",
            UnknownPartition => "unknown_partition",
            UnknownCluster => "unknown_cluster",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            BodyTimeout => "body_timeout",
            IdempotencyInProgress => "idempotency_in_progress",
            BodyTooLarge => "body_too_large",
            RecordTooLarge => "record_too_large",
            RequestTooLarge => "request_too_large",
            TooManyHeaders => "too_many_headers",
            UnsupportedMediaType => "unsupported_media_type",
            SchemaFormat => "schema_format",
            MalformedJson => "malformed_json",
            InvalidRequest => "invalid_request",
            InvalidBase64 => "invalid_base64",
            InvalidPartition => "invalid_partition",
            InvalidHeader => "invalid_header",
            IdempotencyMismatch => "idempotency_mismatch",
            InvalidRecord => "invalid_record",
            Rejected => "rejected",
            Saturated => "saturated",
            Kafka => "kafka",
            Internal => "internal",
            Unavailable => "unavailable",
            ShuttingDown => "shutting_down",
        }
    }

    /// Every kind, for the documentation tables and tests.
    #[cfg(test)]
    pub(crate) const ALL: &'static [ErrorKind] = &[
        ErrorKind::BadRequestHeader,
        ErrorKind::Unauthenticated,
        ErrorKind::Forbidden,
        ErrorKind::TopicRefused,
        ErrorKind::BrokerForbidden,
        ErrorKind::UnknownTopic,
        ErrorKind::UnknownPartition,
        ErrorKind::UnknownCluster,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::BodyTimeout,
        ErrorKind::IdempotencyInProgress,
        ErrorKind::BodyTooLarge,
        ErrorKind::RecordTooLarge,
        ErrorKind::RequestTooLarge,
        ErrorKind::TooManyHeaders,
        ErrorKind::UnsupportedMediaType,
        ErrorKind::SchemaFormat,
        ErrorKind::MalformedJson,
        ErrorKind::InvalidRequest,
        ErrorKind::InvalidBase64,
        ErrorKind::InvalidPartition,
        ErrorKind::InvalidHeader,
        ErrorKind::IdempotencyMismatch,
        ErrorKind::InvalidRecord,
        ErrorKind::Rejected,
        ErrorKind::Saturated,
        ErrorKind::Kafka,
        ErrorKind::Internal,
        ErrorKind::Unavailable,
        ErrorKind::ShuttingDown,
    ];

    /// How bad a failure is, for the status of a request whose records failed differently:
    /// a failure that retrying cannot fix outranks one that it can (the client must act
    /// either way, and a blind retry of the whole request would not help), and among equals
    /// the higher status wins.
    pub(crate) fn severity(self) -> (bool, u16) {
        (!self.retriable(), self.status().as_u16())
    }

    /// Classifies a Kafka or librdkafka error that failed one record.
    pub(crate) fn of_kafka(e: &KafkaError) -> ErrorKind {
        use RDKafkaErrorCode as C;
        let Some(code) = e.rdkafka_error_code() else {
            return match e {
                KafkaError::Canceled => ErrorKind::ShuttingDown,
                _ => ErrorKind::Kafka,
            };
        };
        match code {
            C::UnknownTopicOrPartition | C::UnknownTopic => ErrorKind::UnknownTopic,
            C::UnknownPartition => ErrorKind::UnknownPartition,
            C::MessageSizeTooLarge | C::MessageBatchTooLarge => ErrorKind::RecordTooLarge,
            C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => {
                ErrorKind::BrokerForbidden
            }
            C::InvalidRecord | C::InvalidTimestamp | C::InvalidMessage | C::PolicyViolation => {
                ErrorKind::InvalidRecord
            }
            C::PurgeQueue | C::PurgeInflight => ErrorKind::ShuttingDown,
            C::MessageTimedOut
            | C::RequestTimedOut
            | C::QueueFull
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::NotCoordinator
            | C::BrokerNotAvailable
            | C::ReplicaNotAvailable
            | C::KafkaStorageError
            | C::OutOfOrderSequenceNumber
            | C::UnknownProducerId
            | C::ThrottlingQuotaExceeded
            | C::OperationTimedOut
            | C::TimedOutQueue
            | C::Retry
            | C::WaitCache => ErrorKind::Unavailable,
            _ => ErrorKind::Kafka,
        }
    }
}

/// One failure: its kind and a message for humans (never a payload, never a token).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened, in a sentence.
    pub message: String,
    /// Status override, used by rules that reject with a 4xx of their choice.
    pub(crate) status: Option<StatusCode>,
}

impl ApiError {
    /// A failure of `kind`.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            status: None,
        }
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.kind.status())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status().as_u16(),
            self.kind.code(),
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_start_with_their_status_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in ErrorKind::ALL {
            assert_eq!(k.code() / 100, u32::from(k.status().as_u16()), "{k:?}");
            assert!(seen.insert(k.code()), "{k:?}");
            assert_eq!(k.retry_after().is_some(), k.retriable(), "{k:?}");
        }
    }

    #[test]
    fn kafka_errors_map_to_statuses() {
        let e = |c| KafkaError::MessageProduction(c);
        use RDKafkaErrorCode as C;
        assert_eq!(
            ErrorKind::of_kafka(&e(C::MessageTimedOut)),
            ErrorKind::Unavailable
        );
        assert_eq!(
            ErrorKind::of_kafka(&e(C::MessageSizeTooLarge)),
            ErrorKind::RecordTooLarge
        );
        assert_eq!(
            ErrorKind::of_kafka(&e(C::UnknownTopicOrPartition)),
            ErrorKind::UnknownTopic
        );
        assert_eq!(
            ErrorKind::of_kafka(&e(C::TopicAuthorizationFailed)),
            ErrorKind::BrokerForbidden
        );
        assert_eq!(
            ErrorKind::of_kafka(&e(C::InvalidRecord)),
            ErrorKind::InvalidRecord
        );
        assert_eq!(
            ErrorKind::of_kafka(&e(C::NotEnoughReplicas)),
            ErrorKind::Unavailable
        );
        assert_eq!(
            ErrorKind::of_kafka(&e(C::PurgeQueue)),
            ErrorKind::ShuttingDown
        );
        assert_eq!(ErrorKind::of_kafka(&e(C::Fatal)), ErrorKind::Kafka);
    }

    #[test]
    fn a_failure_retrying_cannot_fix_outranks_one_it_can() {
        assert!(ErrorKind::InvalidRecord.severity() > ErrorKind::Unavailable.severity());
        assert!(ErrorKind::Kafka.severity() > ErrorKind::RecordTooLarge.severity());
        assert!(ErrorKind::Unavailable.severity() > ErrorKind::Saturated.severity());
    }
}
