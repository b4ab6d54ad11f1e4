//! Reports: one per runner (or producer) with every run's figures, their median, and the
//! command line that reproduces them; rendered as text or JSON.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::{RunnerSpec, Workload};
use crate::figures::Figures;
use crate::produce::ProducerKind;

/// The result of benchmarking one runner (or one producer) on one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Runner label (`decaton(mode=bounded,partition_concurrency=10)`) or producer name.
    pub name: String,
    /// The runner, for consumer benchmarks.
    pub runner: Option<RunnerSpec>,
    /// The producer, for producer benchmarks.
    pub producer: Option<ProducerKind>,
    /// Simulated processing latency in ms (consumer benchmarks).
    pub simulate_latency_ms: Option<u64>,
    /// Tasks that may run at once in one partition, when bounded (what the ideal
    /// throughput is computed from).
    pub lanes: Option<u64>,
    /// The workload.
    pub workload: Workload,
    /// Which cluster it ran against.
    pub broker: String,
    /// The command that reproduces this result.
    pub command: String,
    /// Figures of each run.
    pub runs: Vec<Figures>,
    /// The median of each figure over the runs.
    pub summary: Figures,
}

impl BenchReport {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        runner: Option<RunnerSpec>,
        producer: Option<ProducerKind>,
        consumer: Option<(u64, Option<u64>)>,
        workload: Workload,
        broker: String,
        command: String,
        runs: Vec<Figures>,
    ) -> BenchReport {
        let summary = Figures::median(&runs);
        BenchReport {
            name,
            runner,
            producer,
            simulate_latency_ms: consumer.map(|c| c.0),
            lanes: consumer.and_then(|c| c.1),
            workload,
            broker,
            command,
            runs,
            summary,
        }
    }

    /// Human-readable rendering.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let raw = self
            .runner
            .as_ref()
            .is_some_and(|r| r.kind == crate::RunnerKind::RdkafkaRaw);
        let latency = match self.simulate_latency_ms {
            Some(ms) if ms > 0 && raw => {
                format!("simulated latency {ms} ms (ignored: no processing), ")
            }
            Some(ms) => format!("simulated latency {ms} ms, "),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{}  ({latency}{}; broker: {})",
            self.name,
            self.workload.describe(),
            self.broker
        );
        let latency_name = if self.producer.is_some() {
            "ack latency"
        } else {
            "delivery latency"
        };
        let many = self.runs.len() > 1;
        for (i, f) in self.runs.iter().enumerate() {
            write_figures(&mut out, &format!("run {}", i + 1), f, latency_name);
        }
        if many {
            write_figures(&mut out, "median", &self.summary, latency_name);
        }
        let _ = writeln!(out, "  reproduce: {}", self.command);
        out
    }
}

fn write_figures(out: &mut String, title: &str, f: &Figures, latency_name: &str) {
    let mut ideal = match (f.ideal_throughput_per_sec, f.pct_of_ideal) {
        (Some(i), Some(p)) => format!(" = {p:.1}% of ideal {i:.1}/s"),
        _ => String::new(),
    };
    if let (Some(a), Some(p)) = (f.simulated_latency_achieved_ms, f.pct_of_ideal_achieved) {
        let _ = write!(ideal, ", {p:.1}% at the {a:.3} ms actually slept");
    }
    if let Some(o) = f.offered_per_sec {
        let _ = write!(ideal, ", {o:.1} tasks/s offered");
    }
    let l = &f.latency_ms;
    let _ = writeln!(
        out,
        "  {title:>6}: throughput {:.1} tasks/s{ideal} ({} tasks in {:.2} s)",
        f.throughput_per_sec, f.tasks, f.duration_secs
    );
    let _ = writeln!(
        out,
        "          {latency_name}: avg {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.avg, l.p50, l.p99, l.max
    );
    if let Some(c) = &f.complete_latency_ms {
        let _ = writeln!(
            out,
            "          produce to complete: avg {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            c.avg, c.p50, c.p99, c.max
        );
    }
    let rss = match f.rss {
        Some(r) => format!(
            ", RSS while running: steady {:.1} MiB, max {:.1} MiB",
            r.steady_kib as f64 / 1024.0,
            r.max_kib as f64 / 1024.0
        ),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "          cpu: {:.1} µs/task ({:.2} s), peak RSS {:.1} MiB{rss}",
        f.cpu_micros_per_task,
        f.cpu_secs,
        f.peak_rss_kib as f64 / 1024.0
    );
}

/// Renders several reports as text, separated by blank lines.
pub fn reports_to_text(reports: &[BenchReport]) -> String {
    reports
        .iter()
        .map(BenchReport::to_text)
        .collect::<Vec<_>>()
        .join("\n")
}
