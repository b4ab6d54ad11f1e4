//! Shared pieces of the replicator tests: a mixed chat-operation workload, the routes of
//! the chat example, and reading derived topics back into the order/loss checker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use decaton_client::TaskClient;
use decaton_protocol::headers::raw_headers;
use decaton_protocol::{ChatOp, OpType};
use decaton_testkit::{checker, CheckReport, Processed};
use futures::StreamExt;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

/// The derived topics of the chat example and the operation types each one takes.
pub const ROUTES: [(&str, &[OpType]); 3] = [
    ("chat-messages", &[OpType::SendMessage, OpType::Read]),
    (
        "chat-social",
        &[
            OpType::AddFriend,
            OpType::Block,
            OpType::JoinRoom,
            OpType::LeaveRoom,
        ],
    ),
    ("chat-profile", &[OpType::UpdateProfile]),
];

/// The chat example's replicator configuration (`examples/config/chat-replicator.toml`,
/// whose routes are [`ROUTES`]) for `bootstrap` and consumer group `group`, committing
/// every 200 ms, with `extra` added to the top-level settings.
pub fn chat_config(bootstrap: &str, group: &str, extra: &str) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/config/chat-replicator.toml"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let replaced = text
        .replace(
            "bootstrap_servers = \"127.0.0.1:9092\"",
            &format!("bootstrap_servers = \"{bootstrap}\""),
        )
        .replace(
            "group = \"chat-replicator\"",
            &format!("group = \"{group}\"\n{extra}"),
        )
        .replace("commit_interval_ms = 1000", "commit_interval_ms = 200");
    assert!(
        replaced.contains(bootstrap) && replaced.contains("commit_interval_ms = 200"),
        "the example config changed shape"
    );
    replaced
}

/// Operation type of the `seq`-th operation of `user`: a fixed, mixed pattern.
pub fn op_type(user: u64, seq: u64) -> OpType {
    match (user * 7 + seq * 13) % 20 {
        0..=8 => OpType::SendMessage,
        9..=12 => OpType::Read,
        13 => OpType::AddFriend,
        14 => OpType::Block,
        15 | 16 => OpType::JoinRoom,
        17 => OpType::LeaveRoom,
        _ => OpType::UpdateProfile,
    }
}

/// Puts `ops` operations round-robin over `users` users (op i -> user i % users, sequence
/// i / users) from index `from`, and returns every operation put.
pub async fn put_ops(
    bootstrap: &str,
    settings: &[(&str, &str)],
    topic: &str,
    range: std::ops::Range<u64>,
    users: u64,
) -> anyhow::Result<Vec<ChatOp>> {
    let mut builder = TaskClient::<ChatOp>::builder(bootstrap, topic).application_id("it");
    for (k, v) in settings {
        builder = builder.set(*k, *v);
    }
    let client = builder.build()?;
    let ops: Vec<ChatOp> = range
        .map(|i| {
            let (user, seq) = (i % users, i / users);
            ChatOp {
                user_id: format!("user-{user}"),
                op: op_type(user, seq) as i32,
                target_id: format!("room-{}", user % 13),
                payload: b"hi".to_vec(),
                sequence: seq,
                created_at_millis: 1,
            }
        })
        .collect();
    let results: Vec<_> = futures::stream::iter(ops.iter())
        .map(|op| {
            let client = &client;
            async move { client.put(op.user_id.clone(), op).await }
        })
        .buffered(5_000)
        .collect()
        .await;
    for r in results {
        r?;
    }
    client.flush(Duration::from_secs(30)).await?;
    Ok(ops)
}

/// One derived record as read back.
#[derive(Debug, Clone)]
pub struct ReadBack {
    /// The record key.
    pub key: String,
    /// The operation it carries.
    pub op: ChatOp,
    /// Its headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads every partition of `topic` from the beginning to its end (`read_committed`
/// when `committed`), each partition in offset order, partitions one after another.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    committed: bool,
    timeout: Duration,
) -> anyhow::Result<Vec<ReadBack>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "read-back")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set(
            "isolation.level",
            if committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut per_partition: HashMap<i32, Vec<ReadBack>> = HashMap::new();
    let mut at_end: std::collections::HashSet<i32> = Default::default();
    let deadline = Instant::now() + timeout;
    while at_end.len() < partitions.len() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading {topic}: not at the end after {timeout:?}"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                let meta = m.headers().and_then(|h| {
                    raw_headers(h)
                        .find(|h| h.is("dt_meta"))
                        .and_then(|h| h.value)
                });
                let task = decaton_protocol::decode_record(meta, m.payload())?;
                let op = ChatOp::decode(&*task.task)?;
                let headers = m
                    .headers()
                    .map(|h| {
                        raw_headers(h)
                            .map(|h| (h.name_lossy().into_owned(), h.value.unwrap_or(&[]).to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                per_partition
                    .entry(m.partition())
                    .or_default()
                    .push(ReadBack {
                        key: String::from_utf8_lossy(m.key().unwrap_or(&[])).into_owned(),
                        op,
                        headers,
                    });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    let mut out = Vec::new();
    let mut keys: Vec<_> = per_partition.into_iter().collect();
    keys.sort_by_key(|(p, _)| *p);
    for (_, v) in keys {
        out.extend(v);
    }
    Ok(out)
}

/// Checks a derived topic against the operations of `ops` whose type is in `types`:
/// every one present (by key and sequence), nothing else, per-key order kept. The
/// checker numbers a key's tasks from 0, so each matching operation is checked as its
/// rank among the key's matching operations.
pub fn check_derived(ops: &[ChatOp], types: &[OpType], derived: &[ReadBack]) -> CheckReport {
    let mut rank: HashMap<(String, u64), u64> = HashMap::new();
    let mut expected: HashMap<String, u64> = HashMap::new();
    for op in ops.iter().filter(|o| types.contains(&o.op())) {
        let n = expected.entry(op.user_id.clone()).or_default();
        rank.insert((op.user_id.clone(), op.sequence), *n);
        *n += 1;
    }
    let log: Vec<Processed> = derived
        .iter()
        .map(|r| {
            let key = if r.key == r.op.user_id {
                r.key.clone()
            } else {
                format!("wrong-key:{}", r.key)
            };
            Processed {
                sequence: rank
                    .get(&(key.clone(), r.op.sequence))
                    .copied()
                    .unwrap_or(u64::MAX),
                key,
                instance: "derived".into(),
            }
        })
        .collect();
    checker::check(&expected, &log)
}
