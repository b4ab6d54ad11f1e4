//! The local backends of a partition store: a sled database on disk, or a sorted map in
//! memory.
//!
//! Both offer the same few operations: point reads, prefix scans in key order, and an
//! atomic write of a list of puts and deletes. The sled database also has a `meta` tree
//! (identity and checkpoint, see [`open`](super::open)) next to its `data` tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::StateError;

/// Where a partition's state lives locally.
pub(crate) enum Local {
    /// A sled database: `data` holds the state, `meta` the identity and checkpoint.
    /// Field order matters: the sled handles are dropped before `claim` lets another
    /// open of this process use the directory.
    Sled {
        db: sled::Db,
        data: sled::Tree,
        meta: sled::Tree,
        _claim: DirClaim,
    },
    /// A sorted map in memory.
    Memory(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>),
}

/// Directories open in this process. sled's file lock also guards against other
/// processes; this set answers "already open here" without touching the files at all.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = parking_lot::const_mutex(BTreeSet::new());

/// This process's claim on a partition's state directory, released when dropped.
pub(crate) struct DirClaim(PathBuf);

impl DirClaim {
    /// Claims `dir`, or fails with [`StateError::Locked`] if a store of this process has
    /// it open.
    pub(crate) fn take(dir: &Path) -> Result<DirClaim, StateError> {
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

/// Entries of a scan, in key order.
pub(crate) type Entries = Vec<(Vec<u8>, Vec<u8>)>;

impl Local {
    /// An empty in-memory store.
    pub(crate) fn memory() -> Local {
        Local::Memory(Mutex::new(BTreeMap::new()))
    }

    /// The value under `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match self {
            Local::Sled { data, .. } => Ok(data.get(key)?.map(|v| v.to_vec())),
            Local::Memory(map) => Ok(map.lock().get(key).cloned()),
        }
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub(crate) fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, StateError> {
        match self {
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

    /// Applies puts (`Some`) and deletes (`None`), in order, atomically.
    pub(crate) fn write<'a>(
        &self,
        ops: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<(), StateError> {
        match self {
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

    /// Removes every entry of the state (not the identity).
    pub(crate) fn clear(&self) -> Result<(), StateError> {
        match self {
            Local::Sled { data, .. } => Ok(data.clear()?),
            Local::Memory(map) => {
                map.lock().clear();
                Ok(())
            }
        }
    }
}
