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
//!
//! In a [`Chain`](crate::Chain) of stages, a stage passes its task on to the next stage
//! with [`ProcessingContext::push`] (inside `process`) or [`Completion::push`] (later,
//! after deferring). All stages share the task's one completion: the offset commits only
//! when the chain is done with the task.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::FutureExt;

use decaton_protocol::TaskMetadata;

use crate::runtime::completion::{CompletionInner, Outcome};
use crate::runtime::meta::TaskMeta;
use crate::runtime::state::TaskState;
use crate::{FailureKind, ProcessError};

/// The rest of a chain after the current stage, type-erased (a `chain::Link<T>`).
pub(crate) type Downstream = Arc<dyn Any + Send + Sync>;

/// Everything a processor knows about the task it is running.
pub struct ProcessingContext {
    pub(crate) subscription: Arc<str>,
    pub(crate) key: Option<Arc<[u8]>>,
    pub(crate) metadata: TaskMeta,
    /// `metadata` in its wire form, built when the processor first asks for it.
    full_metadata: OnceLock<TaskMetadata>,
    pub(crate) completion: Arc<CompletionInner>,
    pub(crate) deferred_timeout: Option<Duration>,
    /// Shared with the contexts of later stages the task is pushed to within `process`.
    pub(crate) state: Option<Arc<TaskState>>,
    /// The next stages of the chain, if any.
    pub(crate) downstream: Option<Downstream>,
    /// The lane running the task (bounded mode).
    pub(crate) lane: Option<usize>,
}

/// What a context is made of, kept by a [`Completion`] so a deferred task can be pushed
/// to the next stage later.
struct Seed {
    subscription: Arc<str>,
    key: Option<Arc<[u8]>>,
    metadata: TaskMeta,
    deferred_timeout: Option<Duration>,
    downstream: Downstream,
    lane: Option<usize>,
}

impl ProcessingContext {
    pub(crate) fn new(
        subscription: Arc<str>,
        key: Option<Arc<[u8]>>,
        metadata: TaskMeta,
        completion: Arc<CompletionInner>,
        deferred_timeout: Option<Duration>,
        state: Option<TaskState>,
        lane: Option<usize>,
    ) -> Self {
        ProcessingContext {
            subscription,
            key,
            metadata,
            full_metadata: OnceLock::new(),
            completion,
            deferred_timeout,
            state: state.map(Arc::new),
            downstream: None,
            lane,
        }
    }

    /// The same task seen by the stage after this one (`downstream` its next stages).
    pub(crate) fn for_stage(&self, downstream: Option<Downstream>) -> Self {
        ProcessingContext {
            subscription: self.subscription.clone(),
            key: self.key.clone(),
            metadata: self.metadata.clone(),
            full_metadata: self.full_metadata.clone(),
            completion: self.completion.clone(),
            deferred_timeout: self.deferred_timeout,
            state: self.state.clone(),
            downstream,
            lane: self.lane,
        }
    }

    /// The record key (the ordering key, a user id), if the record had one.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The task's metadata (creation time, producer, retry count, scheduled time).
    ///
    /// Built on the first call: a processor that only needs the creation time reads
    /// [`created_at_millis`](Self::created_at_millis) instead.
    pub fn metadata(&self) -> &TaskMetadata {
        self.full_metadata.get_or_init(|| self.metadata.to_full())
    }

    /// When the producer created the task, in milliseconds since the Unix epoch:
    /// `metadata().timestamp_millis`, without building the metadata. A processor
    /// measuring how long tasks wait reads this for every task.
    ///
    /// ```
    /// # use decaton_processor::ProcessingContext;
    /// fn waited_ms(ctx: &ProcessingContext, now_ms: i64) -> i64 {
    ///     now_ms - ctx.created_at_millis()
    /// }
    /// ```
    pub fn created_at_millis(&self) -> i64 {
        self.metadata.timestamp_millis
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

    /// The partition's lane running this task, `0..partition_concurrency`, in
    /// [`Bounded`](crate::SchedulingMode::Bounded) mode; `None` in per-key mode, where
    /// every key has a lane of its own for as long as it has tasks.
    pub fn lane(&self) -> Option<usize> {
        self.lane
    }

    /// Passes `task` on to the next stage of the [`Chain`](crate::Chain) and runs it
    /// there now; returns that stage's result (propagate it with `?` so a failure further
    /// down fails the task, or handle it). The task completes as the rest of the chain
    /// says: when the stages after this one return without deferring it, or when the one
    /// that deferred it completes it. At the last stage (or outside a chain) there is no
    /// next stage and `push` does nothing.
    ///
    /// The next stage must take tasks of type `U`; a chain's stages all take the
    /// subscription's task type, so `U` is that type (another type is a permanent error).
    pub async fn push<U: Send + 'static>(&self, task: U) -> Result<(), ProcessError> {
        let Some(downstream) = &self.downstream else {
            return Ok(());
        };
        match crate::chain::Link::<U>::of(downstream) {
            Some(link) => link.run(self, task).await,
            None => Err(ProcessError::permanent(format!(
                "pushed a {} to a stage that does not take it",
                std::any::type_name::<U>()
            ))),
        }
    }

    /// Whether there is a next stage to [`push`](Self::push) to.
    pub fn has_next_stage(&self) -> bool {
        self.downstream.is_some()
    }

    /// The partition-local state store for this task, if the subscription has one.
    ///
    /// Reads see this task's own writes, then the partition's store. Writes are buffered;
    /// when the task completes successfully they are appended to the changelog and, once
    /// the broker has acknowledged them, applied to the local store — only then does the
    /// task's offset become committable and may the key's next task start. A failed task's
    /// writes are dropped. State keys should belong to one task key (a user's state is
    /// written by that user's tasks): tasks of different keys run concurrently.
    ///
    /// In a chain, stages reached by [`push`](Self::push) within `process` share this
    /// store view; a stage reached later by [`Completion::push`] has none (the task's
    /// writes were taken when the lane's `process` returned).
    pub fn state(&self) -> Option<&dyn decaton_state::StateStore> {
        self.state
            .as_deref()
            .map(|s| s as &dyn decaton_state::StateStore)
    }

    /// Defers completion: the task stays unfinished after `process` returns, until the
    /// returned [`Completion`] is completed (or times out, or is dropped). Calling it
    /// again returns another handle to the same completion. The handle can pass the task
    /// on to the next stage of a chain later ([`Completion::push`]).
    pub fn defer(&self) -> Completion {
        self.completion.mark_deferred();
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
            seed: self.downstream.clone().map(|downstream| {
                Arc::new(Seed {
                    subscription: self.subscription.clone(),
                    key: self.key.clone(),
                    metadata: self.metadata.clone(),
                    deferred_timeout: self.deferred_timeout,
                    downstream,
                    lane: self.lane,
                })
            }),
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

    /// Whether some stage deferred the task.
    pub(crate) fn is_deferred(&self) -> bool {
        self.completion.is_deferred()
    }
}

/// Completes a deferred task. Obtained from [`ProcessingContext::defer`]; `Send`, so it can
/// move to another task or thread. Dropping it without calling [`complete`](Self::complete)
/// or [`fail`](Self::fail) fails the task (counted in `decaton_completions_leaked_total`).
pub struct Completion {
    inner: Arc<CompletionInner>,
    live: bool,
    /// How to build the next stage's context, when there is a next stage.
    seed: Option<Arc<Seed>>,
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

    /// Passes the deferred task on to the next stage of its [`Chain`](crate::Chain) and
    /// runs it there now (Decaton's `ProcessingContext#push` from a deferred stage, as
    /// compaction does when its window closes). The task then completes as the rest of
    /// the chain says: when those stages return `Ok` without deferring, it completes; when
    /// one returns an error or panics, it fails (retried or dead-lettered as the
    /// subscription says); when one defers it, its own handle completes it. Throughout,
    /// `deferred_complete_timeout` and leak detection keep covering the task. At the last
    /// stage there is no next stage and `push` completes the task; a task that already
    /// ended (it timed out, say) is not passed on.
    ///
    /// The next stage runs in the caller's task, outside the lane: per-key order holds
    /// as long as the caller pushes one key's tasks in order, one at a time.
    pub async fn push<U: Send + 'static>(mut self, task: U) {
        if self.inner.is_done() {
            self.live = false;
            return;
        }
        let Some(seed) = self.seed.clone() else {
            return self.complete();
        };
        let Some(link) = crate::chain::Link::<U>::of(&seed.downstream) else {
            return self.fail(format_args!(
                "pushed a {} to a stage that does not take it",
                std::any::type_name::<U>()
            ));
        };
        let ctx = ProcessingContext {
            subscription: seed.subscription.clone(),
            key: seed.key.clone(),
            metadata: seed.metadata.clone(),
            full_metadata: OnceLock::new(),
            completion: self.inner.clone(),
            deferred_timeout: seed.deferred_timeout,
            state: None,
            downstream: None,
            lane: seed.lane,
        };
        let defers = self.inner.defers();
        let result = AssertUnwindSafe(link.run(&ctx, task)).catch_unwind().await;
        drop(ctx);
        match result {
            // Deferred further down: that stage's handle completes it (this one goes
            // away quietly, or counts as leaked if that handle went before it).
            Ok(Ok(())) if self.inner.defers() != defers => drop(self),
            Ok(Ok(())) => self.complete(),
            Ok(Err(e)) => {
                self.live = false;
                let outcome = match e.kind() {
                    FailureKind::Permanent => Outcome::Permanent,
                    FailureKind::Retry => Outcome::RetryAsked,
                    _ => Outcome::Error,
                };
                let p = self.inner.partition();
                tracing::warn!(topic = %p.topic(), partition = p.partition(),
                    offset = self.inner.offset(), "task failed in a later stage: {e}");
                self.inner.set_reason(e);
                self.inner.finish(outcome);
            }
            Err(panic) => {
                self.live = false;
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                let p = self.inner.partition();
                tracing::error!(topic = %p.topic(), partition = p.partition(),
                    offset = self.inner.offset(), "a later stage panicked; task failed: {message}");
                self.inner.set_reason(format_args!("panic: {message}"));
                self.inner.finish(Outcome::Panicked);
            }
        }
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
