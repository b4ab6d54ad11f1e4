//! The partitions a subscription owns right now, and flow control over them.
//!
//! Flow control moves records waiting in a partition's overflow into its lanes while it
//! has room under `max_pending`, and pauses or resumes fetching to match. It runs for the
//! partitions that asked for it (a completion freed room, a restore finished, a record had
//! to wait) and, as a safety net, for all of them a few times a second — never in a busy
//! loop over every partition.
//!
//! A partition whose committed offset could not be read at assignment is *held*: it has
//! no context yet (so no task starts and nothing is committed for it), fetching is paused,
//! and health reports why. The read is tried again with backoff until it succeeds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::partition::{PartitionContext, PauseControl};
use super::partition_core::PartitionCore;
use super::recorder::SubscriptionRecorder;
use super::topics::PartitionId;

/// The owned partitions of one subscription.
pub(crate) struct Partitions<T> {
    owned: HashMap<PartitionId, PartitionContext<T>>,
    /// Closed cores of released partitions whose abandoned tasks still run, until the
    /// partition's next context here takes them as its predecessor.
    zombies: HashMap<PartitionId, Arc<PartitionCore>>,
    /// Assigned partitions whose committed offset could not be read yet (one entry per
    /// assigned partition at most).
    held: HashMap<PartitionId, Held>,
    /// Committed offsets read just before the consumer takes partitions on, for the
    /// assignment that follows (one entry per partition being assigned).
    stashed: HashMap<PartitionId, CommittedRead>,
    /// Of those, the partitions whose committed offset was past the log end and was moved
    /// to the new log.
    moved: HashSet<PartitionId>,
}

/// A partition's committed position (none if nothing was committed) and its metadata, or
/// why they could not be read.
pub(crate) type CommittedRead = Result<(Option<i64>, String), String>;

/// The first retry of a failed committed-offset read comes after this; each failure
/// doubles it, up to [`HELD_RETRY_MAX`].
const HELD_RETRY_FIRST: Duration = Duration::from_millis(200);
const HELD_RETRY_MAX: Duration = Duration::from_secs(10);

/// An assigned partition waiting for its committed offset.
pub(crate) struct Held {
    topic: Arc<str>,
    /// Failed reads so far.
    attempts: u32,
    /// The last read's error.
    error: String,
    /// When to read again.
    retry_at: Instant,
}

impl<T> Default for Partitions<T> {
    fn default() -> Self {
        Partitions {
            owned: HashMap::new(),
            zombies: HashMap::new(),
            held: HashMap::new(),
            stashed: HashMap::new(),
            moved: HashSet::new(),
        }
    }
}

impl<T: Send + 'static> Partitions<T> {
    pub(crate) fn get_mut(&mut self, partition: PartitionId) -> Option<&mut PartitionContext<T>> {
        self.owned.get_mut(&partition)
    }

    pub(crate) fn contains(&self, partition: PartitionId) -> bool {
        self.owned.contains_key(&partition)
    }

    /// Assigned partitions: running ones and held ones.
    pub(crate) fn len(&self) -> usize {
        self.owned.len() + self.held.len()
    }

    /// Notes a failed read of `partition`'s committed offset (at `now`): it stays held
    /// and is read again after a backoff. Returns the failed reads so far and that
    /// backoff.
    pub(crate) fn hold(
        &mut self,
        partition: PartitionId,
        topic: &Arc<str>,
        error: String,
        now: Instant,
    ) -> (u32, Duration) {
        let held = self.held.entry(partition).or_insert_with(|| Held {
            topic: topic.clone(),
            attempts: 0,
            error: String::new(),
            retry_at: now,
        });
        held.attempts = held.attempts.saturating_add(1);
        held.error = error;
        let backoff = HELD_RETRY_FIRST
            .saturating_mul(1 << held.attempts.saturating_sub(1).min(16))
            .min(HELD_RETRY_MAX);
        held.retry_at = now + backoff;
        (held.attempts, backoff)
    }

    /// Keeps committed offsets read before an assignment for [`Self::take_stashed`]
    /// (replacing what an earlier one left).
    pub(crate) fn stash(
        &mut self,
        reads: Vec<(PartitionId, CommittedRead)>,
        moved: impl IntoIterator<Item = PartitionId>,
    ) {
        self.stashed = reads.into_iter().collect();
        self.moved = moved.into_iter().collect();
    }

    /// Whether `partition`'s stashed committed offset was moved to a new log (asked once).
    pub(crate) fn take_moved(&mut self, partition: PartitionId) -> bool {
        self.moved.remove(&partition)
    }

    /// The stashed reads of `ids`, and the ids that have none; forgets the rest.
    pub(crate) fn take_stashed(
        &mut self,
        ids: &[PartitionId],
    ) -> (Vec<(PartitionId, CommittedRead)>, Vec<PartitionId>) {
        let mut stashed = std::mem::take(&mut self.stashed);
        let mut missing = Vec::new();
        let reads = ids
            .iter()
            .filter_map(|id| match stashed.remove(id) {
                Some(read) => Some((*id, read)),
                None => {
                    missing.push(*id);
                    None
                }
            })
            .collect();
        (reads, missing)
    }

    /// Whether `partition` is held.
    pub(crate) fn is_held(&self, partition: PartitionId) -> bool {
        self.held.contains_key(&partition)
    }

    /// Stops holding `partition` (its committed offset was read, or it was revoked);
    /// returns the failed reads it had.
    pub(crate) fn unhold(&mut self, partition: PartitionId) -> Option<u32> {
        self.held.remove(&partition).map(|h| h.attempts)
    }

    /// The held partitions whose next read is due by `now`.
    pub(crate) fn held_due(&self, now: Instant) -> Vec<PartitionId> {
        self.held
            .iter()
            .filter(|(_, h)| h.retry_at <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every held partition.
    pub(crate) fn held_ids(&self) -> Vec<PartitionId> {
        self.held.keys().copied().collect()
    }

    /// What health reports show of the held partitions.
    pub(crate) fn held_health(&self) -> impl Iterator<Item = crate::health::PartitionHealth> + '_ {
        self.held
            .iter()
            .map(|(id, h)| crate::health::PartitionHealth {
                topic: h.topic.clone(),
                partition: id.partition,
                position: None,
                pending: 0,
                delayed: 0,
                completed: 0,
                offset_map_gaps: 0,
                not_ready: Some(crate::health::NotReady::ReadingCommittedOffset {
                    attempts: h.attempts,
                    error: h.error.clone(),
                }),
            })
    }

    pub(crate) fn ids(&self) -> Vec<PartitionId> {
        self.owned.keys().copied().collect()
    }

    pub(crate) fn contexts(&self) -> impl Iterator<Item = &PartitionContext<T>> {
        self.owned.values()
    }

    pub(crate) fn insert(&mut self, partition: PartitionId, context: PartitionContext<T>) {
        self.owned.insert(partition, context);
    }

    pub(crate) fn remove(&mut self, partition: PartitionId) -> Option<PartitionContext<T>> {
        self.owned.remove(&partition)
    }

    /// The closed core of `partition`'s previous assignment, if its tasks still run.
    pub(crate) fn take_predecessor(
        &mut self,
        partition: PartitionId,
    ) -> Option<Arc<PartitionCore>> {
        self.zombies.retain(|_, core| core.running() > 0);
        self.zombies.remove(&partition)
    }

    pub(crate) fn add_zombie(&mut self, core: Arc<PartitionCore>) {
        self.zombies.retain(|_, core| core.running() > 0);
        self.zombies.insert(core.id(), core);
    }

    /// Runs flow control for `which` partitions (all when None); [`Self::throttled`]
    /// tells the result.
    pub(crate) fn flow(
        &mut self,
        which: Option<&[PartitionId]>,
        control: &dyn PauseControl,
        recorder: &SubscriptionRecorder,
        now_ms: i64,
    ) {
        match which {
            None => {
                for ctx in self.owned.values_mut() {
                    ctx.flow(control, recorder, now_ms);
                }
            }
            Some(ids) => {
                for id in ids {
                    if let Some(ctx) = self.owned.get_mut(id) {
                        ctx.flow(control, recorder, now_ms);
                    }
                }
            }
        }
    }

    /// Hands every partition's newly dispatched tasks to its lanes.
    pub(crate) fn flush(&mut self) {
        for ctx in self.owned.values_mut() {
            ctx.flush();
        }
    }

    /// Whether some partition is throttled, and whether all are (nothing to fetch).
    pub(crate) fn throttled(&self) -> (bool, bool) {
        let paused = self.owned.values().filter(|c| c.is_paused()).count();
        (paused > 0, paused > 0 && paused == self.owned.len())
    }

    /// Hands due delayed tasks to the lanes.
    pub(crate) fn release_due(&mut self, now_ms: i64) {
        for ctx in self.owned.values_mut() {
            if ctx.next_due().is_some_and(|d| d <= now_ms) {
                ctx.release_due(now_ms);
            }
        }
    }

    /// The partitions with a task waiting for a rate token that is due by now.
    pub(crate) fn rate_due(&self, now_ms: i64) -> Vec<PartitionId> {
        self.owned
            .iter()
            .filter(|(_, c)| c.rate_due_by(now_ms))
            .map(|(id, _)| *id)
            .collect()
    }

    /// When the earliest delayed task is due.
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.owned.values().filter_map(|c| c.next_due()).min()
    }
}
