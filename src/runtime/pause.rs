//! Pausing one partition for as long as any reason to pause it lasts.
//!
//! librdkafka's pause is a flag, not a count: a retry record waiting for its due time and a
//! hand-off failing beside it would resume each other's pause. Every reason takes a
//! [`PauseHold`]; the partition is paused when the first one is taken and resumed when the last
//! one is dropped. Dropping the holds (also when a task is revoked, stopped or panics) keeps the
//! `sidetrack_partitions_paused` gauge true.

use std::sync::{Arc, Mutex};

use rdkafka::consumer::Consumer;
use rdkafka::TopicPartitionList;

use super::consumer::GroupConsumer;
use crate::metrics as m;

/// The pause state of one partition.
pub(crate) struct Pause {
    /// The consumer that owns the partition: pausing is a call on it.
    consumer: Arc<GroupConsumer>,
    /// The partition's topic (shared with its task).
    topic: Arc<str>,
    /// The partition paused and resumed.
    partition: i32,
    /// [`m::PARTITIONS_PAUSED`] of the group: +1 on each pause, -1 on each resume, so it counts
    /// paused partitions across every task of the group.
    gauge: metrics::Gauge,
    /// Reasons to stay paused right now. A mutex, not an atomic: pausing or resuming must
    /// happen in the same order as the count changes.
    holds: Mutex<u32>,
}

/// One reason to keep a partition paused; see [`Pause::hold`].
pub(crate) struct PauseHold<'a>(&'a Pause);

impl Pause {
    /// The pause state of `topic`/`partition` on `consumer`, not paused, counted in `group`'s
    /// gauge.
    pub(crate) fn new(
        consumer: Arc<GroupConsumer>,
        topic: Arc<str>,
        partition: i32,
        group: &str,
    ) -> Self {
        Pause {
            consumer,
            topic,
            partition,
            gauge: metrics::gauge!(m::PARTITIONS_PAUSED, "group" => group.to_owned()),
            holds: Mutex::new(0),
        }
    }

    /// Pauses the partition (if it is not paused already) until the returned hold, and every
    /// other one, is dropped.
    pub(crate) fn hold(&self) -> PauseHold<'_> {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        if *holds == 0 {
            self.set(true);
        }
        *holds = holds.saturating_add(1);
        PauseHold(self)
    }

    /// Drops one hold; resumes the partition when it was the last.
    fn release(&self) {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        *holds = holds.saturating_sub(1);
        if *holds == 0 {
            self.set(false);
        }
    }

    /// Pauses or resumes the partition on the consumer and moves the gauge. A failure (the
    /// partition was revoked meanwhile) is logged at `DEBUG`: there is nothing left to pause.
    fn set(&self, paused: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        let result = if paused {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        // Counted whatever librdkafka answered: a revoked partition cannot be resumed, but it
        // is no longer paused by us either.
        self.gauge.increment(if paused { 1.0 } else { -1.0 });
        if let Err(e) = result {
            tracing::debug!(topic = %self.topic, partition = self.partition, paused, error = %e, "pause/resume failed");
        }
    }
}

impl Drop for PauseHold<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}
