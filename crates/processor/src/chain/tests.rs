//! Chains and scopes run through the real lanes, pipeline and partition context (no
//! broker): what reaches each stage, in which order, and when the offset commits.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_protocol::{encode_metadata, TaskMetadata, METADATA_HEADER};
use parking_lot::Mutex;
use proptest::prelude::*;

use super::*;
use crate::config::{ProcessorProperties, SchedulingMode};
use crate::runtime::extract::Incoming;
use crate::runtime::forward::RawRecord;
use crate::runtime::lanes::Lanes;
use crate::runtime::offsets::{DoneRanges, OffsetTracker};
use crate::runtime::partition::{PartitionContext, PauseControl};
use crate::runtime::partition_core::PartitionCore;
use crate::runtime::pipeline::{Pipeline, TaskRunner};
use crate::runtime::recorder::SubscriptionRecorder;
use crate::runtime::task::TaskUnit;
use crate::runtime::topics::PartitionId;
use crate::runtime::wakeup::Wakeup;
use crate::stats::Counters;
use crate::{Completion, LiveProperties, ProcessError, ProcessingContext, SubscriptionStats};

/// What each stage saw: (stage, partition, lane, key, task).
type Seen = Arc<Mutex<Vec<(&'static str, i32, Option<usize>, Option<u8>, u64)>>>;

fn note(seen: &Seen, stage: &'static str, ctx: &ProcessingContext, task: u64) {
    seen.lock().push((
        stage,
        ctx.partition(),
        ctx.lane(),
        ctx.key().map(|k| k[0]),
        task,
    ));
}

/// Records the task and passes it on.
struct Relay(&'static str, Seen);

#[async_trait::async_trait]
impl TaskProcessor<u64> for Relay {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        note(&self.1, self.0, ctx, task);
        // A few yields let lanes interleave.
        for _ in 0..(task % 3) {
            tokio::task::yield_now().await;
        }
        ctx.push(task).await
    }
}

struct NoPause;
impl PauseControl for NoPause {
    fn set_paused(&self, _: PartitionId, _: bool) {}
}

/// One partition run the way the consumer thread runs it.
struct Harness {
    rt: tokio::runtime::Runtime,
    counters: Arc<Counters>,
    recorder: SubscriptionRecorder,
    wakeup: Arc<Wakeup>,
    live: LiveProperties,
}

impl Harness {
    fn new(props: ProcessorProperties) -> Self {
        let counters = Arc::new(Counters::default());
        Harness {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            recorder: SubscriptionRecorder::new(Arc::from("s"), counters.clone()),
            counters,
            wakeup: Arc::new(Wakeup::default()),
            live: LiveProperties::new(props),
        }
    }

    fn runner(&self, chain: impl TaskProcessor<u64>, in_process: u32) -> Arc<dyn TaskRunner<u64>> {
        Arc::new(Pipeline {
            processor: Arc::new(chain),
            subscription: Arc::from("s"),
            live: self.live.clone(),
            state: None,
            forwarder: None,
            shaping: None,
            in_process: (in_process, crate::Backoff::fixed(Duration::ZERO)),
            _task: std::marker::PhantomData,
        })
    }

    /// Partition `partition`, assigned: a fresh core and context.
    fn assign(
        &self,
        partition: i32,
        runner: &Arc<dyn TaskRunner<u64>>,
    ) -> (Arc<PartitionCore>, PartitionContext<u64>) {
        let core = Arc::new(PartitionCore::new(
            Arc::from("t"),
            PartitionId {
                topic: 0,
                partition,
            },
            OffsetTracker::starting_at(Some(0), DoneRanges::default()),
            self.recorder.partition("t", partition),
            self.wakeup.clone(),
        ));
        let lanes = Lanes::new(&self.live.get(), runner.clone(), self.rt.handle().clone());
        let ctx = PartitionContext::new(core.clone(), lanes, usize::MAX, None, None, None)
            .with_live(self.live.clone());
        (core, ctx)
    }

    fn task(core: &Arc<PartitionCore>, offset: i64, key: Option<u8>, raw: bool) -> Incoming<u64> {
        let task = offset as u64;
        let raw = raw.then(|| {
            Arc::new(RawRecord {
                key: key.map(|k| vec![k]),
                payload: Some(prost::Message::encode_to_vec(&task)),
                headers: vec![(
                    METADATA_HEADER.as_bytes().to_vec(),
                    Some(encode_metadata(&TaskMetadata::default())),
                )],
            })
        });
        Incoming::Task(TaskUnit {
            partition: core.clone(),
            offset,
            key: key.map(|k| Arc::from(vec![k])),
            metadata: Default::default(),
            task,
            state: None,
            trace: None,
            raw,
            lane: None,
            over_quota: false,
        })
    }

    /// Offers `keys` as offsets `from..` and moves them to the lanes.
    fn offer(
        &self,
        core: &Arc<PartitionCore>,
        ctx: &mut PartitionContext<u64>,
        from: i64,
        keys: &[Option<u8>],
        raw: bool,
    ) {
        for (i, key) in keys.iter().enumerate() {
            let offset = from + i as i64;
            ctx.offer(Self::task(core, offset, *key, raw), 0);
        }
        ctx.flow(&NoPause, &self.recorder, 0);
    }

    /// Runs flow control as the consumer thread does until `done` or 20 s pass.
    fn drive(&self, ctx: &mut PartitionContext<u64>, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            ctx.flow(&NoPause, &self.recorder, 0);
            if done() {
                return true;
            }
            self.wakeup.wait(Duration::from_millis(50));
        }
        done()
    }

    fn stats(&self) -> SubscriptionStats {
        self.counters.snapshot()
    }
}

fn bounded(lanes: usize) -> ProcessorProperties {
    ProcessorProperties {
        mode: SchedulingMode::Bounded,
        partition_concurrency: lanes,
        ..ProcessorProperties::default()
    }
}

fn at_stage(seen: &Seen, stage: &str) -> Vec<(Option<u8>, u64)> {
    seen.lock()
        .iter()
        .filter(|s| s.0 == stage)
        .map(|s| (s.3, s.4))
        .collect()
}

/// Per key, the tasks a stage saw, in the order it saw them.
fn per_key(seen: &[(Option<u8>, u64)]) -> HashMap<Option<u8>, Vec<u64>> {
    let mut m: HashMap<Option<u8>, Vec<u64>> = HashMap::new();
    for (k, t) in seen {
        m.entry(*k).or_default().push(*t);
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Every task passes through all three stages; each stage sees one key's tasks in
    /// offset order; the position passes every task only as the last stage completes it.
    #[test]
    fn pass_on_keeps_key_order_through_every_stage(lanes in 1usize..5,
            keys in proptest::collection::vec(proptest::option::weighted(0.9, 0u8..6), 1..120)) {
        let h = Harness::new(bounded(lanes));
        let seen: Seen = Arc::default();
        let chain = Chain::new(Relay("a", seen.clone()))
            .then_process(Relay("b", seen.clone()))
            .then_process(Relay("c", seen.clone()));
        let runner = h.runner(chain, 0);
        let (core, mut ctx) = h.assign(0, &runner);
        h.offer(&core, &mut ctx, 0, &keys, false);
        let n = keys.len() as i64;
        prop_assert!(h.drive(&mut ctx, || core.position() == Some(n)));
        for stage in ["a", "b", "c"] {
            let got = at_stage(&seen, stage);
            prop_assert_eq!(got.len(), keys.len());
            for (k, tasks) in per_key(&got) {
                if k.is_none() { continue; }
                let mut sorted = tasks.clone();
                sorted.sort_unstable();
                prop_assert_eq!(&tasks, &sorted, "stage {} key {:?}", stage, k);
            }
        }
        prop_assert_eq!(h.stats().processed, keys.len() as u64);
    }
}

/// Completes even tasks at stage 1.
struct EvensEndHere(Seen);

#[async_trait::async_trait]
impl TaskProcessor<u64> for EvensEndHere {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        note(&self.0, "first", ctx, task);
        if task % 2 == 0 {
            return Ok(());
        }
        ctx.push(task).await
    }
}

#[test]
fn a_stage_can_complete_a_task_early() {
    let h = Harness::new(bounded(2));
    let seen: Seen = Arc::default();
    let chain = Chain::new(EvensEndHere(seen.clone())).then_process(Relay("last", seen.clone()));
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(0, &runner);
    let keys: Vec<Option<u8>> = (0..20).map(|i| Some(i % 3)).collect();
    h.offer(&core, &mut ctx, 0, &keys, false);
    assert!(h.drive(&mut ctx, || core.position() == Some(20)));
    assert_eq!(at_stage(&seen, "first").len(), 20);
    let mut last: Vec<u64> = at_stage(&seen, "last").iter().map(|s| s.1).collect();
    last.sort_unstable();
    assert_eq!(last, (0..20).filter(|t| t % 2 == 1).collect::<Vec<_>>());
    assert_eq!(h.stats().failed, 0);
}

/// Fails task 3 once (then succeeds) and task 5 for good.
struct FailsSome {
    seen: Seen,
    failed_once: AtomicUsize,
}

#[async_trait::async_trait]
impl TaskProcessor<u64> for FailsSome {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        note(&self.seen, "failing", ctx, task);
        match task {
            3 if self.failed_once.fetch_add(1, Ordering::SeqCst) == 0 => {
                Err(ProcessError::retry("busy"))
            }
            5 => Err(ProcessError::permanent("bad task")),
            _ => Ok(()),
        }
    }
}

/// A failure at stage 2 is the task's failure: retried in the lane from the first stage
/// (as a single processor's task is run again), counted when it fails for good, and the
/// partition moves on (no retry or dead-letter topic here).
#[test]
fn a_failure_at_stage_two_fails_the_task_like_a_single_processor() {
    let h = Harness::new(bounded(1));
    let seen: Seen = Arc::default();
    let chain = Chain::new(Relay("first", seen.clone())).then_process(FailsSome {
        seen: seen.clone(),
        failed_once: AtomicUsize::new(0),
    });
    let runner = h.runner(chain, 2);
    let (core, mut ctx) = h.assign(0, &runner);
    let keys: Vec<Option<u8>> = (0..8).map(|_| Some(1)).collect();
    h.offer(&core, &mut ctx, 0, &keys, true);
    assert!(h.drive(&mut ctx, || core.position() == Some(8)));
    let first: Vec<u64> = at_stage(&seen, "first").iter().map(|s| s.1).collect();
    // Task 3 ran twice through the whole chain, task 5 is permanent: never again.
    assert_eq!(first, vec![0, 1, 2, 3, 3, 4, 5, 6, 7]);
    let stats = h.stats();
    assert_eq!(stats.retried_in_process, 1);
    assert_eq!(stats.failed, 1, "task 5 failed for good");
    assert_eq!(stats.processed, 7);
}

/// Defers every task and hands it over; the test pushes it on later.
struct DeferAll {
    seen: Seen,
    out: std::sync::mpsc::SyncSender<(Completion, u64)>,
}

#[async_trait::async_trait]
impl TaskProcessor<u64> for DeferAll {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        note(&self.seen, "defer", ctx, task);
        self.out
            .try_send((ctx.defer(), task))
            .map_err(|_| ProcessError::new("hand-over full"))
    }
}

/// Defers the tasks it gets and drops the handle (a leak).
struct Leaks;

#[async_trait::async_trait]
impl TaskProcessor<u64> for Leaks {
    async fn process(&self, ctx: &ProcessingContext, _: u64) -> Result<(), ProcessError> {
        drop(ctx.defer());
        Ok(())
    }
}

/// Stage 1 defers; nothing commits until the task is pushed on later, from outside
/// `process`, and the next stage completes it. A failure or a leak after the push fails
/// the task, as it would the deferred task itself.
#[test]
fn a_deferred_task_is_pushed_on_later() {
    let h = Harness::new(bounded(2));
    let seen: Seen = Arc::default();
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    let chain = Chain::new(DeferAll {
        seen: seen.clone(),
        out: tx,
    })
    .then_process(Relay("second", seen.clone()))
    .then_process(FailsSome {
        seen: seen.clone(),
        failed_once: AtomicUsize::new(1),
    });
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(0, &runner);
    let keys: Vec<Option<u8>> = (0..10).map(|i| Some(i % 2)).collect();
    h.offer(&core, &mut ctx, 0, &keys, false);
    let mut held = Vec::new();
    while held.len() < 10 {
        held.push(rx.recv_timeout(Duration::from_secs(20)).unwrap());
    }
    assert!(h.drive(&mut ctx, || h.stats().processed == 10));
    assert_eq!(core.position(), Some(0), "deferred: nothing committed yet");
    assert!(at_stage(&seen, "second").is_empty());
    held.sort_by_key(|(_, t)| *t);
    h.rt.block_on(async {
        for (completion, task) in held {
            completion.push(task).await;
        }
    });
    assert!(h.drive(&mut ctx, || core.position() == Some(10)));
    let second: Vec<u64> = at_stage(&seen, "second").iter().map(|s| s.1).collect();
    assert_eq!(second, (0..10).collect::<Vec<_>>());
    assert_eq!(h.stats().failed, 1, "task 5 failed in the last stage");

    // A deferred push into a stage that leaks its completion: counted as leaked.
    let (tx, rx) = std::sync::mpsc::sync_channel(4);
    let chain = Chain::new(DeferAll {
        seen: seen.clone(),
        out: tx,
    })
    .then_process(Leaks);
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(1, &runner);
    h.offer(&core, &mut ctx, 0, &[Some(1)], false);
    let (completion, task) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    h.rt.block_on(completion.push(task));
    assert!(h.drive(&mut ctx, || core.position() == Some(1)));
    assert_eq!(h.stats().completions_leaked, 1);
}

/// A task deferred at stage 1 and never pushed is failed by `deferred_complete_timeout`.
#[test]
fn a_deferred_task_not_pushed_in_time_times_out() {
    let h = Harness::new(ProcessorProperties {
        deferred_complete_timeout: Some(Duration::from_millis(100)),
        ..bounded(1)
    });
    let seen: Seen = Arc::default();
    let (tx, rx) = std::sync::mpsc::sync_channel(4);
    let chain = Chain::new(DeferAll {
        seen: seen.clone(),
        out: tx,
    })
    .then_process(Relay("second", seen.clone()));
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(0, &runner);
    h.offer(&core, &mut ctx, 0, &[Some(1)], false);
    let (completion, task) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(h.drive(&mut ctx, || core.position() == Some(1)));
    assert_eq!(h.stats().deferred_timeouts, 1);
    assert!(completion.is_done());
    // Pushing it now does nothing: the task already ended.
    let before = h.stats();
    h.rt.block_on(completion.push(task));
    assert!(at_stage(&seen, "second").is_empty());
    assert_eq!(h.stats().deferred_timeouts, 1);
    assert_eq!(h.stats().failed, before.failed);
}

/// Where an instance ran: (partition, lane).
type Place = (i32, Option<usize>);

/// Counts factory calls and drops, and which (partition, lane) used each instance.
#[derive(Default)]
struct Census {
    made: AtomicUsize,
    dropped: AtomicUsize,
    used_by: Mutex<HashMap<usize, HashSet<Place>>>,
}

struct Counted {
    id: usize,
    census: Arc<Census>,
}

impl Counted {
    fn make(census: &Arc<Census>) -> Counted {
        Counted {
            id: census.made.fetch_add(1, Ordering::SeqCst),
            census: census.clone(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.census.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl TaskProcessor<u64> for Counted {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        self.census
            .used_by
            .lock()
            .entry(self.id)
            .or_default()
            .insert((ctx.partition(), ctx.lane()));
        ctx.push(task).await
    }
}

/// One instance per subscription, one per partition, one per lane of each partition;
/// a partition's instances go when it is revoked, and coming back makes new ones.
#[test]
fn each_scope_makes_its_number_of_instances() {
    let h = Harness::new(bounded(3));
    let (sub, part, lane) = (
        Arc::new(Census::default()),
        Arc::new(Census::default()),
        Arc::new(Census::default()),
    );
    let chain = {
        let (s, p, l) = (sub.clone(), part.clone(), lane.clone());
        Chain::scoped(ProcessorScope::Subscription, move || Counted::make(&s))
            .then_scoped(ProcessorScope::Partition, move || Counted::make(&p))
            .then_scoped(ProcessorScope::Lane, move || Counted::make(&l))
    };
    assert!(chain.needs_lanes());
    let runner = h.runner(chain, 0);
    // Enough keys that every lane of both partitions gets tasks.
    let keys: Vec<Option<u8>> = (0..200).map(|i| Some((i % 50) as u8)).collect();
    let mut assigned = Vec::new();
    for p in 0..2 {
        let (core, mut ctx) = h.assign(p, &runner);
        h.offer(&core, &mut ctx, 0, &keys, false);
        assert!(h.drive(&mut ctx, || core.position() == Some(200)));
        assigned.push((core, ctx));
    }
    assert_eq!(sub.made.load(Ordering::SeqCst), 1);
    assert_eq!(part.made.load(Ordering::SeqCst), 2);
    assert_eq!(lane.made.load(Ordering::SeqCst), 6);
    for (_, users) in part.used_by.lock().iter() {
        let partitions: HashSet<i32> = users.iter().map(|u| u.0).collect();
        assert_eq!(
            partitions.len(),
            1,
            "a partition instance served one partition"
        );
    }
    for (_, users) in lane.used_by.lock().iter() {
        assert_eq!(users.len(), 1, "a lane instance served one lane: {users:?}");
    }
    // Revoke partition 0: its partition and lane instances are dropped, nothing else.
    let (core0, _ctx0) = assigned.remove(0);
    core0.revoke();
    assert_eq!(core0.close(), 0);
    assert_eq!(part.dropped.load(Ordering::SeqCst), 1);
    assert_eq!(lane.dropped.load(Ordering::SeqCst), 3);
    assert_eq!(sub.dropped.load(Ordering::SeqCst), 0);
    // Assigned again: fresh instances.
    let (core, mut ctx) = h.assign(0, &runner);
    h.offer(&core, &mut ctx, 0, &keys[..10], false);
    assert!(h.drive(&mut ctx, || core.position() == Some(10)));
    assert_eq!(part.made.load(Ordering::SeqCst), 3);
    assert!(lane.made.load(Ordering::SeqCst) > 6);
    assert_eq!(sub.made.load(Ordering::SeqCst), 1);
}

/// A per-lane stage in per-key mode is refused when the subscription is built.
#[test]
fn a_lane_scope_in_per_key_mode_does_not_build() {
    let census = Arc::new(Census::default());
    let chain: Chain<u64> = Chain::new(Relay("a", Seen::default()))
        .then_scoped(ProcessorScope::Lane, move || Counted::make(&census));
    let built = crate::Subscription::builder("s", chain)
        .bootstrap_servers("127.0.0.1:1")
        .topic("t")
        .properties(ProcessorProperties {
            mode: SchedulingMode::PerKey,
            ..ProcessorProperties::default()
        })
        .build();
    match built {
        Err(crate::SubscriptionError::Config(m)) => assert!(m.contains("per-lane"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("built a per-lane scope in per-key mode"),
    }
}

/// Holds tasks until the gate opens, recording the start order per key.
struct Gated {
    seen: Seen,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl TaskProcessor<u64> for Gated {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        note(&self.seen, "gated", ctx, task);
        let permit = self.gate.acquire().await.map_err(ProcessError::new)?;
        permit.forget();
        ctx.push(task).await
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// `partition_concurrency` changes while tasks are held in the lanes: nothing new
    /// starts until the old lanes are empty, then tasks run on the new lanes (per-lane
    /// instances made anew), one key's tasks always in offset order and never two at once.
    #[test]
    fn lanes_change_without_breaking_key_order(from in 1usize..5, to in 1usize..5,
            keys in proptest::collection::vec(0u8..12, 20..80)) {
        let h = Harness::new(bounded(from));
        let seen: Seen = Arc::default();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let census = Arc::new(Census::default());
        let chain = {
            let census = census.clone();
            Chain::new(Gated { seen: seen.clone(), gate: gate.clone() })
                .then_scoped(ProcessorScope::Lane, move || Counted::make(&census))
        };
        let runner = h.runner(chain, 0);
        let (core, mut ctx) = h.assign(0, &runner);
        let keys: Vec<Option<u8>> = keys.into_iter().map(Some).collect();
        let half = keys.len() / 2;
        h.offer(&core, &mut ctx, 0, &keys[..half], false);
        h.live.set("partition_concurrency", &to.to_string()).unwrap();
        h.offer(&core, &mut ctx, half as i64, &keys[half..], false);
        if from != to {
            // Only the first half was dispatched: the rest waits for the old lanes, and
            // health says so.
            prop_assert_eq!(core.in_flight(), half);
            let changing = matches!(
                ctx.health().not_ready,
                Some(crate::NotReady::ChangingLanes { to: t, .. }) if t == to
            );
            prop_assert!(changing, "health: {:?}", ctx.health().not_ready);
        }
        gate.add_permits(keys.len());
        let n = keys.len() as i64;
        prop_assert!(h.drive(&mut ctx, || core.position() == Some(n)));
        let seen = seen.lock();
        let mut order: HashMap<Option<u8>, Vec<u64>> = HashMap::new();
        for s in seen.iter() {
            order.entry(s.3).or_default().push(s.4);
            // Tasks of the second half ran on the new lanes.
            if from != to && s.4 >= half as u64 {
                prop_assert!(s.2.is_some_and(|l| l < to), "task {} on lane {:?}", s.4, s.2);
            }
        }
        for (k, tasks) in order {
            let mut sorted = tasks.clone();
            sorted.sort_unstable();
            prop_assert_eq!(tasks, sorted, "key {:?}", k);
        }
        if from != to {
            let used: HashSet<Option<usize>> = census.used_by.lock().values().flatten().map(|u| u.1).collect();
            prop_assert!(used.iter().all(|l| l.is_some()));
            prop_assert!(census.dropped.load(Ordering::SeqCst) >= 1, "old lane instances dropped");
        }
    }
}

/// A bad value for `partition_concurrency` keeps the old one.
#[test]
fn a_bad_concurrency_keeps_the_old_one() {
    let live = LiveProperties::new(bounded(3));
    assert!(live.set("decaton.partition.concurrency", "0").is_err());
    assert!(live.set("decaton.partition.concurrency", "many").is_err());
    assert_eq!(live.get().partition_concurrency, 3);
    live.set("decaton.partition.concurrency", "5").unwrap();
    assert_eq!(live.get().partition_concurrency, 5);
}

/// The processor tester runs a chain's per-partition stage on one instance for all its
/// tasks, as one partition would.
#[test]
fn the_tester_keeps_one_partition_instance() {
    let census = Arc::new(Census::default());
    let chain = {
        let census = census.clone();
        Chain::scoped(ProcessorScope::Partition, move || Counted::make(&census))
            .then_process(Relay("after", Seen::default()))
    };
    let tester = crate::testing::ProcessorTester::new(chain);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for task in 0..3u64 {
        let out = rt.block_on(tester.process(Some(b"k"), task));
        assert_eq!(out.result, crate::testing::TaskResult::Completed);
    }
    assert_eq!(census.made.load(Ordering::SeqCst), 1);
}

/// Records the task, taking longer for the first ones (processing time, so that a later
/// batch would overtake an earlier one if they overlapped).
struct SlowFirst(Seen);

#[async_trait::async_trait]
impl TaskProcessor<u64> for SlowFirst {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        note(&self.0, "after", ctx, task);
        if task < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

/// Behind `Batching::in_order` and `PassOn`, the next stage gets one key's tasks in
/// offset order across batches, and each task completes there.
#[test]
fn in_order_batches_keep_key_order_downstream() {
    let h = Harness::new(bounded(1));
    let seen: Seen = Arc::default();
    let chain =
        Chain::new(crate::Batching::new(crate::PassOn, 2, Duration::from_millis(20)).in_order())
            .then_process(SlowFirst(seen.clone()));
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(0, &runner);
    let keys: Vec<Option<u8>> = (0..12).map(|_| Some(7)).collect();
    h.offer(&core, &mut ctx, 0, &keys, false);
    assert!(h.drive(&mut ctx, || core.position() == Some(12)));
    let after: Vec<u64> = at_stage(&seen, "after").iter().map(|s| s.1).collect();
    assert_eq!(after, (0..12).collect::<Vec<_>>());
}

/// A chain used as a stage passes its last stage's tasks on to the outer chain's next
/// stage.
#[test]
fn a_nested_chain_passes_on_to_the_outer_chain() {
    let h = Harness::new(bounded(2));
    let seen: Seen = Arc::default();
    let inner = Chain::new(Relay("a", seen.clone())).then_process(Relay("b", seen.clone()));
    let chain = Chain::new(inner).then_process(Relay("c", seen.clone()));
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(0, &runner);
    let keys: Vec<Option<u8>> = (0..10).map(|i| Some(i % 3)).collect();
    h.offer(&core, &mut ctx, 0, &keys, false);
    assert!(h.drive(&mut ctx, || core.position() == Some(10)));
    for stage in ["a", "b", "c"] {
        assert_eq!(at_stage(&seen, stage).len(), 10, "stage {stage}");
    }
}

/// The stage behind a window: a task below `hold_below` waits for the gate; each task is
/// noted once it has run, so `seen` is the order tasks completed in.
struct HeldDownstream {
    seen: Seen,
    gate: Arc<tokio::sync::Semaphore>,
    hold_below: u64,
    waiting: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl TaskProcessor<u64> for HeldDownstream {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        if task < self.hold_below {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let permit = self.gate.acquire().await.map_err(ProcessError::new)?;
            permit.forget();
        }
        note(&self.seen, "after", ctx, task);
        Ok(())
    }
}

/// `partition_concurrency` changes while one key's tasks are deferred in a per-lane
/// window (`stage` makes the window's instances): the partition waits until they have
/// completed before it moves to the new lanes, whose new instances could otherwise let
/// the key's later tasks overtake them.
fn a_window_held_across_a_lane_change_keeps_key_order(stage: Chain<u64>) {
    let h = Harness::new(bounded(1));
    let seen: Seen = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = Arc::new(AtomicUsize::new(0));
    let (half, n) = (6u64, 12u64);
    let chain = stage.then_process(HeldDownstream {
        seen: seen.clone(),
        gate: gate.clone(),
        hold_below: half,
        waiting: waiting.clone(),
    });
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(0, &runner);
    let keys = vec![Some(7u8); n as usize];
    h.offer(&core, &mut ctx, 0, &keys[..half as usize], false);
    // The first tasks left the lane (deferred in the window) and one reached the gate.
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting.load(Ordering::SeqCst) == 0 || ctx.lanes_occupied() > 0 {
        assert!(Instant::now() < deadline, "the window never closed");
        ctx.flow(&NoPause, &h.recorder, 0);
        h.wakeup.wait(Duration::from_millis(10));
    }
    h.live.set("partition_concurrency", "3").unwrap();
    h.offer(&core, &mut ctx, half as i64, &keys[half as usize..], false);
    let health = ctx.health().not_ready;
    assert!(
        matches!(health, Some(crate::NotReady::ChangingLanes { to: 3, .. })),
        "the lanes changed under a deferred task: {health:?}"
    );
    gate.add_permits(n as usize);
    assert!(h.drive(&mut ctx, || core.position() == Some(n as i64)));
    assert_eq!(ctx.health().not_ready, None, "on the new lanes");
    let after: Vec<u64> = at_stage(&seen, "after").iter().map(|s| s.1).collect();
    let mut sorted = after.clone();
    sorted.sort_unstable();
    assert_eq!(after, sorted, "one key's tasks completed out of order");
    assert!(after.last().is_some_and(|t| *t >= half), "{after:?}");
}

#[test]
fn an_in_order_batch_held_across_a_lane_change_keeps_key_order() {
    a_window_held_across_a_lane_change_keeps_key_order(Chain::scoped(ProcessorScope::Lane, || {
        crate::Batching::new(crate::PassOn, 1000, Duration::from_millis(20)).in_order()
    }));
}

#[test]
fn a_compaction_window_held_across_a_lane_change_keeps_key_order() {
    a_window_held_across_a_lane_change_keeps_key_order(Chain::scoped(ProcessorScope::Lane, || {
        crate::Compaction::new(crate::PassOn, Duration::from_millis(20), |kept, arrived| {
            if arrived.info.offset > kept.info.offset {
                crate::Survivor::Arrived
            } else {
                crate::Survivor::Kept
            }
        })
    }));
}

/// Panics when dropped.
struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("cannot let go");
    }
}

#[async_trait::async_trait]
impl TaskProcessor<u64> for PanicsOnDrop {
    async fn process(&self, ctx: &ProcessingContext, task: u64) -> Result<(), ProcessError> {
        ctx.push(task).await
    }
}

/// A per-partition or per-lane instance whose `Drop` panics neither unwinds out of the
/// partition's release (the rebalance callback, where it would abort the process) nor
/// out of a lane change: the panic is caught and counted.
#[test]
fn an_instance_that_panics_when_dropped_is_contained() {
    let h = Harness::new(bounded(2));
    let chain = Chain::scoped(ProcessorScope::Partition, || PanicsOnDrop)
        .then_scoped(ProcessorScope::Lane, || PanicsOnDrop);
    let stages = chain.stages.clone();
    let runner = h.runner(chain, 0);
    let (core, mut ctx) = h.assign(0, &runner);
    let keys: Vec<Option<u8>> = (0..20).map(|i| Some(i as u8)).collect();
    h.offer(&core, &mut ctx, 0, &keys, false);
    assert!(h.drive(&mut ctx, || core.position() == Some(20)));
    let panics = || -> Vec<u64> {
        stages
            .iter()
            .map(|s| s.drop_panics.load(Ordering::SeqCst))
            .collect()
    };
    // The lanes change: the per-lane instances go.
    h.live.set("partition_concurrency", "3").unwrap();
    let changed =
        std::panic::catch_unwind(AssertUnwindSafe(|| h.drive(&mut ctx, || panics()[1] == 2)));
    assert_eq!(
        changed.ok(),
        Some(true),
        "a drop panic unwound out of the lane change, or was not counted: {:?}",
        panics()
    );
    // Revoked: the partition instance and the new lanes' ones go.
    h.offer(&core, &mut ctx, 20, &keys, false);
    assert!(h.drive(&mut ctx, || core.position() == Some(40)));
    core.revoke();
    let closed = std::panic::catch_unwind(AssertUnwindSafe(|| core.close()));
    assert_eq!(
        closed.ok(),
        Some(0),
        "a drop panic unwound out of the release"
    );
    assert_eq!(panics()[0], 1);
    assert!(panics()[1] > 2, "{:?}", panics());
}
