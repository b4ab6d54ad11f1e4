//! The numbers a run produces, and how several runs are summarised.

use serde::{Deserialize, Serialize};

/// Latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Mean.
    pub avg: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl LatencyStats {
    /// Statistics of latencies given in microseconds, sorted ascending.
    pub(crate) fn from_sorted_micros(sorted: &[i64]) -> LatencyStats {
        if sorted.is_empty() {
            return LatencyStats::default();
        }
        let ms = |us: i64| us as f64 / 1_000.0;
        let rank = |p: f64| {
            let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted
                .get(idx.clamp(1, sorted.len()) - 1)
                .copied()
                .unwrap_or_default()
        };
        let sum: i128 = sorted.iter().map(|&v| v as i128).sum();
        LatencyStats {
            avg: sum as f64 / sorted.len() as f64 / 1_000.0,
            p50: ms(rank(50.0)),
            p99: ms(rank(99.0)),
            max: ms(sorted.last().copied().unwrap_or_default()),
        }
    }
}

/// The figures of one measured window (or the median of several).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Tasks in the window (warmup excluded).
    pub tasks: u64,
    /// Length of the window in seconds.
    pub duration_secs: f64,
    /// Measured tasks per second of the window.
    pub throughput_per_sec: f64,
    /// Delivery latency (consumer runs: produce timestamp to processing start) or
    /// acknowledgement latency (producer runs: send to broker ack), in ms.
    pub latency_ms: LatencyStats,
    /// CPU time (user + system) the whole process spent in the window, seconds.
    pub cpu_secs: f64,
    /// `cpu_secs` per measured task, microseconds.
    pub cpu_micros_per_task: f64,
    /// Peak resident set size of the process (`ru_maxrss`) at the end of the window, KiB.
    pub peak_rss_kib: u64,
    /// lanes × partitions / simulated latency, when the runner has a bounded number of
    /// lanes and a latency is simulated.
    pub ideal_throughput_per_sec: Option<f64>,
    /// Throughput as a percentage of the ideal.
    pub pct_of_ideal: Option<f64>,
    /// Consumer runs: produce timestamp to the end of processing, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_latency_ms: Option<LatencyStats>,
    /// The mean simulated latency the tasks actually slept, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_latency_achieved_ms: Option<f64>,
    /// Throughput as a percentage of the ideal computed with the achieved latency: what
    /// is left is the runner's own overhead, not the timer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pct_of_ideal_achieved: Option<f64>,
    /// Resident set size sampled while the runner ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss: Option<RssSamples>,
    /// Open-loop runs (`decaton bench latency`): the rate the tasks were put at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offered_per_sec: Option<f64>,
}

/// Resident set size sampled every 100 ms while a runner ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RssSamples {
    /// Median over the second half of the run (the steady state once the backlog is
    /// being drained), KiB.
    pub steady_kib: u64,
    /// Largest sample, KiB.
    pub max_kib: u64,
}

impl RssSamples {
    /// From samples in time order; `None` without samples.
    pub(crate) fn of(samples: &[u64]) -> Option<RssSamples> {
        let max_kib = *samples.iter().max()?;
        let mut second: Vec<u64> = samples.iter().skip(samples.len() / 2).copied().collect();
        second.sort_unstable();
        Some(RssSamples {
            steady_kib: second.get(second.len() / 2).copied().unwrap_or(max_kib),
            max_kib,
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let at = |i: usize| v.get(i).copied().unwrap_or_default();
    if n % 2 == 1 {
        at(n / 2)
    } else {
        (at(n / 2 - 1) + at(n / 2)) / 2.0
    }
}

impl Figures {
    /// Each figure's median over `runs` (one run gives itself back).
    pub fn median(runs: &[Figures]) -> Figures {
        if let [one] = runs {
            return *one;
        }
        let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
        let opt = |f: fn(&Figures) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        Figures {
            tasks: runs.first().map(|r| r.tasks).unwrap_or(0),
            duration_secs: m(|r| r.duration_secs),
            throughput_per_sec: m(|r| r.throughput_per_sec),
            latency_ms: LatencyStats {
                avg: m(|r| r.latency_ms.avg),
                p50: m(|r| r.latency_ms.p50),
                p99: m(|r| r.latency_ms.p99),
                max: m(|r| r.latency_ms.max),
            },
            cpu_secs: m(|r| r.cpu_secs),
            cpu_micros_per_task: m(|r| r.cpu_micros_per_task),
            peak_rss_kib: runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0),
            ideal_throughput_per_sec: opt(|r| r.ideal_throughput_per_sec),
            pct_of_ideal: opt(|r| r.pct_of_ideal),
            complete_latency_ms: runs
                .iter()
                .all(|r| r.complete_latency_ms.is_some())
                .then(|| {
                    let c = |f: fn(&LatencyStats) -> f64| {
                        median(
                            runs.iter()
                                .filter_map(|r| r.complete_latency_ms.as_ref().map(f))
                                .collect(),
                        )
                    };
                    LatencyStats {
                        avg: c(|l| l.avg),
                        p50: c(|l| l.p50),
                        p99: c(|l| l.p99),
                        max: c(|l| l.max),
                    }
                }),
            simulated_latency_achieved_ms: opt(|r| r.simulated_latency_achieved_ms),
            offered_per_sec: opt(|r| r.offered_per_sec),
            pct_of_ideal_achieved: opt(|r| r.pct_of_ideal_achieved),
            rss: runs.iter().all(|r| r.rss.is_some()).then(|| RssSamples {
                steady_kib: median(
                    runs.iter()
                        .filter_map(|r| r.rss.map(|s| s.steady_kib as f64))
                        .collect(),
                ) as u64,
                max_kib: runs
                    .iter()
                    .filter_map(|r| r.rss.map(|s| s.max_kib))
                    .max()
                    .unwrap_or(0),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<i64> = (1..=100).map(|i| i * 1_000).collect();
        let s = LatencyStats::from_sorted_micros(&v);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.max, 100.0);
        assert!((s.avg - 50.5).abs() < 1e-9);
        assert_eq!(
            LatencyStats::from_sorted_micros(&[]),
            LatencyStats::default()
        );
    }

    #[test]
    fn median_of_runs() {
        let f = |t: f64| Figures {
            throughput_per_sec: t,
            pct_of_ideal: Some(t),
            peak_rss_kib: t as u64,
            ..Figures::default()
        };
        let m = Figures::median(&[f(1.0), f(3.0), f(2.0)]);
        assert_eq!(m.throughput_per_sec, 2.0);
        assert_eq!(m.pct_of_ideal, Some(2.0));
        assert_eq!(m.peak_rss_kib, 3);
    }
}
