//! One partition's local store, and the per-task view that buffers a task's writes.
//!
//! A [`PartitionStore`] holds the state of one source partition of one subscription's
//! store: a sled database at `<state_dir>/<subscription>/<store>/<topic>-<partition>`, or
//! an in-memory map. Next to the data it keeps a small `meta` tree with
//!
//! * the **identity** of the database (subscription, store, topic, partition, changelog
//!   topic), so a directory that was copied, renamed or reused for another partition is
//!   never mistaken for this partition's state, and
//! * a **checkpoint** `{changelog_next_offset, applied_source_offsets}` that only a clean
//!   close writes. Opening the store reads the checkpoint and deletes it at once (and
//!   flushes), so after a crash there is no checkpoint and the store is rebuilt from the
//!   changelog: the local store is written before the changelog acknowledges, so after a
//!   crash it may hold writes the changelog never got.
//!
//! Anything unexpected at open — sled refusing the files, a panic inside sled on a
//! damaged file, a missing or foreign identity, an unreadable checkpoint, data without a
//! checkpoint — is answered the same way: log it, delete the directory, start empty and
//! say why in the [`OpenReport`]. The changelog is the source of truth; the local files
//! are only a cache that makes restores short.
//!
//! A task never writes to the store directly. It gets a [`TaskBatch`], which buffers its
//! writes and reads them back before falling through to the store; when the task
//! completes, [`PartitionStore::apply`] writes the whole batch atomically and returns the
//! [`Mutation`]s for the changelog.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::changelog::{ChangelogWriter, PendingAppend};
use crate::config::{changelog_topic, Backend, StateConfig};
use crate::{StateError, StateStore};

/// Version of the on-disk layout; a database written with another version is rebuilt.
const FORMAT: u32 = 1;
const META_TREE: &str = "meta";
const DATA_TREE: &str = "data";
const IDENTITY_KEY: &[u8] = b"identity";
const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// How long an open waits for the sled file lock of a handle that is shutting down.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Directories open in this process. sled's file lock also guards against other
/// processes; this set answers "already open here" without touching the files at all.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = parking_lot::const_mutex(BTreeSet::new());

/// One write of a task's batch, as applied locally and appended to the changelog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    /// The state key (also the changelog record key).
    pub key: Vec<u8>,
    /// The new value; `None` deletes the key (a tombstone in the changelog).
    pub value: Option<Vec<u8>>,
}

/// What [`PartitionStore::open`] found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenReport {
    /// Nothing usable was there (first open, or the in-memory backend): restore the
    /// changelog from its beginning.
    Fresh,
    /// A clean close left a checkpoint: restore the changelog from `offset`.
    Checkpoint {
        /// First changelog offset the local store does not contain.
        offset: i64,
    },
    /// The local files were unusable and were deleted: restore from the beginning.
    Rebuilt {
        /// Why the files were discarded.
        reason: RebuildReason,
    },
}

impl OpenReport {
    /// Where the restore should start: the checkpoint offset, or `None` for the
    /// beginning of the changelog.
    pub fn restore_from(&self) -> Option<i64> {
        match self {
            OpenReport::Checkpoint { offset } => Some(*offset),
            OpenReport::Fresh | OpenReport::Rebuilt { .. } => None,
        }
    }
}

/// Why a partition's local files were deleted at open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebuildReason {
    /// sled returned an error opening the database.
    #[error("sled could not open the database: {0}")]
    OpenFailed(String),
    /// sled panicked reading the files (it does on some damaged files).
    #[error("sled panicked reading the database: {0}")]
    Panicked(String),
    /// The directory held files, but the database has no identity record.
    #[error("the database has no identity")]
    MissingIdentity,
    /// The identity record could not be decoded.
    #[error("unreadable identity: {0}")]
    UnreadableIdentity(String),
    /// The database belongs to another subscription, store, topic or partition.
    #[error("the database belongs to {0}")]
    ForeignIdentity(String),
    /// The checkpoint record could not be decoded.
    #[error("unreadable checkpoint: {0}")]
    UnreadableCheckpoint(String),
    /// The database holds data but no checkpoint: the last owner did not close cleanly,
    /// so the data may be ahead of the changelog.
    #[error("no checkpoint (the previous owner did not close cleanly)")]
    NoCheckpoint,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    format: u32,
    subscription: String,
    store: String,
    topic: String,
    partition: i32,
    changelog_topic: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}-{}",
            self.subscription, self.store, self.topic, self.partition
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    changelog_next_offset: i64,
    applied_source_offsets: Vec<i64>,
}

/// The state of one source partition for one subscription's store.
///
/// A cheap, clonable handle; every clone refers to the same store. The sled files stay
/// open (and locked) until the last clone is dropped.
#[derive(Clone)]
pub struct PartitionStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionStore")
            .field("id", &self.inner.id.to_string())
            .finish_non_exhaustive()
    }
}

// Field order matters: `local` (the sled handle) is dropped before `_claim` releases the
// directory for another open in this process.
struct Inner {
    id: Identity,
    label: String,
    local: Local,
    /// Serialises applies (and apply + changelog enqueue), so local order == changelog order.
    write_lock: Mutex<()>,
    applied: Mutex<BTreeSet<i64>>,
    closed: AtomicBool,
    _claim: Option<DirClaim>,
}

enum Local {
    Sled {
        db: sled::Db,
        data: sled::Tree,
        meta: sled::Tree,
    },
    Memory(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>),
}

struct DirClaim(PathBuf);

impl DirClaim {
    fn take(dir: &Path) -> Result<DirClaim, StateError> {
        let mut open = OPEN_DIRS.lock();
        if !open.insert(dir.to_path_buf()) {
            return Err(StateError::Locked(dir.to_path_buf()));
        }
        Ok(DirClaim(dir.to_path_buf()))
    }
}

impl Drop for DirClaim {
    fn drop(&mut self) {
        OPEN_DIRS.lock().remove(&self.0);
    }
}

fn check_name(what: &'static str, name: &str) -> Result<(), StateError> {
    let bad = name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']);
    if bad {
        return Err(StateError::InvalidName {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
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
        let id = Identity {
            format: FORMAT,
            subscription: subscription.to_string(),
            store: cfg.store_name.clone(),
            topic: topic.to_string(),
            partition,
            changelog_topic: changelog_topic(subscription, &cfg.store_name),
        };
        let label = id.to_string();
        let (local, report, applied, claim) = match cfg.backend {
            Backend::Memory => (
                Local::Memory(Mutex::new(BTreeMap::new())),
                OpenReport::Fresh,
                Vec::new(),
                None,
            ),
            Backend::Sled => {
                let dir = cfg
                    .state_dir
                    .join(subscription)
                    .join(&cfg.store_name)
                    .join(format!("{topic}-{partition}"));
                let claim = DirClaim::take(&dir)?;
                let (local, report, applied) = open_sled(cfg, &id, &dir)?;
                (local, report, applied, Some(claim))
            }
        };
        let store = PartitionStore {
            inner: Arc::new(Inner {
                id,
                label,
                local,
                write_lock: Mutex::new(()),
                applied: Mutex::new(applied.into_iter().collect()),
                closed: AtomicBool::new(false),
                _claim: claim,
            }),
        };
        Ok((store, report))
    }

    /// A fresh per-task view: reads see the task's own writes first, writes are buffered
    /// until [`apply`](Self::apply).
    pub fn task_batch(&self) -> TaskBatch {
        TaskBatch {
            store: self.clone(),
            writes: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Applies the batch's buffered writes to the local store atomically and returns them
    /// (in key order) for the changelog. The batch is emptied. An empty batch writes
    /// nothing and returns an empty list.
    ///
    /// Applies are serialised per store. If several tasks of one partition may touch the
    /// same state keys, append their mutations to the changelog in the order they were
    /// applied — [`apply_and_enqueue`](Self::apply_and_enqueue) does both under one lock.
    pub fn apply(&self, batch: &TaskBatch) -> Result<Vec<Mutation>, StateError> {
        let _order = self.inner.write_lock.lock();
        self.apply_locked(batch)
    }

    /// [`apply`](Self::apply), then hands the mutations to the changelog producer before
    /// any other apply of this store can run, so the changelog holds the batches in the
    /// order the local store applied them. Await the returned [`PendingAppend`] for the
    /// acknowledgement. Empty batches enqueue nothing.
    pub fn apply_and_enqueue(
        &self,
        batch: &TaskBatch,
        writer: &ChangelogWriter,
        source_offset: i64,
    ) -> Result<PendingAppend, StateError> {
        let _order = self.inner.write_lock.lock();
        let mutations = self.apply_locked(batch)?;
        writer.enqueue(
            &self.inner.id.changelog_topic,
            self.inner.id.partition,
            source_offset,
            &mutations,
        )
    }

    fn apply_locked(&self, batch: &TaskBatch) -> Result<Vec<Mutation>, StateError> {
        if !Arc::ptr_eq(&self.inner, &batch.store.inner) {
            return Err(StateError::ForeignBatch);
        }
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StateError::Closed(self.inner.label.clone()));
        }
        let writes = std::mem::take(&mut *batch.writes.lock());
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(e) = self.write_local(writes.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))) {
            // Give the writes back, under anything the task wrote since.
            let mut current = batch.writes.lock();
            let newer = std::mem::replace(&mut *current, writes);
            current.extend(newer);
            return Err(e);
        }
        Ok(writes
            .into_iter()
            .map(|(key, value)| Mutation { key, value })
            .collect())
    }

    /// Writes a checkpoint and flushes. `changelog_next_offset` is the first changelog
    /// offset not in the local store: one past the last acknowledged append, or the
    /// restore's [`next_offset`](crate::internal::RestoreReport::next_offset) if nothing
    /// was appended since. `applied_source_offsets` are the source offsets whose effects
    /// are in the store but which may be redelivered — those at or above the committed
    /// offset. After this the store
    /// accepts no more writes; drop it. Call it only if every changelog append of this
    /// store succeeded — otherwise drop the store without closing, and the next open
    /// rebuilds it from the changelog. The in-memory backend keeps no checkpoint.
    pub fn close_clean(
        &self,
        changelog_next_offset: i64,
        applied_source_offsets: &[i64],
    ) -> Result<(), StateError> {
        let _order = self.inner.write_lock.lock();
        self.inner.closed.store(true, Ordering::Release);
        match &self.inner.local {
            Local::Memory(_) => Ok(()),
            Local::Sled { db, meta, .. } => {
                let checkpoint = Checkpoint {
                    changelog_next_offset,
                    applied_source_offsets: applied_source_offsets.to_vec(),
                };
                let bytes = serde_json::to_vec(&checkpoint)
                    .map_err(|e| StateError::Internal(format!("encoding checkpoint: {e}")))?;
                meta.insert(CHECKPOINT_KEY, bytes)?;
                db.flush()?;
                tracing::debug!(store = %self.inner.label, changelog_next_offset, "state store closed cleanly");
                Ok(())
            }
        }
    }

    /// Source offsets whose effects are in this store: from the checkpoint the store was
    /// opened with, plus every complete batch a [`restore`](crate::internal::restore)
    /// applied. A redelivered task at one of these offsets must be skipped.
    pub fn applied_source_offsets(&self) -> BTreeSet<i64> {
        self.inner.applied.lock().clone()
    }

    /// Whether the task at `source_offset` already has its effects in this store.
    pub fn is_applied(&self, source_offset: i64) -> bool {
        self.inner.applied.lock().contains(&source_offset)
    }

    /// Forgets applied source offsets below `offset` (for example the committed offset,
    /// below which nothing is redelivered), to bound memory.
    pub fn forget_applied_below(&self, offset: i64) {
        let mut applied = self.inner.applied.lock();
        *applied = applied.split_off(&offset);
    }

    /// Reads `key` straight from the store (without any task's buffered writes).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match &self.inner.local {
            Local::Sled { data, .. } => Ok(data.get(key)?.map(|v| v.to_vec())),
            Local::Memory(map) => Ok(map.lock().get(key).cloned()),
        }
    }

    /// Entries whose key starts with `prefix`, straight from the store, in key order.
    #[allow(clippy::type_complexity)]
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StateError> {
        match &self.inner.local {
            Local::Sled { data, .. } => data
                .scan_prefix(prefix)
                .map(|kv| {
                    kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(StateError::from)
                })
                .collect(),
            Local::Memory(map) => Ok(map
                .lock()
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
        }
    }

    /// Every entry of the store in key order (for tests and tooling; reads everything).
    #[allow(clippy::type_complexity)]
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StateError> {
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

    /// Applies restored changelog writes, in order, in one atomic local batch.
    pub(crate) fn write_restored(
        &self,
        ops: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        let _order = self.inner.write_lock.lock();
        self.write_local(ops.iter().map(|(k, v)| (k.as_slice(), v.as_deref())))
    }

    /// Empties the local data (a checkpoint the changelog cannot serve is being dropped).
    pub(crate) fn clear_local(&self) -> Result<(), StateError> {
        let _order = self.inner.write_lock.lock();
        self.inner.applied.lock().clear();
        match &self.inner.local {
            Local::Sled { data, .. } => Ok(data.clear()?),
            Local::Memory(map) => {
                map.lock().clear();
                Ok(())
            }
        }
    }

    pub(crate) fn add_applied(&self, offsets: &BTreeSet<i64>) {
        self.inner.applied.lock().extend(offsets.iter().copied());
    }

    fn write_local<'a>(
        &self,
        ops: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<(), StateError> {
        match &self.inner.local {
            Local::Sled { data, .. } => {
                let mut batch = sled::Batch::default();
                for (k, v) in ops {
                    match v {
                        Some(v) => batch.insert(k, v),
                        None => batch.remove(k),
                    }
                }
                data.apply_batch(batch)?;
                Ok(())
            }
            Local::Memory(map) => {
                let mut map = map.lock();
                for (k, v) in ops {
                    match v {
                        Some(v) => map.insert(k.to_vec(), v.to_vec()),
                        None => map.remove(k),
                    };
                }
                Ok(())
            }
        }
    }
}

/// A task's buffered view of its partition's state; see [`StateStore`].
///
/// Created by [`PartitionStore::task_batch`]; its writes reach the store only through
/// [`PartitionStore::apply`]. Clones share one buffer (hand one to the task, keep one to
/// apply); dropping every clone discards the writes.
#[derive(Clone)]
pub struct TaskBatch {
    store: PartitionStore,
    writes: Arc<Mutex<Buffer>>,
}

/// A task's buffered writes: key -> new value, or `None` for a delete.
type Buffer = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

impl std::fmt::Debug for TaskBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskBatch")
            .field("store", &self.store.inner.label)
            .field("buffered", &self.writes.lock().len())
            .finish()
    }
}

impl TaskBatch {
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
        self.store.get(key)
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

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StateError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.store.scan_prefix(prefix)?.into_iter().collect();
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

// ---------------------------------------------------------------------------------------
// Opening a sled database.

enum Inspected {
    Ready {
        local: Local,
        report: OpenReport,
        applied: Vec<i64>,
    },
    Rebuild(RebuildReason),
}

fn open_sled(
    cfg: &StateConfig,
    id: &Identity,
    dir: &Path,
) -> Result<(Local, OpenReport, Vec<i64>), StateError> {
    let reason = match catch_unwind(AssertUnwindSafe(|| inspect(cfg, id, dir))) {
        Ok(Ok(Inspected::Ready {
            local,
            report,
            applied,
        })) => return Ok((local, report, applied)),
        Ok(Ok(Inspected::Rebuild(reason))) => reason,
        Ok(Err(e)) => return Err(e),
        Err(panic) => RebuildReason::Panicked(panic_message(&*panic)),
    };
    if reason == RebuildReason::NoCheckpoint {
        tracing::info!(store = %id, dir = %dir.display(), "rebuilding local state: {reason}");
    } else {
        tracing::warn!(store = %id, dir = %dir.display(), "discarding local state: {reason}");
    }
    wipe(dir)?;
    let fresh = catch_unwind(AssertUnwindSafe(|| -> Result<Local, StateError> {
        let db = open_db(cfg, dir)?;
        let meta = db.open_tree(META_TREE)?;
        let data = db.open_tree(DATA_TREE)?;
        write_identity(&db, &meta, id)?;
        Ok(Local::Sled { db, data, meta })
    }));
    match fresh {
        Ok(Ok(local)) => Ok((local, OpenReport::Rebuilt { reason }, Vec::new())),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(StateError::Internal(format!(
            "sled panicked creating an empty database in {}: {}",
            dir.display(),
            panic_message(&*panic)
        ))),
    }
}

fn inspect(cfg: &StateConfig, id: &Identity, dir: &Path) -> Result<Inspected, StateError> {
    // Files there before sled touches the directory: whatever sled makes of them, a
    // database without identity is then not a new one.
    let had_files = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    std::fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))?;
    let db = match open_db(cfg, dir) {
        Ok(db) => db,
        Err(StateError::Storage(e)) => {
            return Ok(Inspected::Rebuild(RebuildReason::OpenFailed(e.to_string())))
        }
        Err(e) => return Err(e),
    };
    let trees = db
        .open_tree(META_TREE)
        .and_then(|meta| Ok((meta, db.open_tree(DATA_TREE)?)));
    let (meta, data) = match trees {
        Ok(t) => t,
        Err(e) => return Ok(Inspected::Rebuild(RebuildReason::OpenFailed(e.to_string()))),
    };
    let stored = match meta.get(IDENTITY_KEY) {
        Ok(v) => v,
        Err(e) => return Ok(Inspected::Rebuild(RebuildReason::OpenFailed(e.to_string()))),
    };
    match stored {
        None if had_files || !meta.is_empty() || !data.is_empty() => {
            return Ok(Inspected::Rebuild(RebuildReason::MissingIdentity))
        }
        None => {
            write_identity(&db, &meta, id)?;
            return Ok(Inspected::Ready {
                local: Local::Sled { db, data, meta },
                report: OpenReport::Fresh,
                applied: Vec::new(),
            });
        }
        Some(bytes) => match serde_json::from_slice::<Identity>(&bytes) {
            Err(e) => {
                return Ok(Inspected::Rebuild(RebuildReason::UnreadableIdentity(
                    e.to_string(),
                )))
            }
            Ok(found) if &found != id => {
                return Ok(Inspected::Rebuild(RebuildReason::ForeignIdentity(format!(
                    "{found} (format {})",
                    found.format
                ))))
            }
            Ok(_) => {}
        },
    }
    let checkpoint = match meta.get(CHECKPOINT_KEY) {
        Ok(v) => v,
        Err(e) => return Ok(Inspected::Rebuild(RebuildReason::OpenFailed(e.to_string()))),
    };
    let Some(bytes) = checkpoint else {
        if data.is_empty() {
            return Ok(Inspected::Ready {
                local: Local::Sled { db, data, meta },
                report: OpenReport::Fresh,
                applied: Vec::new(),
            });
        }
        return Ok(Inspected::Rebuild(RebuildReason::NoCheckpoint));
    };
    let checkpoint = match serde_json::from_slice::<Checkpoint>(&bytes) {
        Ok(c) if c.changelog_next_offset >= 0 => c,
        Ok(c) => {
            return Ok(Inspected::Rebuild(RebuildReason::UnreadableCheckpoint(
                format!("negative changelog offset {}", c.changelog_next_offset),
            )))
        }
        Err(e) => {
            return Ok(Inspected::Rebuild(RebuildReason::UnreadableCheckpoint(
                e.to_string(),
            )))
        }
    };
    // From here until the next clean close the local store may run ahead of the
    // changelog, so the checkpoint must not survive a crash.
    meta.remove(CHECKPOINT_KEY)?;
    db.flush()?;
    Ok(Inspected::Ready {
        local: Local::Sled { db, data, meta },
        report: OpenReport::Checkpoint {
            offset: checkpoint.changelog_next_offset,
        },
        applied: checkpoint.applied_source_offsets,
    })
}

fn write_identity(db: &sled::Db, meta: &sled::Tree, id: &Identity) -> Result<(), StateError> {
    let bytes = serde_json::to_vec(id)
        .map_err(|e| StateError::Internal(format!("encoding identity: {e}")))?;
    meta.insert(IDENTITY_KEY, bytes)?;
    db.flush()?;
    Ok(())
}

/// Opens sled, waiting a little if its file lock is held (a handle of this process that
/// is still shutting down); a lock held longer is [`StateError::Locked`].
fn open_db(cfg: &StateConfig, dir: &Path) -> Result<sled::Db, StateError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cfg.sled_cache_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if Instant::now() >= deadline {
                    return Err(StateError::Locked(dir.to_path_buf()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(StateError::Storage(e)),
        }
    }
}

fn wipe(dir: &Path) -> Result<(), StateError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StateError::io(dir, e)),
    }
    std::fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> StateConfig {
        StateConfig {
            state_dir: dir.to_path_buf(),
            ..StateConfig::default()
        }
    }

    #[test]
    fn task_batch_reads_its_own_writes_and_apply_is_atomic() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (store, report) = PartitionStore::open(&cfg(dir.path()), "sub", "tasks", 3)?;
        assert_eq!(report, OpenReport::Fresh);
        let seed = store.task_batch();
        seed.put(b"a/1", b"one")?;
        seed.put(b"a/2", b"two")?;
        seed.put(b"b/1", b"other")?;
        store.apply(&seed)?;
        assert!(seed.is_empty());

        let task = store.task_batch();
        task.delete(b"a/1")?;
        task.put(b"a/3", b"three")?;
        assert_eq!(task.get(b"a/1")?, None);
        assert_eq!(task.get(b"a/2")?, Some(b"two".to_vec()));
        assert_eq!(
            task.scan_prefix(b"a/")?,
            vec![
                (b"a/2".to_vec(), b"two".to_vec()),
                (b"a/3".to_vec(), b"three".to_vec())
            ]
        );
        // Nothing reached the store yet.
        assert_eq!(store.get(b"a/1")?, Some(b"one".to_vec()));
        let muts = store.apply(&task)?;
        assert_eq!(
            muts,
            vec![
                Mutation {
                    key: b"a/1".to_vec(),
                    value: None
                },
                Mutation {
                    key: b"a/3".to_vec(),
                    value: Some(b"three".to_vec())
                }
            ]
        );
        assert_eq!(store.scan_prefix(b"a/")?.len(), 2);
        assert!(store.apply(&task)?.is_empty());
        Ok(())
    }

    #[test]
    fn checkpoint_is_consumed_by_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = cfg(dir.path());
        {
            let (store, _) = PartitionStore::open(&c, "sub", "tasks", 0)?;
            let b = store.task_batch();
            b.put(b"k", b"v")?;
            store.apply(&b)?;
            store.close_clean(42, &[7, 9])?;
            assert!(matches!(
                store.apply(&store.task_batch()),
                Err(StateError::Closed(_))
            ));
        }
        let (store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        assert_eq!(report, OpenReport::Checkpoint { offset: 42 });
        assert_eq!(store.applied_source_offsets(), BTreeSet::from([7, 9]));
        assert_eq!(store.get(b"k")?, Some(b"v".to_vec()));
        drop(store);
        // No clean close this time: the data can no longer be trusted.
        let (store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        assert_eq!(
            report,
            OpenReport::Rebuilt {
                reason: RebuildReason::NoCheckpoint
            }
        );
        assert!(store.entries()?.is_empty());
        Ok(())
    }

    /// Damage that gets past sled's version check (its `conf` file intact, everything
    /// else overwritten) and makes it fail later, or panic.
    #[test]
    fn damaged_segments_are_rebuilt() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = cfg(dir.path());
        {
            let (store, _) = PartitionStore::open(&c, "sub", "tasks", 0)?;
            let b = store.task_batch();
            for i in 0..200u32 {
                b.put(&i.to_be_bytes(), &[7; 64])?;
            }
            store.apply(&b)?;
            store.close_clean(1, &[])?;
        }
        let db_dir = dir.path().join("sub").join("state").join("tasks-0");
        let mut x: u32 = 0x1234_5678;
        let mut damaged = 0;
        let mut stack = vec![db_dir];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.file_name().is_some_and(|n| n != "conf") {
                    let len = std::fs::metadata(&path)?.len() as usize;
                    let junk: Vec<u8> = (0..len.max(64))
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 17;
                            x ^= x << 5;
                            x as u8
                        })
                        .collect();
                    std::fs::write(&path, junk)?;
                    damaged += 1;
                }
            }
        }
        assert!(damaged > 0);
        let (store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        assert!(matches!(report, OpenReport::Rebuilt { .. }), "{report:?}");
        assert!(store.entries()?.is_empty());
        Ok(())
    }

    #[test]
    fn second_open_of_the_same_partition_is_refused_not_wiped() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = cfg(dir.path());
        let (store, _) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        let b = store.task_batch();
        b.put(b"k", b"v")?;
        store.apply(&b)?;
        assert!(matches!(
            PartitionStore::open(&c, "sub", "tasks", 0),
            Err(StateError::Locked(_))
        ));
        assert_eq!(store.get(b"k")?, Some(b"v".to_vec()));
        Ok(())
    }

    #[test]
    fn foreign_identity_is_rebuilt() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = cfg(dir.path());
        {
            let (store, _) = PartitionStore::open(&c, "sub", "tasks", 1)?;
            store.close_clean(5, &[])?;
        }
        // Somebody moved partition 1's files to partition 2's place.
        let base = dir.path().join("sub").join("state");
        std::fs::rename(base.join("tasks-1"), base.join("tasks-2"))?;
        let (_store, report) = PartitionStore::open(&c, "sub", "tasks", 2)?;
        assert!(
            matches!(
                report,
                OpenReport::Rebuilt {
                    reason: RebuildReason::ForeignIdentity(_)
                }
            ),
            "{report:?}"
        );
        Ok(())
    }

    #[test]
    fn names_that_escape_the_state_dir_are_rejected() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(matches!(
            PartitionStore::open(&cfg(dir.path()), "..", "tasks", 0),
            Err(StateError::InvalidName { .. })
        ));
        assert!(matches!(
            PartitionStore::open(&cfg(dir.path()), "sub", "a/b", 0),
            Err(StateError::InvalidName { .. })
        ));
        Ok(())
    }

    #[test]
    fn memory_backend() -> anyhow::Result<()> {
        let c = StateConfig {
            backend: Backend::Memory,
            ..StateConfig::default()
        };
        let (store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        assert_eq!(report, OpenReport::Fresh);
        let b = store.task_batch();
        b.put(b"x/1", b"1")?;
        b.put(b"y", b"2")?;
        store.apply(&b)?;
        assert_eq!(
            store.scan_prefix(b"x/")?,
            vec![(b"x/1".to_vec(), b"1".to_vec())]
        );
        store.close_clean(1, &[])?;
        let (store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        assert_eq!(report, OpenReport::Fresh);
        assert!(store.entries()?.is_empty());
        Ok(())
    }

    #[test]
    fn foreign_batch_is_refused() -> anyhow::Result<()> {
        let c = StateConfig {
            backend: Backend::Memory,
            ..StateConfig::default()
        };
        let (a, _) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        let (b, _) = PartitionStore::open(&c, "sub", "tasks", 1)?;
        let batch = a.task_batch();
        batch.put(b"k", b"v")?;
        assert!(matches!(b.apply(&batch), Err(StateError::ForeignBatch)));
        Ok(())
    }
}
