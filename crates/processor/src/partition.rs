//! One assigned partition, as shared between the consumer thread and the lanes.
//!
//! The consumer thread registers each dispatched task's offset; a lane asks permission
//! before it starts a task ([`PartitionShared::try_start`]) and reports when the task
//! completes ([`PartitionShared::finish`]). Revocation flips `revoked` (no new task
//! starts), waits for `running` to reach zero, then flips `closed`: from then on a late
//! completion changes nothing, so nothing is ever committed for a partition this
//! instance no longer owns.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::metrics::PartitionMetrics;
use crate::offsets::OffsetTracker;

pub(crate) struct PartitionCore {
    pub(crate) tracker: OffsetTracker,
    /// Tasks started and not completed.
    pub(crate) running: usize,
    /// Tasks handed to the scheduler and not completed nor dropped.
    pub(crate) dispatched: usize,
    /// No new task may start.
    pub(crate) revoked: bool,
    /// Completions are ignored.
    pub(crate) closed: bool,
}

pub(crate) struct PartitionShared {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) core: Mutex<PartitionCore>,
    changed: Condvar,
    pub(crate) metrics: PartitionMetrics,
}

impl PartitionShared {
    pub(crate) fn new(
        subscription: &str,
        topic: Arc<str>,
        partition: i32,
        tracker: OffsetTracker,
    ) -> Self {
        let metrics = PartitionMetrics::new(subscription, &topic, partition);
        PartitionShared {
            topic,
            partition,
            core: Mutex::new(PartitionCore {
                tracker,
                running: 0,
                dispatched: 0,
                revoked: false,
                closed: false,
            }),
            changed: Condvar::new(),
            metrics,
        }
    }

    /// Called by a lane before starting a task. False if the partition was revoked: the
    /// task must not run (its offset stays unfinished and will be redelivered).
    pub(crate) fn try_start(&self) -> bool {
        let mut core = self.core.lock();
        if core.revoked {
            core.dispatched -= 1;
            drop(core);
            self.changed.notify_all();
            return false;
        }
        core.running += 1;
        true
    }

    /// A started task is over; `offset` is marked done unless the partition is closed.
    pub(crate) fn finish(&self, offset: i64) {
        let mut core = self.core.lock();
        core.running -= 1;
        core.dispatched -= 1;
        if !core.closed {
            core.tracker.complete(offset);
            self.metrics.pending.set(core.tracker.unfinished() as f64);
        }
        let wake = core.running == 0 || core.dispatched == 0;
        drop(core);
        if wake {
            self.changed.notify_all();
        }
    }

    /// A task started but given up without completing its offset (partition revoked while
    /// it waited for its scheduled time).
    pub(crate) fn release(&self) {
        let mut core = self.core.lock();
        core.running -= 1;
        core.dispatched -= 1;
        drop(core);
        self.changed.notify_all();
    }

    pub(crate) fn is_revoked(&self) -> bool {
        self.core.lock().revoked
    }

    /// Waits until `pred` holds on the core or `deadline` passes; returns whether it held.
    pub(crate) fn wait_until(
        &self,
        deadline: Instant,
        pred: impl Fn(&PartitionCore) -> bool,
    ) -> bool {
        let mut core = self.core.lock();
        while !pred(&core) {
            if self.changed.wait_until(&mut core, deadline).timed_out() {
                return pred(&core);
            }
        }
        true
    }
}
