//! Where a failed task goes: the retry topic, the dead-letter topic, or nowhere.
//!
//! A task that failed is *forwarded* before its offset counts as done: produced to the
//! retry topic while it has retries left and its failure is not permanent, else to the
//! dead-letter topic when there is one. Its offset is marked done only once the broker
//! has acknowledged the forwarded record, so a crash in between runs the task again
//! instead of losing it. A produce that fails is tried again (with backoff) until it
//! succeeds or the partition is closed at revocation; then the offset stays unfinished
//! and the partition's next owner runs the task again.
//!
//! A task of a key over its quota is *shaped* much the same way: produced unchanged to
//! the shaping topic, its offset done once the broker acknowledged it. The lane waits
//! only until the record is queued in the producer, not for the acknowledgement, so a
//! busy key's lane keeps pace; the idempotent producer keeps the queued order.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use decaton_protocol::TaskMetadata;
use decaton_protocol::{dead_letter, decode_record, encode_metadata, now_millis, METADATA_HEADER};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::runtime::Handle;

use super::completion::Outcome;
use super::partition_core::PartitionCore;
use super::quota::SHAPED_BY;
use crate::retry::Backoff;

/// What a task's record looked like when it was fetched: kept only when the subscription
/// forwards failures.
pub(crate) struct RawRecord {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
}

impl RawRecord {
    pub(crate) fn from_message<M: rdkafka::Message>(msg: &M) -> Self {
        RawRecord {
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers: msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The task in this record, decoded.
    pub(crate) fn decode<T: prost::Message + Default>(&self) -> Option<T> {
        let record = decode_record(self.header(METADATA_HEADER), self.payload.as_deref()).ok()?;
        T::decode(&*record.task).ok()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// The retry queue of a subscription.
pub(crate) struct RetryQueue {
    pub(crate) topic: String,
    pub(crate) backoff: Backoff,
    pub(crate) max_retries: u32,
}

/// One forwarded record, ready to produce.
struct Forward {
    topic: String,
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
    retry: bool,
}

/// Produces failed tasks to the retry or dead-letter topic, and tasks of keys over their
/// quota to the shaping topic; one per subscription.
pub(crate) struct Forwarder {
    pub(crate) producer: FutureProducer,
    pub(crate) subscription: Arc<str>,
    /// The subscription's source topic.
    pub(crate) origin: Arc<str>,
    pub(crate) retry: Option<RetryQueue>,
    pub(crate) dead_letter: Option<String>,
    /// The shaping topic of a per-key quota.
    pub(crate) shaping: Option<String>,
    pub(crate) runtime: Handle,
}

/// How long a shaped task waits before trying again to queue in a full producer.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);

/// How long one produce may wait for its acknowledgement before it is tried again.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

impl Forwarder {
    /// Forwards a failed task in the background, then calls `then(true)`; or
    /// `then(false)` if the partition was closed before the record could be produced.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        partition: Arc<PartitionCore>,
        offset: i64,
        record: Arc<RawRecord>,
        failure: Failure,
        then: impl FnOnce(bool) + Send + 'static,
    ) {
        let this = self.clone();
        self.runtime.spawn(async move {
            let done = this.forward(&partition, offset, &record, &failure).await;
            then(done);
        });
    }

    /// Produces the task's record where its failure sends it; true once acknowledged (or
    /// when it goes nowhere), false if the partition was closed first.
    async fn forward(
        &self,
        partition: &PartitionCore,
        offset: i64,
        record: &RawRecord,
        failure: &Failure,
    ) -> bool {
        let Some(forward) = self.destination(partition, offset, record, failure) else {
            return true;
        };
        let acked = self
            .produce(
                partition,
                offset,
                &forward.topic,
                record.key.as_deref(),
                forward.payload.as_deref(),
                &forward.headers,
            )
            .await;
        if acked {
            let rec = partition.recorder();
            if forward.retry {
                rec.retried();
            } else {
                rec.dead_lettered();
            }
        }
        acked
    }

    /// Produces a task of a key over its quota to the shaping topic as it was fetched
    /// (same key, value and headers), marked with `shaped_by`. Returns once the record
    /// is queued in the producer, so records queued one after another keep that order in
    /// their partition (the producer is idempotent); the acknowledgement is awaited in the
    /// background, then `then(true)` — or `then(false)` if there is no shaping topic or
    /// the partition was closed before the record was stored. A record the broker
    /// refused is produced again, after any queued behind it.
    pub(crate) async fn shape(
        self: &Arc<Self>,
        partition: Arc<PartitionCore>,
        offset: i64,
        record: Arc<RawRecord>,
        shaped_by: &[u8],
        then: impl FnOnce(bool) + Send + 'static,
    ) {
        let Some(topic) = self.shaping.clone() else {
            return then(false);
        };
        let mut headers = OwnedHeaders::new();
        for (k, v) in &record.headers {
            if k != SHAPED_BY {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
        }
        headers = headers.insert(Header {
            key: SHAPED_BY,
            value: Some(shaped_by),
        });
        let queued = loop {
            if partition.is_closed() {
                return then(false);
            }
            let mut r = FutureRecord::to(&topic).headers(headers.clone());
            if let Some(k) = &record.key {
                r = r.key(k.as_slice());
            }
            if let Some(p) = &record.payload {
                r = r.payload(p.as_slice());
            }
            match self.producer.send_result(r) {
                Ok(delivery) => break Some(delivery),
                // The producer's queue is full: the lane waits for room (backpressure).
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((e, _)) => {
                    tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                        partition = partition.partition(), offset, to = %topic,
                        "could not queue the shaped task; producing it in the background: {e}");
                    break None;
                }
            }
        };
        let this = self.clone();
        self.runtime.spawn(async move {
            let acked = match queued {
                Some(delivery) => match delivery.await {
                    Ok(Ok(_)) => true,
                    Ok(Err((e, _))) => {
                        tracing::warn!(subscription = %this.subscription, topic = %partition.topic(),
                            partition = partition.partition(), offset, to = %topic,
                            "the shaped task was not stored; producing it again: {e}");
                        false
                    }
                    Err(_) => false,
                },
                None => false,
            };
            let acked = acked
                || this
                    .produce(
                        &partition,
                        offset,
                        &topic,
                        record.key.as_deref(),
                        record.payload.as_deref(),
                        &headers,
                    )
                    .await;
            if acked {
                partition.recorder().shaped();
            }
            then(acked);
        });
    }

    /// Produces one record, trying again with backoff until the broker acknowledges it
    /// (true) or the partition is closed (false).
    async fn produce(
        &self,
        partition: &PartitionCore,
        offset: i64,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &OwnedHeaders,
    ) -> bool {
        let mut delays = backon::ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .build();
        loop {
            if partition.is_closed() {
                return false;
            }
            let mut r = FutureRecord::to(topic).headers(headers.clone());
            if let Some(k) = key {
                r = r.key(k);
            }
            if let Some(p) = payload {
                r = r.payload(p);
            }
            match self.producer.send(r, Timeout::After(PRODUCE_TIMEOUT)).await {
                Ok(_) => return true,
                Err((e, _)) => {
                    tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                        partition = partition.partition(), offset, to = %topic,
                        "could not produce the task; trying again: {e}");
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
                }
            }
        }
    }

    fn destination(
        &self,
        partition: &PartitionCore,
        offset: i64,
        record: &RawRecord,
        failure: &Failure,
    ) -> Option<Forward> {
        let meta_header = record.header(METADATA_HEADER);
        let decoded = decode_record(meta_header, record.payload.as_deref()).ok();
        let metadata: TaskMetadata = decoded
            .as_ref()
            .map(|d| d.metadata.clone())
            .unwrap_or_default();
        let retries_done = u32::try_from(metadata.retry_count.max(0)).unwrap_or(u32::MAX);
        if let (Some(q), Some(d)) = (&self.retry, &decoded) {
            if !failure.permanent && retries_done < q.max_retries {
                let delay = q.backoff.delay(retries_done);
                let next = TaskMetadata {
                    retry_count: metadata.retry_count + 1,
                    scheduled_time_millis: now_millis()
                        .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                    ..metadata.clone()
                };
                let mut headers = OwnedHeaders::new().insert(Header {
                    key: METADATA_HEADER,
                    value: Some(&encode_metadata(&next)),
                });
                for (k, v) in &record.headers {
                    if k != METADATA_HEADER && !k.starts_with(dead_letter::PREFIX) {
                        headers = headers.insert(Header {
                            key: k,
                            value: Some(v),
                        });
                    }
                }
                tracing::info!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset, retry = next.retry_count,
                    delay_ms = delay.as_millis() as u64, "task failed ({}); retrying: {}",
                    failure.kind, failure.reason);
                return Some(Forward {
                    topic: q.topic.clone(),
                    payload: Some(d.task.to_vec()),
                    headers,
                    retry: true,
                });
            }
        }
        let Some(dlq) = &self.dead_letter else {
            if self.retry.is_some() {
                tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset, retries = retries_done,
                    "task failed ({}) and is given up (no dead-letter topic): {}",
                    failure.kind, failure.reason);
            }
            return None;
        };
        let mut headers = OwnedHeaders::new();
        for (k, v) in &record.headers {
            if !k.starts_with(dead_letter::PREFIX) {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
        }
        let attempts = (retries_done as u64 + 1).to_string();
        let (p, o, t) = (
            partition.partition().to_string(),
            offset.to_string(),
            now_millis().to_string(),
        );
        for (k, v) in [
            (dead_letter::REASON, failure.reason.as_str()),
            (dead_letter::KIND, failure.kind),
            (dead_letter::ATTEMPTS, &attempts),
            (dead_letter::TOPIC, partition.topic()),
            (dead_letter::PARTITION, &p),
            (dead_letter::OFFSET, &o),
            (dead_letter::ORIGIN_TOPIC, &self.origin),
            (dead_letter::SUBSCRIPTION, &self.subscription),
            (dead_letter::TIME_MILLIS, &t),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
            partition = partition.partition(), offset, to = %dlq, attempts = retries_done + 1,
            "task failed ({}) for good; dead-lettering it: {}", failure.kind, failure.reason);
        Some(Forward {
            topic: dlq.clone(),
            payload: record.payload.clone(),
            headers,
            retry: false,
        })
    }
}

/// Why a task failed, for logs and dead-letter headers.
pub(crate) struct Failure {
    /// `error`, `permanent`, `panic`, `timeout`, `leaked`, `retry` or `discarded`.
    pub(crate) kind: &'static str,
    pub(crate) permanent: bool,
    pub(crate) reason: String,
}

impl Failure {
    /// A record discarded before it could run (undecodable, scheduled too far ahead).
    pub(crate) fn discarded(reason: String) -> Self {
        Failure {
            kind: "discarded",
            permanent: true,
            reason,
        }
    }

    pub(crate) fn of(outcome: Outcome, reason: Option<String>) -> Self {
        let (kind, permanent) = match outcome {
            Outcome::Done => ("none", false),
            Outcome::Error => ("error", false),
            Outcome::RetryAsked => ("retry", false),
            Outcome::Permanent => ("permanent", true),
            Outcome::Panicked => ("panic", false),
            Outcome::TimedOut => ("timeout", false),
            Outcome::Leaked => ("leaked", false),
        };
        Failure {
            kind,
            permanent,
            reason: reason.unwrap_or_else(|| kind.to_string()),
        }
    }
}
