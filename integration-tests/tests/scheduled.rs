#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! Tasks with a scheduled time (`scheduled_time_millis` in `dt_meta`): a task waiting for
//! its time must not hold a lane, must not hold up shutdown, and a schedule no sane
//! producer sets is discarded instead of parking a key forever.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use decaton_client::{PutOptions, TaskClient};
use decaton_integration_tests::{
    chat_op, committed, init_tracing, produce, wait_committed, Behaviour, Recorder, Recording,
};
use decaton_processor::{
    ProcessorProperties, SchedulingMode, Subscription, SubscriptionHandle, SubscriptionStats,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{checker, BrokerKind, TestBroker};
use tokio::task::JoinHandle;

type Running = JoinHandle<Result<SubscriptionStats, decaton_processor::SubscriptionError>>;

fn props() -> ProcessorProperties {
    let mut p = ProcessorProperties::default();
    p.mode = SchedulingMode::Bounded;
    p.partition_concurrency = 1;
    p.commit_interval = Duration::from_millis(100);
    p
}

/// Puts one task for `key` (a ChatOp with that user id and `seq`) with `options`; returns
/// its offset.
async fn put_one(
    broker: &TestBroker,
    topic: &str,
    key: &str,
    seq: u64,
    options: PutOptions,
) -> anyhow::Result<i64> {
    let client = TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), topic)
        .application_id("it")
        .build()?;
    let mut op = chat_op(0, seq);
    op.user_id = key.into();
    let d = client.put_with(key, &op, options).await?;
    client.close().await?;
    Ok(d.offset)
}

/// Asks a subscription to stop; returns how long `run` took to return (at most `within`).
async fn stop(
    handle: &SubscriptionHandle,
    running: Running,
    within: Duration,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    handle.shutdown();
    match tokio::time::timeout(within, running).await {
        Ok(r) => {
            r??;
            Ok(t.elapsed())
        }
        Err(_) => anyhow::bail!("subscription did not stop within {within:?}"),
    }
}

/// Defect: a task scheduled in the future sleeps inside its lane, so in bounded mode it
/// blocks every key hashed to that lane until its time, and shutdown (and revocation)
/// wait for it as if it were running.
///
/// One lane; a task for key "late" scheduled one hour ahead, then 200 tasks of 20 other
/// keys. All 200 must be processed (within 20 s) and "late" must not; shutdown must return
/// in under half of its 20 s `shutdown_timeout` (nothing runs; a task waiting for its time
/// is not waited for) and the committed position must stay at the delayed task, so the
/// next owner gets it again.
///
/// Without the fix, none of the 200 tasks is processed (the lane sleeps for an hour) and
/// shutdown takes the full shutdown_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_task_does_not_block_other_keys() -> anyhow::Result<()> {
    init_tracing();
    const TASKS: u64 = 200;
    let started = Instant::now();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("sched", 1)?;
    let late_offset = put_one(
        &broker,
        "sched",
        "late",
        0,
        PutOptions::default().scheduled_time(SystemTime::now() + Duration::from_secs(3600)),
    )
    .await?;
    let expected = produce(&broker, "sched", TASKS, 20).await?;
    let rec = Arc::new(Recording::default());
    let mut p = props();
    p.shutdown_timeout = Duration::from_secs(20);
    let sub = Subscription::builder(
        "sched",
        Recorder::new("i", rec.clone(), Behaviour::default()),
    )
    .bootstrap_servers(&bootstrap)
    .topic("sched")
    .properties(p)
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let others = |r: &Recording| r.log.lock().iter().filter(|p| p.key != "late").count() as u64;
    let waited = rec
        .wait_for(Duration::from_secs(20), |r| others(r) >= TASKS)
        .await;
    let processed_before_stop = others(&rec);
    let stats = handle.stats();
    // Stop in every case (bounded by more than shutdown_timeout so a slow stop is measured).
    let stop_took = stop(&handle, running, Duration::from_secs(40)).await;
    println!(
        "processed {processed_before_stop} of {TASKS} others, stats {stats:?}; stop took {stop_took:?}; total {:?}",
        started.elapsed()
    );
    if let Err(e) = waited {
        anyhow::bail!(
            "a task scheduled 1 h ahead blocked its lane: {e}; processed {processed_before_stop} of \
             {TASKS} tasks of other keys (stats {stats:?}); shutdown then took {stop_took:?}"
        );
    }
    let report = checker::check(&expected, &rec.log.lock());
    assert!(report.ok(), "{report}");
    assert_eq!(report.unexpected, 0, "the delayed task ran: {report}");
    let stop_took = stop_took?;
    assert!(
        stop_took < Duration::from_secs(10),
        "shutdown took {stop_took:?}: it waited for a task that is only waiting for its scheduled time"
    );
    let pos = committed(&bootstrap, "sched", "sched", 1)?[0].0;
    assert_eq!(
        pos,
        Some(late_offset),
        "the committed position must stay at the delayed task so the next owner runs it"
    );
    Ok(())
}

/// Defect: a scheduled time absurdly far ahead (here `i64::MAX` milliseconds) parks its key
/// forever: the lane sleeps "until then", and every later task of the key waits behind it.
/// The runtime must bound delays (assumed: anything more than 30 days ahead is discarded
/// and counted in `stats().discarded`).
///
/// Key "k": the absurd task, then a normal one. The normal one must be processed (within
/// 20 s), the absurd one never, `discarded` must count it, and the position must pass both.
///
/// Without the fix, the second task of "k" is never processed and nothing is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_schedule_is_discarded_and_counted() -> anyhow::Result<()> {
    init_tracing();
    let started = Instant::now();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("absurd", 1)?;
    let far = UNIX_EPOCH
        .checked_add(Duration::from_millis(i64::MAX as u64))
        .ok_or_else(|| anyhow::anyhow!("SystemTime cannot hold i64::MAX ms"))?;
    put_one(
        &broker,
        "absurd",
        "k",
        0,
        PutOptions::default().scheduled_time(far),
    )
    .await?;
    let second = put_one(&broker, "absurd", "k", 1, PutOptions::default()).await?;
    let rec = Arc::new(Recording::default());
    let mut p = props();
    p.shutdown_timeout = Duration::from_secs(5);
    let sub = Subscription::builder(
        "absurd",
        Recorder::new("i", rec.clone(), Behaviour::default()),
    )
    .bootstrap_servers(&bootstrap)
    .topic("absurd")
    .properties(p)
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let outcome = async {
        rec.wait_for(Duration::from_secs(20), |r| {
            r.log.lock().iter().any(|p| p.key == "k" && p.sequence == 1)
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the task after one scheduled at i64::MAX ms was never processed: {e}; stats {:?}",
                handle.stats()
            )
        })?;
        let stats = handle.stats();
        assert!(
            !rec.log.lock().iter().any(|p| p.sequence == 0),
            "the absurdly scheduled task ran"
        );
        assert_eq!(
            stats.discarded, 1,
            "the absurd task is not counted: {stats:?}"
        );
        let pos = wait_committed(
            &bootstrap,
            "absurd",
            "absurd",
            second + 1,
            Duration::from_secs(10),
        )
        .await?;
        assert_eq!(
            pos,
            Some(second + 1),
            "position did not pass the discarded task"
        );
        anyhow::Ok(())
    }
    .await;
    let stopped = stop(&handle, running, Duration::from_secs(20)).await;
    println!("stop took {stopped:?}; total {:?}", started.elapsed());
    outcome?;
    stopped?;
    Ok(())
}
