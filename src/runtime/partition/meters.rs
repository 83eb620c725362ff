//! The partition task's metric handles, and the counts it publishes in batches.
//!
//! A stage of its own because every other stage writes to it: handles are registered once per
//! task (label strings are allocated here, never per record), so the per-record path only
//! increments a handle or adds to a local [`Batch`], which the task publishes when its queue
//! runs dry and every `FLUSH_EVERY` records. The group-wide in-flight gauge is moved by
//! differences, so several tasks can share it; a task that ends takes its share back
//! ([`Meters`]' `Drop`).

use std::sync::atomic::{AtomicI64, Ordering};

use crate::metrics as m;
use crate::runtime::breaker::Breaker;

/// Counts kept locally and published in batches (see `FLUSH_EVERY`).
#[derive(Default)]
pub(crate) struct Batch {
    /// Records taken since the last flush, for [`m::RECORDS_CONSUMED`].
    pub(crate) consumed: u64,
    /// Key + payload bytes of those records, for [`m::BYTES_CONSUMED`].
    pub(crate) bytes: u64,
    /// Records whose handler succeeded since the last flush, for [`m::RECORDS_HANDLED`].
    pub(crate) handled: u64,
    /// Records taken since the last flush.
    pub(crate) since_flush: u32,
    /// The wall clock, read once per batch (end-to-end latency, due checks).
    pub(crate) now: i64,
    /// The dead-letter breaker, kept here beside the counts: the task alone drives it.
    pub(crate) breaker: Breaker,
}

/// Metrics of records read from a retry tier.
pub(crate) struct RetryMeters {
    /// [`m::END_TO_END_SECONDS`] with `from="original"`: hand-over to the handler minus the
    /// original record's timestamp (from the envelope), the whole cost of the retries.
    pub(crate) e2e_original: metrics::Histogram,
    /// [`m::RETRY_LATENESS_SECONDS`]: handled time minus due time, never negative.
    pub(crate) lateness: metrics::Histogram,
}

/// The metric handles of one partition task's intake and offsets (the call stage has its own,
/// [`CallMeters`]).
pub(crate) struct Meters {
    /// [`m::RECORDS_CONSUMED`], labels `group`, `topic`; incremented by [`Batch::consumed`].
    pub(crate) consumed: metrics::Counter,
    /// [`m::BYTES_CONSUMED`], labels `group`, `topic`.
    pub(crate) bytes: metrics::Counter,
    /// [`m::END_TO_END_SECONDS`] with `from="record"`: receipt minus the record's timestamp.
    pub(crate) e2e_record: metrics::Histogram,
    /// Only on retry tier partitions.
    pub(crate) retry: Option<RetryMeters>,
    /// [`m::RECORDS_IN_FLIGHT`], shared by every task of the group: moved only by differences
    /// (see `published_in_flight`), never set.
    in_flight: metrics::Gauge,
    /// [`m::PARTITION_IN_FLIGHT`]: handler calls running in this partition.
    partition_in_flight: metrics::Gauge,
    /// [`m::PARTITION_WAITING`]: records waiting behind a busy key (`key` ordering).
    partition_waiting: metrics::Gauge,
    /// [`m::PARTITION_FRONTIER_LAG`]: records done but ahead of the frontier.
    partition_frontier_lag: metrics::Gauge,
    /// What was last added to the group's in-flight gauge.
    published_in_flight: AtomicI64,
    /// [`m::RECORDS_HANDLED`], label `source`; incremented by [`Batch::handled`].
    pub(crate) handled: metrics::Counter,
}

impl Meters {
    /// Registers the handles of the task reading `topic`/`partition` for `group`; `source` is
    /// the source topic it belongs to (itself, or the source of a retry tier).
    pub(crate) fn new(
        group: &str,
        topic: &str,
        partition: i32,
        source: &str,
        retry_tier: bool,
    ) -> Self {
        let (g, t, s) = (group.to_owned(), topic.to_owned(), source.to_owned());
        let p = partition.to_string();
        let per_partition = |name: &'static str| metrics::gauge!(name, "group" => g.clone(), "topic" => t.clone(), "partition" => p.clone());
        Meters {
            consumed: metrics::counter!(m::RECORDS_CONSUMED, "group" => g.clone(), "topic" => t.clone()),
            bytes: metrics::counter!(m::BYTES_CONSUMED, "group" => g.clone(), "topic" => t.clone()),
            e2e_record: metrics::histogram!(m::END_TO_END_SECONDS, "topic" => t.clone(), "from" => "record"),
            retry: retry_tier.then(|| RetryMeters {
                e2e_original: metrics::histogram!(m::END_TO_END_SECONDS, "topic" => t.clone(), "from" => "original"),
                lateness: metrics::histogram!(m::RETRY_LATENESS_SECONDS, "topic" => t.clone()),
            }),
            partition_in_flight: per_partition(m::PARTITION_IN_FLIGHT),
            partition_waiting: per_partition(m::PARTITION_WAITING),
            partition_frontier_lag: per_partition(m::PARTITION_FRONTIER_LAG),
            in_flight: metrics::gauge!(m::RECORDS_IN_FLIGHT, "group" => g.clone()),
            published_in_flight: AtomicI64::new(0),
            handled: metrics::counter!(m::RECORDS_HANDLED, "source" => s.clone()),
        }
    }

    /// Sets the per-partition gauges, and moves the group's in-flight gauge by the change.
    pub(crate) fn publish(&self, in_flight: usize, waiting: usize, frontier_lag: usize) {
        let now = in_flight as i64;
        let before = self.published_in_flight.swap(now, Ordering::Relaxed);
        if now != before {
            self.in_flight.increment((now - before) as f64);
        }
        self.partition_in_flight.set(in_flight as f64);
        self.partition_waiting.set(waiting as f64);
        self.partition_frontier_lag.set(frontier_lag as f64);
    }
}

impl Drop for Meters {
    /// A task that ends leaves nothing in flight behind in the gauges.
    fn drop(&mut self) {
        self.publish(0, 0, 0);
    }
}

/// The metric handles of the call stage (see `call`): how long calls took by outcome, and
/// how many hit their time limit.
pub(crate) struct CallMeters {
    /// [`m::PROCESSING_SECONDS`] with `outcome="handled"`.
    pub(crate) processing_handled: metrics::Histogram,
    /// [`m::PROCESSING_SECONDS`] with `outcome="retry"`: the call failed and the record goes
    /// to a tier.
    pub(crate) processing_retry: metrics::Histogram,
    /// [`m::PROCESSING_SECONDS`] with `outcome="dead_letter"`.
    pub(crate) processing_dead_letter: metrics::Histogram,
    /// [`m::HANDLER_TIMEOUTS`]: calls cancelled at their time limit, labels `group`, `topic`.
    pub(crate) timeouts: metrics::Counter,
}

impl CallMeters {
    /// Registers the handles of the task reading `topic` for `group`, from source `source`.
    pub(crate) fn new(group: &str, topic: &str, source: &str) -> Self {
        let processing = |outcome: &'static str| metrics::histogram!(m::PROCESSING_SECONDS, "source" => source.to_owned(), "outcome" => outcome);
        CallMeters {
            processing_handled: processing("handled"),
            processing_retry: processing("retry"),
            processing_dead_letter: processing("dead_letter"),
            timeouts: metrics::counter!(m::HANDLER_TIMEOUTS, "group" => group.to_owned(), "topic" => topic.to_owned()),
        }
    }

    /// Handles that record nothing: for callers outside a runtime (the test kit), which must
    /// not add series to an application's metrics.
    pub(crate) fn noop() -> Self {
        CallMeters {
            processing_handled: metrics::Histogram::noop(),
            processing_retry: metrics::Histogram::noop(),
            processing_dead_letter: metrics::Histogram::noop(),
            timeouts: metrics::Counter::noop(),
        }
    }
}
