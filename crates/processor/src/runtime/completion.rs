//! How a task ends, exactly once, whoever ends it.
//!
//! A task ends when `process` returns, or — if it was deferred — when its
//! [`Completion`](crate::Completion) is completed or failed, when
//! `deferred_complete_timeout` passes, or when every handle is dropped. Whichever comes
//! first *settles* the task; later attempts do nothing. Settling records the outcome once
//! and then either marks the offset done, or, when the task wrote partition-local state,
//! hands the outcome to the lane, which makes the writes durable before the offset counts
//! as done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::forward::{Failure, Forwarder, RawRecord};
use super::partition_core::PartitionCore;

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Completed normally.
    Done,
    /// `process` returned an error (or `Completion::fail`).
    Error,
    /// The processor asked for a retry (`ctx.retry()`, `Completion::retry`,
    /// `ProcessError::retry`).
    RetryAsked,
    /// `process` returned a permanent error: never retried.
    Permanent,
    /// `process` panicked, or a deferred task's `Completion` was dropped by a panic.
    Panicked,
    /// Not completed within `deferred_complete_timeout`.
    TimedOut,
    /// Every `Completion` handle dropped without completing.
    Leaked,
}

impl Outcome {
    /// Whether the task's effects (state writes) are kept.
    pub(crate) fn is_success(self) -> bool {
        self == Outcome::Done
    }
}

/// The completion of one task, shared by its context, its `Completion` handles and its
/// deferred-timeout timer.
pub(crate) struct CompletionInner {
    partition: Arc<PartitionCore>,
    offset: i64,
    started: Instant,
    done: AtomicBool,
    handles: AtomicUsize,
    /// `defer` calls so far, by any stage.
    defers: AtomicUsize,
    timer: Mutex<Option<tokio::task::AbortHandle>>,
    /// Present when the lane finishes the task itself (it wrote state): settling sends the
    /// outcome there instead of marking the offset done.
    handoff: Mutex<Option<oneshot::Sender<Outcome>>>,
    /// Why the task failed, for logs and dead-letter headers.
    reason: Mutex<Option<String>>,
    /// Where a failed task is forwarded, and its record; present when the subscription
    /// retries or dead-letters.
    forward: Mutex<Option<(Arc<Forwarder>, Arc<RawRecord>)>>,
}

impl CompletionInner {
    pub(crate) fn new(
        partition: Arc<PartitionCore>,
        offset: i64,
        handoff: Option<oneshot::Sender<Outcome>>,
    ) -> Arc<Self> {
        Arc::new(CompletionInner {
            partition,
            offset,
            started: Instant::now(),
            done: AtomicBool::new(false),
            handles: AtomicUsize::new(0),
            defers: AtomicUsize::new(0),
            timer: Mutex::new(None),
            handoff: Mutex::new(handoff),
            reason: Mutex::new(None),
            forward: Mutex::new(None),
        })
    }

    /// Failures of this task are forwarded by `forwarder` (retry or dead-letter topic).
    pub(crate) fn forward_failures(&self, forwarder: Arc<Forwarder>, record: Arc<RawRecord>) {
        *self.forward.lock() = Some((forwarder, record));
    }

    /// Whether failures of this task can go to a retry topic.
    pub(crate) fn can_retry(&self) -> bool {
        self.forward
            .lock()
            .as_ref()
            .is_some_and(|(f, _)| f.retry.is_some())
    }

    /// Records why the task is failing (the first reason given wins).
    pub(crate) fn set_reason(&self, reason: impl std::fmt::Display) {
        let mut r = self.reason.lock();
        if r.is_none() && !self.is_done() {
            *r = Some(reason.to_string());
        }
    }

    pub(crate) fn partition(&self) -> &Arc<PartitionCore> {
        &self.partition
    }

    pub(crate) fn offset(&self) -> i64 {
        self.offset
    }

    /// When the task started.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Records `outcome` if the task is not settled yet; true if this call settled it.
    pub(crate) fn settle(&self, outcome: Outcome) -> bool {
        if self.done.swap(true, Ordering::AcqRel) {
            return false;
        }
        if let Some(t) = self.timer.lock().take() {
            t.abort();
        }
        let (p, r) = (&self.partition, self.partition.recorder());
        match outcome {
            Outcome::Done => {}
            Outcome::Error | Outcome::RetryAsked | Outcome::Permanent => r.failed(),
            Outcome::Panicked => r.panicked(),
            Outcome::TimedOut => {
                r.deferred_timed_out();
                tracing::warn!(topic = %p.topic(), partition = p.partition(), offset = self.offset,
                    "deferred task not completed in time; completed as failed");
            }
            Outcome::Leaked => {
                r.completion_leaked();
                tracing::warn!(topic = %p.topic(), partition = p.partition(), offset = self.offset,
                    "Completion dropped without completing; task failed");
            }
        }
        r.completed(self.started.elapsed());
        true
    }

    /// Settles the task (once) and passes the outcome on: a failure is first forwarded
    /// to the retry or dead-letter topic when the subscription has one.
    pub(crate) fn finish(&self, outcome: Outcome) {
        if !self.settle(outcome) {
            return;
        }
        let handoff = self.handoff.lock().take();
        let forward = (!outcome.is_success())
            .then(|| self.forward.lock().take())
            .flatten();
        let Some((forwarder, record)) = forward else {
            pass_on(&self.partition, self.offset, handoff, outcome);
            return;
        };
        let failure = Failure::of(outcome, self.reason.lock().take());
        let (partition, offset) = (self.partition.clone(), self.offset);
        forwarder.spawn(
            partition.clone(),
            offset,
            record,
            failure,
            move |forwarded| match (forwarded, handoff) {
                (true, handoff) => pass_on(&partition, offset, handoff, outcome),
                // The lane releases the task when its handoff is dropped.
                (false, Some(_)) => {}
                (false, None) => partition.release(),
            },
        );
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// A stage deferred the task.
    pub(crate) fn mark_deferred(&self) {
        self.defers.fetch_add(1, Ordering::AcqRel);
    }

    /// How often the task was deferred so far (a later stage deferred it when this moves).
    pub(crate) fn defers(&self) -> usize {
        self.defers.load(Ordering::Acquire)
    }

    /// Whether some stage deferred the task.
    pub(crate) fn is_deferred(&self) -> bool {
        self.defers() > 0
    }

    /// A new `Completion` handle; returns whether it is the first.
    pub(crate) fn add_handle(&self) -> bool {
        self.handles.fetch_add(1, Ordering::AcqRel) == 0
    }

    /// A handle went away without completing; true if it was the last one.
    pub(crate) fn drop_handle(&self) -> bool {
        self.handles.fetch_sub(1, Ordering::AcqRel) == 1
    }

    pub(crate) fn set_timer(&self, timer: tokio::task::AbortHandle) {
        *self.timer.lock() = Some(timer);
    }
}

/// Hands a settled task's outcome to its lane (it wrote state), or marks its offset done.
fn pass_on(
    partition: &PartitionCore,
    offset: i64,
    handoff: Option<oneshot::Sender<Outcome>>,
    outcome: Outcome,
) {
    match handoff {
        // The lane is gone only if its runtime is shutting down.
        Some(lane) => {
            if lane.send(outcome).is_err() {
                partition.release();
            }
        }
        None => partition.finish(offset),
    }
}
