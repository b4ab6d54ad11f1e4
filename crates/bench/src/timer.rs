//! A sleep precise to about 0.1 ms, for the simulated processing latency.
//!
//! tokio's timer wheel has a 1 ms resolution and rounds a sleep up to the next tick, so a
//! 10 ms `tokio::time::sleep` lasts about 11 ms: a simulated latency would then cost
//! every runner ~10 % of its ideal throughput before any framework overhead. Here one
//! thread keeps the pending deadlines in a heap and waits on a condition variable until
//! the nearest one (the kernel's high-resolution timers, tens of microseconds of slack),
//! then wakes the sleeping task through a oneshot channel.
//!
//! The heap holds one entry per task sleeping at that moment, so it is bounded by the
//! runner's concurrency.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
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

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::new(Timer {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("bench-timer".into())
            .spawn(move || t.run())
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the benchmark timer thread: {e}"));
        t
    })
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

/// Sleeps for `d`, waking within about 0.1 ms of the deadline; returns how long it
/// actually slept.
pub(crate) async fn sleep(d: Duration) -> Duration {
    let started = Instant::now();
    let (wake, woken) = oneshot::channel();
    {
        let t = timer();
        let mut q = t.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.seq += 1;
        let seq = q.seq;
        let at = started + d;
        let earliest = q.heap.peek().is_none_or(|Reverse(e)| at < e.at);
        q.heap.push(Reverse(Entry { at, seq, wake }));
        if earliest {
            t.changed.notify_one();
        }
    }
    let _ = woken.await;
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sleeps_at_least_the_duration() {
        let long = tokio::spawn(sleep(Duration::from_millis(30)));
        let short = tokio::spawn(sleep(Duration::from_millis(5)));
        let short = short.await.unwrap_or_default();
        assert!(short >= Duration::from_millis(5), "{short:?}");
        let long = long.await.unwrap_or_default();
        assert!(long >= Duration::from_millis(30), "{long:?}");
    }
}
