//! `decaton lag GROUP --topic T`: how far a subscription (a consumer group) is behind.
//!
//! For each partition: the committed offset, the high watermark, the lag between them,
//! and how many tasks above the committed offset are already finished, decoded from the
//! offset map in the commit metadata (see [`crate::offset_map`]). `pending` is what is
//! left to process: the lag minus those finished tasks. Reading the committed offsets
//! does not join the group, so a running processor is not disturbed. A group with no
//! committed offset on any partition of the topic (a misspelt group, or one that has not
//! committed yet) is an error, not a table of empty rows.

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::offset_map::{self, OffsetMap};
use crate::options::KafkaArgs;

/// Arguments of `decaton lag`.
#[derive(Debug, clap::Args)]
pub struct LagArgs {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// The consumer group: the subscription's name.
    group: String,

    /// The topic the subscription reads.
    #[arg(long)]
    topic: String,

    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One partition's row.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PartitionLag {
    partition: i32,
    /// The committed offset; `null` when the group has committed nothing here.
    committed: Option<i64>,
    low_watermark: i64,
    high_watermark: i64,
    /// `high_watermark - committed`; `null` without a commit.
    lag: Option<i64>,
    /// Finished tasks above the committed offset, from the offset map.
    finished_above_commit: u64,
    /// `lag - finished_above_commit`: tasks still to process.
    pending: Option<i64>,
    /// `none`, `valid`, or why the map is ignored.
    offset_map: String,
}

/// The whole answer.
#[derive(Debug, Serialize)]
struct Report<'a> {
    group: &'a str,
    topic: &'a str,
    partitions: Vec<PartitionLag>,
    total_lag: i64,
    total_finished_above_commit: u64,
    total_pending: i64,
}

/// Runs `decaton lag`.
pub async fn run(args: LagArgs) -> anyhow::Result<()> {
    // librdkafka's calls here block; keep them off the async workers.
    tokio::task::spawn_blocking(move || lag_blocking(&args))
        .await
        .context("the lag lookup stopped")?
}

fn lag_blocking(args: &LagArgs) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.kafka.bootstrap)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false");
    for (key, value) in &args.kafka.properties {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create().context("creating the consumer")?;
    let partitions = crate::options::topic_partitions(&consumer, &args.topic, &args.kafka)?;
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(&args.topic, *p);
    }
    let committed = consumer
        .committed_offsets(wanted, args.kafka.timeout)
        .with_context(|| {
            crate::options::no_answer(
                &args.kafka,
                &format!("reading the committed offsets of group {}", args.group),
            )
        })?;

    let mut rows = Vec::new();
    for element in committed.elements() {
        let partition = element.partition();
        let (low, high) = consumer
            .fetch_watermarks(&args.topic, partition, args.kafka.timeout)
            .with_context(|| format!("reading the watermarks of partition {partition}"))?;
        let position = match element.offset() {
            Offset::Offset(n) => Some(n),
            _ => None,
        };
        let map = match position {
            Some(position) => offset_map::decode(position, &metadata_text(&element)),
            None => OffsetMap::Empty,
        };
        rows.push(row(partition, position, low, high, &map));
    }
    rows.sort_by_key(|r| r.partition);
    if rows.iter().all(|r| r.committed.is_none()) {
        anyhow::bail!(
            "group {} has no committed offset on any of the {} partitions of {}: no such \
             group (check the name), or it has not committed on this topic yet",
            args.group,
            rows.len(),
            args.topic
        );
    }
    let report = Report {
        group: &args.group,
        topic: &args.topic,
        total_lag: rows.iter().filter_map(|r| r.lag).sum(),
        total_finished_above_commit: rows.iter().map(|r| r.finished_above_commit).sum(),
        total_pending: rows.iter().filter_map(|r| r.pending).sum(),
        partitions: rows,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The commit metadata as text. rdkafka panics on metadata that is not UTF-8 (only a
/// foreign client can write such); that is reported as an invalid map instead.
fn metadata_text(element: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>) -> String {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        element.metadata().to_string()
    }))
    .unwrap_or_else(|_| "\u{0}not UTF-8".to_string())
}

fn row(
    partition: i32,
    committed: Option<i64>,
    low: i64,
    high: i64,
    map: &OffsetMap,
) -> PartitionLag {
    let lag = committed.map(|c| (high - c).max(0));
    let (finished, state) = match map {
        OffsetMap::Empty => (0, "none".to_string()),
        OffsetMap::Finished(n) => (*n, "valid".to_string()),
        OffsetMap::Invalid(reason) => (0, format!("ignored: {reason}")),
    };
    PartitionLag {
        partition,
        committed,
        low_watermark: low,
        high_watermark: high,
        lag,
        finished_above_commit: finished,
        pending: lag.map(|l| (l - i64::try_from(finished).unwrap_or(i64::MAX)).max(0)),
        offset_map: state,
    }
}

/// A fixed-width table with a total line.
fn table(report: &Report<'_>) -> String {
    let dash = |v: Option<i64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut out = format!(
        "{:>9} {:>12} {:>14} {:>10} {:>9} {:>10}  {}\n",
        "PARTITION", "COMMITTED", "HIGH_WATERMARK", "LAG", "FINISHED", "PENDING", "OFFSET_MAP"
    );
    for r in &report.partitions {
        out.push_str(&format!(
            "{:>9} {:>12} {:>14} {:>10} {:>9} {:>10}  {}\n",
            r.partition,
            dash(r.committed),
            r.high_watermark,
            dash(r.lag),
            r.finished_above_commit,
            dash(r.pending),
            r.offset_map
        ));
    }
    out.push_str(&format!(
        "{:>9} {:>12} {:>14} {:>10} {:>9} {:>10}\n",
        "total", "", "", report.total_lag, report.total_finished_above_commit, report.total_pending
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_subtract_finished_tasks_from_the_lag() {
        let r = row(0, Some(10), 0, 50, &OffsetMap::Finished(15));
        assert_eq!((r.lag, r.pending), (Some(40), Some(25)));
        let r = row(1, None, 3, 50, &OffsetMap::Empty);
        assert_eq!(
            (r.lag, r.pending, r.offset_map.as_str()),
            (None, None, "none")
        );
        let r = row(2, Some(7), 0, 9, &OffsetMap::Invalid("bad base64".into()));
        assert_eq!((r.lag, r.finished_above_commit), (Some(2), 0));
        assert_eq!(r.offset_map, "ignored: bad base64");
    }
}
