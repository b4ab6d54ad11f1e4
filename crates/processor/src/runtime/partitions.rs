//! The partitions a subscription owns right now, and flow control over them.
//!
//! Flow control moves records waiting in a partition's overflow into its lanes while it
//! has room under `max_pending`, and pauses or resumes fetching to match. It runs for the
//! partitions that asked for it (a completion freed room, a restore finished, a record had
//! to wait) and, as a safety net, for all of them a few times a second — never in a busy
//! loop over every partition.

use std::collections::HashMap;
use std::sync::Arc;

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
}

impl<T> Default for Partitions<T> {
    fn default() -> Self {
        Partitions {
            owned: HashMap::new(),
            zombies: HashMap::new(),
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

    pub(crate) fn len(&self) -> usize {
        self.owned.len()
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
