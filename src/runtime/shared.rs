//! The state every partition task of a runtime reads: its configuration, policy and topic
//! names, the hand-off producer, counters, alerts, the shutdown signal,
//! the watchdog and the breakers. Made once by [`Runtime::start`](super::Runtime::start) and
//! shared (an `Arc`) by every group, supervisor and task; read off the per-record path or
//! through plain field access.
//!
//! A file of its own (not `runtime/mod.rs`) so that the stages that read it depend on this
//! file and not on the runtime's public front, which depends on them. The erased handler is
//! not here: it names the partition task, which reads this file, so it is handed to each
//! group member and supervisor instead (no import circle).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::dead_letter::Alerts;
use crate::error::Error;
use crate::handler::Context;
use crate::outcome::Reason;
use crate::retry::{RetryPolicy, Topology};

use super::breaker::Breakers;
use super::producer::HandoffProducer;
use super::signal::Signal;
use super::watchdog::Watchdog;

/// State shared by every partition task.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) policy: RetryPolicy,
    pub(crate) topology: Topology,
    pub(crate) producer: HandoffProducer,
    /// Partition count of every source and side topic.
    pub(crate) partitions: HashMap<String, i32>,
    pub(crate) stats: Stats,
    pub(crate) alerts: Arc<Alerts>,
    pub(crate) shutdown: Signal,
    pub(crate) cx: Context,
    /// The fatal error that stopped the runtime, returned by
    /// [`RuntimeHandle::wait`](super::RuntimeHandle::wait).
    pub(crate) fatal: Mutex<Option<Error>>,
    /// Watches handler calls from a thread of its own (oldest-call gauge, blocking handlers).
    pub(crate) watchdog: Arc<Watchdog>,
    /// Every partition's dead-letter breaker, for the operator's commands.
    pub(crate) breakers: Arc<Breakers>,
}

impl Shared {
    /// Stops the runtime because of `error`, which
    /// [`RuntimeHandle::wait`](super::RuntimeHandle::wait) returns once the graceful stop is
    /// done. The first error wins.
    pub(crate) fn fail(&self, error: Error) {
        {
            let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
            if fatal.is_none() {
                tracing::error!(%error, "sidetrack runtime stopping");
                *fatal = Some(error);
            }
        }
        self.shutdown.cancel();
    }
}

/// Live counters; read them through [`RuntimeHandle::stats`](super::RuntimeHandle::stats).
pub(crate) struct Stats {
    consumed: AtomicU64,
    handled: AtomicU64,
    retried: Vec<AtomicU64>,
    dead_lettered: [AtomicU64; Reason::ALL.len()],
    handoff_failures: AtomicU64,
}

impl Stats {
    /// Zeroed counters for a policy of `tiers` retry tiers.
    pub(crate) fn new(tiers: usize) -> Self {
        Stats {
            consumed: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            retried: (0..tiers).map(|_| AtomicU64::new(0)).collect(),
            dead_lettered: Default::default(),
            handoff_failures: AtomicU64::new(0),
        }
    }

    pub(crate) fn consumed(&self, n: u64) {
        self.consumed.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn handled(&self, n: u64) {
        self.handled.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn retried(&self, tier: usize) {
        if let Some(c) = self.retried.get(tier) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub(crate) fn dead_lettered(&self, reason: Reason) {
        self.dead_lettered[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn handoff_failed(&self) {
        self.handoff_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            consumed: load(&self.consumed),
            handled: load(&self.handled),
            retried: self.retried.iter().map(load).collect(),
            dead_lettered: Reason::ALL
                .iter()
                .map(|r| (*r, load(&self.dead_lettered[r.index()])))
                .collect(),
            handoff_failures: load(&self.handoff_failures),
        }
    }
}

/// What a runtime did so far. Counts are of durable outcomes (a retry or dead letter counts
/// once the broker acknowledged it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Records read, from source and retry topics.
    pub consumed: u64,
    /// Records whose handler succeeded (on any attempt).
    pub handled: u64,
    /// Records written to each retry tier, by tier index.
    pub retried: Vec<u64>,
    /// Records written to the dead-letter topic, by reason.
    pub dead_lettered: Vec<(Reason, u64)>,
    /// Failed hand-off attempts (each was retried until it succeeded or was abandoned).
    pub handoff_failures: u64,
}

impl StatsSnapshot {
    /// Dead-lettered records for one reason.
    pub fn dead_lettered(&self, reason: Reason) -> u64 {
        self.dead_lettered
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }

    /// Dead-lettered records, all reasons.
    pub fn total_dead_lettered(&self) -> u64 {
        self.dead_lettered.iter().map(|(_, n)| n).sum()
    }

    /// Records written to any retry tier.
    pub fn total_retried(&self) -> u64 {
        self.retried.iter().sum()
    }
}
