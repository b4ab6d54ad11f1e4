//! The brokers tests run against.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;

/// Pinned Tansu version the project installs (`scripts/install-tansu.sh`).
pub const TANSU_VERSION: &str = "0.6.0";

/// Errors from starting or driving a test broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// librdkafka refused an operation.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A process or file operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The Tansu binary is not installed.
    #[error("tansu {TANSU_VERSION} not found (looked at {0}); run scripts/install-tansu.sh or set TANSU_BIN")]
    TansuMissing(String),
    /// The broker did not become ready in time, or an operation did not finish.
    #[error("{0}")]
    Timeout(String),
    /// The broker refused to create a topic.
    #[error("create topic {0}: {1}")]
    CreateTopic(String, rdkafka::types::RDKafkaErrorCode),
    /// The operation is not available on this kind of broker.
    #[error("{0} is not supported by the {1:?} broker")]
    Unsupported(&'static str, BrokerKind),
}

/// Which broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BrokerKind {
    /// librdkafka's mock cluster inside this process; needs nothing installed.
    Embedded,
    /// A Tansu process with in-memory storage: fast, forgets everything on restart.
    TansuMemory,
    /// A Tansu process with an sqlite file: survives [`TestBroker::restart`], slow (~5k/s).
    TansuSqlite,
}

impl BrokerKind {
    /// The brokers every end-to-end scenario runs against: the embedded mock cluster and
    /// a real Tansu broker. `DECATON_TEST_BROKERS=embedded` (or `tansu`) narrows the list
    /// for local iteration; CI sets nothing and runs both.
    pub fn for_tests() -> Vec<BrokerKind> {
        match std::env::var("DECATON_TEST_BROKERS").ok().as_deref() {
            Some("embedded") => vec![BrokerKind::Embedded],
            Some("tansu") => vec![BrokerKind::TansuMemory],
            _ => vec![BrokerKind::Embedded, BrokerKind::TansuMemory],
        }
    }

    /// Whether this broker returns the metadata string stored with a committed offset.
    /// The mock cluster and Apache Kafka do; Tansu 0.6 does not.
    pub fn returns_commit_metadata(self) -> bool {
        matches!(self, BrokerKind::Embedded)
    }

    /// librdkafka producer settings that tests which resume consumption mid-topic (pause
    /// and resume, restarts, rebalances) need on this broker.
    ///
    /// Tansu 0.6 cannot serve a fetch that starts inside a record batch: it returns only
    /// batches whose base offset is at or after the requested offset, so a consumer
    /// resuming at a committed offset in the middle of a batch gets nothing (or skips the
    /// rest of that batch). Apache Kafka and the mock cluster return the whole batch and
    /// the client skips the records before the offset. Producing one record per batch
    /// makes every offset a batch boundary there; see docs/operations.md.
    pub fn producer_settings(self) -> &'static [(&'static str, &'static str)] {
        match self {
            BrokerKind::Embedded => &[],
            BrokerKind::TansuMemory | BrokerKind::TansuSqlite => &[("batch.num.messages", "1")],
        }
    }

    /// Short lowercase name, for logs and test names.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "embedded",
            BrokerKind::TansuMemory => "tansu-memory",
            BrokerKind::TansuSqlite => "tansu-sqlite",
        }
    }
}

/// A running broker for tests; stopped when dropped.
pub struct TestBroker {
    kind: BrokerKind,
    inner: Inner,
}

enum Inner {
    Embedded(Embedded),
    Tansu(Tansu),
}

impl TestBroker {
    /// Starts a broker of the given kind and waits until it answers metadata requests.
    pub fn start(kind: BrokerKind) -> Result<TestBroker, TestkitError> {
        let inner = match kind {
            BrokerKind::Embedded => Inner::Embedded(Embedded::start()?),
            BrokerKind::TansuMemory | BrokerKind::TansuSqlite => Inner::Tansu(Tansu::start(kind)?),
        };
        let broker = TestBroker { kind, inner };
        broker.wait_ready(Duration::from_secs(60))?;
        Ok(broker)
    }

    /// The kind of this broker.
    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// `bootstrap.servers` for clients of this broker.
    pub fn bootstrap_servers(&self) -> String {
        match &self.inner {
            Inner::Embedded(e) => e.bootstrap.clone(),
            Inner::Tansu(t) => format!("127.0.0.1:{}", t.port),
        }
    }

    /// Creates a topic with `partitions` partitions and waits until its metadata shows them.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), TestkitError> {
        self.create_topic_with_config(name, partitions, &[])
    }

    /// Like [`create_topic`](Self::create_topic) with topic configs (for example
    /// `cleanup.policy=compact`). The mock cluster has no topic configs and ignores them.
    pub fn create_topic_with_config(
        &self,
        name: &str,
        partitions: i32,
        config: &[(&str, &str)],
    ) -> Result<(), TestkitError> {
        match &self.inner {
            Inner::Embedded(e) => e.create_topic(name, partitions)?,
            Inner::Tansu(_) => {
                create_topic_via_admin(&self.bootstrap_servers(), name, partitions, config)?
            }
        }
        self.wait_for_topic(name, partitions, Duration::from_secs(30))
    }

    /// Stops and starts the broker process again on the same port and storage. Only an
    /// sqlite-backed Tansu keeps its data across this.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        match &mut self.inner {
            Inner::Tansu(t) => t.restart()?,
            Inner::Embedded(_) => return Err(TestkitError::Unsupported("restart", self.kind)),
        }
        self.wait_ready(Duration::from_secs(60))
    }

    /// The broker process's log so far (Tansu only; its level follows `TANSU_LOG`,
    /// default `warn`), for failure reports.
    pub fn log(&self) -> Option<String> {
        match &self.inner {
            Inner::Tansu(t) => std::fs::read(t.dir.path().join("tansu.log"))
                .ok()
                .map(|l| String::from_utf8_lossy(&l).into_owned()),
            Inner::Embedded(_) => None,
        }
    }

    /// Stops the broker process without restarting it (Tansu only); [`restart`](Self::restart)
    /// brings it back.
    pub fn stop(&mut self) -> Result<(), TestkitError> {
        match &mut self.inner {
            Inner::Tansu(t) => {
                t.kill();
                Ok(())
            }
            Inner::Embedded(_) => Err(TestkitError::Unsupported("stop", self.kind)),
        }
    }

    fn wait_ready(&self, timeout: Duration) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap_servers())
            .set("log_level", "0")
            .create()?;
        loop {
            match consumer.fetch_metadata(None, Duration::from_secs(2)) {
                Ok(md) if !md.brokers().is_empty() => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(TestkitError::Timeout(format!(
                        "{} broker at {} not ready after {timeout:?}",
                        self.kind.name(),
                        self.bootstrap_servers()
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn wait_for_topic(
        &self,
        name: &str,
        partitions: i32,
        timeout: Duration,
    ) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap_servers())
            .set("allow.auto.create.topics", "false")
            .create()?;
        loop {
            if let Ok(md) = consumer.fetch_metadata(Some(name), Duration::from_secs(2)) {
                if md.topics().iter().any(|t| {
                    t.name() == name
                        && t.error().is_none()
                        && t.partitions().len() as i32 == partitions
                }) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Timeout(format!(
                    "topic {name} not visible with {partitions} partitions"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn create_topic_via_admin(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<(), TestkitError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = futures::executor::block_on(admin.create_topics([&topic], &opts))?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(TestkitError::CreateTopic(t, code)),
        }
    }
    Ok(())
}

/// The embedded mock cluster lives on a thread of its own (librdkafka's mock handle is not
/// `Send`), which serves topic creation and stops it on drop.
struct Embedded {
    bootstrap: String,
    commands: mpsc::Sender<EmbeddedCommand>,
    thread: Option<JoinHandle<()>>,
}

enum EmbeddedCommand {
    CreateTopic(
        String,
        i32,
        mpsc::Sender<Result<(), rdkafka::error::KafkaError>>,
    ),
}

impl Embedded {
    fn start() -> Result<Embedded, TestkitError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, command_rx) = mpsc::channel::<EmbeddedCommand>();
        let thread = std::thread::Builder::new()
            .name("mock-cluster".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Runs until every sender is gone (the handle was dropped).
                for cmd in command_rx {
                    match cmd {
                        EmbeddedCommand::CreateTopic(name, partitions, reply) => {
                            let _ = reply.send(cluster.create_topic(&name, partitions, 1));
                        }
                    }
                }
            })?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| TestkitError::Timeout("mock cluster thread exited".into()))??;
        Ok(Embedded {
            bootstrap,
            commands,
            thread: Some(thread),
        })
    }

    fn create_topic(&self, name: &str, partitions: i32) -> Result<(), TestkitError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(EmbeddedCommand::CreateTopic(
                name.to_string(),
                partitions,
                tx,
            ))
            .map_err(|_| TestkitError::Timeout("mock cluster thread exited".into()))?;
        rx.recv()
            .map_err(|_| TestkitError::Timeout("mock cluster thread exited".into()))??;
        Ok(())
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which drops (destroys) the cluster.
        let (dead_tx, _) = mpsc::channel();
        self.commands = dead_tx;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the Tansu binary is: `TANSU_BIN`, else the install script's cache directory, else
/// `tansu` on the `PATH`.
pub fn tansu_binary() -> Result<PathBuf, TestkitError> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(TestkitError::TansuMissing(p.display().to_string()))
        };
    }
    let cache = std::env::var_os("DECATON_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("decaton-rs"))
        });
    let mut looked = Vec::new();
    if let Some(cache) = cache {
        let p = cache
            .join(format!("tansu-{TANSU_VERSION}"))
            .join("bin")
            .join("tansu");
        if p.is_file() {
            return Ok(p);
        }
        looked.push(p.display().to_string());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("tansu");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    looked.push("$PATH".into());
    Err(TestkitError::TansuMissing(looked.join(", ")))
}

struct Tansu {
    bin: PathBuf,
    port: u16,
    storage_url: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Tansu {
    fn start(kind: BrokerKind) -> Result<Tansu, TestkitError> {
        let bin = tansu_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("decaton-tansu-")
            .tempdir()?;
        let storage_url = match kind {
            // Tansu 0.6 takes everything after `sqlite://` minus one leading `/` as the
            // path (`sqlite:///tmp/x.db` opens `tmp/x.db` relative to its working
            // directory), so an absolute path needs an extra slash.
            BrokerKind::TansuSqlite => {
                format!("sqlite:///{}", dir.path().join("tansu.db").display())
            }
            _ => "memory://tansu/".to_string(),
        };
        let port = free_port()?;
        let mut t = Tansu {
            bin,
            port,
            storage_url,
            dir,
            child: None,
        };
        t.spawn()?;
        Ok(t)
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))?;
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &self.storage_url])
            .env(
                "RUST_LOG",
                std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        // Wait for the listener before the caller's metadata probe.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("tansu.log"))
                        .unwrap_or_default();
                    return Err(TestkitError::Timeout(format!(
                        "tansu exited with {status}: {log}"
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Timeout(format!(
                    "tansu did not listen on port {}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16, TestkitError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
