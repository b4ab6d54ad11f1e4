//! The half of an assigned partition that lanes and completions use.
//!
//! A [`PartitionCore`] holds the partition's offset tracker and the counts of dispatched
//! and running tasks, behind one lock, reachable only through its methods. Lanes ask it
//! whether a task may start and report when it is over; the consumer thread registers
//! fetched records, reads the commit point and, at revocation, closes it: from then on no
//! task starts and a late completion marks nothing done. A throttled partition asks to be
//! woken, so the first completion that frees room tells the consumer thread.
//!
//! Closing also ends every wait on the partition's behalf (see [`PartitionCore::closed`]),
//! and the core is where a partition *stalls*: an offset whose forwarded copy cannot be
//! written stays unfinished, and health, a gauge and the log say so until it is written.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

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

/// How often a stalled partition logs that it still is.
const STALL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Offsets that cannot finish until a record is written (see [`PartitionCore::stall`]).
#[derive(Default)]
struct Stalls {
    /// Why each stalled offset is held (at most one entry per unfinished offset).
    by_offset: BTreeMap<i64, String>,
    /// When the stall was last logged.
    logged: Option<Instant>,
}

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
    /// Set once, by [`Self::close`].
    closed_tx: watch::Sender<bool>,
    stalls: Mutex<Stalls>,
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
            closed_tx: watch::Sender::new(false),
            stalls: Mutex::new(Stalls::default()),
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
        // Waits on the partition's behalf (a forwarded copy's acknowledgement, a backoff)
        // end now rather than hold the partition's next assignment here.
        self.closed_tx.send_replace(true);
        // The partition's stage instances go with it (outside the lock: they are the
        // user's to drop).
        let instances = self.scoped.lock().take();
        drop(instances);
        // Whoever waits for the abandoned tasks (the next context of this partition) is
        // woken when they end.
        self.wants_wakeup.store(running > 0, Ordering::Release);
        running
    }

    /// Completes once the partition is closed (at once if it is already): every wait on
    /// its behalf selects on this, so revocation ends it promptly.
    pub(crate) async fn closed(&self) {
        let mut rx = self.closed_tx.subscribe();
        // The sender lives as long as `self`, so this ends only when closed.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Holds the partition at `offset` because a record written on its behalf cannot be
    /// written (`reason`): the offset stays unfinished, health reports the stall and the
    /// stall gauge is 1 until [`Self::unstall`]. True when the caller should log it: the
    /// first time, then at most once a minute while the partition stays stalled.
    pub(crate) fn stall(&self, offset: i64, reason: &str) -> bool {
        let mut stalls = self.stalls.lock();
        stalls.by_offset.insert(offset, reason.to_string());
        self.recorder.stalled(true);
        let now = Instant::now();
        let log = stalls
            .logged
            .is_none_or(|at| now.duration_since(at) >= STALL_LOG_EVERY);
        if log {
            stalls.logged = Some(now);
        }
        log
    }

    /// `offset` is no longer stalled (its record was written, or the partition closed).
    pub(crate) fn unstall(&self, offset: i64) {
        let mut stalls = self.stalls.lock();
        stalls.by_offset.remove(&offset);
        if stalls.by_offset.is_empty() {
            stalls.logged = None;
            self.recorder.stalled(false);
        }
    }

    /// The lowest stalled offset and why, if any.
    pub(crate) fn stalled(&self) -> Option<(i64, String)> {
        let stalls = self.stalls.lock();
        stalls
            .by_offset
            .first_key_value()
            .map(|(o, r)| (*o, r.clone()))
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

#[cfg(test)]
mod tests {
    use crate::runtime::task::tests::core;
    use metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };
    use parking_lot::Mutex;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Keeps every counter and gauge by name and labels.
    #[derive(Default)]
    struct Captured(Mutex<HashMap<String, Arc<AtomicU64>>>);

    impl Captured {
        fn cell(&self, key: &Key) -> Arc<AtomicU64> {
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            self.0.lock().entry(name).or_default().clone()
        }

        fn read(&self, name: &str) -> Option<u64> {
            self.0.lock().get(name).map(|c| c.load(Ordering::Relaxed))
        }
    }

    impl Recorder for Captured {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.cell(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.cell(key))
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn a_stall_sets_its_gauge_and_forward_failures_count_by_class() {
        let captured = Captured::default();
        let core = metrics::with_local_recorder(&captured, core);
        let gauge = "decaton_partition_stalled{partition=0,subscription=s,topic=t}";
        let gauge_value = || captured.read(gauge).map(f64::from_bits);
        assert_eq!(gauge_value(), Some(0.0));
        core.stall(3, "refused");
        assert_eq!(gauge_value(), Some(1.0));
        core.unstall(3);
        assert_eq!(gauge_value(), Some(0.0));
        core.recorder()
            .forward_failed(decaton_protocol::failure::ErrorClass::Permanent);
        let permanent =
            "decaton_forward_failures_total{class=permanent,partition=0,subscription=s,topic=t}";
        assert_eq!(captured.read(permanent), Some(1));
        let transient =
            "decaton_forward_failures_total{class=transient,partition=0,subscription=s,topic=t}";
        assert_eq!(captured.read(transient), Some(0));
    }

    #[tokio::test]
    async fn closing_ends_every_wait_on_the_partition() {
        let core = core();
        let waiter = tokio::spawn({
            let core = core.clone();
            async move { core.closed().await }
        });
        assert!(!waiter.is_finished());
        core.close();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a wait started before the close ends")
            .unwrap();
        // One started after the close ends at once.
        tokio::time::timeout(Duration::from_secs(5), core.closed())
            .await
            .expect("a wait started after the close ends");
    }

    #[test]
    fn a_stall_is_reported_at_its_lowest_offset_and_logged_once_a_minute() {
        let core = core();
        assert_eq!(core.stalled(), None);
        assert!(core.stall(9, "nine"), "the first stall is logged");
        assert!(!core.stall(9, "nine again"), "not again within a minute");
        assert!(!core.stall(4, "four"));
        assert_eq!(core.stalled(), Some((4, "four".to_string())));
        core.unstall(4);
        assert_eq!(core.stalled(), Some((9, "nine again".to_string())));
        core.unstall(9);
        assert_eq!(core.stalled(), None);
        assert!(core.stall(9, "nine"), "a new stall is logged again");
    }
}
