//! Which protobuf message type a task is, and how it converts to and from JSON.
//!
//! `decaton put` and `decaton tail` work with any task type through reflection
//! ([`prost_reflect`]): the type comes from a descriptor set (`--descriptor-set FILE`, as
//! written by `protoc --include_imports --descriptor_set_out=FILE`), from a `.proto`
//! compiled on the fly with the protoc bundled in this binary (`--proto FILE.proto`), or,
//! when neither is given, from the project's own `.proto` files, embedded at build time.
//! `--type pkg.Msg` names the message (default `decaton.example.ChatOp`).
//!
//! JSON follows protobuf's canonical proto3 JSON mapping: enums by their full name
//! (`"OP_TYPE_SEND_MESSAGE"`) or number, `bytes` as base64, 64-bit integers as numbers or
//! strings. Input accepts both the `.proto` field names and their lowerCamelCase forms;
//! an unknown field is an error, so a typo does not silently send a default. Output uses
//! the `.proto` field names and lists every field, defaults included.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions,
};

/// The descriptor set of the project's own `.proto` files (see `build.rs`).
const BUILTIN_DESCRIPTOR_SET: &[u8] = decaton_protocol::FILE_DESCRIPTOR_SET;

/// The task type when `--type` is not given.
pub const DEFAULT_TYPE: &str = "decaton.example.ChatOp";

/// Where the task's message type comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct SchemaArgs {
    /// A FileDescriptorSet holding the task type and its imports
    /// (`protoc --include_imports --descriptor_set_out=FILE ...`).
    #[arg(long, value_name = "FILE", conflicts_with = "proto")]
    descriptor_set: Option<PathBuf>,

    /// A `.proto` file defining the task type, compiled with the bundled protoc.
    #[arg(long, value_name = "FILE.proto")]
    proto: Option<PathBuf>,

    /// Directory to resolve the `.proto`'s imports in; repeat for several
    /// (default: the directory of `--proto`).
    #[arg(long, value_name = "DIR", requires = "proto")]
    proto_path: Vec<PathBuf>,

    /// The task's message type, fully qualified (`pkg.Msg`); a bare name works when only
    /// one message has it.
    #[arg(long = "type", value_name = "pkg.Msg", default_value = DEFAULT_TYPE)]
    type_name: String,
}

impl SchemaArgs {
    /// Loads the descriptors and finds the message type asked for.
    pub fn load(&self) -> anyhow::Result<TaskType> {
        let pool = match (&self.descriptor_set, &self.proto) {
            (Some(path), _) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                DescriptorPool::decode(bytes.as_slice()).with_context(|| {
                    format!("{} is not a protobuf FileDescriptorSet", path.display())
                })?
            }
            (None, Some(proto)) => compile_proto(proto, &self.proto_path)?,
            (None, None) => DescriptorPool::decode(BUILTIN_DESCRIPTOR_SET)
                .context("decoding the built-in descriptor set")?,
        };
        TaskType::find(&pool, &self.type_name)
    }
}

/// Compiles `proto` into a descriptor pool with the protoc bundled in this binary.
fn compile_proto(proto: &Path, include: &[PathBuf]) -> anyhow::Result<DescriptorPool> {
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .context("the bundled protoc is not available on this platform")?;
    let out = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    let mut command = std::process::Command::new(protoc);
    command.arg("--include_imports");
    command.arg(format!("--descriptor_set_out={}", out.path().display()));
    if include.is_empty() {
        let dir = proto
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        command.arg(format!("--proto_path={}", dir.display()));
    }
    for dir in include {
        command.arg(format!("--proto_path={}", dir.display()));
    }
    command.arg(proto);
    let output = command
        .output()
        .with_context(|| format!("running protoc on {}", proto.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "protoc could not compile {}: {}",
            proto.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let bytes = std::fs::read(out.path()).context("reading protoc's descriptor set")?;
    DescriptorPool::decode(bytes.as_slice()).context("decoding protoc's descriptor set")
}

/// A task's message type: converts JSON to task bytes and back.
#[derive(Debug, Clone)]
pub struct TaskType {
    descriptor: MessageDescriptor,
}

impl TaskType {
    /// The message `name` of `pool`; the error lists the messages the pool has.
    pub fn find(pool: &DescriptorPool, name: &str) -> anyhow::Result<TaskType> {
        let name = name.trim_start_matches('.');
        if let Some(descriptor) = pool.get_message_by_name(name) {
            return Ok(TaskType { descriptor });
        }
        let by_short_name: Vec<MessageDescriptor> =
            pool.all_messages().filter(|m| m.name() == name).collect();
        if let [descriptor] = by_short_name.as_slice() {
            return Ok(TaskType {
                descriptor: descriptor.clone(),
            });
        }
        let mut known: Vec<String> = pool
            .all_messages()
            .map(|m| m.full_name().to_string())
            .filter(|n| !n.starts_with("google.protobuf."))
            .collect();
        known.sort();
        if known.is_empty() {
            anyhow::bail!("no message type {name:?}: the descriptor set defines no messages");
        }
        anyhow::bail!(
            "no message type {name:?} in the descriptor set; it has: {}",
            known.join(", ")
        )
    }

    /// The fully qualified name of the type.
    pub fn name(&self) -> &str {
        self.descriptor.full_name()
    }

    /// Encodes a task given as proto3 JSON text.
    pub fn encode_json(&self, text: &str) -> anyhow::Result<Vec<u8>> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let message = self.deserialize(&mut deserializer)?;
        deserializer
            .end()
            .with_context(|| format!("trailing characters after the {} JSON", self.name()))?;
        Ok(prost::Message::encode_to_vec(&message))
    }

    /// Encodes a task given as an already parsed JSON value.
    pub fn encode_value(&self, value: serde_json::Value) -> anyhow::Result<Vec<u8>> {
        let message = self.deserialize(value)?;
        Ok(prost::Message::encode_to_vec(&message))
    }

    fn deserialize<'de, D>(&self, deserializer: D) -> anyhow::Result<DynamicMessage>
    where
        D: serde::Deserializer<'de>,
        D::Error: std::error::Error + Send + Sync + 'static,
    {
        DynamicMessage::deserialize_with_options(
            self.descriptor.clone(),
            deserializer,
            &DeserializeOptions::new().deny_unknown_fields(true),
        )
        .with_context(|| format!("not a valid {} in proto3 JSON", self.name()))
    }

    /// The task bytes as JSON text (fields in `.proto` order), if they are a message of this type: they must decode, and
    /// carry no field the type does not define (protobuf decoding alone accepts almost
    /// any bytes, skipping what it does not know).
    pub fn decode_to_json(&self, bytes: &[u8]) -> Result<Box<serde_json::value::RawValue>, String> {
        let message = DynamicMessage::decode(self.descriptor.clone(), bytes)
            .map_err(|e| format!("not a {}: {e}", self.name()))?;
        if let Some(unknown) = message.unknown_fields().next() {
            return Err(format!(
                "not a {}: it has field number {}, which the type does not define",
                self.name(),
                unknown.number()
            ));
        }
        let options = SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(false)
            .stringify_64_bit_integers(false);
        let mut serializer = serde_json::Serializer::new(Vec::new());
        message
            .serialize_with_options(&mut serializer, &options)
            .map_err(|e| format!("cannot print the {} as JSON: {e}", self.name()))?;
        String::from_utf8(serializer.into_inner())
            .map_err(|e| e.to_string())
            .and_then(|text| {
                serde_json::value::RawValue::from_string(text).map_err(|e| e.to_string())
            })
            .map_err(|e| format!("cannot print the {} as JSON: {e}", self.name()))
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use decaton_protocol::{ChatOp, OpType};
    use prost::Message as _;

    fn chat_op_type() -> TaskType {
        let pool = DescriptorPool::decode(BUILTIN_DESCRIPTOR_SET).unwrap();
        TaskType::find(&pool, DEFAULT_TYPE).unwrap()
    }

    #[test]
    fn json_round_trips_through_the_generated_type() {
        let t = chat_op_type();
        let bytes = t
            .encode_json(r#"{"user_id":"u1","op":"OP_TYPE_READ","payload":"/w==","sequence":"9","createdAtMillis":5}"#)
            .unwrap();
        let op = ChatOp::decode(bytes.as_slice()).unwrap();
        assert_eq!(op.user_id, "u1");
        assert_eq!(op.op, OpType::Read as i32);
        assert_eq!(op.payload, vec![0xff]);
        assert_eq!(op.sequence, 9);
        assert_eq!(op.created_at_millis, 5);
        assert_eq!(
            t.decode_to_json(&bytes).unwrap().get(),
            r#"{"user_id":"u1","op":"OP_TYPE_READ","target_id":"","payload":"/w==","sequence":9,"created_at_millis":5}"#
        );
    }

    #[test]
    fn errors_name_the_field_and_the_type() {
        let t = chat_op_type();
        let e = format!("{:#}", t.encode_json(r#"{"usr_id":"u1"}"#).unwrap_err());
        assert!(
            e.contains("decaton.example.ChatOp") && e.contains("usr_id"),
            "{e}"
        );
        let e = format!("{:#}", t.encode_json(r#"{"op":"SEND"}"#).unwrap_err());
        assert!(e.contains("SEND"), "{e}");
        // Field 9 is not a ChatOp field.
        let e = t.decode_to_json(&[0x48, 0x01]).unwrap_err();
        assert!(e.contains("field number 9"), "{e}");
    }

    #[test]
    fn an_unknown_type_lists_the_known_ones() {
        let pool = DescriptorPool::decode(BUILTIN_DESCRIPTOR_SET).unwrap();
        let e = TaskType::find(&pool, "decaton.example.Nope")
            .unwrap_err()
            .to_string();
        assert!(e.contains("decaton.example.ChatOp"), "{e}");
        assert_eq!(
            TaskType::find(&pool, "ChatOp").unwrap().name(),
            DEFAULT_TYPE
        );
    }
}
