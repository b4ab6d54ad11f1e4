//! Out-of-order completion and the commit position.
//!
//! Tasks of one partition finish in any order, but Kafka stores one committed offset per
//! partition: everything below it counts as done. [`OffsetTracker`] keeps, for the offsets
//! between the lowest unfinished task (the *watermark*) and the newest dispatched one, a
//! done flag each. The commit position is the watermark: it never passes an unfinished
//! task, so a crash re-runs at worst what was not finished — at-least-once.
//!
//! Finished offsets above the watermark would be re-run too after a restart. The
//! **offset map** avoids that (as Parallel Consumer does): those offsets are encoded
//! compactly into the commit's metadata string, and the next owner of the partition
//! decodes it and skips them. The map is size-capped; above the cap only the position is
//! committed, which is still correct, just less economical.
//!
//! Offsets need not be contiguous (compacted topics, transaction markers): an offset that
//! was never dispatched counts as done.

use std::collections::VecDeque;

use base64::Engine as _;

/// Done flags for the offsets from the watermark to the newest registered one.
#[derive(Debug, Clone, Default)]
pub(crate) struct OffsetTracker {
    /// Offset of `done[0]`; when `done` is empty, the next offset expected.
    base: Option<i64>,
    done: VecDeque<bool>,
    /// Registered offsets not yet done.
    unfinished: usize,
}

impl OffsetTracker {
    /// A tracker whose position starts at `position` (the committed offset), if known.
    pub(crate) fn starting_at(position: Option<i64>) -> Self {
        OffsetTracker {
            base: position,
            done: VecDeque::new(),
            unfinished: 0,
        }
    }

    /// Registers a dispatched task at `offset`. Offsets must increase; a lower or repeated
    /// offset (a redelivery after a seek) is ignored and returns false.
    pub(crate) fn register(&mut self, offset: i64) -> bool {
        let end = self.end();
        match end {
            Some(end) if offset < end => return false,
            Some(end) => {
                // Offsets skipped over (never dispatched) count as done.
                for _ in end..offset {
                    self.done.push_back(true);
                }
            }
            None => self.base = Some(offset),
        }
        self.done.push_back(false);
        self.unfinished += 1;
        self.pop_done_prefix();
        true
    }

    /// Marks `offset` done. Returns false if it was not registered and unfinished.
    pub(crate) fn complete(&mut self, offset: i64) -> bool {
        let Some(base) = self.base else { return false };
        if offset < base {
            return false;
        }
        let idx = (offset - base) as usize;
        match self.done.get_mut(idx) {
            Some(flag) if !*flag => {
                *flag = true;
                self.unfinished -= 1;
                self.pop_done_prefix();
                true
            }
            _ => false,
        }
    }

    fn pop_done_prefix(&mut self) {
        while let Some(true) = self.done.front() {
            self.done.pop_front();
            if let Some(b) = self.base.as_mut() {
                *b += 1;
            }
        }
    }

    /// One past the newest registered offset.
    fn end(&self) -> Option<i64> {
        self.base.map(|b| b + self.done.len() as i64)
    }

    /// The offset to commit: the lowest unfinished offset, or one past the newest
    /// registered one when everything is done. None before anything is known.
    pub(crate) fn position(&self) -> Option<i64> {
        self.base
    }

    /// Offsets from the watermark to the newest registered one (what `max_pending` bounds).
    pub(crate) fn span(&self) -> usize {
        self.done.len()
    }

    /// Registered tasks not yet done.
    pub(crate) fn unfinished(&self) -> usize {
        self.unfinished
    }

    /// Finished offsets above the position, as a commit metadata string no longer than
    /// `max_len`; empty when there are none or the map would be too long.
    pub(crate) fn offset_map(&self, max_len: usize) -> String {
        let Some(base) = self.base else {
            return String::new();
        };
        if !self.done.iter().any(|d| *d) {
            return String::new();
        }
        let encoded = encode_offset_map(base, &self.done);
        if encoded.len() > max_len {
            String::new()
        } else {
            encoded
        }
    }
}

const MAP_PREFIX: &str = "dtom1";

/// Encodes done flags starting at `base` as `dtom1:<base>:<len>:<kind><base64>`, where kind
/// `r` is run lengths (alternating, starting with not-done, as LEB128 varints) and `b` a
/// little-endian bitset; whichever is shorter.
pub(crate) fn encode_offset_map(base: i64, done: &VecDeque<bool>) -> String {
    // Trailing not-done flags carry no information: the decoder treats everything past the
    // map as not done.
    let len = done.iter().rposition(|d| *d).map_or(0, |i| i + 1);
    let mut runs = Vec::new();
    let mut current = false;
    let mut run: u64 = 0;
    for &d in done.iter().take(len) {
        if d == current {
            run += 1;
        } else {
            push_varint(&mut runs, run);
            current = d;
            run = 1;
        }
    }
    push_varint(&mut runs, run);
    let mut bits = vec![0u8; len.div_ceil(8)];
    for (i, &d) in done.iter().take(len).enumerate() {
        if d {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let (kind, payload) = if runs.len() <= bits.len() {
        ('r', runs)
    } else {
        ('b', bits)
    };
    format!("{MAP_PREFIX}:{base}:{len}:{kind}{}", b64.encode(payload))
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_varint(input: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *input.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The finished offsets a committed offset map lists, if `metadata` is a valid map for the
/// committed `position`. Anything else (empty, foreign, corrupt, for another position)
/// gives None: the position alone is used.
pub(crate) fn decode_offset_map(position: i64, metadata: &str) -> Option<Vec<i64>> {
    let mut parts = metadata.splitn(4, ':');
    if parts.next()? != MAP_PREFIX {
        return None;
    }
    let base: i64 = parts.next()?.parse().ok()?;
    let len: usize = parts.next()?.parse().ok()?;
    let body = parts.next()?;
    if base != position || len > 10_000_000 {
        return None;
    }
    // The kind is one ASCII byte; `get` refuses to split a multi-byte character.
    let kind = char::from(*body.as_bytes().first()?);
    let payload = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(body.get(1..)?)
        .ok()?;
    let mut out = Vec::new();
    match kind {
        'b' => {
            if payload.len() != len.div_ceil(8) {
                return None;
            }
            for i in 0..len {
                if payload[i / 8] & (1 << (i % 8)) != 0 {
                    out.push(base + i as i64);
                }
            }
        }
        'r' => {
            let mut pos = 0;
            let mut at: usize = 0;
            let mut done = false;
            while pos < payload.len() {
                let run = read_varint(&payload, &mut pos)? as usize;
                if at.checked_add(run)? > len {
                    return None;
                }
                if done {
                    out.extend((at..at + run).map(|i| base + i as i64));
                }
                at += run;
                done = !done;
            }
            if at != len {
                return None;
            }
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn held_task_pins_the_position() {
        let mut t = OffsetTracker::starting_at(Some(100));
        for o in 100..110 {
            assert!(t.register(o));
        }
        // offset 103 is held unfinished while everything else finishes
        for o in (100..110).filter(|o| *o != 103) {
            assert!(t.complete(o));
        }
        assert_eq!(t.position(), Some(103));
        assert_eq!(t.unfinished(), 1);
        let map = t.offset_map(4000);
        assert_eq!(decode_offset_map(103, &map), Some((104..110).collect()));
        assert!(t.complete(103));
        assert_eq!(t.position(), Some(110));
        assert_eq!(t.offset_map(4000), "");
    }

    #[test]
    fn gaps_count_as_done_and_redeliveries_are_ignored() {
        let mut t = OffsetTracker::starting_at(None);
        assert!(t.register(10));
        assert!(t.register(15));
        assert!(!t.register(12));
        assert!(t.complete(10));
        assert_eq!(t.position(), Some(15));
        assert!(!t.complete(10));
        assert!(!t.complete(99));
    }

    #[test]
    fn oversized_map_falls_back_to_position_only() {
        let mut t = OffsetTracker::starting_at(Some(0));
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

    #[test]
    fn foreign_or_corrupt_metadata_is_ignored() {
        assert_eq!(decode_offset_map(5, ""), None);
        assert_eq!(decode_offset_map(5, "hello"), None);
        assert_eq!(decode_offset_map(5, "dtom1:6:3:rAQE"), None);
        assert_eq!(decode_offset_map(5, "dtom1:5:3:r!!!"), None);
        assert_eq!(decode_offset_map(5, "dtom1:5:99999999999:b"), None);
        // Found by the property test: a multi-byte first character of the body.
        assert_eq!(decode_offset_map(5, "dtom1:5:3:\u{202e}e"), None);
    }

    proptest! {
        /// Against a model (a set of finished offsets): the position is always the lowest
        /// unfinished registered offset, never beyond one, and the map lists exactly the
        /// finished offsets above it.
        #[test]
        fn tracker_matches_model(start in 0i64..1000,
                                 steps in proptest::collection::vec((0u8..3, 0usize..64, 1i64..4), 1..300)) {
            let mut t = OffsetTracker::starting_at(Some(start));
            let mut next = start;
            let mut registered: Vec<i64> = Vec::new();
            let mut finished: BTreeSet<i64> = BTreeSet::new();
            for (op, pick, gap) in steps {
                if op == 0 || registered.is_empty() {
                    prop_assert!(t.register(next));
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
                let map = t.offset_map(1 << 20);
                let decoded: BTreeSet<i64> = if map.is_empty() { BTreeSet::new() } else {
                    decode_offset_map(expected, &map).unwrap().into_iter().collect()
                };
                let above: BTreeSet<i64> = finished.iter().copied().filter(|o| *o > expected).collect();
                // The map may also list never-registered gap offsets (they count as done);
                // it must list every finished offset above the position and no unfinished one.
                prop_assert!(above.is_subset(&decoded));
                for o in &decoded {
                    prop_assert!(!registered.contains(o) || finished.contains(o));
                }
            }
        }

        #[test]
        fn offset_map_round_trips(base in 0i64..1_000_000, flags in proptest::collection::vec(any::<bool>(), 0..2000)) {
            let done: VecDeque<bool> = flags.iter().copied().collect();
            let enc = encode_offset_map(base, &done);
            let dec = decode_offset_map(base, &enc).unwrap();
            let expected: Vec<i64> = flags.iter().enumerate().filter(|(_, d)| **d).map(|(i, _)| base + i as i64).collect();
            prop_assert_eq!(dec, expected);
        }

        #[test]
        fn decoding_garbage_never_panics(s in ".{0,64}", pos in any::<i64>()) {
            let _ = decode_offset_map(pos, &s);
            let _ = decode_offset_map(pos, &format!("dtom1:{pos}:{}", s));
        }
    }
}
