//! How lanes tell the consumer thread that a throttled partition has room again.
//!
//! The consumer thread blocks in librdkafka's poll, which cannot be interrupted from
//! outside. Instead of polling every few milliseconds and scanning every partition, a
//! partition that is throttled (paused, or waiting for its restore) asks to be woken: the
//! first completion that frees room, or the end of its restore, records the partition
//! here. The consumer thread runs flow control for exactly those partitions, and when every
//! partition it owns is throttled it sleeps on this instead of polling.

use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::topics::PartitionId;

/// Partitions that need the consumer thread's attention; at most one entry per partition.
#[derive(Default)]
pub(crate) struct Wakeup {
    flagged: Mutex<Vec<PartitionId>>,
    cv: Condvar,
}

impl Wakeup {
    /// Records `partition` and wakes a waiting consumer thread.
    pub(crate) fn notify(&self, partition: PartitionId) {
        let mut flagged = self.flagged.lock();
        if !flagged.contains(&partition) {
            flagged.push(partition);
        }
        drop(flagged);
        self.cv.notify_one();
    }

    /// The partitions flagged since the last call (possibly none).
    pub(crate) fn take(&self) -> Vec<PartitionId> {
        std::mem::take(&mut *self.flagged.lock())
    }

    /// Waits up to `timeout` for a partition to be flagged, then takes them.
    pub(crate) fn wait(&self, timeout: Duration) -> Vec<PartitionId> {
        let mut flagged = self.flagged.lock();
        if flagged.is_empty() {
            let _ = self.cv.wait_for(&mut flagged, timeout);
        }
        std::mem::take(&mut *flagged)
    }
}
