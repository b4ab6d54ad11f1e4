//! From a fetched record to a task: decode, and decide what needs no processing.
//!
//! A record carries its task metadata in the `dt_meta` header (or the legacy envelope)
//! and the serialized task as its value. A record that cannot be decoded, whose key is in
//! `ignore_keys`, or whose scheduled time lies further ahead than `max_scheduled_delay`
//! is discarded: logged, counted in `decaton_tasks_discarded_total`, and its offset
//! completed so the partition moves on. Nothing is dropped silently. When the
//! subscription has a dead-letter topic, a record discarded for being undecodable or
//! scheduled too far ahead goes there first (kind `discarded`), and its offset completes
//! once the broker has it.

use std::sync::Arc;

use decaton_protocol::headers::raw_headers;
use decaton_protocol::{
    decode_record, ProtocolError, TraceParent, METADATA_HEADER, TRACEPARENT_HEADER,
};
use rdkafka::message::{BorrowedMessage, Message};

use super::forward::{Forwarder, RawRecord};
use super::meta::{MetaReader, TaskMeta};
use super::partition_core::PartitionCore;
use super::task::TaskUnit;
use crate::config::ProcessorProperties;
use crate::LiveProperties;

fn key_bytes(keys: &[String]) -> Vec<Vec<u8>> {
    keys.iter().map(|k| k.as_bytes().to_vec()).collect()
}

/// A record's fate once decoded.
pub(crate) enum Incoming<T> {
    Task(TaskUnit<T>),
    /// Completes without running (its key is ignored).
    Skip(i64),
    /// Completes without running, after going to the dead-letter topic when `forward`
    /// says where.
    Discard {
        offset: i64,
        reason: String,
        forward: Option<(Arc<Forwarder>, Arc<RawRecord>)>,
    },
}

impl<T> Incoming<T> {
    /// Attaches the record as fetched to a task, when `raw` gives one, and to a discarded
    /// record when there is a dead-letter topic for it.
    fn with_raw(
        self,
        raw: impl FnOnce() -> Option<Arc<RawRecord>>,
        dead_letter: Option<&Arc<Forwarder>>,
    ) -> Self {
        match self {
            Incoming::Task(mut u) => {
                u.raw = raw();
                Incoming::Task(u)
            }
            Incoming::Discard { offset, reason, .. } => Incoming::Discard {
                offset,
                reason,
                forward: dead_letter.zip(raw()).map(|(f, r)| (f.clone(), r)),
            },
            skip => skip,
        }
    }

    pub(crate) fn offset(&self) -> i64 {
        match self {
            Incoming::Task(u) => u.offset,
            Incoming::Skip(o) | Incoming::Discard { offset: o, .. } => *o,
        }
    }
}

/// Decodes records into tasks of type `T` for one subscription.
pub(crate) struct Extractor {
    /// The ignored keys, and the live-properties version they were read at.
    ignore_keys: parking_lot::Mutex<(u64, Vec<Vec<u8>>)>,
    live: Option<LiveProperties>,
    max_delay_ms: i64,
    /// Keep each task's record as fetched (failed tasks are forwarded).
    keep_raw: bool,
    /// Where discarded records go, when the subscription has a dead-letter topic.
    dead_letter: Option<Arc<Forwarder>>,
    /// Reads `dt_meta` headers (the consumer thread is its only user).
    meta: MetaReader,
}

impl Extractor {
    pub(crate) fn new(
        props: &ProcessorProperties,
        keep_raw: bool,
        dead_letter: Option<Arc<Forwarder>>,
    ) -> Self {
        Extractor {
            ignore_keys: parking_lot::Mutex::new((u64::MAX, key_bytes(&props.ignore_keys))),
            live: None,
            max_delay_ms: i64::try_from(props.max_scheduled_delay.as_millis()).unwrap_or(i64::MAX),
            keep_raw: keep_raw || dead_letter.is_some(),
            dead_letter,
            meta: MetaReader::default(),
        }
    }

    /// Reads `ignore_keys` from `live` from now on.
    pub(crate) fn with_live(mut self, live: LiveProperties) -> Self {
        self.live = Some(live);
        self
    }

    fn is_ignored(&self, key: &[u8]) -> bool {
        let mut cached = self.ignore_keys.lock();
        if let Some(live) = &self.live {
            let version = live.version();
            if cached.0 != version {
                *cached = (version, key_bytes(&live.get().ignore_keys));
            }
        }
        cached.1.iter().any(|i| i.as_slice() == key)
    }

    pub(crate) fn extract<T: prost::Message + Default>(
        &self,
        partition: &Arc<PartitionCore>,
        msg: &BorrowedMessage<'_>,
        now_ms: i64,
    ) -> Incoming<T> {
        // One pass over the headers finds both that matter here (the first of each name).
        // Names are compared as bytes: a producer may write any bytes there.
        let (mut metadata, mut traceparent) = (None, None);
        if let Some(headers) = msg.headers() {
            for h in raw_headers(headers) {
                let value = h.value.unwrap_or_default();
                if metadata.is_none() && h.is(METADATA_HEADER) {
                    metadata = Some(value);
                } else if traceparent.is_none() && h.is(TRACEPARENT_HEADER) {
                    traceparent = Some(value);
                }
            }
        }
        let mut incoming = self
            .extract_parts(
                partition,
                msg.offset(),
                msg.key(),
                metadata,
                msg.payload(),
                now_ms,
            )
            .with_raw(
                || {
                    self.keep_raw
                        .then(|| Arc::new(RawRecord::from_message(msg)))
                },
                self.dead_letter.as_ref(),
            );
        if let Incoming::Task(unit) = &mut incoming {
            unit.trace = traceparent
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(TraceParent::parse);
        }
        incoming
    }

    pub(crate) fn extract_parts<T: prost::Message + Default>(
        &self,
        partition: &Arc<PartitionCore>,
        offset: i64,
        key: Option<&[u8]>,
        header: Option<&[u8]>,
        payload: Option<&[u8]>,
        now_ms: i64,
    ) -> Incoming<T> {
        let discard = |what: &dyn std::fmt::Display| {
            tracing::warn!(topic = %partition.topic(), partition = partition.partition(), offset,
                "discarding record: {what}");
            partition.recorder().discarded();
            Incoming::Discard {
                offset,
                reason: what.to_string(),
                forward: None,
            }
        };
        // With a `dt_meta` header, the value is the task; without one, the value is a
        // legacy envelope holding both.
        let decoded = match (header, payload) {
            (Some(header), Some(value)) => self
                .meta
                .read(header)
                .map(|meta| (meta, std::borrow::Cow::Borrowed(value))),
            (Some(_), None) => Err(ProtocolError::MissingValue),
            (None, _) => decode_record(None, payload).map(|r| (TaskMeta::from(r.metadata), r.task)),
        };
        let (metadata, task_bytes) = match decoded {
            Ok(d) => d,
            Err(e) => return discard(&format_args!("undecodable: {e}")),
        };
        let task = match T::decode(&*task_bytes) {
            Ok(t) => t,
            Err(e) => return discard(&format_args!("undecodable task bytes: {e}")),
        };
        let key = key.filter(|k| !k.is_empty());
        if let Some(k) = key {
            if self.is_ignored(k) {
                partition.recorder().discarded();
                return Incoming::Skip(offset);
            }
        }
        let scheduled = metadata.scheduled_time_millis;
        if scheduled > now_ms.saturating_add(self.max_delay_ms) {
            return discard(&format_args!(
                "scheduled time {scheduled} is more than max_scheduled_delay ({} ms) ahead",
                self.max_delay_ms
            ));
        }
        Incoming::Task(TaskUnit {
            partition: partition.clone(),
            offset,
            key: key.map(Arc::from),
            metadata,
            task,
            state: None,
            trace: None,
            raw: None,
            lane: None,
            over_quota: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::task::tests::core;
    use decaton_protocol::{encode_legacy_envelope, encode_metadata, TaskMetadata};
    use prost::Message as _;

    fn metadata() -> TaskMetadata {
        TaskMetadata {
            timestamp_millis: 1_700_000_000_000,
            source_application_id: "talk".into(),
            source_instance_id: "talk-3".into(),
            retry_count: 1,
            scheduled_time_millis: 0,
        }
    }

    fn extract(header: Option<&[u8]>, payload: Option<&[u8]>) -> Incoming<u64> {
        let extractor = Extractor::new(&ProcessorProperties::default(), false, None);
        extractor.extract_parts(&core(), 7, Some(b"k"), header, payload, 0)
    }

    fn discarded_for(incoming: Incoming<u64>) -> String {
        match incoming {
            Incoming::Discard {
                offset: 7, reason, ..
            } => reason,
            Incoming::Task(u) => panic!("a task at {}, not a discard", u.offset),
            Incoming::Skip(o) => panic!("skipped at {o}, not discarded"),
            Incoming::Discard { offset, .. } => panic!("discarded at {offset}, not 7"),
        }
    }

    #[test]
    fn a_header_record_becomes_a_task_with_its_metadata() {
        let header = encode_metadata(&metadata());
        let value = 42u64.encode_to_vec();
        match extract(Some(&header), Some(&value)) {
            Incoming::Task(u) => {
                assert_eq!((u.offset, u.task), (7, 42));
                assert_eq!(u.metadata.to_full(), metadata());
            }
            _ => panic!("expected a task"),
        }
    }

    #[test]
    fn a_legacy_envelope_becomes_a_task_with_its_metadata() {
        let value = encode_legacy_envelope(&metadata(), &42u64.encode_to_vec());
        match extract(None, Some(&value)) {
            Incoming::Task(u) => {
                assert_eq!(u.task, 42);
                assert_eq!(u.metadata.to_full(), metadata());
            }
            _ => panic!("expected a task"),
        }
    }

    #[test]
    fn records_that_are_no_task_are_discarded_with_the_reason() {
        let header = encode_metadata(&metadata());
        let reason = discarded_for(extract(Some(&header), None));
        assert!(reason.contains("record has no value"), "{reason}");
        let reason = discarded_for(extract(Some(&[0xff, 0xff]), Some(b"")));
        assert!(reason.contains("invalid dt_meta header"), "{reason}");
        let reason = discarded_for(extract(None, Some(&[0x0a, 0x05, 0x01])));
        assert!(
            reason.contains("not a legacy DecatonTaskRequest"),
            "{reason}"
        );
        let reason = discarded_for(extract(Some(&header), Some(&[0x08])));
        assert!(reason.contains("undecodable task bytes"), "{reason}");
    }
}
