//! Where a record waits: which records of a partition may start now.
//!
//! In `key` ordering a record whose key already has a record in a handler call waits behind it,
//! in offset order; records of other keys start at once. In `unordered` ordering every record
//! starts at once. Records without a key are each their own key. The partition takes a new
//! record only while fewer than `max_in_flight` handler calls run and fewer than `max_waiting`
//! records wait behind busy keys, so memory stays bounded; a hot key that fills the waiting
//! room holds the partition's intake until its backlog drains, while the records of other keys
//! already taken keep running.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Identity hashing for keys that are hashes already.
#[derive(Default)]
pub(crate) struct KeyHashHasher(u64);

impl Hasher for KeyHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64s are hashed here; keep any other input total anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A key's identity for ordering: a 64-bit hash of its bytes (FNV-1a). Two different keys with
/// the same hash are only kept in order with each other — never the reverse.
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The records of one partition that may start, run, or wait behind their key.
pub(crate) struct Scheduler<T> {
    /// `key` ordering: records of one key run one at a time; otherwise every record may start.
    by_key: bool,
    /// `max_in_flight`: handler calls of the partition at once (at least 1).
    max_in_flight: usize,
    /// `max_waiting`: records held behind busy keys before intake stops taking more.
    max_waiting: usize,
    /// Records started and not finished.
    in_flight: usize,
    /// Keys with a record in flight, and the records of that key waiting behind it.
    busy: HashMap<u64, VecDeque<T>, BuildHasherDefault<KeyHashHasher>>,
    /// Records in `busy`'s queues, kept beside the map so the bound check is one comparison.
    waiting: usize,
}

impl<T> Scheduler<T> {
    /// `by_key`: records of one key run one at a time, in order.
    pub(crate) fn new(by_key: bool, max_in_flight: usize, max_waiting: usize) -> Self {
        Scheduler {
            by_key,
            max_in_flight: max_in_flight.max(1),
            max_waiting,
            in_flight: 0,
            busy: HashMap::default(),
            waiting: 0,
        }
    }

    /// Whether the partition may take another record now: a record whose key is free must be
    /// able to start, and one whose key is busy must be able to wait.
    pub(crate) fn has_room(&self) -> bool {
        self.in_flight < self.max_in_flight && self.waiting < self.max_waiting.max(1)
    }

    /// A record was taken: `Some(item)` to start it now, `None` when it waits behind a record
    /// of the same key. Call only when [`Scheduler::has_room`].
    pub(crate) fn offer(&mut self, key: Option<u64>, item: T) -> Option<T> {
        if let (true, Some(k)) = (self.by_key, key) {
            if let Some(queue) = self.busy.get_mut(&k) {
                queue.push_back(item);
                self.waiting += 1;
                return None;
            }
            self.busy.insert(k, VecDeque::new());
        }
        self.in_flight += 1;
        Some(item)
    }

    /// The record of `key` in flight finished: the next record of that key to start, if one
    /// waits (it takes over the handler slot).
    pub(crate) fn finish(&mut self, key: Option<u64>) -> Option<T> {
        if let (true, Some(k)) = (self.by_key, key) {
            if let Some(queue) = self.busy.get_mut(&k) {
                if let Some(next) = queue.pop_front() {
                    self.waiting -= 1;
                    return Some(next);
                }
                self.busy.remove(&k);
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        None
    }

    /// Handler calls running.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Records waiting behind a busy key.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_of_a_busy_key_wait_in_order_others_start() {
        let mut s = Scheduler::new(true, 8, 8);
        let (a, b) = (Some(key_hash(b"a")), Some(key_hash(b"b")));
        assert_eq!(s.offer(a, 1), Some(1));
        assert_eq!(s.offer(a, 2), None);
        assert_eq!(s.offer(b, 3), Some(3));
        assert_eq!(s.offer(a, 4), None);
        assert_eq!((s.in_flight(), s.waiting()), (2, 2));
        // `a` finishes: its next record takes over the slot, in offset order.
        assert_eq!(s.finish(a), Some(2));
        assert_eq!(s.finish(a), Some(4));
        assert_eq!(s.finish(a), None);
        assert_eq!(s.finish(b), None);
        assert_eq!((s.in_flight(), s.waiting()), (0, 0));
        assert!(s.busy.is_empty());
    }

    #[test]
    fn records_without_a_key_and_unordered_records_never_wait() {
        let mut s = Scheduler::new(true, 8, 8);
        assert_eq!(s.offer(None, 1), Some(1));
        assert_eq!(s.offer(None, 2), Some(2));
        let mut u = Scheduler::new(false, 8, 8);
        let k = Some(key_hash(b"k"));
        assert_eq!(u.offer(k, 1), Some(1));
        assert_eq!(u.offer(k, 2), Some(2));
        assert_eq!(u.in_flight(), 2);
    }

    #[test]
    fn caps_stop_intake() {
        let mut s = Scheduler::new(true, 2, 1);
        let k = Some(key_hash(b"k"));
        assert!(s.has_room());
        s.offer(k, 1);
        assert!(s.has_room());
        s.offer(k, 2); // waits: the waiting room is full
        assert!(!s.has_room());
        assert_eq!(s.finish(k), Some(2));
        assert!(s.has_room());
        s.offer(None, 3);
        s.offer(None, 4);
        assert!(!s.has_room(), "two in flight");
    }

    proptest! {
        /// Any interleaving of offers and finishes: per key, records start in offer order and
        /// never two at once; the counts stay within the caps.
        #[test]
        fn per_key_order_and_exclusion(
            ops in proptest::collection::vec((0u8..6, any::<bool>()), 1..200),
        ) {
            let mut s = Scheduler::new(true, 4, 6);
            let mut running: Vec<(u8, u32)> = Vec::new();
            let mut started: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut offered: HashMap<u8, Vec<u32>> = HashMap::new();
            let mut next = 0u32;
            for (key, finish) in ops {
                if finish && !running.is_empty() {
                    let (k, _) = running.remove(0);
                    if let Some(n) = s.finish(Some(u64::from(k))) {
                        started.entry(k).or_default().push(n);
                        running.push((k, n));
                    }
                } else if s.has_room() {
                    next += 1;
                    offered.entry(key).or_default().push(next);
                    if let Some(n) = s.offer(Some(u64::from(key)), next) {
                        started.entry(key).or_default().push(n);
                        running.push((key, n));
                    }
                }
                let mut keys: Vec<u8> = running.iter().map(|(k, _)| *k).collect();
                keys.sort();
                let before = keys.len();
                keys.dedup();
                prop_assert_eq!(before, keys.len(), "a key ran twice at once");
                prop_assert!(s.in_flight() <= 4 && s.waiting() <= 6);
                prop_assert_eq!(s.in_flight(), running.len());
            }
            for (k, got) in started {
                let want = &offered[&k][..got.len()];
                prop_assert_eq!(&got[..], want, "key {} out of order", k);
            }
        }
    }
}
