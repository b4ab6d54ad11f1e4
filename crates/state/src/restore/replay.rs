//! The blocking half of a restore: read the changelog partition from the start offset to
//! its end, feed the records through the [`Assembler`], and write the local store as it
//! goes.
//!
//! The end is the high watermark taken when the replay starts, but some brokers (Tansu
//! 0.6) report a watermark below the last record of the last produce batch. So reaching
//! the watermark is not the end by itself: the end is an end-of-partition event at or past
//! it, or, for a broker whose event never comes, a short quiet spell after it.
//!
//! A checkpoint the changelog cannot serve (before its start, or past its end: the topic
//! was recreated or truncated) empties the local store, and the replay starts over from
//! the beginning.

use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use decaton_protocol::headers::raw_headers;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::assembler::{Assembler, Ops};
use crate::record::classify;
use crate::store::PartitionStore;
use crate::StateError;

/// Counter of changelog records read by restores, labelled `subscription`, `topic` and
/// `partition` of the store's source partition. Only this crate counts it.
pub const RESTORED_RECORDS_TOTAL: &str = "decaton_state_restored_records_total";
/// Histogram of the wall time of restores in seconds, labelled like
/// [`RESTORED_RECORDS_TOTAL`].
pub const RESTORE_SECONDS: &str = "decaton_state_restore_seconds";

/// Local writes are collected into atomic batches of this many records. Kept small: sled
/// keeps every node version that one batch replaces until the whole batch is applied, so
/// the memory a batch holds grows with its length: restoring 1 000 000 writes of 100 000
/// keys peaked ~280 MiB higher with batches of 16 384 records than with 1 024, and was no
/// faster.
const FLUSH_EVERY: usize = 1024;
/// Batches of local writes that may wait for the writer thread.
const WRITES_QUEUED: usize = 2;
/// A progress line every this many records.
const PROGRESS_EVERY: u64 = 100_000;
/// At or past the start watermark, this long without a record ends the restore.
const TAIL_QUIET: Duration = Duration::from_millis(500);
/// Longest wait of one watermark query; queries repeat until the stall timeout.
const WATERMARK_QUERY: Duration = Duration::from_secs(1);

/// How far a replay got.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    /// Changelog records read (including ignored and marker records).
    pub(crate) records_read: u64,
    /// The offset the replay started reading at.
    pub(crate) start_offset: i64,
    /// The first changelog offset not read.
    pub(crate) next_offset: i64,
    /// The checkpoint could not be served, so the local store was emptied.
    pub(crate) checkpoint_discarded: bool,
}

/// What a replay leaves for the async half of the restore.
pub(crate) struct Replayed {
    pub(crate) progress: Progress,
    /// The assembler after [`Assembler::finish`]: its counters and applied offsets.
    pub(crate) asm: Box<Assembler>,
    /// Torn batches at the end of the changelog, to be marked aborted.
    pub(crate) torn: Vec<u64>,
    /// Keys whose newest changelog record is an ignored one.
    pub(crate) dangling: Vec<Vec<u8>>,
    /// Local writes decided at the very end (batches thinned by compaction).
    pub(crate) tail_ops: Ops,
}

/// Where a replay starts and what it records.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// The checkpoint offset, or `None` for the beginning.
    pub(crate) from_offset: Option<i64>,
    /// Applied batches below this source offset are not recorded as applied.
    pub(crate) floor: i64,
    /// How long the replay may go without any progress before it fails.
    pub(crate) stall_timeout: Duration,
}

/// Replays the changelog partition of `store` into it with a consumer made from `cfg`,
/// from the plan's offset (or the beginning) to the end.
///
/// Fails with [`StateError::Timeout`] when the broker gives nothing for the plan's stall
/// timeout, and with [`StateError::Closed`] soon after the store is fenced.
pub(crate) fn replay(
    store: &PartitionStore,
    cfg: &rdkafka::ClientConfig,
    plan: Plan,
) -> Result<Replayed, StateError> {
    let (topic, partition) = (store.changelog_topic(), store.partition());
    // An earlier attempt on this store emptied it: its checkpoint no longer applies.
    let from_offset = plan.from_offset.filter(|_| !store.emptied());
    let consumer: BaseConsumer = cfg.create()?;
    let (low, high) = watermarks(store, &consumer, plan.stall_timeout)?;
    let mut progress = Progress::default();
    let discard = |progress: &mut Progress, why: &str| -> Result<(), StateError> {
        tracing::warn!(
            store = store.label(),
            changelog = topic,
            partition,
            "{why}: restoring from the beginning"
        );
        store.clear_local()?;
        progress.checkpoint_discarded = true;
        Ok(())
    };
    let start = match from_offset {
        Some(offset) if offset < low => {
            discard(
                &mut progress,
                &format!("checkpoint offset {offset} is before the changelog's start {low}"),
            )?;
            low
        }
        Some(offset) => offset,
        None => low,
    };
    match consume(store, &consumer, start, high, plan, &mut progress)? {
        Consumed::Done(asm) => Ok(finish(store, progress, asm)),
        Consumed::OutOfRange if from_offset.is_some() && !progress.checkpoint_discarded => {
            // The checkpoint points past the changelog's end: the topic was recreated
            // or truncated, so the local data belongs to another history.
            discard(
                &mut progress,
                &format!("checkpoint offset {start} is outside the changelog"),
            )?;
            match consume(store, &consumer, low, high, plan, &mut progress)? {
                Consumed::Done(asm) => Ok(finish(store, progress, asm)),
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

/// The changelog partition's low and high watermarks. Queries that time out or find no
/// broker are repeated until `stall_timeout`; the fence is checked between them.
fn watermarks(
    store: &PartitionStore,
    consumer: &BaseConsumer,
    stall_timeout: Duration,
) -> Result<(i64, i64), StateError> {
    let (topic, partition) = (store.changelog_topic(), store.partition());
    let started = Instant::now();
    loop {
        store.check_open()?;
        let left = stall_timeout.saturating_sub(started.elapsed());
        let error = match consumer.fetch_watermarks(topic, partition, left.min(WATERMARK_QUERY)) {
            Ok(w) => return Ok(w),
            Err(e) => e,
        };
        let transient = matches!(
            error,
            KafkaError::MetadataFetch(
                RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::LeaderNotAvailable
                    | RDKafkaErrorCode::NotLeaderForPartition
            )
        );
        if !transient {
            return Err(StateError::Changelog {
                topic: topic.to_string(),
                detail: format!("watermarks of partition {partition}: {error}"),
            });
        }
        if started.elapsed() >= stall_timeout {
            return Err(StateError::Timeout(format!(
                "restore of {topic}[{partition}]: no watermarks after {stall_timeout:?} ({error})"
            )));
        }
        // A query that failed at once must not spin.
        std::thread::sleep(Duration::from_millis(50));
    }
}

enum Consumed {
    Done(Box<Assembler>),
    OutOfRange,
}

/// Reads from `start` to the end (see the module docs) and feeds the records through an
/// [`Assembler`], writing the local store as it goes.
///
/// The local writes run on a thread of their own, so reading the changelog and writing
/// the store overlap. At most [`WRITES_QUEUED`] batches of [`FLUSH_EVERY`] records wait
/// for it; the reader blocks when they do.
fn consume(
    store: &PartitionStore,
    consumer: &BaseConsumer,
    start: i64,
    high: i64,
    plan: Plan,
    progress: &mut Progress,
) -> Result<Consumed, StateError> {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Ops>(WRITES_QUEUED);
        let local = store.clone();
        let writer = std::thread::Builder::new()
            .name("decaton-restore-write".to_string())
            .spawn_scoped(scope, move || -> Result<(), StateError> {
                for ops in rx {
                    local.write_restored(&ops)?;
                }
                Ok(())
            })
            .map_err(|e| StateError::Internal(format!("restore writer thread: {e}")))?;
        let read = read(store, consumer, start, high, plan, progress, &tx);
        drop(tx);
        // A failed write closes the queue, which fails the read too: the write says why.
        writer
            .join()
            .unwrap_or_else(|_| Err(StateError::Internal("restore writer panicked".into())))?;
        read
    })
}

/// Hands a batch of local writes to the writer thread of [`consume`].
fn send(tx: &SyncSender<Ops>, ops: Ops) -> Result<(), StateError> {
    tx.send(ops)
        .map_err(|_| StateError::Internal("restore writer stopped".to_string()))
}

/// The reading half of [`consume`]: local writes go to `tx`, in order.
fn read(
    store: &PartitionStore,
    consumer: &BaseConsumer,
    start: i64,
    high: i64,
    plan: Plan,
    progress: &mut Progress,
    tx: &SyncSender<Ops>,
) -> Result<Consumed, StateError> {
    let (topic, partition) = (store.changelog_topic(), store.partition());
    progress.start_offset = start;
    progress.next_offset = start;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&tpl)?;

    let counter = metrics::counter!(
        RESTORED_RECORDS_TOTAL,
        "subscription" => store.subscription().to_string(),
        "topic" => store.topic().to_string(),
        "partition" => store.partition().to_string(),
    );
    let mut asm = Assembler::with_floor(plan.floor);
    let mut last_message = Instant::now();
    let mut last_error_log: Option<Instant> = None;
    let started = Instant::now();
    let at_end = |next: i64| next >= high;
    loop {
        // A fenced store (its partition was revoked) stops the restore between polls.
        store.check_open()?;
        match consumer.poll(Duration::from_millis(50)) {
            None => {}
            Some(Ok(msg)) => {
                last_message = Instant::now();
                let offset = msg.offset();
                progress.records_read += 1;
                progress.next_offset = progress.next_offset.max(offset + 1);
                counter.increment(1);
                // Changelog header names are ASCII: a name that is not UTF-8 is none of them.
                let kind = classify(
                    msg.headers()
                        .into_iter()
                        .flat_map(raw_headers)
                        .filter_map(|h| Some((std::str::from_utf8(h.name).ok()?, h.value))),
                );
                asm.push(
                    offset,
                    msg.key().map(<[u8]>::to_vec),
                    msg.payload().map(<[u8]>::to_vec),
                    kind,
                );
                if asm.ops.len() >= FLUSH_EVERY {
                    send(tx, std::mem::take(&mut asm.ops))?;
                }
                if progress.records_read % PROGRESS_EVERY == 0 {
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    tracing::info!(
                        store = store.label(),
                        changelog = topic,
                        partition,
                        records = progress.records_read,
                        offset,
                        high_watermark = high,
                        records_per_sec = (progress.records_read as f64 / secs) as u64,
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
                let position = position.unwrap_or(progress.next_offset);
                if at_end(position) {
                    progress.next_offset = progress.next_offset.max(position);
                    break;
                }
            }
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) if progress.records_read == 0 => {
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
        if at_end(progress.next_offset) && quiet > TAIL_QUIET {
            break;
        }
        if quiet > plan.stall_timeout {
            return Err(StateError::Timeout(format!(
                "restore of {topic}[{partition}] received nothing for {:?} (at offset {} of {high})",
                plan.stall_timeout,
                progress.next_offset
            )));
        }
    }
    send(tx, std::mem::take(&mut asm.ops))?;
    Ok(Consumed::Done(Box::new(asm)))
}

/// Settles what is left at the end of the changelog.
fn finish(store: &PartitionStore, progress: Progress, mut asm: Box<Assembler>) -> Replayed {
    let torn = asm.finish();
    // `finish` may apply compacted batches; `restore` writes them with the compensation.
    let tail_ops = std::mem::take(&mut asm.ops);
    if asm.unframed_records > 0 {
        tracing::warn!(
            store = store.label(),
            changelog = store.changelog_topic(),
            partition = store.partition(),
            "{} changelog records had no batch headers and were applied one by one",
            asm.unframed_records
        );
    }
    let dangling = asm.dangling_keys();
    Replayed {
        progress,
        asm,
        torn,
        dangling,
        tail_ops,
    }
}
