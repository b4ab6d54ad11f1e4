#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! State writes the changelog refuses for good, end to end: the task fails and takes the
//! failure path with its reason, none of its writes reach the state (local or changelog),
//! and the partition goes on. Against the mock cluster and Tansu.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_integration_tests::{broker_tests, put_tasks, CounterProcessor};
use decaton_processor::{
    async_trait, DeadLetterConfig, ProcessError, ProcessingContext, ProcessorProperties,
    SchedulingMode, Subscription, TaskProcessor,
};
use decaton_protocol::{dead_letter, now_millis, ChatOp};
use decaton_state::internal::PartitionStore;
use decaton_state::{Backend, StateConfig};
use decaton_testkit::{wait_until, BrokerKind, TestBroker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

/// The task of this sequence number of `user-0` writes a value larger than the changelog
/// producer accepts, next to its counter.
const POISON_SEQUENCE: u64 = 3;
const TASKS: u64 = 40;
const USERS: u64 = 4;

/// Counts tasks per user in state (`count/<user>`); the poison task also writes a
/// 1.1 MB `blob/<user>`.
struct Counter {
    seen: Arc<AtomicU64>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for Counter {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let state = ctx
            .state()
            .ok_or_else(|| ProcessError::new("no state store"))?;
        let key = format!("count/{}", task.user_id);
        let n: u64 = match state.get(key.as_bytes())? {
            Some(v) => String::from_utf8_lossy(&v).parse().unwrap_or(0),
            None => 0,
        };
        state.put(key.as_bytes(), (n + 1).to_string().as_bytes())?;
        if task.user_id == "user-0" && task.sequence == POISON_SEQUENCE {
            state.put(
                format!("blob/{}", task.user_id).as_bytes(),
                &vec![1u8; 1_100_000],
            )?;
        }
        self.seen.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Every record of partition 0 of `topic`, read until `want` or `within`.
fn read_topic(
    bootstrap: &str,
    topic: &str,
    want: usize,
    within: Duration,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}-{}", now_millis()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = std::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            out.push(m?.detach());
        }
    }
    Ok(out)
}

fn header(m: &rdkafka::message::OwnedMessage, name: &str) -> String {
    let value = m
        .headers()
        .and_then(|hs| hs.iter().find(|h| h.key == name).and_then(|h| h.value));
    String::from_utf8_lossy(value.unwrap_or_default()).to_string()
}

/// A task whose state value is larger than the changelog accepts used to be re-sent
/// forever: its offset never finished, the partition stopped committing, and the
/// changelog grew an aborted batch per attempt. Now the task fails: it lands in the
/// dead-letter topic with the changelog's reason, none of its writes (not even its small
/// counter update) reach the local store or the changelog, and every other task of the
/// partition is processed and committed.
async fn refused_state_write(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("big", 1)?;
    broker.create_topic("big-dlq", 1)?;
    if kind == BrokerKind::Embedded {
        // The mock cluster has no CreateTopics; on Tansu the runtime creates it.
        broker.create_topic("big-state-changelog", 1)?;
    }
    put_tasks(&bootstrap, kind.producer_settings(), "big", 0..TASKS, USERS).await?;

    let dir = tempfile::tempdir()?;
    let state = StateConfig::new(dir.path()).backend(Backend::Sled);
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::PerKey;
    props.commit_interval = Duration::from_millis(100);
    let seen = Arc::new(AtomicU64::new(0));
    let mut builder = Subscription::builder("big", Counter { seen: seen.clone() })
        .bootstrap_servers(&bootstrap)
        .topic("big")
        .properties(props)
        .state_store(state.clone())
        .dead_letter(DeadLetterConfig::new());
    for (k, v) in kind.producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let done = wait_until(Duration::from_secs(60), || {
        let s = handle.stats();
        s.dead_lettered == 1 && seen.load(Ordering::Relaxed) == TASKS
    })
    .await;
    let committed = decaton_integration_tests::wait_committed(
        &bootstrap,
        "big",
        "big",
        TASKS as i64,
        Duration::from_secs(30),
    )
    .await?;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    assert!(done, "{stats:?}");
    assert_eq!(
        committed,
        Some(TASKS as i64),
        "every offset done and committed"
    );
    assert!(stats.state_write_failures >= 1, "{stats:?}");

    // The dead-letter copy says why.
    let dlq = read_topic(&bootstrap, "big-dlq", 1, Duration::from_secs(20))?;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].key(), Some(&b"user-0"[..]));
    let reason = header(&dlq[0], dead_letter::REASON);
    assert!(
        reason.contains("state write refused") && reason.contains("message.max.bytes"),
        "{reason}"
    );

    // No state of the refused task: not its blob, not its counter update.
    let per_user = TASKS / USERS;
    let (store, _) = PartitionStore::open(&state, "big", "big", 0)?;
    assert_eq!(store.get(b"blob/user-0")?, None);
    assert_eq!(
        store.get(b"count/user-0")?,
        Some((per_user - 1).to_string().into_bytes())
    );
    for user in 1..USERS {
        assert_eq!(
            store.get(format!("count/user-{user}").as_bytes())?,
            Some(per_user.to_string().into_bytes())
        );
    }
    drop(store);

    // Nor in the changelog: one record per successful task, no torn batch, no marker.
    let probe: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let (_, high) = probe.fetch_watermarks("big-state-changelog", 0, Duration::from_secs(10))?;
    assert_eq!(high, TASKS as i64 - 1);
    let changelog = read_topic(
        &bootstrap,
        "big-state-changelog",
        TASKS as usize - 1,
        Duration::from_secs(20),
    )?;
    assert_eq!(changelog.len(), TASKS as usize - 1);
    let mut keys = BTreeMap::<Vec<u8>, usize>::new();
    for m in &changelog {
        *keys
            .entry(m.key().unwrap_or_default().to_vec())
            .or_default() += 1;
    }
    assert!(!keys.contains_key(&b"blob/user-0"[..]), "{keys:?}");
    assert_eq!(
        keys.get(&b"count/user-0"[..]),
        Some(&(per_user as usize - 1))
    );
    Ok(())
}

broker_tests!(
    a_state_write_the_changelog_refuses_fails_the_task_and_leaves_no_state,
    super::refused_state_write
);

/// Runs the counter subscription `group` on `topic` until it has seen `until` tasks, then
/// shuts it down cleanly (a checkpoint per partition) and returns its stats.
async fn count(
    broker: &TestBroker,
    group: &str,
    topic: &str,
    state: &StateConfig,
    until: u64,
) -> anyhow::Result<decaton_processor::SubscriptionStats> {
    let seen = Arc::new(AtomicU64::new(0));
    let mut props = ProcessorProperties::default();
    props.commit_interval = Duration::from_millis(100);
    let mut builder = Subscription::builder(
        group,
        CounterProcessor {
            log: None,
            seen: seen.clone(),
        },
    )
    .bootstrap_servers(broker.bootstrap_servers())
    .topic(topic)
    .properties(props)
    .state_store(state.clone());
    for (k, v) in broker.kind().producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let done = wait_until(Duration::from_secs(60), || {
        seen.load(Ordering::Relaxed) >= until
    })
    .await;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    anyhow::ensure!(
        done,
        "saw {} of {until}: {stats:?}",
        seen.load(Ordering::Relaxed)
    );
    Ok(stats)
}

/// The runtime restores from a checkpoint only while it is younger than the configured
/// `checkpoint_max_age_ms`: with a max age of zero, a clean restart with the same state
/// directory reads the whole changelog instead of its tail, and the counters are exact.
async fn old_checkpoint_is_not_trusted(kind: BrokerKind) -> anyhow::Result<()> {
    const FIRST: u64 = 200;
    const USERS: u64 = 10;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("aged", 1)?;
    if kind == BrokerKind::Embedded {
        broker.create_topic("aged-state-changelog", 1)?;
    }
    put_tasks(
        &broker.bootstrap_servers(),
        kind.producer_settings(),
        "aged",
        0..FIRST,
        USERS,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let young = StateConfig::new(dir.path());
    count(&broker, "aged", "aged", &young, FIRST).await?;
    // Two records per task in the changelog.
    let changelog = 2 * FIRST;

    put_tasks(
        &broker.bootstrap_servers(),
        kind.producer_settings(),
        "aged",
        FIRST..FIRST + 1,
        USERS,
    )
    .await?;
    let stale = young.clone().checkpoint_max_age(Duration::ZERO);
    let second = count(&broker, "aged", "aged", &stale, 1).await?;
    assert!(
        second.state_records_restored >= changelog,
        "a checkpoint older than the max age must not be used: restored {} of {changelog}",
        second.state_records_restored
    );
    let counts = decaton_integration_tests::read_counters(&young, "aged", "aged", 1)?;
    assert_eq!(
        counts,
        decaton_integration_tests::expected_counts(FIRST + 1, USERS)
    );
    Ok(())
}

broker_tests!(
    a_checkpoint_older_than_the_max_age_is_not_used,
    super::old_checkpoint_is_not_trusted
);
