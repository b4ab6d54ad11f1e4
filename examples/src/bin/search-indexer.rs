//! `search-indexer`: indexes chat messages, profiles and room memberships in bulk. Runs
//! the subscription `search-indexer` in `bounded` mode (`--partition-concurrency` lanes
//! per partition). Each searchable task is *deferred*: `process` queues the document and
//! returns, and a batch indexer completes the tasks when its bulk request (sent every
//! `--flush-interval-ms` or every `--max-batch` documents) is done. Offsets are committed
//! only below completed tasks, so documents waiting in a batch are never lost.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin search-indexer -- --partition-concurrency 4
//! ```

use std::time::Duration;

use clap::Parser;
use decaton_examples::cli::{init_tracing, run_until_signal, SubscriptionArgs};
use decaton_examples::indexer::{IndexerConfig, SearchIndexer};
use decaton_processor::{ProcessorProperties, SchedulingMode};

#[derive(Debug, Parser)]
#[command(
    name = "search-indexer",
    about = "Bulk search indexing with deferred completion (bounded mode)"
)]
struct Args {
    #[command(flatten)]
    subscription: SubscriptionArgs,
    /// Lanes per partition (`decaton.partition.concurrency`).
    #[arg(long, default_value_t = 4)]
    partition_concurrency: usize,
    /// Send a bulk request at least this often (milliseconds).
    #[arg(long, default_value_t = 50)]
    flush_interval_ms: u64,
    /// Send a bulk request as soon as this many documents wait.
    #[arg(long, default_value_t = 500)]
    max_batch: usize,
    /// Simulated duration of one bulk request (milliseconds).
    #[arg(long, default_value_t = 5)]
    bulk_latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("info");
    let args = Args::parse();
    args.subscription.install_metrics()?;
    let (indexer, batcher) = SearchIndexer::start(IndexerConfig {
        flush_interval: Duration::from_millis(args.flush_interval_ms),
        max_batch: args.max_batch.max(1),
        bulk_latency: Duration::from_millis(args.bulk_latency_ms),
    });
    let stats = indexer.stats();
    let properties = args.subscription.properties(ProcessorProperties {
        mode: SchedulingMode::Bounded,
        partition_concurrency: args.partition_concurrency.max(1),
        ..Default::default()
    })?;
    let subscription = args
        .subscription
        .builder("search-indexer", indexer)
        .properties(properties)
        .build()?;
    // The subscription waits for deferred tasks while shutting down, so the batch indexer
    // must keep flushing until `run` has returned.
    let result = run_until_signal(
        subscription,
        Duration::from_secs(args.subscription.stats_interval),
    )
    .await;
    batcher.stop().await;
    println!("{}", stats.summary());
    result.map(|_| ())
}
