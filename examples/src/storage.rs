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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
        self.apply(&op)
            .map_err(|e| ProcessError::new(format!("{e:#}")))
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
