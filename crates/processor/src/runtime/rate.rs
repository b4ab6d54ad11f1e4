//! The processing rate of one partition (`processing_rate_per_partition`).
//!
//! The rate gates *dispatch*, on the consumer thread: a record goes to a lane only with a
//! token from the partition's token bucket (governor's GCRA). Without one it waits in the
//! partition's overflow queue, the partition counts as throttled (so fetching pauses once
//! `max_pending` records wait, never buffering without bound), and the consumer thread
//! comes back when the next token is due. No lane waits for a token. The bucket holds a
//! tenth of a second's worth, so a partition slows smoothly instead of bursting.
//!
//! Rate 0 stops the partition: nothing is dispatched, and tasks already queued in its
//! lanes do not start either (the pipeline holds them at their start, reading the live
//! value directly) until the rate changes again.
//!
//! Each topic of a subscription has its own rate: `processing_rate_per_partition` for
//! the source topic, `retry_processing_rate_per_partition` for the retry topic,
//! `QuotaConfig::shaping_rate` for the shaping topic. Tasks released from the delay
//! queue take a token like fetched ones.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A partition's rate gate.
pub(crate) struct PartitionRate {
    rate: i64,
    limiter: Option<DefaultDirectRateLimiter>,
}

/// Whether a record may be dispatched now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Open,
    /// Try again after this long.
    Wait(Duration),
    /// Rate 0: not until the rate changes.
    Stopped,
}

impl PartitionRate {
    pub(crate) fn new(rate: i64) -> Self {
        let mut r = PartitionRate {
            rate: -1,
            limiter: None,
        };
        r.set(rate);
        r
    }

    /// Applies a new rate (a no-op when it did not change).
    pub(crate) fn set(&mut self, rate: i64) {
        if rate == self.rate {
            return;
        }
        self.rate = rate;
        self.limiter = u32::try_from(rate)
            .ok()
            .and_then(NonZeroU32::new)
            .map(|per_second| {
                let burst = NonZeroU32::new((per_second.get() / 10).max(1)).unwrap_or(per_second);
                RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
            });
    }

    /// Takes a token if one is available.
    /// Whether the rate is 0: no task starts.
    pub(crate) fn is_stopped(&self) -> bool {
        self.rate == 0
    }

    pub(crate) fn take(&self) -> Gate {
        if self.rate == 0 {
            return Gate::Stopped;
        }
        match &self.limiter {
            None => Gate::Open,
            Some(l) => match l.check() {
                Ok(()) => Gate::Open,
                // The limiter's own clock: instants of another clock are not comparable.
                Err(not_until) => Gate::Wait(not_until.wait_time_from(l.clock().now())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_stopped_and_limited() {
        assert_eq!(PartitionRate::new(-1).take(), Gate::Open);
        let stopped = PartitionRate::new(0);
        assert_eq!(stopped.take(), Gate::Stopped);
        // 100/s: a burst of 10, then a wait of about 10 ms per token.
        let r = PartitionRate::new(100);
        let open = (0..50).take_while(|_| r.take() == Gate::Open).count();
        assert_eq!(open, 10);
        match r.take() {
            Gate::Wait(d) => assert!(d <= Duration::from_millis(11), "{d:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_change_of_rate_replaces_the_bucket() {
        let mut r = PartitionRate::new(0);
        assert_eq!(r.take(), Gate::Stopped);
        r.set(1000);
        assert_eq!(r.take(), Gate::Open);
        r.set(-1);
        assert!((0..10_000).all(|_| r.take() == Gate::Open));
    }
}
