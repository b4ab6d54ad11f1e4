//! `decaton`: the command-line tool of decaton-rs.
//!
//! * `decaton put` enqueues tasks exactly as a service's `TaskClient` would: one task as
//!   proto3 JSON of any message type (`--descriptor-set` or `--proto`, and `--type`;
//!   the example `ChatOp` by default) or raw bytes from a file, or many as NDJSON on stdin.
//! * `decaton tail` prints a task topic: key, partition, offset, the `dt_meta` metadata,
//!   the other headers and the task as JSON, from a chosen start position, without joining
//!   a consumer group or committing anything.
//! * `decaton lag GROUP --topic T` shows a subscription's committed offset, high
//!   watermark, lag and finished tasks above the commit (from its offset map), per
//!   partition.
//! * `decaton dlq list` summarises a dead-letter topic (count, first and last, reasons);
//!   `decaton dlq replay` puts its tasks back on the topic they came from.
//! * `decaton replicate --config FILE` runs the loopback replicator a TOML file describes.
//! * `decaton dev-broker` runs an in-process Kafka mock cluster for local development.
//! * `decaton bench` runs the benchmark harness (`decaton-bench`).
//! * `decaton config check FILE` validates a processor service's configuration file.
//!
//! Results go to stdout, one line each, so they can be piped; logs go to stderr, filtered
//! by `RUST_LOG` (default `info`).

mod config_check;
mod dev_broker;
mod dlq;
mod lag;
mod offset_map;
mod options;
mod put;
mod replicate;
mod schema;
mod tail;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The `decaton` command line.
#[derive(Debug, Parser)]
#[command(
    name = "decaton",
    version,
    about = "Enqueue, inspect and benchmark decaton-rs tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Enqueue a task (JSON of any protobuf type, or raw bytes), or many from NDJSON on stdin.
    Put(put::PutArgs),
    /// Print the tasks of a topic: key, partition, offset, metadata and task.
    Tail(tail::TailArgs),
    /// Show how far a subscription (consumer group) is behind on a topic, per partition.
    Lag(lag::LagArgs),
    /// Summarise a dead-letter topic, or put its tasks back where they came from.
    Dlq(dlq::DlqArgs),
    /// Replicate a topic into derived topics, as a TOML file describes.
    Replicate(replicate::ReplicateArgs),
    /// Run an embedded Kafka mock cluster until Ctrl-C / SIGTERM.
    DevBroker(dev_broker::DevBrokerArgs),
    /// Run the benchmark harness.
    Bench(decaton_bench::BenchCommand),
    /// Service configuration files: `decaton config check FILE`.
    Config(config_check::ConfigArgs),
}

/// A scalable allocator: tasks are allocated on the consumer thread and freed on tokio
/// workers, which contends on glibc's arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // `config check` reports them itself, against the file.
    if !matches!(cli.command, Command::Config(_)) {
        let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
        for note in decaton_service::config::unknown_variable_notes(names) {
            tracing::warn!("{note}");
        }
    }
    let result = match cli.command {
        // The harness manages its own runtime; it must not start inside ours.
        Command::Bench(cmd) => decaton_bench::run_cli(cmd),
        Command::Config(args) => config_check::run(args),
        command => run_async(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("decaton: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommands that talk to Kafka on a tokio runtime.
fn run_async(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Put(args) => put::run(args).await,
            Command::Tail(args) => tail::run(args).await,
            Command::Lag(args) => lag::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::Replicate(args) => replicate::run(args).await,
            Command::DevBroker(args) => dev_broker::run(args).await,
            Command::Bench(_) | Command::Config(_) => {
                anyhow::bail!("runs outside the tokio runtime")
            }
        }
    })
}

/// Logs (ours and librdkafka's, through the `log` bridge) to stderr.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Fails only if a subscriber is already installed, and then that one is used.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
