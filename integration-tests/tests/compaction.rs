#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]
//! The compaction stage end to end: location updates collapse to one per user per window,
//! the survivor chosen by the user's function, nothing else lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use decaton_integration_tests::{committed, put_tasks};
use decaton_processor::{
    async_trait, BatchProcessor, BatchedTask, Compaction, ProcessorProperties, SchedulingMode,
    Subscription, Survivor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{wait_until, BrokerKind, TestBroker};
use parking_lot::Mutex;

/// The survivors of one window: (user, sequence).
type Window = Vec<(String, u64)>;

/// Records every window's survivors.
struct SaveLatest(Arc<Mutex<Vec<Window>>>);

#[async_trait]
impl BatchProcessor<ChatOp> for SaveLatest {
    async fn process_batch(&self, batch: Vec<BatchedTask<ChatOp>>) {
        self.0.lock().push(
            batch
                .iter()
                .map(|t| (t.task.user_id.clone(), t.task.sequence))
                .collect(),
        );
        for t in batch {
            t.complete();
        }
    }
}

async fn compaction(kind: BrokerKind) -> anyhow::Result<()> {
    const UPDATES: u64 = 10_000;
    const USERS: u64 = 100;
    let broker = TestBroker::start(kind)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("locations", 2)?;
    let windows = Arc::new(Mutex::new(Vec::new()));
    let stage = Compaction::new(
        SaveLatest(windows.clone()),
        Duration::from_millis(500),
        |kept, arrived| {
            if arrived.task.sequence > kept.task.sequence {
                Survivor::Arrived
            } else {
                Survivor::Kept
            }
        },
    );
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::PerKey;
    props.commit_interval = Duration::from_millis(100);
    let sub = Subscription::builder("locations", stage)
        .bootstrap_servers(&bootstrap)
        .topic("locations")
        .properties(props)
        .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    put_tasks(
        &bootstrap,
        kind.producer_settings(),
        "locations",
        0..UPDATES,
        USERS,
    )
    .await?;
    // Done when every user's last update (sequence 99) was saved.
    let last = UPDATES / USERS - 1;
    let saved_last =
        |w: &Vec<Vec<(String, u64)>>| w.iter().flatten().filter(|(_, s)| *s == last).count() as u64;
    let done = wait_until(Duration::from_secs(60), || {
        saved_last(&windows.lock()) == USERS
    })
    .await;
    let positions_done = wait_until(Duration::from_secs(30), || {
        committed(&bootstrap, "locations", "locations", 2)
            .map(|c| c.iter().filter_map(|(o, _)| *o).sum::<i64>() == UPDATES as i64)
            .unwrap_or(false)
    })
    .await;
    handle.shutdown();
    let stats = tokio::time::timeout(Duration::from_secs(30), running).await???;
    let windows = windows.lock();
    let survivors: usize = windows.iter().map(Vec::len).sum();
    println!(
        "{}: {UPDATES} updates for {USERS} users -> {survivors} saved in {} windows; {stats:?}",
        kind.name(),
        windows.len()
    );
    assert!(done, "not every user's last update was saved");
    assert!(positions_done, "not every update was committed");
    // At most one per user per window, and a user's saved updates only move forward.
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for w in windows.iter() {
        let mut users: Vec<&str> = w.iter().map(|(u, _)| u.as_str()).collect();
        users.sort_unstable();
        let n = users.len();
        users.dedup();
        assert_eq!(users.len(), n, "a window saved two updates of one user");
        for (u, s) in w {
            if let Some(prev) = seen.insert(u, *s) {
                assert!(*s > prev, "{u}: saved {s} after {prev}");
            }
        }
    }
    assert!(
        survivors < UPDATES as usize / 2,
        "hardly anything compacted: {survivors}"
    );
    assert_eq!(
        stats.processed, UPDATES,
        "every update went through the stage"
    );
    Ok(())
}
decaton_integration_tests::broker_tests!(
    updates_collapse_to_one_per_user_per_window,
    crate::compaction
);
