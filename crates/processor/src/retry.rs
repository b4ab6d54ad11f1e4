//! What happens to a task that fails: retried in the lane, retried through the retry
//! topic, or kept in a dead-letter topic.
//!
//! Without a [`RetryConfig`] or a [`DeadLetterConfig`], a failed task is logged, counted
//! in `decaton_tasks_failed_total` and completed: its offset is committed and the task is
//! not run again. See `docs/failures.md` for the whole failure model.

use std::time::Duration;

use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder};

/// How long to wait before the n-th retry.
///
/// ```
/// use std::time::Duration;
/// use decaton_processor::Backoff;
///
/// let fixed = Backoff::fixed(Duration::from_secs(1));
/// assert_eq!(fixed.delay(0), Duration::from_secs(1));
/// assert_eq!(fixed.delay(5), Duration::from_secs(1));
///
/// let exp = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10)).without_jitter();
/// assert_eq!(exp.delay(0), Duration::from_millis(100));
/// assert_eq!(exp.delay(1), Duration::from_millis(200));
/// assert_eq!(exp.delay(20), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    kind: BackoffKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BackoffKind {
    Fixed(Duration),
    Exponential {
        initial: Duration,
        max: Duration,
        jitter: bool,
    },
}

impl Backoff {
    /// The same delay before every retry.
    pub fn fixed(delay: Duration) -> Self {
        Backoff {
            kind: BackoffKind::Fixed(delay),
        }
    }

    /// `initial`, doubling on each retry up to `max`, plus a random jitter of up to the
    /// delay itself (so retries of many tasks that failed together spread out): a delay
    /// with jitter is never shorter than the delay without it, nor longer than twice it.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff {
            kind: BackoffKind::Exponential {
                initial,
                max,
                jitter: true,
            },
        }
    }

    /// The same backoff without random jitter.
    pub fn without_jitter(mut self) -> Self {
        if let BackoffKind::Exponential { jitter, .. } = &mut self.kind {
            *jitter = false;
        }
        self
    }

    /// The delay before retry number `retry` (0 for the first retry), in whole
    /// milliseconds.
    pub fn delay(&self, retry: u32) -> Duration {
        let n = retry as usize;
        match self.kind {
            BackoffKind::Fixed(d) => ConstantBuilder::new()
                .with_delay(d)
                .without_max_times()
                .build()
                .nth(n)
                .unwrap_or(d),
            BackoffKind::Exponential {
                initial,
                max,
                jitter,
            } => {
                let builder = ExponentialBuilder::new()
                    .with_min_delay(initial)
                    .with_max_delay(max)
                    .without_max_times();
                let builder = if jitter {
                    builder.with_jitter()
                } else {
                    builder
                };
                // Whole milliseconds: the factor is a float, and a scheduled time is in ms.
                let d = builder.build().nth(n).unwrap_or(max);
                Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }
        }
    }

    /// The longest delay this backoff ever gives (jitter included).
    pub(crate) fn longest(&self) -> Duration {
        match self.kind {
            BackoffKind::Fixed(d) => d,
            BackoffKind::Exponential {
                initial,
                max,
                jitter,
            } => {
                let base = max.max(initial);
                if jitter {
                    base * 2
                } else {
                    base
                }
            }
        }
    }
}

/// Retrying failed tasks, in two stages.
///
/// 1. **In the lane** ([`in_process`](Self::in_process)): `process` is called again after
///    a short backoff, holding the task's key, so a brief hiccup costs no round trip.
/// 2. **Through the retry topic** (on by default): the task is produced to the retry topic
///    (`<topic>-retry` unless [`topic`](Self::topic) says otherwise) with the same key,
///    `retry_count + 1` and `scheduled_time_millis = now + backoff` in its `dt_meta`
///    header, exactly as Decaton does, so Decaton processors and this one read each
///    other's retry records. The subscription consumes the retry topic too. The original
///    offset counts as done only once the broker has acknowledged the retry record: a
///    crash between the two runs the task again rather than losing it.
///
/// A task that still fails after [`max_retries`](Self::max_retries) retries through the
/// topic, or fails with [`ProcessError::permanent`](crate::ProcessError::permanent), goes
/// to the dead-letter topic if the subscription has one; otherwise it is logged, counted
/// and completed.
///
/// The retry topic must exist, created like the source topic (same partition count).
/// A retried task runs after tasks of its key that came after it: order per key is kept
/// within each topic, not across the two.
///
/// ```
/// use std::time::Duration;
/// use decaton_processor::{Backoff, RetryConfig};
///
/// let retry = RetryConfig::new()
///     .backoff(Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60)))
///     .max_retries(5)
///     .in_process(2, Backoff::fixed(Duration::from_millis(50)));
/// ```
#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub(crate) topic: Option<String>,
    pub(crate) queue: bool,
    pub(crate) backoff: Backoff,
    pub(crate) max_retries: u32,
    pub(crate) in_process_attempts: u32,
    pub(crate) in_process_backoff: Backoff,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            topic: None,
            queue: true,
            backoff: Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60)),
            max_retries: 5,
            in_process_attempts: 0,
            in_process_backoff: Backoff::fixed(Duration::from_millis(50)),
        }
    }
}

impl RetryConfig {
    /// Retries through `<topic>-retry`, up to 5 times, backing off exponentially from 1 s
    /// to 60 s; no retry in the lane.
    pub fn new() -> Self {
        Self::default()
    }

    /// The retry topic (default `<source topic>-retry`, Decaton's name).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The delay before each retry through the retry topic.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How many times a task is retried through the retry topic before it is given up
    /// (dead-lettered, or dropped when there is no dead-letter topic).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Calls `process` again up to `attempts` times in the lane, `backoff` apart, before
    /// the task goes to the retry topic. Meant for short transient errors: the key's
    /// next tasks wait meanwhile. Applies to errors returned by `process` (and panics),
    /// not to deferred tasks that fail later.
    pub fn in_process(mut self, attempts: u32, backoff: Backoff) -> Self {
        self.in_process_attempts = attempts;
        self.in_process_backoff = backoff;
        self
    }

    /// Retries only in the lane: no retry topic.
    pub fn without_queue(mut self) -> Self {
        self.queue = false;
        self
    }
}

/// Keeping tasks that cannot be processed in a dead-letter topic.
///
/// A task that fails for good (retries exhausted, a permanent error, or any failure when
/// there is no retry topic) is produced to the dead-letter topic (`<topic>-dlq` unless
/// [`topic`](Self::topic) says otherwise) with its original key, value and headers, plus
/// the headers of [`decaton_protocol::dead_letter`] saying why and where from. Its offset
/// counts as done only once the broker has acknowledged the dead-letter record. The
/// topic must exist. `decaton dlq list` and `decaton dlq replay` read it back.
///
/// ```
/// use decaton_processor::DeadLetterConfig;
///
/// let dlq = DeadLetterConfig::new().topic("chat-ops-parked");
/// ```
#[derive(Debug, Clone, Default)]
pub struct DeadLetterConfig {
    pub(crate) topic: Option<String>,
}

impl DeadLetterConfig {
    /// Dead-letters into `<source topic>-dlq`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The dead-letter topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_never_shortens_a_delay_nor_more_than_doubles_it() {
        let plain = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5))
            .without_jitter();
        let jittered = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5));
        for retry in 0..12 {
            let base = plain.delay(retry);
            for _ in 0..50 {
                let d = jittered.delay(retry);
                assert!(
                    d >= base && d <= base * 2,
                    "retry {retry}: {d:?} vs {base:?}"
                );
                assert!(d <= jittered.longest());
            }
        }
        assert_eq!(plain.delay(30), Duration::from_secs(5));
    }
}
