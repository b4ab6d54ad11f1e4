//! The changelog: every acknowledged task batch, as Kafka records, so another host can
//! rebuild the state.
//!
//! The changelog of a store is the topic `<subscription>-<store>-changelog`
//! ([`changelog_topic`](crate::changelog_topic)), log-compacted, with the partition count
//! of the source topic; the batch of a task from source partition `p` goes to changelog
//! partition `p`. [`create_changelog_topic`] creates it; [`ChangelogWriter`] appends task
//! batches to it in the record format of [`record`](crate::record).
//!
//! The changelog is the source of truth: a task's writes reach the local store only after
//! the changelog acknowledged them, so the local store is never ahead of it.

mod topic;
mod writer;

pub use topic::{changelog_delete_retention, create_changelog_topic, ChangelogTopicInfo};
pub use writer::{ChangelogWriter, PendingAppend};
