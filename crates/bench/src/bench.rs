//! One consumer benchmark: for each run, a fresh topic filled with every task, then the
//! runner started on it and measured.

use std::sync::Arc;

use crate::cluster::Cluster;
use crate::config::BenchConfig;
use crate::figures::RssSamples;
use crate::progress::{self, Progress};
use crate::recorder::{sample_rss, Recorder};
use crate::report::BenchReport;
use crate::runner::{self, RunEnv};
use crate::{produce, BenchError};

/// Runs `config` against its cluster (starting the embedded one if it has no
/// `bootstrap`) and returns the report.
pub async fn run_bench(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    let cluster = Cluster::start(config.workload.bootstrap.as_deref()).await?;
    run_bench_on(&cluster, config).await
}

pub(crate) async fn run_bench_on(
    cluster: &Cluster,
    config: &BenchConfig,
) -> Result<BenchReport, BenchError> {
    let w = &config.workload;
    let runner = runner::runner(config.runner.kind);
    let lanes = runner::lanes(&config.runner);
    let ideal = runner::ideal_throughput(
        if config.runner.kind == crate::RunnerKind::RdkafkaRaw {
            None
        } else {
            lanes
        },
        w.partitions,
        config.simulate_latency,
        w.keys.distinct(),
    );
    let label = config.runner.label();
    let mut runs = Vec::new();
    for run in 1..=w.runs {
        let topic = cluster.unique_name(config.runner.kind.name());
        cluster.create_topic(&topic, w.partitions).await?;
        produce::fill(cluster, &topic, w).await?;
        cluster
            .check_backlog(&topic, w.partitions, w.total())
            .await?;
        let recorder = Arc::new(Recorder::new(w.warmup, w.tasks));
        let env = RunEnv {
            bootstrap: cluster.bootstrap().to_string(),
            group_id: format!("{topic}-group"),
            topic,
            partitions: w.partitions,
            latency: config.simulate_latency,
            params: config.runner.params.clone(),
        };
        let progress = Progress::new(
            w.progress,
            recorder.total(),
            format!("{label} run {run}/{}", w.runs),
        );
        let rss = std::sync::Mutex::new(Vec::new());
        tokio::select! {
            r = runner.run(&env, recorder.clone()) => r?,
            e = progress::stall_watch(&recorder, &progress, w.stall_timeout) => return Err(e),
            _ = sample_rss(&rss) => {}
        }
        progress.finish();
        let mut figures = recorder.figures(ideal, config.simulate_latency)?;
        figures.rss = RssSamples::of(&rss.lock().unwrap_or_else(|p| p.into_inner()));
        runs.push(figures);
    }
    Ok(BenchReport::new(
        label,
        Some(config.runner.clone()),
        None,
        Some((config.simulate_latency.as_millis() as u64, lanes)),
        w.clone(),
        cluster.describe(),
        config.command_line(),
        runs,
    ))
}
