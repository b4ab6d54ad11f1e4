//! Restore: replaying a changelog partition into a partition's local store.
//!
//! A new owner of a partition reads the changelog partition from the store's checkpoint
//! (or from the beginning) up to the high watermark taken when the restore starts, and
//! applies the writes of **complete task batches** only. The reasoning:
//!
//! * A task's writes reach the changelog as one batch of records (see
//!   [`record`](crate::record) for the headers). A writer that crashes part-way leaves a *torn* batch: its
//!   first records, not the rest. Applying them would hand the redelivered task a state
//!   with half of its own earlier effects, so a torn batch is ignored — the task runs
//!   again against state that has none of them.
//! * A complete batch's source offset is recorded ([`RestoreReport::applied_source_offsets`]),
//!   so the processor skips a redelivered task whose effects are already in the state.
//!
//! Log compaction complicates "complete": it deletes a record once its key was written
//! again, so an old, complete batch may have lost some of its records. Such a batch must
//! be applied (its surviving records are still the newest values of their keys), while a
//! torn one must not. The writer numbers its records per partition (`dt_writer`,
//! `dt_seq`), and a batch with missing records is judged like this:
//!
//! 1. An **abort marker** for it follows: torn, ignore.
//! 2. A later record from the same writer has a higher sequence number than the batch's
//!    last record: the missing records were written, and compaction removed them —
//!    apply what is left.
//! 3. Records of *another* writer follow (the partition changed hands): the next owner's
//!    restore would have appended abort markers for torn batches before it wrote
//!    anything, and none came, so it was compaction — apply.
//! 4. The changelog ends inside the batch's writer, with the batch's last record never
//!    written: torn, ignore, and append an abort marker so that rule 1 covers it once
//!    later batches follow.
//!
//! Batches applied late (rules 2 and 3) skip any key that a later record has already
//! written, so the store ends as if every record had been applied in log order.
//!
//! A torn record is also dangerous to compaction: it is the newest record of its key, so
//! the cleaner may delete the valid value before it. After marking torn batches, the
//! restore therefore appends a **compensation batch** (its own writer, `dt_src_offset` =
//! -1) that writes again the restored value, or a tombstone, of every key whose newest
//! record is an ignored one. The changelog topic's `min.compaction.lag.ms` keeps the
//! cleaner away from the torn records until then.
//!
//! Records without the headers (written by something else) are applied one by one, and
//! counted. Batches with the batch headers but without `dt_writer`/`dt_seq` are applied
//! only when complete.
//!
//! Limits: a batch that compaction removed entirely leaves no source offset behind (the
//! processor only needs offsets at or above its committed offset, which are recent).
//! librdkafka's idempotent producer keeps a partition's records in order and gapless,
//! except when a record times out (`message.timeout.ms`) or is purged while later ones
//! get through: a batch torn that way and followed by later batches of the same writer
//! looks compacted and is applied partially. The failed append reports it, the local
//! store never got it, and the runtime re-sends the same mutations, whose complete batch
//! follows and overwrites every key the torn one wrote. Two owners writing one changelog
//! partition at once (a zombie) are not told apart; fencing a revoked partition's store
//! and purging its queued appends keeps that window short.
//!
//! A checkpoint is trusted only while it is younger than
//! [`RestoreOptions::checkpoint_max_age`]: compaction removes a delete's tombstone
//! `delete.retention.ms` after cleaning it, and a store restored from an older checkpoint
//! would keep a key that was deleted since. Whether that cleaning happened cannot be seen
//! from the changelog, so an older checkpoint empties the store and the restore starts
//! from the beginning ([`RestoreReport::checkpoint_discarded`]).
//!
//! A restore can be retried: see [`restore`].

mod assembler;
mod replay;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::changelog::ChangelogWriter;
use crate::kafka::{blocking, restore_consumer_config};
use crate::record::{Mutation, NO_TASK};
use crate::store::{now_ms, PartitionStore};
use crate::StateError;
use replay::{replay, Plan, Replayed};
pub use replay::{RESTORED_RECORDS_TOTAL, RESTORE_SECONDS};

/// What a [`restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// Changelog records read (including ignored and marker records).
    pub records_read: u64,
    /// Complete batches applied.
    pub batches_applied: u64,
    /// Batches with records missing because compaction removed them, applied.
    pub compacted_batches_applied: u64,
    /// Torn batches (a crashed writer's partial batch) ignored.
    pub partial_batches_ignored: u64,
    /// Records without batch headers, applied one by one.
    pub unframed_records: u64,
    /// Records that could not be applied at all (no key).
    pub skipped_records: u64,
    /// Abort markers this restore appended for torn batches at the end of the changelog.
    pub abort_markers_written: u64,
    /// Records this restore appended to write again the valid value (or a tombstone) of
    /// keys whose newest changelog record belonged to a torn batch.
    pub compensation_records_written: u64,
    /// The offset the restore started reading at.
    pub start_offset: i64,
    /// The first changelog offset not read: where a later restore of this store resumes.
    pub next_offset: i64,
    /// The checkpoint offset was outside the changelog (the topic was recreated or
    /// truncated), so the local store was emptied and restored from the beginning.
    pub checkpoint_discarded: bool,
    /// Source offsets, at or above [`RestoreOptions::min_source_offset`], whose task
    /// batch this restore applied.
    pub applied_source_offsets: BTreeSet<i64>,
    /// Wall time of the restore.
    pub elapsed: Duration,
}

/// Where a [`restore`] starts, and what it records.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// First changelog offset to read: the checkpoint of
    /// [`OpenReport::restore_from`](crate::internal::OpenReport::restore_from), or `None`
    /// for the beginning of the changelog.
    pub from_offset: Option<i64>,
    /// The source partition's committed offset: no task below it can be redelivered, so
    /// complete batches below it are applied to the state but not recorded as applied.
    /// This keeps the applied set as small as the redeliverable range.
    pub min_source_offset: i64,
    /// How long the restore may go without progress — no watermarks, no record — before
    /// it fails with [`StateError::Timeout`]. Default: 60 s.
    pub stall_timeout: Duration,
    /// The oldest checkpoint this restore trusts: [`StateConfig::checkpoint_max_age_ms`],
    /// lowered to half the changelog topic's `delete.retention.ms` when the broker says
    /// it ([`changelog_delete_retention`](crate::internal::changelog_delete_retention)).
    /// An older checkpoint (or one without a time) is discarded: the local store is
    /// emptied and restored from the beginning. Default: 12 h.
    ///
    /// [`StateConfig::checkpoint_max_age_ms`]: crate::StateConfig::checkpoint_max_age_ms
    pub checkpoint_max_age: Duration,
}

/// Default of [`RestoreOptions::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

impl RestoreOptions {
    /// Restore from `from_offset` (or the beginning), recording applied source offsets
    /// at or above `min_source_offset`, with the default stall timeout.
    pub fn new(from_offset: Option<i64>, min_source_offset: i64) -> RestoreOptions {
        RestoreOptions {
            from_offset,
            min_source_offset,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            checkpoint_max_age: Duration::from_millis(
                crate::StateConfig::default().checkpoint_max_age_ms,
            ),
        }
    }

    /// The same options with another [`checkpoint_max_age`](Self::checkpoint_max_age).
    pub fn with_checkpoint_max_age(self, checkpoint_max_age: Duration) -> RestoreOptions {
        RestoreOptions {
            checkpoint_max_age,
            ..self
        }
    }

    /// The same options with another [`stall_timeout`](Self::stall_timeout).
    pub fn with_stall_timeout(self, stall_timeout: Duration) -> RestoreOptions {
        RestoreOptions {
            stall_timeout,
            ..self
        }
    }
}

/// Replays the changelog partition of `store` ([`PartitionStore::changelog_topic`],
/// [`PartitionStore::partition`]) into it, from [`RestoreOptions::from_offset`] up to the
/// end of the changelog when the restore starts.
///
/// Afterwards the store's applied set ([`PartitionStore::is_applied`]) holds the source
/// offsets at or above [`RestoreOptions::min_source_offset`] whose batches are in the
/// state; offsets below it are forgotten.
///
/// Uses a plain consumer with `assign` (never joins a group, never commits); the `kafka`
/// settings pass through to it and to the producer of abort markers. Call it before
/// processing any task of the partition, and do not write the store while it runs.
///
/// # Failures and retries
///
/// It fails with [`StateError::Timeout`] when it makes no progress for
/// [`RestoreOptions::stall_timeout`] (a broker that is down or unreachable), and with
/// [`StateError::Closed`] soon after the store is [fenced](PartitionStore::fence).
/// **Retry a failed restore on the same store, with the same options; do not reopen
/// the store.** A restore writes only absolute values from the changelog, so running it
/// again over a partly restored store ends in the same state, and the store's checkpoint
/// stays valid for the retry.
pub async fn restore(
    store: &PartitionStore,
    bootstrap: &str,
    kafka: &BTreeMap<String, String>,
    options: &RestoreOptions,
) -> Result<RestoreReport, StateError> {
    let (changelog_topic, partition) = (store.changelog_topic(), store.partition());
    let started = Instant::now();
    let mut from_offset = options.from_offset.filter(|_| !store.emptied());
    let mut stale_checkpoint = false;
    if let Some(offset) = from_offset {
        let max_age = options.checkpoint_max_age;
        let written = store.checkpoint_written_at_ms();
        if !checkpoint_is_fresh(written, now_ms(), max_age) {
            tracing::warn!(
                store = store.label(),
                changelog = changelog_topic,
                partition,
                checkpoint_offset = offset,
                written_at_ms = ?written,
                max_age = ?max_age,
                "checkpoint too old to trust (compaction may have removed deletes written \
                 after it): restoring from the beginning"
            );
            let store = store.clone();
            blocking(move || store.clear_local()).await?;
            from_offset = None;
            stale_checkpoint = true;
        }
    }
    let consumer_cfg = restore_consumer_config(bootstrap, kafka, changelog_topic);
    let Replayed {
        progress,
        mut asm,
        torn,
        dangling,
        tail_ops,
    } = {
        let store = store.clone();
        let plan = Plan {
            from_offset,
            floor: options.min_source_offset,
            stall_timeout: options.stall_timeout,
        };
        blocking(move || replay(&store, &consumer_cfg, plan)).await?
    };
    {
        // sled writes: off the async workers.
        let store = store.clone();
        blocking(move || store.write_restored(&tail_ops)).await?;
    }
    let mut report = RestoreReport {
        records_read: progress.records_read,
        batches_applied: asm.batches_applied,
        compacted_batches_applied: asm.compacted_batches_applied,
        partial_batches_ignored: asm.partial_batches_ignored,
        unframed_records: asm.unframed_records,
        skipped_records: asm.skipped_records,
        start_offset: progress.start_offset,
        next_offset: progress.next_offset,
        checkpoint_discarded: progress.checkpoint_discarded || stale_checkpoint,
        applied_source_offsets: std::mem::take(&mut asm.applied_sources),
        ..RestoreReport::default()
    };

    if !torn.is_empty() || !dangling.is_empty() {
        // A fenced store's partition has another owner by now: append nothing.
        store.check_open()?;
        // Mark the torn batches, then write again the valid values of the keys their
        // records touched: compaction would otherwise keep the torn record as the newest
        // of its key and delete the valid one before it.
        let compensation = {
            let store = store.clone();
            blocking(move || {
                dangling
                    .into_iter()
                    .map(|key| {
                        Ok(Mutation {
                            value: store.get(&key)?,
                            key,
                        })
                    })
                    .collect::<Result<Vec<_>, StateError>>()
            })
            .await?
        };
        let (writer, markers, rewrite) = {
            let (bootstrap, kafka) = (bootstrap.to_string(), kafka.clone());
            let (topic, torn, compensation) = (
                changelog_topic.to_string(),
                torn.clone(),
                compensation.clone(),
            );
            blocking(move || {
                let writer = ChangelogWriter::new(&bootstrap, &kafka)?;
                let markers = writer.enqueue_abort_markers(&topic, partition, &torn)?;
                let rewrite = writer.enqueue(&topic, partition, NO_TASK, &compensation)?;
                Ok((writer, markers, rewrite))
            })
            .await?
        };
        let acknowledged = tokio::time::timeout(options.stall_timeout, async {
            Ok::<_, StateError>([markers.wait().await?, rewrite.wait().await?])
        })
        .await
        .map_err(|_| {
            StateError::Timeout(format!(
                "restore of {changelog_topic}[{partition}]: abort markers not acknowledged \
                 within {:?}",
                options.stall_timeout
            ))
        })??;
        // Everything it sent is acknowledged. Dropping the writer (here, or on the error
        // paths above) closes its producer off the async workers.
        drop(writer);
        for last in acknowledged.into_iter().flatten() {
            report.next_offset = report.next_offset.max(last + 1);
        }
        report.abort_markers_written = torn.len() as u64;
        report.compensation_records_written = compensation.len() as u64;
        tracing::info!(
            store = store.label(),
            changelog = changelog_topic,
            partition,
            torn = torn.len(),
            rewritten_keys = compensation.len(),
            "marked torn changelog batches as aborted"
        );
    }

    // Fenced while the markers were on their way: the partition is no longer ours.
    store.check_open()?;
    store.forget_applied_below(options.min_source_offset);
    store.add_applied(&report.applied_source_offsets);
    report.elapsed = started.elapsed();
    metrics::histogram!(
        RESTORE_SECONDS,
        "subscription" => store.subscription().to_string(),
        "topic" => store.topic().to_string(),
        "partition" => store.partition().to_string(),
    )
    .record(report.elapsed.as_secs_f64());
    tracing::info!(
        store = store.label(),
        changelog = changelog_topic,
        partition,
        records = report.records_read,
        batches = report.batches_applied,
        compacted = report.compacted_batches_applied,
        torn = report.partial_batches_ignored,
        unframed = report.unframed_records,
        next_offset = report.next_offset,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "state restored"
    );
    Ok(report)
}

/// Whether a checkpoint written at `written_at_ms` (this host's clock) may still be
/// restored from at `now_ms`: it must have a time, be younger than `max_age`, and not lie
/// more than a minute in the future (a clock set back, or files from elsewhere).
fn checkpoint_is_fresh(written_at_ms: Option<u64>, now_ms: u64, max_age: Duration) -> bool {
    const CLOCK_SLACK_MS: u64 = 60_000;
    let Some(written) = written_at_ms else {
        return false;
    };
    if written > now_ms.saturating_add(CLOCK_SLACK_MS) {
        return false;
    }
    u128::from(now_ms.saturating_sub(written)) < max_age.as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_trusted_only_while_younger_than_its_max_age() {
        let hour = Duration::from_secs(3600);
        let now = 1_800_000_000_000u64;
        let ago = |d: Duration| Some(now - d.as_millis() as u64);
        assert!(checkpoint_is_fresh(ago(Duration::ZERO), now, hour));
        assert!(checkpoint_is_fresh(
            ago(hour - Duration::from_millis(1)),
            now,
            hour
        ));
        assert!(!checkpoint_is_fresh(ago(hour), now, hour));
        assert!(!checkpoint_is_fresh(ago(hour * 30), now, hour));
        // No time: written before checkpoints had one.
        assert!(!checkpoint_is_fresh(None, now, hour));
        // A little ahead is clock skew; far ahead is not this host's checkpoint.
        assert!(checkpoint_is_fresh(Some(now + 1_000), now, hour));
        assert!(!checkpoint_is_fresh(Some(now + 3_600_000), now, hour));
        // A max age of zero trusts nothing.
        assert!(!checkpoint_is_fresh(Some(now), now, Duration::ZERO));
    }
}
