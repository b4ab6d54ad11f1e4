#![allow(clippy::unwrap_used)]
//! Each topic of a subscription has its own processing rate: rate 0 on the source topic
//! stops the source partitions only, and the retry topic's tasks go on at the retry
//! topic's own rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_integration_tests::put_tasks;
use decaton_processor::{
    async_trait, LiveProperties, ProcessError, ProcessingContext, ProcessorProperties, RetryConfig,
    Subscription, TaskProcessor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{wait_until, BrokerKind, TestBroker};

/// Counts the tasks of the source topic and of the retry topic.
#[derive(Default)]
struct PerTopic {
    source: AtomicU64,
    retry: AtomicU64,
}

struct CountPerTopic(Arc<PerTopic>);

#[async_trait]
impl TaskProcessor<ChatOp> for CountPerTopic {
    async fn process(&self, ctx: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> {
        match ctx.topic() {
            "scoped" => self.0.source.fetch_add(1, Ordering::SeqCst),
            _ => self.0.retry.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

/// With the source topic stopped from the start, every task waiting in the retry topic
/// is processed and none of the source's; the source's run once its rate is -1 again.
async fn source_rate_0_leaves_retries_running(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 200;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("scoped", 1)?;
    broker.create_topic("scoped-retry", 1)?;
    put_tasks(&bootstrap, kind.producer_settings(), "scoped", 0..TASKS, 10).await?;
    put_tasks(
        &bootstrap,
        kind.producer_settings(),
        "scoped-retry",
        0..TASKS,
        10,
    )
    .await?;
    let live = LiveProperties::new(ProcessorProperties {
        processing_rate_per_partition: 0,
        partition_concurrency: 4,
        ..Default::default()
    });
    let counts = Arc::new(PerTopic::default());
    let sub = Subscription::builder("scoped", CountPerTopic(counts.clone()))
        .bootstrap_servers(&bootstrap)
        .topic("scoped")
        .retry(RetryConfig::new())
        .live_properties(live.clone())
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let retried = wait_until(Duration::from_secs(60), || {
        counts.retry.load(Ordering::SeqCst) >= TASKS
    })
    .await;
    // Nothing of the source may have run while it is stopped.
    let source_while_stopped = counts.source.load(Ordering::SeqCst);
    live.set("decaton.processing.rate.per.partition", "-1")?;
    let resumed = wait_until(Duration::from_secs(60), || {
        counts.source.load(Ordering::SeqCst) >= TASKS
    })
    .await;
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(30), running).await???;
    assert!(
        retried,
        "the retry topic's tasks were held by the source's rate 0: {} of {TASKS} ran",
        counts.retry.load(Ordering::SeqCst)
    );
    assert_eq!(source_while_stopped, 0, "the source ran while stopped");
    assert!(resumed, "the source did not resume at -1");
    assert_eq!(counts.retry.load(Ordering::SeqCst), TASKS);
    Ok(())
}

decaton_integration_tests::broker_tests!(
    source_rate_0_does_not_stop_the_retry_topic,
    crate::source_rate_0_leaves_retries_running
);
