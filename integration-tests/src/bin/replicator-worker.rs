//! A replicator process for the kill tests: runs the configuration file named by its only
//! argument, as `decaton replicate --config FILE` does, until SIGKILL, or SIGTERM (then it
//! finishes the records in flight and commits).

use anyhow::Context as _;
use decaton_replicator::ReplicatorBuilder;

fn main() -> anyhow::Result<()> {
    decaton_integration_tests::init_tracing();
    let path = std::env::args()
        .nth(1)
        .context("usage: replicator-worker CONFIG")?;
    let replicator = ReplicatorBuilder::from_file(&path)?.build()?;
    let handle = replicator.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut running = tokio::spawn(replicator.run());
        tokio::select! {
            r = &mut running => { r??; }
            _ = terminate.recv() => {
                handle.shutdown();
                running.await??;
            }
        }
        anyhow::Ok(())
    })
}
