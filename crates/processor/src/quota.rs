//! Per-key quota: keeping one busy key from delaying every other key.
//!
//! Each source partition counts the tasks of every key over a sliding window. A key whose
//! count passes its quota (`per_key_quota_processing_rate` tasks per second, a reloadable
//! property, times the window) is handed to the user's callback, which decides what
//! happens to the task: processed as usual, or *shaped* — produced unchanged to the
//! shaping topic (`<topic>-shaping` unless named), which the same subscription consumes at
//! its own rate. Nothing is dropped: a shaped task's source offset counts as done only
//! once the shaping record is acknowledged.
//!
//! A key's tasks stay in order across the two topics: the forward to the shaping topic
//! happens in the key's lane at the task's turn, and once a key has tasks in the shaping
//! topic not yet processed here, its later tasks follow them there ("sticky") until all
//! have been processed. See `docs/shaping.md` for what holds across a crash or rebalance.

use std::sync::Arc;
use std::time::Duration;

/// What to do with a task whose key is over its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaAction {
    /// Process it as usual, in the source partition.
    Process,
    /// Produce it to the shaping topic; it is processed from there.
    Shape,
}

/// A key found over its quota, as shown to the [`QuotaConfig::on_over_quota`] callback.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct QuotaUsage<'a> {
    /// The task's key.
    pub key: &'a [u8],
    /// The source partition the task was read from.
    pub partition: i32,
    /// The key's tasks in the last window, this one included (an estimate that may be a
    /// little high, never low).
    pub count: u64,
    /// The quota the count passed: tasks per window.
    pub limit: u64,
    /// The window the count and the limit are taken over.
    pub window: Duration,
}

type Decide = dyn Fn(&QuotaUsage<'_>) -> QuotaAction + Send + Sync;

/// Per-key quota of a subscription
/// ([`SubscriptionBuilder::per_key_quota`](crate::SubscriptionBuilder::per_key_quota)).
///
/// The quota itself is the property `per_key_quota_processing_rate`
/// (`decaton.per.key.quota.processing.rate`, tasks per second per key, -1 unlimited),
/// reloadable through [`LiveProperties`](crate::LiveProperties).
///
/// ```
/// use decaton_processor::{QuotaAction, QuotaConfig};
/// use std::time::Duration;
/// let quota = QuotaConfig::new()
///     .window(Duration::from_secs(2))
///     .shaping_rate(500)
///     .on_over_quota(|usage| {
///         if usage.key.starts_with(b"vip-") { QuotaAction::Process } else { QuotaAction::Shape }
///     });
/// # let _ = quota;
/// ```
#[derive(Clone)]
pub struct QuotaConfig {
    pub(crate) window: Duration,
    pub(crate) topic: Option<String>,
    pub(crate) shaping_rate: i64,
    pub(crate) max_shaped_keys: usize,
    pub(crate) decide: Arc<Decide>,
}

impl std::fmt::Debug for QuotaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaConfig")
            .field("window", &self.window)
            .field("topic", &self.topic)
            .field("shaping_rate", &self.shaping_rate)
            .field("max_shaped_keys", &self.max_shaped_keys)
            .finish_non_exhaustive()
    }
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl QuotaConfig {
    /// A window of 1 s, the shaping topic `<topic>-shaping` read without a rate limit, at
    /// most 100 000 keys shaped at once, and every key over quota shaped.
    pub fn new() -> Self {
        QuotaConfig {
            window: Duration::from_secs(1),
            topic: None,
            shaping_rate: -1,
            max_shaped_keys: 100_000,
            decide: Arc::new(|_| QuotaAction::Shape),
        }
    }

    /// The window over which a key's tasks are counted (default 1 s); the quota per
    /// window is the per-second quota times its length.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The shaping topic (default `<topic>-shaping`). It must exist, with as many
    /// partitions as the source topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Tasks per second each partition of the shaping topic may start: -1 unlimited
    /// (default), N at most N per second. Independent of the source topic's
    /// `processing_rate_per_partition`.
    pub fn shaping_rate(mut self, per_second: i64) -> Self {
        self.shaping_rate = per_second;
        self
    }

    /// How many keys may have shaped tasks outstanding at once in this instance (default
    /// 100 000). When that many are, a further key over quota is processed as usual
    /// (which keeps its order) and counted as `decaton_quota_shaping_full_total`.
    pub fn max_shaped_keys(mut self, keys: usize) -> Self {
        self.max_shaped_keys = keys;
        self
    }

    /// Decides what happens to a task whose key is over quota (default: shape it). It
    /// runs on the consumer thread for every such task, so it must be quick and must
    /// not block. If it panics, the task is shaped (and the panic logged).
    pub fn on_over_quota(
        mut self,
        decide: impl Fn(&QuotaUsage<'_>) -> QuotaAction + Send + Sync + 'static,
    ) -> Self {
        self.decide = Arc::new(decide);
        self
    }
}
