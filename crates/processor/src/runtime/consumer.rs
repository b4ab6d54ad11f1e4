//! The consumer thread: the poll loop and librdkafka's callbacks.
//!
//! One dedicated OS thread per subscription polls the consumer. Rebalance callbacks run
//! inside its poll, on that thread, so assignment, revocation, pause/resume and commits
//! never race each other, and blocking there (waiting for a revoked partition's tasks, a
//! synchronous commit) never blocks a tokio worker.
//!
//! Each turn of the loop takes up to [`BATCH`] records: it waits for the first (at most
//! 50 ms, or until the next delayed task is due), takes the ones librdkafka already holds
//! without waiting, then runs flow control and hands the turn's tasks to the lanes at
//! once. When every
//! owned partition is throttled there is nothing to fetch: it waits on the [`Wakeup`]
//! instead and polls without blocking, so rebalances and heartbeat-driven events are
//! still served.
//!
//! [`Wakeup`]: super::wakeup::Wakeup

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_protocol::now_millis;
use rdkafka::consumer::Consumer;
use rdkafka::consumer::{BaseConsumer, CommitMode, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::assignment::ConsumerPause;
use super::topics::PartitionId;
use super::RuntimeCore;

const POLL: Duration = Duration::from_millis(50);
/// Records taken per turn of the loop at most.
pub(crate) const BATCH: usize = 512;
/// Poll timeout while some partition is throttled and others fetch.
const THROTTLED_POLL: Duration = Duration::from_millis(10);
/// Flow control runs for every partition at least this often (a safety net; wakeups do
/// the real work).
const FULL_SCAN: Duration = Duration::from_millis(200);

/// The consumer's context: routes librdkafka's callbacks to the runtime.
pub(crate) struct RuntimeContext<T> {
    pub(crate) core: Arc<RuntimeCore<T>>,
}

impl<T: prost::Message + Default + Send + 'static> ClientContext for RuntimeContext<T> {}

impl<T: prost::Message + Default + Send + 'static> ConsumerContext for RuntimeContext<T> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = self.core.own_partitions(tpl);
            self.core.prepare_assign(consumer, &parts);
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = self.core.own_partitions(tpl);
            self.core
                .revoke(consumer, &parts, self.core.props.rebalance_timeout, false);
            self.core.health.publish(&self.core.partitions.lock());
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = self.core.own_partitions(tpl);
                self.core.assign(consumer, &parts);
                self.core.health.publish(&self.core.partitions.lock());
                self.core.health.joined();
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(subscription = %self.core.recorder.subscription(), "rebalance error: {e}")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.core.on_commit_result(result, offsets);
    }
}

impl<T: prost::Message + Default + Send + 'static> RuntimeCore<T> {
    /// The partitions of this subscription's topics in `tpl`.
    fn own_partitions(&self, tpl: &TopicPartitionList) -> Vec<PartitionId> {
        self.topics.ids_in(tpl)
    }

    /// Takes one fetched record, fetched at `now` (epoch ms).
    fn on_message(
        &self,
        consumer: &BaseConsumer<RuntimeContext<T>>,
        msg: &BorrowedMessage<'_>,
        now: i64,
    ) {
        let Some(id) = self.topics.id(msg.topic(), msg.partition()) else {
            return;
        };
        let mut parts = self.partitions.lock();
        if parts.is_held(id) {
            // Fetched before the hold's pause took effect: fetch it again once the
            // partition starts, rather than skip it.
            let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
            tracing::debug!(
                topic,
                partition,
                offset,
                "record of a held partition; fetched again later"
            );
            if let Err(e) = consumer.seek(topic, partition, Offset::Offset(offset), Duration::ZERO)
            {
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    "could not seek a held partition back: {e}"
                );
            }
            return;
        }
        let Some(ctx) = parts.get_mut(id) else {
            tracing::debug!(
                topic = msg.topic(),
                partition = msg.partition(),
                offset = msg.offset(),
                "record for a partition not assigned here; ignored"
            );
            return;
        };
        let incoming = self.extractor.extract::<T>(ctx.core(), msg, now);
        if ctx.offer(incoming, now) {
            self.wakeup.notify(id);
        }
    }

    /// Polls until `shutdown` is set.
    pub(crate) fn run_loop(
        &self,
        consumer: &BaseConsumer<RuntimeContext<T>>,
        shutdown: &AtomicBool,
    ) {
        let pause = ConsumerPause {
            consumer,
            topics: &self.topics,
        };
        let mut last_commit = Instant::now();
        let mut last_scan = Instant::now();
        while !shutdown.load(Ordering::Acquire) {
            self.health.turned();
            let (some_throttled, all_throttled, next_due) = {
                let parts = self.partitions.lock();
                let (some, all) = parts.throttled();
                (some, all, parts.next_due())
            };
            let mut timeout = if some_throttled { THROTTLED_POLL } else { POLL };
            if let Some(due) = next_due {
                let until = Duration::from_millis((due - now_millis()).max(0) as u64);
                timeout = timeout.min(until);
            }
            let mut flagged = Vec::new();
            let poll_for = if all_throttled {
                flagged = self.wakeup.wait(timeout);
                Duration::ZERO
            } else {
                timeout
            };
            let mut wait = poll_for;
            let mut fetched_at = None;
            for _ in 0..BATCH {
                match consumer.poll(wait) {
                    Some(Ok(msg)) => {
                        // The records of one turn arrived together: one clock read.
                        let now = *fetched_at.get_or_insert_with(now_millis);
                        self.on_message(consumer, &msg, now);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(subscription = %self.recorder.subscription(), "consumer error: {e}");
                        break;
                    }
                    None => break,
                }
                wait = Duration::ZERO;
            }
            self.retry_held(consumer);
            flagged.extend(self.wakeup.take());
            let now = now_millis();
            {
                let mut parts = self.partitions.lock();
                flagged.extend(parts.rate_due(now));
                if last_scan.elapsed() >= FULL_SCAN {
                    parts.flow(None, &pause, &self.recorder, now);
                    self.health.publish(&parts);
                    last_scan = Instant::now();
                } else if !flagged.is_empty() {
                    parts.flow(Some(&flagged), &pause, &self.recorder, now);
                }
                parts.release_due(now);
                parts.flush();
            }
            if last_commit.elapsed() >= self.props.commit_interval {
                self.commit(consumer, CommitMode::Async, None);
                last_commit = Instant::now();
            }
        }
    }
}
