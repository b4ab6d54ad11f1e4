//! `decaton config check`: a good file passes and says what it found; a bad key is
//! reported with the file and line, and the exit status is non-zero.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_decaton");

const GOOD: &str = r#"[service]
http_addr = "127.0.0.1:9463"

[kafka]
"bootstrap.servers" = "127.0.0.1:9092"

[subscriptions.storage-mutation-processor]
topic = "chat-ops"
"decaton.partition.concurrency" = 8
"session.timeout.ms" = 10000
"#;

fn check(text: &str) -> anyhow::Result<(bool, String, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("svc.toml");
    std::fs::write(&path, text)?;
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "svc.toml"),
    ))
}

#[test]
fn a_good_file_passes() -> anyhow::Result<()> {
    let (ok, stdout, stderr) = check(GOOD)?;
    assert!(ok, "{stderr}");
    assert!(
        stdout
            .contains("subscription storage-mutation-processor: topic chat-ops on 127.0.0.1:9092"),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn a_bad_key_is_reported_with_file_and_line() -> anyhow::Result<()> {
    // A misspelt librdkafka setting on line 10.
    let (ok, _, stderr) = check(&GOOD.replace("session.timeout.ms", "sesion.timeout.ms"))?;
    assert!(!ok);
    assert!(
        stderr.contains("svc.toml:10: unknown key `sesion.timeout.ms`"),
        "{stderr}"
    );
    // A misspelt Decaton property on line 9.
    let (ok, _, stderr) = check(&GOOD.replace("partition.concurrency", "partition.concurrenc"))?;
    assert!(!ok);
    assert!(
        stderr.contains("svc.toml:9: unknown key `decaton.partition.concurrenc`"),
        "{stderr}"
    );
    // A bad value for a Decaton property.
    let (ok, _, stderr) = check(&GOOD.replace("= 8", "= \"eight\""))?;
    assert!(!ok);
    assert!(stderr.contains("svc.toml:9: "), "{stderr}");
    Ok(())
}

/// The files shipped with the examples are valid.
#[test]
fn the_example_configurations_pass() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN)
                .args(["config", "check"])
                .arg(&path)
                .output()?;
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} files in {}", dir.display());
    Ok(())
}

/// Runs `decaton config check svc.toml ARGS...` with `env` (and no other `DECATON_`
/// variable).
fn check_with(text: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("svc.toml");
    std::fs::write(&path, text)?;
    let mut command = Command::new(BIN);
    command.args(["config", "check"]).arg(&path).args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("DECATON_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let out = command.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "svc.toml"),
    ))
}

#[test]
fn a_misspelt_subscription_table_is_reported_given_the_binary_s_subscriptions() -> anyhow::Result<()>
{
    let misspelt = GOOD.replace(
        "[subscriptions.storage-mutation-processor]",
        "[subscriptions.storage-mutation-procesor]",
    );
    let expect = ["--subscription", "storage-mutation-processor"];
    let (ok, stderr) = check_with(&misspelt, &expect, &[])?;
    assert!(!ok);
    assert!(
        stderr.contains("svc.toml: no [subscriptions.storage-mutation-processor] table")
            && stderr.contains(
                "[subscriptions.storage-mutation-procesor] is not a subscription the binary \
                 runs (a misspelt [subscriptions.storage-mutation-processor]?)"
            ),
        "{stderr}"
    );
    let (ok, stderr) = check_with(GOOD, &expect, &[])?;
    assert!(ok, "{stderr}");
    Ok(())
}

#[test]
fn ignored_variables_are_warnings_and_other_services_variables_are_not_fatal() -> anyhow::Result<()>
{
    let (ok, stderr) = check_with(
        GOOD,
        &[],
        &[
            (
                "DECATON_SUBSCRIPTIONS__NOTIFICATION_PROCESSOR__TOPIC",
                "chat-messages",
            ),
            ("DECATON_KAFKA_BOOTSTRAP_SERVERS", "typo:1"),
        ],
    )?;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(
            "warning: environment variable DECATON_SUBSCRIPTIONS__NOTIFICATION_PROCESSOR__TOPIC \
             ignored: the file has no subscription NOTIFICATION_PROCESSOR"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "warning: unknown environment variable DECATON_KAFKA_BOOTSTRAP_SERVERS ignored \
             (did you mean DECATON_KAFKA__BOOTSTRAP_SERVERS?)"
        ),
        "{stderr}"
    );
    Ok(())
}
