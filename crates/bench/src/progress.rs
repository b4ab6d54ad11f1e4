//! Progress bars on stderr (indicatif), and the watchdog that ends a stalled run.
//!
//! Bars are drawn only when enabled (text output) and stderr is a terminal, so piped
//! output and `--format json` stay clean.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::recorder::Recorder;
use crate::BenchError;

/// One progress bar, or nothing when progress is off.
pub(crate) struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `len` steps labelled `prefix`; hidden unless `enabled` and stderr is a TTY.
    pub fn new(enabled: bool, len: u64, prefix: impl Into<String>) -> Progress {
        let target = if enabled && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:>32.bold} [{bar:30}] {human_pos}/{human_len} elapsed {elapsed} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(prefix.into());
        Progress { bar }
    }

    /// Sets the position.
    pub fn set(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Updates `progress` from `recorder` while the run lasts, and returns an error when no
/// task finishes for `stall_timeout`. Once the run is complete it keeps the bar full and
/// never returns, so racing it against the run ends with the run's own result.
pub(crate) async fn stall_watch(
    recorder: &Recorder,
    progress: &Progress,
    stall_timeout: Duration,
) -> BenchError {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, mut last_change) = (recorder.finished_count(), Instant::now());
    loop {
        tick.tick().await;
        let now = recorder.finished_count();
        progress.set(now);
        if recorder.is_complete() {
            return std::future::pending().await;
        }
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() >= stall_timeout {
            return BenchError::Stalled {
                finished: now,
                expected: recorder.total(),
                idle: stall_timeout,
            };
        }
    }
}
