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
//! A failed append may still have left some or all of its records in the changelog (a
//! timeout does not say whether the broker wrote them). The local store has none of
//! them: it is written only after the acknowledgement. Re-sending the **same** mutations
//! (a new `enqueue`, so a new batch id) is safe: mutation values are absolute, so whether
//! the first attempt was persisted in full, in part or not at all, the re-sent batch
//! follows it and a restore ends with the same state as the local store after applying
//! the re-sent batch. Keep re-sending until the append is acknowledged, or stop writing
//! to that partition (release it): a failed batch followed by later batches of the same
//! writer, with no re-send, may be restored in part.
//!
//! [`ChangelogWriter::purge_queued`] makes appends that are still queued fail at once,
//! so that the appends of a revoked partition do not land after another owner took it
//! over.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::producer_config;
use crate::record::{abort_marker_key, encode_abort, encode_frame, Frame, Mutation};
use crate::StateError;

/// How long an append waits for room in librdkafka's queue before giving up.
const QUEUE_FULL_TIMEOUT: Duration = Duration::from_secs(30);

/// Appends task batches to changelog partitions; see the module docs.
pub struct ChangelogWriter {
    producer: FutureProducer,
    writer_id: u64,
    /// Next sequence number per (changelog topic, partition). Held while a batch is
    /// handed to librdkafka, so a batch's records are contiguous in the partition.
    seqs: Mutex<HashMap<(String, i32), u64>>,
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
    pub fn new(bootstrap: &str, kafka: &BTreeMap<String, String>) -> Result<Self, StateError> {
        let producer: FutureProducer = producer_config(bootstrap, kafka).create()?;
        Ok(ChangelogWriter {
            producer,
            writer_id: rand::random(),
            seqs: Mutex::new(HashMap::new()),
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
        let mut pending = PendingAppend {
            topic: changelog_topic.to_string(),
            partition,
            deliveries: Vec::with_capacity(mutations.len()),
        };
        if mutations.is_empty() {
            return Ok(pending);
        }
        let size = u32::try_from(mutations.len()).map_err(|_| StateError::Changelog {
            topic: changelog_topic.to_string(),
            detail: format!("a batch of {} mutations is too large", mutations.len()),
        })?;
        let batch: u64 = rand::random();
        let mut seqs = self.seqs.lock();
        if fenced() {
            return Err(StateError::Closed(format!(
                "{changelog_topic}[{partition}]"
            )));
        }
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
            match self.send(record, index > 0) {
                Ok(delivery) => pending.deliveries.push(delivery),
                Err(error) => {
                    if index == 0 {
                        // Nothing of the batch was sent: its sequence numbers are unused.
                        *next = base;
                    } else {
                        // Part of the batch is on its way and later batches of this writer
                        // would follow it: say right behind it that it is torn.
                        self.enqueue_abort_marker(changelog_topic, partition, batch);
                    }
                    return Err(StateError::Delivery {
                        topic: changelog_topic.to_string(),
                        partition,
                        error,
                    });
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
        let _seqs = self.seqs.lock();
        self.producer.purge(PurgeConfig::default().queue());
        tracing::debug!(writer = self.writer_id, "purged queued changelog records");
    }

    /// Hands one record to librdkafka; while its queue is full, waits (at most 30 s) only
    /// if `wait_if_full`.
    fn send(
        &self,
        mut record: FutureRecord<'_, [u8], [u8]>,
        wait_if_full: bool,
    ) -> Result<DeliveryFuture, KafkaError> {
        let started = Instant::now();
        loop {
            match self.producer.send_result(record) {
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

    fn enqueue_abort_marker(&self, topic: &str, partition: i32, batch: u64) {
        if let Err(e) = self.send_abort_marker(topic, partition, batch) {
            tracing::error!(
                topic,
                partition,
                batch,
                "could not mark a torn changelog batch: {e}"
            );
        }
    }

    fn send_abort_marker(
        &self,
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
        self.send(record, true)
    }

    /// Enqueues one abort marker per batch (for a restore that found torn batches).
    pub(crate) fn enqueue_abort_markers(
        &self,
        topic: &str,
        partition: i32,
        batches: &[u64],
    ) -> Result<PendingAppend, StateError> {
        let mut pending = PendingAppend {
            topic: topic.to_string(),
            partition,
            deliveries: Vec::new(),
        };
        for batch in batches {
            let delivery = self
                .send_abort_marker(topic, partition, *batch)
                .map_err(|error| StateError::Delivery {
                    topic: topic.to_string(),
                    partition,
                    error,
                })?;
            pending.deliveries.push(delivery);
        }
        Ok(pending)
    }
}

/// The acknowledgements of an enqueued batch; see [`ChangelogWriter::enqueue`].
#[must_use = "the batch is durable only once wait() succeeds"]
pub struct PendingAppend {
    topic: String,
    partition: i32,
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
    /// Number of records in flight.
    pub fn len(&self) -> usize {
        self.deliveries.len()
    }

    /// Whether nothing was enqueued (the batch was empty).
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// Resolves when every record is acknowledged, with the offset of the last record
    /// (`None` for an empty batch); fails on the first record librdkafka gave up on (or
    /// that [`ChangelogWriter::purge_queued`] purged). After a failure, see the module
    /// docs: re-send the same mutations, or stop writing to the partition.
    pub async fn wait(self) -> Result<Option<i64>, StateError> {
        let mut last = None;
        for delivery in self.deliveries {
            let error = match delivery.await {
                Ok(Ok(d)) => {
                    last = Some(last.map_or(d.offset, |l: i64| l.max(d.offset)));
                    continue;
                }
                Ok(Err((error, _))) => error,
                Err(_canceled) => KafkaError::Canceled,
            };
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
        assert!(writer.seqs.lock().is_empty());
        Ok(())
    }
}
