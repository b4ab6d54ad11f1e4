//! Applying chat operations to storage, where per-user order is a correctness property.
//!
//! [`StorageMutationProcessor`] keeps, for every user, a [`UserRecord`]: how many
//! operations of each type the user made and the sequence number of the last one
//! applied. Applying a user's operations out of order would corrupt that record (a
//! "leave room" applied before its "join room"), so the processor checks the order it
//! sees:
//!
//! * `sequence == last + 1`: in order, applied;
//! * `sequence <= last`: **backwards** — the operation was already applied (a redelivery
//!   after a restart or rebalance; at-least-once) or the runtime broke per-key order. It
//!   is logged, counted and skipped, which keeps the mutation idempotent;
//! * `sequence > last + 1`: a **gap** — operations in between were never seen. Logged
//!   and counted, then applied.
//!
//! The storage itself sits behind the small [`UserStore`] trait so the same processor
//! runs on [`InMemoryStore`] here and on a persistent store elsewhere.
//!
//! When storage fails, the processor does not give the operation up (that would lose a
//! mutation and break the user's sequence): it retries with backoff until storage
//! answers, holding the user's later operations behind it. The subscription then falls
//! behind — its partitions pause at `max_pending` and its readiness reports them stalled —
//! while Kafka keeps the backlog, and it catches up when storage is back.
//! [`FlakyStore`] simulates such an outage.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
use decaton_protocol::ChatOp;
use parking_lot::Mutex;

use crate::chat::op_name;

/// Number of operation types (`OpType` values 0..=7).
pub const OP_TYPES: usize = 8;

/// What storage keeps per user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRecord {
    /// Operations applied, indexed by `OpType` value.
    pub op_counts: [u64; OP_TYPES],
    /// Sequence number of the last operation applied.
    pub last_sequence: u64,
}

/// Where user records live. Implementations must be safe to call concurrently for
/// different users; the runtime never runs two operations of one user at once.
pub trait UserStore: Send + Sync + 'static {
    /// The user's record, or `None` if nothing was applied for the user yet.
    fn load(&self, user: &str) -> anyhow::Result<Option<UserRecord>>;
    /// Replaces the user's record.
    fn save(&self, user: &str, record: &UserRecord) -> anyhow::Result<()>;
    /// Every stored record (for summaries).
    fn records(&self) -> anyhow::Result<Vec<(String, UserRecord)>>;
}

/// A [`UserStore`] in a `HashMap`; gone when the process exits.
#[derive(Debug, Default)]
pub struct InMemoryStore {
    users: Mutex<HashMap<String, UserRecord>>,
}

impl UserStore for InMemoryStore {
    fn load(&self, user: &str) -> anyhow::Result<Option<UserRecord>> {
        Ok(self.users.lock().get(user).cloned())
    }

    fn save(&self, user: &str, record: &UserRecord) -> anyhow::Result<()> {
        self.users.lock().insert(user.to_string(), record.clone());
        Ok(())
    }

    fn records(&self) -> anyhow::Result<Vec<(String, UserRecord)>> {
        Ok(self
            .users
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// A [`UserStore`] that fails every call while it is switched off, standing in for a
/// database that is down.
#[derive(Debug)]
pub struct FlakyStore<S> {
    inner: S,
    down: Arc<AtomicBool>,
}

impl<S: UserStore> FlakyStore<S> {
    /// Wraps `inner`; it is up until [`Self::switch`] says otherwise.
    pub fn new(inner: S) -> Self {
        FlakyStore {
            inner,
            down: Arc::default(),
        }
    }

    /// The switch: `true` makes the store fail.
    pub fn switch(&self) -> Arc<AtomicBool> {
        self.down.clone()
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.down.load(Ordering::Relaxed) {
            anyhow::bail!("storage unreachable");
        }
        Ok(())
    }
}

impl<S: UserStore> UserStore for FlakyStore<S> {
    fn load(&self, user: &str) -> anyhow::Result<Option<UserRecord>> {
        self.check()?;
        self.inner.load(user)
    }

    fn save(&self, user: &str, record: &UserRecord) -> anyhow::Result<()> {
        self.check()?;
        self.inner.save(user, record)
    }

    fn records(&self) -> anyhow::Result<Vec<(String, UserRecord)>> {
        self.inner.records()
    }
}

/// Keeps `switch` set while the file `path` exists (checked every 200 ms), so an
/// operator — or a test — can take the storage down and bring it back from outside.
pub fn outage_while_file_exists(
    path: PathBuf,
    switch: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            // A file system call may block: off the async workers.
            let probe = path.clone();
            let down = tokio::task::spawn_blocking(move || probe.exists())
                .await
                .unwrap_or(false);
            if switch.swap(down, Ordering::Relaxed) != down {
                tracing::warn!(path = %path.display(), down, "storage availability changed");
            }
        }
    })
}

/// Order observations of the storage processor.
#[derive(Debug, Default)]
pub struct MutationStats {
    /// Operations applied.
    pub applied: AtomicU64,
    /// Operations whose sequence was not above the user's last one (skipped).
    pub backwards: AtomicU64,
    /// Operations that arrived after a gap in the user's sequence (applied).
    pub gaps: AtomicU64,
}

impl MutationStats {
    /// True when every operation arrived exactly in sequence: nothing went backwards and
    /// nothing was skipped. (Across restarts or rebalances, backwards steps are expected
    /// redeliveries; within one uninterrupted run they are order violations.)
    pub fn in_order(&self) -> bool {
        self.backwards.load(Ordering::Relaxed) == 0 && self.gaps.load(Ordering::Relaxed) == 0
    }
}

/// Applies chat operations to a [`UserStore`], checking per-user order. Clones share
/// the store and the counters.
pub struct StorageMutationProcessor<S> {
    store: Arc<S>,
    stats: Arc<MutationStats>,
}

impl<S> Clone for StorageMutationProcessor<S> {
    fn clone(&self) -> Self {
        StorageMutationProcessor {
            store: self.store.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<S: UserStore> StorageMutationProcessor<S> {
    /// A processor writing to `store`.
    pub fn new(store: Arc<S>) -> Self {
        StorageMutationProcessor {
            store,
            stats: Arc::default(),
        }
    }

    /// Live order counters.
    pub fn stats(&self) -> Arc<MutationStats> {
        self.stats.clone()
    }

    /// Applies one operation; what [`TaskProcessor::process`] does.
    pub fn apply(&self, op: &ChatOp) -> anyhow::Result<()> {
        let (mut record, expected) = match self.store.load(&op.user_id)? {
            Some(r) => {
                let next = r.last_sequence + 1;
                (r, Some(next))
            }
            // The first operation seen for a user may be any sequence: the topic may
            // hold history from before this store existed.
            None => (UserRecord::default(), None),
        };
        match expected {
            Some(next) if op.sequence < next => {
                self.stats.backwards.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(user = %op.user_id, sequence = op.sequence, last = record.last_sequence,
                    "sequence went backwards (redelivery or order violation); skipped");
                return Ok(());
            }
            Some(next) if op.sequence > next => {
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(user = %op.user_id, sequence = op.sequence, expected = next,
                    "gap in the user's sequence: operations missing");
            }
            _ => {}
        }
        let slot = usize::try_from(op.op)
            .ok()
            .filter(|i| *i < OP_TYPES)
            .unwrap_or(0);
        record.op_counts[slot] += 1;
        record.last_sequence = op.sequence;
        self.store.save(&op.user_id, &record)?;
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A multi-line summary: users, operations per type, order observations.
    pub fn summary(&self) -> anyhow::Result<String> {
        let records = self.store.records()?;
        let mut totals = [0u64; OP_TYPES];
        for (_, r) in &records {
            for (t, n) in totals.iter_mut().zip(r.op_counts) {
                *t += n;
            }
        }
        let per_type: Vec<String> = totals
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(op, n)| format!("{}={n}", op_name(op as i32)))
            .collect();
        let s = &self.stats;
        Ok(format!(
            "storage: {} users, applied {} [{}]; sequence went backwards {} times (skipped), gaps {} -> {}",
            records.len(),
            s.applied.load(Ordering::Relaxed),
            per_type.join(" "),
            s.backwards.load(Ordering::Relaxed),
            s.gaps.load(Ordering::Relaxed),
            if s.in_order() {
                "every user's operations in order"
            } else {
                "NOT in order (see the warnings)"
            }
        ))
    }
}

#[async_trait]
impl<S: UserStore> TaskProcessor<ChatOp> for StorageMutationProcessor<S> {
    async fn process(&self, _ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
        // Storage errors are retried until storage answers: giving a mutation up would
        // break the user's sequence. The backoff spaces the attempts; it is not waiting
        // for anything in particular.
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        loop {
            match self.apply(&op) {
                Ok(()) => {
                    if attempts > 0 {
                        tracing::info!(user = %op.user_id, attempts, "applied after storage came back");
                    }
                    tracing::debug!(user = %op.user_id, sequence = op.sequence, "applied");
                    return Ok(());
                }
                Err(e) => {
                    if attempts == 0 {
                        tracing::warn!(user = %op.user_id, "storage failed ({e:#}); retrying until it answers");
                    }
                    attempts += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decaton_protocol::OpType;

    fn op(user: &str, sequence: u64, kind: OpType) -> ChatOp {
        ChatOp {
            user_id: user.into(),
            op: kind as i32,
            sequence,
            ..Default::default()
        }
    }

    #[test]
    fn in_order_replay_and_gap_are_told_apart() -> anyhow::Result<()> {
        let p = StorageMutationProcessor::new(Arc::new(InMemoryStore::default()));
        p.apply(&op("a", 0, OpType::JoinRoom))?;
        p.apply(&op("a", 1, OpType::SendMessage))?;
        assert!(p.stats().in_order());
        p.apply(&op("a", 1, OpType::SendMessage))?; // redelivered: skipped
        p.apply(&op("a", 3, OpType::LeaveRoom))?; // 2 missing
        let s = p.stats();
        assert_eq!(
            (
                s.applied.load(Ordering::Relaxed),
                s.backwards.load(Ordering::Relaxed),
                s.gaps.load(Ordering::Relaxed)
            ),
            (3, 1, 1)
        );
        let rec = p
            .store
            .load("a")?
            .ok_or_else(|| anyhow::anyhow!("no record"))?;
        assert_eq!(rec.last_sequence, 3);
        assert_eq!(rec.op_counts[OpType::SendMessage as usize], 1);
        assert!(p.summary()?.contains("NOT in order"));
        Ok(())
    }
}
