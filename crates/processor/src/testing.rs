//! Unit-testing processors without a broker.
//!
//! A [`ProcessorTester`] runs a [`TaskProcessor`] the way a lane does — a real
//! [`ProcessingContext`], `process` with panics caught, deferred completion with a
//! timeout, partition-local state in memory — and reports what happened to each task:
//! completed, failed (with the error), panicked, timed out or leaked, whether it was
//! deferred, and which state writes it made. No Kafka is involved; tasks run one at a time
//! in the order given, as one key's tasks would, on lane 0 of one partition (so a
//! [`Chain`](crate::Chain) stage scoped per partition or per lane has one instance for
//! the tester).
//!
//! ```
//! use decaton_processor::testing::{ProcessorTester, TaskResult};
//! use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
//! use decaton_protocol::ChatOp;
//!
//! struct CountOps;
//!
//! #[async_trait]
//! impl TaskProcessor<ChatOp> for CountOps {
//!     async fn process(&self, ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
//!         let state = ctx.state().ok_or_else(|| ProcessError::new("no state"))?;
//!         let key = format!("count/{}", op.user_id);
//!         let n = state.get(key.as_bytes())?.map_or(0, |v| v[0]);
//!         state.put(key.as_bytes(), &[n + 1])?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let tester = ProcessorTester::new(CountOps).with_state();
//! let op = ChatOp { user_id: "u1".into(), ..Default::default() };
//! let first = tester.process(Some(b"u1"), op.clone()).await;
//! assert_eq!(first.result, TaskResult::Completed);
//! assert_eq!(first.state_writes, vec![(b"count/u1".to_vec(), Some(vec![1]))]);
//! tester.process(Some(b"u1"), op).await;
//! assert_eq!(tester.state_get(b"count/u1"), Some(vec![2]));
//! # }
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_protocol::TaskMetadata;
use decaton_state::internal::PartitionStore;
use decaton_state::{Backend, StateConfig};
use futures::FutureExt;
use tokio::sync::oneshot;

use crate::context::ProcessingContext;
use crate::runtime::completion::{CompletionInner, Outcome};
use crate::runtime::offsets::{DoneRanges, OffsetTracker};
use crate::runtime::partition_core::PartitionCore;
use crate::runtime::recorder::SubscriptionRecorder;
use crate::runtime::state::StateSlot;
use crate::runtime::topics::PartitionId;
use crate::runtime::wakeup::Wakeup;
use crate::stats::Counters;
use crate::TaskProcessor;

/// How one task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskResult {
    /// `process` returned `Ok` (or its deferred completion was completed).
    Completed,
    /// `process` returned this error, or the deferred completion failed with it.
    Failed(String),
    /// `process` panicked (or a panic dropped the deferred task's `Completion`).
    Panicked,
    /// The task was deferred and not completed within the tester's deferred timeout.
    TimedOut,
    /// The task was deferred and every `Completion` was dropped without completing.
    Leaked,
}

/// What a [`ProcessorTester`] saw of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskOutcome {
    /// The offset the task was given (0, 1, 2, … in the order tasks were run).
    pub offset: i64,
    /// How it ended.
    pub result: TaskResult,
    /// Whether the processor deferred its completion.
    pub deferred: bool,
    /// The state writes it made, in key order (`None` deletes), if it completed: what the
    /// runtime would append to the changelog and apply to the store.
    pub state_writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Runs a processor against tasks without a broker; see the [module docs](self).
pub struct ProcessorTester<T, P> {
    processor: P,
    subscription: Arc<str>,
    topic: Arc<str>,
    partition: i32,
    deferred_timeout: Duration,
    store: Option<PartitionStore>,
    next_offset: AtomicI64,
    recorder: SubscriptionRecorder,
    /// The partition every task appears to come from, made on the first task (after
    /// [`source`](Self::source)): it holds the instances of per-partition and per-lane
    /// [`Chain`](crate::Chain) stages.
    core: std::sync::OnceLock<Arc<PartitionCore>>,
    _task: std::marker::PhantomData<fn(T)>,
}

impl<T: Send + 'static, P: TaskProcessor<T>> ProcessorTester<T, P> {
    /// A tester for `processor`: subscription `test`, topic `test-topic`, partition 0,
    /// deferred tasks waited for up to 5 s, no state store.
    pub fn new(processor: P) -> Self {
        ProcessorTester {
            processor,
            subscription: Arc::from("test"),
            topic: Arc::from("test-topic"),
            partition: 0,
            deferred_timeout: Duration::from_secs(5),
            store: None,
            next_offset: AtomicI64::new(0),
            recorder: SubscriptionRecorder::new(Arc::from("test"), Arc::new(Counters::default())),
            core: std::sync::OnceLock::new(),
            _task: std::marker::PhantomData,
        }
    }

    /// Gives tasks a partition-local state store, in memory, shared by every task run by
    /// this tester ([`ProcessingContext::state`]).
    pub fn with_state(mut self) -> Self {
        let cfg = StateConfig {
            backend: Backend::Memory,
            ..Default::default()
        };
        // The memory backend opens without touching disk or names a file could refuse.
        self.store = PartitionStore::open(&cfg, &self.subscription, &self.topic, self.partition)
            .ok()
            .map(|(store, _)| store);
        self
    }

    /// The topic and partition tasks appear to come from (set it before the first task).
    pub fn source(mut self, topic: &str, partition: i32) -> Self {
        self.topic = Arc::from(topic);
        self.partition = partition;
        self
    }

    /// How long a deferred task is waited for before it counts as timed out.
    pub fn deferred_timeout(mut self, timeout: Duration) -> Self {
        self.deferred_timeout = timeout;
        self
    }

    /// Runs one task with `key` and default metadata.
    pub async fn process(&self, key: Option<&[u8]>, task: T) -> TaskOutcome {
        self.process_with(key, TaskMetadata::default(), task).await
    }

    /// Runs one task with `key` and `metadata` (retry count, scheduled time, …). A
    /// deferred task is waited for, up to the deferred timeout; its key's next task runs
    /// only after that, as in the runtime when the task wrote state.
    pub async fn process_with(
        &self,
        key: Option<&[u8]>,
        metadata: TaskMetadata,
        task: T,
    ) -> TaskOutcome {
        let offset = self.next_offset.fetch_add(1, Ordering::Relaxed);
        // The lane is handed each outcome (below), so the core's offsets stay untouched:
        // it only carries the partition's identity, recorder and scoped stage instances.
        let core = self
            .core
            .get_or_init(|| {
                Arc::new(PartitionCore::new(
                    self.topic.clone(),
                    PartitionId {
                        topic: 0,
                        partition: self.partition,
                    },
                    OffsetTracker::starting_at(Some(0), DoneRanges::default()),
                    self.recorder.partition(&self.topic, self.partition),
                    Arc::new(Wakeup::default()),
                ))
            })
            .clone();
        let (tx, rx) = oneshot::channel();
        let completion = CompletionInner::new(core, offset, Some(tx));
        let ctx = ProcessingContext::new(
            self.subscription.clone(),
            key.map(Arc::from),
            metadata.into(),
            completion.clone(),
            Some(self.deferred_timeout),
            self.store
                .as_ref()
                .and_then(|s| StateSlot::ready_with(s.clone()).task_state()),
            Some(0),
        );
        let ran = AssertUnwindSafe(self.processor.process(&ctx, task))
            .catch_unwind()
            .await;
        let deferred = ctx.is_deferred();
        let result = match ran {
            Ok(Ok(())) if deferred => None,
            Ok(Ok(())) => Some(TaskResult::Completed),
            Ok(Err(e)) => Some(TaskResult::Failed(e.to_string())),
            Err(_) => Some(TaskResult::Panicked),
        };
        let result = match result {
            Some(r) => {
                completion.settle(match r {
                    TaskResult::Completed => Outcome::Done,
                    TaskResult::Panicked => Outcome::Panicked,
                    _ => Outcome::Error,
                });
                r
            }
            None => match rx.await {
                Ok(Outcome::Done) => TaskResult::Completed,
                Ok(Outcome::TimedOut) => TaskResult::TimedOut,
                Ok(Outcome::Leaked) | Err(_) => TaskResult::Leaked,
                Ok(Outcome::Panicked) => TaskResult::Panicked,
                Ok(Outcome::Error | Outcome::RetryAsked | Outcome::Permanent) => {
                    TaskResult::Failed("deferred completion failed".into())
                }
            },
        };
        let state_writes = match (ctx.state.as_ref(), &result) {
            (Some(state), TaskResult::Completed) => {
                state.apply_without_changelog(offset).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        TaskOutcome {
            offset,
            result,
            deferred,
            state_writes,
        }
    }

    /// A value in the tester's state store (after the writes of completed tasks).
    pub fn state_get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store.as_ref().and_then(|s| s.get(key).ok().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ProcessError, ProcessingContext, TaskProcessor};
    use decaton_protocol::ChatOp;

    /// Defers, then panics in the future that holds the `Completion`.
    struct PanicsLater;

    #[async_trait::async_trait]
    impl TaskProcessor<ChatOp> for PanicsLater {
        async fn process(&self, ctx: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> {
            let completion = ctx.defer();
            tokio::spawn(async move {
                let _held = completion;
                panic!("the storage client blew up");
            });
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_panic_that_drops_a_completion_fails_the_task_as_a_panic() {
        let tester = ProcessorTester::new(PanicsLater);
        let out = tester.process(Some(b"k"), ChatOp::default()).await;
        assert!(out.deferred);
        assert_eq!(out.result, TaskResult::Panicked);
    }

    /// Asks for a retry.
    struct Retries;

    #[async_trait::async_trait]
    impl TaskProcessor<ChatOp> for Retries {
        async fn process(&self, ctx: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> {
            ctx.retry()?;
            Ok(())
        }
    }

    #[tokio::test]
    async fn retry_without_a_retry_topic_is_an_error_the_processor_can_return() {
        let tester = ProcessorTester::new(Retries);
        let out = tester.process(Some(b"k"), ChatOp::default()).await;
        match out.result {
            TaskResult::Failed(reason) => assert!(reason.contains("no retry topic"), "{reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Fails unless the metadata it sees is the metadata it was given.
    struct ChecksMetadata(TaskMetadata);

    #[async_trait::async_trait]
    impl TaskProcessor<ChatOp> for ChecksMetadata {
        async fn process(&self, ctx: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> {
            let seen = (ctx.created_at_millis(), ctx.metadata().clone());
            if seen != (self.0.timestamp_millis, self.0.clone()) {
                return Err(ProcessError::new(format!("saw {seen:?}")));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_processor_sees_the_metadata_the_task_carries() {
        let metadata = TaskMetadata {
            timestamp_millis: 1_700_000_000_123,
            source_application_id: "talk".into(),
            source_instance_id: "talk-7".into(),
            retry_count: 2,
            scheduled_time_millis: 1_700_000_000_456,
        };
        let tester = ProcessorTester::new(ChecksMetadata(metadata.clone()));
        let out = tester
            .process_with(Some(b"k"), metadata, ChatOp::default())
            .await;
        assert_eq!(out.result, TaskResult::Completed);
    }
}
