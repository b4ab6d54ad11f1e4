//! `decaton bench matrix`: every runner at every simulated latency, on one cluster, with
//! the results written as JSON (`matrix.json`) and drawn as a chart (`matrix.png`):
//! throughput per runner over the latencies, and the share of the ideal throughput it
//! reaches.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bench::run_bench_on;
use crate::cluster::Cluster;
use crate::config::{shell_quote, BenchConfig, RunnerSpec, Workload};
use crate::report::BenchReport;
use crate::{chart, BenchError};

/// Configuration of a matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixConfig {
    /// Simulated latencies, ms.
    pub latencies_ms: Vec<u64>,
    /// Runners, each with its parameters.
    pub runners: Vec<RunnerSpec>,
    /// The workload of every cell.
    pub workload: Workload,
    /// Where `matrix.json` and `matrix.png` go.
    pub out_dir: PathBuf,
}

impl MatrixConfig {
    /// The command line that reproduces the whole matrix.
    pub fn command_line(&self) -> String {
        let lat: Vec<String> = self.latencies_ms.iter().map(u64::to_string).collect();
        let mut parts = vec![
            "decaton bench matrix".to_string(),
            format!("--latencies {}", lat.join(",")),
        ];
        for r in &self.runners {
            parts.push(format!("--runner {}", shell_quote(&r.to_string())));
        }
        parts.extend(self.workload.flags());
        parts.push(format!(
            "--out-dir {}",
            shell_quote(&self.out_dir.display().to_string())
        ));
        parts.join(" ")
    }
}

/// The result of a matrix: what `matrix.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixReport {
    /// The command that reproduces the matrix.
    pub command: String,
    /// Simulated latencies, ms (the chart's x axis).
    pub latencies_ms: Vec<u64>,
    /// Runner labels (the chart's series), in order.
    pub runners: Vec<String>,
    /// One report per (latency, runner), latency-major.
    pub entries: Vec<BenchReport>,
    /// Where the JSON was written.
    pub json_path: PathBuf,
    /// Where the chart was written.
    pub chart_path: PathBuf,
}

impl MatrixReport {
    /// The report of `runner` (a label) at `latency_ms`.
    pub fn entry(&self, runner: &str, latency_ms: u64) -> Option<&BenchReport> {
        self.entries
            .iter()
            .find(|e| e.name == runner && e.simulate_latency_ms == Some(latency_ms))
    }

    /// Draws the chart of this report into a PNG at `path` (for example again, from a
    /// `matrix.json` read back).
    pub fn render_chart(&self, path: &Path) -> Result<(), BenchError> {
        chart::render(self, path)
    }

    /// Human-readable table, then each cell's reproducing command.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{:<48} {:>8} {:>12} {:>9} {:>11} {:>10}\n",
            "runner", "latency", "tasks/s", "% ideal", "p99 ms", "cpu µs/t"
        );
        for e in &self.entries {
            let s = &e.summary;
            let pct = s
                .pct_of_ideal
                .map(|p| format!("{p:.1}"))
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{:<48} {:>6}ms {:>12.1} {:>9} {:>11.1} {:>10.1}\n",
                e.name,
                e.simulate_latency_ms.unwrap_or(0),
                s.throughput_per_sec,
                pct,
                s.latency_ms.p99,
                s.cpu_micros_per_task
            ));
        }
        out.push_str(&format!(
            "\nwrote {} and {}\n",
            self.json_path.display(),
            self.chart_path.display()
        ));
        out.push_str(&format!("reproduce: {}\n", self.command));
        for e in &self.entries {
            out.push_str(&format!("  cell: {}\n", e.command));
        }
        out
    }
}

/// Runs every (latency, runner) cell on one cluster, then writes `matrix.json` and
/// `matrix.png` into `out_dir`.
pub async fn run_matrix(config: &MatrixConfig) -> Result<MatrixReport, BenchError> {
    if config.latencies_ms.is_empty() || config.runners.is_empty() {
        return Err(BenchError::Config(
            "a matrix needs at least one latency and one runner".into(),
        ));
    }
    std::fs::create_dir_all(&config.out_dir).map_err(|e| BenchError::Io {
        path: config.out_dir.clone(),
        source: e,
    })?;
    let cluster = Cluster::start(config.workload.bootstrap.as_deref()).await?;
    let mut entries = Vec::new();
    for &latency in &config.latencies_ms {
        for runner in &config.runners {
            let cell = BenchConfig {
                runner: runner.clone(),
                simulate_latency: Duration::from_millis(latency),
                workload: config.workload.clone(),
            };
            entries.push(run_bench_on(&cluster, &cell).await?);
        }
    }
    let report = MatrixReport {
        command: config.command_line(),
        latencies_ms: config.latencies_ms.clone(),
        runners: config.runners.iter().map(RunnerSpec::label).collect(),
        entries,
        json_path: config.out_dir.join("matrix.json"),
        chart_path: config.out_dir.join("matrix.png"),
    };
    write_json(&report.json_path, &report)?;
    chart::render(&report, &report.chart_path)?;
    Ok(report)
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), BenchError> {
    let json =
        serde_json::to_string_pretty(value).map_err(|e| BenchError::Internal(e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|e| BenchError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}
