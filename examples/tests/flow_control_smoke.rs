//! Runs the flow-control example on a small backlog: it must exit successfully with every
//! operation stored, in batches no larger than the configured 50.

mod common;

#[test]
fn flow_control_stores_every_operation_in_bounded_batches() -> anyhow::Result<()> {
    // The binary gives up on its own after 60 s.
    // "1500 operations: A/s at rate 100 per partition, B/s after the file said -1; N
    // batches, largest L"
    let (summary, numbers) = common::example_summary(
        env!("CARGO_BIN_EXE_flow-control"),
        &["--tasks", "1500"],
        "1500 operations:",
    )?;
    let [.., batches, largest] = numbers[..] else {
        anyhow::bail!("unexpected summary {summary}");
    };
    assert!((1..=50).contains(&largest), "{summary}");
    assert!(batches >= 1500 / 50, "{summary}");
    Ok(())
}
