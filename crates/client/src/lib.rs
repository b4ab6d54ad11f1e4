//! `TaskClient`: enqueue tasks for decaton-rs processors.
//!
//! A task is any protobuf message. [`TaskClient::put`] serializes it as the record value,
//! attaches the Decaton `dt_meta` header (creation time, this application and instance),
//! keys the record by the given key (a user id, so that user's tasks stay in one partition
//! and in order) and resolves once the broker has acknowledged it.
//!
//! Defaults favour durability: `acks=all` and idempotence on, so a retried produce never
//! duplicates or reorders a key's tasks. Keys are placed like Java clients place them
//! (`partitioner=murmur2_random`: murmur2 of the key, as Java `DecatonClient` and every JVM
//! producer do), so a Rust and a Java producer send one key's tasks to one partition. Every
//! librdkafka producer setting passes straight through [`TaskClientBuilder::set`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), decaton_client::ClientError> {
//! use decaton_client::TaskClient;
//! use decaton_protocol::{ChatOp, OpType};
//!
//! let client = TaskClient::<ChatOp>::builder("127.0.0.1:9092", "chat-ops")
//!     .application_id("talk-server")
//!     .instance_id("talk-1")
//!     .build()?;
//! let op = ChatOp { user_id: "u1".into(), op: OpType::SendMessage as i32, ..Default::default() };
//! let delivered = client.put("u1", &op).await?;
//! println!("stored at {}/{}", delivered.partition, delivered.offset);
//! client.close().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use decaton_protocol::{
    encode_metadata, now_millis, TaskMetadata, TraceParent, METADATA_HEADER, TRACEPARENT_HEADER,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

/// The librdkafka partitioner that places keyed records as Java clients do: murmur2 of the
/// key, positive, modulo the partition count; records without a key go to a random
/// partition. [`TaskClient`]'s default; override it with `set("partitioner", ...)`.
pub const JAVA_COMPATIBLE_PARTITIONER: &str = "murmur2_random";

/// Default time a `put` may take before it fails (librdkafka `message.timeout.ms`).
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a task was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No broker acknowledged the record within the delivery timeout (broker down,
    /// unreachable or partition leaderless).
    #[error("broker unreachable: record not acknowledged within {0:?}")]
    BrokerUnreachable(Duration),
    /// The topic does not exist on the cluster.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// The record is larger than the producer's or the broker's limit.
    #[error("record of {size} bytes too large ({source})")]
    RecordTooLarge {
        /// Key + value size in bytes.
        size: usize,
        /// What librdkafka reported.
        source: KafkaError,
    },
    /// The client configuration was rejected.
    #[error("invalid client configuration: {0}")]
    Config(KafkaError),
    /// Any other Kafka error.
    #[error("kafka: {0}")]
    Kafka(KafkaError),
}

/// Where a task was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Partition the task went to.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

/// Per-put options: what [`TaskClient::put_with`] sets beyond the defaults. Built with
/// `PutOptions::default()` and its setters, so options added later break no caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutOptions {
    /// Creation timestamp (metadata `timestamp_millis`, and the record timestamp);
    /// default: now.
    pub timestamp: Option<SystemTime>,
    /// Do not process before this time (metadata `scheduled_time_millis`).
    pub scheduled_time: Option<SystemTime>,
    /// The trace the task belongs to, sent as the W3C `traceparent` record header; the
    /// processor's span for the task continues it.
    pub traceparent: Option<TraceParent>,
}

impl PutOptions {
    /// Sets the creation timestamp: `PutOptions::default().timestamp(t)`.
    pub fn timestamp(mut self, timestamp: SystemTime) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    /// Sets the time before which the task is not processed.
    pub fn scheduled_time(mut self, scheduled_time: SystemTime) -> Self {
        self.scheduled_time = Some(scheduled_time);
        self
    }

    /// Sets the trace context the task carries (`traceparent` header).
    pub fn traceparent(mut self, traceparent: TraceParent) -> Self {
        self.traceparent = Some(traceparent);
        self
    }
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Builds a [`TaskClient`].
#[derive(Debug, Clone)]
pub struct TaskClientBuilder<T> {
    bootstrap_servers: String,
    topic: String,
    application_id: String,
    instance_id: String,
    delivery_timeout: Duration,
    kafka: BTreeMap<String, String>,
    _task: PhantomData<fn(T)>,
}

impl<T: prost::Message> TaskClientBuilder<T> {
    /// The application id written into every task's metadata (default `decaton-rs`).
    pub fn application_id(mut self, id: impl Into<String>) -> Self {
        self.application_id = id.into();
        self
    }

    /// The instance id written into every task's metadata (default: the host name).
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = id.into();
        self
    }

    /// How long a `put` may wait for the broker's acknowledgement before failing with
    /// [`ClientError::BrokerUnreachable`] (librdkafka `message.timeout.ms`).
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Sets any librdkafka producer property, verbatim. Overrides the defaults
    /// (`acks=all`, `enable.idempotence=true`, `linger.ms=5`,
    /// `partitioner=murmur2_random`).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.insert(key.into(), value.into());
        self
    }

    /// Creates the client. Fails only on an invalid configuration; no broker is contacted.
    pub fn build(self) -> Result<TaskClient<T>, ClientError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Java clients hash keys with murmur2; librdkafka's default is CRC32. Matching
            // Java keeps one key in one partition when both enqueue to the same topic.
            .set("partitioner", JAVA_COMPATIBLE_PARTITIONER)
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            );
        let mut delivery_timeout = self.delivery_timeout;
        for (k, v) in &self.kafka {
            config.set(k, v);
            if k == "message.timeout.ms" || k == "delivery.timeout.ms" {
                if let Ok(ms) = v.parse() {
                    delivery_timeout = Duration::from_millis(ms);
                }
            }
        }
        let producer: FutureProducer = config.create().map_err(ClientError::Config)?;
        Ok(TaskClient {
            producer,
            topic: self.topic,
            application_id: self.application_id,
            instance_id: self.instance_id,
            delivery_timeout,
            _task: PhantomData,
        })
    }
}

/// Enqueues tasks of type `T` on one topic. Cheap to share (`&self` methods; wrap in an
/// `Arc` to share across tasks).
pub struct TaskClient<T> {
    producer: FutureProducer,
    topic: String,
    application_id: String,
    instance_id: String,
    delivery_timeout: Duration,
    _task: PhantomData<fn(T)>,
}

impl<T: prost::Message> TaskClient<T> {
    /// Starts building a client for `topic` on the cluster at `bootstrap_servers`.
    pub fn builder(
        bootstrap_servers: impl Into<String>,
        topic: impl Into<String>,
    ) -> TaskClientBuilder<T> {
        TaskClientBuilder {
            bootstrap_servers: bootstrap_servers.into(),
            topic: topic.into(),
            application_id: "decaton-rs".into(),
            instance_id: default_instance_id(),
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            kafka: BTreeMap::new(),
            _task: PhantomData,
        }
    }

    /// The topic this client writes to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Enqueues `task` under `key` and resolves once the broker has acknowledged it.
    ///
    /// If librdkafka's local queue is full, waits for room rather than dropping the task.
    pub async fn put(&self, key: impl AsRef<[u8]>, task: &T) -> Result<Delivered, ClientError> {
        self.put_with(key, task, PutOptions::default()).await
    }

    /// Like [`put`](Self::put), with an explicit timestamp, scheduled time and/or trace
    /// context.
    pub async fn put_with(
        &self,
        key: impl AsRef<[u8]>,
        task: &T,
        options: PutOptions,
    ) -> Result<Delivered, ClientError> {
        let (header, timestamp) = self.metadata(options);
        self.send(
            Some(key.as_ref()),
            &header,
            &task.encode_to_vec(),
            timestamp,
            options.traceparent,
        )
        .await
    }

    /// Enqueues `task` without a key and resolves once the broker has acknowledged it.
    ///
    /// A task without a key has no ordering constraint: the producer spreads such tasks
    /// over the partitions, and the processor runs them as soon as a lane is free (round
    /// robin over the lanes in `bounded` mode). Use it for work where no two tasks need
    /// to run in order.
    pub async fn put_without_key(
        &self,
        task: &T,
        options: PutOptions,
    ) -> Result<Delivered, ClientError> {
        let (header, timestamp) = self.metadata(options);
        self.send(
            None,
            &header,
            &task.encode_to_vec(),
            timestamp,
            options.traceparent,
        )
        .await
    }

    /// The encoded `dt_meta` header for a new task, and its timestamp.
    fn metadata(&self, options: PutOptions) -> (Vec<u8>, i64) {
        let timestamp = options.timestamp.map(millis).unwrap_or_else(now_millis);
        let metadata = TaskMetadata {
            timestamp_millis: timestamp,
            source_application_id: self.application_id.clone(),
            source_instance_id: self.instance_id.clone(),
            retry_count: 0,
            scheduled_time_millis: options.scheduled_time.map(millis).unwrap_or(0),
        };
        (encode_metadata(&metadata), timestamp)
    }

    async fn send(
        &self,
        key: Option<&[u8]>,
        header: &[u8],
        value: &[u8],
        timestamp: i64,
        traceparent: Option<TraceParent>,
    ) -> Result<Delivered, ClientError> {
        let labels = [("topic", self.topic.clone())];
        metrics::counter!("decaton_client_puts_total", &labels).increment(1);
        let started = Instant::now();
        let mut headers = OwnedHeaders::new().insert(Header {
            key: METADATA_HEADER,
            value: Some(header),
        });
        let traceparent = traceparent.map(|t| t.to_string());
        if let Some(t) = &traceparent {
            headers = headers.insert(Header {
                key: TRACEPARENT_HEADER,
                value: Some(t.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&self.topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        let record = record.timestamp(timestamp).headers(headers);
        let result = self.producer.send(record, Timeout::Never).await;
        metrics::histogram!("decaton_client_delivery_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(d) => Ok(Delivered {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => {
                let err = self.classify(e, key.map_or(0, <[u8]>::len) + value.len() + header.len());
                metrics::counter!(
                    "decaton_client_errors_total",
                    &[
                        ("topic", self.topic.clone()),
                        ("kind", error_kind(&err).to_string())
                    ]
                )
                .increment(1);
                Err(err)
            }
        }
    }

    fn classify(&self, e: KafkaError, size: usize) -> ClientError {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageTimedOut) => {
                ClientError::BrokerUnreachable(self.delivery_timeout)
            }
            Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition) => {
                ClientError::UnknownTopic(self.topic.clone())
            }
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                ClientError::RecordTooLarge { size, source: e }
            }
            _ => ClientError::Kafka(e),
        }
    }

    /// Waits until every task handed to `put` so far is acknowledged or failed, at most
    /// `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), ClientError> {
        let producer = self.producer.clone();
        // librdkafka's flush blocks the calling thread; keep it off the async workers.
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|_| ClientError::Kafka(KafkaError::Canceled))?
            .map_err(|e| match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::OperationTimedOut) => {
                    ClientError::BrokerUnreachable(timeout)
                }
                _ => ClientError::Kafka(e),
            })
    }

    /// Waits for every in-flight delivery (up to the delivery timeout) and closes the client.
    pub async fn close(self) -> Result<(), ClientError> {
        self.flush(self.delivery_timeout + Duration::from_secs(1))
            .await
    }
}

fn error_kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::BrokerUnreachable(_) => "broker_unreachable",
        ClientError::UnknownTopic(_) => "unknown_topic",
        ClientError::RecordTooLarge { .. } => "record_too_large",
        ClientError::Config(_) => "config",
        ClientError::Kafka(_) => "kafka",
    }
}

fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}
