//! One partition's local store, and the per-task view that buffers a task's writes.
//!
//! A [`PartitionStore`] holds the state of one source partition of one subscription's
//! store: a sled database at `<state_dir>/<subscription>/<store>/<topic>-<partition>`
//! (see [`open`] for what opening it checks), or an in-memory map.
//!
//! A task never writes to the store directly. It gets a [`TaskBatch`], which buffers its
//! writes and reads them back before falling through to the store. When the task
//! completes, the runtime takes its writes as [`Mutation`]s
//! ([`PartitionStore::take_mutations`]), appends them to the changelog, and only once the
//! changelog has acknowledged them applies them to the local store in one atomic batch
//! ([`PartitionStore::apply_acknowledged`]). So the local store never holds a write the
//! changelog does not have: after a crash it is at most *behind* the changelog, and a
//! replay of the changelog's tail catches it up.

mod batch;
mod local;
mod open;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use batch::TaskBatch;
pub use open::{OpenReport, RebuildReason};

use crate::config::{Backend, StateConfig};
use crate::record::Mutation;
use crate::StateError;
use local::{Entries, Local};
use open::{check_name, open_sled, Checkpoint, Identity, Opened};

/// The state of one source partition for one subscription's store.
///
/// A cheap, clonable handle; every clone refers to the same store. The sled files stay
/// open (and locked) until the last clone, and the last [`TaskBatch`], is dropped.
#[derive(Clone)]
pub struct PartitionStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionStore")
            .field("id", &self.inner.label)
            .finish_non_exhaustive()
    }
}

struct Inner {
    id: Identity,
    label: String,
    local: Arc<Local>,
    /// Serialises local writes with each other and with closing.
    write_lock: Mutex<()>,
    applied: Mutex<BTreeSet<i64>>,
    /// Set by [`PartitionStore::fence`] (and a clean close): every write is refused.
    fenced: AtomicBool,
    /// A restore emptied the store: its checkpoint no longer applies, and a retried
    /// restore starts from the beginning of the changelog.
    emptied: AtomicBool,
    /// When the checkpoint the store was opened with was written (ms since the epoch).
    checkpoint_written_at_ms: Option<u64>,
}

impl PartitionStore {
    /// Opens (or creates) the store of `topic`-`partition` for `subscription`.
    ///
    /// For the sled backend this blocks on file I/O; call it from a blocking context in
    /// async code. Files that cannot be trusted are deleted (see [`OpenReport`]); the
    /// only errors are directory I/O failures, a store that is already open
    /// ([`StateError::Locked`]) and invalid names.
    pub fn open(
        cfg: &StateConfig,
        subscription: &str,
        topic: &str,
        partition: i32,
    ) -> Result<(PartitionStore, OpenReport), StateError> {
        check_name("subscription", subscription)?;
        check_name("store", &cfg.store_name)?;
        check_name("topic", topic)?;
        let id = Identity::new(subscription, &cfg.store_name, topic, partition);
        let label = id.to_string();
        let Opened {
            local,
            report,
            applied,
            checkpoint_written_at_ms,
        } = match cfg.backend {
            Backend::Memory => Opened {
                local: Local::memory(),
                report: OpenReport::Fresh,
                applied: Vec::new(),
                checkpoint_written_at_ms: None,
            },
            Backend::Sled => {
                let dir = cfg
                    .state_dir
                    .join(subscription)
                    .join(&cfg.store_name)
                    .join(format!("{topic}-{partition}"));
                let claim = local::DirClaim::take(&dir)?;
                open_sled(cfg, &id, &dir, claim)?
            }
        };
        let store = PartitionStore {
            inner: Arc::new(Inner {
                id,
                label,
                local: Arc::new(local),
                write_lock: Mutex::new(()),
                applied: Mutex::new(applied.into_iter().collect()),
                fenced: AtomicBool::new(false),
                emptied: AtomicBool::new(false),
                checkpoint_written_at_ms,
            }),
        };
        Ok((store, report))
    }

    /// A fresh per-task view: reads see the task's own writes first, writes are buffered
    /// until [`take_mutations`](Self::take_mutations).
    pub fn task_batch(&self) -> TaskBatch {
        TaskBatch::new(self.inner.local.clone())
    }

    /// Takes the task's buffered writes, in key order, for the changelog. The local store
    /// is not touched: it gets them from
    /// [`apply_acknowledged`](Self::apply_acknowledged) once the changelog has
    /// acknowledged them. The batch is left empty; an empty batch gives an empty list.
    ///
    /// Fails with [`StateError::ForeignBatch`] if the batch was made by another store
    /// (its writes stay in it).
    pub fn take_mutations(&self, batch: &TaskBatch) -> Result<Vec<Mutation>, StateError> {
        if !batch.reads_from(&self.inner.local) {
            return Err(StateError::ForeignBatch);
        }
        self.check_open()?;
        Ok(batch.take())
    }

    /// Applies mutations the changelog has acknowledged to the local store, in one atomic
    /// batch, and records `source_offset` as applied (see [`is_applied`](Self::is_applied)).
    ///
    /// Batches that write the same state key must be applied in the order they were
    /// enqueued to the changelog, so the local store ends like the changelog. Tasks that
    /// share a task key run one at a time, the next one only after the previous one's
    /// batch was acknowledged and applied, which gives that order (and fresh reads) for
    /// state kept per task key. Tasks of different task keys that write one shared state
    /// key race, as any concurrent read-modify-write does, and their batches may be
    /// applied in another order than the changelog holds them.
    ///
    /// Refused with [`StateError::Closed`] once the store is fenced. For the sled
    /// backend this writes to disk: call it from a blocking context in async code.
    pub fn apply_acknowledged(
        &self,
        mutations: &[Mutation],
        source_offset: i64,
    ) -> Result<(), StateError> {
        let _order = self.inner.write_lock.lock();
        self.check_open()?;
        if !mutations.is_empty() {
            self.inner.local.write(
                mutations
                    .iter()
                    .map(|m| (m.key.as_slice(), m.value.as_deref())),
            )?;
        }
        self.inner.applied.lock().insert(source_offset);
        Ok(())
    }

    /// Fences the store: from now on every write path refuses with
    /// [`StateError::Closed`] — [`take_mutations`](Self::take_mutations),
    /// [`apply_acknowledged`](Self::apply_acknowledged),
    /// [`close_clean`](Self::close_clean) and the writes of a restore — and a
    /// [`restore`](crate::internal::restore) in progress on this store stops at its next
    /// poll with [`StateError::Closed`], appending nothing to the changelog.
    ///
    /// Call it when the partition is released without a clean close (a clean close
    /// fences by itself). A local write in progress finishes before this returns; none
    /// starts after. Reads still work.
    pub fn fence(&self) {
        let _order = self.inner.write_lock.lock();
        if !self.inner.fenced.swap(true, Ordering::AcqRel) {
            tracing::debug!(store = %self.inner.label, "state store fenced");
        }
    }

    /// Whether [`fence`](Self::fence) (or [`close_clean`](Self::close_clean)) was called.
    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::Acquire)
    }

    /// [`StateError::Closed`] once fenced.
    pub(crate) fn check_open(&self) -> Result<(), StateError> {
        if self.is_fenced() {
            return Err(StateError::Closed(self.inner.label.clone()));
        }
        Ok(())
    }

    /// Writes a checkpoint and flushes. `changelog_next_offset` is the first changelog
    /// offset not in the local store: one past the last acknowledged append, or the
    /// restore's [`next_offset`](crate::internal::RestoreReport::next_offset) if nothing
    /// was appended since. `applied_source_offsets` are the source offsets whose effects
    /// are in the store but which may be redelivered — those at or above the committed
    /// offset. This fences the store (see [`fence`](Self::fence)): it accepts no more
    /// writes; drop it. A store that is already fenced refuses with
    /// [`StateError::Closed`] and writes no checkpoint.
    ///
    /// Call it only when every batch of this store that the changelog may hold is in the
    /// local store: every append was acknowledged and applied (a failed append counts once
    /// its mutations were re-sent, acknowledged and applied). Otherwise drop the store
    /// without closing: the next open then restores from the previous checkpoint, or from
    /// the beginning. The in-memory backend keeps no checkpoint. For the sled backend this
    /// flushes to disk: call it from a blocking context in async code.
    pub fn close_clean(
        &self,
        changelog_next_offset: i64,
        applied_source_offsets: &[i64],
    ) -> Result<(), StateError> {
        let _order = self.inner.write_lock.lock();
        self.check_open()?;
        self.inner.fenced.store(true, Ordering::Release);
        open::write_checkpoint(
            &self.inner.local,
            &Checkpoint {
                changelog_next_offset,
                applied_source_offsets: applied_source_offsets.to_vec(),
                written_at_ms: Some(now_ms()),
            },
        )?;
        tracing::debug!(store = %self.inner.label, changelog_next_offset, "state store closed cleanly");
        Ok(())
    }

    /// Source offsets at or above `from` whose effects are in this store, ascending: from
    /// the checkpoint the store was opened with, every complete batch a
    /// [`restore`](crate::internal::restore) applied at or above its floor, and every
    /// [`apply_acknowledged`](Self::apply_acknowledged). A redelivered task at one of these
    /// offsets must be skipped; a checkpoint needs those at or above the committed offset.
    pub fn applied_source_offsets_from(&self, from: i64) -> Vec<i64> {
        self.inner.applied.lock().range(from..).copied().collect()
    }

    /// Whether the task at `source_offset` already has its effects in this store.
    pub fn is_applied(&self, source_offset: i64) -> bool {
        self.inner.applied.lock().contains(&source_offset)
    }

    /// Forgets applied source offsets below `offset`: call it with the committed offset
    /// whenever it advances (nothing below it is redelivered), so the applied set stays
    /// as small as the range of offsets that can still be redelivered.
    pub fn forget_applied_below(&self, offset: i64) {
        let mut applied = self.inner.applied.lock();
        *applied = applied.split_off(&offset);
    }

    /// Reads `key` straight from the store (without any task's buffered writes).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.inner.local.get(key)
    }

    /// Entries whose key starts with `prefix`, straight from the store, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        self.inner.local.scan_prefix(prefix)
    }

    /// Every entry of the store in key order (for tests and tooling; reads everything).
    pub fn entries(&self) -> Result<Entries, StateError> {
        self.scan_prefix(&[])
    }

    /// The subscription this store belongs to.
    pub fn subscription(&self) -> &str {
        &self.inner.id.subscription
    }

    /// The store name.
    pub fn store_name(&self) -> &str {
        &self.inner.id.store
    }

    /// The source topic.
    pub fn topic(&self) -> &str {
        &self.inner.id.topic
    }

    /// The source (and changelog) partition.
    pub fn partition(&self) -> i32 {
        self.inner.id.partition
    }

    /// The changelog topic, `<subscription>-<store>-changelog`.
    pub fn changelog_topic(&self) -> &str {
        &self.inner.id.changelog_topic
    }

    pub(crate) fn label(&self) -> &str {
        &self.inner.label
    }

    /// Applies restored changelog writes, in order, in one atomic local batch. Refused
    /// once fenced.
    pub(crate) fn write_restored(
        &self,
        ops: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), StateError> {
        let _order = self.inner.write_lock.lock();
        self.check_open()?;
        if ops.is_empty() {
            return Ok(());
        }
        self.inner
            .local
            .write(ops.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))
    }

    /// Empties the local data and removes the checkpoint (a checkpoint the changelog
    /// cannot serve is being dropped); from then on [`emptied`](Self::emptied) is true.
    /// Refused once fenced.
    pub(crate) fn clear_local(&self) -> Result<(), StateError> {
        let _order = self.inner.write_lock.lock();
        self.check_open()?;
        self.inner.emptied.store(true, Ordering::Release);
        self.inner.applied.lock().clear();
        open::remove_checkpoint(&self.inner.local)?;
        self.inner.local.clear()
    }

    /// When the checkpoint this store was opened with was written, in ms since the Unix
    /// epoch; `None` without a checkpoint, or for one written by an older version.
    pub(crate) fn checkpoint_written_at_ms(&self) -> Option<u64> {
        self.inner.checkpoint_written_at_ms
    }

    /// Whether a restore emptied the store, so that its checkpoint no longer applies.
    pub(crate) fn emptied(&self) -> bool {
        self.inner.emptied.load(Ordering::Acquire)
    }

    pub(crate) fn add_applied(&self, offsets: &BTreeSet<i64>) {
        self.inner.applied.lock().extend(offsets.iter().copied());
    }
}

/// This host's clock, in ms since the Unix epoch (0 if it is set before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
