//! The changelog: every applied task batch, as Kafka records, so another host can rebuild
//! the state.
//!
//! The changelog of a store is the topic `<subscription>-<store>-changelog`, log-compacted,
//! with the partition count of the source topic; the batch of a task from source
//! partition `p` goes to changelog partition `p`. One record per [`Mutation`]: key = the
//! state key, value = the new value, or no value (a tombstone) for a delete.
//!
//! Records carry fixed-width big-endian headers ([`headers`]) that let a restore put a
//! task's batch back together:
//!
//! | header           | type | meaning                                                   |
//! |------------------|------|-----------------------------------------------------------|
//! | `dt_src_offset`  | i64  | source offset of the task that wrote the batch            |
//! | `dt_batch`       | u64  | random id of this attempt's batch                         |
//! | `dt_batch_index` | u32  | position of the record in the batch                       |
//! | `dt_batch_size`  | u32  | number of records in the batch                            |
//! | `dt_writer`      | u64  | random id of the [`ChangelogWriter`] (a writer "epoch")    |
//! | `dt_seq`         | u64  | per-writer, per-partition record sequence number          |
//!
//! `dt_writer` and `dt_seq` let a restore tell a batch torn by a crash (its missing
//! records were never written: they lie past the writer's last record) from a batch that
//! compaction thinned out (its missing records were superseded by later writes). The
//! producer is idempotent with `acks=all`, so records of one partition are stored in the
//! order they were handed to it, without duplicates.
//!
//! A record with a `dt_abort` header (u64 batch id) is an **abort marker**: a restore that
//! finds torn batches at the end of the changelog appends one per batch, so they stay
//! ignored once later batches follow them. Its key is unique to the batch
//! (`"\0dt-abort\0" + id`), so compaction keeps it, and it never touches state.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::config::changelog_topic;
use crate::store::Mutation;
use crate::StateError;

/// Names of the changelog record headers.
///
/// Every record of a task batch carries all six batch headers, fixed-width big endian:
/// `dt_src_offset` (i64), `dt_batch` (u64), `dt_batch_index` (u32), `dt_batch_size`
/// (u32), `dt_writer` (u64), `dt_seq` (u64). An abort marker carries only `dt_abort`.
pub mod headers {
    /// Source offset of the task that wrote the record (i64, big endian).
    pub const SRC_OFFSET: &str = "dt_src_offset";
    /// Random id of the task attempt's batch (u64, big endian).
    pub const BATCH: &str = "dt_batch";
    /// Position of the record in its batch (u32, big endian).
    pub const BATCH_INDEX: &str = "dt_batch_index";
    /// Number of records in the batch (u32, big endian).
    pub const BATCH_SIZE: &str = "dt_batch_size";
    /// Random id of the writer that produced the record (u64, big endian).
    pub const WRITER: &str = "dt_writer";
    /// The writer's sequence number of the record in this partition (u64, big endian).
    pub const SEQ: &str = "dt_seq";
    /// Marks an abort marker; the value is the aborted batch id (u64, big endian).
    pub const ABORT: &str = "dt_abort";
}

/// `min.compaction.lag.ms` of the changelog: records younger than this are neither
/// cleaned nor used to clean older ones, so a torn batch cannot make the cleaner delete the
/// valid value it overwrote before the next owner's restore writes that value again.
const MIN_COMPACTION_LAG_MS: &str = "86400000";

/// How long an append waits for room in librdkafka's queue before giving up.
const QUEUE_FULL_TIMEOUT: Duration = Duration::from_secs(30);

/// Key of the abort marker of `batch`.
pub(crate) fn abort_marker_key(batch: u64) -> Vec<u8> {
    let mut key = b"\0dt-abort\0".to_vec();
    key.extend_from_slice(&batch.to_be_bytes());
    key
}

/// Builds a client config: the pass-through settings first, then `bootstrap.servers`.
pub(crate) fn client_config(bootstrap: &str, kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in kafka {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", bootstrap);
    cfg
}

/// Producer settings the changelog cannot do without; they override the pass-through.
pub(crate) fn producer_config(bootstrap: &str, kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = client_config(bootstrap, kafka);
    for (k, v) in [("acks", "all"), ("enable.idempotence", "true")] {
        if let Some(given) = kafka
            .get(k)
            .filter(|given| given.as_str() != v && !(k == "acks" && given.as_str() == "-1"))
        {
            tracing::warn!("changelog producer ignores {k}={given}: it needs {k}={v}");
        }
        cfg.set(k, v);
    }
    cfg
}

/// Appends task batches to changelog partitions.
///
/// One writer (one idempotent producer) serves every partition of a process. Each writer
/// has a random id and numbers the records it sends to each partition; see
/// [`headers`] for what each record carries.
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
    /// Creates the producer: the `kafka` settings pass through to librdkafka, with
    /// `acks=all` and `enable.idempotence=true` forced.
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

    /// Appends the batch of the task at `source_offset` to `changelog_topic` partition
    /// `partition`, one record per mutation, and resolves when every record is
    /// acknowledged, with the offset of the last one. An empty batch sends nothing and
    /// resolves to `None`.
    ///
    /// If it fails, the local store holds writes the changelog may not: do not close the
    /// store cleanly; drop it, so the next open rebuilds it from the changelog.
    pub async fn append(
        &self,
        changelog_topic: &str,
        partition: i32,
        source_offset: i64,
        mutations: &[Mutation],
    ) -> Result<Option<i64>, StateError> {
        self.enqueue(changelog_topic, partition, source_offset, mutations)?
            .wait()
            .await
    }

    /// The first half of [`append`](Self::append): hands every record of the batch to
    /// librdkafka now, in order, and returns the acknowledgements to await. Batches
    /// enqueued one after the other land in the partition in that order.
    ///
    /// Blocks only while librdkafka's queue is full (back-pressure), at most 30 s.
    pub fn enqueue(
        &self,
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
        let next = seqs
            .entry((changelog_topic.to_string(), partition))
            .or_insert(0);
        let base = *next;
        // The whole range is used even if sending fails part-way: missing numbers are
        // exactly what marks a torn batch.
        *next += u64::from(size);
        for (index, m) in (0u32..).zip(mutations) {
            let headers = OwnedHeaders::new_with_capacity(6)
                .insert(Header {
                    key: headers::SRC_OFFSET,
                    value: Some(&source_offset.to_be_bytes()),
                })
                .insert(Header {
                    key: headers::BATCH,
                    value: Some(&batch.to_be_bytes()),
                })
                .insert(Header {
                    key: headers::BATCH_INDEX,
                    value: Some(&index.to_be_bytes()),
                })
                .insert(Header {
                    key: headers::BATCH_SIZE,
                    value: Some(&size.to_be_bytes()),
                })
                .insert(Header {
                    key: headers::WRITER,
                    value: Some(&self.writer_id.to_be_bytes()),
                })
                .insert(Header {
                    key: headers::SEQ,
                    value: Some(&(base + u64::from(index)).to_be_bytes()),
                });
            let mut record = FutureRecord::to(changelog_topic)
                .partition(partition)
                .key(m.key.as_slice())
                .headers(headers);
            if let Some(v) = &m.value {
                record = record.payload(v.as_slice());
            }
            match self.send(record) {
                Ok(delivery) => pending.deliveries.push(delivery),
                Err(error) => {
                    if index > 0 {
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

    fn send(&self, mut record: FutureRecord<'_, [u8], [u8]>) -> Result<DeliveryFuture, KafkaError> {
        let started = Instant::now();
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < QUEUE_FULL_TIMEOUT =>
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
            .headers(OwnedHeaders::new().insert(Header {
                key: headers::ABORT,
                value: Some(&batch.to_be_bytes()),
            }));
        self.send(record)
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
    /// (`None` for an empty batch); fails on the first record librdkafka gave up on.
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

/// What [`create_changelog_topic`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogTopicInfo {
    /// The changelog topic, `<subscription>-<store>-changelog`.
    pub topic: String,
    /// Its partition count (the source topic's when it was created here).
    pub partitions: i32,
    /// Whether this call created it (false: it already existed).
    pub created: bool,
    /// Whether it was created with `cleanup.policy=compact` (false when it already
    /// existed, or when the broker rejected the setting and it was created without).
    pub compacted: bool,
}

/// Creates the changelog topic of `store` for `subscription` with the partition count of
/// `source_topic`, `cleanup.policy=compact` and `min.compaction.lag.ms` = one day, and
/// waits until its metadata is visible.
///
/// An existing topic is accepted (an error if it has fewer partitions than the source).
/// If the broker rejects the topic configs, the topic is created with fewer (compaction
/// only, then none) and a warning says so. `replication_factor` `None` asks for
/// the broker default.
pub async fn create_changelog_topic(
    bootstrap: &str,
    kafka: &BTreeMap<String, String>,
    subscription: &str,
    store: &str,
    source_topic: &str,
    replication_factor: Option<i32>,
) -> Result<ChangelogTopicInfo, StateError> {
    let topic = changelog_topic(subscription, store);
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap, kafka).create()?;
    let admin = std::sync::Arc::new(admin);
    let partitions = {
        let (admin, source) = (admin.clone(), source_topic.to_string());
        blocking(move || partition_count(&admin, &source)).await?
    }
    .ok_or_else(|| StateError::Changelog {
        topic: topic.clone(),
        detail: format!("source topic {source_topic} does not exist"),
    })?;

    let replication = replication_factor.unwrap_or(-1);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Most protective settings first; a broker that rejects them gets fewer.
    let attempts: [&[(&str, &str)]; 3] = [
        &[
            ("cleanup.policy", "compact"),
            ("min.compaction.lag.ms", MIN_COMPACTION_LAG_MS),
        ],
        &[("cleanup.policy", "compact")],
        &[],
    ];
    let mut outcome = None;
    let mut rejected = Vec::new();
    for config in attempts {
        let mut new_topic = NewTopic::new(&topic, partitions, TopicReplication::Fixed(replication));
        for (k, v) in config {
            new_topic = new_topic.set(k, v);
        }
        match create_one(&admin, &new_topic, &opts).await? {
            Ok(created) => {
                let compacted = created && config.iter().any(|(k, _)| *k == "cleanup.policy");
                outcome = Some((created, compacted));
                break;
            }
            Err(code) => rejected.push(format!("{config:?}: {code}")),
        }
    }
    let Some((created, compacted)) = outcome else {
        return Err(StateError::Changelog {
            topic,
            detail: format!("create topic refused: {}", rejected.join("; ")),
        });
    };
    if !rejected.is_empty() {
        tracing::warn!(
            topic,
            "broker rejected changelog topic settings ({}); created with fewer",
            rejected.join("; ")
        );
    }
    if created && !compacted {
        tracing::warn!(
            topic,
            "changelog created without cleanup.policy=compact: it keeps every record, not the latest per key"
        );
    }

    // Wait until the topic is visible with all its partitions.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = {
            let (admin, t) = (admin.clone(), topic.clone());
            blocking(move || partition_count(&admin, &t)).await?
        };
        match found {
            Some(n) if n < partitions && !created => {
                return Err(StateError::Changelog {
                    topic,
                    detail: format!(
                        "has {n} partitions, fewer than the {partitions} of {source_topic}"
                    ),
                });
            }
            // Just created: the metadata does not show every partition yet.
            Some(n) if n < partitions => {}
            Some(n) => {
                if n > partitions {
                    tracing::warn!(
                        topic,
                        "changelog has {n} partitions, more than the {partitions} of {source_topic}"
                    );
                }
                return Ok(ChangelogTopicInfo {
                    topic,
                    partitions: n,
                    created,
                    compacted,
                });
            }
            None => {}
        }
        if Instant::now() > deadline {
            return Err(StateError::Timeout(format!(
                "changelog topic {topic} not visible after creation"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `Ok(Ok(true))` created, `Ok(Ok(false))` already existed, `Ok(Err(code))` refused.
async fn create_one(
    admin: &AdminClient<DefaultClientContext>,
    topic: &NewTopic<'_>,
    opts: &AdminOptions,
) -> Result<Result<bool, RDKafkaErrorCode>, StateError> {
    let results = admin.create_topics([topic], opts).await?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(Ok(true)),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(Ok(false)),
        Some(Err((_, code))) => Ok(Err(code)),
        None => Err(StateError::Internal(
            "create_topics returned no result".into(),
        )),
    }
}

fn partition_count(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<Option<i32>, StateError> {
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .and_then(|t| i32::try_from(t.partitions().len()).ok()))
}

/// Runs blocking librdkafka calls off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Internal(format!("blocking task failed: {e}")))?
}
