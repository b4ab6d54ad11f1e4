//! A processor service meets a record whose header name is not UTF-8 — what any
//! non-Java producer can write, e.g. `kcat -H $'\xff\xfe=x'` — and keeps going: the
//! notification processor, started from `examples/config/notification-processor.toml`,
//! processes that record (it is a valid task otherwise) and every task after it in the
//! same partition, stays live, and drains on SIGTERM with everything counted once.

mod common;

use std::time::{Duration, Instant};

use common::{metric_sum, ServiceProcess};
use decaton_client::TaskClient;
use decaton_protocol::headers::add_raw_header;
use decaton_protocol::{
    encode_metadata, now_millis, ChatOp, OpType, TaskMetadata, METADATA_HEADER,
};
use decaton_testkit::{BrokerKind, TestBroker};
use futures::StreamExt as _;
use prost::Message as _;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const TOPIC: &str = "chat-ops";
const SUBSCRIPTION: &str = "notification-processor";
/// Tasks put after the hostile record.
const AFTER: u64 = 200;

fn send_message(user: &str, sequence: u64) -> ChatOp {
    ChatOp {
        user_id: user.into(),
        op: OpType::SendMessage as i32,
        target_id: "room-1".into(),
        payload: b"hello".to_vec(),
        sequence,
        created_at_millis: now_millis(),
    }
}

/// Writes one valid task whose record carries headers named `\xff\xfe` and `x\xc3(`
/// besides its `dt_meta`, the way a C or Go client can.
async fn put_hostile(bootstrap: &str, kind: BrokerKind) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in kind.producer_settings() {
        config.set(*k, *v);
    }
    let producer: FutureProducer = config.create()?;
    let meta = encode_metadata(&TaskMetadata {
        timestamp_millis: now_millis(),
        source_application_id: "kcat".into(),
        source_instance_id: "kcat-1".into(),
        retry_count: 0,
        scheduled_time_millis: 0,
    });
    let headers = add_raw_header(OwnedHeaders::new(), b"\xff\xfe", Some(b"x"));
    let headers = add_raw_header(headers, METADATA_HEADER.as_bytes(), Some(&meta));
    let headers = add_raw_header(headers, b"x\xc3(", None);
    let value = send_message("user-hostile", 0).encode_to_vec();
    producer
        .send(
            FutureRecord::to(TOPIC)
                .key("user-hostile")
                .payload(&value)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("writing the hostile record: {e}"))?;
    Ok(())
}

/// On the embedded broker and on Tansu (`DECATON_TEST_BROKERS` narrows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_keeps_processing_after_a_non_utf8_header_name() -> anyhow::Result<()> {
    for kind in BrokerKind::for_tests() {
        scenario(kind)
            .await
            .map_err(|e| e.context(format!("on {}", kind.name())))?;
    }
    Ok(())
}

async fn scenario(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(move || -> anyhow::Result<TestBroker> {
        let broker = TestBroker::start(kind)?;
        // One partition: every later task sits behind the hostile record.
        broker.create_topic(TOPIC, 1)?;
        Ok(broker)
    })
    .await??;
    let bootstrap = broker.bootstrap_servers();
    put_hostile(&bootstrap, kind).await?;

    let config = common::config_file(SUBSCRIPTION);
    let mut service = ServiceProcess::start(
        SUBSCRIPTION,
        env!("CARGO_BIN_EXE_notification-processor"),
        &[
            "--config",
            config.to_str().unwrap_or_default(),
            "--min-latency-ms",
            "0",
            "--max-latency-ms",
            "0",
        ],
        &[
            ("DECATON_KAFKA__BOOTSTRAP_SERVERS", bootstrap.clone()),
            (
                "DECATON_SERVICE__LOG_FILTER",
                "info,librdkafka=off,rdkafka::client=off".into(),
            ),
        ],
    )?;
    let failure = |what: String, service: &ServiceProcess| {
        anyhow::anyhow!("{what}\nservice log:\n{}", service.log_text())
    };

    // Tasks after the hostile record, in the same partition.
    let mut client = TaskClient::<ChatOp>::builder(bootstrap.clone(), TOPIC).application_id("it");
    for (k, v) in kind.producer_settings() {
        client = client.set(*k, *v);
    }
    let client = client.build()?;
    let ops: Vec<ChatOp> = (0..AFTER)
        .map(|i| send_message(&format!("user-{}", i % 7), i / 7))
        .collect();
    let results: Vec<_> = futures::stream::iter(&ops)
        .map(|op| client.put(op.user_id.clone(), op))
        .buffered(100)
        .collect()
        .await;
    for r in results {
        r?;
    }
    client.close().await?;

    // The hostile record and every task after it are processed.
    let label = format!("subscription=\"{SUBSCRIPTION}\"");
    let deadline = Instant::now() + Duration::from_secs(90);
    let processed = loop {
        if !service.running() {
            return Err(failure("the service exited".into(), &service));
        }
        if let Ok((_, text)) = service.get("/metrics").await {
            let got = metric_sum(&text, "decaton_tasks_processed_total", &label);
            if got >= (AFTER + 1) as f64 {
                break got;
            }
        }
        if Instant::now() > deadline {
            return Err(failure(
                format!("not all {} tasks processed in 90 s", AFTER + 1),
                &service,
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // polling the service
    };
    assert_eq!(processed, (AFTER + 1) as f64, "nothing processed twice");
    if !service.running() {
        return Err(failure("the service exited".into(), &service));
    }
    let (live, _) = service.get("/health/live").await?;
    assert_eq!(live, 200, "not live after the hostile record");
    let (_, text) = service.get("/metrics").await?;
    assert_eq!(
        metric_sum(&text, "decaton_tasks_discarded_total", &label),
        0.0,
        "the hostile record is a valid task: nothing to discard"
    );

    // It drains and reports every notification, the hostile one included.
    service.signal("TERM")?;
    let log = service.log.clone();
    let (status, stdout) = service.wait(Duration::from_secs(60))?;
    let log = log.lock().join("\n");
    assert!(status.success(), "exit {status}\n{stdout}\n{log}");
    assert!(
        stdout.contains(&format!("notifications sent {}", AFTER + 1)),
        "summary: {stdout}\n{log}"
    );
    assert!(!log.contains("panicked"), "a thread panicked:\n{log}");
    Ok(())
}
