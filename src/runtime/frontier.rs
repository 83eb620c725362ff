//! Where a partition's offset gets stored: the contiguous frontier.
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

use std::collections::VecDeque;

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
