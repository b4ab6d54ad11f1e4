//! SIGTERM and SIGINT (Ctrl-C).

#[cfg(unix)]
use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGINT's number.
pub(crate) const SIGINT: i32 = 2;
/// SIGTERM's number.
pub(crate) const SIGTERM: i32 = 15;

/// Both signals, listened to from creation on (a signal that arrives between two
/// [`Signals::next`] calls is not lost).
pub(crate) struct Signals {
    #[cfg(unix)]
    terminate: Signal,
    #[cfg(unix)]
    interrupt: Signal,
}

impl Signals {
    pub(crate) fn listen() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            Ok(Signals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// The number of the next signal received.
    pub(crate) async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => SIGTERM,
                _ = self.interrupt.recv() => SIGINT,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            SIGINT
        }
    }
}

/// The signal's number (for the exit code 128 + number).
pub(crate) fn number(signal: i32) -> i32 {
    signal
}
