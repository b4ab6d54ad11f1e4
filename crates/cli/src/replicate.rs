//! `decaton replicate --config FILE`: runs the loopback replicator a TOML file describes.
//!
//! A malformed file stops it before anything is consumed, with `file:line:column:
//! reason`. While it runs, a progress line on stderr (when it is a terminal) shows source
//! records per second and each route's derived records; Ctrl-C or SIGTERM finishes the
//! records in flight, commits and prints a summary per route on stdout.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use decaton_replicator::{ReplicatorBuilder, ReplicatorStats};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::options::shutdown_signal;

/// Arguments of `decaton replicate`.
#[derive(Debug, clap::Args)]
pub struct ReplicateArgs {
    /// The replicator's configuration (see docs/configuration.md).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// `bootstrap.servers`, overriding the file's `bootstrap_servers` (the flag, else
    /// `DECATON_BOOTSTRAP`, else the file).
    #[arg(
        short = 'b',
        long,
        env = "DECATON_BOOTSTRAP",
        value_name = "HOST:PORT[,HOST:PORT...]"
    )]
    bootstrap: Option<String>,
    /// Serve Prometheus metrics (`decaton_replicator_*`) on this address.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

/// Runs `decaton replicate` until Ctrl-C / SIGTERM or a fatal error.
pub async fn run(args: ReplicateArgs) -> anyhow::Result<()> {
    let mut builder = ReplicatorBuilder::from_file(&args.config)?;
    if let Some(b) = args.bootstrap {
        builder = builder.bootstrap_servers(b);
    }
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    let replicator = builder.build()?;
    let handle = replicator.handle();
    let mut running = tokio::spawn(replicator.run());
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let bar = progress_line();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let (mut last, mut last_at) = (0u64, Instant::now());
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            r = &mut running => break r,
            s = &mut shutdown, if !stopping => {
                s?;
                stopping = true;
                tracing::info!("stopping: finishing records in flight and committing");
                handle.shutdown();
            }
            _ = tick.tick() => {
                let stats = handle.stats();
                let rate = (stats.source_records - last) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
                (last, last_at) = (stats.source_records, Instant::now());
                bar.set_message(progress(&stats, rate));
            }
        }
    };
    bar.finish_and_clear();
    let stats = result.context("the replicator thread")??;
    print!("{}", summary(&stats));
    Ok(())
}

fn progress_line() -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn progress(stats: &ReplicatorStats, rate: f64) -> String {
    let mut line = format!("source {} ({rate:.0}/s)", stats.source_records);
    for r in &stats.routes {
        line.push_str(&format!(" | {} {}", r.name, r.out));
    }
    line.push_str(&format!(
        " | invalid {} dead-letters {}",
        stats.invalid_records, stats.dead_letters
    ));
    line
}

fn summary(stats: &ReplicatorStats) -> String {
    let mut out = format!(
        "source records {} invalid {} dead-letters {} skipped-done {} transactions {}\n",
        stats.source_records,
        stats.invalid_records,
        stats.dead_letters,
        stats.skipped_done,
        stats.transactions
    );
    for r in &stats.routes {
        out.push_str(&format!(
            "route {} -> {}: in {} out {} filtered {} failed {}\n",
            r.name, r.topic, r.records_in, r.out, r.filtered, r.failed
        ));
    }
    out
}
