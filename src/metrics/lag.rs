//! Consumer lag, sampled off the consume path.
//!
//! Reporting only: the offset state it reads ([`Progress`]) belongs to the runtime
//! (`runtime::partition::offsets`, with the at-least-once rule it serves). Every partition
//! task publishes the offset of the next record it has to handle (the record in
//! flight, or one past the last stored). A sampler per consumer asks the broker for the high
//! watermarks every `metrics.lag_interval`, on a blocking thread, and sets the gauges. Asking
//! the broker, rather than reading the watermark librdkafka cached from its last fetch, keeps
//! the lag right for paused partitions, which are not fetched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::runtime::partition::offsets::Progress;

/// Lag per (topic, partition) for the given partitions; blocking (network calls).
pub(crate) fn sample<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    partitions: &[((String, i32), Arc<Progress>)],
    timeout: Duration,
) -> HashMap<(String, i32), i64> {
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut unknown = TopicPartitionList::new();
    for ((topic, p), progress) in partitions {
        match progress.next_to_handle() {
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
