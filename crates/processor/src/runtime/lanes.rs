//! Key lanes: one key's tasks one at a time in offset order, different keys side by side.
//!
//! * **bounded**: each partition has `partition_concurrency` lanes, each a tokio task
//!   draining a FIFO channel; a key always hashes to the same lane. Two keys may share a
//!   lane and then wait for each other, as in Decaton's thread-pool runtime.
//! * **per-key**: a lane exists per key that has tasks in flight. The first task of an
//!   idle key spawns its lane; the lane runs the key's queue dry and disappears. Any number
//!   of keys run concurrently; `max_pending` bounds them.
//!
//! In bounded mode the number of lanes can change while running (`partition_concurrency`
//! is reloadable): the partition stops dispatching, waits until its lanes hold no task
//! ([`Lanes::occupied`]) and none of its tasks is still deferred (a task deferred in a
//! per-lane `Batching` or `Compaction` window has left its lane but not finished), then
//! replaces them with [`Lanes::resized`] — a key moving to another lane never overtakes
//! its previous task.
//!
//! Tasks without a key (null or empty) carry no ordering constraint: bounded mode spreads
//! them round-robin over the lanes, per-key mode runs each on its own. Every queue here
//! holds only registered tasks, so `max_pending` bounds it.
//!
//! Dispatching only queues a task here; [`Lanes::flush`] hands what was queued to the
//! lanes in one go. The consumer thread dispatches every record of one poll batch, then
//! flushes once, so a lane is woken once per batch rather than once per task.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::pipeline::TaskRunner;
use super::task::TaskUnit;
use crate::config::{ProcessorProperties, SchedulingMode};

type KeyHasher = BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// Per-key queues of the per-key mode: a key is present while its lane runs.
type KeyQueues<T> = Arc<Mutex<HashMap<Arc<[u8]>, VecDeque<TaskUnit<T>>>>>;

/// A per-key lane (or a key-less task) waiting to be spawned at the next flush.
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One bounded lane: its channel, and the tasks dispatched to it since the last flush.
struct Lane<T> {
    tx: mpsc::UnboundedSender<Vec<TaskUnit<T>>>,
    queued: Vec<TaskUnit<T>>,
}

enum Mode<T> {
    Bounded {
        lanes: Vec<Lane<T>>,
        next_unkeyed: usize,
    },
    PerKey {
        queues: KeyQueues<T>,
        /// Lanes to spawn at the next flush.
        jobs: Vec<Job>,
    },
}

/// The lanes of one partition.
pub(crate) struct Lanes<T> {
    mode: Mode<T>,
    runner: Arc<dyn TaskRunner<T>>,
    runtime: Handle,
    /// Tasks queued in or run by the lanes (bounded mode).
    occupied: Arc<AtomicUsize>,
}

impl<T: Send + 'static> Lanes<T> {
    pub(crate) fn new(
        props: &ProcessorProperties,
        runner: Arc<dyn TaskRunner<T>>,
        runtime: Handle,
    ) -> Self {
        let occupied = Arc::new(AtomicUsize::new(0));
        let mode = match props.mode {
            SchedulingMode::Bounded => Mode::Bounded {
                lanes: (0..props.partition_concurrency.max(1))
                    .map(|_| {
                        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<TaskUnit<T>>>();
                        let runner = runner.clone();
                        let occupied = occupied.clone();
                        runtime.spawn(async move {
                            while let Some(units) = rx.recv().await {
                                for unit in units {
                                    let partition = unit.partition.clone();
                                    runner.run(unit).await;
                                    if occupied.fetch_sub(1, Ordering::AcqRel) == 1 {
                                        // A partition changing its lanes waits for this.
                                        partition.notify_if_waiting();
                                    }
                                }
                            }
                        });
                        Lane {
                            tx,
                            queued: Vec::new(),
                        }
                    })
                    .collect(),
                next_unkeyed: 0,
            },
            SchedulingMode::PerKey => Mode::PerKey {
                queues: Arc::new(Mutex::new(HashMap::new())),
                jobs: Vec::new(),
            },
        };
        Lanes {
            mode,
            runner,
            runtime,
            occupied,
        }
    }

    /// The number of lanes (bounded mode).
    pub(crate) fn concurrency(&self) -> Option<usize> {
        match &self.mode {
            Mode::Bounded { lanes, .. } => Some(lanes.len()),
            Mode::PerKey { .. } => None,
        }
    }

    /// Tasks queued in or run by the lanes now, flushed or not (bounded mode; 0 in
    /// per-key mode).
    pub(crate) fn occupied(&self) -> usize {
        self.occupied.load(Ordering::Acquire)
    }

    /// New bounded lanes, `concurrency` of them, for the same partition; dropping these
    /// (empty) ones ends their tasks.
    pub(crate) fn resized(&self, concurrency: usize) -> Lanes<T> {
        let props = ProcessorProperties {
            mode: SchedulingMode::Bounded,
            partition_concurrency: concurrency,
            ..ProcessorProperties::default()
        };
        Lanes::new(&props, self.runner.clone(), self.runtime.clone())
    }

    /// Queues a registered task on its key's lane; it reaches the lane at the next
    /// [`Self::flush`].
    pub(crate) fn dispatch(&mut self, mut unit: TaskUnit<T>) {
        match &mut self.mode {
            Mode::Bounded {
                lanes,
                next_unkeyed,
            } => {
                let lane = match unit.key.as_deref() {
                    Some(k) => (KeyHasher::default().hash_one(k) % lanes.len() as u64) as usize,
                    None => {
                        *next_unkeyed = (*next_unkeyed + 1) % lanes.len();
                        *next_unkeyed
                    }
                };
                unit.lane = Some(lane);
                self.occupied.fetch_add(1, Ordering::AcqRel);
                #[allow(
                    clippy::indexing_slicing,
                    reason = "`lane` is taken modulo `lanes.len()`, never 0"
                )]
                lanes[lane].queued.push(unit);
            }
            Mode::PerKey { queues, jobs } => {
                let runner = self.runner.clone();
                let Some(key) = unit.key.clone() else {
                    jobs.push(Box::pin(async move { runner.run(unit).await }));
                    return;
                };
                {
                    let mut map = queues.lock();
                    if let Some(queue) = map.get_mut(&key) {
                        queue.push_back(unit);
                        return;
                    }
                    map.insert(key.clone(), VecDeque::new());
                }
                let queues = queues.clone();
                jobs.push(Box::pin(async move {
                    let mut next = Some(unit);
                    while let Some(unit) = next.take() {
                        runner.run(unit).await;
                        let mut map = queues.lock();
                        match map.get_mut(&key).and_then(VecDeque::pop_front) {
                            Some(u) => next = Some(u),
                            None => {
                                map.remove(&key);
                            }
                        }
                    }
                }));
            }
        }
    }
}

impl<T> Lanes<T> {
    /// Hands the tasks dispatched since the last flush to their lanes: one message per
    /// bounded lane, or one spawn that starts the per-key lanes from inside the runtime.
    pub(crate) fn flush(&mut self) {
        match &mut self.mode {
            Mode::Bounded { lanes, .. } => {
                for lane in lanes.iter_mut().filter(|l| !l.queued.is_empty()) {
                    let units = std::mem::take(&mut lane.queued);
                    if let Err(mpsc::error::SendError(units)) = lane.tx.send(units) {
                        // The lane task is gone (its runtime is shutting down): they
                        // cannot run.
                        for unit in units {
                            self.occupied.fetch_sub(1, Ordering::AcqRel);
                            if unit.partition.try_start() {
                                unit.partition.release();
                            }
                        }
                    }
                }
            }
            Mode::PerKey { jobs, .. } => {
                if jobs.len() > 1 {
                    // Spawned from inside the runtime, the lanes go to a worker's local
                    // queue: one wakeup for the whole batch.
                    let jobs = std::mem::take(jobs);
                    self.runtime.spawn(async move {
                        for job in jobs {
                            tokio::spawn(job);
                        }
                    });
                } else if let Some(job) = jobs.pop() {
                    self.runtime.spawn(job);
                }
            }
        }
    }
}

impl<T> Drop for Lanes<T> {
    /// Tasks dispatched and not yet flushed still reach their lanes, which settle them
    /// (a revoked partition's tasks do not start).
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use crate::runtime::pipeline::Pipeline;
    use crate::runtime::task::tests::core;
    use crate::{ProcessError, ProcessingContext, TaskProcessor};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Records start order per key and checks that a key never runs twice at once.
    #[derive(Default)]
    struct Probe {
        order: Mutex<HashMap<Vec<u8>, Vec<i64>>>,
        running_keys: Mutex<HashMap<Vec<u8>, usize>>,
        overlaps: AtomicUsize,
        running: AtomicUsize,
        max_running: AtomicUsize,
        done: AtomicUsize,
    }

    struct ProbeProcessor {
        probe: Arc<Probe>,
        yields: Vec<u8>,
    }

    #[async_trait::async_trait]
    impl TaskProcessor<u64> for ProbeProcessor {
        async fn process(&self, ctx: &ProcessingContext, _task: u64) -> Result<(), ProcessError> {
            let key = ctx.key().map(<[u8]>::to_vec);
            let now = self.probe.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.probe.max_running.fetch_max(now, Ordering::SeqCst);
            if let Some(k) = &key {
                self.probe
                    .order
                    .lock()
                    .entry(k.clone())
                    .or_default()
                    .push(ctx.offset());
                let mut r = self.probe.running_keys.lock();
                let n = r.entry(k.clone()).or_default();
                *n += 1;
                if *n > 1 {
                    self.probe.overlaps.fetch_add(1, Ordering::SeqCst);
                }
            }
            // A task-dependent number of yields interleaves lanes differently per case.
            for _ in 0..self.yields[ctx.offset() as usize % self.yields.len()] {
                tokio::task::yield_now().await;
            }
            if let Some(k) = &key {
                *self.probe.running_keys.lock().entry(k.clone()).or_default() -= 1;
            }
            self.probe.running.fetch_sub(1, Ordering::SeqCst);
            self.probe.done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn run_case(
        mode: SchedulingMode,
        lanes: usize,
        keys: Vec<Option<u8>>,
        yields: Vec<u8>,
    ) -> (Arc<Probe>, Option<i64>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let probe = Arc::new(Probe::default());
        let runner: Arc<dyn TaskRunner<u64>> = Arc::new(Pipeline {
            processor: Arc::new(ProbeProcessor {
                probe: probe.clone(),
                yields,
            }),
            subscription: Arc::from("s"),
            live: crate::LiveProperties::new(ProcessorProperties::default()),
            state: None,
            forwarder: None,
            in_process: (0, crate::Backoff::fixed(std::time::Duration::ZERO)),
            shaping: None,
            _task: std::marker::PhantomData,
        });
        let mut props = ProcessorProperties::default();
        props.mode = mode;
        props.partition_concurrency = lanes;
        let partition = core();
        let mut ctx = crate::runtime::partition::PartitionContext::new(
            partition.clone(),
            Lanes::new(&props, runner, rt.handle().clone()),
            usize::MAX,
            None,
            None,
            None,
        );
        for (offset, key) in keys.iter().enumerate() {
            let unit = TaskUnit {
                partition: partition.clone(),
                offset: offset as i64,
                key: key.map(|k| Arc::from(vec![k])),
                metadata: Default::default(),
                task: offset as u64,
                state: None,
                trace: None,
                raw: None,
                lane: None,
                over_quota: false,
            };
            assert!(!ctx.offer(crate::runtime::extract::Incoming::Task(unit), 0));
        }
        ctx.flush();
        let deadline = Instant::now() + Duration::from_secs(20);
        partition.wait_idle(deadline, true);
        (probe, partition.position())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever the keys and interleavings: every task runs once, one key's tasks run
        /// in offset order and never overlap, bounded mode never exceeds its lanes, and the
        /// position ends past the last offset.
        #[test]
        fn lanes_keep_key_order(per_key in any::<bool>(), lanes in 1usize..6,
                                keys in proptest::collection::vec(proptest::option::weighted(0.9, 0u8..8), 1..200),
                                yields in proptest::collection::vec(0u8..4, 1..16)) {
            let mode = if per_key { SchedulingMode::PerKey } else { SchedulingMode::Bounded };
            let n = keys.len();
            let (probe, position) = run_case(mode, lanes, keys.clone(), yields);
            prop_assert_eq!(position, Some(n as i64));
            prop_assert_eq!(probe.done.load(Ordering::SeqCst), n);
            prop_assert_eq!(probe.overlaps.load(Ordering::SeqCst), 0);
            if !per_key {
                prop_assert!(probe.max_running.load(Ordering::SeqCst) <= lanes);
            }
            let order = probe.order.lock();
            for (k, offsets) in order.iter() {
                let expected: Vec<i64> = keys.iter().enumerate().filter(|(_, key)| key.map(|x| vec![x]).as_ref() == Some(k)).map(|(o, _)| o as i64).collect();
                prop_assert_eq!(offsets, &expected);
            }
        }
    }

    #[test]
    fn per_key_runs_distinct_keys_concurrently() {
        let keys: Vec<Option<u8>> = (0..64).map(Some).collect();
        let (probe, _) = run_case(SchedulingMode::PerKey, 1, keys, vec![3]);
        assert!(probe.max_running.load(Ordering::SeqCst) > 8);
    }
}
