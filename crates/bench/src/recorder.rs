//! The recorder every runner reports to: when each task started and finished, and the
//! process's resource usage at the edges of the measured window.
//!
//! Runners call [`Recorder::started`] when processing of a task begins (with the task's
//! delivery latency) and [`Recorder::finished`] when it is done. The recorder numbers
//! tasks in the order they start and finish:
//!
//! * the **window** opens when the first measured task starts (start number = warmup)
//!   and closes when the last task finishes; at both edges it takes the time and
//!   `getrusage(RUSAGE_SELF)`. Every measured task runs entirely inside it, so a runner
//!   can never look faster than it is (warmup tasks still running when the window opens
//!   only add to its length);
//! * a task's **latency** is kept when it is among the measured tasks in start order
//!   (start number ≥ warmup);
//! * once every task has finished, [`Recorder::wait_complete`] returns, which is the
//!   runners' cue to stop.
//!
//! Everything is lock-free (atomics and `OnceLock`), so recording costs the runners a few
//! atomic operations per task.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::figures::{Figures, LatencyStats};
use crate::BenchError;

/// Resource usage of this process so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// User plus system CPU time of every thread.
    pub cpu: Duration,
    /// Peak resident set size, KiB.
    pub max_rss_kib: u64,
}

/// `getrusage(RUSAGE_SELF)`: CPU time (user + sys) and peak RSS of the whole process.
#[allow(unsafe_code)]
pub(crate) fn usage() -> Usage {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a valid, zero-initialised `rusage` that outlives the call;
    // getrusage only writes into it. RUSAGE_SELF cannot fail with a valid pointer, and
    // should it ever return an error the zeroed struct is still a valid `rusage`, so
    // `assume_init` is sound either way.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv =
        |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1_000);
    Usage {
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        // Linux reports ru_maxrss in KiB (macOS in bytes).
        max_rss_kib: if cfg!(target_os = "macos") {
            ru.ru_maxrss as u64 / 1024
        } else {
            ru.ru_maxrss as u64
        },
    }
}

/// Resident set size of this process now, KiB (`/proc/self/statm`); `None` where there
/// is no procfs.
pub(crate) fn current_rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects; it returns -1 for an unknown name.
    #[allow(unsafe_code)]
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()? / 1024)
}

/// Samples [`current_rss_kib`] every 100 ms until dropped; at most one sample per
/// 100 ms of run, so a day-long run keeps under a million.
pub(crate) async fn sample_rss(samples: &std::sync::Mutex<Vec<u64>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if let Some(kib) = current_rss_kib() {
            samples.lock().unwrap_or_else(|p| p.into_inner()).push(kib);
        }
    }
}

/// Wall-clock microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    usage: Usage,
}

impl Mark {
    fn now() -> Mark {
        Mark {
            at: Instant::now(),
            usage: usage(),
        }
    }
}

const NO_LATENCY: i64 = i64::MIN;

/// Collects the figures of one run; shared by the runner's tasks behind an `Arc`.
pub(crate) struct Recorder {
    warmup: u64,
    total: u64,
    started: AtomicU64,
    finished: AtomicU64,
    latencies_us: Box<[AtomicI64]>,
    /// Produce to end of processing, by finish order.
    complete_us: Box<[AtomicI64]>,
    /// Simulated latency actually slept, summed over the measured tasks, and how many.
    slept_us: AtomicU64,
    slept: AtomicU64,
    window_start: OnceLock<Mark>,
    window_end: OnceLock<Mark>,
    complete: watch::Sender<bool>,
    /// Woken when the first task finishes.
    first: tokio::sync::Notify,
}

impl Recorder {
    /// A recorder for `warmup` unmeasured then `tasks` measured tasks.
    pub fn new(warmup: u64, tasks: u64) -> Recorder {
        let (complete, _) = watch::channel(false);
        Recorder {
            first: tokio::sync::Notify::new(),
            warmup,
            total: warmup + tasks,
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            latencies_us: (0..tasks).map(|_| AtomicI64::new(NO_LATENCY)).collect(),
            complete_us: (0..tasks).map(|_| AtomicI64::new(NO_LATENCY)).collect(),
            slept_us: AtomicU64::new(0),
            slept: AtomicU64::new(0),
            window_start: OnceLock::new(),
            window_end: OnceLock::new(),
            complete,
        }
    }

    /// Opens the window now, unless it is open already (the producer benchmark opens it
    /// at the first measured send rather than at its acknowledgement).
    pub fn open_window(&self) {
        let _ = self.window_start.get_or_init(Mark::now);
    }

    /// A task starts processing; `latency_us` is how long ago it was produced.
    pub fn started(&self, latency_us: i64) {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        if n == self.warmup {
            self.open_window();
        }
        if n >= self.warmup {
            if let Some(slot) = self.latencies_us.get((n - self.warmup) as usize) {
                slot.store(latency_us.max(0), Ordering::Relaxed);
            }
        }
    }

    /// A task slept `d` of simulated latency (counted once the window is open).
    pub fn slept(&self, d: Duration) {
        if self.window_start.get().is_some() {
            self.slept_us
                .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
            self.slept.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A task has finished processing, `latency_us` after it was produced. Returns
    /// whether it was the last one.
    pub fn finished_after(&self, latency_us: i64) -> bool {
        let n = self.finished.load(Ordering::Relaxed);
        let last = self.finished();
        // Finish order is approximate under concurrency; only the distribution matters.
        if let Some(slot) = n
            .checked_sub(self.warmup)
            .and_then(|i| self.complete_us.get(i as usize))
        {
            slot.store(latency_us.max(0), Ordering::Relaxed);
        }
        last
    }

    /// A task has finished processing. Returns whether it was the last one.
    pub fn finished(&self) -> bool {
        let n = self.finished.fetch_add(1, Ordering::AcqRel) + 1;
        if n == 1 {
            self.first.notify_waiters();
        }
        if n == self.total {
            let _ = self.window_end.get_or_init(Mark::now);
            self.complete.send_replace(true);
        }
        n >= self.total
    }

    /// Tasks finished so far (warmup included).
    pub fn finished_count(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
    }

    /// Warmup plus measured tasks.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether every task has finished.
    pub fn is_complete(&self) -> bool {
        *self.complete.borrow()
    }

    /// Resolves once a task has finished.
    pub async fn wait_first_finished(&self) {
        let notified = self.first.notified();
        tokio::pin!(notified);
        // Registered before the check, so a finish in between is not missed.
        notified.as_mut().enable();
        if self.finished_count() == 0 {
            notified.await;
        }
    }

    /// Resolves once every task has finished.
    pub async fn wait_complete(&self) {
        let mut rx = self.complete.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// The figures of the measured window; `ideal` is the ideal throughput, if the runner
    /// has one, at the `nominal` simulated latency.
    pub fn figures(&self, ideal: Option<f64>, nominal: Duration) -> Result<Figures, BenchError> {
        let (Some(start), Some(end)) = (self.window_start.get(), self.window_end.get()) else {
            return Err(BenchError::Incomplete {
                finished: self.finished_count(),
                expected: self.total,
            });
        };
        let tasks = self.total - self.warmup;
        let duration = end.at.saturating_duration_since(start.at);
        let secs = duration.as_secs_f64().max(1e-9);
        let throughput = tasks as f64 / secs;
        let mut lat: Vec<i64> = self
            .latencies_us
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&v| v != NO_LATENCY)
            .collect();
        lat.sort_unstable();
        let mut complete: Vec<i64> = self
            .complete_us
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&v| v != NO_LATENCY)
            .collect();
        complete.sort_unstable();
        let slept = self.slept.load(Ordering::Relaxed);
        let achieved_ms =
            (slept > 0).then(|| self.slept_us.load(Ordering::Relaxed) as f64 / slept as f64 / 1e3);
        // The ideal had each task taken the latency it actually slept.
        let ideal_achieved = match (ideal, achieved_ms) {
            (Some(i), Some(a)) if a > 0.0 => Some(i * nominal.as_secs_f64() * 1e3 / a),
            _ => None,
        };
        let cpu = end.usage.cpu.saturating_sub(start.usage.cpu);
        Ok(Figures {
            tasks,
            duration_secs: duration.as_secs_f64(),
            throughput_per_sec: throughput,
            latency_ms: LatencyStats::from_sorted_micros(&lat),
            cpu_secs: cpu.as_secs_f64(),
            cpu_micros_per_task: if tasks == 0 {
                0.0
            } else {
                cpu.as_secs_f64() * 1e6 / tasks as f64
            },
            peak_rss_kib: end.usage.max_rss_kib.max(usage().max_rss_kib),
            ideal_throughput_per_sec: ideal,
            pct_of_ideal: ideal.filter(|i| *i > 0.0).map(|i| throughput / i * 100.0),
            complete_latency_ms: (!complete.is_empty())
                .then(|| LatencyStats::from_sorted_micros(&complete)),
            simulated_latency_achieved_ms: achieved_ms,
            pct_of_ideal_achieved: ideal_achieved
                .filter(|i| *i > 0.0)
                .map(|i| throughput / i * 100.0),
            rss: None,
            offered_per_sec: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiter for the first finish is woken by it, and one that comes later returns at
    /// once.
    #[tokio::test]
    async fn the_first_finish_wakes_its_waiter() {
        let r = std::sync::Arc::new(Recorder::new(0, 3));
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_first_finished().await }
        });
        tokio::task::yield_now().await;
        r.finished();
        let woken = tokio::time::timeout(Duration::from_secs(10), waiter).await;
        assert!(matches!(woken, Ok(Ok(()))), "woken: {woken:?}");
        let later = tokio::time::timeout(Duration::from_secs(10), r.wait_first_finished()).await;
        assert!(later.is_ok(), "a later waiter returns at once");
    }

    #[test]
    fn window_and_latencies_exclude_the_warmup() {
        let r = Recorder::new(2, 3);
        for lat in [1_000_000, 2_000_000, 1_000, 2_000, 3_000] {
            r.started(lat);
            r.finished();
        }
        assert!(r.is_complete());
        let f = r
            .figures(Some(10.0), Duration::from_millis(100))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.tasks, 3);
        assert_eq!(f.latency_ms.max, 3.0);
        assert_eq!(f.latency_ms.p50, 2.0);
        assert!((f.latency_ms.avg - 2.0).abs() < 1e-9);
        assert!(f.pct_of_ideal.is_some());
    }

    #[test]
    fn incomplete_runs_have_no_figures() {
        let r = Recorder::new(0, 2);
        r.started(0);
        r.finished();
        assert!(!r.is_complete());
        assert!(r.figures(None, Duration::ZERO).is_err());
    }

    #[test]
    fn usage_moves_forward() {
        let a = usage();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = usage();
        assert!(b.cpu >= a.cpu);
        assert!(b.max_rss_kib > 0);
    }
}
