//! The trait applications implement.

use std::fmt;

use crate::context::ProcessingContext;

/// Processes tasks of type `T` (a protobuf message decoded from the record value).
///
/// `process` is called for one task at a time per key, in offset order; tasks of
/// different keys run concurrently. Returning `Ok` completes the task (unless it was
/// deferred with [`ProcessingContext::defer`]). Returning `Err`, or panicking, fails it:
/// with a [`RetryConfig`](crate::RetryConfig) the task is retried, with a
/// [`DeadLetterConfig`](crate::DeadLetterConfig) it is kept once it fails for good, and
/// without either it is logged, counted and completed, so the partition moves on.
///
/// ```
/// use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
/// use decaton_protocol::ChatOp;
///
/// struct PrintOps;
///
/// #[async_trait]
/// impl TaskProcessor<ChatOp> for PrintOps {
///     async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
///         println!("{} at {}/{}: {:?}", task.user_id, ctx.partition(), ctx.offset(), task.op());
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait TaskProcessor<T>: Send + Sync + 'static {
    /// Processes one task.
    async fn process(&self, ctx: &ProcessingContext, task: T) -> Result<(), ProcessError>;

    /// Whether this processor needs each key to stay on one of a fixed number of lanes:
    /// true for a [`Chain`](crate::Chain) with a [`ProcessorScope::Lane`](crate::ProcessorScope::Lane)
    /// stage. A subscription in per-key mode refuses to build with such a processor.
    /// Other processors need not implement it.
    fn needs_lanes(&self) -> bool {
        false
    }
}

/// A processing failure: any error, with its message kept for logs and dead-letter
/// headers, and a [`FailureKind`] saying whether trying again can help.
pub struct ProcessError {
    error: Box<dyn std::error::Error + Send + Sync + 'static>,
    kind: FailureKind,
}

/// Whether a failed task is worth trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// A failure of no stated kind (any `?`-converted error): retried when the
    /// subscription has a [`RetryConfig`](crate::RetryConfig).
    Failed,
    /// A transient failure that asks to be retried; without a retry configuration it is
    /// handled like [`Failed`](Self::Failed), with a warning.
    Retry,
    /// A failure that no retry can fix (a malformed task, a refused request): never
    /// retried, dead-lettered at once when the subscription has a dead-letter topic.
    Permanent,
}

impl ProcessError {
    /// Wraps an error or a message, of kind [`FailureKind::Failed`].
    pub fn new(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        ProcessError {
            error: err.into(),
            kind: FailureKind::Failed,
        }
    }

    /// A transient failure that asks to be retried ([`FailureKind::Retry`]).
    pub fn retry(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        ProcessError {
            error: err.into(),
            kind: FailureKind::Retry,
        }
    }

    /// A failure no retry can fix ([`FailureKind::Permanent`]).
    pub fn permanent(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        ProcessError {
            error: err.into(),
            kind: FailureKind::Permanent,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for ProcessError {
    fn from(e: E) -> Self {
        ProcessError {
            error: Box::new(e),
            kind: FailureKind::Failed,
        }
    }
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.error, f)
    }
}
