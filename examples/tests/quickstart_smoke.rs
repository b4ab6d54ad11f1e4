//! Runs the quickstart binary end to end on small sizes: it must exit successfully and
//! report both subscriptions' checks as OK.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn quickstart_processes_everything_in_order() -> anyhow::Result<()> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .args([
            "--tasks",
            "2000",
            "--users",
            "200",
            "--partitions",
            "3",
            "--timeout-secs",
            "90",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // Read stdout to its end (the child exiting closes it); a guard against a hang, not
    // a synchronisation: the child has its own --timeout-secs.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let out = match rx.recv_timeout(Duration::from_secs(150)) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            anyhow::bail!("quickstart did not finish in 150s");
        }
    };
    let status = child.wait()?;
    let err = err_reader.join().unwrap_or_default();
    assert!(
        status.success(),
        "quickstart failed ({status}):\n{out}\nstderr:\n{err}"
    );
    for sub in ["notifications", "storage-mutations"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(sub) && l.contains("2000"))
            .ok_or_else(|| anyhow::anyhow!("no summary row for {sub}:\n{out}"))?;
        assert!(row.trim_end().ends_with("OK"), "{sub} not OK: {row}\n{out}");
    }
    assert!(out.contains("result: OK"), "{out}");
    Ok(())
}
