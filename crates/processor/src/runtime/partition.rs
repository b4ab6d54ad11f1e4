//! One assigned partition: the single owner of its offsets, flow control and state slot.
//!
//! A [`PartitionContext`] lives on the consumer thread from assignment to release. It alone
//! owns the partition's overflow queue, pause flag, delay queue, lanes, last commit and
//! state slot. The part that lanes and completions touch — the offset tracker and the
//! counts of dispatched and running tasks — is its
//! [`super::partition_core::PartitionCore`], shared with them behind a lock
//! and reachable only through methods.
//!
//! Release is a fence. Revocation first stops tasks from starting (`PartitionCore::revoke`),
//! waits for running ones up to a timeout, then closes the core
//! (`PartitionCore::close`): from then on a late completion marks nothing done, so
//! nothing is committed for a partition this instance no longer owns; its state slot is
//! fenced the same way. If tasks were still running (abandoned), the closed core stays
//! around as the *predecessor* of the partition's next context in this process, which
//! starts no task until those have ended: one key never runs twice at once.

use std::collections::VecDeque;
use std::sync::Arc;

use super::delay::DelayQueue;
use super::extract::Incoming;
use super::forward::Failure;
use super::lanes::Lanes;
use super::offsets::Registration;
use super::partition_core::PartitionCore;
use super::quota::KeyQuota;
use super::rate::{Gate, PartitionRate};
use super::recorder::SubscriptionRecorder;
use super::state::StateSlot;
use super::task::TaskUnit;
use super::topics::PartitionId;
use crate::LiveProperties;

/// Pauses and resumes fetching of one partition (the consumer, or a test double).
pub(crate) trait PauseControl {
    fn set_paused(&self, partition: PartitionId, paused: bool);
}

/// One assigned partition, owned by the consumer thread.
pub(crate) struct PartitionContext<T> {
    core: Arc<PartitionCore>,
    lanes: Lanes<T>,
    delayed: DelayQueue<T>,
    /// Tasks released from the delay queue that wait for a token of the rate (or for the
    /// lanes to change), in the order they must start. Fetched records wait behind them.
    due: VecDeque<TaskUnit<T>>,
    /// Fetched records waiting for room under `max_pending`, for readiness or for the
    /// processing rate. The partition is paused while it holds any record waiting for
    /// room or readiness, and once `max_pending` records wait for the rate, so it holds at
    /// most that plus what was fetched before the pause took effect.
    overflow: VecDeque<Incoming<T>>,
    paused: bool,
    max_pending: usize,
    last_committed: Option<(i64, String)>,
    /// The newest position the broker confirmed as committed: applied state offsets below
    /// it are never redelivered, those at or above it may be.
    confirmed: Option<i64>,
    state: Option<Arc<StateSlot>>,
    /// The closed core of this partition's previous assignment here, while its abandoned
    /// tasks still run.
    predecessor: Option<Arc<PartitionCore>>,
    /// Where `max_pending` and the processing rate are read from while running.
    live: Option<(LiveProperties, u64)>,
    rate: PartitionRate,
    /// When the next token of the rate is due (epoch ms), while a task waits for it.
    rate_due: Option<i64>,
    /// A new number of lanes (`partition_concurrency` changed): nothing is dispatched
    /// until the current lanes are empty and no task of the partition runs (deferred
    /// ones included), then they are replaced.
    resize_to: Option<usize>,
    /// A rate of its own instead of `processing_rate_per_partition` (the shaping topic).
    fixed_rate: Option<i64>,
    /// The per-key quota check (source partitions of a subscription with a quota).
    quota: Option<KeyQuota>,
    /// The log was replaced under the committed position (see [`Self::with_replaced_log`]):
    /// the state store's applied offsets are forgotten before the first record is taken.
    replaced_log: bool,
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
            due: VecDeque::new(),
            overflow: VecDeque::new(),
            paused: false,
            max_pending,
            confirmed: last_committed.as_ref().map(|c| c.0),
            last_committed,
            state,
            predecessor,
            live: None,
            rate: PartitionRate::new(-1),
            rate_due: None,
            resize_to: None,
            fixed_rate: None,
            quota: None,
            replaced_log: false,
        }
    }

    /// Starts tasks at `rate` per second (-1 unlimited) whatever the live processing
    /// rate says.
    pub(crate) fn with_fixed_rate(mut self, rate: i64) -> Self {
        self.fixed_rate = Some(rate);
        self.rate.set(rate);
        self
    }

    /// Checks every task's key against the per-key quota.
    pub(crate) fn with_quota(mut self, quota: KeyQuota) -> Self {
        self.quota = Some(quota);
        if let Some((_, seen)) = &mut self.live {
            *seen = u64::MAX;
        }
        self.refresh();
        self
    }

    /// The committed offset was past the log end and was moved to the new log before the
    /// assignment: the state store's applied offsets belong to the old log (a new record
    /// at one of them must run), so they are forgotten once the store is restored.
    pub(crate) fn with_replaced_log(mut self) -> Self {
        self.replaced_log = true;
        self
    }

    /// Reads `max_pending` and the processing rate from `live` from now on.
    pub(crate) fn with_live(mut self, live: LiveProperties) -> Self {
        self.live = Some((live, u64::MAX));
        self.refresh();
        self
    }

    /// Picks up changed live properties.
    fn refresh(&mut self) {
        let Some((live, seen)) = &mut self.live else {
            return;
        };
        let version = live.version();
        if *seen == version {
            return;
        }
        *seen = version;
        let props = live.get();
        self.max_pending = props.max_pending;
        // The source topic's rate, or the retry topic's own (the shaping topic's is fixed).
        let own = match self.core.id().topic {
            0 => props.processing_rate_per_partition,
            _ => props.retry_processing_rate_per_partition,
        };
        self.rate.set(self.fixed_rate.unwrap_or(own));
        if let Some(q) = &mut self.quota {
            q.set_rate(props.per_key_quota_processing_rate);
        }
        self.rate_due = None;
        let lanes = props.partition_concurrency.max(1);
        self.resize_to = match self.lanes.concurrency() {
            Some(now) if now != lanes => Some(lanes),
            _ => None,
        };
    }

    /// Replaces the lanes once they are empty and no task of the partition is still
    /// running, deferred ones included, when their number changed; whether the partition
    /// may dispatch (no change is waiting). A deferred task may sit in a per-lane stage
    /// (a `Batching` or `Compaction` window): a key moved to another lane, with another
    /// instance of the stage, could otherwise overtake it.
    fn lanes_settled(&mut self) -> bool {
        let Some(lanes) = self.resize_to else {
            return true;
        };
        self.lanes.flush();
        if self.lanes.occupied() > 0 || self.core.running() > 0 {
            return false;
        }
        // Per-lane stage instances belong to the old lanes.
        self.core.drop_lane_instances();
        tracing::info!(topic = %self.core.topic(), partition = self.core.partition(),
            from = self.lanes.concurrency(), to = lanes, "partition lanes changed");
        self.lanes = self.lanes.resized(lanes);
        self.resize_to = None;
        true
    }

    /// Whether `incoming` may go to the lanes now as far as the rate is concerned (a task
    /// takes a token; a record that will not run needs none).
    fn rate_allows(&mut self, incoming: &Incoming<T>, now_ms: i64) -> bool {
        !matches!(incoming, Incoming::Task(_)) || self.take_token(now_ms)
    }

    /// Takes a token of the rate for a task; without one, notes when the next is due.
    fn take_token(&mut self, now_ms: i64) -> bool {
        match self.rate.take() {
            Gate::Open => {
                self.rate_due = None;
                true
            }
            Gate::Wait(d) => {
                let wait = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                self.rate_due = Some(now_ms.saturating_add(wait.max(1)));
                false
            }
            Gate::Stopped => {
                self.rate_due = None;
                false
            }
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

    /// Tasks queued in or run by the lanes now (bounded mode).
    #[cfg(test)]
    pub(crate) fn lanes_occupied(&self) -> usize {
        self.lanes.occupied()
    }

    fn is_ready(&mut self) -> bool {
        if !self.lanes_settled() {
            return false;
        }
        if self.predecessor.as_ref().is_some_and(|p| p.running() > 0) {
            return false;
        }
        self.predecessor = None;
        self.state.as_ref().is_none_or(|s| s.is_ready())
    }

    fn has_room(&self) -> bool {
        self.core.in_flight() < self.max_pending
    }

    /// What health reports show of this partition (as of its last flow control run).
    pub(crate) fn health(&self) -> crate::health::PartitionHealth {
        use crate::health::NotReady;
        let (position, pending, offset_map_gaps, completed) = self.core.progress();
        let stalled = self.core.stalled();
        let not_ready = match self.predecessor.as_ref().map(|p| p.running()) {
            _ if stalled.is_some() => stalled.map(|(offset, reason)| NotReady::Stalled {
                topic: self.core.topic().clone(),
                partition: self.core.partition(),
                offset,
                reason,
            }),
            Some(tasks) if tasks > 0 => Some(NotReady::PredecessorRunning { tasks }),
            _ if self.state.as_ref().is_some_and(|s| !s.is_ready()) => {
                Some(NotReady::RestoringState)
            }
            _ => match self.resize_to {
                Some(to) => Some(NotReady::ChangingLanes {
                    to,
                    tasks: self.lanes.occupied().max(self.core.running()),
                }),
                None => self.rate.is_stopped().then_some(NotReady::Stopped),
            },
        };
        crate::health::PartitionHealth {
            topic: self.core.topic().clone(),
            partition: self.core.partition(),
            position,
            pending,
            delayed: self.delayed.len(),
            completed,
            offset_map_gaps,
            not_ready,
        }
    }

    /// Takes one fetched record; true when it had to wait (flow control should run). A
    /// task it dispatches reaches its lane at the next [`Self::flush`].
    pub(crate) fn offer(&mut self, incoming: Incoming<T>, now_ms: i64) -> bool {
        self.refresh();
        if self.overflow.is_empty()
            && self.due.is_empty()
            && self.is_ready()
            && self.has_room()
            && self.rate_allows(&incoming, now_ms)
        {
            self.dispatch(incoming, now_ms);
            false
        } else {
            self.overflow.push_back(incoming);
            true
        }
    }

    fn dispatch(&mut self, incoming: Incoming<T>, now_ms: i64) {
        // Records are dispatched only once the state store is restored.
        if std::mem::take(&mut self.replaced_log) {
            if let Some(slot) = &self.state {
                slot.forget_applied_below(i64::MAX);
            }
        }
        let offset = incoming.offset();
        let registration = self.core.register(offset);
        if let Registration::Rebased { committed } = registration {
            self.rebased(committed, offset);
        }
        let recorder = self.core.recorder();
        match registration {
            Registration::Rewound => {
                recorder.rewound();
                tracing::debug!(topic = %self.core.topic(), partition = self.core.partition(), offset,
                    "record below the records already taken (the fetch position went back); dropped");
            }
            Registration::Inherited => recorder.skipped(),
            Registration::New | Registration::Rebased { .. } => match incoming {
                Incoming::Skip(_) | Incoming::Discard { forward: None, .. } => {
                    self.core.complete_registered(offset)
                }
                Incoming::Discard {
                    reason,
                    forward: Some((forwarder, raw)),
                    ..
                } => {
                    self.core.mark_dispatched();
                    if self.core.try_start() {
                        let core = self.core.clone();
                        forwarder.spawn(
                            core.clone(),
                            offset,
                            raw,
                            Failure::discarded(reason),
                            move |forwarded| {
                                if forwarded {
                                    core.finish(offset)
                                } else {
                                    core.release()
                                }
                            },
                        );
                    }
                }
                Incoming::Task(_) if self.state.as_ref().is_some_and(|s| s.is_applied(offset)) => {
                    self.core.complete_registered(offset);
                    recorder.skipped();
                }
                Incoming::Task(mut unit) => {
                    if let (Some(q), Some(key)) = (&mut self.quota, &unit.key) {
                        unit.over_quota = q.check(key, self.core.partition(), now_ms);
                    }
                    let before = self.delayed.len();
                    match self.delayed.offer(unit, now_ms) {
                        Some(unit) => self.send_to_lane(unit),
                        None => recorder
                            .delayed(self.delayed.len(), (self.delayed.len() - before) as i64),
                    }
                }
            },
        }
    }

    /// The log was truncated below the committed position `committed` and the consumer
    /// was reset to `offset` (see [`Registration::Rebased`]): the partition commits from
    /// there on (so a restart does not meet the truncation again), and the state store
    /// forgets the applied offsets, which belong to the old log.
    fn rebased(&mut self, committed: i64, offset: i64) {
        tracing::warn!(topic = %self.core.topic(), partition = self.core.partition(), committed, position = offset,
            "the committed offset is past the log end (the log was truncated or recreated); \
             processing from the fetch position, which will be committed");
        self.core.recorder().truncated();
        self.last_committed = None;
        self.confirmed = None;
        if let Some(slot) = &self.state {
            slot.forget_applied_below(i64::MAX);
        }
    }

    /// Hands the tasks dispatched since the last flush to the lanes.
    pub(crate) fn flush(&mut self) {
        self.lanes.flush();
    }

    fn send_to_lane(&mut self, mut unit: TaskUnit<T>) {
        unit.state = self.state.as_ref().and_then(|s| s.task_state());
        self.core.mark_dispatched();
        self.lanes.dispatch(unit);
    }

    /// Hands tasks whose scheduled time has come to the lanes, each with a token of the
    /// rate like any other task; those without one wait for it.
    pub(crate) fn release_due(&mut self, now_ms: i64) {
        self.refresh();
        let before = self.delayed.len();
        let due = self.delayed.release_due(now_ms);
        if due.is_empty() {
            return;
        }
        let now = self.delayed.len();
        self.core
            .recorder()
            .delayed(now, now as i64 - before as i64);
        self.due.extend(due);
        if self.is_ready() {
            self.dispatch_due(now_ms);
        }
        self.lanes.flush();
    }

    /// Sends released delayed tasks to the lanes while the rate gives tokens.
    fn dispatch_due(&mut self, now_ms: i64) {
        while !self.due.is_empty() && self.take_token(now_ms) {
            if let Some(unit) = self.due.pop_front() {
                self.send_to_lane(unit);
            }
        }
    }

    /// When the next delayed task is due, or the rate's next token for a waiting task
    /// (epoch milliseconds).
    pub(crate) fn next_due(&self) -> Option<i64> {
        match (self.delayed.next_due(), self.rate_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a task waits for a token that is due by `now_ms`.
    pub(crate) fn rate_due_by(&self, now_ms: i64) -> bool {
        self.rate_due.is_some_and(|d| d <= now_ms)
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
        self.refresh();
        let ready = self.is_ready();
        if ready {
            self.dispatch_due(now_ms);
        }
        if ready && self.due.is_empty() {
            while self.has_room() {
                let Some(incoming) = self.overflow.pop_front() else {
                    break;
                };
                if !self.rate_allows(&incoming, now_ms) {
                    self.overflow.push_front(incoming);
                    break;
                }
                self.dispatch(incoming, now_ms);
            }
        }
        self.lanes.flush();
        // Records waiting for room under `max_pending` or for the rate do not pause
        // fetching until `max_pending` of them wait, and fetching resumes once half of
        // them are gone: a pause drops librdkafka's prefetched records, and the fetch after
        // a resume takes a round trip, so pausing each time the window fills would leave
        // the lanes idle for that round trip again and again. A partition that is not
        // ready (restoring, changing lanes, predecessor running) pauses at once.
        let limit = if ready { self.max_pending.max(1) } else { 1 };
        let overflowing = if self.paused {
            self.overflow.len() > limit / 2
        } else {
            self.overflow.len() >= limit
        };
        let pause = !ready || overflowing;
        if pause != self.paused {
            control.set_paused(self.core.id(), pause);
            self.paused = pause;
            subscription.paused(pause);
        }
        // Waiting for room: a completion wakes the partition up.
        let throttled = pause || !self.has_room();
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

    /// A commit of `commit` was sent (and, if synchronous, accepted).
    pub(crate) fn committed(&mut self, commit: (i64, String)) {
        self.last_committed = Some(commit);
    }

    /// The broker confirmed `position` as committed: state offsets below it can be
    /// forgotten.
    pub(crate) fn confirmed(&mut self, position: i64) {
        if self.confirmed.is_some_and(|c| c >= position) {
            return;
        }
        self.confirmed = Some(position);
        self.core.recorder().committed(position);
        if let Some(slot) = &self.state {
            slot.forget_applied_below(position);
        }
    }

    /// The newest confirmed committed position.
    pub(crate) fn confirmed_position(&self) -> Option<i64> {
        self.confirmed
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
        // Whoever still runs tasks of this partition — this assignment's abandoned ones,
        // or, if this assignment never started any, its predecessor's — must hold back the
        // partition's next context here.
        let zombie = if running > 0 {
            Some(self.core.clone())
        } else {
            self.predecessor.filter(|p| p.running() > 0)
        };
        (zombie, self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProcessorProperties;
    use crate::runtime::offsets::DoneRanges;
    use crate::runtime::offsets::OffsetTracker;
    use crate::runtime::pipeline::TaskRunner;
    use crate::runtime::task::tests::unit;
    use crate::runtime::wakeup::Wakeup;
    use crate::stats::Counters;
    use parking_lot::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;

    /// Counts the tasks handed to it and completes them at once.
    struct Instant0(Arc<AtomicUsize>);

    #[async_trait::async_trait]
    impl TaskRunner<u64> for Instant0 {
        async fn run(&self, unit: TaskUnit<u64>) {
            if unit.partition.try_start() {
                self.0.fetch_add(1, Ordering::SeqCst);
                unit.partition.finish(unit.offset);
            }
        }
    }

    #[derive(Default)]
    struct Pauses(Mutex<Vec<(i32, bool)>>);

    impl PauseControl for Pauses {
        fn set_paused(&self, partition: PartitionId, paused: bool) {
            self.0.lock().push((partition.partition, paused));
        }
    }

    struct Fixture {
        ctx: PartitionContext<u64>,
        core: Arc<PartitionCore>,
        ran: Arc<AtomicUsize>,
        wakeup: Arc<Wakeup>,
        counters: Arc<Counters>,
        subscription: SubscriptionRecorder,
        _rt: tokio::runtime::Runtime,
    }

    fn fixture(
        partition: i32,
        max_pending: usize,
        predecessor: Option<Arc<PartitionCore>>,
    ) -> Fixture {
        fixture_with(
            partition,
            max_pending,
            predecessor,
            Arc::new(Wakeup::default()),
        )
    }

    fn fixture_with(
        partition: i32,
        max_pending: usize,
        predecessor: Option<Arc<PartitionCore>>,
        wakeup: Arc<Wakeup>,
    ) -> Fixture {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let counters = Arc::new(Counters::default());
        let subscription = SubscriptionRecorder::new(Arc::from("s"), counters.clone());
        let core = Arc::new(PartitionCore::new(
            Arc::from("t"),
            PartitionId {
                topic: 0,
                partition,
            },
            OffsetTracker::starting_at(Some(0), DoneRanges::default()),
            subscription.partition("t", partition),
            wakeup.clone(),
        ));
        let ran = Arc::new(AtomicUsize::new(0));
        let lanes = Lanes::new(
            &ProcessorProperties::default(),
            Arc::new(Instant0(ran.clone())),
            rt.handle().clone(),
        );
        let ctx = PartitionContext::new(core.clone(), lanes, max_pending, None, None, predecessor);
        Fixture {
            ctx,
            core,
            ran,
            wakeup,
            counters,
            subscription,
            _rt: rt,
        }
    }

    fn task(f: &Fixture, offset: i64, key: &[u8]) -> Incoming<u64> {
        let mut u = unit(offset, Some(key), 0);
        u.partition = f.core.clone();
        Incoming::Task(u)
    }

    /// A context on `f`'s core (`max_pending` 100) reading `live`.
    fn live_context(f: &Fixture, live: &LiveProperties) -> PartitionContext<u64> {
        let lanes = Lanes::new(
            &ProcessorProperties::default(),
            Arc::new(Instant0(f.ran.clone())),
            f._rt.handle().clone(),
        );
        PartitionContext::new(f.core.clone(), lanes, 100, None, None, None).with_live(live.clone())
    }

    /// A shaping partition starts tasks at its own rate, whatever the live processing
    /// rate of the source partitions says.
    #[test]
    fn a_shaping_partition_keeps_its_own_rate() {
        let live = LiveProperties::new(ProcessorProperties {
            processing_rate_per_partition: 5,
            ..Default::default()
        });
        let waits = |fixed: Option<i64>| {
            let f = fixture(0, 100, None);
            let mut ctx = live_context(&f, &live);
            if let Some(r) = fixed {
                ctx = ctx.with_fixed_rate(r);
            }
            (0..20).filter(|&o| ctx.offer(task(&f, o, b"k"), 0)).count()
        };
        assert!(
            waits(None) > 0,
            "the live rate of 5/s holds the source partition"
        );
        assert_eq!(waits(Some(-1)), 0, "the shaping partition is unlimited");
        assert!(waits(Some(2)) > 0);
    }

    /// Tasks released from the delay queue take a token of the rate like fetched ones:
    /// none at rate 0, one per token at a limited rate, the rest once tokens come.
    #[test]
    fn released_delayed_tasks_wait_for_the_rate() {
        let live = LiveProperties::new(ProcessorProperties::default());
        let f = fixture(0, 100, None);
        let mut ctx = live_context(&f, &live);
        let pauses = Pauses::default();
        for o in 0..6 {
            let mut u = unit(o, Some(&[o as u8]), 1_000);
            u.partition = f.core.clone();
            assert!(!ctx.offer(Incoming::Task(u), 0));
        }
        assert_eq!((ctx.delayed.len(), ctx.lanes_occupied()), (6, 0));
        live.set("decaton.processing.rate.per.partition", "0")
            .unwrap();
        ctx.release_due(1_000);
        assert_eq!(ctx.lanes_occupied(), 0, "rate 0: no task goes to a lane");
        ctx.flow(&pauses, &f.subscription, 1_000);
        assert_eq!(ctx.lanes_occupied(), 0);
        // 5 per second: a burst of one, the next token in about 200 ms.
        live.set("decaton.processing.rate.per.partition", "5")
            .unwrap();
        ctx.flow(&pauses, &f.subscription, 1_000);
        assert_eq!(ctx.lanes_occupied(), 1, "one token, one task");
        assert!(
            ctx.next_due().is_some_and(|d| d > 1_000),
            "back for the next token"
        );
        live.set("decaton.processing.rate.per.partition", "-1")
            .unwrap();
        ctx.flow(&pauses, &f.subscription, 1_000);
        assert_eq!(ctx.lanes_occupied(), 6);
    }

    /// A fetched task waits behind a released delayed task that waits for the rate, so
    /// one key's tasks still reach the lanes in offset order.
    #[test]
    fn fetched_tasks_wait_behind_released_ones() {
        let live = LiveProperties::new(ProcessorProperties::default());
        let f = fixture(0, 100, None);
        let mut ctx = live_context(&f, &live);
        let mut u = unit(0, Some(b"k"), 1_000);
        u.partition = f.core.clone();
        assert!(!ctx.offer(Incoming::Task(u), 0));
        live.set("decaton.processing.rate.per.partition", "0")
            .unwrap();
        ctx.release_due(1_000);
        live.set("decaton.processing.rate.per.partition", "-1")
            .unwrap();
        assert!(ctx.offer(task(&f, 1, b"k"), 1_000), "waits behind offset 0");
        ctx.flow(&Pauses::default(), &f.subscription, 1_000);
        assert_eq!(ctx.lanes_occupied(), 2, "both in the lanes, 0 first");
        assert!(ctx.due.is_empty() && ctx.overflow.is_empty());
    }

    /// Rate 0 on the source topic does not stop a retry partition, which follows the
    /// retry topic's own rate.
    #[test]
    fn a_retry_partition_follows_its_own_rate() {
        let live = LiveProperties::new(ProcessorProperties {
            processing_rate_per_partition: 0,
            ..Default::default()
        });
        let f = fixture(0, 100, None);
        let retry = Arc::new(PartitionCore::new(
            Arc::from("t-retry"),
            PartitionId {
                topic: 1,
                partition: 0,
            },
            OffsetTracker::starting_at(Some(0), DoneRanges::default()),
            f.subscription.partition("t-retry", 0),
            f.wakeup.clone(),
        ));
        let lanes = Lanes::new(
            &ProcessorProperties::default(),
            Arc::new(Instant0(f.ran.clone())),
            f._rt.handle().clone(),
        );
        let mut ctx = PartitionContext::new(retry.clone(), lanes, 100, None, None, None)
            .with_live(live.clone());
        let retry_task = |o: i64| {
            let mut u = unit(o, Some(b"k"), 0);
            u.partition = retry.clone();
            Incoming::Task(u)
        };
        assert!(
            !ctx.offer(retry_task(0), 0),
            "runs although the source is stopped"
        );
        assert_eq!(ctx.health().not_ready, None);
        let mut source = live_context(&f, &live);
        assert!(source.offer(task(&f, 0, b"k"), 0), "the source is stopped");
        live.set("retry_processing_rate_per_partition", "0")
            .unwrap();
        assert!(
            ctx.offer(retry_task(1), 0),
            "the retry topic's own rate 0 stops it"
        );
    }

    /// Health tells a partition held at rate 0 apart from a stuck one, from the flow
    /// control run after the rate changed.
    #[test]
    fn a_partition_at_rate_0_reports_stopped() {
        let live = LiveProperties::new(ProcessorProperties::default());
        let f = fixture(0, 100, None);
        let mut ctx = live_context(&f, &live);
        let pauses = Pauses::default();
        assert_eq!(ctx.health().not_ready, None);
        live.set("decaton.processing.rate.per.partition", "0")
            .unwrap();
        ctx.flow(&pauses, &f.subscription, 0);
        assert_eq!(ctx.health().not_ready, Some(crate::NotReady::Stopped));
        live.set("decaton.processing.rate.per.partition", "-1")
            .unwrap();
        ctx.flow(&pauses, &f.subscription, 0);
        assert_eq!(ctx.health().not_ready, None);
    }

    /// A partition assigned again in this process while its previous assignment's
    /// abandoned task still runs starts nothing until that task ends: one key never runs
    /// twice at once.
    #[test]
    fn a_predecessor_with_running_tasks_holds_the_partition() {
        let old = fixture(3, 100, None);
        assert!(old.core.try_start_for_test(0));
        assert_eq!(old.core.close(), 1, "abandoned");
        let mut new = fixture_with(3, 100, Some(old.core.clone()), old.wakeup.clone());
        let pauses = Pauses::default();
        assert!(new.ctx.offer(task(&new, 0, b"k"), 0), "must wait");
        assert!(new.ctx.flow(&pauses, &new.subscription, 0), "throttled");
        assert_eq!(pauses.0.lock().as_slice(), &[(3, true)]);
        new._rt.block_on(async { tokio::task::yield_now().await });
        assert_eq!(new.ran.load(Ordering::SeqCst), 0);
        // The abandoned task ends: its completion counts for nothing, and it wakes the
        // consumer thread for partition 3.
        old.core.finish(0);
        assert_eq!(old.core.position(), Some(0));
        assert_eq!(new.wakeup.take(), vec![new.core.id()]);
        assert!(!new.ctx.flow(&pauses, &new.subscription, 0));
        assert_eq!(pauses.0.lock().last(), Some(&(3, false)));
        new._rt.block_on(async {
            while new.ran.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(new.core.position(), Some(1));
    }

    /// Two quick rebalances: the partition's second context never started a task (its
    /// predecessor still ran one), so on release it must hand the predecessor on, or the
    /// third context would run the abandoned task's key again at once.
    #[test]
    fn a_still_running_predecessor_is_handed_on() {
        let first = fixture(4, 100, None);
        assert!(first.core.try_start_for_test(0));
        first.core.close();
        let second = fixture(4, 100, Some(first.core.clone()));
        second.core.close();
        let (zombie, _) = second.ctx.into_released(&second.subscription);
        assert!(zombie.is_some_and(|z| Arc::ptr_eq(&z, &first.core)));
        first.core.finish(0);
        let third = fixture(4, 100, Some(first.core.clone()));
        third.core.close();
        let (zombie, _) = third.ctx.into_released(&third.subscription);
        assert!(zombie.is_none(), "nothing runs any more");
    }

    /// Completions wake the consumer thread only for a throttled partition, and only
    /// that partition: no polling over every partition.
    #[test]
    fn only_throttled_partitions_ask_for_a_wakeup() {
        let mut f = fixture(5, 2, None);
        let pauses = Pauses::default();
        assert!(f.core.try_start_for_test(0));
        f.core.finish(0);
        assert!(f.wakeup.take().is_empty(), "not throttled: no wakeup");
        assert!(f.core.try_start_for_test(1));
        assert!(f.core.try_start_for_test(2));
        assert!(
            f.ctx.flow(&pauses, &f.subscription, 0),
            "max_pending reached"
        );
        f.core.finish(2);
        f.core.finish(1);
        assert_eq!(f.wakeup.take(), vec![f.core.id()]);
        assert!(!f.ctx.flow(&pauses, &f.subscription, 0));
        assert!(
            pauses.0.lock().is_empty(),
            "a full window with nothing fetched waiting does not pause fetching"
        );
    }

    /// Fetched records wait for room until `max_pending` of them wait; then fetching
    /// pauses, and it resumes once half of them are gone.
    #[test]
    fn fetching_pauses_when_max_pending_records_wait_and_resumes_at_half() {
        let mut f = fixture(6, 4, None);
        let pauses = Pauses::default();
        for o in 0..4 {
            assert!(!f.ctx.offer(task(&f, o, b"k"), 0), "room for {o}");
        }
        for o in 4..7 {
            assert!(f.ctx.offer(task(&f, o, b"k"), 0), "{o} waits for room");
            assert!(f.ctx.flow(&pauses, &f.subscription, 0));
        }
        assert!(pauses.0.lock().is_empty(), "3 waiting of 4 allowed");
        assert!(f.ctx.offer(task(&f, 7, b"k"), 0));
        assert!(f.ctx.flow(&pauses, &f.subscription, 0));
        assert_eq!(pauses.0.lock().as_slice(), &[(6, true)], "4 waiting");
        // The lanes finish the first four: the waiting records move in, fetching resumes.
        f._rt.block_on(async {
            while f.ran.load(Ordering::SeqCst) < 4 {
                tokio::task::yield_now().await;
            }
        });
        assert!(
            f.ctx.flow(&pauses, &f.subscription, 0),
            "the window is full again"
        );
        assert_eq!(pauses.0.lock().as_slice(), &[(6, true), (6, false)]);
    }

    /// Health reports a partition held back by its predecessor's running task, and the
    /// gaps in its offset window.
    #[test]
    fn health_tells_why_a_partition_is_held_back_and_counts_gaps() {
        let old = fixture(3, 100, None);
        assert!(old.core.try_start_for_test(0));
        old.core.close();
        let new = fixture_with(3, 100, Some(old.core.clone()), old.wakeup.clone());
        assert_eq!(
            new.ctx.health().not_ready,
            Some(crate::NotReady::PredecessorRunning { tasks: 1 })
        );
        old.core.finish(0);
        assert_eq!(new.ctx.health().not_ready, None);
        // 0 unfinished, 1 done, 2 unfinished, 3 done: two gaps pin the position at 0.
        let f = fixture(6, 100, None);
        for o in 0..4 {
            assert!(f.core.try_start_for_test(o));
        }
        f.core.finish(1);
        f.core.finish(3);
        let h = f.ctx.health();
        assert_eq!((h.position, h.pending, h.offset_map_gaps), (Some(0), 2, 2));
        assert_eq!((h.completed, h.delayed), (2, 0));
    }

    /// A record below those already registered (the fetch position went back) is
    /// dropped and counted, never registered twice.
    #[test]
    fn rewound_records_are_counted() {
        let mut f = fixture(0, 100, None);
        assert!(!f.ctx.offer(task(&f, 5, b"a"), 0));
        assert!(!f.ctx.offer(task(&f, 3, b"a"), 0));
        assert_eq!(f.counters.rewound.load(Ordering::Relaxed), 1);
    }

    /// The log was truncated under a committed position of 1 000 000 with an offset map,
    /// and the consumer was reset to offset 0: every fetched record runs (none is dropped
    /// as rewound), the truncation is counted once, and the next commit is the new
    /// position without the old map.
    #[test]
    fn a_truncated_log_rebases_on_what_is_fetched() {
        let f = fixture(0, 100, None);
        let inherited = DoneRanges::from_sorted([(1_000_001, 1_000_005)]);
        let core = Arc::new(PartitionCore::new(
            Arc::from("t"),
            PartitionId {
                topic: 0,
                partition: 0,
            },
            OffsetTracker::starting_at(Some(1_000_000), inherited),
            f.subscription.partition("t", 0),
            f.wakeup.clone(),
        ));
        let lanes = Lanes::new(
            &ProcessorProperties::default(),
            Arc::new(Instant0(f.ran.clone())),
            f._rt.handle().clone(),
        );
        let committed = (1_000_000, core.commit_point(Some(4000)).unwrap().1);
        assert!(!committed.1.is_empty(), "the inherited map is committed");
        let mut ctx = PartitionContext::new(core.clone(), lanes, 100, Some(committed), None, None);
        assert_eq!(ctx.commit_candidate(Some(4000)), None, "nothing new yet");
        for o in 0..5 {
            let mut u = unit(o, Some(b"k"), 0);
            u.partition = core.clone();
            assert!(!ctx.offer(Incoming::Task(u), 0));
        }
        ctx.flush();
        assert_eq!(f.counters.rewound.load(Ordering::Relaxed), 0);
        assert_eq!(f.counters.truncations.load(Ordering::Relaxed), 1);
        f._rt.block_on(async {
            let all_ran = async {
                while f.ran.load(Ordering::SeqCst) < 5 {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), all_ran)
                .await
                .expect("every fetched task runs");
        });
        assert_eq!(ctx.commit_candidate(Some(4000)), Some((5, String::new())));
        ctx.confirmed(5);
        assert_eq!(
            ctx.confirmed_position(),
            Some(5),
            "the old position no longer counts"
        );
    }

    /// A committed offset moved to a new log before the assignment: offsets the state
    /// store applied belong to the old log, so a new record at one of them runs instead
    /// of being skipped as already applied; without the move it would be skipped.
    #[test]
    fn a_replaced_log_forgets_the_applied_offsets() {
        let run = |replaced: bool| {
            let cfg = decaton_state::StateConfig {
                backend: decaton_state::Backend::Memory,
                ..Default::default()
            };
            let (store, _) =
                decaton_state::internal::PartitionStore::open(&cfg, "s", "t", 0).unwrap();
            for o in 2..4 {
                store.apply_acknowledged(&[], o).unwrap();
            }
            let slot = crate::runtime::state::StateSlot::ready_with(store.clone());
            let f = fixture(0, 100, None);
            let lanes = Lanes::new(
                &ProcessorProperties::default(),
                Arc::new(Instant0(f.ran.clone())),
                f._rt.handle().clone(),
            );
            let mut ctx = PartitionContext::new(
                f.core.clone(),
                lanes,
                100,
                Some((0, String::new())),
                Some(slot),
                None,
            );
            if replaced {
                ctx = ctx.with_replaced_log();
            }
            for o in 0..4 {
                assert!(!ctx.offer(task(&f, o, b"k"), 0));
            }
            f.counters.skipped.load(Ordering::Relaxed)
        };
        assert_eq!(run(false), 2, "the same log: applied offsets are skipped");
        assert_eq!(run(true), 0, "a new log: every record runs");
    }

    /// Applied offsets below the committed position are forgotten: the set is bounded by
    /// what can still be redelivered.
    #[test]
    fn a_commit_forgets_applied_offsets_below_it() {
        let cfg = decaton_state::StateConfig {
            backend: decaton_state::Backend::Memory,
            ..Default::default()
        };
        let (store, _) = decaton_state::internal::PartitionStore::open(&cfg, "s", "t", 0).unwrap();
        for o in 0..10 {
            store.apply_acknowledged(&[], o).unwrap();
        }
        let slot = crate::runtime::state::StateSlot::ready_with(store.clone());
        let f = fixture(0, 100, None);
        let lanes = Lanes::new(
            &ProcessorProperties::default(),
            Arc::new(Instant0(f.ran.clone())),
            f._rt.handle().clone(),
        );
        let mut ctx = PartitionContext::new(f.core.clone(), lanes, 100, None, Some(slot), None);
        // Sent but not confirmed (an asynchronous commit may still fail): nothing forgotten.
        ctx.committed((6, String::new()));
        assert_eq!(store.applied_source_offsets_from(0).len(), 10);
        ctx.confirmed(6);
        assert_eq!(store.applied_source_offsets_from(0), vec![6, 7, 8, 9]);
    }
}
