//! Opening a partition's sled database, and the records that make it trustworthy.
//!
//! Next to the data, the database keeps a small `meta` tree with
//!
//! * the **identity** of the database (subscription, store, topic, partition, changelog
//!   topic, layout version), so a directory that was copied, renamed or reused for another
//!   partition is never mistaken for this partition's state, and
//! * a **checkpoint** `{changelog_next_offset, applied_source_offsets}` that only a clean
//!   close writes: the changelog offset up to which the local store holds every
//!   acknowledged batch, and the source offsets whose effects it holds that may still be
//!   redelivered.
//!
//! Opening the store leaves the checkpoint in place. The local store receives only
//! batches the changelog acknowledged, so whatever happened since the checkpoint was
//! written (more batches applied, a crash, a restore that failed part-way), the store is
//! at or past the checkpoint and never ahead of the changelog: replaying the changelog
//! from the checkpoint brings it up to date. A restore that empties the store (its
//! checkpoint did not fit the changelog) removes the checkpoint.
//!
//! Anything unexpected at open — sled refusing the files, a panic inside sled on a
//! damaged file, a missing or foreign identity, an unreadable checkpoint, data without a
//! checkpoint — is answered the same way: log it, delete the directory, start empty and
//! say why in the [`OpenReport`]. The changelog is the source of truth; the local files
//! are only a cache that makes restores short.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::local::{DirClaim, Local};
use crate::config::StateConfig;
use crate::StateError;

/// Version of the on-disk layout; a database written with another version is rebuilt.
const FORMAT: u32 = 1;
const META_TREE: &str = "meta";
const DATA_TREE: &str = "data";
const IDENTITY_KEY: &[u8] = b"identity";
const CHECKPOINT_KEY: &[u8] = b"checkpoint";
/// How long an open waits for the sled file lock of a handle that is shutting down.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// What [`PartitionStore::open`](super::PartitionStore::open) found on disk.
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
#[non_exhaustive]
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
    /// The database holds data but no checkpoint (it was never closed cleanly since it
    /// was created or emptied), so nothing says where in the changelog it stands.
    #[error("no checkpoint (the store was never closed cleanly)")]
    NoCheckpoint,
}

/// Who a partition's state belongs to; stored in the database and compared at open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    format: u32,
    pub(crate) subscription: String,
    pub(crate) store: String,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) changelog_topic: String,
}

impl Identity {
    /// The identity of `topic`-`partition` of `subscription`'s `store`.
    pub(crate) fn new(subscription: &str, store: &str, topic: &str, partition: i32) -> Identity {
        Identity {
            format: FORMAT,
            subscription: subscription.to_string(),
            store: store.to_string(),
            topic: topic.to_string(),
            partition,
            changelog_topic: crate::config::changelog_topic(subscription, store),
        }
    }
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

/// What a clean close leaves behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    /// First changelog offset whose batch may be missing from the local store.
    pub(crate) changelog_next_offset: i64,
    /// Source offsets whose effects are in the store and which may be redelivered.
    pub(crate) applied_source_offsets: Vec<i64>,
    /// When the checkpoint was written, in ms since the Unix epoch (this host's clock).
    /// A restore trusts a checkpoint only while the changelog still holds every delete
    /// written after it (see `restore`); one without a time (written by an older
    /// version) is not trusted.
    #[serde(default)]
    pub(crate) written_at_ms: Option<u64>,
}

/// What [`open_sled`] found and opened.
pub(crate) struct Opened {
    pub(crate) local: Local,
    pub(crate) report: OpenReport,
    /// The checkpoint's applied source offsets.
    pub(crate) applied: Vec<i64>,
    /// The checkpoint's [`Checkpoint::written_at_ms`].
    pub(crate) checkpoint_written_at_ms: Option<u64>,
}

/// Refuses names that are empty or would escape the state directory.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), StateError> {
    let bad = name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']);
    if bad {
        return Err(StateError::InvalidName {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// An open sled database, before it becomes a [`Local`].
struct Sled {
    db: sled::Db,
    data: sled::Tree,
    meta: sled::Tree,
}

impl Sled {
    fn into_local(self, claim: DirClaim) -> Local {
        let Sled { db, data, meta } = self;
        Local::Sled {
            db,
            data,
            meta,
            _claim: claim,
        }
    }
}

enum Inspected {
    Ready {
        sled: Sled,
        report: OpenReport,
        applied: Vec<i64>,
        written_at_ms: Option<u64>,
    },
    Rebuild(RebuildReason),
}

/// Opens (or creates) the sled database in `dir` for `id`, deleting files it cannot
/// trust. Returns the store, what was found, and the checkpoint's applied offsets and
/// time.
pub(crate) fn open_sled(
    cfg: &StateConfig,
    id: &Identity,
    dir: &Path,
    claim: DirClaim,
) -> Result<Opened, StateError> {
    let reason = match catch_unwind(AssertUnwindSafe(|| inspect(cfg, id, dir))) {
        Ok(Ok(Inspected::Ready {
            sled,
            report,
            applied,
            written_at_ms,
        })) => {
            return Ok(Opened {
                local: sled.into_local(claim),
                report,
                applied,
                checkpoint_written_at_ms: written_at_ms,
            })
        }
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
    let fresh = catch_unwind(AssertUnwindSafe(|| -> Result<Sled, StateError> {
        let db = open_db(cfg, dir)?;
        let meta = db.open_tree(META_TREE)?;
        let data = db.open_tree(DATA_TREE)?;
        write_identity(&db, &meta, id)?;
        Ok(Sled { db, data, meta })
    }));
    match fresh {
        Ok(Ok(sled)) => Ok(Opened {
            local: sled.into_local(claim),
            report: OpenReport::Rebuilt { reason },
            applied: Vec::new(),
            checkpoint_written_at_ms: None,
        }),
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
                sled: Sled { db, data, meta },
                report: OpenReport::Fresh,
                applied: Vec::new(),
                written_at_ms: None,
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
                sled: Sled { db, data, meta },
                report: OpenReport::Fresh,
                applied: Vec::new(),
                written_at_ms: None,
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
    // The checkpoint stays: the local store only ever receives acknowledged batches, so
    // after a crash it is at or past the checkpoint, and replaying the changelog from the
    // checkpoint (absolute values) catches it up. A restore that fails can be retried.
    Ok(Inspected::Ready {
        sled: Sled { db, data, meta },
        report: OpenReport::Checkpoint {
            offset: checkpoint.changelog_next_offset,
        },
        applied: checkpoint.applied_source_offsets,
        written_at_ms: checkpoint.written_at_ms,
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

/// Writes `checkpoint` into the `meta` tree and flushes. The in-memory backend keeps no
/// checkpoint.
pub(crate) fn write_checkpoint(local: &Local, checkpoint: &Checkpoint) -> Result<(), StateError> {
    let Local::Sled { db, meta, .. } = local else {
        return Ok(());
    };
    let bytes = serde_json::to_vec(checkpoint)
        .map_err(|e| StateError::Internal(format!("encoding checkpoint: {e}")))?;
    meta.insert(CHECKPOINT_KEY, bytes)?;
    db.flush()?;
    Ok(())
}

/// Removes the checkpoint, if any, and flushes.
pub(crate) fn remove_checkpoint(local: &Local) -> Result<(), StateError> {
    let Local::Sled { db, meta, .. } = local else {
        return Ok(());
    };
    meta.remove(CHECKPOINT_KEY)?;
    db.flush()?;
    Ok(())
}
