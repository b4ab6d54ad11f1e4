//! The decaton-rs processing runtime.
//!
//! Implement [`TaskProcessor`] for your task type, build a [`Subscription`] (one consumer
//! group) and `run` it. Inside each partition the runtime runs tasks of different keys
//! concurrently and tasks of one key one at a time in offset order, commits only below the
//! lowest unfinished task (recording finished offsets above it in the commit metadata),
//! pauses partitions that have `max_pending` uncommitted tasks, and shuts down gracefully.
//! Several processors can run as the stages of one [`Chain`], each shared or made per
//! subscription, partition or lane ([`ProcessorScope`]).
//!
//! ```no_run
//! use decaton_processor::{async_trait, ProcessError, ProcessingContext, ProcessorProperties,
//!     SchedulingMode, Subscription, TaskProcessor};
//! use decaton_protocol::ChatOp;
//!
//! struct Notify;
//!
//! #[async_trait]
//! impl TaskProcessor<ChatOp> for Notify {
//!     async fn process(&self, ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
//!         // Runs concurrently with other users' ops, after this user's previous op.
//!         let _ = (ctx.offset(), op.user_id);
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut props = ProcessorProperties::default();
//! props.mode = SchedulingMode::PerKey;
//! let sub = Subscription::builder("notifier", Notify)
//!     .bootstrap_servers("127.0.0.1:9092")
//!     .topic("chat-ops")
//!     .properties(props)
//!     .build()?;
//! let stats = sub.run().await?;
//! # Ok(()) }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod batching;
mod chain;
mod compaction;
mod config;
mod context;
mod health;
mod live;
mod metrics;
mod processor;
mod quota;
mod retry;
mod runtime;
mod stats;
mod subscription;
mod task_span;
pub mod testing;

pub use async_trait::async_trait;
pub use batching::{BatchProcessor, BatchedInfo, BatchedTask, Batching, PassOn};
pub use chain::{Chain, ProcessorScope};
pub use compaction::{Compaction, Survivor};
pub use config::{ProcessorProperties, PropertyError, SchedulingMode};
pub use context::{Completion, ProcessingContext};
pub use decaton_protocol::{TaskMetadata, TraceParent};
pub use decaton_state::{Backend, StateConfig, StateError, StateStore};
pub use health::{NotReady, PartitionHealth, SubscriptionHealth};
pub use live::{FileProperties, LiveProperties, PropertySupplier};
pub use processor::{FailureKind, ProcessError, TaskProcessor};
pub use quota::{QuotaAction, QuotaConfig, QuotaUsage};
pub use retry::{Backoff, DeadLetterConfig, RetryConfig};
pub use runtime::offsets::{decode_offset_map, DoneRanges, OffsetTracker, Registration};
pub use stats::SubscriptionStats;
pub use subscription::{Subscription, SubscriptionBuilder, SubscriptionError, SubscriptionHandle};
pub use task_span::{set_trace_continuation, TraceContinuation};

/// Metric names the runtime records (Prometheus style, labels `subscription`, `topic`,
/// `partition`).
pub mod metric_names {
    pub use crate::metrics::*;
}
