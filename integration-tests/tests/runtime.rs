#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! The processor runtime end to end, against the embedded and the real broker.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use decaton_integration_tests::{
    broker_tests, committed, produce, wait_committed, Behaviour, Recorder, Recording,
};
use decaton_processor::{
    async_trait, ProcessError, ProcessingContext, ProcessorProperties, SchedulingMode,
    Subscription, TaskProcessor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{checker, BrokerKind, TestBroker};

const WAIT: Duration = Duration::from_secs(120);

fn props(mode: SchedulingMode, lanes: usize, max_pending: usize) -> ProcessorProperties {
    let mut p = ProcessorProperties::default();
    p.mode = mode;
    p.partition_concurrency = lanes;
    p.max_pending = max_pending;
    p.commit_interval = Duration::from_millis(100);
    p
}

async fn order_check(kind: BrokerKind, mode: SchedulingMode) -> anyhow::Result<()> {
    const TASKS: u64 = 50_000;
    const KEYS: u64 = 500;
    const PARTITIONS: i32 = 4;
    const LANES: usize = 8;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("ops", PARTITIONS)?;
    let expected = produce(&broker, "ops", TASKS, KEYS).await?;
    let rec = Arc::new(Recording::default());
    let behaviour = Behaviour {
        max_latency_ms: 5,
        ..Default::default()
    };
    let sub = Subscription::builder("order-check", Recorder::new("i1", rec.clone(), behaviour))
        .bootstrap_servers(broker.bootstrap_servers())
        .topic("ops")
        .properties(props(mode, LANES, 1_000))
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    if let Err(e) = rec.wait_for(WAIT, |r| r.count() as u64 >= TASKS).await {
        anyhow::bail!(
            "{e}: processed {} of {TASKS}, stats {:?}",
            rec.count(),
            handle.stats()
        );
    }
    handle.shutdown();
    let stats = running.await??;
    let report = checker::check(&expected, &rec.log.lock());
    println!(
        "{} {mode:?}: {report}; max in flight {} per partition {:?}",
        kind.name(),
        rec.max_in_flight.load(Ordering::SeqCst),
        rec.per_partition.lock()
    );
    assert!(report.ok(), "{report}");
    assert_eq!(report.duplicates, 0);
    assert_eq!(
        rec.key_overlaps.load(Ordering::SeqCst),
        0,
        "two tasks of one key ran at once"
    );
    assert_eq!(stats.processed, TASKS);
    let per_partition_max = rec
        .per_partition
        .lock()
        .values()
        .map(|v| v.1)
        .max()
        .unwrap_or(0);
    match mode {
        // Eight lanes per partition: some partition ran eight tasks at once.
        SchedulingMode::Bounded => {
            assert_eq!(per_partition_max, LANES, "bounded concurrency not reached")
        }
        // One lane per key: a partition holds 125 keys, far above eight lanes.
        SchedulingMode::PerKey => assert!(
            per_partition_max >= 100,
            "per-key concurrency only {per_partition_max}"
        ),
    }
    Ok(())
}

async fn order_bounded(kind: BrokerKind) -> anyhow::Result<()> {
    order_check(kind, SchedulingMode::Bounded).await
}
async fn order_per_key(kind: BrokerKind) -> anyhow::Result<()> {
    order_check(kind, SchedulingMode::PerKey).await
}
broker_tests!(order_checker_bounded_8_lanes, super::order_bounded);
broker_tests!(order_checker_per_key, super::order_per_key);

/// Holds the task at one offset until released.
struct HoldOne {
    hold_offset: i64,
    release: Arc<tokio::sync::Notify>,
    rec: Arc<Recording>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for HoldOne {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        if ctx.offset() == self.hold_offset {
            self.release.notified().await;
        }
        Recorder::new("i", self.rec.clone(), Behaviour::default())
            .process(ctx, task)
            .await
    }
}

async fn out_of_order_commit(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 200;
    const HELD: i64 = 37;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("ooo", 1)?;
    let bootstrap = broker.bootstrap_servers();
    // Distinct keys: nothing orders the later tasks behind the held one.
    produce(&broker, "ooo", TASKS, TASKS).await?;
    let rec = Arc::new(Recording::default());
    let release = Arc::new(tokio::sync::Notify::new());
    let sub = Subscription::builder(
        "ooo",
        HoldOne {
            hold_offset: HELD,
            release: release.clone(),
            rec: rec.clone(),
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("ooo")
    .properties(props(SchedulingMode::PerKey, 1, 10_000))
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    // Everything but the held task finishes...
    rec.wait_for(WAIT, |r| r.count() as u64 == TASKS - 1)
        .await?;
    // ...and the committed position reaches the held offset and stays there across
    // several more commit rounds.
    let mut rounds_seen = 0;
    let mut last = None;
    while rounds_seen < 5 {
        let c = committed(&bootstrap, "ooo", "ooo", 1)?;
        let pos = c[0].0;
        assert!(
            pos.is_none_or(|p| p <= HELD),
            "committed {pos:?} past the unfinished offset {HELD}"
        );
        if pos == Some(HELD) {
            rounds_seen += 1;
            last = Some(c[0].1.clone());
        }
        tokio::time::sleep(Duration::from_millis(150)).await; // sampling interval, not synchronisation
    }
    if kind.returns_commit_metadata() {
        // The offset map lists every finished offset above the position.
        let md = last.unwrap_or_default();
        assert!(md.starts_with("dtom1:37:"), "metadata {md}");
    }
    release.notify_one();
    rec.wait_for(WAIT, |r| r.count() as u64 == TASKS).await?;
    let pos = wait_committed(
        &bootstrap,
        "ooo",
        "ooo",
        TASKS as i64,
        Duration::from_secs(10),
    )
    .await?;
    assert_eq!(pos, Some(TASKS as i64));
    handle.shutdown();
    running.await??;
    Ok(())
}
broker_tests!(
    out_of_order_commit_holds_position,
    super::out_of_order_commit
);

async fn backpressure(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 200_000;
    const MAX_PENDING: usize = 1_000;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("bp", 3)?;
    let expected = produce(&broker, "bp", TASKS, 20_000).await?;
    let rec = Arc::new(Recording::default());
    // Per-key lanes with 20k keys: without backpressure, thousands would run at once.
    let recorder = Recorder::new(
        "i",
        rec.clone(),
        Behaviour {
            fixed_latency_ms: 1,
            in_flight_limit: Some(MAX_PENDING * 3),
            ..Default::default()
        },
    );
    let violations = recorder.limit_violations.clone();
    let sub = Subscription::builder("bp", recorder)
        .bootstrap_servers(broker.bootstrap_servers())
        .topic("bp")
        .properties(props(SchedulingMode::PerKey, 1, MAX_PENDING))
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    rec.wait_for(WAIT, |_| handle.stats().paused_partitions > 0)
        .await?;
    rec.wait_for(WAIT, |r| r.count() as u64 >= TASKS).await?;
    let stats = handle.stats();
    handle.shutdown();
    running.await??;
    let max = rec.max_in_flight.load(Ordering::SeqCst);
    let per_partition_max = rec
        .per_partition
        .lock()
        .values()
        .map(|v| v.1)
        .max()
        .unwrap_or(0);
    println!(
        "{}: max in flight {max}, per partition {per_partition_max}, pauses {}",
        kind.name(),
        stats.pauses
    );
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert!(
        per_partition_max <= MAX_PENDING,
        "partition ran {per_partition_max} > {MAX_PENDING} at once"
    );
    assert!(stats.pauses > 0, "never paused");
    assert_eq!(stats.paused_partitions, 0, "still paused at the end");
    let report = checker::check(&expected, &rec.log.lock());
    assert!(report.ok(), "{report}");
    Ok(())
}
broker_tests!(backpressure_bounds_in_flight, super::backpressure);

/// Never finishes its first task.
struct Stuck;

#[async_trait]
impl TaskProcessor<ChatOp> for Stuck {
    async fn process(&self, _ctx: &ProcessingContext, _task: ChatOp) -> Result<(), ProcessError> {
        futures::future::pending::<()>().await;
        Ok(())
    }
}

async fn isolation(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 5_000;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("iso", 3)?;
    let expected = produce(&broker, "iso", TASKS, 100).await?;
    let mut stuck_props = props(SchedulingMode::Bounded, 4, 1_000);
    stuck_props.shutdown_timeout = Duration::from_millis(500);
    let b = Subscription::builder("iso-b", Stuck)
        .bootstrap_servers(broker.bootstrap_servers())
        .topic("iso")
        .properties(stuck_props)
        .build()?;
    let b_handle = b.handle();
    let b_running = tokio::spawn(b.run());
    let rec = Arc::new(Recording::default());
    let a = Subscription::builder(
        "iso-a",
        Recorder::new("a", rec.clone(), Behaviour::default()),
    )
    .bootstrap_servers(broker.bootstrap_servers())
    .topic("iso")
    .properties(props(SchedulingMode::Bounded, 4, 1_000))
    .build()?;
    let a_handle = a.handle();
    let a_running = tokio::spawn(a.run());
    rec.wait_for(WAIT, |r| r.count() as u64 >= TASKS).await?;
    let report = checker::check(&expected, &rec.log.lock());
    assert!(report.ok(), "{report}");
    assert_eq!(
        b_handle.stats().processed,
        0,
        "the stuck processor finished something"
    );
    a_handle.shutdown();
    b_handle.shutdown();
    a_running.await??;
    let b_stats = b_running.await??;
    assert_eq!(b_stats.processed, 0);
    Ok(())
}
broker_tests!(
    isolation_stuck_subscription_does_not_stall_another,
    super::isolation
);

async fn graceful_restart(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 20_000;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("gr", 3)?;
    let bootstrap = broker.bootstrap_servers();
    let expected = produce(&broker, "gr", TASKS, 300).await?;
    let rec = Arc::new(Recording::default());
    let run = |instance: &'static str| {
        Subscription::builder(
            "gr",
            Recorder::new(
                instance,
                rec.clone(),
                Behaviour {
                    max_latency_ms: 1,
                    ..Default::default()
                },
            ),
        )
        .bootstrap_servers(&bootstrap)
        .topic("gr")
        .properties(props(SchedulingMode::Bounded, 8, 500))
        .build()
    };
    let first = run("first")?;
    let h1 = first.handle();
    let r1 = tokio::spawn(first.run());
    rec.wait_for(WAIT, |r| r.count() >= 6_000).await?;
    h1.shutdown();
    r1.await??;
    let committed_after_first = committed(&bootstrap, "gr", "gr", 3)?;
    let first_offsets = rec.offsets.lock().len();
    let second = run("second")?;
    let h2 = second.handle();
    let r2 = tokio::spawn(second.run());
    rec.wait_for(WAIT, |r| {
        let l = r.log.lock();
        let seen: std::collections::HashSet<_> =
            l.iter().map(|p| (p.key.clone(), p.sequence)).collect();
        seen.len() as u64 >= TASKS
    })
    .await?;
    h2.shutdown();
    r2.await??;
    let log = rec.log.lock().clone();
    let report = checker::check(&expected, &log);
    println!(
        "{}: {report}; committed after first run {committed_after_first:?}",
        kind.name()
    );
    assert!(report.ok(), "{report}");
    // Nothing below what the first run committed ran again in the second.
    for (p, o) in rec.offsets.lock()[first_offsets..].iter() {
        let pos = committed_after_first[*p as usize].0.unwrap_or(0);
        assert!(
            *o >= pos,
            "offset {o} of partition {p} was committed ({pos}) and ran again"
        );
    }
    if kind.returns_commit_metadata() {
        assert_eq!(
            report.duplicates, 0,
            "the offset map should prevent every re-run"
        );
    }
    Ok(())
}
broker_tests!(
    graceful_restart_loses_nothing_and_reruns_nothing_committed,
    super::graceful_restart
);
