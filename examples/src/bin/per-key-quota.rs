//! `per-key-quota`: one busy user does not slow everyone else down.
//!
//! Starts an embedded Kafka with `chat-ops` and `chat-ops-shaping` (same partitions),
//! then puts for 5 s one operation per second for each of 1 000 users, and 50 per second
//! for the user `user-0`. The processor takes 20 ms per operation and gives each user a
//! quota of 10 per second (`decaton.per.key.quota.processing.rate`): the busy user's extra
//! operations are shaped to `chat-ops-shaping` and processed from there, in order, while
//! the others keep their pace. Prints each group's worst wait and the number shaped.
//!
//! ```text
//! cargo run -p decaton-examples --bin per-key-quota
//! ```

use std::sync::Arc;
use std::time::Duration;

use decaton_client::TaskClient;
use decaton_processor::{
    async_trait, ProcessError, ProcessingContext, ProcessorProperties, QuotaAction, QuotaConfig,
    Subscription, TaskProcessor,
};
use decaton_protocol::{now_millis, ChatOp};
use decaton_testkit::{BrokerKind, TestBroker};
use parking_lot::Mutex;

/// Worst produce-to-start wait of the busy user and of the others, and tasks seen.
#[derive(Default)]
struct Waits {
    busy_ms: i64,
    others_ms: i64,
    seen: u64,
    /// Each user's last sequence number, to show the order held.
    last: std::collections::HashMap<String, u64>,
    out_of_order: u64,
}

struct Notifier(Arc<Mutex<Waits>>);

#[async_trait]
impl TaskProcessor<ChatOp> for Notifier {
    async fn process(&self, _: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
        {
            let mut w = self.0.lock();
            let wait = now_millis() - op.created_at_millis;
            if op.user_id == "user-0" {
                w.busy_ms = w.busy_ms.max(wait);
            } else {
                w.others_ms = w.others_ms.max(wait);
            }
            w.seen += 1;
            if let Some(prev) = w.last.insert(op.user_id.clone(), op.sequence) {
                if op.sequence != prev + 1 {
                    w.out_of_order += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // the notification call
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    decaton_examples::cli::init_tracing("warn,librdkafka=off,rdkafka::client=off");
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("chat-ops", 4)?;
    broker.create_topic("chat-ops-shaping", 4)?;

    let props = ProcessorProperties {
        partition_concurrency: 8,
        per_key_quota_processing_rate: 10,
        ..Default::default()
    };
    let waits = Arc::new(Mutex::new(Waits::default()));
    let subscription = Subscription::builder("notifier", Notifier(waits.clone()))
        .bootstrap_servers(&bootstrap)
        .topic("chat-ops")
        .properties(props)
        .per_key_quota(
            QuotaConfig::new()
                .window(Duration::from_secs(1))
                // Shape everyone over quota except the operators' test account.
                .on_over_quota(|usage| {
                    if usage.key == b"operator" {
                        QuotaAction::Process
                    } else {
                        QuotaAction::Shape
                    }
                }),
        )
        .build()?;
    let handle = subscription.handle();
    let running = tokio::spawn(subscription.run());

    // Waits are measured from the put: start once all eight partitions are assigned.
    while handle.stats().assigned_partitions < 8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = TaskClient::<ChatOp>::builder(&bootstrap, "chat-ops").build()?;
    let mut sequence = vec![0u64; 1_000];
    let mut put = 0u64;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    for tick in 0..50u64 {
        every.tick().await; // pacing the load
        let mut ops = Vec::new();
        for user in 0..1_000u64 {
            // Each user once a second (a tenth of them per tick), user-0 five per tick.
            let n = match user {
                0 => 5,
                u if u % 10 == tick % 10 => 1,
                _ => 0,
            };
            for _ in 0..n {
                let s = &mut sequence[user as usize];
                ops.push(ChatOp {
                    user_id: format!("user-{user}"),
                    sequence: *s,
                    created_at_millis: now_millis(),
                    ..Default::default()
                });
                *s += 1;
            }
        }
        put += ops.len() as u64;
        for r in
            futures::future::join_all(ops.iter().map(|op| client.put(op.user_id.clone(), op))).await
        {
            r?;
        }
    }
    client.close().await?;
    while waits.lock().seen < put {
        tokio::time::sleep(Duration::from_millis(200)).await; // polling progress for the demo
    }
    handle.shutdown();
    let stats = running.await??;
    let w = waits.lock();
    println!(
        "{} operations, {} shaped; worst wait: others {} ms, user-0 {} ms; {} out of order",
        put, stats.shaped, w.others_ms, w.busy_ms, w.out_of_order
    );
    Ok(())
}
