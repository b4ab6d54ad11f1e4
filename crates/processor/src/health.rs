//! Health of a running subscription, as its consumer thread last saw it.
//!
//! The consumer thread notes every turn of its loop and, a few times a second, publishes
//! what each owned partition is doing: its commit position, unfinished tasks, gaps in its
//! offset window, and whether the runtime holds it back (state store still restoring,
//! tasks of a previous assignment still running). [`SubscriptionHandle::health`] reads
//! the latest snapshot without touching the consumer thread, so a health endpoint can ask
//! as often as it likes.
//!
//! [`SubscriptionHandle::health`]: crate::SubscriptionHandle::health

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::runtime::partitions::Partitions;

/// Why the runtime starts no task of a partition it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotReady {
    /// Its state store is being restored from the changelog.
    RestoringState,
    /// Tasks of its previous assignment in this process, abandoned at a rebalance, still
    /// run; it starts when they end (one key never runs twice at once).
    PredecessorRunning {
        /// How many still run.
        tasks: usize,
    },
    /// Its number of lanes changed (`partition_concurrency`): it waits until its current
    /// lanes are empty and its deferred tasks have completed, then runs on the new ones.
    ChangingLanes {
        /// The new number of lanes.
        to: usize,
        /// Tasks still queued in or run by the current lanes, or still deferred.
        tasks: usize,
    },
    /// Its topic's processing rate is 0 (`decaton.processing.rate.per.partition` for the
    /// source topic, `retry_processing_rate_per_partition` for the retry topic): no task
    /// starts until the rate changes.
    Stopped,
    /// Its committed offset and offset map could not be read from the group coordinator:
    /// nothing is fetched, started or committed for it until a read succeeds (starting
    /// without them would run finished tasks again). The read is retried with backoff.
    ReadingCommittedOffset {
        /// Failed reads so far.
        attempts: u32,
        /// The last read's error.
        error: String,
    },
    /// A record the runtime must write on behalf of the task at `offset` (its dead-letter
    /// copy, even reduced, or its shaped copy) is refused for good, for example because
    /// the topic does not exist or the principal may not write it. The offset stays
    /// unfinished, so nothing past it is committed; once `max_pending` tasks wait, no more
    /// are fetched. The copy is tried again with a backoff that grows to a minute: fixing
    /// the cause (create the topic, grant the ACL) unblocks the partition without a
    /// restart. `decaton_partition_stalled` is 1 meanwhile.
    Stalled {
        /// The topic of the stalled partition.
        topic: Arc<str>,
        /// The stalled partition.
        partition: i32,
        /// The offset that cannot finish (the lowest, if several).
        offset: i64,
        /// Why its copy cannot be written.
        reason: String,
    },
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::RestoringState => write!(f, "restoring its state store from the changelog"),
            NotReady::PredecessorRunning { tasks } => write!(
                f,
                "waiting for {tasks} tasks of its previous assignment to end"
            ),
            NotReady::ChangingLanes { to, tasks } => write!(
                f,
                "changing to {to} lanes once its current lanes' {tasks} tasks are done"
            ),
            NotReady::Stopped => write!(
                f,
                "stopped: its processing rate is 0 (decaton.processing.rate.per.partition)"
            ),
            NotReady::ReadingCommittedOffset { attempts, error } => write!(
                f,
                "its committed offset could not be read ({attempts} attempts, last: {error}); retrying"
            ),
            NotReady::Stalled {
                topic,
                partition,
                offset,
                reason,
            } => write!(
                f,
                "stalled: {topic}-{partition} cannot finish offset {offset}: {reason}"
            ),
        }
    }
}

/// One owned partition.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionHealth {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The position that would be committed now (the lowest unfinished offset), if known.
    pub position: Option<i64>,
    /// Unfinished tasks (registered and not done), delayed ones included.
    pub pending: usize,
    /// Of those, tasks waiting for their scheduled time.
    pub delayed: usize,
    /// Records completed since the partition was assigned (processed, failed, discarded
    /// or skipped): when it stops rising while tasks that are not delayed are pending, the
    /// partition is stuck.
    pub completed: u64,
    /// Runs of unfinished offsets below finished ones above the position: each run is a
    /// gap in the offset map that pins the commit position.
    pub offset_map_gaps: usize,
    /// Why the runtime holds the partition back, if it does.
    pub not_ready: Option<NotReady>,
}

/// A snapshot of a subscription's health.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SubscriptionHealth {
    /// The consumer has received its first assignment (possibly empty).
    pub joined: bool,
    /// Time since the consumer loop last turned; `None` before it started.
    pub loop_idle_for: Option<Duration>,
    /// Every owned partition, as of the last publication (a few times a second).
    pub partitions: Vec<PartitionHealth>,
}

/// Where the consumer thread publishes health; shared with the handle.
#[derive(Default)]
pub(crate) struct HealthBoard {
    joined: AtomicBool,
    last_turn: Mutex<Option<Instant>>,
    partitions: Mutex<Vec<PartitionHealth>>,
}

impl HealthBoard {
    /// The consumer loop turned.
    pub(crate) fn turned(&self) {
        *self.last_turn.lock() = Some(Instant::now());
    }

    /// The consumer received an assignment.
    pub(crate) fn joined(&self) {
        self.joined.store(true, Ordering::Release);
    }

    /// Publishes the state of every owned partition (one entry per partition: bounded by
    /// the assignment).
    pub(crate) fn publish<T: Send + 'static>(&self, parts: &Partitions<T>) {
        let now: Vec<PartitionHealth> = parts
            .contexts()
            .map(|c| c.health())
            .chain(parts.held_health())
            .collect();
        *self.partitions.lock() = now;
    }

    pub(crate) fn snapshot(&self) -> SubscriptionHealth {
        SubscriptionHealth {
            joined: self.joined.load(Ordering::Acquire),
            loop_idle_for: self.last_turn.lock().map(|t| t.elapsed()),
            partitions: self.partitions.lock().clone(),
        }
    }
}
