//! A task's view of its partition's state: reads fall through to the store, writes are
//! buffered until the task completes.
//!
//! The buffer holds one entry per key (the newest write wins), in key order. The runtime
//! takes the buffered writes with
//! [`PartitionStore::take_mutations`](super::PartitionStore::take_mutations) when the task
//! completes; dropping every clone of a batch discards them.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::local::{Entries, Local};
use crate::record::Mutation;
use crate::{StateError, StateStore};

/// A task's buffered writes: key -> new value, or `None` for a delete.
type Buffer = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A task's buffered view of its partition's state; see [`StateStore`].
///
/// Created by [`PartitionStore::task_batch`](super::PartitionStore::task_batch). Clones
/// share one buffer (hand one to the task, keep one for the runtime); dropping every clone
/// discards the writes.
#[derive(Clone)]
pub struct TaskBatch {
    local: Arc<Local>,
    writes: Arc<Mutex<Buffer>>,
}

impl std::fmt::Debug for TaskBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskBatch")
            .field("buffered", &self.writes.lock().len())
            .finish_non_exhaustive()
    }
}

impl TaskBatch {
    /// An empty batch over `local`.
    pub(super) fn new(local: Arc<Local>) -> TaskBatch {
        TaskBatch {
            local,
            writes: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Whether this batch reads from `local`.
    pub(super) fn reads_from(&self, local: &Arc<Local>) -> bool {
        Arc::ptr_eq(&self.local, local)
    }

    /// Takes the buffered writes, in key order, leaving the batch empty.
    pub(super) fn take(&self) -> Vec<Mutation> {
        std::mem::take(&mut *self.writes.lock())
            .into_iter()
            .map(|(key, value)| Mutation { key, value })
            .collect()
    }

    /// Number of buffered writes (one per distinct key).
    pub fn len(&self) -> usize {
        self.writes.lock().len()
    }

    /// Whether the task wrote nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.lock().is_empty()
    }

    /// Discards the buffered writes (for a task that is retried from scratch).
    pub fn clear(&self) {
        self.writes.lock().clear();
    }
}

impl StateStore for TaskBatch {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(buffered) = self.writes.lock().get(key) {
            return Ok(buffered.clone());
        }
        self.local.get(key)
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.writes
            .lock()
            .insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        self.writes.lock().insert(key.to_vec(), None);
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.local.scan_prefix(prefix)?.into_iter().collect();
        let writes = self.writes.lock();
        for (k, v) in writes
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }
}
