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

use super::partition_core::PartitionCore;

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Completed normally.
    Done,
    /// `process` returned an error or panicked (already counted by the lane).
    FailedCounted,
    /// `Completion::fail`.
    Failed,
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
    timer: Mutex<Option<tokio::task::AbortHandle>>,
    /// Present when the lane finishes the task itself (it wrote state): settling sends the
    /// outcome there instead of marking the offset done.
    handoff: Mutex<Option<oneshot::Sender<Outcome>>>,
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
            timer: Mutex::new(None),
            handoff: Mutex::new(handoff),
        })
    }

    pub(crate) fn partition(&self) -> &Arc<PartitionCore> {
        &self.partition
    }

    pub(crate) fn offset(&self) -> i64 {
        self.offset
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
            Outcome::Done | Outcome::FailedCounted => {}
            Outcome::Failed => r.failed(),
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

    /// Settles the task (once) and passes the outcome on.
    pub(crate) fn finish(&self, outcome: Outcome) {
        if !self.settle(outcome) {
            return;
        }
        match self.handoff.lock().take() {
            Some(lane) => {
                // The lane is gone only if its runtime is shutting down.
                if lane.send(outcome).is_err() {
                    self.partition.release();
                }
            }
            None => self.partition.finish(self.offset),
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
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
