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
    pub(crate) state: Option<crate::state::TaskBatch>,
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
        let completion =
            CompletionInner::new(partition.clone(), unit.offset, self.counters.clone(), self.hook.clone(), unit.state);
        let ctx = ProcessingContext {
            subscription: self.subscription.clone(),
            key: unit.key,
            metadata: unit.metadata,
            completion: completion.clone(),
            deferred: AtomicBool::new(false),
            deferred_timeout: self.deferred_timeout,
        };
        let started = Instant::now();
        let result = AssertUnwindSafe(self.processor.process(&ctx, unit.task)).catch_unwind().await;
        partition.metrics.process_seconds.record(started.elapsed().as_secs_f64());
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
            completion.finish(if ok { Outcome::Done } else { Outcome::FailedCounted });
        } else if !ok {
            completion.finish(Outcome::FailedCounted);
        }
    }
}

type KeyHasher = BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// The lanes of one partition.
pub(crate) enum PartitionScheduler<T> {
    Bounded { lanes: Vec<mpsc::UnboundedSender<TaskUnit<T>>>, next_unkeyed: usize },
    PerKey { queues: Arc<Mutex<HashMap<Arc<[u8]>, VecDeque<TaskUnit<T>>>>> },
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
                PartitionScheduler::Bounded { lanes, next_unkeyed: 0 }
            }
            SchedulingMode::PerKey => PartitionScheduler::PerKey { queues: Arc::new(Mutex::new(HashMap::new())) },
        }
    }

    pub(crate) fn dispatch<P: TaskProcessor<T>>(&mut self, unit: TaskUnit<T>, worker: &Arc<Worker<T, P>>, runtime: &Handle) {
        match self {
            PartitionScheduler::Bounded { lanes, next_unkeyed } => {
                let lane = match unit.key.as_deref() {
                    Some(k) if !k.is_empty() => (KeyHasher::default().hash_one(k) % lanes.len() as u64) as usize,
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
