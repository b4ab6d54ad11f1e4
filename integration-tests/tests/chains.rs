#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! Processor chains end to end: a partition-scoped stage, compaction and a last stage,
//! with per-key order and nothing lost; and `partition_concurrency` changed through the
//! property file of a running subscription.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use decaton_integration_tests::{committed, put_tasks};
use decaton_processor::{
    async_trait, BatchedTask, Chain, Compaction, FileProperties, LiveProperties, PassOn,
    ProcessError, ProcessingContext, ProcessorProperties, ProcessorScope, SchedulingMode,
    Subscription, Survivor, TaskProcessor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{checker, wait_until, BrokerKind, Processed, TestBroker};
use parking_lot::Mutex;
use rdkafka::Message as _;

/// What the partition-scoped stage's instances report when they are dropped:
/// (partition, tasks seen, tasks of another partition seen).
type Reports = Arc<Mutex<Vec<(i32, u64, u64)>>>;

/// Stage 1, one instance per partition: counts its partition's tasks in plain atomics (no
/// lock, nothing shared with other partitions), logs every task for the checker, passes
/// it on.
struct PerPartition {
    partition: OnceLock<i32>,
    seen: AtomicU64,
    foreign: AtomicU64,
    log: Arc<Mutex<Vec<Processed>>>,
    reports: Reports,
}

impl Drop for PerPartition {
    fn drop(&mut self) {
        if let Some(p) = self.partition.get() {
            self.reports.lock().push((
                *p,
                self.seen.load(Ordering::SeqCst),
                self.foreign.load(Ordering::SeqCst),
            ));
        }
    }
}

#[async_trait]
impl TaskProcessor<ChatOp> for PerPartition {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        if *self.partition.get_or_init(|| ctx.partition()) != ctx.partition() {
            self.foreign.fetch_add(1, Ordering::SeqCst);
        }
        self.seen.fetch_add(1, Ordering::SeqCst);
        self.log.lock().push(Processed {
            key: task.user_id.clone(),
            sequence: task.sequence,
            instance: "chain".into(),
        });
        ctx.push(task).await
    }
}

/// The last stage: records the survivors (user, sequence) in arrival order.
struct Save(Arc<Mutex<Vec<(String, u64)>>>);

#[async_trait]
impl TaskProcessor<ChatOp> for Save {
    async fn process(&self, _: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        self.0.lock().push((task.user_id, task.sequence));
        Ok(())
    }
}

/// Per-partition stage -> compaction (newest per user per window) -> save: every task
/// enters the chain in per-key order (checker), every task either reaches the last stage
/// or is superseded by a newer one of its user, the survivors arrive in per-key order,
/// each user's newest task arrives, and every offset commits.
async fn chain_with_compaction(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 4_000;
    const USERS: u64 = 50;
    const PARTITIONS: i32 = 3;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("chained", PARTITIONS)?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let reports: Reports = Arc::default();
    let saved = Arc::new(Mutex::new(Vec::new()));
    let superseded = Arc::new(AtomicU64::new(0));
    let chain = {
        let (log, reports, superseded) = (log.clone(), reports.clone(), superseded.clone());
        Chain::scoped(ProcessorScope::Partition, move || PerPartition {
            partition: OnceLock::new(),
            seen: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            log: log.clone(),
            reports: reports.clone(),
        })
        .then_process(Compaction::new(
            PassOn,
            Duration::from_millis(300),
            move |kept: &BatchedTask<ChatOp>, arrived: &BatchedTask<ChatOp>| {
                superseded.fetch_add(1, Ordering::SeqCst);
                if arrived.task.sequence > kept.task.sequence {
                    Survivor::Arrived
                } else {
                    Survivor::Kept
                }
            },
        ))
        .then_process(Save(saved.clone()))
    };
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::Bounded;
    props.partition_concurrency = 3;
    props.commit_interval = Duration::from_millis(100);
    let sub = Subscription::builder("chained", chain)
        .bootstrap_servers(&bootstrap)
        .topic("chained")
        .properties(props)
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let expected = put_tasks(
        &bootstrap,
        kind.producer_settings(),
        "chained",
        0..TASKS,
        USERS,
    )
    .await?;
    let all_through = wait_until(Duration::from_secs(60), || {
        saved.lock().len() as u64 + superseded.load(Ordering::SeqCst) >= TASKS
    })
    .await;
    let committed_all = wait_until(Duration::from_secs(30), || {
        committed(&bootstrap, "chained", "chained", PARTITIONS)
            .map(|c| c.iter().filter_map(|(o, _)| *o).sum::<i64>() == TASKS as i64)
            .unwrap_or(false)
    })
    .await;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    let report = checker::check(&expected, &log.lock());
    let saved = saved.lock();
    let superseded = superseded.load(Ordering::SeqCst);
    let reports = reports.lock();
    println!(
        "{}: {report}; {} survivors, {superseded} superseded; partition instances {reports:?}; {stats:?}",
        kind.name(),
        saved.len()
    );
    assert!(report.ok(), "{report}");
    assert!(all_through, "not every task got through the chain");
    assert!(committed_all, "not every offset was committed");
    assert_eq!(report.duplicates, 0);
    assert_eq!(
        saved.len() as u64 + superseded,
        TASKS,
        "each task survives to the last stage or is superseded, once"
    );
    assert!(saved.len() < TASKS as usize, "nothing was compacted");
    // Survivors in per-key order, and each user's newest task among them.
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (user, seq) in saved.iter() {
        if let Some(prev) = last.insert(user, *seq) {
            assert!(
                *seq > prev,
                "{user}: {seq} reached the last stage after {prev}"
            );
        }
    }
    assert_eq!(last.len() as u64, USERS);
    assert!(last.values().all(|s| *s == TASKS / USERS - 1));
    // One instance per partition (dropped at shutdown), each saw only its partition,
    // together every task.
    let partitions: HashSet<i32> = reports.iter().map(|r| r.0).collect();
    assert_eq!(partitions.len(), PARTITIONS as usize);
    assert_eq!(
        reports.len(),
        PARTITIONS as usize,
        "one instance per partition"
    );
    assert!(
        reports.iter().all(|r| r.2 == 0),
        "an instance saw another partition"
    );
    assert_eq!(reports.iter().map(|r| r.1).sum::<u64>(), TASKS);
    Ok(())
}
decaton_integration_tests::broker_tests!(
    chain_with_compaction_keeps_order_and_loses_nothing,
    crate::chain_with_compaction
);

/// Every task processed, with the lane it ran on.
type LaneEntries = Arc<Mutex<Vec<(Processed, Option<usize>)>>>;

/// Logs every task with the lane it ran on, and counts a key running twice at once.
struct LaneLog {
    log: LaneEntries,
    running: Mutex<HashSet<String>>,
    overlaps: Arc<AtomicU64>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for LaneLog {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        if !self.running.lock().insert(task.user_id.clone()) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        self.log.lock().push((
            Processed {
                key: task.user_id.clone(),
                sequence: task.sequence,
                instance: "lanes".into(),
            },
            ctx.lane(),
        ));
        // Some work, so that lanes hold tasks when their number changes.
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.running.lock().remove(&task.user_id);
        Ok(())
    }
}

/// `partition_concurrency` edited in the property file of a running subscription, 1 -> 4
/// -> 1, while tasks are in the lanes: tasks fetched after each change run on the new
/// lanes, no key ever runs twice at once, per-key order holds and nothing is lost.
async fn concurrency_from_file(kind: BrokerKind) -> anyhow::Result<()> {
    const ROUND: u64 = 2_000;
    const USERS: u64 = 100;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("lanes", 2)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("processor.toml");
    let write =
        |n: usize| std::fs::write(&file, format!("\"decaton.partition.concurrency\" = {n}\n"));
    write(1)?;
    let log = Arc::new(Mutex::new(Vec::new()));
    let overlaps = Arc::new(AtomicU64::new(0));
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::Bounded;
    let live = LiveProperties::new(props);
    let sub = Subscription::builder(
        "lanes",
        LaneLog {
            log: log.clone(),
            running: Mutex::new(HashSet::new()),
            overlaps: overlaps.clone(),
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("lanes")
    .live_properties(live.clone())
    .property_supplier(FileProperties::new(&file).poll_interval(Duration::from_millis(200)))
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let count = || log.lock().len() as u64;
    let settings = kind.producer_settings();

    // Round 1 at 1 lane; the change to 4 lands while it runs.
    put_tasks(&bootstrap, settings, "lanes", 0..ROUND, USERS).await?;
    assert!(wait_until(Duration::from_secs(60), || count() >= ROUND / 4).await);
    write(4)?;
    assert!(
        wait_until(Duration::from_secs(10), || live.get().partition_concurrency
            == 4)
        .await,
        "the file change did not land"
    );
    // Round 2, fetched after the change: on 4 lanes; back to 1 while it runs.
    put_tasks(&bootstrap, settings, "lanes", ROUND..2 * ROUND, USERS).await?;
    assert!(wait_until(Duration::from_secs(60), || count() >= ROUND + ROUND / 2).await);
    write(1)?;
    assert!(
        wait_until(Duration::from_secs(10), || live.get().partition_concurrency
            == 1)
        .await,
        "the file change did not land"
    );
    // Round 3, fetched after the change back: on 1 lane.
    let expected = put_tasks(&bootstrap, settings, "lanes", 2 * ROUND..3 * ROUND, USERS).await?;
    let finished = wait_until(Duration::from_secs(60), || count() >= 3 * ROUND).await;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    let log = log.lock();
    let entries: Vec<Processed> = log.iter().map(|(p, _)| p.clone()).collect();
    let report = checker::check(&expected, &entries);
    // Task i is user i % USERS's sequence i / USERS: round r holds sequences
    // r * ROUND / USERS .. (r + 1) * ROUND / USERS.
    let lanes_of = |round: u64| -> HashSet<Option<usize>> {
        let per_user = ROUND / USERS;
        log.iter()
            .filter(|(p, _)| p.sequence / per_user == round)
            .map(|(_, l)| *l)
            .collect()
    };
    let round2 = lanes_of(1);
    let round3 = lanes_of(2);
    println!(
        "{}: {report}; lanes in round 2 {round2:?}, in round 3 {round3:?}; {stats:?}",
        kind.name()
    );
    assert!(finished, "not every task was processed");
    assert!(report.ok(), "{report}");
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "a key ran twice at once"
    );
    assert!(
        round2.iter().all(|l| l.is_some_and(|l| l < 4)) && round2.len() > 1,
        "round 2 did not run on 4 lanes: {round2:?}"
    );
    assert_eq!(
        round3,
        HashSet::from([Some(0)]),
        "round 3 did not run on 1 lane"
    );
    Ok(())
}
decaton_integration_tests::broker_tests!(
    partition_concurrency_follows_the_property_file,
    crate::concurrency_from_file
);

/// The last stage: fails `poison` always and `flaky` on its first attempt; records every
/// attempt as (user, retry count).
struct Judge(Arc<Mutex<Vec<(String, i64)>>>);

#[async_trait]
impl TaskProcessor<ChatOp> for Judge {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let retry = ctx.metadata().retry_count;
        self.0.lock().push((task.user_id.clone(), retry));
        match task.user_id.as_str() {
            "poison" => Err(ProcessError::new("storage says no")),
            "flaky" if retry == 0 => Err(ProcessError::retry("storage busy")),
            _ => Ok(()),
        }
    }
}

/// Passes every task on within `process`, returning what the stages after it say.
struct Forward;

#[async_trait]
impl TaskProcessor<ChatOp> for Forward {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        ctx.push(task).await
    }
}

/// A failure in a later stage — reached through a deferring stage (batching, then
/// `Completion::push`) and a passing one (`ctx.push`) — takes the single processor's path: the task goes to the retry
/// topic, runs through the whole chain again, and once its retries are used up lands in
/// the dead-letter topic; every source offset commits.
async fn failure_in_a_later_stage(kind: BrokerKind) -> anyhow::Result<()> {
    const OTHERS: u64 = 200;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("judged", 1)?;
    broker.create_topic("judged-retry", 1)?;
    broker.create_topic("judged-dlq", 1)?;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let chain = Chain::new(decaton_processor::Batching::new(
        PassOn,
        10,
        Duration::from_millis(50),
    ))
    .then_process(Forward)
    .then_process(Judge(attempts.clone()));
    let mut props = ProcessorProperties::default();
    props.commit_interval = Duration::from_millis(100);
    let mut builder = Subscription::builder("judged", chain)
        .bootstrap_servers(&bootstrap)
        .topic("judged")
        .properties(props)
        .retry(
            decaton_processor::RetryConfig::new()
                .backoff(decaton_processor::Backoff::fixed(Duration::from_millis(
                    300,
                )))
                .max_retries(1),
        )
        .dead_letter(decaton_processor::DeadLetterConfig::new());
    for (k, v) in kind.producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    put_tasks(
        &bootstrap,
        kind.producer_settings(),
        "judged",
        0..OTHERS,
        20,
    )
    .await?;
    let mut client =
        decaton_client::TaskClient::<ChatOp>::builder(&bootstrap, "judged").application_id("it");
    for (k, v) in kind.producer_settings() {
        client = client.set(*k, *v);
    }
    let client = client.build()?;
    for user in ["poison", "flaky"] {
        let op = ChatOp {
            user_id: user.into(),
            ..Default::default()
        };
        client.put(user, &op).await?;
    }
    client.close().await?;
    let tries = |user: &str| -> Vec<i64> {
        attempts
            .lock()
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, r)| *r)
            .collect()
    };
    let judged = wait_until(Duration::from_secs(60), || {
        tries("poison").len() >= 2 && tries("flaky").len() >= 2
    })
    .await;
    let committed_all = wait_until(Duration::from_secs(30), || {
        committed(&bootstrap, "judged", "judged", 1)
            .map(|c| c[0].0 == Some(OTHERS as i64 + 2))
            .unwrap_or(false)
    })
    .await;
    let dlq = read_all(&bootstrap, "judged-dlq", 1, Duration::from_secs(20))?;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    println!("{}: {stats:?}", kind.name());
    assert!(
        judged,
        "the failing tasks were not retried through the chain"
    );
    assert!(committed_all, "not every source offset was committed");
    assert_eq!(tries("poison"), vec![0, 1], "tried, retried once, given up");
    assert_eq!(tries("flaky"), vec![0, 1], "failed once, then succeeded");
    let others = attempts
        .lock()
        .iter()
        .filter(|(u, _)| u.starts_with("user-"))
        .count();
    assert_eq!(others as u64, OTHERS, "every other task once");
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].key(), Some(&b"poison"[..]));
    assert_eq!(stats.retried, 2);
    assert_eq!(stats.dead_lettered, 1);
    Ok(())
}
decaton_integration_tests::broker_tests!(
    a_failure_in_a_later_stage_is_retried_then_dead_lettered,
    crate::failure_in_a_later_stage
);

/// Every record of `topic` (one partition), from the start, until `want` arrived or
/// `within` passed.
fn read_all(
    bootstrap: &str,
    topic: &str,
    want: usize,
    within: Duration,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}"))
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
