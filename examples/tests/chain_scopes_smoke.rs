//! Runs the chain-scopes example on small sizes: it must exit successfully, every
//! operation accounted for, with lane writers made again after the lanes changed.

use std::process::Command;

#[test]
fn chain_scopes_runs_every_operation_through_the_chain() -> anyhow::Result<()> {
    // The binary gives up on its own after 60 s per phase.
    let out = Command::new(env!("CARGO_BIN_EXE_chain-scopes"))
        .args(["--tasks", "3000", "--users", "100", "--partitions", "2"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("3000 ops:"))
        .ok_or_else(|| anyhow::anyhow!("no summary in {stdout}"))?;
    // "3000 ops: R reads completed at stage 1, S superseded by compaction, W written; lane
    // writers made: B while on 1 lane, A in all"
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let [_, reads, _, superseded, written, before, _, all] = numbers[..] else {
        anyhow::bail!("unexpected summary {summary}");
    };
    assert_eq!(reads + superseded + written, 3000, "{summary}");
    assert_eq!(reads, 1000, "{summary}");
    assert!(
        all > before,
        "no lane writers made after the change: {summary}"
    );
    Ok(())
}
