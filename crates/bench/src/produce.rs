//! Producing tasks: filling a run's topic before its consumer starts, and the producer
//! benchmark (`decaton bench produce`).
//!
//! # The tasks
//!
//! Every task is a [`ChatOp`] with a payload of `--payload-bytes` bytes. By default it
//! has no key ([`TaskClient::put_without_key`]), as in Decaton's harness, and the
//! producer spreads such records over the partitions; `--keys unique` keys task `i`
//! `task-{i}`, `--keys N` keys it `user-{i % N}`.
//!
//! # The producer benchmark
//!
//! `decaton bench produce` compares two producers sending the same records (same key,
//! value, `dt_meta` header and timestamp, same librdkafka settings: `acks=all`,
//! idempotence on, `linger.ms=5`), each on a fresh topic, with `--in-flight` sends
//! outstanding:
//!
//! * `put`: [`TaskClient::put`] (or `put_without_key`), the decaton-rs client;
//! * `raw-producer`: an rdkafka `FutureProducer` the caller drives directly.
//!
//! The difference is what the client adds per task (metadata, metrics, error mapping).
//! The latency figure there is the acknowledgement latency: send to broker ack.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_client::{PutOptions, TaskClient};
use decaton_protocol::{
    encode_metadata, now_millis, ChatOp, OpType, TaskMetadata, METADATA_HEADER,
};
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::config::{Keys, Workload};
use crate::figures::Figures;
use crate::progress::{self, Progress};
use crate::recorder::Recorder;
use crate::report::BenchReport;
use crate::BenchError;

/// Application id written into the benchmark tasks' metadata.
const APPLICATION_ID: &str = "decaton-bench";

/// The key (none for [`Keys::Null`]) and task number `i` of a workload.
pub(crate) fn task(i: u64, keys: Keys, payload: &[u8]) -> (Option<String>, ChatOp) {
    let user = match keys {
        Keys::Distinct(k) => format!("user-{}", i % k.max(1)),
        Keys::Null | Keys::Unique => format!("task-{i}"),
    };
    let key = (keys != Keys::Null).then(|| user.clone());
    let op = ChatOp {
        user_id: user,
        op: OpType::SendMessage as i32,
        target_id: format!("room-{}", i % 97),
        payload: payload.to_vec(),
        sequence: i,
        created_at_millis: now_millis(),
    };
    (key, op)
}

/// Puts `op` with `key`, or without a key.
pub(crate) async fn put(
    client: &TaskClient<ChatOp>,
    key: Option<&str>,
    op: &ChatOp,
) -> Result<(), decaton_client::ClientError> {
    match key {
        Some(k) => client.put(k, op).await?,
        None => client.put_without_key(op, PutOptions::default()).await?,
    };
    Ok(())
}

/// Runs `work(i)` for every `i` in `0..total` on `workers` concurrent tasks, so at most
/// `workers` calls are outstanding at once. Returns the first error.
async fn for_each_concurrent<F, Fut>(total: u64, workers: usize, work: F) -> Result<(), BenchError>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), BenchError>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let mut set: JoinSet<Result<(), BenchError>> = JoinSet::new();
    for _ in 0..workers.max(1) {
        let (next, work) = (next.clone(), work.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok(());
                }
                work(i).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| BenchError::Internal(format!("producer worker: {e}")))??;
    }
    Ok(())
}

pub(crate) fn client(
    bootstrap: &str,
    topic: &str,
    workload: &Workload,
) -> Result<TaskClient<ChatOp>, BenchError> {
    let mut builder = TaskClient::<ChatOp>::builder(bootstrap, topic)
        .application_id(APPLICATION_ID)
        .instance_id("bench")
        // Tasks without a key go to a random partition each, rather than to one partition
        // per 10 ms (librdkafka's sticky default), which would leave the partitions of a
        // quickly filled topic very uneven and the run waiting for the largest one.
        .set("sticky.partitioning.linger.ms", "0");
    for (k, v) in &workload.producer_params {
        builder = builder.set(k.clone(), v.clone());
    }
    Ok(builder.build()?)
}

/// Puts every task of `workload` (warmup included) on `topic` with `TaskClient`, and
/// waits for all acknowledgements.
pub(crate) async fn fill(
    cluster: &Cluster,
    topic: &str,
    workload: &Workload,
) -> Result<(), BenchError> {
    let client = Arc::new(client(cluster.bootstrap(), topic, workload)?);
    let total = workload.total();
    let done = Arc::new(AtomicU64::new(0));
    let progress = Progress::new(workload.progress, total, "producing");
    let payload: Arc<[u8]> = vec![b'x'; workload.payload_bytes].into();
    let keys = workload.keys;
    let work = {
        let (client, done) = (client.clone(), done.clone());
        move |i: u64| {
            let (client, done, payload) = (client.clone(), done.clone(), payload.clone());
            async move {
                let (key, op) = task(i, keys, &payload);
                put(&client, key.as_deref(), &op).await?;
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    };
    let fill = for_each_concurrent(total, workload.in_flight, work);
    tokio::pin!(fill);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut fill => { r?; break; }
            _ = tick.tick() => progress.set(done.load(Ordering::Relaxed)),
        }
    }
    progress.finish();
    client.flush(Duration::from_secs(30)).await?;
    Ok(())
}

/// The producer the producer benchmark drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProducerKind {
    /// `TaskClient::put`, the decaton-rs client.
    Put,
    /// A raw rdkafka `FutureProducer` sending the same records.
    RawProducer,
}

impl ProducerKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            ProducerKind::Put => "put",
            ProducerKind::RawProducer => "raw-producer",
        }
    }
}

/// Configuration of `decaton bench produce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProduceConfig {
    /// Which producers to compare, in this order.
    pub producers: Vec<ProducerKind>,
    /// The workload (`keys`, `payload_bytes`, `in_flight` and the counts apply).
    pub workload: Workload,
}

impl ProduceConfig {
    /// The command line that reproduces the benchmark of one producer.
    pub fn command_line(&self, producer: ProducerKind) -> String {
        let mut parts = vec![
            "decaton bench produce".to_string(),
            format!("--producer {}", producer.name()),
        ];
        parts.extend(self.workload.flags());
        parts.join(" ")
    }
}

/// Runs the producer benchmark: for each producer, `runs` times, a fresh topic filled
/// with `warmup + tasks` records, the window measured over the last `tasks` acks.
pub async fn run_produce(config: &ProduceConfig) -> Result<Vec<BenchReport>, BenchError> {
    let cluster = Cluster::start(config.workload.bootstrap.as_deref()).await?;
    let mut reports = Vec::new();
    for &producer in &config.producers {
        let mut runs = Vec::new();
        for run in 1..=config.workload.runs {
            let topic = cluster.unique_name(producer.name());
            cluster
                .create_topic(&topic, config.workload.partitions)
                .await?;
            let label = format!("{} run {run}/{}", producer.name(), config.workload.runs);
            runs.push(produce_once(&cluster, &topic, producer, &config.workload, &label).await?);
        }
        reports.push(BenchReport::new(
            producer.name().to_string(),
            None,
            Some(producer),
            None,
            config.workload.clone(),
            cluster.describe(),
            config.command_line(producer),
            runs,
        ));
    }
    Ok(reports)
}

async fn produce_once(
    cluster: &Cluster,
    topic: &str,
    producer: ProducerKind,
    workload: &Workload,
    label: &str,
) -> Result<Figures, BenchError> {
    let recorder = Arc::new(Recorder::new(workload.warmup, workload.tasks));
    let payload: Arc<[u8]> = vec![b'x'; workload.payload_bytes].into();
    let (keys, warmup) = (workload.keys, workload.warmup);
    let progress = Progress::new(workload.progress, recorder.total(), label.to_string());
    let sends = {
        let recorder = recorder.clone();
        async move {
            match producer {
                ProducerKind::Put => {
                    let client = Arc::new(client(cluster.bootstrap(), topic, workload)?);
                    let c = client.clone();
                    for_each_concurrent(recorder.total(), workload.in_flight, move |i| {
                        let (client, recorder, payload) =
                            (c.clone(), recorder.clone(), payload.clone());
                        async move {
                            if i == warmup {
                                // The first measured send opens the window.
                                recorder.open_window();
                            }
                            let (key, op) = task(i, keys, &payload);
                            let sent = Instant::now();
                            put(&client, key.as_deref(), &op).await?;
                            recorder.started(sent.elapsed().as_micros() as i64);
                            recorder.finished();
                            Ok(())
                        }
                    })
                    .await?;
                    client.flush(Duration::from_secs(30)).await?;
                }
                ProducerKind::RawProducer => {
                    let mut config = ClientConfig::new();
                    config
                        .set("bootstrap.servers", cluster.bootstrap())
                        .set("acks", "all")
                        .set("enable.idempotence", "true")
                        .set("linger.ms", "5")
                        .set("partitioner", decaton_client::JAVA_COMPATIBLE_PARTITIONER)
                        .set("sticky.partitioning.linger.ms", "0")
                        .set("message.timeout.ms", "30000");
                    for (k, v) in &workload.producer_params {
                        config.set(k, v);
                    }
                    let producer: FutureProducer = config.create()?;
                    let topic: Arc<str> = topic.into();
                    let p = producer.clone();
                    for_each_concurrent(recorder.total(), workload.in_flight, move |i| {
                        let (producer, recorder, payload, topic) =
                            (p.clone(), recorder.clone(), payload.clone(), topic.clone());
                        async move {
                            if i == warmup {
                                // The first measured send opens the window.
                                recorder.open_window();
                            }
                            let (key, op) = task(i, keys, &payload);
                            let sent = Instant::now();
                            let timestamp = now_millis();
                            let meta = encode_metadata(&TaskMetadata {
                                timestamp_millis: timestamp,
                                source_application_id: APPLICATION_ID.into(),
                                source_instance_id: "bench".into(),
                                ..TaskMetadata::default()
                            });
                            let value = op.encode_to_vec();
                            let mut record = FutureRecord::to(&topic).payload(&value);
                            if let Some(key) = &key {
                                record = record.key(key.as_bytes());
                            }
                            let record =
                                record
                                    .timestamp(timestamp)
                                    .headers(OwnedHeaders::new().insert(Header {
                                        key: METADATA_HEADER,
                                        value: Some(&meta),
                                    }));
                            producer
                                .send(record, Timeout::Never)
                                .await
                                .map_err(|(e, _)| BenchError::Kafka(e))?;
                            recorder.started(sent.elapsed().as_micros() as i64);
                            recorder.finished();
                            Ok(())
                        }
                    })
                    .await?;
                    tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
                        .await
                        .map_err(|e| BenchError::Internal(e.to_string()))??;
                }
            }
            Ok::<(), BenchError>(())
        }
    };
    tokio::select! {
        r = sends => r?,
        e = progress::stall_watch(&recorder, &progress, workload.stall_timeout) => return Err(e),
    }
    progress.finish();
    recorder.figures(None, Duration::ZERO)
}
