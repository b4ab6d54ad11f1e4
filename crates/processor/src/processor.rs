//! The trait applications implement.

use std::fmt;

use crate::context::ProcessingContext;

/// Processes tasks of type `T` (a protobuf message decoded from the record value).
///
/// `process` is called for one task at a time per key, in offset order; tasks of
/// different keys run concurrently. Returning `Ok` completes the task (unless it was
/// deferred with [`ProcessingContext::defer`]); returning `Err` logs and counts the
/// failure and completes it all the same, so the partition moves on.
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
}

/// A processing failure: any error, with its message kept for logs.
pub struct ProcessError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl ProcessError {
    /// Wraps an error or a message.
    pub fn new(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        ProcessError(err.into())
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for ProcessError {
    fn from(e: E) -> Self {
        ProcessError(Box::new(e))
    }
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
