//! `quickstart`: decaton-rs end to end in one command, with nothing installed.
//!
//! 1. Starts an embedded Kafka (librdkafka's mock cluster, in this process) and creates
//!    the topic `chat-ops`.
//! 2. Enqueues `--tasks` chat operations for `--users` users, each user's operations
//!    numbered 0, 1, 2, ... in the order the "chat server" produced them.
//! 3. Runs two processors side by side on that topic, each its own subscription:
//!    `notifications` (push notifications, `per_key` mode) and `storage-mutations`
//!    (per-user records, `bounded` mode with `--lanes` lanes per partition). Both record
//!    every task they start.
//! 4. Once both have processed every task, shuts them down gracefully and checks each
//!    record with the testkit's checker: nothing lost, no user's operations out of order.
//!
//! Prints a summary table and exits non-zero if any check fails.
//!
//! ```text
//! cargo run --release -p decaton-examples --bin quickstart
//! cargo run --release -p decaton-examples --bin quickstart -- --tasks 20000 --users 500 --partitions 3
//! ```

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use decaton_client::TaskClient;
use decaton_examples::chat::ChatOpGenerator;
use decaton_examples::cli::{init_tracing, shutdown_signal};
use decaton_examples::notification::NotificationProcessor;
use decaton_examples::recording::{Recorded, Recording};
use decaton_examples::storage::{InMemoryStore, StorageMutationProcessor};
use decaton_processor::{
    ProcessorProperties, SchedulingMode, Subscription, SubscriptionHandle, SubscriptionStats,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{BrokerKind, CheckReport, TestBroker};
use futures::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

const TOPIC: &str = "chat-ops";

#[derive(Debug, Parser)]
#[command(
    name = "quickstart",
    about = "decaton-rs end to end on an embedded broker: produce, process twice, check order"
)]
struct Args {
    /// Chat operations to enqueue.
    #[arg(long, default_value_t = 100_000)]
    tasks: u64,
    /// Distinct users (keys).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Lanes per partition of the bounded-mode subscription.
    #[arg(long, default_value_t = 8)]
    lanes: usize,
    /// Longest simulated push-notification call, in milliseconds (shortest is 1).
    #[arg(long, default_value_t = 3)]
    push_latency_ms: u64,
    /// Give up if processing has not finished after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// One subscription of the demo while it runs.
struct Running {
    id: &'static str,
    mode: String,
    handle: SubscriptionHandle,
    recording: Arc<Recording>,
    bar: ProgressBar,
    task: tokio::task::JoinHandle<Result<SubscriptionStats, decaton_processor::SubscriptionError>>,
    done: bool,
}

impl Running {
    fn all_processed(&self, tasks: u64) -> bool {
        let s = self.handle.stats();
        s.processed + s.failed >= tasks
    }
}

/// A finished subscription's line in the summary.
struct Outcome {
    id: &'static str,
    mode: String,
    stats: SubscriptionStats,
    /// From the start of the subscriptions to the first task (joining the group, getting
    /// partitions, first fetch).
    startup: Option<Duration>,
    /// From the first task to the last one.
    elapsed: Option<Duration>,
    report: CheckReport,
    extra_ok: bool,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.report.ok() && self.stats.failed == 0 && self.extra_ok
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    init_tracing("warn");
    let args = Args::parse();
    anyhow::ensure!(
        args.tasks > 0 && args.users > 0 && args.partitions > 0,
        "--tasks, --users and --partitions must be > 0"
    );
    let instance = format!("quickstart-{}", std::process::id());
    let progress = MultiProgress::with_draw_target(if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });

    // 1. The broker.
    println!(
        "starting the embedded broker (topic {TOPIC}, {} partitions)",
        args.partitions
    );
    let partitions = args.partitions;
    let broker = tokio::task::spawn_blocking(move || -> anyhow::Result<TestBroker> {
        let broker =
            TestBroker::start(BrokerKind::Embedded).context("starting the embedded broker")?;
        broker
            .create_topic(TOPIC, partitions)
            .context("creating the topic")?;
        Ok(broker)
    })
    .await??;
    let bootstrap = broker.bootstrap_servers();

    // 2. The tasks.
    let started = Instant::now();
    let expected = produce(&bootstrap, &args, &progress).await?;
    let produce_secs = started.elapsed().as_secs_f64();
    progress.suspend(|| {
        println!(
            "enqueued {} tasks from {} of {} users in {produce_secs:.2}s ({:.0} puts/s)",
            args.tasks,
            expected.len(),
            args.users,
            args.tasks as f64 / produce_secs.max(1e-9)
        )
    });

    // 3. Two processors, side by side.
    let notifier = NotificationProcessor::new(1..=args.push_latency_ms.max(1));
    let notifier_stats = notifier.stats();
    let storage = StorageMutationProcessor::new(Arc::new(InMemoryStore::default()));
    let storage_observer = storage.clone();
    let mut running = vec![
        start(
            "notifications",
            notifier,
            ProcessorProperties {
                mode: SchedulingMode::PerKey,
                ..Default::default()
            },
            "per_key".into(),
            &bootstrap,
            &instance,
            &args,
            &progress,
        )?,
        start(
            "storage-mutations",
            storage,
            ProcessorProperties {
                mode: SchedulingMode::Bounded,
                partition_concurrency: args.lanes.max(1),
                ..Default::default()
            },
            format!("bounded({})", args.lanes.max(1)),
            &bootstrap,
            &instance,
            &args,
            &progress,
        )?,
    ];
    let names: Vec<&str> = running.iter().map(|r| r.id).collect();
    progress.suspend(|| {
        println!(
            "processing with {} subscriptions: {}",
            names.len(),
            names.join(", ")
        )
    });

    // Wait until both have processed every task, polling their counters (which also
    // drives the progress bars). Ctrl-C / SIGTERM or the timeout end the wait early.
    let processing_started = Instant::now();
    let deadline = tokio::time::sleep(Duration::from_secs(args.timeout_secs));
    let signal = shutdown_signal();
    tokio::pin!(deadline, signal);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut interrupted = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut deadline => {
                interrupted = Some(format!("timed out after {}s", args.timeout_secs));
                break;
            }
            _ = &mut signal => {
                interrupted = Some("interrupted".to_string());
                break;
            }
        }
        for r in &mut running {
            r.bar.set_position(r.handle.stats().processed);
            if !r.done && r.all_processed(args.tasks) {
                r.done = true;
                r.bar.finish();
            }
        }
        if running.iter().all(|r| r.done) {
            break;
        }
        if let Some(r) = running.iter().find(|r| r.task.is_finished()) {
            interrupted = Some(format!("subscription {} stopped early", r.id));
            break;
        }
    }

    // 4. Shut down, check, report.
    for r in &running {
        r.handle.shutdown();
    }
    let mut outcomes = Vec::new();
    for r in running {
        r.bar.abandon();
        let stats = r
            .task
            .await
            .context("subscription task")?
            .with_context(|| format!("subscription {}", r.id))?;
        let report = r.recording.check(&expected);
        let extra_ok = r.id != "storage-mutations" || storage_observer.stats().in_order();
        let span = r.recording.span().filter(|_| r.done);
        let startup = span.map(|(first, _)| first.saturating_duration_since(processing_started));
        let elapsed = span.map(|(first, last)| last.saturating_duration_since(first));
        outcomes.push(Outcome {
            id: r.id,
            mode: r.mode,
            stats,
            startup,
            elapsed,
            report,
            extra_ok,
        });
    }
    tokio::task::spawn_blocking(move || drop(broker)).await?;

    println!();
    print_table(&outcomes, args.tasks);
    println!();
    println!("notifications:     {}", notifier_stats.summary());
    println!("storage-mutations: {}", storage_observer.summary()?);
    for o in outcomes.iter().filter(|o| !o.report.ok()) {
        println!("{} check details: {}", o.id, o.report);
    }
    if let Some(why) = &interrupted {
        println!("\n{why}: not every task was processed");
    }
    let all_ok = interrupted.is_none() && outcomes.iter().all(Outcome::ok);
    println!(
        "\nresult: {}",
        if all_ok {
            "OK (every task processed, every user's operations in order)"
        } else {
            "FAILED"
        }
    );
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Enqueues `args.tasks` generated operations and returns key -> operations per key.
async fn produce(
    bootstrap: &str,
    args: &Args,
    progress: &MultiProgress,
) -> anyhow::Result<HashMap<String, u64>> {
    let bar = progress.add(ProgressBar::new(args.tasks));
    bar.set_style(bar_style());
    bar.set_prefix("enqueue");
    let client = TaskClient::<ChatOp>::builder(bootstrap, TOPIC)
        .application_id("quickstart")
        .instance_id("talk-server-1")
        .build()
        .context("creating the task client")?;
    let mut chat = ChatOpGenerator::new(args.users, 42);
    let client_ref = &client;
    // Generated (and so sequenced) in order and handed to the producer in that order.
    let mut puts = futures::stream::iter(0..args.tasks)
        .map(|_| chat.next_op())
        .map(|op| async move { client_ref.put(op.user_id.as_str(), &op).await })
        .buffered(5_000);
    while let Some(result) = puts.next().await {
        result.context("enqueueing a task")?;
        bar.inc(1);
    }
    drop(puts);
    client.close().await.context("flushing the producer")?;
    bar.finish_and_clear();
    progress.remove(&bar);
    Ok(chat.expected_counts())
}

/// Builds a subscription running `processor` (recorded) and spawns it.
#[allow(clippy::too_many_arguments)]
fn start<P>(
    id: &'static str,
    processor: P,
    properties: ProcessorProperties,
    mode: String,
    bootstrap: &str,
    instance: &str,
    args: &Args,
    progress: &MultiProgress,
) -> anyhow::Result<Running>
where
    P: decaton_processor::TaskProcessor<ChatOp>,
{
    let recording = Arc::new(Recording::with_capacity(args.tasks as usize));
    let subscription =
        Subscription::builder(id, Recorded::new(processor, instance, recording.clone()))
            .bootstrap_servers(bootstrap)
            .topic(TOPIC)
            .properties(properties)
            .build()?;
    let handle = subscription.handle();
    let bar = progress.add(ProgressBar::new(args.tasks));
    bar.set_style(bar_style());
    bar.set_prefix(id);
    let task = tokio::spawn(subscription.run());
    Ok(Running {
        id,
        mode,
        handle,
        recording,
        bar,
        task,
        done: false,
    })
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>18.bold} [{bar:40}] {human_pos:>7}/{human_len} {elapsed:>4}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The summary table. `startup` is the time until the first task ran (joining the group,
/// getting partitions, first fetch); `elapsed` and `tasks/s` cover the processing from
/// the first task to the last.
fn print_table(outcomes: &[Outcome], tasks: u64) {
    println!(
        "{:<18} {:<11} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>6} {:>6}  check",
        "subscription",
        "mode",
        "tasks",
        "startup",
        "elapsed",
        "tasks/s",
        "failed",
        "lost",
        "dups",
        "order"
    );
    let secs =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
    for o in outcomes {
        let rate = o.elapsed.map_or("-".to_string(), |d| {
            format!("{:.0}", tasks as f64 / d.as_secs_f64().max(1e-6))
        });
        println!(
            "{:<18} {:<11} {:>8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>6} {:>6}  {}",
            o.id,
            o.mode,
            o.stats.processed,
            secs(o.startup),
            secs(o.elapsed),
            rate,
            o.stats.failed,
            o.report.lost_count,
            o.report.duplicates,
            o.report.order_violation_count,
            if o.ok() { "OK" } else { "FAILED" }
        );
    }
}
