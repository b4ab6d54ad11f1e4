//! `search-indexer`: indexes chat messages, profiles and room memberships in bulk. Runs
//! the subscription `search-indexer` as a service (`examples/config/search-indexer.toml`:
//! `bounded` mode with 4 lanes per partition, metrics and health on port 9462). Each searchable task is *deferred*: `process` queues the document and
//! returns, and a batch indexer completes the tasks when its bulk request (sent every
//! `--flush-interval-ms` or every `--max-batch` documents) is done. Offsets are committed
//! only below completed tasks, so documents waiting in a batch are never lost.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin search-indexer -- --config examples/config/search-indexer.toml
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use decaton_examples::cli::{exit_code, ServiceArgs};
use decaton_examples::indexer::{IndexerConfig, SearchIndexer};

#[derive(Debug, Parser)]
#[command(
    name = "search-indexer",
    about = "Bulk search indexing with deferred completion (bounded mode), as a service"
)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
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
async fn main() -> ExitCode {
    exit_code(run().await)
}

async fn run() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let mut service = args.service.start("search-indexer").await?;
    let id = args
        .service
        .subscription_id(service.config(), "search-indexer")?;
    let (indexer, batcher) = SearchIndexer::start(IndexerConfig {
        flush_interval: Duration::from_millis(args.flush_interval_ms),
        max_batch: args.max_batch.max(1),
        bulk_latency: Duration::from_millis(args.bulk_latency_ms),
    });
    let stats = indexer.stats();
    let subscription = service.subscription(&id, indexer)?.build()?;
    service.add(subscription);
    // The subscription waits for deferred tasks while shutting down, so the batch indexer
    // must keep flushing until the service has stopped.
    let exit = service.run().await;
    batcher.stop().await;
    println!("{}", stats.summary());
    Ok(exit.exit_code())
}
