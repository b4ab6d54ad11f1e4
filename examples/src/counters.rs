//! Per-user counters in partition-local state that follows its partition.
//!
//! [`UserCountersProcessor`] counts every user's chat operations, per operation type and
//! in total, and remembers when the user's latest operation was made. It keeps all of it
//! in the subscription's **state store** ([`ProcessingContext::state`]) instead of an
//! external database: each source partition has its own local store (sled on disk, or
//! memory), every task's writes are applied when the task completes and appended to the
//! changelog topic `<subscription>-<store>-changelog` — `user-counters-state-changelog`
//! for the [`SUBSCRIPTION`] here with the default store name `state` — and a host that
//! takes over a partition replays that changelog partition before it runs the
//! partition's first task. Each task's writes land in the state exactly once, even when
//! the task itself is redelivered after a crash.
//!
//! Since one user's operations all go to one partition, a user's counters live in
//! exactly one partition's store, and per-key ordering means no two tasks of one user
//! ever read-modify-write them at the same time.
//!
//! # State layout
//!
//! Keys are UTF-8; every value is 8 bytes big-endian.
//!
//! | key                        | value                                                   |
//! |----------------------------|---------------------------------------------------------|
//! | `ops/<user>/<OP_TYPE>`     | `u64`: operations of that type (`SEND_MESSAGE`, see [`op_name`]) |
//! | `total/<user>`             | `u64`: operations of any type                           |
//! | `last/<user>`              | `i64`: `created_at_millis` of the newest operation seen |
//!
//! Big-endian integers keep values fixed-size and make the changelog records small; the
//! operation type is the *last* path segment of an `ops/` key, so a user id containing
//! `/` still parses.
//!
//! # Reading the state back
//!
//! [`count_state_dir`] reads every partition store of a **stopped** subscription from a
//! sled state directory, for summaries and tests (a running subscription holds the
//! stores' locks; reading them then fails with "locked").

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
use decaton_protocol::ChatOp;
use decaton_state::internal::{OpenReport, PartitionStore};
use decaton_state::{Backend, StateConfig, StateStore};

use crate::chat::op_name;

/// The subscription (consumer group) of the `user-counters` example.
pub const SUBSCRIPTION: &str = "user-counters";

/// Prefix of the per-type counters: `ops/<user>/<OP_TYPE>`.
pub const OPS_PREFIX: &str = "ops/";
/// Prefix of the per-user totals: `total/<user>`.
pub const TOTAL_PREFIX: &str = "total/";
/// Prefix of the per-user last-operation times: `last/<user>`.
pub const LAST_PREFIX: &str = "last/";

/// State key of `user`'s counter of operations of type `op` (a name from [`op_name`]).
pub fn ops_key(user: &str, op: &str) -> String {
    format!("{OPS_PREFIX}{user}/{op}")
}

/// State key of `user`'s total operation count.
pub fn total_key(user: &str) -> String {
    format!("{TOTAL_PREFIX}{user}")
}

/// State key of `user`'s latest operation time.
pub fn last_key(user: &str) -> String {
    format!("{LAST_PREFIX}{user}")
}

fn decode_u64(key: &[u8], value: &[u8]) -> anyhow::Result<u64> {
    let bytes: [u8; 8] = value.try_into().with_context(|| {
        format!(
            "value of {} is {} bytes, not 8",
            String::from_utf8_lossy(key),
            value.len()
        )
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_i64(key: &[u8], value: &[u8]) -> anyhow::Result<i64> {
    Ok(decode_u64(key, value)? as i64)
}

fn read_u64(state: &dyn StateStore, key: &str) -> anyhow::Result<u64> {
    match state.get(key.as_bytes())? {
        Some(v) => decode_u64(key.as_bytes(), &v),
        None => Ok(0),
    }
}

/// Applies one operation to the counters in `state`: increments `ops/<user>/<OP_TYPE>`
/// and `total/<user>`, and moves `last/<user>` up to the operation's
/// `created_at_millis` (it never goes back, should a producer's clock).
pub fn apply(state: &dyn StateStore, op: &ChatOp) -> anyhow::Result<()> {
    let user = &op.user_id;
    for key in [ops_key(user, op_name(op.op)), total_key(user)] {
        let n = read_u64(state, &key)?;
        state.put(key.as_bytes(), &(n + 1).to_be_bytes())?;
    }
    let last = last_key(user);
    let previous = match state.get(last.as_bytes())? {
        Some(v) => Some(decode_i64(last.as_bytes(), &v)?),
        None => None,
    };
    if previous.is_none_or(|p| op.created_at_millis > p) {
        state.put(last.as_bytes(), &op.created_at_millis.to_be_bytes())?;
    }
    Ok(())
}

/// Counts chat operations per user in the subscription's state store (see the module
/// docs for the layout). Requires a subscription built with
/// [`state_store`](decaton_processor::SubscriptionBuilder::state_store); without one
/// every task fails. Clones share the [`seen`](Self::seen) counter.
#[derive(Debug, Clone, Default)]
pub struct UserCountersProcessor {
    seen: Arc<AtomicU64>,
}

impl UserCountersProcessor {
    /// A processor with its counter of processed tasks at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tasks processed successfully by this processor (and its clones) so far. A task
    /// redelivered after a restart whose effects are already in the state is skipped by
    /// the runtime and not counted again.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl TaskProcessor<ChatOp> for UserCountersProcessor {
    async fn process(&self, ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
        let state = ctx
            .state()
            .ok_or_else(|| ProcessError::new("no state store configured for user-counters"))?;
        apply(state, &op).map_err(|e| ProcessError::new(format!("{e:#}")))?;
        self.seen.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// One user's counters as read from the state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserCounters {
    /// Operations of any type (`total/<user>`).
    pub total: u64,
    /// Operations per type name (`ops/<user>/<OP_TYPE>`).
    pub ops: BTreeMap<String, u64>,
    /// `created_at_millis` of the newest operation (`last/<user>`), if recorded.
    pub last_millis: Option<i64>,
}

impl UserCounters {
    /// One line: total, per-type counts and the last operation's time.
    pub fn describe(&self) -> String {
        let ops: Vec<String> = self.ops.iter().map(|(op, n)| format!("{op}={n}")).collect();
        let last = self
            .last_millis
            .map_or_else(|| "-".to_string(), |m| m.to_string());
        format!(
            "total {} [{}] last_op_millis {last}",
            self.total,
            ops.join(" ")
        )
    }
}

/// What [`count_state_dir`] found.
#[derive(Debug, Clone, Default)]
pub struct StateDump {
    /// Every user's counters, by user id.
    pub users: BTreeMap<String, UserCounters>,
    /// Partitions whose store was read (closed cleanly, with a checkpoint).
    pub partitions: Vec<i32>,
    /// Partitions whose local files could not be used — the owner did not close them
    /// cleanly, or they are damaged — with the reason. Opening such a store discards
    /// its files (the next owner rebuilds it from the changelog), so their users are
    /// missing from [`users`](Self::users).
    pub discarded: Vec<(i32, String)>,
}

impl StateDump {
    /// The `n` users with the most operations, most first (ties by user id).
    pub fn top(&self, n: usize) -> Vec<(&str, &UserCounters)> {
        let mut users: Vec<(&str, &UserCounters)> =
            self.users.iter().map(|(u, c)| (u.as_str(), c)).collect();
        users.sort_by(|a, b| b.1.total.cmp(&a.1.total).then_with(|| a.0.cmp(b.0)));
        users.truncate(n);
        users
    }

    /// Sum of every user's total.
    pub fn total(&self) -> u64 {
        self.users.values().map(|c| c.total).sum()
    }

    /// A multi-line summary: users, operations, partitions, and the top `n` users.
    pub fn summary(&self, n: usize) -> String {
        let mut out = format!(
            "user-counters state: {} users, {} operations, partitions read {:?}",
            self.users.len(),
            self.total(),
            self.partitions
        );
        for (p, why) in &self.discarded {
            out.push_str(&format!("\n  partition {p} not read: {why}"));
        }
        if !self.users.is_empty() {
            out.push_str(&format!(
                "\ntop {} users by operations:",
                n.min(self.users.len())
            ));
            for (rank, (user, c)) in self.top(n).into_iter().enumerate() {
                out.push_str(&format!("\n  {:>2}. {user:<14} {}", rank + 1, c.describe()));
            }
        }
        out
    }
}

/// Adds the counters of one partition store to `users`.
pub fn read_store(
    store: &PartitionStore,
    users: &mut BTreeMap<String, UserCounters>,
) -> anyhow::Result<()> {
    for (k, v) in store.scan_prefix(TOTAL_PREFIX.as_bytes())? {
        let user = String::from_utf8_lossy(&k[TOTAL_PREFIX.len()..]).into_owned();
        users.entry(user).or_default().total = decode_u64(&k, &v)?;
    }
    for (k, v) in store.scan_prefix(LAST_PREFIX.as_bytes())? {
        let user = String::from_utf8_lossy(&k[LAST_PREFIX.len()..]).into_owned();
        users.entry(user).or_default().last_millis = Some(decode_i64(&k, &v)?);
    }
    for (k, v) in store.scan_prefix(OPS_PREFIX.as_bytes())? {
        let rest = String::from_utf8_lossy(&k[OPS_PREFIX.len()..]).into_owned();
        let (user, op) = rest
            .rsplit_once('/')
            .with_context(|| format!("malformed key {OPS_PREFIX}{rest}"))?;
        users
            .entry(user.to_string())
            .or_default()
            .ops
            .insert(op.to_string(), decode_u64(&k, &v)?);
    }
    Ok(())
}

/// The partitions of `topic` that have a local store of `subscription` under `cfg`'s
/// state directory (`<state_dir>/<subscription>/<store>/<topic>-<partition>`), ascending.
pub fn local_partitions(
    cfg: &StateConfig,
    subscription: &str,
    topic: &str,
) -> anyhow::Result<Vec<i32>> {
    let dir = cfg.state_dir.join(subscription).join(&cfg.store_name);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let prefix = format!("{topic}-");
    let mut partitions = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(p) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<i32>().ok())
        {
            partitions.push(p);
        }
    }
    partitions.sort_unstable();
    Ok(partitions)
}

/// Reads the counters of every partition store of a **stopped** `subscription` on
/// `topic` from the sled state directory in `cfg` (the partitions are found by listing
/// the directory).
///
/// Read-only in effect: opening a store consumes its checkpoint, so this writes the
/// checkpoint back after reading, and the next owner still restores only the
/// changelog's tail. A store without a checkpoint (its owner crashed) is discarded by
/// the open and reported in [`StateDump::discarded`]. Fails if a store is open
/// elsewhere (a subscription still running) or `cfg` is the in-memory backend, which
/// keeps nothing on disk.
pub fn count_state_dir(
    cfg: &StateConfig,
    subscription: &str,
    topic: &str,
) -> anyhow::Result<StateDump> {
    anyhow::ensure!(
        cfg.backend == Backend::Sled,
        "the memory backend keeps nothing on disk to read"
    );
    let mut dump = StateDump::default();
    for p in local_partitions(cfg, subscription, topic)? {
        let (store, report) =
            PartitionStore::open(cfg, subscription, topic, p).with_context(|| {
                format!("opening the state of {topic}-{p} (is the subscription still running?)")
            })?;
        match report {
            OpenReport::Checkpoint { .. } => {
                // Opening leaves the checkpoint in place: reading changes nothing.
                read_store(&store, &mut dump.users)
                    .with_context(|| format!("reading {topic}-{p}"))?;
                dump.partitions.push(p);
            }
            OpenReport::Rebuilt { reason } => dump.discarded.push((p, reason.to_string())),
            // An empty directory: nothing was ever written there.
            OpenReport::Fresh => dump.partitions.push(p),
        }
    }
    Ok(dump)
}

/// [`count_state_dir`] for the [`SUBSCRIPTION`] of this example with the default store
/// name, reading from `state_dir`.
pub fn count_default_state_dir(state_dir: &Path, topic: &str) -> anyhow::Result<StateDump> {
    let cfg = StateConfig {
        state_dir: state_dir.to_path_buf(),
        ..Default::default()
    };
    count_state_dir(&cfg, SUBSCRIPTION, topic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use decaton_protocol::OpType;

    fn op(user: &str, kind: OpType, at: i64) -> ChatOp {
        ChatOp {
            user_id: user.into(),
            op: kind as i32,
            created_at_millis: at,
            ..Default::default()
        }
    }

    #[test]
    fn counts_and_last_time_round_trip_through_a_store() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cfg = StateConfig {
            state_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        {
            let (store, report) = PartitionStore::open(&cfg, SUBSCRIPTION, "t", 0)?;
            assert_eq!(report, OpenReport::Fresh);
            let batch = store.task_batch();
            apply(&batch, &op("a/b", OpType::SendMessage, 10))?;
            apply(&batch, &op("a/b", OpType::SendMessage, 30))?;
            apply(&batch, &op("a/b", OpType::Read, 20))?; // older: last stays 30
            apply(&batch, &op("c", OpType::Block, 5))?;
            // Reads see the batch's own writes.
            assert_eq!(read_u64(&batch, &total_key("a/b"))?, 3);
            let acknowledged = store.take_mutations(&batch)?;
            store.apply_acknowledged(&acknowledged, 7)?;
            store.close_clean(42, &[7])?;
        }
        let dump = count_state_dir(&cfg, SUBSCRIPTION, "t")?;
        assert_eq!(dump.partitions, vec![0]);
        let a = &dump.users["a/b"];
        assert_eq!(a.total, 3);
        assert_eq!(
            a.ops,
            BTreeMap::from([("READ".to_string(), 1), ("SEND_MESSAGE".to_string(), 2)])
        );
        assert_eq!(a.last_millis, Some(30));
        assert_eq!(dump.top(1)[0].0, "a/b");
        assert!(
            dump.summary(10).contains("2 users, 4 operations"),
            "{}",
            dump.summary(10)
        );
        // Reading put the checkpoint back.
        let (_, report) = PartitionStore::open(&cfg, SUBSCRIPTION, "t", 0)?;
        assert_eq!(report, OpenReport::Checkpoint { offset: 42 });
        Ok(())
    }

    /// The processor as the runtime runs it, without a broker: each op counts once, the
    /// writes are the ones the changelog would carry, and a task without state fails.
    #[tokio::test]
    async fn counts_through_the_processor_test_harness() {
        use decaton_processor::testing::{ProcessorTester, TaskResult};
        let tester = ProcessorTester::new(UserCountersProcessor::new()).with_state();
        let first = tester
            .process(Some(b"a"), op("a", OpType::SendMessage, 10))
            .await;
        assert_eq!(first.result, TaskResult::Completed);
        assert!(first
            .state_writes
            .iter()
            .any(|(k, v)| k == total_key("a").as_bytes()
                && v.as_deref() == Some(1u64.to_be_bytes().as_slice())));
        tester.process(Some(b"a"), op("a", OpType::Read, 20)).await;
        assert_eq!(
            tester.state_get(total_key("a").as_bytes()),
            Some(2u64.to_be_bytes().to_vec())
        );

        let without_state = ProcessorTester::new(UserCountersProcessor::new());
        let failed = without_state
            .process(Some(b"a"), op("a", OpType::Read, 1))
            .await;
        assert!(matches!(failed.result, TaskResult::Failed(_)), "{failed:?}");
        assert!(failed.state_writes.is_empty());
    }
}
