//! `decaton put`: enqueue tasks through [`TaskClient`], so they carry the same `dt_meta`
//! header, key and acknowledgement guarantees as a service's own puts.
//!
//! One task is given as proto3 JSON of the task type (`--json`, see [`crate::schema`]) or
//! as the raw bytes of a file (`--file`), which become the record value unchanged. Many
//! tasks come as NDJSON on stdin (`--ndjson`), one `{"key": "...", "task": {...}}` per
//! line, or with `--key-field F` one task per line keyed by its top-level field `F`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use decaton_client::{Delivered, PutOptions, TaskClient};
use futures::stream::{FuturesUnordered, StreamExt as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};

use crate::options::KafkaArgs;
use crate::schema::{SchemaArgs, TaskType};

/// Arguments of `decaton put`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("task").required(true).args(["json", "file", "ndjson"])))]
pub struct PutArgs {
    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    schema: SchemaArgs,

    /// Topic to enqueue on. It must exist, unless `--create-topic`.
    #[arg(long)]
    topic: String,

    /// Let the broker create `--topic` if it does not exist (with the broker's default
    /// partition count, where its `auto.create.topics.enable` allows it). Without it, a
    /// missing topic is an error: a misspelt name does not quietly become a new topic.
    #[arg(long)]
    create_topic: bool,

    /// Record key: the ordering key, usually the user id (with `--json` and `--file`).
    #[arg(long, required_unless_present = "ndjson", conflicts_with = "ndjson")]
    key: Option<String>,

    /// The task as proto3 JSON of `--type`, e.g.
    /// '{"user_id":"u1","op":"OP_TYPE_SEND_MESSAGE","payload":"aGk="}'.
    #[arg(long, value_name = "JSON")]
    json: Option<String>,

    /// A file whose bytes are sent as the task unchanged (any serialized protobuf).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,

    /// Read tasks from stdin, one JSON object per line: `{"key":"...","task":{...}}`, or
    /// the task itself with `--key-field`. Prints `put=N failed=M` at the end and fails
    /// if any line failed; each failed line is reported on stderr with its number.
    #[arg(long)]
    ndjson: bool,

    /// With `--ndjson`: each line is the task itself, and its top-level field of this
    /// name (a string or number) is the key.
    #[arg(long, value_name = "FIELD", requires = "ndjson")]
    key_field: Option<String>,

    /// With `--ndjson`: how many puts may await the broker's acknowledgement at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,

    /// Do not process the task before this time (milliseconds since the Unix epoch).
    #[arg(long, value_name = "MILLIS", value_parser = clap::value_parser!(i64).range(0..))]
    scheduled_at_ms: Option<i64>,

    /// Application id written into the task's metadata.
    #[arg(long, default_value = "decaton-cli")]
    application_id: String,

    /// Instance id written into the task's metadata (default: the host name).
    #[arg(long)]
    instance_id: Option<String>,
}

/// Runs `decaton put`: prints `partition=P offset=O` once the broker has the task, or
/// with `--ndjson` a `put=N failed=M` summary.
pub async fn run(args: PutArgs) -> anyhow::Result<()> {
    let scheduled_time = match args.scheduled_at_ms {
        Some(ms) => Some(
            u64::try_from(ms)
                .ok()
                .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
                .context("--scheduled-at-ms is out of range")?,
        ),
        None => None,
    };
    let mut options = PutOptions::default();
    options.scheduled_time = scheduled_time;
    if !args.create_topic {
        let (kafka, topic) = (args.kafka.clone(), args.topic.clone());
        let exists =
            tokio::task::spawn_blocking(move || crate::options::topic_exists(&kafka, &topic))
                .await
                .context("the topic lookup stopped")??;
        if !exists {
            anyhow::bail!(
                "topic {} does not exist on {} (check the name, or pass --create-topic to \
                 let the broker create it)",
                args.topic,
                args.kafka.bootstrap
            );
        }
    }
    if args.ndjson {
        let task_type = args.schema.load()?;
        let client = client(&args)?;
        let result = put_ndjson(&args, &task_type, &client, options).await;
        client.close().await.context("closing the producer")?;
        return result;
    }
    let bytes = match (&args.json, &args.file) {
        (Some(json), None) => args.schema.load()?.encode_json(json)?,
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        // clap's argument group already demands exactly one of them.
        _ => anyhow::bail!("give exactly one of --json, --file and --ndjson"),
    };
    let key = args.key.as_deref().context("--key is required")?;
    let client = client(&args)?;
    let delivered = client
        .put_with(key, &RawTask(bytes), options)
        .await
        .with_context(|| format!("putting a task on {}", args.topic));
    client.close().await.context("closing the producer")?;
    let delivered = delivered?;
    println!(
        "partition={} offset={}",
        delivered.partition, delivered.offset
    );
    Ok(())
}

fn client(args: &PutArgs) -> anyhow::Result<TaskClient<RawTask>> {
    let mut builder = TaskClient::<RawTask>::builder(&args.kafka.bootstrap, &args.topic)
        .application_id(&args.application_id);
    if let Some(id) = &args.instance_id {
        builder = builder.instance_id(id);
    }
    for (key, value) in &args.kafka.properties {
        builder = builder.set(key, value);
    }
    builder.build().context("creating the producer")
}

/// Puts every NDJSON line of stdin, at most `--concurrency` at a time.
async fn put_ndjson(
    args: &PutArgs,
    task_type: &TaskType,
    client: &TaskClient<RawTask>,
    options: PutOptions,
) -> anyhow::Result<()> {
    let progress = progress_bar();
    let report = |line: u64, error: &anyhow::Error| {
        progress.suspend(|| eprintln!("decaton: line {line}: {error:#}"));
    };
    let concurrency = args.concurrency as usize;
    let mut lines = stdin_lines();
    let mut in_flight = FuturesUnordered::new();
    let mut line_no = 0u64;
    // (put, failed)
    let mut tally = (0u64, 0u64);
    let settle =
        |tally: &mut (u64, u64), (line, result): (u64, anyhow::Result<Delivered>)| match result {
            Ok(_) => {
                tally.0 += 1;
                progress.inc(1);
            }
            Err(e) => {
                tally.1 += 1;
                report(line, &e);
            }
        };
    // Acknowledgements are handled while waiting for input, so a slow producer on stdin
    // (`tail -f events | decaton put --ndjson`) sees each task sent as its line arrives.
    loop {
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => settle(&mut tally, done),
            line = lines.recv(), if in_flight.len() < concurrency => {
                let Some(line) = line else { break };
                let line = line.context("reading stdin")?;
                line_no += 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match parse_line(&line, task_type, args.key_field.as_deref()) {
                    Ok((key, bytes)) => {
                        let line = line_no;
                        in_flight.push(async move {
                            let result = client
                                .put_with(key, &RawTask(bytes), options)
                                .await
                                .context("put failed");
                            (line, result)
                        });
                    }
                    Err(e) => {
                        tally.1 += 1;
                        report(line_no, &e);
                    }
                }
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(&mut tally, done);
    }
    progress.finish_and_clear();
    let (put, failed) = tally;
    println!("put={put} failed={failed}");
    anyhow::ensure!(failed == 0, "{failed} of {} tasks failed", put + failed);
    Ok(())
}

/// The lines of stdin, read on a thread of their own (stdin reads block).
fn stdin_lines() -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            match std::io::BufRead::read_until(&mut stdin, b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if tx.blocking_send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

/// A counter on stderr, drawn only when stderr is a terminal.
fn progress_bar() -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {pos} tasks put ({per_sec}) {elapsed}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The key and task bytes of one NDJSON line.
fn parse_line(
    line: &[u8],
    task_type: &TaskType,
    key_field: Option<&str>,
) -> anyhow::Result<(String, Vec<u8>)> {
    let value: serde_json::Value = serde_json::from_slice(line).context("not JSON")?;
    let serde_json::Value::Object(mut object) = value else {
        anyhow::bail!("expected a JSON object");
    };
    let (key, task) = match key_field {
        Some(field) => {
            let key = object
                .get(field)
                .with_context(|| format!("no key field {field:?}"))?;
            (key_text(key, field)?, serde_json::Value::Object(object))
        }
        None => {
            let key = object
                .get("key")
                .context("no \"key\" (use --key-field to key by a field of the task)")?;
            let key = key_text(key, "key")?;
            let task = object.remove("task").context("no \"task\"")?;
            if let Some(other) = object.keys().find(|k| *k != "key") {
                anyhow::bail!("unexpected field {other:?} beside \"key\" and \"task\"");
            }
            (key, task)
        }
    };
    Ok((key, task_type.encode_value(task)?))
}

/// A key given as a JSON string or number.
fn key_text(value: &serde_json::Value, field: &str) -> anyhow::Result<String> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => anyhow::bail!("{field:?} must be a string or a number, not {other}"),
    }
}

/// Task bytes that are already serialized: "encoding" writes them verbatim, so they reach
/// the record value unchanged whatever message they hold (or even if they are no valid
/// protobuf at all). Only ever encoded; decoding into it keeps nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RawTask(Vec<u8>);

impl prost::Message for RawTask {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn chat_op_type() -> TaskType {
        let pool =
            prost_reflect::DescriptorPool::decode(decaton_protocol::FILE_DESCRIPTOR_SET).unwrap();
        TaskType::find(&pool, crate::schema::DEFAULT_TYPE).unwrap()
    }

    #[test]
    fn ndjson_lines_give_key_and_task() {
        let t = chat_op_type();
        let (key, bytes) = parse_line(
            br#"{"key":"u1","task":{"user_id":"u1","sequence":3}}"#,
            &t,
            None,
        )
        .unwrap();
        assert_eq!(key, "u1");
        let op = decaton_protocol::ChatOp::decode(bytes.as_slice()).unwrap();
        assert_eq!((op.user_id.as_str(), op.sequence), ("u1", 3));

        let (key, _) =
            parse_line(br#"{"user_id":"u7","sequence":3}"#, &t, Some("sequence")).unwrap();
        assert_eq!(key, "3");

        for (line, field, expected) in [
            (&b"{"[..], None, "not JSON"),
            (br#"[1]"#, None, "expected a JSON object"),
            (br#"{"task":{}}"#, None, "no \"key\""),
            (br#"{"key":"k"}"#, None, "no \"task\""),
            (
                br#"{"key":"k","task":{},"x":1}"#,
                None,
                "unexpected field \"x\"",
            ),
            (
                br#"{"key":null,"task":{}}"#,
                None,
                "must be a string or a number",
            ),
            (br#"{"key":"k","task":{"usr":1}}"#, None, "usr"),
            (br#"{"user_id":"u"}"#, Some("uid"), "no key field \"uid\""),
        ] {
            let e = format!("{:#}", parse_line(line, &t, field).unwrap_err());
            assert!(e.contains(expected), "{e}");
        }
    }

    #[test]
    fn raw_task_encodes_verbatim() {
        // Not valid protobuf (0xff is a truncated varint key): must still pass unchanged.
        let bytes = vec![0xff, 0x00, 0x01, 0x02];
        let task = RawTask(bytes.clone());
        assert_eq!(task.encode_to_vec(), bytes);
        assert_eq!(task.encoded_len(), 4);
        assert_eq!(RawTask(Vec::new()).encode_to_vec(), Vec::<u8>::new());
    }
}
