//! State follows its partition: apply + changelog + restore against real brokers (the
//! embedded mock cluster, and Tansu for one scenario).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use decaton_state::internal::{
    create_changelog_topic, headers, restore, ChangelogWriter, OpenReport, PartitionStore,
    RebuildReason, RestoreOptions,
};
use decaton_state::{changelog_topic, Backend, StateConfig, StateStore};
use decaton_testkit::{BrokerKind, TestBroker};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;
type Task = (i64, Vec<(Vec<u8>, Option<Vec<u8>>)>);

const PARTITION: i32 = 1;

fn kafka() -> BTreeMap<String, String> {
    BTreeMap::from([("message.timeout.ms".to_string(), "30000".to_string())])
}

/// One embedded broker for every test of this file (the proptest runs many cases on it).
fn embedded() -> &'static TestBroker {
    static BROKER: OnceLock<TestBroker> = OnceLock::new();
    BROKER.get_or_init(|| match TestBroker::start(BrokerKind::Embedded) {
        Ok(b) => b,
        Err(e) => panic!("embedded broker: {e}"),
    })
}

/// A subscription name no other test (or proptest case) uses.
fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

fn sled_cfg(dir: &Path) -> StateConfig {
    StateConfig {
        state_dir: dir.to_path_buf(),
        ..StateConfig::default()
    }
}

/// Runs each task through a `TaskBatch`, appends its mutations to the changelog and
/// applies them once acknowledged, the way the processor runtime does; updates `model`.
/// Returns the last changelog offset.
async fn run_tasks(
    store: &PartitionStore,
    writer: &ChangelogWriter,
    tasks: &[Task],
    model: &mut Model,
) -> anyhow::Result<Option<i64>> {
    let mut last = None;
    for (src, writes) in tasks {
        let batch = store.task_batch();
        for (k, v) in writes {
            match v {
                Some(v) => batch.put(k, v)?,
                None => batch.delete(k)?,
            }
        }
        let muts = store.take_mutations(&batch)?;
        let pending = writer.enqueue(store.changelog_topic(), store.partition(), *src, &muts)?;
        if let Some(offset) = pending.wait().await? {
            last = Some(offset);
        }
        store.apply_acknowledged(&muts, *src)?;
        for (k, v) in writes {
            match v {
                Some(v) => model.insert(k.clone(), v.clone()),
                None => model.remove(k),
            };
        }
    }
    Ok(last)
}

fn entries(store: &PartitionStore) -> anyhow::Result<Model> {
    Ok(store.entries()?.into_iter().collect())
}

/// Tasks touching a small key space, so later tasks overwrite and delete earlier keys.
fn sample_tasks(first_src: i64, n: i64) -> Vec<Task> {
    (first_src..first_src + n)
        .map(|src| {
            let mut writes = vec![
                (
                    format!("user/{}", src % 7).into_bytes(),
                    Some(format!("v{src}").into_bytes()),
                ),
                (b"counter".to_vec(), Some(src.to_string().into_bytes())),
            ];
            if src % 3 == 0 {
                writes.push((format!("user/{}", (src + 2) % 7).into_bytes(), None));
            }
            (src, writes)
        })
        .collect()
}

async fn apply_restore_roundtrip(broker: &TestBroker) -> anyhow::Result<()> {
    let sub = unique("roundtrip");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 3)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;

    let dir_a = tempfile::tempdir()?;
    let (a, report) = PartitionStore::open(&sled_cfg(dir_a.path()), &sub, "tasks", PARTITION)?;
    assert_eq!(report, OpenReport::Fresh);
    let r = restore(
        &a,
        &bootstrap,
        &kafka(),
        &RestoreOptions::new(report.restore_from(), 0),
    )
    .await?;
    assert_eq!(r.records_read, 0);
    let mut model = Model::new();
    run_tasks(&a, &writer, &sample_tasks(0, 40), &mut model).await?;
    // An empty task appends nothing.
    assert_eq!(
        writer.enqueue(&topic, PARTITION, 40, &[])?.wait().await?,
        None
    );
    assert_eq!(entries(&a)?, model);

    // Another host, nothing on disk.
    let dir_b = tempfile::tempdir()?;
    let (b, report) = PartitionStore::open(&sled_cfg(dir_b.path()), &sub, "tasks", PARTITION)?;
    assert_eq!(report, OpenReport::Fresh);
    let r = restore(&b, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    assert_eq!(entries(&b)?, model);
    assert_eq!(r.batches_applied, 40);
    assert_eq!(r.partial_batches_ignored, 0);
    assert_eq!(r.applied_source_offsets, (0..40).collect::<BTreeSet<_>>());
    assert_eq!(
        b.applied_source_offsets_from(0),
        r.applied_source_offsets.iter().copied().collect::<Vec<_>>()
    );
    assert_eq!(r.abort_markers_written + r.compensation_records_written, 0);

    // The in-memory backend restores the same state.
    let mem = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    let (m, _) = PartitionStore::open(&mem, &sub, "tasks", PARTITION)?;
    restore(&m, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    assert_eq!(entries(&m)?, model);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_changelog_restore_reproduces_the_store_embedded() -> anyhow::Result<()> {
    apply_restore_roundtrip(embedded()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_changelog_restore_reproduces_the_store_tansu() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::TansuMemory)?;
    apply_restore_roundtrip(&broker).await?;

    // The admin helper: source partitions -> changelog partitions, compaction, and an
    // existing topic is fine.
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("orders", 4)?;
    let info =
        create_changelog_topic(&bootstrap, &kafka(), "billing", "state", "orders", Some(1)).await?;
    assert_eq!(info.topic, "billing-state-changelog");
    assert_eq!(info.partitions, 4);
    assert!(info.created);
    let again =
        create_changelog_topic(&bootstrap, &kafka(), "billing", "state", "orders", Some(1)).await?;
    assert!(!again.created);
    assert_eq!(again.partitions, 4);
    Ok(())
}

/// Writes records of a batch by hand, the way a writer that crashed part-way would have.
async fn produce_partial_batch(
    bootstrap: &str,
    topic: &str,
    src: i64,
    writes: &[(&[u8], Option<&[u8]>)],
    announced_size: u32,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let batch: u64 = 0x5eed_0000_0000_0001;
    for (index, (k, v)) in (0u32..).zip(writes) {
        let hs = OwnedHeaders::new()
            .insert(Header {
                key: headers::SRC_OFFSET,
                value: Some(&src.to_be_bytes()),
            })
            .insert(Header {
                key: headers::BATCH,
                value: Some(&batch.to_be_bytes()),
            })
            .insert(Header {
                key: headers::BATCH_INDEX,
                value: Some(&index.to_be_bytes()),
            })
            .insert(Header {
                key: headers::BATCH_SIZE,
                value: Some(&announced_size.to_be_bytes()),
            });
        let mut record = FutureRecord::to(topic)
            .partition(PARTITION)
            .key(*k)
            .headers(hs);
        if let Some(v) = v {
            record = record.payload(*v);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batch_is_ignored_by_restore() -> anyhow::Result<()> {
    let broker = embedded();
    let sub = unique("partial");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let (a, _) = PartitionStore::open(
        &StateConfig {
            backend: Backend::Memory,
            ..Default::default()
        },
        &sub,
        "t",
        PARTITION,
    )?;
    let mut model = Model::new();
    run_tasks(&a, &writer, &sample_tasks(0, 5), &mut model).await?;

    // Task 5's writer died after two of its three records.
    produce_partial_batch(
        &bootstrap,
        &topic,
        5,
        &[(b"counter", Some(b"torn")), (b"user/x", None)],
        3,
    )
    .await?;

    let mem = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    let (b, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    let r = restore(&b, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    assert_eq!(entries(&b)?, model, "the torn batch must not be applied");
    assert_eq!(r.partial_batches_ignored, 1);
    assert_eq!(r.batches_applied, 5);
    assert!(!r.applied_source_offsets.contains(&5));
    assert_eq!(r.abort_markers_written, 1);
    // "counter" and "user/x" had a torn record as their newest: written again.
    assert_eq!(r.compensation_records_written, 2);

    // The new owner redoes task 5 and goes on; the torn batch stays ignored.
    let mut model_b = model.clone();
    run_tasks(&b, &writer, &sample_tasks(5, 3), &mut model_b).await?;
    let (c, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    let r = restore(&c, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    assert_eq!(entries(&c)?, model_b);
    assert_eq!(r.partial_batches_ignored, 1);
    assert_eq!(r.abort_markers_written + r.compensation_records_written, 0);
    assert_eq!(r.applied_source_offsets, (0..8).collect::<BTreeSet<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_records_only_offsets_at_or_above_the_floor() -> anyhow::Result<()> {
    let broker = embedded();
    let sub = unique("floor");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let mem = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    let (a, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    let mut model = Model::new();
    run_tasks(&a, &writer, &sample_tasks(0, 50), &mut model).await?;

    let (b, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    let r = restore(&b, &bootstrap, &kafka(), &RestoreOptions::new(None, 42)).await?;
    // Every batch is in the state, only the redeliverable ones are recorded.
    assert_eq!(entries(&b)?, model);
    assert_eq!(r.batches_applied, 50);
    assert_eq!(r.applied_source_offsets, (42..50).collect::<BTreeSet<_>>());
    assert_eq!(
        b.applied_source_offsets_from(0),
        (42..50).collect::<Vec<_>>()
    );
    assert!(b.is_applied(42) && !b.is_applied(41));
    b.forget_applied_below(45);
    assert_eq!(b.applied_source_offsets_from(0), vec![45, 46, 47, 48, 49]);
    Ok(())
}

/// Nothing listens there: a broker that is down.
const NO_BROKER: &str = "127.0.0.1:1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_is_retried_on_the_same_store_from_its_checkpoint() -> anyhow::Result<()> {
    let broker = embedded();
    let sub = unique("retry");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let dir = tempfile::tempdir()?;
    let mut model = Model::new();
    {
        let (a, _) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "tasks", PARTITION)?;
        let last = run_tasks(&a, &writer, &sample_tasks(0, 30), &mut model)
            .await?
            .context("offset")?;
        a.close_clean(last + 1, &[])?;
    }
    // Another owner went on meanwhile.
    let mem = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    let (b, _) = PartitionStore::open(&mem, &sub, "tasks", PARTITION)?;
    restore(&b, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    run_tasks(&b, &writer, &sample_tasks(30, 3), &mut model).await?;

    let (a, report) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "tasks", PARTITION)?;
    let OpenReport::Checkpoint { offset } = report else {
        anyhow::bail!("expected a checkpoint, got {report:?}")
    };
    let options = RestoreOptions::new(Some(offset), 0).with_stall_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let failed = restore(&a, NO_BROKER, &kafka(), &options).await;
    assert!(
        matches!(failed, Err(decaton_state::StateError::Timeout(_))),
        "{failed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a restore without a broker gave up after {:?}",
        started.elapsed()
    );
    // The same store, the same options: only the tail is read.
    let r = restore(&a, &bootstrap, &kafka(), &options).await?;
    assert_eq!(r.start_offset, offset);
    assert!(r.records_read <= 10, "read {} records", r.records_read);
    assert_eq!(entries(&a)?, model);
    assert_eq!(a.applied_source_offsets_from(0), vec![30, 31, 32]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_stops_a_restore_in_progress() -> anyhow::Result<()> {
    let mem = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    let (store, _) = PartitionStore::open(&mem, &unique("fence-stop"), "t", PARTITION)?;
    // Without a broker the restore would wait for its full stall timeout.
    let options = RestoreOptions::new(None, 0).with_stall_timeout(Duration::from_secs(120));
    let running = {
        let store = store.clone();
        tokio::spawn(async move { restore(&store, NO_BROKER, &kafka(), &options).await })
    };
    // Let it start; it stops with `Closed` whether the fence comes before or during it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fenced_at = Instant::now();
    store.fence();
    let r = tokio::time::timeout(Duration::from_secs(10), running).await??;
    assert!(
        matches!(r, Err(decaton_state::StateError::Closed(_))),
        "{r:?}"
    );
    assert!(fenced_at.elapsed() < Duration::from_secs(5));
    Ok(())
}

fn high_watermark(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    Ok(
        c.fetch_watermarks(topic, PARTITION, Duration::from_secs(10))?
            .1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_store_is_not_restored_and_nothing_is_appended() -> anyhow::Result<()> {
    let broker = embedded();
    let sub = unique("fenced");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let mem = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    let (a, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    let mut model = Model::new();
    run_tasks(&a, &writer, &sample_tasks(0, 5), &mut model).await?;
    // A torn batch: a restore of an unfenced store would append an abort marker.
    produce_partial_batch(&bootstrap, &topic, 5, &[(b"counter", Some(b"torn"))], 2).await?;
    let high = high_watermark(&bootstrap, &topic)?;

    let (b, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    b.fence();
    let r = restore(&b, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await;
    assert!(
        matches!(r, Err(decaton_state::StateError::Closed(_))),
        "{r:?}"
    );
    assert!(entries(&b)?.is_empty());
    assert_eq!(
        high_watermark(&bootstrap, &topic)?,
        high,
        "nothing appended"
    );

    // The torn batch is still unmarked: the next (unfenced) owner marks it.
    let (c, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    let r = restore(&c, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    assert_eq!(r.abort_markers_written, 1);
    assert_eq!(entries(&c)?, model);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_checkpoint_restores_only_the_tail_embedded() -> anyhow::Result<()> {
    checkpoint_tail(embedded()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_checkpoint_restores_only_the_tail_tansu() -> anyhow::Result<()> {
    checkpoint_tail(&TestBroker::start(BrokerKind::TansuMemory)?).await
}

async fn checkpoint_tail(broker: &TestBroker) -> anyhow::Result<()> {
    let sub = unique("checkpoint");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let dir_a = tempfile::tempdir()?;
    let mut model = Model::new();
    {
        let (a, _) = PartitionStore::open(&sled_cfg(dir_a.path()), &sub, "tasks", PARTITION)?;
        let last = run_tasks(&a, &writer, &sample_tasks(0, 300), &mut model)
            .await?
            .context("offset")?;
        a.close_clean(last + 1, &[298, 299])?;
    }
    // Meanwhile another host owned the partition for a few tasks.
    {
        let dir_b = tempfile::tempdir()?;
        let (b, _) = PartitionStore::open(&sled_cfg(dir_b.path()), &sub, "tasks", PARTITION)?;
        let r = restore(&b, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
        assert!(r.records_read >= 600);
        run_tasks(&b, &writer, &sample_tasks(300, 4), &mut model).await?;
    }
    let (a, report) = PartitionStore::open(&sled_cfg(dir_a.path()), &sub, "tasks", PARTITION)?;
    let OpenReport::Checkpoint { offset } = report else {
        anyhow::bail!("expected a checkpoint, got {report:?}")
    };
    let r = restore(
        &a,
        &bootstrap,
        &kafka(),
        &RestoreOptions::new(Some(offset), 0),
    )
    .await?;
    assert!(
        r.records_read <= 10,
        "read {} records, expected only the tail",
        r.records_read
    );
    assert_eq!(r.start_offset, offset);
    assert_eq!(entries(&a)?, model);
    assert_eq!(
        a.applied_source_offsets_from(0),
        vec![298, 299, 300, 301, 302, 303]
    );
    Ok(())
}

fn scribble_over(dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            n += scribble_over(&path)?;
        } else {
            let len = std::fs::metadata(&path)?.len().max(64) as usize;
            let junk: Vec<u8> = (0..len).map(|_| rand_byte()).collect();
            std::fs::write(&path, junk)?;
            n += 1;
        }
    }
    Ok(n)
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    static SEED: AtomicUsize = AtomicUsize::new(1);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(SEED.fetch_add(1, Ordering::Relaxed));
    h.finish() as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_state_dir_is_rebuilt_from_the_changelog() -> anyhow::Result<()> {
    let broker = embedded();
    let sub = unique("garbage");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let dir = tempfile::tempdir()?;
    let mut model = Model::new();
    {
        let (a, _) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "tasks", PARTITION)?;
        let last = run_tasks(&a, &writer, &sample_tasks(0, 50), &mut model)
            .await?
            .context("offset")?;
        a.close_clean(last + 1, &[])?;
    }
    let files = scribble_over(dir.path())?;
    assert!(files > 0);
    let (a, report) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "tasks", PARTITION)?;
    assert!(matches!(report, OpenReport::Rebuilt { .. }), "{report:?}");
    assert_eq!(report.restore_from(), None);
    assert!(entries(&a)?.is_empty());
    let r = restore(
        &a,
        &bootstrap,
        &kafka(),
        &RestoreOptions::new(report.restore_from(), 0),
    )
    .await?;
    assert_eq!(entries(&a)?, model);
    assert_eq!(r.batches_applied, 50);

    // And a crash (no clean close) is rebuilt too, not trusted.
    drop(a);
    let (_a, report) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "tasks", PARTITION)?;
    assert_eq!(
        report,
        OpenReport::Rebuilt {
            reason: RebuildReason::NoCheckpoint
        }
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_beyond_the_changelog_restores_from_the_beginning() -> anyhow::Result<()> {
    let broker = embedded();
    let sub = unique("recreated");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let dir = tempfile::tempdir()?;
    let mut model = Model::new();
    {
        let (a, _) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "tasks", PARTITION)?;
        run_tasks(&a, &writer, &sample_tasks(0, 5), &mut model).await?;
        a.apply_acknowledged(
            &[decaton_state::internal::Mutation {
                key: b"local-only".to_vec(),
                value: Some(b"x".to_vec()),
            }],
            5,
        )?;
        // A checkpoint from some other changelog (the topic was recreated, say).
        a.close_clean(1_000_000, &[])?;
    }
    let (a, report) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "tasks", PARTITION)?;
    let r = restore(
        &a,
        &bootstrap,
        &kafka(),
        &RestoreOptions::new(report.restore_from(), 0),
    )
    .await?;
    assert!(r.checkpoint_discarded);
    assert_eq!(entries(&a)?, model);
    Ok(())
}

mod model {
    use super::*;
    use proptest::prelude::*;

    fn tasks() -> impl Strategy<Value = Vec<Vec<(u8, Option<u8>)>>> {
        proptest::collection::vec(
            proptest::collection::vec((0u8..12, proptest::option::of(any::<u8>())), 0..6),
            1..25,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn apply_changelog_restore_equals_a_btreemap(tasks in tasks()) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let result: anyhow::Result<()> = rt.block_on(async {
                let broker = embedded();
                let sub = unique("prop");
                let topic = changelog_topic(&sub, "state");
                broker.create_topic(&topic, 2)?;
                let bootstrap = broker.bootstrap_servers();
                let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
                let mem = StateConfig { backend: Backend::Memory, ..StateConfig::default() };
                let (a, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
                let tasks: Vec<Task> = (0i64..).zip(tasks).map(|(src, writes)| {
                    (src, writes.into_iter().map(|(k, v)| (vec![k], v.map(|v| vec![v]))).collect())
                }).collect();
                let mut model = Model::new();
                run_tasks(&a, &writer, &tasks, &mut model).await?;
                let dir = tempfile::tempdir()?;
                let (b, _) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "t", PARTITION)?;
                let r = restore(&b, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
                anyhow::ensure!(entries(&b)? == model, "restored state differs from the model");
                anyhow::ensure!(entries(&a)? == model, "local state differs from the model");
                let non_empty: BTreeSet<i64> = tasks.iter().filter(|(_, w)| !w.is_empty()).map(|(s, _)| *s).collect();
                anyhow::ensure!(r.applied_source_offsets == non_empty, "applied offsets {:?}", r.applied_source_offsets);
                Ok(())
            });
            if let Err(e) = result {
                return Err(TestCaseError::fail(format!("{e:#}")));
            }
        }
    }
}

/// Peak resident set size of this process (`VmHWM`), KiB; 0 where /proc is missing.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets `VmHWM` to the current RSS (Linux: writing 5 to /proc/self/clear_refs), so the
/// next [`peak_rss_kib`] is the peak of one phase. Best effort.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Bytes of the files under `dir`, recursively (what `du -sb` reports, apparent size).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `DECATON_RESTORE_BROKER=tansu DECATON_RESTORE_RECORDS=1000000 cargo test -p decaton-state
/// --release --test changelog restore_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn restore_throughput() -> anyhow::Result<()> {
    let records: usize = std::env::var("DECATON_RESTORE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let kind = match std::env::var("DECATON_RESTORE_BROKER").as_deref() {
        Ok("tansu") => BrokerKind::TansuMemory,
        _ => BrokerKind::Embedded,
    };
    let broker = TestBroker::start(kind)?;
    let sub = unique("throughput");
    let topic = changelog_topic(&sub, "state");
    broker.create_topic(&topic, 2)?;
    let bootstrap = broker.bootstrap_servers();
    let writer = ChangelogWriter::new(&bootstrap, &kafka())?;
    let per_batch = 10;
    let started = Instant::now();
    let mut pending = Vec::new();
    for b in 0..records / per_batch {
        let muts: Vec<_> = (0..per_batch)
            .map(|i| decaton_state::internal::Mutation {
                key: format!("key-{:08}", (b * per_batch + i) % 100_000).into_bytes(),
                value: Some(vec![b'x'; 100]),
            })
            .collect();
        pending.push(writer.enqueue(&topic, PARTITION, b as i64, &muts)?);
        if pending.len() >= 1000 {
            for p in pending.drain(..) {
                p.wait().await?;
            }
        }
    }
    for p in pending.drain(..) {
        p.wait().await?;
    }
    let produce = started.elapsed();
    println!(
        "{}: peak RSS while producing: {} KiB",
        kind.name(),
        peak_rss_kib()
    );
    let dir = tempfile::tempdir()?;
    reset_peak_rss();
    let (s, _) = PartitionStore::open(&sled_cfg(dir.path()), &sub, "t", PARTITION)?;
    let r = restore(&s, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    println!(
        "{}: produced {records} records in {produce:?}; restored {} records ({} batches) in {:?} = {:.0} records/s into sled",
        kind.name(),
        r.records_read,
        r.batches_applied,
        r.elapsed,
        r.records_read as f64 / r.elapsed.as_secs_f64()
    );
    let peak_sled = peak_rss_kib();
    drop(s);
    println!(
        "{}: sled store: {} bytes on disk after the restore (store closed); peak RSS during the sled restore: {peak_sled} KiB",
        kind.name(),
        dir_bytes(dir.path())
    );
    let mem = StateConfig {
        backend: Backend::Memory,
        ..StateConfig::default()
    };
    reset_peak_rss();
    let (m, _) = PartitionStore::open(&mem, &sub, "t", PARTITION)?;
    let r = restore(&m, &bootstrap, &kafka(), &RestoreOptions::new(None, 0)).await?;
    println!(
        "{}: restored {} records in {:?} = {:.0} records/s into memory; peak RSS during it: {} KiB",
        kind.name(),
        r.records_read,
        r.elapsed,
        r.records_read as f64 / r.elapsed.as_secs_f64(),
        peak_rss_kib()
    );
    // For comparison: a bare consumer that only counts the records, with the restore
    // consumer's fetch settings: what reading the changelog alone costs.
    let bare = {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Offset, TopicPartitionList};
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "bare")
            .set("enable.auto.commit", "false")
            .set("max.partition.fetch.bytes", "16777216")
            .set("queued.min.messages", "50000")
            .set("queued.max.messages.kbytes", "32768")
            .set("fetch.queue.backoff.ms", "10")
            .set("fetch.wait.max.ms", "100")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, PARTITION, Offset::Beginning)?;
        c.assign(&tpl)?;
        let t = Instant::now();
        let mut n = 0usize;
        while n < r.records_read as usize {
            if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
                n += 1;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "bare consumer stalled at {n}"
            );
        }
        t.elapsed()
    };
    println!(
        "{}: a bare consumer reads the same records in {bare:?} = {:.0} records/s",
        kind.name(),
        r.records_read as f64 / bare.as_secs_f64()
    );
    // The mock cluster keeps only ~5 MB per partition; Tansu keeps everything.
    if kind != BrokerKind::Embedded {
        assert_eq!(r.records_read as usize, records / per_batch * per_batch);
    }
    Ok(())
}
