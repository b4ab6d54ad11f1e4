//! Key lanes: one key's tasks one at a time in offset order, different keys side by side.
//!
//! * **bounded**: each partition has `partition_concurrency` lanes, each a tokio task
//!   draining a FIFO channel; a key always hashes to the same lane. Two keys may share a
//!   lane and then wait for each other, as in Decaton's thread-pool runtime.
//! * **per-key**: a lane exists per key that has tasks in flight. The first task of an
//!   idle key spawns its lane; the lane runs the key's queue dry and disappears. Any number
//!   of keys run concurrently; `max_pending` bounds them.
//!
//! Tasks without a key (null or empty) carry no ordering constraint: bounded mode spreads
//! them round-robin over the lanes, per-key mode runs each on its own.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_protocol::TaskMetadata;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::config::{ProcessorProperties, SchedulingMode};
use crate::context::{CompletionHook, CompletionInner, Outcome, ProcessingContext};
use crate::partition::PartitionShared;
use crate::stats::Counters;
use crate::TaskProcessor;

/// A decoded task on its way to a lane.
pub(crate) struct TaskUnit<T> {
    pub(crate) partition: Arc<PartitionShared>,
    pub(crate) offset: i64,
    pub(crate) key: Option<Arc<[u8]>>,
    pub(crate) metadata: TaskMetadata,
    pub(crate) task: T,
    pub(crate) state: Option<crate::state::TaskState>,
}

/// Runs tasks: shared by every lane of a subscription.
pub(crate) struct Worker<T, P> {
    pub(crate) processor: Arc<P>,
    pub(crate) subscription: Arc<str>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) deferred_timeout: Option<Duration>,
    pub(crate) hook: Option<Arc<dyn CompletionHook>>,
    pub(crate) _task: std::marker::PhantomData<fn(T)>,
}

impl<T: Send + 'static, P: TaskProcessor<T>> Worker<T, P> {
    pub(crate) async fn run(&self, unit: TaskUnit<T>) {
        let partition = unit.partition;
        if !partition.try_start() {
            return;
        }
        let scheduled = unit.metadata.scheduled_time_millis;
        if scheduled > 0 {
            let now = decaton_protocol::now_millis();
            if scheduled > now {
                tokio::time::sleep(Duration::from_millis((scheduled - now) as u64)).await;
                if partition.is_revoked() {
                    partition.release();
                    return;
                }
            }
        }
        let completion = CompletionInner::new(
            partition.clone(),
            unit.offset,
            self.counters.clone(),
            self.hook.clone(),
            unit.state,
        );
        let ctx = ProcessingContext {
            subscription: self.subscription.clone(),
            key: unit.key,
            metadata: unit.metadata,
            completion: completion.clone(),
            deferred: AtomicBool::new(false),
            deferred_timeout: self.deferred_timeout,
        };
        let started = Instant::now();
        let result = AssertUnwindSafe(self.processor.process(&ctx, unit.task))
            .catch_unwind()
            .await;
        partition
            .metrics
            .process_seconds
            .record(started.elapsed().as_secs_f64());
        let ok = match result {
            Ok(Ok(())) => {
                partition.metrics.processed.increment(1);
                self.counters.processed.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(subscription = %self.subscription, topic = %partition.topic, partition = partition.partition,
                    offset = unit.offset, "task failed: {e}");
                partition.metrics.failed.increment(1);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(_) => {
                tracing::error!(subscription = %self.subscription, topic = %partition.topic, partition = partition.partition,
                    offset = unit.offset, "processor panicked; task counted as failed");
                partition.metrics.failed.increment(1);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        };
        if !ctx.is_deferred() {
            completion.finish(if ok {
                Outcome::Done
            } else {
                Outcome::FailedCounted
            });
        } else if !ok {
            completion.finish(Outcome::FailedCounted);
        }
    }
}

type KeyHasher = BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// Per-key queues of the per-key mode: a key is present while its lane runs.
type KeyQueues<T> = Arc<Mutex<HashMap<Arc<[u8]>, VecDeque<TaskUnit<T>>>>>;

/// The lanes of one partition.
pub(crate) enum PartitionScheduler<T> {
    Bounded {
        lanes: Vec<mpsc::UnboundedSender<TaskUnit<T>>>,
        next_unkeyed: usize,
    },
    PerKey {
        queues: KeyQueues<T>,
    },
}

impl<T: Send + 'static> PartitionScheduler<T> {
    pub(crate) fn new<P: TaskProcessor<T>>(
        props: &ProcessorProperties,
        worker: &Arc<Worker<T, P>>,
        runtime: &Handle,
    ) -> Self {
        match props.mode {
            SchedulingMode::Bounded => {
                let lanes = (0..props.partition_concurrency.max(1))
                    .map(|_| {
                        let (tx, mut rx) = mpsc::unbounded_channel::<TaskUnit<T>>();
                        let worker = worker.clone();
                        runtime.spawn(async move {
                            while let Some(unit) = rx.recv().await {
                                worker.run(unit).await;
                            }
                        });
                        tx
                    })
                    .collect();
                PartitionScheduler::Bounded {
                    lanes,
                    next_unkeyed: 0,
                }
            }
            SchedulingMode::PerKey => PartitionScheduler::PerKey {
                queues: Arc::new(Mutex::new(HashMap::new())),
            },
        }
    }

    pub(crate) fn dispatch<P: TaskProcessor<T>>(
        &mut self,
        unit: TaskUnit<T>,
        worker: &Arc<Worker<T, P>>,
        runtime: &Handle,
    ) {
        match self {
            PartitionScheduler::Bounded {
                lanes,
                next_unkeyed,
            } => {
                let lane = match unit.key.as_deref() {
                    Some(k) if !k.is_empty() => {
                        (KeyHasher::default().hash_one(k) % lanes.len() as u64) as usize
                    }
                    _ => {
                        *next_unkeyed = (*next_unkeyed + 1) % lanes.len();
                        *next_unkeyed
                    }
                };
                if let Err(mpsc::error::SendError(unit)) = lanes[lane].send(unit) {
                    // The lane task is gone (runtime shutting down): the task cannot run.
                    unit.partition.try_start().then(|| unit.partition.release());
                }
            }
            PartitionScheduler::PerKey { queues } => {
                let key = match unit.key.clone() {
                    Some(k) if !k.is_empty() => k,
                    _ => {
                        let worker = worker.clone();
                        runtime.spawn(async move { worker.run(unit).await });
                        return;
                    }
                };
                {
                    let mut map = queues.lock();
                    if let Some(queue) = map.get_mut(&key) {
                        queue.push_back(unit);
                        return;
                    }
                    map.insert(key.clone(), VecDeque::new());
                }
                let worker = worker.clone();
                let queues = queues.clone();
                runtime.spawn(async move {
                    let mut next = Some(unit);
                    while let Some(unit) = next.take() {
                        worker.run(unit).await;
                        let mut map = queues.lock();
                        match map.get_mut(&key).and_then(VecDeque::pop_front) {
                            Some(u) => next = Some(u),
                            None => {
                                map.remove(&key);
                            }
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;
    use crate::offsets::OffsetTracker;
    use crate::{ProcessError, ProcessingContext};
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;

    /// Records start order per key and checks that a key never runs twice at once.
    #[derive(Default)]
    struct Probe {
        order: Mutex<HashMap<Vec<u8>, Vec<i64>>>,
        running_keys: Mutex<HashMap<Vec<u8>, usize>>,
        overlaps: AtomicUsize,
        running: AtomicUsize,
        max_running: AtomicUsize,
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
        let worker = Arc::new(Worker {
            processor: Arc::new(ProbeProcessor {
                probe: probe.clone(),
                yields,
            }),
            subscription: Arc::from("s"),
            counters: Arc::new(Counters::default()),
            deferred_timeout: None,
            hook: None,
            _task: std::marker::PhantomData,
        });
        let mut props = ProcessorProperties::default();
        props.mode = mode;
        props.partition_concurrency = lanes;
        let partition = Arc::new(PartitionShared::new(
            "s",
            Arc::from("t"),
            0,
            OffsetTracker::starting_at(Some(0)),
        ));
        let handle = rt.handle().clone();
        let mut sched = PartitionScheduler::new(&props, &worker, &handle);
        for (offset, key) in keys.iter().enumerate() {
            let mut core = partition.core.lock();
            core.tracker.register(offset as i64);
            core.dispatched += 1;
            drop(core);
            let unit = TaskUnit {
                partition: partition.clone(),
                offset: offset as i64,
                key: key.map(|k| Arc::from(vec![k])),
                metadata: TaskMetadata::default(),
                task: offset as u64,
                state: None,
            };
            sched.dispatch(unit, &worker, &handle);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        partition.wait_until(deadline, |c| c.dispatched == 0);
        let position = partition.core.lock().tracker.position();
        (probe, position)
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
        // 64 distinct keys, each task yields a few times: many run at once.
        let keys: Vec<Option<u8>> = (0..64).map(Some).collect();
        let (probe, _) = run_case(SchedulingMode::PerKey, 1, keys, vec![3]);
        assert!(probe.max_running.load(Ordering::SeqCst) > 8);
    }
}
