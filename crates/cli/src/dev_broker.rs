//! `decaton dev-broker`: a Kafka to develop against, with nothing installed.
//!
//! Runs librdkafka's mock cluster (the testkit's embedded broker) inside this process,
//! creates the topics asked for, prints `bootstrap=HOST:PORT` on stdout and serves until
//! Ctrl-C or SIGTERM. Everything lives in memory and is gone when it stops.

use anyhow::Context as _;
use decaton_testkit::{BrokerKind, TestBroker};
use std::io::Write as _;

use crate::options::shutdown_signal;

/// Arguments of `decaton dev-broker`.
#[derive(Debug, clap::Args)]
pub struct DevBrokerArgs {
    /// A topic to create, with its partition count (default 1); repeat for several.
    #[arg(long = "topic", value_name = "NAME:PARTITIONS", value_parser = parse_topic)]
    topics: Vec<(String, i32)>,
}

/// Parses `NAME:PARTITIONS`, or `NAME` for one partition.
fn parse_topic(text: &str) -> Result<(String, i32), String> {
    let (name, partitions) = match text.rsplit_once(':') {
        Some((name, count)) => {
            let count = count
                .parse::<i32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("partition count in {text:?} must be a positive number"))?;
            (name, count)
        }
        None => (text, 1),
    };
    if name.is_empty() {
        return Err(format!("no topic name in {text:?}"));
    }
    Ok((name.to_string(), partitions))
}

/// Runs `decaton dev-broker` until Ctrl-C / SIGTERM.
pub async fn run(args: DevBrokerArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let broker = tokio::task::spawn_blocking(move || -> anyhow::Result<TestBroker> {
        let broker =
            TestBroker::start(BrokerKind::Embedded).context("starting the embedded broker")?;
        for (name, partitions) in &args.topics {
            broker
                .create_topic(name, *partitions)
                .with_context(|| format!("creating topic {name}"))?;
            tracing::info!(topic = %name, partitions, "created topic");
        }
        Ok(broker)
    })
    .await??;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "bootstrap={}", broker.bootstrap_servers())?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!("embedded broker running; Ctrl-C or SIGTERM stops it");
    shutdown.await?;
    tracing::info!("stopping the embedded broker");
    // Stopping joins the cluster's thread; keep that off the async workers.
    tokio::task::spawn_blocking(move || drop(broker)).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn topic_specs() {
        assert_eq!(parse_topic("chat-ops:4").unwrap(), ("chat-ops".into(), 4));
        assert_eq!(parse_topic("chat-ops").unwrap(), ("chat-ops".into(), 1));
        assert!(parse_topic("chat-ops:0").is_err());
        assert!(parse_topic("chat-ops:x").is_err());
        assert!(parse_topic(":3").is_err());
    }
}
