//! What a processor sees of the task it runs, and how it completes a task later.
//!
//! A task completes when `process` returns, unless the processor calls
//! [`ProcessingContext::defer`]: then the task completes when the returned [`Completion`]
//! is completed, from anywhere — another task, a callback, a timer. The lane does not wait:
//! the key's next task may start as soon as `process` returns. A deferred task counts as
//! unfinished (its offset is not committed) until then; if it is not completed within
//! `deferred_complete_timeout`, it is completed as failed. A `Completion` dropped without
//! being completed fails its task rather than stalling the partition forever.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_protocol::TaskMetadata;
use parking_lot::Mutex;

use crate::partition::PartitionShared;
use crate::stats::Counters;

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Completed normally.
    Done,
    /// `process` returned an error or panicked (already counted).
    FailedCounted,
    /// `Completion::fail`.
    Failed,
    /// Not completed within `deferred_complete_timeout`.
    TimedOut,
    /// Every `Completion` handle dropped without completing.
    Leaked,
}

/// Hook run when a task completes successfully, before its offset is marked done: the
/// state store applies the task's buffered mutations here and marks the offset done only
/// once the changelog has them.
pub(crate) trait CompletionHook: Send + Sync {
    /// Takes over marking the offset done (it must call `CompletionInner::mark_done`).
    fn on_complete(&self, inner: Arc<CompletionInner>, outcome: Outcome);
}

pub(crate) struct CompletionInner {
    pub(crate) partition: Arc<PartitionShared>,
    pub(crate) offset: i64,
    started: Instant,
    done: AtomicBool,
    handles: AtomicUsize,
    counters: Arc<Counters>,
    timer: Mutex<Option<tokio::task::AbortHandle>>,
    pub(crate) hook: Option<Arc<dyn CompletionHook>>,
    pub(crate) state: Option<crate::state::TaskState>,
}

impl Outcome {
    /// Whether the task's effects (state mutations) should be kept.
    pub(crate) fn is_success(self) -> bool {
        self == Outcome::Done
    }
}

impl CompletionInner {
    pub(crate) fn new(
        partition: Arc<PartitionShared>,
        offset: i64,
        counters: Arc<Counters>,
        hook: Option<Arc<dyn CompletionHook>>,
        state: Option<crate::state::TaskState>,
    ) -> Arc<Self> {
        Arc::new(CompletionInner {
            partition,
            offset,
            started: Instant::now(),
            done: AtomicBool::new(false),
            handles: AtomicUsize::new(0),
            counters,
            timer: Mutex::new(None),
            hook,
            state,
        })
    }

    /// Completes the task once; later calls do nothing.
    pub(crate) fn finish(self: &Arc<Self>, outcome: Outcome) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(t) = self.timer.lock().take() {
            t.abort();
        }
        let m = &self.partition.metrics;
        match outcome {
            Outcome::Done | Outcome::FailedCounted => {}
            Outcome::Failed => {
                m.failed.increment(1);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::TimedOut => {
                m.failed.increment(1);
                m.deferred_timeouts.increment(1);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .deferred_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %self.partition.topic, partition = self.partition.partition, offset = self.offset,
                    "deferred task not completed in time; completed as failed");
            }
            Outcome::Leaked => {
                m.failed.increment(1);
                m.leaked.increment(1);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .completions_leaked
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %self.partition.topic, partition = self.partition.partition, offset = self.offset,
                    "Completion dropped without completing; task failed");
            }
        }
        m.complete_seconds
            .record(self.started.elapsed().as_secs_f64());
        match &self.hook {
            Some(hook) => hook.on_complete(self.clone(), outcome),
            None => self.mark_done(),
        }
    }

    /// Marks the offset done in the partition's tracker.
    pub(crate) fn mark_done(&self) {
        self.partition.finish(self.offset);
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// Everything a processor knows about the task it is running.
pub struct ProcessingContext {
    pub(crate) subscription: Arc<str>,
    pub(crate) key: Option<Arc<[u8]>>,
    pub(crate) metadata: TaskMetadata,
    pub(crate) completion: Arc<CompletionInner>,
    pub(crate) deferred: AtomicBool,
    pub(crate) deferred_timeout: Option<Duration>,
}

impl ProcessingContext {
    /// The record key (the ordering key, a user id), if the record had one.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The task's metadata (creation time, producer, retry count, scheduled time).
    pub fn metadata(&self) -> &TaskMetadata {
        &self.metadata
    }

    /// The source topic.
    pub fn topic(&self) -> &str {
        &self.completion.partition.topic
    }

    /// The source partition.
    pub fn partition(&self) -> i32 {
        self.completion.partition.partition
    }

    /// The record's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.completion.offset
    }

    /// The subscription (consumer group) running this task.
    pub fn subscription_id(&self) -> &str {
        &self.subscription
    }

    /// The partition-local state store for this task, if the subscription has one. Reads
    /// see this task's own writes; writes are buffered and, when the task completes
    /// successfully, applied to the store and appended to the changelog before the
    /// task's offset can be committed. A failed task's writes are dropped.
    pub fn state(&self) -> Option<&dyn decaton_state::StateStore> {
        self.completion
            .state
            .as_ref()
            .map(|s| &s.batch as &dyn decaton_state::StateStore)
    }

    /// Defers completion: the task stays unfinished after `process` returns, until the
    /// returned [`Completion`] is completed (or times out, or is dropped). Calling it
    /// again returns another handle to the same completion.
    pub fn defer(&self) -> Completion {
        let first = !self.deferred.swap(true, Ordering::AcqRel);
        self.completion.handles.fetch_add(1, Ordering::AcqRel);
        if first {
            if let Some(timeout) = self.deferred_timeout {
                let inner = self.completion.clone();
                let task = tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    inner.finish(Outcome::TimedOut);
                });
                *self.completion.timer.lock() = Some(task.abort_handle());
            }
        }
        Completion {
            inner: self.completion.clone(),
            live: true,
        }
    }

    pub(crate) fn is_deferred(&self) -> bool {
        self.deferred.load(Ordering::Acquire)
    }
}

/// Completes a deferred task. Obtained from [`ProcessingContext::defer`]; `Send`, so it can
/// move to another task or thread. Dropping it without calling [`complete`](Self::complete)
/// or [`fail`](Self::fail) fails the task (counted in `decaton_completions_leaked_total`).
pub struct Completion {
    inner: Arc<CompletionInner>,
    live: bool,
}

impl Completion {
    /// Completes the task successfully.
    pub fn complete(mut self) {
        self.live = false;
        self.inner.finish(Outcome::Done);
    }

    /// Completes the task as failed (logged and counted; the partition moves on).
    pub fn fail(mut self, reason: impl std::fmt::Display) {
        self.live = false;
        tracing::warn!(topic = %self.inner.partition.topic, partition = self.inner.partition.partition,
            offset = self.inner.offset, "deferred task failed: {reason}");
        self.inner.finish(Outcome::Failed);
    }

    /// Whether the task has completed (by this or another handle, or by timeout).
    pub fn is_done(&self) -> bool {
        self.inner.is_done()
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.live
            && self.inner.handles.fetch_sub(1, Ordering::AcqRel) == 1
            && !self.inner.is_done()
        {
            self.inner.finish(Outcome::Leaked);
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("offset", &self.inner.offset)
            .field("done", &self.is_done())
            .finish()
    }
}
