#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! A committed offset past the log end (the log was truncated: an unclean leader
//! election, a topic deleted and recreated, a broker that lost its data).
//!
//! The consumer's position is then reset (`auto.offset.reset`) below the committed
//! offset. Every task produced after the truncation must still run: the partition rebases
//! on what it fetches, counts the event, and commits the new position, so a restart does
//! not meet the truncation again.
//!
//! The truncation is simulated exactly: the group's committed offset is set to 1 000 000
//! on a topic that holds a few records.

use std::sync::Arc;
use std::time::Duration;

use decaton_integration_tests::{
    broker_tests, committed, produce_range, wait_committed, Behaviour, Recorder, Recording,
};
use decaton_processor::{ProcessorProperties, Subscription, SubscriptionStats};
use decaton_testkit::{checker, BrokerKind, TestBroker};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const WAIT: Duration = Duration::from_secs(60);
const FAR: i64 = 1_000_000;

fn props() -> ProcessorProperties {
    let mut p = ProcessorProperties::default();
    p.commit_interval = Duration::from_millis(100);
    p
}

/// Commits `offset` (with an offset map listing offsets above it as done) for `group` on
/// every partition of `topic`, as the previous owner of a longer log would have.
fn commit_far(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    offset: i64,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
        if let Some(mut e) = tpl.find_partition(topic, p) {
            e.set_metadata(String::new());
        }
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

/// Runs one subscription until `done` holds for its recording, then shuts it down.
async fn run_until(
    broker: &TestBroker,
    group: &str,
    topic: &str,
    instance: &str,
    rec: &Arc<Recording>,
    extra: &[(&str, &str)],
    produce: impl std::future::Future<Output = anyhow::Result<()>>,
    done: impl Fn(&Recording) -> bool,
) -> anyhow::Result<SubscriptionStats> {
    let mut builder = Subscription::builder(
        group,
        Recorder::new(instance, rec.clone(), Behaviour::default()),
    )
    .bootstrap_servers(broker.bootstrap_servers())
    .topic(topic)
    .properties(props());
    for (k, v) in extra {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    produce.await?;
    let reached = rec.wait_for(WAIT, done).await;
    handle.shutdown();
    let stats = running.await??;
    if let Err(e) = reached {
        anyhow::bail!("{e}: processed {}, stats {stats:?}", rec.count());
    }
    Ok(stats)
}

/// Committed 1 000 000, log holds 10 records per partition (`auto.offset.reset=earliest`,
/// the runtime's default): the 10 records and every task produced later run once, the
/// truncation is counted once per partition, the new position is committed, and a
/// restart neither rebases again nor runs anything twice.
async fn committed_past_the_log_end(kind: BrokerKind) -> anyhow::Result<()> {
    const PARTITIONS: i32 = 2;
    const KEYS: u64 = 7;
    let (topic, group) = ("truncated", "truncated-group");
    let broker = TestBroker::start(kind)?;
    broker.create_topic(topic, PARTITIONS)?;
    let bootstrap = broker.bootstrap_servers();
    // What survived the truncation (on one partition at least; keys spread).
    produce_range(&broker, topic, 0..20, KEYS).await?;
    commit_far(&bootstrap, group, topic, PARTITIONS, FAR)?;

    let rec = Arc::new(Recording::default());
    let first_round = 220u64;
    let stats = run_until(
        &broker,
        group,
        topic,
        "first",
        &rec,
        &[],
        async {
            produce_range(&broker, topic, 20..first_round, KEYS)
                .await
                .map(|_| ())
        },
        |r| r.count() as u64 >= first_round,
    )
    .await?;
    let report = checker::check(
        &decaton_integration_tests::expected_counts(first_round, KEYS),
        &rec.log.lock(),
    );
    assert!(report.ok(), "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert_eq!(
        stats.truncations, PARTITIONS as u64,
        "one truncation per partition: {stats:?}"
    );
    assert_eq!(stats.rewound, 0, "{stats:?}");
    // The new positions are committed: the log ends there.
    let positions = committed(&bootstrap, group, topic, PARTITIONS)?;
    let total: i64 = positions.iter().map(|(o, _)| o.unwrap_or(FAR)).sum();
    assert_eq!(total, first_round as i64, "committed {positions:?}");

    // A restart starts from the committed positions: no rebase, nothing runs twice.
    let total_tasks = first_round + 30;
    let stats = run_until(
        &broker,
        group,
        topic,
        "second",
        &rec,
        &[],
        async {
            produce_range(&broker, topic, first_round..total_tasks, KEYS)
                .await
                .map(|_| ())
        },
        |r| r.count() as u64 >= total_tasks,
    )
    .await?;
    let report = checker::check(
        &decaton_integration_tests::expected_counts(total_tasks, KEYS),
        &rec.log.lock(),
    );
    assert!(report.ok(), "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert_eq!(stats.truncations, 0, "{stats:?}");
    assert_eq!(stats.processed, total_tasks - first_round, "{stats:?}");
    Ok(())
}
broker_tests!(
    committed_past_the_log_end_loses_nothing,
    super::committed_past_the_log_end
);

/// The same with `auto.offset.reset=latest`: the consumer resumes at the log end, so the
/// records there before the reset are skipped as configured, but from the first record it
/// fetches on, nothing produced after the reset is lost.
async fn committed_past_the_log_end_reset_to_latest(kind: BrokerKind) -> anyhow::Result<()> {
    let (topic, group) = ("truncated-latest", "truncated-latest-group");
    let broker = TestBroker::start(kind)?;
    broker.create_topic(topic, 1)?;
    let bootstrap = broker.bootstrap_servers();
    produce_range(&broker, topic, 0..10, 1).await?;
    commit_far(&bootstrap, group, topic, 1, FAR)?;
    let rec = Arc::new(Recording::default());
    let sub = Subscription::builder(
        group,
        Recorder::new("latest", rec.clone(), Behaviour::default()),
    )
    .bootstrap_servers(&bootstrap)
    .topic(topic)
    .properties(props())
    .set("auto.offset.reset", "latest")
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    // The reset happens some time after the assignment: produce one task at a time until
    // one runs (a deadline guards the loop).
    let mut next = 10u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    while rec.count() == 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nothing processed: {:?}",
            handle.stats()
        );
        produce_range(&broker, topic, next..next + 1, 1).await?;
        next += 1;
        let _ = rec
            .wait_for(Duration::from_millis(300), |r| r.count() > 0)
            .await;
    }
    let end = next + 100;
    produce_range(&broker, topic, next..end, 1).await?;
    let reached = rec
        .wait_for(WAIT, |r| {
            r.offsets
                .lock()
                .last()
                .is_some_and(|(_, o)| *o == end as i64 - 1)
        })
        .await;
    handle.shutdown();
    let stats = running.await??;
    reached.map_err(|e| anyhow::anyhow!("{e}: {stats:?}"))?;
    // Every offset from the first processed one to the log end ran, once, in order.
    let offsets: Vec<i64> = rec.offsets.lock().iter().map(|(_, o)| *o).collect();
    let first = offsets[0];
    assert!(
        first >= 10,
        "records before the reset were skipped as configured"
    );
    assert_eq!(offsets, (first..end as i64).collect::<Vec<_>>());
    assert_eq!(stats.truncations, 1, "{stats:?}");
    assert_eq!(
        wait_committed(
            &bootstrap,
            group,
            topic,
            end as i64,
            Duration::from_secs(10)
        )
        .await?,
        Some(end as i64),
        "the new position is committed at shutdown"
    );
    Ok(())
}
broker_tests!(
    committed_past_the_log_end_reset_to_latest_loses_nothing,
    super::committed_past_the_log_end_reset_to_latest
);
