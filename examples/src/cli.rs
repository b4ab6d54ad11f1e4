//! What every example binary shares: logging, signals, the common subscription flags and
//! running a subscription until Ctrl-C or SIGTERM with a stats line every few seconds.
//!
//! A processor binary parses [`SubscriptionArgs`] (`--bootstrap`, `--topic`, `-X
//! key=value` for librdkafka, `-p name=value` for Decaton properties), builds its
//! subscription with [`SubscriptionArgs::builder`] and hands it to [`run_until_signal`],
//! which shuts it down gracefully — finish dispatched tasks, commit, leave the group — on
//! the first Ctrl-C or SIGTERM.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use decaton_processor::{
    ProcessorProperties, Subscription, SubscriptionBuilder, SubscriptionHandle, SubscriptionStats,
    TaskProcessor,
};
use tracing_subscriber::EnvFilter;

/// Installs a `tracing` subscriber that logs to stderr; `RUST_LOG` overrides
/// `default_filter` (for example `"info"` or `"warn"`).
pub fn init_tracing(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Fails only if a subscriber is already installed, and then that one is used.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("listening for Ctrl-C")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("listening for Ctrl-C")?;
    Ok(())
}

/// Parses `key=value` (the value may itself contain `=`).
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

/// The flags every processor binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct SubscriptionArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "DECATON_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub bootstrap: String,
    /// Topic of chat operations to process.
    #[arg(long, default_value = "chat-ops")]
    pub topic: String,
    /// A librdkafka consumer property passed through verbatim (repeatable), e.g.
    /// `-X session.timeout.ms=10000`.
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub kafka: Vec<(String, String)>,
    /// A Decaton property by either name (repeatable), e.g. `-p
    /// decaton.max.pending.records=5000`.
    #[arg(short = 'p', long = "property", value_name = "NAME=VALUE", value_parser = parse_key_value)]
    pub properties: Vec<(String, String)>,
    /// Seconds between stats lines (0 = none).
    #[arg(long, default_value_t = 5)]
    pub stats_interval: u64,
    /// Serve Prometheus metrics at this address (e.g. `127.0.0.1:9464`).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl SubscriptionArgs {
    /// `base` with every `-p name=value` applied on top.
    pub fn properties(&self, mut base: ProcessorProperties) -> anyhow::Result<ProcessorProperties> {
        for (name, value) in &self.properties {
            base.set(name, value)
                .with_context(|| format!("property {name}"))?;
        }
        Ok(base)
    }

    /// A subscription builder for `id` running `processor`, with the bootstrap servers,
    /// topic and librdkafka properties from the flags (properties are left to the caller).
    pub fn builder<T, P>(&self, id: &str, processor: P) -> SubscriptionBuilder<T, P>
    where
        T: prost::Message + Default + Send + 'static,
        P: TaskProcessor<T>,
    {
        let mut builder = Subscription::builder(id, processor)
            .bootstrap_servers(self.bootstrap.clone())
            .topic(self.topic.clone());
        for (k, v) in &self.kafka {
            builder = builder.set(k.clone(), v.clone());
        }
        builder
    }

    /// Starts the Prometheus exporter if `--metrics-addr` was given. Call inside the
    /// tokio runtime.
    pub fn install_metrics(&self) -> anyhow::Result<()> {
        if let Some(addr) = self.metrics_addr {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .with_context(|| format!("serving metrics on {addr}"))?;
            tracing::info!(%addr, "serving Prometheus metrics");
        }
        Ok(())
    }
}

/// One stats line: totals and the processing rate since the previous line.
pub fn stats_line(id: &str, stats: &SubscriptionStats, rate: f64) -> String {
    format!(
        "[{id}] processed {} ({rate:.0}/s) failed {} discarded {} skipped {} | partitions {} paused {}",
        stats.processed,
        stats.failed,
        stats.discarded,
        stats.skipped,
        stats.assigned_partitions,
        stats.paused_partitions
    )
}

/// Prints a [`stats_line`] for `handle` every `interval` on stdout, forever (abort it
/// when done).
pub async fn report_stats(id: String, handle: SubscriptionHandle, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut last, mut at) = (handle.stats().processed, Instant::now());
    loop {
        tick.tick().await;
        let stats = handle.stats();
        let rate =
            stats.processed.saturating_sub(last) as f64 / at.elapsed().as_secs_f64().max(1e-9);
        (last, at) = (stats.processed, Instant::now());
        println!("{}", stats_line(&id, &stats, rate));
    }
}

/// Runs `subscription` until Ctrl-C or SIGTERM, printing stats every `stats_interval`
/// (none if zero), then shuts it down gracefully and returns its final counters.
pub async fn run_until_signal<T, P>(
    subscription: Subscription<T, P>,
    stats_interval: Duration,
) -> anyhow::Result<SubscriptionStats>
where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
    let id = subscription.id().to_string();
    let handle = subscription.handle();
    let signals = {
        let handle = handle.clone();
        let id = id.clone();
        tokio::spawn(async move {
            match shutdown_signal().await {
                Ok(()) => tracing::info!(subscription = %id, "signal received; shutting down"),
                Err(e) => tracing::error!("cannot listen for signals ({e:#}); shutting down"),
            }
            handle.shutdown();
        })
    };
    let reporter = (!stats_interval.is_zero())
        .then(|| tokio::spawn(report_stats(id.clone(), handle.clone(), stats_interval)));
    tracing::info!(subscription = %id, "running; Ctrl-C or SIGTERM stops it");
    let started = Instant::now();
    let result = subscription.run().await;
    signals.abort();
    if let Some(r) = reporter {
        r.abort();
    }
    let stats = result.with_context(|| format!("subscription {id}"))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} in {secs:.1}s",
        stats_line(&id, &stats, stats.processed as f64 / secs.max(1e-9))
    );
    Ok(stats)
}
