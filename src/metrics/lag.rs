//! Consumer lag, sampled off the consume path.
//!
//! Every partition task publishes the offset of the next record it has to handle (the record in
//! flight, or one past the last stored). A sampler per consumer asks the broker for the high
//! watermarks every `metrics.lag_interval`, on a blocking thread, and sets the gauges. Asking
//! the broker, rather than reading the watermark librdkafka cached from its last fetch, keeps
//! the lag right for paused partitions, which are not fetched.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

/// Where one partition task is: the offset of the record it is on (`-1` until it has seen
/// one), and the last offset the group committed for it (`-1` until known).
#[derive(Debug)]
pub(crate) struct Progress {
    at: AtomicI64,
    committed: AtomicI64,
    /// The next offset to handle as far as stored offsets go (`-1`: nothing stored yet): where
    /// a restarted task starts again.
    stored: AtomicI64,
    /// The first offset taken in this assignment (`-1`: none yet).
    first: AtomicI64,
    /// The last offset of the durable prefix (`-1`: none yet), published by the task as the
    /// frontier moves; the rebalance hook stores it before the partition is let go (the task
    /// stores in batches).
    durable: AtomicI64,
}

impl Progress {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Progress {
            at: AtomicI64::new(-1),
            committed: AtomicI64::new(-1),
            stored: AtomicI64::new(-1),
            first: AtomicI64::new(-1),
            durable: AtomicI64::new(-1),
        })
    }
    /// Everything up to and including `offset` has a durable outcome.
    pub(crate) fn durable_through(&self, offset: i64) {
        self.durable.store(offset, Ordering::Relaxed);
    }
    /// The last offset of the durable prefix, if any.
    pub(crate) fn durable(&self) -> Option<i64> {
        let d = self.durable.load(Ordering::Relaxed);
        (d >= 0).then_some(d)
    }
    /// The record at `offset` (and everything before it) is stored as handled.
    pub(crate) fn stored(&self, offset: i64) {
        self.stored
            .fetch_max(offset.saturating_add(1), Ordering::Relaxed);
    }
    /// Where a task restarted for this partition starts: one past the last stored record, or
    /// the first record taken in this assignment; `None` if no record was taken yet (the
    /// consumer's position is then still right).
    pub(crate) fn restart_from(&self) -> Option<i64> {
        let stored = self.stored.load(Ordering::Relaxed);
        let first = self.first.load(Ordering::Relaxed);
        (stored >= 0 || first >= 0).then_some(stored.max(first))
    }
    /// The record at `offset` is now the one to finish.
    pub(crate) fn at(&self, offset: i64) {
        // The first record of an assignment sits at the committed position. Checked with a
        // plain load first: this runs on every record, and a failing compare-exchange still
        // takes the cache line exclusively.
        if self.first.load(Ordering::Relaxed) < 0 {
            let _ = self
                .first
                .compare_exchange(-1, offset, Ordering::Relaxed, Ordering::Relaxed);
            let _ =
                self.committed
                    .compare_exchange(-1, offset, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.at.store(offset, Ordering::Relaxed);
    }
    /// The group committed `offset` (the next record to handle) for this partition.
    pub(crate) fn committed(&self, offset: i64) {
        self.committed.fetch_max(offset, Ordering::Relaxed);
    }
    /// Records taken past the durable frontier, not counting the one being handled: never
    /// stored, so handled again by the next owner even if the commit at revocation succeeds.
    pub(crate) fn unstored(&self) -> i64 {
        let at = self.at.load(Ordering::Relaxed);
        let durable = self.durable.load(Ordering::Relaxed);
        let first = self.first.load(Ordering::Relaxed);
        let base = if durable >= 0 {
            durable.saturating_add(1)
        } else {
            first
        };
        if at < 0 || base < 0 {
            return 0;
        }
        at.saturating_sub(base).max(0)
    }
    /// Records from the committed offset up to and including the one being handled: what the
    /// partition's next owner handles again if this member loses it now.
    pub(crate) fn uncommitted(&self) -> i64 {
        self.since(&self.committed)
            .map_or(0, |d| d.saturating_add(1).max(0))
    }
    /// How far the task is past `start` (`None` while either is unknown, `-1`).
    fn since(&self, start: &AtomicI64) -> Option<i64> {
        let (at, start) = (
            self.at.load(Ordering::Relaxed),
            start.load(Ordering::Relaxed),
        );
        (at >= 0 && start >= 0).then_some(at.saturating_sub(start))
    }
    /// The next offset to handle, for lag: one past the durable frontier (records in a handler
    /// call, waiting, or handed off but unacknowledged still count), or the record taken.
    fn get(&self) -> Option<i64> {
        let durable = self.durable.load(Ordering::Relaxed);
        if durable >= 0 {
            return Some(durable.saturating_add(1));
        }
        let v = self.at.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }
}

/// Lag per (topic, partition) for the given partitions; blocking (network calls).
pub(crate) fn sample<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    partitions: &[((String, i32), Arc<Progress>)],
    timeout: Duration,
) -> HashMap<(String, i32), i64> {
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut unknown = TopicPartitionList::new();
    for ((topic, p), progress) in partitions {
        match progress.get() {
            Some(o) => {
                next.insert((topic.clone(), *p), o);
            }
            None => {
                unknown.add_partition(topic, *p);
            }
        }
    }
    if unknown.count() > 0 {
        // Nothing seen yet: the group's committed offset is where handling will start.
        if let Ok(committed) = consumer.committed_offsets(unknown, timeout) {
            for e in committed.elements() {
                let o = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                };
                next.insert((e.topic().to_owned(), e.partition()), o);
            }
            // Dropped here, before the consumer can be: a list that outlives its consumer can
            // hang the consumer's drop.
            drop(committed);
        }
    }
    let mut lag = HashMap::new();
    for ((topic, p), from) in next {
        if let Ok((low, high)) = consumer.fetch_watermarks(&topic, p, timeout) {
            let start = if from < 0 { low } else { from.max(low) };
            lag.insert((topic, p), high.saturating_sub(start).max(0));
        }
    }
    lag
}

/// Sets the gauges for one sample: per partition, and the max per topic (0 for a subscribed
/// topic of which this instance owns no partition).
pub(crate) fn publish(group: &str, topics: &[String], lag: &HashMap<(String, i32), i64>) {
    let mut max: HashMap<&str, i64> = topics.iter().map(|t| (t.as_str(), 0)).collect();
    for ((topic, p), l) in lag {
        metrics::gauge!(super::CONSUMER_LAG, "group" => group.to_owned(), "topic" => topic.clone(), "partition" => p.to_string())
            .set(*l as f64);
        let m = max.entry(topic.as_str()).or_insert(0);
        *m = (*m).max(*l);
    }
    for (topic, l) in max {
        metrics::gauge!(super::CONSUMER_MAX_LAG, "group" => group.to_owned(), "topic" => topic.to_owned())
            .set(l as f64);
    }
}

/// Zeroes the gauge of a partition this instance no longer owns.
pub(crate) fn forget(group: &str, topic: &str, partition: i32) {
    metrics::gauge!(super::CONSUMER_LAG, "group" => group.to_owned(), "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(0.0);
}
