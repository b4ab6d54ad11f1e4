#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! Partition-local state that follows its partition: a SIGKILLed owner's state moves to
//! a new instance through the changelog, a restart with the same state directory
//! restores only the tail, and a corrupt store is rebuilt. Counters must be exact.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_integration_tests::{
    broker_tests, committed, expected_counts, produce, produce_range, read_counters,
    CounterProcessor,
};
use decaton_processor::{ProcessorProperties, SchedulingMode, Subscription};
use decaton_state::StateConfig;
use decaton_testkit::{checker, BrokerKind, TestBroker};

const WORKER: &str = env!("CARGO_BIN_EXE_fault-worker");

fn state_cfg(dir: &std::path::Path) -> StateConfig {
    StateConfig {
        state_dir: dir.to_path_buf(),
        ..Default::default()
    }
}

fn props() -> ProcessorProperties {
    let mut p = ProcessorProperties::default();
    p.mode = SchedulingMode::PerKey;
    p.max_pending = 2_000;
    p.commit_interval = Duration::from_millis(200);
    p
}

/// Runs the counter subscription in-process until `seen` reaches `until`, then shuts it
/// down cleanly and returns its stats.
async fn run_counters(
    broker: &TestBroker,
    group: &str,
    topic: &str,
    dir: &std::path::Path,
    until: u64,
) -> anyhow::Result<decaton_processor::SubscriptionStats> {
    let seen = Arc::new(AtomicU64::new(0));
    let mut builder = Subscription::builder(
        group,
        CounterProcessor {
            log: None,
            seen: seen.clone(),
        },
    )
    .bootstrap_servers(broker.bootstrap_servers())
    .topic(topic)
    .properties(props())
    .state_store(state_cfg(dir));
    for (k, v) in broker.kind().producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.load(Ordering::Relaxed) < until {
        anyhow::ensure!(
            Instant::now() < deadline,
            "processed {} of {until}; {:?}",
            seen.load(Ordering::Relaxed),
            handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling a counter owned by the processor
    }
    handle.shutdown();
    Ok(running.await??)
}

async fn checkpoint_and_corruption(kind: BrokerKind) -> anyhow::Result<()> {
    const FIRST: u64 = 10_000;
    const MORE: u64 = 100;
    const USERS: u64 = 300;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("ck", 3)?;
    if kind == BrokerKind::Embedded {
        // The mock cluster has no CreateTopics; on Tansu the runtime creates the changelog
        // itself (compacted, with the source's partition count).
        broker.create_topic("ck-state-changelog", 3)?;
    }
    let dir = tempfile::tempdir()?;
    produce(&broker, "ck", FIRST, USERS).await?;
    let first = run_counters(&broker, "ck", "ck", dir.path(), FIRST).await?;
    assert_eq!(first.state_write_failures, 0);
    assert_eq!(
        read_counters(&state_cfg(dir.path()), "ck", "ck", 3)?,
        expected_counts(FIRST, USERS)
    );
    // Two mutations per task went to the changelog.
    let changelog_records = 2 * FIRST;

    // Restart with the same directory: only the tail is read.
    produce_range(&broker, "ck", FIRST..FIRST + MORE, USERS).await?;
    let second = run_counters(&broker, "ck", "ck", dir.path(), MORE).await?;
    println!(
        "{}: restart restored {} of {changelog_records} changelog records",
        kind.name(),
        second.state_records_restored
    );
    assert!(
        second.state_records_restored * 100 < changelog_records,
        "restored {}",
        second.state_records_restored
    );
    assert_eq!(
        read_counters(&state_cfg(dir.path()), "ck", "ck", 3)?,
        expected_counts(FIRST + MORE, USERS)
    );

    // Garbage over every file of the store: rebuilt from the changelog, still exact.
    let mut garbled = 0;
    for entry in walk(dir.path())? {
        let len = std::fs::metadata(&entry)?.len().max(64) as usize;
        std::fs::write(
            &entry,
            (0..len)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<u8>>(),
        )?;
        garbled += 1;
    }
    assert!(garbled > 0);
    produce_range(&broker, "ck", FIRST + MORE..FIRST + 2 * MORE, USERS).await?;
    let third = run_counters(&broker, "ck", "ck", dir.path(), MORE).await?;
    println!(
        "{}: after corruption restored {} records",
        kind.name(),
        third.state_records_restored
    );
    assert!(
        third.state_records_restored >= changelog_records,
        "a rebuild reads the whole changelog"
    );
    assert_eq!(
        read_counters(&state_cfg(dir.path()), "ck", "ck", 3)?,
        expected_counts(FIRST + 2 * MORE, USERS)
    );
    Ok(())
}
broker_tests!(
    checkpoint_restores_tail_and_corrupt_store_is_rebuilt,
    super::checkpoint_and_corruption
);

fn walk(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

fn spawn_state_worker(
    broker: &TestBroker,
    instance: &str,
    logs: &std::path::Path,
    state: &std::path::Path,
) -> anyhow::Result<std::process::Child> {
    let mut cmd = Command::new(WORKER);
    cmd.args([
        "--bootstrap",
        &broker.bootstrap_servers(),
        "--topic",
        "mv",
        "--group",
        "mv",
        "--instance",
        instance,
    ])
    .arg("--log-dir")
    .arg(logs)
    .arg("--state-dir")
    .arg(state)
    .args([
        "--latency-ms",
        "0",
        "--param",
        "mode=per_key",
        "--param",
        "max_pending=2000",
        "--param",
        "commit_interval=200",
    ])
    .args(["-X", "session.timeout.ms=6000"])
    .env(
        "RUST_LOG",
        std::env::var("RUST_LOG")
            .unwrap_or_else(|_| "warn,librdkafka=off,rdkafka::client=off".into()),
    )
    .stdin(Stdio::null());
    for (k, v) in broker.kind().producer_settings() {
        cmd.args(["-X", &format!("{k}={v}")]);
    }
    Ok(cmd.spawn()?)
}

/// Instance A applies tasks to per-user counters and is SIGKILLed mid-stream; instance B
/// with an empty state directory restores from the changelog and finishes. Every final
/// counter equals the number of tasks of its user: nothing lost, nothing applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_moves_to_new_owner_after_sigkill_tansu() -> anyhow::Result<()> {
    state_move(BrokerKind::TansuMemory).await
}

async fn state_move(kind: BrokerKind) -> anyhow::Result<()> {
    const TASKS: u64 = 50_000;
    const USERS: u64 = 1_000;
    const PARTITIONS: i32 = 3;
    let broker = TestBroker::start(kind)?;
    broker.create_topic("mv", PARTITIONS)?;
    broker.create_topic("mv-state-changelog", PARTITIONS)?;
    let expected = produce(&broker, "mv", TASKS, USERS).await?;
    let logs = tempfile::tempdir()?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut a = spawn_state_worker(&broker, "a", logs.path(), dir_a.path())?;
    let deadline = Instant::now() + Duration::from_secs(180);
    while (checker::read_jsonl_dir(logs.path())?.len() as u64) < TASKS / 3 {
        anyhow::ensure!(Instant::now() < deadline, "instance A made no progress");
        tokio::time::sleep(Duration::from_millis(100)).await; // polling another process's log
    }
    a.kill()?;
    a.wait()?;
    let done_by_a = checker::read_jsonl_dir(logs.path())?.len();
    let mut b = spawn_state_worker(&broker, "b", logs.path(), dir_b.path())?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let positions = committed(&broker.bootstrap_servers(), "mv", "mv", PARTITIONS)?;
        let sum: i64 = positions.iter().map(|(o, _)| o.unwrap_or(0)).sum();
        if sum as u64 == TASKS {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "B did not finish: committed {positions:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // polling the broker
    }
    // SIGTERM: B closes its stores cleanly.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe {
        libc::kill(b.id() as i32, libc::SIGTERM);
    }
    b.wait()?;
    let log = checker::read_jsonl_dir(logs.path())?;
    let report = checker::check(&expected, &log);
    let counters = read_counters(&state_cfg(dir_b.path()), "mv", "mv", PARTITIONS)?;
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(u, n)| counters.get(*u) != Some(n))
        .take(5)
        .collect();
    println!(
        "STATE MOVE {}: A processed {done_by_a} before SIGKILL; {report}; users with wrong counters: {}",
        kind.name(),
        expected.iter().filter(|(u, n)| counters.get(*u) != Some(n)).count()
    );
    assert_eq!(report.lost_count, 0, "{report}");
    assert!(
        wrong.is_empty(),
        "counters differ, e.g. {:?}",
        wrong
            .iter()
            .map(|(u, n)| (u, n, counters.get(*u)))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_moves_to_new_owner_after_sigkill_embedded() -> anyhow::Result<()> {
    state_move(BrokerKind::Embedded).await
}
