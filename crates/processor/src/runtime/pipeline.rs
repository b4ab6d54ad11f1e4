//! Running one task: from a lane picking it up to its offset counting as done.
//!
//! 0. With a per-key quota, a source task whose key is shaped is queued for the shaping
//!    topic instead, its offset done once acknowledged (see [`super::quota`]); the rest
//!    does not apply to it.
//! 1. The partition is asked whether the task may start (not if it was revoked).
//! 2. `process` runs; a panic is caught and counted as a failure. A failure is tried
//!    again in the lane while the retry configuration allows it.
//! 3. The task is settled — now, or later through its [`Completion`](crate::Completion).
//! 4. If the task wrote partition-local state, the lane holds the key until the writes are
//!    acknowledged by the changelog and applied locally (see [`super::state`]); a deferred
//!    task that wrote state holds its key until it completes. The key's next task reads
//!    those writes, and one key's writes are applied in offset order.
//! 5. A failed task is forwarded to the retry or dead-letter topic if the subscription
//!    has one (see [`super::forward`]).
//! 6. The offset is marked done — or, if the partition was released meanwhile, nothing is.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use tokio::sync::oneshot;
use tracing::Instrument as _;

use super::completion::{CompletionInner, Outcome};
use super::forward::{Forwarder, RawRecord};
use super::quota::{Route, ShapingState, SHAPED_BY};
use super::state::StateRuntime;
use super::task::TaskUnit;
use crate::context::ProcessingContext;
use crate::retry::Backoff;
use crate::LiveProperties;
use crate::{FailureKind, TaskProcessor};

/// How often a task held by rate 0 looks again (a wakeup normally comes first).
const HALT_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// Runs tasks; one per subscription, shared by its lanes.
#[async_trait::async_trait]
pub(crate) trait TaskRunner<T>: Send + Sync + 'static {
    async fn run(&self, unit: TaskUnit<T>);
}

/// The runner of a subscription: its processor, its state runtime and failure forwarder
/// if it has them.
pub(crate) struct Pipeline<T, P> {
    pub(crate) processor: Arc<P>,
    pub(crate) subscription: Arc<str>,
    pub(crate) live: LiveProperties,
    pub(crate) state: Option<Arc<StateRuntime>>,
    pub(crate) forwarder: Option<Arc<Forwarder>>,
    /// Attempts in the lane after a failure, and the backoff between them.
    pub(crate) in_process: (u32, Backoff),
    /// Present when the subscription has a per-key quota.
    pub(crate) shaping: Option<Shaping>,
    pub(crate) _task: std::marker::PhantomData<fn(T)>,
}

/// The shaping side of a subscription with a per-key quota.
pub(crate) struct Shaping {
    pub(crate) state: Arc<ShapingState>,
    /// Index of the shaping topic in the subscription's topics.
    pub(crate) topic: u8,
}

#[async_trait::async_trait]
impl<T: prost::Message + Default + 'static, P: TaskProcessor<T>> TaskRunner<T> for Pipeline<T, P> {
    /// With a per-key quota, a source task at its turn first asks the shaping state where
    /// it goes (see [`super::quota`]); a shaping task of this instance lowers its key's
    /// outstanding count once it has run.
    async fn run(&self, unit: TaskUnit<T>) {
        let Some(shaping) = &self.shaping else {
            return self.run_task(unit).await;
        };
        let (Some(key), Some(raw)) = (unit.key.clone(), unit.raw.clone()) else {
            return self.run_task(unit).await;
        };
        let id = unit.partition.id();
        if id.topic == 0 {
            let Some(forwarder) = &self.forwarder else {
                return self.run_task(unit).await;
            };
            match shaping.state.route(&key, id.partition, unit.over_quota) {
                Route::Direct => self.run_task(unit).await,
                Route::Shape => {
                    let (partition, offset) = (unit.partition, unit.offset);
                    self.hold_while_stopped(&partition).await;
                    if !partition.try_start() {
                        shaping.state.settled(&key);
                        return;
                    }
                    let (state, core) = (shaping.state.clone(), partition.clone());
                    let then = move |acked| {
                        if acked {
                            core.finish(offset);
                        } else {
                            state.settled(&key);
                            core.release();
                        }
                    };
                    forwarder
                        .shape(partition, offset, raw, shaping.state.incarnation(), then)
                        .await;
                }
            }
        } else if id.topic == shaping.topic && shaping.state.is_own(raw.header(SHAPED_BY)) {
            self.run_task(unit).await;
            shaping.state.settled(&key);
        } else {
            self.run_task(unit).await;
        }
    }
}

impl<T: prost::Message + Default + 'static, P: TaskProcessor<T>> Pipeline<T, P> {
    /// Rate 0 of the partition's own topic: no task starts, nor is shaped, until it
    /// changes (checked here, not only at dispatch, so tasks already queued in the lanes
    /// stop too). The source, retry and shaping topics each have their own rate: stopping
    /// one holds only its partitions.
    async fn hold_while_stopped(&self, partition: &super::partition_core::PartitionCore) {
        while self.is_stopped(partition.id().topic) && !partition.is_revoked() {
            let _ = tokio::time::timeout(HALT_CHECK, self.live.resumed()).await;
        }
    }

    /// Whether the rate of the subscription's topic `topic` (an index into its topics) is
    /// 0: `processing_rate_per_partition` for the source, the retry topic's own for the
    /// retry topic; the shaping topic's rate is never 0.
    fn is_stopped(&self, topic: u8) -> bool {
        match topic {
            0 => self.live.is_stopped(),
            t if self.shaping.as_ref().is_some_and(|s| s.topic == t) => false,
            _ => self.live.is_retry_stopped(),
        }
    }

    /// Runs one task through the steps of the module doc.
    async fn run_task(&self, unit: TaskUnit<T>) {
        let TaskUnit {
            partition,
            offset,
            key,
            metadata,
            task,
            state,
            trace,
            raw,
            lane,
            over_quota: _,
        } = unit;
        self.hold_while_stopped(&partition).await;
        if !partition.try_start() {
            return;
        }
        let span = crate::task_span::task_span(
            &self.subscription,
            partition.topic(),
            partition.partition(),
            offset,
            key.as_deref(),
            metadata.retry_count,
            trace.as_ref(),
        );
        let (handoff, outcome) = match state {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let completion = CompletionInner::new(partition.clone(), offset, handoff);
        if let (Some(f), Some(raw)) = (&self.forwarder, &raw) {
            completion.forward_failures(f.clone(), raw.clone());
        }
        let mut ctx = ProcessingContext::new(
            self.subscription.clone(),
            key,
            metadata,
            completion.clone(),
            self.live.deferred_timeout(),
            state,
            lane,
        );
        // A span no subscriber wants costs nothing to skip.
        let failure = if span.is_disabled() {
            self.process(&mut ctx, task, raw.as_deref()).await
        } else {
            self.process(&mut ctx, task, raw.as_deref())
                .instrument(span)
                .await
        };
        // Settled now unless deferred (a deferred task that failed in `process` fails).
        let now = match failure {
            Some(f) => Some(f),
            None => (!ctx.is_deferred()).then_some(Outcome::Done),
        };
        // The contexts of later stages are gone with `process`: the writes are the lane's.
        let state = ctx.state.take().and_then(|s| Arc::try_unwrap(s).ok());
        drop(ctx);
        let (Some(state), Some(outcome_rx), Some(runtime)) = (state, outcome, &self.state) else {
            if let Some(o) = now {
                completion.finish(o);
            }
            return;
        };
        let settled_here = now.filter(|o| !o.is_success() || completion.settle(*o));
        let outcome = match settled_here {
            Some(o) if o.is_success() => o,
            // A failure goes through `finish` (it may be forwarded first), which hands
            // the outcome back here.
            Some(o) => {
                completion.finish(o);
                match outcome_rx.await {
                    Ok(o) => o,
                    Err(_) => {
                        partition.release();
                        return;
                    }
                }
            }
            None if state.is_empty() && now.is_none() => {
                // Deferred without state writes: nothing to order, do not hold the key.
                tokio::spawn(async move {
                    match outcome_rx.await {
                        Ok(_) => partition.finish(offset),
                        Err(_) => partition.release(),
                    }
                });
                return;
            }
            // Settled by a `Completion` (maybe before `process` returned): wait for it.
            None => match outcome_rx.await {
                Ok(o) => o,
                Err(_) => {
                    partition.release();
                    return;
                }
            },
        };
        // Writes the changelog refuses for good fail the task: forwarded like any failure.
        let forward = self.forwarder.clone().zip(raw);
        runtime
            .finish_task(&partition, offset, state, outcome, forward)
            .await;
    }
}

impl<T: prost::Message + Default + 'static, P: TaskProcessor<T>> Pipeline<T, P> {
    /// Calls `process`, again in the lane while the retry configuration allows it (the
    /// task decoded anew from `raw` for each attempt); the failure it ends with, if any
    /// (its reason recorded in the completion).
    async fn process(
        &self,
        ctx: &mut ProcessingContext,
        task: T,
        raw: Option<&RawRecord>,
    ) -> Option<Outcome> {
        let (attempts, backoff) = self.in_process;
        let partition = ctx.completion.partition().clone();
        let recorder = partition.recorder();
        let mut task = Some(task);
        let mut attempt = 0u32;
        loop {
            let current = match task.take() {
                Some(t) => t,
                None => match raw.and_then(RawRecord::decode::<T>) {
                    Some(t) => t,
                    // It decoded when fetched; if its record no longer does, no attempt can
                    // run it: a permanent failure (dead-lettered with this reason), never
                    // a silent success.
                    None => {
                        let reason = "the task's record no longer decodes for another \
                                      attempt in the lane";
                        tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                            partition = partition.partition(), offset = ctx.completion.offset(),
                            attempt, "task failed: {reason}");
                        ctx.completion.set_reason(reason);
                        return Some(Outcome::Permanent);
                    }
                },
            };
            // The first attempt starts when the task did.
            let started = match attempt {
                0 => ctx.completion.started(),
                _ => Instant::now(),
            };
            let result = AssertUnwindSafe(self.processor.process(ctx, current))
                .catch_unwind()
                .await;
            let took = started.elapsed();
            let (outcome, reason) = match result {
                Ok(Ok(())) => {
                    recorder.processed(took);
                    return None;
                }
                Ok(Err(e)) => {
                    recorder.process_time(took);
                    let outcome = match e.kind() {
                        FailureKind::Permanent => Outcome::Permanent,
                        FailureKind::Retry => Outcome::RetryAsked,
                        _ => Outcome::Error,
                    };
                    (outcome, e.to_string())
                }
                Err(panic) => {
                    recorder.process_time(took);
                    (
                        Outcome::Panicked,
                        format!("panic: {}", panic_message(&*panic)),
                    )
                }
            };
            let again = attempt < attempts
                && raw.is_some()
                && outcome != Outcome::Permanent
                && !ctx.is_deferred()
                && !ctx.completion.is_done()
                && !partition.is_revoked();
            if again {
                tracing::debug!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset = ctx.completion.offset(), attempt,
                    "task failed; trying again in the lane: {reason}");
                recorder.retried_in_process();
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
                ctx.state = ctx.state.take().and_then(|s| s.restarted()).map(Arc::new);
                continue;
            }
            if outcome == Outcome::Panicked {
                tracing::error!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset = ctx.completion.offset(),
                    "processor panicked; task failed: {reason}");
            } else {
                tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset = ctx.completion.offset(),
                    "task failed: {reason}");
            }
            ctx.completion.set_reason(reason);
            return Some(outcome);
        }
    }
}

/// The message a panic was raised with, when it is text.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::offsets::{DoneRanges, OffsetTracker};
    use crate::runtime::partition_core::PartitionCore;
    use crate::runtime::recorder::SubscriptionRecorder;
    use crate::runtime::topics::PartitionId;
    use crate::runtime::wakeup::Wakeup;
    use crate::stats::Counters;
    use crate::{ProcessError, ProcessorProperties};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Counts its calls; fails each when `fail`.
    struct Failing {
        calls: Arc<AtomicUsize>,
        fail: bool,
    }

    #[async_trait::async_trait]
    impl TaskProcessor<u64> for Failing {
        async fn process(&self, _: &ProcessingContext, _: u64) -> Result<(), ProcessError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(ProcessError::new("down"));
            }
            Ok(())
        }
    }

    struct Setup {
        pipeline: Pipeline<u64, Failing>,
        counters: Arc<Counters>,
        calls: Arc<AtomicUsize>,
    }

    fn setup(props: ProcessorProperties, fail: bool, attempts: u32) -> Setup {
        let calls = Arc::default();
        let pipeline = Pipeline {
            processor: Arc::new(Failing {
                calls: Arc::clone(&calls),
                fail,
            }),
            subscription: Arc::from("s"),
            live: LiveProperties::new(props),
            state: None,
            forwarder: None,
            in_process: (attempts, Backoff::fixed(Duration::ZERO)),
            shaping: Some(Shaping {
                state: Arc::new(ShapingState::new(10, "s")),
                topic: 2,
            }),
            _task: std::marker::PhantomData,
        };
        Setup {
            pipeline,
            counters: Arc::default(),
            calls,
        }
    }

    /// A registered and dispatched task of partition 0 of topic `topic` (0 source, 1
    /// retry, 2 shaping), with `raw` as its record.
    fn unit(s: &Setup, topic: u8, raw: Option<RawRecord>) -> TaskUnit<u64> {
        let recorder = SubscriptionRecorder::new(Arc::from("s"), s.counters.clone());
        let core = Arc::new(PartitionCore::new(
            Arc::from("t"),
            PartitionId {
                topic,
                partition: 0,
            },
            OffsetTracker::starting_at(Some(0), DoneRanges::default()),
            recorder.partition("t", 0),
            Arc::new(Wakeup::default()),
        ));
        core.register(0);
        core.mark_dispatched();
        TaskUnit {
            partition: core,
            offset: 0,
            key: None,
            metadata: Default::default(),
            task: 0,
            state: None,
            trace: None,
            raw: raw.map(Arc::new),
            lane: None,
            over_quota: false,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A task whose record no longer decodes when the lane tries it again fails (counted,
    /// with its reason) instead of counting as done.
    #[test]
    fn a_record_that_no_longer_decodes_on_retry_fails_the_task() {
        let s = setup(ProcessorProperties::default(), true, 2);
        let raw = RawRecord {
            key: None,
            payload: Some(vec![0xff, 0xff, 0xff]),
            headers: Vec::new(),
        };
        let unit = unit(&s, 0, Some(raw));
        let core = unit.partition.clone();
        runtime().block_on(s.pipeline.run(unit));
        assert_eq!(
            s.calls.load(Ordering::SeqCst),
            1,
            "no attempt without a task"
        );
        let stats = s.counters.snapshot();
        assert_eq!((stats.failed, stats.processed), (1, 0), "{stats:?}");
        // Failed for good and, with no dead-letter topic, completed so the partition
        // moves on.
        assert_eq!(core.position(), Some(1));
    }

    /// Rate 0 on the source topic does not hold tasks of the retry and shaping topics,
    /// which have rates of their own; the retry topic's rate 0 holds only its own.
    #[test]
    fn source_rate_0_holds_only_source_tasks() {
        let rt = runtime();
        for topic in [1u8, 2] {
            let s = setup(
                ProcessorProperties {
                    processing_rate_per_partition: 0,
                    ..Default::default()
                },
                false,
                0,
            );
            let unit = unit(&s, topic, None);
            // Not deferred: the run ends once the task has run, or never if it is held.
            let ran = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), s.pipeline.run(unit))
                    .await
                    .is_ok()
            });
            assert!(ran, "topic {topic}: held by the source's rate 0");
            assert_eq!(s.counters.snapshot().processed, 1);
        }
        // The retry topic stopped: its task is held until its partition is revoked, and
        // never runs.
        let s = setup(
            ProcessorProperties {
                retry_processing_rate_per_partition: 0,
                ..Default::default()
            },
            false,
            0,
        );
        let unit = unit(&s, 1, None);
        let core = unit.partition.clone();
        rt.block_on(async {
            let run = s.pipeline.run(unit);
            tokio::pin!(run);
            // Polled once: it is waiting at the start.
            assert!(futures::poll!(run.as_mut()).is_pending());
            core.revoke();
            run.await;
        });
        assert_eq!(s.calls.load(Ordering::SeqCst), 0);
    }
}
