//! Partition-local state in the runtime: restore before processing, durable writes before
//! completion, a fence at release.
//!
//! Per assigned partition a [`StateSlot`] tracks the store through its life:
//!
//! 1. **Assignment**: the partition is held (not ready) while a background task opens the
//!    local store on the blocking pool and replays the changelog from its checkpoint, or
//!    from the beginning. A failed restore is retried on the same open store, so a broker
//!    hiccup never turns into a full rebuild. Offsets whose effects the restore found in
//!    the changelog are skipped when redelivered; only those at or above the committed
//!    position are remembered, and commits forget the ones they pass.
//! 2. **Completion**: a successful task's writes go to the changelog first. Only when the
//!    broker has acknowledged every record are they applied to the local store, and only
//!    then is the offset done and may the key's next task start. An append that failed
//!    transiently is sent again (the values are absolute, so a record that did land and
//!    its repeat restore the same state) until it is acknowledged or the partition is
//!    released: the local store never holds a write the changelog lacks, and no task's
//!    effects apply twice. An append the changelog refused for good (too large, topic
//!    missing, not authorised, invalid, a broken producer) fails the task instead: none
//!    of its writes reach the local store, what may have landed of the batch is reverted
//!    in the changelog, and the task takes the failure path (retry or dead-letter topic
//!    with the reason, or done as failed when the subscription has neither). A revert
//!    that cannot be written either stops the partition at that offset, loudly, until
//!    it can.
//! 3. **Release**: the slot is fenced: no later apply, append or restore write reaches the
//!    store. After the final commit a clean store is checkpointed (changelog position plus
//!    the applied offsets at or above the commit position); a store with abandoned tasks
//!    or a failed local write is left without one, and its next owner rebuilds it.
//!
//! Sled work and librdkafka calls that may wait run on the blocking pool; reads from the
//! sled store inside `process` tell the runtime they block.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::BackoffBuilder;
use decaton_state::internal::{
    restore, ChangelogWriter, Mutation, PartitionStore, RestoreOptions, TaskBatch,
};
use decaton_state::{Backend, StateConfig, StateError, StateStore};
use tokio::runtime::Handle;

use super::completion::Outcome;
use super::forward::{Failure, Forwarder, RawRecord};
use super::kafka_config;
use super::partition_core::PartitionCore;
use super::recorder::SubscriptionRecorder;
use super::topics::PartitionId;
use super::wakeup::Wakeup;

/// One assignment of one partition's store.
pub(crate) struct StateSlot {
    partition: i32,
    store: OnceLock<PartitionStore>,
    ready: AtomicBool,
    /// First changelog offset not in the local store.
    next_changelog_offset: AtomicI64,
    /// A local write failed: never checkpoint this store.
    failed: AtomicBool,
    fenced: AtomicBool,
    blocking_reads: bool,
}

impl StateSlot {
    /// Restored, so the partition's tasks may run.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether the task at `offset` already has its effects in the store.
    pub(crate) fn is_applied(&self, offset: i64) -> bool {
        self.store.get().is_some_and(|s| s.is_applied(offset))
    }

    pub(crate) fn forget_applied_below(&self, offset: i64) {
        if let Some(s) = self.store.get() {
            s.forget_applied_below(offset);
        }
    }

    /// A task's view of the store.
    pub(crate) fn task_state(self: &Arc<Self>) -> Option<TaskState> {
        let store = self.store.get()?;
        Some(TaskState {
            batch: store.task_batch(),
            slot: self.clone(),
        })
    }

    /// No later write, append or restore step reaches the store.
    pub(crate) fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
        if let Some(s) = self.store.get() {
            s.fence();
        }
    }

    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }
}

impl StateSlot {
    /// A restored slot around an open store (for tests and the processor test harness).
    pub(crate) fn ready_with(store: PartitionStore) -> Arc<Self> {
        let slot = StateSlot {
            partition: store.partition(),
            store: OnceLock::new(),
            ready: AtomicBool::new(true),
            next_changelog_offset: AtomicI64::new(0),
            failed: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            blocking_reads: false,
        };
        let _ = slot.store.set(store);
        Arc::new(slot)
    }
}

/// What a task sees of the state: its buffered writes over the partition's store.
pub(crate) struct TaskState {
    batch: TaskBatch,
    slot: Arc<StateSlot>,
}

impl TaskState {
    /// A fresh view for another attempt of the same task: this attempt's writes dropped.
    pub(crate) fn restarted(&self) -> Option<TaskState> {
        self.slot.task_state()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Applies the task's writes to the local store directly, with no changelog (the
    /// processor test harness), and returns them in key order.
    #[allow(clippy::type_complexity)]
    pub(crate) fn apply_without_changelog(
        &self,
        offset: i64,
    ) -> Result<Vec<(Vec<u8>, Option<Vec<u8>>)>, StateError> {
        let Some(store) = self.slot.store.get() else {
            return Ok(Vec::new());
        };
        let mutations = store.take_mutations(&self.batch)?;
        store.apply_acknowledged(&mutations, offset)?;
        Ok(mutations.into_iter().map(|m| (m.key, m.value)).collect())
    }

    fn read<R>(&self, f: impl FnOnce(&TaskBatch) -> R) -> R {
        let multi_thread = Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if self.slot.blocking_reads && multi_thread {
            tokio::task::block_in_place(|| f(&self.batch))
        } else {
            f(&self.batch)
        }
    }
}

impl StateStore for TaskState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.read(|b| b.get(key))
    }
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.batch.put(key, value)
    }
    fn delete(&self, key: &[u8]) -> Result<(), StateError> {
        self.batch.delete(key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StateError> {
        self.read(|b| b.scan_prefix(prefix))
    }
}

/// The state machinery of one subscription.
pub(crate) struct StateRuntime {
    config: StateConfig,
    subscription: String,
    bootstrap: String,
    /// The user's settings for non-consumer clients.
    kafka: BTreeMap<String, String>,
    changelog_topic: String,
    writer: Arc<ChangelogWriter>,
    runtime: Handle,
    recorder: Arc<SubscriptionRecorder>,
    /// The oldest checkpoint a restore trusts: the configured one, lowered to half the
    /// changelog's `delete.retention.ms` if the broker tells it. Asked once, by the first
    /// restore that has a checkpoint.
    checkpoint_max_age: Arc<tokio::sync::OnceCell<Duration>>,
}

/// The longest pause between attempts to revert a refused batch.
const REVERT_MAX_DELAY: Duration = Duration::from_secs(60);

/// How keeping a task's state writes ended.
enum Persisted {
    /// In the changelog and the local store.
    Durable,
    /// The partition was released first: nothing of the task counts.
    Released,
    /// The changelog refused them for good (the reason); none were applied, and what
    /// may have landed was reverted.
    Refused(String),
}

fn backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

impl StateRuntime {
    pub(crate) fn new(
        config: StateConfig,
        subscription: &str,
        bootstrap: &str,
        user: &BTreeMap<String, String>,
        runtime: Handle,
        recorder: Arc<SubscriptionRecorder>,
    ) -> Result<Self, StateError> {
        let kafka = kafka_config::shared_settings(user);
        Ok(StateRuntime {
            changelog_topic: decaton_state::changelog_topic(subscription, &config.store_name),
            writer: Arc::new(ChangelogWriter::new(bootstrap, &kafka)?),
            checkpoint_max_age: Arc::default(),
            config,
            subscription: subscription.to_string(),
            bootstrap: bootstrap.to_string(),
            kafka,
            runtime,
            recorder,
        })
    }

    /// Creates the changelog topic (compacted, as many partitions as `source_topic`) if
    /// it does not exist and the broker lets us; otherwise a warning.
    pub(crate) async fn ensure_changelog(&self, source_topic: &str) {
        let probe = kafka_config::probe(&self.bootstrap, &self.kafka);
        let topic = self.changelog_topic.clone();
        let exists =
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::{BaseConsumer, Consumer};
                let consumer: BaseConsumer = probe.create().ok()?;
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
            Ok(info) => tracing::info!(topic = %info.topic, partitions = info.partitions,
                created = info.created, compacted = info.compacted, "changelog topic ready"),
            Err(e) => tracing::warn!(topic = %self.changelog_topic,
                "could not create the changelog topic ({e}); assuming it exists"),
        }
    }

    /// Opens and restores the store of `partition` in the background; the slot turns
    /// ready (and `wakeup` is told) once its tasks may run. `committed` is the source
    /// partition's committed offset: nothing below it is redelivered.
    pub(crate) fn open_partition(
        &self,
        topic: &str,
        id: PartitionId,
        committed: Option<i64>,
        wakeup: Arc<Wakeup>,
    ) -> Arc<StateSlot> {
        let partition = id.partition;
        let slot = Arc::new(StateSlot {
            partition,
            store: OnceLock::new(),
            ready: AtomicBool::new(false),
            next_changelog_offset: AtomicI64::new(0),
            failed: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            blocking_reads: self.config.backend == Backend::Sled,
        });
        let task_slot = slot.clone();
        let (config, subscription, topic) = (
            self.config.clone(),
            self.subscription.clone(),
            topic.to_string(),
        );
        let (bootstrap, kafka) = (self.bootstrap.clone(), self.kafka.clone());
        let recorder = self.recorder.clone();
        let max_age = self.checkpoint_max_age.clone();
        let changelog = self.changelog_topic.clone();
        self.runtime.spawn(async move {
            let slot = task_slot;
            let mut delays = backoff();
            // Open (on the blocking pool), once.
            let (store, report) = loop {
                if slot.is_fenced() {
                    return;
                }
                let (c, s, t) = (config.clone(), subscription.clone(), topic.clone());
                match tokio::task::spawn_blocking(move || PartitionStore::open(&c, &s, &t, partition)).await {
                    Ok(Ok(opened)) => break opened,
                    Ok(Err(e)) => tracing::error!(partition, "state store open failed, retrying: {e}"),
                    Err(e) => tracing::error!(partition, "state store open panicked, retrying: {e}"),
                }
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
            };
            let _ = slot.store.set(store.clone());
            if slot.is_fenced() {
                store.fence();
                return;
            }
            tracing::info!(partition, ?report, "state store opened; restoring from the changelog");
            // Restore, retried on the same store: the checkpoint it was opened with stays valid.
            let mut options = RestoreOptions::new(report.restore_from(), committed.unwrap_or(0));
            if report.restore_from().is_some() {
                // Compaction drops a delete `delete.retention.ms` after cleaning it: a
                // checkpoint older than half of that may miss deletes.
                let configured = Duration::from_millis(config.checkpoint_max_age_ms);
                let max_age = *max_age
                    .get_or_init(|| async {
                        let retention = decaton_state::internal::changelog_delete_retention(
                            &bootstrap, &kafka, &changelog,
                        )
                        .await;
                        tracing::debug!(topic = %changelog, ?retention, "changelog delete retention");
                        retention.map_or(configured, |r| configured.min(r / 2))
                    })
                    .await;
                options = options.with_checkpoint_max_age(max_age);
            }
            loop {
                match restore(&store, &bootstrap, &kafka, &options).await {
                    Ok(r) => {
                        let rate = r.records_read as f64 / r.elapsed.as_secs_f64().max(1e-6);
                        tracing::info!(partition, records = r.records_read, batches = r.batches_applied,
                            partial_ignored = r.partial_batches_ignored, next_offset = r.next_offset,
                            elapsed = ?r.elapsed, records_per_s = rate as u64, "state restored");
                        recorder.state_restored(r.records_read);
                        slot.next_changelog_offset.store(r.next_offset, Ordering::Release);
                        slot.ready.store(true, Ordering::Release);
                        wakeup.notify(id);
                        return;
                    }
                    Err(StateError::Closed(_)) => return,
                    Err(e) if slot.is_fenced() => {
                        tracing::debug!(partition, "restore stopped by release: {e}");
                        return;
                    }
                    Err(e) => {
                        let delay = delays.next().unwrap_or(Duration::from_secs(10));
                        tracing::error!(partition, "state restore failed, retrying in {delay:?}: {e}");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        });
        slot
    }

    /// Ends a task that ran with state: keeps its writes if it succeeded (durable in the
    /// changelog, then local), then marks its offset done — or nothing, if the partition
    /// was released before the writes could be kept. When the changelog refuses the
    /// writes for good, the task fails: `forward` (the subscription's forwarder and the
    /// task's record) sends it to the retry or dead-letter topic first, when given.
    pub(crate) async fn finish_task(
        &self,
        partition: &Arc<PartitionCore>,
        offset: i64,
        state: TaskState,
        outcome: Outcome,
        forward: Option<(Arc<Forwarder>, Arc<RawRecord>)>,
    ) {
        if !outcome.is_success() || state.is_empty() {
            partition.finish(offset);
            return;
        }
        match self.persist(&state, offset, partition).await {
            Persisted::Durable => partition.finish(offset),
            Persisted::Released => partition.release(),
            Persisted::Refused(reason) => {
                partition.recorder().failed();
                tracing::warn!(topic = %partition.topic(), partition = partition.partition(),
                    offset, "task failed: the changelog refused its state writes for good; \
                    none of them were applied: {reason}");
                let Some((forwarder, record)) = forward else {
                    partition.finish(offset);
                    return;
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let failure = Failure::of(
                    Outcome::Error,
                    Some(format!("state write refused by the changelog: {reason}")),
                );
                forwarder.spawn(partition.clone(), offset, record, failure, move |done| {
                    let _ = tx.send(done);
                });
                match rx.await {
                    Ok(true) => partition.finish(offset),
                    _ => partition.release(),
                }
            }
        }
    }

    async fn persist(
        &self,
        state: &TaskState,
        offset: i64,
        partition: &PartitionCore,
    ) -> Persisted {
        let recorder = partition.recorder();
        let slot = &state.slot;
        let Some(store) = slot.store.get() else {
            return Persisted::Released;
        };
        let Ok(mutations) = store.take_mutations(&state.batch) else {
            return Persisted::Released;
        };
        let mutations: Arc<[Mutation]> = mutations.into();
        let mut delays = backoff();
        let last = loop {
            if slot.is_fenced() {
                return Persisted::Released;
            }
            // A slow changelog leader must not hold a released partition: its next
            // assignment in this process waits for this task.
            let Some(appended) =
                unless_closed(partition, self.append(store, offset, mutations.clone())).await
            else {
                return Persisted::Released;
            };
            match appended {
                Ok(last) => break last,
                Err(StateError::Closed(_)) => return Persisted::Released,
                Err(StateError::Refused {
                    reason, torn_batch, ..
                }) => {
                    recorder.state_write_failed();
                    if let Some(batch) = torn_batch {
                        if !self
                            .revert(store, offset, batch, &mutations, partition)
                            .await
                        {
                            return Persisted::Released;
                        }
                    }
                    return Persisted::Refused(reason);
                }
                Err(e) => {
                    recorder.state_write_failed();
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(
                        partition = slot.partition,
                        offset,
                        "changelog append failed; sending it again in {delay:?}: {e}"
                    );
                    if unless_closed(partition, tokio::time::sleep(delay))
                        .await
                        .is_none()
                    {
                        return Persisted::Released;
                    }
                }
            }
        };
        loop {
            let (s, m) = (store.clone(), mutations.clone());
            match tokio::task::spawn_blocking(move || s.apply_acknowledged(&m, offset)).await {
                Ok(Ok(())) => break,
                Ok(Err(StateError::Closed(_))) => return Persisted::Released,
                Ok(Err(e)) => {
                    slot.failed.store(true, Ordering::Release);
                    tracing::error!(
                        partition = slot.partition,
                        offset,
                        "local state write failed (the changelog has it); retrying: {e}"
                    );
                }
                Err(e) => tracing::error!(
                    partition = slot.partition,
                    offset,
                    "local state write panicked: {e}"
                ),
            }
            if slot.is_fenced() {
                return Persisted::Released;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            if unless_closed(partition, tokio::time::sleep(delay))
                .await
                .is_none()
            {
                return Persisted::Released;
            }
        }
        if let Some(last) = last {
            slot.next_changelog_offset
                .fetch_max(last + 1, Ordering::AcqRel);
        }
        Persisted::Durable
    }

    /// Reverts what may have landed of the refused batch `batch` of the task at `offset`:
    /// an abort marker, then the local store's values of every key the batch wrote (the
    /// task still holds its key, so no other batch of it is in flight). Sent again until
    /// acknowledged: a revert refused for good stalls the partition at `offset` (health
    /// not ready with the reason, the stall gauge, an error log at most once a minute),
    /// since a later batch could make a restore apply the torn one; a revert that lands
    /// lifts the stall. False if the partition was released first.
    async fn revert(
        &self,
        store: &PartitionStore,
        offset: i64,
        batch: u64,
        mutations: &Arc<[Mutation]>,
        partition: &PartitionCore,
    ) -> bool {
        let mut delays = backoff();
        loop {
            if store.is_fenced() {
                partition.unstall(offset);
                return false;
            }
            let (writer, s, m) = (self.writer.clone(), store.clone(), mutations.clone());
            let sent = tokio::task::spawn_blocking(move || {
                let valid = m
                    .iter()
                    .map(|mutation| {
                        Ok(Mutation {
                            value: s.get(&mutation.key)?,
                            key: mutation.key.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, StateError>>()?;
                let (topic, partition) = (s.changelog_topic(), s.partition());
                writer.enqueue_revert(|| s.is_fenced(), topic, partition, batch, &valid)
            })
            .await
            .map_err(|e| StateError::Internal(e.to_string()));
            let error = match sent.and_then(|r| r) {
                Ok(pending) => match unless_closed(partition, pending.wait()).await {
                    None => {
                        partition.unstall(offset);
                        return false;
                    }
                    Some(Ok(_)) => {
                        partition.unstall(offset);
                        tracing::info!(
                            partition = store.partition(),
                            offset,
                            batch,
                            "reverted a changelog batch refused part-way"
                        );
                        return true;
                    }
                    Some(Err(e)) => e,
                },
                Err(e) => e,
            };
            if matches!(error, StateError::Closed(_)) {
                partition.unstall(offset);
                return false;
            }
            partition.recorder().state_write_failed();
            let delay = delays
                .next()
                .unwrap_or(REVERT_MAX_DELAY)
                .min(REVERT_MAX_DELAY);
            if error.is_permanent() {
                let reason =
                    format!("a changelog batch refused part-way cannot be reverted: {error}");
                if partition.stall(offset, &reason) {
                    tracing::error!(topic = %partition.topic(), partition = partition.partition(),
                        offset, batch, "partition stopped at offset {offset}: {reason}; \
                        trying again every {REVERT_MAX_DELAY:?} until the changelog accepts it");
                }
            } else {
                tracing::warn!(
                    partition = store.partition(),
                    offset,
                    batch,
                    "revert of a refused changelog batch failed; sending it again in \
                    {delay:?}: {error}"
                );
            }
            if unless_closed(partition, tokio::time::sleep(delay))
                .await
                .is_none()
            {
                partition.unstall(offset);
                return false;
            }
        }
    }

    async fn append(
        &self,
        store: &PartitionStore,
        offset: i64,
        mutations: Arc<[Mutation]>,
    ) -> Result<Option<i64>, StateError> {
        let (writer, store) = (self.writer.clone(), store.clone());
        // Handing records to librdkafka may wait while a batch is part-way out; the fence
        // is checked under the lock the release's purge takes.
        let pending = tokio::task::spawn_blocking(move || {
            let (topic, partition) = (store.changelog_topic(), store.partition());
            writer.enqueue_unless(|| store.is_fenced(), topic, partition, offset, &mutations)
        })
        .await
        .map_err(|e| StateError::Internal(e.to_string()))??;
        pending.wait().await
    }

    /// Releases a partition's slot after its final commit at `position`: fenced in any
    /// case; checkpointed when clean.
    pub(crate) fn close_partition(
        &self,
        slot: &StateSlot,
        position: Option<i64>,
        abandoned: usize,
    ) {
        let Some(store) = slot.store.get() else {
            slot.fence();
            return;
        };
        if abandoned > 0 {
            slot.fence();
            // Appends of abandoned tasks still queued must not land after another owner
            // took over; those of other partitions fail and are sent again. Records
            // already in flight cannot be recalled.
            self.writer.purge_queued();
        }
        if !slot.is_ready() || abandoned > 0 || slot.failed.load(Ordering::Acquire) {
            slot.fence();
            tracing::warn!(partition = slot.partition, restored = slot.is_ready(), abandoned,
                "state store released without a checkpoint; its next owner rebuilds it from the changelog");
            return;
        }
        let applied = store.applied_source_offsets_from(position.unwrap_or(0));
        if let Err(e) =
            store.close_clean(slot.next_changelog_offset.load(Ordering::Acquire), &applied)
        {
            tracing::warn!(partition = slot.partition, "state checkpoint failed: {e}");
        }
        slot.fence();
    }
}

/// `wait`'s output, or `None` once `partition` is closed (released at a rebalance or a
/// shutdown) first.
async fn unless_closed<F: std::future::Future>(
    partition: &PartitionCore,
    wait: F,
) -> Option<F::Output> {
    tokio::select! {
        out = wait => Some(out),
        () = partition.closed() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::task::tests::core;

    /// A state runtime whose changelog broker never answers.
    fn unreachable_runtime() -> StateRuntime {
        StateRuntime::new(
            StateConfig::default(),
            "s",
            "127.0.0.1:1",
            &BTreeMap::new(),
            Handle::current(),
            Arc::new(SubscriptionRecorder::new(Arc::from("s"), Arc::default())),
        )
        .unwrap()
    }

    fn memory_store() -> PartitionStore {
        let cfg = StateConfig {
            backend: Backend::Memory,
            ..Default::default()
        };
        PartitionStore::open(&cfg, "s", "t", 0).unwrap().0
    }

    /// A task that finishes after its partition was released keeps none of its writes and
    /// marks nothing done: the slot is fenced exactly like commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_finishing_after_release_writes_no_state() {
        let store = memory_store();
        let slot = StateSlot::ready_with(store.clone());
        // Nothing listens there: the writer must never be reached.
        let runtime = unreachable_runtime();
        let partition = core();
        let task = slot.task_state().unwrap();
        task.put(b"k", b"late").unwrap();
        assert!(partition.try_start_for_test(7));
        // Revoked and released while the task ran.
        partition.close();
        slot.fence();
        runtime
            .finish_task(&partition, 7, task, Outcome::Done, None)
            .await;
        assert_eq!(store.get(b"k").unwrap(), None);
        assert!(!store.is_applied(7));
        assert_eq!(partition.running(), 0);
        assert_eq!(
            partition.position(),
            Some(7),
            "offset 7 must stay unfinished"
        );
    }

    /// A task waiting for a changelog that does not answer lets its partition go as soon
    /// as the partition is closed, instead of holding it (as the predecessor of its next
    /// assignment here) until the append gives up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_the_partition_ends_a_wait_for_the_changelog() {
        let store = memory_store();
        let slot = StateSlot::ready_with(store.clone());
        // Nothing listens there: the append waits, failing transiently, for ever.
        let runtime = unreachable_runtime();
        let partition = core();
        let task = slot.task_state().unwrap();
        task.put(b"k", b"v").unwrap();
        assert!(partition.try_start_for_test(7));
        let finishing = tokio::spawn({
            let partition = partition.clone();
            async move {
                runtime
                    .finish_task(&partition, 7, task, Outcome::Done, None)
                    .await
            }
        });
        partition.close();
        tokio::time::timeout(Duration::from_secs(5), finishing)
            .await
            .expect("closing ends the wait")
            .unwrap();
        assert_eq!(partition.running(), 0);
        assert_eq!(store.get(b"k").unwrap(), None);
        assert_eq!(partition.position(), Some(7), "offset 7 stays unfinished");
    }

    /// A state value the changelog refuses for good fails the task instead of being sent
    /// again forever: with no retry or dead-letter topic, the task is done as failed (its
    /// offset finishes), none of its writes reach the store, and the failure is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_state_write_fails_the_task_and_applies_nothing() {
        let store = memory_store();
        let slot = StateSlot::ready_with(store.clone());
        // Refused before anything is sent: no broker is needed.
        let runtime = unreachable_runtime();
        let partition = core();
        let task = slot.task_state().unwrap();
        task.put(b"small", b"fits").unwrap();
        task.put(b"huge", &vec![0u8; 1_100_000]).unwrap();
        assert!(partition.try_start_for_test(7));
        tokio::time::timeout(
            Duration::from_secs(20),
            runtime.finish_task(&partition, 7, task, Outcome::Done, None),
        )
        .await
        .expect("a refused write must not be retried forever");
        assert_eq!(store.get(b"small").unwrap(), None);
        assert_eq!(store.get(b"huge").unwrap(), None);
        assert!(!store.is_applied(7));
        assert_eq!(partition.running(), 0);
        assert_eq!(
            partition.position(),
            Some(8),
            "offset 7 is done (as failed)"
        );
    }
}
