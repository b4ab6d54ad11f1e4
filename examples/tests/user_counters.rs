//! Runs the `user-counters` processor on an embedded broker with a sled state store,
//! then reads the counters back from the state directory: every user's total must equal
//! the operations produced for that user, and the per-type counts must match exactly.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use decaton_client::TaskClient;
use decaton_examples::chat::{op_name, ChatOpGenerator};
use decaton_examples::counters::{count_state_dir, UserCountersProcessor, SUBSCRIPTION};
use decaton_processor::{ProcessorProperties, SchedulingMode, Subscription};
use decaton_protocol::ChatOp;
use decaton_state::{changelog_topic, StateConfig};
use decaton_testkit::{BrokerKind, TestBroker};
use futures::StreamExt as _;

const TOPIC: &str = "chat-ops";
const PARTITIONS: i32 = 3;
const TASKS: u64 = 2_000;
const USERS: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_in_state_match_what_was_produced() -> anyhow::Result<()> {
    let broker = tokio::task::spawn_blocking(|| -> anyhow::Result<TestBroker> {
        let broker = TestBroker::start(BrokerKind::Embedded)?;
        broker.create_topic(TOPIC, PARTITIONS)?;
        // The mock cluster cannot create the changelog topic through the admin API.
        broker.create_topic(&changelog_topic(SUBSCRIPTION, "state"), PARTITIONS)?;
        Ok(broker)
    })
    .await??;
    let bootstrap = broker.bootstrap_servers();

    // Produce, remembering what each user did.
    let mut chat = ChatOpGenerator::new(USERS, 11);
    let ops: Vec<ChatOp> = (0..TASKS).map(|_| chat.next_op()).collect();
    let mut expected: HashMap<String, (u64, BTreeMap<String, u64>, i64)> = HashMap::new();
    for op in &ops {
        let e = expected.entry(op.user_id.clone()).or_default();
        e.0 += 1;
        *e.1.entry(op_name(op.op).to_string()).or_default() += 1;
        e.2 = e.2.max(op.created_at_millis);
    }
    let client = TaskClient::<ChatOp>::builder(bootstrap.clone(), TOPIC)
        .application_id("user-counters-test")
        .build()?;
    let results: Vec<_> = futures::stream::iter(&ops)
        .map(|op| client.put(op.user_id.clone(), op))
        .buffered(1_000)
        .collect()
        .await;
    for r in results {
        r?;
    }
    client.close().await?;

    // Process everything with a sled state store in a temporary directory.
    let dir = tempfile::tempdir()?;
    let state = StateConfig {
        state_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let processor = UserCountersProcessor::new();
    let observer = processor.clone();
    let subscription = Subscription::builder(SUBSCRIPTION, processor)
        .bootstrap_servers(bootstrap)
        .topic(TOPIC)
        .properties(ProcessorProperties {
            mode: SchedulingMode::PerKey,
            ..Default::default()
        })
        .state_store(state.clone())
        .build()?;
    let handle = subscription.handle();
    let running = tokio::spawn(subscription.run());
    let deadline = Instant::now() + Duration::from_secs(120);
    while observer.seen() < TASKS {
        if Instant::now() >= deadline || running.is_finished() {
            handle.shutdown();
            anyhow::bail!(
                "processed {} of {TASKS}; {:?}",
                observer.seen(),
                handle.stats()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // polling the processor's counter
    }
    handle.shutdown();
    let stats = running.await??;
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(stats.state_write_failures, 0, "{stats:?}");

    // Read the counters back from the closed stores.
    let dump =
        tokio::task::spawn_blocking(move || count_state_dir(&state, SUBSCRIPTION, TOPIC)).await??;
    assert!(
        dump.discarded.is_empty(),
        "stores not closed cleanly: {:?}",
        dump.discarded
    );
    assert_eq!(dump.partitions, (0..PARTITIONS).collect::<Vec<_>>());
    assert_eq!(dump.users.len(), expected.len());
    for (user, (total, per_op, last)) in &expected {
        let got = dump
            .users
            .get(user)
            .ok_or_else(|| anyhow::anyhow!("no counters for {user}"))?;
        assert_eq!(got.total, *total, "{user}: {}", got.describe());
        assert_eq!(
            got.ops.values().sum::<u64>(),
            got.total,
            "{user}: {}",
            got.describe()
        );
        assert_eq!(&got.ops, per_op, "{user}");
        assert_eq!(got.last_millis, Some(*last), "{user}");
    }
    assert_eq!(dump.total(), TASKS);
    println!("{}", dump.summary(10));
    Ok(())
}
