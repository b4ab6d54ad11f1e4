//! One place that counts each runtime event.
//!
//! Every event (a task processed, a record discarded, a partition paused, ...) is recorded
//! by one call on a recorder, which updates the Prometheus-style metric (through the
//! `metrics` facade) and the subscription's live [`Counters`] together. Metric handles are
//! resolved once per partition assignment, so the hot path formats no labels.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use decaton_protocol::failure::ErrorClass;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::metrics as names;
use crate::stats::Counters;

/// Subscription-wide events.
pub(crate) struct SubscriptionRecorder {
    subscription: Arc<str>,
    counters: Arc<Counters>,
    paused: Gauge,
    assigned: Gauge,
}

impl SubscriptionRecorder {
    pub(crate) fn new(subscription: Arc<str>, counters: Arc<Counters>) -> Self {
        let label = [("subscription", subscription.to_string())];
        SubscriptionRecorder {
            paused: gauge!(names::PAUSED_PARTITIONS, &label),
            assigned: gauge!(names::ASSIGNED_PARTITIONS, &label),
            subscription,
            counters,
        }
    }

    pub(crate) fn subscription(&self) -> &Arc<str> {
        &self.subscription
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The recorder of one assigned partition.
    pub(crate) fn partition(&self, topic: &str, partition: i32) -> PartitionRecorder {
        PartitionRecorder::new(&self.subscription, topic, partition, self.counters.clone())
    }

    pub(crate) fn assigned(&self, partitions: usize) {
        self.counters
            .assigned_partitions
            .store(partitions as u64, Relaxed);
        self.assigned.set(partitions as f64);
    }

    pub(crate) fn paused(&self, now_paused: bool) {
        if now_paused {
            self.counters.pauses.fetch_add(1, Relaxed);
            self.counters.paused_partitions.fetch_add(1, Relaxed);
        } else {
            self.counters.paused_partitions.fetch_sub(1, Relaxed);
        }
        self.paused
            .set(self.counters.paused_partitions.load(Relaxed) as f64);
    }

    /// An offset commit failed with an error of `class`.
    pub(crate) fn commit_failed(&self, class: ErrorClass) {
        counter!(names::COMMIT_FAILURES, "subscription" => self.subscription.to_string(), "class" => class.as_str())
            .increment(1);
    }

    pub(crate) fn state_restored(&self, records: u64) {
        self.counters
            .state_records_restored
            .fetch_add(records, Relaxed);
    }
}

/// Events of one assigned partition.
pub(crate) struct PartitionRecorder {
    counters: Arc<Counters>,
    processed: Counter,
    failed: Counter,
    discarded: Counter,
    skipped: Counter,
    rewound: Counter,
    truncations: Counter,
    deferred_timeouts: Counter,
    leaked: Counter,
    abandoned: Counter,
    state_write_failures: Counter,
    panicked: Counter,
    retried_in_process: Counter,
    retried: Counter,
    dead_lettered: Counter,
    shaped: Counter,
    forward_transient: Counter,
    forward_permanent: Counter,
    stalled: Gauge,
    process_seconds: Histogram,
    complete_seconds: Histogram,
    pending: Gauge,
    delayed: Gauge,
    committed: Gauge,
}

impl PartitionRecorder {
    fn new(subscription: &str, topic: &str, partition: i32, counters: Arc<Counters>) -> Self {
        let labels = [
            ("subscription", subscription.to_string()),
            ("topic", topic.to_string()),
            ("partition", partition.to_string()),
        ];
        PartitionRecorder {
            counters,
            processed: counter!(names::PROCESSED, &labels),
            failed: counter!(names::FAILED, &labels),
            discarded: counter!(names::DISCARDED, &labels),
            skipped: counter!(names::SKIPPED, &labels),
            rewound: counter!(names::REWOUND, &labels),
            truncations: counter!(names::OFFSET_TRUNCATIONS, &labels),
            deferred_timeouts: counter!(names::DEFERRED_TIMEOUTS, &labels),
            leaked: counter!(names::COMPLETIONS_LEAKED, &labels),
            abandoned: counter!(names::ABANDONED, &labels),
            state_write_failures: counter!(names::STATE_WRITE_FAILURES, &labels),
            panicked: counter!(names::PANICKED, &labels),
            retried_in_process: counter!(names::RETRIED_IN_PROCESS, &labels),
            retried: counter!(names::RETRIED, &labels),
            dead_lettered: counter!(names::DEAD_LETTERED, &labels),
            shaped: counter!(names::SHAPED, &labels),
            forward_transient: counter!(
                names::FORWARD_FAILURES,
                &with_class(&labels, ErrorClass::Transient)
            ),
            forward_permanent: counter!(
                names::FORWARD_FAILURES,
                &with_class(&labels, ErrorClass::Permanent)
            ),
            stalled: gauge!(names::PARTITION_STALLED, &labels),
            process_seconds: histogram!(names::PROCESS_SECONDS, &labels),
            complete_seconds: histogram!(names::COMPLETE_SECONDS, &labels),
            pending: gauge!(names::PENDING, &labels),
            delayed: gauge!(names::DELAYED, &labels),
            committed: gauge!(names::COMMITTED_OFFSET, &labels),
        }
    }

    pub(crate) fn processed(&self, took: Duration) {
        self.process_seconds.record(took.as_secs_f64());
        self.processed.increment(1);
        self.counters.processed.fetch_add(1, Relaxed);
    }

    /// `process` returned an error or panicked (the failure is counted when the task
    /// settles: it may still be tried again in the lane).
    pub(crate) fn process_time(&self, took: Duration) {
        self.process_seconds.record(took.as_secs_f64());
    }

    /// `process` panicked, or a panic dropped a deferred task's `Completion`.
    pub(crate) fn panicked(&self) {
        self.panicked.increment(1);
        self.counters.panicked.fetch_add(1, Relaxed);
        self.failed();
    }

    /// A failed attempt is tried again in the lane.
    pub(crate) fn retried_in_process(&self) {
        self.retried_in_process.increment(1);
        self.counters.retried_in_process.fetch_add(1, Relaxed);
    }

    /// A failed task was produced to the retry topic.
    pub(crate) fn retried(&self) {
        self.retried.increment(1);
        self.counters.retried.fetch_add(1, Relaxed);
    }

    /// A failed task was produced to the dead-letter topic.
    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.increment(1);
        self.counters.dead_lettered.fetch_add(1, Relaxed);
    }

    /// A task of a key over its quota was produced to the shaping topic.
    pub(crate) fn shaped(&self) {
        self.shaped.increment(1);
        self.counters.shaped.fetch_add(1, Relaxed);
    }

    /// Producing a retry, dead-letter or shaped copy failed with an error of `class`.
    pub(crate) fn forward_failed(&self, class: ErrorClass) {
        match class {
            ErrorClass::Transient => self.forward_transient.increment(1),
            ErrorClass::Permanent => self.forward_permanent.increment(1),
        }
    }

    /// The partition is (1) or is no longer (0) stalled on a copy it cannot write.
    pub(crate) fn stalled(&self, now_stalled: bool) {
        self.stalled.set(if now_stalled { 1.0 } else { 0.0 });
    }

    pub(crate) fn failed(&self) {
        self.failed.increment(1);
        self.counters.failed.fetch_add(1, Relaxed);
    }

    pub(crate) fn deferred_timed_out(&self) {
        self.deferred_timeouts.increment(1);
        self.counters.deferred_timeouts.fetch_add(1, Relaxed);
        self.failed();
    }

    pub(crate) fn completion_leaked(&self) {
        self.leaked.increment(1);
        self.counters.completions_leaked.fetch_add(1, Relaxed);
        self.failed();
    }

    pub(crate) fn completed(&self, since_start: Duration) {
        self.complete_seconds.record(since_start.as_secs_f64());
    }

    pub(crate) fn discarded(&self) {
        self.discarded.increment(1);
        self.counters.discarded.fetch_add(1, Relaxed);
    }

    pub(crate) fn skipped(&self) {
        self.skipped.increment(1);
        self.counters.skipped.fetch_add(1, Relaxed);
    }

    /// The committed offset was past the log end; the partition rebased on what it fetched.
    pub(crate) fn truncated(&self) {
        self.truncations.increment(1);
        self.counters.truncations.fetch_add(1, Relaxed);
    }

    pub(crate) fn rewound(&self) {
        self.rewound.increment(1);
        self.counters.rewound.fetch_add(1, Relaxed);
    }

    pub(crate) fn abandoned(&self, tasks: usize) {
        self.abandoned.increment(tasks as u64);
        self.counters.abandoned.fetch_add(tasks as u64, Relaxed);
    }

    pub(crate) fn state_write_failed(&self) {
        self.state_write_failures.increment(1);
        self.counters.state_write_failures.fetch_add(1, Relaxed);
    }

    pub(crate) fn pending(&self, unfinished: usize) {
        self.pending.set(unfinished as f64);
    }

    /// `change` tasks started (+) or stopped (-) waiting for their scheduled time.
    pub(crate) fn delayed(&self, now_waiting: usize, change: i64) {
        self.delayed.set(now_waiting as f64);
        if change >= 0 {
            self.counters.delayed.fetch_add(change as u64, Relaxed);
        } else {
            self.counters
                .delayed
                .fetch_sub(change.unsigned_abs(), Relaxed);
        }
    }

    pub(crate) fn committed(&self, offset: i64) {
        self.committed.set(offset as f64);
    }
}

/// `labels` plus the error class.
fn with_class(
    labels: &[(&'static str, String); 3],
    class: ErrorClass,
) -> [(&'static str, String); 4] {
    let [a, b, c] = labels.clone();
    [a, b, c, ("class", class.as_str().to_string())]
}
