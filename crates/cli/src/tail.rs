//! `decaton tail`: print the tasks of a topic as they arrive.
//!
//! The tail reads like an operator's debugger, not like a processor: it assigns itself
//! every partition of the topic (or the ones asked for) straight from the topic metadata,
//! joins no consumer group and commits nothing, so it never disturbs a subscription's
//! offsets. It starts at the end of each partition, or where `--from` says: the
//! beginning, an offset, or the first record at or after a timestamp. With
//! `--exit-at-end` it stops once it has reached the end of every partition.
//!
//! For each record it prints the key, partition and offset, the five `dt_meta` metadata
//! fields, every other header (as text when it is UTF-8, else as hex) and the task: as
//! JSON of the task type (see [`crate::schema`]) when the bytes are one, else as hex.
//! A record that is not a Decaton task (bad header, no header and no legacy envelope, no
//! value) gets an error line naming its topic, partition and offset, and the tail goes on.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::io::Write;
use std::str::FromStr;

use anyhow::Context as _;
use decaton_protocol::headers::raw_headers;
use decaton_protocol::{decode_record, ProtocolError, TaskMetadata, TaskRecord, METADATA_HEADER};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::options::{shutdown_signal, KafkaArgs};
use crate::schema::{to_hex, SchemaArgs, TaskType};

/// Arguments of `decaton tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// Topic to read.
    #[arg(long)]
    topic: String,

    #[command(flatten)]
    schema: SchemaArgs,

    /// Where to start in each partition: `beginning`, `end`, `offset:N` (the same offset
    /// in every partition) or `timestamp:MILLIS` (the first record with a timestamp at or
    /// after it, milliseconds since the Unix epoch).
    #[arg(long, value_name = "POSITION", default_value = "end")]
    from: StartAt,

    /// Same as `--from beginning`.
    #[arg(long, conflicts_with = "from")]
    from_beginning: bool,

    /// Stop once the end of every partition has been reached.
    #[arg(long)]
    exit_at_end: bool,

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

/// Where `tail` starts reading each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record still stored.
    Beginning,
    /// Only records written from now on.
    End,
    /// This offset (clamped by the broker's `auto.offset.reset`, here to the end, when it
    /// is out of range).
    Offset(i64),
    /// The first record whose timestamp is at or after these milliseconds.
    Timestamp(i64),
}

impl FromStr for StartAt {
    type Err = String;

    fn from_str(text: &str) -> Result<StartAt, String> {
        let number = |n: &str, what: &str| {
            n.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("{what} must be a number >= 0, got {n:?}"))
        };
        match text.split_once(':') {
            None if text == "beginning" => Ok(StartAt::Beginning),
            None if text == "end" => Ok(StartAt::End),
            Some(("offset", n)) => number(n, "offset").map(StartAt::Offset),
            Some(("timestamp", n)) => number(n, "timestamp").map(StartAt::Timestamp),
            _ => Err(format!(
                "expected beginning, end, offset:N or timestamp:MILLIS, got {text:?}"
            )),
        }
    }
}

/// Runs `decaton tail` until `--count` records were printed, the end of every partition
/// with `--exit-at-end`, or Ctrl-C / SIGTERM.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        return Ok(());
    }
    let task_type = args.schema.load()?;
    let start = if args.from_beginning {
        StartAt::Beginning
    } else {
        args.from
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.kafka.bootstrap)
        // librdkafka's assign() wants a group id; with assign (no subscribe) the group is
        // never joined, and nothing is committed to it.
        .set("group.id", "decaton-tail")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "enable.partition.eof",
            if args.exit_at_end { "true" } else { "false" },
        )
        .set(
            "auto.offset.reset",
            if start == StartAt::Beginning {
                "earliest"
            } else {
                "latest"
            },
        );
    for (key, value) in &args.kafka.properties {
        config.set(key, value);
    }
    let consumer: StreamConsumer = config.create().context("creating the consumer")?;
    let assignment = assignment(&consumer, &args, start)?;
    consumer
        .assign(&assignment)
        .context("assigning partitions")?;
    tracing::debug!(topic = %args.topic, partitions = assignment.count(), "tailing");
    let mut not_at_end: BTreeSet<i32> = assignment
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let stdout = std::io::stdout();
    let mut seen = 0u64;
    while args.count.is_none_or(|count| seen < count) {
        if args.exit_at_end && not_at_end.is_empty() {
            break;
        }
        tokio::select! {
            signal = &mut shutdown => {
                signal?;
                break;
            }
            received = consumer.recv() => match received {
                Ok(message) => {
                    seen += 1;
                    let line = render(&message, &task_type, args.format);
                    let mut out = stdout.lock();
                    match writeln!(out, "{line}").and_then(|()| out.flush()) {
                        Ok(()) => {}
                        // The reader went away (`decaton tail | head`): nothing left to do.
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                        Err(e) => return Err(e).context("writing to stdout"),
                    }
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    not_at_end.remove(&partition);
                }
                Err(e) => tracing::warn!(topic = %args.topic, error = %e, "consumer error"),
            },
        }
    }
    Ok(())
}

/// Every requested partition of the topic, at the start position asked for.
fn assignment(
    consumer: &StreamConsumer,
    args: &TailArgs,
    start: StartAt,
) -> anyhow::Result<TopicPartitionList> {
    let existing = crate::options::topic_partitions(consumer, &args.topic, &args.kafka)?;
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
    let offset = match start {
        StartAt::Beginning => Offset::Beginning,
        StartAt::End => Offset::End,
        StartAt::Offset(n) => Offset::Offset(n),
        StartAt::Timestamp(millis) => Offset::Offset(millis),
    };
    let mut list = TopicPartitionList::new();
    for partition in wanted {
        list.add_partition_offset(&args.topic, partition, offset)?;
    }
    if let StartAt::Timestamp(millis) = start {
        // offsets_for_times takes the timestamps in the offset slots and answers with the
        // first offset at or after each (the end when there is none).
        list = consumer
            .offsets_for_times(list, args.kafka.timeout)
            .with_context(|| format!("looking up offsets for timestamp {millis}"))?;
        for element in list.elements() {
            if let Some(error) = element.error().err() {
                anyhow::bail!(
                    "looking up timestamp {millis} in partition {}: {error}",
                    element.partition()
                );
            }
            tracing::debug!(
                partition = element.partition(),
                offset = ?element.offset(),
                timestamp = millis,
                "start offset for the timestamp"
            );
        }
    }
    Ok(list)
}

/// One printed record, in the order the fields appear in JSON.
#[derive(Debug, Serialize)]
struct RecordLine<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    /// The record's timestamp (milliseconds since the Unix epoch), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    record_timestamp_millis: Option<i64>,
    /// The key as text; `null` for no key or a key that is not UTF-8.
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<MetadataLine<'a>>,
    /// Every header but `dt_meta`, in record order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<HeaderLine<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<Box<serde_json::value::RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
    /// Why the value is shown as hex rather than as the task type.
    #[serde(skip_serializing_if = "Option::is_none")]
    task_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A record header other than `dt_meta`: its value as text when it is UTF-8, else as hex;
/// neither for a header without a value.
#[derive(Debug, Serialize)]
struct HeaderLine<'a> {
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

impl<'a> HeaderLine<'a> {
    fn new(key: &'a str, value: Option<&'a [u8]>) -> HeaderLine<'a> {
        let (value, value_hex) = match value.map(|v| (v, std::str::from_utf8(v))) {
            None => (None, None),
            Some((_, Ok(text))) => (Some(text), None),
            Some((bytes, Err(_))) => (None, Some(to_hex(bytes))),
        };
        HeaderLine {
            key,
            value,
            value_hex,
        }
    }
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

/// The parts of a consumed record that `tail` prints (separate from rdkafka's message
/// type for testing).
struct Record<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<&'a [u8]>,
    /// Every header, `dt_meta` included; a name that is not UTF-8 is shown lossily.
    headers: Vec<(Cow<'a, str>, Option<&'a [u8]>)>,
}

/// Renders one consumed record as a line of the chosen format.
fn render(message: &BorrowedMessage<'_>, task_type: &TaskType, format: Format) -> String {
    let headers: Vec<(Cow<'_, str>, Option<&[u8]>)> = message
        .headers()
        .map(|headers| {
            raw_headers(headers)
                .map(|h| (String::from_utf8_lossy(h.name), h.value))
                .collect()
        })
        .unwrap_or_default();
    let meta = headers
        .iter()
        .find(|(key, _)| *key == METADATA_HEADER)
        .map(|(_, value)| value.unwrap_or_default());
    let decoded = decode_record(meta, message.payload());
    let record = Record {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp: message.timestamp().to_millis(),
        key: message.key(),
        headers,
    };
    render_record(&record, &decoded, task_type, format)
}

/// Renders a record from its parts.
fn render_record(
    record: &Record<'_>,
    decoded: &Result<TaskRecord<'_>, ProtocolError>,
    task_type: &TaskType,
    format: Format,
) -> String {
    let key = record.key;
    let (key_text, key_hex) = match key.map(std::str::from_utf8) {
        None => (None, None),
        Some(Ok(text)) => (Some(text.to_string()), None),
        Some(Err(_)) => (None, key.map(to_hex)),
    };
    let mut line = RecordLine {
        topic: record.topic,
        partition: record.partition,
        offset: record.offset,
        record_timestamp_millis: record.timestamp,
        key: key_text,
        key_hex,
        metadata: None,
        headers: record
            .headers
            .iter()
            .filter(|(key, _)| *key != METADATA_HEADER)
            .map(|(key, value)| HeaderLine::new(key, *value))
            .collect(),
        task: None,
        value_hex: None,
        task_error: None,
        error: None,
    };
    match decoded {
        Ok(task_record) => {
            line.metadata = Some(MetadataLine::from(&task_record.metadata));
            // An empty value decodes as any message with all defaults: show it as hex.
            let as_task = if task_record.task.is_empty() {
                Err(format!("empty value, not a {}", task_type.name()))
            } else {
                task_type.decode_to_json(&task_record.task)
            };
            match as_task {
                Ok(task) => line.task = Some(task),
                Err(e) => {
                    line.value_hex = Some(to_hex(&task_record.task));
                    line.task_error = Some(e);
                }
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

/// `topic/partition@offset key="..." timestamp_millis=... ... header:k="v" ... task={...}`,
/// or with `ERROR ...` in place of metadata and task.
fn text_line(line: &RecordLine<'_>) -> String {
    let mut out = format!("{}/{}@{}", line.topic, line.partition, line.offset);
    match (&line.key, &line.key_hex) {
        (Some(key), _) => out.push_str(&format!(" key={key:?}")),
        (None, Some(hex)) => out.push_str(&format!(" key_hex={hex}")),
        (None, None) => out.push_str(" key=null"),
    }
    if let Some(error) = &line.error {
        out.push_str(&format!(" ERROR {error}"));
    }
    if let Some(m) = &line.metadata {
        out.push_str(&format!(
            " timestamp_millis={} source_application_id={:?} source_instance_id={:?} retry_count={} scheduled_time_millis={}",
            m.timestamp_millis, m.source_application_id, m.source_instance_id, m.retry_count, m.scheduled_time_millis
        ));
    }
    for header in &line.headers {
        match (header.value, &header.value_hex) {
            (Some(text), _) => out.push_str(&format!(" header:{}={text:?}", header.key)),
            (None, Some(hex)) => out.push_str(&format!(" header:{}=hex:{hex}", header.key)),
            (None, None) => out.push_str(&format!(" header:{}=null", header.key)),
        }
    }
    if let Some(task) = &line.task {
        out.push_str(&format!(" task={}", task.get()));
    }
    if let Some(hex) = &line.value_hex {
        out.push_str(&format!(" value_hex={hex}"));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use decaton_protocol::{encode_metadata, ChatOp, OpType};
    use prost::Message as _;

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

    fn chat_op_type() -> TaskType {
        let pool =
            prost_reflect::DescriptorPool::decode(decaton_protocol::FILE_DESCRIPTOR_SET).unwrap();
        TaskType::find(&pool, crate::schema::DEFAULT_TYPE).unwrap()
    }

    fn record<'a>(
        partition: i32,
        offset: i64,
        key: Option<&'a [u8]>,
        headers: Vec<(&'a str, Option<&'a [u8]>)>,
    ) -> Record<'a> {
        Record {
            topic: "t",
            partition,
            offset,
            timestamp: None,
            key,
            headers: headers.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        }
    }

    #[test]
    fn json_line_has_metadata_headers_and_task() {
        let header = encode_metadata(&metadata());
        let value = chat_op().encode_to_vec();
        let decoded = decode_record(Some(&header), Some(&value));
        let headers = vec![
            ("trace-id", Some(&b"abc"[..])),
            (METADATA_HEADER, Some(&header[..])),
            ("bin", Some(&[0xff, 0x01][..])),
            ("empty", None),
        ];
        let r = record(2, 40, Some(b"u1"), headers);
        let line = render_record(&r, &decoded, &chat_op_type(), Format::Json);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["topic"], "t");
        assert_eq!(v["partition"], 2);
        assert_eq!(v["offset"], 40);
        assert_eq!(v["key"], "u1");
        assert_eq!(v["metadata"]["source_application_id"], "talk");
        assert_eq!(v["metadata"]["retry_count"], 2);
        assert_eq!(v["metadata"]["scheduled_time_millis"], 1_700_000_060_000i64);
        assert_eq!(
            v["headers"],
            serde_json::json!([{"key":"trace-id","value":"abc"},{"key":"bin","value_hex":"ff01"},{"key":"empty"}])
        );
        assert_eq!(v["task"]["op"], "OP_TYPE_READ");
        assert_eq!(v["task"]["sequence"], 9);
        assert!(v.get("value_hex").is_none());

        let text = render_record(&r, &decoded, &chat_op_type(), Format::Text);
        assert!(
            text.contains(r#" header:trace-id="abc" header:bin=hex:ff01 header:empty=null task={"#),
            "{text}"
        );
    }

    #[test]
    fn other_messages_print_as_hex() {
        let header = encode_metadata(&metadata());
        // Field 9 is not a ChatOp field: it decodes (kept as unknown), so it is no ChatOp.
        let value = [0x48, 0x01];
        let decoded = decode_record(Some(&header), Some(&value));
        let r = record(0, 1, None, vec![]);
        let line = render_record(&r, &decoded, &chat_op_type(), Format::Text);
        assert!(
            line.starts_with("t/0@1 key=null timestamp_millis=1700000000000"),
            "{line}"
        );
        assert!(line.ends_with(" value_hex=4801"), "{line}");
        let json = render_record(&r, &decoded, &chat_op_type(), Format::Json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(
            v["task_error"].as_str().unwrap().contains("field number 9"),
            "{json}"
        );
    }

    #[test]
    fn undecodable_records_give_an_error_line() {
        let decoded = decode_record(Some(&[0xff]), Some(b"x"));
        let r = record(3, 7, Some(&[0xc3, 0x28]), vec![]);
        let text = render_record(&r, &decoded, &chat_op_type(), Format::Text);
        assert!(
            text.starts_with(
                "t/3@7 key_hex=c328 ERROR cannot decode task record: invalid dt_meta header"
            ),
            "{text}"
        );
        let r = record(3, 7, None, vec![]);
        let json = render_record(&r, &decoded, &chat_op_type(), Format::Json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["offset"], 7);
        assert!(v["error"]
            .as_str()
            .unwrap()
            .contains("invalid dt_meta header"));
        assert!(v.get("metadata").is_none());
    }

    #[test]
    fn start_positions_parse() {
        assert_eq!("beginning".parse(), Ok(StartAt::Beginning));
        assert_eq!("end".parse(), Ok(StartAt::End));
        assert_eq!("offset:12".parse(), Ok(StartAt::Offset(12)));
        assert_eq!(
            "timestamp:1700000000000".parse(),
            Ok(StartAt::Timestamp(1_700_000_000_000))
        );
        for bad in ["", "start", "offset:", "offset:-1", "timestamp:x", "offset"] {
            assert!(bad.parse::<StartAt>().is_err(), "{bad}");
        }
    }
}
