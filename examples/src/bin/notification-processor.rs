//! `notification-processor`: sends a (simulated) push notification for every
//! `SEND_MESSAGE` chat operation and ignores the rest. Runs the subscription
//! `notification-processor` as a service (`examples/config/notification-processor.toml`:
//! `per_key` mode, metrics and health on port 9461): every user with pending work gets a lane,
//! so thousands of notifications wait on the push gateway at once while each user's
//! notifications still go out in order.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin notification-processor -- --config examples/config/notification-processor.toml
//! ```

use std::process::ExitCode;

use clap::Parser;
use decaton_examples::cli::{exit_code, ServiceArgs};
use decaton_examples::notification::NotificationProcessor;

#[derive(Debug, Parser)]
#[command(
    name = "notification-processor",
    about = "Push notifications for chat messages (per_key mode), as a service"
)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Shortest simulated push call, in milliseconds.
    #[arg(long, default_value_t = 2)]
    min_latency_ms: u64,
    /// Longest simulated push call, in milliseconds.
    #[arg(long, default_value_t = 8)]
    max_latency_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run().await)
}

async fn run() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let mut service = args.service.start("notification-processor").await?;
    let id = args
        .service
        .subscription_id(service.config(), "notification-processor")?;
    let processor = NotificationProcessor::new(
        args.min_latency_ms..=args.max_latency_ms.max(args.min_latency_ms),
    );
    let stats = processor.stats();
    let subscription = service.subscription(&id, processor)?.build()?;
    service.add(subscription);
    let exit = service.run().await;
    println!("{}", stats.summary());
    Ok(exit.exit_code())
}
