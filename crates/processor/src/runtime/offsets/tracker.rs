//! The per-partition tracker of registered records and their completion.

use std::collections::VecDeque;

use super::map::encode_offset_map;
use super::DoneRanges;

/// What [`OffsetTracker::register`] made of a fetched record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Registered, unfinished: run it.
    New,
    /// Registered and already done: the inherited offset map lists it. Skip it.
    Inherited,
    /// At or below a record already registered (the fetch position went back, e.g. an
    /// offset reset or a redelivery): not registered. Drop it and count it.
    Rewound,
    /// The first record fetched is below the committed position the tracker started
    /// from: the log was truncated (an unclean leader election, a topic deleted and
    /// recreated, a broker that lost its data) and the consumer's position was reset. The
    /// tracker dropped the offset map it inherited (it describes a log that no longer
    /// exists) and registered the record as new, unfinished: run it. Its position is now
    /// below `committed`, and committing it keeps a restart from repeating this.
    Rebased {
        /// The committed position the tracker had started from.
        committed: i64,
    },
}

/// Registered records from the watermark to the newest fetched one, with a done flag each.
///
/// The out-of-order commit of one partition: register each fetched record in offset
/// order, mark it done in any order, and commit [`position`](Self::position) (the lowest
/// unfinished offset) with [`offset_map`](Self::offset_map) as the commit metadata. A new
/// owner starts from the committed position and the map decoded by
/// [`decode_offset_map`](crate::decode_offset_map), and skips the records registered as
/// [`Registration::Inherited`]. Memory is one entry per registered record in flight.
#[derive(Debug, Clone, Default)]
pub struct OffsetTracker {
    /// One past the newest registered offset; before any, the committed position.
    next: Option<i64>,
    /// Registered offsets in increasing order; the front is always unfinished.
    entries: VecDeque<(i64, bool)>,
    unfinished: usize,
    /// Offsets at or above `next` that the inherited offset map lists as done.
    inherited: DoneRanges,
    /// Whether any record was registered (or refused) since the tracker started: only the
    /// first one can reveal a truncated log.
    fetched: bool,
}

impl OffsetTracker {
    /// A tracker whose position starts at `position` (the committed offset, if any), with
    /// the finished offsets above it that the committed offset map listed.
    pub fn starting_at(position: Option<i64>, mut inherited: DoneRanges) -> Self {
        match position {
            Some(p) => inherited.forget_below(p),
            None => inherited = DoneRanges::default(),
        }
        OffsetTracker {
            next: position,
            entries: VecDeque::new(),
            unfinished: 0,
            inherited,
            fetched: false,
        }
    }

    /// Registers a fetched record at `offset`.
    ///
    /// A record below the newest registered one is [`Registration::Rewound`]. The first
    /// record of all, when it is below the committed position the tracker started from,
    /// rebases the tracker on it instead ([`Registration::Rebased`]): the consumer only
    /// fetches below its committed position when that position was out of range and was
    /// reset, so the records there were written after a truncation and must run.
    pub fn register(&mut self, offset: i64) -> Registration {
        let first = !self.fetched;
        self.fetched = true;
        match self.next {
            Some(committed) if offset < committed && first => {
                self.inherited = DoneRanges::default();
                self.next = Some(offset + 1);
                self.entries.push_back((offset, false));
                self.unfinished += 1;
                return Registration::Rebased { committed };
            }
            Some(n) if offset < n => return Registration::Rewound,
            _ => {}
        }
        self.next = Some(offset + 1);
        let inherited = self.inherited.contains(offset);
        self.inherited.forget_below(offset + 1);
        if inherited {
            if !self.entries.is_empty() {
                self.entries.push_back((offset, true));
            }
            Registration::Inherited
        } else {
            self.entries.push_back((offset, false));
            self.unfinished += 1;
            Registration::New
        }
    }

    /// Marks `offset` done. False if it is not registered and unfinished.
    pub fn complete(&mut self, offset: i64) -> bool {
        let Ok(idx) = self.entries.binary_search_by_key(&offset, |e| e.0) else {
            return false;
        };
        match self.entries.get_mut(idx) {
            Some(entry) if !entry.1 => {
                entry.1 = true;
                self.unfinished -= 1;
                while self.entries.front().is_some_and(|e| e.1) {
                    self.entries.pop_front();
                }
                true
            }
            _ => false,
        }
    }

    /// The offset to commit: the lowest unfinished registered offset, or one past the
    /// newest registered one when everything is done. None before anything is known.
    pub fn position(&self) -> Option<i64> {
        self.entries.front().map(|e| e.0).or(self.next)
    }

    /// Registered records from the watermark to the newest one, finished or not: what
    /// `max_pending` bounds, and the tracker's memory.
    pub fn in_flight(&self) -> usize {
        self.entries.len()
    }

    /// Registered records not yet done.
    pub fn unfinished(&self) -> usize {
        self.unfinished
    }

    /// Finished offsets above the position (its own and the inherited ones not fetched
    /// yet), as commit metadata no longer than `max_len`; empty when there are none or the
    /// map would be too long.
    pub fn offset_map(&self, max_len: usize) -> String {
        let Some(base) = self.position() else {
            return String::new();
        };
        encode_offset_map(base, self.done_above_position(), max_len)
    }

    /// Finished offsets above the position listed by the offset map this tracker would
    /// commit now (its own and inherited), for lag reports.
    pub(crate) fn done_above_position(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        // Offsets between two registered records do not exist in the log: done.
        let own = self
            .entries
            .iter()
            .zip(self.entries.iter().skip(1))
            .flat_map(|(&(o, d), &(next, _))| {
                let first = if d { o } else { o + 1 };
                (first < next).then_some((first, next))
            })
            .chain(self.entries.back().filter(|e| e.1).map(|e| (e.0, e.0 + 1)));
        own.chain(self.inherited.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode_offset_map;
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn done_set(t: &OffsetTracker) -> BTreeSet<i64> {
        let Some(p) = t.position() else {
            return BTreeSet::new();
        };
        let map = t.offset_map(1 << 20);
        if map.is_empty() {
            return BTreeSet::new();
        }
        let ranges = decode_offset_map(p, &map).unwrap();
        ranges.iter().flat_map(|(s, e)| s..e).collect()
    }

    #[test]
    fn held_task_pins_the_position() {
        let mut t = OffsetTracker::starting_at(Some(100), DoneRanges::default());
        for o in 100..110 {
            assert_eq!(t.register(o), Registration::New);
        }
        for o in (100..110).filter(|o| *o != 103) {
            assert!(t.complete(o));
        }
        assert_eq!(t.position(), Some(103));
        assert_eq!(t.unfinished(), 1);
        assert_eq!(done_set(&t), (104..110).collect());
        assert!(t.complete(103));
        assert_eq!(t.position(), Some(110));
        assert_eq!(t.offset_map(4000), "");
    }

    #[test]
    fn gaps_count_as_done_and_rewinds_are_refused() {
        let mut t = OffsetTracker::starting_at(None, DoneRanges::default());
        assert_eq!(t.register(10), Registration::New);
        assert_eq!(t.register(15), Registration::New);
        assert_eq!(t.register(12), Registration::Rewound);
        assert!(t.complete(10));
        assert_eq!(t.position(), Some(15));
        assert!(!t.complete(10));
        assert!(!t.complete(99));
    }

    /// An offset jump (a reset to the log start after retention, a compacted or
    /// transactional topic) must cost nothing: memory is per registered record.
    #[test]
    fn an_offset_jump_costs_no_memory() {
        let mut t = OffsetTracker::starting_at(Some(0), DoneRanges::default());
        t.register(0);
        t.register(1 << 40);
        t.register((1 << 40) + 7);
        assert_eq!(t.in_flight(), 3);
        t.complete(1 << 40);
        assert_eq!(t.position(), Some(0));
        let map = t.offset_map(4000);
        assert!(!map.is_empty() && map.len() < 64, "{map}");
        t.complete(0);
        assert_eq!(t.position(), Some((1 << 40) + 7));
        assert_eq!(t.in_flight(), 1);
    }

    /// A new owner that commits before fetching must keep the map it inherited.
    #[test]
    fn inherited_map_is_kept_until_fetched_past() {
        let inherited = DoneRanges::from_sorted([(52, 56), (60, 61)]);
        let mut t = OffsetTracker::starting_at(Some(50), inherited);
        assert_eq!(done_set(&t), [52, 53, 54, 55, 60].into_iter().collect());
        assert_eq!(t.register(50), Registration::New);
        assert_eq!(done_set(&t), [52, 53, 54, 55, 60].into_iter().collect());
        assert_eq!(t.register(51), Registration::New);
        assert_eq!(t.register(52), Registration::Inherited);
        assert!(t.complete(51));
        assert_eq!(done_set(&t), [51, 52, 53, 54, 55, 60].into_iter().collect());
        assert!(t.complete(50));
        // 51 and 52 are done, 53..55 inherited and not fetched yet.
        assert_eq!(t.position(), Some(53));
        assert_eq!(done_set(&t), [53, 54, 55, 60].into_iter().collect());
        for o in 53..56 {
            assert_eq!(t.register(o), Registration::Inherited);
        }
        assert_eq!(t.position(), Some(56));
        assert_eq!(done_set(&t), [60].into_iter().collect());
    }

    /// Committed 1 000 000 with an offset map, then the log was truncated: the consumer
    /// was reset to offset 3. Every record from there runs, the inherited map is gone,
    /// and the position to commit is the new one; a later record below what this
    /// assignment registered is still a rewind.
    #[test]
    fn a_first_record_below_the_committed_position_rebases() {
        let inherited = DoneRanges::from_sorted([(1_000_002, 1_000_010)]);
        let mut t = OffsetTracker::starting_at(Some(1_000_000), inherited);
        assert_eq!(
            t.register(3),
            Registration::Rebased {
                committed: 1_000_000
            }
        );
        assert_eq!(t.position(), Some(3));
        assert_eq!(t.unfinished(), 1);
        assert_eq!(t.register(4), Registration::New);
        assert!(t.complete(4));
        assert_eq!(
            done_set(&t),
            [4].into_iter().collect(),
            "inherited map dropped"
        );
        assert_eq!(t.register(2), Registration::Rewound);
        assert!(t.complete(3));
        assert_eq!(t.position(), Some(5));
        assert_eq!(t.offset_map(4000), "");
    }

    /// A first record at or above the committed position is the ordinary case: no rebase.
    #[test]
    fn a_first_record_at_the_committed_position_does_not_rebase() {
        let mut t = OffsetTracker::starting_at(Some(10), DoneRanges::from_sorted([(11, 12)]));
        assert_eq!(t.register(10), Registration::New);
        assert_eq!(t.register(11), Registration::Inherited);
        assert_eq!(t.register(5), Registration::Rewound);
    }

    #[test]
    fn oversized_map_falls_back_to_position_only() {
        let mut t = OffsetTracker::starting_at(Some(0), DoneRanges::default());
        for o in 0..20_000 {
            t.register(o);
        }
        for o in (1..20_000).step_by(2) {
            t.complete(o);
        }
        assert_eq!(t.position(), Some(0));
        assert_eq!(t.offset_map(100), "");
        assert!(!t.offset_map(10_000).is_empty());
    }

    proptest! {
        /// Rebase against a reference: a tracker whose first record is below its
        /// committed position behaves from then on exactly like a tracker that started with
        /// no committed position and no map (nothing inherited survives, every record from
        /// the first one on is registered and pins the position until done); one whose
        /// first record is at or above it never rebases and behaves like before.
        #[test]
        fn rebase_is_a_fresh_start(start in 0i64..2000,
                                   inherited_flags in proptest::collection::vec(any::<bool>(), 0..40),
                                   first in 0i64..4000,
                                   steps in proptest::collection::vec((0u8..4, 0usize..64, 0i64..4), 1..200)) {
            let inherited = DoneRanges::from_sorted(inherited_flags.iter().enumerate()
                .filter(|(_, d)| **d).map(|(i, _)| (start + 1 + i as i64, start + 2 + i as i64)));
            let mut t = OffsetTracker::starting_at(Some(start), inherited.clone());
            let truncated = first < start;
            let mut reference = if truncated {
                OffsetTracker::starting_at(None, DoneRanges::default())
            } else {
                OffsetTracker::starting_at(Some(start), inherited)
            };
            let r = t.register(first);
            let expected = reference.register(first);
            if truncated {
                prop_assert_eq!(expected, Registration::New);
                prop_assert_eq!(r, Registration::Rebased { committed: start });
                prop_assert_eq!(t.position(), Some(first));
            } else {
                prop_assert_eq!(r, expected);
            }
            let mut registered = vec![first];
            let mut next = first + 1;
            for (op, pick, gap) in steps {
                match op {
                    // A later record, possibly right after the previous one.
                    0 | 1 => {
                        let o = next + gap;
                        let r = t.register(o);
                        prop_assert!(!matches!(r, Registration::Rebased { .. }), "a second rebase");
                        prop_assert_eq!(r, reference.register(o));
                        registered.push(o);
                        next = o + 1;
                    }
                    // A record below the newest one: a rewind, never a second rebase.
                    2 => {
                        let o = next - 1 - gap;
                        prop_assert_eq!(t.register(o), Registration::Rewound);
                        prop_assert_eq!(reference.register(o), Registration::Rewound);
                    }
                    _ => {
                        let o = registered[pick % registered.len()];
                        prop_assert_eq!(t.complete(o), reference.complete(o));
                    }
                }
                prop_assert_eq!(t.position(), reference.position());
                prop_assert_eq!(t.unfinished(), reference.unfinished());
                prop_assert_eq!(t.offset_map(1 << 20), reference.offset_map(1 << 20));
                if truncated {
                    prop_assert!(t.position().is_some_and(|p| p >= first && p < start.max(next + 1)));
                }
            }
        }

        /// Against a model (the set of finished offsets): the position is always the lowest
        /// unfinished registered offset, never beyond one, memory is the registered records
        /// in flight, and the map lists every finished offset above the position, every
        /// inherited one not fetched yet, and no unfinished one.
        #[test]
        fn tracker_matches_model(start in 0i64..1000,
                                 inherited_flags in proptest::collection::vec(any::<bool>(), 0..40),
                                 steps in proptest::collection::vec((0u8..3, 0usize..64, 1i64..4), 1..300)) {
            let inherited: Vec<i64> = inherited_flags.iter().enumerate().filter(|(_, d)| **d)
                .map(|(i, _)| start + 1 + i as i64).collect();
            let mut t = OffsetTracker::starting_at(Some(start),
                DoneRanges::from_sorted(inherited.iter().map(|o| (*o, o + 1))));
            let mut next = start;
            let mut registered: Vec<i64> = Vec::new();
            let mut finished: BTreeSet<i64> = BTreeSet::new();
            for (op, pick, gap) in steps {
                if op == 0 || registered.is_empty() {
                    let r = t.register(next);
                    if inherited.contains(&next) {
                        prop_assert_eq!(r, Registration::Inherited);
                        finished.insert(next);
                    } else {
                        prop_assert_eq!(r, Registration::New);
                    }
                    registered.push(next);
                    next += gap;
                } else {
                    let o = registered[pick % registered.len()];
                    let fresh = finished.insert(o);
                    prop_assert_eq!(t.complete(o), fresh);
                }
                let lowest_unfinished = registered.iter().copied().find(|o| !finished.contains(o));
                let expected = lowest_unfinished.unwrap_or_else(|| registered.last().map_or(start, |l| l + 1));
                prop_assert_eq!(t.position(), Some(expected));
                prop_assert_eq!(t.unfinished(), registered.len() - finished.len());
                prop_assert!(t.in_flight() <= registered.iter().filter(|o| **o >= expected).count());
                let decoded = done_set(&t);
                let above: BTreeSet<i64> = finished.iter().copied().filter(|o| *o > expected).collect();
                prop_assert!(above.is_subset(&decoded));
                for o in inherited.iter().filter(|o| **o >= next) {
                    prop_assert!(decoded.contains(o), "inherited {} missing", o);
                }
                for o in &decoded {
                    prop_assert!(!registered.contains(o) || finished.contains(o));
                }
            }
        }
    }
}
