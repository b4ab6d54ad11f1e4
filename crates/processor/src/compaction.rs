//! Dropping tasks that a later task of the same key supersedes.
//!
//! [`Compaction`] is a [`TaskProcessor`] that defers every task and keeps, per key, one
//! task for the current window: when a second task of a key arrives, the user's choice
//! function picks which of the two survives, and the other is completed at once without
//! being processed (counted in `decaton_tasks_compacted_total`). When the window closes
//! (`window` after its first task), the survivors — at most one per key — go as one
//! batch to a [`BatchProcessor`], which completes each. Windows go to the batch
//! processor one at a time, in the order they closed, so one key's survivors reach it in
//! order (with [`PassOn`](crate::PassOn), the next stage of a [`Chain`](crate::Chain)
//! receives them). A location service that only
//! needs a user's latest position, for example, processes one update per user per window
//! however many arrive. Tasks without a key are never compacted: each survives.
//!
//! Nothing is lost: every task is either processed (as a survivor) or completed as
//! superseded, and its offset commits only then; a crash re-delivers what was not
//! completed, and the window starts again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::batching::{BatchedInfo, BatchedTask, Turns};
use crate::{BatchProcessor, ProcessError, ProcessingContext, TaskProcessor};

/// Which of two tasks of one key survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survivor {
    /// The task already kept for the window.
    Kept,
    /// The task that just arrived.
    Arrived,
}

type Choose<T> = dyn Fn(&BatchedTask<T>, &BatchedTask<T>) -> Survivor + Send + Sync;

struct Window<T> {
    /// Survivors by key, in order of first arrival.
    by_key: HashMap<Vec<u8>, usize>,
    tasks: Vec<BatchedTask<T>>,
    generation: u64,
}

struct Shared<T, B> {
    inner: B,
    window: Duration,
    choose: Box<Choose<T>>,
    open: Mutex<Window<T>>,
    compacted: AtomicU64,
    /// Windows go to the batch processor in generation order.
    turns: Turns,
}

/// A [`TaskProcessor`] that keeps one task per key per window and hands the survivors to
/// a [`BatchProcessor`].
///
/// ```
/// use std::time::Duration;
/// use decaton_processor::{async_trait, BatchProcessor, BatchedTask, Compaction, Survivor};
/// use decaton_protocol::ChatOp;
///
/// struct SaveLatest;
///
/// #[async_trait]
/// impl BatchProcessor<ChatOp> for SaveLatest {
///     async fn process_batch(&self, batch: Vec<BatchedTask<ChatOp>>) {
///         for t in batch {
///             t.complete();
///         }
///     }
/// }
///
/// // Keep the newest task of each user within 500 ms.
/// let processor = Compaction::new(SaveLatest, Duration::from_millis(500), |kept, arrived| {
///     if arrived.task.created_at_millis >= kept.task.created_at_millis {
///         Survivor::Arrived
///     } else {
///         Survivor::Kept
///     }
/// });
/// ```
pub struct Compaction<T, B> {
    shared: Arc<Shared<T, B>>,
}

impl<T: Send + 'static, B: BatchProcessor<T>> Compaction<T, B> {
    /// Windows of `window`; `choose(kept, arrived)` picks the survivor of two tasks of one
    /// key.
    pub fn new(
        inner: B,
        window: Duration,
        choose: impl Fn(&BatchedTask<T>, &BatchedTask<T>) -> Survivor + Send + Sync + 'static,
    ) -> Self {
        Compaction {
            shared: Arc::new(Shared {
                inner,
                window,
                choose: Box::new(choose),
                open: Mutex::new(Window {
                    by_key: HashMap::new(),
                    tasks: Vec::new(),
                    generation: 0,
                }),
                compacted: AtomicU64::new(0),
                turns: Turns::new(),
            }),
        }
    }

    /// How many tasks were dropped as superseded so far.
    pub fn compacted(&self) -> u64 {
        self.shared.compacted.load(Ordering::Relaxed)
    }
}

impl<T: Send + 'static, B: BatchProcessor<T>> Shared<T, B> {
    fn close(self: &Arc<Self>, generation: u64) {
        let batch = {
            let mut w = self.open.lock();
            if w.generation != generation {
                return;
            }
            w.generation += 1;
            w.by_key.clear();
            std::mem::take(&mut w.tasks)
        };
        // Every generation closes exactly once (only `close` moves it), so each waits for
        // the one before it.
        let this = self.clone();
        tokio::spawn(async move {
            let _next = this.turns.wait(generation).await;
            if !batch.is_empty() {
                this.inner.process_batch(batch).await;
            }
        });
    }
}

#[async_trait::async_trait]
impl<T: Send + 'static, B: BatchProcessor<T>> TaskProcessor<T> for Compaction<T, B> {
    async fn process(&self, ctx: &ProcessingContext, task: T) -> Result<(), ProcessError> {
        let arrived = BatchedTask::new(task, BatchedInfo::of(ctx), ctx.defer());
        let shared = &self.shared;
        let (superseded, opened) = {
            let mut w = shared.open.lock();
            let opened = w.tasks.is_empty().then_some(w.generation);
            let slot = arrived
                .info
                .key
                .as_ref()
                .and_then(|k| w.by_key.get(k).copied());
            match slot {
                None => {
                    if let Some(k) = arrived.info.key.clone() {
                        let at = w.tasks.len();
                        w.by_key.insert(k, at);
                    }
                    w.tasks.push(arrived);
                    (None, opened)
                }
                Some(at) => match w.tasks.get_mut(at) {
                    Some(held) => match (shared.choose)(held, &arrived) {
                        Survivor::Kept => (Some(arrived), opened),
                        Survivor::Arrived => (Some(std::mem::replace(held, arrived)), opened),
                    },
                    // `by_key` only names positions in `tasks`; were one missing, the task
                    // joins the window as a new key rather than being dropped.
                    None => {
                        w.tasks.push(arrived);
                        (None, opened)
                    }
                },
            }
        };
        if let Some(dropped) = superseded {
            shared.compacted.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::COMPACTED, "subscription" => dropped.info.subscription.clone())
                .increment(1);
            dropped.complete();
        }
        if let Some(generation) = opened {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(shared.window).await;
                shared.close(generation);
            });
        }
        Ok(())
    }
}
