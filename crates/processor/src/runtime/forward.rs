//! Where a failed task goes: the retry topic, the dead-letter topic, or nowhere.
//!
//! A task that failed is *forwarded* before its offset counts as done: produced to the
//! retry topic while it has retries left and its failure is not permanent, else to the
//! dead-letter topic when there is one. Its offset is marked done only once the broker
//! has acknowledged the forwarded record, so a crash in between runs the task again
//! instead of losing it.
//!
//! A task of a key over its quota is *shaped* much the same way: produced unchanged to
//! the shaping topic, its offset done once the broker acknowledged it. The lane waits
//! only until the record is queued in the producer, not for the acknowledgement, so a
//! busy key's lane keeps pace; the idempotent producer keeps the queued order.
//!
//! Every copy keeps the record's headers byte for byte (a name need not be UTF-8).
//!
//! # When the broker refuses a copy
//!
//! Every produce error is classified ([`decaton_protocol::failure::classify`]) and counted
//! in `decaton_forward_failures_total{class}`. A *transient* one (a leader moving, a
//! broker down, a timeout) is tried again with backoff. A *permanent* one (too large, no
//! such topic, not authorised, an invalid record, a fatal producer state) would be refused
//! again however often the same copy is sent, so the copy changes instead:
//!
//! - a retry copy refused for good sends the task to the dead-letter topic, with a reason
//!   naming both failures (without a dead-letter topic the task is given up, as after its
//!   last retry, with an error log);
//! - a dead-letter copy refused for good (it is always larger than the record: nine more
//!   headers and the error text) is replaced by a *reduced copy*: the record's key and
//!   headers, the `decaton-dlq-*` headers with the reason cut to 4 KiB, and the value cut
//!   to fit the producer's `message.max.bytes`, with [`VALUE_TRUNCATED`] and
//!   [`VALUE_SIZE`] saying so;
//! - a shaped copy refused for good *stalls* the partition (below) rather than
//!   dead-lettering the task: the task did not fail, and a shaping topic that refuses one
//!   key's task (missing, not writable) refuses every over-quota key's, which is a
//!   configuration fault to fix, not a task to set aside;
//! - when even the reduced copy cannot be written, the partition stalls.
//!
//! A stalled partition stops visibly: the offset stays unfinished, so nothing is
//! committed past it; its health reports [`NotReady::Stalled`]; the gauge
//! `decaton_partition_stalled` is 1; one error log names the topic, partition, offset and
//! reason (repeated at most once a minute while it lasts). The copy is tried again at a
//! slow pace (backoff up to a minute), so creating the topic or granting the ACL unblocks
//! the partition without a restart.
//!
//! # Revocation
//!
//! Every wait here (an acknowledgement, a backoff) ends as soon as the partition is
//! closed: the offset stays unfinished and the partition's next owner runs the task
//! again. A partition assigned straight back to this process is thus never held back by
//! a forward waiting on a slow or unreachable topic.
//!
//! [`NotReady::Stalled`]: crate::NotReady::Stalled

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use decaton_protocol::failure::{classify, ErrorClass};
use decaton_protocol::headers::{add_raw_header, message_headers, raw_headers, AsBorrowedHeaders};
use decaton_protocol::TaskMetadata;
use decaton_protocol::{dead_letter, decode_record, encode_metadata, now_millis, METADATA_HEADER};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use tokio::runtime::Handle;

use super::completion::Outcome;
use super::partition_core::PartitionCore;
use super::quota::SHAPED_BY;
use crate::retry::Backoff;

/// Header of a reduced dead-letter copy whose value was cut: `true`.
pub(crate) const VALUE_TRUNCATED: &str = "decaton-dlq-value-truncated";
/// Header of a reduced dead-letter copy whose value was cut: the original value's size
/// in bytes.
pub(crate) const VALUE_SIZE: &str = "decaton-dlq-value-size";

/// librdkafka's `message.max.bytes` when the user sets none.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Room left in a reduced copy for the record's framing (librdkafka counts about 100 bytes
/// of batch and record overhead against `message.max.bytes`).
const RECORD_OVERHEAD: usize = 512;
/// Bytes counted for one header next to its name and value (length varints).
const HEADER_OVERHEAD: usize = 10;
/// The longest reason a reduced copy carries.
const REASON_MAX: usize = 4096;

/// How long a shaped task waits before trying again to queue in a full producer.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);
/// How long one produce may wait for room in the producer's queue.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);
/// Backoff between attempts after a transient error.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Backoff between attempts of a stalled partition.
const STALL_FIRST_RETRY: Duration = Duration::from_secs(1);
const STALL_MAX_RETRY: Duration = Duration::from_secs(60);

/// What a task's record looked like when it was fetched: kept only when the subscription
/// forwards failures.
pub(crate) struct RawRecord {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    /// Names and values as the producer wrote them, in order (`None`: a null value).
    pub(crate) headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl RawRecord {
    pub(crate) fn from_message<M: rdkafka::Message>(msg: &M) -> Self
    where
        M::Headers: AsBorrowedHeaders,
    {
        RawRecord {
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers: message_headers(msg)
                .into_iter()
                .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
                .collect(),
        }
    }

    /// The task in this record, decoded.
    pub(crate) fn decode<T: prost::Message + Default>(&self) -> Option<T> {
        let record = decode_record(self.header(METADATA_HEADER), self.payload.as_deref()).ok()?;
        T::decode(&*record.task).ok()
    }

    /// The value of the first header named `name` (empty for a null value, as the
    /// extractor reads it).
    pub(crate) fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_deref().unwrap_or_default())
    }

    /// Appends the record's headers but those `skip` names to `into`, byte for byte.
    fn copy_headers(&self, mut into: OwnedHeaders, skip: impl Fn(&[u8]) -> bool) -> OwnedHeaders {
        for (k, v) in &self.headers {
            if !skip(k) {
                into = add_raw_header(into, k, v.as_deref());
            }
        }
        into
    }
}

fn is_dead_letter_header(name: &[u8]) -> bool {
    name.starts_with(dead_letter::PREFIX.as_bytes())
}

/// The largest record the forwarder's producer accepts: its `message.max.bytes`, or
/// librdkafka's default.
pub(crate) fn message_limit(config: &ClientConfig) -> usize {
    config
        .get("message.max.bytes")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

/// The retry queue of a subscription.
pub(crate) struct RetryQueue {
    pub(crate) topic: String,
    pub(crate) backoff: Backoff,
    pub(crate) max_retries: u32,
}

/// Which copy of a task a record is, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyKind {
    Retry,
    DeadLetter,
    Reduced,
    Shaped,
}

impl CopyKind {
    fn as_str(self) -> &'static str {
        match self {
            CopyKind::Retry => "retry",
            CopyKind::DeadLetter => "dead-letter",
            CopyKind::Reduced => "reduced dead-letter",
            CopyKind::Shaped => "shaped",
        }
    }
}

/// One record to produce on a task's behalf.
struct Copy<'a> {
    kind: CopyKind,
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: Option<Cow<'a, [u8]>>,
    headers: OwnedHeaders,
}

impl Copy<'_> {
    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut r = FutureRecord::<[u8], [u8]>::to(self.topic).headers(self.headers.clone());
        if let Some(k) = self.key {
            r = r.key(k);
        }
        if let Some(p) = &self.payload {
            r = r.payload(p);
        }
        r
    }
}

/// How producing a copy ended.
enum Sent {
    /// The broker has it.
    Acked,
    /// Refused for good (a permanent error).
    Refused(KafkaError),
    /// The partition was closed first.
    Closed,
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
    /// The producer's `message.max.bytes` ([`message_limit`]): a reduced dead-letter copy
    /// is cut to fit it.
    pub(crate) max_message_bytes: usize,
}

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
        let decoded = decode_record(record.header(METADATA_HEADER), record.payload.as_deref()).ok();
        let metadata: TaskMetadata = decoded
            .as_ref()
            .map(|d| d.metadata.clone())
            .unwrap_or_default();
        let retries_done = u32::try_from(metadata.retry_count.max(0)).unwrap_or(u32::MAX);
        let mut reason = Cow::Borrowed(failure.reason.as_str());
        let mut retry_refused = false;
        if let (Some(q), Some(d)) = (&self.retry, &decoded) {
            if !failure.permanent && retries_done < q.max_retries {
                let delay = q.backoff.delay(retries_done);
                let next = TaskMetadata {
                    // From the count this runtime trusted (a negative one read as 0), so
                    // a hostile count cannot buy more attempts than `max_retries`.
                    retry_count: i64::from(retries_done) + 1,
                    scheduled_time_millis: now_millis()
                        .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                    ..metadata.clone()
                };
                let headers = add_raw_header(
                    OwnedHeaders::new(),
                    METADATA_HEADER.as_bytes(),
                    Some(&encode_metadata(&next)),
                );
                let headers = record.copy_headers(headers, |k| {
                    k == METADATA_HEADER.as_bytes() || is_dead_letter_header(k)
                });
                tracing::info!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset, retry = next.retry_count,
                    delay_ms = delay.as_millis() as u64, "task failed ({}); retrying: {}",
                    failure.kind, failure.reason);
                let copy = Copy {
                    kind: CopyKind::Retry,
                    topic: &q.topic,
                    key: record.key.as_deref(),
                    payload: Some(Cow::Borrowed(&*d.task)),
                    headers,
                };
                match self.produce(partition, offset, &copy).await {
                    Sent::Acked => {
                        partition.recorder().retried();
                        return true;
                    }
                    Sent::Closed => return false,
                    Sent::Refused(e) => {
                        tracing::error!(subscription = %self.subscription,
                            topic = %partition.topic(), partition = partition.partition(),
                            offset, to = %q.topic,
                            "the retry topic refused the task for good ({e}); dead-lettering it");
                        retry_refused = true;
                        reason = Cow::Owned(format!(
                            "{}; then its retry copy to {} was refused: {e}",
                            failure.reason, q.topic
                        ));
                    }
                }
            }
        }
        let attempts = u64::from(retries_done) + 1;
        self.dead_letter(
            partition,
            offset,
            record,
            failure.kind,
            &reason,
            attempts,
            retry_refused,
        )
        .await
    }

    /// Produces the dead-letter copy of a task (a reduced one if the full one is refused
    /// for good, stalling the partition if even that cannot be written); true once
    /// acknowledged or when there is no dead-letter topic, false if the partition was
    /// closed first.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        partition: &PartitionCore,
        offset: i64,
        record: &RawRecord,
        kind: &str,
        reason: &str,
        attempts: u64,
        retry_refused: bool,
    ) -> bool {
        let Some(dlq) = &self.dead_letter else {
            if retry_refused {
                tracing::error!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset,
                    "task failed ({kind}) and is given up (no dead-letter topic): {reason}");
            } else if self.retry.is_some() {
                tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset, attempts,
                    "task failed ({kind}) and is given up (no dead-letter topic): {reason}");
            }
            return true;
        };
        tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
            partition = partition.partition(), offset, to = %dlq, attempts,
            "task failed ({kind}) for good; dead-lettering it: {reason}");
        let full = Copy {
            kind: CopyKind::DeadLetter,
            topic: dlq,
            key: record.key.as_deref(),
            payload: record.payload.as_deref().map(Cow::Borrowed),
            headers: self.dead_letter_headers(partition, offset, record, kind, reason, attempts),
        };
        let refused = match self.produce(partition, offset, &full).await {
            Sent::Acked => {
                partition.recorder().dead_lettered();
                return true;
            }
            Sent::Closed => return false,
            Sent::Refused(e) => e,
        };
        let reason = format!("{reason}; its dead-letter copy was refused: {refused}");
        let mut reduced = self.reduced_copy(
            partition, offset, record, kind, &reason, attempts, dlq, None,
        );
        tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
            partition = partition.partition(), offset, to = %dlq,
            value_bytes = reduced.payload.as_ref().map_or(0, |p| p.len()),
            "the dead-letter topic refused the task for good ({refused}); writing a reduced copy");
        let mut sent = self.produce(partition, offset, &reduced).await;
        if let Sent::Refused(e) = &sent {
            // Refused as too large although cut to the producer's limit: the broker's
            // limit is lower. The copy without a value is the smallest there is.
            if is_size_error(e) && reduced.payload.as_ref().is_some_and(|p| !p.is_empty()) {
                reduced = self.reduced_copy(
                    partition,
                    offset,
                    record,
                    kind,
                    &reason,
                    attempts,
                    dlq,
                    Some(0),
                );
                sent = self.produce(partition, offset, &reduced).await;
            }
        }
        let acked = match sent {
            Sent::Acked => true,
            Sent::Closed => false,
            Sent::Refused(e) => self.until_written(partition, offset, &reduced, e).await,
        };
        if acked {
            partition.recorder().dead_lettered();
        }
        acked
    }

    /// The record's own headers (minus earlier `decaton-dlq-*` ones) and the dead-letter
    /// headers saying why and where from.
    fn dead_letter_headers(
        &self,
        partition: &PartitionCore,
        offset: i64,
        record: &RawRecord,
        kind: &str,
        reason: &str,
        attempts: u64,
    ) -> OwnedHeaders {
        let mut headers = record.copy_headers(OwnedHeaders::new(), is_dead_letter_header);
        let (a, p, o, t) = (
            attempts.to_string(),
            partition.partition().to_string(),
            offset.to_string(),
            now_millis().to_string(),
        );
        for (k, v) in [
            (dead_letter::REASON, reason),
            (dead_letter::KIND, kind),
            (dead_letter::ATTEMPTS, &a),
            (dead_letter::TOPIC, partition.topic()),
            (dead_letter::PARTITION, &p),
            (dead_letter::OFFSET, &o),
            (dead_letter::ORIGIN_TOPIC, &self.origin),
            (dead_letter::SUBSCRIPTION, &self.subscription),
            (dead_letter::TIME_MILLIS, &t),
        ] {
            headers = add_raw_header(headers, k.as_bytes(), Some(v.as_bytes()));
        }
        headers
    }

    /// A dead-letter copy that fits `message.max.bytes`: the key, the headers, the reason
    /// cut to [`REASON_MAX`] bytes and the value cut to what room is left (at most
    /// `value_max` bytes when given).
    #[allow(clippy::too_many_arguments)]
    fn reduced_copy<'a>(
        &self,
        partition: &PartitionCore,
        offset: i64,
        record: &'a RawRecord,
        kind: &str,
        reason: &str,
        attempts: u64,
        dlq: &'a str,
        value_max: Option<usize>,
    ) -> Copy<'a> {
        let reason = truncate_text(reason, REASON_MAX);
        let value = record.payload.as_deref();
        let size = value.map_or(0, <[u8]>::len);
        let size_text = size.to_string();
        let headers = self.dead_letter_headers(partition, offset, record, kind, reason, attempts);
        // Measured with the truncation headers, which are added only if the value is cut.
        let fixed = RECORD_OVERHEAD
            + record.key.as_ref().map_or(0, Vec::len)
            + headers_size(&headers)
            + VALUE_TRUNCATED.len()
            + VALUE_SIZE.len()
            + size_text.len()
            + 4
            + 2 * HEADER_OVERHEAD;
        let room = self.max_message_bytes.saturating_sub(fixed);
        let keep = size.min(room).min(value_max.unwrap_or(usize::MAX));
        let (payload, headers) = if keep < size {
            let headers = add_raw_header(headers, VALUE_TRUNCATED.as_bytes(), Some(b"true"));
            let headers =
                add_raw_header(headers, VALUE_SIZE.as_bytes(), Some(size_text.as_bytes()));
            (value.and_then(|v| v.get(..keep)), headers)
        } else {
            (value, headers)
        };
        Copy {
            kind: CopyKind::Reduced,
            topic: dlq,
            key: record.key.as_deref(),
            payload: payload.map(Cow::Borrowed),
            headers,
        }
    }

    /// Produces a task of a key over its quota to the shaping topic as it was fetched
    /// (same key, value and headers), marked with `shaped_by`. Returns once the record
    /// is queued in the producer, so records queued one after another keep that order in
    /// their partition (the producer is idempotent); the acknowledgement is awaited in the
    /// background, then `then(true)` — or `then(false)` if there is no shaping topic or
    /// the partition was closed before the record was stored. A record the broker
    /// refused for a while is produced again, after any queued behind it; one refused for
    /// good stalls the partition until it is written (see the module docs).
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
        let headers = record.copy_headers(OwnedHeaders::new(), |k| k == SHAPED_BY.as_bytes());
        let headers = add_raw_header(headers, SHAPED_BY.as_bytes(), Some(shaped_by));
        let copy = Copy {
            kind: CopyKind::Shaped,
            topic: &topic,
            key: record.key.as_deref(),
            payload: record.payload.as_deref().map(Cow::Borrowed),
            headers,
        };
        let queued = loop {
            if partition.is_closed() {
                return then(false);
            }
            match self.producer.send_result(copy.record()) {
                Ok(delivery) => break Ok(delivery),
                // The producer's queue is full: the lane waits for room (backpressure).
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if !sleep_unless_closed(&partition, QUEUE_FULL_WAIT).await {
                        return then(false);
                    }
                }
                Err((e, _)) => break Err(e),
            }
        };
        let headers = copy.headers;
        let this = self.clone();
        self.runtime.spawn(async move {
            let copy = Copy {
                kind: CopyKind::Shaped,
                topic: &topic,
                key: record.key.as_deref(),
                payload: record.payload.as_deref().map(Cow::Borrowed),
                headers,
            };
            let first = match queued {
                Ok(delivery) => tokio::select! {
                    _ = partition.closed() => None,
                    d = delivery => Some(match d {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(e),
                        Err(_) => Err(KafkaError::Canceled),
                    }),
                },
                Err(e) => Some(Err(e)),
            };
            let acked = match first {
                None => false,
                Some(Ok(())) => true,
                Some(Err(e)) => {
                    let class = classify(&e);
                    partition.recorder().forward_failed(class);
                    let sent = if class == ErrorClass::Permanent {
                        Sent::Refused(e)
                    } else {
                        tracing::warn!(subscription = %this.subscription,
                            topic = %partition.topic(), partition = partition.partition(),
                            offset, to = %topic,
                            "the shaped task was not stored; producing it again: {e}");
                        this.produce(&partition, offset, &copy).await
                    };
                    match sent {
                        Sent::Acked => true,
                        Sent::Closed => false,
                        Sent::Refused(e) => this.until_written(&partition, offset, &copy, e).await,
                    }
                }
            };
            if acked {
                partition.recorder().shaped();
            }
            then(acked);
        });
    }

    /// Sends `copy` once and waits for its acknowledgement; `None` if the partition was
    /// closed first.
    async fn attempt(
        &self,
        partition: &PartitionCore,
        copy: &Copy<'_>,
    ) -> Option<Result<(), KafkaError>> {
        if partition.is_closed() {
            return None;
        }
        tokio::select! {
            _ = partition.closed() => None,
            sent = self.producer.send(copy.record(), Timeout::After(PRODUCE_TIMEOUT)) => {
                Some(sent.map(|_| ()).map_err(|(e, _)| e))
            }
        }
    }

    /// Produces `copy`, trying again with backoff after transient errors, until the
    /// broker acknowledges it, refuses it for good, or the partition is closed.
    async fn produce(&self, partition: &PartitionCore, offset: i64, copy: &Copy<'_>) -> Sent {
        let mut delays = backon::ExponentialBuilder::new()
            .with_min_delay(RETRY_MIN)
            .with_max_delay(RETRY_MAX)
            .without_max_times()
            .build();
        loop {
            let e = match self.attempt(partition, copy).await {
                None => return Sent::Closed,
                Some(Ok(())) => return Sent::Acked,
                Some(Err(e)) => e,
            };
            let class = classify(&e);
            partition.recorder().forward_failed(class);
            if class == ErrorClass::Permanent {
                return Sent::Refused(e);
            }
            tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                partition = partition.partition(), offset, to = %copy.topic,
                "could not produce the {} copy of the task; trying again: {e}", copy.kind.as_str());
            if !sleep_unless_closed(partition, delays.next().unwrap_or(RETRY_MAX)).await {
                return Sent::Closed;
            }
        }
    }

    /// Stalls the partition at `offset` while `copy` cannot be written (first refused with
    /// `error`), trying again at a slow pace; true once written, false if the partition
    /// was closed first.
    async fn until_written(
        &self,
        partition: &PartitionCore,
        offset: i64,
        copy: &Copy<'_>,
        mut error: KafkaError,
    ) -> bool {
        let mut delay = STALL_FIRST_RETRY;
        loop {
            let reason = format!(
                "the {} copy of the task to topic {} cannot be written: {error}",
                copy.kind.as_str(),
                copy.topic
            );
            if partition.stall(offset, &reason) {
                tracing::error!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset,
                    "partition {}-{} stalled at offset {offset}: {reason}; nothing past it is \
                     committed, and the copy is tried again every {delay:?} (at most a minute)",
                    partition.topic(), partition.partition());
            }
            if !sleep_unless_closed(partition, delay).await {
                partition.unstall(offset);
                return false;
            }
            delay = (delay * 2).min(STALL_MAX_RETRY);
            match self.attempt(partition, copy).await {
                None => {
                    partition.unstall(offset);
                    return false;
                }
                Some(Ok(())) => {
                    partition.unstall(offset);
                    tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                        partition = partition.partition(), offset, to = %copy.topic,
                        "the {} copy of the task was written; the partition goes on", copy.kind.as_str());
                    return true;
                }
                Some(Err(e)) => {
                    partition.recorder().forward_failed(classify(&e));
                    error = e;
                }
            }
        }
    }
}

/// Sleeps for `delay`; false if the partition was closed first.
async fn sleep_unless_closed(partition: &PartitionCore, delay: Duration) -> bool {
    tokio::select! {
        _ = partition.closed() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Whether the broker or the producer refused a record for its size.
fn is_size_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// The bytes `headers` add to a record, about as librdkafka counts them.
fn headers_size(headers: &OwnedHeaders) -> usize {
    raw_headers(headers.as_borrowed())
        .map(|h| h.name.len() + h.value.map_or(0, <[u8]>::len) + HEADER_OVERHEAD)
        .sum()
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character.
fn truncate_text(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::task::tests::core;
    use decaton_protocol::headers::raw_headers;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::OwnedMessage;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::Producer;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use rdkafka::{Message, Offset, TopicPartitionList};
    use std::time::Instant;

    fn forwarder(bootstrap: &str, limit: Option<usize>, retry: Option<&str>) -> Arc<Forwarder> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("log_level", "0");
        if let Some(limit) = limit {
            config.set("message.max.bytes", limit.to_string());
        }
        Arc::new(Forwarder {
            producer: config.create().unwrap(),
            subscription: Arc::from("s"),
            origin: Arc::from("t"),
            retry: retry.map(|t| RetryQueue {
                topic: t.to_string(),
                backoff: Backoff::fixed(Duration::ZERO),
                max_retries: 3,
            }),
            dead_letter: Some("dlq".to_string()),
            shaping: Some("shaping".to_string()),
            runtime: Handle::current(),
            max_message_bytes: message_limit(&config),
        })
    }

    /// A task record with a header name that is not UTF-8 and a null header value.
    fn record(value_bytes: usize) -> RawRecord {
        let meta = encode_metadata(&TaskMetadata {
            timestamp_millis: 1,
            ..Default::default()
        });
        RawRecord {
            key: Some(b"k".to_vec()),
            payload: Some((0..value_bytes).map(|i| i as u8).collect()),
            headers: vec![
                (METADATA_HEADER.as_bytes().to_vec(), Some(meta)),
                (b"\xff\xfe".to_vec(), Some(b"x".to_vec())),
                (b"null".to_vec(), None),
            ],
        }
    }

    fn failure() -> Failure {
        Failure::of(Outcome::Error, Some("boom".into()))
    }

    /// The first record of partition 0 of `topic`.
    fn read_one(bootstrap: &str, topic: &str) -> OwnedMessage {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "reader")
            .set("log_level", "0")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                return m.unwrap().detach();
            }
        }
        panic!("nothing in {topic}");
    }

    fn header_of(m: &OwnedMessage, name: &[u8]) -> Option<Option<Vec<u8>>> {
        let hs = m.headers()?;
        raw_headers(hs.as_borrowed())
            .find(|h| h.name == name)
            .map(|h| h.value.map(<[u8]>::to_vec))
    }

    fn text(m: &OwnedMessage, name: &str) -> String {
        let v = header_of(m, name.as_bytes()).flatten().unwrap_or_default();
        String::from_utf8(v).unwrap()
    }

    fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        let cluster = MockCluster::new(1).unwrap();
        for t in ["retry", "dlq", "shaping"] {
            cluster.create_topic(t, 1, 1).unwrap();
        }
        cluster
    }

    #[test]
    fn reasons_are_cut_on_a_character() {
        assert_eq!(truncate_text("héllo", 2), "h");
        assert_eq!(truncate_text("héllo", 3), "hé");
        assert_eq!(truncate_text("héllo", 64), "héllo");
    }

    /// A dead-letter copy larger than `message.max.bytes` used to be produced again
    /// forever; now its reduced copy lands, with the headers byte for byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_letter_copy_too_large_is_reduced_to_fit_with_its_reason() {
        let cluster = cluster();
        let bootstrap = cluster.bootstrap_servers();
        let f = forwarder(&bootstrap, Some(4000), None);
        let record = record(10_000);
        let core = core();
        let acked = tokio::time::timeout(
            Duration::from_secs(30),
            f.forward(&core, 7, &record, &Failure::discarded("undecodable".into())),
        )
        .await
        .expect("the forward ended");
        assert!(acked);
        let m = read_one(&bootstrap, "dlq");
        let value = m.payload().unwrap();
        assert!(!value.is_empty() && value.len() < 4000, "{}", value.len());
        assert_eq!(value, &record.payload.as_ref().unwrap()[..value.len()]);
        assert_eq!(text(&m, VALUE_TRUNCATED), "true");
        assert_eq!(text(&m, VALUE_SIZE), "10000");
        assert_eq!(text(&m, dead_letter::OFFSET), "7");
        let reason = text(&m, dead_letter::REASON);
        assert!(
            reason.starts_with("undecodable; its dead-letter copy was refused"),
            "{reason}"
        );
        assert!(reason.contains("MessageSizeTooLarge"), "{reason}");
        assert_eq!(m.key(), Some(&b"k"[..]));
        assert_eq!(header_of(&m, b"\xff\xfe"), Some(Some(b"x".to_vec())));
        assert_eq!(
            header_of(&m, b"null"),
            Some(None),
            "a null value stays null"
        );
        assert_eq!(core.stalled(), None);
    }

    /// A negative `retry_count` (no producer of this project writes one) used to stay
    /// negative in the retry copy, so the task went round the retry topic about
    /// |retry_count| times instead of `max_retries`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_negative_retry_count_buys_no_extra_retries() {
        let cluster = cluster();
        let bootstrap = cluster.bootstrap_servers();
        let f = forwarder(&bootstrap, None, Some("retry"));
        let mut record = record(10);
        record.headers[0].1 = Some(encode_metadata(&TaskMetadata {
            timestamp_millis: 1,
            retry_count: i64::MIN,
            ..Default::default()
        }));
        let acked = tokio::time::timeout(
            Duration::from_secs(30),
            f.forward(&core(), 3, &record, &failure()),
        )
        .await
        .expect("the forward ended");
        assert!(acked);
        let m = read_one(&bootstrap, "retry");
        let meta = header_of(&m, METADATA_HEADER.as_bytes()).flatten().unwrap();
        let meta = decaton_protocol::decode_metadata(&meta).unwrap();
        assert_eq!(meta.retry_count, 1, "counted from 0, as it was read");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_copy_refused_for_good_sends_the_task_to_the_dead_letter_topic() {
        let cluster = cluster();
        let bootstrap = cluster.bootstrap_servers();
        let f = forwarder(&bootstrap, None, Some("retry"));
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let record = record(100);
        let acked = tokio::time::timeout(
            Duration::from_secs(30),
            f.forward(&core(), 3, &record, &failure()),
        )
        .await
        .expect("the forward ended");
        assert!(acked);
        let m = read_one(&bootstrap, "dlq");
        assert_eq!(
            m.payload(),
            record.payload.as_deref(),
            "the whole copy fits"
        );
        let reason = text(&m, dead_letter::REASON);
        assert!(
            reason.starts_with("boom; then its retry copy to retry was refused"),
            "{reason}"
        );
        assert_eq!(header_of(&m, b"\xff\xfe"), Some(Some(b"x".to_vec())));
    }

    /// A copy that cannot be written stalls the partition visibly until it can, and the
    /// task's forward does not end (its offset stays unfinished) meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_that_cannot_be_written_stalls_the_partition_until_it_can() {
        let cluster = cluster();
        let bootstrap = cluster.bootstrap_servers();
        let f = forwarder(&bootstrap, None, None);
        let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 200];
        cluster.request_errors(RDKafkaApiKey::Produce, &refused);
        let core = core();
        let (tx, mut done) = tokio::sync::oneshot::channel();
        f.spawn(
            core.clone(),
            5,
            Arc::new(record(100)),
            failure(),
            move |acked| {
                let _ = tx.send(acked);
            },
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let (offset, reason) = loop {
            if let Some(s) = core.stalled() {
                break s;
            }
            assert!(Instant::now() < deadline, "never stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(offset, 5);
        assert!(reason.contains("topic dlq"), "{reason}");
        assert!(reason.contains("TopicAuthorizationFailed"), "{reason}");
        assert!(done.try_recv().is_err(), "the offset must stay unfinished");
        // The operator grants the ACL: the next slow retry writes the copy.
        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        let acked = tokio::time::timeout(Duration::from_secs(20), done)
            .await
            .expect("written once allowed")
            .unwrap();
        assert!(acked);
        assert_eq!(core.stalled(), None);
        let m = read_one(&bootstrap, "dlq");
        assert_eq!(text(&m, dead_letter::OFFSET), "5");
    }

    /// A shaped copy refused for good stalls the partition rather than losing the task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shaped_copy_refused_for_good_stalls_the_partition() {
        let cluster = cluster();
        let bootstrap = cluster.bootstrap_servers();
        let f = forwarder(&bootstrap, None, None);
        let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 200];
        cluster.request_errors(RDKafkaApiKey::Produce, &refused);
        let core = core();
        let (tx, done) = tokio::sync::oneshot::channel();
        f.shape(
            core.clone(),
            9,
            Arc::new(record(100)),
            b"me",
            move |acked| {
                let _ = tx.send(acked);
            },
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while core.stalled().is_none() {
            assert!(Instant::now() < deadline, "never stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(core.stalled().unwrap().1.contains("topic shaping"));
        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        let acked = tokio::time::timeout(Duration::from_secs(20), done)
            .await
            .expect("written once allowed")
            .unwrap();
        assert!(acked);
        let m = read_one(&bootstrap, "shaping");
        assert_eq!(
            header_of(&m, SHAPED_BY.as_bytes()),
            Some(Some(b"me".to_vec()))
        );
        assert_eq!(header_of(&m, b"\xff\xfe"), Some(Some(b"x".to_vec())));
    }

    /// A forward waiting for an acknowledgement that does not come (no broker) used to
    /// hold its partition up to `message.timeout.ms`; closing the partition ends it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_the_partition_ends_a_forward_waiting_for_its_acknowledgement() {
        let f = forwarder("127.0.0.1:9", None, None);
        let core = core();
        let (tx, done) = tokio::sync::oneshot::channel();
        f.spawn(
            core.clone(),
            1,
            Arc::new(record(10)),
            failure(),
            move |acked| {
                let _ = tx.send(acked);
            },
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.producer.in_flight_count() == 0 {
            assert!(Instant::now() < deadline, "the copy was never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        core.close();
        let acked = tokio::time::timeout(Duration::from_secs(2), done)
            .await
            .expect("the forward ends once the partition is closed")
            .unwrap();
        assert!(!acked, "nothing was written: the offset stays unfinished");
    }
}
