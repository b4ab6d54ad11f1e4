//! `storage-mutation-processor`: applies chat operations to per-user records in storage
//! (operation counts per type, last sequence number) and checks that each user's
//! operations arrive in sequence order, logging any that go backwards or skip ahead.
//! Runs the subscription `storage-mutation-processor` as a service
//! (`examples/config/storage-mutation-processor.toml`: `bounded` mode with 8 lanes per
//! partition, metrics and health on port 9463); prints a summary on shutdown.
//!
//! The storage here is in memory; the processor only needs the small `UserStore` trait,
//! so a persistent store drops in without touching it. `--storage-down-file PATH` makes
//! storage unreachable while that file exists: the processor retries, falls behind and
//! reports not ready, and catches up once the file is gone.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin storage-mutation-processor -- --config examples/config/storage-mutation-processor.toml
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use decaton_examples::cli::{exit_code, ServiceArgs};
use decaton_examples::storage::{
    outage_while_file_exists, FlakyStore, InMemoryStore, StorageMutationProcessor,
};

#[derive(Debug, Parser)]
#[command(
    name = "storage-mutation-processor",
    about = "Apply chat operations to storage, checking per-user order, as a service"
)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Storage is unreachable while this file exists (to try an outage: `touch` it, then
    /// remove it).
    #[arg(long, value_name = "PATH")]
    storage_down_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run().await)
}

async fn run() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let mut service = args.service.start("storage-mutation-processor").await?;
    let id = args
        .service
        .subscription_id(service.config(), "storage-mutation-processor")?;
    let store = FlakyStore::new(InMemoryStore::default());
    let watcher = args
        .storage_down_file
        .map(|path| outage_while_file_exists(path, store.switch()));
    let processor = StorageMutationProcessor::new(Arc::new(store));
    // The processor moves into the subscription; a clone shares its store and counters.
    let observer = processor.clone();
    let subscription = service.subscription(&id, processor)?.build()?;
    service.add(subscription);
    let exit = service.run().await;
    if let Some(w) = watcher {
        w.abort();
    }
    println!("{}", observer.summary()?);
    Ok(exit.exit_code())
}
