//! The replicator benchmark (`decaton bench replicate`): source records per second from
//! one topic into three derived topics, for the decaton-rs loopback replicator and for a
//! raw rdkafka consume-filter-produce loop doing the same filtering by hand, on the same
//! cluster in the same run.
//!
//! # Method
//!
//! The source topic is filled once with `--tasks` [`ChatOp`] tasks of mixed operation
//! types (`TaskClient::put`; 65% messages, 25% social, 10% profile; key `user-{i % keys}`).
//! Each runner then reads all of it with a consumer group of its own and writes the
//! matching records to three fresh topics (messages, social, profile):
//!
//! * `replicator` — `decaton-replicator` with the three routes as filter expressions
//!   (`op in [SEND_MESSAGE, READ]`, ...), at-least-once (commit after acknowledgement);
//! * `rdkafka-raw` — a `BaseConsumer` and a `ThreadedProducer`: decode the `dt_meta`
//!   header and the `ChatOp` with the generated prost type, match the operation type in
//!   Rust, send key, value and headers on; auto-commit, no tracking of acknowledgements.
//!
//! Both producers use the same settings (`acks=all`, idempotence, `linger.ms=5`,
//! `murmur2_random`). The window opens when the runner has consumed its first record
//! (group join excluded) and closes when every derived record is acknowledged; the
//! figure is source records / window. Runs alternate between the runners; the ratio is
//! replicator / raw of the medians.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_client::TaskClient;
use decaton_protocol::headers::raw_headers;
use decaton_protocol::{ChatOp, OpType};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message as _};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::config::Workload;
use crate::BenchError;

/// Arguments of `decaton bench replicate`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplicateArgs {
    /// Workload: `--tasks` source records (default 10000), `--partitions` of every
    /// topic, `--keys` (default 10000), `--runs`, `--bootstrap`.
    #[command(flatten)]
    pub workload: crate::cli::WorkloadArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::cli::Format::Text)]
    pub format: crate::cli::Format,
    /// Write the report here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

/// Settings of `decaton bench replicate`.
#[derive(Debug, Clone)]
pub struct ReplicateConfig {
    /// Source records, partitions, keys, cluster, runs.
    pub workload: Workload,
}

/// One runner's result.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicateReport {
    /// `replicator` or `rdkafka-raw`.
    pub runner: String,
    /// Source records read.
    pub source_records: u64,
    /// Derived records written and acknowledged.
    pub derived_records: u64,
    /// Median source records per second over the runs.
    pub records_per_sec: f64,
    /// Every run's figure.
    pub runs: Vec<f64>,
}

const TOPICS: [&str; 3] = ["messages", "social", "profile"];

fn op_of(i: u64) -> OpType {
    match i % 20 {
        0..=8 => OpType::SendMessage,
        9..=12 => OpType::Read,
        13 => OpType::AddFriend,
        14 => OpType::Block,
        15 | 16 => OpType::JoinRoom,
        17 => OpType::LeaveRoom,
        _ => OpType::UpdateProfile,
    }
}

/// Which derived topic (index into [`TOPICS`]) an operation type goes to.
fn route_of(op: OpType) -> Option<usize> {
    match op {
        OpType::SendMessage | OpType::Read => Some(0),
        OpType::AddFriend | OpType::Block | OpType::JoinRoom | OpType::LeaveRoom => Some(1),
        OpType::UpdateProfile => Some(2),
        OpType::Unspecified => None,
    }
}

fn producer_config(bootstrap: &str, workload: &Workload) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random");
    for (k, v) in &workload.producer_params {
        c.set(k, v);
    }
    c
}

/// Runs the benchmark and returns one report per runner (replicator first).
pub async fn run_replicate(config: &ReplicateConfig) -> Result<Vec<ReplicateReport>, BenchError> {
    let w = &config.workload;
    let cluster = Cluster::start(w.bootstrap.as_deref()).await?;
    let source = cluster.unique_name("replicate-source");
    cluster.create_topic(&source, w.partitions).await?;
    let total = w.tasks;
    let keys = w.keys.distinct().unwrap_or(10_000).max(1);
    let mut builder =
        TaskClient::<ChatOp>::builder(cluster.bootstrap(), &source).application_id("decaton-bench");
    for (k, v) in &w.producer_params {
        builder = builder.set(k.clone(), v.clone());
    }
    let client = Arc::new(builder.build()?);
    let payload = vec![b'x'; w.payload_bytes];
    let mut expected = 0u64;
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..total {
        let op = op_of(i);
        expected += u64::from(route_of(op).is_some());
        let task = ChatOp {
            user_id: format!("user-{}", i % keys),
            op: op as i32,
            target_id: format!("room-{}", i % 97),
            payload: payload.clone(),
            sequence: i / keys,
            created_at_millis: decaton_protocol::now_millis(),
        };
        let client = client.clone();
        pending.spawn(async move { client.put(task.user_id.clone(), &task).await.map(|_| ()) });
        while pending.len() >= w.in_flight {
            if let Some(r) = pending.join_next().await {
                r.map_err(|e| BenchError::Internal(e.to_string()))??;
            }
        }
    }
    while let Some(r) = pending.join_next().await {
        r.map_err(|e| BenchError::Internal(e.to_string()))??;
    }
    cluster.check_backlog(&source, w.partitions, total).await?;

    let mut replicator_runs = Vec::new();
    let mut raw_runs = Vec::new();
    for run in 0..w.runs {
        let topics = TOPICS.map(|t| cluster.unique_name(&format!("replicate-{t}")));
        for name in &topics {
            cluster.create_topic(name, w.partitions).await?;
        }
        let r = run_replicator(cluster.bootstrap(), &source, &topics, w, run, expected).await?;
        replicator_runs.push(total as f64 / r.as_secs_f64());
        let raw_topics = TOPICS.map(|t| cluster.unique_name(&format!("raw-{t}")));
        for name in &raw_topics {
            cluster.create_topic(name, w.partitions).await?;
        }
        let (bootstrap, source, workload) =
            (cluster.bootstrap().to_string(), source.clone(), w.clone());
        let r = tokio::task::spawn_blocking(move || {
            run_raw(&bootstrap, &source, &raw_topics, &workload, run, expected)
        })
        .await
        .map_err(|e| BenchError::Internal(e.to_string()))??;
        raw_runs.push(total as f64 / r.as_secs_f64());
    }
    let report = |runner: &str, runs: Vec<f64>| ReplicateReport {
        runner: runner.into(),
        source_records: total,
        derived_records: expected,
        records_per_sec: median(&runs),
        runs,
    };
    Ok(vec![
        report("replicator", replicator_runs),
        report("rdkafka-raw", raw_runs),
    ])
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// The replicator's window: first source record consumed to last derived record acked.
async fn run_replicator(
    bootstrap: &str,
    source: &str,
    topics: &[String; 3],
    w: &Workload,
    run: u32,
    expected: u64,
) -> Result<Duration, BenchError> {
    let mut builder = decaton_replicator::Replicator::builder(
        bootstrap,
        source,
        format!("{source}-replicator-{run}"),
    )
    .message_type(chat_descriptor()?)
    .route(decaton_replicator::Route::to(&topics[0]).filter("op in [SEND_MESSAGE, READ]"))
    .route(
        decaton_replicator::Route::to(&topics[1])
            .filter("op in [ADD_FRIEND, BLOCK, JOIN_ROOM, LEAVE_ROOM]"),
    )
    .route(decaton_replicator::Route::to(&topics[2]).filter("op == UPDATE_PROFILE"));
    for (k, v) in &w.producer_params {
        builder = builder.set_producer(k.clone(), v.clone());
    }
    let replicator = builder
        .build()
        .map_err(|e| BenchError::Config(e.to_string()))?;
    let handle = replicator.handle();
    let running = tokio::spawn(replicator.run());
    let mut started: Option<Instant> = None;
    let mut last_progress = (0u64, Instant::now());
    let window = loop {
        let s = handle.stats();
        if started.is_none() && s.source_records > 0 {
            started = Some(Instant::now());
        }
        let out: u64 = s.routes.iter().map(|r| r.out).sum();
        if out >= expected {
            break started.map(|t| t.elapsed()).unwrap_or_default();
        }
        if out > last_progress.0 {
            last_progress = (out, Instant::now());
        } else if last_progress.1.elapsed() > w.stall_timeout || running.is_finished() {
            handle.shutdown();
            return Err(BenchError::Stalled {
                finished: out,
                expected,
                idle: last_progress.1.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    handle.shutdown();
    running
        .await
        .map_err(|e| BenchError::Internal(e.to_string()))?
        .map_err(|e| BenchError::Internal(e.to_string()))?;
    Ok(window)
}

fn chat_descriptor() -> Result<prost_reflect::MessageDescriptor, BenchError> {
    prost_reflect::DescriptorPool::decode(decaton_protocol::FILE_DESCRIPTOR_SET)
        .map_err(|e| BenchError::Internal(e.to_string()))?
        .get_message_by_name("decaton.example.ChatOp")
        .ok_or_else(|| BenchError::Internal("no ChatOp descriptor".into()))
}

struct Count(Arc<AtomicU64>);
impl ClientContext for Count {}
impl ProducerContext for Count {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if r.is_ok() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The hand-written loop (on a blocking thread): its window, as for the replicator.
fn run_raw(
    bootstrap: &str,
    source: &str,
    topics: &[String; 3],
    w: &Workload,
    run: u32,
    expected: u64,
) -> Result<Duration, BenchError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{source}-raw-{run}"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[source])?;
    let acked = Arc::new(AtomicU64::new(0));
    let producer: ThreadedProducer<Count> =
        producer_config(bootstrap, w).create_with_context(Count(acked.clone()))?;
    let mut started: Option<Instant> = None;
    let mut last_progress = Instant::now();
    while acked.load(Ordering::Relaxed) < expected {
        if last_progress.elapsed() > w.stall_timeout {
            return Err(BenchError::Stalled {
                finished: acked.load(Ordering::Relaxed),
                expected,
                idle: last_progress.elapsed(),
            });
        }
        let Some(m) = consumer.poll(Duration::from_millis(10)) else {
            continue;
        };
        let m = m?;
        started.get_or_insert_with(Instant::now);
        last_progress = Instant::now();
        let meta = m.headers().and_then(|h| {
            raw_headers(h)
                .find(|h| h.is(decaton_protocol::METADATA_HEADER))
                .and_then(|h| h.value)
        });
        let task = decaton_protocol::decode_record(meta, m.payload())
            .map_err(|e| BenchError::Decode(e.to_string()))?;
        let op = ChatOp::decode(&*task.task).map_err(|e| BenchError::Decode(e.to_string()))?;
        let Some(topic) = route_of(op.op()).and_then(|r| topics.get(r)) else {
            continue;
        };
        let mut record = BaseRecord::to(topic).payload(m.payload().unwrap_or(&[]));
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(h) = m.headers() {
            record = record.headers(h.detach());
        }
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(started.map(|t| t.elapsed()).unwrap_or_default())
}

/// The reports as a table, with the ratio.
pub fn replicate_reports_to_text(reports: &[ReplicateReport]) -> String {
    let mut out = String::from("runner        source   derived   records/s (median)   runs\n");
    for r in reports {
        let runs: Vec<String> = r.runs.iter().map(|x| format!("{x:.0}")).collect();
        out.push_str(&format!(
            "{:<12} {:>7} {:>9} {:>20.0}   {}\n",
            r.runner,
            r.source_records,
            r.derived_records,
            r.records_per_sec,
            runs.join(", ")
        ));
    }
    if let [a, b] = reports {
        if b.records_per_sec > 0.0 {
            out.push_str(&format!(
                "ratio replicator / rdkafka-raw: {:.2}\n",
                a.records_per_sec / b.records_per_sec
            ));
        }
    }
    out
}
