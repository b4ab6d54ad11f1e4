//! TaskClient against both brokers: round trip, per-key order, metadata, failures.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use decaton_client::{ClientError, PutOptions, TaskClient};
use decaton_protocol::{decode_record, ChatOp, OpType, METADATA_HEADER};
use decaton_testkit::{BrokerKind, TestBroker};
use futures::StreamExt;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn op(user: u64, seq: u64) -> ChatOp {
    ChatOp {
        user_id: format!("user-{user}"),
        op: OpType::SendMessage as i32,
        target_id: format!("room-{}", user % 7),
        payload: seq.to_le_bytes().to_vec(),
        sequence: seq,
        created_at_millis: 0,
    }
}

/// Reads `expected` records from every partition of `topic` from the beginning.
fn read_all(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> anyhow::Result<Vec<(String, ChatOp, decaton_protocol::TaskMetadata)>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "round-trip-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::with_capacity(expected);
    let deadline = Instant::now() + Duration::from_secs(120);
    while out.len() < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "read only {} of {expected}",
            out.len()
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        let header = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == METADATA_HEADER)
                .and_then(|h| h.value)
        });
        let rec = decode_record(header, m.payload())?;
        let key = String::from_utf8(m.key().unwrap_or_default().to_vec())?;
        out.push((key, ChatOp::decode(&*rec.task)?, rec.metadata));
    }
    Ok(out)
}

async fn round_trip(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 100_000;
    const KEYS: u64 = 1_000;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("chat-ops", 4)?;
    let client = TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), "chat-ops")
        .application_id("talk-server")
        .instance_id("talk-1")
        .build()?;
    // Task i goes to user i % KEYS with that user's next sequence number; puts are issued
    // in order with up to 10k in flight.
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..TASKS)
        .map(|i| {
            let task = op(i % KEYS, i / KEYS);
            let client = &client;
            async move { client.put(task.user_id.clone(), &task).await }
        })
        .buffered(10_000)
        .collect()
        .await;
    let acked = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        acked as u64,
        TASKS,
        "first error: {:?}",
        results.iter().find(|r| r.is_err())
    );
    println!(
        "{}: {TASKS} puts acknowledged in {:?}",
        kind.name(),
        started.elapsed()
    );
    client.close().await?;

    let read = tokio::task::spawn_blocking({
        let b = broker.bootstrap_servers();
        move || read_all(&b, "chat-ops", 4, TASKS as usize)
    })
    .await??;
    let mut next: HashMap<String, u64> = HashMap::new();
    for (key, task, meta) in &read {
        assert_eq!(key, &task.user_id);
        assert_eq!(meta.source_application_id, "talk-server");
        assert_eq!(meta.source_instance_id, "talk-1");
        assert!(meta.timestamp_millis > 0);
        let n = next.entry(key.clone()).or_default();
        assert_eq!(task.sequence, *n, "key {key} out of order or duplicated");
        *n += 1;
    }
    assert_eq!(next.len() as u64, KEYS);
    assert!(next.values().all(|&n| n == TASKS / KEYS));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_100k_embedded() -> anyhow::Result<()> {
    round_trip(BrokerKind::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_100k_tansu() -> anyhow::Result<()> {
    round_trip(BrokerKind::TansuMemory).await
}

#[tokio::test]
async fn put_fails_within_timeout_when_no_broker_listens() -> anyhow::Result<()> {
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let client = TaskClient::<ChatOp>::builder(format!("127.0.0.1:{port}"), "chat-ops")
        .delivery_timeout(Duration::from_secs(2))
        .build()?;
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), client.put("u1", &op(1, 0))).await?;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(ClientError::BrokerUnreachable(_))),
        "{result:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(10),
        "took {elapsed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn oversized_record_is_a_typed_error() -> anyhow::Result<()> {
    for kind in BrokerKind::for_tests() {
        let broker = TestBroker::start(kind)?;
        broker.create_topic("big", 1)?;
        let client = TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), "big")
            .set("message.max.bytes", "10000")
            .build()?;
        let mut task = op(1, 0);
        task.payload = vec![7; 20_000];
        let r = client.put("u1", &task).await;
        assert!(
            matches!(r, Err(ClientError::RecordTooLarge { .. })),
            "{}: {r:?}",
            kind.name()
        );
        // The client still works for normal tasks afterwards.
        client.put("u1", &op(1, 1)).await?;
    }
    Ok(())
}

#[tokio::test]
async fn unknown_topic_is_a_typed_error_on_tansu() -> anyhow::Result<()> {
    // The mock cluster auto-creates every topic, so only the real broker can say "unknown".
    let broker = TestBroker::start(BrokerKind::TansuMemory)?;
    let client = TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), "no-such-topic")
        .delivery_timeout(Duration::from_secs(5))
        .set("topic.metadata.propagation.max.ms", "1000")
        .build()?;
    let r = tokio::time::timeout(Duration::from_secs(30), client.put("u1", &op(1, 0))).await?;
    assert!(matches!(r, Err(ClientError::UnknownTopic(_))), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn put_with_sets_scheduled_time_and_timestamp() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("sched", 1)?;
    let client = TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), "sched").build()?;
    let ts = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
    let at = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_005_000);
    client
        .put_with(
            "u1",
            &op(1, 0),
            PutOptions::default().timestamp(ts).scheduled_time(at),
        )
        .await?;
    let read = tokio::task::spawn_blocking({
        let b = broker.bootstrap_servers();
        move || read_all(&b, "sched", 1, 1)
    })
    .await??;
    assert_eq!(read[0].2.timestamp_millis, 1_700_000_000_000);
    assert_eq!(read[0].2.scheduled_time_millis, 1_700_000_005_000);
    Ok(())
}

#[tokio::test]
async fn put_without_key_sends_a_record_with_no_key() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("keyless", 3)?;
    let client = TaskClient::<ChatOp>::builder(broker.bootstrap_servers(), "keyless")
        .set("sticky.partitioning.linger.ms", "0")
        .build()?;
    let mut partitions = std::collections::HashSet::new();
    for seq in 0..60 {
        let d = client
            .put_without_key(&op(seq, seq), PutOptions::default())
            .await?;
        partitions.insert(d.partition);
    }
    // Keyless records are spread over the partitions, not hashed to one.
    assert!(partitions.len() > 1, "all 60 went to {partitions:?}");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", "keyless-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset("keyless", p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < 60 {
        anyhow::ensure!(Instant::now() < deadline, "read only {seen} of 60");
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        assert!(m.key().is_none(), "record {} has a key", m.offset());
        let header = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == METADATA_HEADER)
                .and_then(|h| h.value)
        });
        let rec = decode_record(header, m.payload())?;
        assert!(rec.metadata.timestamp_millis > 0);
        seen += 1;
    }
    Ok(())
}
