//! The example binaries take the broker the way every decaton-rs binary does
//! (`-b`/`--bootstrap`, `DECATON_BOOTSTRAP`), name a misspelt `DECATON_` variable, and a
//! service given a file without its subscription says which tables the file has.

use std::process::{Command, Output};

use decaton_testkit::{BrokerKind, TestBroker};

fn example(bin: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = Command::new(bin);
    command.args(args).env("RUST_LOG", "warn");
    for (name, _) in std::env::vars() {
        if name.starts_with("DECATON_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    Ok(command.output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_example_binary_that_talks_to_kafka_takes_b() -> anyhow::Result<()> {
    for (bin, extra) in [
        (env!("CARGO_BIN_EXE_talk-server"), "[env: DECATON_BOOTSTRAP"),
        (
            env!("CARGO_BIN_EXE_notification-processor"),
            "--subscription",
        ),
        (env!("CARGO_BIN_EXE_search-indexer"), "--subscription"),
        (
            env!("CARGO_BIN_EXE_storage-mutation-processor"),
            "--subscription",
        ),
        (env!("CARGO_BIN_EXE_user-counters"), "--subscription"),
    ] {
        let out = example(bin, &["--help"], &[])?;
        let help = text(&out.stdout);
        assert!(out.status.success(), "{bin}: {}", text(&out.stderr));
        assert!(help.contains("-b, --bootstrap"), "{bin}: {help}");
        assert!(help.contains(extra), "{bin}: {help}");
    }
    Ok(())
}

#[test]
fn talk_server_reads_decaton_bootstrap_and_names_a_misspelt_variable() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("chat-ops", 1)?;
    let bootstrap = broker.bootstrap_servers();
    let out = example(
        env!("CARGO_BIN_EXE_talk-server"),
        &["--count", "10", "--rate", "0"],
        &[
            ("DECATON_BOOTSTRAP", &bootstrap),
            ("DECATON_BOOTSTRAPS", "127.0.0.1:1"),
        ],
    )?;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "unknown environment variable DECATON_BOOTSTRAPS ignored (did you mean \
             DECATON_BOOTSTRAP?)"
        ),
        "{stderr}"
    );
    // Without a broker named anywhere it refuses at once instead of trying a default.
    let out = example(env!("CARGO_BIN_EXE_talk-server"), &["--count", "1"], &[])?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--bootstrap"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_service_without_its_subscription_names_the_tables_the_file_has() -> anyhow::Result<()> {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/chat-messages-notifier.toml"
    );
    let out = example(
        env!("CARGO_BIN_EXE_notification-processor"),
        &["--config", config, "-b", "127.0.0.1:1"],
        &[],
    )?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "no [subscriptions.notification-processor] table (it has: \
             [subscriptions.chat-messages-notifier])"
        ) && stderr.contains("--subscription"),
        "{stderr}"
    );
    Ok(())
}
