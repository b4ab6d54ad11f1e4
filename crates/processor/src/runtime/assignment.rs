//! Taking partitions on, giving them back, and shutting down.
//!
//! **Assign**: read the committed position and offset map, create one
//! [`PartitionContext`] per partition (restoring its state store in the background if the
//! subscription has one) and resume fetching. librdkafka keeps the application's pause
//! flag across unassign and assign, so a partition paused when it was revoked would
//! otherwise stay paused forever when it comes back.
//!
//! **Revoke**: stop starting tasks, wait up to `rebalance_timeout` for running ones, close
//! the partitions (late completions commit nothing and write no state), commit their final
//! positions synchronously, then release them: checkpoint clean state stores, keep the
//! closed core of a partition with abandoned tasks as the predecessor of its next context.
//!
//! **Shutdown**: pause everything, let dispatched tasks finish up to `shutdown_timeout`
//! while still serving rebalances, then release like a revocation.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::lanes::Lanes;
use super::offsets::{decode_offset_map, DoneRanges, OffsetTracker};
use super::partition::{PartitionContext, PauseControl};
use super::partition_core::PartitionCore;
use super::quota::KeyQuota;
use super::topics::{PartitionId, Topics};
use super::RuntimeCore;

/// Pauses and resumes partitions of the subscription's topics on a consumer.
pub(crate) struct ConsumerPause<'a, C: ConsumerContext> {
    pub(crate) consumer: &'a BaseConsumer<C>,
    pub(crate) topics: &'a Topics,
}

impl<C: ConsumerContext> PauseControl for ConsumerPause<'_, C> {
    fn set_paused(&self, id: PartitionId, paused: bool) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(self.topics.name(id), id.partition);
        let partition = id.partition;
        tracing::debug!(topic = %self.topics.name(id), partition, paused, "fetching paused or resumed");
        let result = if paused {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(e) = result {
            tracing::warn!(partition, paused, "pause/resume failed: {e}");
        }
    }
}

impl<T: Send + 'static> RuntimeCore<T> {
    /// Takes `partitions` on (those not owned already).
    pub(crate) fn assign<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[PartitionId],
    ) {
        let new: Vec<PartitionId> = {
            let parts = self.partitions.lock();
            partitions
                .iter()
                .copied()
                .filter(|p| !parts.contains(*p))
                .collect()
        };
        if new.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in &new {
            tpl.add_partition(self.topics.name(*p), p.partition);
        }
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(subscription = %self.recorder.subscription(),
                    "could not read committed offsets: {e}; starting from positions only");
                TopicPartitionList::new()
            }
        };
        let mut parts = self.partitions.lock();
        for &id in &new {
            let (topic, p) = (self.topics.name(id), id.partition);
            let (position, metadata) = match committed
                .find_partition(topic, p)
                .map(|e| (e.offset(), super::commit::commit_metadata(&e)))
            {
                Some((Offset::Offset(o), metadata)) => (Some(o), metadata),
                _ => (None, String::new()),
            };
            let inherited = match position {
                Some(o) if self.props.offset_map => {
                    decode_offset_map(o, &metadata).unwrap_or_default()
                }
                _ => DoneRanges::default(),
            };
            tracing::info!(subscription = %self.recorder.subscription(), topic = %topic, partition = p,
                ?position, skipping = inherited.count(), "partition assigned");
            let core = std::sync::Arc::new(PartitionCore::new(
                topic.clone(),
                id,
                OffsetTracker::starting_at(position, inherited),
                self.recorder.partition(topic, p),
                self.wakeup.clone(),
            ));
            // Partition-local state belongs to the source topic's partitions.
            let state = self
                .state
                .as_ref()
                .filter(|_| id.topic == 0)
                .map(|s| s.open_partition(topic, id, position, self.wakeup.clone()));
            let predecessor = parts.take_predecessor(id);
            if let Some(pred) = &predecessor {
                tracing::warn!(partition = p, running = pred.running(),
                    "tasks of this partition's previous assignment still run; it starts when they end");
            }
            let lanes = Lanes::new(&self.live.get(), self.runner.clone(), self.runtime.clone());
            let mut context = PartitionContext::new(
                core,
                lanes,
                self.props.max_pending,
                position.map(|o| (o, metadata)),
                state,
                predecessor,
            )
            .with_live(self.live.clone());
            if let Some(q) = &self.quota {
                if id.topic == 0 {
                    context = context.with_quota(KeyQuota::new(
                        q.config.clone(),
                        self.live.get().per_key_quota_processing_rate,
                    ));
                } else if self.topics.is_shaping(id) {
                    context = context.with_fixed_rate(q.config.shaping_rate);
                }
            }
            parts.insert(id, context);
            self.wakeup.notify(id);
        }
        self.recorder.assigned(parts.len());
        drop(parts);
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!("resume of newly assigned partitions failed: {e}");
        }
    }

    /// Gives `partitions` back: see the module doc. `drain` (shutdown) waits for every
    /// dispatched task instead of only the running ones.
    pub(crate) fn revoke<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[PartitionId],
        timeout: Duration,
        drain: bool,
    ) {
        let deadline = Instant::now() + timeout;
        let cores: Vec<_> = {
            let mut parts = self.partitions.lock();
            partitions
                .iter()
                .filter_map(|p| {
                    let ctx = parts.get_mut(*p)?;
                    // Tasks dispatched before the revocation reach their lanes.
                    ctx.flush();
                    Some(ctx.core().clone())
                })
                .collect()
        };
        if cores.is_empty() {
            return;
        }
        if !drain {
            for core in &cores {
                core.revoke();
            }
        }
        for core in &cores {
            core.wait_idle(deadline, drain);
        }
        let mut abandoned = Vec::new();
        {
            let mut parts = self.partitions.lock();
            for core in &cores {
                let running = core.close();
                let Some(ctx) = parts.get_mut(core.id()) else {
                    continue;
                };
                if running > 0 {
                    tracing::warn!(subscription = %self.recorder.subscription(), topic = %core.topic(), partition = core.partition(), running,
                        "tasks still running after the timeout are abandoned; they will commit nothing and write no state");
                    if let Some(slot) = ctx.state() {
                        slot.fence();
                    }
                }
                abandoned.push((core.id(), running));
                // The final commit of a released partition is always sent.
                ctx.forget_committed();
            }
        }
        // Everything is frozen: commit the final positions synchronously.
        self.commit(consumer, CommitMode::Sync, Some(partitions));
        let mut parts = self.partitions.lock();
        for (p, running) in abandoned {
            let Some(ctx) = parts.remove(p) else { continue };
            // Shaped tasks of its keys may now run elsewhere: they no longer hold the
            // keys here (see `quota`).
            if let (Some(q), 0) = (&self.quota, p.topic) {
                q.state.forget_partition(p.partition);
            }
            // The checkpoint keeps the applied offsets the broker may redeliver: those at or
            // above the last position it confirmed (the final commit may have failed).
            let position = ctx.confirmed_position();
            let (zombie, slot) = ctx.into_released(&self.recorder);
            if let Some(z) = zombie {
                parts.add_zombie(z);
            }
            if let (Some(rt), Some(slot)) = (&self.state, slot) {
                rt.close_partition(&slot, position, running);
            }
        }
        self.recorder.assigned(parts.len());
        tracing::info!(subscription = %self.recorder.subscription(), partitions = ?partitions, "partitions released");
    }

    /// Stops fetching, lets dispatched tasks finish (up to `shutdown_timeout`), commits and
    /// releases everything.
    pub(crate) fn shutdown<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let deadline = Instant::now() + self.props.shutdown_timeout;
        let owned = self.partitions.lock().ids();
        let mut tpl = TopicPartitionList::new();
        for p in &owned {
            tpl.add_partition(self.topics.name(*p), p.partition);
        }
        let _ = consumer.pause(&tpl);
        loop {
            let cores: Vec<_> = {
                let mut parts = self.partitions.lock();
                parts.flush();
                parts
                    .ids()
                    .into_iter()
                    .filter_map(|p| parts.get_mut(p).map(|c| c.core().clone()))
                    .collect()
            };
            let idle = cores.iter().all(|c| c.wait_idle(Instant::now(), true));
            if idle || Instant::now() >= deadline {
                break;
            }
            // Records fetched before the pause are dropped here: never registered, the
            // committed position stays below them. Polling serves a rebalance started by
            // another member while this one drains.
            let _ = consumer.poll(Duration::from_millis(10));
        }
        let owned = self.partitions.lock().ids();
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.revoke(consumer, &owned, remaining, true);
    }
}
