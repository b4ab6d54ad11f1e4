//! Consumer lag, read from the broker: per partition, the high watermark minus the
//! subscription's committed offset, as `decaton_consumer_lag`.
//!
//! One thread per subscription, with its own librdkafka client configured like the
//! subscription (same cluster, same security settings, its group id). It never joins the
//! group: it only asks the group coordinator for committed offsets and the partition
//! leaders for watermarks, every `lag_interval`. The numbers are what an operator's
//! `decaton lag` would show, so they stay right while the processor is paused, stalled or
//! rebalancing. A partition without a committed offset counts everything from the low
//! watermark.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::metrics::CONSUMER_LAG;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Stops the probe thread when dropped.
pub(crate) struct LagProbe {
    _stop: mpsc::Sender<()>,
}

/// Starts probing the lag of subscription `id` on `topics`.
pub(crate) fn start(
    id: &str,
    topics: Vec<String>,
    kafka: &BTreeMap<String, String>,
    interval: Duration,
) -> Result<LagProbe, String> {
    let mut config = ClientConfig::new();
    for (k, v) in kafka {
        config.set(k, v);
    }
    config
        .set("group.id", id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| format!("lag probe of {id}: {e}"))?;
    let (stop, stopped) = mpsc::channel::<()>();
    let id = id.to_string();
    std::thread::Builder::new()
        .name(format!("decaton-lag-{id}"))
        .spawn(move || loop {
            for topic in &topics {
                probe(&consumer, &id, topic);
            }
            // The interval timer; a message or a hang-up (the service stopping) ends it.
            match stopped.recv_timeout(interval) {
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                _ => break,
            }
        })
        .map_err(|e| format!("lag probe thread: {e}"))?;
    Ok(LagProbe { _stop: stop })
}

fn probe(consumer: &BaseConsumer, id: &str, topic: &str) {
    let partitions: Vec<i32> = match consumer.fetch_metadata(Some(topic), TIMEOUT) {
        Ok(md) => md
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect(),
        Err(e) => {
            tracing::debug!(subscription = id, "lag probe: metadata: {e}");
            return;
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = match consumer.committed_offsets(tpl, TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(subscription = id, "lag probe: committed offsets: {e}");
            return;
        }
    };
    for p in partitions {
        let Ok((low, high)) = consumer.fetch_watermarks(topic, p, TIMEOUT) else {
            continue;
        };
        let from = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => low,
        };
        let labels = [
            ("subscription", id.to_string()),
            ("topic", topic.to_string()),
            ("partition", p.to_string()),
        ];
        metrics::gauge!(CONSUMER_LAG, &labels).set((high - from).max(0) as f64);
    }
}
