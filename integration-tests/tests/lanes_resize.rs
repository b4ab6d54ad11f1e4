#![allow(clippy::unwrap_used)]
//! `partition_concurrency` changes while one key's tasks are deferred in per-lane
//! `Batching::in_order` windows: every task runs once, and the checker finds each key's
//! tasks in order, never two of one key at once, across every change.

use std::sync::Arc;
use std::time::Duration;

use decaton_integration_tests::{produce, Behaviour, Recorder, Recording};
use decaton_processor::{
    Batching, Chain, LiveProperties, PassOn, ProcessorProperties, ProcessorScope, Subscription,
};
use decaton_testkit::checker::check;
use decaton_testkit::{BrokerKind, TestBroker};

async fn windows_survive_lane_changes(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 3_000;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("resize", 1)?;
    let expected = produce(&broker, "resize", TASKS, 6).await?;
    // A small window of pending tasks keeps the partition dispatching while earlier
    // batches still run, so every change finds tasks deferred in the old lanes' windows.
    let live = LiveProperties::new(ProcessorProperties {
        partition_concurrency: 1,
        max_pending: 120,
        ..Default::default()
    });
    let rec = Arc::new(Recording::default());
    // Each batch's tasks take 1 ms each downstream, so a batch is still running when the
    // next window of its key closes.
    let recorder = Recorder::new(
        "only",
        rec.clone(),
        Behaviour {
            fixed_latency_ms: 1,
            ..Default::default()
        },
    );
    let chain = Chain::scoped(ProcessorScope::Lane, || {
        Batching::new(PassOn, 40, Duration::from_millis(30)).in_order()
    })
    .then_process(recorder);
    let sub = Subscription::builder("resize", chain)
        .bootstrap_servers(broker.bootstrap_servers())
        .topic("resize")
        .live_properties(live.clone())
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    for (i, lanes) in ["3", "2", "4", "1", "3"].iter().enumerate() {
        let at = (i + 1) * 400;
        rec.wait_for(Duration::from_secs(60), |r| r.count() >= at)
            .await?;
        live.set("decaton.partition.concurrency", lanes)?;
    }
    let all = rec
        .wait_for(Duration::from_secs(120), |r| r.count() >= TASKS as usize)
        .await;
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(30), running).await???;
    all?;
    let report = check(&expected, &rec.log.lock());
    assert!(report.ok(), "{report}");
    assert_eq!(
        rec.key_overlaps.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "two tasks of one key ran at once"
    );
    Ok(())
}

decaton_integration_tests::broker_tests!(
    batching_windows_keep_key_order_across_lane_changes,
    crate::windows_survive_lane_changes
);
