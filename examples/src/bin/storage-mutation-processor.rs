//! `storage-mutation-processor`: applies chat operations to per-user records in storage
//! (operation counts per type, last sequence number) and checks that each user's
//! operations arrive in sequence order, logging any that go backwards or skip ahead.
//! Runs the subscription `storage-mutation-processor`; prints a summary on shutdown.
//!
//! The storage here is in memory; the processor only needs the small `UserStore` trait,
//! so a persistent store drops in without touching it.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin storage-mutation-processor -- --partition-concurrency 8
//! ```

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use decaton_examples::cli::{init_tracing, run_until_signal, SubscriptionArgs};
use decaton_examples::storage::{InMemoryStore, StorageMutationProcessor};
use decaton_processor::{ProcessorProperties, SchedulingMode};

#[derive(Debug, Parser)]
#[command(
    name = "storage-mutation-processor",
    about = "Apply chat operations to storage, checking per-user order"
)]
struct Args {
    #[command(flatten)]
    subscription: SubscriptionArgs,
    /// Lanes per partition (`bounded` mode).
    #[arg(long, default_value_t = 8)]
    partition_concurrency: usize,
    /// Run in `per_key` mode instead of `bounded`.
    #[arg(long)]
    per_key: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("info");
    let args = Args::parse();
    args.subscription.install_metrics()?;
    let processor = StorageMutationProcessor::new(Arc::new(InMemoryStore::default()));
    let mode = if args.per_key {
        SchedulingMode::PerKey
    } else {
        SchedulingMode::Bounded
    };
    let properties = args.subscription.properties(ProcessorProperties {
        mode,
        partition_concurrency: args.partition_concurrency.max(1),
        ..Default::default()
    })?;
    // The processor moves into the subscription; a clone shares its store and counters.
    let observer = processor.clone();
    let subscription = args
        .subscription
        .builder("storage-mutation-processor", processor)
        .properties(properties)
        .build()?;
    run_until_signal(
        subscription,
        Duration::from_secs(args.subscription.stats_interval),
    )
    .await?;
    println!("{}", observer.summary()?);
    Ok(())
}
