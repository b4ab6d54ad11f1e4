//! Partition-local state in the runtime: restore before processing, buffered task
//! mutations applied and appended to the changelog at completion, checkpoints on release.
//!
//! Per assigned partition a [`StateSlot`] tracks the store through its life:
//!
//! 1. **Assignment**: the partition is held (not ready) while a background task opens the
//!    local store and replays the changelog from its checkpoint, or from the beginning;
//!    only then may its tasks run. Offsets whose task effects the restore found in the
//!    changelog are skipped when redelivered, so no task's effects apply twice.
//! 2. **Completion**: a successful task's buffered writes are applied to the local store
//!    and appended to the changelog in one ordered step; its offset is marked done (and so
//!    becomes committable) only when the broker has acknowledged every record. A failed
//!    task's writes are dropped.
//! 3. **Release**: after the final commit, the store is checkpointed (changelog position
//!    plus the applied offsets above the commit position) and closed — unless a changelog
//!    append failed or a task was abandoned, in which case no checkpoint is written and the
//!    next owner rebuilds from the changelog.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use decaton_state::internal::{restore, ChangelogWriter, PartitionStore, TaskBatch};
use decaton_state::{StateConfig, StateError};
use parking_lot::Mutex;
use tokio::runtime::Handle;

use crate::context::{CompletionHook, CompletionInner, Outcome};
use crate::partition::PartitionShared;
use crate::stats::Counters;

/// One assignment of one partition's store.
pub(crate) struct StateSlot {
    partition: i32,
    store: OnceLock<PartitionStore>,
    /// First changelog offset not in the local store.
    next_changelog_offset: AtomicI64,
    /// Source offsets applied and acknowledged during this assignment.
    applied_here: Mutex<BTreeSet<i64>>,
    /// A local apply or changelog append failed: never checkpoint this store.
    failed: AtomicBool,
    /// The partition was released: stop restoring.
    closed: AtomicBool,
}

impl StateSlot {
    pub(crate) fn task_state(self: &Arc<Self>) -> Option<TaskState> {
        self.store.get().map(|s| TaskState {
            batch: s.task_batch(),
            slot: self.clone(),
        })
    }

    /// Whether the task at `offset` already has its effects in the store.
    pub(crate) fn is_applied(&self, offset: i64) -> bool {
        self.store.get().is_some_and(|s| s.is_applied(offset))
            || self.applied_here.lock().contains(&offset)
    }
}

/// What a task carries of the state: its buffered writes and the slot they go to.
pub(crate) struct TaskState {
    pub(crate) batch: TaskBatch,
    slot: Arc<StateSlot>,
}

pub(crate) struct StateRuntime {
    config: StateConfig,
    subscription: String,
    bootstrap: String,
    kafka: BTreeMap<String, String>,
    changelog_topic: String,
    writer: ChangelogWriter,
    runtime: Handle,
    counters: Arc<Counters>,
    slots: Mutex<HashMap<i32, Arc<StateSlot>>>,
}

impl StateRuntime {
    pub(crate) fn new(
        config: StateConfig,
        subscription: &str,
        bootstrap: &str,
        kafka: &BTreeMap<String, String>,
        runtime: Handle,
        counters: Arc<Counters>,
    ) -> Result<Self, StateError> {
        // Consumer-only settings make no sense for the changelog producer.
        let producer_kafka: BTreeMap<String, String> = kafka
            .iter()
            .filter(|(k, _)| !CONSUMER_ONLY.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(StateRuntime {
            changelog_topic: decaton_state::changelog_topic(subscription, &config.store_name),
            writer: ChangelogWriter::new(bootstrap, &producer_kafka)?,
            config,
            subscription: subscription.to_string(),
            bootstrap: bootstrap.to_string(),
            kafka: producer_kafka,
            runtime,
            counters,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Creates the changelog topic (compacted, as many partitions as `source_topic`) if
    /// the broker lets us; a broker that auto-creates topics, or refuses, gets a warning.
    pub(crate) async fn ensure_changelog(&self, source_topic: &str) {
        // An existing changelog needs no admin call (the mock cluster has none to offer).
        let (bootstrap, topic) = (self.bootstrap.clone(), self.changelog_topic.clone());
        let exists =
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::{BaseConsumer, Consumer};
                let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("allow.auto.create.topics", "false")
                    .create()
                    .ok()?;
                let md = consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(10))
                    .ok()?;
                Some(md.topics().iter().any(|t| {
                    t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                }))
            })
            .await
            .ok()
            .flatten()
            .unwrap_or(false);
        if exists {
            return;
        }
        match decaton_state::internal::create_changelog_topic(
            &self.bootstrap,
            &self.kafka,
            &self.subscription,
            &self.config.store_name,
            source_topic,
            None,
        )
        .await
        {
            Ok(info) => {
                tracing::info!(topic = %info.topic, partitions = info.partitions, created = info.created,
                compacted = info.compacted, "changelog topic ready")
            }
            Err(e) => {
                tracing::warn!(topic = %self.changelog_topic, "could not create the changelog topic ({e}); assuming it exists")
            }
        }
    }

    /// Starts opening and restoring the store of `partition`; `ready` turns true once its
    /// tasks may run.
    pub(crate) fn open_partition(
        &self,
        topic: &str,
        partition: i32,
        ready: Arc<AtomicBool>,
    ) -> Arc<StateSlot> {
        ready.store(false, Ordering::Release);
        let slot = Arc::new(StateSlot {
            partition,
            store: OnceLock::new(),
            next_changelog_offset: AtomicI64::new(0),
            applied_here: Mutex::new(BTreeSet::new()),
            failed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        self.slots.lock().insert(partition, slot.clone());
        let (config, subscription, topic) = (
            self.config.clone(),
            self.subscription.clone(),
            topic.to_string(),
        );
        let (bootstrap, kafka, changelog) = (
            self.bootstrap.clone(),
            self.kafka.clone(),
            self.changelog_topic.clone(),
        );
        let task_slot = slot.clone();
        let counters = self.counters.clone();
        let restored = metrics::counter!("decaton_state_restored_records_total", "subscription" => self.subscription.clone(),
            "partition" => partition.to_string());
        self.runtime.spawn(async move {
            let slot = task_slot;
            let mut backoff = Duration::from_millis(100);
            while !slot.closed.load(Ordering::Acquire) {
                let opened = {
                    let (config, subscription, topic) = (config.clone(), subscription.clone(), topic.clone());
                    tokio::task::spawn_blocking(move || PartitionStore::open(&config, &subscription, &topic, partition))
                        .await
                };
                let result = match opened {
                    Ok(Ok((store, report))) => {
                        tracing::info!(partition, ?report, "state store opened; restoring from the changelog");
                        match restore(&store, &bootstrap, &kafka, &changelog, partition, report.restore_from()).await {
                            Ok(r) => Ok((store, r)),
                            Err(e) => Err(e),
                        }
                    }
                    Ok(Err(e)) => Err(e),
                    Err(join) => Err(StateError::Internal(join.to_string())),
                };
                match result {
                    Ok((store, r)) => {
                        let rate = r.records_read as f64 / r.elapsed.as_secs_f64().max(1e-6);
                        tracing::info!(partition, records = r.records_read, batches = r.batches_applied,
                            partial_ignored = r.partial_batches_ignored, next_offset = r.next_offset,
                            elapsed = ?r.elapsed, records_per_s = rate as u64, "state restored");
                        counters
                            .state_records_restored
                            .fetch_add(r.records_read, Ordering::Relaxed);
                        restored.increment(r.records_read);
                        slot.next_changelog_offset.store(r.next_offset, Ordering::Release);
                        let _ = slot.store.set(store);
                        ready.store(true, Ordering::Release);
                        return;
                    }
                    Err(e) => {
                        tracing::error!(
                            partition,
                            "state store open/restore failed, retrying in {backoff:?}: {e}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
        slot
    }

    /// After the final commit of a released partition: checkpoint and close its store when
    /// every write reached the changelog, else leave it for a rebuild.
    pub(crate) fn close_partition(&self, slot: &Arc<StateSlot>, shared: &PartitionShared) {
        slot.closed.store(true, Ordering::Release);
        let mut slots = self.slots.lock();
        if slots
            .get(&slot.partition)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            slots.remove(&slot.partition);
        }
        drop(slots);
        let Some(store) = slot.store.get() else {
            return;
        };
        let (running, position) = {
            let core = shared.core.lock();
            (core.running, core.tracker.position())
        };
        if slot.failed.load(Ordering::Acquire) || running > 0 {
            tracing::warn!(
                partition = slot.partition,
                "state store released without a checkpoint (a write failed or a task \
                was abandoned); its next owner rebuilds it from the changelog"
            );
            return;
        }
        let from = position.unwrap_or(0);
        let mut applied: BTreeSet<i64> = store
            .applied_source_offsets()
            .range(from..)
            .copied()
            .collect();
        applied.extend(slot.applied_here.lock().range(from..).copied());
        let applied: Vec<i64> = applied.into_iter().collect();
        if let Err(e) =
            store.close_clean(slot.next_changelog_offset.load(Ordering::Acquire), &applied)
        {
            tracing::warn!(partition = slot.partition, "state checkpoint failed: {e}");
        }
    }
}

/// Consumer properties librdkafka would warn about on the changelog producer.
const CONSUMER_ONLY: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    "group.instance.id",
    "fetch.min.bytes",
    "fetch.wait.max.ms",
    "max.partition.fetch.bytes",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "isolation.level",
];

impl CompletionHook for StateRuntime {
    fn on_complete(&self, inner: Arc<CompletionInner>, outcome: Outcome) {
        let Some(state) = &inner.state else {
            inner.mark_done();
            return;
        };
        if !outcome.is_success() || state.batch.is_empty() {
            inner.mark_done();
            return;
        }
        let slot = state.slot.clone();
        let Some(store) = slot.store.get() else {
            inner.mark_done();
            return;
        };
        match store.apply_and_enqueue(&state.batch, &self.writer, inner.offset) {
            Ok(pending) => {
                let inner = inner.clone();
                let counters = self.counters.clone();
                self.runtime.spawn(async move {
                    match pending.wait().await {
                        Ok(last) => {
                            if let Some(last) = last {
                                slot.next_changelog_offset
                                    .fetch_max(last + 1, Ordering::AcqRel);
                            }
                            slot.applied_here.lock().insert(inner.offset);
                            inner.mark_done();
                        }
                        Err(e) => state_write_failed(&slot, &inner, &e, &counters),
                    }
                });
            }
            Err(e) => state_write_failed(&slot, &inner, &e, &self.counters),
        }
    }
}

/// The task's effects may be in the local store but not in the changelog: its offset must
/// never be committed (it stays unfinished, pinning the position, and runs again on the
/// next owner after a rebuild), and this store must never be checkpointed.
fn state_write_failed(
    slot: &StateSlot,
    inner: &CompletionInner,
    e: &StateError,
    counters: &Counters,
) {
    slot.failed.store(true, Ordering::Release);
    counters
        .state_write_failures
        .fetch_add(1, Ordering::Relaxed);
    tracing::error!(
        partition = slot.partition,
        offset = inner.offset,
        "state write failed; the offset stays uncommitted and the partition's position is held: {e}"
    );
    inner.partition.release();
}
