#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! The per-partition processing rate, changed while running through a property file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_integration_tests::put_tasks;
use decaton_processor::{
    async_trait, FileProperties, ProcessError, ProcessingContext, ProcessorProperties,
    SchedulingMode, Subscription, TaskProcessor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{wait_until, BrokerKind, TestBroker};

struct Count(Arc<AtomicU64>);

#[async_trait]
impl TaskProcessor<ChatOp> for Count {
    async fn process(&self, _: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Processed count over `window` (a measurement, not a synchronisation).
async fn rate_over(count: &AtomicU64, window: Duration) -> f64 {
    let (c0, t0) = (count.load(Ordering::SeqCst), Instant::now());
    tokio::time::sleep(window).await;
    (count.load(Ordering::SeqCst) - c0) as f64 / t0.elapsed().as_secs_f64()
}

/// A partition limited to 200 tasks/s from a property file processes within ±10 % of
/// that; editing the file to 0 stops it within 2 s and to -1 restores full speed, all
/// without a restart.
async fn rate_from_file(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 6_000;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("rated", 1)?;
    put_tasks(&bootstrap, kind.producer_settings(), "rated", 0..TASKS, 100).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("processor.toml");
    let write_rate = |rate: i64| {
        std::fs::write(
            &file,
            format!("\"decaton.processing.rate.per.partition\" = {rate}\n"),
        )
    };
    write_rate(200)?;
    let count = Arc::new(AtomicU64::new(0));
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::Bounded;
    props.partition_concurrency = 4;
    let sub = Subscription::builder("rated", Count(count.clone()))
        .bootstrap_servers(&bootstrap)
        .topic("rated")
        .properties(props)
        .property_supplier(FileProperties::new(&file))
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    assert!(
        wait_until(Duration::from_secs(60), || count.load(Ordering::SeqCst)
            >= 50)
        .await
    );
    let limited = rate_over(&count, Duration::from_secs(5)).await;

    write_rate(0)?;
    let edited = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await; // the change must land within 2 s
    let stopped_at = count.load(Ordering::SeqCst);
    let stopped_rate = rate_over(&count, Duration::from_millis(1500)).await;

    write_rate(-1)?;
    let restored_from = count.load(Ordering::SeqCst);
    let t = Instant::now();
    let finished = wait_until(Duration::from_secs(30), || {
        count.load(Ordering::SeqCst) >= TASKS
    })
    .await;
    let full = (count.load(Ordering::SeqCst) - restored_from) as f64 / t.elapsed().as_secs_f64();
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    println!(
        "{}: limited {limited:.1}/s, after 0 ({:?} after the edit) {stopped_rate:.1}/s at {stopped_at}, after -1 {full:.0}/s; {stats:?}",
        kind.name(),
        edited.elapsed()
    );
    assert!(
        (180.0..=220.0).contains(&limited),
        "limited to 200/s, measured {limited:.1}/s"
    );
    assert_eq!(
        stopped_rate, 0.0,
        "rate 0 did not stop processing within 2 s"
    );
    assert!(finished, "rate -1 did not restore processing");
    assert!(full > 1_000.0, "rate -1 restored only {full:.0}/s");
    Ok(())
}
decaton_integration_tests::broker_tests!(
    rate_limit_follows_the_property_file,
    crate::rate_from_file
);

/// Rate 0 set programmatically stops processing within one task: at most one task starts
/// after the change returns (one already past its start check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_zero_stops_within_one_task() -> anyhow::Result<()> {
    decaton_integration_tests::init_tracing();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("halt", 1)?;
    put_tasks(&bootstrap, &[], "halt", 0..20_000, 500).await?;
    let count = Arc::new(AtomicU64::new(0));
    let mut props = ProcessorProperties::default();
    props.partition_concurrency = 8;
    let live = decaton_processor::LiveProperties::new(props);
    let sub = Subscription::builder("halt", Count(count.clone()))
        .bootstrap_servers(&bootstrap)
        .topic("halt")
        .live_properties(live.clone())
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    assert!(
        wait_until(Duration::from_secs(60), || count.load(Ordering::SeqCst)
            >= 1_000)
        .await
    );
    live.set("decaton.processing.rate.per.partition", "0")?;
    let at_change = count.load(Ordering::SeqCst);
    // Lanes already hold dispatched tasks; none of them may start now.
    let after = rate_over(&count, Duration::from_millis(500)).await;
    let extra = count.load(Ordering::SeqCst) - at_change;
    live.set("decaton.processing.rate.per.partition", "-1")?;
    let resumed = wait_until(Duration::from_secs(30), || {
        count.load(Ordering::SeqCst) >= 20_000
    })
    .await;
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(30), running).await???;
    println!("stopped with {extra} more tasks after the change ({after:.1}/s)");
    assert!(
        extra <= 8,
        "{extra} tasks started after rate 0 (one per lane at most may be past its check)"
    );
    assert!(resumed, "processing did not resume at -1");
    Ok(())
}
