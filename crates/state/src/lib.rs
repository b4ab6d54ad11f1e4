//! Partition-local state that follows its partition, the way Kafka Streams state stores do.
//!
//! # The idea
//!
//! A processor sometimes needs memory across tasks: a counter per user, the last value
//! seen for a key, a small join table. Keeping it in an external database couples the
//! processor to that database's availability; keeping it in process memory loses it when
//! the partition moves to another host. This crate keeps it **next to the partition**:
//!
//! * Each assigned source partition gets its own local store (sled on disk, or an
//!   in-memory map), named after subscription, store, topic and partition.
//! * A task reads and writes through a [`StateStore`] view that buffers its writes. When
//!   the task finishes, its writes are appended to a **changelog topic**
//!   `<subscription>-<store>-changelog` ([`changelog_topic`]) at the same partition number
//!   as the source partition, and once the broker acknowledged them they are applied to
//!   the local store in one atomic batch. The changelog is log-compacted: one live record
//!   per state key.
//! * A host that becomes the owner of a partition **restores** the store by replaying the
//!   changelog partition — from its local checkpoint if it has a valid one, otherwise from
//!   the beginning — before it processes any task of that partition.
//!
//! # The changelog first, the local store after the acknowledgement
//!
//! The changelog is the source of truth, and the local store never holds a write the
//! changelog does not have: a task's batch reaches the local store only after every one
//! of its records was acknowledged. A crash between the acknowledgement and the local
//! apply leaves the local store *behind* the changelog, never ahead of it. Only a clean
//! close writes a checkpoint (the changelog offset up to which the local store has every
//! batch); after a crash the store still has the checkpoint of its last clean close, and
//! the restore replays the changelog's tail from there. Replaying a batch the local store
//! already has is harmless: every mutation carries the absolute new value, never a delta.
//!
//! The same property makes a failed append easy to handle: the local store has none of
//! its writes, so the runtime re-sends the same mutations (a new batch). Whether the failed
//! attempt was persisted in full, in part or not at all, the re-sent batch follows it, and
//! a restore ends with the state the local store has after applying the re-sent batch.
//!
//! # Each task's effects apply once, and why a task's batch is the unit
//!
//! Every changelog record carries headers naming the task attempt (`dt_batch`) it belongs
//! to, its position in that attempt's batch and the batch size, and the source offset of
//! the task (see `record.rs`). A restore applies a task's writes only when it has seen
//! the whole batch; a batch torn by a crashed writer is ignored, and the redelivered task
//! runs again against state that has none of its first attempt's effects. The restore
//! also reports the source offsets whose batches *are* complete, so the processor can skip
//! redelivered tasks whose effects are already in the state: each task's effects apply
//! once to the state, even though the task itself is delivered at least once.
//!
//! Log compaction removes records whose key was written again later, which can make an
//! old, complete batch look incomplete, and can let a torn record push out the valid
//! value before it. The restore tells thinned batches from torn ones with a per-writer
//! record sequence, marks torn batches with abort markers and writes the valid values of
//! the keys they touched again; see the `restore` module for the rules and their limits.
//!
//! # Lifecycle of one partition (what the processor runtime does)
//!
//! 1. [`internal::PartitionStore::open`] (blocking) — reports `Fresh`,
//!    `Checkpoint { offset }` or `Rebuilt { reason }`.
//! 2. [`internal::restore`] from [`internal::OpenReport::restore_from`], with the source
//!    partition's committed offset as the floor of the applied set
//!    ([`internal::RestoreOptions`]), before any task of the partition runs. If it fails,
//!    call it again **on the same store** with the same options; do not reopen the
//!    store. Skip redelivered tasks for which [`internal::PartitionStore::is_applied`] is
//!    true, and call [`internal::PartitionStore::forget_applied_below`] with the committed
//!    offset as it advances.
//! 3. Per task: [`internal::PartitionStore::task_batch`] for the task; when it completes,
//!    [`internal::PartitionStore::take_mutations`], [`internal::ChangelogWriter::enqueue`]
//!    (blocking: run it on the blocking pool), await [`internal::PendingAppend::wait`],
//!    then [`internal::PartitionStore::apply_acknowledged`]; only then does the task count
//!    as done. After a failed append, re-send the same mutations — unless the error
//!    [is permanent](StateError::is_permanent): then the task fails, nothing is applied,
//!    and a batch named as torn is reverted with
//!    [`internal::ChangelogWriter::enqueue_revert`].
//!    Restore from a checkpoint only while it is younger than
//!    [`StateConfig::checkpoint_max_age_ms`] and half the changelog's
//!    `delete.retention.ms` ([`internal::RestoreOptions::checkpoint_max_age`]).
//! 4. On release, once every append was acknowledged and applied:
//!    [`internal::PartitionStore::close_clean`] with the next changelog offset and the
//!    applied offsets at or above the committed offset
//!    ([`internal::PartitionStore::applied_source_offsets_from`]); it fences the store.
//!    When the release cannot wait for that (appends still failing, tasks abandoned, the
//!    partition lost): [`internal::PartitionStore::fence`] and
//!    [`internal::ChangelogWriter::purge_queued`], so nothing of this partition is
//!    written any more, and drop the store without a checkpoint; its next open restores
//!    from the previous checkpoint.
//!
//! # Where things are
//!
//! The public surface for processors is [`StateStore`], [`StateError`], [`StateConfig`],
//! [`Backend`] and [`changelog_topic`]. The machinery the processor runtime drives —
//! [`internal::PartitionStore`], [`internal::ChangelogWriter`], [`internal::restore`] —
//! lives in [`internal`].

mod changelog;
mod config;
mod error;
mod kafka;
mod record;
mod restore;
mod store;

pub use config::{changelog_topic, Backend, StateConfig};
pub use error::StateError;

/// The read and write view of partition-local state that one task uses.
///
/// Reads see the task's own writes first, then the partition's store. Writes are
/// buffered until the task completes; the runtime then appends them to the changelog and,
/// once the broker acknowledged them, applies them to the local store atomically. Keys
/// and values are opaque bytes.
pub trait StateStore: Send + Sync {
    /// The value stored under `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Stores `value` under `key`, replacing any previous value.
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StateError>;
    /// Removes `key` (a tombstone in the changelog). Deleting a missing key is not an error.
    fn delete(&self, key: &[u8]) -> Result<(), StateError>;
    /// Every entry whose key starts with `prefix`, in ascending key order.
    #[allow(clippy::type_complexity)]
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StateError>;
}

/// Machinery for the processor runtime: opening, restoring, applying and closing
/// partition stores, and writing the changelog. Not a stable API for processors.
#[doc(hidden)]
pub mod internal {
    pub use crate::changelog::{
        changelog_delete_retention, create_changelog_topic, ChangelogTopicInfo, ChangelogWriter,
        PendingAppend,
    };
    pub use crate::record::{headers, Mutation};
    pub use crate::restore::{
        restore, RestoreOptions, RestoreReport, DEFAULT_STALL_TIMEOUT, RESTORED_RECORDS_TOTAL,
        RESTORE_SECONDS,
    };
    pub use crate::store::{OpenReport, PartitionStore, RebuildReason, TaskBatch};
}
