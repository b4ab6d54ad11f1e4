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
use crate::{LiveProperties, PropertySupplier, QuotaConfig, RetryConfig, TaskProcessor};

mod builder;

pub use builder::SubscriptionBuilder;

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
        SubscriptionBuilder::new(id.into(), processor)
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
            )
            .with_offset_reset(self.kafka.get("auto.offset.reset").map(String::as_str)),
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
        let producer_config = kafka_config::producer(&self.bootstrap, &self.kafka);
        let producer: FutureProducer = producer_config.create()?;
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
            max_message_bytes: crate::runtime::forward::message_limit(&producer_config),
        })))
    }
}
