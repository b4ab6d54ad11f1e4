#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]
//! Hostile input: records that no well-behaved Decaton producer writes, but that any
//! client with write access to a topic can.
//!
//! A property test writes, per case, a mix of valid tasks (a few keys, each with its own
//! sequence) and hostile records straight through rdkafka producers: header names that
//! are not UTF-8 or empty, 64 KiB header names and values, null, empty, binary and 64 KiB
//! keys, values from 0 bytes up to just under the producer's `message.max.bytes`,
//! tombstones, a `dt_meta` that is garbage, metadata timestamps, schedules and retry
//! counts at the extremes of `i64`, record timestamps at the extremes, batches compressed
//! with gzip, lz4 and zstd (when the build has it), transaction markers (control records,
//! which no consumer receives) written with a Produce request of their own, and, on the
//! mock cluster (Tansu has no transactions), transactional batches: one aborted and one
//! committed transaction. Valid tasks carry hostile
//! headers too. Some hostile tasks always fail, so their records are copied to the retry
//! and dead-letter topics.
//!
//! One subscription (with a retry and a dead-letter topic) runs through all cases of a
//! broker. After every case:
//!
//! * the subscription is still running;
//! * every valid task ran exactly once, in per-key order (the testkit checker);
//! * every hostile record the broker accepted was either processed once or dead-lettered
//!   once with a reason, never both and never neither; the ones whose fate is certain
//!   (a decodable task is processed, a tombstone or a schedule beyond
//!   `max_scheduled_delay` is dead-lettered as `discarded`, a failing task is
//!   dead-lettered) met it;
//! * an aborted transaction's tasks ran all once in order or not at all (the mock cluster
//!   delivers them; see `Suite::transactions`).
//!
//! At the end, the committed positions of the source and retry topics reach their log
//! ends: no partition was left stalled behind a record, and nothing was committed early.
//!
//! `hostile_records_*` run 24 cases per broker; the `--ignored` variants run
//! `HOSTILE_CASES` cases (default 300).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use decaton_integration_tests::{committed, init_tracing};
use decaton_processor::{
    Backoff, DeadLetterConfig, ProcessError, ProcessingContext, ProcessorProperties, RetryConfig,
    Subscription, SubscriptionHandle, TaskProcessor,
};
use decaton_protocol::headers::{add_raw_header, message_headers};
use decaton_protocol::{
    dead_letter, encode_legacy_envelope, encode_metadata, now_millis, ChatOp, TaskMetadata,
    METADATA_HEADER,
};
use decaton_testkit::{checker, BrokerKind, Processed, TestBroker};
use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

const SOURCE: &str = "hostile";
const RETRY: &str = "hostile-retry";
const DLQ: &str = "hostile-dlq";
const GROUP: &str = "hostile";
const PARTITIONS: i32 = 3;
/// librdkafka's default `message.max.bytes`: what the test's producers and the
/// subscription's own producers accept.
const MAX_RECORD: usize = 1_000_000;
/// librdkafka's worst-case framing of one record, counted against `message.max.bytes`
/// (rounded up).
const RECORD_OVERHEAD: usize = 48;
const HUGE: usize = 64 * 1024;
/// How long one case may take to settle before it counts as failed.
const CASE_WAIT: Duration = Duration::from_secs(30);
/// Names the failing task a record carries, so that its retry and dead-letter copies can
/// be told apart (their offsets are not the source's).
const ID_HEADER: &[u8] = b"hostile-id";
/// The subscription's default `max_scheduled_delay`.
const MAX_DELAY_MS: i64 = 30 * 24 * 3600 * 1000;

// ---------------------------------------------------------------------------------------
// What a case is made of.

/// Bytes of a key, header name, header value or value; the large ones are described
/// rather than held, so a failing case prints in a few lines.
#[derive(Debug, Clone)]
enum Blob {
    Null,
    Empty,
    Bytes(Vec<u8>),
    /// 64 KiB of one byte.
    Huge(u8),
}

impl Blob {
    fn get(&self) -> Option<Vec<u8>> {
        match self {
            Blob::Null => None,
            Blob::Empty => Some(Vec::new()),
            Blob::Bytes(b) => Some(b.clone()),
            Blob::Huge(b) => Some(vec![*b; HUGE]),
        }
    }
}

#[derive(Debug, Clone)]
struct Header {
    /// Never null; may be empty, not UTF-8, or 64 KiB. No NUL byte: librdkafka keeps
    /// header names as C strings.
    name: Blob,
    value: Blob,
}

/// Where (and whether) a record carries its metadata.
#[derive(Debug, Clone)]
enum Carrier {
    /// A valid `dt_meta` header with these fields; the value is the task.
    Header(MetaFields),
    /// A `dt_meta` header holding these bytes; the value is the task.
    GarbageHeader(Vec<u8>),
    /// No header: the value is a legacy envelope holding these fields and the task.
    Legacy(MetaFields),
    /// No metadata at all: the value is whatever `value` says.
    Bare,
}

#[derive(Debug, Clone, Copy)]
struct MetaFields {
    timestamp: i64,
    scheduled: i64,
    retry_count: i64,
}

impl MetaFields {
    fn encode(&self) -> TaskMetadata {
        TaskMetadata {
            timestamp_millis: self.timestamp,
            source_application_id: "hostile".into(),
            source_instance_id: "hostile-\u{fffd}".into(),
            retry_count: self.retry_count,
            scheduled_time_millis: self.scheduled,
        }
    }
}

/// The record's value.
#[derive(Debug, Clone)]
enum Value {
    /// A tombstone.
    Null,
    /// Zero bytes (a default task when it decodes).
    Empty,
    /// Random bytes.
    Garbage(Vec<u8>),
    /// This record's own task, with a payload of this many bytes.
    Task(usize),
    /// This record's own task, padded so that the record is `margin` bytes under
    /// `message.max.bytes`: its dead-letter copy (nine more headers) is always too large.
    NearLimit(usize),
}

/// A record timestamp. librdkafka replaces 0 with the current time, so the extremes are
/// 1, `i64::MAX`, and negative values.
#[derive(Debug, Clone, Copy)]
enum Stamp {
    Now,
    At(i64),
}

#[derive(Debug, Clone)]
struct HostileRecord {
    key: Blob,
    headers: Vec<Header>,
    carrier: Carrier,
    value: Value,
    stamp: Stamp,
    /// The processor fails this task every time (it goes to the retry topic, then to the
    /// dead-letter topic).
    fail: bool,
}

#[derive(Debug, Clone)]
enum Item {
    /// The next task of valid key `key` (0..4), with hostile headers.
    Valid {
        key: u8,
        headers: Vec<Header>,
    },
    Hostile(HostileRecord),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Codec {
    None,
    Gzip,
    Lz4,
    Zstd,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Gzip => "gzip",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    codec: Codec,
    items: Vec<Item>,
    /// Write an aborted and a committed transaction (mock cluster only) and two
    /// transaction markers after the items.
    transactions: bool,
}

fn blob_small() -> impl Strategy<Value = Blob> {
    prop_oneof![
        Just(Blob::Null),
        Just(Blob::Empty),
        prop::collection::vec(any::<u8>(), 1..24).prop_map(Blob::Bytes),
        Just(Blob::Huge(0xa5)),
    ]
}

fn header_name() -> impl Strategy<Value = Blob> {
    prop_oneof![
        // Lone continuation bytes and 0xf8..0xff never make UTF-8.
        3 => prop::collection::vec(0x80u8..=0xff, 1..8).prop_map(Blob::Bytes),
        1 => Just(Blob::Empty),
        2 => "[a-z][a-z0-9-]{0,11}".prop_map(|s| Blob::Bytes(s.into_bytes())),
        // A name that is valid UTF-8 around invalid bytes, and one that looks like ours.
        1 => Just(Blob::Bytes(b"dt_meta\xff".to_vec())),
        1 => Just(Blob::Bytes(b"decaton-dlq-reason\xc3".to_vec())),
        1 => Just(Blob::Huge(0xfe)),
    ]
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    prop::collection::vec(
        (header_name(), blob_small()).prop_map(|(name, value)| Header { name, value }),
        0..4,
    )
}

fn extreme() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0),
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(1),
        any::<i64>(),
    ]
}

fn meta_fields() -> impl Strategy<Value = MetaFields> {
    (extreme(), extreme(), extreme()).prop_map(|(timestamp, scheduled, retry_count)| MetaFields {
        timestamp,
        scheduled,
        retry_count,
    })
}

fn hostile_record() -> impl Strategy<Value = HostileRecord> {
    let key = prop_oneof![
        Just(Blob::Null),
        Just(Blob::Empty),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Blob::Bytes),
        Just(Blob::Huge(0xff)),
    ];
    let carrier = prop_oneof![
        4 => meta_fields().prop_map(Carrier::Header),
        2 => prop::collection::vec(any::<u8>(), 0..24).prop_map(Carrier::GarbageHeader),
        2 => meta_fields().prop_map(Carrier::Legacy),
        1 => Just(Carrier::Bare),
    ];
    let value = prop_oneof![
        1 => Just(Value::Null),
        1 => Just(Value::Empty),
        2 => prop::collection::vec(any::<u8>(), 1..48).prop_map(Value::Garbage),
        4 => (0usize..2048).prop_map(Value::Task),
        1 => Just(Value::Task(HUGE)),
        1 => (8usize..200).prop_map(Value::NearLimit),
    ];
    let stamp = prop_oneof![
        6 => Just(Stamp::Now),
        1 => Just(Stamp::At(1)),
        1 => Just(Stamp::At(i64::MAX)),
        1 => Just(Stamp::At(-2)),
        1 => Just(Stamp::At(i64::MIN)),
    ];
    (
        key,
        headers(),
        carrier,
        value,
        stamp,
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(key, headers, carrier, value, stamp, fail)| HostileRecord {
                key,
                headers,
                carrier,
                value,
                stamp,
                fail,
            },
        )
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let item = prop_oneof![
        3 => (0u8..4, headers()).prop_map(|(key, headers)| Item::Valid { key, headers }),
        2 => hostile_record().prop_map(Item::Hostile),
    ];
    let codec = prop_oneof![
        Just(Codec::None),
        Just(Codec::Gzip),
        Just(Codec::Lz4),
        Just(Codec::Zstd),
    ];
    (
        codec,
        prop::collection::vec(item, 4..24),
        prop::bool::weighted(0.5),
    )
        .prop_map(|(codec, items, transactions)| Case {
            codec,
            items,
            transactions,
        })
        // Keep each case to at most one record near the size limit: the mock cluster
        // keeps about 5 MB per partition.
        .prop_filter("at most one record near the size limit", |c| {
            c.items
                .iter()
                .filter(|i| {
                    matches!(
                        i,
                        Item::Hostile(HostileRecord {
                            value: Value::NearLimit(_),
                            ..
                        })
                    )
                })
                .count()
                <= 1
        })
}

// ---------------------------------------------------------------------------------------
// The processor and what it saw.

#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    partition: i32,
    offset: i64,
    user_id: String,
    sequence: u64,
    ok: bool,
}

#[derive(Default)]
struct Log {
    seen: Mutex<Vec<Seen>>,
}

/// Records every task it is given; fails the tasks whose user id starts with `fail-`.
struct HostileProcessor(Arc<Log>);

#[async_trait]
impl TaskProcessor<ChatOp> for HostileProcessor {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let ok = !task.user_id.starts_with("fail-");
        self.0.seen.lock().push(Seen {
            topic: ctx.topic().to_string(),
            partition: ctx.partition(),
            offset: ctx.offset(),
            user_id: task.user_id,
            sequence: task.sequence,
            ok,
        });
        if ok {
            Ok(())
        } else {
            Err(ProcessError::new("this task always fails"))
        }
    }
}

/// One record of the dead-letter topic, as the test needs it.
#[derive(Debug, Clone)]
struct DeadLetter {
    from_topic: String,
    from_partition: Option<i32>,
    from_offset: Option<i64>,
    id: Option<String>,
    reason: String,
    kind: String,
    /// A reduced copy: the value was cut to fit.
    truncated: bool,
}

/// Reads the dead-letter topic on its own thread for as long as the suite runs.
struct DeadLetterReader {
    records: Arc<Mutex<Vec<DeadLetter>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl DeadLetterReader {
    fn start(bootstrap: &str) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "hostile-dlq-reader")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        consumer.subscribe(&[DLQ])?;
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (records, stop) = (records.clone(), stop.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let m = m?;
                    // Read as bytes: the original record's header names come along.
                    let headers = message_headers(&m);
                    let text = |name: &str| {
                        headers
                            .iter()
                            .find(|h| h.is(name))
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    };
                    let id = headers
                        .iter()
                        .find(|h| h.name == ID_HEADER)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    records.lock().push(DeadLetter {
                        from_topic: text(dead_letter::TOPIC).unwrap_or_default(),
                        from_partition: text(dead_letter::PARTITION).and_then(|p| p.parse().ok()),
                        from_offset: text(dead_letter::OFFSET).and_then(|p| p.parse().ok()),
                        id,
                        reason: text(dead_letter::REASON).unwrap_or_default(),
                        kind: text(dead_letter::KIND).unwrap_or_default(),
                        truncated: text("decaton-dlq-value-truncated").as_deref() == Some("true"),
                    });
                }
                Ok(())
            })
        };
        Ok(DeadLetterReader {
            records,
            stop,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("dead-letter reader panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for DeadLetterReader {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Producing a case.

/// What the test knows about a hostile record it wrote.
#[derive(Debug, Clone)]
struct Written {
    /// `c<case>-h<index>`.
    id: String,
    partition: i32,
    offset: i64,
    expect: Expect,
    record: HostileRecord,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Processed,
    /// Dead-lettered, with this kind when it is known.
    DeadLettered(Option<&'static str>),
    /// Either, once: random bytes may or may not decode.
    Either,
}

fn expectation(r: &HostileRecord) -> Expect {
    let decodable = |m: &MetaFields, task: bool| {
        if m.scheduled > now_millis().saturating_add(MAX_DELAY_MS) {
            Expect::DeadLettered(Some("discarded"))
        } else if task && r.fail {
            Expect::DeadLettered(None)
        } else {
            Expect::Processed
        }
    };
    let is_task = matches!(r.value, Value::Task(_) | Value::NearLimit(_));
    match (&r.carrier, &r.value) {
        // No value, no task, whatever the headers say.
        (_, Value::Null) => Expect::DeadLettered(Some("discarded")),
        (Carrier::Header(m) | Carrier::Legacy(m), _) if is_task => decodable(m, true),
        // An empty task decodes as the default task.
        (Carrier::Header(m) | Carrier::Legacy(m), Value::Empty) => decodable(m, false),
        // An empty value is an envelope without metadata.
        (Carrier::Bare, Value::Empty) => Expect::DeadLettered(Some("discarded")),
        _ => Expect::Either,
    }
}

fn task_bytes(user_id: &str, sequence: u64, payload: usize) -> Vec<u8> {
    ChatOp {
        user_id: user_id.into(),
        op: 1,
        target_id: "room".into(),
        payload: vec![0x5a; payload],
        sequence,
        created_at_millis: now_millis(),
    }
    .encode_to_vec()
}

fn header_size(name: usize, value: usize) -> usize {
    // Two varints of at most five bytes each.
    name + value + 10
}

/// Header names and values as written.
type RawHeaders = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The key, headers and value of a hostile record.
fn build(r: &HostileRecord, id: &str) -> (Option<Vec<u8>>, RawHeaders, Option<Vec<u8>>) {
    let key = r.key.get();
    let mut headers: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    match &r.carrier {
        Carrier::Header(m) => headers.push((
            METADATA_HEADER.as_bytes().to_vec(),
            Some(encode_metadata(&m.encode())),
        )),
        Carrier::GarbageHeader(g) => {
            headers.push((METADATA_HEADER.as_bytes().to_vec(), Some(g.clone())))
        }
        Carrier::Legacy(_) | Carrier::Bare => {}
    }
    for h in &r.headers {
        headers.push((h.name.get().unwrap_or_default(), h.value.get()));
    }
    if r.fail {
        headers.push((ID_HEADER.to_vec(), Some(id.as_bytes().to_vec())));
    }
    let user_id = if r.fail {
        format!("fail-{id}")
    } else {
        format!("h-{id}")
    };
    let wrap = |task: Vec<u8>| match &r.carrier {
        Carrier::Legacy(m) => encode_legacy_envelope(&m.encode(), &task),
        _ => task,
    };
    let value = match &r.value {
        Value::Null => None,
        Value::Empty => Some(wrap(Vec::new())),
        Value::Garbage(g) => Some(wrap(g.clone())),
        Value::Task(n) => Some(wrap(task_bytes(&user_id, 0, *n))),
        Value::NearLimit(margin) => {
            let fixed = key.as_ref().map_or(0, Vec::len)
                + headers
                    .iter()
                    .map(|(n, v)| header_size(n.len(), v.as_ref().map_or(0, Vec::len)))
                    .sum::<usize>()
                + RECORD_OVERHEAD;
            let target = MAX_RECORD - margin - fixed;
            let base = wrap(task_bytes(&user_id, 0, 0)).len();
            // The payload's own length prefix grows by up to three bytes.
            let mut task = wrap(task_bytes(&user_id, 0, target.saturating_sub(base + 3)));
            while task.len() > target {
                let shorter = target.saturating_sub(base + 3 + (task.len() - target));
                task = wrap(task_bytes(&user_id, 0, shorter));
            }
            Some(task)
        }
    };
    (key, headers, value)
}

fn owned_headers(headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> OwnedHeaders {
    headers
        .iter()
        .fold(OwnedHeaders::new(), |acc, (name, value)| {
            add_raw_header(acc, name, value.as_deref())
        })
}

fn valid_meta() -> Vec<u8> {
    encode_metadata(&TaskMetadata {
        timestamp_millis: now_millis(),
        source_application_id: "hostile".into(),
        source_instance_id: "hostile-1".into(),
        retry_count: 0,
        scheduled_time_millis: 0,
    })
}

// ---------------------------------------------------------------------------------------
// The suite.

struct Suite {
    kind: BrokerKind,
    bootstrap: String,
    handle: SubscriptionHandle,
    running: Mutex<
        Option<
            tokio::task::JoinHandle<
                Result<decaton_processor::SubscriptionStats, decaton_processor::SubscriptionError>,
            >,
        >,
    >,
    log: Arc<Log>,
    dead_letters: Mutex<DeadLetterReader>,
    producers: Mutex<HashMap<Codec, FutureProducer>>,
    /// Cases run so far (a case's keys and ids carry its number).
    cases: AtomicU64,
    /// Valid keys -> tasks written, over all cases.
    expected: Mutex<HashMap<String, u64>>,
    written: Mutex<Vec<Written>>,
    /// Hostile records the broker (or the producer) refused, with the error.
    refused: Mutex<Vec<(HostileRecord, String)>>,
    /// Tasks written in aborted transactions (user ids).
    aborted: Mutex<HashSet<String>>,
    /// (partition, offset) of the transaction markers written into the source.
    markers: Mutex<HashSet<(i32, i64)>>,
    zstd: bool,
}

impl Suite {
    async fn start(broker: &TestBroker) -> anyhow::Result<Suite> {
        let bootstrap = broker.bootstrap_servers();
        let kind = broker.kind();
        broker.create_topic(SOURCE, PARTITIONS)?;
        broker.create_topic(RETRY, PARTITIONS)?;
        broker.create_topic(DLQ, 1)?;
        let log = Arc::new(Log::default());
        let mut props = ProcessorProperties::default();
        props.commit_interval = Duration::from_millis(100);
        let mut builder = Subscription::builder(GROUP, HostileProcessor(log.clone()))
            .bootstrap_servers(&bootstrap)
            .topic(SOURCE)
            .properties(props)
            .retry(
                RetryConfig::new()
                    .backoff(Backoff::fixed(Duration::from_millis(20)))
                    .max_retries(1),
            )
            .dead_letter(DeadLetterConfig::new());
        for (k, v) in kind.producer_settings() {
            builder = builder.set(*k, *v);
        }
        let sub = builder.build()?;
        let handle = sub.handle();
        let running = tokio::spawn(sub.run());
        let dead_letters = DeadLetterReader::start(&bootstrap)?;
        let zstd = producer(&bootstrap, kind, Codec::Zstd).is_ok();
        if !zstd {
            println!(
                "{}: librdkafka built without zstd; zstd cases use gzip",
                kind.name()
            );
        }
        let suite = Suite {
            kind,
            bootstrap,
            handle,
            running: Mutex::new(Some(running)),
            log,
            dead_letters: Mutex::new(dead_letters),
            producers: Mutex::new(HashMap::new()),
            cases: AtomicU64::new(0),
            expected: Mutex::new(HashMap::new()),
            written: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
            aborted: Mutex::new(HashSet::new()),
            markers: Mutex::new(HashSet::new()),
            zstd,
        };
        // Cases start once the source partitions are assigned, so a case's wait measures
        // processing, not the group join.
        let deadline = Instant::now() + Duration::from_secs(60);
        while suite.handle.stats().assigned_partitions < (2 * PARTITIONS) as u64 {
            suite.alive().await?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "partitions never assigned: {:?}",
                suite.handle.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // polling a condition
        }
        Ok(suite)
    }

    /// Fails when the subscription has stopped.
    async fn alive(&self) -> anyhow::Result<()> {
        let finished = {
            let mut running = self.running.lock();
            match running.as_ref() {
                Some(r) if !r.is_finished() => None,
                _ => Some(running.take()),
            }
        };
        let Some(finished) = finished else {
            return Ok(());
        };
        let result = match finished {
            Some(r) => format!("{:?}", r.await),
            None => "already stopped".into(),
        };
        anyhow::bail!(
            "the subscription stopped: {result}; health {:?}",
            self.handle.health()
        )
    }

    fn producer(&self, codec: Codec) -> anyhow::Result<FutureProducer> {
        let codec = if codec == Codec::Zstd && !self.zstd {
            Codec::Gzip
        } else {
            codec
        };
        let mut producers = self.producers.lock();
        if let Some(p) = producers.get(&codec) {
            return Ok(p.clone());
        }
        let p = producer(&self.bootstrap, self.kind, codec)?;
        producers.insert(codec, p.clone());
        Ok(p)
    }

    async fn run_case(&self, case: Case) -> anyhow::Result<()> {
        self.alive().await?;
        let n = self.cases.fetch_add(1, Ordering::SeqCst);
        let producer = self.producer(case.codec)?;
        let meta = valid_meta();
        // Valid tasks go first to last through one producer, so each key's tasks are in
        // the topic in sequence order.
        let mut sends = Vec::new();
        let mut next_seq: HashMap<String, u64> = HashMap::new();
        let mut hostile = Vec::new();
        for (i, item) in case.items.iter().enumerate() {
            match item {
                Item::Valid { key, headers } => {
                    let user = format!("c{n}-u{key}");
                    let seq = next_seq.entry(user.clone()).or_default();
                    let value = task_bytes(&user, *seq, 16);
                    *seq += 1;
                    let mut hs = vec![(METADATA_HEADER.as_bytes().to_vec(), Some(meta.clone()))];
                    hs.extend(
                        headers
                            .iter()
                            .map(|h| (h.name.get().unwrap_or_default(), h.value.get())),
                    );
                    let record = FutureRecord::to(SOURCE)
                        .key(user.as_bytes())
                        .payload(&value)
                        .headers(owned_headers(&hs));
                    let sent = producer
                        .send_result(record)
                        .map_err(|(e, _)| anyhow::anyhow!("valid task {user}: {e}"))?;
                    sends.push((None, sent));
                }
                Item::Hostile(r) => {
                    let id = format!("c{n}-h{i}");
                    let (key, headers, value) = build(r, &id);
                    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(SOURCE);
                    if let Some(k) = &key {
                        record = record.key(k.as_slice());
                    }
                    if let Some(v) = &value {
                        record = record.payload(v.as_slice());
                    }
                    if !headers.is_empty() {
                        record = record.headers(owned_headers(&headers));
                    }
                    if let Stamp::At(ts) = r.stamp {
                        record = record.timestamp(ts);
                    }
                    match producer.send_result(record) {
                        Ok(sent) => sends.push((Some(hostile.len()), sent)),
                        Err((e, _)) => self.refused.lock().push((r.clone(), e.to_string())),
                    }
                    hostile.push((id, r.clone()));
                }
            }
        }
        let mut mine = Vec::new();
        for (which, sent) in sends {
            let delivered = sent.await?;
            match (which, delivered) {
                (None, Ok(_)) => {}
                (None, Err((e, _))) => anyhow::bail!("a valid task was not written: {e}"),
                (Some(h), Ok(d)) => {
                    let (id, record) = &hostile[h];
                    mine.push(Written {
                        id: id.clone(),
                        partition: d.partition,
                        offset: d.offset,
                        expect: expectation(record),
                        record: record.clone(),
                    });
                }
                (Some(h), Err((e, _))) => self
                    .refused
                    .lock()
                    .push((hostile[h].1.clone(), e.to_string())),
            }
        }
        {
            let mut expected = self.expected.lock();
            for (user, count) in next_seq {
                expected.insert(user, count);
            }
        }
        if case.transactions {
            if self.kind == BrokerKind::Embedded {
                self.transactions(n).await?;
            }
            // Real markers: holes in the source's offsets that no consumer receives.
            let bootstrap = self.bootstrap.clone();
            let partition = (n % PARTITIONS as u64) as i32;
            let offsets = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i64>> {
                Ok(vec![
                    write_marker(&bootstrap, SOURCE, partition, false)?,
                    write_marker(&bootstrap, SOURCE, partition, true)?,
                ])
            })
            .await??;
            self.markers
                .lock()
                .extend(offsets.into_iter().map(|o| (partition, o)));
        }
        self.written.lock().extend(mine.iter().cloned());
        self.settle(n, &mine).await
    }

    /// An aborted transaction of three tasks, then a committed one of three tasks of
    /// another key, into one partition: transactional batches in the source.
    ///
    /// librdkafka's mock cluster accepts transactions but writes no commit or abort
    /// markers and lists no aborted transactions in its fetch responses
    /// (`rdkafka_mock_handlers.c`: `EndTxn` only answers; `#Aborted` is always 0), so a
    /// `read_committed` consumer gets the aborted records there too.
    async fn transactions(&self, n: u64) -> anyhow::Result<()> {
        let bootstrap = self.bootstrap.clone();
        let meta = valid_meta();
        let partition = (n % PARTITIONS as u64) as i32;
        let aborted_user = format!("c{n}-aborted");
        let committed_user = format!("c{n}-txn");
        {
            let aborted_user = aborted_user.clone();
            let committed_user = committed_user.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let p: FutureProducer = ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("transactional.id", format!("hostile-{n}"))
                    .create()?;
                let timeout = Duration::from_secs(20);
                p.init_transactions(timeout)?;
                for (user, commit) in [(&aborted_user, false), (&committed_user, true)] {
                    p.begin_transaction()?;
                    let mut sends = Vec::new();
                    for seq in 0..3 {
                        let value = task_bytes(user, seq, 8);
                        let hs = vec![(METADATA_HEADER.as_bytes().to_vec(), Some(meta.clone()))];
                        let record = FutureRecord::to(SOURCE)
                            .partition(partition)
                            .key(user.as_bytes())
                            .payload(&value)
                            .headers(owned_headers(&hs));
                        sends.push(p.send_result(record).map_err(|(e, _)| e)?);
                    }
                    p.flush(timeout)?;
                    for s in sends {
                        futures::executor::block_on(s)?.map_err(|(e, _)| e)?;
                    }
                    if commit {
                        p.commit_transaction(timeout)?;
                    } else {
                        p.abort_transaction(timeout)?;
                    }
                }
                Ok(())
            })
            .await??;
        }
        self.aborted.lock().insert(aborted_user);
        self.expected.lock().insert(committed_user, 3);
        Ok(())
    }

    /// Waits until case `n` is settled: its valid tasks processed, its hostile records
    /// processed or dead-lettered; then checks it.
    async fn settle(&self, n: u64, mine: &[Written]) -> anyhow::Result<()> {
        let prefix = format!("c{n}-");
        let deadline = Instant::now() + CASE_WAIT;
        loop {
            self.alive().await?;
            let outcome = self.outcome(&prefix, mine);
            if outcome.settled() {
                return outcome.verify();
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "case {n} not settled after {CASE_WAIT:?}: {}\nstats {:?}\nhealth {:?}",
                    outcome.describe(),
                    self.handle.stats(),
                    self.handle.health()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // polling a condition
        }
    }

    /// What happened so far to the tasks and records whose ids start with `prefix`.
    fn outcome(&self, prefix: &str, mine: &[Written]) -> Outcome {
        let seen = self.log.seen.lock().clone();
        let dead = self.dead_letters.lock().records.lock().clone();
        let expected: HashMap<String, u64> = self
            .expected
            .lock()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let valid: Vec<Processed> = seen
            .iter()
            .filter(|s| s.ok && expected.contains_key(&s.user_id))
            .map(|s| Processed {
                key: s.user_id.clone(),
                sequence: s.sequence,
                instance: "i".into(),
            })
            .collect();
        let report = checker::check(&expected, &valid);
        // The mock cluster lists no aborted transactions in its fetch responses (see
        // `transactions`), so an aborted transaction's tasks reach the consumer there: all
        // of them once in order, or none; never a part of them, never twice.
        let aborted_ran = {
            let aborted = self.aborted.lock();
            let mut runs: HashMap<&str, Vec<u64>> = HashMap::new();
            for s in seen.iter().filter(|s| aborted.contains(&s.user_id)) {
                runs.entry(&s.user_id).or_default().push(s.sequence);
            }
            runs.into_iter()
                .filter(|(_, seqs)| *seqs != [0, 1, 2])
                .map(|(user, seqs)| format!("{user}: {seqs:?}"))
                .collect()
        };
        let hostile = mine
            .iter()
            .map(|w| {
                let processed = seen
                    .iter()
                    .filter(|s| {
                        s.ok && s.topic == SOURCE
                            && s.partition == w.partition
                            && s.offset == w.offset
                    })
                    .count();
                let letters: Vec<DeadLetter> = dead
                    .iter()
                    .filter(|d| {
                        d.id.as_deref() == Some(w.id.as_str())
                            || (d.from_topic == SOURCE
                                && d.from_partition == Some(w.partition)
                                && d.from_offset == Some(w.offset))
                    })
                    .cloned()
                    .collect();
                (w.clone(), processed, letters)
            })
            .collect();
        // Dead letters of valid tasks: none may exist.
        let valid_dead = dead
            .iter()
            .filter(|d| {
                d.from_topic == SOURCE
                    && seen.iter().any(|s| {
                        expected.contains_key(&s.user_id)
                            && Some(s.partition) == d.from_partition
                            && Some(s.offset) == d.from_offset
                            && s.topic == SOURCE
                    })
            })
            .count();
        Outcome {
            report,
            hostile,
            aborted_ran,
            valid_dead,
        }
    }

    /// After the last case: the committed positions reach the log ends, the subscription
    /// stops cleanly, and a last look over everything finds no late duplicate.
    async fn finish(&self) -> anyhow::Result<()> {
        self.alive().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        for topic in [SOURCE, RETRY] {
            loop {
                let ends = log_ends(&self.bootstrap, topic)?;
                let positions: Vec<Option<i64>> =
                    committed(&self.bootstrap, GROUP, topic, PARTITIONS)?
                        .into_iter()
                        .map(|(o, _)| o)
                        .collect();
                // A consumer never receives a marker: a partition whose last records are
                // markers is caught up at the record before them.
                let markers = self.markers.lock().clone();
                let caught_up = ends
                    .iter()
                    .zip(&positions)
                    .enumerate()
                    .all(|(p, (end, pos))| {
                        *end == 0
                            || pos.is_some_and(|pos| {
                                pos <= *end
                                    && (pos..*end).all(|o| {
                                        topic == SOURCE && markers.contains(&(p as i32, o))
                                    })
                            })
                    });
                if caught_up {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{topic}: committed {positions:?}, log ends {ends:?}; stats {:?} health {:?}",
                    self.handle.stats(),
                    self.handle.health()
                );
                tokio::time::sleep(Duration::from_millis(100)).await; // polling the broker
            }
        }
        self.handle.shutdown();
        let running = self.running.lock().take();
        let Some(running) = running else {
            anyhow::bail!("the subscription stopped before the end");
        };
        let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
        println!("{}: {stats:?}", self.kind.name());
        // The reader gets the last dead letters a moment after the broker has them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (self.dead_letters.lock().records.lock().len() as u64) < stats.dead_lettered
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await; // polling a condition
        }
        self.dead_letters.lock().stop()?;
        // The counters tell the same story as the dead-letter topic.
        {
            let reader = self.dead_letters.lock();
            let dead = reader.records.lock();
            let discarded = dead.iter().filter(|d| d.kind == "discarded").count() as u64;
            anyhow::ensure!(
                dead.len() as u64 == stats.dead_lettered && discarded == stats.discarded,
                "{} dead letters ({discarded} discarded) in the topic, counted {} ({} discarded)",
                dead.len(),
                stats.dead_lettered,
                stats.discarded
            );
        }
        let written = self.written.lock().clone();
        let outcome = self.outcome("c", &written);
        println!(
            "{}: {} cases, {} hostile records written, {} refused by the broker or producer, {} dead letters, {} transaction markers",
            self.kind.name(),
            self.cases.load(Ordering::SeqCst),
            written.len(),
            self.refused.lock().len(),
            self.dead_letters.lock().records.lock().len(),
            self.markers.lock().len()
        );
        for (r, e) in self.refused.lock().iter().take(5) {
            println!(
                "  refused ({e}): stamp {:?} value {:?}",
                r.stamp,
                short(&r.value)
            );
        }
        outcome.verify()
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::Garbage(g) => format!("Garbage({} bytes)", g.len()),
        other => format!("{other:?}"),
    }
}

struct Outcome {
    report: checker::CheckReport,
    hostile: Vec<(Written, usize, Vec<DeadLetter>)>,
    aborted_ran: Vec<String>,
    valid_dead: usize,
}

impl Outcome {
    fn settled(&self) -> bool {
        self.report.lost_count == 0
            && self
                .hostile
                .iter()
                .all(|(_, processed, letters)| processed + letters.len() >= 1)
    }

    fn verify(&self) -> anyhow::Result<()> {
        let r = &self.report;
        anyhow::ensure!(r.ok() && r.duplicates == 0, "valid tasks: {r}");
        anyhow::ensure!(
            self.aborted_ran.is_empty(),
            "aborted transactions ran in part or twice: {:?}",
            self.aborted_ran
        );
        anyhow::ensure!(
            self.valid_dead == 0,
            "{} valid tasks were dead-lettered",
            self.valid_dead
        );
        for (w, processed, letters) in &self.hostile {
            let what = format!(
                "{} at {}:{} ({:?}, key {:?}, carrier {:?}, value {}, fail {}, headers {:?})",
                w.id,
                w.partition,
                w.offset,
                w.expect,
                w.record.key,
                w.record.carrier,
                short(&w.record.value),
                w.record.fail,
                w.record.headers
            );
            anyhow::ensure!(
                processed + letters.len() == 1,
                "{what}: processed {processed} times, dead-lettered {} times",
                letters.len()
            );
            for l in letters {
                // The dead-letter copy of a record this close to the limit is too large:
                // what lands is the reduced copy.
                // (Unless the record has headers named like the dead-letter ones, which
                // the copy replaces: a 64 KiB one leaves room.)
                let replaced = w.record.headers.iter().any(|h| {
                    h.name
                        .get()
                        .is_some_and(|n| n.starts_with(dead_letter::PREFIX.as_bytes()))
                });
                anyhow::ensure!(
                    l.truncated || replaced || !matches!(w.record.value, Value::NearLimit(_)),
                    "{what}: dead-lettered in full, though larger than the limit: {l:?}"
                );
                anyhow::ensure!(
                    !l.reason.is_empty(),
                    "{what}: dead letter without a reason: {l:?}"
                );
            }
            match w.expect {
                Expect::Processed => {
                    anyhow::ensure!(*processed == 1, "{what}: not processed: {letters:?}")
                }
                Expect::DeadLettered(kind) => {
                    anyhow::ensure!(letters.len() == 1, "{what}: not dead-lettered");
                    if let Some(kind) = kind {
                        anyhow::ensure!(
                            letters[0].kind == kind,
                            "{what}: dead-lettered as {:?}",
                            letters[0]
                        );
                    }
                }
                Expect::Either => {}
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let missing: Vec<String> = self
            .hostile
            .iter()
            .filter(|(_, p, l)| p + l.len() == 0)
            .map(|(w, _, _)| {
                format!(
                    "{} at {}:{} ({:?}, carrier {:?}, value {}, fail {})",
                    w.id,
                    w.partition,
                    w.offset,
                    w.expect,
                    w.record.carrier,
                    short(&w.record.value),
                    w.record.fail
                )
            })
            .collect();
        format!(
            "valid tasks: {}; hostile records not accounted for: {missing:?}",
            self.report
        )
    }
}

fn producer(bootstrap: &str, kind: BrokerKind, codec: Codec) -> anyhow::Result<FutureProducer> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("compression.type", codec.name())
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    for (k, v) in kind.producer_settings() {
        cfg.set(*k, *v);
    }
    Ok(cfg.create()?)
}

/// The high watermark of each partition of `topic`.
fn log_ends(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    (0..PARTITIONS)
        .map(|p| {
            Ok(consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))?
                .1)
        })
        .collect()
}

fn suite(kind: BrokerKind, cases: u32) -> anyhow::Result<()> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let broker = TestBroker::start(kind)?;
    let suite = rt.block_on(Suite::start(&broker))?;
    let mut runner = TestRunner::new(Config {
        cases,
        // Cases share one subscription: once one fails, the next tell nothing new.
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&case_strategy(), |case| {
        rt.block_on(suite.run_case(case))
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    let finished = match &result {
        Ok(()) => rt.block_on(suite.finish()),
        Err(_) => Ok(()),
    };
    println!("{}: {cases} cases in {:?}", kind.name(), started.elapsed());
    if let Err(e) = result {
        if let Some(log) = broker.log() {
            println!("broker log:\n{log}");
        }
        anyhow::bail!("{}: {e}", kind.name());
    }
    finished
}

fn cases_from_env() -> u32 {
    std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(300)
}

#[test]
fn hostile_records_embedded() -> anyhow::Result<()> {
    suite(BrokerKind::Embedded, 24)
}

#[test]
fn hostile_records_tansu() -> anyhow::Result<()> {
    suite(BrokerKind::TansuMemory, 24)
}

/// `HOSTILE_CASES=2000 cargo test -p decaton-integration-tests --test hostile -- --ignored`
#[test]
#[ignore = "long: HOSTILE_CASES cases (default 300)"]
fn hostile_records_embedded_many() -> anyhow::Result<()> {
    suite(BrokerKind::Embedded, cases_from_env())
}

#[test]
#[ignore = "long: HOSTILE_CASES cases (default 300)"]
fn hostile_records_tansu_many() -> anyhow::Result<()> {
    suite(BrokerKind::TansuMemory, cases_from_env())
}

// ---------------------------------------------------------------------------------------
// Control records written directly.

/// Writes one transaction marker (a control batch: `abort` or `commit`) into `partition`
/// of `topic` with a Produce request of its own, and returns its offset.
///
/// A transaction coordinator writes these markers at the end of every transaction; a
/// consumer never receives them, so their offsets are holes that the commit position must
/// pass. librdkafka's mock cluster writes no markers for its transactions (see
/// `Suite::transactions`) and Tansu has no transactions, but both store a control batch
/// sent to them like any other, which puts real markers into the source topic.
fn write_marker(bootstrap: &str, topic: &str, partition: i32, commit: bool) -> anyhow::Result<i64> {
    use std::io::{Read, Write};

    let addr = bootstrap
        .split(',')
        .next()
        .ok_or_else(|| anyhow::anyhow!("no bootstrap address"))?;
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;

    // The control record: key = (version 0, type 0 abort / 1 commit), value = (version 0,
    // coordinator epoch 0).
    let key: [u8; 4] = [0, 0, 0, u8::from(commit)];
    let value: [u8; 6] = [0; 6];
    let mut record = Vec::new();
    record.push(0u8); // attributes
    put_varint(&mut record, 0); // timestamp delta
    put_varint(&mut record, 0); // offset delta
    put_varint(&mut record, key.len() as i64);
    record.extend_from_slice(&key);
    put_varint(&mut record, value.len() as i64);
    record.extend_from_slice(&value);
    put_varint(&mut record, 0); // headers
    let mut records = Vec::new();
    put_varint(&mut records, record.len() as i64);
    records.extend_from_slice(&record);

    // The batch from `attributes` on, which the CRC covers.
    let now = now_millis();
    let mut tail = Vec::new();
    tail.extend_from_slice(&0x30i16.to_be_bytes()); // transactional | control
    tail.extend_from_slice(&0i32.to_be_bytes()); // last offset delta
    tail.extend_from_slice(&now.to_be_bytes()); // base timestamp
    tail.extend_from_slice(&now.to_be_bytes()); // max timestamp
    tail.extend_from_slice(&7_777_777i64.to_be_bytes()); // producer id
    tail.extend_from_slice(&0i16.to_be_bytes()); // producer epoch
    tail.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    tail.extend_from_slice(&1i32.to_be_bytes()); // record count
    tail.extend_from_slice(&records);
    let mut batch = Vec::new();
    batch.extend_from_slice(&0i64.to_be_bytes()); // base offset
    let after_length = 4 + 1 + 4 + tail.len(); // leader epoch, magic, crc, tail
    batch.extend_from_slice(&(after_length as i32).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c::crc32c(&tail).to_be_bytes());
    batch.extend_from_slice(&tail);

    // Produce v3: header v1, then the request.
    let mut req = Vec::new();
    req.extend_from_slice(&0i16.to_be_bytes()); // api key: Produce
    req.extend_from_slice(&3i16.to_be_bytes()); // api version
    req.extend_from_slice(&1i32.to_be_bytes()); // correlation id
    put_str(&mut req, "hostile-marker");
    req.extend_from_slice(&(-1i16).to_be_bytes()); // transactional id: null
    req.extend_from_slice(&(-1i16).to_be_bytes()); // acks: all
    req.extend_from_slice(&10_000i32.to_be_bytes()); // timeout
    req.extend_from_slice(&1i32.to_be_bytes()); // one topic
    put_str(&mut req, topic);
    req.extend_from_slice(&1i32.to_be_bytes()); // one partition
    req.extend_from_slice(&partition.to_be_bytes());
    req.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    req.extend_from_slice(&batch);
    stream.write_all(&(req.len() as i32).to_be_bytes())?;
    stream.write_all(&req)?;

    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let mut resp = vec![0u8; i32::from_be_bytes(len) as usize];
    stream.read_exact(&mut resp)?;
    // correlation id, topic count, topic name, partition count, partition, error, offset
    let name_len = i16::from_be_bytes([resp[8], resp[9]]) as usize;
    let at = 10 + name_len + 4;
    let error = i16::from_be_bytes([resp[at + 4], resp[at + 5]]);
    let offset = i64::from_be_bytes(resp[at + 6..at + 14].try_into()?);
    anyhow::ensure!(
        error == 0,
        "the broker refused the marker: error code {error}"
    );
    Ok(offset)
}

fn put_varint(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}
