//! Runs the chain-scopes example on small sizes: it must exit successfully, every
//! operation accounted for, with lane writers made again after the lanes changed.

mod common;

#[test]
fn chain_scopes_runs_every_operation_through_the_chain() -> anyhow::Result<()> {
    // The binary gives up on its own after 60 s per phase.
    // "3000 ops: R reads completed at stage 1, S superseded by compaction, W written; lane
    // writers made: B while on 1 lane, A in all"
    let (summary, numbers) = common::example_summary(
        env!("CARGO_BIN_EXE_chain-scopes"),
        &["--tasks", "3000", "--users", "100", "--partitions", "2"],
        "3000 ops:",
    )?;
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
