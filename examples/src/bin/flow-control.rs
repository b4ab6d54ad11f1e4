//! `flow-control`: a rate limit changed from a property file while running, and writes
//! in batches.
//!
//! Starts an embedded Kafka with `chat-ops` (2 partitions) and a backlog of operations,
//! then runs a subscription whose processor stores operations in batches of at most 50
//! (`Batching`), each batch one call to the (simulated) storage. The subscription reads
//! its live properties from a TOML file that starts with
//! `decaton.processing.rate.per.partition = 100`, so the two partitions process about
//! 200 operations per second; after 3 s the example rewrites the file to `-1`
//! (unlimited), and the backlog drains at full speed without a restart. Prints the rate of
//! each phase and the batch sizes.
//!
//! ```text
//! cargo run -p decaton-examples --bin flow-control [-- --tasks 4000]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_client::TaskClient;
use decaton_processor::{
    async_trait, BatchProcessor, BatchedTask, Batching, FileProperties, ProcessorProperties,
    Subscription,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{BrokerKind, TestBroker};

/// Stores a batch of operations in one call, then completes each.
struct BulkStore {
    stored: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
    largest: Arc<AtomicU64>,
}

#[async_trait]
impl BatchProcessor<ChatOp> for BulkStore {
    async fn process_batch(&self, batch: Vec<BatchedTask<ChatOp>>) {
        tokio::time::sleep(Duration::from_millis(5)).await; // one bulk write
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.largest
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        for task in batch {
            self.stored.fetch_add(1, Ordering::Relaxed);
            task.complete();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    decaton_examples::cli::init_tracing("warn,librdkafka=off,rdkafka::client=off");
    let tasks: u64 = std::env::args()
        .skip_while(|a| a != "--tasks")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(4_000);
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("chat-ops", 2)?;
    let client = TaskClient::<ChatOp>::builder(&bootstrap, "chat-ops").build()?;
    for i in 0..tasks {
        let op = ChatOp {
            user_id: format!("user-{}", i % 100),
            sequence: i,
            ..Default::default()
        };
        client.put(op.user_id.clone(), &op).await?;
    }
    client.close().await?;

    let file = std::env::temp_dir().join(format!("flow-control-{}.toml", std::process::id()));
    std::fs::write(&file, "\"decaton.processing.rate.per.partition\" = 100\n")?;
    let (stored, batches, largest) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let store = BulkStore {
        stored: stored.clone(),
        batches: batches.clone(),
        largest: largest.clone(),
    };
    let subscription = Subscription::builder(
        "bulk-store",
        Batching::new(store, 50, Duration::from_millis(100)),
    )
    .bootstrap_servers(&bootstrap)
    .topic("chat-ops")
    .properties(ProcessorProperties {
        partition_concurrency: 4,
        ..Default::default()
    })
    .property_supplier(FileProperties::new(&file))
    .build()?;
    let handle = subscription.handle();
    let running = tokio::spawn(subscription.run());

    // Phase 1: limited. Measured from the first stored operation.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(Instant::now() < deadline, "nothing processed in 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await; // polling progress for the demo
    }
    let (start, first) = (Instant::now(), stored.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(3)).await; // the limited phase
    let limited = (stored.load(Ordering::Relaxed) - first) as f64 / start.elapsed().as_secs_f64();

    // Phase 2: the file says -1; the running subscription picks it up.
    std::fs::write(&file, "\"decaton.processing.rate.per.partition\" = -1\n")?;
    let (start, first) = (Instant::now(), stored.load(Ordering::Relaxed));
    while stored.load(Ordering::Relaxed) < tasks {
        anyhow::ensure!(Instant::now() < deadline, "backlog not drained in 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await; // polling progress for the demo
    }
    let unlimited = (tasks - first) as f64 / start.elapsed().as_secs_f64();
    handle.shutdown();
    running.await??;
    let _ = std::fs::remove_file(&file);
    println!(
        "{tasks} operations: {limited:.0}/s at rate 100 per partition, {unlimited:.0}/s after the file said -1; \
         {} batches, largest {}",
        batches.load(Ordering::Relaxed),
        largest.load(Ordering::Relaxed)
    );
    Ok(())
}
