//! `notification-processor`: sends a (simulated) push notification for every
//! `SEND_MESSAGE` chat operation and ignores the rest. Runs the subscription
//! `notification-processor` in `per_key` mode: every user with pending work gets a lane,
//! so thousands of notifications wait on the push gateway at once while each user's
//! notifications still go out in order.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin notification-processor -- --bootstrap 127.0.0.1:9092
//! ```

use std::time::Duration;

use clap::Parser;
use decaton_examples::cli::{init_tracing, run_until_signal, SubscriptionArgs};
use decaton_examples::notification::NotificationProcessor;
use decaton_processor::{ProcessorProperties, SchedulingMode};

#[derive(Debug, Parser)]
#[command(
    name = "notification-processor",
    about = "Push notifications for chat messages (per_key mode)"
)]
struct Args {
    #[command(flatten)]
    subscription: SubscriptionArgs,
    /// Shortest simulated push call, in milliseconds.
    #[arg(long, default_value_t = 2)]
    min_latency_ms: u64,
    /// Longest simulated push call, in milliseconds.
    #[arg(long, default_value_t = 8)]
    max_latency_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("info");
    let args = Args::parse();
    args.subscription.install_metrics()?;
    let processor = NotificationProcessor::new(
        args.min_latency_ms..=args.max_latency_ms.max(args.min_latency_ms),
    );
    let stats = processor.stats();
    let properties = args.subscription.properties(ProcessorProperties {
        mode: SchedulingMode::PerKey,
        ..Default::default()
    })?;
    let subscription = args
        .subscription
        .builder("notification-processor", processor)
        .properties(properties)
        .build()?;
    run_until_signal(
        subscription,
        Duration::from_secs(args.subscription.stats_interval),
    )
    .await?;
    println!("{}", stats.summary());
    Ok(())
}
