//! `decaton bench latency`: what a task waits at a given load.
//!
//! The consumer benchmark drains a backlog, so its latency figures are mostly time spent
//! in the backlog. Here the tasks arrive while the runner consumes, at a fixed rate, the
//! way a live system sees them (an open loop: the producer does not slow down when the
//! consumer falls behind):
//!
//! 1. the runner's capacity is measured first with the ordinary backlog run (or given
//!    with `--capacity`);
//! 2. for each `--load` percentage, a fresh topic and group: the runner starts, the first
//!    task is put and the clock starts once the runner has picked it up (so the group
//!    join is not counted), then the rest are put at `load % × capacity` tasks/s;
//! 3. the report gives, over the measured tasks, the delay from put to the start of
//!    processing and from put to its end (the put's timestamp has millisecond
//!    resolution), and the rate actually offered.
//!
//! At most `--in-flight` puts are outstanding; when the broker cannot take the rate, the
//! offered rate in the report is below the target, which says so.
//!
//! On the embedded mock cluster, pass `--param fetch.wait.max.ms=10`: the mock broker
//! answers a fetch that found no records only after the whole `fetch.wait.max.ms`
//! (librdkafka's default 500 ms), even when records arrive meanwhile, so every task that
//! arrives at an idle consumer would wait up to half a second. Apache Kafka answers as
//! soon as a record arrives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::cluster::Cluster;
use crate::config::BenchConfig;
use crate::figures::RssSamples;
use crate::progress::{self, Progress};
use crate::recorder::{sample_rss, Recorder};
use crate::report::BenchReport;
use crate::runner::{self, RunEnv};
use crate::{produce, BenchError};

/// One latency benchmark: a runner, its capacity and the loads to offer.
#[derive(Debug, Clone)]
pub struct LatencyConfig {
    /// The runner, latency and workload (`tasks` and `warmup` per load).
    pub bench: BenchConfig,
    /// Offered loads, in percent of the capacity.
    pub loads: Vec<u32>,
    /// The capacity in tasks/s; measured with a backlog run when `None`.
    pub capacity: Option<f64>,
}

/// Runs the capacity measurement (unless given) and one open-loop run per load; the
/// capacity report comes first when it was measured.
pub async fn run_latency(config: &LatencyConfig) -> Result<Vec<BenchReport>, BenchError> {
    let w = &config.bench.workload;
    let cluster = Cluster::start(w.bootstrap.as_deref()).await?;
    let mut reports = Vec::new();
    let capacity = match config.capacity {
        Some(c) => c,
        None => {
            let report = crate::bench::run_bench_on(&cluster, &config.bench).await?;
            let c = report.summary.throughput_per_sec;
            reports.push(report);
            c
        }
    };
    if !(capacity.is_finite() && capacity > 0.0) {
        return Err(BenchError::Config(format!("capacity {capacity} tasks/s")));
    }
    for &load in &config.loads {
        let rate = capacity * f64::from(load) / 100.0;
        let mut runs = Vec::new();
        for run in 1..=w.runs {
            runs.push(open_loop_run(&cluster, config, rate, run).await?);
        }
        let command = format!(
            "{} --load {load} --capacity {capacity:.0}",
            config
                .bench
                .command_line()
                .replacen("decaton bench", "decaton bench latency", 1)
        );
        reports.push(BenchReport::new(
            format!(
                "{} at {load}% load ({rate:.0} tasks/s offered)",
                config.bench.runner.label()
            ),
            Some(config.bench.runner.clone()),
            None,
            Some((config.bench.simulate_latency.as_millis() as u64, None)),
            w.clone(),
            cluster.describe(),
            command,
            runs,
        ));
    }
    Ok(reports)
}

async fn open_loop_run(
    cluster: &Cluster,
    config: &LatencyConfig,
    rate: f64,
    run: u32,
) -> Result<crate::Figures, BenchError> {
    let w = &config.bench.workload;
    let topic = cluster.unique_name("latency");
    cluster.create_topic(&topic, w.partitions).await?;
    // The first task is the primer: the clock starts once the runner has it.
    let warmup = w.warmup.max(1);
    let recorder = Arc::new(Recorder::new(warmup, w.tasks));
    let env = RunEnv {
        bootstrap: cluster.bootstrap().to_string(),
        group_id: format!("{topic}-group"),
        topic: topic.clone(),
        partitions: w.partitions,
        latency: config.bench.simulate_latency,
        params: config.bench.runner.params.clone(),
    };
    let runner = runner::runner(config.bench.runner.kind);
    let client = Arc::new(produce::client(cluster.bootstrap(), &topic, w)?);
    let payload: Arc<[u8]> = vec![b'x'; w.payload_bytes].into();
    let total = recorder.total();
    let offered = Arc::new(AtomicU64::new(0));
    let producer = {
        let (recorder, client, payload, offered) = (
            recorder.clone(),
            client.clone(),
            payload.clone(),
            offered.clone(),
        );
        let keys = w.keys;
        let in_flight = Arc::new(Semaphore::new(w.in_flight.max(1)));
        async move {
            let (key, op) = produce::task(0, keys, &payload);
            produce::put(&client, key.as_deref(), &op).await?;
            // The runner joins its group and takes the primer first.
            recorder.wait_first_finished().await;
            let started = Instant::now();
            let mut puts = tokio::task::JoinSet::new();
            let mut sent = 1u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while sent < total {
                tick.tick().await;
                let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
                while sent < due {
                    let permit = in_flight
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|e| BenchError::Internal(e.to_string()))?;
                    let (key, op) = produce::task(sent, keys, &payload);
                    let client = client.clone();
                    puts.spawn(async move {
                        let r = produce::put(&client, key.as_deref(), &op).await;
                        drop(permit);
                        r
                    });
                    sent += 1;
                }
                while let Some(done) = puts.try_join_next() {
                    done.map_err(|e| BenchError::Internal(e.to_string()))??;
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            offered.store(
                ((sent - 1) as f64 / elapsed.max(1e-9)) as u64,
                Ordering::Relaxed,
            );
            while let Some(done) = puts.join_next().await {
                done.map_err(|e| BenchError::Internal(e.to_string()))??;
            }
            Ok::<(), BenchError>(())
        }
    };
    let progress = Progress::new(
        w.progress,
        total,
        format!("{:.0} tasks/s run {run}/{}", rate, w.runs),
    );
    let rss = std::sync::Mutex::new(Vec::new());
    let consume = async {
        tokio::select! {
            r = runner.run(&env, recorder.clone()) => r,
            e = progress::stall_watch(&recorder, &progress, w.stall_timeout) => Err(e),
            _ = sample_rss(&rss) => Ok(()),
        }
    };
    let (produced, consumed) = tokio::join!(producer, consume);
    produced?;
    consumed?;
    progress.finish();
    let mut figures = recorder.figures(None, config.bench.simulate_latency)?;
    figures.rss = RssSamples::of(&rss.lock().unwrap_or_else(|p| p.into_inner()));
    figures.offered_per_sec = Some(offered.load(Ordering::Relaxed) as f64);
    Ok(figures)
}
