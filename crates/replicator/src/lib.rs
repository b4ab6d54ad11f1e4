//! The loopback replicator: reads one large topic once and writes small derived topics,
//! one per category, so each consumer reads only what it needs.
//!
//! The common case needs no code: a TOML file names the source topic, its consumer group,
//! the task type and the routes (destination topic, filter, optional map), and
//! `decaton replicate --config FILE` runs it. For the rare case, the same pipeline takes
//! Rust closures as filter, map or router ([`Route::filter_fn`], [`Route::map_fn`],
//! [`ReplicatorBuilder::router`]).
//!
//! ```toml
//! bootstrap_servers = "127.0.0.1:9092"
//! source_topic = "chat-ops"
//! group = "chat-replicator"
//!
//! [task]                                   # omit for raw bytes (key/header filters only)
//! type = "decaton.example.ChatOp"          # descriptor_set = "chat.desc" for your own types
//!
//! [[route]]
//! topic = "chat-messages"
//! filter = "op in [SEND_MESSAGE, READ]"
//!
//! [[route]]
//! topic = "chat-profile"
//! filter = "op == UPDATE_PROFILE and has(payload)"
//! [route.map]
//! keep = ["user_id", "op", "payload", "sequence"]
//! headers = { category = "profile" }
//! ```
//!
//! # Source records
//!
//! With `format = "decaton"` (the default) the source holds Decaton task records: the
//! task in the value with its metadata in the `dt_meta` header, or a legacy
//! `DecatonTaskRequest` envelope; filters see the task inside. With `format = "plain"`
//! the value is the message itself. Without a `[task]` type, records stay opaque bytes
//! and filters can read only `key()` and `header("...")`.
//!
//! # Guarantees
//!
//! * **Order**: a source partition is read in order and its derived records are handed
//!   to one idempotent producer in that order; the key is kept (or re-keyed by a field)
//!   and partitioned as Java clients do (`murmur2_random`), so one key's records keep
//!   their order in every derived topic.
//! * **At-least-once** (default): a source offset is committed only after every derived
//!   record made from it (and its dead letter, if any) is acknowledged, with the
//!   processor runtime's out-of-order commit ([`decaton_processor::OffsetTracker`]):
//!   the committed position never passes an unacknowledged record, and finished offsets
//!   above it travel in the commit metadata, so a crash re-sends what was produced
//!   since the last commit (`commit_interval`), and nothing before. Derived records are retried by librdkafka until they land
//!   (`message.timeout.ms = 0`); a permanent delivery error stops the replicator (the
//!   committed position stays below the failed record).
//! * **Exactly-once** (`exactly_once = true`): derived records and the source offsets go
//!   in one Kafka transaction; consumers of the derived topics read with
//!   `isolation.level=read_committed`. A broker without transactions is detected at
//!   start and reported as [`ReplicatorError::TransactionsUnsupported`].
//! * **Bad records** (undecodable, a closure's error) are counted, optionally written to
//!   a dead-letter topic, and never stop the pipeline.
//!
//! # Threads
//!
//! One dedicated OS thread owns the consumer and the producer and makes every Kafka-side
//! decision (poll, produce, pause, commit, transactions, rebalance callbacks); nothing
//! blocks an async worker. [`Replicator::run`] awaits that thread.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod expr;
mod metrics;
mod pipeline;
mod route;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost_reflect::MessageDescriptor;

pub use config::ConfigError;
pub use metrics::{names as metric_names, ReplicatorStats, RouteStats};
pub use route::{DerivedRecord, FilterFn, MapFn, RecordView, Route, RouterFn};

/// What the source topic's records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceFormat {
    /// Decaton task records: the task in the value with a `dt_meta` header, or a legacy
    /// `DecatonTaskRequest` envelope. Filters see the task.
    #[default]
    Decaton,
    /// The value is the message itself.
    Plain,
}

/// Why a replicator could not be built or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicatorError {
    /// The configuration file is malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A route built in code is malformed.
    #[error("route {route}: {reason}")]
    Route {
        /// The route's name.
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// Settings are missing or contradict each other.
    #[error("{0}")]
    Settings(String),
    /// librdkafka refused an operation.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Exactly-once was asked for, but the broker does not serve transactions.
    #[error("exactly-once needs Kafka transactions, which this broker does not serve ({0}); run with exactly_once = false (at-least-once)")]
    TransactionsUnsupported(String),
    /// A derived record could not be delivered, or a transaction failed: the replicator
    /// stopped; the committed source position stays below the records concerned.
    #[error("replication stopped: {0}")]
    Delivery(String),
}

/// Builds a [`Replicator`]: from a configuration file ([`ReplicatorBuilder::from_file`])
/// or in code ([`Replicator::builder`]).
#[derive(Clone)]
pub struct ReplicatorBuilder {
    pub(crate) bootstrap: String,
    pub(crate) source_topic: String,
    pub(crate) group: String,
    pub(crate) format: SourceFormat,
    pub(crate) message: Option<MessageDescriptor>,
    pub(crate) exactly_once: bool,
    pub(crate) transactional_id: Option<String>,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) commit_interval: Duration,
    pub(crate) max_pending: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) settings: Vec<(String, String)>,
    pub(crate) consumer_settings: Vec<(String, String)>,
    pub(crate) producer_settings: Vec<(String, String)>,
    pub(crate) routes: Vec<Route>,
    pub(crate) router: Option<Arc<RouterFn>>,
}

impl std::fmt::Debug for ReplicatorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatorBuilder")
            .field("bootstrap", &self.bootstrap)
            .field("source_topic", &self.source_topic)
            .field("group", &self.group)
            .field("format", &self.format)
            .field("exactly_once", &self.exactly_once)
            .field("routes", &self.routes)
            .field("router", &self.router.is_some())
            .finish_non_exhaustive()
    }
}

impl ReplicatorBuilder {
    pub(crate) fn new(bootstrap: String, source_topic: String, group: String) -> Self {
        ReplicatorBuilder {
            bootstrap,
            source_topic,
            group,
            format: SourceFormat::Decaton,
            message: None,
            exactly_once: false,
            transactional_id: None,
            dead_letter_topic: None,
            commit_interval: Duration::from_secs(1),
            max_pending: 10_000,
            shutdown_timeout: Duration::from_secs(30),
            settings: Vec::new(),
            consumer_settings: Vec::new(),
            producer_settings: Vec::new(),
            routes: Vec::new(),
            router: None,
        }
    }

    /// Reads and checks a TOML configuration file; errors name the file, line and reason.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        config::load(path.as_ref())
    }

    /// Like [`from_file`](Self::from_file) with the text given (`file` names it in errors).
    pub fn from_toml(file: impl AsRef<Path>, text: &str) -> Result<Self, ConfigError> {
        config::parse(file.as_ref(), text)
    }

    /// `bootstrap.servers` (overrides the file's).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap = servers.into();
        self
    }
    /// What the source records are (default [`SourceFormat::Decaton`]).
    pub fn format(mut self, format: SourceFormat) -> Self {
        self.format = format;
        self
    }
    /// The task's protobuf type; without one, records are opaque bytes.
    pub fn message_type(mut self, message: MessageDescriptor) -> Self {
        self.message = Some(message);
        self
    }
    /// Kafka transactions: derived records and source offsets commit together.
    pub fn exactly_once(mut self, on: bool) -> Self {
        self.exactly_once = on;
        self
    }
    /// The producer's `transactional.id` in exactly-once mode (default
    /// `<group>-replicator`). Each running instance needs its own, stable across restarts.
    pub fn transactional_id(mut self, id: impl Into<String>) -> Self {
        self.transactional_id = Some(id.into());
        self
    }
    /// Where bad records go (source key, value and headers, plus the dead-letter headers
    /// of `decaton_protocol::dead_letter`, so `decaton dlq` reads them); without one they
    /// are only counted.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }
    /// How often positions are committed (at-least-once) or transactions closed
    /// (exactly-once). Default 1 s.
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every;
        self
    }
    /// Source records per partition from the lowest unacknowledged one that may be in
    /// flight before the partition pauses (default 10000).
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }
    /// How long shutdown and revocation wait for in-flight derived records (default 30 s).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }
    /// A librdkafka setting for both the consumer and the producer, verbatim.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((key.into(), value.into()));
        self
    }
    /// A librdkafka setting for the consumer only.
    pub fn set_consumer(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer_settings.push((key.into(), value.into()));
        self
    }
    /// A librdkafka setting for the producer only.
    pub fn set_producer(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_settings.push((key.into(), value.into()));
        self
    }
    /// Adds a route.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }
    /// A Rust router, run on every decoded record besides the routes.
    pub fn router(
        mut self,
        f: impl Fn(&RecordView<'_>) -> Result<Vec<(String, DerivedRecord)>, String>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.router = Some(Arc::new(f));
        self
    }

    /// Compiles the routes and checks the settings.
    pub fn build(self) -> Result<Replicator, ReplicatorError> {
        if self.bootstrap.is_empty() {
            return Err(ReplicatorError::Settings(
                "bootstrap_servers is not set".into(),
            ));
        }
        if self.routes.is_empty() && self.router.is_none() {
            return Err(ReplicatorError::Settings("no route".into()));
        }
        let routes = self
            .routes
            .iter()
            .map(|r| {
                route::CompiledRoute::compile(r, self.message.as_ref()).map_err(|(_, reason, _)| {
                    ReplicatorError::Route {
                        route: r.display_name(),
                        reason,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut stats = metrics::SharedStats::default();
        for r in &routes {
            stats
                .routes
                .push((r.name.clone(), r.topic.clone(), r.counters.live.clone()));
        }
        let router_counters = self.router.as_ref().map(|_| {
            let c = metrics::RouteCounters::new("router");
            stats
                .routes
                .push(("router".into(), "*".into(), c.live.clone()));
            c
        });
        Ok(Replicator {
            handle: ReplicatorHandle {
                stop: Arc::new(AtomicBool::new(false)),
                stats: Arc::new(stats),
            },
            routes,
            router_counters,
            builder: self,
        })
    }
}

/// A configured replicator, ready to [`run`](Replicator::run).
pub struct Replicator {
    pub(crate) builder: ReplicatorBuilder,
    pub(crate) routes: Vec<route::CompiledRoute>,
    pub(crate) router_counters: Option<metrics::RouteCounters>,
    handle: ReplicatorHandle,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("builder", &self.builder)
            .finish_non_exhaustive()
    }
}

/// Stops a running replicator and reads its counts, from any thread.
#[derive(Debug, Clone)]
pub struct ReplicatorHandle {
    stop: Arc<AtomicBool>,
    stats: Arc<metrics::SharedStats>,
}

impl ReplicatorHandle {
    /// Asks the replicator to stop: it finishes in-flight records, commits, and returns.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
    }
    /// The counts so far.
    pub fn stats(&self) -> ReplicatorStats {
        self.stats.snapshot()
    }
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

impl Replicator {
    /// A builder for a replicator configured in code.
    pub fn builder(
        bootstrap_servers: impl Into<String>,
        source_topic: impl Into<String>,
        group: impl Into<String>,
    ) -> ReplicatorBuilder {
        ReplicatorBuilder::new(bootstrap_servers.into(), source_topic.into(), group.into())
    }

    /// A handle to stop the replicator and read its counts.
    pub fn handle(&self) -> ReplicatorHandle {
        self.handle.clone()
    }

    /// Runs until [`ReplicatorHandle::shutdown`] or a fatal error, on a dedicated thread;
    /// returns the final counts.
    pub async fn run(self) -> Result<ReplicatorStats, ReplicatorError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("decaton-replicator".into())
            .spawn(move || {
                let _ = tx.send(self.run_blocking());
            })
            .map_err(|e| {
                ReplicatorError::Settings(format!("cannot start the replicator thread: {e}"))
            })?;
        rx.await
            .map_err(|_| ReplicatorError::Delivery("the replicator thread panicked".into()))?
    }

    /// Runs on the calling thread (which it blocks) until shutdown or a fatal error.
    pub fn run_blocking(self) -> Result<ReplicatorStats, ReplicatorError> {
        let handle = self.handle.clone();
        pipeline::run(self, handle.clone())?;
        Ok(handle.stats())
    }
}
