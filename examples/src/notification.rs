//! Push notifications: one network call per message, nothing shared between users.
//!
//! [`NotificationProcessor`] handles `SEND_MESSAGE` operations by "sending a push
//! notification" to the target — an async wait of a few milliseconds standing in for the
//! call to a push gateway — and ignores every other operation type. Each task spends its
//! time waiting on I/O, so the more tasks in flight the better: run it in `per_key` mode,
//! where every user with work gets a lane of its own while each user's notifications still
//! go out in the order they were sent.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_processor::{async_trait, ProcessError, ProcessingContext, TaskProcessor};
use decaton_protocol::{ChatOp, OpType};

/// What the notification processor did so far.
#[derive(Debug, Default)]
pub struct NotificationStats {
    /// Notifications "sent".
    pub sent: AtomicU64,
    /// Operations that need no notification.
    pub ignored: AtomicU64,
}

impl NotificationStats {
    /// A one-line summary.
    pub fn summary(&self) -> String {
        format!(
            "notifications sent {} ignored {}",
            self.sent.load(Ordering::Relaxed),
            self.ignored.load(Ordering::Relaxed)
        )
    }
}

/// Sends a (simulated) push notification for every `SEND_MESSAGE`.
#[derive(Debug, Clone)]
pub struct NotificationProcessor {
    latency_ms: RangeInclusive<u64>,
    stats: Arc<NotificationStats>,
}

impl NotificationProcessor {
    /// A processor whose push call takes a random time in `latency_ms` milliseconds.
    pub fn new(latency_ms: RangeInclusive<u64>) -> Self {
        NotificationProcessor {
            latency_ms,
            stats: Arc::default(),
        }
    }

    /// Live counters (shared with every clone).
    pub fn stats(&self) -> Arc<NotificationStats> {
        self.stats.clone()
    }
}

#[async_trait]
impl TaskProcessor<ChatOp> for NotificationProcessor {
    async fn process(&self, _ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
        if op.op() != OpType::SendMessage {
            self.stats.ignored.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // The push gateway call: `user_id` sent a message to `target_id`.
        let ms = if self.latency_ms.is_empty() {
            0
        } else {
            rand::random_range(self.latency_ms.clone())
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        tracing::trace!(from = %op.user_id, to = %op.target_id, sequence = op.sequence, "push notification sent");
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decaton_processor::testing::{ProcessorTester, TaskResult};

    /// Only `SEND_MESSAGE` sends a notification; everything completes.
    #[tokio::test]
    async fn notifies_only_for_messages() {
        let processor = NotificationProcessor::new(0..=1);
        let stats = processor.stats();
        let tester = ProcessorTester::new(processor);
        for (i, kind) in [OpType::SendMessage, OpType::Read, OpType::SendMessage]
            .into_iter()
            .enumerate()
        {
            let op = ChatOp {
                user_id: "u".into(),
                op: kind as i32,
                sequence: i as u64,
                ..Default::default()
            };
            let out = tester.process(Some(b"u"), op).await;
            assert_eq!(out.result, TaskResult::Completed);
            assert!(!out.deferred);
        }
        assert_eq!(stats.sent.load(Ordering::Relaxed), 2);
        assert_eq!(stats.ignored.load(Ordering::Relaxed), 1);
    }
}
