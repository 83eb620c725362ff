//! Metric names, recorded through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! Install any recorder (Prometheus, StatsD, …) in your binary; without one, recording is a
//! no-op. Labels are of low cardinality: `topic` is the source topic, `tier` the retry tier
//! index, `reason` a [`DeadLetterReason`](crate::DeadLetterReason), `outcome` one of
//! `handled`, `retry`, `dead_letter`.

use metrics::{describe_counter, describe_histogram, Unit};

/// Records read from source and retry topics. Labels: `topic`.
pub const RECORDS_CONSUMED: &str = "sidetrack_records_consumed_total";
/// Key + payload bytes read. Labels: `topic`.
pub const BYTES_CONSUMED: &str = "sidetrack_bytes_consumed_total";
/// Records whose handler succeeded. Labels: `topic`.
pub const RECORDS_HANDLED: &str = "sidetrack_records_handled_total";
/// Records durably written to a retry tier. Labels: `topic`, `tier`.
pub const RETRIES_SCHEDULED: &str = "sidetrack_retries_scheduled_total";
/// Records durably written to the dead-letter topic. Labels: `topic`, `reason`.
pub const DEAD_LETTERED: &str = "sidetrack_dead_lettered_total";
/// Failed attempts to hand a record to a retry or dead-letter topic (each is retried).
/// Labels: `topic`.
pub const HANDOFF_FAILURES: &str = "sidetrack_handoff_failures_total";
/// Handler time, by outcome. Labels: `topic`, `outcome`.
pub const PROCESSING_SECONDS: &str = "sidetrack_processing_seconds";

/// Registers unit and help text for every metric. Called once when a runtime starts.
pub fn describe() {
    describe_counter!(
        RECORDS_CONSUMED,
        Unit::Count,
        "Records read from source and retry topics."
    );
    describe_counter!(BYTES_CONSUMED, Unit::Bytes, "Key and payload bytes read.");
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
        PROCESSING_SECONDS,
        Unit::Seconds,
        "Time spent in the handler, by outcome."
    );
}
