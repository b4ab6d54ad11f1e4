//! Putting task batches back together from changelog records, and deciding which to
//! apply.
//!
//! The [`Assembler`] is pure logic: changelog records in (offset, key, value, and the
//! [`Kind`] their headers say), local writes out (`ops`, in the order they must be
//! applied), plus the source offsets of the batches it applied and the torn batches it
//! ignored. The rules it follows are described in [`restore`](super); in short:
//!
//! * a batch whose records all arrived is applied;
//! * a batch with missing records is applied if later records show the missing ones were
//!   written and removed by compaction (the same writer went on past the batch's last
//!   sequence number, or another writer took over without marking it aborted);
//! * a batch named by an abort marker, or missing records at the very end of its writer's
//!   output, is torn and ignored;
//! * a batch applied late writes no key that a later record already wrote.
//!
//! Replaying the same records again (a restore that is retried) produces the same ops:
//! every value is absolute, so applying them over a partly restored store converges to
//! the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::record::{Frame, Kind};

/// Local writes in order: puts (`Some`) and deletes (`None`).
pub(crate) type Ops = Vec<(Vec<u8>, Option<Vec<u8>>)>;

struct Rec {
    offset: i64,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

struct Pending {
    src_offset: i64,
    size: u32,
    first_offset: i64,
    /// `(writer, sequence number of the batch's last record)`.
    writer: Option<(u64, u64)>,
    records: BTreeMap<u32, Rec>,
}

/// Keys written by pending (incomplete) batches, and the newest offset applied to them
/// since: a pending record older than that must not overwrite it when applied late.
struct Watch {
    refs: usize,
    last_applied: i64,
}

/// Puts batches back together and decides which ones to apply; see the module docs.
/// Pure logic: records in, local writes (`ops`, in order) out.
#[derive(Default)]
pub(crate) struct Assembler {
    /// Applied batches below this source offset are not recorded in `applied_sources`
    /// (their tasks cannot be redelivered); 0 by default, which leaves out [`NO_TASK`]
    /// batches.
    ///
    /// [`NO_TASK`]: crate::record::NO_TASK
    floor: i64,
    pending: HashMap<u64, Pending>,
    /// Pending batches by `(writer, last seq, batch)`.
    by_writer: BTreeSet<(u64, u64, u64)>,
    max_seq: HashMap<u64, u64>,
    last_writer: Option<u64>,
    watch: HashMap<Vec<u8>, Watch>,
    /// Keys last written by an ignored (torn) record, with that record's offset: until a
    /// later record writes them again, compaction may delete their valid older value.
    dangling: HashMap<Vec<u8>, i64>,
    pub(crate) ops: Ops,
    pub(crate) applied_sources: BTreeSet<i64>,
    /// Batches applied as thinned out by compaction whose source offset is in
    /// `applied_sources`, with that offset: an abort marker that follows takes it back.
    compacted_sources: HashMap<u64, i64>,
    pub(crate) batches_applied: u64,
    pub(crate) compacted_batches_applied: u64,
    pub(crate) partial_batches_ignored: u64,
    pub(crate) unframed_records: u64,
    pub(crate) skipped_records: u64,
}

impl Assembler {
    /// An assembler that records applied source offsets at or above `floor` only.
    pub(crate) fn with_floor(floor: i64) -> Assembler {
        Assembler {
            floor: floor.max(0),
            ..Assembler::default()
        }
    }

    pub(crate) fn push(
        &mut self,
        offset: i64,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        kind: Kind,
    ) {
        match kind {
            Kind::Abort(batch) => {
                if let Some(p) = self.take(batch) {
                    self.settle(batch, p, Settle::Ignore);
                } else if let Some(src) = self.compacted_sources.remove(&batch) {
                    // Applied as thinned out by compaction, then marked aborted by its
                    // writer (the changelog refused it part-way): its task failed, so
                    // its offset must not count as applied. The writer wrote the valid
                    // values of its keys right after the marker.
                    self.applied_sources.remove(&src);
                }
            }
            Kind::Unframed => match key {
                Some(key) => {
                    self.unframed_records += 1;
                    self.emit(offset, key, value);
                }
                None => self.skipped_records += 1,
            },
            Kind::Framed(frame) => match key {
                Some(key) => self.push_framed(offset, key, value, frame),
                None => self.skipped_records += 1,
            },
        }
    }

    fn push_framed(&mut self, offset: i64, key: Vec<u8>, value: Option<Vec<u8>>, f: Frame) {
        let mut writer = None;
        if let Some((w, s)) = f.seq {
            if let Some(prev) = self.last_writer.filter(|prev| *prev != w) {
                // The partition changed hands: the previous writer's unfinished batches
                // were not aborted by the new owner's restore, so compaction thinned them.
                self.settle_writer_range(prev, u64::MAX);
            }
            self.last_writer = Some(w);
            let max = self.max_seq.entry(w).or_insert(s);
            *max = (*max).max(s);
            // Batches of this writer that ended before this record were written in full.
            self.settle_writer_range(w, s);
            writer = s
                .checked_sub(u64::from(f.index))
                .and_then(|base| base.checked_add(u64::from(f.size) - 1))
                .map(|last| (w, last));
        }
        if f.size == 1 && !self.pending.contains_key(&f.batch) {
            self.batches_applied += 1;
            if f.src_offset >= self.floor {
                self.applied_sources.insert(f.src_offset);
            }
            self.emit(offset, key, value);
            return;
        }
        let batch = f.batch;
        let p = self.pending.entry(batch).or_insert_with(|| Pending {
            src_offset: f.src_offset,
            size: f.size,
            first_offset: offset,
            writer,
            records: BTreeMap::new(),
        });
        if p.records.is_empty() {
            if let Some((w, last)) = p.writer {
                self.by_writer.insert((w, last, batch));
            }
        }
        if p.records.contains_key(&f.index) {
            return; // a duplicate (non-idempotent producer retry)
        }
        self.watch
            .entry(key.clone())
            .or_insert(Watch {
                refs: 0,
                last_applied: -1,
            })
            .refs += 1;
        p.records.insert(f.index, Rec { offset, key, value });
        if p.records.len() >= p.size as usize {
            if let Some(p) = self.take(batch) {
                self.settle(batch, p, Settle::Complete);
            }
        }
    }

    /// Settles, as compacted, the pending batches of `writer` whose last record's
    /// sequence number is below `below`.
    fn settle_writer_range(&mut self, writer: u64, below: u64) {
        let done: Vec<u64> = self
            .by_writer
            .range((writer, 0, 0)..(writer, below, 0))
            .map(|(_, _, batch)| *batch)
            .collect();
        for batch in done {
            if let Some(p) = self.take(batch) {
                self.settle(batch, p, Settle::Compacted);
            }
        }
        if below == u64::MAX {
            // `range` excludes `(writer, u64::MAX, _)`.
            let rest: Vec<u64> = self
                .by_writer
                .range((writer, u64::MAX, 0)..=(writer, u64::MAX, u64::MAX))
                .map(|(_, _, b)| *b)
                .collect();
            for batch in rest {
                if let Some(p) = self.take(batch) {
                    self.settle(batch, p, Settle::Compacted);
                }
            }
        }
    }

    fn take(&mut self, batch: u64) -> Option<Pending> {
        let p = self.pending.remove(&batch)?;
        if let Some((w, last)) = p.writer {
            self.by_writer.remove(&(w, last, batch));
        }
        Some(p)
    }

    fn settle(&mut self, batch: u64, p: Pending, how: Settle) {
        match how {
            Settle::Complete => self.batches_applied += 1,
            Settle::Compacted => self.compacted_batches_applied += 1,
            Settle::Ignore => self.partial_batches_ignored += 1,
        }
        let apply = how != Settle::Ignore;
        if apply && p.src_offset >= self.floor {
            self.applied_sources.insert(p.src_offset);
            if how == Settle::Compacted {
                self.compacted_sources.insert(batch, p.src_offset);
            }
        }
        for rec in p.records.into_values() {
            let superseded = self
                .watch
                .get(&rec.key)
                .is_some_and(|w| w.last_applied > rec.offset);
            if apply && !superseded {
                self.emit(rec.offset, rec.key.clone(), rec.value);
            } else if !apply && !superseded {
                let at = self.dangling.entry(rec.key.clone()).or_insert(rec.offset);
                *at = (*at).max(rec.offset);
            }
            if let Some(w) = self.watch.get_mut(&rec.key) {
                w.refs -= 1;
                if w.refs == 0 {
                    self.watch.remove(&rec.key);
                }
            }
        }
    }

    fn emit(&mut self, offset: i64, key: Vec<u8>, value: Option<Vec<u8>>) {
        if let Some(w) = self.watch.get_mut(&key) {
            w.last_applied = w.last_applied.max(offset);
        }
        if self
            .dangling
            .get(&key)
            .is_some_and(|torn_at| offset > *torn_at)
        {
            self.dangling.remove(&key);
        }
        self.ops.push((key, value));
    }

    /// Settles what is still pending at the end of the changelog and returns the torn
    /// batches (to be marked aborted).
    pub(crate) fn finish(&mut self) -> Vec<u64> {
        let mut rest: Vec<(i64, u64)> = self
            .pending
            .iter()
            .map(|(b, p)| (p.first_offset, *b))
            .collect();
        rest.sort_unstable();
        let mut torn = Vec::new();
        for (_, batch) in rest {
            let Some(p) = self.take(batch) else { continue };
            let compacted = p
                .writer
                .is_some_and(|(w, last)| self.max_seq.get(&w).is_some_and(|max| last <= *max));
            if compacted {
                self.settle(batch, p, Settle::Compacted);
            } else {
                torn.push(batch);
                self.settle(batch, p, Settle::Ignore);
            }
        }
        torn
    }

    /// After [`finish`](Self::finish): keys whose newest record is an ignored one. Their
    /// valid value must be written again, or compaction may delete it.
    pub(crate) fn dangling_keys(&self) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = self.dangling.keys().cloned().collect();
        keys.sort_unstable();
        keys
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Complete,
    Compacted,
    Ignore,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{abort_marker_key, NO_TASK};
    use proptest::prelude::*;

    type State = BTreeMap<Vec<u8>, Vec<u8>>;

    /// A writer producing framed records the way `ChangelogWriter` does.
    struct Writer {
        id: u64,
        seq: u64,
        next_batch: u64,
    }

    #[derive(Clone, Debug)]
    struct Record {
        offset: i64,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        kind: Kind,
    }

    impl Writer {
        fn new(id: u64) -> Writer {
            Writer {
                id,
                seq: 0,
                next_batch: id << 32,
            }
        }
        fn batch(
            &mut self,
            log: &mut Vec<Record>,
            src: i64,
            muts: &[(&[u8], Option<&[u8]>)],
        ) -> u64 {
            self.next_batch += 1;
            let size = muts.len() as u32;
            for (i, (k, v)) in muts.iter().enumerate() {
                let offset = log.last().map_or(0, |r| r.offset + 1);
                log.push(Record {
                    offset,
                    key: k.to_vec(),
                    value: v.map(<[u8]>::to_vec),
                    kind: Kind::Framed(Frame {
                        src_offset: src,
                        batch: self.next_batch,
                        index: i as u32,
                        size,
                        seq: Some((self.id, self.seq)),
                    }),
                });
                self.seq += 1;
            }
            self.next_batch
        }
    }

    struct Replay {
        state: State,
        asm: Assembler,
        torn: Vec<u64>,
        dangling: Vec<Vec<u8>>,
    }

    fn replay(log: &[Record]) -> Replay {
        let mut asm = Assembler::default();
        for r in log {
            asm.push(r.offset, Some(r.key.clone()), r.value.clone(), r.kind);
        }
        let torn = asm.finish();
        let mut state = BTreeMap::new();
        for (k, v) in asm.ops.drain(..) {
            match v {
                Some(v) => state.insert(k, v),
                None => state.remove(&k),
            };
        }
        let dangling = asm.dangling_keys();
        Replay {
            state,
            asm,
            torn,
            dangling,
        }
    }

    /// What `restore` appends after a replay: abort markers, then the compensation batch
    /// from its own writer.
    fn restore_appends(log: &mut Vec<Record>, r: &Replay, writer_id: u64) {
        for batch in &r.torn {
            abort(log, *batch);
        }
        if !r.dangling.is_empty() {
            let values: Vec<(Vec<u8>, Option<Vec<u8>>)> = r
                .dangling
                .iter()
                .map(|k| (k.clone(), r.state.get(k).cloned()))
                .collect();
            let refs: Vec<(&[u8], Option<&[u8]>)> = values
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_deref()))
                .collect();
            Writer::new(writer_id).batch(log, NO_TASK, &refs);
        }
    }

    /// Kafka compaction of the records below offset `cut` (the active segment is never
    /// cleaned): a record goes when a later record has its key; with
    /// `drop_tombstones`, a tombstone that is the newest of its key goes too (after
    /// `delete.retention.ms`). Offsets are unchanged.
    fn compact(log: &[Record], cut: i64, drop_tombstones: bool) -> Vec<Record> {
        let mut newest: HashMap<&[u8], i64> = HashMap::new();
        for r in log {
            newest.insert(&r.key, r.offset);
        }
        log.iter()
            .filter(|r| {
                r.offset >= cut
                    || (newest.get(r.key.as_slice()) == Some(&r.offset)
                        && (r.value.is_some() || !drop_tombstones))
            })
            .cloned()
            .collect()
    }

    /// Kafka's cleaner as it runs while the partition is live: only records below `cut`
    /// (older than the active segment and `min.compaction.lag.ms`) are cleaned, and only
    /// records below `cut` can supersede them.
    fn clean_below(log: &mut Vec<Record>, cut: i64, drop_tombstones: bool) {
        let mut newest: HashMap<Vec<u8>, i64> = HashMap::new();
        for r in log.iter().filter(|r| r.offset < cut) {
            newest.insert(r.key.clone(), r.offset);
        }
        log.retain(|r| {
            r.offset >= cut
                || (newest.get(&r.key) == Some(&r.offset)
                    && (r.value.is_some() || !drop_tombstones))
        });
    }

    fn abort(log: &mut Vec<Record>, batch: u64) {
        let offset = log.last().map_or(0, |r| r.offset + 1);
        log.push(Record {
            offset,
            key: abort_marker_key(batch),
            value: Some(vec![]),
            kind: Kind::Abort(batch),
        });
    }

    fn map(entries: &[(&[u8], &[u8])]) -> State {
        entries
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn batches_below_the_floor_are_applied_but_not_recorded() {
        let mut log = Vec::new();
        let mut w = Writer::new(1);
        for src in 0..4 {
            w.batch(
                &mut log,
                src,
                &[(b"k", Some(&[src as u8][..])), (b"j", None)],
            );
        }
        let mut asm = Assembler::with_floor(2);
        for r in &log {
            asm.push(r.offset, Some(r.key.clone()), r.value.clone(), r.kind);
        }
        assert!(asm.finish().is_empty());
        assert_eq!(asm.batches_applied, 4);
        assert_eq!(asm.applied_sources, BTreeSet::from([2, 3]));
        assert_eq!(asm.ops.last(), Some(&(b"j".to_vec(), None)));
    }

    /// A restore that fails part-way has written some of its ops; the retry replays the
    /// same records from the same offset over that state and must end where a single
    /// replay ends.
    #[test]
    fn a_retried_replay_over_a_partly_restored_state_ends_the_same() {
        let mut log = Vec::new();
        let mut w1 = Writer::new(1);
        w1.batch(&mut log, 0, &[(b"a", Some(b"1")), (b"b", Some(b"1"))]);
        w1.batch(&mut log, 1, &[(b"a", Some(b"2")), (b"c", Some(b"1"))]);
        let mut w2 = Writer::new(2);
        w2.batch(&mut log, 2, &[(b"b", None), (b"c", Some(b"2"))]);
        w2.batch(&mut log, 3, &[(b"a", Some(b"3")), (b"d", Some(b"1"))]);
        log.pop(); // torn tail
        let log = compact(&log, 4, false);
        let expected = replay(&log).state;
        let apply = |state: &mut State, ops: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>| {
            for (k, v) in ops.drain(..) {
                match v {
                    Some(v) => state.insert(k, v),
                    None => state.remove(&k),
                };
            }
        };
        for stop in 0..=log.len() {
            // The failed attempt: the ops of the records it got to, written locally.
            let mut first = Assembler::default();
            for r in &log[..stop] {
                first.push(r.offset, Some(r.key.clone()), r.value.clone(), r.kind);
            }
            let mut state = State::new();
            apply(&mut state, &mut first.ops);
            // The retry, from the same offset, over that state.
            let mut retry = Assembler::default();
            for r in &log {
                retry.push(r.offset, Some(r.key.clone()), r.value.clone(), r.kind);
            }
            retry.finish();
            apply(&mut state, &mut retry.ops);
            assert_eq!(
                state, expected,
                "first attempt stopped after {stop} records"
            );
        }
    }

    #[test]
    fn torn_tail_is_ignored_and_reported() {
        let mut log = Vec::new();
        let mut w = Writer::new(1);
        w.batch(&mut log, 0, &[(b"a", Some(b"1")), (b"b", Some(b"1"))]);
        w.batch(&mut log, 1, &[(b"a", Some(b"2")), (b"c", Some(b"2"))]);
        log.pop(); // the crash
        let r = replay(&log);
        assert_eq!(r.state, map(&[(b"a", b"1"), (b"b", b"1")]));
        assert_eq!(r.torn.len(), 1);
        assert_eq!(r.asm.partial_batches_ignored, 1);
        assert_eq!(r.asm.applied_sources, BTreeSet::from([0]));
        // "a"=2 is the newest record of "a": "a"=1 must be written again.
        assert_eq!(r.dangling, vec![b"a".to_vec()]);
    }

    #[test]
    fn torn_record_does_not_let_compaction_delete_the_valid_value() {
        let mut log = Vec::new();
        let mut w1 = Writer::new(1);
        w1.batch(&mut log, 0, &[(b"k", Some(b"valid"))]);
        w1.batch(&mut log, 1, &[(b"k", None), (b"z", None)]);
        log.pop();
        let r = replay(&log);
        restore_appends(&mut log, &r, 100);
        let mut w2 = Writer::new(2);
        w2.batch(&mut log, 2, &[(b"other", Some(b"x"))]);
        let end = log.len() as i64;
        let r = replay(&compact(&log, end, true));
        assert_eq!(r.state, map(&[(b"k", b"valid"), (b"other", b"x")]));
        assert!(r.torn.is_empty() && r.dangling.is_empty());
    }

    #[test]
    fn aborted_batch_stays_ignored_after_the_next_owner_writes() {
        let mut log = Vec::new();
        let mut w1 = Writer::new(1);
        w1.batch(&mut log, 0, &[(b"a", Some(b"1"))]);
        let torn = w1.batch(&mut log, 1, &[(b"a", Some(b"2")), (b"b", Some(b"2"))]);
        log.pop();
        let r = replay(&log);
        assert_eq!(r.torn, vec![torn]);
        restore_appends(&mut log, &r, 100);
        let mut w2 = Writer::new(2);
        w2.batch(&mut log, 1, &[(b"c", Some(b"redo"))]);
        let r = replay(&log);
        assert_eq!(r.state, map(&[(b"a", b"1"), (b"c", b"redo")]));
        assert!(r.torn.is_empty() && r.dangling.is_empty());
        assert_eq!(r.asm.partial_batches_ignored, 1);
        assert_eq!(r.asm.applied_sources, BTreeSet::from([0, 1]));
    }

    #[test]
    fn compacted_batches_are_applied_in_log_order() {
        let mut log = Vec::new();
        let mut w1 = Writer::new(1);
        w1.batch(
            &mut log,
            0,
            &[(b"counter", Some(b"1")), (b"user/x", Some(b"x"))],
        );
        w1.batch(
            &mut log,
            1,
            &[(b"counter", Some(b"2")), (b"user/y", Some(b"y"))],
        );
        let mut w2 = Writer::new(2);
        w2.batch(&mut log, 2, &[(b"counter", Some(b"3")), (b"user/x", None)]);
        w2.batch(
            &mut log,
            3,
            &[(b"user/z", Some(b"z")), (b"counter", Some(b"4"))],
        );
        let full = replay(&log).state;
        let compacted = compact(&log, log.len() as i64, false);
        assert!(compacted.len() < log.len());
        let r = replay(&compacted);
        assert_eq!(r.state, full);
        assert!(r.torn.is_empty());
        assert_eq!(r.asm.partial_batches_ignored, 0);
        assert!(r.asm.compacted_batches_applied > 0);
        // Batch 0 was compacted away entirely; it leaves no trace.
        assert_eq!(r.asm.applied_sources, BTreeSet::from([1, 2, 3]));
    }

    #[test]
    fn compaction_at_the_end_of_the_last_writer_is_not_a_torn_write() {
        let mut log = Vec::new();
        let mut w = Writer::new(1);
        w.batch(&mut log, 0, &[(b"a", Some(b"1")), (b"b", Some(b"1"))]);
        w.batch(&mut log, 1, &[(b"a", Some(b"2"))]);
        // Compaction drops "a"=1 (index 0 of the first batch); its last record survives.
        let r = replay(&compact(&log, 3, false));
        assert_eq!(r.state, map(&[(b"a", b"2"), (b"b", b"1")]));
        assert!(r.torn.is_empty());
    }

    #[test]
    fn records_without_headers_are_applied_one_by_one() {
        let log = vec![
            Record {
                offset: 0,
                key: b"k".to_vec(),
                value: Some(b"v".to_vec()),
                kind: Kind::Unframed,
            },
            Record {
                offset: 1,
                key: b"j".to_vec(),
                value: Some(b"w".to_vec()),
                kind: Kind::Unframed,
            },
            Record {
                offset: 2,
                key: b"k".to_vec(),
                value: None,
                kind: Kind::Unframed,
            },
        ];
        let r = replay(&log);
        assert_eq!(r.state, map(&[(b"j", b"w")]));
        assert_eq!(r.asm.unframed_records, 3);
    }

    type Muts = Vec<(u8, Option<u8>)>;

    #[derive(Debug, Clone)]
    enum Step {
        Batch(Muts),
        /// The process crashes part-way through a batch (keeping that many records); the
        /// next owner restores (marking and compensating), then writes with a new writer.
        Crash(Muts, usize),
        /// librdkafka refuses a record part-way through a batch: the writer marks the batch
        /// aborted itself and keeps writing; the processor rebuilds the partition.
        EnqueueFailure(Muts, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        let muts = proptest::collection::vec((0u8..6, proptest::option::of(0u8..4)), 1..4);
        prop_oneof![
            6 => muts.clone().prop_map(Step::Batch),
            1 => (muts.clone(), 0usize..3).prop_map(|(m, keep)| Step::Crash(m, keep)),
            1 => (muts, 1usize..3).prop_map(|(m, keep)| Step::EnqueueFailure(m, keep)),
        ]
    }

    fn dedup(m: Muts) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut seen = BTreeMap::new();
        for (k, v) in m {
            seen.insert(vec![k], v.map(|v| vec![v]));
        }
        seen.into_iter().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Whatever the sequence of owners, crashes, torn batches and compaction, the
        /// restored state is the state made of the complete batches, applied in order.
        #[test]
        fn restore_equals_model_with_crashes_and_compaction(
            steps in proptest::collection::vec(step(), 1..40),
            cut_fraction in 0.0f64..=1.0,
            mid_cut_fraction in 0.0f64..=1.0,
            drop_tombstones: bool,
        ) {
            let mut log = Vec::new();
            let mut model = State::new();
            let mut next_writer = 1;
            let mut writer = Writer::new(next_writer);
            let mut completed = BTreeSet::new();
            for (src, step) in steps.into_iter().enumerate() {
                let src = src as i64;
                let (m, keep, crash) = match step {
                    Step::Batch(m) => (dedup(m), usize::MAX, true),
                    Step::Crash(m, keep) => (dedup(m), keep, true),
                    Step::EnqueueFailure(m, keep) => (dedup(m), keep, false),
                };
                if keep >= m.len() {
                    // Nothing was lost: an ordinary complete batch.
                    let refs: Vec<(&[u8], Option<&[u8]>)> = m.iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect();
                    writer.batch(&mut log, src, &refs);
                    completed.insert(src);
                    for (k, v) in m {
                        match v { Some(v) => { model.insert(k, v); } None => { model.remove(&k); } }
                    }
                    continue;
                }
                let refs: Vec<(&[u8], Option<&[u8]>)> = m[..keep].iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect();
                // Before this batch, the cleaner may have run on older records.
                let torn_at = log.last().map_or(0, |r| r.offset + 1);
                clean_below(&mut log, (torn_at as f64 * mid_cut_fraction) as i64, drop_tombstones);
                let batch = writer.batch(&mut log, src, &refs);
                // The batch announced all its records.
                for r in log.iter_mut().rev().take(keep) {
                    if let Kind::Framed(f) = &mut r.kind { f.size = m.len() as u32; }
                }
                writer.seq += (m.len() - keep) as u64;
                if crash {
                    // The next owner restores: it finds the torn tail.
                    let r = replay(&log);
                    if keep > 0 {
                        prop_assert_eq!(&r.torn, &vec![batch]);
                    }
                    prop_assert_eq!(&r.state, &model);
                    next_writer += 1;
                    restore_appends(&mut log, &r, 1000 + next_writer);
                    writer = Writer::new(next_writer);
                } else {
                    // The writer marks the batch itself and stays in use; the processor
                    // rebuilds the partition with a restore (which compensates).
                    abort(&mut log, batch);
                    let r = replay(&log);
                    prop_assert_eq!(&r.state, &model);
                    next_writer += 1;
                    restore_appends(&mut log, &r, 1000 + next_writer);
                }
            }
            // The last restore pass, then compaction of everything below the cut.
            let r = replay(&log);
            prop_assert_eq!(&r.state, &model);
            restore_appends(&mut log, &r, 5000);
            let end = log.last().map_or(0, |r| r.offset + 1);
            let cut = (end as f64 * cut_fraction) as i64;
            let compacted = compact(&log, cut, drop_tombstones);
            let r = replay(&compacted);
            prop_assert!(r.torn.is_empty(), "torn {:?}", r.torn);
            prop_assert!(r.dangling.is_empty(), "dangling {:?}", r.dangling);
            prop_assert_eq!(&r.state, &model);
            prop_assert_eq!(r.asm.skipped_records, 0);
            if cut == 0 && mid_cut_fraction == 0.0 {
                prop_assert_eq!(&r.asm.applied_sources, &completed);
            } else {
                prop_assert!(r.asm.applied_sources.is_subset(&completed));
            }
        }
    }
}
