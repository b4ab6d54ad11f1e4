//! One assigned partition: the single owner of its offsets, flow control and state slot.
//!
//! A [`PartitionContext`] lives on the consumer thread from assignment to release. It alone
//! owns the partition's overflow queue, pause flag, delay queue, lanes, last commit and
//! state slot. The part that lanes and completions touch — the offset tracker and the
//! counts of dispatched and running tasks — is its [`PartitionCore`], shared with them
//! behind a lock and reachable only through methods.
//!
//! Release is a fence. Revocation first stops tasks from starting ([`PartitionCore::revoke`]),
//! waits for running ones up to a timeout, then closes the core
//! ([`PartitionCore::close`]): from then on a late completion marks nothing done, so
//! nothing is committed for a partition this instance no longer owns; its state slot is
//! fenced the same way. If tasks were still running (abandoned), the closed core stays
//! around as the *predecessor* of the partition's next context in this process, which
//! starts no task until those have ended: one key never runs twice at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::delay::DelayQueue;
use super::extract::Incoming;
use super::lanes::Lanes;
use super::offsets::{OffsetTracker, Registration};
use super::pipeline::TaskUnit;
use super::recorder::{PartitionRecorder, SubscriptionRecorder};
use super::state::StateSlot;
use super::wakeup::Wakeup;

/// Pauses and resumes fetching of one partition (the consumer, or a test double).
pub(crate) trait PauseControl {
    fn set_paused(&self, partition: i32, paused: bool);
}

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
}

/// The half of a partition that lanes and completions use.
pub(crate) struct PartitionCore {
    topic: Arc<str>,
    partition: i32,
    inner: Mutex<Inner>,
    changed: Condvar,
    recorder: PartitionRecorder,
    wakeup: Arc<Wakeup>,
    wants_wakeup: AtomicBool,
}

impl PartitionCore {
    pub(crate) fn new(
        topic: Arc<str>,
        partition: i32,
        tracker: OffsetTracker,
        recorder: PartitionRecorder,
        wakeup: Arc<Wakeup>,
    ) -> Self {
        PartitionCore {
            topic,
            partition,
            inner: Mutex::new(Inner {
                tracker,
                running: 0,
                dispatched: 0,
                revoked: false,
                closed: false,
            }),
            changed: Condvar::new(),
            recorder,
            wakeup,
            wants_wakeup: AtomicBool::new(false),
        }
    }

    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub(crate) fn partition(&self) -> i32 {
        self.partition
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
            self.recorder.pending(inner.tracker.unfinished());
        }
        let wake = inner.running == 0 || inner.dispatched == 0;
        drop(inner);
        if wake {
            self.changed.notify_all();
        }
        if self.wants_wakeup.load(Ordering::Acquire) {
            self.wakeup.notify(self.partition);
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
            self.wakeup.notify(self.partition);
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.inner.lock().running
    }

    fn register(&self, offset: i64) -> Registration {
        self.inner.lock().tracker.register(offset)
    }

    /// Completes a registered record that needs no task (discarded or skipped).
    fn complete_registered(&self, offset: i64) {
        self.inner.lock().tracker.complete(offset);
    }

    fn mark_dispatched(&self) {
        let mut inner = self.inner.lock();
        inner.dispatched += 1;
        self.recorder.pending(inner.tracker.unfinished());
    }

    fn in_flight(&self) -> usize {
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
    pub(crate) fn position(&self) -> Option<i64> {
        self.inner.lock().tracker.position()
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
        // Whoever waits for the abandoned tasks (the next context of this partition) is
        // woken when they end.
        self.wants_wakeup.store(running > 0, Ordering::Release);
        running
    }

    fn set_wants_wakeup(&self, wants: bool) {
        self.wants_wakeup.store(wants, Ordering::Release);
    }
}

/// One assigned partition, owned by the consumer thread.
pub(crate) struct PartitionContext<T> {
    core: Arc<PartitionCore>,
    lanes: Lanes<T>,
    delayed: DelayQueue<T>,
    /// Fetched records waiting for room under `max_pending` or for readiness; the
    /// partition is paused while it is not empty, so it holds at most what was fetched
    /// before the pause took effect.
    overflow: VecDeque<Incoming<T>>,
    paused: bool,
    max_pending: usize,
    last_committed: Option<(i64, String)>,
    state: Option<Arc<StateSlot>>,
    /// The closed core of this partition's previous assignment here, while its abandoned
    /// tasks still run.
    predecessor: Option<Arc<PartitionCore>>,
}

impl<T: Send + 'static> PartitionContext<T> {
    pub(crate) fn new(
        core: Arc<PartitionCore>,
        lanes: Lanes<T>,
        max_pending: usize,
        last_committed: Option<(i64, String)>,
        state: Option<Arc<StateSlot>>,
        predecessor: Option<Arc<PartitionCore>>,
    ) -> Self {
        PartitionContext {
            core,
            lanes,
            delayed: DelayQueue::default(),
            overflow: VecDeque::new(),
            paused: false,
            max_pending,
            last_committed,
            state,
            predecessor,
        }
    }

    pub(crate) fn core(&self) -> &Arc<PartitionCore> {
        &self.core
    }

    pub(crate) fn state(&self) -> Option<&Arc<StateSlot>> {
        self.state.as_ref()
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    fn is_ready(&mut self) -> bool {
        if self.predecessor.as_ref().is_some_and(|p| p.running() > 0) {
            return false;
        }
        self.predecessor = None;
        self.state.as_ref().is_none_or(|s| s.is_ready())
    }

    fn has_room(&self) -> bool {
        self.core.in_flight() < self.max_pending
    }

    /// Takes one fetched record; true when it had to wait (flow control should run).
    pub(crate) fn offer(&mut self, incoming: Incoming<T>, now_ms: i64) -> bool {
        if self.overflow.is_empty() && self.is_ready() && self.has_room() {
            self.dispatch(incoming, now_ms);
            false
        } else {
            self.overflow.push_back(incoming);
            true
        }
    }

    fn dispatch(&mut self, incoming: Incoming<T>, now_ms: i64) {
        let offset = incoming.offset();
        let recorder = self.core.recorder();
        match self.core.register(offset) {
            Registration::Rewound => {
                recorder.rewound();
                tracing::debug!(topic = %self.core.topic, partition = self.core.partition, offset,
                    "record below the records already taken (the fetch position went back); dropped");
            }
            Registration::Inherited => recorder.skipped(),
            Registration::New => match incoming {
                Incoming::Skip(_) => self.core.complete_registered(offset),
                Incoming::Task(_) if self.state.as_ref().is_some_and(|s| s.is_applied(offset)) => {
                    self.core.complete_registered(offset);
                    recorder.skipped();
                }
                Incoming::Task(unit) => {
                    let before = self.delayed.len();
                    match self.delayed.offer(unit, now_ms) {
                        Some(unit) => self.to_lane(unit),
                        None => recorder
                            .delayed(self.delayed.len(), (self.delayed.len() - before) as i64),
                    }
                }
            },
        }
    }

    fn to_lane(&mut self, mut unit: TaskUnit<T>) {
        unit.state = self.state.as_ref().and_then(|s| s.task_state());
        self.core.mark_dispatched();
        self.lanes.dispatch(unit);
    }

    /// Hands tasks whose scheduled time has come to the lanes.
    pub(crate) fn release_due(&mut self, now_ms: i64) {
        let before = self.delayed.len();
        let due = self.delayed.release_due(now_ms);
        if due.is_empty() {
            return;
        }
        let now = self.delayed.len();
        self.core
            .recorder()
            .delayed(now, now as i64 - before as i64);
        for unit in due {
            self.to_lane(unit);
        }
    }

    /// When the next delayed task is due (epoch milliseconds).
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.delayed.next_due()
    }

    /// Moves waiting records into the lanes while there is room, pauses or resumes
    /// fetching to match; returns whether the partition is throttled.
    pub(crate) fn flow(
        &mut self,
        control: &dyn PauseControl,
        subscription: &SubscriptionRecorder,
        now_ms: i64,
    ) -> bool {
        // Ask for a wakeup first, so a completion between the checks below is not missed.
        self.core.set_wants_wakeup(true);
        let ready = self.is_ready();
        if ready {
            while self.has_room() {
                let Some(incoming) = self.overflow.pop_front() else {
                    break;
                };
                self.dispatch(incoming, now_ms);
            }
        }
        let throttled = !ready || !self.overflow.is_empty() || !self.has_room();
        if throttled != self.paused {
            control.set_paused(self.core.partition, throttled);
            self.paused = throttled;
            subscription.paused(throttled);
        }
        if !throttled {
            self.core.set_wants_wakeup(false);
        }
        throttled
    }

    /// The position and offset map to commit, if they differ from the last commit.
    pub(crate) fn commit_candidate(&self, map_bytes: Option<usize>) -> Option<(i64, String)> {
        let commit = self.core.commit_point(map_bytes)?;
        (self.last_committed.as_ref() != Some(&commit)).then_some(commit)
    }

    pub(crate) fn committed(&mut self, commit: (i64, String)) {
        self.core.recorder().committed(commit.0);
        if let Some(slot) = &self.state {
            slot.forget_applied_below(commit.0);
        }
        self.last_committed = Some(commit);
    }

    /// Forgets the last commit, so the next round sends it again (it failed, or this is
    /// the final commit of a released partition).
    pub(crate) fn forget_committed(&mut self) {
        self.last_committed = None;
    }

    /// After the final commit: records the release and returns the core if tasks are
    /// still running on it (the next context of this partition must wait for them).
    pub(crate) fn into_released(
        self,
        subscription: &SubscriptionRecorder,
    ) -> (Option<Arc<PartitionCore>>, Option<Arc<StateSlot>>) {
        if self.paused {
            subscription.paused(false);
        }
        let waiting = self.delayed.len();
        if waiting > 0 {
            self.core.recorder().delayed(0, -(waiting as i64));
        }
        let running = self.core.running();
        if running > 0 {
            self.core.recorder().abandoned(running);
        }
        let zombie = (running > 0).then(|| self.core.clone());
        (zombie, self.state)
    }
}
