//! What several subcommands share: how to reach Kafka and when to stop.

use std::time::Duration;

use anyhow::Context as _;

/// Connection settings for a command that talks to Kafka.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        short = 'b',
        env = "DECATON_BOOTSTRAP",
        value_name = "HOST:PORT[,HOST:PORT...]"
    )]
    pub bootstrap: String,

    /// A librdkafka property passed through verbatim; repeat for several
    /// (for example `-X security.protocol=ssl -X linger.ms=0`).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,

    /// How long to wait for each answer from the cluster (metadata, offsets) before
    /// failing, in seconds: an unreachable or wrong broker fails within this time.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_seconds)]
    pub timeout: Duration,
}

/// Parses a positive number of seconds (fractions allowed).
fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("expected a positive number of seconds, got {text:?}"))
}

/// What a metadata or offset request that failed says: the broker, and the flag to wait
/// longer when it timed out.
pub fn no_answer(kafka: &KafkaArgs, what: &str) -> String {
    format!(
        "{what} from {} (no answer within {:?}? --timeout waits longer)",
        kafka.bootstrap, kafka.timeout
    )
}

/// Parses `KEY=VALUE` (the value may itself contain `=`).
pub fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// Completes on Ctrl-C, or on SIGTERM where there are Unix signals.
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

/// The partitions of `topic` as the broker's metadata lists them; an error when the topic
/// is unknown or the broker reports an error for it.
pub fn topic_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl rdkafka::consumer::Consumer<C>,
    topic: &str,
    kafka: &KafkaArgs,
) -> anyhow::Result<std::collections::BTreeSet<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), kafka.timeout)
        .with_context(|| no_answer(kafka, &format!("fetching metadata of topic {topic}")))?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .with_context(|| format!("topic {topic} not in the broker's metadata"))?;
    if let Some(error) = found.error() {
        anyhow::bail!(
            "topic {topic}: {}",
            rdkafka::types::RDKafkaErrorCode::from(error)
        );
    }
    Ok(found.partitions().iter().map(|p| p.id()).collect())
}

/// Whether the broker knows `topic`, asked without letting the question create it
/// (a producer's metadata request may; a consumer's with `allow.auto.create.topics=false`
/// does not). Blocks: call it from a blocking thread.
pub fn topic_exists(kafka: &KafkaArgs, topic: &str) -> anyhow::Result<bool> {
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap);
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config.set("allow.auto.create.topics", "false");
    let consumer: rdkafka::consumer::BaseConsumer =
        config.create().context("creating a metadata client")?;
    let metadata =
        rdkafka::consumer::Consumer::fetch_metadata(&consumer, Some(topic), kafka.timeout)
            .with_context(|| no_answer(kafka, &format!("fetching metadata of topic {topic}")))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(false);
    };
    match found.error().map(rdkafka::types::RDKafkaErrorCode::from) {
        None => Ok(!found.partitions().is_empty()),
        Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(false),
        Some(code) => anyhow::bail!("topic {topic}: {code}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn properties_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_property("linger.ms=0").unwrap(),
            ("linger.ms".into(), "0".into())
        );
        assert_eq!(
            parse_property("sasl.jaas=a=b").unwrap(),
            ("sasl.jaas".into(), "a=b".into())
        );
        assert_eq!(
            parse_property("client.id=").unwrap(),
            ("client.id".into(), String::new())
        );
        assert!(parse_property("linger.ms").is_err());
        assert!(parse_property("=1").is_err());
    }
}
