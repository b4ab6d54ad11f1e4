//! Benchmark harness (being written).

/// Arguments of `decaton bench` (placeholder until the harness lands).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchCommand {}

/// Runs `decaton bench` with parsed arguments.
pub fn run_cli(_cmd: BenchCommand) -> anyhow::Result<()> {
    anyhow::bail!("decaton bench is not built yet")
}
