//! A sleep precise to about 0.1 ms, for the simulated processing latency.
//!
//! tokio's timer wheel has a 1 ms resolution and rounds a sleep up to the next tick, so a
//! 10 ms `tokio::time::sleep` lasts about 11 ms: a simulated latency would then cost
//! every runner ~10 % of its ideal throughput before any framework overhead. Here one
//! thread keeps the pending deadlines in a heap and waits on a condition variable until
//! the nearest one (the kernel's high-resolution timers, with the thread's timer slack
//! set to its minimum), then wakes the sleeping task through a oneshot channel.
//!
//! Waking the timer thread, then the worker, then polling the task still takes time:
//! about 0.2 ms on a busy 2-core host, and more the busier it is. So the timer learns
//! how late sleeping tasks actually resume (a moving average of resume time minus
//! deadline) and fires that much before the deadline. A single sleep may then end a
//! little before or after its duration; the mean of many is the duration, which is what
//! a simulated latency is for. The recorder reports the mean actually slept.
//!
//! The heap holds one entry per task sleeping at that moment, so it is bounded by the
//! runner's concurrency.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

struct Entry {
    at: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
}

struct Timer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

#[allow(
    clippy::panic,
    reason = "a benchmark cannot time anything without its timer thread"
)]
fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::new(Timer {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("bench-timer".into())
            .spawn(move || {
                least_timer_slack();
                t.run()
            })
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the benchmark timer thread: {e}"));
        t
    })
}

/// Asks the kernel to wake this thread as close to its deadlines as it can (the default
/// slack lets it wake up to 50 µs late). Best effort: without it the timer only learns a
/// larger lead.
fn least_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only this
    // thread's timer slack; no memory is passed.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// How long before its deadline a sleep is woken, in nanoseconds: the moving average of
/// how late sleeps resumed (never negative, never more than [`MAX_LEAD`]).
static LEAD_NS: AtomicI64 = AtomicI64::new(0);

/// The longest lead the timer learns (and never more than half of a sleep).
const MAX_LEAD: Duration = Duration::from_millis(2);

/// Each resume moves the lead by this fraction of how late (or early) it was.
const LEAD_GAIN: i64 = 16;

/// The lead after a sleep aimed at `lead` resumed `error_ns` after its deadline (negative
/// when before).
fn learn(lead: i64, error_ns: i64) -> i64 {
    (lead + error_ns / LEAD_GAIN).clamp(0, MAX_LEAD.as_nanos() as i64)
}

impl Timer {
    fn run(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            while q.heap.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = q.heap.pop() {
                    let _ = e.wake.send(());
                }
            }
            q = match q.heap.peek() {
                Some(Reverse(e)) => {
                    let wait = e.at.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(q, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(q).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// Sleeps for about `d` (see the module doc: the mean of many sleeps is `d`); returns how
/// long it actually slept.
pub(crate) async fn sleep(d: Duration) -> Duration {
    let started = Instant::now();
    let deadline = started + d;
    let lead = Duration::from_nanos(LEAD_NS.load(Ordering::Relaxed).unsigned_abs()).min(d / 2);
    let (wake, woken) = oneshot::channel();
    {
        let t = timer();
        let mut q = t.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.seq += 1;
        let seq = q.seq;
        let at = deadline - lead;
        let earliest = q.heap.peek().is_none_or(|Reverse(e)| at < e.at);
        q.heap.push(Reverse(Entry { at, seq, wake }));
        if earliest {
            t.changed.notify_one();
        }
    }
    let _ = woken.await;
    let resumed = Instant::now();
    let error_ns = if resumed >= deadline {
        (resumed - deadline).as_nanos() as i64
    } else {
        -((deadline - resumed).as_nanos() as i64)
    };
    let _ = LEAD_NS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |lead| {
        Some(learn(lead, error_ns))
    });
    resumed - started
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_wakes_before_half_the_duration() {
        let long = tokio::spawn(sleep(Duration::from_millis(30)));
        let short = tokio::spawn(sleep(Duration::from_millis(5)));
        let short = short.await.unwrap_or_default();
        assert!(short >= Duration::from_micros(2_500), "{short:?}");
        let long = long.await.unwrap_or_default();
        assert!(long >= Duration::from_millis(15), "{long:?}");
    }

    #[test]
    fn the_lead_follows_how_late_sleeps_resume_within_its_bounds() {
        // Resuming 200 µs late again and again: the lead approaches 200 µs.
        let mut lead = 0;
        for _ in 0..200 {
            let aimed = lead;
            lead = learn(lead, 200_000 - aimed);
        }
        assert!((190_000..=200_000).contains(&lead), "{lead}");
        // Early resumes bring it back down, never below zero.
        assert_eq!(learn(1_000, -1_000_000), 0);
        // Nor above the cap, however late.
        assert_eq!(learn(0, i64::MAX / 2), MAX_LEAD.as_nanos() as i64);
    }
}
