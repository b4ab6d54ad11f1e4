//! Errors of state stores and their changelog.

use std::path::PathBuf;

use rdkafka::error::KafkaError;

/// Errors from a state store, its changelog or its restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The local sled database failed.
    #[error("state storage: {0}")]
    Storage(#[from] sled::Error),
    /// A file operation on the state directory failed.
    #[error("state directory {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The partition's state directory is open in another handle or another process.
    #[error("state directory {0} is in use by another store (another handle or process)")]
    Locked(PathBuf),
    /// A name used in the directory layout is not usable as a path component.
    #[error("invalid {what} {name:?}: must be non-empty and contain no path separators")]
    InvalidName {
        /// Which name (subscription, store, topic).
        what: &'static str,
        /// The rejected name.
        name: String,
    },
    /// librdkafka refused an operation (client creation, metadata, consuming).
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A changelog record was not acknowledged.
    #[error("changelog {topic}[{partition}]: delivery failed: {error}")]
    Delivery {
        /// Changelog topic.
        topic: String,
        /// Changelog partition.
        partition: i32,
        /// Why librdkafka gave up on the record.
        error: KafkaError,
    },
    /// The changelog refused a batch for good: a record larger than the producer or the
    /// topic accepts, a topic that does not exist or that the principal may not write, a
    /// record the broker calls invalid, a producer in a fatal state. Sending the same
    /// records again gives the same answer (see [`StateError::is_permanent`]).
    #[error("changelog {topic}[{partition}]: refused for good: {reason}")]
    Refused {
        /// Changelog topic.
        topic: String,
        /// Changelog partition.
        partition: i32,
        /// Why the records were refused.
        reason: String,
        /// The refused batch, when some of its records may be in the changelog all the
        /// same: [`ChangelogWriter::enqueue_revert`](crate::internal::ChangelogWriter::enqueue_revert)
        /// must then mark it aborted and write the keys' valid values again before the
        /// partition's next batch is trusted. `None` when nothing of it was written.
        torn_batch: Option<u64>,
    },
    /// The changelog topic is missing or unusable.
    #[error("changelog {topic}: {detail}")]
    Changelog {
        /// Changelog topic.
        topic: String,
        /// What is wrong.
        detail: String,
    },
    /// A [`TaskBatch`](crate::internal::TaskBatch) was applied to a store other than the
    /// one it was created from.
    #[error("task batch belongs to another partition store")]
    ForeignBatch,
    /// The store was closed; it accepts no more writes.
    #[error("partition store {0} is closed")]
    Closed(String),
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A background task failed unexpectedly (a panic or a cancelled blocking task).
    #[error("internal: {0}")]
    Internal(String),
}

impl StateError {
    /// Whether trying the same write again cannot succeed ([`StateError::Refused`]):
    /// the task whose writes these were must fail instead of waiting for the changelog.
    /// Every other error of an append (a timeout, an unreachable broker, a full queue, a
    /// purge) may pass and is worth retrying with backoff.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StateError::Refused { .. })
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> StateError {
        StateError::Io {
            path: path.into(),
            source,
        }
    }
}
