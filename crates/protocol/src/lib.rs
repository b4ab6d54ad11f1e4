//! Decaton's wire format.
//!
//! A task record on Kafka is made of three parts:
//!
//! * the **key**: the ordering key (a user id), hashed by the producer to pick the partition;
//! * the **`dt_meta` header**: a serialized [`TaskMetadata`] (creation time, producer
//!   application and instance, retry count, scheduled time);
//! * the **value**: the serialized task, a protobuf message of the application's choosing.
//!
//! Records written by older Decaton producers carry no header; their value is a
//! [`DecatonTaskRequest`](proto::DecatonTaskRequest) envelope holding both the metadata and
//! the task bytes. [`decode_record`] reads either form.
//!
//! Decoding never panics: truncated or garbage bytes give a [`ProtocolError`].
//!
//! ```
//! use decaton_protocol::{decode_record, encode_metadata, TaskMetadata};
//!
//! let meta = TaskMetadata { timestamp_millis: 1_700_000_000_000, source_application_id: "talk".into(), ..Default::default() };
//! let header = encode_metadata(&meta);
//! let task = decode_record(Some(&header), Some(b"task-bytes")).unwrap();
//! assert_eq!(task.metadata, meta);
//! assert_eq!(&*task.task, b"task-bytes");
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use prost::Message;

pub mod failure;
pub mod headers;
mod trace;
pub use trace::{TraceParent, TRACEPARENT_HEADER};

/// The protobuf descriptor set of every message in this crate (`decaton.proto`,
/// `chat.proto`, `changelog.proto`), for handling them by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Code generated from the `.proto` files under `proto/`.
pub mod proto {
    /// Decaton's own messages (`proto/decaton.proto`).
    #[allow(missing_docs)]
    pub mod decaton {
        include!(concat!(env!("OUT_DIR"), "/decaton.protocol.rs"));
    }
    /// The example chat-operation task (`proto/chat.proto`).
    #[allow(missing_docs)]
    pub mod example {
        include!(concat!(env!("OUT_DIR"), "/decaton.example.rs"));
    }
    /// State changelog messages (`proto/changelog.proto`).
    #[allow(missing_docs)]
    pub mod changelog {
        include!(concat!(env!("OUT_DIR"), "/decaton.state.rs"));
    }
    pub use decaton::DecatonTaskRequest;
}

pub use proto::example::{ChatOp, OpType};

/// Metadata carried with every task (Decaton's `TaskMetadataProto`).
pub type TaskMetadata = proto::decaton::TaskMetadataProto;

/// Name of the record header holding the serialized [`TaskMetadata`].
pub const METADATA_HEADER: &str = "dt_meta";

/// Headers a dead-letter record carries next to the original record's own headers, saying
/// why it was dead-lettered and where it came from. Values are UTF-8 text.
pub mod dead_letter {
    /// Every header below starts with this prefix; replaying a record drops them.
    pub const PREFIX: &str = "decaton-dlq-";
    /// The error text of the last failure.
    pub const REASON: &str = "decaton-dlq-reason";
    /// What kind of failure: `error`, `permanent`, `panic`, `timeout`, `leaked`, `retry`,
    /// or `discarded` (the record could not be run: undecodable, or scheduled too far ahead).
    pub const KIND: &str = "decaton-dlq-kind";
    /// How many times the task was delivered to the processor from a topic (retries + 1).
    pub const ATTEMPTS: &str = "decaton-dlq-attempts";
    /// The topic the failing record was read from (the source or the retry topic).
    pub const TOPIC: &str = "decaton-dlq-topic";
    /// Its partition.
    pub const PARTITION: &str = "decaton-dlq-partition";
    /// Its offset.
    pub const OFFSET: &str = "decaton-dlq-offset";
    /// The subscription's source topic: where a replayed task goes back to.
    pub const ORIGIN_TOPIC: &str = "decaton-dlq-origin-topic";
    /// The subscription (consumer group) that gave up on the task.
    pub const SUBSCRIPTION: &str = "decaton-dlq-subscription";
    /// When it was dead-lettered, in milliseconds since the Unix epoch.
    pub const TIME_MILLIS: &str = "decaton-dlq-time-millis";
}

/// Why a record could not be decoded as a task.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The `dt_meta` header is not a valid `TaskMetadataProto`.
    #[error("invalid dt_meta header: {0}")]
    InvalidMetadata(prost::DecodeError),
    /// The record has no `dt_meta` header and its value is not a valid legacy envelope.
    #[error("no dt_meta header and the value is not a legacy DecatonTaskRequest: {0}")]
    InvalidEnvelope(prost::DecodeError),
    /// A legacy envelope without its `metadata` field.
    #[error("legacy DecatonTaskRequest has no metadata")]
    MissingMetadata,
    /// The record has no value (a tombstone): there is no task to run.
    #[error("record has no value")]
    MissingValue,
}

/// A decoded task record: metadata plus the serialized task, borrowed from the record when
/// it carried a `dt_meta` header and owned when it came out of a legacy envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord<'a> {
    /// The task's metadata.
    pub metadata: TaskMetadata,
    /// The serialized task.
    pub task: std::borrow::Cow<'a, [u8]>,
}

/// Serializes metadata into the bytes of a `dt_meta` header.
pub fn encode_metadata(metadata: &TaskMetadata) -> Vec<u8> {
    metadata.encode_to_vec()
}

/// Parses the bytes of a `dt_meta` header.
pub fn decode_metadata(bytes: &[u8]) -> Result<TaskMetadata, ProtocolError> {
    TaskMetadata::decode(bytes).map_err(ProtocolError::InvalidMetadata)
}

/// Builds a legacy envelope (what Decaton producers before the header format wrote as the
/// record value).
pub fn encode_legacy_envelope(metadata: &TaskMetadata, task: &[u8]) -> Vec<u8> {
    proto::DecatonTaskRequest {
        metadata: Some(metadata.clone()),
        serialized_task: task.to_vec(),
    }
    .encode_to_vec()
}

/// Decodes a task record from its `dt_meta` header (if any) and its value.
///
/// With a header, the value is the task as is. Without one, the value must be a legacy
/// [`DecatonTaskRequest`](proto::DecatonTaskRequest) that carries metadata.
pub fn decode_record<'a>(
    metadata_header: Option<&[u8]>,
    value: Option<&'a [u8]>,
) -> Result<TaskRecord<'a>, ProtocolError> {
    let value = value.ok_or(ProtocolError::MissingValue)?;
    match metadata_header {
        Some(header) => Ok(TaskRecord {
            metadata: decode_metadata(header)?,
            task: std::borrow::Cow::Borrowed(value),
        }),
        None => {
            let envelope =
                proto::DecatonTaskRequest::decode(value).map_err(ProtocolError::InvalidEnvelope)?;
            let metadata = envelope.metadata.ok_or(ProtocolError::MissingMetadata)?;
            Ok(TaskRecord {
                metadata,
                task: std::borrow::Cow::Owned(envelope.serialized_task),
            })
        }
    }
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_meta() -> TaskMetadata {
        TaskMetadata {
            timestamp_millis: 1_732_000_000_123,
            source_application_id: "talk-server".into(),
            source_instance_id: "talk-7".into(),
            retry_count: 2,
            scheduled_time_millis: 1_732_000_060_000,
        }
    }

    fn sample_task() -> Vec<u8> {
        ChatOp {
            user_id: "u42".into(),
            op: OpType::SendMessage as i32,
            target_id: "room-9".into(),
            payload: b"hello".to_vec(),
            sequence: 17,
            created_at_millis: 5,
        }
        .encode_to_vec()
    }

    #[test]
    fn header_and_legacy_envelope_decode_to_the_same_task() {
        let meta = sample_meta();
        let task = sample_task();
        let header = encode_metadata(&meta);
        let from_header = decode_record(Some(&header), Some(&task)).unwrap();
        let envelope = encode_legacy_envelope(&meta, &task);
        let from_envelope = decode_record(None, Some(&envelope)).unwrap();
        assert_eq!(from_header, from_envelope);
        assert_eq!(from_header.metadata, meta);
        let op = ChatOp::decode(&*from_envelope.task).unwrap();
        assert_eq!(op.user_id, "u42");
        assert_eq!(op.op(), OpType::SendMessage);
    }

    #[test]
    fn decaton_field_numbers_are_on_the_wire() {
        // timestamp_millis = 1 (varint) -> tag 0x08; retry_count = 4 -> tag 0x20.
        let bytes = encode_metadata(&TaskMetadata {
            timestamp_millis: 1,
            retry_count: 3,
            ..Default::default()
        });
        assert_eq!(bytes, vec![0x08, 0x01, 0x20, 0x03]);
        // envelope: metadata = 1 (length-delimited) -> 0x0a; serialized_task = 2 -> 0x12.
        let env = encode_legacy_envelope(&TaskMetadata::default(), b"x");
        assert_eq!(env, vec![0x0a, 0x00, 0x12, 0x01, b'x']);
    }

    #[test]
    fn missing_value_and_missing_metadata_are_errors() {
        assert_eq!(decode_record(None, None), Err(ProtocolError::MissingValue));
        let env = proto::DecatonTaskRequest {
            metadata: None,
            serialized_task: b"x".to_vec(),
        }
        .encode_to_vec();
        assert_eq!(
            decode_record(None, Some(&env)),
            Err(ProtocolError::MissingMetadata)
        );
    }

    #[test]
    fn truncated_header_is_an_error() {
        let header = encode_metadata(&sample_meta());
        for cut in 1..header.len() {
            // Some prefixes end on a field boundary and are valid (shorter) metadata;
            // the rest must be errors, and none may panic.
            let _ = decode_record(Some(&header[..cut]), Some(b""));
        }
        assert!(matches!(
            decode_record(Some(&header[..header.len() - 1]), Some(b"")),
            Err(ProtocolError::InvalidMetadata(_))
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(header in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..256)),
                                    value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512))) {
            let _ = decode_record(header.as_deref(), value.as_deref());
            if let Some(v) = &value { let _ = ChatOp::decode(v.as_slice()); }
        }

        #[test]
        fn metadata_round_trips(ts in any::<i64>(), app in ".{0,20}", inst in ".{0,20}", retry in any::<i64>(), sched in any::<i64>(),
                                task in proptest::collection::vec(any::<u8>(), 0..64)) {
            let meta = TaskMetadata { timestamp_millis: ts, source_application_id: app, source_instance_id: inst, retry_count: retry, scheduled_time_millis: sched };
            let h = encode_metadata(&meta);
            let d = decode_record(Some(&h), Some(&task)).unwrap();
            prop_assert_eq!(&d.metadata, &meta);
            let env = encode_legacy_envelope(&meta, &task);
            let l = decode_record(None, Some(&env)).unwrap();
            prop_assert_eq!(l, d);
        }
    }
}
