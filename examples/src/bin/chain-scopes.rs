//! `chain-scopes`: a processor chain whose stages have different scopes, and the number
//! of lanes changed while it runs.
//!
//! On an embedded broker, chat operations go through four stages:
//!
//! 1. `SkipReads` (one shared instance): read receipts need no presence update; they
//!    complete here and go no further.
//! 2. [`Compaction`] with [`PassOn`]: of one user's operations within 200 ms only the
//!    newest matters; the others complete as superseded, the survivors go on.
//! 3. `PartitionPresence` (one instance per partition): counts its partition's presence
//!    updates in plain atomics, shared with no other partition; dropped (and reports)
//!    when its partition is revoked or the subscription stops.
//! 4. `LaneWriter` (one instance per lane): the "writer" of one lane, never called
//!    concurrently; made anew when the lanes change.
//!
//! The first half of the operations runs on one lane per partition. Then
//! `decaton.partition.concurrency` goes to `--lanes-after` through the subscription's
//! [`LiveProperties`] (a property file would do the same, see `FileProperties`), and the
//! second half runs on the new lanes, with new lane writers.
//!
//! ```text
//! cargo run -p decaton-examples --bin chain-scopes -- --tasks 20000 --users 500
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Parser;
use decaton_client::TaskClient;
use decaton_processor::{
    async_trait, BatchedTask, Chain, Compaction, LiveProperties, PassOn, ProcessError,
    ProcessingContext, ProcessorProperties, ProcessorScope, Subscription, Survivor, TaskProcessor,
};
use decaton_protocol::{ChatOp, OpType};
use decaton_testkit::{wait_until, BrokerKind, TestBroker};
use futures::StreamExt as _;

#[derive(Debug, Parser)]
#[command(name = "chain-scopes", about = "a processor chain with scoped stages")]
struct Args {
    /// Chat operations to enqueue.
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Distinct users (keys).
    #[arg(long, default_value_t = 500)]
    users: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Lanes per partition after the change (from 1).
    #[arg(long, default_value_t = 4)]
    lanes_after: usize,
}

/// Where each operation ended.
#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    superseded: AtomicU64,
    written: AtomicU64,
}

struct SkipReads(Arc<Tally>);

#[async_trait]
impl TaskProcessor<ChatOp> for SkipReads {
    async fn process(&self, ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
        if op.op() == OpType::Read {
            self.0.reads.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        ctx.push(op).await
    }
}

#[derive(Default)]
struct PartitionPresence {
    partition: OnceLock<i32>,
    updates: AtomicU64,
}

#[async_trait]
impl TaskProcessor<ChatOp> for PartitionPresence {
    async fn process(&self, ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
        self.partition.get_or_init(|| ctx.partition());
        self.updates.fetch_add(1, Ordering::Relaxed);
        ctx.push(op).await
    }
}

impl Drop for PartitionPresence {
    fn drop(&mut self) {
        if let Some(p) = self.partition.get() {
            println!(
                "partition {p}: {} presence updates",
                self.updates.load(Ordering::Relaxed)
            );
        }
    }
}

struct LaneWriter {
    tally: Arc<Tally>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for LaneWriter {
    async fn process(&self, _: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> {
        self.tally.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    decaton_examples::cli::init_tracing("warn");
    let args = Args::parse();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("chat-ops", args.partitions)?;

    let tally = Arc::new(Tally::default());
    let lanes_made = Arc::new(AtomicU64::new(0));
    let chain = {
        let superseded = tally.clone();
        let (writer_tally, made) = (tally.clone(), lanes_made.clone());
        Chain::new(SkipReads(tally.clone()))
            .then_process(Compaction::new(
                PassOn,
                Duration::from_millis(200),
                move |kept: &BatchedTask<ChatOp>, arrived: &BatchedTask<ChatOp>| {
                    superseded.superseded.fetch_add(1, Ordering::Relaxed);
                    if arrived.task.sequence > kept.task.sequence {
                        Survivor::Arrived
                    } else {
                        Survivor::Kept
                    }
                },
            ))
            .then_scoped(ProcessorScope::Partition, PartitionPresence::default)
            .then_scoped(ProcessorScope::Lane, move || {
                made.fetch_add(1, Ordering::Relaxed);
                LaneWriter {
                    tally: writer_tally.clone(),
                }
            })
    };
    let live = LiveProperties::new(ProcessorProperties::default());
    let sub = Subscription::builder("presence", chain)
        .bootstrap_servers(&bootstrap)
        .topic("chat-ops")
        .live_properties(live.clone())
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());

    let ended = |t: &Tally| {
        t.reads.load(Ordering::Relaxed)
            + t.superseded.load(Ordering::Relaxed)
            + t.written.load(Ordering::Relaxed)
    };
    let half = args.tasks / 2;
    produce(&bootstrap, 0..half, args.users).await?;
    wait_until(Duration::from_secs(60), || ended(&tally) >= half).await;
    let lanes_before = lanes_made.load(Ordering::Relaxed);
    live.set(
        "decaton.partition.concurrency",
        &args.lanes_after.to_string(),
    )?;
    produce(&bootstrap, half..args.tasks, args.users).await?;
    let done = wait_until(Duration::from_secs(60), || ended(&tally) >= args.tasks).await;
    handle.shutdown();
    let stats = running.await??;
    println!(
        "{} ops: {} reads completed at stage 1, {} superseded by compaction, {} written; \
         lane writers made: {lanes_before} while on 1 lane, {} in all",
        args.tasks,
        tally.reads.load(Ordering::Relaxed),
        tally.superseded.load(Ordering::Relaxed),
        tally.written.load(Ordering::Relaxed),
        lanes_made.load(Ordering::Relaxed),
    );
    println!("processed {} (failed {})", stats.processed, stats.failed);
    anyhow::ensure!(done, "not every operation got through the chain in time");
    Ok(())
}

/// Enqueues operations `range`: operation i is user i % users's number i / users, a
/// message, a read receipt or a room join in turn.
async fn produce(bootstrap: &str, range: std::ops::Range<u64>, users: u64) -> anyhow::Result<()> {
    let client = TaskClient::<ChatOp>::builder(bootstrap, "chat-ops").build()?;
    let ops = [OpType::SendMessage, OpType::Read, OpType::JoinRoom];
    let sent: Vec<_> = futures::stream::iter(range)
        .map(|i| {
            let op = ChatOp {
                user_id: format!("user-{}", i % users),
                op: ops[(i % 3) as usize] as i32,
                sequence: i / users,
                ..Default::default()
            };
            let client = &client;
            async move { client.put(op.user_id.clone(), &op).await }
        })
        .buffered(1_000)
        .collect()
        .await;
    for r in sent {
        r?;
    }
    client.close().await?;
    Ok(())
}
