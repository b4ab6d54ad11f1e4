//! Unit tests of the partition store: batches, checkpoints, damaged files, names.

use std::path::Path;

use super::*;
use crate::StateStore;

/// What the runtime does once the changelog acknowledged a task's batch.
fn commit(
    store: &PartitionStore,
    batch: &TaskBatch,
    src: i64,
) -> Result<Vec<Mutation>, StateError> {
    let muts = store.take_mutations(batch)?;
    store.apply_acknowledged(&muts, src)?;
    Ok(muts)
}

fn cfg(dir: &Path) -> StateConfig {
    StateConfig {
        state_dir: dir.to_path_buf(),
        ..StateConfig::default()
    }
}

#[test]
fn task_batch_reads_its_own_writes_and_reaches_the_store_only_when_applied() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (store, report) = PartitionStore::open(&cfg(dir.path()), "sub", "tasks", 3)?;
    assert_eq!(report, OpenReport::Fresh);
    let seed = store.task_batch();
    seed.put(b"a/1", b"one")?;
    seed.put(b"a/2", b"two")?;
    seed.put(b"b/1", b"other")?;
    commit(&store, &seed, 0)?;
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
    let muts = store.take_mutations(&task)?;
    assert!(task.is_empty());
    // Taken, not applied: the store still has the old values until the acknowledgement.
    assert_eq!(store.get(b"a/1")?, Some(b"one".to_vec()));
    assert!(!store.is_applied(1));
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
    store.apply_acknowledged(&muts, 1)?;
    assert!(store.is_applied(1));
    assert_eq!(
        store.scan_prefix(b"a/")?,
        vec![
            (b"a/2".to_vec(), b"two".to_vec()),
            (b"a/3".to_vec(), b"three".to_vec())
        ]
    );
    // Applying the same acknowledged mutations again changes nothing (absolute values).
    store.apply_acknowledged(&muts, 1)?;
    assert_eq!(store.scan_prefix(b"a/")?.len(), 2);
    assert!(store.take_mutations(&task)?.is_empty());
    Ok(())
}

#[test]
fn checkpoint_outlives_opens_and_crashes_until_the_store_is_emptied() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = cfg(dir.path());
    {
        let (store, _) = PartitionStore::open(&c, "sub", "tasks", 0)?;
        let b = store.task_batch();
        b.put(b"k", b"v")?;
        commit(&store, &b, 7)?;
        store.close_clean(42, &[7, 9])?;
        assert!(matches!(
            store.take_mutations(&store.task_batch()),
            Err(StateError::Closed(_))
        ));
    }
    let (store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
    assert_eq!(report, OpenReport::Checkpoint { offset: 42 });
    assert_eq!(store.applied_source_offsets_from(0), vec![7, 9]);
    assert_eq!(store.applied_source_offsets_from(8), vec![9]);
    assert_eq!(store.get(b"k")?, Some(b"v".to_vec()));
    // An acknowledged batch applied after the checkpoint, then a crash (no close).
    let b = store.task_batch();
    b.put(b"k", b"newer")?;
    commit(&store, &b, 50)?;
    drop((store, b));
    // The store is past its checkpoint, never ahead of the changelog: a replay from the
    // checkpoint catches it up, so the checkpoint stays usable.
    let (store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
    assert_eq!(report, OpenReport::Checkpoint { offset: 42 });
    assert_eq!(store.get(b"k")?, Some(b"newer".to_vec()));
    // A restore that empties the store removes the checkpoint with the data.
    store.clear_local()?;
    assert!(store.emptied());
    store.apply_acknowledged(
        &[Mutation {
            key: b"x".to_vec(),
            value: Some(b"1".to_vec()),
        }],
        0,
    )?;
    drop(store);
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
        commit(&store, &b, 0)?;
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
    commit(&store, &b, 0)?;
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
    commit(&store, &b, 0)?;
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
    assert!(matches!(
        b.take_mutations(&batch),
        Err(StateError::ForeignBatch)
    ));
    assert_eq!(batch.len(), 1, "a refused batch keeps its writes");
    Ok(())
}

#[test]
fn a_fenced_store_refuses_every_write() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let c = cfg(dir.path());
    let (store, _) = PartitionStore::open(&c, "sub", "tasks", 0)?;
    let b = store.task_batch();
    b.put(b"k", b"v")?;
    let muts = store.take_mutations(&b)?;
    b.put(b"k", b"w")?;
    assert!(!store.is_fenced());
    store.fence();
    assert!(store.is_fenced());
    let closed = |r: Result<(), StateError>| matches!(r, Err(StateError::Closed(_)));
    assert!(matches!(
        store.take_mutations(&b),
        Err(StateError::Closed(_))
    ));
    assert_eq!(b.len(), 1, "a refused batch keeps its writes");
    assert!(closed(store.apply_acknowledged(&muts, 3)));
    assert!(!store.is_applied(3));
    assert!(closed(
        store.write_restored(&[(b"r".to_vec(), Some(b"x".to_vec()))])
    ));
    assert!(closed(store.write_restored(&[])));
    assert!(closed(store.clear_local()));
    assert!(closed(store.close_clean(10, &[])));
    assert!(store.entries()?.is_empty(), "nothing reached the store");
    // Fencing twice is fine.
    store.fence();
    drop((store, b));
    // The refused close wrote no checkpoint.
    let (_store, report) = PartitionStore::open(&c, "sub", "tasks", 0)?;
    assert_eq!(report.restore_from(), None);
    Ok(())
}

#[test]
fn close_clean_fences_the_store() -> anyhow::Result<()> {
    let c = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    let (store, _) = PartitionStore::open(&c, "sub", "tasks", 0)?;
    store.close_clean(1, &[])?;
    assert!(store.is_fenced());
    assert!(matches!(
        store.apply_acknowledged(&[], 1),
        Err(StateError::Closed(_))
    ));
    assert!(matches!(
        store.close_clean(1, &[]),
        Err(StateError::Closed(_))
    ));
    Ok(())
}
