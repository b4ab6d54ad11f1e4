//! Recording what a processor ran, for the order and loss checker.
//!
//! [`Recorded`] wraps any `TaskProcessor<ChatOp>`: before delegating it appends the task's
//! (key, sequence, instance) to a shared [`Recording`], in the order tasks start. After
//! the run, [`Recording::check`] hands the log to
//! [`decaton_testkit::checker::check`], which reports lost tasks, duplicates and per-key
//! order violations against what the producer sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
use decaton_protocol::ChatOp;
use decaton_testkit::{CheckReport, Processed};
use parking_lot::Mutex;

/// The log of processed tasks, in processing-start order.
#[derive(Debug, Default)]
pub struct Recording {
    log: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    entries: Vec<Processed>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Recording {
    /// An empty recording with room for `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        Recording {
            log: Mutex::new(Log {
                entries: Vec::with_capacity(capacity),
                ..Default::default()
            }),
        }
    }

    /// Entries so far.
    pub fn len(&self) -> usize {
        self.log.lock().entries.len()
    }

    /// When the first and the latest recorded task started.
    pub fn span(&self) -> Option<(Instant, Instant)> {
        let log = self.log.lock();
        log.first.zip(log.last)
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the log against `expected` (key -> tasks produced for it).
    pub fn check(&self, expected: &HashMap<String, u64>) -> CheckReport {
        decaton_testkit::checker::check(expected, &self.log.lock().entries)
    }
}

/// A processor that records every task it starts, then runs the inner processor.
pub struct Recorded<P> {
    inner: P,
    instance: String,
    recording: Arc<Recording>,
}

impl<P> Recorded<P> {
    /// Wraps `inner`, recording into `recording` under `instance` (the process run).
    pub fn new(inner: P, instance: impl Into<String>, recording: Arc<Recording>) -> Self {
        Recorded {
            inner,
            instance: instance.into(),
            recording,
        }
    }
}

#[async_trait]
impl<P: TaskProcessor<ChatOp>> TaskProcessor<ChatOp> for Recorded<P> {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let entry = Processed {
            key: task.user_id.clone(),
            sequence: task.sequence,
            instance: self.instance.clone(),
        };
        {
            let now = Instant::now();
            let mut log = self.recording.log.lock();
            log.entries.push(entry);
            log.first.get_or_insert(now);
            log.last = Some(now);
        }
        self.inner.process(ctx, task).await
    }
}
