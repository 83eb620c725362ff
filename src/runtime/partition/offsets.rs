//! Where a partition's offset gets stored: the at-least-once invariant, in one file.
//!
//! **The rule: an offset is stored only when the record at it, and every record before it in
//! the partition, has a durable outcome** — the handler returned `Ok`, or the broker
//! acknowledged the record on its retry tier or the DLQ. Nothing past a record that is in a
//! handler call, waiting for its due time, held by the dead-letter breaker or handed off but
//! not acknowledged is ever stored, so whatever is lost in a crash, a rebalance or a restart
//! is handled again by the partition's next reader, never skipped. Only stored offsets are
//! committed (librdkafka's auto-commit, the commit on revoke and the one at shutdown).
//!
//! Three pieces keep it, all here:
//!
//! - [`Frontier`]: the records taken and which of them are durable; it yields the offset that
//!   may be stored (the contiguous frontier, below).
//! - [`Progress`]: the same facts published for others (lock-free): the rebalance hook stores
//!   the durable frontier before a partition is let go, a restarted task starts from
//!   [`Progress::restart_from`], and the lag gauges read [`Progress::next_to_handle`].
//! - [`Offsets`]: the task's side: taking a record, marking it durable, settling hand-offs and
//!   storing the frontier with the consumer.
//!
//! Records are taken in offset order and may finish in any order (handled at once, handed to a
//! retry tier, acknowledged later, or held behind a slow record of another key). The offset
//! that may be stored is always one past the last record of the longest prefix of taken records
//! that all have a durable outcome: nothing past a record still in flight is ever committed.
//!
//! ```text
//!  taken:    40  41  42  43  44  45  46
//!  durable:   ✓   ✓   ·   ✓   ✓   ·   ✓        · = in flight, waiting, or hand-off not acked
//!                    ▲
//!                    frontier: 42 (store 41, commit 42). 43, 44 and 46 are "ahead" of it.
//! ```
//!
//! Each record taken gets a sequence number; the window holds the records from the oldest one
//! without a durable outcome to the newest taken, so marking one durable and advancing past a
//! durable prefix are O(1) amortized. The window's length is capped by the caller
//! (`max_ahead`): it bounds memory and the records redone after a crash.
//!
//! Storing is batched (the task stores when its queue runs dry, before a handler call waits,
//! and every few hundred records): only stored offsets are committed, so storing the highest
//! durable one now and then is as safe as storing each.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use rdkafka::consumer::{Consumer, ConsumerContext};

/// A taken record's place in the window.
pub(crate) type Seq = u64;

/// The records of one partition taken but not yet behind the frontier.
#[derive(Debug, Default)]
pub(crate) struct Frontier {
    /// (offset, durable) of every record taken since the frontier, oldest first.
    window: VecDeque<(i64, bool)>,
    /// Sequence number of `window[0]`.
    head: Seq,
    /// Records in the window that are durable (ahead of the frontier).
    durable_ahead: usize,
    /// The last offset behind the frontier (durable, with everything before it): the offset to
    /// store. `None` until one is.
    through: Option<i64>,
    /// `through` at the last call of [`Frontier::take_store`].
    stored: Option<i64>,
}

impl Frontier {
    /// A record at `offset` was taken (offsets increase). Returns its sequence number.
    pub(crate) fn take(&mut self, offset: i64) -> Seq {
        let seq = self.head + self.window.len() as Seq;
        self.window.push_back((offset, false));
        seq
    }

    /// The record `seq` has a durable outcome. Returns true if the frontier moved.
    pub(crate) fn durable(&mut self, seq: Seq) -> bool {
        let Some(index) = seq
            .checked_sub(self.head)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return false;
        };
        let Some(entry) = self.window.get_mut(index) else {
            return false;
        };
        if entry.1 {
            return false;
        }
        entry.1 = true;
        self.durable_ahead += 1;
        let mut moved = false;
        while let Some(&(offset, true)) = self.window.front() {
            self.window.pop_front();
            self.head += 1;
            self.durable_ahead -= 1;
            self.through = Some(offset);
            moved = true;
        }
        moved
    }

    /// The offset to store now, if the frontier moved since the last call (librdkafka commits
    /// one past it).
    pub(crate) fn take_store(&mut self) -> Option<i64> {
        if self.through == self.stored {
            return None;
        }
        self.stored = self.through;
        self.through
    }

    /// The last offset behind the frontier, if any.
    pub(crate) fn through(&self) -> Option<i64> {
        self.through
    }

    /// Records taken and not behind the frontier (open or durable ahead of it).
    pub(crate) fn window(&self) -> usize {
        self.window.len()
    }

    /// Durable records ahead of the frontier: handled, but not committable yet because an
    /// earlier record is still open.
    pub(crate) fn durable_ahead(&self) -> usize {
        self.durable_ahead
    }
}

/// Where one partition task is: the offset of the record it is on (`-1` until it has seen
/// one), and the last offset the group committed for it (`-1` until known).
#[derive(Debug)]
pub(crate) struct Progress {
    /// The offset of the record the task is on: the lag sampler's "next offset to handle".
    at: AtomicI64,
    /// What the group last committed for the partition: reported by the commit callback, and
    /// taken as the first record's offset of an assignment until one is (only ever raised).
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
    /// A partition's progress before anything is known: every offset `-1`. Shared (`Arc`) by
    /// the task, the lag sampler, the rebalance hook and the supervisor.
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
    pub(crate) fn next_to_handle(&self) -> Option<i64> {
        let durable = self.durable.load(Ordering::Relaxed);
        if durable >= 0 {
            return Some(durable.saturating_add(1));
        }
        let v = self.at.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }
}

/// The task's side of the invariant: one partition's [`Progress`], and the one place its
/// offset is stored.
pub(crate) struct Offsets {
    /// Read by the lag sampler, the rebalance hook and the supervisor.
    progress: Arc<Progress>,
    /// The partition's topic, for the offset store call.
    topic: Arc<str>,
    /// The partition whose offset this stores.
    partition: i32,
}

impl Offsets {
    /// The offsets of `topic`/`partition`, published through `progress`.
    pub(crate) fn new(progress: Arc<Progress>, topic: Arc<str>, partition: i32) -> Self {
        Offsets {
            progress,
            topic,
            partition,
        }
    }

    /// Marks the record at `offset` as taken (before anything that could fail: a task
    /// restarted after a panic starts again from it): its place in the frontier.
    #[inline]
    pub(crate) fn taken(&self, offset: i64, frontier: &mut Frontier) -> Seq {
        self.progress.at(offset);
        frontier.take(offset)
    }

    /// The record `seq` has a durable outcome.
    #[inline]
    pub(crate) fn durable(&self, seq: Seq, frontier: &mut Frontier) {
        if frontier.durable(seq) {
            if let Some(through) = frontier.through() {
                // Published at once for the rebalance hook, which stores it before the
                // partition is let go; the store itself is batched.
                self.progress.durable_through(through);
            }
        }
    }

    /// A hand-off resolved: durable, or abandoned (`Err`, with why). Nothing past an abandoned
    /// hand-off may be stored: the frontier stays before it, and the caller ends the task.
    pub(crate) fn settled<E>(
        &self,
        seq: Seq,
        settled: Result<(), E>,
        frontier: &mut Frontier,
    ) -> Result<(), E> {
        settled?;
        self.durable(seq, frontier);
        Ok(())
    }

    /// Settles the hand-offs that are done, without waiting (each resolves to its record's
    /// sequence number and whether it became durable).
    pub(crate) fn settle<E, F>(
        &self,
        handoffs: &mut FuturesUnordered<F>,
        frontier: &mut Frontier,
    ) -> Result<(), E>
    where
        F: Future<Output = (Seq, Result<(), E>)> + Unpin,
    {
        while !handoffs.is_empty() {
            let Some(Some((seq, settled))) = handoffs.next().now_or_never() else {
                break;
            };
            self.settled(seq, settled, frontier)?;
        }
        Ok(())
    }

    /// Stores the frontier with `consumer` if it moved since the last store.
    pub(crate) fn store<C: ConsumerContext, K: Consumer<C>>(
        &self,
        consumer: &K,
        frontier: &mut Frontier,
    ) {
        let Some(offset) = frontier.take_store() else {
            return;
        };
        match consumer.store_offset(&self.topic, self.partition, offset) {
            Ok(()) => self.progress.stored(offset),
            // Revoked in the meantime: the new owner gets the record again.
            Err(e) => {
                tracing::debug!(topic = %self.topic, partition = self.partition, offset, error = %e, "offset not stored")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nothing_past_an_open_record_is_stored() {
        let mut f = Frontier::default();
        let s: Vec<Seq> = (40..47).map(|o| f.take(o)).collect();
        assert_eq!(f.take_store(), None);
        // 41 finishes before 40: nothing may be stored yet.
        assert!(!f.durable(s[1]));
        assert_eq!(f.take_store(), None);
        assert!(f.durable(s[0]));
        assert_eq!(f.take_store(), Some(41));
        assert_eq!(f.take_store(), None, "stored once");
        // 43, 44, 46 durable; 42 still open (a slow record pins the frontier).
        for i in [3, 4, 6] {
            assert!(!f.durable(s[i]));
        }
        assert_eq!(f.through(), Some(41));
        assert_eq!(f.durable_ahead(), 3);
        assert_eq!(f.window(), 5);
        assert!(f.durable(s[2]));
        assert_eq!(f.take_store(), Some(44));
        assert!(f.durable(s[5]));
        assert_eq!(f.take_store(), Some(46));
        assert_eq!(f.window(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave gaps.
        let mut f = Frontier::default();
        let a = f.take(10);
        let b = f.take(15);
        f.durable(b);
        f.durable(a);
        assert_eq!(f.take_store(), Some(15));
    }

    #[test]
    fn stale_or_repeated_marks_change_nothing() {
        let mut f = Frontier::default();
        let a = f.take(1);
        assert!(f.durable(a));
        assert!(!f.durable(a));
        assert!(!f.durable(a + 10));
        assert_eq!(f.durable_ahead(), 0);
    }

    proptest! {
        /// Whatever order records become durable in, the stored offset is always the last of
        /// a durable prefix, never moves back, and reaches the last offset when all are.
        #[test]
        fn the_stored_offset_is_always_a_durable_prefix(
            gaps in proptest::collection::vec(1i64..4, 1..60),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 1..60),
        ) {
            let mut f = Frontier::default();
            let mut offset = 0;
            let mut taken = Vec::new();
            for g in &gaps {
                offset += g;
                taken.push((offset, f.take(offset)));
            }
            let mut durable = vec![false; taken.len()];
            let mut last = None;
            for i in order {
                let i = i.index(taken.len());
                durable[i] = true;
                f.durable(taken[i].1);
                if let Some(stored) = f.take_store() {
                    let upto = taken.iter().position(|(o, _)| *o == stored).unwrap();
                    prop_assert!(durable[..=upto].iter().all(|d| *d));
                    prop_assert!(last.is_none_or(|l| stored > l));
                    last = Some(stored);
                }
            }
            for (_, s) in &taken {
                f.durable(*s);
            }
            let _ = f.take_store();
            prop_assert_eq!(f.through(), Some(offset));
            prop_assert_eq!(f.window(), 0);
        }
    }
}
