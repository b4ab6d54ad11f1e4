//! A subscription: one consumer group running one processor over one topic.
//!
//! Each subscription owns a librdkafka consumer driven by a dedicated OS thread (the
//! *consumer thread*). It polls records, decodes them, and hands tasks to the partition's
//! lanes, which run on the tokio runtime (the machinery is in the private `runtime`
//! module). The thread is also
//! where every Kafka-side decision happens — rebalance callbacks, pause/resume, commits —
//! so none of them races another. Blocking there (waiting for a revoked partition's tasks,
//! a synchronous commit) never blocks a lane.
//!
//! Several subscriptions in one process share nothing but the tokio runtime: a processor
//! whose storage is down stalls its own subscription and no other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use tokio::runtime::Handle;

use crate::config::ProcessorProperties;
use crate::runtime::commit::Committer;
use crate::runtime::consumer::RuntimeContext;
use crate::runtime::extract::Extractor;
use crate::runtime::forward::{Forwarder, RetryQueue};
use crate::runtime::kafka_config;
use crate::runtime::partitions::Partitions;
use crate::runtime::pipeline::{Pipeline, Shaping};
use crate::runtime::quota::{QuotaRuntime, ShapingState};
use crate::runtime::recorder::SubscriptionRecorder;
use crate::runtime::state::StateRuntime;
use crate::runtime::topics::Topics;
use crate::runtime::wakeup::Wakeup;
use crate::runtime::RuntimeCore;
use crate::stats::{Counters, SubscriptionStats};
use crate::{
    DeadLetterConfig, LiveProperties, PropertySupplier, QuotaConfig, RetryConfig, TaskProcessor,
};

/// Why a subscription could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// The builder was missing something or had an invalid value.
    #[error("invalid subscription configuration: {0}")]
    Config(String),
    /// librdkafka rejected the configuration or the subscription.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The state store could not be set up.
    #[error("state: {0}")]
    State(#[from] decaton_state::StateError),
    /// The consumer thread died.
    #[error("consumer thread failed: {0}")]
    Thread(String),
}

/// Builds a [`Subscription`].
pub struct SubscriptionBuilder<T, P> {
    id: String,
    processor: P,
    bootstrap: Option<String>,
    topic: Option<String>,
    properties: ProcessorProperties,
    kafka: BTreeMap<String, String>,
    state: Option<decaton_state::StateConfig>,
    retry: Option<RetryConfig>,
    dead_letter: Option<DeadLetterConfig>,
    quota: Option<QuotaConfig>,
    live: Option<LiveProperties>,
    supplier: Option<Box<dyn PropertySupplier>>,
    _task: std::marker::PhantomData<fn(T)>,
}

impl<T, P> SubscriptionBuilder<T, P>
where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
    /// The cluster to consume from (`bootstrap.servers`).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap = Some(servers.into());
        self
    }

    /// The topic whose tasks this subscription runs.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Runtime properties (concurrency, backpressure, timeouts).
    pub fn properties(mut self, properties: ProcessorProperties) -> Self {
        self.properties = properties;
        self
    }

    /// Sets a librdkafka consumer property verbatim; it overrides the runtime's defaults
    /// (`enable.auto.commit=false`, `enable.auto.offset.store=false`,
    /// `auto.offset.reset=earliest`). `group.id` is the subscription id and cannot be set.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.insert(key.into(), value.into());
        self
    }

    /// Gives the processor partition-local state ([`ProcessingContext::state`](crate::ProcessingContext::state)),
    /// kept under `config.state_dir` and replicated to the changelog topic
    /// `<subscription>-<store>-changelog`.
    pub fn state_store(mut self, config: decaton_state::StateConfig) -> Self {
        self.state = Some(config);
        self
    }

    /// Reads its properties from `live`, so the reloadable ones (see [`LiveProperties`])
    /// can change while it runs; replaces [`properties`](Self::properties). Keep a clone
    /// to change them.
    pub fn live_properties(mut self, live: LiveProperties) -> Self {
        self.properties = (*live.get()).clone();
        self.live = Some(live);
        self
    }

    /// Takes property changes from `supplier` (for example a [`FileProperties`](crate::FileProperties))
    /// while running; it is started when the subscription starts, over the properties
    /// given so far.
    pub fn property_supplier(mut self, supplier: impl PropertySupplier) -> Self {
        self.supplier = Some(Box::new(supplier));
        self
    }

    /// Retries failed tasks (see [`RetryConfig`]); the retry topic must exist.
    pub fn retry(mut self, config: RetryConfig) -> Self {
        self.retry = Some(config);
        self
    }

    /// Keeps tasks that fail for good in a dead-letter topic (see [`DeadLetterConfig`]);
    /// the topic must exist.
    pub fn dead_letter(mut self, config: DeadLetterConfig) -> Self {
        self.dead_letter = Some(config);
        self
    }

    /// Gives every key a quota (see [`QuotaConfig`]): tasks of a key over it are shaped
    /// to the shaping topic, which must exist with as many partitions as the source
    /// topic. The quota is the property `per_key_quota_processing_rate`.
    pub fn per_key_quota(mut self, config: QuotaConfig) -> Self {
        self.quota = Some(config);
        self
    }

    /// Validates and creates the subscription (nothing is contacted yet).
    pub fn build(mut self) -> Result<Subscription<T, P>, SubscriptionError> {
        let bootstrap = self
            .bootstrap
            .ok_or_else(|| SubscriptionError::Config("bootstrap_servers is required".into()))?;
        let topic = self
            .topic
            .ok_or_else(|| SubscriptionError::Config("topic is required".into()))?;
        if self.id.is_empty() {
            return Err(SubscriptionError::Config(
                "subscription id must not be empty".into(),
            ));
        }
        if self.kafka.contains_key("group.id") {
            return Err(SubscriptionError::Config(
                "group.id is the subscription id; do not set it".into(),
            ));
        }
        // Live properties, when given, are the properties (the last word on them).
        let live = match self.live.take() {
            Some(live) => {
                self.properties = (*live.get()).clone();
                live
            }
            None => LiveProperties::new(self.properties.clone()),
        };
        self.properties
            .validate()
            .map_err(|e| SubscriptionError::Config(e.to_string()))?;
        if self.properties.mode == crate::SchedulingMode::PerKey && self.processor.needs_lanes() {
            return Err(SubscriptionError::Config(
                "a per-lane processor scope needs bounded mode: in per-key mode every key is \
                 a lane of its own"
                    .into(),
            ));
        }
        let retry_topic = self
            .retry
            .as_ref()
            .filter(|r| r.queue)
            .map(|r| r.topic.clone().unwrap_or_else(|| format!("{topic}-retry")));
        if let (Some(r), Some(rt)) = (&self.retry, &retry_topic) {
            if self.state.is_some() {
                return Err(SubscriptionError::Config(
                    "a retry topic cannot be combined with a state store: a retried task may be \
                     read by another instance than the one owning its state partition \
                     (use RetryConfig::without_queue for retries in the lane)"
                        .into(),
                ));
            }
            if rt == &topic {
                return Err(SubscriptionError::Config(
                    "the retry topic must differ from the source topic".into(),
                ));
            }
            if r.backoff.longest() > self.properties.max_scheduled_delay {
                return Err(SubscriptionError::Config(format!(
                    "the retry backoff can reach {:?}, more than max_scheduled_delay ({:?}): \
                     retried tasks would be discarded",
                    r.backoff.longest(),
                    self.properties.max_scheduled_delay
                )));
            }
        }
        let shaping_topic = self.quota.as_ref().map(|q| {
            q.topic
                .clone()
                .unwrap_or_else(|| format!("{topic}-shaping"))
        });
        if let (Some(q), Some(st)) = (&self.quota, &shaping_topic) {
            if self.state.is_some() {
                return Err(SubscriptionError::Config(
                    "a per-key quota cannot be combined with a state store: a shaped task may \
                     be read by another instance than the one owning its state partition"
                        .into(),
                ));
            }
            if st == &topic || retry_topic.as_ref() == Some(st) {
                return Err(SubscriptionError::Config(
                    "the shaping topic must differ from the source and retry topics".into(),
                ));
            }
            if q.window.is_zero() {
                return Err(SubscriptionError::Config(
                    "the quota window must not be zero".into(),
                ));
            }
            if q.shaping_rate < -1 || q.shaping_rate == 0 {
                return Err(SubscriptionError::Config(format!(
                    "shaping_rate {} would never process the shaping topic (-1 or N > 0)",
                    q.shaping_rate
                )));
            }
            if let Some(strategy) = self.kafka.get("partition.assignment.strategy") {
                if !strategy.trim_start().starts_with("range") {
                    tracing::warn!(subscription = %self.id, strategy = %strategy,
                        "with a per-key quota, an assignor other than range may give a key's \
                         source and shaping partitions to different instances: its order then \
                         holds only while neither moves (see docs/shaping.md)");
                }
            }
            if q.max_shaped_keys == 0 {
                return Err(SubscriptionError::Config(
                    "max_shaped_keys must be at least 1".into(),
                ));
            }
        }
        let dead_letter_topic = self
            .dead_letter
            .as_ref()
            .map(|d| d.topic.clone().unwrap_or_else(|| format!("{topic}-dlq")));
        if dead_letter_topic.as_ref().is_some_and(|d| d == &topic) {
            return Err(SubscriptionError::Config(
                "the dead-letter topic must differ from the source topic".into(),
            ));
        }
        Ok(Subscription {
            id: self.id,
            processor: Arc::new(self.processor),
            bootstrap,
            topic,
            properties: self.properties,
            kafka: self.kafka,
            state: self.state,
            failures: Failures {
                retry: self.retry,
                retry_topic,
                dead_letter_topic,
                quota: self.quota,
                shaping_topic,
            },
            live,
            supplier: Mutex::new(self.supplier),
            handle: SubscriptionHandle {
                inner: Arc::new(HandleInner::default()),
            },
            _task: std::marker::PhantomData,
        })
    }
}

#[derive(Default)]
struct HandleInner {
    shutdown: AtomicBool,
    counters: Arc<Counters>,
    health: Arc<crate::health::HealthBoard>,
}

/// Controls a running subscription from elsewhere: shutdown and live counters. Cheap to
/// clone.
#[derive(Clone)]
pub struct SubscriptionHandle {
    inner: Arc<HandleInner>,
}

impl SubscriptionHandle {
    /// Asks the subscription to stop: it stops fetching, waits for dispatched tasks up to
    /// `shutdown_timeout`, commits, and leaves the group; then `run` returns.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::Release);
    }

    /// Current counters.
    pub fn stats(&self) -> SubscriptionStats {
        self.inner.counters.snapshot()
    }

    /// Health as the consumer thread last published it (a few times a second): whether
    /// it joined its group, when its loop last turned, and every owned partition.
    pub fn health(&self) -> crate::SubscriptionHealth {
        self.inner.health.snapshot()
    }
}

impl std::fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Where failed and shaped tasks go, from the builder.
struct Failures {
    retry: Option<RetryConfig>,
    retry_topic: Option<String>,
    dead_letter_topic: Option<String>,
    quota: Option<QuotaConfig>,
    shaping_topic: Option<String>,
}

/// One processor's subscription to one topic: its own consumer group (the subscription
/// id), so it progresses independently of every other subscription.
///
/// ```no_run
/// # use decaton_processor::*;
/// # use decaton_protocol::ChatOp;
/// # struct Noop;
/// # #[async_trait] impl TaskProcessor<ChatOp> for Noop {
/// #   async fn process(&self, _: &ProcessingContext, _: ChatOp) -> Result<(), ProcessError> { Ok(()) } }
/// # async fn demo() -> Result<(), SubscriptionError> {
/// let mut props = ProcessorProperties::default();
/// props.partition_concurrency = 8;
/// let subscription = Subscription::builder("chat-notifier", Noop)
///     .bootstrap_servers("127.0.0.1:9092")
///     .topic("chat-ops")
///     .properties(props)
///     .build()?;
/// let handle = subscription.handle();
/// tokio::spawn(async move {
///     tokio::signal::ctrl_c().await.ok();
///     handle.shutdown();
/// });
/// let summary = subscription.run().await?;
/// println!("processed {}", summary.processed);
/// # Ok(()) }
/// ```
pub struct Subscription<T, P> {
    id: String,
    processor: Arc<P>,
    bootstrap: String,
    topic: String,
    properties: ProcessorProperties,
    kafka: BTreeMap<String, String>,
    state: Option<decaton_state::StateConfig>,
    failures: Failures,
    live: LiveProperties,
    supplier: Mutex<Option<Box<dyn PropertySupplier>>>,
    handle: SubscriptionHandle,
    _task: std::marker::PhantomData<fn(T)>,
}

impl<T, P> Subscription<T, P>
where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
    /// Starts building subscription `id` (its consumer group id) running `processor`.
    pub fn builder(id: impl Into<String>, processor: P) -> SubscriptionBuilder<T, P> {
        SubscriptionBuilder {
            id: id.into(),
            processor,
            bootstrap: None,
            topic: None,
            properties: ProcessorProperties::default(),
            kafka: BTreeMap::new(),
            state: None,
            retry: None,
            dead_letter: None,
            quota: None,
            live: None,
            supplier: None,
            _task: std::marker::PhantomData,
        }
    }

    /// A handle to shut the subscription down and read its counters.
    pub fn handle(&self) -> SubscriptionHandle {
        self.handle.clone()
    }

    /// The subscription id (= consumer group id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs until [`SubscriptionHandle::shutdown`], then returns the final counters.
    /// Must be called within a tokio runtime; lanes run on it.
    pub async fn run(self) -> Result<SubscriptionStats, SubscriptionError> {
        let runtime = Handle::current();
        let topics = Topics::new(&self.topic, self.failures.retry_topic.as_deref())
            .with_shaping(self.failures.shaping_topic.as_deref());
        let subscription: Arc<str> = Arc::from(self.id.as_str());
        let counters = self.handle.inner.counters.clone();
        let recorder = Arc::new(SubscriptionRecorder::new(subscription.clone(), counters));
        let state = match &self.state {
            Some(cfg) => {
                let s = Arc::new(StateRuntime::new(
                    cfg.clone(),
                    &self.id,
                    &self.bootstrap,
                    &self.kafka,
                    runtime.clone(),
                    recorder.clone(),
                )?);
                s.ensure_changelog(&self.topic).await;
                Some(s)
            }
            None => None,
        };
        let forwarder = self.forwarder(&subscription, &topics, &runtime).await?;
        if let Some(supplier) = self.supplier.lock().take() {
            supplier
                .start(self.live.clone())
                .map_err(|e| SubscriptionError::Config(e.to_string()))?;
        }
        let in_process = self
            .failures
            .retry
            .as_ref()
            .map_or((0, crate::Backoff::fixed(std::time::Duration::ZERO)), |r| {
                (r.in_process_attempts, r.in_process_backoff)
            });
        let quota = self.failures.quota.clone().map(|config| {
            Arc::new(QuotaRuntime {
                state: Arc::new(ShapingState::new(config.max_shaped_keys, &self.id)),
                config,
            })
        });
        let shaping_index = self
            .failures
            .shaping_topic
            .as_deref()
            .and_then(|t| topics.id(t, 0))
            .map(|id| id.topic);
        let runner = Arc::new(Pipeline {
            processor: self.processor.clone(),
            subscription: subscription.clone(),
            live: self.live.clone(),
            state: state.clone(),
            forwarder: forwarder.clone(),
            in_process,
            shaping: quota.as_ref().zip(shaping_index).map(|(q, topic)| Shaping {
                state: q.state.clone(),
                topic,
            }),
            _task: std::marker::PhantomData,
        });
        let core = Arc::new(RuntimeCore {
            recorder,
            topics: topics.clone(),
            committer: Committer::new(
                self.properties.offset_map,
                self.properties.offset_map_max_bytes,
            ),
            extractor: Extractor::new(
                &self.properties,
                forwarder.is_some() || in_process.0 > 0 || quota.is_some(),
                forwarder.clone().filter(|f| f.dead_letter.is_some()),
            )
            .with_live(self.live.clone()),
            live: self.live.clone(),
            props: self.properties.clone(),
            partitions: Mutex::new(Partitions::default()),
            runner,
            runtime,
            state,
            wakeup: Arc::new(Wakeup::default()),
            quota,
            health: self.handle.inner.health.clone(),
        });
        let consumer: BaseConsumer<RuntimeContext<T>> =
            kafka_config::consumer(&self.bootstrap, &self.id, &self.kafka)
                .create_with_context(RuntimeContext { core: core.clone() })?;
        let names: Vec<&str> = topics.all().iter().map(|t| &**t).collect();
        consumer.subscribe(&names)?;
        let shutdown = self.handle.inner.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("decaton-{}", self.id))
            .spawn(move || {
                core.run_loop(&consumer, &shutdown.shutdown);
                core.shutdown(&consumer);
                consumer.unsubscribe();
                drop(consumer);
                let _ = done_tx.send(core.recorder.counters().snapshot());
            })
            .map_err(|e| SubscriptionError::Thread(e.to_string()))?;
        done_rx
            .await
            .map_err(|_| SubscriptionError::Thread("consumer thread panicked".into()))
    }

    /// The producer of retry, dead-letter and shaping records, once every topic it writes to is
    /// known to exist; none when failures are not forwarded.
    async fn forwarder(
        &self,
        subscription: &Arc<str>,
        topics: &Topics,
        runtime: &Handle,
    ) -> Result<Option<Arc<Forwarder>>, SubscriptionError> {
        let f = &self.failures;
        if f.retry_topic.is_none() && f.dead_letter_topic.is_none() && f.shaping_topic.is_none() {
            return Ok(None);
        }
        let producer: FutureProducer =
            kafka_config::producer(&self.bootstrap, &self.kafka).create()?;
        let wanted: Vec<String> = f
            .retry_topic
            .iter()
            .chain(f.dead_letter_topic.iter())
            .chain(f.shaping_topic.iter())
            .cloned()
            .collect();
        let probe = kafka_config::probe(&self.bootstrap, &self.kafka);
        let missing = tokio::task::spawn_blocking(move || {
            // A consumer asking with auto-creation off: a producer's metadata request may
            // create the topic on brokers that allow it.
            let consumer: BaseConsumer = probe.create()?;
            let mut missing = Vec::new();
            for t in wanted {
                let md = consumer.fetch_metadata(Some(&t), std::time::Duration::from_secs(10))?;
                let found = md.topics().iter().any(|mt| {
                    mt.name() == t && mt.error().is_none() && !mt.partitions().is_empty()
                });
                if !found {
                    missing.push(t);
                }
            }
            Ok::<_, rdkafka::error::KafkaError>(missing)
        })
        .await
        .map_err(|e| SubscriptionError::Thread(e.to_string()))??;
        if !missing.is_empty() {
            return Err(SubscriptionError::Config(format!(
                "topic(s) {} do not exist: create them like the source topic",
                missing.join(", ")
            )));
        }
        Ok(Some(Arc::new(Forwarder {
            producer,
            subscription: subscription.clone(),
            origin: topics.source().clone(),
            retry: f
                .retry
                .as_ref()
                .zip(f.retry_topic.as_ref())
                .map(|(r, t)| RetryQueue {
                    topic: t.clone(),
                    backoff: r.backoff,
                    max_retries: r.max_retries,
                }),
            dead_letter: f.dead_letter_topic.clone(),
            shaping: f.shaping_topic.clone(),
            runtime: runtime.clone(),
        })))
    }
}
