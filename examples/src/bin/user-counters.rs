//! `user-counters`: counts every user's chat operations — per operation type and in
//! total — and remembers the time of the user's latest operation, in partition-local
//! state that follows its partition. Runs the subscription `user-counters`.
//!
//! The counters live in the subscription's state store (`--state-dir`, sled by default):
//! one local store per source partition, every task's writes appended to the changelog
//! topic `user-counters-state-changelog` when the task completes. Another instance that
//! takes a partition over (a rebalance, a crashed host) replays that changelog partition
//! before it runs the partition's first task, and a restarted instance with the same
//! state directory replays only the changelog's tail. See
//! [`decaton_examples::counters`] for the key layout.
//!
//! The changelog topic needs as many partitions as the source topic. On Kafka (or
//! Tansu) the runtime creates it; the embedded mock cluster of `decaton dev-broker`
//! cannot, so create it there yourself:
//!
//! ```text
//! cargo run --release -p decaton-cli -- dev-broker --topic chat-ops:6 --topic user-counters-state-changelog:6
//! cargo run --release -p decaton-examples --bin user-counters -- --state-dir ./decaton-state
//! cargo run --release -p decaton-examples --bin user-counters -- --dump user-42   # after stopping it
//! ```
//!
//! On shutdown (Ctrl-C or SIGTERM) it prints the top `--top` users read back from the
//! state directory; `--dump USER` prints one user's counters from a stopped instance's
//! state directory without contacting Kafka.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use decaton_examples::cli::{init_tracing, run_until_signal, SubscriptionArgs};
use decaton_examples::counters::{count_state_dir, UserCountersProcessor, SUBSCRIPTION};
use decaton_processor::ProcessorProperties;
use decaton_state::{changelog_topic, Backend, StateConfig};

/// Where the local state lives.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    /// A sled database per partition under `--state-dir`; survives restarts.
    Sled,
    /// In memory: every start restores the whole changelog; nothing left to read after.
    Memory,
}

#[derive(Debug, Parser)]
#[command(
    name = "user-counters",
    about = "Per-user operation counters in partition-local state with a changelog"
)]
struct Args {
    #[command(flatten)]
    subscription: SubscriptionArgs,
    /// Directory of the local state stores.
    #[arg(long, default_value = "./decaton-state")]
    state_dir: PathBuf,
    /// Local storage backend of the state.
    #[arg(long, value_enum, default_value = "sled")]
    backend: BackendArg,
    /// Print this user's counters from the state directory and exit (stop the running
    /// instance first: it holds the stores' locks).
    #[arg(long, value_name = "USER")]
    dump: Option<String>,
    /// How many users the shutdown summary lists.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    init_tracing("info");
    let args = Args::parse();
    let state = StateConfig {
        state_dir: args.state_dir.clone(),
        backend: match args.backend {
            BackendArg::Sled => Backend::Sled,
            BackendArg::Memory => Backend::Memory,
        },
        ..Default::default()
    };
    let topic = args.subscription.topic.clone();

    if let Some(user) = &args.dump {
        let (cfg, topic) = (state.clone(), topic.clone());
        let dump = tokio::task::spawn_blocking(move || count_state_dir(&cfg, SUBSCRIPTION, &topic))
            .await??;
        for (p, why) in &dump.discarded {
            eprintln!("partition {p} not read: {why}");
        }
        return Ok(match dump.users.get(user) {
            Some(c) => {
                println!("{user}: {}", c.describe());
                ExitCode::SUCCESS
            }
            None => {
                println!(
                    "{user}: no counters in {} (partitions read: {:?})",
                    args.state_dir.display(),
                    dump.partitions
                );
                ExitCode::FAILURE
            }
        });
    }

    args.subscription.install_metrics()?;
    let properties = args
        .subscription
        .properties(ProcessorProperties::default())?;
    tracing::info!(
        state_dir = %state.state_dir.display(),
        backend = ?state.backend,
        changelog = %changelog_topic(SUBSCRIPTION, &state.store_name),
        "state store configured"
    );
    let subscription = args
        .subscription
        .builder(SUBSCRIPTION, UserCountersProcessor::new())
        .properties(properties)
        .state_store(state.clone())
        .build()?;
    let stats = run_until_signal(
        subscription,
        Duration::from_secs(args.subscription.stats_interval),
    )
    .await?;
    println!(
        "state: {} changelog records restored, {} failed state writes",
        stats.state_records_restored, stats.state_write_failures
    );

    match state.backend {
        Backend::Memory => {
            println!("memory backend: nothing left on disk; the changelog holds the counters")
        }
        Backend::Sled => {
            let top = args.top;
            let summary =
                tokio::task::spawn_blocking(move || count_state_dir(&state, SUBSCRIPTION, &topic))
                    .await?;
            match summary {
                Ok(dump) => println!("{}", dump.summary(top)),
                Err(e) => eprintln!("cannot read the state back: {e:#}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
