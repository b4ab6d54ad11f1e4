#![allow(clippy::unwrap_used)]
//! The loopback replicator end to end, against the embedded and the real broker: a mixed
//! chat workload (and a few malformed records) replicated from a configuration file into
//! three derived topics, each checked for exactly the matching records, per-key order,
//! and nothing else; malformed records counted and sent to the dead-letter topic.

use std::time::{Duration, Instant};

use decaton_integration_tests::broker_tests;
use decaton_integration_tests::replication::{
    chat_config, check_derived, put_ops, read_topic, ROUTES,
};
use decaton_replicator::{DerivedRecord, Replicator, ReplicatorBuilder, Route};
use decaton_testkit::{BrokerKind, TestBroker};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(120);

fn create_topics(broker: &TestBroker) -> anyhow::Result<()> {
    broker.create_topic("chat-ops", 3)?;
    broker.create_topic("chat-messages", 3)?;
    broker.create_topic("chat-social", 2)?;
    broker.create_topic("chat-profile", 1)?;
    broker.create_topic("chat-ops-dlq", 1)?;
    Ok(())
}

/// Writes records no Decaton decoder accepts: no `dt_meta` header, and a value that is
/// not a legacy envelope.
fn put_garbage(broker: &TestBroker, n: usize) -> anyhow::Result<()> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", broker.bootstrap_servers());
    for (k, v) in broker.kind().producer_settings() {
        cfg.set(*k, *v);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = cfg.create()?;
    for i in 0..n {
        let key = format!("garbage-{i}");
        producer
            .send(
                BaseRecord::to("chat-ops")
                    .key(&key)
                    .payload(&[0xff_u8, 0xff, 0xff, 0x01][..]),
            )
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Waits for `cond`, failing at the deadline or as soon as the replicator `running`
/// stopped on its own.
async fn wait_until<T>(
    what: &str,
    running: &tokio::task::JoinHandle<T>,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not reached after {WAIT:?}"
        );
        anyhow::ensure!(
            !running.is_finished(),
            "{what}: the replicator stopped first"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn from_config_file(kind: BrokerKind) -> anyhow::Result<()> {
    const OPS: u64 = 20_000;
    const USERS: u64 = 500;
    const GARBAGE: usize = 7;
    let broker = TestBroker::start(kind)?;
    create_topics(&broker)?;
    let boot = broker.bootstrap_servers();
    let ops = put_ops(
        &boot,
        kind.producer_settings(),
        "chat-ops",
        0..OPS / 2,
        USERS,
    )
    .await?;
    put_garbage(&broker, GARBAGE)?;
    let mut ops2 = put_ops(
        &boot,
        kind.producer_settings(),
        "chat-ops",
        OPS / 2..OPS,
        USERS,
    )
    .await?;
    let mut ops = ops;
    ops.append(&mut ops2);

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("replicator.toml");
    let producer_extra = kind
        .producer_settings()
        .iter()
        .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
        .collect::<String>();
    std::fs::write(
        &path,
        format!(
            "{}\n[producer]\n{producer_extra}",
            chat_config(&boot, "replicator-it", "")
        ),
    )?;
    let replicator = ReplicatorBuilder::from_file(&path)?.build()?;
    let handle = replicator.handle();
    let running = tokio::spawn(replicator.run());
    let expected_out: u64 = ROUTES
        .iter()
        .map(|(_, types)| ops.iter().filter(|o| types.contains(&o.op())).count() as u64)
        .sum();
    wait_until("every derived record acknowledged", &running, || {
        let s = handle.stats();
        s.routes.iter().map(|r| r.out).sum::<u64>() >= expected_out
            && s.dead_letters >= GARBAGE as u64
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", handle.stats()))?;
    handle.shutdown();
    let stats = running.await??;
    println!("{}: {stats:?}", kind.name());
    assert_eq!(stats.source_records, OPS + GARBAGE as u64);
    assert_eq!(stats.invalid_records, GARBAGE as u64);
    assert_eq!(stats.dead_letters, GARBAGE as u64);
    for r in &stats.routes {
        assert_eq!(r.records_in, OPS + GARBAGE as u64, "{r:?}");
        assert_eq!(r.failed, GARBAGE as u64, "{r:?}");
        assert_eq!(r.out + r.filtered + r.failed, r.records_in, "{r:?}");
    }

    let read = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut out = Vec::new();
        for (topic, _) in ROUTES {
            out.push(read_topic(&boot, topic, false, WAIT)?);
        }
        Ok((out, boot))
    })
    .await??;
    let (derived, boot) = read;
    for ((topic, types), records) in ROUTES.iter().zip(&derived) {
        let report = check_derived(&ops, types, records);
        println!("{} {topic}: {report}", kind.name());
        assert!(report.ok(), "{topic}: {report}");
        assert_eq!(report.duplicates, 0, "{topic}");
        assert!(
            report.expected > 0,
            "{topic} expects nothing: the test would prove nothing"
        );
    }
    // The profile route's map: only the kept fields, and its header.
    for r in &derived[2] {
        assert!(
            r.op.target_id.is_empty() && r.op.created_at_millis == 0,
            "{:?}",
            r.op
        );
        assert_eq!(r.op.payload, b"hi", "{:?}", r.op);
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "category" && v == b"profile"));
        assert!(r.headers.iter().any(|(k, _)| k == "dt_meta"));
    }
    // Dead letters carry the source record and the reason.
    let dlq = dead_letters(&boot)?;
    assert_eq!(dlq.len(), GARBAGE);
    for (key, error) in &dlq {
        assert!(key.starts_with("garbage-"), "{key}");
        assert!(error.contains("undecodable"), "{error}");
    }
    Ok(())
}
broker_tests!(replicates_a_config_file, super::from_config_file);

/// (key, error header) of every record in the dead-letter topic.
fn dead_letters(bootstrap: &str) -> anyhow::Result<Vec<(String, String)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers as _;
    use rdkafka::Message as _;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "dlq-reader")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("chat-ops-dlq", 0, rdkafka::Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "dead-letter topic not read to its end"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let error = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == decaton_protocol::dead_letter::REASON)
                            .and_then(|h| h.value)
                    })
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                out.push((
                    String::from_utf8_lossy(m.key().unwrap_or(&[])).into_owned(),
                    error,
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Ok(out),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
}

/// The library API: a Rust closure as filter and map, and a router, through the same
/// pipeline; a closure's error is counted and the record goes to the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closures_route_and_fail_without_stopping() -> anyhow::Result<()> {
    decaton_integration_tests::init_tracing();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    create_topics(&broker)?;
    broker.create_topic("chat-router", 1)?;
    let boot = broker.bootstrap_servers();
    let ops = put_ops(&boot, &[], "chat-ops", 0..2_000, 50).await?;
    let desc = prost_reflect_chat();
    let replicator = Replicator::builder(&boot, "chat-ops", "closures")
        .message_type(desc)
        .dead_letter_topic("chat-ops-dlq")
        .commit_interval(Duration::from_millis(100))
        .route(
            Route::to("chat-messages")
                .name("user-7-messages")
                .filter("op == SEND_MESSAGE")
                .filter_fn(|r| {
                    let key = r.key().ok_or("no key")?;
                    if key == b"user-13" {
                        return Err("user-13 is refused".into());
                    }
                    Ok(key == b"user-7")
                })
                .map_fn(|_, mut d: DerivedRecord| {
                    d.headers.push(("mapped".into(), b"yes".to_vec()));
                    Ok(d)
                }),
        )
        .router(|r| {
            let seq = r
                .message()
                .and_then(|m| m.get_field_by_name("sequence"))
                .and_then(|v| v.as_u64())
                .ok_or("no sequence")?;
            Ok(if seq == 0 {
                vec![("chat-router".to_string(), r.to_derived())]
            } else {
                Vec::new()
            })
        })
        .build()?;
    let handle = replicator.handle();
    let running = tokio::spawn(replicator.run());
    let user7 = ops
        .iter()
        .filter(|o| o.user_id == "user-7" && o.op() == decaton_protocol::OpType::SendMessage)
        .count() as u64;
    let user13 = ops
        .iter()
        .filter(|o| o.user_id == "user-13" && o.op() == decaton_protocol::OpType::SendMessage)
        .count() as u64;
    wait_until("closures", &running, || {
        let s = handle.stats();
        s.routes[0].out >= user7 && s.routes[1].out >= 50 && s.dead_letters >= user13
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", handle.stats()))?;
    handle.shutdown();
    let stats = running.await??;
    assert_eq!(stats.routes[0].out, user7);
    assert_eq!(stats.routes[0].failed, user13);
    assert_eq!(stats.routes[1].name, "router");
    assert_eq!(stats.routes[1].out, 50);
    let read = tokio::task::spawn_blocking(move || read_topic(&boot, "chat-messages", false, WAIT))
        .await??;
    assert_eq!(read.len() as u64, user7);
    assert!(read
        .iter()
        .all(|r| r.key == "user-7" && r.headers.iter().any(|(k, _)| k == "mapped")));
    Ok(())
}

fn prost_reflect_chat() -> prost_reflect::MessageDescriptor {
    prost_reflect::DescriptorPool::decode(decaton_protocol::FILE_DESCRIPTOR_SET)
        .unwrap()
        .get_message_by_name("decaton.example.ChatOp")
        .unwrap()
}

/// Exactly-once: on the mock cluster the derived topics, read with `read_committed`, hold
/// every matching record once; Tansu serves no transactions, which the replicator must
/// report at start instead of running without them.
async fn exactly_once(kind: BrokerKind) -> anyhow::Result<()> {
    const OPS: u64 = 5_000;
    let broker = TestBroker::start(kind)?;
    create_topics(&broker)?;
    let boot = broker.bootstrap_servers();
    let ops = put_ops(&boot, kind.producer_settings(), "chat-ops", 0..OPS, 100).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("replicator.toml");
    std::fs::write(
        &path,
        chat_config(&boot, "replicator-eos", "exactly_once = true"),
    )?;
    let replicator = ReplicatorBuilder::from_file(&path)?.build()?;
    let handle = replicator.handle();
    let running = tokio::spawn(replicator.run());
    if kind != BrokerKind::Embedded {
        let err = running.await?.expect_err("Tansu has no transactions");
        println!("{}: {err}", kind.name());
        assert!(
            matches!(
                err,
                decaton_replicator::ReplicatorError::TransactionsUnsupported(_)
            ),
            "{err}"
        );
        assert_eq!(
            handle.stats().source_records,
            0,
            "consumed without transactions"
        );
        return Ok(());
    }
    let expected_out: u64 = ROUTES
        .iter()
        .map(|(_, types)| ops.iter().filter(|o| types.contains(&o.op())).count() as u64)
        .sum();
    wait_until("every derived record committed", &running, || {
        let s = handle.stats();
        s.routes.iter().map(|r| r.out).sum::<u64>() >= expected_out
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", handle.stats()))?;
    handle.shutdown();
    let stats = running.await??;
    assert!(stats.transactions > 0, "{stats:?}");
    let derived = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        ROUTES
            .iter()
            .map(|(topic, _)| read_topic(&boot, topic, true, WAIT))
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    for ((topic, types), records) in ROUTES.iter().zip(&derived) {
        let report = check_derived(&ops, types, records);
        println!("{} exactly-once {topic}: {report}", kind.name());
        assert!(report.ok() && report.duplicates == 0, "{topic}: {report}");
    }
    Ok(())
}
broker_tests!(exactly_once_or_reported, super::exactly_once);

/// Raw bytes (no task type, `format = "plain"`): filters on key and headers only, records
/// forwarded untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_records_by_key_and_header() -> anyhow::Result<()> {
    decaton_integration_tests::init_tracing();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("raw", 2)?;
    broker.create_topic("raw-eu", 1)?;
    let boot = broker.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &boot)
        .create()?;
    for i in 0..300u32 {
        let region = ["eu", "us", "jp"][i as usize % 3];
        let key = format!("k{}", i % 10);
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "region",
            value: Some(region),
        });
        producer
            .send(
                BaseRecord::to("raw")
                    .key(&key)
                    .payload(&i.to_be_bytes()[..])
                    .headers(headers),
            )
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raw.toml");
    std::fs::write(
        &path,
        format!(
            r#"bootstrap_servers = "{boot}"
source_topic = "raw"
group = "raw"
format = "plain"
[[route]]
topic = "raw-eu"
filter = 'header("region") == "eu" and key() in ["k0", "k3", "k6", "k9"]'
"#
        ),
    )?;
    let replicator = ReplicatorBuilder::from_file(&path)?.build()?;
    let handle = replicator.handle();
    let running = tokio::spawn(replicator.run());
    // Region eu is i % 3 == 0; the keys listed are i % 10 in {0, 3, 6, 9}.
    let expected = (0..300u32)
        .filter(|i| i % 3 == 0 && [0, 3, 6, 9].contains(&(i % 10)))
        .count() as u64;
    wait_until("raw records", &running, || {
        let s = handle.stats();
        s.routes[0].out + s.routes[0].filtered >= 300
    })
    .await?;
    handle.shutdown();
    let stats = running.await??;
    assert_eq!(stats.routes[0].out, expected, "{stats:?}");
    assert_eq!(stats.invalid_records, 0);
    Ok(())
}
