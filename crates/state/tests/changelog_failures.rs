//! Changelog writes that retrying cannot fix: they are refused for good, and nothing of
//! them stays behind for a restore to apply. Against the embedded mock cluster, whose
//! request errors can refuse one produce request of a batch.

use std::collections::BTreeMap;
use std::time::Duration;

use decaton_state::internal::{restore, ChangelogWriter, Mutation, PartitionStore, RestoreOptions};
use decaton_state::{changelog_topic, Backend, StateConfig, StateError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;

const SUBSCRIPTION: &str = "refusals";

fn memory() -> StateConfig {
    StateConfig::default().backend(Backend::Memory)
}

fn put(key: &str, value: &[u8]) -> Mutation {
    Mutation {
        key: key.as_bytes().to_vec(),
        value: Some(value.to_vec()),
    }
}

fn high_watermark(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    Ok(consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))?
        .1)
}

/// Appends `mutations` and applies them once acknowledged, as the runtime does.
async fn commit(
    writer: &ChangelogWriter,
    store: &PartitionStore,
    source_offset: i64,
    mutations: &[Mutation],
) -> anyhow::Result<()> {
    writer
        .enqueue(store.changelog_topic(), 0, source_offset, mutations)?
        .wait()
        .await?;
    store.apply_acknowledged(mutations, source_offset)?;
    Ok(())
}

/// A fresh in-memory store restored from the whole changelog, as another host would.
async fn restored(bootstrap: &str) -> anyhow::Result<PartitionStore> {
    let (store, _) = PartitionStore::open(&memory(), SUBSCRIPTION, "tasks", 0)?;
    restore(
        &store,
        bootstrap,
        &BTreeMap::new(),
        &RestoreOptions::new(None, 0),
    )
    .await?;
    Ok(store)
}

/// A state value too large for the changelog producer refuses the task's whole batch
/// for good before any record is sent: nothing reaches the changelog (no record, no
/// abort marker), and the writer goes on with the next batch. It used to send the batch's
/// first records, fail the large one as if it could pass, and leave a torn batch and an
/// abort marker behind each time the runtime sent it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_value_is_refused_before_anything_is_sent() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    let bootstrap = cluster.bootstrap_servers();
    let topic = changelog_topic(SUBSCRIPTION, "state");
    cluster.create_topic(&topic, 1, 1)?;
    let writer = ChangelogWriter::new(&bootstrap, &BTreeMap::new())?;

    let batch = [put("small", b"fits"), put("huge", &vec![7u8; 1_100_000])];
    let refused = writer.enqueue(&topic, 0, 5, &batch);
    match &refused {
        Err(e @ StateError::Refused { torn_batch, .. }) => {
            assert!(e.is_permanent());
            assert_eq!(*torn_batch, None, "nothing of it was sent");
            assert!(e.to_string().contains("message.max.bytes"), "{e}");
        }
        other => panic!("expected a permanent refusal, got {other:?}"),
    }
    // The next batch is the first record in the changelog.
    let next = writer
        .enqueue(&topic, 0, 6, &[put("small", b"next")])?
        .wait()
        .await?;
    assert_eq!(next, Some(0));
    assert_eq!(high_watermark(&bootstrap, &topic)?, 1);
    let store = restored(&bootstrap).await?;
    assert_eq!(store.get(b"small")?, Some(b"next".to_vec()));
    assert_eq!(store.get(b"huge")?, None);
    assert!(store.is_applied(6) && !store.is_applied(5));
    Ok(())
}

/// The broker refuses a batch part-way (its first record landed, the second was refused
/// as larger than the topic accepts) and later batches of the partition follow it: a restore would take
/// the batch for one compaction thinned out and apply its first record. The refusal is
/// permanent and names the torn batch; the revert (an abort marker and the local store's
/// values of the batch's keys) leaves the changelog restoring exactly the local state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_part_way_is_reverted() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    let bootstrap = cluster.bootstrap_servers();
    let topic = changelog_topic(SUBSCRIPTION, "state");
    cluster.create_topic(&topic, 1, 1)?;
    // One record per produce request, so the broker can refuse the second alone.
    let kafka = BTreeMap::from([
        ("batch.num.messages".to_string(), "1".to_string()),
        (
            "max.in.flight.requests.per.connection".to_string(),
            "1".to_string(),
        ),
        ("message.timeout.ms".to_string(), "20000".to_string()),
    ]);
    let writer = ChangelogWriter::new(&bootstrap, &kafka)?;
    let (local, _) = PartitionStore::open(&memory(), SUBSCRIPTION, "tasks", 0)?;
    commit(&writer, &local, 1, &[put("a", b"a1"), put("b", b"b1")]).await?;

    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    let batch = [put("a", b"a2"), put("b", b"b2")];
    let failed = writer.enqueue(&topic, 0, 2, &batch)?.wait().await;
    let torn = match failed {
        Err(e @ StateError::Refused { .. }) if e.is_permanent() => match e {
            StateError::Refused {
                torn_batch: Some(b),
                ..
            } => b,
            other => panic!("a batch refused part-way must be named as torn: {other}"),
        },
        other => panic!("expected a permanent refusal, got {other:?}"),
    };
    // Whatever made it, a later batch of the same writer follows.
    commit(&writer, &local, 3, &[put("c", b"c1")]).await?;

    // The local store never got the refused batch: its values are the valid ones.
    let valid: Vec<Mutation> = batch
        .iter()
        .map(|m| {
            Ok(Mutation {
                value: local.get(&m.key)?,
                key: m.key.clone(),
            })
        })
        .collect::<Result<_, StateError>>()?;
    assert_eq!(valid, [put("a", b"a1"), put("b", b"b1")]);
    writer
        .enqueue_revert(|| false, &topic, 0, torn, &valid)?
        .wait()
        .await?;

    let store = restored(&bootstrap).await?;
    assert_eq!(store.entries()?, local.entries()?);
    assert!(
        !store.is_applied(2),
        "the refused task's effects are not in the state"
    );
    Ok(())
}

/// Writes of a fenced partition are refused before any revert is queued.
#[tokio::test]
async fn a_fenced_partition_queues_no_revert() -> anyhow::Result<()> {
    let writer = ChangelogWriter::new("127.0.0.1:1", &BTreeMap::new())?;
    let refused = writer.enqueue_revert(|| true, "t-changelog", 0, 9, &[put("k", b"v")]);
    assert!(matches!(refused, Err(StateError::Closed(_))), "{refused:?}");
    Ok(())
}
