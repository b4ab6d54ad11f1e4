//! Handing tasks to a processor in batches, each task still completing on its own.
//!
//! [`Batching`] is a [`TaskProcessor`] that defers every task it is given and collects
//! it into a batch; a batch goes to the [`BatchProcessor`] when it holds `capacity`
//! tasks or when its first task has waited `linger`, whichever comes first. The batch
//! processor completes, fails or retries each [`BatchedTask`] separately, so offsets
//! commit only as their own task completes, and a task that fails in a batch is retried
//! (or dead-lettered) alone. A panic inside `process_batch` fails every task of that
//! batch that was not completed yet, each as a panic.
//!
//! Per-key order: tasks of one key enter batches in offset order and a batch keeps that
//! order, but two batches may run at the same time; a batch processor that must apply
//! one key's writes in order should not let its batches overlap: build the stage with
//! [`Batching::in_order`], which hands batches over one at a time, in the order they
//! filled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_protocol::TaskMetadata;
use parking_lot::Mutex;

use crate::{Completion, ProcessError, ProcessingContext, TaskProcessor};

/// One task in a batch: the task, where it came from, and its completion.
#[derive(Debug)]
pub struct BatchedTask<T> {
    /// The task.
    pub task: T,
    /// Where it came from.
    pub info: BatchedInfo,
    completion: Completion,
}

/// Where a batched task came from and when it joined its batch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BatchedInfo {
    /// The subscription running the task.
    pub subscription: String,
    /// The record key.
    pub key: Option<Vec<u8>>,
    /// The task's metadata.
    pub metadata: TaskMetadata,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// When the task joined its batch.
    pub enqueued: std::time::Instant,
}

impl BatchedInfo {
    /// What `ctx` says about its task, now.
    pub(crate) fn of(ctx: &ProcessingContext) -> Self {
        BatchedInfo {
            subscription: ctx.subscription_id().to_string(),
            key: ctx.key().map(<[u8]>::to_vec),
            metadata: ctx.metadata().clone(),
            topic: ctx.topic().to_string(),
            partition: ctx.partition(),
            offset: ctx.offset(),
            enqueued: std::time::Instant::now(),
        }
    }
}

impl<T> BatchedTask<T> {
    pub(crate) fn new(task: T, info: BatchedInfo, completion: Completion) -> Self {
        BatchedTask {
            task,
            info,
            completion,
        }
    }

    /// Completes this task.
    pub fn complete(self) {
        self.completion.complete();
    }

    /// Fails this task (then retried or dead-lettered alone, as the subscription says).
    pub fn fail(self, reason: impl std::fmt::Display) {
        self.completion.fail(reason);
    }

    /// Sends this task alone to the retry topic; gives it back when the subscription has
    /// none.
    // The task itself comes back, so the caller can complete or fail it instead.
    #[allow(clippy::result_large_err)]
    pub fn retry(self) -> Result<(), Self> {
        let BatchedTask {
            task,
            info,
            completion,
        } = self;
        completion.retry().map_err(|completion| BatchedTask {
            task,
            info,
            completion,
        })
    }
}

impl<T: Send + 'static> BatchedTask<T> {
    /// Passes this task on to the next stage of its [`Chain`](crate::Chain) and runs it
    /// there (see [`Completion::push`]); at the last stage, completes it.
    pub async fn push(self) {
        self.completion.push(self.task).await;
    }
}

/// Processes a batch of tasks; implement this and wrap it in [`Batching`].
#[async_trait::async_trait]
pub trait BatchProcessor<T>: Send + Sync + 'static {
    /// Processes `batch` (at most the configured capacity, in arrival order) and
    /// completes, fails or retries each task. A task dropped without either fails (counted
    /// as leaked), so nothing stalls.
    async fn process_batch(&self, batch: Vec<BatchedTask<T>>);
}

/// A [`BatchProcessor`] that passes every task of a batch on to the next stage of its
/// [`Chain`](crate::Chain), one after another in batch order: a
/// [`Compaction`](crate::Compaction) or [`Batching`] stage whose survivors or batches the
/// next stage processes one by one.
///
/// Per-key order downstream: [`Compaction`](crate::Compaction) hands its windows over one
/// at a time, in order, so the next stage sees one key's survivors in order. [`Batching`]
/// may run two batches at once unless built [`in_order`](Batching::in_order), so use that
/// when the next stage needs one key's tasks in order.
///
/// ```
/// use std::time::Duration;
/// use decaton_processor::{Chain, Compaction, PassOn, Survivor};
/// use decaton_protocol::ChatOp;
/// # use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
/// # struct Save;
/// # #[async_trait] impl TaskProcessor<ChatOp> for Save {
/// #   async fn process(&self, _: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> { Ok(()) } }
///
/// // The newest op of each user per second reaches `Save`; the others complete unseen.
/// let chain = Chain::new(Compaction::new(PassOn, Duration::from_secs(1), |kept, arrived| {
///     if arrived.info.offset > kept.info.offset { Survivor::Arrived } else { Survivor::Kept }
/// }))
/// .then_process(Save);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOn;

#[async_trait::async_trait]
impl<T: Send + 'static> BatchProcessor<T> for PassOn {
    async fn process_batch(&self, batch: Vec<BatchedTask<T>>) {
        for task in batch {
            task.push().await;
        }
    }
}

struct Buffer<T> {
    tasks: Vec<BatchedTask<T>>,
    /// Bumped whenever a batch leaves, so a linger timer flushes only its own batch.
    generation: u64,
}

/// Hands numbered batches to a batch processor one at a time, in number order: batch `n`
/// waits until every batch before it was processed. Every number must be handed over
/// exactly once (or the ones after it wait forever).
pub(crate) struct Turns(tokio::sync::watch::Sender<u64>);

/// Gives the turn to the next batch when dropped (even by a panic).
pub(crate) struct NextTurn<'a>(&'a tokio::sync::watch::Sender<u64>, u64);

impl Drop for NextTurn<'_> {
    fn drop(&mut self) {
        let next = self.1;
        self.0.send_modify(|t| *t = (*t).max(next));
    }
}

impl Turns {
    pub(crate) fn new() -> Self {
        Turns(tokio::sync::watch::Sender::new(0))
    }

    /// Waits for batch `n`'s turn; the guard passes it on to `n + 1`.
    pub(crate) async fn wait(&self, n: u64) -> NextTurn<'_> {
        let mut turn = self.0.subscribe();
        // The sender lives in `self`: waiting ends only at `n`'s turn.
        let _ = turn.wait_for(|t| *t >= n).await;
        NextTurn(&self.0, n + 1)
    }
}

struct Shared<T, B> {
    inner: B,
    capacity: usize,
    linger: Duration,
    buffer: Mutex<Buffer<T>>,
    batches: AtomicU64,
    /// Batches go one at a time, in order ([`Batching::in_order`]).
    ordered: std::sync::atomic::AtomicBool,
    turns: Turns,
}

/// A [`TaskProcessor`] that collects tasks into batches for a [`BatchProcessor`].
///
/// ```
/// use std::time::Duration;
/// use decaton_processor::{async_trait, BatchProcessor, BatchedTask, Batching};
/// use decaton_protocol::ChatOp;
///
/// struct BulkIndex;
///
/// #[async_trait]
/// impl BatchProcessor<ChatOp> for BulkIndex {
///     async fn process_batch(&self, batch: Vec<BatchedTask<ChatOp>>) {
///         // one bulk request for the whole batch, then each task on its own:
///         for t in batch {
///             t.complete();
///         }
///     }
/// }
///
/// let processor = Batching::new(BulkIndex, 100, Duration::from_millis(50));
/// // Subscription::builder("indexer", processor)...
/// ```
pub struct Batching<T, B> {
    shared: Arc<Shared<T, B>>,
}

impl<T: Send + 'static, B: BatchProcessor<T>> Batching<T, B> {
    /// Batches of at most `capacity` tasks (at least 1), each sent at the latest `linger`
    /// after its first task arrived.
    pub fn new(inner: B, capacity: usize, linger: Duration) -> Self {
        Batching {
            shared: Arc::new(Shared {
                inner,
                capacity: capacity.max(1),
                linger,
                buffer: Mutex::new(Buffer {
                    tasks: Vec::new(),
                    generation: 0,
                }),
                batches: AtomicU64::new(0),
                ordered: std::sync::atomic::AtomicBool::new(false),
                turns: Turns::new(),
            }),
        }
    }

    /// Hands batches to the batch processor one at a time, in the order they filled, so
    /// one key's tasks reach it in offset order across batches too (a batch waits while
    /// the one before it is processed). Use it when the batch processor, or the next
    /// stage of a [`Chain`](crate::Chain) behind [`PassOn`], needs per-key order.
    pub fn in_order(self) -> Self {
        self.shared.ordered.store(true, Ordering::Relaxed);
        self
    }

    /// How many batches were handed to the batch processor so far.
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }
}

impl<T: Send + 'static, B: BatchProcessor<T>> Shared<T, B> {
    /// Takes the buffered batch if it is still generation `generation`, with its number
    /// (the generation it had: each number leaves exactly once, with a non-empty batch).
    fn take(&self, generation: u64) -> Option<(Vec<BatchedTask<T>>, u64)> {
        let mut b = self.buffer.lock();
        if generation != b.generation || b.tasks.is_empty() {
            return None;
        }
        b.generation += 1;
        Some((std::mem::take(&mut b.tasks), generation))
    }

    fn send(self: &Arc<Self>, batch: Vec<BatchedTask<T>>, number: u64) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        // A panic in the batch processor drops the batch's completions during the
        // unwind: each not completed yet fails as a panic (and passes the turn on).
        tokio::spawn(async move {
            if this.ordered.load(Ordering::Relaxed) {
                let _next = this.turns.wait(number).await;
                this.inner.process_batch(batch).await;
            } else {
                this.inner.process_batch(batch).await;
            }
        });
    }
}

#[async_trait::async_trait]
impl<T: Send + 'static, B: BatchProcessor<T>> TaskProcessor<T> for Batching<T, B> {
    async fn process(&self, ctx: &ProcessingContext, task: T) -> Result<(), ProcessError> {
        let item = BatchedTask::new(task, BatchedInfo::of(ctx), ctx.defer());
        let shared = &self.shared;
        let (full, start_timer) = {
            let mut b = shared.buffer.lock();
            b.tasks.push(item);
            if b.tasks.len() >= shared.capacity {
                let number = b.generation;
                b.generation += 1;
                (Some((std::mem::take(&mut b.tasks), number)), None)
            } else {
                (None, (b.tasks.len() == 1).then_some(b.generation))
            }
        };
        if let Some((batch, number)) = full {
            shared.send(batch, number);
        }
        if let Some(generation) = start_timer {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(shared.linger).await;
                if let Some((batch, number)) = shared.take(generation) {
                    shared.send(batch, number);
                }
            });
        }
        Ok(())
    }
}
