//! Runs the flow-control example on a small backlog: it must exit successfully with every
//! operation stored, in batches no larger than the configured 50.

use std::process::Command;

#[test]
fn flow_control_stores_every_operation_in_bounded_batches() -> anyhow::Result<()> {
    // The binary gives up on its own after 60 s.
    let out = Command::new(env!("CARGO_BIN_EXE_flow-control"))
        .args(["--tasks", "1500"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // "1500 operations: A/s at rate 100 per partition, B/s after the file said -1; N
    // batches, largest L"
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("1500 operations:"))
        .ok_or_else(|| anyhow::anyhow!("no summary in {stdout}"))?;
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let [.., batches, largest] = numbers[..] else {
        anyhow::bail!("unexpected summary {summary}");
    };
    assert!((1..=50).contains(&largest), "{summary}");
    assert!(batches >= 1500 / 50, "{summary}");
    Ok(())
}
