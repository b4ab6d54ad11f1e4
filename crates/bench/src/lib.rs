//! Benchmark harness after Decaton's (`decaton bench`): how fast a consumer gets through a
//! backlog of tasks, how long tasks wait, and what it costs in CPU and memory — for the
//! decaton-rs runtime and for the rdkafka consumers a user would write without it.
//!
//! # Method
//!
//! Each run creates a fresh topic (`--partitions`, default 3) and **produces every task
//! first** — `--warmup` plus `--tasks` [`ChatOp`](decaton_protocol::ChatOp) records, put
//! with the decaton-rs `TaskClient` — and only then starts the consumer under test (the
//! *runner*) on a fresh consumer group. The runner decodes each task, records that it
//! started, waits `--simulate-latency` ms (a timer precise to about 0.1 ms, not tokio's 1 ms
//! wheel; 0 = no-op), and records that it
//! finished. The first `--warmup` tasks are not measured. Keys ([`Keys`]): by default
//! tasks have no key, as in Decaton's benchmark, so no two tasks constrain each other
//! and the processor spreads them round robin over its lanes; `--keys unique` gives each
//! task a key of its own (hashed to lanes, so lanes get uneven shares), `--keys N` uses
//! N distinct user ids.
//!
//! Runners ([`RunnerKind`]):
//!
//! * `decaton` — the decaton-rs processor runtime, configured by `--param` (`mode`,
//!   `partition_concurrency`, `max_pending`, ... or Decaton's property names);
//! * `rdkafka-serial` — one rdkafka consumer, each partition's tasks one after another,
//!   partitions concurrently: the baseline without the framework;
//! * `rdkafka-raw` — consume and decode, no processing: the ceiling for a no-op processor.
//!
//! By default the cluster is librdkafka's **mock cluster, started in this process**:
//! nothing to install, but the broker's CPU and memory count in this process's figures
//! and it is single-threaded. `--bootstrap` runs against a real cluster instead.
//!
//! # Figures
//!
//! * **Throughput** — measured tasks / length of the measured window. The window opens
//!   when the first measured task (the one after the warmup) starts processing and closes
//!   when the last task finishes, so consumer start-up and group join are outside it and
//!   every measured task lies wholly inside it. With a runner whose concurrency is
//!   larger than the backlog (`per_key` mode, a key per task), the whole backlog runs at
//!   once and the window is little more than one simulated latency: give such runners
//!   many more tasks than `partitions × max_pending`.
//! * **Delivery latency** — from the task's produce timestamp (the `dt_meta`
//!   `timestamp_millis`, which `TaskClient` also sets as the record timestamp; ms
//!   resolution) to the start of its processing; avg, p50, p99 (nearest rank) and max
//!   over the measured tasks. As the whole backlog is produced before the consumer
//!   starts, this is mostly time spent waiting in the backlog: it grows with the task's
//!   position and shrinks with throughput. Compare it between runners on the same
//!   workload, not as an absolute end-to-end latency.
//! * **CPU per task** — user + system CPU time of the whole process
//!   (`getrusage(RUSAGE_SELF)`) over the measured window, divided by the measured tasks.
//!   Producing is finished before the window opens; with the embedded cluster, the mock
//!   broker's work serving the fetches is included.
//! * **Peak RSS** — `ru_maxrss` of the process at the end of the run: a high-water mark
//!   over the whole process lifetime (so later runs of one invocation never report less
//!   than earlier ones), including the embedded broker's copy of the topic.
//! * **% of ideal** — with a simulated latency, throughput as a share of the ideal
//!   `lanes × partitions / latency`, where lanes is the number of tasks of one partition
//!   that may run at once: `partition_concurrency` for `decaton` in `bounded` mode
//!   (default 1, as in Decaton), `max_pending` (default 10000) for `per_key` mode, 1 for
//!   `rdkafka-serial`; `rdkafka-raw` has none. With `--keys N`, at most N tasks run at
//!   once, so the ideal is capped at `N / latency`. Below 100% is the scheduling,
//!   polling and timer overhead. The report gives it twice: against the nominal
//!   latency, and against the mean latency the tasks actually slept (the timer wakes a
//!   little late, more so on a loaded machine), which leaves only the runner's own cost.
//! * **Produce to complete** — like the delivery latency, to the end of processing.
//! * **RSS while running** — the resident set sampled every 100 ms while the runner
//!   runs: the median of the second half (steady, once a backlog is being drained) and
//!   the largest sample.
//!
//! # Producer benchmark
//!
//! `decaton bench produce` measures producing rather than consuming: `TaskClient::put`
//! (`--producer put`) against a raw rdkafka `FutureProducer` sending the same records
//! (`--producer raw-producer`), with `--in-flight` sends outstanding; see [`produce`]'s
//! module docs. Its latency figure is the acknowledgement latency (send to ack).
//!
//! # Latency under load
//!
//! `decaton bench latency --load 50,90` measures the runner's capacity, then puts tasks
//! at 50 % and 90 % of it while the runner consumes (an open loop), and reports the delay
//! from put to processing start and to completion; see [`run_latency`].
//!
//! # Matrix
//!
//! `decaton bench matrix --runner SPEC... --latencies 0,1,5,10` runs every runner at
//! every latency on one cluster, writes `matrix.json` ([`MatrixReport`]) and
//! `matrix.png`: throughput (log scale) and % of ideal over the latencies.
//!
//! Every report carries the command line that reproduces it. Progress bars go to stderr,
//! only in text mode and only when stderr is a terminal.

mod bench;
mod chart;
mod cli;
mod cluster;
mod config;
mod figures;
mod matrix;
mod open_loop;
pub mod produce;
mod progress;
mod recorder;
pub mod replicate;
mod report;
mod runner;
mod timer;

use std::path::PathBuf;
use std::time::Duration;

pub use bench::run_bench;
pub use cli::{
    run_cli, BenchCommand, BenchSubcommand, Format, LatencyArgs, MatrixArgs, ProduceArgs, RunArgs,
    WorkloadArgs,
};
pub use config::{parse_param, BenchConfig, Keys, RunnerKind, RunnerSpec, Workload};
pub use figures::{Figures, LatencyStats, RssSamples};
pub use matrix::{run_matrix, MatrixConfig, MatrixReport};
pub use open_loop::{run_latency, LatencyConfig};
pub use produce::{run_produce, ProduceConfig, ProducerKind};
pub use report::{reports_to_text, BenchReport};

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The benchmark's configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Starting the embedded cluster or creating a topic failed.
    #[error("cluster: {0}")]
    Cluster(String),
    /// Producing the tasks failed.
    #[error("producing tasks: {0}")]
    Client(#[from] decaton_client::ClientError),
    /// librdkafka refused an operation.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A record on the benchmark topic is not a task.
    #[error("undecodable task {0}")]
    Decode(String),
    /// No task finished for too long.
    #[error("stalled: {finished} of {expected} tasks finished, none in the last {idle:?}")]
    Stalled {
        /// Tasks finished.
        finished: u64,
        /// Tasks expected.
        expected: u64,
        /// How long nothing finished.
        idle: Duration,
    },
    /// The runner stopped before every task finished.
    #[error("run ended with {finished} of {expected} tasks finished")]
    Incomplete {
        /// Tasks finished.
        finished: u64,
        /// Tasks expected.
        expected: u64,
    },
    /// The runner is not available in this build.
    #[error("{0}")]
    NotWired(String),
    /// Drawing the chart failed.
    #[error("chart: {0}")]
    Chart(String),
    /// Writing a result file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A bug in the harness.
    #[error("internal: {0}")]
    Internal(String),
}
