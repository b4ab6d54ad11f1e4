//! Counters: each event updates the `metrics` facade (Prometheus names
//! `decaton_replicator_*`, label `route`) and the live [`ReplicatorStats`] together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Metric names the replicator records.
pub mod names {
    /// Source records a route looked at (label `route`).
    pub const ROUTE_IN: &str = "decaton_replicator_route_records_in_total";
    /// Derived records a route wrote and the broker acknowledged (label `route`).
    pub const ROUTE_OUT: &str = "decaton_replicator_route_records_out_total";
    /// Source records a route's filter refused (label `route`).
    pub const ROUTE_FILTERED: &str = "decaton_replicator_route_records_filtered_total";
    /// Source records a route could not handle: filter or map error (label `route`).
    pub const ROUTE_FAILED: &str = "decaton_replicator_route_records_failed_total";
    /// Source records consumed.
    pub const SOURCE_RECORDS: &str = "decaton_replicator_source_records_total";
    /// Source records that could not be decoded (envelope or task type).
    pub const INVALID_RECORDS: &str = "decaton_replicator_invalid_records_total";
    /// Records written to the dead-letter topic and acknowledged.
    pub const DEAD_LETTERS: &str = "decaton_replicator_dead_letters_total";
    /// Source records skipped because the committed offset map lists them as done.
    pub const SKIPPED_DONE: &str = "decaton_replicator_skipped_done_total";
    /// Source offsets committed (a gauge per partition: label `partition`).
    pub const COMMITTED_OFFSET: &str = "decaton_replicator_committed_offset";
    /// Records behind the source partition's end (label `partition`).
    pub const LAG: &str = "decaton_replicator_lag";
}

/// One route's live counts.
#[derive(Debug, Default)]
pub(crate) struct RouteStatsInner {
    pub(crate) records_in: AtomicU64,
    pub(crate) out: AtomicU64,
    pub(crate) filtered: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// A route's counters: metric handles registered once, and the live counts.
pub(crate) struct RouteCounters {
    records_in: metrics::Counter,
    out: metrics::Counter,
    filtered: metrics::Counter,
    failed: metrics::Counter,
    pub(crate) live: Arc<RouteStatsInner>,
}

impl RouteCounters {
    pub(crate) fn new(route: &str) -> Self {
        let label = [("route", route.to_string())];
        RouteCounters {
            records_in: metrics::counter!(names::ROUTE_IN, &label),
            out: metrics::counter!(names::ROUTE_OUT, &label),
            filtered: metrics::counter!(names::ROUTE_FILTERED, &label),
            failed: metrics::counter!(names::ROUTE_FAILED, &label),
            live: Arc::default(),
        }
    }
    pub(crate) fn record_in(&self) {
        self.records_in.increment(1);
        self.live.records_in.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn out(&self) {
        self.out.increment(1);
        self.live.out.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn filtered(&self) {
        self.filtered.increment(1);
        self.live.filtered.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn failed(&self) {
        self.failed.increment(1);
        self.live.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whole-pipeline live counts.
#[derive(Debug, Default)]
pub(crate) struct GlobalStats {
    pub(crate) source: AtomicU64,
    pub(crate) invalid: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) skipped_done: AtomicU64,
    pub(crate) transactions: AtomicU64,
}

/// A snapshot of one route's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteStats {
    /// Route name.
    pub name: String,
    /// Destination topic.
    pub topic: String,
    /// Source records the route looked at.
    pub records_in: u64,
    /// Derived records written and acknowledged.
    pub out: u64,
    /// Source records its filter refused.
    pub filtered: u64,
    /// Source records it failed on (filter or map error).
    pub failed: u64,
}

/// A snapshot of a replicator's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicatorStats {
    /// Source records consumed (redeliveries after a restart included).
    pub source_records: u64,
    /// Source records that could not be decoded.
    pub invalid_records: u64,
    /// Records written to the dead-letter topic and acknowledged.
    pub dead_letters: u64,
    /// Source records skipped because the committed offset map listed them as done.
    pub skipped_done: u64,
    /// Transactions committed (exactly-once mode).
    pub transactions: u64,
    /// Per route, in configuration order.
    pub routes: Vec<RouteStats>,
}

/// Live counters shared between the pipeline and [`ReplicatorHandle`](crate::ReplicatorHandle).
#[derive(Debug, Default)]
pub(crate) struct SharedStats {
    pub(crate) global: GlobalStats,
    pub(crate) routes: Vec<(String, String, Arc<RouteStatsInner>)>,
}

impl SharedStats {
    pub(crate) fn snapshot(&self) -> ReplicatorStats {
        let g = &self.global;
        ReplicatorStats {
            source_records: g.source.load(Ordering::Relaxed),
            invalid_records: g.invalid.load(Ordering::Relaxed),
            dead_letters: g.dead_letters.load(Ordering::Relaxed),
            skipped_done: g.skipped_done.load(Ordering::Relaxed),
            transactions: g.transactions.load(Ordering::Relaxed),
            routes: self
                .routes
                .iter()
                .map(|(name, topic, r)| RouteStats {
                    name: name.clone(),
                    topic: topic.clone(),
                    records_in: r.records_in.load(Ordering::Relaxed),
                    out: r.out.load(Ordering::Relaxed),
                    filtered: r.filtered.load(Ordering::Relaxed),
                    failed: r.failed.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}
