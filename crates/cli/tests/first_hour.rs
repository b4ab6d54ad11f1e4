//! What a newcomer runs into first: every command that talks to Kafka takes the broker the
//! same way (`-b`/`--bootstrap` or `DECATON_BOOTSTRAP`), a misspelt variable is named with
//! the one meant, and typos fail instead of looking like success: a missing topic for
//! `put`, an unknown group for `lag`, an unknown kind for `dlq replay`.

use std::process::{Command, Output};
use std::time::Duration;

use decaton_testkit::{BrokerKind, TestBroker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

const BIN: &str = env!("CARGO_BIN_EXE_decaton");

fn decaton(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut command = Command::new(BIN);
    command.args(args).env("RUST_LOG", "warn");
    for (name, _) in std::env::vars() {
        if name.starts_with("DECATON_") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    Ok(command.output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_command_that_talks_to_kafka_takes_b_and_decaton_bootstrap() -> anyhow::Result<()> {
    for command in [
        &["put"][..],
        &["tail"],
        &["lag"],
        &["dlq", "list"],
        &["dlq", "replay"],
        &["replicate"],
        &["bench"],
    ] {
        let out = decaton(&[command, &["--help"]].concat(), &[])?;
        let help = text(&out.stdout);
        assert!(out.status.success(), "{command:?}: {}", text(&out.stderr));
        assert!(help.contains("-b, --bootstrap"), "{command:?}: {help}");
        assert!(
            help.contains("[env: DECATON_BOOTSTRAP"),
            "{command:?}: {help}"
        );
    }
    Ok(())
}

#[test]
fn a_misspelt_variable_is_named_with_the_closest_known_one() -> anyhow::Result<()> {
    let out = decaton(
        &["replicate", "--config", "/nonexistent/replicator.toml"],
        &[
            ("DECATON_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
            ("DECATON_BOOTSTRAP", "127.0.0.1:1"),
        ],
    )?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "unknown environment variable DECATON_KAFKA_BOOTSTRAP_SERVERS ignored \
             (did you mean DECATON_KAFKA__BOOTSTRAP_SERVERS?)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("variable DECATON_BOOTSTRAP "), "{stderr}");
    Ok(())
}

#[test]
fn dlq_replay_refuses_an_unknown_kind_and_lists_the_valid_ones() -> anyhow::Result<()> {
    let out = decaton(
        &[
            "dlq",
            "replay",
            "-b",
            "127.0.0.1:1",
            "--topic",
            "orders-dlq",
            "--kind",
            "bogus",
        ],
        &[],
    )?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid value 'bogus'")
            && stderr.contains("error, retry, permanent, panic, timeout, leaked, discarded"),
        "{stderr}"
    );
    Ok(())
}

/// Whether the broker lists `topic`, asked so that the question cannot create it.
fn listed(bootstrap: &str, topic: &str) -> anyhow::Result<bool> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(30))?;
    Ok(metadata.topics().iter().any(|t| t.name() == topic))
}

#[test]
fn put_refuses_a_missing_topic_unless_asked_to_create_it() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("chat-ops", 1)?;
    let bootstrap = broker.bootstrap_servers();
    let put = |topic: &str, extra: &[&str]| {
        decaton(
            &[
                &[
                    "put", "-b", &bootstrap, "--topic", topic, "--key", "u1", "--json", "{}",
                ][..],
                extra,
            ]
            .concat(),
            &[],
        )
    };
    let out = put("chat-opz", &[])?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        stderr.contains(&format!("topic chat-opz does not exist on {bootstrap}"))
            && stderr.contains("--create-topic"),
        "{stderr}"
    );
    assert!(
        !listed(&bootstrap, "chat-opz")?,
        "the refused put created it"
    );

    let out = put("chat-ops", &[])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = put("chat-opz", &["--create-topic"])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(listed(&bootstrap, "chat-opz")?);
    Ok(())
}

#[test]
fn lag_of_a_group_that_committed_nothing_fails_naming_it() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("chat-ops", 2)?;
    let bootstrap = broker.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    producer
        .send(BaseRecord::to("chat-ops").key("k").payload(&b""[..]))
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;

    let out = decaton(
        &[
            "lag",
            "no-such-group",
            "-b",
            &bootstrap,
            "--topic",
            "chat-ops",
        ],
        &[],
    )?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        stderr.contains(
            "group no-such-group has no committed offset on any of the 2 partitions of chat-ops"
        ),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn against_an_unreachable_broker_each_command_fails_within_its_timeout_naming_it(
) -> anyhow::Result<()> {
    use std::process::Stdio;
    use std::time::Instant;

    let broker = "127.0.0.1:1";
    let commands: [&[&str]; 4] = [
        &[
            "put", "-b", broker, "--topic", "chat-ops", "--key", "u1", "--json", "{}",
        ],
        &["lag", "talk", "-b", broker, "--topic", "chat-ops"],
        &["dlq", "list", "-b", broker, "--topic", "chat-ops-dlq"],
        &["tail", "-b", broker, "--topic", "chat-ops"],
    ];
    let started = Instant::now();
    let mut children = Vec::new();
    for args in commands {
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn,librdkafka=off,rdkafka::client=off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        children.push((args, child));
    }
    // The default --timeout is 10 s; allow for a loaded machine, but far less than the
    // 15 to 30 s the commands used to take.
    let deadline = started + Duration::from_secs(14);
    for (args, mut child) in children {
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "decaton {args:?} still running after {:?}",
                    started.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
        }
        assert!(!status.success(), "{args:?}");
        assert!(
            stderr.contains(&format!("from {broker}")) && stderr.contains("--timeout"),
            "{args:?}: {stderr}"
        );
    }
    Ok(())
}
