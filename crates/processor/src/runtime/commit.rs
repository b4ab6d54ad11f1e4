//! Committing positions and offset maps.
//!
//! Each round commits every owned partition whose position or offset map changed since
//! its last successful commit. A commit that fails (synchronously, or later in the commit
//! callback) is forgotten, so the next round sends it again; the final commit of a
//! released partition is always sent.
//!
//! Whether the broker keeps commit metadata at all is learnt once: the first commit that
//! carries an offset map is synchronous and read back. A broker that drops metadata gets
//! position-only commits from then on (correct, less economical), with one warning.
//!
//! A failed commit is classified: *transient* (the coordinator is moving or loading, a
//! rebalance is under way, a timeout) is logged as a warning; *permanent* (refused as
//! sent: the group or topic is not authorised, the partition no longer exists) as an
//! error naming the positions that could not be committed. Both are counted
//! (`decaton_commit_failures_total`) and sent again next round: waiting is all a commit
//! can do, and a commit never passes an unfinished task, so nothing is lost; what a
//! permanent failure costs is re-running, after a restart, what finished since the last
//! commit that succeeded.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use decaton_protocol::failure::{classify, ErrorClass};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::topics::PartitionId;
use super::RuntimeCore;

/// The commit metadata of `e`, or empty when it is not UTF-8: rdkafka panics on such
/// metadata (any client may have written it), and a panic inside a rebalance callback
/// would abort the process.
pub(crate) fn commit_metadata(
    e: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>,
) -> String {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.metadata().to_string()))
        .unwrap_or_else(|_| {
            tracing::warn!(
                partition = e.partition(),
                "committed metadata is not UTF-8; ignored (position only)"
            );
            String::new()
        })
}

/// Whether sending the same commit again can succeed.
fn commit_error_class(error: &KafkaError) -> ErrorClass {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::OffsetMetadataTooLarge
            | RDKafkaErrorCode::InvalidCommitOffsetSize,
        ) => ErrorClass::Permanent,
        _ => classify(error),
    }
}

const UNKNOWN: u8 = 0;
const SUPPORTED: u8 = 1;
const UNSUPPORTED: u8 = 2;

/// Where the consumer starts when its committed offset is out of range
/// (`auto.offset.reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OffsetReset {
    /// The log start (`earliest`, the runtime's default).
    Earliest,
    /// The log end (`latest`).
    Latest,
}

impl OffsetReset {
    /// The reset `auto.offset.reset=value` asks for (unset: the runtime's default,
    /// earliest); none for `error` or a value librdkafka will refuse.
    pub(crate) fn parse(value: Option<&str>) -> Option<OffsetReset> {
        match value.map(str::trim) {
            None | Some("earliest" | "smallest" | "beginning") => Some(OffsetReset::Earliest),
            Some("latest" | "largest" | "end") => Some(OffsetReset::Latest),
            Some(_) => None,
        }
    }
}

/// Commit settings and what was learnt about the broker.
pub(crate) struct Committer {
    offset_map: bool,
    max_bytes: usize,
    metadata_support: AtomicU8,
    offset_reset: Option<OffsetReset>,
}

impl Committer {
    pub(crate) fn new(offset_map: bool, max_bytes: usize) -> Self {
        Committer {
            offset_map,
            max_bytes,
            metadata_support: AtomicU8::new(UNKNOWN),
            offset_reset: Some(OffsetReset::Earliest),
        }
    }

    /// Uses the consumer's `auto.offset.reset` setting (if the user gave one).
    pub(crate) fn with_offset_reset(mut self, value: Option<&str>) -> Self {
        self.offset_reset = OffsetReset::parse(value);
        self
    }

    /// Where a committed offset past the log end moves to; none when the consumer is set
    /// to fail instead.
    pub(crate) fn offset_reset(&self) -> Option<OffsetReset> {
        self.offset_reset
    }

    fn map_bytes(&self) -> Option<usize> {
        (self.offset_map && self.metadata_support.load(Ordering::Acquire) != UNSUPPORTED)
            .then_some(self.max_bytes)
    }
}

impl<T: Send + 'static> RuntimeCore<T> {
    /// Commits the owned partitions (only `only`, when given) whose position or offset map
    /// changed.
    pub(crate) fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        mode: CommitMode,
        only: Option<&[PartitionId]>,
    ) {
        let map_bytes = self.committer.map_bytes();
        let mut tpl = TopicPartitionList::new();
        let mut sent: Vec<(PartitionId, (i64, String))> = Vec::new();
        {
            let parts = self.partitions.lock();
            for ctx in parts.contexts() {
                let id = ctx.core().id();
                if only.is_some_and(|o| !o.contains(&id)) {
                    continue;
                }
                let Some(commit) = ctx.commit_candidate(map_bytes) else {
                    continue;
                };
                let (topic, p) = (self.topics.name(id), id.partition);
                if tpl
                    .add_partition_offset(topic, p, Offset::Offset(commit.0))
                    .is_ok()
                {
                    if let Some(mut e) = tpl.find_partition(topic, p) {
                        e.set_metadata(commit.1.clone());
                    }
                    sent.push((id, commit));
                }
            }
        }
        if sent.is_empty() {
            return;
        }
        let probe = (self.committer.metadata_support.load(Ordering::Acquire) == UNKNOWN)
            .then(|| sent.iter().find(|(_, c)| !c.1.is_empty()).cloned())
            .flatten();
        let mode = if probe.is_some() {
            CommitMode::Sync
        } else {
            mode
        };
        let result = consumer.commit(&tpl, mode);
        let positions: Vec<(i32, i64)> = sent.iter().map(|(p, c)| (p.partition, c.0)).collect();
        {
            let mut parts = self.partitions.lock();
            for (p, commit) in sent {
                if let Some(ctx) = parts.get_mut(p) {
                    match &result {
                        Ok(()) => {
                            let position = commit.0;
                            ctx.committed(commit);
                            if matches!(mode, CommitMode::Sync) {
                                ctx.confirmed(position);
                            }
                        }
                        Err(_) => ctx.forget_committed(),
                    }
                }
            }
        }
        if let Err(e) = result {
            if e.rdkafka_error_code() == Some(RDKafkaErrorCode::OffsetMetadataTooLarge) {
                self.committer
                    .metadata_support
                    .store(UNSUPPORTED, Ordering::Release);
                tracing::warn!(subscription = %self.recorder.subscription(),
                    "the broker refuses offset maps of this size (offset.metadata.max.bytes); \
                     committing positions only — lower offset_map_max_bytes to keep the map");
            } else {
                self.commit_failed(&e, &positions);
            }
            return;
        }
        if let Some((partition, (_, sent))) = probe {
            self.probe_metadata_support(consumer, partition, &sent);
        }
    }

    fn probe_metadata_support<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        id: PartitionId,
        sent: &str,
    ) {
        let (topic, partition) = (self.topics.name(id), id.partition);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(back) => {
                let got = back
                    .find_partition(topic, partition)
                    .map(|e| commit_metadata(&e))
                    .unwrap_or_default();
                let support = if got.is_empty() {
                    UNSUPPORTED
                } else {
                    SUPPORTED
                };
                self.committer
                    .metadata_support
                    .store(support, Ordering::Release);
                if support == UNSUPPORTED {
                    tracing::warn!(subscription = %self.recorder.subscription(),
                        "the broker does not return offset-commit metadata; offset map disabled, committing positions only \
                         (tasks finished above the position will run again after a partition moves)");
                } else if got != sent {
                    tracing::debug!("committed metadata changed since the probe commit");
                }
            }
            Err(e) => tracing::debug!("could not read back committed offsets: {e}"),
        }
    }

    /// Logs and counts a failed commit of `positions` ((partition, offset) pairs).
    fn commit_failed(&self, e: &KafkaError, positions: &[(i32, i64)]) {
        let class = commit_error_class(e);
        self.recorder.commit_failed(class);
        match class {
            ErrorClass::Transient => tracing::warn!(subscription = %self.recorder.subscription(),
                ?positions, "commit failed, sent again next round: {e}"),
            ErrorClass::Permanent => tracing::error!(subscription = %self.recorder.subscription(),
                ?positions, "commit refused: {e}; these positions are sent again every round, \
                 and a restart runs again what finished since the last commit that succeeded"),
        }
    }

    /// The commit callback: record confirmed positions; forget failed asynchronous
    /// commits (the whole request, or single partitions in it) so they are sent again.
    pub(crate) fn on_commit_result(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let Err(e) = result else {
            let mut parts = self.partitions.lock();
            for e in offsets.elements() {
                let Some(id) = self.topics.id(e.topic(), e.partition()) else {
                    continue;
                };
                let Some(ctx) = parts.get_mut(id) else {
                    continue;
                };
                match (e.error(), e.offset()) {
                    (Ok(()), Offset::Offset(o)) => ctx.confirmed(o),
                    (Ok(()), _) => {}
                    (Err(err), offset) => {
                        ctx.forget_committed();
                        let position = match offset {
                            Offset::Offset(o) => o,
                            _ => -1,
                        };
                        self.commit_failed(&err, &[(e.partition(), position)]);
                    }
                }
            }
            return;
        };
        let positions: Vec<(i32, i64)> = offsets
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.partition(), o),
                _ => (e.partition(), -1),
            })
            .collect();
        self.commit_failed(&e, &positions);
        let mut parts = self.partitions.lock();
        for id in self.topics.ids_in(offsets) {
            if let Some(ctx) = parts.get_mut(id) {
                ctx.forget_committed();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit the coordinator refuses as sent is permanent (logged as an error); one
    /// that waiting can fix is transient.
    #[test]
    fn commit_errors_are_classified() {
        let commit = |code| KafkaError::ConsumerCommit(code);
        for code in [
            RDKafkaErrorCode::GroupAuthorizationFailed,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownPartition,
            RDKafkaErrorCode::OffsetMetadataTooLarge,
        ] {
            assert_eq!(
                commit_error_class(&commit(code)),
                ErrorClass::Permanent,
                "{code:?}"
            );
        }
        for code in [
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::NotCoordinator,
            RDKafkaErrorCode::CoordinatorLoadInProgress,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert_eq!(
                commit_error_class(&commit(code)),
                ErrorClass::Transient,
                "{code:?}"
            );
        }
    }
}
