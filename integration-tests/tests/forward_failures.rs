#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! Copies the runtime writes on a task's behalf (retry, dead-letter) that the broker
//! refuses, through the whole runtime: a dead-letter topic the principal may not write
//! stalls only its partition, visibly and without committing past it, until the write is
//! allowed; a dead-letter copy over `message.max.bytes` lands reduced; a header name that
//! is not UTF-8 is processed and kept byte for byte; a forward waiting on an unreachable
//! broker does not hold its partition when the partition comes straight back.
//!
//! Refusals are injected with the mock cluster's request errors, so most tests run on a
//! mock cluster of their own; the size test also runs on Tansu.

use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_integration_tests::{broker_tests, chat_op, committed, init_tracing};
use decaton_processor::{
    async_trait, DeadLetterConfig, NotReady, ProcessError, ProcessingContext, ProcessorProperties,
    SchedulingMode, Subscription, SubscriptionHandle, SubscriptionStats, TaskProcessor,
};
use decaton_protocol::headers::{add_raw_header, raw_headers};
use decaton_protocol::{dead_letter, encode_metadata, now_millis, ChatOp, TaskMetadata};
use decaton_testkit::{wait_until, BrokerKind, TestBroker};
use parking_lot::Mutex;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;

/// A header name no Java producer writes.
const ODD_NAME: &[u8] = b"\xff\xfe-odd";

/// Records every task it sees, and fails those of users whose id starts with `poison`.
#[derive(Clone, Default)]
struct FailsPoison {
    seen: Arc<Mutex<Vec<(i32, i64, String)>>>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for FailsPoison {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        self.seen
            .lock()
            .push((ctx.partition(), ctx.offset(), task.user_id.clone()));
        if task.user_id.starts_with("poison") {
            Err(ProcessError::new("storage says no"))
        } else {
            Ok(())
        }
    }
}

impl FailsPoison {
    fn ok_count(&self) -> usize {
        self.seen
            .lock()
            .iter()
            .filter(|(_, _, u)| !u.starts_with("poison"))
            .count()
    }
}

fn props() -> ProcessorProperties {
    let mut p = ProcessorProperties::default();
    p.mode = SchedulingMode::Bounded;
    p.partition_concurrency = 4;
    p.commit_interval = Duration::from_millis(100);
    p.rebalance_timeout = Duration::from_millis(300);
    p.shutdown_timeout = Duration::from_secs(5);
    p
}

fn producer(bootstrap: &str, kind: Option<BrokerKind>) -> FutureProducer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap).set("log_level", "0");
    for (k, v) in kind.map_or(&[][..], |k| k.producer_settings()) {
        c.set(*k, *v);
    }
    c.create().unwrap()
}

/// Writes a task of `user` to `partition` of `topic` as a Decaton producer does, plus a
/// header whose name is not UTF-8; returns its offset.
async fn put(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    user: &str,
    payload_bytes: usize,
) -> i64 {
    let mut task = chat_op(1, 0);
    task.user_id = user.to_string();
    task.payload = vec![7; payload_bytes];
    let meta = encode_metadata(&TaskMetadata {
        timestamp_millis: now_millis(),
        source_application_id: "it".into(),
        ..Default::default()
    });
    let headers = add_raw_header(OwnedHeaders::new(), b"dt_meta", Some(&meta));
    let headers = add_raw_header(headers, ODD_NAME, Some(b"kept"));
    let value = task.encode_to_vec();
    let record = FutureRecord::to(topic)
        .partition(partition)
        .key(user)
        .payload(&value)
        .headers(headers);
    let delivery = producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    delivery.offset
}

/// Every record of `topic` (all partitions), read from the start until `want` arrived
/// or `within` passed.
fn read_all(bootstrap: &str, topic: &str, want: usize, within: Duration) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}-{}", now_millis()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("log_level", "0")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.unwrap().detach());
        }
    }
    out
}

fn header(m: &OwnedMessage, name: &[u8]) -> Option<Vec<u8>> {
    let hs = m.headers()?;
    raw_headers(hs.as_borrowed())
        .find(|h| h.name == name)
        .and_then(|h| h.value.map(<[u8]>::to_vec))
}

fn text(m: &OwnedMessage, name: &str) -> String {
    String::from_utf8_lossy(&header(m, name.as_bytes()).unwrap_or_default()).into_owned()
}

type Running =
    tokio::task::JoinHandle<Result<SubscriptionStats, decaton_processor::SubscriptionError>>;

async fn stop(handle: &SubscriptionHandle, running: Running) -> anyhow::Result<SubscriptionStats> {
    handle.shutdown();
    Ok(tokio::time::timeout(Duration::from_secs(30), running).await???)
}

fn start(
    name: &str,
    bootstrap: &str,
    topic: &str,
    processor: FailsPoison,
    settings: &[(&str, &str)],
) -> anyhow::Result<(SubscriptionHandle, Running)> {
    let mut builder = Subscription::builder(name, processor)
        .bootstrap_servers(bootstrap)
        .topic(topic)
        .properties(props())
        .dead_letter(DeadLetterConfig::new())
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "300");
    for (k, v) in settings {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    Ok((handle, tokio::spawn(sub.run())))
}

/// The stall of `partition` in `handle`'s health, if it is stalled.
fn stall_of(handle: &SubscriptionHandle, partition: i32) -> Option<(i64, String)> {
    handle
        .health()
        .partitions
        .iter()
        .filter(|p| p.partition == partition)
        .find_map(|p| match &p.not_ready {
            Some(s @ NotReady::Stalled { offset, .. }) => Some((*offset, s.to_string())),
            _ => None,
        })
}

/// A dead-letter topic the principal may not write used to be produced to again
/// forever, silently for health; now its partition stalls visibly at the failed offset
/// and commits nothing past it, the other partition keeps going, and granting the write
/// unblocks the partition without a restart: the task lands in the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_refusing_writes_stalls_only_its_partition_until_allowed(
) -> anyhow::Result<()> {
    init_tracing();
    let cluster = MockCluster::new(1)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic("ff-acl", 2, 1)?;
    cluster.create_topic("ff-acl-dlq", 1, 1)?;
    let p = producer(&bootstrap, None);
    let mut poison_at = 0;
    for i in 0..20 {
        if i == 5 {
            poison_at = put(&p, "ff-acl", 0, "poison", 10).await;
        } else {
            put(&p, "ff-acl", 0, &format!("u{i}"), 10).await;
        }
        put(&p, "ff-acl", 1, &format!("v{i}"), 10).await;
    }
    // From now on every produce is refused as not authorised (the subscription's
    // consumer only fetches and commits).
    let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 500];
    cluster.request_errors(RDKafkaApiKey::Produce, &refused);
    let processor = FailsPoison::default();
    let (handle, running) = start("ff-acl", &bootstrap, "ff-acl", processor.clone(), &[])?;
    let outcome = async {
        assert!(
            wait_until(Duration::from_secs(30), || stall_of(&handle, 0).is_some()).await,
            "partition 0 never reported a stall: {:?}",
            handle.health()
        );
        let (offset, shown) = stall_of(&handle, 0).unwrap();
        assert_eq!(offset, poison_at);
        assert!(
            shown.contains(&format!("ff-acl-0 cannot finish offset {poison_at}")),
            "{shown}"
        );
        assert!(shown.contains("TopicAuthorizationFailed"), "{shown}");
        // Every other task ran, the other partition is committed to its end, and the
        // stalled one never past the poison task.
        assert!(
            wait_until(Duration::from_secs(30), || {
                processor.ok_count() == 39
                    && committed(&bootstrap, "ff-acl", "ff-acl", 2).unwrap()[1].0 == Some(20)
            })
            .await,
            "the other tasks did not finish: {} ok, committed {:?}",
            processor.ok_count(),
            committed(&bootstrap, "ff-acl", "ff-acl", 2)?
        );
        let stalled_at = committed(&bootstrap, "ff-acl", "ff-acl", 2)?[0].0;
        assert!(
            stalled_at.is_none_or(|o| o <= poison_at),
            "committed {stalled_at:?}"
        );
        assert_eq!(handle.stats().dead_lettered, 0);
        // The operator grants the write: the next slow retry gets through.
        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        assert!(
            wait_until(Duration::from_secs(30), || {
                stall_of(&handle, 0).is_none()
                    && committed(&bootstrap, "ff-acl", "ff-acl", 2).unwrap()[0].0 == Some(20)
            })
            .await,
            "never unstalled: {:?}",
            handle.health()
        );
        let dead = read_all(&bootstrap, "ff-acl-dlq", 1, Duration::from_secs(20));
        assert_eq!(dead.len(), 1);
        assert_eq!(text(&dead[0], dead_letter::OFFSET), poison_at.to_string());
        let reason = text(&dead[0], dead_letter::REASON);
        assert!(reason.starts_with("storage says no"), "{reason}");
        assert_eq!(header(&dead[0], ODD_NAME).as_deref(), Some(&b"kept"[..]));
        anyhow::Ok(())
    }
    .await;
    let stats = stop(&handle, running).await;
    outcome?;
    assert_eq!(stats?.dead_lettered, 1);
    Ok(())
}

/// A dead-letter copy is larger than its record (nine headers and the reason): one over
/// `message.max.bytes` used to be produced again forever. Now a reduced copy lands, with
/// the key, the headers byte for byte (a name that is not UTF-8 included), the reason and
/// the value cut to fit. Tasks with such a header name are processed like any other.
async fn oversized_dead_letter_copy(kind: BrokerKind) -> anyhow::Result<()> {
    const LIMIT: usize = 20_000;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("ff-big", 1)?;
    broker.create_topic("ff-big-dlq", 1)?;
    let p = producer(&bootstrap, Some(kind));
    put(&p, "ff-big", 0, "u0", 10).await;
    let poison_at = put(&p, "ff-big", 0, "poison", 30_000).await;
    put(&p, "ff-big", 0, "u1", 10).await;
    let processor = FailsPoison::default();
    let limit = LIMIT.to_string();
    let mut settings = vec![("message.max.bytes", limit.as_str())];
    settings.extend(kind.producer_settings().iter().copied());
    let (handle, running) = start("ff-big", &bootstrap, "ff-big", processor.clone(), &settings)?;
    let outcome = async {
        assert!(
            wait_until(Duration::from_secs(60), || {
                handle.stats().dead_lettered == 1 && processor.ok_count() == 2
            })
            .await,
            "not dead-lettered: {:?}, health {:?}",
            handle.stats(),
            handle.health()
        );
        let dead = read_all(&bootstrap, "ff-big-dlq", 1, Duration::from_secs(20));
        assert_eq!(dead.len(), 1);
        let m = &dead[0];
        assert_eq!(m.key(), Some(&b"poison"[..]));
        let value = m.payload().unwrap_or_default();
        assert!(value.len() < LIMIT, "{} bytes", value.len());
        assert!(
            value.len() > LIMIT / 2,
            "as much as fits is kept: {}",
            value.len()
        );
        assert_eq!(text(m, "decaton-dlq-value-truncated"), "true");
        assert!(text(m, "decaton-dlq-value-size").parse::<usize>()? > 30_000);
        assert_eq!(text(m, dead_letter::OFFSET), poison_at.to_string());
        let reason = text(m, dead_letter::REASON);
        assert!(
            reason.starts_with("storage says no; its dead-letter copy was refused"),
            "{reason}"
        );
        assert_eq!(header(m, ODD_NAME).as_deref(), Some(&b"kept"[..]));
        assert!(header(m, b"dt_meta").is_some());
        anyhow::Ok(())
    }
    .await;
    let stats = stop(&handle, running).await;
    outcome?;
    stats?;
    Ok(())
}

broker_tests!(
    a_dead_letter_copy_over_message_max_bytes_lands_reduced,
    super::oversized_dead_letter_copy
);

/// A failed task waiting for its dead-letter copy's acknowledgement from an unreachable
/// broker used to keep its revoked partition as "predecessor" for up to
/// `message.timeout.ms` (300 s): the same partition assigned straight back stayed
/// not-ready that long. Closing the partition now ends the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_given_back_is_not_held_by_a_forward_waiting_on_an_unreachable_broker(
) -> anyhow::Result<()> {
    init_tracing();
    let cluster = MockCluster::new(2)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic("ff-rb", 2, 1)?;
    cluster.create_topic("ff-rb-dlq", 1, 1)?;
    for p in 0..2 {
        cluster.partition_leader("ff-rb", p, Some(1))?;
    }
    cluster.partition_leader("ff-rb-dlq", 0, Some(2))?;
    cluster.coordinator(MockCoordinator::Group("ff-rb".into()), 1)?;
    let p = producer(&bootstrap, None);
    for partition in 0..2 {
        put(&p, "ff-rb", partition, &format!("poison{partition}"), 10).await;
    }
    // The dead-letter topic's leader goes away: its copies wait for an acknowledgement.
    cluster.broker_down(2)?;
    let member = |name: &str| {
        start(
            "ff-rb",
            &bootstrap,
            "ff-rb",
            FailsPoison::default(),
            &[("client.id", name)],
        )
    };
    let (a, a_run) = member("a")?;
    let mut b = None;
    let outcome = async {
        // Both poison tasks failed and wait for their dead-letter copies.
        assert!(
            wait_until(Duration::from_secs(30), || a.stats().failed == 2).await,
            "A never failed both tasks: {:?}",
            a.stats()
        );
        let (bh, b_run) = member("b")?;
        b = Some((bh.clone(), b_run));
        assert!(
            wait_until(Duration::from_secs(30), || {
                a.stats().assigned_partitions == 1 && bh.stats().assigned_partitions == 1
            })
            .await,
            "the rebalance did not split the partitions: A {:?} B {:?}",
            a.stats(),
            bh.stats()
        );
        // The partition A got back is ready within seconds, not message.timeout.ms.
        let ready = |h: &SubscriptionHandle| {
            let health = h.health();
            health.partitions.len() == 1
                && !matches!(
                    health.partitions[0].not_ready,
                    Some(NotReady::PredecessorRunning { .. })
                )
        };
        assert!(
            wait_until(Duration::from_secs(10), || ready(&a) && ready(&bh)).await,
            "still held by the previous assignment's forward: A {:?} B {:?}",
            a.health(),
            bh.health()
        );
        anyhow::Ok(())
    }
    .await;
    cluster.broker_up(2)?;
    let stop_a = stop(&a, a_run);
    if let Some((bh, b_run)) = b {
        let (ra, rb) = tokio::join!(stop_a, stop(&bh, b_run));
        outcome?;
        ra?;
        rb?;
    } else {
        let ra = stop_a.await;
        outcome?;
        ra?;
    }
    Ok(())
}
