//! Names of the metrics the runtime records.
//!
//! Names follow Prometheus conventions with the `decaton_` prefix; every series carries
//! `subscription`, and per-partition ones `topic` and `partition`. The runtime records
//! each event once, through one recorder per partition, which updates both the metric and
//! the subscription's [`SubscriptionStats`](crate::SubscriptionStats) counter.

/// Tasks whose process returned Ok.
pub const PROCESSED: &str = "decaton_tasks_processed_total";
/// Tasks that failed.
pub const FAILED: &str = "decaton_tasks_failed_total";
/// Records discarded (undecodable, ignored key, absurd scheduled time).
pub const DISCARDED: &str = "decaton_tasks_discarded_total";
/// Records skipped because they already ran (offset map, state).
pub const SKIPPED: &str = "decaton_tasks_skipped_total";
/// Records dropped because the fetch position went back below records already taken.
pub const REWOUND: &str = "decaton_records_rewound_total";
/// Partitions whose committed offset was past the log end (the log was truncated or the
/// topic recreated): processing went on from the fetch position, which was committed.
pub const OFFSET_TRUNCATIONS: &str = "decaton_offset_truncations_total";
/// Offset commits that failed, by error `class`: `transient` (the coordinator is moving,
/// a rebalance is under way, a timeout) or `permanent` (refused as sent, for example the
/// group is not authorised). Either way the positions are sent again next round; nothing
/// is ever committed past an unfinished task.
pub const COMMIT_FAILURES: &str = "decaton_commit_failures_total";
/// Deferred tasks that timed out.
pub const DEFERRED_TIMEOUTS: &str = "decaton_deferred_timeouts_total";
/// Completions dropped without completing.
pub const COMPLETIONS_LEAKED: &str = "decaton_completions_leaked_total";
/// Tasks still running when their partition was released.
pub const ABANDONED: &str = "decaton_tasks_abandoned_total";
/// Failed attempts to append a task's state writes to the changelog (each is retried).
pub const STATE_WRITE_FAILURES: &str = "decaton_state_write_failures_total";
/// Tasks whose `process` panicked (also counted as failed).
pub const PANICKED: &str = "decaton_tasks_panicked_total";
/// Failed attempts tried again in the lane.
pub const RETRIED_IN_PROCESS: &str = "decaton_tasks_retried_in_process_total";
/// Failed tasks produced to the retry topic.
pub const RETRIED: &str = "decaton_tasks_retried_total";
/// Failed tasks produced to the dead-letter topic.
pub const DEAD_LETTERED: &str = "decaton_tasks_dead_lettered_total";
/// Failed attempts to produce a retry, dead-letter or shaped copy of a task, by error
/// `class`: `transient` (tried again with backoff) or `permanent` (refused for good: the
/// copy is replaced, or the partition stalls).
pub const FORWARD_FAILURES: &str = "decaton_forward_failures_total";
/// 1 while a partition is stalled because a copy of one of its tasks cannot be written
/// (nothing past that offset is committed), else 0 (gauge).
pub const PARTITION_STALLED: &str = "decaton_partition_stalled";
/// Per-partition or per-lane processor instances whose `Drop` panicked (caught; the
/// partition's release or lane change went on).
pub const INSTANCE_DROP_PANICS: &str = "decaton_instance_drop_panics_total";
/// Tasks of a key over its quota produced to the shaping topic.
pub const SHAPED: &str = "decaton_tasks_shaped_total";
/// Keys with shaped tasks not yet processed, in this instance (gauge).
pub const KEYS_SHAPED: &str = "decaton_quota_keys_shaped";
/// Keys over quota processed directly because `max_shaped_keys` keys were shaped already.
pub const SHAPING_FULL: &str = "decaton_quota_shaping_full_total";
/// Tasks dropped by a `Compaction` stage because a later task of their key superseded them.
pub const COMPACTED: &str = "decaton_tasks_compacted_total";
/// Time inside process (histogram).
pub const PROCESS_SECONDS: &str = "decaton_task_process_seconds";
/// Time from start to completion (histogram).
pub const COMPLETE_SECONDS: &str = "decaton_task_complete_seconds";
/// Unfinished tasks per partition (gauge).
pub const PENDING: &str = "decaton_tasks_pending";
/// Tasks waiting for their scheduled time per partition (gauge).
pub const DELAYED: &str = "decaton_tasks_delayed";
/// Last committed offset per partition (gauge).
pub const COMMITTED_OFFSET: &str = "decaton_committed_offset";
/// Partitions paused for backpressure (gauge).
pub const PAUSED_PARTITIONS: &str = "decaton_partitions_paused";
/// Partitions assigned (gauge).
pub const ASSIGNED_PARTITIONS: &str = "decaton_partitions_assigned";
