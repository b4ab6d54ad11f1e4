//! Processor chains: stages, their scopes, and passing a task from one to the next
//! (documented on [`Chain`]).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::context::{Downstream, ProcessingContext};
use crate::{ProcessError, TaskProcessor};

/// How many instances of a chain stage's processor there are (Decaton's
/// `ProcessorScope`; its `PROVIDED` is a stage given as an instance, [`Chain::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessorScope {
    /// One instance for the subscription, made on first use (Decaton's `SINGLETON`).
    Subscription,
    /// One instance per assigned partition, dropped at revocation (`PARTITION`).
    Partition,
    /// One instance per lane of each partition, dropped at revocation and when the
    /// lanes change (`THREAD`); needs bounded mode.
    Lane,
}

type Instance<T> = Arc<dyn TaskProcessor<T>>;
type Factory<T> = Box<dyn Fn() -> Instance<T> + Send + Sync>;

enum Make<T> {
    Shared(Instance<T>),
    Subscription(Factory<T>, OnceLock<Instance<T>>),
    Partition(Factory<T>),
    Lane(Factory<T>),
}

/// One stage: an id unique in the process (keys its scoped instances) and how its
/// processor instances are had.
struct Stage<T> {
    id: u64,
    make: Make<T>,
    /// Scoped instances of this stage whose `Drop` panicked.
    drop_panics: Arc<AtomicU64>,
}

/// A per-partition or per-lane instance as its partition keeps it. The partition drops
/// it at revocation (inside the consumer's rebalance callback, where a panic would abort
/// the process) and when its lanes change: the user's `Drop` runs under `catch_unwind`,
/// and a panic there is logged and counted (`decaton_instance_drop_panics_total`)
/// instead of unwinding into the runtime.
struct Kept<T> {
    instance: Option<Instance<T>>,
    subscription: String,
    drop_panics: Arc<AtomicU64>,
}

impl<T> Drop for Kept<T> {
    fn drop(&mut self) {
        let instance = self.instance.take();
        let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop(instance)));
        if let Err(panic) = dropped {
            self.drop_panics.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::INSTANCE_DROP_PANICS,
                "subscription" => self.subscription.clone())
            .increment(1);
            tracing::error!(subscription = %self.subscription,
                "a per-partition or per-lane processor instance panicked when dropped: {}; \
                 ignored, processing goes on",
                crate::runtime::pipeline::panic_message(&*panic));
        }
    }
}

static NEXT_STAGE: AtomicU64 = AtomicU64::new(0);

impl<T: Send + 'static> Stage<T> {
    fn new(make: Make<T>) -> Arc<Self> {
        Arc::new(Stage {
            id: NEXT_STAGE.fetch_add(1, Ordering::Relaxed),
            make,
            drop_panics: Arc::default(),
        })
    }

    /// The instance that runs `ctx`'s task.
    fn instance(&self, ctx: &ProcessingContext) -> Instance<T> {
        let (factory, lane) = match &self.make {
            Make::Shared(p) => return p.clone(),
            Make::Subscription(factory, once) => return once.get_or_init(factory).clone(),
            Make::Partition(factory) => (factory, None),
            // Without a lane (per-key mode, where a lane stage inside a factory-made
            // processor escapes the build check), a lane stage is a partition stage.
            Make::Lane(factory) => (factory, ctx.lane()),
        };
        let any = ctx.completion.partition().scoped(self.id, lane, || {
            Arc::new(Kept {
                instance: Some(factory()),
                subscription: ctx.subscription_id().to_string(),
                drop_panics: self.drop_panics.clone(),
            })
        });
        match any
            .downcast_ref::<Kept<T>>()
            .and_then(|k| k.instance.clone())
        {
            Some(p) => p,
            // Stage ids are unique, so a slot holds only its stage's type; made anew
            // rather than failing if that ever breaks.
            None => factory(),
        }
    }

    fn needs_lanes(&self) -> bool {
        match &self.make {
            Make::Lane(_) => true,
            Make::Shared(p) => p.needs_lanes(),
            _ => false,
        }
    }
}

/// A pipeline of stages, each a [`TaskProcessor`] (Decaton's processor pipeline).
///
/// A [`Chain`] is a [`TaskProcessor`] made of stages, each itself a `TaskProcessor`. The
/// first stage gets every task; each stage then decides what happens to it:
///
/// * **pass it on**: [`ProcessingContext::push`] runs the next stage now and returns its
///   result;
/// * **complete it**: return `Ok` without pushing — the later stages never see it;
/// * **fail or retry it**: return an error (or call [`ProcessingContext::retry`]) — the
///   task fails as it would in a single processor: retried in the lane, sent to the retry
///   topic or dead-lettered, as the subscription says. An error returned further down
///   reaches this stage as `push`'s result;
/// * **defer it**: [`ProcessingContext::defer`], then later [`Completion::push`](crate::Completion::push) passes it
///   on from outside `process` (as [`Compaction`](crate::Compaction) does when a window
///   closes), or the [`Completion`](crate::Completion) completes or fails it.
///
/// All stages share the task's one completion, so its offset commits only when the chain
/// is done with it, and a deferred task stays covered by `deferred_complete_timeout` and
/// leak detection wherever it is.
///
/// **Scopes** (Decaton's `ProcessorScope`): a stage is one shared instance
/// ([`Chain::new`], [`Chain::then_process`]), or instances made by a factory
/// ([`Chain::scoped`], [`Chain::then_scoped`]) once per subscription, per partition or
/// per lane. Per-partition and per-lane instances belong to the partition: they are
/// dropped when it is revoked, a later assignment of it makes new ones, and per-lane ones
/// are made anew when the partition's lanes change (`partition_concurrency`). One lane
/// runs one task at a time, so within the lane a per-lane instance is never called
/// concurrently; a per-partition one is called by the partition's lanes concurrently (and
/// never by other partitions). A stage reached through [`Completion::push`](crate::Completion::push)
/// runs in the pushing task, outside the lane, with the instance of the lane that
/// deferred the task: behind a deferring stage, a per-lane instance can also be called
/// from there. Per-lane stages need [`Bounded`](crate::SchedulingMode::Bounded)
/// mode: in per-key mode, where each key is its own short-lived lane, a subscription with
/// one does not build.
///
/// ```
/// use decaton_processor::{async_trait, Chain, ProcessError, ProcessingContext,
///     ProcessorScope, TaskProcessor};
/// use decaton_protocol::ChatOp;
///
/// /// Drops ops without a target, passes the others on.
/// struct Validate;
///
/// #[async_trait]
/// impl TaskProcessor<ChatOp> for Validate {
///     async fn process(&self, ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
///         if op.target_id.is_empty() {
///             return Ok(()); // completed here
///         }
///         ctx.push(op).await
///     }
/// }
///
/// /// Counts ops of its partition: one instance per partition, no sharing.
/// #[derive(Default)]
/// struct CountPerPartition(std::sync::atomic::AtomicU64);
///
/// #[async_trait]
/// impl TaskProcessor<ChatOp> for CountPerPartition {
///     async fn process(&self, _: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> {
///         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// let chain = Chain::new(Validate)
///     .then_scoped(ProcessorScope::Partition, CountPerPartition::default);
/// // Subscription::builder("ops", chain)...
/// ```
///
/// All stages take the subscription's task type `T`. A chain can itself be a stage of
/// another chain: its last stage's `push` goes on to the outer chain's next stage.
pub struct Chain<T> {
    stages: Arc<[Arc<Stage<T>>]>,
}

impl<T: Send + 'static> Chain<T> {
    /// A chain whose first stage is `first` (one instance, shared by all partitions).
    pub fn new(first: impl TaskProcessor<T>) -> Self {
        Chain {
            stages: Arc::new([Stage::new(Make::Shared(Arc::new(first)))]),
        }
    }

    /// A chain whose first stage's instances `factory` makes, one per `scope`.
    pub fn scoped<P: TaskProcessor<T>>(
        scope: ProcessorScope,
        factory: impl Fn() -> P + Send + Sync + 'static,
    ) -> Self {
        Chain {
            stages: Arc::new([Stage::new(scoped_make(scope, factory))]),
        }
    }

    /// Adds `next` (one shared instance) after the current last stage.
    pub fn then_process(self, next: impl TaskProcessor<T>) -> Self {
        self.then(Make::Shared(Arc::new(next)))
    }

    /// Adds a stage whose instances `factory` makes, one per `scope`. The factory runs
    /// under the partition's instance lock: keep it cheap and non-blocking.
    pub fn then_scoped<P: TaskProcessor<T>>(
        self,
        scope: ProcessorScope,
        factory: impl Fn() -> P + Send + Sync + 'static,
    ) -> Self {
        self.then(scoped_make(scope, factory))
    }

    fn then(self, make: Make<T>) -> Self {
        let mut stages = self.stages.to_vec();
        stages.push(Stage::new(make));
        Chain {
            stages: stages.into(),
        }
    }
}

fn scoped_make<T: Send + 'static, P: TaskProcessor<T>>(
    scope: ProcessorScope,
    factory: impl Fn() -> P + Send + Sync + 'static,
) -> Make<T> {
    let factory: Factory<T> = Box::new(move || Arc::new(factory()) as Instance<T>);
    match scope {
        ProcessorScope::Subscription => Make::Subscription(factory, OnceLock::new()),
        ProcessorScope::Partition => Make::Partition(factory),
        ProcessorScope::Lane => Make::Lane(factory),
    }
}

/// Runs stage `at` of `stages` on `task` (`ctx` is the previous stage's context, or the
/// chain's), its context leading on to the stage after it or, after the last, to `outer`
/// (an enclosing chain's next stage).
async fn run_stage<T: Send + 'static>(
    stages: &Arc<[Arc<Stage<T>>]>,
    at: usize,
    outer: &Option<Downstream>,
    ctx: &ProcessingContext,
    task: T,
) -> Result<(), ProcessError> {
    let Some(stage) = stages.get(at) else {
        return Ok(());
    };
    let downstream: Option<Downstream> = if at + 1 < stages.len() {
        Some(Arc::new(Link {
            stages: stages.clone(),
            at: at + 1,
            outer: outer.clone(),
        }))
    } else {
        outer.clone()
    };
    let processor = stage.instance(ctx);
    let child = ctx.for_stage(downstream);
    processor.process(&child, task).await
}

/// The rest of a chain from stage `at` on; what a context's `push` runs.
pub(crate) struct Link<T> {
    stages: Arc<[Arc<Stage<T>>]>,
    at: usize,
    /// Where the chain's last stage passes tasks on to (an enclosing chain's next stage).
    outer: Option<Downstream>,
}

impl<T: Send + 'static> Link<T> {
    /// The link behind a type-erased downstream, if it takes tasks of type `T`.
    pub(crate) fn of(downstream: &Downstream) -> Option<&Link<T>> {
        downstream.downcast_ref::<Link<T>>()
    }

    /// Runs the next stage on `task` (`ctx` is the pushing stage's context).
    pub(crate) async fn run(&self, ctx: &ProcessingContext, task: T) -> Result<(), ProcessError> {
        run_stage(&self.stages, self.at, &self.outer, ctx, task).await
    }
}

#[async_trait::async_trait]
impl<T: Send + 'static> TaskProcessor<T> for Chain<T> {
    async fn process(&self, ctx: &ProcessingContext, task: T) -> Result<(), ProcessError> {
        run_stage(&self.stages, 0, &ctx.downstream, ctx, task).await
    }

    fn needs_lanes(&self) -> bool {
        self.stages.iter().any(|s| s.needs_lanes())
    }
}

#[cfg(test)]
mod tests;
