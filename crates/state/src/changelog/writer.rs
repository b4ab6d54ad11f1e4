//! Appending task batches to changelog partitions.
//!
//! One [`ChangelogWriter`] (one idempotent producer) serves every partition of a
//! process. It stamps each record with its random id and a per-partition sequence number
//! (see [`record`](crate::record)), so a restore can tell a torn batch from one that
//! compaction thinned out.
//!
//! An append has two halves: [`ChangelogWriter::enqueue`] hands the batch's records to
//! librdkafka, in order, and [`PendingAppend::wait`] resolves when the broker
//! acknowledged all of them. Batches enqueued one after the other land in the partition in
//! that order.
//!
//! # When an append fails
//!
//! Every failure is classified with [`decaton_protocol::failure::classify`].
//!
//! **Transient** ([`StateError::Delivery`]: a timeout, a broker that is down, a full
//! queue, a purge): the append may still have left some or all of its records in the
//! changelog (a timeout does not say whether the broker wrote them). The local store has
//! none of them: it is written only after the acknowledgement. Re-sending the **same**
//! mutations (a new `enqueue`, so a new batch id) is safe: mutation values are absolute,
//! so whether the first attempt was persisted in full, in part or not at all, the re-sent
//! batch follows it and a restore ends with the same state as the local store after
//! applying the re-sent batch. Keep re-sending until the append is acknowledged, or stop
//! writing to that partition (release it): a failed batch followed by later batches of
//! the same writer, with no re-send, may be restored in part.
//!
//! **Permanent** ([`StateError::Refused`]: a record larger than `message.max.bytes`, a
//! missing topic, a principal that may not write, an invalid record, a producer in a
//! fatal state): re-sending cannot help, and the task whose writes these were fails
//! instead. Nothing of it may stay behind:
//!
//! * A record too large for the producer is found before anything is sent: the batch is
//!   refused whole, and nothing reaches the changelog.
//! * When the broker refuses a batch that was already on its way, some of its records may
//!   have landed, and later batches of the partition may already follow them, which
//!   would make a restore take the batch for one that compaction thinned out. The error
//!   then names the torn batch, and [`ChangelogWriter::enqueue_revert`] marks it aborted
//!   and writes the valid values (the local store's, which never saw the batch) of every
//!   key it touched again, so that whatever a restore makes of it, the newest record of
//!   each of those keys is the valid one.
//! * A producer in a fatal state (idempotence broke down) is replaced by a new one
//!   before the next batch; the appends it failed are refused, and reverted as above.
//!
//! [`ChangelogWriter::purge_queued`] makes appends that are still queued fail at once,
//! so that the appends of a revoked partition do not land after another owner took it
//! over.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use decaton_protocol::failure::{classify, ErrorClass};
use parking_lot::Mutex;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::kafka::{close_off_runtime, producer_config};
use crate::record::{abort_marker_key, encode_abort, encode_frame, Frame, Mutation, NO_TASK};
use crate::StateError;

/// How long an append waits for room in librdkafka's queue before giving up.
const QUEUE_FULL_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// What a changelog record adds to its key and value, at most: the six batch headers
/// (names and values, 103 bytes) with their framing, the record's own framing, and the
/// record batch header librdkafka counts against `message.max.bytes` (61 bytes).
const RECORD_OVERHEAD: usize = 256;

/// Appends task batches to changelog partitions; see the module docs.
pub struct ChangelogWriter {
    config: ClientConfig,
    writer_id: u64,
    /// Largest record (key, value and framing) the producer accepts.
    max_record_bytes: usize,
    /// Held while a batch is handed to librdkafka, so a batch's records are contiguous in
    /// the partition.
    state: Mutex<WriterState>,
}

struct WriterState {
    /// `None` only once the writer is being dropped.
    producer: Option<FutureProducer>,
    /// Next sequence number per (changelog topic, partition).
    seqs: HashMap<(String, i32), u64>,
}

impl Drop for ChangelogWriter {
    fn drop(&mut self) {
        if let Some(producer) = self.state.get_mut().producer.take() {
            close_off_runtime(producer);
        }
    }
}

impl std::fmt::Debug for ChangelogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangelogWriter")
            .field("writer_id", &self.writer_id)
            .finish_non_exhaustive()
    }
}

impl ChangelogWriter {
    /// Creates the producer: `linger.ms=1` by default, the `kafka` settings pass through
    /// to librdkafka over it, and `acks=all` and `enable.idempotence=true` are forced.
    ///
    /// Dropping the writer closes the producer on a thread of its own when inside a tokio
    /// runtime (closing waits for librdkafka), so it may be dropped anywhere.
    pub fn new(bootstrap: &str, kafka: &BTreeMap<String, String>) -> Result<Self, StateError> {
        let config = producer_config(bootstrap, kafka);
        let producer: FutureProducer = config.create()?;
        let max_record_bytes = kafka
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Ok(ChangelogWriter {
            config,
            writer_id: rand::random(),
            max_record_bytes,
            state: Mutex::new(WriterState {
                producer: Some(producer),
                seqs: HashMap::new(),
            }),
        })
    }

    /// The random id this writer stamps on its records (`dt_writer`).
    pub fn writer_id(&self) -> u64 {
        self.writer_id
    }

    /// [`enqueue_unless`](Self::enqueue_unless) for a partition that is never fenced.
    pub fn enqueue(
        &self,
        changelog_topic: &str,
        partition: i32,
        source_offset: i64,
        mutations: &[Mutation],
    ) -> Result<PendingAppend, StateError> {
        self.enqueue_unless(
            || false,
            changelog_topic,
            partition,
            source_offset,
            mutations,
        )
    }

    /// Hands every record of the batch of the task at `source_offset` to librdkafka now,
    /// in order, one record per mutation, and returns the acknowledgements to await.
    /// Batches enqueued one after the other land in the partition in that order.
    ///
    /// When librdkafka's queue is full before the batch's first record, nothing is sent and
    /// the call fails at once ([`StateError::Delivery`] with `QueueFull`): the caller backs
    /// off and sends again later, holding no thread meanwhile. A queue that fills up part
    /// way through a batch is waited for (at most 30 s) so the batch is not torn.
    ///
    /// A record larger than the producer's `message.max.bytes` refuses the whole batch
    /// before anything is sent ([`StateError::Refused`] with no torn batch); so does any
    /// other error the first record meets that retrying cannot fix.
    ///
    /// **Blocking:** that wait sleeps; call it from a blocking context
    /// (`tokio::task::spawn_blocking`), not on an async worker.
    ///
    /// `fenced` is asked under the same lock [`purge_queued`](Self::purge_queued) takes: a
    /// batch is either refused ([`StateError::Closed`]) or queued before a purge that
    /// follows the fence, never queued after it.
    pub fn enqueue_unless(
        &self,
        fenced: impl Fn() -> bool,
        changelog_topic: &str,
        partition: i32,
        source_offset: i64,
        mutations: &[Mutation],
    ) -> Result<PendingAppend, StateError> {
        if mutations.is_empty() {
            return Ok(PendingAppend::empty(changelog_topic, partition));
        }
        self.check_sizes(changelog_topic, partition, mutations)?;
        let mut state = self.state.lock();
        if fenced() {
            return Err(StateError::Closed(format!(
                "{changelog_topic}[{partition}]"
            )));
        }
        self.enqueue_locked(
            &mut state,
            changelog_topic,
            partition,
            source_offset,
            mutations,
        )
    }

    /// Undoes what may be left of a batch the changelog refused
    /// ([`StateError::Refused`] with `torn_batch`): enqueues, in this order and before any
    /// later batch of the partition, an abort marker for `torn_batch` and one batch
    /// (no task's, `dt_src_offset` = -1) with `valid_values`, the values the local store
    /// holds for every key the refused batch wrote (`None`: a tombstone). A restore then
    /// ignores the torn batch if the marker reaches it first, and otherwise finds the
    /// valid value of each key after it.
    ///
    /// Send the valid values only while no other batch of the partition that writes those
    /// keys is unacknowledged (the runtime holds the task's key until then). Failures are
    /// classified like [`enqueue_unless`](Self::enqueue_unless)'s; a revert that failed
    /// transiently is sent again.
    ///
    /// **Blocking**, like [`enqueue_unless`](Self::enqueue_unless).
    pub fn enqueue_revert(
        &self,
        fenced: impl Fn() -> bool,
        changelog_topic: &str,
        partition: i32,
        torn_batch: u64,
        valid_values: &[Mutation],
    ) -> Result<PendingAppend, StateError> {
        self.check_sizes(changelog_topic, partition, valid_values)?;
        let mut state = self.state.lock();
        if fenced() {
            return Err(StateError::Closed(format!(
                "{changelog_topic}[{partition}]"
            )));
        }
        let producer = self.live_producer(&mut state)?;
        let marker = send_abort_marker(producer, changelog_topic, partition, torn_batch)
            .map_err(|error| delivery_error(changelog_topic, partition, error, None))?;
        let mut pending = self.enqueue_locked(
            &mut state,
            changelog_topic,
            partition,
            NO_TASK,
            valid_values,
        )?;
        pending.deliveries.insert(0, marker);
        Ok(pending)
    }

    /// Refuses a batch with a record larger than the producer accepts, before anything of
    /// it is sent.
    fn check_sizes(
        &self,
        topic: &str,
        partition: i32,
        mutations: &[Mutation],
    ) -> Result<(), StateError> {
        for m in mutations {
            let bytes = m.key.len() + m.value.as_ref().map_or(0, Vec::len) + RECORD_OVERHEAD;
            if bytes > self.max_record_bytes {
                return Err(StateError::Refused {
                    topic: topic.to_string(),
                    partition,
                    reason: format!(
                        "a record of {bytes} bytes (key {} bytes) is larger than the \
                         changelog producer's message.max.bytes ({})",
                        m.key.len(),
                        self.max_record_bytes
                    ),
                    torn_batch: None,
                });
            }
        }
        Ok(())
    }

    /// The producer, replaced by a new one first if it is in a fatal state.
    fn live_producer<'s>(
        &self,
        state: &'s mut WriterState,
    ) -> Result<&'s FutureProducer, StateError> {
        let fatal = state
            .producer
            .as_ref()
            .and_then(|p| p.client().fatal_error());
        if let Some((code, reason)) = fatal {
            tracing::error!(
                writer = self.writer_id,
                "changelog producer in a fatal state ({code}: {reason}); replacing it"
            );
            let fresh: FutureProducer = self.config.create()?;
            if let Some(old) = state.producer.replace(fresh) {
                close_off_runtime(old);
            }
        }
        state
            .producer
            .as_ref()
            .ok_or_else(|| StateError::Closed(format!("changelog writer {}", self.writer_id)))
    }

    fn enqueue_locked(
        &self,
        state: &mut WriterState,
        changelog_topic: &str,
        partition: i32,
        source_offset: i64,
        mutations: &[Mutation],
    ) -> Result<PendingAppend, StateError> {
        let mut pending = PendingAppend::empty(changelog_topic, partition);
        if mutations.is_empty() {
            return Ok(pending);
        }
        let size = u32::try_from(mutations.len()).map_err(|_| StateError::Changelog {
            topic: changelog_topic.to_string(),
            detail: format!("a batch of {} mutations is too large", mutations.len()),
        })?;
        let batch: u64 = rand::random();
        pending.batch = Some(batch);
        self.live_producer(state)?;
        let WriterState { producer, seqs } = state;
        let Some(producer) = producer.as_ref() else {
            return Err(StateError::Closed(format!(
                "changelog writer {}",
                self.writer_id
            )));
        };
        let next = seqs
            .entry((changelog_topic.to_string(), partition))
            .or_insert(0);
        let base = *next;
        // The whole range is used even if sending fails part-way: missing numbers are
        // exactly what marks a torn batch.
        *next += u64::from(size);
        for (index, m) in (0u32..).zip(mutations) {
            let headers = encode_frame(&Frame {
                src_offset: source_offset,
                batch,
                index,
                size,
                seq: Some((self.writer_id, base + u64::from(index))),
            });
            let mut record = FutureRecord::to(changelog_topic)
                .partition(partition)
                .key(m.key.as_slice())
                .headers(headers);
            if let Some(v) = &m.value {
                record = record.payload(v.as_slice());
            }
            match send(producer, record, index > 0) {
                Ok(delivery) => pending.deliveries.push(delivery),
                Err(error) => {
                    let torn = if index == 0 {
                        // Nothing of the batch was sent: its sequence numbers are unused.
                        *next = base;
                        None
                    } else {
                        // Part of the batch is on its way and later batches of this writer
                        // would follow it: say right behind it that it is torn.
                        if let Err(e) =
                            send_abort_marker(producer, changelog_topic, partition, batch)
                        {
                            tracing::error!(
                                topic = changelog_topic,
                                partition,
                                batch,
                                "could not mark a torn changelog batch: {e}"
                            );
                        }
                        Some(batch)
                    };
                    return Err(delivery_error(changelog_topic, partition, error, torn));
                }
            }
        }
        Ok(pending)
    }

    /// Purges every record this writer has queued but not yet sent to a broker, for
    /// every partition: their [`PendingAppend::wait`] fails (with a purge error). Records
    /// already in flight are not purged and may still be written.
    ///
    /// Call it when a partition is revoked, so its queued appends fail instead of landing
    /// after another owner took the partition over. Appends of partitions this process
    /// keeps fail too: re-send them (see the module docs; re-sending is safe).
    ///
    /// **Blocking:** may block briefly while librdkafka purges its queues; call it from a
    /// blocking context.
    pub fn purge_queued(&self) {
        // Under the enqueue lock: a batch being queued now is purged with the rest.
        let state = self.state.lock();
        if let Some(producer) = &state.producer {
            producer.purge(PurgeConfig::default().queue());
        }
        tracing::debug!(writer = self.writer_id, "purged queued changelog records");
    }

    /// Enqueues one abort marker per batch (for a restore that found torn batches).
    pub(crate) fn enqueue_abort_markers(
        &self,
        topic: &str,
        partition: i32,
        batches: &[u64],
    ) -> Result<PendingAppend, StateError> {
        let mut pending = PendingAppend::empty(topic, partition);
        let mut state = self.state.lock();
        let producer = self.live_producer(&mut state)?;
        for batch in batches {
            let delivery = send_abort_marker(producer, topic, partition, *batch)
                .map_err(|error| delivery_error(topic, partition, error, None))?;
            pending.deliveries.push(delivery);
        }
        Ok(pending)
    }
}

/// The error of a record librdkafka would not take (or gave up on), by its class.
fn delivery_error(
    topic: &str,
    partition: i32,
    error: KafkaError,
    torn_batch: Option<u64>,
) -> StateError {
    match classify(&error) {
        ErrorClass::Transient => StateError::Delivery {
            topic: topic.to_string(),
            partition,
            error,
        },
        ErrorClass::Permanent => StateError::Refused {
            topic: topic.to_string(),
            partition,
            reason: error.to_string(),
            torn_batch,
        },
    }
}

/// Whether a record that failed with `error` certainly is not in the log: the broker (or
/// the client, before sending) refused it. A timeout, a purge of a record in flight or a
/// producer that broke down leaves that open.
fn certainly_unwritten(error: &KafkaError) -> bool {
    let fatal = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    classify(error) == ErrorClass::Permanent && !fatal
}

/// Hands one record to librdkafka; while its queue is full, waits (at most 30 s) only if
/// `wait_if_full`.
fn send(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
    wait_if_full: bool,
) -> Result<DeliveryFuture, KafkaError> {
    let started = Instant::now();
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if wait_if_full && started.elapsed() < QUEUE_FULL_TIMEOUT =>
            {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

fn send_abort_marker(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    batch: u64,
) -> Result<DeliveryFuture, KafkaError> {
    let key = abort_marker_key(batch);
    let value: &[u8] = &[];
    let record = FutureRecord::to(topic)
        .partition(partition)
        .key(key.as_slice())
        .payload(value)
        .headers(encode_abort(batch));
    send(producer, record, true)
}

/// The acknowledgements of an enqueued batch; see [`ChangelogWriter::enqueue`].
#[must_use = "the batch is durable only once wait() succeeds"]
pub struct PendingAppend {
    topic: String,
    partition: i32,
    /// The batch id of a task batch (none for abort markers alone, or an empty batch).
    batch: Option<u64>,
    deliveries: Vec<DeliveryFuture>,
}

impl std::fmt::Debug for PendingAppend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAppend")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("records", &self.deliveries.len())
            .finish()
    }
}

impl PendingAppend {
    fn empty(topic: &str, partition: i32) -> PendingAppend {
        PendingAppend {
            topic: topic.to_string(),
            partition,
            batch: None,
            deliveries: Vec::new(),
        }
    }

    /// Number of records in flight.
    pub fn len(&self) -> usize {
        self.deliveries.len()
    }

    /// Whether nothing was enqueued (the batch was empty).
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// Resolves when every record is acknowledged, with the offset of the last record
    /// (`None` for an empty batch). Otherwise it waits for the fate of every record and
    /// fails with [`StateError::Refused`] if any was refused for good (naming the batch
    /// as torn when some of its records may be in the changelog), or else with
    /// [`StateError::Delivery`] for the first record librdkafka gave up on (or that
    /// [`ChangelogWriter::purge_queued`] purged). After a failure, see the module docs.
    pub async fn wait(self) -> Result<Option<i64>, StateError> {
        let mut last = None;
        let mut written = 0usize;
        let mut uncertain = false;
        let mut transient = None;
        let mut permanent = None;
        for delivery in self.deliveries {
            let error = match delivery.await {
                Ok(Ok(d)) => {
                    written += 1;
                    last = Some(last.map_or(d.offset, |l: i64| l.max(d.offset)));
                    continue;
                }
                Ok(Err((error, _))) => error,
                Err(_canceled) => KafkaError::Canceled,
            };
            uncertain |= !certainly_unwritten(&error);
            match classify(&error) {
                ErrorClass::Permanent => {
                    permanent.get_or_insert(error);
                }
                ErrorClass::Transient => {
                    transient.get_or_insert(error);
                }
            }
        }
        if let Some(error) = permanent {
            return Err(StateError::Refused {
                topic: self.topic,
                partition: self.partition,
                reason: error.to_string(),
                torn_batch: self.batch.filter(|_| written > 0 || uncertain),
            });
        }
        if let Some(error) = transient {
            return Err(StateError::Delivery {
                topic: self.topic,
                partition: self.partition,
                error,
            });
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn purged_appends_fail_instead_of_waiting_for_a_broker() -> anyhow::Result<()> {
        // Nothing listens there: the records stay queued.
        let kafka = BTreeMap::from([("message.timeout.ms".to_string(), "60000".to_string())]);
        let writer = ChangelogWriter::new("127.0.0.1:1", &kafka)?;
        let muts = [Mutation {
            key: b"k".to_vec(),
            value: Some(b"v".to_vec()),
        }];
        let pending = writer.enqueue("t-changelog", 0, 7, &muts)?;
        assert_eq!(pending.len(), 1);
        writer.purge_queued();
        let waited = tokio::time::timeout(Duration::from_secs(10), pending.wait()).await?;
        assert!(
            matches!(waited, Err(StateError::Delivery { .. })),
            "{waited:?}"
        );
        Ok(())
    }

    /// A batch of a fenced partition is refused under the enqueue lock: nothing is queued
    /// that a release's purge could miss.
    #[test]
    fn a_fenced_partition_queues_nothing() -> anyhow::Result<()> {
        let writer = ChangelogWriter::new("127.0.0.1:1", &BTreeMap::new())?;
        let muts = [Mutation {
            key: b"k".to_vec(),
            value: Some(b"v".to_vec()),
        }];
        let refused = writer.enqueue_unless(|| true, "t-changelog", 0, 7, &muts);
        assert!(matches!(refused, Err(StateError::Closed(_))), "{refused:?}");
        // Refused before any record or sequence number was taken.
        assert!(writer.state.lock().seqs.is_empty());
        Ok(())
    }
}
