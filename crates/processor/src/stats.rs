//! Live counters of a subscription, readable without a metrics recorder.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters shared by the consumer thread and the lanes; written only through the
/// runtime's recorder, so each event is counted in one place.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) processed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) rewound: AtomicU64,
    pub(crate) truncations: AtomicU64,
    pub(crate) deferred_timeouts: AtomicU64,
    pub(crate) completions_leaked: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) paused_partitions: AtomicU64,
    pub(crate) assigned_partitions: AtomicU64,
    pub(crate) pauses: AtomicU64,
    pub(crate) delayed: AtomicU64,
    pub(crate) state_records_restored: AtomicU64,
    pub(crate) state_write_failures: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) retried_in_process: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) shaped: AtomicU64,
}

/// A snapshot of a subscription's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Tasks whose `process` returned `Ok`.
    pub processed: u64,
    /// Tasks whose `process` returned an error or panicked, or whose deferred completion
    /// failed, timed out or was dropped (whatever happened to them next: retried,
    /// dead-lettered or given up). A failed attempt tried again in the lane is not
    /// counted here.
    pub failed: u64,
    /// Records that could not be decoded, whose key is ignored, or whose scheduled time is
    /// further ahead than `max_scheduled_delay`.
    pub discarded: u64,
    /// Records skipped because the offset map (or the state store) shows they already ran.
    pub skipped: u64,
    /// Records dropped because the fetch position went back below records already taken
    /// (they are still registered once, from their first delivery).
    pub rewound: u64,
    /// Partitions whose committed offset was past the log end (the log was truncated or
    /// the topic recreated): processing went on from the fetch position.
    pub truncations: u64,
    /// Deferred tasks completed as failed after `deferred_complete_timeout`.
    pub deferred_timeouts: u64,
    /// `Completion`s dropped without being completed.
    pub completions_leaked: u64,
    /// Tasks still running when their partition was revoked after `rebalance_timeout`.
    pub abandoned: u64,
    /// Partitions paused for backpressure right now.
    pub paused_partitions: u64,
    /// Partitions assigned right now.
    pub assigned_partitions: u64,
    /// How many times a partition was paused for backpressure.
    pub pauses: u64,
    /// Tasks waiting for their scheduled time right now.
    pub delayed: u64,
    /// Changelog records read while restoring state stores.
    pub state_records_restored: u64,
    /// Failed attempts to append a task's state writes to the changelog (each is retried
    /// until it succeeds or the partition is released).
    pub state_write_failures: u64,
    /// Tasks whose `process` panicked (or whose `Completion` a panic dropped); also
    /// counted in `failed`.
    pub panicked: u64,
    /// Failed attempts tried again in the lane.
    pub retried_in_process: u64,
    /// Failed tasks produced to the retry topic.
    pub retried: u64,
    /// Failed tasks produced to the dead-letter topic.
    pub dead_lettered: u64,
    /// Tasks of keys over their quota produced to the shaping topic.
    pub shaped: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SubscriptionStats {
        SubscriptionStats {
            processed: self.processed.load(Relaxed),
            failed: self.failed.load(Relaxed),
            discarded: self.discarded.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            rewound: self.rewound.load(Relaxed),
            truncations: self.truncations.load(Relaxed),
            deferred_timeouts: self.deferred_timeouts.load(Relaxed),
            completions_leaked: self.completions_leaked.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            paused_partitions: self.paused_partitions.load(Relaxed),
            assigned_partitions: self.assigned_partitions.load(Relaxed),
            pauses: self.pauses.load(Relaxed),
            delayed: self.delayed.load(Relaxed),
            state_records_restored: self.state_records_restored.load(Relaxed),
            state_write_failures: self.state_write_failures.load(Relaxed),
            panicked: self.panicked.load(Relaxed),
            retried_in_process: self.retried_in_process.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            shaped: self.shaped.load(Relaxed),
        }
    }
}
