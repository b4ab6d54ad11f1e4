//! Waiting for a condition in a test without sleeping for a guessed time.

use std::time::{Duration, Instant};

/// Checks `done` every 20 ms until it holds or `within` has passed; returns whether it
/// held. For conditions on shared in-memory state (counters, logs) that another task or
/// thread updates: the test goes on as soon as the condition holds, and a deadline keeps
/// a broken run from hanging.
pub async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}
