#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! Per-key quota: a key far busier than the others is shaped to the shaping topic, so the
//! others keep their latency, and its own tasks still run in order, none lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_integration_tests::chat_op;
use decaton_processor::{
    async_trait, FileProperties, ProcessError, ProcessingContext, ProcessorProperties, QuotaConfig,
    SchedulingMode, Subscription, SubscriptionHandle, SubscriptionStats, TaskProcessor,
};
use decaton_protocol::{now_millis, ChatOp};
use decaton_testkit::{checker, wait_until, BrokerKind, Processed, TestBroker};
use parking_lot::Mutex;

/// Time each task takes: the busy key alone needs 1.5 s of work per second.
const WORK: Duration = Duration::from_millis(30);

/// The busy key's user number.
const HOT: u64 = 1_000_000;

#[derive(Default)]
struct Log {
    processed: Vec<Processed>,
    /// Produce-to-start delay of the other keys' tasks, ms.
    delays: Vec<i64>,
    /// Tasks of the busy key started from the shaping topic.
    hot_from_shaping: u64,
    /// Whether each task of the busy key, in start order, came from the shaping topic.
    hot_topics: Vec<bool>,
}

/// Records each task, then works on it for a fixed time.
struct Worker {
    log: Arc<Mutex<Log>>,
    work: Duration,
}

#[async_trait]
impl TaskProcessor<ChatOp> for Worker {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        {
            let mut log = self.log.lock();
            if task.user_id == format!("user-{HOT}") {
                let shaped = ctx.topic().ends_with("-shaping");
                log.hot_from_shaping += u64::from(shaped);
                log.hot_topics.push(shaped);
            } else {
                log.delays.push(now_millis() - task.created_at_millis);
            }
            log.processed.push(Processed {
                key: task.user_id.clone(),
                sequence: task.sequence,
                instance: "a".into(),
            });
        }
        // The task's work (a call to a slow store).
        tokio::time::sleep(self.work).await;
        Ok(())
    }
}

fn client(
    kind: BrokerKind,
    bootstrap: &str,
    topic: &str,
) -> anyhow::Result<decaton_client::TaskClient<ChatOp>> {
    let mut b =
        decaton_client::TaskClient::<ChatOp>::builder(bootstrap, topic).application_id("it");
    for (k, v) in kind.producer_settings() {
        b = b.set(*k, *v);
    }
    Ok(b.build()?)
}

/// Puts, every 100 ms for `ticks` ticks, `others` tasks of the next users out of `users`
/// and `hot` tasks of the busy key, numbering each key's tasks on from `counts` (key ->
/// tasks put so far), which it updates.
async fn paced_on(
    client: &decaton_client::TaskClient<ChatOp>,
    ticks: u64,
    users: u64,
    others: u64,
    hot: u64,
    counts: &mut HashMap<String, u64>,
) -> anyhow::Result<()> {
    let mut next_user = 0u64;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..ticks {
        every.tick().await; // pacing the load, not synchronising
        let mut tasks = Vec::new();
        for _ in 0..others {
            let user = next_user % users;
            next_user += 1;
            let seq = counts.entry(format!("user-{user}")).or_default();
            tasks.push(chat_op(user, *seq));
            *seq += 1;
        }
        for _ in 0..hot {
            let seq = counts.entry(format!("user-{HOT}")).or_default();
            tasks.push(chat_op(HOT, *seq));
            *seq += 1;
        }
        let puts = tasks.iter().map(|t| client.put(t.user_id.clone(), t));
        for r in futures::future::join_all(puts).await {
            r?;
        }
    }
    Ok(())
}

/// [`paced_on`] from nothing put; returns key -> tasks put.
async fn paced(
    client: &decaton_client::TaskClient<ChatOp>,
    ticks: u64,
    users: u64,
    others: u64,
    hot: u64,
) -> anyhow::Result<HashMap<String, u64>> {
    let mut counts = HashMap::new();
    paced_on(client, ticks, users, others, hot, &mut counts).await?;
    Ok(counts)
}

fn subscription(
    kind: BrokerKind,
    bootstrap: &str,
    id: &str,
    topic: &str,
    props: ProcessorProperties,
    log: Arc<Mutex<Log>>,
    work: Duration,
) -> anyhow::Result<Subscription<ChatOp, Worker>> {
    let mut b = Subscription::builder(id, Worker { log, work })
        .bootstrap_servers(bootstrap)
        .topic(topic)
        .properties(props)
        .per_key_quota(QuotaConfig::new().window(Duration::from_secs(1)));
    for (k, v) in kind.producer_settings() {
        b = b.set(*k, *v);
    }
    Ok(b.build()?)
}

async fn stop(
    handle: &SubscriptionHandle,
    running: tokio::task::JoinHandle<
        Result<SubscriptionStats, decaton_processor::SubscriptionError>,
    >,
) -> anyhow::Result<SubscriptionStats> {
    handle.shutdown();
    Ok(tokio::time::timeout(Duration::from_secs(30), running).await???)
}

/// Waits (up to 60 s) until every task of `expected` was processed, stops the
/// subscription, and checks per-key order and completeness; the stats and the log.
async fn finish(
    what: &str,
    log: &Mutex<Log>,
    expected: &HashMap<String, u64>,
    handle: &SubscriptionHandle,
    running: tokio::task::JoinHandle<
        Result<SubscriptionStats, decaton_processor::SubscriptionError>,
    >,
) -> anyhow::Result<(SubscriptionStats, Log)> {
    let total: u64 = expected.values().sum();
    let done = wait_until(Duration::from_secs(60), || {
        log.lock().processed.len() as u64 >= total
    })
    .await;
    let stats = stop(handle, running).await?;
    let log = std::mem::take(&mut *log.lock());
    assert!(
        done,
        "{what}: {} of {total} processed; {stats:?}",
        log.processed.len()
    );
    let report = checker::check(expected, &log.processed);
    assert!(report.ok(), "{what}: {report}");
    Ok((stats, log))
}

fn p99(mut delays: Vec<i64>) -> i64 {
    delays.sort_unstable();
    delays[(delays.len() * 99 / 100).min(delays.len() - 1)]
}

/// One run: 1 000 users at one task per second each for 5 s, and, when `hot`, one user
/// at 50 per second; the others' p99 delay, the stats, and the check of everything.
async fn run(
    kind: BrokerKind,
    broker: &TestBroker,
    name: &str,
    hot: bool,
    quota: i64,
) -> anyhow::Result<(i64, SubscriptionStats, Log)> {
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic(name, 4)?;
    broker.create_topic(&format!("{name}-shaping"), 4)?;
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::Bounded;
    props.partition_concurrency = 16;
    props.commit_interval = Duration::from_millis(200);
    props.per_key_quota_processing_rate = quota;
    let log = Arc::new(Mutex::new(Log::default()));
    let sub = subscription(kind, &bootstrap, name, name, props, log.clone(), WORK)?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    assert!(
        wait_until(Duration::from_secs(60), || handle
            .stats()
            .assigned_partitions
            == 8)
        .await,
        "never assigned: {:?}",
        handle.stats()
    );
    let client = client(kind, &bootstrap, name)?;
    let expected = paced(&client, 50, 1_000, 100, if hot { 5 } else { 0 }).await?;
    client.close().await?;
    let (stats, log) = finish(name, &log, &expected, &handle, running).await?;
    Ok((p99(log.delays.clone()), stats, log))
}

/// One key putting 50 times more tasks than each of 1 000 others: it is shaped, the
/// others' p99 delay (put to start) stays within 2x of a run without it, and every task of
/// the busy key still runs, in order.
async fn busy_key_is_shaped(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let (base, _, _) = run(kind, &broker, "calm", false, 10).await?;
    let t = Instant::now();
    let (with_hot, stats, log) = run(kind, &broker, "busy", true, 10).await?;
    let took = t.elapsed();
    let (unshaped, _, _) = run(kind, &broker, "unshaped", true, -1).await?;
    println!(
        "{}: others' p99 delay {base} ms alone, {with_hot} ms beside the busy key ({:.2}x), \
         {unshaped} ms beside it without a quota; {} busy-key tasks shaped, {} run from the \
         shaping topic; run took {took:?}",
        kind.name(),
        with_hot as f64 / base.max(1) as f64,
        stats.shaped,
        log.hot_from_shaping,
    );
    assert!(stats.shaped > 0, "nothing was shaped: {stats:?}");
    assert_eq!(
        stats.shaped, log.hot_from_shaping,
        "shaped tasks not run from the shaping topic"
    );
    // The measure sees the busy key: without shaping it delays the others.
    assert!(
        unshaped > with_hot,
        "others' p99 {unshaped} ms without a quota, {with_hot} ms with it"
    );
    assert!(
        with_hot <= 2 * base.max(1),
        "others' p99 {with_hot} ms beside the busy key, {base} ms alone"
    );
    Ok(())
}
decaton_integration_tests::broker_tests!(
    busy_key_is_shaped_others_keep_their_latency,
    crate::busy_key_is_shaped
);

/// The quota read from a property file: unlimited at first (nothing shaped), then set to
/// 5 per second by editing the file of the running subscription, shaping within 2 s.
async fn quota_from_file(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("reload", 2)?;
    broker.create_topic("reload-shaping", 2)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("processor.toml");
    let write_quota = |q: i64| {
        std::fs::write(
            &file,
            format!("\"decaton.per.key.quota.processing.rate\" = {q}\n"),
        )
    };
    write_quota(-1)?;
    let mut props = ProcessorProperties::default();
    props.partition_concurrency = 4;
    let log = Arc::new(Mutex::new(Log::default()));
    let mut b = Subscription::builder(
        "reload",
        Worker {
            log: log.clone(),
            work: Duration::ZERO,
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("reload")
    .properties(props)
    .per_key_quota(QuotaConfig::new())
    .property_supplier(FileProperties::new(&file));
    for (k, v) in kind.producer_settings() {
        b = b.set(*k, *v);
    }
    let sub = b.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    assert!(
        wait_until(Duration::from_secs(60), || handle
            .stats()
            .assigned_partitions
            == 4)
        .await
    );
    let client = client(kind, &bootstrap, "reload")?;
    // The busy key at 100 tasks per second for 6 s, in the background.
    let producing = tokio::spawn(async move {
        let r = paced(&client, 60, 1, 0, 10).await;
        client.close().await?;
        r
    });
    assert!(
        wait_until(Duration::from_secs(30), || log.lock().processed.len()
            >= 100)
        .await,
        "nothing processed"
    );
    assert_eq!(handle.stats().shaped, 0, "shaped while unlimited");
    write_quota(5)?;
    let edited = Instant::now();
    let took_effect = wait_until(Duration::from_secs(2), || handle.stats().shaped > 0).await;
    let after = edited.elapsed();
    let expected = producing.await??;
    let total: u64 = expected.values().sum();
    let done = wait_until(Duration::from_secs(60), || {
        log.lock().processed.len() as u64 >= total
    })
    .await;
    let stats = stop(&handle, running).await?;
    println!(
        "{}: quota edit took effect after {after:?}; {stats:?}",
        kind.name()
    );
    assert!(took_effect, "the quota edit took no effect within 2 s");
    assert!(done, "{} of {total} processed", log.lock().processed.len());
    let report = checker::check(&expected, &log.lock().processed);
    assert!(report.ok(), "{report}");
    Ok(())
}
decaton_integration_tests::broker_tests!(quota_follows_the_property_file, crate::quota_from_file);

/// What cannot work is refused: a quota with a state store (a shaped task may run on
/// another instance than its state partition), a shaping topic that is the source topic,
/// a shaping rate of 0, and a shaping topic that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_quotas_are_refused() -> anyhow::Result<()> {
    decaton_integration_tests::init_tracing();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("alone", 1)?;
    let build = |quota: QuotaConfig, state: bool| {
        let worker = Worker {
            log: Arc::default(),
            work: Duration::ZERO,
        };
        let mut b = Subscription::builder("alone", worker)
            .bootstrap_servers(&bootstrap)
            .topic("alone")
            .per_key_quota(quota);
        if state {
            b = b.state_store(decaton_state::StateConfig::default());
        }
        b.build()
    };
    let refused = |r: Result<Subscription<ChatOp, Worker>, _>| {
        r.err()
            .map(|e: decaton_processor::SubscriptionError| e.to_string())
            .unwrap_or_default()
    };
    let err = refused(build(QuotaConfig::new(), true));
    assert!(err.contains("state store"), "{err}");
    let err = refused(build(QuotaConfig::new().topic("alone"), false));
    assert!(err.contains("shaping topic must differ"), "{err}");
    let err = refused(build(QuotaConfig::new().shaping_rate(0), false));
    assert!(err.contains("shaping_rate"), "{err}");
    let err = build(QuotaConfig::new(), false)?
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("alone-shaping"), "{err}");
    Ok(())
}

/// A key that bursts and then calms down: its burst goes to the shaping topic, and once
/// every shaped task has run and the key is under quota again, it is processed from the
/// source topic again — all of its tasks in order across both moves.
async fn burst_then_calm(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("burst", 2)?;
    broker.create_topic("burst-shaping", 2)?;
    let mut props = ProcessorProperties::default();
    props.partition_concurrency = 4;
    props.per_key_quota_processing_rate = 20;
    let log = Arc::new(Mutex::new(Log::default()));
    let sub = subscription(
        kind,
        &bootstrap,
        "burst",
        "burst",
        props,
        log.clone(),
        Duration::from_millis(5),
    )?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    assert!(
        wait_until(Duration::from_secs(60), || handle
            .stats()
            .assigned_partitions
            == 4)
        .await
    );
    let client = client(kind, &bootstrap, "burst")?;
    let mut expected = HashMap::new();
    // 150 tasks at once; then 30 more, each once the previous one has run and at most
    // 10 per second (half the quota): a key stays shaped while a task of it is on its
    // way through the shaping topic, so a calm key is one whose tasks do not overlap.
    paced_on(&client, 1, 1, 0, 150, &mut expected).await?;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..30 {
        every.tick().await; // pacing the load, not synchronising
        let before: u64 = expected.values().sum();
        assert!(
            wait_until(Duration::from_secs(30), || log.lock().processed.len()
                as u64
                >= before)
            .await,
            "the key's tasks stopped running"
        );
        paced_on(&client, 1, 1, 0, 1, &mut expected).await?;
    }
    client.close().await?;
    let (stats, log) = finish("burst", &log, &expected, &handle, running).await?;
    // Source, then shaping, then source again.
    let first_shaped = log.hot_topics.iter().position(|s| *s);
    let back =
        first_shaped.and_then(|i| log.hot_topics[i..].iter().position(|s| !*s).map(|j| i + j));
    let direct_after = back.map_or(0, |b| log.hot_topics[b..].iter().filter(|s| !**s).count());
    println!(
        "{}: {} tasks shaped, first at {first_shaped:?}, direct again from {back:?} ({direct_after} direct after it)",
        kind.name(),
        stats.shaped
    );
    assert!(
        first_shaped.is_some_and(|i| i > 0),
        "the burst was not shaped after its quota"
    );
    assert!(
        back.is_some(),
        "the key never came back from the shaping topic"
    );
    assert!(
        log.hot_topics[back.unwrap()..].iter().all(|s| !*s),
        "the key went back and forth: {:?}",
        log.hot_topics
    );
    Ok(())
}
decaton_integration_tests::broker_tests!(a_calmed_key_comes_back_in_order, crate::burst_then_calm);

/// The source and shaping partitions with the same number go to the same instance: with
/// two instances of one subscription (the default assignor), each owns partition p of the
/// shaping topic exactly when it owns partition p of the source.
async fn shaping_partitions_follow_their_source(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("pair", 4)?;
    broker.create_topic("pair-shaping", 4)?;
    let start = || -> anyhow::Result<_> {
        let sub = subscription(
            kind,
            &bootstrap,
            "pair",
            "pair",
            ProcessorProperties::default(),
            Arc::default(),
            Duration::ZERO,
        )?;
        let handle = sub.handle();
        Ok((handle, tokio::spawn(sub.run())))
    };
    let (a, run_a) = start()?;
    let (b, run_b) = start()?;
    let owned = |h: &SubscriptionHandle, topic: &str| {
        let mut p: Vec<i32> = h
            .health()
            .partitions
            .iter()
            .filter(|p| &*p.topic == topic)
            .map(|p| p.partition)
            .collect();
        p.sort_unstable();
        p
    };
    // Both members hold partitions and together all eight.
    let settled = wait_until(Duration::from_secs(60), || {
        let (sa, sb) = (a.stats().assigned_partitions, b.stats().assigned_partitions);
        sa > 0
            && sb > 0
            && sa + sb == 8
            && a.health().partitions.len() + b.health().partitions.len() == 8
    })
    .await;
    let (a_src, a_sh, b_src, b_sh) = (
        owned(&a, "pair"),
        owned(&a, "pair-shaping"),
        owned(&b, "pair"),
        owned(&b, "pair-shaping"),
    );
    stop(&a, run_a).await?;
    stop(&b, run_b).await?;
    println!(
        "{}: a owns {a_src:?} / {a_sh:?}, b owns {b_src:?} / {b_sh:?}",
        kind.name()
    );
    assert!(settled, "the two members never split the partitions");
    assert_eq!(
        a_src, a_sh,
        "instance a: source and shaping partitions differ"
    );
    assert_eq!(
        b_src, b_sh,
        "instance b: source and shaping partitions differ"
    );
    Ok(())
}
decaton_integration_tests::broker_tests!(
    shaping_partitions_are_co_located,
    crate::shaping_partitions_follow_their_source
);
