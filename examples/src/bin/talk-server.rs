//! `talk-server`: a chat server's side of the queue. Generates realistic chat operations
//! for `--users` users (random operation types and targets, per-user increasing sequence
//! numbers) and enqueues `--count` of them on `--topic`, keyed by user id, at most
//! `--rate` per second. Prints progress every second and the final puts/s.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin talk-server -- \
//!     --bootstrap 127.0.0.1:9092 --users 1000 --rate 2000 --count 100000
//! ```

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use decaton_client::TaskClient;
use decaton_examples::chat::ChatOpGenerator;
use decaton_examples::cli::{init_tracing, parse_key_value, shutdown_signal};
use decaton_protocol::ChatOp;
use futures::StreamExt as _;
use governor::{Quota, RateLimiter};

#[derive(Debug, Parser)]
#[command(
    name = "talk-server",
    about = "Enqueue realistic chat operations as decaton tasks"
)]
struct Args {
    /// Kafka bootstrap servers (required: the flag or `DECATON_BOOTSTRAP`).
    #[arg(
        short = 'b',
        long,
        env = "DECATON_BOOTSTRAP",
        value_name = "HOST:PORT[,HOST:PORT...]"
    )]
    bootstrap: String,
    /// Topic to enqueue on.
    #[arg(long, default_value = "chat-ops")]
    topic: String,
    /// Number of distinct users (keys).
    #[arg(long, default_value_t = 1_000)]
    users: u64,
    /// Operations per second (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Operations to enqueue in total.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Most puts awaiting the broker's acknowledgement at once.
    #[arg(long, default_value_t = 5_000)]
    in_flight: usize,
    /// Seed of the operation generator (same seed, same operations).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// First sequence number of every user. This server forgets its counters when it
    /// exits; to enqueue more for processors that already saw a run, pass a base above
    /// that run's sequences (e.g. its --count) so each user's sequence keeps increasing.
    #[arg(long, default_value_t = 0)]
    sequence_base: u64,
    /// A librdkafka producer property passed through verbatim (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    kafka: Vec<(String, String)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing("info");
    let args = Args::parse();
    let mut builder = TaskClient::<ChatOp>::builder(&args.bootstrap, &args.topic)
        .application_id("talk-server")
        .instance_id(format!("talk-server-{}", std::process::id()));
    for (k, v) in &args.kafka {
        builder = builder.set(k, v);
    }
    let client = builder.build().context("creating the task client")?;

    // A burst of at most 1/20 s worth of operations, so the rate holds from the first second.
    let limiter = NonZeroU32::new(args.rate).map(|r| {
        let burst = NonZeroU32::new(r.get() / 20).unwrap_or(NonZeroU32::MIN);
        RateLimiter::direct(Quota::per_second(r).allow_burst(burst))
    });
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if shutdown_signal().await.is_ok() {
                tracing::info!("signal received; finishing the puts in flight");
            }
            stop.store(true, Ordering::Release);
        });
    }

    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let acked = acked.clone();
        let count = args.count;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = acked.load(Ordering::Relaxed);
                println!("put {now}/{count} ({}/s)", now - last);
                last = now;
            }
        })
    };

    // Operations are generated (and thus sequenced) in order and handed to the client in
    // that order, so each user's operations land in their partition in sequence order.
    let mut chat =
        ChatOpGenerator::new(args.users, args.seed).with_sequence_base(args.sequence_base);
    let (client_ref, limiter, stop_ref) = (&client, &limiter, &stop);
    futures::stream::iter(0..args.count)
        .take_while(|_| futures::future::ready(!stop_ref.load(Ordering::Acquire)))
        .map(move |_| chat.next_op())
        .then(|op| async move {
            if let Some(limiter) = limiter {
                limiter.until_ready().await;
            }
            op
        })
        .map(|op| async move { client_ref.put(op.user_id.as_str(), &op).await })
        .buffered(args.in_flight.max(1))
        .for_each(|result| {
            match result {
                Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!("put failed: {e}");
                    failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            futures::future::ready(())
        })
        .await;
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    let (acked, failed) = (
        acked.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!(
        "done: {acked} puts acknowledged, {failed} failed in {elapsed:.2}s = {:.0} puts/s",
        acked as f64 / elapsed.max(1e-9)
    );
    client.close().await.context("flushing the producer")?;
    if failed > 0 {
        anyhow::bail!("{failed} puts failed");
    }
    Ok(())
}
