//! Restore: replaying a changelog partition into a partition's local store.
//!
//! A new owner of a partition reads the changelog partition from the store's checkpoint
//! (or from the beginning) up to the high watermark taken when the restore starts, and
//! applies the writes of **complete task batches** only. The reasoning:
//!
//! * A task's writes reach the changelog as one batch of records (see the changelog
//!   module for the headers). A writer that crashes part-way leaves a *torn* batch: its
//!   first records, not the rest. Applying them would hand the redelivered task a state
//!   with half of its own earlier effects, so a torn batch is ignored — the task runs
//!   again against state that has none of them.
//! * A complete batch's source offset is recorded ([`RestoreReport::applied_source_offsets`]),
//!   so the processor skips a redelivered task whose effects are already in the state.
//!
//! Log compaction complicates "complete": it deletes a record once its key was written
//! again, so an old, complete batch may have lost some of its records. Such a batch must
//! be applied (its surviving records are still the newest values of their keys), while a
//! torn one must not. The writer numbers its records per partition (`dt_writer`,
//! `dt_seq`), and a batch with missing records is judged like this:
//!
//! 1. An **abort marker** for it follows: torn, ignore.
//! 2. A later record from the same writer has a higher sequence number than the batch's
//!    last record: the missing records were written, and compaction removed them —
//!    apply what is left.
//! 3. Records of *another* writer follow (the partition changed hands): the next owner's
//!    restore would have appended abort markers for torn batches before it wrote
//!    anything, and none came, so it was compaction — apply.
//! 4. The changelog ends inside the batch's writer, with the batch's last record never
//!    written: torn, ignore, and append an abort marker so that rule 1 covers it once
//!    later batches follow.
//!
//! Batches applied late (rules 2 and 3) skip any key that a later record has already
//! written, so the store ends as if every record had been applied in log order.
//!
//! A torn record is also dangerous to compaction: it is the newest record of its key, so
//! the cleaner may delete the valid value before it. After marking torn batches, the
//! restore therefore appends a **compensation batch** (its own writer, `dt_src_offset` =
//! -1) that writes again the restored value, or a tombstone, of every key whose newest
//! record is an ignored one. The changelog topic's `min.compaction.lag.ms` keeps the
//! cleaner away from the torn records until then.
//!
//! Records without the headers (written by something else) are applied one by one, and
//! counted. Batches with the batch headers but without `dt_writer`/`dt_seq` are applied
//! only when complete.
//!
//! Limits: a batch that compaction removed entirely leaves no source offset behind (the
//! processor only needs offsets at or above its committed offset, which are recent).
//! librdkafka's idempotent producer keeps a partition's records in order and gapless,
//! except when a record times out (`message.timeout.ms`) while later ones get through: a
//! batch torn that way and followed by later batches of the same writer looks compacted
//! and is applied partially. The failed append reports it, and the processor must then
//! rebuild the partition from the changelog. Two owners writing one changelog partition
//! at once (a zombie) are not told apart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::changelog::{blocking, client_config, headers, ChangelogWriter};
use crate::store::{Mutation, PartitionStore};
use crate::StateError;

/// Local writes are collected into atomic batches of this many records.
const FLUSH_EVERY: usize = 16 * 1024;
/// A progress line every this many records.
const PROGRESS_EVERY: u64 = 100_000;
/// `dt_src_offset` of records that no task wrote (a restore's compensation batch).
const NO_TASK: i64 = -1;
/// At or past the start watermark, this long without a record ends the restore.
const TAIL_QUIET: Duration = Duration::from_millis(500);
/// A restore that receives nothing for this long gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a [`restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Changelog records read (including ignored and marker records).
    pub records_read: u64,
    /// Complete batches applied.
    pub batches_applied: u64,
    /// Batches with records missing because compaction removed them, applied.
    pub compacted_batches_applied: u64,
    /// Torn batches (a crashed writer's partial batch) ignored.
    pub partial_batches_ignored: u64,
    /// Records without batch headers, applied one by one.
    pub unframed_records: u64,
    /// Records that could not be applied at all (no key).
    pub skipped_records: u64,
    /// Abort markers this restore appended for torn batches at the end of the changelog.
    pub abort_markers_written: u64,
    /// Records this restore appended to write again the valid value (or a tombstone) of
    /// keys whose newest changelog record belonged to a torn batch.
    pub compensation_records_written: u64,
    /// The offset the restore started reading at.
    pub start_offset: i64,
    /// The first changelog offset not read: where a later restore of this store resumes.
    pub next_offset: i64,
    /// The checkpoint offset was outside the changelog (the topic was recreated or
    /// truncated), so the local store was emptied and restored from the beginning.
    pub checkpoint_discarded: bool,
    /// Source offsets whose task batch this restore applied.
    pub applied_source_offsets: BTreeSet<i64>,
    /// Wall time of the restore.
    pub elapsed: Duration,
}

/// Replays partition `partition` of `changelog_topic` into `store`, from `from_offset`
/// (the checkpoint of [`OpenReport::restore_from`](crate::internal::OpenReport::restore_from))
/// or from the beginning, up to the high watermark at the start. Adds the applied source
/// offsets to the store's [`applied_source_offsets`](PartitionStore::applied_source_offsets).
///
/// Uses a plain consumer with `assign` (never joins a group, never commits); the `kafka` settings pass
/// through to it and to the producer of abort markers. Call it before processing any task
/// of the partition, and do not write the store while it runs.
pub async fn restore(
    store: &PartitionStore,
    bootstrap: &str,
    kafka: &BTreeMap<String, String>,
    changelog_topic: &str,
    partition: i32,
    from_offset: Option<i64>,
) -> Result<RestoreReport, StateError> {
    let started = Instant::now();
    // Big fetches suit a replay; the pass-through settings may still say otherwise.
    let mut with_defaults = BTreeMap::from([(
        "max.partition.fetch.bytes".to_string(),
        "16777216".to_string(),
    )]);
    with_defaults.extend(kafka.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut consumer_cfg = client_config(bootstrap, &with_defaults);
    // librdkafka's assign() needs a group handle, so a group id is set, but the consumer
    // never joins (no subscribe) and never commits.
    consumer_cfg
        .set("group.id", format!("{changelog_topic}-restore"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "100");
    let Replayed {
        mut report,
        torn,
        dangling,
        tail_ops,
    } = {
        let store = store.clone();
        let topic = changelog_topic.to_string();
        blocking(move || replay(&store, &consumer_cfg, &topic, partition, from_offset)).await?
    };
    store.write_restored(&tail_ops)?;

    if !torn.is_empty() || !dangling.is_empty() {
        // Mark the torn batches, then write again the valid values of the keys their
        // records touched: compaction would otherwise keep the torn record as the newest
        // of its key and delete the valid one before it.
        let compensation = dangling
            .into_iter()
            .map(|key| {
                Ok(Mutation {
                    value: store.get(&key)?,
                    key,
                })
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        let writer = ChangelogWriter::new(bootstrap, kafka)?;
        let markers = writer.enqueue_abort_markers(changelog_topic, partition, &torn)?;
        let rewrite = writer.enqueue(changelog_topic, partition, NO_TASK, &compensation)?;
        for last in [markers.wait().await?, rewrite.wait().await?]
            .into_iter()
            .flatten()
        {
            report.next_offset = report.next_offset.max(last + 1);
        }
        report.abort_markers_written = torn.len() as u64;
        report.compensation_records_written = compensation.len() as u64;
        tracing::info!(
            store = store.label(),
            changelog = changelog_topic,
            partition,
            torn = torn.len(),
            rewritten_keys = compensation.len(),
            "marked torn changelog batches as aborted"
        );
    }

    store.add_applied(&report.applied_source_offsets);
    report.elapsed = started.elapsed();
    metrics::histogram!(
        "decaton_state_restore_seconds",
        "subscription" => store.subscription().to_string(),
        "topic" => store.topic().to_string(),
        "partition" => store.partition().to_string(),
    )
    .record(report.elapsed.as_secs_f64());
    tracing::info!(
        store = store.label(),
        changelog = changelog_topic,
        partition,
        records = report.records_read,
        batches = report.batches_applied,
        compacted = report.compacted_batches_applied,
        torn = report.partial_batches_ignored,
        unframed = report.unframed_records,
        next_offset = report.next_offset,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "state restored"
    );
    Ok(report)
}

/// The blocking part: consume, reassemble, write locally. Returns the report and the
/// torn batches that need abort markers.
struct Replayed {
    report: RestoreReport,
    /// Torn batches at the end of the changelog, to be marked aborted.
    torn: Vec<u64>,
    /// Keys whose newest changelog record is an ignored one.
    dangling: Vec<Vec<u8>>,
    /// Local writes decided at the very end (batches thinned by compaction).
    tail_ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn replay(
    store: &PartitionStore,
    cfg: &rdkafka::ClientConfig,
    topic: &str,
    partition: i32,
    from_offset: Option<i64>,
) -> Result<Replayed, StateError> {
    let consumer: BaseConsumer = cfg.create()?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(30))
        .map_err(|e| StateError::Changelog {
            topic: topic.to_string(),
            detail: format!("watermarks of partition {partition}: {e}"),
        })?;
    let mut report = RestoreReport::default();
    let discard = |report: &mut RestoreReport, why: &str| -> Result<(), StateError> {
        tracing::warn!(
            store = store.label(),
            changelog = topic,
            partition,
            "{why}: restoring from the beginning"
        );
        store.clear_local()?;
        report.checkpoint_discarded = true;
        Ok(())
    };
    let start = match from_offset {
        Some(offset) if offset < low => {
            discard(
                &mut report,
                &format!("checkpoint offset {offset} is before the changelog's start {low}"),
            )?;
            low
        }
        Some(offset) => offset,
        None => low,
    };
    match consume(store, &consumer, topic, partition, start, high, &mut report)? {
        Consumed::Done(asm) => Ok(finish(store, topic, partition, report, *asm)),
        Consumed::OutOfRange if from_offset.is_some() && !report.checkpoint_discarded => {
            // The checkpoint points past the changelog's end: the topic was recreated
            // or truncated, so the local data belongs to another history.
            discard(
                &mut report,
                &format!("checkpoint offset {start} is outside the changelog"),
            )?;
            match consume(store, &consumer, topic, partition, low, high, &mut report)? {
                Consumed::Done(asm) => Ok(finish(store, topic, partition, report, *asm)),
                Consumed::OutOfRange => Err(StateError::Changelog {
                    topic: topic.to_string(),
                    detail: format!("partition {partition}: offset {low} out of range"),
                }),
            }
        }
        Consumed::OutOfRange => Err(StateError::Changelog {
            topic: topic.to_string(),
            detail: format!("partition {partition}: offset {start} out of range"),
        }),
    }
}

enum Consumed {
    Done(Box<Assembler>),
    OutOfRange,
}

/// Reads from `start` to the end and feeds the records through an [`Assembler`],
/// writing the local store as it goes.
///
/// The end is the high watermark taken at the start, but some brokers (Tansu 0.6)
/// report a watermark below the last record of the last produce batch. So reaching the
/// watermark is not the end by itself: the end is an end-of-partition event at or past
/// it, or, for a broker whose event never comes, a short quiet spell after it.
fn consume(
    store: &PartitionStore,
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    start: i64,
    high: i64,
    report: &mut RestoreReport,
) -> Result<Consumed, StateError> {
    report.start_offset = start;
    report.next_offset = start;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&tpl)?;

    let counter = metrics::counter!(
        "decaton_state_restored_records_total",
        "subscription" => store.subscription().to_string(),
        "topic" => store.topic().to_string(),
        "partition" => store.partition().to_string(),
    );
    let mut asm = Assembler::default();
    let mut unflushed = 0u64;
    let mut last_message = Instant::now();
    let mut last_error_log: Option<Instant> = None;
    let started = Instant::now();
    let at_end = |next: i64| next >= high;
    loop {
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Ok(msg)) => {
                last_message = Instant::now();
                let offset = msg.offset();
                report.records_read += 1;
                report.next_offset = report.next_offset.max(offset + 1);
                unflushed += 1;
                let kind = classify(
                    msg.headers()
                        .into_iter()
                        .flat_map(|h| h.iter())
                        .map(|h| (h.key, h.value)),
                );
                asm.push(
                    offset,
                    msg.key().map(<[u8]>::to_vec),
                    msg.payload().map(<[u8]>::to_vec),
                    kind,
                );
                if asm.ops.len() >= FLUSH_EVERY {
                    store.write_restored(&asm.ops)?;
                    asm.ops.clear();
                    counter.increment(std::mem::take(&mut unflushed));
                }
                if report.records_read % PROGRESS_EVERY == 0 {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    tracing::info!(
                        store = store.label(),
                        changelog = topic,
                        partition,
                        records = report.records_read,
                        offset,
                        high_watermark = high,
                        records_per_sec = (report.records_read as f64 / secs) as u64,
                        "restoring state"
                    );
                }
                continue;
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                let position = consumer.position().ok().and_then(|tpl| {
                    tpl.find_partition(topic, partition)
                        .and_then(|p| p.offset().to_raw())
                });
                // Nothing consumed yet: the position is unknown, and the start is it.
                let position = position.unwrap_or(report.next_offset);
                if at_end(position) {
                    report.next_offset = report.next_offset.max(position);
                    break;
                }
            }
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) if report.records_read == 0 => {
                return Ok(Consumed::OutOfRange);
            }
            Some(Err(KafkaError::MessageConsumption(
                code @ (RDKafkaErrorCode::AutoOffsetReset
                | RDKafkaErrorCode::OffsetOutOfRange
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed),
            ))) => {
                return Err(StateError::Changelog {
                    topic: topic.to_string(),
                    detail: format!("reading partition {partition} from offset {start}: {code}"),
                });
            }
            Some(Err(e)) if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) => {
                tracing::warn!(
                    store = store.label(),
                    changelog = topic,
                    partition,
                    "restore consumer: {e}"
                );
                last_error_log = Some(Instant::now());
            }
            Some(Err(_)) => {}
        }
        let quiet = last_message.elapsed();
        if at_end(report.next_offset) && quiet > TAIL_QUIET {
            break;
        }
        if quiet > STALL_TIMEOUT {
            return Err(StateError::Timeout(format!(
                "restore of {topic}[{partition}] received nothing for {STALL_TIMEOUT:?} (at offset {} of {high})",
                report.next_offset
            )));
        }
    }
    store.write_restored(&asm.ops)?;
    asm.ops.clear();
    counter.increment(unflushed);
    Ok(Consumed::Done(Box::new(asm)))
}

/// Settles what is left at the end of the changelog and fills in the report.
fn finish(
    store: &PartitionStore,
    topic: &str,
    partition: i32,
    mut report: RestoreReport,
    mut asm: Assembler,
) -> Replayed {
    let torn = asm.finish();
    // `finish` may apply compacted batches; `restore` writes them with the compensation.
    let tail_ops = std::mem::take(&mut asm.ops);
    if asm.unframed_records > 0 {
        tracing::warn!(
            store = store.label(),
            changelog = topic,
            partition,
            "{} changelog records had no batch headers and were applied one by one",
            asm.unframed_records
        );
    }
    report.batches_applied = asm.batches_applied;
    report.compacted_batches_applied = asm.compacted_batches_applied;
    report.partial_batches_ignored = asm.partial_batches_ignored;
    report.unframed_records = asm.unframed_records;
    report.skipped_records = asm.skipped_records;
    report.applied_source_offsets = std::mem::take(&mut asm.applied_sources);
    Replayed {
        report,
        torn,
        dangling: asm.dangling_keys(),
        tail_ops,
    }
}

// ---------------------------------------------------------------------------------------
// Reassembling batches.

/// The batch framing of one changelog record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) src_offset: i64,
    pub(crate) batch: u64,
    pub(crate) index: u32,
    pub(crate) size: u32,
    /// `(dt_writer, dt_seq)` when present.
    pub(crate) seq: Option<(u64, u64)>,
}

/// What a changelog record is, by its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Framed(Frame),
    Unframed,
    Abort(u64),
}

fn be<const N: usize>(v: Option<&[u8]>) -> Option<[u8; N]> {
    v.and_then(|v| <[u8; N]>::try_from(v).ok())
}

/// Classifies a record by its headers.
pub(crate) fn classify<'a>(hdrs: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>) -> Kind {
    let (mut src, mut batch, mut index, mut size, mut writer, mut seq) =
        (None, None, None, None, None, None);
    for (key, value) in hdrs {
        match key {
            headers::SRC_OFFSET => src = be::<8>(value).map(i64::from_be_bytes),
            headers::BATCH => batch = be::<8>(value).map(u64::from_be_bytes),
            headers::BATCH_INDEX => index = be::<4>(value).map(u32::from_be_bytes),
            headers::BATCH_SIZE => size = be::<4>(value).map(u32::from_be_bytes),
            headers::WRITER => writer = be::<8>(value).map(u64::from_be_bytes),
            headers::SEQ => seq = be::<8>(value).map(u64::from_be_bytes),
            headers::ABORT => {
                if let Some(b) = be::<8>(value).map(u64::from_be_bytes) {
                    return Kind::Abort(b);
                }
            }
            _ => {}
        }
    }
    match (src, batch, index, size) {
        (Some(src_offset), Some(batch), Some(index), Some(size)) if index < size => {
            Kind::Framed(Frame {
                src_offset,
                batch,
                index,
                size,
                seq: writer.zip(seq),
            })
        }
        _ => Kind::Unframed,
    }
}

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
    pending: HashMap<u64, Pending>,
    /// Pending batches by `(writer, last seq, batch)`.
    by_writer: BTreeSet<(u64, u64, u64)>,
    max_seq: HashMap<u64, u64>,
    last_writer: Option<u64>,
    watch: HashMap<Vec<u8>, Watch>,
    /// Keys last written by an ignored (torn) record, with that record's offset: until a
    /// later record writes them again, compaction may delete their valid older value.
    dangling: HashMap<Vec<u8>, i64>,
    pub(crate) ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub(crate) applied_sources: BTreeSet<i64>,
    pub(crate) batches_applied: u64,
    pub(crate) compacted_batches_applied: u64,
    pub(crate) partial_batches_ignored: u64,
    pub(crate) unframed_records: u64,
    pub(crate) skipped_records: u64,
}

impl Assembler {
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
                    self.settle(p, Settle::Ignore);
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
            if f.src_offset >= 0 {
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
                self.settle(p, Settle::Complete);
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
                self.settle(p, Settle::Compacted);
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
                    self.settle(p, Settle::Compacted);
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

    fn settle(&mut self, p: Pending, how: Settle) {
        match how {
            Settle::Complete => self.batches_applied += 1,
            Settle::Compacted => self.compacted_batches_applied += 1,
            Settle::Ignore => self.partial_batches_ignored += 1,
        }
        let apply = how != Settle::Ignore;
        if apply && p.src_offset >= 0 {
            self.applied_sources.insert(p.src_offset);
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
                self.settle(p, Settle::Compacted);
            } else {
                torn.push(batch);
                self.settle(p, Settle::Ignore);
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
    use crate::changelog::abort_marker_key;
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
    fn classify_reads_the_headers() {
        let src = 7i64.to_be_bytes();
        let batch = 9u64.to_be_bytes();
        let idx = 1u32.to_be_bytes();
        let size = 2u32.to_be_bytes();
        let hs: Vec<(&str, Option<&[u8]>)> = vec![
            (headers::SRC_OFFSET, Some(&src)),
            (headers::BATCH, Some(&batch)),
            (headers::BATCH_INDEX, Some(&idx)),
            (headers::BATCH_SIZE, Some(&size)),
        ];
        assert_eq!(
            classify(hs.iter().copied()),
            Kind::Framed(Frame {
                src_offset: 7,
                batch: 9,
                index: 1,
                size: 2,
                seq: None
            })
        );
        assert_eq!(classify(hs[..3].iter().copied()), Kind::Unframed);
        let bad = [(headers::BATCH_INDEX, Some(&b"\x01"[..]))];
        assert_eq!(
            classify(hs[..2].iter().copied().chain(bad).chain([hs[3]])),
            Kind::Unframed
        );
        assert_eq!(
            classify([(headers::ABORT, Some(&batch[..]))].into_iter()),
            Kind::Abort(9)
        );
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
