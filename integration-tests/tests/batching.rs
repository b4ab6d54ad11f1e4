#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! The batching stage end to end: batch sizes and lingering, a task failing inside a
//! batch retried alone, and every task completing exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_integration_tests::put_tasks;
use decaton_processor::{
    async_trait, Backoff, BatchProcessor, BatchedTask, Batching, ProcessorProperties, RetryConfig,
    SchedulingMode, Subscription,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{checker, wait_until, BrokerKind, Processed, TestBroker};
use parking_lot::Mutex;

const CAPACITY: usize = 32;
const LINGER: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Seen {
    /// (size, how long its oldest task waited for the batch to leave).
    batches: Vec<(usize, Duration)>,
    /// Tasks completed successfully: (key, sequence, retry count).
    completed: Vec<(String, u64, i64)>,
    failed_once: u64,
}

struct Bulk(Arc<Mutex<Seen>>);

#[async_trait]
impl BatchProcessor<ChatOp> for Bulk {
    async fn process_batch(&self, batch: Vec<BatchedTask<ChatOp>>) {
        let now = Instant::now();
        let oldest = batch
            .iter()
            .map(|t| now - t.info.enqueued)
            .max()
            .unwrap_or_default();
        let mut seen = self.0.lock();
        seen.batches.push((batch.len(), oldest));
        for t in batch {
            // Every 50th sequence fails the first time, inside its batch.
            if t.task.sequence % 50 == 7 && t.info.metadata.retry_count == 0 {
                seen.failed_once += 1;
                t.fail("bulk item rejected");
            } else {
                seen.completed.push((
                    t.task.user_id.clone(),
                    t.task.sequence,
                    t.info.metadata.retry_count,
                ));
                t.complete();
            }
        }
    }
}

/// Batches never exceed their capacity and never wait much longer than the linger time;
/// a task that fails in a batch is retried alone and succeeds; every task completes
/// successfully exactly once.
async fn batching(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 5_000;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    for t in ["bulk", "bulk-retry"] {
        broker.create_topic(t, 2)?;
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::PerKey;
    props.commit_interval = Duration::from_millis(100);
    let mut builder =
        Subscription::builder("bulk", Batching::new(Bulk(seen.clone()), CAPACITY, LINGER))
            .bootstrap_servers(&bootstrap)
            .topic("bulk")
            .properties(props)
            .retry(RetryConfig::new().backoff(Backoff::fixed(Duration::from_millis(200))));
    for (k, v) in kind.producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let expected = put_tasks(&bootstrap, kind.producer_settings(), "bulk", 0..TASKS, 100).await?;
    wait_until(Duration::from_secs(60), || {
        seen.lock().completed.len() >= TASKS as usize
    })
    .await;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    let seen = seen.lock();
    let largest = seen.batches.iter().map(|b| b.0).max().unwrap_or(0);
    let longest = seen.batches.iter().map(|b| b.1).max().unwrap_or_default();
    let retried_alone = seen.completed.iter().filter(|c| c.2 == 1).count();
    println!(
        "{}: {} batches, largest {largest}, longest wait {longest:?}, {} failed once, {retried_alone} retried alone; {stats:?}",
        kind.name(),
        seen.batches.len(),
        seen.failed_once
    );
    let log: Vec<Processed> = seen
        .completed
        .iter()
        .map(|(k, s, _)| Processed {
            key: k.clone(),
            sequence: *s,
            instance: "i".into(),
        })
        .collect();
    let report = checker::check(&expected, &log);
    assert_eq!(report.lost_count, 0, "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert!(
        largest <= CAPACITY,
        "a batch of {largest} > capacity {CAPACITY}"
    );
    assert!(largest == CAPACITY, "no batch ever filled up: {largest}");
    // Linger plus one poll of the consumer loop (50 ms) plus scheduling slack.
    assert!(
        longest <= LINGER + Duration::from_millis(150),
        "a task waited {longest:?} for its batch (linger {LINGER:?})"
    );
    assert_eq!(seen.failed_once, TASKS / 50);
    assert_eq!(retried_alone as u64, TASKS / 50);
    assert_eq!(stats.retried, TASKS / 50);
    Ok(())
}
decaton_integration_tests::broker_tests!(
    batches_are_bounded_and_failures_retried_alone,
    crate::batching
);
