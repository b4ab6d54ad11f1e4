//! A decoded task on its way from its partition to a lane.

use std::sync::Arc;

use decaton_protocol::TraceParent;

use super::forward::RawRecord;
use super::meta::TaskMeta;
use super::partition_core::PartitionCore;
use super::state::TaskState;

/// A decoded task on its way to a lane.
pub(crate) struct TaskUnit<T> {
    pub(crate) partition: Arc<PartitionCore>,
    pub(crate) offset: i64,
    pub(crate) key: Option<Arc<[u8]>>,
    pub(crate) metadata: TaskMeta,
    pub(crate) task: T,
    pub(crate) state: Option<TaskState>,
    /// The producer's trace context (`traceparent` header), if it sent one.
    pub(crate) trace: Option<TraceParent>,
    /// The record as fetched, kept only when the subscription forwards failed tasks to a
    /// retry or dead-letter topic, or shapes tasks.
    pub(crate) raw: Option<Arc<RawRecord>>,
    /// The lane it was dispatched to (bounded mode).
    pub(crate) lane: Option<usize>,
    /// Its key was over its quota when it was fetched, and the quota's callback asked
    /// for it to be shaped.
    pub(crate) over_quota: bool,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runtime::offsets::{DoneRanges, OffsetTracker};
    use crate::runtime::partition_core::PartitionCore;
    use crate::runtime::recorder::SubscriptionRecorder;
    use crate::runtime::wakeup::Wakeup;

    /// A partition core for tests: topic "t", partition 0, position 0.
    pub(crate) fn core() -> Arc<PartitionCore> {
        let rec = SubscriptionRecorder::new(Arc::from("s"), Arc::default());
        Arc::new(PartitionCore::new(
            Arc::from("t"),
            crate::runtime::topics::PartitionId {
                topic: 0,
                partition: 0,
            },
            OffsetTracker::starting_at(Some(0), DoneRanges::default()),
            rec.partition("t", 0),
            Arc::new(Wakeup::default()),
        ))
    }

    /// A task unit at `offset` with `key`, scheduled at `due` (epoch ms; 0 = now).
    pub(crate) fn unit(offset: i64, key: Option<&[u8]>, due: i64) -> TaskUnit<u64> {
        TaskUnit {
            partition: core(),
            offset,
            key: key.map(Arc::from),
            metadata: TaskMeta::from(decaton_protocol::TaskMetadata {
                scheduled_time_millis: due,
                ..Default::default()
            }),
            task: offset as u64,
            state: None,
            trace: None,
            raw: None,
            lane: None,
            over_quota: false,
        }
    }
}
