//! The Kafka cluster a benchmark runs against: the embedded librdkafka mock cluster
//! started in this process (the default), or an existing cluster (`--bootstrap`).
//!
//! Every run gets a fresh topic, so each run starts from the same backlog and no run
//! reads another's records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_testkit::{BrokerKind, TestBroker};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::BenchError;

/// A cluster to create benchmark topics on.
pub(crate) struct Cluster {
    embedded: Option<Arc<TestBroker>>,
    bootstrap: String,
    next_topic: AtomicU64,
}

impl Cluster {
    /// Connects to `bootstrap`, or starts the embedded mock cluster when there is none.
    pub async fn start(bootstrap: Option<&str>) -> Result<Cluster, BenchError> {
        let (embedded, bootstrap) = match bootstrap {
            Some(b) => (None, b.to_string()),
            None => {
                let broker =
                    tokio::task::spawn_blocking(|| TestBroker::start(BrokerKind::Embedded))
                        .await
                        .map_err(|e| {
                            BenchError::Cluster(format!("starting the embedded cluster: {e}"))
                        })?
                        .map_err(|e| {
                            BenchError::Cluster(format!("starting the embedded cluster: {e}"))
                        })?;
                let bootstrap = broker.bootstrap_servers();
                (Some(Arc::new(broker)), bootstrap)
            }
        };
        Ok(Cluster {
            embedded,
            bootstrap,
            next_topic: AtomicU64::new(0),
        })
    }

    /// `bootstrap.servers` for clients.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A topic name no other run of this process (or an earlier process) has used.
    pub fn unique_name(&self, what: &str) -> String {
        let n = self.next_topic.fetch_add(1, Ordering::Relaxed);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("decaton-bench-{what}-{}-{stamp}-{n}", std::process::id())
    }

    /// Creates `name` with `partitions` partitions and waits until clients see them all.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<(), BenchError> {
        let err = |e: String| BenchError::Cluster(format!("creating topic {name}: {e}"));
        if let Some(broker) = &self.embedded {
            let (broker, topic) = (broker.clone(), name.to_string());
            return tokio::task::spawn_blocking(move || broker.create_topic(&topic, partitions))
                .await
                .map_err(|e| err(e.to_string()))?
                .map_err(|e| err(e.to_string()));
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .map_err(|e| err(e.to_string()))?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        // The broker's default replication factor first (KIP-464); 1 for brokers that
        // do not know the default.
        for replication in [-1, 1] {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
            let results = admin
                .create_topics([&topic], &opts)
                .await
                .map_err(|e| err(e.to_string()))?;
            match results.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => break,
                Some(Err((_, RDKafkaErrorCode::InvalidReplicationFactor))) if replication == -1 => {
                    continue
                }
                Some(Err((_, code))) => return Err(err(code.to_string())),
                None => return Err(err("no result from the broker".into())),
            }
        }
        let (bootstrap, topic) = (self.bootstrap.clone(), name.to_string());
        tokio::task::spawn_blocking(move || wait_for_topic(&bootstrap, &topic, partitions))
            .await
            .map_err(|e| err(e.to_string()))?
    }

    /// Checks that `topic` still holds all `expected` records from offset 0. librdkafka's
    /// mock cluster keeps at most 5 MB (or 100000 batches) per partition and silently
    /// drops the oldest records beyond that, which would leave the runner waiting for
    /// tasks that no longer exist.
    pub async fn check_backlog(
        &self,
        topic: &str,
        partitions: i32,
        expected: u64,
    ) -> Result<(), BenchError> {
        // Some brokers (Tansu) report the high watermark a little behind the last
        // acknowledged record: give them a few seconds to catch up.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let marks = self.watermarks(topic, partitions).await?;
            let kept: i64 = marks.iter().map(|(low, high)| high - low).sum();
            let trimmed = marks.iter().any(|(low, _)| *low > 0);
            if !trimmed && kept as u64 >= expected {
                return Ok(());
            }
            let describe = || {
                let marks: Vec<String> = marks
                    .iter()
                    .enumerate()
                    .map(|(p, (l, h))| format!("{p}: {l}..{h}"))
                    .collect();
                format!(
                    "topic {topic} holds {kept} of the {expected} tasks produced (offsets {})",
                    marks.join(", ")
                )
            };
            if self.embedded.is_some() && (trimmed || kept as u64 != expected) {
                return Err(BenchError::Config(format!(
                    "{}: the embedded mock cluster keeps at most 5 MB per partition and drops the oldest records; \
                     use fewer --tasks, more --partitions, a smaller --payload-bytes, or --bootstrap with a real cluster",
                    describe()
                )));
            }
            if trimmed {
                return Err(BenchError::Config(format!(
                    "{}: check the topic's retention settings",
                    describe()
                )));
            }
            if Instant::now() > deadline {
                tracing::debug!(
                    "{}; going on (the stall timeout ends the run if tasks are really missing)",
                    describe()
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn watermarks(
        &self,
        topic: &str,
        partitions: i32,
    ) -> Result<Vec<(i64, i64)>, BenchError> {
        let (bootstrap, name) = (self.bootstrap.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || -> Result<Vec<(i64, i64)>, BenchError> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .map_err(|e| BenchError::Cluster(e.to_string()))?;
            (0..partitions)
                .map(|p| {
                    consumer
                        .fetch_watermarks(&name, p, Duration::from_secs(10))
                        .map_err(|e| BenchError::Cluster(format!("watermarks of {name}/{p}: {e}")))
                })
                .collect()
        })
        .await
        .map_err(|e| BenchError::Internal(e.to_string()))?
    }

    /// Short description for reports.
    pub fn describe(&self) -> String {
        match self.embedded {
            Some(_) => "embedded mock cluster, in this process".to_string(),
            None => self.bootstrap.clone(),
        }
    }
}

fn wait_for_topic(bootstrap: &str, name: &str, partitions: i32) -> Result<(), BenchError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| BenchError::Cluster(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(md) = consumer.fetch_metadata(Some(name), Duration::from_secs(2)) {
            let ready = md.topics().iter().any(|t| {
                t.name() == name
                    && t.error().is_none()
                    && t.partitions().len() as i32 == partitions
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            });
            if ready {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(BenchError::Cluster(format!(
                "topic {name} not visible with {partitions} partitions after 30 s"
            )));
        }
        // Metadata propagation has no event to wait on; poll it.
        std::thread::sleep(Duration::from_millis(100));
    }
}
