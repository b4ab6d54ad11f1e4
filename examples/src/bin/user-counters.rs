//! `user-counters`: counts every user's chat operations — per operation type and in
//! total — and remembers the time of the user's latest operation, in partition-local
//! state that follows its partition. Runs the subscription `user-counters`.
//!
//! It runs as a service (`examples/config/user-counters.toml`: metrics and health on port
//! 9464). The counters live in the subscription's state store (`state.dir` in the file,
//! sled by default):
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
//! cargo run --release -p decaton-examples --bin user-counters -- --config examples/config/user-counters.toml
//! cargo run --release -p decaton-examples --bin user-counters -- --dump user-42   # after stopping it
//! ```
//!
//! On shutdown (Ctrl-C or SIGTERM) it prints the top `--top` users read back from the
//! state directory; `--dump USER` prints one user's counters from a stopped instance's
//! state directory (the file's `state.dir`) without contacting Kafka.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use decaton_examples::cli::{exit_code, ServiceArgs};
use decaton_examples::counters::{count_state_dir, UserCountersProcessor, SUBSCRIPTION};
use decaton_state::{changelog_topic, Backend};

#[derive(Debug, Parser)]
#[command(
    name = "user-counters",
    about = "Per-user operation counters in partition-local state with a changelog, as a service"
)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Print this user's counters from the state directory and exit (stop the running
    /// instance first: it holds the stores' locks).
    #[arg(long, value_name = "USER")]
    dump: Option<String>,
    /// How many users the shutdown summary lists.
    #[arg(long, default_value_t = 10)]
    top: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run().await)
}

async fn run() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let service_config = args.service.load(SUBSCRIPTION)?;
    let id = args
        .service
        .subscription_id(&service_config, SUBSCRIPTION)?;
    let config = service_config
        .subscriptions
        .get(&id)
        .cloned()
        .with_context(|| format!("no [subscriptions.{id}] in the configuration"))?;
    let state = config
        .state
        .clone()
        .with_context(|| format!("[subscriptions.{id}] needs state.dir"))?;
    let topic = config.topic.clone();

    if let Some(user) = &args.dump {
        let (cfg, topic, sub) = (state.clone(), topic.clone(), id.clone());
        let dump =
            tokio::task::spawn_blocking(move || count_state_dir(&cfg, &sub, &topic)).await??;
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
                    state.state_dir.display(),
                    dump.partitions
                );
                ExitCode::FAILURE
            }
        });
    }

    let mut service = decaton_service::Service::start(service_config).await?;
    tracing::info!(
        state_dir = %state.state_dir.display(),
        backend = ?state.backend,
        changelog = %changelog_topic(&id, &state.store_name),
        "state store configured"
    );
    let processor = UserCountersProcessor::new();
    let subscription = service.subscription(&id, processor)?.build()?;
    let handle = subscription.handle();
    service.add(subscription);
    let exit = service.run().await;
    let stats = handle.stats();
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
                tokio::task::spawn_blocking(move || count_state_dir(&state, &id, &topic)).await?;
            match summary {
                Ok(dump) => println!("{}", dump.summary(top)),
                Err(e) => eprintln!("cannot read the state back: {e:#}"),
            }
        }
    }
    Ok(exit.exit_code())
}
