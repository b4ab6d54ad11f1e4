//! Liveness and readiness of the hosted subscriptions.
//!
//! **Live**: every subscription's consumer loop is running. A subscription whose consumer
//! thread ended (it failed) makes the service not live; a restart is the cure.
//!
//! **Ready**: every subscription has joined its group and every partition it owns is
//! ready — its state store restored, no task of a previous assignment still running, and
//! its tasks completing: a partition where no task has completed for `stall_timeout`
//! while tasks that could run are pending (not merely waiting for their scheduled time)
//! is reported stalled (its processor is stuck, e.g. on a storage that is down). When not
//! ready, the reasons name the subscription and the partition.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_processor::SubscriptionHandle;
use parking_lot::Mutex;

use crate::config::ServiceSettings;
use crate::metrics::{OFFSET_MAP_GAPS, PARTITION_READY, SERVICE_READY};

/// A topic and partition.
type TopicPartition = (Arc<str>, i32);

/// One hosted subscription, as the health checks see it.
pub(crate) struct Hosted {
    pub(crate) id: String,
    pub(crate) handle: SubscriptionHandle,
    /// Set when its `run` has returned.
    pub(crate) stopped: AtomicBool,
    /// Set when it was asked to shut down: a drain does not turn the consumer loop, and
    /// is bounded by the shutdown timeout, so it does not count against liveness.
    pub(crate) draining: AtomicBool,
    /// Per partition: the completion count last seen and since when it has not moved
    /// while tasks were waiting to run.
    progress: Mutex<HashMap<TopicPartition, (u64, Instant)>>,
}

impl Hosted {
    pub(crate) fn new(id: String, handle: SubscriptionHandle) -> Self {
        Hosted {
            id,
            handle,
            stopped: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            progress: Mutex::new(HashMap::new()),
        }
    }
}

/// What the health checks read of one subscription.
pub(crate) struct View {
    /// It received its first assignment.
    pub(crate) joined: bool,
    /// Time since its consumer loop last turned, when known.
    pub(crate) loop_idle_for: Option<Duration>,
    pub(crate) partitions: Vec<PartitionView>,
}

/// What the health checks read of one partition.
pub(crate) struct PartitionView {
    /// Its topic (the source topic, or the retry topic the subscription also reads).
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    /// The position that would be committed now.
    pub(crate) position: Option<i64>,
    pub(crate) pending: usize,
    /// Of those, waiting for their scheduled time.
    pub(crate) delayed: usize,
    /// Records completed so far.
    pub(crate) completed: u64,
    /// Gaps in the offset window.
    pub(crate) gaps: usize,
    /// Why the runtime holds the partition back, if it does.
    pub(crate) not_ready: Option<String>,
}

/// Reads what `handle`'s consumer thread last published.
pub(crate) fn view(handle: &SubscriptionHandle) -> View {
    let health = handle.health();
    View {
        joined: health.joined,
        loop_idle_for: health.loop_idle_for,
        partitions: health
            .partitions
            .into_iter()
            .map(|p| PartitionView {
                topic: p.topic,
                partition: p.partition,
                position: p.position,
                pending: p.pending,
                delayed: p.delayed,
                completed: p.completed,
                gaps: p.offset_map_gaps,
                not_ready: p.not_ready.map(|r| r.to_string()),
            })
            .collect(),
    }
}

/// The answer of a health check: ok, or the reasons it is not.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub(crate) reasons: Vec<String>,
}

impl Verdict {
    pub(crate) fn ok(&self) -> bool {
        self.reasons.is_empty()
    }
}

pub(crate) fn liveness(hosted: &[Arc<Hosted>], settings: &ServiceSettings) -> Verdict {
    let mut verdict = Verdict::default();
    for h in hosted {
        if h.stopped.load(Ordering::Acquire) {
            verdict.reasons.push(format!("{}: consumer stopped", h.id));
            continue;
        }
        if h.draining.load(Ordering::Acquire) {
            continue;
        }
        let health = view(&h.handle);
        if let Some(age) = health.loop_idle_for {
            if age > settings.liveness_timeout {
                verdict.reasons.push(format!(
                    "{}: consumer loop has not turned for {:.1}s",
                    h.id,
                    age.as_secs_f64()
                ));
            }
        }
    }
    verdict
}

pub(crate) fn readiness(hosted: &[Arc<Hosted>], settings: &ServiceSettings) -> Verdict {
    let mut verdict = Verdict::default();
    let live = liveness(hosted, settings);
    verdict.reasons.extend(live.reasons);
    for h in hosted {
        if h.stopped.load(Ordering::Acquire) {
            continue;
        }
        let health = view(&h.handle);
        if !health.joined {
            verdict.reasons.push(format!(
                "{}: no partitions assigned yet (joining group)",
                h.id
            ));
            continue;
        }
        let now = Instant::now();
        let mut progress = h.progress.lock();
        progress.retain(|(t, p), _| {
            health
                .partitions
                .iter()
                .any(|x| x.partition == *p && x.topic == *t)
        });
        for p in &health.partitions {
            let labels = [
                ("subscription", h.id.clone()),
                ("topic", p.topic.to_string()),
                ("partition", p.partition.to_string()),
            ];
            let entry = progress
                .entry((p.topic.clone(), p.partition))
                .or_insert((p.completed, now));
            let stalled_for = stalled_for(entry, p, now);
            let reason = if let Some(why) = &p.not_ready {
                Some(why.clone())
            } else if stalled_for >= settings.stall_timeout {
                Some(format!(
                    "stalled: {} tasks pending, none completed for {:.0}s (commit position {})",
                    p.pending,
                    stalled_for.as_secs_f64(),
                    p.position.map_or("none".to_string(), |o| o.to_string()),
                ))
            } else {
                None
            };
            metrics::gauge!(OFFSET_MAP_GAPS, &labels).set(p.gaps as f64);
            metrics::gauge!(PARTITION_READY, &labels).set(if reason.is_some() { 0.0 } else { 1.0 });
            if let Some(reason) = reason {
                verdict.reasons.push(format!(
                    "{}: {} partition {}: {reason}",
                    h.id, p.topic, p.partition
                ));
            }
        }
    }
    metrics::gauge!(SERVICE_READY).set(if verdict.ok() { 1.0 } else { 0.0 });
    verdict
}

/// How long `p` has been stuck: tasks that could run (not waiting for their schedule)
/// pending and none completed. `entry` is the completion count last seen and since when.
fn stalled_for(entry: &mut (u64, Instant), p: &PartitionView, now: Instant) -> Duration {
    if entry.0 != p.completed || p.pending <= p.delayed {
        *entry = (p.completed, now);
    }
    now.duration_since(entry.1)
}

/// How often readiness is evaluated in the background (so stalls are seen and the ready
/// gauges move even when nobody asks).
pub(crate) const EVALUATE_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn part(pending: usize, delayed: usize, completed: u64) -> PartitionView {
        PartitionView {
            topic: Arc::from("t"),
            partition: 0,
            position: Some(0),
            pending,
            delayed,
            completed,
            gaps: 0,
            not_ready: None,
        }
    }

    #[test]
    fn stalled_means_runnable_tasks_pending_and_nothing_completing() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        // Tasks pending, nothing completes: stalled since t0.
        let mut e = (5, t0);
        assert_eq!(
            stalled_for(&mut e, &part(10, 0, 5), later),
            Duration::from_secs(60)
        );
        // Something completed: the clock restarts.
        assert_eq!(stalled_for(&mut e, &part(10, 0, 6), later), Duration::ZERO);
        // Only tasks waiting for their schedule pin the position: not a stall.
        let mut e = (5, t0);
        assert_eq!(stalled_for(&mut e, &part(3, 3, 5), later), Duration::ZERO);
        // Nothing pending: not a stall.
        let mut e = (5, t0);
        assert_eq!(stalled_for(&mut e, &part(0, 0, 5), later), Duration::ZERO);
    }
}
