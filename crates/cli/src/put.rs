//! `decaton put`: enqueue one task through [`TaskClient`], so it carries the same
//! `dt_meta` header, key and acknowledgement guarantees as a service's own puts.
//!
//! The task is either the example [`ChatOp`](decaton_protocol::ChatOp) written as JSON
//! (`--json`, see [`crate::json`]) or the raw bytes of a file (`--file`), which become the
//! record value unchanged — any serialized protobuf, for any processor.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use decaton_client::{Delivered, PutOptions, TaskClient};
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};

use crate::json::chat_op_from_json;
use crate::options::KafkaArgs;

/// Arguments of `decaton put`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("task").required(true).args(["json", "file"])))]
pub struct PutArgs {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// Topic to enqueue on.
    #[arg(long)]
    topic: String,

    /// Record key: the ordering key, usually the user id.
    #[arg(long)]
    key: String,

    /// The task as ChatOp JSON, e.g. '{"user_id":"u1","op":"SEND_MESSAGE","payload":"hi"}'.
    #[arg(long, value_name = "JSON")]
    json: Option<String>,

    /// A file whose bytes are sent as the task unchanged (any serialized protobuf).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,

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

/// Runs `decaton put`: prints `partition=P offset=O` once the broker has the task.
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
    let options = PutOptions {
        timestamp: None,
        scheduled_time,
    };
    let delivered = match (&args.json, &args.file) {
        (Some(json), None) => send(&args, &chat_op_from_json(json)?, options).await?,
        (None, Some(path)) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            send(&args, &RawTask(bytes), options).await?
        }
        // clap's argument group already demands exactly one of them.
        _ => anyhow::bail!("give exactly one of --json and --file"),
    };
    println!(
        "partition={} offset={}",
        delivered.partition, delivered.offset
    );
    Ok(())
}

async fn send<T: prost::Message>(
    args: &PutArgs,
    task: &T,
    options: PutOptions,
) -> anyhow::Result<Delivered> {
    let mut builder = TaskClient::<T>::builder(&args.kafka.bootstrap, &args.topic)
        .application_id(&args.application_id);
    if let Some(id) = &args.instance_id {
        builder = builder.instance_id(id);
    }
    for (key, value) in &args.kafka.properties {
        builder = builder.set(key, value);
    }
    let client = builder.build().context("creating the producer")?;
    let delivered = client
        .put_with(&args.key, task, options)
        .await
        .with_context(|| format!("putting a task on {}", args.topic))?;
    client.close().await.context("closing the producer")?;
    Ok(delivered)
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
mod tests {
    use super::*;
    use prost::Message as _;

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
