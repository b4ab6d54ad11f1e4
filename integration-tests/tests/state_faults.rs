#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! Partition-local state under changelog faults: each task's effects exactly once when
//! appends fail, no subscription stalled by another's unreachable changelog, and one key's
//! writes applied in order when tasks complete late.
//!
//! These tests drive librdkafka's mock cluster directly, to inject produce errors and take
//! one broker down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use decaton_integration_tests::{put_tasks, read_counters, CounterProcessor};
use decaton_processor::{
    ProcessError, ProcessingContext, ProcessorProperties, SchedulingMode, StateConfig,
    Subscription, SubscriptionStats, TaskProcessor,
};
use decaton_protocol::ChatOp;
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

type Cluster = MockCluster<'static, DefaultProducerContext>;

fn props() -> ProcessorProperties {
    let mut p = ProcessorProperties::default();
    p.mode = SchedulingMode::PerKey;
    p.max_pending = 2_000;
    p.commit_interval = Duration::from_millis(100);
    p.shutdown_timeout = Duration::from_secs(5);
    p
}

async fn put_all(bootstrap: &str, topic: &str, range: std::ops::Range<u64>, keys: u64) {
    put_tasks(bootstrap, &[], topic, range, keys).await.unwrap();
}

fn committed_sum(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    decaton_integration_tests::committed(bootstrap, group, topic, partitions)
        .map(|c| c.iter().filter_map(|(o, _)| *o).sum())
        .unwrap_or(0)
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a counter subscription until it processed `processed` tasks and the committed
/// offsets of `topic`'s two partitions add up to `committed`, then shuts it down.
async fn count_all(
    bootstrap: &str,
    group: &str,
    topic: &str,
    dir: &std::path::Path,
    (processed, committed_total): (u64, i64),
    settings: &[(&str, &str)],
) -> SubscriptionStats {
    let seen = Arc::new(AtomicU64::new(0));
    let mut builder = Subscription::builder(
        group,
        CounterProcessor {
            log: None,
            seen: seen.clone(),
        },
    )
    .bootstrap_servers(bootstrap)
    .topic(topic)
    .properties(props())
    .state_store(StateConfig {
        state_dir: dir.to_path_buf(),
        ..Default::default()
    });
    for (k, v) in settings {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build().unwrap();
    let handle = sub.handle();
    let run = tokio::spawn(sub.run());
    wait_until(
        "every task processed and committed",
        Duration::from_secs(60),
        || {
            handle.stats().processed >= processed
                && committed_sum(bootstrap, group, topic, 2) >= committed_total
        },
    )
    .await;
    handle.shutdown();
    run.await.unwrap().unwrap()
}

/// Defect: a failed changelog append applied a task's effects twice (the local store was
/// written before the changelog acknowledged, later tasks built on the unacknowledged
/// value, and the next owner re-ran the failed task) and stalled the partition (the failed
/// offset never completed). Appends now fail for a while; every counter must still be
/// exact, both in the local store and after a new owner restores from the changelog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_changelog_appends_apply_each_task_once() {
    let cluster: Cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let (topic, group) = ("ops", "counters");
    cluster.create_topic(topic, 2, 1).unwrap();
    cluster
        .create_topic(&decaton_state::changelog_topic(group, "state"), 2, 1)
        .unwrap();
    let (total, keys) = (2_000u64, 40u64);
    put_all(&bootstrap, topic, 0..total, keys).await;
    // From now on only the changelog produces: its next appends fail until they time out.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 60],
    );
    let dir = tempfile::tempdir().unwrap();
    let stats = count_all(
        &bootstrap,
        group,
        topic,
        dir.path(),
        (total, total as i64),
        &[("message.timeout.ms", "300")],
    )
    .await;
    assert!(
        stats.state_write_failures > 0,
        "no append failed, the test injected nothing: {stats:?}"
    );
    let expected = decaton_integration_tests::expected_counts(total, keys);
    let cfg = StateConfig {
        state_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    assert_eq!(read_counters(&cfg, group, topic, 2).unwrap(), expected);
    // A new owner with no local state rebuilds from the changelog alone, then counts one
    // more task per user.
    put_all(&bootstrap, topic, total..total + keys, keys).await;
    let expected = decaton_integration_tests::expected_counts(total + keys, keys);
    let fresh = tempfile::tempdir().unwrap();
    let stats2 = count_all(
        &bootstrap,
        group,
        topic,
        fresh.path(),
        (keys, (total + keys) as i64),
        &[],
    )
    .await;
    assert_eq!(stats2.processed, keys, "everything else was committed");
    let fresh_cfg = StateConfig {
        state_dir: fresh.path().to_path_buf(),
        ..Default::default()
    };
    assert_eq!(
        read_counters(&fresh_cfg, group, topic, 2).unwrap(),
        expected
    );
    println!(
        "append failures retried: {}, changelog records restored by the new owner: {}",
        stats.state_write_failures, stats2.state_records_restored
    );
}

/// Counts tasks; no state.
struct Count(Arc<AtomicU64>);

#[async_trait]
impl TaskProcessor<ChatOp> for Count {
    async fn process(&self, _ctx: &ProcessingContext, _task: ChatOp) -> Result<(), ProcessError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Defect: blocking work ran on tokio workers (the changelog send loop slept for up to
/// 30 s while librdkafka's queue was full, sled ran inline), so with two workers one
/// subscription whose changelog broker is unreachable stopped every subscription in the
/// process. Here the changelog's leader is down; a second subscription on the same
/// runtime must keep processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_changelog_does_not_stall_another_subscription() {
    let cluster: Cluster = MockCluster::new(2).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let changelog = decaton_state::changelog_topic("stateful", "state");
    for (topic, partitions) in [
        ("stateful-ops", 1),
        ("plain-ops", 1),
        (changelog.as_str(), 1),
    ] {
        cluster.create_topic(topic, partitions, 1).unwrap();
    }
    cluster
        .partition_leader("stateful-ops", 0, Some(1))
        .unwrap();
    cluster.partition_leader("plain-ops", 0, Some(1)).unwrap();
    cluster.partition_leader(&changelog, 0, Some(2)).unwrap();
    for group in ["stateful", "plain"] {
        cluster
            .coordinator(MockCoordinator::Group(group.into()), 1)
            .unwrap();
    }
    put_all(&bootstrap, "stateful-ops", 0..100, 50).await;

    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let mut p = props();
    p.shutdown_timeout = Duration::from_secs(2);
    let stateful = Subscription::builder(
        "stateful",
        CounterProcessor {
            log: None,
            seen: seen.clone(),
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("stateful-ops")
    .properties(p.clone())
    .state_store(StateConfig {
        state_dir: dir.path().to_path_buf(),
        backend: decaton_processor::Backend::Sled,
        ..Default::default()
    })
    // A tiny producer queue fills at once while the changelog leader is down.
    .set("queue.buffering.max.messages", "2")
    .set("message.timeout.ms", "120000")
    .build()
    .unwrap();
    let stateful_handle = stateful.handle();
    let stateful_run = tokio::spawn(stateful.run());
    wait_until(
        "the stateful subscription to restore and run",
        Duration::from_secs(30),
        || seen.load(Ordering::Relaxed) >= 100,
    )
    .await;

    cluster.broker_down(2).unwrap();
    put_all(&bootstrap, "stateful-ops", 100..2_100, 500).await;
    // Each of the 500 keys runs one task, then holds the key until its writes are
    // acknowledged, which cannot happen while the changelog's leader is down.
    wait_until(
        "stateful tasks to pile up on the changelog",
        Duration::from_secs(30),
        || seen.load(Ordering::Relaxed) >= 400,
    )
    .await;

    let plain_seen = Arc::new(AtomicU64::new(0));
    let plain = Subscription::builder("plain", Count(plain_seen.clone()))
        .bootstrap_servers(&bootstrap)
        .topic("plain-ops")
        .properties(p)
        .build()
        .unwrap();
    let plain_handle = plain.handle();
    let plain_run = tokio::spawn(plain.run());
    put_all(&bootstrap, "plain-ops", 0..2_000, 100).await;
    wait_until(
        "the plain subscription to process its 2000 tasks while the other's changelog is down",
        Duration::from_secs(30),
        || plain_seen.load(Ordering::Relaxed) >= 2_000,
    )
    .await;
    plain_handle.shutdown();
    plain_run.await.unwrap().unwrap();
    cluster.broker_up(2).unwrap();
    stateful_handle.shutdown();
    stateful_run.await.unwrap().unwrap();
}

/// Task 0 of a key defers and writes v=0, completing later; task 1 of the key writes v=1
/// and completes at once; task 2 reads v.
struct LateWriter {
    reads: Arc<parking_lot::Mutex<Vec<String>>>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for LateWriter {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let state = ctx.state().ok_or_else(|| ProcessError::new("no state"))?;
        match task.sequence {
            0 => {
                state.put(b"v", b"0")?;
                let completion = ctx.defer();
                tokio::spawn(async move {
                    // A slow external call completes the task.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    completion.complete();
                });
            }
            1 => state.put(b"v", b"1")?,
            _ => {
                let v = state.get(b"v")?.unwrap_or_default();
                self.reads
                    .lock()
                    .push(String::from_utf8_lossy(&v).to_string());
            }
        }
        Ok(())
    }
}

/// Defect: with deferred completion, one key's state writes were applied in completion
/// order, not offset order (task 0 deferred and wrote v=0, task 1 wrote v=1 and finished,
/// task 0 completed: v ended at 0). The key's next task must see its predecessor's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_state_writes_apply_in_key_order() {
    let cluster: Cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let (topic, group) = ("late", "late-writer");
    cluster.create_topic(topic, 1, 1).unwrap();
    cluster
        .create_topic(&decaton_state::changelog_topic(group, "state"), 1, 1)
        .unwrap();
    // Three tasks of one key: sequences 0, 1, 2.
    put_all(&bootstrap, topic, 0..3, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let reads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let cfg = StateConfig {
        state_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let sub = Subscription::builder(
        group,
        LateWriter {
            reads: reads.clone(),
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic(topic)
    .properties(props())
    .state_store(cfg.clone())
    .build()
    .unwrap();
    let handle = sub.handle();
    let run = tokio::spawn(sub.run());
    wait_until(
        "all three tasks done and committed",
        Duration::from_secs(30),
        || committed_sum(&bootstrap, group, topic, 1) == 3,
    )
    .await;
    handle.shutdown();
    run.await.unwrap().unwrap();
    assert_eq!(*reads.lock(), vec!["1".to_string()], "task 2 read");
    let (store, _) = decaton_state::internal::PartitionStore::open(&cfg, group, topic, 0).unwrap();
    assert_eq!(store.get(b"v").unwrap(), Some(b"1".to_vec()), "final value");
}
