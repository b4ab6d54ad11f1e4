//! Taking partitions on, giving them back, and shutting down.
//!
//! **Assign**: read the committed position and offset map, create one
//! [`PartitionContext`] per partition (restoring its state store in the background if the
//! subscription has one) and resume fetching. librdkafka keeps the application's pause
//! flag across unassign and assign, so a partition paused when it was revoked would
//! otherwise stay paused forever when it comes back.
//!
//! A partition whose committed offset cannot be read (the coordinator is loading, moving
//! or unreachable) is *held* instead: fetching paused, no context, health not ready. It
//! must not start without it — the inherited offset map would be lost (finished tasks run
//! again) and the state store's restore floor would drop to 0. Each read waits at most
//! [`COMMITTED_READ_TIMEOUT`], so the consumer thread keeps polling; the consumer loop
//! reads again with backoff until it succeeds.
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

use super::commit::OffsetReset;
use super::lanes::Lanes;
use super::offsets::{decode_offset_map, DoneRanges, OffsetTracker};
use super::partition::{PartitionContext, PauseControl};
use super::partition_core::PartitionCore;
use super::partitions::CommittedRead;
use super::quota::KeyQuota;
use super::topics::{PartitionId, Topics};
use super::RuntimeCore;

/// How long one read of committed offsets may block the consumer thread.
pub(crate) const COMMITTED_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Committed offsets past the log end are looked for this long at most per assignment.
const WATERMARKS_BUDGET: Duration = Duration::from_secs(5);

/// Reads the committed offsets of `ids` (each, or why it could not be read).
fn read_committed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &Topics,
    ids: &[PartitionId],
) -> Vec<(PartitionId, CommittedRead)> {
    let mut tpl = TopicPartitionList::new();
    for p in ids {
        tpl.add_partition(topics.name(*p), p.partition);
    }
    let committed = match consumer.committed_offsets(tpl, COMMITTED_READ_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return ids.iter().map(|p| (*p, Err(e.to_string()))).collect(),
    };
    ids.iter()
        .map(|&id| {
            let read = match committed.find_partition(topics.name(id), id.partition) {
                None => Err("the coordinator's answer does not list it".to_string()),
                Some(e) => match e.error() {
                    Err(err) => Err(err.to_string()),
                    Ok(()) => match e.offset() {
                        Offset::Offset(o) => Ok((Some(o), super::commit::commit_metadata(&e))),
                        _ => Ok((None, String::new())),
                    },
                },
            };
            (id, read)
        })
        .collect()
}

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
    /// Those of `partitions` this instance neither owns nor holds.
    fn not_owned(&self, partitions: &[PartitionId]) -> Vec<PartitionId> {
        let parts = self.partitions.lock();
        partitions
            .iter()
            .copied()
            .filter(|p| !parts.contains(*p) && !parts.is_held(*p))
            .collect()
    }

    /// Takes `partitions` on (those not owned already); a partition whose committed
    /// offset cannot be read is held (see the module doc).
    pub(crate) fn assign<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[PartitionId],
    ) {
        let new = self.not_owned(partitions);
        if new.is_empty() {
            return;
        }
        let (mut reads, missing) = self.partitions.lock().take_stashed(&new);
        if !missing.is_empty() {
            reads.extend(read_committed(consumer, &self.topics, &missing));
        }
        self.take_on(consumer, reads);
    }

    /// Before the consumer takes `partitions` on: reads their committed offsets (kept for
    /// [`Self::assign`]) and moves those past the log end to where `auto.offset.reset`
    /// says (see [`Self::reset_truncated`]).
    pub(crate) fn prepare_assign<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[PartitionId],
    ) {
        let new = self.not_owned(partitions);
        let mut reads = if new.is_empty() {
            Vec::new()
        } else {
            read_committed(consumer, &self.topics, &new)
        };
        let moved = match self.committer.offset_reset() {
            Some(reset) => self.reset_truncated(consumer, reset, &mut reads),
            None => Vec::new(),
        };
        self.partitions.lock().stash(reads, moved);
    }

    /// A committed offset above the log end means the log was truncated (an unclean
    /// leader election, a topic deleted and recreated, a broker that lost its data).
    /// Kafka answers a fetch there with "offset out of range" and the consumer resets by
    /// itself (the tracker then rebases on the first record it fetches), but a broker that
    /// answers with an empty fetch instead would leave the partition waiting forever. So
    /// before the consumer starts, such an offset is moved to the log start (or end, with
    /// `auto.offset.reset=latest`) and committed there, for the consumer and the tracker
    /// alike; the inherited offset map goes with it. Logged and counted as a truncation.
    /// Watermarks that cannot be read in time leave the offset as it is.
    fn reset_truncated<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        reset: OffsetReset,
        reads: &mut [(PartitionId, CommittedRead)],
    ) -> Vec<PartitionId> {
        let deadline = Instant::now() + WATERMARKS_BUDGET;
        let mut tpl = TopicPartitionList::new();
        let mut moved = Vec::new();
        for (id, read) in reads.iter() {
            let Ok((Some(committed), _)) = read else {
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::debug!("no time left to compare committed offsets with log ends");
                break;
            }
            let (topic, p) = (self.topics.name(*id), id.partition);
            let (low, high) = match consumer.fetch_watermarks(
                topic,
                p,
                left.min(COMMITTED_READ_TIMEOUT),
            ) {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(topic = %topic, partition = p, "could not read the log end: {e}");
                    continue;
                }
            };
            if *committed <= high {
                continue;
            }
            let to = match reset {
                OffsetReset::Earliest => low,
                OffsetReset::Latest => high,
            };
            if tpl
                .add_partition_offset(topic, p, Offset::Offset(to))
                .is_ok()
            {
                moved.push((*id, *committed, to));
            }
        }
        if moved.is_empty() {
            return Vec::new();
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(subscription = %self.recorder.subscription(),
                "committed offsets past the log end could not be moved: {e}; the consumer resets when it fetches");
            return Vec::new();
        }
        let ids = moved.iter().map(|(id, _, _)| *id).collect();
        for (id, committed, to) in moved {
            let (topic, p) = (self.topics.name(id), id.partition);
            tracing::warn!(subscription = %self.recorder.subscription(), topic = %topic, partition = p,
                committed, position = to, ?reset,
                "the committed offset is past the log end (the log was truncated or recreated); \
                 processing from the reset position, now committed");
            self.recorder.partition(topic, p).truncated();
            if let Some((_, read)) = reads.iter_mut().find(|(i, _)| *i == id) {
                *read = Ok((Some(to), String::new()));
            }
        }
        ids
    }

    /// Reads the committed offsets of the held partitions that are due again, and takes
    /// on those it could read.
    pub(crate) fn retry_held<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) {
        let due = self.partitions.lock().held_due(Instant::now());
        if due.is_empty() {
            return;
        }
        self.take_on(consumer, read_committed(consumer, &self.topics, &due));
    }

    /// Creates the contexts of the partitions whose committed offset was read and resumes
    /// them; holds (pauses) the others.
    fn take_on<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        reads: Vec<(PartitionId, CommittedRead)>,
    ) {
        let mut resume = TopicPartitionList::new();
        let mut hold = TopicPartitionList::new();
        let mut parts = self.partitions.lock();
        for (id, read) in reads {
            let (topic, p) = (self.topics.name(id), id.partition);
            let (position, metadata) = match read {
                Ok(committed) => committed,
                Err(error) => {
                    let (attempts, backoff) = parts.hold(id, topic, error.clone(), Instant::now());
                    tracing::warn!(subscription = %self.recorder.subscription(), topic = %topic, partition = p,
                        attempts, retry_in = ?backoff, "could not read the committed offset: {error}; \
                         the partition is held (nothing fetched, started or committed) until it can be read");
                    hold.add_partition(topic, p);
                    continue;
                }
            };
            if let Some(attempts) = parts.unhold(id) {
                tracing::info!(subscription = %self.recorder.subscription(), topic = %topic, partition = p,
                    attempts, "committed offset read after failed attempts; the partition starts");
            }
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
            if parts.take_moved(id) {
                context = context.with_replaced_log();
            }
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
            resume.add_partition(topic, p);
            self.wakeup.notify(id);
        }
        self.recorder.assigned(parts.len());
        drop(parts);
        if hold.count() > 0 {
            if let Err(e) = consumer.pause(&hold) {
                tracing::warn!("pause of held partitions failed: {e}");
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                tracing::warn!("resume of newly assigned partitions failed: {e}");
            }
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
            // A held partition has nothing to finish or commit.
            let held = partitions
                .iter()
                .filter(|p| parts.unhold(**p).is_some())
                .count();
            if held > 0 {
                self.recorder.assigned(parts.len());
            }
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
        let owned = {
            let parts = self.partitions.lock();
            let mut owned = parts.ids();
            owned.extend(parts.held_ids());
            owned
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.revoke(consumer, &owned, remaining, true);
    }
}
