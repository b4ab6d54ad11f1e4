//! Shared pieces of the end-to-end tests: producing keyed, sequenced tasks, a recording
//! processor, and waiting for conditions without sleeping.

pub mod replication;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_client::TaskClient;
use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
use decaton_protocol::{ChatOp, OpType};
use decaton_testkit::{Processed, TestBroker};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// The example task for user `user` with per-user sequence `seq`.
pub fn chat_op(user: u64, seq: u64) -> ChatOp {
    ChatOp {
        user_id: format!("user-{user}"),
        op: OpType::SendMessage as i32,
        target_id: format!("room-{}", user % 13),
        payload: Vec::new(),
        sequence: seq,
        created_at_millis: decaton_protocol::now_millis(),
    }
}

/// Produces `tasks` tasks round-robin over `keys` users (task i -> user i % keys, with that
/// user's next sequence number) and returns key -> count.
/// Uses the broker's [`producer_settings`](decaton_testkit::BrokerKind::producer_settings).
pub async fn produce(
    broker: &TestBroker,
    topic: &str,
    tasks: u64,
    keys: u64,
) -> anyhow::Result<HashMap<String, u64>> {
    produce_range(broker, topic, 0..tasks, keys).await
}

/// Like [`produce`] for task indexes `range` (so a test can produce in several rounds).
pub async fn produce_range(
    broker: &TestBroker,
    topic: &str,
    range: std::ops::Range<u64>,
    keys: u64,
) -> anyhow::Result<HashMap<String, u64>> {
    put_tasks(
        &broker.bootstrap_servers(),
        broker.kind().producer_settings(),
        topic,
        range,
        keys,
    )
    .await
}

/// Puts tasks `range` (`chat_op(i % keys, i / keys)`, keyed by user) into `topic` at
/// `bootstrap` with extra producer `settings`, up to 5 000 in flight; returns the expected
/// per-user counts of tasks `0..range.end`.
pub async fn put_tasks(
    bootstrap: &str,
    settings: &[(&str, &str)],
    topic: &str,
    range: std::ops::Range<u64>,
    keys: u64,
) -> anyhow::Result<HashMap<String, u64>> {
    let mut builder = TaskClient::<ChatOp>::builder(bootstrap, topic).application_id("it");
    for (k, v) in settings {
        builder = builder.set(*k, *v);
    }
    let client = builder.build()?;
    let end = range.end;
    let results: Vec<_> = futures::stream::iter(range)
        .map(|i| {
            let task = chat_op(i % keys, i / keys);
            let client = &client;
            async move { client.put(task.user_id.clone(), &task).await }
        })
        .buffered(5_000)
        .collect()
        .await;
    for r in results {
        r?;
    }
    client.close().await?;
    Ok(expected_counts(end, keys))
}

/// key -> number of tasks for the first `tasks` task indexes over `keys` users.
pub fn expected_counts(tasks: u64, keys: u64) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for i in 0..tasks {
        *m.entry(format!("user-{}", i % keys)).or_default() += 1;
    }
    m
}

/// Everything a [`Recorder`] saw.
#[derive(Default)]
pub struct Recording {
    /// Every processed task, in processing-start order.
    pub log: Mutex<Vec<Processed>>,
    /// (partition, offset) of every processed task.
    pub offsets: Mutex<Vec<(i32, i64)>>,
    /// Tasks started.
    pub started: AtomicU64,
    /// Tasks inside `process` right now.
    pub in_flight: AtomicUsize,
    /// Most tasks ever inside `process` at once.
    pub max_in_flight: AtomicUsize,
    /// Per partition: tasks inside `process` now and the most at once.
    pub per_partition: Mutex<HashMap<i32, (usize, usize)>>,
    /// Tasks of one key that overlapped (must stay 0).
    pub key_overlaps: AtomicU64,
    in_flight_keys: Mutex<HashMap<String, usize>>,
    changed: Notify,
}

impl Recording {
    /// Waits until `pred` holds, re-checking whenever a task is recorded; fails after
    /// `timeout` (a guard against hangs, not a synchronisation).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Recording) -> bool,
    ) -> anyhow::Result<()> {
        let fut = async {
            loop {
                let notified = self.changed.notified();
                if pred(self) {
                    return;
                }
                // A notification may be missed between the check and the await when the
                // condition depends on something other than a recorded task; re-check at a
                // coarse interval too.
                let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("condition not reached in {timeout:?}"))
    }

    /// Tasks processed so far.
    pub fn count(&self) -> usize {
        self.log.lock().len()
    }
}

/// How the recording processor behaves.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// Random processing time up to this many milliseconds (0 = none).
    pub max_latency_ms: u64,
    /// Fixed processing time in milliseconds (added to the random part).
    pub fixed_latency_ms: u64,
    /// Fail the test (recorded) if more than this many tasks are inside `process`.
    pub in_flight_limit: Option<usize>,
}

/// A processor that records (key, sequence, instance) for every task and checks that no
/// two tasks of one key overlap.
pub struct Recorder {
    /// Instance id written into every record.
    pub instance: String,
    /// Shared recording.
    pub rec: Arc<Recording>,
    /// Behaviour.
    pub behaviour: Behaviour,
    /// Count of in-flight-limit violations.
    pub limit_violations: Arc<AtomicU64>,
}

impl Recorder {
    /// A recorder for `instance` writing into `rec`.
    pub fn new(instance: &str, rec: Arc<Recording>, behaviour: Behaviour) -> Self {
        Recorder {
            instance: instance.into(),
            rec,
            behaviour,
            limit_violations: Arc::new(AtomicU64::new(0)),
        }
    }
}

#[async_trait]
impl TaskProcessor<ChatOp> for Recorder {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let rec = &self.rec;
        rec.started.fetch_add(1, Ordering::Relaxed);
        let now = rec.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        rec.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(limit) = self.behaviour.in_flight_limit {
            if now > limit {
                self.limit_violations.fetch_add(1, Ordering::SeqCst);
            }
        }
        {
            let mut pp = rec.per_partition.lock();
            let e = pp.entry(ctx.partition()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        {
            let mut keys = rec.in_flight_keys.lock();
            let n = keys.entry(task.user_id.clone()).or_default();
            *n += 1;
            if *n > 1 {
                rec.key_overlaps.fetch_add(1, Ordering::SeqCst);
            }
        }
        rec.log.lock().push(Processed {
            key: task.user_id.clone(),
            sequence: task.sequence,
            instance: self.instance.clone(),
        });
        rec.offsets.lock().push((ctx.partition(), ctx.offset()));
        let mut ms = self.behaviour.fixed_latency_ms;
        if self.behaviour.max_latency_ms > 0 {
            ms += rand::random_range(0..=self.behaviour.max_latency_ms);
        }
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        {
            let mut keys = rec.in_flight_keys.lock();
            if let Some(n) = keys.get_mut(&task.user_id) {
                *n -= 1;
            }
        }
        if let Some(e) = rec.per_partition.lock().get_mut(&ctx.partition()) {
            e.0 -= 1;
        }
        rec.in_flight.fetch_sub(1, Ordering::SeqCst);
        rec.changed.notify_waiters();
        Ok(())
    }
}

/// Installs a tracing subscriber once (RUST_LOG controls it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Reads the committed (offset, metadata) of `group` for each of `partitions` partitions
/// of `topic` straight from the broker.
pub fn committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<(Option<i64>, String)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let c = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok((0..partitions)
        .map(|p| match c.find_partition(topic, p) {
            Some(e) => (
                match e.offset() {
                    rdkafka::Offset::Offset(o) => Some(o),
                    _ => None,
                },
                e.metadata().to_string(),
            ),
            None => (None, String::new()),
        })
        .collect())
}

/// Polls the broker until `group`'s committed position of partition 0 of `topic` is
/// `expected`, for at most `timeout`; returns the last position read.
pub async fn wait_committed(
    bootstrap: &str,
    group: &str,
    topic: &str,
    expected: i64,
    timeout: Duration,
) -> anyhow::Result<Option<i64>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pos = committed(bootstrap, group, topic, 1)?[0].0;
        if pos == Some(expected) || tokio::time::Instant::now() >= deadline {
            return Ok(pos);
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // polling the broker
    }
}

/// Runs both-broker variants of a test body: `broker_tests!(name, body_fn)` defines
/// `name_embedded` and `name_tansu`.
#[macro_export]
macro_rules! broker_tests {
    ($name:ident, $body:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() -> anyhow::Result<()> {
                $crate::init_tracing();
                $body(decaton_testkit::BrokerKind::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tansu() -> anyhow::Result<()> {
                $crate::init_tracing();
                $body(decaton_testkit::BrokerKind::TansuMemory).await
            }
        }
    };
}

/// Keeps per-user operation counters and the last operation time in the partition's
/// state store: `count/<user>` (decimal) and `last/<user>` (millis). Read-modify-write,
/// so applying a task's effects twice would show as a wrong count.
pub struct CounterProcessor {
    /// Optional per-task log line sink (key, sequence, instance) for the checker.
    pub log: Option<(String, std::sync::Arc<Mutex<std::fs::File>>)>,
    /// Tasks seen.
    pub seen: Arc<AtomicU64>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for CounterProcessor {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let state = ctx
            .state()
            .ok_or_else(|| ProcessError::new("no state store configured"))?;
        let key = format!("count/{}", task.user_id);
        let n: u64 = match state.get(key.as_bytes())? {
            Some(v) => String::from_utf8_lossy(&v)
                .parse()
                .map_err(|e| ProcessError::new(format!("bad counter: {e}")))?,
            None => 0,
        };
        state.put(key.as_bytes(), (n + 1).to_string().as_bytes())?;
        state.put(
            format!("last/{}", task.user_id).as_bytes(),
            task.created_at_millis.to_string().as_bytes(),
        )?;
        if let Some((instance, f)) = &self.log {
            use std::io::Write;
            let line = serde_json::to_string(&Processed {
                key: task.user_id,
                sequence: task.sequence,
                instance: instance.clone(),
            })?;
            f.lock().write_all(format!("{line}\n").as_bytes())?;
        }
        self.seen.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Reads every `count/<user>` counter of `subscription`'s store from a (closed) state
/// directory.
pub fn read_counters(
    cfg: &decaton_state::StateConfig,
    subscription: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for p in 0..partitions {
        // Opening leaves the checkpoint in place: reading changes nothing.
        let (store, _) =
            decaton_state::internal::PartitionStore::open(cfg, subscription, topic, p)?;
        for (k, v) in store.scan_prefix(b"count/")? {
            let user = String::from_utf8_lossy(&k["count/".len()..]).to_string();
            out.insert(user, String::from_utf8_lossy(&v).parse()?);
        }
    }
    Ok(out)
}
