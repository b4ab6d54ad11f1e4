#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! Deferred completion: completed later, timed out, dropped. None may stall a partition.

use std::sync::Arc;
use std::time::Duration;

use decaton_integration_tests::{broker_tests, produce, wait_committed, Recording};
use decaton_processor::{
    async_trait, Completion, ProcessError, ProcessingContext, ProcessorProperties, SchedulingMode,
    Subscription, TaskProcessor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{BrokerKind, TestBroker};
use parking_lot::Mutex;

/// Offsets % 10: 0 -> drop the Completion; 1 -> keep it forever (times out); 2 -> fail
/// it; otherwise complete it from another task.
struct Deferring {
    rec: Arc<Recording>,
    kept: Arc<Mutex<Vec<Completion>>>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for Deferring {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let completion = ctx.defer();
        match ctx.offset() % 10 {
            0 => drop(completion),
            1 => self.kept.lock().push(completion),
            2 => completion.fail("rejected"),
            _ => {
                tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    completion.complete();
                });
            }
        }
        self.rec.log.lock().push(decaton_testkit::Processed {
            key: task.user_id,
            sequence: task.sequence,
            instance: "i".into(),
        });
        Ok(())
    }
}

async fn deferred(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 500;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("def", 1)?;
    produce(&broker, "def", TASKS, 50).await?;
    let rec = Arc::new(Recording::default());
    let kept = Arc::new(Mutex::new(Vec::new()));
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::PerKey;
    props.commit_interval = Duration::from_millis(100);
    props.deferred_complete_timeout = Some(Duration::from_millis(300));
    let sub = Subscription::builder(
        "def",
        Deferring {
            rec: rec.clone(),
            kept: kept.clone(),
        },
    )
    .bootstrap_servers(broker.bootstrap_servers())
    .topic("def")
    .properties(props)
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    // The partition's position reaches the end: nothing stalled it.
    let bootstrap = broker.bootstrap_servers();
    let pos = wait_committed(
        &bootstrap,
        "def",
        "def",
        TASKS as i64,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        pos,
        Some(TASKS as i64),
        "position stuck; stats {:?}",
        handle.stats()
    );
    let stats = handle.stats();
    handle.shutdown();
    running.await??;
    assert_eq!(rec.count() as u64, TASKS);
    assert_eq!(stats.completions_leaked, TASKS / 10);
    assert_eq!(stats.deferred_timeouts, TASKS / 10);
    assert_eq!(stats.failed, 3 * TASKS / 10);
    // The kept handles saw their tasks time out.
    assert!(kept.lock().iter().all(Completion::is_done));
    Ok(())
}
broker_tests!(dropped_or_late_completions_do_not_stall, super::deferred);
