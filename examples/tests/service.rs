//! The storage mutation processor as a service, in its own process, started from its
//! configuration file: its readiness goes from 503 (with the reason) to 200 once its
//! partitions are assigned, `/metrics` shows its processed count rising and its lag
//! falling to zero, and SIGTERM drains it: exit code 0 and everything processed is
//! committed. A drain that outlives the shutdown timeout exits with 3; a second signal
//! exits at once with 128 + its number.

mod common;

use std::time::Duration;

use common::{eventually, metric_sum, ServiceProcess};
use decaton_client::{PutOptions, TaskClient};
use decaton_examples::chat::ChatOpGenerator;
use decaton_protocol::{ChatOp, TraceParent};
use decaton_testkit::{BrokerKind, TestBroker};
use futures::StreamExt as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TOPIC: &str = "chat-ops";
const PARTITIONS: i32 = 3;
const SUBSCRIPTION: &str = "storage-mutation-processor";
const BATCH: u64 = 300;

async fn put_batch(
    client: &TaskClient<ChatOp>,
    chat: &mut ChatOpGenerator,
    trace: Option<TraceParent>,
) -> anyhow::Result<()> {
    let ops: Vec<ChatOp> = (0..BATCH).map(|_| chat.next_op()).collect();
    let mut options = PutOptions::default();
    options.traceparent = trace;
    let results: Vec<_> = futures::stream::iter(&ops)
        .map(|op| client.put_with(op.user_id.clone(), op, options))
        .buffered(500)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// On the embedded broker and on Tansu (`DECATON_TEST_BROKERS` narrows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_service_reports_health_metrics_and_drains_on_sigterm() -> anyhow::Result<()> {
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
        broker.create_topic(TOPIC, PARTITIONS)?;
        Ok(broker)
    })
    .await??;
    let bootstrap = broker.bootstrap_servers();
    let mut client =
        TaskClient::<ChatOp>::builder(bootstrap.clone(), TOPIC).application_id("service-test");
    for (k, v) in kind.producer_settings() {
        client = client.set(*k, *v);
    }
    let client = client.build()?;
    let mut chat = ChatOpGenerator::new(50, 3);
    put_batch(&client, &mut chat, None).await?;

    // Another member holds the group's partitions and does not take part in the next
    // rebalance (it does not poll), so the service cannot be assigned anything until it
    // leaves: its first readiness answer is known.
    let holder = {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<BaseConsumer> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", SUBSCRIPTION)
                .set("session.timeout.ms", "6000")
                .set("enable.auto.commit", "false")
                .create()?;
            consumer.subscribe(&[TOPIC])?;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while consumer.assignment()?.count() < PARTITIONS as usize {
                anyhow::ensure!(std::time::Instant::now() < deadline, "holder not assigned");
                let _ = consumer.poll(Duration::from_millis(100));
            }
            Ok(consumer)
        })
        .await??
    };

    let config = common::config_file(SUBSCRIPTION);
    let service = ServiceProcess::start(
        SUBSCRIPTION,
        env!("CARGO_BIN_EXE_storage-mutation-processor"),
        &["--config", config.to_str().unwrap_or_default()],
        &[
            ("DECATON_KAFKA__BOOTSTRAP_SERVERS", bootstrap.clone()),
            ("DECATON_SERVICE__LAG_INTERVAL_MS", "300".into()),
            (
                "DECATON_SERVICE__LOG_FILTER",
                "info,decaton_examples=debug,librdkafka=off,rdkafka::client=off".into(),
            ),
            (
                "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__SESSION_TIMEOUT_MS",
                "6000".into(),
            ),
        ],
    )?;
    let failure = |what: String| anyhow::anyhow!("{what}\nservice log:\n{}", service.log_text());

    // Bound and serving before it has joined its group: not ready, and it says why.
    let (status, body) = service.get("/health/ready").await?;
    if status != 503 || !body.contains("no partitions assigned") {
        return Err(failure(format!("first readiness: {status} {body:?}")));
    }
    let (status, _) = service.get("/health/live").await?;
    assert_eq!(status, 200);
    // The holder leaves the group; the service gets the partitions.
    tokio::task::spawn_blocking(move || drop(holder)).await?;

    eventually(Duration::from_secs(60), "ready", || async {
        let (status, _) = service.get("/health/ready").await?;
        Ok((status == 200).then_some(()))
    })
    .await
    .map_err(|e| failure(format!("{e:#}")))?;

    // Processed counts rise as tasks arrive.
    let label = format!("subscription=\"{SUBSCRIPTION}\"");
    let processed = |n: u64| {
        let label = label.clone();
        let service = &service;
        async move {
            let (_, text) = service.get("/metrics").await?;
            let got = metric_sum(&text, "decaton_tasks_processed_total", &label);
            Ok((got >= n as f64).then_some(text))
        }
    };
    eventually(Duration::from_secs(60), "first batch processed", || {
        processed(BATCH)
    })
    .await
    .map_err(|e| failure(format!("{e:#}")))?;
    // The second batch is put inside a trace.
    let trace = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .ok_or_else(|| anyhow::anyhow!("bad traceparent"))?;
    put_batch(&client, &mut chat, Some(trace)).await?;
    client.close().await?;
    let text = eventually(Duration::from_secs(60), "second batch processed", || {
        processed(2 * BATCH)
    })
    .await
    .map_err(|e| failure(format!("{e:#}")))?;
    assert_eq!(
        metric_sum(&text, "decaton_tasks_processed_total", &label),
        (2 * BATCH) as f64,
        "nothing processed twice"
    );

    // Every metric is described; histograms have buckets.
    for help in [
        "# HELP decaton_tasks_processed_total ",
        "# TYPE decaton_tasks_processed_total counter",
        "# HELP decaton_task_process_seconds ",
        "# TYPE decaton_task_process_seconds histogram",
        "decaton_task_process_seconds_bucket{",
        "# HELP decaton_tasks_pending ",
        "# HELP decaton_consumer_lag ",
    ] {
        assert!(text.contains(help), "no {help:?} in\n{text}");
    }

    // No metric without its help text.
    for name in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = name.split(' ').next().unwrap_or_default();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no # HELP"
        );
    }

    // The lag read from the broker falls to zero once everything is committed.
    eventually(
        Duration::from_secs(30),
        "lag zero on every partition",
        || async {
            let (_, text) = service.get("/metrics").await?;
            let lines = text
                .lines()
                .filter(|l| l.starts_with("decaton_consumer_lag{") && l.contains(&label))
                .count();
            let lag = metric_sum(&text, "decaton_consumer_lag", &label);
            // Every partition ready, with no gap left in its offset window.
            let ready = metric_sum(&text, "decaton_partition_ready", &label);
            let gaps = text
                .lines()
                .filter(|l| l.starts_with("decaton_offset_map_gaps{") && l.ends_with(" 0"))
                .count();
            Ok((lines == PARTITIONS as usize
                && lag == 0.0
                && ready == PARTITIONS as f64
                && gaps == PARTITIONS as usize)
                .then_some(()))
        },
    )
    .await
    .map_err(|e| failure(format!("{e:#}")))?;

    service.signal("TERM")?;
    let log = service.log.clone();
    let (status, stdout) = service.wait(Duration::from_secs(60))?;
    let log = log.lock().join("\n");
    assert_eq!(status.code(), Some(0), "exit status; log:\n{log}");
    assert!(
        stdout.contains(&format!("applied {}", 2 * BATCH)),
        "summary: {stdout}"
    );
    assert!(log.contains("drained"), "{log}");

    // A line logged inside `process` carries the task's fields; a task put inside a trace
    // is processed in a span that continues it.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "applied")
        .collect();
    assert_eq!(lines.len() as u64, 2 * BATCH, "one 'applied' line per task");
    for line in &lines {
        let span = &line["span"];
        assert_eq!(span["name"], "task", "{line}");
        assert_eq!(span["subscription"], SUBSCRIPTION, "{line}");
        assert_eq!(span["topic"], TOPIC, "{line}");
        assert!(
            span["partition"].is_i64() && span["offset"].is_i64(),
            "{line}"
        );
        assert_eq!(span["retry_count"], 0, "{line}");
        assert_eq!(span["key"], line["fields"]["user"], "{line}");
    }
    let traced = lines
        .iter()
        .filter(|l| l["span"]["trace_id"] == trace.trace_id_hex())
        .filter(|l| l["span"]["parent_span_id"] == trace.parent_id_hex())
        .count();
    assert_eq!(
        traced as u64, BATCH,
        "every task of the traced batch continues the trace"
    );

    // Everything processed is committed: the group's positions are the topic's ends.
    let committed = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(i64, i64)>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", SUBSCRIPTION)
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition(TOPIC, p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            let (_, high) = consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(10))?;
            let at = match committed.find_partition(TOPIC, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                other => anyhow::bail!("partition {p}: nothing committed ({other:?})"),
            };
            out.push((at, high));
        }
        Ok(out)
    })
    .await??;
    let total: i64 = committed.iter().map(|(at, _)| at).sum();
    assert_eq!(total, (2 * BATCH) as i64, "{committed:?}");
    for (p, (at, high)) in committed.iter().enumerate() {
        // (Tansu's reported high watermark may trail the last offset.)
        assert!(at >= high, "partition {p}: committed {at}, end {high}");
    }
    drop(broker);
    Ok(())
}

/// A storage processor whose storage is down from the start, with tasks stuck in
/// `process`: started, and seen stalled on its readiness endpoint.
async fn stuck_service(
    extra_env: &[(&str, String)],
) -> anyhow::Result<(TestBroker, tempfile::TempDir, ServiceProcess)> {
    let broker = tokio::task::spawn_blocking(|| -> anyhow::Result<TestBroker> {
        let broker = TestBroker::start(BrokerKind::Embedded)?;
        broker.create_topic(TOPIC, 1)?;
        Ok(broker)
    })
    .await??;
    let bootstrap = broker.bootstrap_servers();
    let client = TaskClient::<ChatOp>::builder(bootstrap.clone(), TOPIC).build()?;
    put_batch(&client, &mut ChatOpGenerator::new(10, 1), None).await?;
    client.close().await?;
    let dir = tempfile::tempdir()?;
    let down = dir.path().join("down");
    std::fs::write(&down, b"down")?;
    let config = common::config_file(SUBSCRIPTION);
    let mut env = vec![
        ("DECATON_KAFKA__BOOTSTRAP_SERVERS", bootstrap),
        ("DECATON_SERVICE__STALL_TIMEOUT_MS", "300".to_string()),
        (
            "DECATON_SERVICE__LOG_FILTER",
            "info,librdkafka=off,rdkafka::client=off".to_string(),
        ),
        (
            "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__SESSION_TIMEOUT_MS",
            "6000".to_string(),
        ),
    ];
    env.extend(extra_env.iter().cloned());
    let service = ServiceProcess::start(
        SUBSCRIPTION,
        env!("CARGO_BIN_EXE_storage-mutation-processor"),
        &[
            "--config",
            config.to_str().unwrap_or_default(),
            "--storage-down-file",
            down.to_str().unwrap_or_default(),
        ],
        &env,
    )?;
    eventually(Duration::from_secs(60), "stalled", || async {
        let (status, body) = service.get("/health/ready").await?;
        Ok((status == 503 && body.contains("stalled")).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", service.log_text()))?;
    Ok((broker, dir, service))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() -> anyhow::Result<()> {
    // The drain could wait 30 s for the stuck tasks; the second signal cuts it short.
    let (_broker, _dir, mut service) = stuck_service(&[]).await?;
    service.signal("TERM")?;
    eventually(Duration::from_secs(10), "draining", || {
        let draining = service.log_text().contains("draining");
        async move { Ok(draining.then_some(())) }
    })
    .await?;
    assert!(service.running(), "the first signal must drain, not exit");
    let started = std::time::Instant::now();
    service.signal("TERM")?;
    let (status, _) = service.wait(Duration::from_secs(10))?;
    assert_eq!(status.code(), Some(128 + 15));
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_the_shutdown_timeout_exits_with_3() -> anyhow::Result<()> {
    let (_broker, _dir, service) = stuck_service(&[(
        "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__SHUTDOWN_TIMEOUT_MS",
        "1000".to_string(),
    )])
    .await?;
    service.signal("INT")?;
    let log = service.log.clone();
    let (status, _) = service.wait(Duration::from_secs(30))?;
    let log = log.lock().join("\n");
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("abandoned"), "{log}");
    Ok(())
}
