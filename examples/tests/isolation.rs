//! Isolation as services: three processors of one topic, each its own process, consumer
//! group and metrics port. The storage mutation processor's storage goes down: it falls
//! behind alone and reports not ready with its reason, while the notification processor
//! and the search indexer keep their throughput and stay ready; when storage returns it
//! catches up.
//!
//! Long (about a minute): `cargo test -p decaton-examples --test isolation -- --ignored
//! --nocapture` prints the figures.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, metric_sum, ServiceProcess};
use decaton_client::TaskClient;
use decaton_examples::chat::ChatOpGenerator;
use decaton_protocol::ChatOp;
use decaton_testkit::{BrokerKind, TestBroker};

const TOPIC: &str = "chat-ops";
const PARTITIONS: i32 = 6;
/// Tasks per second the chat server produces throughout.
const RATE: u64 = 1_000;
const PHASE: Duration = Duration::from_secs(15);

const STORAGE: &str = "storage-mutation-processor";
const HEALTHY: [&str; 2] = ["notification-processor", "search-indexer"];

async fn processed(service: &ServiceProcess) -> anyhow::Result<f64> {
    let (_, text) = service.get("/metrics").await?;
    Ok(metric_sum(
        &text,
        "decaton_tasks_processed_total",
        &format!("subscription=\"{}\"", service.name),
    ))
}

/// Each service's processing rate over `phase`, while checking every 250 ms that the
/// `must_stay_ready` ones answer 200 on /health/ready; also returns the first non-ready
/// body of the others.
async fn measure(
    services: &[&ServiceProcess],
    must_stay_ready: &[&str],
    phase: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<Option<(Duration, String)>>)> {
    let mut start = Vec::new();
    for s in services {
        start.push(processed(s).await?);
    }
    let began = Instant::now();
    let mut first_not_ready: Vec<Option<(Duration, String)>> = vec![None; services.len()];
    while began.elapsed() < phase {
        for (i, s) in services.iter().enumerate() {
            let (status, body) = s.get("/health/ready").await?;
            if status != 200 {
                anyhow::ensure!(
                    !must_stay_ready.contains(&s.name.as_str()),
                    "{} went not ready: {body}",
                    s.name
                );
                first_not_ready[i].get_or_insert((began.elapsed(), body));
            }
        }
        // Sampling interval of the readiness checks.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let secs = began.elapsed().as_secs_f64();
    let mut rates = Vec::new();
    for (s, from) in services.iter().zip(start) {
        rates.push((processed(s).await? - from) / secs);
    }
    Ok((rates, first_not_ready))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: about a minute; run with --ignored"]
async fn a_processor_whose_storage_fails_falls_behind_alone() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(|| -> anyhow::Result<TestBroker> {
        let broker = TestBroker::start(BrokerKind::Embedded)?;
        broker.create_topic(TOPIC, PARTITIONS)?;
        Ok(broker)
    })
    .await??;
    let bootstrap = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let down_file = dir.path().join("storage-down");

    let common_env = |extra: &[(&'static str, &str)]| {
        let mut env = vec![
            ("DECATON_KAFKA__BOOTSTRAP_SERVERS", bootstrap.clone()),
            ("DECATON_SERVICE__LAG_INTERVAL_MS", "1000".to_string()),
            (
                "DECATON_SERVICE__LOG_FILTER",
                "warn,decaton_service=info,librdkafka=off,rdkafka::client=off".to_string(),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        env
    };
    let start = |name: &str, binary: &str, args: Vec<String>, env: Vec<(&str, String)>| {
        let config = common::config_file(name);
        let mut all = vec!["--config".to_string(), config.display().to_string()];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        ServiceProcess::start(name, binary, &refs, &env)
    };
    let notification = start(
        "notification-processor",
        env!("CARGO_BIN_EXE_notification-processor"),
        vec![],
        common_env(&[(
            "DECATON_SUBSCRIPTIONS__NOTIFICATION_PROCESSOR__SESSION_TIMEOUT_MS",
            "6000",
        )]),
    )?;
    let indexer = start(
        "search-indexer",
        env!("CARGO_BIN_EXE_search-indexer"),
        vec![],
        common_env(&[(
            "DECATON_SUBSCRIPTIONS__SEARCH_INDEXER__SESSION_TIMEOUT_MS",
            "6000",
        )]),
    )?;
    let storage = start(
        STORAGE,
        env!("CARGO_BIN_EXE_storage-mutation-processor"),
        vec![
            "--storage-down-file".to_string(),
            down_file.display().to_string(),
        ],
        common_env(&[
            ("DECATON_SERVICE__STALL_TIMEOUT_MS", "3000"),
            (
                "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__SESSION_TIMEOUT_MS",
                "6000",
            ),
            (
                "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__MAX_PENDING",
                "1000",
            ),
        ]),
    )?;
    let services = [&notification, &indexer, &storage];
    for s in services {
        eventually(
            Duration::from_secs(60),
            &format!("{} ready", s.name),
            || async { Ok((s.get("/health/ready").await?.0 == 200).then_some(())) },
        )
        .await?;
    }

    // The chat server: RATE tasks per second, one batch every 100 ms.
    let produced = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (produced, stop) = (produced.clone(), stop.clone());
        let client = TaskClient::<ChatOp>::builder(bootstrap.clone(), TOPIC)
            .application_id("isolation-test")
            .build()?;
        tokio::spawn(async move {
            let mut chat = ChatOpGenerator::new(2_000, 5);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let ops: Vec<ChatOp> = (0..RATE / 10).map(|_| chat.next_op()).collect();
                let mut puts = Vec::with_capacity(ops.len());
                for op in &ops {
                    puts.push(client.put(op.user_id.clone(), op));
                }
                let results = futures::future::join_all(puts).await;
                let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
                produced.fetch_add(ok, Ordering::Relaxed);
            }
            client.close().await
        })
    };

    // Warm-up (every processor has taken tasks), then the baseline: everyone healthy.
    for s in services {
        eventually(
            Duration::from_secs(30),
            &format!("{} processing", s.name),
            || async { Ok((processed(s).await? >= RATE as f64).then_some(())) },
        )
        .await?;
    }
    let (baseline, _) = measure(
        &services,
        &["notification-processor", "search-indexer", STORAGE],
        PHASE,
    )
    .await?;

    // Storage goes down.
    std::fs::write(&down_file, b"down")?;
    let (during, not_ready) = measure(&services, &HEALTHY, PHASE).await?;
    let (reason_after, reason) = not_ready[2]
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the storage processor never reported not ready"))?;
    anyhow::ensure!(
        reason.contains("stalled"),
        "not-ready reason does not say the partitions are stalled: {reason}"
    );

    // Storage comes back: the storage processor catches up while production goes on.
    std::fs::remove_file(&down_file)?;
    let back = Instant::now();
    let backlog_at_return = produced.load(Ordering::Relaxed) as f64 - processed(&storage).await?;
    stop.store(true, Ordering::Relaxed);
    producer.await??;
    let total = produced.load(Ordering::Relaxed) as f64;
    eventually(
        Duration::from_secs(120),
        "storage processor caught up",
        || async { Ok((processed(&storage).await? >= total).then_some(())) },
    )
    .await?;
    let caught_up_in = back.elapsed();
    eventually(
        Duration::from_secs(30),
        "storage processor ready again",
        || async { Ok((storage.get("/health/ready").await?.0 == 200).then_some(())) },
    )
    .await?;
    for s in [&notification, &indexer] {
        eventually(
            Duration::from_secs(60),
            &format!("{} caught up", s.name),
            || async { Ok((processed(s).await? >= total).then_some(())) },
        )
        .await?;
    }

    println!("produced {total} tasks at {RATE}/s; phases of {PHASE:?}");
    for (i, s) in services.iter().enumerate() {
        println!(
            "{:<28} baseline {:>7.1}/s  during outage {:>7.1}/s  ratio {:.3}",
            s.name,
            baseline[i],
            during[i],
            during[i] / baseline[i].max(1e-9)
        );
    }
    println!(
        "storage not ready {:.1}s after the outage began: {}",
        reason_after.as_secs_f64(),
        reason.lines().next().unwrap_or("")
    );
    println!(
        "backlog when storage returned: {backlog_at_return:.0} tasks; caught up in {:.1}s",
        caught_up_in.as_secs_f64()
    );
    for i in 0..2 {
        let ratio = during[i] / baseline[i].max(1e-9);
        anyhow::ensure!(
            ratio >= 0.95,
            "{} kept only {:.1}% of its throughput",
            services[i].name,
            ratio * 100.0
        );
    }
    anyhow::ensure!(
        during[2] < 0.5 * baseline[2],
        "the storage processor did not fall behind: {} vs {}",
        during[2],
        baseline[2]
    );

    for s in services {
        s.signal("TERM")?;
    }
    for s in [notification, indexer, storage] {
        let name = s.name.clone();
        let (status, _) = s.wait(Duration::from_secs(60))?;
        assert_eq!(status.code(), Some(0), "{name}");
    }
    drop(broker);
    Ok(())
}
