//! Sets of offsets stored as sorted, disjoint half-open ranges.
//!
//! A decoded offset map can describe millions of finished offsets in a few hundred bytes
//! of run lengths; expanding it into a set of offsets would cost memory proportional to
//! the offsets, not to the map. [`DoneRanges`] keeps the ranges as they are: memory is
//! bounded by the size of the commit metadata that produced them.

/// Sorted, disjoint, non-adjacent half-open ranges `[start, end)` of offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DoneRanges {
    ranges: Vec<(i64, i64)>,
}

impl DoneRanges {
    /// Builds the set from ranges given in increasing order (as a decoder produces them);
    /// empty ranges are dropped and touching ranges merged.
    pub fn from_sorted(ranges: impl IntoIterator<Item = (i64, i64)>) -> Self {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for (start, end) in ranges {
            if start >= end {
                continue;
            }
            match out.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => out.push((start, end)),
            }
        }
        DoneRanges { ranges: out }
    }

    /// Whether `offset` is in the set.
    pub fn contains(&self, offset: i64) -> bool {
        let idx = self.ranges.partition_point(|&(_, end)| end <= offset);
        self.ranges
            .get(idx)
            .is_some_and(|&(start, _)| start <= offset)
    }

    /// Forgets every offset below `offset`.
    pub fn forget_below(&mut self, offset: i64) {
        let idx = self.ranges.partition_point(|&(_, end)| end <= offset);
        self.ranges.drain(..idx);
        if let Some(first) = self.ranges.first_mut() {
            first.0 = first.0.max(offset);
        }
    }

    /// The ranges, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.ranges.iter().copied()
    }

    /// Number of offsets in the set.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| (e - s) as u64).sum()
    }

    /// Whether the set is empty.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_and_forget() {
        let mut r = DoneRanges::from_sorted([(5, 7), (7, 9), (20, 21), (30, 30)]);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 9), (20, 21)]);
        assert!(!r.contains(4));
        assert!(r.contains(5) && r.contains(8));
        assert!(!r.contains(9) && !r.contains(19));
        assert!(r.contains(20));
        assert_eq!(r.count(), 5);
        r.forget_below(6);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(6, 9), (20, 21)]);
        r.forget_below(10);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(20, 21)]);
        r.forget_below(100);
        assert!(r.is_empty());
    }
}
