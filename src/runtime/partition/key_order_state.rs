//! The key-order stage's state (`[retry] keep_key_order`): what a source partition task keeps
//! for it — the pure state model behind a lock, the log reader, the held records' caller and
//! metric handles — and what a retry tier partition keeps (its source's log, `max_key_wait`).
//!
//! Separate from the stage's steps (`key_order.rs`, which are methods of the partition task):
//! the task holds this state as a field, so it must sit below the task in the partition's
//! files, while the steps sit above it (no import circle).

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::config::{Config, OnDeadLetter};
use crate::key_order::log::LogReader;
use crate::key_order::state::{AfterDeadLetter, Caps, KeyOrder, Next};
use crate::key_order::wire::HeldRecord;
use crate::metrics as m;
use crate::retry::scheduler::now_ms;
use crate::runtime::handoff::Abandoned;

use super::call::Caller;
use super::offsets::{Frontier, Seq};

/// A held record as the state keeps it: where it is in the log, and the record itself.
#[derive(Debug)]
pub(crate) struct Held {
    pub(super) log_seq: Seq,
    pub(super) key: Vec<u8>,
    pub(super) record: HeldRecord,
}

/// A held record's run (or dead letter) ended: its log position is done (or the task ends),
/// and maybe the next record of its key may run.
pub(crate) struct HeldEnd {
    pub(super) log_seq: Seq,
    /// Whether its log position is done now (not when it became its key's head: then it is
    /// done when the head's release is read).
    pub(super) done: bool,
    pub(super) result: Result<Option<Next<Held>>, Abandoned>,
}

/// A held record's run in flight.
pub(crate) type HeldFuture<'a> = Pin<Box<dyn std::future::Future<Output = HeldEnd> + Send + 'a>>;

/// What the stage says about a source record about to start.
pub(crate) enum Routed {
    /// Run it (the key is free, or it is its key's own head read again).
    Run,
    /// Append it to the log behind `head` instead.
    Hold(i64),
    /// Its key holds `max_held_per_key` already: dead-letter it as `key-order-full`.
    Full(i64),
}

/// The stage's mutable part, behind one lock that only this task takes (never across an
/// await).
pub(super) struct Inner {
    /// Which keys wait, and their held records (the pure model).
    pub(super) state: KeyOrder<Held, Seq>,
    /// The log's own frontier: its offset is stored only past events that are done.
    pub(super) log: Frontier,
    /// Free watchdog slots of the held records' calls.
    pub(super) slots: Vec<usize>,
    /// Source records that run with a note: an earlier record of their key (this head) was
    /// dead-lettered (by source offset).
    pub(super) notes: Vec<(i64, i64)>,
}

/// The key-order stage of a source partition (`Source`) or of a retry tier partition
/// (`Tier`, which only appends releases and checks `max_key_wait`).
pub(crate) enum KeyOrderStage {
    /// A source partition: routes, holds, reads the log.
    Source(Box<SourceStage>),
    /// A retry tier partition of a source with a key-order log.
    Tier {
        /// The source's key-order log.
        log_topic: Arc<str>,
        /// `retry.max_key_wait`, in ms.
        max_wait_ms: i64,
    },
}

/// The source partition's part.
pub(crate) struct SourceStage {
    pub(super) log_topic: Arc<str>,
    pub(super) source_topic: Arc<str>,
    pub(super) partition: i32,
    pub(super) reader: tokio::sync::Mutex<Option<LogReader>>,
    /// The order of this partition's appends: each event goes in its turn, from its send to
    /// its acknowledgement, in the order the partition *decided* them (see [`AppendOrder`]).
    pub(super) appends: AppendOrder,
    pub(super) inner: Mutex<Inner>,
    pub(super) caller: Caller,
    pub(super) sequential: bool,
    pub(super) waiting_gauge: metrics::Gauge,
    pub(super) held_gauge: metrics::Gauge,
    pub(super) oldest_gauge: metrics::Gauge,
    pub(super) held_total: metrics::Counter,
    pub(super) full_total: metrics::Counter,
    pub(super) waiting_cap_total: metrics::Counter,
}

impl SourceStage {
    /// The stage of source partition `partition` of `source_topic`, whose log is `log_topic`.
    pub(crate) fn new(
        config: &Config,
        (group, source_topic, partition): (&str, Arc<str>, i32),
        log_topic: &str,
        caller: Caller,
    ) -> Self {
        let r = &config.retry;
        let caps = Caps {
            max_waiting_keys: r.max_waiting_keys,
            max_held_per_key: r.max_held_per_key,
        };
        let after = match r.on_dead_letter {
            OnDeadLetter::DeadLetterKey => AfterDeadLetter::DeadLetterKey,
            _ => AfterDeadLetter::Release,
        };
        let slots = config.max_in_flight.max(1);
        let (g, t, p) = (
            group.to_owned(),
            source_topic.to_string(),
            partition.to_string(),
        );
        let gauge = |name: &'static str| metrics::gauge!(name, "group" => g.clone(), "topic" => t.clone(), "partition" => p.clone());
        SourceStage {
            waiting_gauge: gauge(m::KEY_ORDER_WAITING_KEYS),
            held_gauge: gauge(m::KEY_ORDER_HELD_RECORDS),
            oldest_gauge: gauge(m::KEY_ORDER_OLDEST_WAIT_SECONDS),
            held_total: metrics::counter!(m::KEY_ORDER_HELD, "group" => g.clone(), "topic" => t.clone()),
            full_total: metrics::counter!(m::KEY_ORDER_CAP_REACHED, "group" => g.clone(), "topic" => t.clone(), "cap" => "held_per_key"),
            waiting_cap_total: metrics::counter!(m::KEY_ORDER_CAP_REACHED, "group" => g.clone(), "topic" => t.clone(), "cap" => "waiting_keys"),
            log_topic: Arc::from(log_topic),
            source_topic,
            partition,
            reader: tokio::sync::Mutex::new(None),
            appends: AppendOrder::default(),
            inner: Mutex::new(Inner {
                state: KeyOrder::new(caps, after),
                log: Frontier::default(),
                slots: (0..slots).rev().collect(),
                notes: Vec::new(),
            }),
            caller,
            sequential: config.ordering == crate::config::Ordering::Partition,
        }
    }

    pub(super) fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the gauges (at flush time, not per record).
    pub(crate) fn publish(&self) {
        let inner = self.inner();
        self.waiting_gauge.set(inner.state.waiting_keys() as f64);
        self.held_gauge.set(inner.state.held_records() as f64);
        self.oldest_gauge
            .set(inner.state.oldest_wait_ms(now_ms()) as f64 / 1000.0);
    }
}

/// The order in which a source partition's events reach its key-order log: the order the
/// partition decided them (a ticket is taken when the decision is made, synchronously), not
/// the order their futures happen to be polled in. A replay relies on it: a record held behind
/// a head must never be in the log before that head's `head` event, or a crash between the two
/// appends would let a new owner run the held record while the head is still unfinished.
///
/// One append at a time, from its send to its acknowledgement: pipelined appends would be
/// faster, but one that fails and is sent again would land behind later ones.
#[derive(Debug)]
pub(crate) struct AppendOrder {
    /// The counter, changed under a plain lock (never held across an await).
    turns: Mutex<Turns>,
    /// The ticket being served, for the holders that wait for their turn.
    serving: tokio::sync::watch::Sender<u64>,
}

/// The ticket counter behind [`AppendOrder`], under its lock.
#[derive(Debug, Default)]
struct Turns {
    /// Tickets handed out (the next one gets this number).
    issued: u64,
    /// The ticket whose turn it is.
    serving: u64,
    /// Tickets dropped before their turn (their future was dropped): skipped.
    dropped: std::collections::BTreeSet<u64>,
}

impl Default for AppendOrder {
    fn default() -> Self {
        AppendOrder {
            turns: Mutex::new(Turns::default()),
            serving: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// A place in a partition's [`AppendOrder`]; its turn ends when it is dropped.
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    /// The order it belongs to.
    order: &'a AppendOrder,
    /// Its number: its turn comes when every smaller one was served or dropped.
    n: u64,
}

impl AppendOrder {
    /// The next place in line (take it when the decision to append is made).
    pub(crate) fn ticket(&self) -> Ticket<'_> {
        let mut t = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.issued;
        t.issued += 1;
        Ticket { order: self, n }
    }
}

impl Ticket<'_> {
    /// Waits until every earlier ticket was served (or dropped).
    pub(crate) async fn turn(&self) {
        let mut rx = self.order.serving.subscribe();
        // The sender lives in `order`, which outlives the ticket: `wait_for` cannot fail.
        let _ = rx.wait_for(|s| *s >= self.n).await;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut t = self.order.turns.lock().unwrap_or_else(|e| e.into_inner());
        if t.serving != self.n {
            // Dropped before its turn (the task is ending): skipped when its turn comes.
            t.dropped.insert(self.n);
            return;
        }
        t.serving += 1;
        loop {
            let next = t.serving;
            if !t.dropped.remove(&next) {
                break;
            }
            t.serving += 1;
        }
        self.order.serving.send_replace(t.serving);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for `t`'s turn, notes `name` as served, yields (so another holder could cut in if
    /// the order were wrong), then ends the turn.
    async fn go(t: Ticket<'_>, name: &'static str, served: &std::sync::Mutex<Vec<&'static str>>) {
        t.turn().await;
        served.lock().unwrap().push(name);
        tokio::task::yield_now().await;
        drop(t);
    }

    /// Tickets are served in the order they were taken, whatever order their holders ask in;
    /// a ticket dropped before its turn is skipped.
    #[tokio::test]
    async fn appends_go_in_the_order_they_were_decided() {
        let order = AppendOrder::default();
        let (a, b, c, d) = (
            order.ticket(),
            order.ticket(),
            order.ticket(),
            order.ticket(),
        );
        let served = std::sync::Mutex::new(Vec::new());
        drop(c);
        // Asked in the reverse order.
        tokio::join!(
            go(d, "d", &served),
            go(b, "b", &served),
            go(a, "a", &served)
        );
        assert_eq!(*served.lock().unwrap(), vec!["a", "b", "d"]);
    }
}
