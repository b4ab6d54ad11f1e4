//! The `decaton bench` command line (the `decaton` binary is a thin front over this).
//!
//! ```text
//! decaton bench [--runner decaton|rdkafka-serial|rdkafka-raw] [--param NAME=VALUE]...
//!               [--simulate-latency MS] [WORKLOAD] [--format text|json] [--output FILE]
//! decaton bench matrix --runner NAME[:K=V,K=V]... [--latencies MS,MS,...] [WORKLOAD]
//!               [--out-dir DIR] [--format text|json]
//! decaton bench produce [--producer put|raw-producer]... [WORKLOAD]
//!               [--format text|json] [--output FILE]
//! decaton bench replicate [WORKLOAD] [--format text|json] [--output FILE]
//! decaton bench latency [--load PCT,PCT] [--capacity N] [--runner ...] [--param ...]
//!               [--simulate-latency MS] [WORKLOAD] [--format text|json] [--output FILE]
//!
//! WORKLOAD: [--tasks N] [--warmup N] [--partitions N] [--keys null|unique|N] [--payload-bytes N]
//!           [--bootstrap HOST:PORT] [--runs N] [--in-flight N] [--stall-timeout SECS]
//!           [--producer-param NAME=VALUE]...
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use crate::config::{parse_param, BenchConfig, Keys, RunnerKind, RunnerSpec, Workload};
use crate::matrix::{run_matrix, MatrixConfig};
use crate::produce::{run_produce, ProduceConfig, ProducerKind};
use crate::report::reports_to_text;

/// Arguments of `decaton bench`: a consumer benchmark, or the `matrix` / `produce`
/// subcommand.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    /// `matrix` or `produce`; without one, a single consumer benchmark.
    #[command(subcommand)]
    pub command: Option<BenchSubcommand>,
    /// The single consumer benchmark's arguments.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands of `decaton bench`.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchSubcommand {
    /// Every runner at every simulated latency; writes matrix.json and matrix.png.
    Matrix(MatrixArgs),
    /// Producer throughput: TaskClient::put against a raw rdkafka FutureProducer.
    Produce(ProduceArgs),
    /// Replicator throughput into 3 derived topics, next to a raw rdkafka loop.
    Replicate(crate::replicate::ReplicateArgs),
    /// Latency under load: tasks put at a fixed share of the runner's capacity while it
    /// consumes.
    Latency(LatencyArgs),
}

/// Arguments of `decaton bench latency`.
#[derive(Debug, Clone, Args)]
pub struct LatencyArgs {
    /// Offered loads in percent of the capacity, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "50,90",
        value_name = "PCT,PCT,..."
    )]
    pub load: Vec<u32>,
    /// The runner's capacity in tasks/s [default: measured first with a backlog run].
    #[arg(long)]
    pub capacity: Option<f64>,
    /// The runner, its latency and the workload (`--tasks` per load).
    #[command(flatten)]
    pub run: RunArgs,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Human-readable (progress bars on stderr when it is a terminal).
    #[default]
    Text,
    /// JSON (no progress bars).
    Json,
}

/// The workload flags every benchmark takes.
#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// Measured tasks per run.
    #[arg(long, default_value_t = 10_000)]
    pub tasks: u64,
    /// Tasks processed before measuring starts [default: 10% of --tasks].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Task keys: `null` (no key, as Decaton's benchmark), `unique` (a key per task) or
    /// a number of distinct keys.
    #[arg(long, default_value_t = Keys::Null)]
    pub keys: Keys,
    /// Bytes of payload per task.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Kafka bootstrap servers (or `DECATON_BOOTSTRAP`) [default: start the embedded
    /// mock cluster in-process].
    #[arg(short = 'b', long, env = "DECATON_BOOTSTRAP")]
    pub bootstrap: Option<String>,
    /// Repetitions, each on a fresh topic; the summary is the median.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// Puts in flight while producing.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// librdkafka producer setting NAME=VALUE (repeatable) for every producer the harness
    /// creates, e.g. `batch.num.messages=1` for Tansu 0.6 (which cannot serve a fetch
    /// starting inside a record batch).
    #[arg(long = "producer-param", value_name = "NAME=VALUE", value_parser = parse_param)]
    pub producer_params: Vec<(String, String)>,
    /// Fail a run when no task completes for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub stall_timeout: u64,
}

impl WorkloadArgs {
    fn workload(&self, progress: bool) -> anyhow::Result<Workload> {
        anyhow::ensure!(self.tasks > 0, "--tasks must be at least 1");
        anyhow::ensure!(self.partitions > 0, "--partitions must be at least 1");
        anyhow::ensure!(self.runs > 0, "--runs must be at least 1");
        Ok(Workload {
            tasks: self.tasks,
            warmup: self.warmup.unwrap_or(self.tasks / 10),
            partitions: self.partitions,
            keys: self.keys,
            payload_bytes: self.payload_bytes,
            bootstrap: self.bootstrap.clone(),
            runs: self.runs,
            in_flight: self.in_flight.max(1),
            producer_params: self.producer_params.clone(),
            stall_timeout: Duration::from_secs(self.stall_timeout.max(1)),
            progress,
        })
    }
}

/// Arguments of a single consumer benchmark.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The consumer to benchmark.
    #[arg(long, value_enum, default_value_t = RunnerKind::Decaton)]
    pub runner: RunnerKind,
    /// Runner parameter NAME=VALUE (repeatable): processor properties for `decaton`
    /// (mode, partition_concurrency, max_pending, ...), librdkafka consumer settings
    /// for the rdkafka runners.
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Milliseconds the processor waits per task (a timer precise to about 0.1 ms); 0 = no-op.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub simulate_latency: u64,
    /// Workload.
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the report here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Arguments of `decaton bench matrix`.
#[derive(Debug, Clone, Args)]
pub struct MatrixArgs {
    /// Runner with parameters, NAME[:K=V,K=V] (repeatable), e.g. `rdkafka-serial` or
    /// `decaton:mode=bounded,partition_concurrency=10`.
    #[arg(long = "runner", required = true, value_name = "NAME[:K=V,...]")]
    pub runners: Vec<RunnerSpec>,
    /// Simulated latencies in ms, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1,5,10",
        value_name = "MS,MS,..."
    )]
    pub latencies: Vec<u64>,
    /// Workload of every cell.
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Directory for matrix.json and matrix.png.
    #[arg(long, default_value = "bench-matrix", value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Format of the summary on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Arguments of `decaton bench produce`.
#[derive(Debug, Clone, Args)]
pub struct ProduceArgs {
    /// Producer to measure (repeatable) [default: put and raw-producer].
    #[arg(long = "producer", value_enum)]
    pub producers: Vec<ProducerKind>,
    /// Workload.
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the report here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn emit(text: String, output: Option<&PathBuf>) -> anyhow::Result<()> {
    match output {
        Some(path) => {
            std::fs::write(path, &text)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd.command {
        None => {
            let a = cmd.run;
            let config = BenchConfig {
                runner: RunnerSpec {
                    kind: a.runner,
                    params: a.params,
                },
                simulate_latency: Duration::from_millis(a.simulate_latency),
                workload: a.workload.workload(a.format == Format::Text)?,
            };
            let report = crate::run_bench(&config).await?;
            let text = match a.format {
                Format::Text => report.to_text(),
                Format::Json => json(&report)?,
            };
            emit(text, a.output.as_ref())
        }
        Some(BenchSubcommand::Matrix(a)) => {
            let config = MatrixConfig {
                latencies_ms: a.latencies,
                runners: a.runners,
                workload: a.workload.workload(a.format == Format::Text)?,
                out_dir: a.out_dir,
            };
            let report = run_matrix(&config).await?;
            match a.format {
                Format::Text => print!("{}", report.to_text()),
                Format::Json => print!("{}", json(&report)?),
            }
            Ok(())
        }
        Some(BenchSubcommand::Produce(a)) => {
            let producers = if a.producers.is_empty() {
                vec![ProducerKind::Put, ProducerKind::RawProducer]
            } else {
                a.producers
            };
            let config = ProduceConfig {
                producers,
                workload: a.workload.workload(a.format == Format::Text)?,
            };
            let reports = run_produce(&config).await?;
            let text = match a.format {
                Format::Text => reports_to_text(&reports),
                Format::Json => json(&reports)?,
            };
            emit(text, a.output.as_ref())
        }
        Some(BenchSubcommand::Latency(l)) => {
            anyhow::ensure!(
                l.load.iter().all(|&p| p > 0),
                "--load takes percentages above 0"
            );
            let a = l.run;
            let config = crate::LatencyConfig {
                bench: BenchConfig {
                    runner: RunnerSpec {
                        kind: a.runner,
                        params: a.params,
                    },
                    simulate_latency: Duration::from_millis(a.simulate_latency),
                    workload: a.workload.workload(a.format == Format::Text)?,
                },
                loads: l.load,
                capacity: l.capacity,
            };
            let reports = crate::run_latency(&config).await?;
            let text = match a.format {
                Format::Text => reports_to_text(&reports),
                Format::Json => json(&reports)?,
            };
            emit(text, a.output.as_ref())
        }
        Some(BenchSubcommand::Replicate(a)) => {
            let config = crate::replicate::ReplicateConfig {
                workload: a.workload.workload(false)?,
            };
            let reports = crate::replicate::run_replicate(&config).await?;
            let text = match a.format {
                Format::Text => crate::replicate::replicate_reports_to_text(&reports),
                Format::Json => json(&reports)?,
            };
            emit(text, a.output.as_ref())
        }
    }
}

/// Runs `decaton bench` with parsed arguments, on a tokio runtime of its own (on a
/// separate thread when called from inside a runtime).
pub fn run_cli(cmd: BenchCommand) -> anyhow::Result<()> {
    let block = move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(run(cmd))
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(block)
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("decaton bench panicked")))
        })
    } else {
        block()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(clap::Subcommand)]
    enum Top {
        Bench(BenchCommand),
    }

    fn parse(args: &[&str]) -> Result<BenchCommand, clap::Error> {
        let mut full = vec!["decaton", "bench"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).map(|c| match c.cmd {
            Top::Bench(b) => b,
        })
    }

    #[test]
    fn parses_a_single_benchmark() -> Result<(), clap::Error> {
        let b = parse(&[
            "--runner",
            "rdkafka-serial",
            "--tasks",
            "100",
            "--simulate-latency",
            "10",
            "--param",
            "fetch.wait.max.ms=10",
            "--keys",
            "7",
        ])?;
        assert!(b.command.is_none());
        assert_eq!(b.run.runner, RunnerKind::RdkafkaSerial);
        assert_eq!(
            b.run.params,
            vec![("fetch.wait.max.ms".to_string(), "10".to_string())]
        );
        assert_eq!(b.run.workload.keys, Keys::Distinct(7));
        assert_eq!(b.run.workload.partitions, 3);
        Ok(())
    }

    #[test]
    fn parses_the_subcommands() -> Result<(), clap::Error> {
        let b = parse(&[
            "matrix",
            "--latencies",
            "0,10",
            "--runner",
            "rdkafka-serial",
            "--runner",
            "decaton:mode=per_key",
        ])?;
        let Some(BenchSubcommand::Matrix(m)) = b.command else {
            panic!("not a matrix")
        };
        assert_eq!(m.latencies, vec![0, 10]);
        assert_eq!(m.runners.len(), 2);
        let b = parse(&["produce", "--producer", "put", "--tasks", "5"])?;
        assert!(matches!(b.command, Some(BenchSubcommand::Produce(_))));
        assert!(parse(&["matrix"]).is_err(), "matrix needs --runner");
        assert!(parse(&["--param", "nonsense"]).is_err());
        Ok(())
    }
}
