//! The Prometheus recorder: every metric the runtime, the state stores, the client and
//! the service record, described with its help text and unit, histograms with buckets.
//!
//! The service installs one global `metrics` recorder and renders it at `GET /metrics`.
//! Histograms are exported as Prometheus histograms (cumulative `_bucket` series with
//! `le` labels, `_sum` and `_count`), not as summaries, so they can be aggregated across
//! instances.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use decaton_processor::metric_names as names;

/// Consumer lag per partition: the high watermark minus the committed offset.
pub const CONSUMER_LAG: &str = "decaton_consumer_lag";
/// Gaps in a partition's offset map: runs of unfinished tasks below finished ones.
pub const OFFSET_MAP_GAPS: &str = "decaton_offset_map_gaps";
/// Whether a partition is ready (1) or not (0).
pub const PARTITION_READY: &str = "decaton_partition_ready";
/// Whether the service is ready (1) or not (0).
pub const SERVICE_READY: &str = "decaton_service_ready";

/// Bucket bounds of every histogram, in seconds: 100 µs to 60 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// Installs the global recorder and describes every known metric.
pub(crate) fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

fn describe() {
    use Unit::{Count, Seconds};
    let counters: &[(&'static str, &'static str)] = &[
        (names::PROCESSED, "Tasks whose process returned Ok."),
        (names::FAILED, "Tasks that failed: an error, a panic, or a deferred completion that failed, timed out or was dropped."),
        (names::DISCARDED, "Records discarded without processing: undecodable, ignored key, or scheduled too far ahead."),
        (names::SKIPPED, "Records skipped because they already ran (offset map or state store)."),
        (names::REWOUND, "Records dropped because the fetch position went back below records already taken."),
        (names::DEFERRED_TIMEOUTS, "Deferred tasks completed as failed after deferred_complete_timeout."),
        (names::COMPLETIONS_LEAKED, "Completions dropped without being completed."),
        (names::ABANDONED, "Tasks still running when their partition was released; they run again on the next owner."),
        (names::STATE_WRITE_FAILURES, "Failed attempts to append a task's state writes to the changelog (transient ones are retried; one refused for good fails the task)."),
        (names::OFFSET_TRUNCATIONS, "Partitions whose committed offset was past the log end (a truncated or replaced log); each rebased on what it fetched."),
        (names::COMMIT_FAILURES, "Offset commits that failed, by class (transient or permanent); each is sent again."),
        (names::FORWARD_FAILURES, "Failed produces of retry, dead-letter and shaped copies, by class (transient: tried again; permanent: dead-lettered, reduced or stalled)."),
        (names::INSTANCE_DROP_PANICS, "Per-partition or per-lane processor instances whose Drop panicked (contained and logged)."),
        (names::PANICKED, "Tasks whose process panicked."),
        (names::RETRIED_IN_PROCESS, "Failed tasks tried again in their lane before being forwarded."),
        (names::RETRIED, "Failed tasks sent to the retry topic."),
        (names::DEAD_LETTERED, "Tasks sent to the dead-letter topic (retries exhausted, permanent failures, records that cannot run)."),
        (names::SHAPED, "Tasks of a key over its per-key quota sent to the shaping topic."),
        (names::SHAPING_FULL, "Tasks of a key over its quota processed directly because max_shaped_keys keys were shaped already."),
        (names::COMPACTED, "Tasks a Compaction stage dropped because a later task of their key superseded them."),
        (decaton_state::internal::RESTORED_RECORDS_TOTAL, "Changelog records replayed into state stores."),
        ("decaton_client_puts_total", "Tasks a TaskClient sent."),
        ("decaton_client_errors_total", "Tasks a TaskClient failed to store, by kind."),
    ];
    for (name, help) in counters {
        describe_counter!(*name, Count, *help);
    }
    let gauges: &[(&'static str, &'static str)] = &[
        (names::PENDING, "Unfinished tasks of a partition."),
        (names::DELAYED, "Tasks of a partition waiting for their scheduled time."),
        (names::COMMITTED_OFFSET, "Last committed offset of a partition confirmed by the broker."),
        (names::PAUSED_PARTITIONS, "Partitions paused for backpressure."),
        (names::ASSIGNED_PARTITIONS, "Partitions assigned to this instance."),
        (names::KEYS_SHAPED, "Keys with shaped tasks not yet processed by this instance."),
        (names::PARTITION_STALLED, "1 while a partition is stopped at an offset whose retry, dead-letter, shaped or changelog write is refused for good; 0 otherwise."),
        (CONSUMER_LAG, "Records of a partition not yet committed by the subscription: high watermark minus committed offset."),
        (OFFSET_MAP_GAPS, "Runs of unfinished tasks below finished ones in a partition's offset window (each pins the commit position)."),
        (PARTITION_READY, "1 when the partition is restored, its consumer loop alive and its tasks completing (not stalled); 0 otherwise."),
        (SERVICE_READY, "1 when every subscription of the service is ready; 0 otherwise."),
    ];
    for (name, help) in gauges {
        describe_gauge!(*name, Count, *help);
    }
    let histograms: &[(&'static str, &'static str)] = &[
        (names::PROCESS_SECONDS, "Time spent inside process."),
        (
            names::COMPLETE_SECONDS,
            "Time from a task's start to its completion (deferred completion included).",
        ),
        (
            decaton_state::internal::RESTORE_SECONDS,
            "Time to restore a partition's state store from its changelog.",
        ),
        (
            "decaton_client_delivery_seconds",
            "Time from put to the broker's acknowledgement.",
        ),
    ];
    for (name, help) in histograms {
        describe_histogram!(*name, Seconds, *help);
    }
}
