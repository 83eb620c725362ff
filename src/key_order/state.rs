//! The key-order state of one source partition: which keys wait behind a head on a retry tier,
//! which records are held behind them, and what to do with each record and each event of the
//! key-order log. Pure: no Kafka, no clock, no I/O — the partition task feeds it what happened
//! and does what it answers, so every rule of `docs/key-order.md` is tested here without a
//! broker.
//!
//! It is separate from the record loops because it is the whole of the ordering promise: the
//! loops only ask it two questions per record ("may this record run?" and "this one failed")
//! and one per log event.
//!
//! A key has an entry from the moment it starts waiting (its first record handed to a retry
//! tier) until it is *free* again: every one of its *pending* records (failed, on a tier) was
//! released **and** every record forwarded to the log for it was read back and has finished.
//! While a key has an entry, its new source records are held (forwarded to the log), never run;
//! a held record runs only when no pending record of its key is before it: so a record of a
//! key never overtakes one that is still on a tier or in the log.
//!
//! A key usually has one pending record (its *head*). It has more after crashes: a replay from
//! the log's committed position can read an earlier owner's `head` while a held record runs,
//! and if that record fails too, the key waits for both (one head per key, as this model first
//! had, forgot the second and let later records overtake it; the model check below found it
//! once crashes replayed from the committed position instead of the log's start).
//!
//! Events are applied idempotently, because the log is replayed after every crash and
//! rebalance: a `head` of a record already pending only adds a log position that closes with
//! it, a `held` of a record already read for its key is a duplicate, and a `release` that names
//! no pending record is ignored (a duplicate copy ending late) — so nothing replayed can release
//! a key early. Every position that a replay needs (a pending record's `head` events, and its
//! own `held` events when it was a held record) stays open until the record's `release` is
//! read.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use crate::runtime::scheduler::KeyHashHasher;

use super::wire::Ended;

/// What happens to a dead-lettered head's held records (`[retry] on_dead_letter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterDeadLetter {
    /// Handled in order; the key's next record carries a note of the dead-lettered head.
    Release,
    /// Dead-lettered with it, in order.
    DeadLetterKey,
}

/// The bounds of one partition's key-order state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Keys waiting on a head at once; at the cap the source takes no new record.
    pub(crate) max_waiting_keys: usize,
    /// Records held (forwarded, read back or running) per key; past it a record is
    /// dead-lettered as `key-order-full`.
    pub(crate) max_held_per_key: usize,
}

/// What to do with a source record, asked just before it would start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Its key is free: run it as usual.
    Run,
    /// It is its key's own head, read again after a crash: run it again (not held). If it
    /// fails it goes to its tier again without a new `head` event; if it is handled, the
    /// owner appends `release(head)` itself.
    RunHead,
    /// Its key waits: append `held(key, record, head)` to the log instead of running it.
    Hold {
        /// The head it waits behind.
        head: i64,
    },
    /// Its key waits and holds `max_held_per_key` records already: dead-letter it as
    /// `key-order-full`; the key keeps waiting.
    Full {
        /// The head it was behind (named in its envelope).
        head: i64,
    },
}

/// What the log reader does with a record that was held (read back from the log).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next<R> {
    /// Run it now, as if it were the source record. `after_dead_letter`: an earlier record of
    /// its key (this head offset) was dead-lettered, and its envelope says so if it fails.
    Run {
        /// The record.
        record: R,
        /// The dead-lettered head before it, if any.
        after_dead_letter: Option<i64>,
    },
    /// Dead-letter it as `key-dead-lettered` (`on_dead_letter = "dead-letter-key"`): the head
    /// it was held behind was dead-lettered.
    DeadLetter {
        /// The record.
        record: R,
        /// The dead-lettered head.
        head: i64,
    },
}

/// What reading a `held` event left to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeldRead<R> {
    /// Already seen (a re-forward after a crash): its log offset is done at once.
    Duplicate,
    /// Waits in memory behind its key's head (or the key's earlier held records).
    Queued,
    /// Nothing of its key is before it any more.
    Now(Next<R>),
}

/// What a `release` event of a pending head left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released<R, L> {
    /// The log positions done now: the released head's `head` events, and its own `held`
    /// event when the head was a held record that failed (until its head ends, a replay must
    /// see it again, or it would take its key for free).
    pub(crate) done: Vec<L>,
    /// The key's held records to run or dead-letter now, in order.
    pub(crate) next: Vec<Next<R>>,
}

/// A record of a key that failed and is on a retry tier (or on its way there): the key's
/// later records wait until its `release` is read.
#[derive(Debug, Clone)]
struct Pending<L> {
    since_ms: i64,
    /// Known only from an earlier owner's `head` event, read in a replay: its hand-off may
    /// have been lost with that owner, and then only reading the record again from the source
    /// releases it — so it does not count against `max_waiting_keys`, which pauses that
    /// source (a partition at the cap after a crash would wait for ever).
    replayed: bool,
    /// The log positions that stay open until its release is read: its `head` events, once
    /// read back (more than one when a run again after a crash failed too), and its own `held`
    /// events when it is a held record that failed.
    logs: Vec<L>,
}

/// One key with an entry: waiting on one or more pending records, or still draining its held
/// records.
#[derive(Debug)]
struct Key<R, L> {
    /// The key's records on a retry tier, by source offset: every one of them must end before
    /// a later record of the key runs. Usually one; more after crashes, when a replay reads
    /// the `head` events of several owners (a record that ran again while an earlier owner's
    /// failed record was still on its tier).
    pending: std::collections::BTreeMap<i64, Pending<L>>,
    /// The last head of this key: named in the `held` events of records forwarded while the
    /// key drains.
    last_head: i64,
    /// Source offsets of the `held` events sent by this owner and not yet read back (a
    /// multiset: the same record can be forwarded again). By offset, not a count: an append
    /// sent again after a timeout can land twice, and the second copy must not count off
    /// another record still on its way.
    forwarded: std::collections::BTreeMap<i64, u32>,
    /// Held records read back, waiting for their turn, by source offset (oldest first), each
    /// with the dead-lettered head it follows to the DLQ (`dead-letter-key`), if it does.
    queue: VecDeque<(i64, R, Option<i64>)>,
    /// A held record of this key is being run (one at a time, in order): its source offset.
    running: Option<i64>,
    /// Source offsets of the held records read for this key while it has an entry: a `held`
    /// event for one of them again is a duplicate (a re-forward after a crash). Exact, not a
    /// high-water mark: an append that failed and was sent again can land after a later
    /// record's, and must not be taken for a duplicate.
    seen: BTreeSet<i64>,
    /// The head that was dead-lettered, while its held records follow it.
    dead_head: Option<i64>,
    /// `dead-letter-key`: the first source offset routed after the dead head's release was
    /// read; records from it on came after the head ended and do not follow it to the DLQ.
    dead_until: Option<i64>,
}

impl<R, L> Key<R, L> {
    /// A key with no pending record yet, whose held events will name `last_head`.
    fn new(last_head: i64) -> Self {
        Key {
            pending: std::collections::BTreeMap::new(),
            last_head,
            forwarded: std::collections::BTreeMap::new(),
            queue: VecDeque::new(),
            running: None,
            seen: BTreeSet::new(),
            dead_head: None,
            dead_until: None,
        }
    }
    /// `held` events of this owner on their way through the log.
    fn forwarded(&self) -> usize {
        self.forwarded.values().map(|n| *n as usize).sum()
    }
    /// Whether a pending record counts against `max_waiting_keys` (see [`Pending::replayed`]).
    fn counts(&self) -> bool {
        self.pending.values().any(|p| !p.replayed)
    }
    /// Records counted against `max_held_per_key`: on their way through the log, queued, or
    /// running.
    fn held(&self) -> usize {
        self.forwarded() + self.queue.len() + usize::from(self.running.is_some())
    }
    /// Nothing pending, nothing on its way, nothing queued or running: the entry can go.
    fn is_free(&self) -> bool {
        self.pending.is_empty()
            && self.forwarded.is_empty()
            && self.queue.is_empty()
            && self.running.is_none()
    }
    /// The earliest pending record.
    fn first_pending(&self) -> Option<i64> {
        self.pending.keys().next().copied()
    }
}

type Keys<R, L> = HashMap<u64, Key<R, L>, BuildHasherDefault<KeyHashHasher>>;

/// The key-order state of one source partition. `R` is a held record as the task keeps it,
/// `L` a position in the key-order log (both opaque here).
#[derive(Debug)]
pub(crate) struct KeyOrder<R, L> {
    keys: Keys<R, L>,
    caps: Caps,
    after_dead_letter: AfterDeadLetter,
    /// Keys with at least one pending record.
    waiting: usize,
    /// Keys with at least one pending record that counts against `max_waiting_keys`.
    counted: usize,
    /// Held records read back and in memory (queued or running).
    held: usize,
    /// Keys whose head was dead-lettered and released, freed before another record of theirs
    /// came: that record's envelope notes the dead letter (memory only; at most
    /// `max_waiting_keys` notes are kept, the oldest dropped first).
    notes: VecDeque<(u64, i64)>,
}

impl<R, L: Copy> KeyOrder<R, L> {
    /// An empty state (a newly assigned partition, before its log is read).
    pub(crate) fn new(caps: Caps, after_dead_letter: AfterDeadLetter) -> Self {
        KeyOrder {
            keys: HashMap::default(),
            caps,
            after_dead_letter,
            waiting: 0,
            counted: 0,
            held: 0,
            notes: VecDeque::new(),
        }
    }

    /// Whether the source may take another record: fewer than `max_waiting_keys` keys wait.
    /// Held records do not count (they never keep a new key out).
    #[inline]
    pub(crate) fn may_take(&self) -> bool {
        self.counted < self.caps.max_waiting_keys
    }

    /// Whether any key has an entry; while none has, [`KeyOrder::route`] is never needed (one
    /// branch per record on a healthy partition).
    #[inline]
    pub(crate) fn is_idle(&self) -> bool {
        self.keys.is_empty()
    }

    /// Keys waiting on a pending record.
    pub(crate) fn waiting_keys(&self) -> usize {
        self.waiting
    }

    /// Held records in memory (read back from the log, queued or running).
    pub(crate) fn held_records(&self) -> usize {
        self.held
    }

    /// Milliseconds the oldest waiting key has waited at `now_ms` (0 when none waits). A scan:
    /// called when gauges are published, not per record.
    pub(crate) fn oldest_wait_ms(&self, now_ms: i64) -> i64 {
        self.keys
            .values()
            .flat_map(|k| k.pending.values().map(|p| p.since_ms))
            .min()
            .map_or(0, |since| now_ms.saturating_sub(since).max(0))
    }

    /// Changes `key`'s pending records with `change`, keeping the two key counts right.
    fn with_pending(&mut self, key: u64, change: impl FnOnce(&mut Key<R, L>)) {
        let Some(k) = self.keys.get_mut(&key) else {
            return;
        };
        let (was_waiting, was_counted) = (!k.pending.is_empty(), k.counts());
        change(k);
        let (waiting, counted) = (!k.pending.is_empty(), k.counts());
        self.waiting = self.waiting + usize::from(waiting) - usize::from(was_waiting);
        self.counted = self.counted + usize::from(counted) - usize::from(was_counted);
    }

    /// Adds `offset` to `key`'s pending records (the key's entry exists).
    fn add_pending(&mut self, key: u64, offset: i64, pending: Pending<L>) {
        self.with_pending(key, |k| {
            k.pending.insert(offset, pending);
            k.last_head = k.last_head.max(offset);
        });
    }

    /// A source record of `key` at `offset` is about to start: run it, or hold it. A `Hold`
    /// is counted as forwarded at once (before its event is acknowledged), so the key cannot
    /// become free while it is on its way.
    pub(crate) fn route(&mut self, key: u64, offset: i64) -> Route {
        let Some(k) = self.keys.get_mut(&key) else {
            return Route::Run;
        };
        // Its key's own earliest pending record, read again after a crash, with nothing of its
        // key before it still to run: run it again.
        if k.first_pending() == Some(offset)
            && k.running.is_none()
            && k.forwarded.is_empty()
            && k.queue.front().is_none_or(|(o, ..)| *o > offset)
        {
            return Route::RunHead;
        }
        if k.pending.is_empty() && k.dead_head.is_some() && k.dead_until.is_none() {
            // The first record after the dead head's release: from here on, not its followers.
            k.dead_until = Some(offset);
        }
        let head = k.first_pending().unwrap_or(k.last_head);
        // A pending record itself is never refused: only it (run again, or its release) can
        // free its key, and a `key-order-full` dead letter writes no release.
        if k.held() >= self.caps.max_held_per_key && !k.pending.contains_key(&offset) {
            return Route::Full { head };
        }
        *k.forwarded.entry(offset).or_default() += 1;
        Route::Hold { head }
    }

    /// A `held` event for `key`'s record at `offset` could not be written and the record will
    /// be read again from the source (the task is stopping): it no longer counts as forwarded.
    pub(crate) fn hold_abandoned(&mut self, key: u64, offset: i64) {
        if let Some(k) = self.keys.get_mut(&key) {
            unforward(k, offset);
        }
        self.free_if_done(key);
    }

    /// The dead-lettered head noted for `key`'s next record, taken (a source record that runs).
    pub(crate) fn take_note(&mut self, key: u64) -> Option<i64> {
        if self.notes.is_empty() {
            return None;
        }
        let i = self.notes.iter().position(|(k, _)| *k == key)?;
        self.notes.remove(i).map(|(_, head)| head)
    }

    /// A source record of `key` at `offset` failed and goes to a retry tier: `key` waits behind
    /// it from `now_ms`. Returns whether a `head` event must be appended first — not when the
    /// record is already pending (read again after a crash: its copy on the tier is a
    /// duplicate, and the first `release` of either ends it).
    pub(crate) fn failed(&mut self, key: u64, offset: i64, now_ms: i64) -> bool {
        self.failed_at(key, offset, now_ms, None)
    }

    /// [`KeyOrder::failed`] for a held record read back from the log at `held_log`: that
    /// position stays open until the record's release is read ([`Released::done`]) — also when
    /// the record was pending already (`false`) — so a replay from an earlier committed position
    /// sees the record again before the records held behind it, instead of taking its key for
    /// free while its `head` event is further on in the log.
    pub(crate) fn failed_held(&mut self, key: u64, offset: i64, now_ms: i64, held_log: L) -> bool {
        if let Some(k) = self.keys.get_mut(&key) {
            // A held record that ran is no longer running, whatever follows.
            if k.running.take().is_some() {
                self.held -= 1;
            }
        }
        self.failed_at(key, offset, now_ms, Some(held_log))
    }

    fn failed_at(&mut self, key: u64, offset: i64, now_ms: i64, held_log: Option<L>) -> bool {
        let pending = Pending {
            since_ms: now_ms,
            replayed: false,
            logs: held_log.into_iter().collect(),
        };
        let k = self.keys.entry(key).or_insert_with(|| Key::new(offset));
        if k.pending.contains_key(&offset) {
            // Read again and failed again: its copy is on a tier now (this owner's), so it
            // counts against the cap like any other.
            self.with_pending(key, |k| {
                if let Some(p) = k.pending.get_mut(&offset) {
                    p.logs.extend(held_log);
                    p.replayed = false;
                }
            });
            return false;
        }
        // Whatever else the key waits on (an earlier owner's failed record, read while this
        // one ran), this record waits too: its later records follow only when both ended.
        self.add_pending(key, offset, pending);
        true
    }

    /// Whether the held record of `key` at `offset` (running) is pending: handled, its
    /// `release` must be appended (by the owner, as for a source record read again) before
    /// the key may follow.
    pub(crate) fn runs_head(&self, key: u64, offset: i64) -> bool {
        self.keys
            .get(&key)
            .is_some_and(|k| k.pending.contains_key(&offset))
    }

    /// A held record of `key` that ran was handled, or dead-lettered, or (as `failed_held`
    /// already said) handed to a tier: the next one of its key, if it may run now.
    pub(crate) fn finished(&mut self, key: u64) -> Option<Next<R>> {
        let k = self.keys.get_mut(&key)?;
        if k.running.take().is_some() {
            self.held -= 1;
        }
        let next = self.next_of(key);
        if next.is_none() {
            self.free_if_done(key);
        }
        next
    }

    /// Whether the source record of `key` at `offset`, run again after a crash and handled,
    /// is pending: the owner appends `release(offset, handled)` and the key follows when that
    /// is read back (the release is applied when read, like any other).
    pub(crate) fn head_handled(&self, key: u64, offset: i64) -> bool {
        self.runs_head(key, offset)
    }

    /// Reads a `head` event at log position `log`. Returns whether its log position stays open
    /// (until the record's release is read): always — every `head` is followed by a `release`
    /// of its record (from the copy handed off after it, or, when the owner stopped before the
    /// hand-off, from the record run again, since its outcome was not durable).
    pub(crate) fn on_head(&mut self, key: u64, head: i64, since_ms: i64, log: L) -> bool {
        let k = self.keys.entry(key).or_insert_with(|| Key::new(head));
        if let Some(p) = k.pending.get_mut(&head) {
            p.logs.push(log);
            return true;
        }
        self.add_pending(
            key,
            head,
            Pending {
                since_ms,
                replayed: true,
                logs: vec![log],
            },
        );
        true
    }

    /// Reads a `held` event of `key` for the record at `offset`, held behind `head`.
    pub(crate) fn on_held(&mut self, key: u64, offset: i64, head: i64, record: R) -> HeldRead<R> {
        let k = self.keys.entry(key).or_insert_with(|| Key::new(head));
        unforward(k, offset);
        if !k.seen.insert(offset) {
            self.free_if_done(key);
            return HeldRead::Duplicate;
        }
        // `dead-letter-key`: everything held behind the dead head follows it to the DLQ (in
        // its turn: records of its key before it end first).
        let dead = (self.after_dead_letter == AfterDeadLetter::DeadLetterKey
            && k.dead_head == Some(head)
            && k.pending.is_empty()
            && k.dead_until.is_none_or(|until| offset < until))
        .then_some(head);
        // In source order: a held event that landed late (its append was sent again) still
        // runs before the later records of its key that have not run yet.
        let at = k.queue.partition_point(|(o, ..)| *o < offset);
        k.queue.insert(at, (offset, record, dead));
        self.held += 1;
        match self.next_of(key) {
            Some(next) => HeldRead::Now(next),
            None => HeldRead::Queued,
        }
    }

    /// Reads a `release` event: if it names one of `key`'s pending records, that record ended
    /// and the key's held records that no longer wait follow; otherwise (a duplicate, or a
    /// copy of a record that ended already) it is ignored — `None`.
    pub(crate) fn on_release(
        &mut self,
        key: u64,
        head: i64,
        ended: Ended,
    ) -> Option<Released<R, L>> {
        let k = self.keys.get_mut(&key)?;
        k.pending.get(&head)?;
        let mut removed = None;
        self.with_pending(key, |k| removed = k.pending.remove(&head));
        let pending = removed?;
        let k = self.keys.get_mut(&key)?;
        let mut next = Vec::new();
        if ended == Ended::DeadLettered {
            k.dead_head = Some(head);
            k.dead_until = None;
            if self.after_dead_letter == AfterDeadLetter::DeadLetterKey {
                // The records held behind it (after it, before the key's next pending record)
                // follow it to the DLQ, each in its turn.
                let until = k.pending.range(head..).next().map_or(i64::MAX, |(o, _)| *o);
                for (o, _, dead) in k.queue.iter_mut() {
                    if *o > head && *o < until {
                        *dead = Some(head);
                    }
                }
            }
        } else {
            k.dead_head = None;
        }
        next.extend(self.next_of(key));
        if next.iter().all(|n| matches!(n, Next::DeadLetter { .. })) {
            self.free_if_done(key);
        }
        Some(Released {
            done: pending.logs,
            next,
        })
    }

    /// The key's next queued record, if it may run now: none running, and no pending record of
    /// its key before it (the record itself may be pending: its `head` event, written by an
    /// earlier owner, was read back, and it may never have reached its tier, so it runs again,
    /// as a source record read again after a crash does; see [`KeyOrder::runs_head`]).
    fn next_of(&mut self, key: u64) -> Option<Next<R>> {
        let k = self.keys.get_mut(&key)?;
        if k.running.is_some() {
            return None;
        }
        let front = k.queue.front()?.0;
        if k.first_pending().is_some_and(|p| p < front) {
            return None;
        }
        let (offset, record, dead) = k.queue.pop_front()?;
        if let Some(head) = dead {
            // Out of memory now, never run: the caller dead-letters it, then asks for the
            // next one (`finished`).
            self.held -= 1;
            return Some(Next::DeadLetter { record, head });
        }
        k.running = Some(offset);
        // The first record after a dead-lettered head carries the note; later ones do not.
        let after_dead_letter = match (self.after_dead_letter, k.dead_head) {
            (AfterDeadLetter::Release, Some(h)) if k.pending.is_empty() => {
                k.dead_head = None;
                Some(h)
            }
            _ => None,
        };
        Some(Next::Run {
            record,
            after_dead_letter,
        })
    }

    /// Drops `key`'s entry once it is free; a dead-lettered head not yet followed by a record
    /// becomes a note for the key's next source record.
    fn free_if_done(&mut self, key: u64) {
        let Some(k) = self.keys.get(&key) else { return };
        if !k.is_free() {
            return;
        }
        let note = match (self.after_dead_letter, k.dead_head) {
            (AfterDeadLetter::Release, Some(h)) => Some(h),
            _ => None,
        };
        self.keys.remove(&key);
        if let Some(head) = note {
            if self.notes.len() >= self.caps.max_waiting_keys.max(1) {
                self.notes.pop_front();
            }
            self.notes.push_back((key, head));
        }
    }
}

/// Counts off one `held` event of `offset` sent by this owner, if it sent one.
fn unforward<R, L>(k: &mut Key<R, L>, offset: i64) {
    if let Some(n) = k.forwarded.get_mut(&offset) {
        *n -= 1;
        if *n == 0 {
            k.forwarded.remove(&offset);
        }
    }
}

#[cfg(test)]
mod tests;
