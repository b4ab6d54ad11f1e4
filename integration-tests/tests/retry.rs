#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! Failure handling end to end: retries through the retry topic (Decaton's wire format in
//! both directions), retries in the lane, panics, and the dead-letter topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_integration_tests::{chat_op, init_tracing, put_tasks};
use decaton_processor::{
    async_trait, Backoff, DeadLetterConfig, ProcessError, ProcessingContext, ProcessorProperties,
    RetryConfig, SchedulingMode, Subscription, SubscriptionStats, TaskProcessor,
};
use decaton_protocol::{dead_letter, decode_metadata, now_millis, ChatOp, TaskMetadata};
use decaton_testkit::{checker, wait_until, BrokerKind, Processed, TestBroker};
use futures::StreamExt;
use parking_lot::Mutex;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// One call of `process`.
#[derive(Debug, Clone)]
struct Attempt {
    key: String,
    sequence: u64,
    retry_count: i64,
    topic: String,
    /// When `process` started, ms since the epoch.
    at_ms: i64,
    /// When the task was created (just before it was put), ms since the epoch.
    created_ms: i64,
    ok: bool,
}

type Decide = dyn Fn(&ProcessingContext, &ChatOp) -> Result<(), ProcessError> + Send + Sync;

/// Records every attempt, then fails or succeeds as `decide` says.
struct Scripted {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    decide: Box<Decide>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for Scripted {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let mut a = Attempt {
            key: task.user_id.clone(),
            sequence: task.sequence,
            retry_count: ctx.metadata().retry_count,
            topic: ctx.topic().to_string(),
            at_ms: now_millis(),
            created_ms: task.created_at_millis,
            ok: false,
        };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.decide)(ctx, &task)));
        a.ok = matches!(result, Ok(Ok(())));
        self.attempts.lock().push(a);
        match result {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn props() -> ProcessorProperties {
    let mut p = ProcessorProperties::default();
    p.mode = SchedulingMode::Bounded;
    p.partition_concurrency = 4;
    p.commit_interval = Duration::from_millis(100);
    p.shutdown_timeout = Duration::from_secs(10);
    p
}

/// Topics `name`, `name-retry` (same partitions) and `name-dlq`.
fn topics(broker: &TestBroker, name: &str, partitions: i32) -> anyhow::Result<()> {
    broker.create_topic(name, partitions)?;
    broker.create_topic(&format!("{name}-retry"), partitions)?;
    broker.create_topic(&format!("{name}-dlq"), 1)?;
    Ok(())
}

/// Every record of `topic` (all partitions), read from the start until `want` arrived
/// or `within` passed.
fn read_all(
    bootstrap: &str,
    topic: &str,
    want: usize,
    within: Duration,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}-{}", now_millis()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            out.push(m?.detach());
        }
    }
    Ok(out)
}

fn header<'a>(m: &'a rdkafka::message::OwnedMessage, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

type Running =
    tokio::task::JoinHandle<Result<SubscriptionStats, decaton_processor::SubscriptionError>>;

async fn stop(
    handle: &decaton_processor::SubscriptionHandle,
    running: Running,
) -> anyhow::Result<SubscriptionStats> {
    handle.shutdown();
    Ok(tokio::time::timeout(Duration::from_secs(30), running).await???)
}

/// A poison task (always fails) is retried `max_retries` times, each attempt no earlier
/// than its backoff, then lands in the dead-letter topic with its reason headers, while
/// 10 000 tasks of 1 000 other keys finish meanwhile, none waiting longer than one
/// backoff interval. The retry records are Decaton 9's format: `dt_meta` with
/// `retry_count + 1` and the scheduled time, the task bytes as the value.
async fn poison_task(kind: BrokerKind) -> anyhow::Result<()> {
    const OTHERS: u64 = 10_000;
    const RETRIES: u32 = 2;
    let backoff = Duration::from_millis(1500);
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    topics(&broker, "ops", 3)?;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let processor = Scripted {
        attempts: attempts.clone(),
        decide: Box::new(|_, task| {
            if task.user_id == "poison" {
                Err(ProcessError::new("storage says no"))
            } else {
                Ok(())
            }
        }),
    };
    let mut builder = Subscription::builder("poison", processor)
        .bootstrap_servers(&bootstrap)
        .topic("ops")
        .properties(props())
        .retry(
            RetryConfig::new()
                .backoff(Backoff::fixed(backoff))
                .max_retries(RETRIES),
        )
        .dead_letter(DeadLetterConfig::new());
    for (k, v) in kind.producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    // Delays are measured from the put: start once the six partitions are assigned.
    assert!(
        wait_until(Duration::from_secs(60), || handle
            .stats()
            .assigned_partitions
            == 6)
        .await,
        "never assigned: {:?}",
        handle.stats()
    );
    // The poison task first, then the others while it is being retried.
    let mut poison = chat_op(0, 0);
    poison.user_id = "poison".into();
    let client = {
        let mut b =
            decaton_client::TaskClient::<ChatOp>::builder(&bootstrap, "ops").application_id("it");
        for (k, v) in kind.producer_settings() {
            b = b.set(*k, *v);
        }
        b.build()?
    };
    // The poison task carries a trace: its retries and dead letter must keep it.
    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let trace = decaton_protocol::TraceParent::parse(TRACE).expect("a valid traceparent");
    client
        .put_with(
            "poison",
            &poison,
            decaton_client::PutOptions::default().traceparent(trace),
        )
        .await?;
    // At most 100 puts in flight: a task's creation time is then close to when the broker
    // got it, so the wait measured below is the consumer's, not the producer queue's.
    let results: Vec<_> = futures::stream::iter(0..OTHERS)
        .map(|i| {
            let client = &client;
            async move {
                let task = chat_op(i % 1_000, i / 1_000);
                client.put(task.user_id.clone(), &task).await
            }
        })
        .buffered(100)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let expected = decaton_integration_tests::expected_counts(OTHERS, 1_000);
    let attempts_of = |key: &str| -> Vec<Attempt> {
        attempts
            .lock()
            .iter()
            .filter(|a| a.key == key)
            .cloned()
            .collect()
    };
    let finished = wait_until(Duration::from_secs(60), || {
        handle.stats().dead_lettered == 1
            && attempts.lock().iter().filter(|a| a.ok).count() as u64 >= OTHERS
    })
    .await;
    let stats = stop(&handle, running).await?;
    let poison_attempts = attempts_of("poison");
    println!(
        "{}: stats {stats:?}; poison attempts {poison_attempts:?}",
        kind.name()
    );
    assert!(finished, "not finished: stats {stats:?}");
    // Retried exactly RETRIES times, each no earlier than its backoff.
    let counts: Vec<i64> = poison_attempts.iter().map(|a| a.retry_count).collect();
    assert_eq!(counts, (0..=i64::from(RETRIES)).collect::<Vec<_>>());
    for w in poison_attempts.windows(2) {
        let gap = w[1].at_ms - w[0].at_ms;
        assert!(
            gap >= backoff.as_millis() as i64,
            "attempt {} came {gap} ms after the previous one",
            w[1].retry_count
        );
        assert_eq!(w[1].topic, "ops-retry");
    }
    assert_eq!(stats.retried, u64::from(RETRIES));
    assert_eq!(stats.dead_lettered, 1);
    // The others: each processed once, in order, none waiting more than one backoff.
    let log: Vec<Processed> = attempts
        .lock()
        .iter()
        .filter(|a| a.key != "poison")
        .map(|a| Processed {
            key: a.key.clone(),
            sequence: a.sequence,
            instance: "i".into(),
        })
        .collect();
    let report = checker::check(&expected, &log);
    assert!(report.ok() && report.duplicates == 0, "{report}");
    let waits: Vec<i64> = attempts
        .lock()
        .iter()
        .filter(|a| a.key != "poison")
        .map(|a| a.at_ms - a.created_ms)
        .collect();
    let mut sorted = waits.clone();
    sorted.sort_unstable();
    let longest = sorted.last().copied().unwrap_or(0);
    println!(
        "{}: others waited from put to process p50 {} ms, p99 {} ms, max {longest} ms (backoff {backoff:?})",
        kind.name(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() * 99 / 100],
    );
    assert!(
        longest < backoff.as_millis() as i64,
        "a task of another key waited {longest} ms, more than one backoff interval"
    );
    // The dead-letter record: original key and value, plus why.
    let dlq = read_all(&bootstrap, "ops-dlq", 1, Duration::from_secs(20))?;
    assert_eq!(dlq.len(), 1);
    let d = &dlq[0];
    assert_eq!(d.key(), Some(&b"poison"[..]));
    assert_eq!(
        ChatOp::decode(d.payload().unwrap_or_default())?.user_id,
        "poison"
    );
    let text = |n: &str| String::from_utf8_lossy(header(d, n).unwrap_or_default()).to_string();
    assert_eq!(text(dead_letter::REASON), "storage says no");
    assert_eq!(text(dead_letter::KIND), "error");
    assert_eq!(text(dead_letter::ATTEMPTS), (RETRIES + 1).to_string());
    assert_eq!(text(dead_letter::TOPIC), "ops-retry");
    assert_eq!(text(dead_letter::ORIGIN_TOPIC), "ops");
    assert_eq!(text(dead_letter::SUBSCRIPTION), "poison");
    assert_eq!(text(decaton_protocol::TRACEPARENT_HEADER), TRACE);
    // The retry records, as a Decaton 9 processor reads them.
    let retries = read_all(
        &bootstrap,
        "ops-retry",
        RETRIES as usize,
        Duration::from_secs(20),
    )?;
    assert_eq!(retries.len(), RETRIES as usize);
    for (i, r) in retries.iter().enumerate() {
        let meta: TaskMetadata = decode_metadata(header(r, "dt_meta").unwrap())?;
        assert_eq!(meta.retry_count, i as i64 + 1);
        assert_eq!(meta.source_application_id, "it");
        assert!(
            meta.scheduled_time_millis
                >= r.timestamp().to_millis().unwrap() + backoff.as_millis() as i64 - 50
        );
        assert_eq!(ChatOp::decode(r.payload().unwrap())?.user_id, "poison");
        assert_eq!(r.key(), Some(&b"poison"[..]));
        assert_eq!(
            header(r, decaton_protocol::TRACEPARENT_HEADER),
            Some(TRACE.as_bytes()),
            "retry {} keeps the producer's trace",
            i + 1
        );
    }
    Ok(())
}
decaton_integration_tests::broker_tests!(
    poison_task_is_retried_then_dead_lettered,
    crate::poison_task
);

/// A task that fails twice then succeeds is processed successfully exactly once, and it
/// sees the retry count it got to. Once through the retry topic (retry_count 2), once in
/// the lane (retry_count 0, two attempts retried in place).
async fn transient(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    for in_lane in [false, true] {
        let topic = format!("flaky-{in_lane}");
        topics(&broker, &topic, 1)?;
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        let processor = Scripted {
            attempts: attempts.clone(),
            decide: Box::new(move |_, _| {
                if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    Err(ProcessError::retry("timeout talking to storage"))
                } else {
                    Ok(())
                }
            }),
        };
        let mut retry = RetryConfig::new().backoff(Backoff::fixed(Duration::from_millis(200)));
        if in_lane {
            retry = retry.in_process(2, Backoff::fixed(Duration::from_millis(50)));
        }
        let group = format!("flaky-{in_lane}");
        let mut builder = Subscription::builder(group.as_str(), processor)
            .bootstrap_servers(&bootstrap)
            .topic(topic.as_str())
            .properties(props())
            .retry(retry);
        for (k, v) in kind.producer_settings() {
            builder = builder.set(*k, *v);
        }
        let sub = builder.build()?;
        let handle = sub.handle();
        let running = tokio::spawn(sub.run());
        put_tasks(&bootstrap, kind.producer_settings(), &topic, 0..1, 1).await?;
        let ok = wait_until(Duration::from_secs(30), || {
            attempts.lock().iter().any(|a| a.ok)
        })
        .await;
        let stats = stop(&handle, running).await?;
        let seen = attempts.lock().clone();
        println!("{} in_lane={in_lane}: {stats:?} {seen:?}", kind.name());
        assert!(ok, "never succeeded: {stats:?}");
        let successes: Vec<&Attempt> = seen.iter().filter(|a| a.ok).collect();
        assert_eq!(successes.len(), 1);
        assert_eq!(seen.len(), 3);
        if in_lane {
            assert_eq!(successes[0].retry_count, 0);
            assert_eq!(stats.retried_in_process, 2);
            assert_eq!(stats.retried, 0);
        } else {
            assert_eq!(successes[0].retry_count, 2);
            assert_eq!(successes[0].topic, format!("{topic}-retry"));
            assert_eq!(stats.retried, 2);
        }
        assert_eq!(stats.failed, if in_lane { 0 } else { 2 });
    }
    Ok(())
}
decaton_integration_tests::broker_tests!(transient_failure_succeeds_once, crate::transient);

/// A processor that panics on every 100th task (first delivery only): the subscription
/// finishes every other task, the panicking ones are retried and then succeed, nothing
/// crashes, and the panics are counted.
async fn panics(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 2_000;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    topics(&broker, "panicky", 2)?;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let processor = Scripted {
        attempts: attempts.clone(),
        decide: Box::new(|ctx, task| {
            // Task i is (user i % 50, sequence i / 50): every 100th i is sequence % 2 == 0
            // of user 0.
            if task.user_id == "user-0" && task.sequence % 2 == 0 && ctx.metadata().retry_count == 0
            {
                panic!("bad day for task {}", task.sequence);
            }
            Ok(())
        }),
    };
    let mut builder = Subscription::builder("panicky", processor)
        .bootstrap_servers(&bootstrap)
        .topic("panicky")
        .properties(props())
        .retry(RetryConfig::new().backoff(Backoff::fixed(Duration::from_millis(300))));
    for (k, v) in kind.producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let expected = put_tasks(
        &bootstrap,
        kind.producer_settings(),
        "panicky",
        0..TASKS,
        50,
    )
    .await?;
    let done = wait_until(Duration::from_secs(60), || {
        attempts.lock().iter().filter(|a| a.ok).count() as u64 >= TASKS
    })
    .await;
    let stats = stop(&handle, running).await?;
    println!("{}: {stats:?}", kind.name());
    assert!(done, "{stats:?}");
    let log: Vec<Processed> = attempts
        .lock()
        .iter()
        .filter(|a| a.ok)
        .map(|a| Processed {
            key: a.key.clone(),
            sequence: a.sequence,
            instance: a.topic.clone(),
        })
        .collect();
    let report = checker::check(&expected, &log);
    assert_eq!(report.lost_count, 0, "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert_eq!(stats.panicked, TASKS / 100);
    assert_eq!(stats.retried, TASKS / 100);
    Ok(())
}
decaton_integration_tests::broker_tests!(panicking_tasks_are_retried, crate::panics);

/// A retry record as a Decaton 9 Java processor writes it (hand-encoded here: `dt_meta`
/// header with `retry_count` 1 and a scheduled time, the serialized task as the value)
/// is consumed from the retry topic and processed no earlier than its scheduled time.
async fn java_retry_record(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    topics(&broker, "java", 1)?;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let processor = Scripted {
        attempts: attempts.clone(),
        decide: Box::new(|_, _| Ok(())),
    };
    let sub = Subscription::builder("java", processor)
        .bootstrap_servers(&bootstrap)
        .topic("java")
        .properties(props())
        .retry(RetryConfig::new())
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let due = now_millis() + 2_000;
    let meta = TaskMetadata {
        timestamp_millis: now_millis() - 60_000,
        source_application_id: "java-app".into(),
        source_instance_id: "java-host-1".into(),
        retry_count: 1,
        scheduled_time_millis: due,
    };
    let mut task = chat_op(7, 3);
    task.user_id = "java-user".into();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    producer
        .send(
            FutureRecord::to("java-retry")
                .key("java-user")
                .payload(&task.encode_to_vec())
                .headers(OwnedHeaders::new().insert(Header {
                    key: "dt_meta",
                    value: Some(&meta.encode_to_vec()),
                })),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let done = wait_until(Duration::from_secs(30), || !attempts.lock().is_empty()).await;
    let stats = stop(&handle, running).await?;
    let seen = attempts.lock().clone();
    assert!(done, "{stats:?}");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].key, "java-user");
    assert_eq!(seen[0].sequence, 3);
    assert_eq!(seen[0].retry_count, 1);
    assert!(
        seen[0].at_ms >= due,
        "ran {} ms before its scheduled time",
        due - seen[0].at_ms
    );
    Ok(())
}
decaton_integration_tests::broker_tests!(
    decaton9_retry_record_is_processed_on_time,
    crate::java_retry_record
);

/// Building fails clearly when a retry or dead-letter topic does not exist, and a retry
/// topic cannot be combined with a state store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_and_bad_combinations_fail_clearly() -> anyhow::Result<()> {
    init_tracing();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("lonely", 1)?;
    let noop = || Scripted {
        attempts: Default::default(),
        decide: Box::new(|_, _| Ok(())),
    };
    let err = Subscription::builder("lonely", noop())
        .bootstrap_servers(&bootstrap)
        .topic("lonely")
        .retry(RetryConfig::new())
        .dead_letter(DeadLetterConfig::new())
        .build()?
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lonely-retry") && err.contains("lonely-dlq"),
        "{err}"
    );
    let err = Subscription::builder("s", noop())
        .bootstrap_servers(&bootstrap)
        .topic("lonely")
        .retry(RetryConfig::new())
        .state_store(decaton_state::StateConfig::default())
        .build()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("state store"), "{err}");
    Ok(())
}

/// A record that is not a task (no `dt_meta`, not a legacy envelope) is counted as
/// discarded and, since the subscription has a dead-letter topic, kept there with kind
/// `discarded`; the partition moves on to the next task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_record_goes_to_the_dead_letter_topic() -> anyhow::Result<()> {
    init_tracing();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    topics(&broker, "junk", 1)?;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    producer
        .send(
            FutureRecord::to("junk")
                .key("k")
                .payload(&[0xff_u8, 0xff, 0xff][..]),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    put_tasks(&bootstrap, &[], "junk", 0..1, 1).await?;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let sub = Subscription::builder(
        "junk",
        Scripted {
            attempts: attempts.clone(),
            decide: Box::new(|_, _| Ok(())),
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("junk")
    .properties(props())
    .dead_letter(DeadLetterConfig::new())
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let done = wait_until(Duration::from_secs(30), || {
        handle.stats().dead_lettered == 1 && attempts.lock().len() == 1
    })
    .await;
    let stats = stop(&handle, running).await?;
    assert!(done, "{stats:?}");
    assert_eq!(stats.discarded, 1);
    let dlq = read_all(&bootstrap, "junk-dlq", 1, Duration::from_secs(20))?;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload(), Some(&[0xff_u8, 0xff, 0xff][..]));
    let kind =
        String::from_utf8_lossy(header(&dlq[0], dead_letter::KIND).unwrap_or_default()).to_string();
    assert_eq!(kind, "discarded");
    let pos = decaton_integration_tests::committed(&bootstrap, "junk", "junk", 1)?[0].0;
    assert_eq!(pos, Some(2), "both records done and committed");
    Ok(())
}
