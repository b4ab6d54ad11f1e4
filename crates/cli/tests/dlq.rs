#![allow(clippy::field_reassign_with_default)]
//! `decaton dlq` against both brokers: a subscription dead-letters tasks its storage
//! refuses; `list` summarises them, a dry-run `replay` changes nothing, and a real
//! `replay` puts them back where the same subscription, its storage repaired, processes
//! them.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use decaton_client::TaskClient;
use decaton_processor::{
    async_trait, DeadLetterConfig, ProcessError, ProcessingContext, ProcessorProperties,
    Subscription, TaskProcessor,
};
use decaton_protocol::{ChatOp, OpType};
use decaton_testkit::{wait_until, BrokerKind, TestBroker};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};

const BIN: &str = env!("CARGO_BIN_EXE_decaton");

/// Refuses tasks of keys starting with "bad-" while `broken` is set; records the
/// (key, retry count) of every task it completes.
struct Storage {
    broken: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<(String, i64)>>>,
}

#[async_trait]
impl TaskProcessor<ChatOp> for Storage {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        if task.user_id.starts_with("bad-") && self.broken.load(Ordering::SeqCst) {
            return Err(ProcessError::permanent("storage refused the row"));
        }
        self.done
            .lock()
            .push((task.user_id, ctx.metadata().retry_count));
        Ok(())
    }
}

fn decaton(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .context("running decaton")?;
    anyhow::ensure!(
        out.status.success(),
        "decaton {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn high_watermark(bootstrap: &str, topic: &str) -> anyhow::Result<i64> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    Ok(c.fetch_watermarks(topic, 0, Duration::from_secs(10))?.1)
}

async fn replay(kind: BrokerKind) -> anyhow::Result<()> {
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("orders", 1)?;
    broker.create_topic("orders-dlq", 1)?;
    let broken = Arc::new(AtomicBool::new(true));
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut props = ProcessorProperties::default();
    props.commit_interval = Duration::from_millis(100);
    let mut builder = Subscription::builder(
        "orders",
        Storage {
            broken: broken.clone(),
            done: done.clone(),
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("orders")
    .properties(props)
    .dead_letter(DeadLetterConfig::new());
    for (k, v) in kind.producer_settings() {
        builder = builder.set(*k, *v);
    }
    let sub = builder.build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let mut client = TaskClient::<ChatOp>::builder(&bootstrap, "orders").application_id("it");
    for (k, v) in kind.producer_settings() {
        client = client.set(*k, *v);
    }
    let client = client.build()?;
    for (i, user) in ["good-1", "bad-1", "good-2", "bad-2", "bad-3"]
        .iter()
        .enumerate()
    {
        let task = ChatOp {
            user_id: user.to_string(),
            op: OpType::SendMessage as i32,
            sequence: i as u64,
            ..Default::default()
        };
        client.put(*user, &task).await?;
    }
    assert!(
        wait_until(Duration::from_secs(30), || handle.stats().dead_lettered
            == 3
            && done.lock().len() == 2)
        .await,
        "{:?}",
        handle.stats()
    );

    let list = decaton(&["dlq", "list", "-b", &bootstrap, "--topic", "orders-dlq"])?;
    println!("{list}");
    assert!(list.contains("records=3"), "{list}");
    assert!(
        list.contains("3  kind=permanent  reason=storage refused the row"),
        "{list}"
    );
    let one = decaton(&[
        "dlq",
        "list",
        "-b",
        &bootstrap,
        "--topic",
        "orders-dlq",
        "--key",
        "bad-2",
        "--records",
    ])?;
    assert!(
        one.contains("records=1") && one.contains("key=bad-2"),
        "{one}"
    );

    let before = high_watermark(&bootstrap, "orders")?;
    let dry = decaton(&[
        "dlq",
        "replay",
        "-b",
        &bootstrap,
        "--topic",
        "orders-dlq",
        "--dry-run",
    ])?;
    assert!(dry.contains("would replay 3 to orders"), "{dry}");
    assert_eq!(
        high_watermark(&bootstrap, "orders")?,
        before,
        "a dry run produced"
    );

    broken.store(false, Ordering::SeqCst);
    let out = decaton(&[
        "dlq",
        "replay",
        "-b",
        &bootstrap,
        "--topic",
        "orders-dlq",
        "--reason",
        "refused",
        "--key",
        "bad-1",
        "--key",
        "bad-3",
    ])?;
    assert!(out.contains("replayed 2 to orders"), "{out}");
    let replayed = |d: &Vec<(String, i64)>| d.iter().filter(|(k, _)| k.starts_with("bad-")).count();
    assert!(
        wait_until(Duration::from_secs(30), || replayed(&done.lock()) == 2).await,
        "replayed tasks not processed: {:?}",
        done.lock()
    );
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(30), running).await???;
    let mut bad: Vec<(String, i64)> = done
        .lock()
        .iter()
        .filter(|(k, _)| k.starts_with("bad-"))
        .cloned()
        .collect();
    bad.sort();
    assert_eq!(bad, vec![("bad-1".into(), 0), ("bad-3".into(), 0)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_replay_embedded() -> anyhow::Result<()> {
    replay(BrokerKind::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_replay_tansu() -> anyhow::Result<()> {
    replay(BrokerKind::TansuMemory).await
}
