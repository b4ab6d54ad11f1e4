//! `decaton tail`: print the tasks of a topic as they arrive.
//!
//! The tail reads like an operator's debugger, not like a processor: it assigns itself
//! every partition of the topic (or the ones asked for) straight from the topic metadata,
//! joins no consumer group and commits nothing, so it never disturbs a subscription's
//! offsets. It starts at the end of each partition, or at the beginning with
//! `--from-beginning`.
//!
//! For each record it prints the key, partition and offset, the five `dt_meta` metadata
//! fields and the task: as ChatOp JSON when the bytes are exactly a ChatOp, else as hex.
//! A record that is not a Decaton task (bad header, no header and no legacy envelope, no
//! value) gets an error line naming its topic, partition and offset, and the tail goes on.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use decaton_protocol::{
    decode_record, ChatOp, ProtocolError, TaskMetadata, TaskRecord, METADATA_HEADER,
};
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::json::{to_hex, ChatOpJson};
use crate::options::{shutdown_signal, KafkaArgs};

/// How long to wait for the topic's metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(15);

/// Arguments of `decaton tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// Topic to read.
    #[arg(long)]
    topic: String,

    /// Start at the oldest record of each partition instead of the end.
    #[arg(long)]
    from_beginning: bool,

    /// Stop after this many records (error lines included).
    #[arg(long, short = 'n', value_name = "N")]
    count: Option<u64>,

    /// Read only this partition; repeat for several (default: all of them).
    #[arg(long, value_name = "P")]
    partition: Vec<i32>,

    /// Output format: one readable line, or one JSON object, per record.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// How `tail` prints a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `topic/partition@offset key=... metadata... task={...}`
    Text,
    /// One JSON object per line.
    Json,
}

/// Runs `decaton tail` until `--count` records were printed or Ctrl-C / SIGTERM.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        return Ok(());
    }
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.kafka.bootstrap)
        // librdkafka's assign() wants a group id; with assign (no subscribe) the group is
        // never joined, and nothing is committed to it.
        .set("group.id", "decaton-tail")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            if args.from_beginning {
                "earliest"
            } else {
                "latest"
            },
        );
    for (key, value) in &args.kafka.properties {
        config.set(key, value);
    }
    let consumer: StreamConsumer = config.create().context("creating the consumer")?;
    let assignment = assignment(&consumer, &args)?;
    consumer
        .assign(&assignment)
        .context("assigning partitions")?;
    tracing::debug!(topic = %args.topic, partitions = assignment.count(), "tailing");

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let stdout = std::io::stdout();
    let mut seen = 0u64;
    while args.count.is_none_or(|count| seen < count) {
        tokio::select! {
            signal = &mut shutdown => {
                signal?;
                break;
            }
            received = consumer.recv() => match received {
                Ok(message) => {
                    seen += 1;
                    let line = render(&message, args.format);
                    let mut out = stdout.lock();
                    match writeln!(out, "{line}").and_then(|()| out.flush()) {
                        Ok(()) => {}
                        // The reader went away (`decaton tail | head`): nothing left to do.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                        Err(e) => return Err(e).context("writing to stdout"),
                    }
                }
                Err(e) => tracing::warn!(topic = %args.topic, error = %e, "consumer error"),
            },
        }
    }
    Ok(())
}

/// Every requested partition of the topic, at the start position asked for.
fn assignment(consumer: &StreamConsumer, args: &TailArgs) -> anyhow::Result<TopicPartitionList> {
    let metadata = consumer
        .fetch_metadata(Some(&args.topic), METADATA_TIMEOUT)
        .with_context(|| format!("fetching metadata of topic {}", args.topic))?;
    let topic = metadata
        .topics()
        .iter()
        .find(|t| t.name() == args.topic)
        .with_context(|| format!("topic {} not in the broker's metadata", args.topic))?;
    if let Some(error) = topic.error() {
        anyhow::bail!(
            "topic {}: {}",
            args.topic,
            rdkafka::types::RDKafkaErrorCode::from(error)
        );
    }
    let existing: BTreeSet<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    anyhow::ensure!(
        !existing.is_empty(),
        "topic {} has no partitions",
        args.topic
    );
    let wanted: BTreeSet<i32> = if args.partition.is_empty() {
        existing.clone()
    } else {
        args.partition.iter().copied().collect()
    };
    if let Some(missing) = wanted.difference(&existing).next() {
        anyhow::bail!(
            "topic {} has no partition {missing} (it has {})",
            args.topic,
            existing.len()
        );
    }
    let start = if args.from_beginning {
        Offset::Beginning
    } else {
        Offset::End
    };
    let mut list = TopicPartitionList::new();
    for partition in wanted {
        list.add_partition_offset(&args.topic, partition, start)?;
    }
    Ok(list)
}

/// One printed record, in the order the fields appear in JSON.
#[derive(Debug, Serialize)]
struct RecordLine<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    /// The key as text; `null` for no key or a key that is not UTF-8.
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<MetadataLine<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<ChatOpJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The `dt_meta` fields, named as in the `.proto`.
#[derive(Debug, Serialize)]
struct MetadataLine<'a> {
    timestamp_millis: i64,
    source_application_id: &'a str,
    source_instance_id: &'a str,
    retry_count: i64,
    scheduled_time_millis: i64,
}

impl<'a> From<&'a TaskMetadata> for MetadataLine<'a> {
    fn from(m: &'a TaskMetadata) -> MetadataLine<'a> {
        MetadataLine {
            timestamp_millis: m.timestamp_millis,
            source_application_id: &m.source_application_id,
            source_instance_id: &m.source_instance_id,
            retry_count: m.retry_count,
            scheduled_time_millis: m.scheduled_time_millis,
        }
    }
}

/// Renders one consumed record as a line of the chosen format.
fn render(message: &BorrowedMessage<'_>, format: Format) -> String {
    let header = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == METADATA_HEADER)
            .map(|h| h.value.unwrap_or_default())
    });
    let decoded = decode_record(header, message.payload());
    render_record(
        message.topic(),
        message.partition(),
        message.offset(),
        message.key(),
        &decoded,
        format,
    )
}

/// Renders a record from its parts (separate from rdkafka's message type for testing).
fn render_record(
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    decoded: &Result<TaskRecord<'_>, ProtocolError>,
    format: Format,
) -> String {
    let (key_text, key_hex) = match key.map(std::str::from_utf8) {
        None => (None, None),
        Some(Ok(text)) => (Some(text.to_string()), None),
        Some(Err(_)) => (None, key.map(to_hex)),
    };
    let mut line = RecordLine {
        topic,
        partition,
        offset,
        key: key_text,
        key_hex,
        metadata: None,
        task: None,
        value_hex: None,
        error: None,
    };
    match decoded {
        Ok(record) => {
            line.metadata = Some(MetadataLine::from(&record.metadata));
            match as_chat_op(&record.task) {
                Some(op) => line.task = Some(ChatOpJson::from(&op)),
                None => line.value_hex = Some(to_hex(&record.task)),
            }
        }
        Err(e) => line.error = Some(format!("cannot decode task record: {e}")),
    }
    match format {
        Format::Json => {
            serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
        Format::Text => text_line(&line),
    }
}

/// `topic/partition@offset key="..." timestamp_millis=... ... task={...}`, or with
/// `ERROR ...` in place of metadata and task.
fn text_line(line: &RecordLine<'_>) -> String {
    let mut out = format!("{}/{}@{}", line.topic, line.partition, line.offset);
    match (&line.key, &line.key_hex) {
        (Some(key), _) => out.push_str(&format!(" key={key:?}")),
        (None, Some(hex)) => out.push_str(&format!(" key_hex={hex}")),
        (None, None) => out.push_str(" key=null"),
    }
    if let Some(error) = &line.error {
        out.push_str(&format!(" ERROR {error}"));
        return out;
    }
    if let Some(m) = &line.metadata {
        out.push_str(&format!(
            " timestamp_millis={} source_application_id={:?} source_instance_id={:?} retry_count={} scheduled_time_millis={}",
            m.timestamp_millis, m.source_application_id, m.source_instance_id, m.retry_count, m.scheduled_time_millis
        ));
    }
    if let Some(task) = &line.task {
        out.push_str(&format!(" task={}", task));
    }
    if let Some(hex) = &line.value_hex {
        out.push_str(&format!(" value_hex={hex}"));
    }
    out
}

/// The task as a ChatOp, if its bytes are exactly a ChatOp's encoding.
///
/// Protobuf decoding alone accepts almost anything (unknown fields are skipped), so the
/// decoded message must also re-encode to the same bytes; otherwise the value is some
/// other message and is shown as hex. An empty value is shown as hex (empty) too.
fn as_chat_op(bytes: &[u8]) -> Option<ChatOp> {
    if bytes.is_empty() {
        return None;
    }
    let op = ChatOp::decode(bytes).ok()?;
    (op.encode_to_vec() == bytes).then_some(op)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use decaton_protocol::{encode_metadata, OpType};

    fn metadata() -> TaskMetadata {
        TaskMetadata {
            timestamp_millis: 1_700_000_000_000,
            source_application_id: "talk".into(),
            source_instance_id: "talk-1".into(),
            retry_count: 2,
            scheduled_time_millis: 1_700_000_060_000,
        }
    }

    fn chat_op() -> ChatOp {
        ChatOp {
            user_id: "u1".into(),
            op: OpType::Read as i32,
            sequence: 9,
            ..Default::default()
        }
    }

    #[test]
    fn json_line_has_metadata_and_task() {
        let header = encode_metadata(&metadata());
        let value = chat_op().encode_to_vec();
        let decoded = decode_record(Some(&header), Some(&value));
        let line = render_record("t", 2, 40, Some(b"u1"), &decoded, Format::Json);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["topic"], "t");
        assert_eq!(v["partition"], 2);
        assert_eq!(v["offset"], 40);
        assert_eq!(v["key"], "u1");
        assert_eq!(v["metadata"]["source_application_id"], "talk");
        assert_eq!(v["metadata"]["retry_count"], 2);
        assert_eq!(v["metadata"]["scheduled_time_millis"], 1_700_000_060_000i64);
        assert_eq!(v["task"]["op"], "READ");
        assert_eq!(v["task"]["sequence"], 9);
        assert!(v.get("value_hex").is_none());
    }

    #[test]
    fn other_messages_print_as_hex() {
        let header = encode_metadata(&metadata());
        // Field 9 is not a ChatOp field: it decodes (skipped) but does not re-encode.
        let value = [0x48, 0x01];
        let decoded = decode_record(Some(&header), Some(&value));
        let line = render_record("t", 0, 1, None, &decoded, Format::Text);
        assert!(
            line.starts_with("t/0@1 key=null timestamp_millis=1700000000000"),
            "{line}"
        );
        assert!(line.ends_with(" value_hex=4801"), "{line}");
    }

    #[test]
    fn undecodable_records_give_an_error_line() {
        let decoded = decode_record(Some(&[0xff]), Some(b"x"));
        let text = render_record("t", 3, 7, Some(&[0xc3, 0x28]), &decoded, Format::Text);
        assert!(
            text.starts_with(
                "t/3@7 key_hex=c328 ERROR cannot decode task record: invalid dt_meta header"
            ),
            "{text}"
        );
        let json = render_record("t", 3, 7, None, &decoded, Format::Json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["offset"], 7);
        assert!(v["error"]
            .as_str()
            .unwrap()
            .contains("invalid dt_meta header"));
        assert!(v.get("metadata").is_none());
    }
}
