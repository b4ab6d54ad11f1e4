//! What a processor sees of the task it runs, and how it completes a task later.
//!
//! A task completes when `process` returns, unless the processor calls
//! [`ProcessingContext::defer`]: then the task completes when the returned [`Completion`]
//! is completed, from anywhere — another task, a callback, a timer. The lane does not wait:
//! the key's next task may start as soon as `process` returns — except when the task
//! wrote partition-local state, which must be durable before the key's next task reads
//! it. A deferred task counts as unfinished (its offset is not committed) until it
//! completes; if it is not completed within `deferred_complete_timeout`, it is completed
//! as failed. A `Completion` dropped without being completed fails its task rather than
//! stalling the partition forever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_protocol::TaskMetadata;

use crate::runtime::completion::{CompletionInner, Outcome};
use crate::runtime::state::TaskState;
use crate::ProcessError;

/// Everything a processor knows about the task it is running.
pub struct ProcessingContext {
    pub(crate) subscription: Arc<str>,
    pub(crate) key: Option<Arc<[u8]>>,
    pub(crate) metadata: TaskMetadata,
    pub(crate) completion: Arc<CompletionInner>,
    pub(crate) deferred: AtomicBool,
    pub(crate) deferred_timeout: Option<Duration>,
    pub(crate) state: Option<TaskState>,
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
        self.completion.partition().topic()
    }

    /// The source partition.
    pub fn partition(&self) -> i32 {
        self.completion.partition().partition()
    }

    /// The record's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.completion.offset()
    }

    /// The subscription (consumer group) running this task.
    pub fn subscription_id(&self) -> &str {
        &self.subscription
    }

    /// The partition-local state store for this task, if the subscription has one.
    ///
    /// Reads see this task's own writes, then the partition's store. Writes are buffered;
    /// when the task completes successfully they are appended to the changelog and, once
    /// the broker has acknowledged them, applied to the local store — only then does the
    /// task's offset become committable and may the key's next task start. A failed task's
    /// writes are dropped. State keys should belong to one task key (a user's state is
    /// written by that user's tasks): tasks of different keys run concurrently.
    pub fn state(&self) -> Option<&dyn decaton_state::StateStore> {
        self.state
            .as_ref()
            .map(|s| s as &dyn decaton_state::StateStore)
    }

    /// Defers completion: the task stays unfinished after `process` returns, until the
    /// returned [`Completion`] is completed (or times out, or is dropped). Calling it
    /// again returns another handle to the same completion.
    pub fn defer(&self) -> Completion {
        self.deferred.store(true, Ordering::Release);
        if self.completion.add_handle() {
            if let Some(timeout) = self.deferred_timeout {
                let inner = self.completion.clone();
                let task = tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    inner.set_reason(format_args!(
                        "deferred task not completed within {timeout:?}"
                    ));
                    inner.finish(Outcome::TimedOut);
                });
                self.completion.set_timer(task.abort_handle());
            }
        }
        Completion {
            inner: self.completion.clone(),
            live: true,
        }
    }

    /// Sends the task to the retry topic: it completes once the broker has the retry
    /// record, and runs again after the configured backoff with `retry_count + 1` — or,
    /// when its retries are used up, goes to the dead-letter topic. Works before or after
    /// [`defer`](Self::defer); whatever completes the task later is ignored.
    ///
    /// Returns an error when the subscription has no retry topic (see
    /// [`RetryConfig`](crate::RetryConfig)), so a processor can `ctx.retry()?` and fail
    /// the task instead.
    pub fn retry(&self) -> Result<(), ProcessError> {
        if !self.completion.can_retry() {
            return Err(ProcessError::new(
                "retry requested, but the subscription has no retry topic",
            ));
        }
        self.completion
            .set_reason("retry requested by the processor");
        self.completion.finish(Outcome::RetryAsked);
        Ok(())
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

    /// Completes the task as failed: logged and counted, then retried or dead-lettered
    /// as the subscription's configuration says (see [`ProcessError`]'s kinds; this is
    /// [`FailureKind::Failed`](crate::FailureKind::Failed)).
    pub fn fail(mut self, reason: impl std::fmt::Display) {
        self.live = false;
        let p = self.inner.partition();
        tracing::warn!(topic = %p.topic(), partition = p.partition(),
            offset = self.inner.offset(), "deferred task failed: {reason}");
        self.inner.set_reason(reason);
        self.inner.finish(Outcome::Error);
    }

    /// Sends the task to the retry topic, as [`ProcessingContext::retry`] does. Returns
    /// the handle back, untouched, when the subscription has no retry topic.
    pub fn retry(mut self) -> Result<(), Completion> {
        if !self.inner.can_retry() {
            return Err(self);
        }
        self.live = false;
        self.inner.set_reason("retry requested by the processor");
        self.inner.finish(Outcome::RetryAsked);
        Ok(())
    }

    /// Whether the task has completed (by this or another handle, or by timeout).
    pub fn is_done(&self) -> bool {
        self.inner.is_done()
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.live && self.inner.drop_handle() && !self.inner.is_done() {
            if std::thread::panicking() {
                self.inner
                    .set_reason("panic: a panic dropped the task's Completion");
                self.inner.finish(Outcome::Panicked);
            } else {
                self.inner
                    .set_reason("every Completion was dropped without completing");
                self.inner.finish(Outcome::Leaked);
            }
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("offset", &self.inner.offset())
            .field("done", &self.is_done())
            .finish()
    }
}
