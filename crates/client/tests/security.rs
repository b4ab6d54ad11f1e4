//! The `tls`, `sasl` and `zstd` features decide what librdkafka accepts at `build()`.
//! No broker is contacted: librdkafka checks these settings when the client is created.

use decaton_client::{ClientError, TaskClient};
use decaton_protocol::ChatOp;

fn build(settings: &[(&str, &str)]) -> Result<TaskClient<ChatOp>, ClientError> {
    settings
        .iter()
        .fold(
            TaskClient::<ChatOp>::builder("127.0.0.1:1", "secure-topic"),
            |b, (k, v)| b.set(*k, *v),
        )
        .build()
}

#[cfg(feature = "sasl")]
#[test]
fn sasl_mechanisms_over_tls_are_accepted() -> anyhow::Result<()> {
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] {
        build(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", mechanism),
            ("sasl.username", "user"),
            ("sasl.password", "secret"),
        ])?;
    }
    build(&[
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanisms", "OAUTHBEARER"),
        ("sasl.oauthbearer.config", "principal=user"),
    ])?;
    Ok(())
}

#[cfg(feature = "tls")]
#[test]
fn tls_is_accepted() -> anyhow::Result<()> {
    build(&[("security.protocol", "SSL")])?;
    Ok(())
}

#[cfg(not(feature = "tls"))]
#[test]
fn tls_without_the_feature_is_a_config_error() {
    let result = build(&[("security.protocol", "SSL")]);
    assert!(
        matches!(result, Err(ClientError::Config(_))),
        "expected a configuration error, got {:?}",
        result.map(|_| ())
    );
}

#[cfg(feature = "zstd")]
#[test]
fn zstd_compression_is_accepted() -> anyhow::Result<()> {
    build(&[("compression.type", "zstd")])?;
    Ok(())
}

#[cfg(not(feature = "zstd"))]
#[test]
fn zstd_without_the_feature_is_a_config_error() {
    let result = build(&[("compression.type", "zstd")]);
    assert!(
        matches!(result, Err(ClientError::Config(_))),
        "expected a configuration error, got {:?}",
        result.map(|_| ())
    );
}

/// SCRAM-SHA-512 against a Tansu broker that requires authentication: the right password
/// delivers a task, a wrong one does not. Tansu 0.6 has no TLS listener (its `--cert`
/// and `--key` options cannot be combined and the acceptor is never used), so this runs
/// over `SASL_PLAINTEXT`; TLS itself is covered by `tls_is_accepted` only.
#[cfg(feature = "sasl")]
mod scram_on_tansu {
    use std::net::{TcpListener, TcpStream};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use decaton_client::{ClientError, TaskClient};
    use decaton_protocol::{ChatOp, OpType};

    /// A Tansu process, killed on drop.
    struct Broker(Child);

    impl Drop for Broker {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start(bin: &Path, port: u16, db: &Path, authentication: bool) -> anyhow::Result<Broker> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &format!("sqlite:///{}", db.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if authentication {
            cmd.arg("--authentication");
        }
        let mut broker = Broker(cmd.spawn()?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(broker.0.try_wait()?.is_none(), "tansu exited at start");
            anyhow::ensure!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    fn tansu(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(bin).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "tansu {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn client(port: u16, password: &str) -> Result<TaskClient<ChatOp>, ClientError> {
        TaskClient::<ChatOp>::builder(format!("127.0.0.1:{port}"), "secured")
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanisms", "SCRAM-SHA-512")
            .set("sasl.username", "alice")
            .set("sasl.password", password)
            .delivery_timeout(Duration::from_secs(10))
            .build()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scram_credentials_decide_delivery() -> anyhow::Result<()> {
        let bin = decaton_testkit::tansu_binary()?;
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("tansu.db");
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("tcp://127.0.0.1:{port}");
        // Users and topics are created while the broker is still open, then it restarts
        // on the same storage with authentication required.
        {
            let _open = start(&bin, port, &db, false)?;
            tansu(
                &bin,
                &["user", "create", "--broker", &url, "alice", "s3cret"],
            )?;
            tansu(
                &bin,
                &[
                    "topic",
                    "create",
                    "--broker",
                    &url,
                    "--partitions",
                    "1",
                    "secured",
                ],
            )?;
        }
        let _secured = start(&bin, port, &db, true)?;

        let good = client(port, "s3cret")?;
        let op = ChatOp {
            user_id: "u1".into(),
            op: OpType::SendMessage as i32,
            ..Default::default()
        };
        let delivered = good.put("u1", &op).await?;
        assert_eq!(delivered.partition, 0);

        let bad = client(port, "wrong")?;
        let result = bad.put("u1", &op).await;
        assert!(result.is_err(), "a wrong password delivered {result:?}");
        Ok(())
    }
}
