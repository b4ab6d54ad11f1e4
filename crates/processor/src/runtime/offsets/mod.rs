//! Out-of-order completion and the commit position.
//!
//! Tasks of one partition finish in any order, but Kafka stores one committed offset per
//! partition: everything below it counts as done. The [`OffsetTracker`] keeps one entry
//! per *registered* record between the lowest unfinished one (the *watermark*) and the
//! newest fetched one. The commit position is the watermark: it never passes an
//! unfinished task, so a crash re-runs at worst what was not finished — at-least-once.
//!
//! Memory is O(records in flight), never O(offset distance): a jump in offsets (a reset to
//! the log start after retention, a compacted topic, transaction markers) costs nothing,
//! because offsets that were never fetched are not stored at all. An offset between two
//! registered ones that was never fetched does not exist in the log, so it counts as done.
//!
//! Finished offsets above the watermark would run again after a restart. The **offset
//! map** avoids that (as Parallel Consumer does): they are encoded compactly into the
//! commit's metadata ([`map`]), and the next owner decodes them into [`DoneRanges`] and
//! skips those records. A new owner keeps the map it inherited in every commit until its
//! own fetching has passed those offsets, so committing early never erases it.

mod map;
mod ranges;
mod tracker;

pub use map::decode_offset_map;
pub use ranges::DoneRanges;
pub use tracker::{OffsetTracker, Registration};
