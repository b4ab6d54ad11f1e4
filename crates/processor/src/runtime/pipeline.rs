//! Running one task: from a lane picking it up to its offset counting as done.
//!
//! 1. The partition is asked whether the task may start (not if it was revoked).
//! 2. `process` runs; a panic is caught and counted as a failure.
//! 3. The task is settled — now, or later through its [`Completion`](crate::Completion).
//! 4. If the task wrote partition-local state, the lane holds the key until the writes are
//!    acknowledged by the changelog and applied locally (see [`super::state`]); a deferred
//!    task that wrote state holds its key until it completes. The key's next task reads
//!    those writes, and one key's writes are applied in offset order.
//! 5. The offset is marked done — or, if the partition was released meanwhile, nothing is.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::oneshot;
use tracing::Instrument as _;

use super::completion::{CompletionInner, Outcome};
use super::state::StateRuntime;
use super::task::TaskUnit;
use crate::context::ProcessingContext;
use crate::TaskProcessor;

/// Runs tasks; one per subscription, shared by its lanes.
#[async_trait::async_trait]
pub(crate) trait TaskRunner<T>: Send + Sync + 'static {
    async fn run(&self, unit: TaskUnit<T>);
}

/// The runner of a subscription: its processor, and its state runtime if it has one.
pub(crate) struct Pipeline<T, P> {
    pub(crate) processor: Arc<P>,
    pub(crate) subscription: Arc<str>,
    pub(crate) deferred_timeout: Option<Duration>,
    pub(crate) state: Option<Arc<StateRuntime>>,
    pub(crate) _task: std::marker::PhantomData<fn(T)>,
}

#[async_trait::async_trait]
impl<T: Send + 'static, P: TaskProcessor<T>> TaskRunner<T> for Pipeline<T, P> {
    async fn run(&self, unit: TaskUnit<T>) {
        let TaskUnit {
            partition,
            offset,
            key,
            metadata,
            task,
            state,
            trace,
        } = unit;
        if !partition.try_start() {
            return;
        }
        let span = crate::task_span::task_span(
            &self.subscription,
            partition.topic(),
            partition.partition(),
            offset,
            key.as_deref(),
            &metadata,
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
        let mut ctx = ProcessingContext {
            subscription: self.subscription.clone(),
            key,
            metadata,
            completion: completion.clone(),
            deferred: AtomicBool::new(false),
            deferred_timeout: self.deferred_timeout,
            state,
        };
        let started = Instant::now();
        let result = AssertUnwindSafe(self.processor.process(&ctx, task).instrument(span))
            .catch_unwind()
            .await;
        let recorder = partition.recorder();
        let ok = match result {
            Ok(Ok(())) => {
                recorder.processed(started.elapsed());
                true
            }
            Ok(Err(e)) => {
                recorder.process_failed(started.elapsed());
                tracing::warn!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset, "task failed: {e}");
                false
            }
            Err(_) => {
                recorder.process_failed(started.elapsed());
                tracing::error!(subscription = %self.subscription, topic = %partition.topic(),
                    partition = partition.partition(), offset, "processor panicked; task counted as failed");
                false
            }
        };
        // Settled now unless deferred (a deferred task that failed in `process` fails).
        let now = (!ctx.is_deferred() || !ok).then_some(if ok {
            Outcome::Done
        } else {
            Outcome::FailedCounted
        });
        let state = ctx.state.take();
        drop(ctx);
        let (Some(state), Some(outcome_rx), Some(runtime)) = (state, outcome, &self.state) else {
            if let Some(o) = now {
                completion.finish(o);
            }
            return;
        };
        let settled_here = now.filter(|o| completion.settle(*o));
        let outcome = match settled_here {
            Some(o) => o,
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
        runtime
            .finish_task(&partition, offset, state, outcome)
            .await;
    }
}
