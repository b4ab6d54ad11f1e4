//! The `decaton` binary as an operator runs it, against an embedded broker: `put` tasks,
//! `tail` them back with their metadata, survive records that are not tasks, and use
//! `dev-broker` as the cluster.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context as _;
use decaton_protocol::{now_millis, METADATA_HEADER};
use decaton_testkit::{BrokerKind, TestBroker};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_decaton");

/// Longest any single command may take before the test gives up on it.
const TIMEOUT: Duration = Duration::from_secs(120);

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Reads a pipe to its end on a thread; the receiver gets the text once the pipe closes.
fn collect(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    rx
}

fn spawn(args: &[&str]) -> anyhow::Result<Child> {
    Ok(Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Runs `decaton args...` to completion (killing it after [`TIMEOUT`]).
fn run(args: &[&str]) -> anyhow::Result<Finished> {
    let mut child = spawn(args)?;
    let stdout = collect(child.stdout.take().context("stdout")?);
    let stderr = collect(child.stderr.take().context("stderr")?);
    // The pipes close when the process exits.
    let (stdout, stderr) = match (stdout.recv_timeout(TIMEOUT), stderr.recv_timeout(TIMEOUT)) {
        (Ok(out), Ok(err)) => (out, err),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("decaton {args:?} did not finish within {TIMEOUT:?}");
        }
    };
    Ok(Finished {
        status: child.wait()?,
        stdout,
        stderr,
    })
}

/// Runs `decaton args...` and returns its stdout, failing unless it exits successfully.
fn run_ok(args: &[&str]) -> anyhow::Result<String> {
    let done = run(args)?;
    anyhow::ensure!(
        done.status.success(),
        "decaton {args:?} failed ({}): {}",
        done.status,
        done.stderr
    );
    Ok(done.stdout)
}

/// `partition=P offset=O` as printed by `put`.
fn parse_delivery(stdout: &str) -> anyhow::Result<(i64, i64)> {
    let line = stdout.trim();
    let rest = line
        .strip_prefix("partition=")
        .with_context(|| format!("unexpected put output {line:?}"))?;
    let (partition, offset) = rest
        .split_once(" offset=")
        .with_context(|| format!("unexpected put output {line:?}"))?;
    Ok((partition.parse()?, offset.parse()?))
}

#[test]
fn put_then_tail_shows_both_tasks_with_their_metadata() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("chat-ops", 3)?;
    let bootstrap = broker.bootstrap_servers();
    let before = now_millis();

    let first = parse_delivery(&run_ok(&[
        "put",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "chat-ops",
        "--key",
        "u1",
        "--json",
        r#"{"user_id":"u1","op":"OP_TYPE_SEND_MESSAGE","target_id":"room-1","payload":"aGVsbG8=","sequence":3}"#,
        "--application-id",
        "talk-server",
        "--instance-id",
        "talk-1",
        "--scheduled-at-ms",
        "1900000000000",
    ])?)?;
    let second = parse_delivery(&run_ok(&[
        "put",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "chat-ops",
        "--key",
        "u2",
        "--json",
        r#"{"user_id":"u2","op":"OP_TYPE_ADD_FRIEND","targetId":"u1","payload":"/wA=","sequence":"7","created_at_millis":42}"#,
        "-X",
        "linger.ms=0",
    ])?)?;
    let after = now_millis();

    let out = run_ok(&[
        "tail",
        "--bootstrap",
        &bootstrap,
        "--topic",
        "chat-ops",
        "--from-beginning",
        "--count",
        "2",
        "--format",
        "json",
    ])?;
    let lines: Vec<Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2, "tail output: {out}");
    let by_key = |key: &str| {
        lines
            .iter()
            .find(|l| l["key"] == key)
            .with_context(|| format!("no {key} in {out}"))
    };

    let u1 = by_key("u1")?;
    assert_eq!(
        (u1["partition"].as_i64(), u1["offset"].as_i64()),
        (Some(first.0), Some(first.1))
    );
    assert_eq!(u1["topic"], "chat-ops");
    let meta = &u1["metadata"];
    assert_eq!(meta["source_application_id"], "talk-server");
    assert_eq!(meta["source_instance_id"], "talk-1");
    assert_eq!(meta["retry_count"], 0);
    assert_eq!(meta["scheduled_time_millis"], 1_900_000_000_000i64);
    let created = meta["timestamp_millis"]
        .as_i64()
        .context("timestamp_millis")?;
    assert!(
        (before..=after).contains(&created),
        "timestamp {created} outside [{before}, {after}]"
    );
    assert_eq!(
        u1["task"],
        serde_json::json!({"user_id":"u1","op":"OP_TYPE_SEND_MESSAGE","target_id":"room-1","payload":"aGVsbG8=","sequence":3,"created_at_millis":0})
    );

    let u2 = by_key("u2")?;
    assert_eq!(
        (u2["partition"].as_i64(), u2["offset"].as_i64()),
        (Some(second.0), Some(second.1))
    );
    assert_eq!(u2["metadata"]["source_application_id"], "decaton-cli");
    assert_eq!(u2["metadata"]["scheduled_time_millis"], 0);
    assert_ne!(u2["metadata"]["source_instance_id"], "");
    assert_eq!(
        u2["task"],
        serde_json::json!({"user_id":"u2","op":"OP_TYPE_ADD_FRIEND","target_id":"u1","payload":"/wA=","sequence":7,"created_at_millis":42})
    );
    Ok(())
}

#[test]
fn tail_reports_records_that_are_not_tasks_and_goes_on() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("mixed", 1)?;
    let bootstrap = broker.bootstrap_servers();

    // 1. Raw bytes that are no ChatOp (not even valid protobuf) land unchanged.
    let raw = tempfile::NamedTempFile::new()?;
    std::fs::write(raw.path(), [0xff, 0x00, 0x01])?;
    let path = raw.path().to_str().context("temp path")?;
    run_ok(&[
        "put", "-b", &bootstrap, "--topic", "mixed", "--key", "k", "--file", path,
    ])?;

    // 2. A record whose dt_meta header is garbage, written by a plain producer.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    producer
        .send(
            BaseRecord::to("mixed")
                .key("k")
                .payload(&b"whatever"[..])
                .headers(OwnedHeaders::new().insert(Header {
                    key: METADATA_HEADER,
                    value: Some(&[0xffu8][..]),
                })),
        )
        .map_err(|(e, _)| e)?;
    producer.flush(TIMEOUT)?;

    // 3. A good task after it.
    run_ok(&[
        "put",
        "-b",
        &bootstrap,
        "--topic",
        "mixed",
        "--key",
        "k",
        "--json",
        r#"{"user_id":"k","op":2}"#,
    ])?;

    let out = run_ok(&[
        "tail",
        "-b",
        &bootstrap,
        "--topic",
        "mixed",
        "--from-beginning",
        "--count",
        "3",
    ])?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "tail output: {out}");
    assert!(
        lines[0].starts_with("mixed/0@0 key=\"k\" timestamp_millis="),
        "{}",
        lines[0]
    );
    assert!(lines[0].ends_with(" value_hex=ff0001"), "{}", lines[0]);
    assert!(
        lines[1].starts_with(
            "mixed/0@1 key=\"k\" ERROR cannot decode task record: invalid dt_meta header"
        ),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("mixed/0@2 key=\"k\" "), "{}", lines[2]);
    assert!(
        lines[2].contains(r#"task={"user_id":"k","op":"OP_TYPE_READ""#),
        "{}",
        lines[2]
    );
    Ok(())
}

#[test]
fn bad_input_fails_with_a_message_and_sends_nothing() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("chat-ops", 1)?;
    let bootstrap = broker.bootstrap_servers();
    let put = |extra: &[&str]| {
        let mut args = vec![
            "put", "-b", &bootstrap, "--topic", "chat-ops", "--key", "u1",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };

    let done = put(&["--json", r#"{"user_id":"u1","op":"SEND_MESAGE"}"#])?;
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("decaton.example.ChatOp") && done.stderr.contains("SEND_MESAGE"),
        "{}",
        done.stderr
    );

    let done = put(&["--json", r#"{"usr_id":"u1"}"#])?;
    assert!(!done.status.success());
    assert!(done.stderr.contains("usr_id"), "{}", done.stderr);

    let done = put(&["--file", "/nonexistent/task.bin"])?;
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("/nonexistent/task.bin"),
        "{}",
        done.stderr
    );

    let done = put(&["--json", "{}", "-X", "linger.ms"])?;
    assert!(!done.status.success());
    assert!(done.stderr.contains("KEY=VALUE"), "{}", done.stderr);

    // Nothing reached the topic: a tail from the beginning sees only this marker.
    run_ok(&[
        "put", "-b", &bootstrap, "--topic", "chat-ops", "--key", "marker", "--json", "{}",
    ])?;
    let out = run_ok(&[
        "tail",
        "-b",
        &bootstrap,
        "--topic",
        "chat-ops",
        "--from-beginning",
        "--count",
        "1",
    ])?;
    assert!(out.starts_with("chat-ops/0@0 key=\"marker\""), "{out}");
    Ok(())
}

/// Sends SIGTERM (through the `kill` utility; the tests link no libc).
fn terminate(child: &Child) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    Ok(())
}

#[test]
fn dev_broker_prints_its_address_serves_and_stops_on_sigterm() -> anyhow::Result<()> {
    let mut broker = spawn(&["dev-broker", "--topic", "chat-ops:2", "--topic", "audit"])?;
    let stdout: ChildStdout = broker.stdout.take().context("stdout")?;
    let stderr = collect(broker.stderr.take().context("stderr")?);
    // First line on its own thread; the rest of stdout (EOF) tells us the process is gone.
    let (line_tx, line_rx) = mpsc::channel();
    let (eof_tx, eof_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = line_tx.send(first);
        let _ = reader.read_to_string(&mut String::new());
        let _ = eof_tx.send(());
    });
    let result = (|| -> anyhow::Result<()> {
        let first = line_rx
            .recv_timeout(TIMEOUT)
            .context("dev-broker printed nothing")?;
        let bootstrap = first
            .trim()
            .strip_prefix("bootstrap=")
            .with_context(|| format!("unexpected first line {first:?}"))?
            .to_string();
        assert!(bootstrap.starts_with("127.0.0.1:"), "{bootstrap}");

        let (partition, _) = parse_delivery(&run_ok(&[
            "put",
            "-b",
            &bootstrap,
            "--topic",
            "chat-ops",
            "--key",
            "u1",
            "--json",
            r#"{"user_id":"u1"}"#,
        ])?)?;
        assert!((0..2).contains(&partition));
        run_ok(&[
            "put", "-b", &bootstrap, "--topic", "audit", "--key", "u1", "--json", "{}",
        ])?;
        // The topics exist with the partition counts asked for.
        let done = run(&[
            "tail",
            "-b",
            &bootstrap,
            "--topic",
            "chat-ops",
            "--partition",
            "2",
            "--count",
            "1",
        ])?;
        assert!(
            done.stderr.contains("has no partition 2 (it has 2)"),
            "{}",
            done.stderr
        );
        let done = run(&[
            "tail",
            "-b",
            &bootstrap,
            "--topic",
            "audit",
            "--partition",
            "1",
            "--count",
            "1",
        ])?;
        assert!(
            done.stderr.contains("has no partition 1 (it has 1)"),
            "{}",
            done.stderr
        );

        terminate(&broker)?;
        eof_rx
            .recv_timeout(TIMEOUT)
            .context("dev-broker did not stop on SIGTERM")?;
        let status = broker.wait()?;
        let log = stderr.recv_timeout(TIMEOUT).unwrap_or_default();
        assert!(status.success(), "dev-broker exited with {status}: {log}");
        Ok(())
    })();
    if result.is_err() {
        let _ = broker.kill();
        let _ = broker.wait();
    }
    result
}

/// Runs `decaton args...` with `input` on its stdin.
fn run_with_input(args: &[&str], input: Vec<u8>) -> anyhow::Result<Finished> {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut stdin, &input);
    });
    let stdout = collect(child.stdout.take().context("stdout")?);
    let stderr = collect(child.stderr.take().context("stderr")?);
    let (stdout, stderr) = match (stdout.recv_timeout(TIMEOUT), stderr.recv_timeout(TIMEOUT)) {
        (Ok(out), Ok(err)) => (out, err),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("decaton {args:?} did not finish within {TIMEOUT:?}");
        }
    };
    Ok(Finished {
        status: child.wait()?,
        stdout,
        stderr,
    })
}

/// A task type the project knows nothing about, with a nested message and an enum.
const ORDER_PROTO: &str = r#"
syntax = "proto3";
package shop.v1;
enum State { STATE_UNSPECIFIED = 0; STATE_PAID = 1; }
message Line { string sku = 1; uint32 quantity = 2; }
message Order {
  string order_id = 1;
  State state = 2;
  repeated Line lines = 3;
  int64 total_cents = 4;
}
"#;

#[test]
fn a_foreign_task_type_goes_in_from_a_proto_and_comes_out_from_a_descriptor_set(
) -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("orders", 2)?;
    let bootstrap = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let proto = dir.path().join("order.proto");
    std::fs::write(&proto, ORDER_PROTO)?;
    let proto = proto.to_str().context("temp path")?;
    let order = r#"{"order_id":"o-1","state":"STATE_PAID","lines":[{"sku":"tea","quantity":2}],"totalCents":"1250"}"#;
    run_ok(&[
        "put",
        "-b",
        &bootstrap,
        "--topic",
        "orders",
        "--key",
        "o-1",
        "--proto",
        proto,
        "--type",
        "shop.v1.Order",
        "--json",
        order,
    ])?;

    // The same schema as a descriptor set, the way protoc writes one.
    let fds = dir.path().join("order.fds");
    let status = Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg("--include_imports")
        .arg(format!("--proto_path={}", dir.path().display()))
        .arg(format!("--descriptor_set_out={}", fds.display()))
        .arg(proto)
        .status()?;
    anyhow::ensure!(status.success(), "protoc failed");
    let fds = fds.to_str().context("temp path")?;
    let out = run_ok(&[
        "tail",
        "-b",
        &bootstrap,
        "--topic",
        "orders",
        "--descriptor-set",
        fds,
        "--type",
        "shop.v1.Order",
        "--from",
        "beginning",
        "--exit-at-end",
        "--format",
        "json",
    ])?;
    let lines: Vec<Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(
        lines[0]["task"],
        serde_json::json!({"order_id":"o-1","state":"STATE_PAID","lines":[{"sku":"tea","quantity":2}],"total_cents":1250})
    );

    // Tailing it as the default ChatOp does not pretend: the bytes are shown as hex.
    let out = run_ok(&[
        "tail",
        "-b",
        &bootstrap,
        "--topic",
        "orders",
        "--from",
        "beginning",
        "--exit-at-end",
    ])?;
    assert!(out.contains(" value_hex="), "{out}");

    // A type the set lacks is named, with what the set has.
    let done = run(&[
        "put",
        "-b",
        &bootstrap,
        "--topic",
        "orders",
        "--key",
        "k",
        "--descriptor-set",
        fds,
        "--type",
        "shop.v1.Ordr",
        "--json",
        "{}",
    ])?;
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("shop.v1.Ordr") && done.stderr.contains("shop.v1.Line, shop.v1.Order"),
        "{}",
        done.stderr
    );
    // A field error names the field.
    let done = run(&[
        "put",
        "-b",
        &bootstrap,
        "--topic",
        "orders",
        "--key",
        "k",
        "--proto",
        proto,
        "--type",
        "Order",
        "--json",
        r#"{"lines":[{"qty":1}]}"#,
    ])?;
    assert!(!done.status.success());
    assert!(done.stderr.contains("qty"), "{}", done.stderr);
    // A .proto that does not compile shows protoc's message.
    std::fs::write(
        dir.path().join("bad.proto"),
        "syntax = \"proto3\"; message {",
    )?;
    let bad = dir.path().join("bad.proto");
    let done = run(&[
        "put",
        "-b",
        &bootstrap,
        "--topic",
        "orders",
        "--key",
        "k",
        "--proto",
        bad.to_str().context("temp path")?,
        "--type",
        "X",
        "--json",
        "{}",
    ])?;
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("protoc could not compile"),
        "{}",
        done.stderr
    );
    Ok(())
}

/// How many tasks the NDJSON test puts (well under a second in a debug build).
const BULK: usize = 100_000;

#[test]
fn ndjson_on_stdin_puts_every_good_line_and_reports_the_bad_ones() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("bulk", 4)?;
    let bootstrap = broker.bootstrap_servers();
    let mut input = String::new();
    for i in 0..BULK {
        match i {
            // Line 3: not JSON; line 101: a field ChatOp lacks.
            2 => input.push_str("{\"key\":"),
            100 => input.push_str(r#"{"key":"u","task":{"nope":1}}"#),
            _ => input.push_str(&format!(
                r#"{{"key":"u{}","task":{{"user_id":"u{}","sequence":{i}}}}}"#,
                i % 97,
                i % 97
            )),
        }
        input.push('\n');
    }
    let started = std::time::Instant::now();
    let done = run_with_input(
        &["put", "-b", &bootstrap, "--topic", "bulk", "--ndjson"],
        input.into_bytes(),
    )?;
    eprintln!("{BULK} NDJSON puts took {:?}", started.elapsed());
    assert!(!done.status.success(), "a bad line must fail the command");
    assert_eq!(done.stdout.trim(), format!("put={} failed=2", BULK - 2));
    assert!(done.stderr.contains("line 3: not JSON"), "{}", done.stderr);
    assert!(
        done.stderr.contains("line 101: ") && done.stderr.contains("nope"),
        "{}",
        done.stderr
    );

    let out = run_ok(&[
        "tail",
        "-b",
        &bootstrap,
        "--topic",
        "bulk",
        "--from",
        "beginning",
        "--exit-at-end",
        "--format",
        "json",
    ])?;
    let mut sequences = Vec::new();
    for line in out.lines() {
        let v: Value = serde_json::from_str(line)?;
        assert_eq!(v["key"], v["task"]["user_id"], "{line}");
        sequences.push(v["task"]["sequence"].as_u64().context("sequence")?);
    }
    sequences.sort_unstable();
    let expected: Vec<u64> = (0..BULK as u64).filter(|i| *i != 2 && *i != 100).collect();
    assert_eq!(sequences, expected);

    // Keyed by a field of the task itself; all good lines: success.
    let done = run_with_input(
        &[
            "put",
            "-b",
            &bootstrap,
            "--topic",
            "bulk",
            "--ndjson",
            "--key-field",
            "user_id",
        ],
        b"{\"user_id\":\"kf\",\"sequence\":1}\n\n{\"user_id\":\"kf\",\"sequence\":2}\n".to_vec(),
    )?;
    assert!(done.status.success(), "{}", done.stderr);
    assert_eq!(done.stdout.trim(), "put=2 failed=0");
    Ok(())
}

/// Five records in partition 0 of topic `positions` (any other partition stays empty, so
/// `--exit-at-end` must not wait for it), each in its own batch with a `trace-id` header
/// and a timestamp of its own, taken when it is sent (Tansu looks timestamps up by when
/// records arrived). Returns the timestamps.
fn produce_positions(broker: &TestBroker, partitions: i32) -> anyhow::Result<Vec<i64>> {
    broker.create_topic("positions", partitions)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()?;
    let mut timestamps: Vec<i64> = Vec::new();
    for i in 0..5 {
        let mut now = now_millis();
        // Distinct milliseconds, so each timestamp names one record.
        while timestamps.last().is_some_and(|last| now <= *last) {
            std::hint::spin_loop();
            now = now_millis();
        }
        timestamps.push(now);
        producer
            .send(
                BaseRecord::to("positions")
                    .partition(0)
                    .key("k")
                    .payload(&b"x"[..])
                    .timestamp(now)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "trace-id",
                        value: Some(format!("t{i}").as_bytes()),
                    })),
            )
            .map_err(|(e, _)| e)?;
        producer.flush(TIMEOUT)?;
    }
    Ok(timestamps)
}

/// `topic/partition@offset` of each line `tail --from FROM --exit-at-end` prints.
fn tail_positions(broker: &TestBroker, from: &str) -> anyhow::Result<Vec<String>> {
    let out = run_ok(&[
        "tail",
        "-b",
        &broker.bootstrap_servers(),
        "--topic",
        "positions",
        "--from",
        from,
        "--exit-at-end",
    ])?;
    Ok(out
        .lines()
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect())
}

#[test]
fn ndjson_tasks_go_out_as_their_lines_arrive() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("live", 1)?;
    let bootstrap = broker.bootstrap_servers();
    let mut put = Command::new(BIN)
        .args(["put", "-b", &bootstrap, "--topic", "live", "--ndjson"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = put.stdin.take().context("stdin")?;
    let stdout = collect(put.stdout.take().context("stdout")?);
    std::io::Write::write_all(&mut stdin, b"{\"key\":\"k\",\"task\":{\"sequence\":1}}\n")?;
    std::io::Write::flush(&mut stdin)?;
    // stdin is still open: the task must reach the topic anyway.
    let seen = run(&[
        "tail",
        "-b",
        &bootstrap,
        "--topic",
        "live",
        "--from",
        "beginning",
        "--count",
        "1",
    ]);
    drop(stdin);
    let seen = seen?;
    let status = put.wait()?;
    assert!(seen.status.success(), "{}", seen.stderr);
    assert!(
        seen.stdout.starts_with("live/0@0 key=\"k\""),
        "{}",
        seen.stdout
    );
    assert!(status.success());
    assert_eq!(stdout.recv_timeout(TIMEOUT)?.trim(), "put=1 failed=0");
    Ok(())
}

#[test]
fn tail_starts_where_asked_shows_every_header_and_exits_at_the_end() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    produce_positions(&broker, 2)?;
    let out = run_ok(&[
        "tail",
        "-b",
        &broker.bootstrap_servers(),
        "--topic",
        "positions",
        "--from",
        "beginning",
        "--exit-at-end",
    ])?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("positions/0@{i} ")), "{line}");
        // Not a task (no dt_meta), and its other header is still shown.
        assert!(line.contains(" ERROR "), "{line}");
        assert!(
            line.contains(&format!(" header:trace-id=\"t{i}\"")),
            "{line}"
        );
    }
    assert_eq!(
        tail_positions(&broker, "offset:3")?,
        ["positions/0@3", "positions/0@4"]
    );
    assert!(tail_positions(&broker, "end")?.is_empty());
    Ok(())
}

/// Timestamp lookups need a real broker: librdkafka's mock cluster answers every
/// timestamp with "no such offset". Tansu 0.6 answers a timestamp between two records
/// with the earlier one (Kafka gives the later), so the lookups here hit record
/// timestamps exactly, where both agree.
#[test]
fn tail_from_a_timestamp_starts_at_the_record_with_it() -> anyhow::Result<()> {
    let broker = TestBroker::start(BrokerKind::TansuMemory)?;
    let timestamps = produce_positions(&broker, 1)?;
    let at = |i: usize| format!("timestamp:{}", timestamps[i]);
    assert_eq!(
        tail_positions(&broker, &at(2))?,
        ["positions/0@2", "positions/0@3", "positions/0@4"]
    );
    assert_eq!(tail_positions(&broker, &at(4))?, ["positions/0@4"]);
    assert_eq!(tail_positions(&broker, &at(0))?.len(), 5);
    Ok(())
}

#[test]
fn lag_shows_committed_offsets_lag_and_finished_tasks_from_the_offset_map() -> anyhow::Result<()> {
    use base64::Engine as _;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("chat-ops", 4)?;
    let bootstrap = broker.bootstrap_servers();
    // 20, 10, 5 and 5 records in partitions 0..4 (lag reads offsets, not tasks).
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    for (partition, count) in [(0, 20), (1, 10), (2, 5), (3, 5)] {
        for _ in 0..count {
            producer
                .send(
                    BaseRecord::to("chat-ops")
                        .partition(partition)
                        .key("k")
                        .payload(&b""[..]),
                )
                .map_err(|(e, _)| e)?;
        }
    }
    producer.flush(TIMEOUT)?;

    // What a processor of group "talk" would commit: partition 0 at 5 with offsets 6, 7
    // and 10 finished (runs: 1 not done, 2 done, 2 not done, 1 done); partition 1 at 2
    // with 3, 4, 5 and 9 finished (a bitset of 8 offsets from 2); partition 2 at 1 with
    // metadata that is no offset map; partition 3 not at all.
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let commits = [
        (0, 5, format!("dtom1:5:6:r{}", b64.encode([1u8, 2, 2, 1]))),
        (1, 2, format!("dtom1:2:8:b{}", b64.encode([0b1000_1110u8]))),
        (2, 1, "written-by-someone-else".to_string()),
    ];
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "talk")
        .create()?;
    let mut list = TopicPartitionList::new();
    for (partition, offset, map) in &commits {
        let mut element = list.add_partition("chat-ops", *partition);
        element.set_offset(Offset::Offset(*offset))?;
        element.set_metadata(map);
    }
    consumer.commit(&list, CommitMode::Sync)?;

    let out = run_ok(&["lag", "talk", "-b", &bootstrap, "--topic", "chat-ops"])?;
    let json: Value = serde_json::from_str(&run_ok(&[
        "lag", "talk", "-b", &bootstrap, "--topic", "chat-ops", "--json",
    ])?)?;
    let rows = json["partitions"].as_array().context("partitions")?;
    let summary: Vec<(Value, Value, Value, Value, Value)> = rows
        .iter()
        .map(|r| {
            (
                r["committed"].clone(),
                r["high_watermark"].clone(),
                r["lag"].clone(),
                r["finished_above_commit"].clone(),
                r["pending"].clone(),
            )
        })
        .collect();
    use serde_json::json;
    assert_eq!(
        summary,
        [
            (json!(5), json!(20), json!(15), json!(3), json!(12)),
            (json!(2), json!(10), json!(8), json!(4), json!(4)),
            (json!(1), json!(5), json!(4), json!(0), json!(4)),
            (Value::Null, json!(5), Value::Null, json!(0), Value::Null),
        ]
    );
    assert_eq!(rows[0]["offset_map"], "valid");
    assert_eq!(
        rows[2]["offset_map"],
        "ignored: not a decaton-rs offset map"
    );
    assert_eq!(rows[3]["offset_map"], "none");
    assert_eq!(
        (json["total_lag"].as_i64(), json["total_pending"].as_i64()),
        (Some(27), Some(20))
    );

    let table: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        table[0][..6],
        [
            "PARTITION",
            "COMMITTED",
            "HIGH_WATERMARK",
            "LAG",
            "FINISHED",
            "PENDING"
        ]
    );
    assert_eq!(table[1][..7], ["0", "5", "20", "15", "3", "12", "valid"]);
    assert_eq!(table[4][..7], ["3", "-", "5", "-", "0", "-", "none"]);
    assert_eq!(table[5], ["total", "27", "7", "20"]);
    // A group that committed nothing is an error: see tests/first_hour.rs.
    Ok(())
}
