//! Metrics, recorded through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! Install any recorder in your binary (Prometheus, StatsD/Datadog, …), or set
//! [`MetricsConfig::listen`](crate::config::MetricsConfig::listen) to have sidetrack serve a
//! Prometheus `/metrics` endpoint itself. Without a recorder, recording costs next to nothing.
//!
//! Labels are of low cardinality: `group`, `topic` (a topic actually read: source or retry
//! tier), `source` (the source topic), `tier` (retry tier index), `reason`
//! ([`Reason`](crate::Reason)), `outcome` (`handled`, `retry`,
//! `dead_letter`), and `partition` only on per-partition gauges.
//!
//! `docs/monitoring.md` lists every metric with a suggested alert.

#[cfg(feature = "prometheus")]
mod exporter;
pub(crate) mod lag;

#[cfg(feature = "prometheus")]
pub use exporter::install_prometheus;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Offset lag of one partition: high watermark − next offset to handle. Labels: `group`,
/// `topic`, `partition`. Measured with a watermark query, so it is right for paused partitions.
///
/// A gauge. Suggested alert (from `docs/monitoring.md`): none of its own: alert on
/// [`CONSUMER_MAX_LAG`]; this one finds the hot partition.
pub const CONSUMER_LAG: &str = "sidetrack_consumer_lag";
/// Largest [`CONSUMER_LAG`] over the partitions of a topic this instance owns (the
/// `max_offset_lag` signal). Labels: `group`, `topic`.
///
/// A gauge. Suggested alert (from `docs/monitoring.md`): `max by (topic) (…{group="billing",
/// topic="orders"}) > 10000 for 10m`.
pub const CONSUMER_MAX_LAG: &str = "sidetrack_consumer_max_lag";
/// Records read. Labels: `group`, `topic`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `rate(…[5m]) == 0` while lag > 0
/// (stuck), as for [`BYTES_CONSUMED`].
pub const RECORDS_CONSUMED: &str = "sidetrack_records_consumed_total";
/// Key + payload bytes read; its rate is bytes/s. Labels: `group`, `topic`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `rate(…[5m]) == 0` while lag > 0
/// (stuck).
pub const BYTES_CONSUMED: &str = "sidetrack_bytes_consumed_total";
/// Latency from a record's timestamp. Labels: `topic`, `from`: `record` is receipt time −
/// timestamp of the record read (producer → consumer); `original`, for retried records only,
/// is the time the retry is handed to the handler − timestamp of the original record, so the
/// cost of retries shows.
///
/// A summary. Suggested alert (from `docs/monitoring.md`): `{from="record",quantile="0.99"} >
/// 30` for 10m.
pub const END_TO_END_SECONDS: &str = "sidetrack_end_to_end_latency_seconds";
/// Handler time, by outcome. Labels: `source`, `outcome`. A handler call that waits (returns
/// `Pending` at least once) is always timed; of the calls that return at once, one in 16 is
/// (the others cost no clock reads).
///
/// A summary. Suggested alert (from `docs/monitoring.md`): p99 of `handled` above your SLO.
pub const PROCESSING_SECONDS: &str = "sidetrack_processing_seconds";
/// Records whose handler succeeded. Labels: `source`.
pub const RECORDS_HANDLED: &str = "sidetrack_records_handled_total";
/// Records durably written to a retry tier. Labels: `source`, `tier`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): retry rate > 5% of consumed for 15m.
pub const RETRIES_SCHEDULED: &str = "sidetrack_retries_scheduled_total";
/// Records durably written to the dead-letter topic. Labels: `source`, `reason`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `increase(…[5m]) > 0` (page per
/// reason as you see fit).
pub const DEAD_LETTERED: &str = "sidetrack_dead_lettered_total";
/// Failed attempts to hand a record to a retry or dead-letter topic (each is retried).
/// Labels: `source`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `increase(…[5m]) > 0`: the partition
/// is not moving.
pub const HANDOFF_FAILURES: &str = "sidetrack_handoff_failures_total";
/// Time a retried record was handled after its due time. Labels: `topic`.
///
/// A summary. Suggested alert (from `docs/monitoring.md`): p99 > 5 (retry consumer overloaded).
pub const RETRY_LATENESS_SECONDS: &str = "sidetrack_retry_lateness_seconds";
/// Partitions paused right now (retry records not yet due, or a failing hand-off).
/// Labels: `group`.
///
/// A gauge. Suggested alert (from `docs/monitoring.md`): on the main group: `> 0 for 5m`.
pub const PARTITIONS_PAUSED: &str = "sidetrack_partitions_paused";
/// Handler calls running right now. Labels: `group`.
pub const RECORDS_IN_FLIGHT: &str = "sidetrack_records_in_flight";
/// Handler calls running right now in one partition (at most `max_in_flight`; 1 in
/// `partition` ordering). Labels: `group`, `topic`, `partition`.
pub const PARTITION_IN_FLIGHT: &str = "sidetrack_partition_in_flight";
/// Records of one partition waiting behind a record of the same key (`key` ordering).
/// Labels: `group`, `topic`, `partition`.
pub const PARTITION_WAITING: &str = "sidetrack_partition_waiting";
/// Records of one partition with a durable outcome but past the committed frontier, because an
/// earlier record is still in flight (or its hand-off unacknowledged). Labels: `group`,
/// `topic`, `partition`.
pub const PARTITION_FRONTIER_LAG: &str = "sidetrack_partition_frontier_lag";
/// Partition tasks that ended unexpectedly (a panic outside the handler, or an error the
/// task cannot get past) and were restarted by their supervisor. Labels: `group`, `topic`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `increase(…[5m]) > 0` (the log line
/// says why).
pub const PARTITION_TASK_FAILURES: &str = "sidetrack_partition_task_failures_total";
/// Handler calls cancelled at their time limit (`handler_timeout`, or the handler's own
/// [`Handler::timeout`](crate::Handler::timeout)): the call's future was dropped and the record
/// went to its retry tier (or the DLQ) as a retryable failure. Labels: `group`, `topic`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `rate(…[10m]) > 0`: a dependency
/// hangs.
pub const HANDLER_TIMEOUTS: &str = "sidetrack_handler_timeouts_total";
/// Age of the oldest handler call running in one partition (0 when none runs), updated every
/// half second. A value that keeps growing is a stuck call. Labels: `group`, `topic`,
/// `partition`.
///
/// A gauge. Suggested alert (from `docs/monitoring.md`): `> 10` (`handler_warn_after`) for 5m.
pub const HANDLER_OLDEST_CALL_SECONDS: &str = "sidetrack_handler_oldest_call_seconds";
/// Handler calls that blocked their thread: one poll of the handler's future did not return
/// for `handler_blocking_after` (`std::thread::sleep`, a blocking client, long computation
/// between `.await`s). Such a call cannot be cancelled; each is also logged at ERROR.
/// Labels: `group`, `topic`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `increase(…[5m]) > 0`: fix the
/// handler (spawn_blocking).
pub const HANDLER_BLOCKING: &str = "sidetrack_handler_blocking_total";
/// Fatal errors raised by a Kafka client (`client` = `producer` or `consumer`). A fatal
/// producer error replaces the hand-off producer; a fatal consumer error stops the runtime with
/// an error.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): `increase(…[5m]) > 0`.
pub const CLIENT_FATAL_ERRORS: &str = "sidetrack_client_fatal_errors_total";
/// Dead-letter alerts a notifier failed to deliver (timeout or error). Labels: `notifier`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): failures `> 0` for 15m.
pub const ALERT_FAILURES: &str = "sidetrack_alert_failures_total";
/// Dead-letter alerts delivered. Labels: `notifier`.
///
/// A counter. Suggested alert (from `docs/monitoring.md`): on [`ALERT_FAILURES`], `> 0` for 15m.
pub const ALERTS_SENT: &str = "sidetrack_alerts_sent_total";

/// 1 while the dead-letter flood breaker of a partition holds it (open, or half-open until the
/// record tried has an outcome), else 0. Labels: `group`, `topic`, `partition`.
///
/// A gauge. Suggested alert (from `docs/monitoring.md`): `== 1`: a partition is not consuming
/// by design; fix and `close_breaker`.
pub const DEAD_LETTER_BREAKER_OPEN: &str = "sidetrack_dead_letter_breaker_open";
/// Times a dead-letter flood breaker opened (tripped while closed, or opened again because
/// the record tried half-open was dead-lettered). Labels: `group`, `topic`.
pub const DEAD_LETTER_BREAKER_TRIPS: &str = "sidetrack_dead_letter_breaker_trips_total";

/// Keys of a source partition waiting behind a head on a retry tier (`keep_key_order`).
/// Labels: `group`, `topic`, `partition`.
pub const KEY_ORDER_WAITING_KEYS: &str = "sidetrack_key_order_waiting_keys";
/// Records of a source partition held behind their key's head and read back from its
/// key-order log, in memory (`keep_key_order`). Labels: `group`, `topic`, `partition`.
pub const KEY_ORDER_HELD_RECORDS: &str = "sidetrack_key_order_held_records";
/// Seconds the oldest waiting key of a partition has waited (0 when none waits).
/// Labels: `group`, `topic`, `partition`.
pub const KEY_ORDER_OLDEST_WAIT_SECONDS: &str = "sidetrack_key_order_oldest_wait_seconds";
/// Records held behind a key (appended to its key-order log instead of being handled).
/// Labels: `group`, `topic`.
pub const KEY_ORDER_HELD: &str = "sidetrack_key_order_held_total";
/// Times a key-order cap acted. Labels: `group`, `topic`, `cap` (`waiting_keys`: intake
/// paused; `held_per_key`: a record dead-lettered as `key-order-full`; `key_wait`: a head
/// dead-lettered as `key-order-timeout`).
pub const KEY_ORDER_CAP_REACHED: &str = "sidetrack_key_order_cap_reached_total";

/// Registers unit and help text for every metric. Called when a runtime starts.
pub fn describe() {
    describe_gauge!(
        KEY_ORDER_WAITING_KEYS,
        Unit::Count,
        "Keys waiting behind a head on a retry tier, per partition (keep_key_order)."
    );
    describe_gauge!(
        KEY_ORDER_HELD_RECORDS,
        Unit::Count,
        "Records held behind their key's head and read back from the key-order log, per partition."
    );
    describe_gauge!(
        KEY_ORDER_OLDEST_WAIT_SECONDS,
        Unit::Seconds,
        "How long the oldest waiting key of a partition has waited."
    );
    describe_counter!(
        KEY_ORDER_HELD,
        Unit::Count,
        "Records held behind their key (appended to the key-order log)."
    );
    describe_counter!(
        KEY_ORDER_CAP_REACHED,
        Unit::Count,
        "Times a key-order cap acted, by cap."
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "High watermark minus the next offset to handle, per partition."
    );
    describe_gauge!(
        CONSUMER_MAX_LAG,
        Unit::Count,
        "Largest partition lag of a topic on this instance."
    );
    describe_counter!(RECORDS_CONSUMED, Unit::Count, "Records read.");
    describe_counter!(
        BYTES_CONSUMED,
        Unit::Bytes,
        "Key and payload bytes read; rate() gives bytes/s."
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Receipt time minus record timestamp (from=record) or original record timestamp (from=original)."
    );
    describe_histogram!(
        PROCESSING_SECONDS,
        Unit::Seconds,
        "Time spent in the handler, by outcome."
    );
    describe_counter!(
        RECORDS_HANDLED,
        Unit::Count,
        "Records whose handler succeeded."
    );
    describe_counter!(
        RETRIES_SCHEDULED,
        Unit::Count,
        "Records acknowledged on a retry tier topic."
    );
    describe_counter!(
        DEAD_LETTERED,
        Unit::Count,
        "Records acknowledged on the dead-letter topic."
    );
    describe_counter!(
        HANDOFF_FAILURES,
        Unit::Count,
        "Failed produce attempts to a retry or dead-letter topic (retried until they succeed)."
    );
    describe_histogram!(
        RETRY_LATENESS_SECONDS,
        Unit::Seconds,
        "How long after its due time a retried record was handled."
    );
    describe_gauge!(
        PARTITIONS_PAUSED,
        Unit::Count,
        "Partitions paused right now."
    );
    describe_gauge!(
        RECORDS_IN_FLIGHT,
        Unit::Count,
        "Handler calls running right now."
    );
    describe_gauge!(
        PARTITION_IN_FLIGHT,
        Unit::Count,
        "Handler calls running now in one partition."
    );
    describe_gauge!(
        PARTITION_WAITING,
        Unit::Count,
        "Records waiting behind a record of the same key in one partition."
    );
    describe_gauge!(
        PARTITION_FRONTIER_LAG,
        Unit::Count,
        "Records done but past the committed frontier of one partition."
    );
    describe_counter!(
        PARTITION_TASK_FAILURES,
        Unit::Count,
        "Partition tasks that ended unexpectedly and were restarted."
    );
    describe_counter!(
        HANDLER_TIMEOUTS,
        Unit::Count,
        "Handler calls cancelled at their time limit and sent to their retry tier or the DLQ."
    );
    describe_gauge!(
        HANDLER_OLDEST_CALL_SECONDS,
        Unit::Seconds,
        "Age of the oldest handler call running in one partition."
    );
    describe_counter!(
        HANDLER_BLOCKING,
        Unit::Count,
        "Handler calls that blocked their thread (one poll longer than handler_blocking_after)."
    );
    describe_counter!(
        CLIENT_FATAL_ERRORS,
        Unit::Count,
        "Fatal errors raised by a Kafka client."
    );
    describe_counter!(
        ALERT_FAILURES,
        Unit::Count,
        "Dead-letter alerts a notifier failed to deliver."
    );
    describe_counter!(ALERTS_SENT, Unit::Count, "Dead-letter alerts delivered.");
    describe_gauge!(
        DEAD_LETTER_BREAKER_OPEN,
        Unit::Count,
        "1 while a partition is paused by its dead-letter flood breaker."
    );
    describe_counter!(
        DEAD_LETTER_BREAKER_TRIPS,
        Unit::Count,
        "Times a dead-letter flood breaker opened."
    );
}

// ---- HTTP produce proxy (feature `proxy`) -------------------------------------------------
// Labels: `route` (the route template, e.g. `/topics/{topic}`), `status`, `topic` (`-` until
// the topic is known to exist and be allowed, so invented names add no series), `outcome`
// (`acknowledged`, `failed`), `reason` (the error kind, the `reason` values in `docs/proxy.md`).

/// HTTP requests answered. Labels: `route`, `status`, `topic`.
pub const PROXY_REQUESTS: &str = "sidetrack_proxy_requests_total";
/// Time from request to answer. Labels: `route`.
pub const PROXY_REQUEST_SECONDS: &str = "sidetrack_proxy_request_seconds";
/// Time from the first record queued to the last settled, per produce request.
pub const PROXY_PRODUCE_SECONDS: &str = "sidetrack_proxy_produce_seconds";
/// Records per produce request.
pub const PROXY_REQUEST_RECORDS: &str = "sidetrack_proxy_request_records";
/// Records produced. Labels: `topic`, `outcome`.
pub const PROXY_RECORDS: &str = "sidetrack_proxy_records_total";
/// Key + value + header bytes of produce requests that reached the producer. Labels: `topic`.
pub const PROXY_BYTES: &str = "sidetrack_proxy_bytes_total";
/// Records admitted and not yet settled (bounded by `max_in_flight_records`).
pub const PROXY_IN_FLIGHT_RECORDS: &str = "sidetrack_proxy_in_flight_records";
/// Bytes admitted and not yet settled (bounded by `max_in_flight_bytes`).
pub const PROXY_IN_FLIGHT_BYTES: &str = "sidetrack_proxy_in_flight_bytes";
/// HTTP requests being handled now.
pub const PROXY_REQUESTS_IN_FLIGHT: &str = "sidetrack_proxy_requests_in_flight";
/// Requests not answered 200, by reason. Labels: `reason`.
pub const PROXY_REJECTIONS: &str = "sidetrack_proxy_rejections_total";
/// Average records per broker batch over librdkafka's last statistics window. Labels: `topic`.
pub const PROXY_BROKER_BATCH_RECORDS: &str = "sidetrack_proxy_broker_batch_records";
/// Average bytes per broker batch over librdkafka's last statistics window. Labels: `topic`.
pub const PROXY_BROKER_BATCH_BYTES: &str = "sidetrack_proxy_broker_batch_bytes";

/// Client connections open now (bounded by `max_connections`).
pub const PROXY_CONNECTIONS_OPEN: &str = "sidetrack_proxy_connections";
/// Open connections not proven yet: no valid token (auth on) or no complete request head (auth
/// off); bounded by `max_unproven_connections`.
pub const PROXY_CONNECTIONS_UNPROVEN: &str = "sidetrack_proxy_connections_unproven";
/// Client connections closed, by reason. Labels: `reason` (one of the `CLOSE_*` values).
pub const PROXY_CONNECTIONS_CLOSED: &str = "sidetrack_proxy_connections_closed_total";
/// `reason` of [`PROXY_CONNECTIONS_CLOSED`]: no complete request head (TLS handshake
/// included) within `head_timeout` of the connection (or, on HTTP/1, of the head's first byte).
pub const CLOSE_HEAD_TIMEOUT: &str = "head_timeout";
/// `reason`: no request in progress (HTTP/2: no open stream) for `idle_timeout`.
pub const CLOSE_IDLE_TIMEOUT: &str = "idle_timeout";
/// `reason`: answers were ready and none was taken by the client for `idle_timeout` (it
/// stopped reading, e.g. an HTTP/2 flow-control window kept shut).
pub const CLOSE_STALLED: &str = "stalled";
/// `reason`: an unproven connection closed to make room for a new connection (the unproven
/// share or every slot was taken).
pub const CLOSE_UNPROVEN_EVICTED: &str = "unproven_evicted";
/// `reason`: the TLS handshake failed.
pub const CLOSE_TLS_FAILED: &str = "tls_failed";
/// `reason`: closed by the proxy's graceful shutdown.
pub const CLOSE_SHUTDOWN: &str = "shutdown";
/// `reason`: ended by the client or by the protocol (`Connection: close`, GOAWAY, an HTTP/2
/// keep-alive ping left unanswered past `http2_keep_alive_timeout`).
pub const CLOSE_CLIENT: &str = "closed";
/// `reason`: ended with an I/O or protocol error (malformed request, reset).
pub const CLOSE_ERROR: &str = "error";

/// Registers unit and help text for the proxy's metrics. Called when a proxy starts.
pub fn describe_proxy() {
    describe_counter!(
        PROXY_REQUESTS,
        Unit::Count,
        "HTTP requests answered, by route, status and topic."
    );
    describe_histogram!(
        PROXY_REQUEST_SECONDS,
        Unit::Seconds,
        "Time from request to answer."
    );
    describe_histogram!(
        PROXY_PRODUCE_SECONDS,
        Unit::Seconds,
        "Time from the first record of a request queued to the last acknowledged or failed."
    );
    describe_histogram!(
        PROXY_REQUEST_RECORDS,
        Unit::Count,
        "Records per produce request."
    );
    describe_counter!(
        PROXY_RECORDS,
        Unit::Count,
        "Records produced, by topic and outcome."
    );
    describe_counter!(
        PROXY_BYTES,
        Unit::Bytes,
        "Key, value and header bytes of produce requests."
    );
    describe_gauge!(
        PROXY_IN_FLIGHT_RECORDS,
        Unit::Count,
        "Records admitted and not yet settled."
    );
    describe_gauge!(
        PROXY_IN_FLIGHT_BYTES,
        Unit::Bytes,
        "Bytes admitted and not yet settled."
    );
    describe_gauge!(
        PROXY_REQUESTS_IN_FLIGHT,
        Unit::Count,
        "HTTP requests being handled now."
    );
    describe_counter!(
        PROXY_REJECTIONS,
        Unit::Count,
        "Requests not answered 200, by reason."
    );
    describe_gauge!(
        PROXY_BROKER_BATCH_RECORDS,
        Unit::Count,
        "Average records per broker batch (librdkafka statistics)."
    );
    describe_gauge!(
        PROXY_CONNECTIONS_OPEN,
        Unit::Count,
        "Client connections open now."
    );
    describe_gauge!(
        PROXY_CONNECTIONS_UNPROVEN,
        Unit::Count,
        "Open connections without a valid token (auth on) or a complete request head (auth off) yet."
    );
    describe_counter!(
        PROXY_CONNECTIONS_CLOSED,
        Unit::Count,
        "Client connections closed, by reason."
    );
    describe_gauge!(
        PROXY_BROKER_BATCH_BYTES,
        Unit::Bytes,
        "Average bytes per broker batch (librdkafka statistics)."
    );
}
// ---- end of HTTP produce proxy ------------------------------------------------------------
