//! A local checkpoint older than what the changelog can replay exactly is not trusted.
//!
//! Compaction removes a record once its key was written again, and removes a delete
//! (tombstone) `delete.retention.ms` after cleaning it. Host A checkpoints its store
//! holding `k`; host B takes the partition over and deletes `k`; compaction later removes
//! both A's write and B's tombstone. When the partition returns to A, replaying the
//! changelog from A's checkpoint finds no trace of the delete, and `k` comes back. The
//! mock cluster cannot compact, so the test writes the changelog as compaction leaves it.

use std::collections::BTreeMap;
use std::time::Duration;

use decaton_state::internal::{
    restore, ChangelogWriter, Mutation, OpenReport, PartitionStore, RestoreOptions,
};
use decaton_state::{changelog_topic, StateConfig};
use rdkafka::mocking::MockCluster;

const SUBSCRIPTION: &str = "stale";

fn put(key: &str, value: &[u8]) -> Mutation {
    Mutation {
        key: key.as_bytes().to_vec(),
        value: Some(value.to_vec()),
    }
}

/// Host A's store after a clean close: `filler` (offset 0 of the changelog) and `k` (its
/// record later removed by compaction), checkpointed at offset 1. Then B's surviving
/// write `j` at offset 1; B's delete of `k` was compacted away.
async fn stale_history(
    cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    cfg: &StateConfig,
) -> anyhow::Result<()> {
    let bootstrap = cluster.bootstrap_servers();
    let topic = changelog_topic(SUBSCRIPTION, "state");
    cluster.create_topic(&topic, 1, 1)?;
    let writer = ChangelogWriter::new(&bootstrap, &BTreeMap::new())?;
    let (a, report) = PartitionStore::open(cfg, SUBSCRIPTION, "tasks", 0)?;
    assert_eq!(report, OpenReport::Fresh);
    let filler = [put("filler", b"f")];
    assert_eq!(
        writer.enqueue(&topic, 0, 0, &filler)?.wait().await?,
        Some(0)
    );
    a.apply_acknowledged(&filler, 0)?;
    a.apply_acknowledged(&[put("k", b"v")], 1)?;
    a.close_clean(1, &[])?;
    drop(a);
    // B's write that survived compaction.
    writer
        .enqueue(&topic, 0, 2, &[put("j", b"x")])?
        .wait()
        .await?;
    Ok(())
}

/// A checkpoint older than the max age is discarded: the store is emptied and restored
/// from the start of the changelog, and the deleted key stays deleted. (Before, any
/// checkpoint at or above the changelog's start offset was used, and `k` came back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_checkpoint_does_not_bring_deleted_keys_back() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    let dir = tempfile::tempdir()?;
    let cfg = StateConfig::new(dir.path()).checkpoint_max_age(Duration::from_secs(3600));
    stale_history(&cluster, &cfg).await?;

    let (a, report) = PartitionStore::open(&cfg, SUBSCRIPTION, "tasks", 0)?;
    assert_eq!(report, OpenReport::Checkpoint { offset: 1 });
    // The partition comes back to A after longer than the changelog keeps deletes.
    let options =
        RestoreOptions::new(report.restore_from(), 0).with_checkpoint_max_age(Duration::ZERO);
    let r = restore(&a, &cluster.bootstrap_servers(), &BTreeMap::new(), &options).await?;
    assert!(r.checkpoint_discarded, "{r:?}");
    assert_eq!(r.start_offset, 0);
    assert_eq!(a.get(b"k")?, None, "a deleted key came back");
    assert_eq!(a.get(b"filler")?, Some(b"f".to_vec()));
    assert_eq!(a.get(b"j")?, Some(b"x".to_vec()));
    Ok(())
}

/// A young checkpoint is used: only the changelog's tail is read. (It is what makes a
/// stale one dangerous: the local store is trusted for everything before it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_young_checkpoint_is_restored_from() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    let dir = tempfile::tempdir()?;
    let cfg = StateConfig::new(dir.path());
    stale_history(&cluster, &cfg).await?;

    let (a, report) = PartitionStore::open(&cfg, SUBSCRIPTION, "tasks", 0)?;
    let options = RestoreOptions::new(report.restore_from(), 0)
        .with_checkpoint_max_age(Duration::from_millis(cfg.checkpoint_max_age_ms));
    let r = restore(&a, &cluster.bootstrap_servers(), &BTreeMap::new(), &options).await?;
    assert!(!r.checkpoint_discarded, "{r:?}");
    assert_eq!((r.start_offset, r.records_read), (1, 1));
    // Within the max age, compaction cannot have removed a delete written after the
    // checkpoint, so what the local store holds is valid.
    assert_eq!(a.get(b"k")?, Some(b"v".to_vec()));
    Ok(())
}
