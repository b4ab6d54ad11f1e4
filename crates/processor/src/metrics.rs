//! Metric names and per-partition handles.
//!
//! Names follow Prometheus conventions with the `decaton_` prefix; every series carries
//! `subscription`, and per-partition ones `topic` and `partition`. Handles are resolved
//! once per partition assignment so the hot path does no label formatting.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// Tasks whose process returned Ok.
pub const PROCESSED: &str = "decaton_tasks_processed_total";
/// Tasks that failed.
pub const FAILED: &str = "decaton_tasks_failed_total";
/// Records discarded (undecodable or ignored key).
pub const DISCARDED: &str = "decaton_tasks_discarded_total";
/// Records skipped because they already ran (offset map, state).
pub const SKIPPED: &str = "decaton_tasks_skipped_total";
/// Deferred tasks that timed out.
pub const DEFERRED_TIMEOUTS: &str = "decaton_deferred_timeouts_total";
/// Completions dropped without completing.
pub const COMPLETIONS_LEAKED: &str = "decaton_completions_leaked_total";
/// Time inside process (histogram).
pub const PROCESS_SECONDS: &str = "decaton_task_process_seconds";
/// Time from start to completion (histogram).
pub const COMPLETE_SECONDS: &str = "decaton_task_complete_seconds";
/// Unfinished tasks per partition (gauge).
pub const PENDING: &str = "decaton_tasks_pending";
/// Last committed offset per partition (gauge).
pub const COMMITTED_OFFSET: &str = "decaton_committed_offset";
/// Partitions paused for backpressure (gauge).
pub const PAUSED_PARTITIONS: &str = "decaton_partitions_paused";

/// Metric handles of one assigned partition.
pub(crate) struct PartitionMetrics {
    pub(crate) processed: Counter,
    pub(crate) failed: Counter,
    pub(crate) discarded: Counter,
    pub(crate) skipped: Counter,
    pub(crate) deferred_timeouts: Counter,
    pub(crate) leaked: Counter,
    pub(crate) process_seconds: Histogram,
    pub(crate) complete_seconds: Histogram,
    pub(crate) pending: Gauge,
    pub(crate) committed: Gauge,
}

impl PartitionMetrics {
    pub(crate) fn new(subscription: &str, topic: &str, partition: i32) -> Self {
        let labels = [
            ("subscription", subscription.to_string()),
            ("topic", topic.to_string()),
            ("partition", partition.to_string()),
        ];
        PartitionMetrics {
            processed: counter!(PROCESSED, &labels),
            failed: counter!(FAILED, &labels),
            discarded: counter!(DISCARDED, &labels),
            skipped: counter!(SKIPPED, &labels),
            deferred_timeouts: counter!(DEFERRED_TIMEOUTS, &labels),
            leaked: counter!(COMPLETIONS_LEAKED, &labels),
            process_seconds: histogram!(PROCESS_SECONDS, &labels),
            complete_seconds: histogram!(COMPLETE_SECONDS, &labels),
            pending: gauge!(PENDING, &labels),
            committed: gauge!(COMMITTED_OFFSET, &labels),
        }
    }
}

pub(crate) fn paused_partitions(subscription: &str) -> Gauge {
    gauge!(PAUSED_PARTITIONS, "subscription" => subscription.to_string())
}
