//! The half of an assigned partition that lanes and completions use.
//!
//! A [`PartitionCore`] holds the partition's offset tracker and the counts of dispatched
//! and running tasks, behind one lock, reachable only through its methods. Lanes ask it
//! whether a task may start and report when it is over; the consumer thread registers
//! fetched records, reads the commit point and, at revocation, closes it: from then on no
//! task starts and a late completion marks nothing done. A throttled partition asks to be
//! woken, so the first completion that frees room tells the consumer thread.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::offsets::{OffsetTracker, Registration};
use super::recorder::PartitionRecorder;
use super::topics::PartitionId;
use super::wakeup::Wakeup;

struct Inner {
    tracker: OffsetTracker,
    /// Tasks started and not completed.
    running: usize,
    /// Tasks handed to the lanes and not completed nor dropped.
    dispatched: usize,
    /// No new task may start.
    revoked: bool,
    /// Completions are ignored.
    closed: bool,
    /// Records completed so far (for health reports: is the partition moving?).
    completed: u64,
}

/// A chain stage's processor instance owned by this partition (per partition: lane
/// `None`; per lane: its lane), as `Arc<dyn TaskProcessor<T>>`.
pub(crate) type ScopedInstance = Arc<dyn Any + Send + Sync>;

/// Key of a scoped instance: the stage's id and, for a per-lane stage, the lane.
type ScopeKey = (u64, Option<usize>);

/// The half of a partition that lanes and completions use.
pub(crate) struct PartitionCore {
    topic: Arc<str>,
    id: PartitionId,
    inner: Mutex<Inner>,
    changed: Condvar,
    recorder: PartitionRecorder,
    wakeup: Arc<Wakeup>,
    wants_wakeup: AtomicBool,
    /// Per-partition and per-lane stage instances; `None` once closed. At most one per
    /// stage and lane.
    scoped: Mutex<Option<HashMap<ScopeKey, ScopedInstance>>>,
}

impl PartitionCore {
    pub(crate) fn new(
        topic: Arc<str>,
        id: PartitionId,
        tracker: OffsetTracker,
        recorder: PartitionRecorder,
        wakeup: Arc<Wakeup>,
    ) -> Self {
        PartitionCore {
            topic,
            id,
            inner: Mutex::new(Inner {
                tracker,
                running: 0,
                dispatched: 0,
                revoked: false,
                closed: false,
                completed: 0,
            }),
            changed: Condvar::new(),
            recorder,
            wakeup,
            wants_wakeup: AtomicBool::new(false),
            scoped: Mutex::new(Some(HashMap::new())),
        }
    }

    /// The instance of `stage` for `lane` (`None`: the partition's), made by `make` the
    /// first time. Once the partition is closed, a task still running gets an instance
    /// of its own that is not kept.
    pub(crate) fn scoped(
        &self,
        stage: u64,
        lane: Option<usize>,
        make: impl FnOnce() -> ScopedInstance,
    ) -> ScopedInstance {
        let mut scoped = self.scoped.lock();
        match scoped.as_mut() {
            Some(map) => map.entry((stage, lane)).or_insert_with(make).clone(),
            None => make(),
        }
    }

    /// Drops the per-lane instances (the lanes are being replaced).
    pub(crate) fn drop_lane_instances(&self) {
        let dropped: Vec<ScopedInstance> = {
            let mut scoped = self.scoped.lock();
            let Some(map) = scoped.as_mut() else {
                return;
            };
            let lanes: Vec<ScopeKey> = map.keys().filter(|(_, l)| l.is_some()).copied().collect();
            lanes.iter().filter_map(|k| map.remove(k)).collect()
        };
        drop(dropped);
    }

    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub(crate) fn partition(&self) -> i32 {
        self.id.partition
    }

    /// Which of the subscription's partitions this is.
    pub(crate) fn id(&self) -> PartitionId {
        self.id
    }

    pub(crate) fn recorder(&self) -> &PartitionRecorder {
        &self.recorder
    }

    /// Called by a lane before starting a task. False if the partition was revoked: the
    /// task must not run (its offset stays unfinished and is redelivered to the next owner).
    pub(crate) fn try_start(&self) -> bool {
        let mut inner = self.inner.lock();
        if inner.revoked {
            inner.dispatched -= 1;
            drop(inner);
            self.changed.notify_all();
            return false;
        }
        inner.running += 1;
        true
    }

    /// A started task is over; `offset` is marked done unless the partition is closed.
    pub(crate) fn finish(&self, offset: i64) {
        let mut inner = self.inner.lock();
        inner.running -= 1;
        inner.dispatched -= 1;
        if !inner.closed {
            inner.tracker.complete(offset);
            inner.completed += 1;
            self.recorder.pending(inner.tracker.unfinished());
        }
        let wake = inner.running == 0 || inner.dispatched == 0;
        drop(inner);
        if wake {
            self.changed.notify_all();
        }
        if self.wants_wakeup.load(Ordering::Acquire) {
            self.wakeup.notify(self.id);
        }
    }

    /// A started task is given up without completing its offset (its partition was
    /// released before its effects could be kept).
    pub(crate) fn release(&self) {
        let mut inner = self.inner.lock();
        inner.running -= 1;
        inner.dispatched -= 1;
        drop(inner);
        self.changed.notify_all();
        if self.wants_wakeup.load(Ordering::Acquire) {
            self.wakeup.notify(self.id);
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.inner.lock().running
    }

    pub(crate) fn register(&self, offset: i64) -> Registration {
        self.inner.lock().tracker.register(offset)
    }

    /// Completes a registered record that needs no task (discarded or skipped).
    pub(crate) fn complete_registered(&self, offset: i64) {
        let mut inner = self.inner.lock();
        inner.tracker.complete(offset);
        inner.completed += 1;
    }

    pub(crate) fn mark_dispatched(&self) {
        let mut inner = self.inner.lock();
        inner.dispatched += 1;
        self.recorder.pending(inner.tracker.unfinished());
    }

    /// Commit position, unfinished tasks, gaps in the offset window (runs of unfinished
    /// offsets below finished ones) and records completed so far, for health reports.
    pub(crate) fn progress(&self) -> (Option<i64>, usize, usize, u64) {
        let inner = self.inner.lock();
        let t = &inner.tracker;
        (
            t.position(),
            t.unfinished(),
            t.done_above_position().count(),
            inner.completed,
        )
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.inner.lock().tracker.in_flight()
    }

    /// The position to commit and, if `map_bytes` is given, the offset map (at most that
    /// long; empty if longer).
    pub(crate) fn commit_point(&self, map_bytes: Option<usize>) -> Option<(i64, String)> {
        let inner = self.inner.lock();
        let position = inner.tracker.position()?;
        let map = map_bytes.map_or_else(String::new, |max| inner.tracker.offset_map(max));
        Some((position, map))
    }

    /// The current commit position.
    #[cfg(test)]
    pub(crate) fn position(&self) -> Option<i64> {
        self.inner.lock().tracker.position()
    }

    /// Whether the partition is being given back (no new task starts).
    pub(crate) fn is_revoked(&self) -> bool {
        self.inner.lock().revoked
    }

    /// Whether the partition was closed: completions count for nothing any more.
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// Stops tasks from starting.
    pub(crate) fn revoke(&self) {
        self.inner.lock().revoked = true;
        self.changed.notify_all();
    }

    /// Waits until no task runs (`drain`: until no dispatched task is left either) or
    /// `deadline` passes; returns whether that happened.
    pub(crate) fn wait_idle(&self, deadline: Instant, drain: bool) -> bool {
        let idle = |i: &Inner| {
            if drain {
                i.dispatched == 0
            } else {
                i.running == 0
            }
        };
        let mut inner = self.inner.lock();
        while !idle(&inner) {
            if self.changed.wait_until(&mut inner, deadline).timed_out() {
                return idle(&inner);
            }
        }
        true
    }

    /// Closes the partition: no task starts and no completion counts any more. Returns how
    /// many tasks are still running (abandoned).
    pub(crate) fn close(&self) -> usize {
        let mut inner = self.inner.lock();
        inner.revoked = true;
        inner.closed = true;
        let running = inner.running;
        drop(inner);
        // The partition's stage instances go with it (outside the lock: they are the
        // user's to drop).
        let instances = self.scoped.lock().take();
        drop(instances);
        // Whoever waits for the abandoned tasks (the next context of this partition) is
        // woken when they end.
        self.wants_wakeup.store(running > 0, Ordering::Release);
        running
    }

    /// Wakes the consumer thread for this partition if it waits for something.
    pub(crate) fn notify_if_waiting(&self) {
        if self.wants_wakeup.load(Ordering::Acquire) {
            self.wakeup.notify(self.id);
        }
    }

    pub(crate) fn set_wants_wakeup(&self, wants: bool) {
        self.wants_wakeup.store(wants, Ordering::Release);
    }

    /// Registers `offset`, dispatches and starts it, as the consumer thread and a lane do.
    #[cfg(test)]
    pub(crate) fn try_start_for_test(&self, offset: i64) -> bool {
        self.register(offset);
        self.mark_dispatched();
        self.try_start()
    }
}
