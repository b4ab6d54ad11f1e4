//! A task's metadata as the runtime carries it.
//!
//! Every task record has a `dt_meta` header: three numbers and two ids of the producer
//! (application and instance). The ids are the same for long runs of records, so they
//! are read in place from the header and shared with the task before when they match,
//! instead of being copied into two new strings for every task. The full
//! [`TaskMetadata`] is built only when a processor asks for it.

use std::sync::Arc;

use decaton_protocol::{decode_metadata, ProtocolError, TaskMetadata};
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};

/// The producer's ids of a task, shared by the tasks that carry the same ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct Source {
    application_id: String,
    instance_id: String,
}

/// A task's metadata: its numbers, and its producer's ids shared with other tasks.
#[derive(Clone, Debug, Default)]
pub(crate) struct TaskMeta {
    pub(crate) timestamp_millis: i64,
    pub(crate) retry_count: i64,
    pub(crate) scheduled_time_millis: i64,
    source: Arc<Source>,
}

impl TaskMeta {
    /// The metadata in its wire form, as processors see it.
    pub(crate) fn to_full(&self) -> TaskMetadata {
        TaskMetadata {
            timestamp_millis: self.timestamp_millis,
            source_application_id: self.source.application_id.clone(),
            source_instance_id: self.source.instance_id.clone(),
            retry_count: self.retry_count,
            scheduled_time_millis: self.scheduled_time_millis,
        }
    }
}

impl From<TaskMetadata> for TaskMeta {
    fn from(m: TaskMetadata) -> Self {
        TaskMeta {
            timestamp_millis: m.timestamp_millis,
            retry_count: m.retry_count,
            scheduled_time_millis: m.scheduled_time_millis,
            source: Arc::new(Source {
                application_id: m.source_application_id,
                instance_id: m.source_instance_id,
            }),
        }
    }
}

/// Reads `dt_meta` headers, sharing the producer ids of consecutive tasks. Holds the
/// last ids it saw, nothing more.
#[derive(Default)]
pub(crate) struct MetaReader {
    last: parking_lot::Mutex<Arc<Source>>,
}

impl MetaReader {
    /// The metadata a `dt_meta` header holds; the error is the one `decode_metadata`
    /// gives for the same bytes.
    pub(crate) fn read(&self, header: &[u8]) -> Result<TaskMeta, ProtocolError> {
        let Some(fields) = Fields::read(header) else {
            // Not the plain encoding this reads in place: the full decoder decides.
            return decode_metadata(header).map(TaskMeta::from);
        };
        let source = {
            let mut last = self.last.lock();
            if last.application_id != fields.application_id
                || last.instance_id != fields.instance_id
            {
                *last = Arc::new(Source {
                    application_id: fields.application_id.to_owned(),
                    instance_id: fields.instance_id.to_owned(),
                });
            }
            last.clone()
        };
        Ok(TaskMeta {
            timestamp_millis: fields.timestamp_millis,
            retry_count: fields.retry_count,
            scheduled_time_millis: fields.scheduled_time_millis,
            source,
        })
    }
}

/// The fields of an encoded `TaskMetadataProto`, borrowed from it.
#[derive(Debug, Default, PartialEq)]
struct Fields<'a> {
    timestamp_millis: i64,
    application_id: &'a str,
    instance_id: &'a str,
    retry_count: i64,
    scheduled_time_millis: i64,
}

impl<'a> Fields<'a> {
    /// Reads the fields with protobuf's rules (the last occurrence of a field wins,
    /// unknown fields are skipped); `None` for anything it cannot read, valid or not.
    fn read(mut buf: &'a [u8]) -> Option<Self> {
        let mut f = Fields::default();
        while !buf.is_empty() {
            let (tag, wire_type) = decode_key(&mut buf).ok()?;
            match (tag, wire_type) {
                (1 | 4 | 5, WireType::Varint) => {
                    // int64: the varint's bits as two's complement.
                    let v = decode_varint(&mut buf).ok()? as i64;
                    match tag {
                        1 => f.timestamp_millis = v,
                        4 => f.retry_count = v,
                        _ => f.scheduled_time_millis = v,
                    }
                }
                (2 | 3, WireType::LengthDelimited) => {
                    let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                    if len > buf.len() {
                        return None;
                    }
                    let (text, rest) = buf.split_at(len);
                    buf = rest;
                    let text = std::str::from_utf8(text).ok()?;
                    match tag {
                        2 => f.application_id = text,
                        _ => f.instance_id = text,
                    }
                }
                (1..=5, _) => return None,
                _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?,
            }
        }
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decaton_protocol::encode_metadata;
    use proptest::prelude::*;

    fn metadata() -> impl Strategy<Value = TaskMetadata> {
        (
            any::<i64>(),
            ".{0,12}",
            ".{0,12}",
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(|(t, app, instance, retries, scheduled)| TaskMetadata {
                timestamp_millis: t,
                source_application_id: app,
                source_instance_id: instance,
                retry_count: retries,
                scheduled_time_millis: scheduled,
            })
    }

    /// A varint field of a number `TaskMetadataProto` does not have.
    fn unknown_field(tag: u32, value: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        prost::encoding::encode_key(tag, WireType::Varint, &mut buf);
        prost::encoding::encode_varint(value, &mut buf);
        buf
    }

    fn same(a: &TaskMeta, b: &TaskMetadata) -> bool {
        a.to_full() == *b
    }

    proptest! {
        /// Every header a producer writes is read in place, to what the full decoder reads.
        #[test]
        fn reads_what_producers_write(m in metadata()) {
            let bytes = encode_metadata(&m);
            let fields = Fields::read(&bytes);
            prop_assert!(fields.is_some());
            let read = MetaReader::default().read(&bytes);
            prop_assert!(matches!(&read, Ok(r) if same(r, &m)));
        }

        /// On any bytes (repeated fields, unknown fields, garbage), the reader agrees with
        /// the full decoder: the same metadata, or the same error.
        #[test]
        fn agrees_with_the_full_decoder(
            parts in proptest::collection::vec(
                prop_oneof![
                    metadata().prop_map(|m| encode_metadata(&m)),
                    (6u32..200, any::<u64>()).prop_map(|(tag, v)| unknown_field(tag, v)),
                    proptest::collection::vec(any::<u8>(), 0..12),
                ],
                0..4,
            )
        ) {
            let bytes = parts.concat();
            let full = decode_metadata(&bytes);
            let read = MetaReader::default().read(&bytes);
            match (&full, &read) {
                (Ok(f), Ok(r)) => prop_assert!(same(r, f)),
                (Err(a), Err(b)) => prop_assert_eq!(a, b),
                _ => prop_assert!(false, "full {:?} vs read {:?}", full, read),
            }
        }
    }

    #[test]
    fn consecutive_tasks_of_one_producer_share_its_ids() {
        let reader = MetaReader::default();
        let m = |t, app: &str| TaskMetadata {
            timestamp_millis: t,
            source_application_id: app.into(),
            source_instance_id: "host-1".into(),
            ..Default::default()
        };
        let [a, b, c] =
            [m(1, "talk"), m(2, "talk"), m(3, "push")].map(|m| reader.read(&encode_metadata(&m)));
        let (Ok(a), Ok(b), Ok(c)) = (a, b, c) else {
            panic!("all three headers are valid");
        };
        assert!(Arc::ptr_eq(&a.source, &b.source));
        assert!(!Arc::ptr_eq(&b.source, &c.source));
        assert_eq!((a.timestamp_millis, b.timestamp_millis), (1, 2));
        assert_eq!(c.to_full(), m(3, "push"));
    }
}
