//! A subscription: one consumer group running one processor over one topic.
//!
//! Each subscription owns a librdkafka consumer driven by a dedicated OS thread (the
//! *consumer thread*). It polls records, decodes them, and hands tasks to the partition's
//! [scheduler](crate::scheduler), whose lanes run on the tokio runtime. The thread is also
//! where every Kafka-side decision happens — rebalance callbacks, pause/resume, commits —
//! so none of them races another. Blocking there (waiting for a revoked partition's tasks,
//! a synchronous commit) never blocks a lane.
//!
//! Several subscriptions in one process share nothing but the tokio runtime: a processor
//! whose storage is down stalls its own subscription and no other.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_protocol::{decode_record, METADATA_HEADER};
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::config::ProcessorProperties;
use crate::offsets::{decode_offset_map, OffsetTracker};
use crate::partition::PartitionShared;
use crate::scheduler::{PartitionScheduler, TaskUnit, Worker};
use crate::state::StateRuntime;
use crate::stats::{Counters, SubscriptionStats};
use crate::TaskProcessor;

/// Why a subscription could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
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

    /// Validates and creates the subscription (nothing is contacted yet).
    pub fn build(self) -> Result<Subscription<T, P>, SubscriptionError> {
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
        if self.properties.partition_concurrency == 0 || self.properties.max_pending == 0 {
            return Err(SubscriptionError::Config(
                "partition_concurrency and max_pending must be > 0".into(),
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
}

impl std::fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("stats", &self.stats())
            .finish()
    }
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
        let subscription: Arc<str> = Arc::from(self.id.as_str());
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", &self.id)
            .set("client.id", &self.id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        for (k, v) in &self.kafka {
            config.set(k, v);
        }
        let counters = self.handle.inner.counters.clone();
        let state = match &self.state {
            Some(cfg) => {
                let s = Arc::new(StateRuntime::new(
                    cfg.clone(),
                    &self.id,
                    &self.bootstrap,
                    &self.kafka,
                    runtime.clone(),
                    counters.clone(),
                )?);
                s.ensure_changelog(&self.topic).await;
                Some(s)
            }
            None => None,
        };
        let worker = Arc::new(Worker {
            processor: self.processor.clone(),
            subscription: subscription.clone(),
            counters: counters.clone(),
            deferred_timeout: self.properties.deferred_complete_timeout,
            hook: state
                .clone()
                .map(|s| s as Arc<dyn crate::context::CompletionHook>),
            _task: std::marker::PhantomData,
        });
        let core = Arc::new(RuntimeCore {
            subscription: subscription.clone(),
            topic: Arc::from(self.topic.as_str()),
            props: self.properties.clone(),
            worker,
            runtime: runtime.clone(),
            partitions: Mutex::new(HashMap::new()),
            counters,
            paused_gauge: crate::metrics::paused_partitions(&self.id),
            metadata_support: AtomicU8::new(METADATA_UNKNOWN),
            state,
        });
        let consumer: BaseConsumer<RuntimeContext<T, P>> =
            config.create_with_context(RuntimeContext { core: core.clone() })?;
        consumer.subscribe(&[&self.topic])?;
        let shutdown = self.handle.inner.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("decaton-{}", self.id))
            .spawn(move || {
                consumer_loop(&consumer, &core, &shutdown);
                core.shutdown(&consumer);
                consumer.unsubscribe();
                drop(consumer);
                let _ = done_tx.send(core.counters.snapshot());
            })
            .map_err(|e| SubscriptionError::Thread(e.to_string()))?;
        done_rx
            .await
            .map_err(|_| SubscriptionError::Thread("consumer thread panicked".into()))
    }
}

const METADATA_UNKNOWN: u8 = 0;
const METADATA_SUPPORTED: u8 = 1;
const METADATA_UNSUPPORTED: u8 = 2;

/// A record's fate once decoded.
enum Incoming<T> {
    Task(TaskUnit<T>),
    /// Completes without running (undecodable, ignored key, already done).
    Skip(i64),
}

impl<T> Incoming<T> {
    fn offset(&self) -> i64 {
        match self {
            Incoming::Task(u) => u.offset,
            Incoming::Skip(o) => *o,
        }
    }
}

struct PartitionEntry<T> {
    shared: Arc<PartitionShared>,
    scheduler: PartitionScheduler<T>,
    /// Fetched records waiting for room under `max_pending` (the partition is paused).
    overflow: VecDeque<Incoming<T>>,
    paused: bool,
    /// Offsets above the committed position known to be done already (offset map, or
    /// the state store's applied tasks).
    already_done: HashSet<i64>,
    /// Not dispatchable until the state store is restored.
    ready: Arc<AtomicBool>,
    last_committed: Option<(i64, String)>,
    state: Option<Arc<crate::state::StateSlot>>,
}

pub(crate) struct RuntimeCore<T, P> {
    subscription: Arc<str>,
    topic: Arc<str>,
    props: ProcessorProperties,
    worker: Arc<Worker<T, P>>,
    runtime: Handle,
    partitions: Mutex<HashMap<i32, PartitionEntry<T>>>,
    counters: Arc<Counters>,
    paused_gauge: metrics::Gauge,
    metadata_support: AtomicU8,
    state: Option<Arc<StateRuntime>>,
}

struct RuntimeContext<T, P> {
    core: Arc<RuntimeCore<T, P>>,
}

impl<T, P> ClientContext for RuntimeContext<T, P>
where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
}

impl<T, P> ConsumerContext for RuntimeContext<T, P>
where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = self.core.own_partitions(tpl);
            self.core
                .revoke(consumer, &parts, self.core.props.rebalance_timeout, false);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = self.core.own_partitions(tpl);
                self.core.assign(consumer, &parts);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(subscription = %self.core.subscription, "rebalance error: {e}")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(subscription = %self.core.subscription, "commit of {} partitions failed: {e}", offsets.count());
            // Forget what we believed committed so the next round sends it again.
            let mut parts = self.core.partitions.lock();
            for e in offsets
                .elements()
                .iter()
                .filter(|e| e.topic() == &*self.core.topic)
            {
                if let Some(entry) = parts.get_mut(&e.partition()) {
                    entry.last_committed = None;
                }
            }
        }
    }
}

fn consumer_loop<T, P>(
    consumer: &BaseConsumer<RuntimeContext<T, P>>,
    core: &Arc<RuntimeCore<T, P>>,
    shutdown: &HandleInner,
) where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
    let mut last_commit = Instant::now();
    let mut last_flow = Instant::now();
    let mut throttled = false;
    while !shutdown.shutdown.load(Ordering::Acquire) {
        let timeout = if throttled {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(50)
        };
        match consumer.poll(timeout) {
            Some(Ok(msg)) => throttled |= core.on_message(&msg),
            Some(Err(e)) => {
                tracing::warn!(subscription = %core.subscription, "consumer error: {e}")
            }
            None => {}
        }
        if throttled || last_flow.elapsed() >= Duration::from_millis(20) {
            throttled = core.flow_control(consumer);
            last_flow = Instant::now();
        }
        if last_commit.elapsed() >= core.props.commit_interval {
            core.commit(consumer, CommitMode::Async);
            last_commit = Instant::now();
        }
    }
}

impl<T, P> RuntimeCore<T, P>
where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
    /// The partitions of this subscription's topic in `tpl`.
    fn own_partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == &*self.topic)
            .map(|e| e.partition())
            .collect()
    }

    /// Takes one record; returns true when it had to wait in the overflow (flow control
    /// should run soon).
    fn on_message(&self, msg: &BorrowedMessage<'_>) -> bool {
        if msg.topic() != &*self.topic {
            return false;
        }
        let offset = msg.offset();
        let mut parts = self.partitions.lock();
        let Some(entry) = parts.get_mut(&msg.partition()) else {
            tracing::debug!(
                partition = msg.partition(),
                offset,
                "record for a partition not assigned here; ignored"
            );
            return false;
        };
        let incoming = self.decode(entry, msg);
        if entry.overflow.is_empty() && entry.ready.load(Ordering::Acquire) && self.has_room(entry)
        {
            self.dispatch(entry, incoming);
            false
        } else {
            entry.overflow.push_back(incoming);
            true
        }
    }

    fn decode(&self, entry: &PartitionEntry<T>, msg: &BorrowedMessage<'_>) -> Incoming<T> {
        let offset = msg.offset();
        let shared = &entry.shared;
        let header = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == METADATA_HEADER)
                .map(|h| h.value.unwrap_or_default())
        });
        let discard = |what: &dyn std::fmt::Display| {
            tracing::warn!(subscription = %self.subscription, topic = %shared.topic, partition = shared.partition, offset,
                "discarding undecodable record: {what}");
            shared.metrics.discarded.increment(1);
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
            Incoming::Skip(offset)
        };
        let record = match decode_record(header, msg.payload()) {
            Ok(r) => r,
            Err(e) => return discard(&e),
        };
        let task = match T::decode(&*record.task) {
            Ok(t) => t,
            Err(e) => return discard(&format_args!("task bytes: {e}")),
        };
        let key = msg.key().filter(|k| !k.is_empty());
        if let Some(k) = key {
            if !self.props.ignore_keys.is_empty()
                && self.props.ignore_keys.iter().any(|i| i.as_bytes() == k)
            {
                shared.metrics.discarded.increment(1);
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                return Incoming::Skip(offset);
            }
        }
        Incoming::Task(TaskUnit {
            partition: shared.clone(),
            offset,
            key: key.map(Arc::from),
            metadata: record.metadata,
            task,
            state: None,
        })
    }

    fn has_room(&self, entry: &PartitionEntry<T>) -> bool {
        entry.shared.core.lock().tracker.span() < self.props.max_pending
    }

    fn dispatch(&self, entry: &mut PartitionEntry<T>, incoming: Incoming<T>) {
        let offset = incoming.offset();
        let skip_done = entry.already_done.remove(&offset)
            || entry.state.as_ref().is_some_and(|s| s.is_applied(offset));
        let mut core = entry.shared.core.lock();
        if !core.tracker.register(offset) {
            return; // a redelivery of something already registered
        }
        match incoming {
            Incoming::Task(_) if skip_done => {
                core.tracker.complete(offset);
                drop(core);
                entry.shared.metrics.skipped.increment(1);
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            }
            Incoming::Skip(_) => {
                core.tracker.complete(offset);
            }
            Incoming::Task(mut unit) => {
                core.dispatched += 1;
                entry
                    .shared
                    .metrics
                    .pending
                    .set(core.tracker.unfinished() as f64);
                drop(core);
                unit.state = entry.state.as_ref().and_then(|s| s.task_state());
                entry.scheduler.dispatch(unit, &self.worker, &self.runtime);
            }
        }
    }

    /// Moves overflow into the lanes while there is room; pauses or resumes partitions.
    /// Returns whether any partition is throttled (so the loop polls more often).
    fn flow_control(&self, consumer: &BaseConsumer<RuntimeContext<T, P>>) -> bool {
        let mut throttled = false;
        let mut parts = self.partitions.lock();
        for entry in parts.values_mut() {
            if entry.ready.load(Ordering::Acquire) {
                while !entry.overflow.is_empty() && self.has_room(entry) {
                    if let Some(incoming) = entry.overflow.pop_front() {
                        self.dispatch(entry, incoming);
                    }
                }
            }
            let want_paused = !entry.overflow.is_empty()
                || !self.has_room(entry)
                || !entry.ready.load(Ordering::Acquire);
            if want_paused != entry.paused {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&self.topic, entry.shared.partition);
                let result = if want_paused {
                    consumer.pause(&tpl)
                } else {
                    consumer.resume(&tpl)
                };
                if let Err(e) = result {
                    tracing::warn!(
                        partition = entry.shared.partition,
                        "pause/resume failed: {e}"
                    );
                }
                self.pause(entry, want_paused);
            }
            throttled |= entry.paused;
        }
        throttled
    }

    /// Records the paused state after `flow_control` paused or resumed the partition.
    fn pause(&self, entry: &mut PartitionEntry<T>, paused: bool) {
        if entry.paused == paused {
            return;
        }
        entry.paused = paused;
        if paused {
            self.counters.pauses.fetch_add(1, Ordering::Relaxed);
            self.counters
                .paused_partitions
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters
                .paused_partitions
                .fetch_sub(1, Ordering::Relaxed);
        }
        self.paused_gauge
            .set(self.counters.paused_partitions.load(Ordering::Relaxed) as f64);
    }

    /// Commits every owned partition whose position or offset map changed.
    fn commit(&self, consumer: &BaseConsumer<RuntimeContext<T, P>>, mode: CommitMode) {
        let use_map = self.props.offset_map
            && self.metadata_support.load(Ordering::Acquire) != METADATA_UNSUPPORTED;
        let mut tpl = TopicPartitionList::new();
        let mut probe: Option<(i32, String)> = None;
        {
            let mut parts = self.partitions.lock();
            for entry in parts.values_mut() {
                let core = entry.shared.core.lock();
                let Some(position) = core.tracker.position() else {
                    continue;
                };
                let map = if use_map {
                    core.tracker.offset_map(self.props.offset_map_max_bytes)
                } else {
                    String::new()
                };
                drop(core);
                let commit = (position, map);
                if entry.last_committed.as_ref() == Some(&commit) {
                    continue;
                }
                if !commit.1.is_empty()
                    && probe.is_none()
                    && self.metadata_support.load(Ordering::Acquire) == METADATA_UNKNOWN
                {
                    probe = Some((entry.shared.partition, commit.1.clone()));
                }
                if tpl
                    .add_partition_offset(
                        &self.topic,
                        entry.shared.partition,
                        Offset::Offset(commit.0),
                    )
                    .is_ok()
                {
                    if let Some(mut e) = tpl.find_partition(&self.topic, entry.shared.partition) {
                        e.set_metadata(commit.1.clone());
                    }
                    entry.shared.metrics.committed.set(commit.0 as f64);
                    entry.last_committed = Some(commit);
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        // The first commit carrying an offset map is synchronous and read back, to learn
        // whether this broker keeps commit metadata at all.
        let mode = if probe.is_some() {
            CommitMode::Sync
        } else {
            mode
        };
        if let Err(e) = consumer.commit(&tpl, mode) {
            tracing::warn!(subscription = %self.subscription, "commit failed: {e}");
            // Forget what we think is committed so the next round retries.
            let mut parts = self.partitions.lock();
            for e in tpl.elements() {
                if let Some(entry) = parts.get_mut(&e.partition()) {
                    entry.last_committed = None;
                }
            }
            return;
        }
        if let Some((partition, sent)) = probe {
            self.probe_metadata_support(consumer, partition, &sent);
        }
    }

    fn probe_metadata_support(
        &self,
        consumer: &BaseConsumer<RuntimeContext<T, P>>,
        partition: i32,
        sent: &str,
    ) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(back) => {
                let got = back
                    .find_partition(&self.topic, partition)
                    .map(|e| e.metadata().to_string())
                    .unwrap_or_default();
                if got.is_empty() {
                    self.metadata_support
                        .store(METADATA_UNSUPPORTED, Ordering::Release);
                    tracing::warn!(subscription = %self.subscription,
                        "the broker does not return offset-commit metadata; offset map disabled, committing positions only \
                         (tasks finished above the position will run again after a partition moves)");
                } else {
                    self.metadata_support
                        .store(METADATA_SUPPORTED, Ordering::Release);
                    if got != sent {
                        tracing::debug!("committed metadata changed since the probe commit");
                    }
                }
            }
            Err(e) => tracing::debug!("could not read back committed offsets: {e}"),
        }
    }

    fn assign(&self, consumer: &BaseConsumer<RuntimeContext<T, P>>, partitions: &[i32]) {
        if partitions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(subscription = %self.subscription, "could not read committed offsets: {e}; starting from positions only");
                TopicPartitionList::new()
            }
        };
        let mut parts = self.partitions.lock();
        for &p in partitions {
            if parts.contains_key(&p) {
                continue;
            }
            let (position, metadata) = match committed.find_partition(&self.topic, p) {
                Some(e) => match e.offset() {
                    Offset::Offset(o) => (Some(o), e.metadata().to_string()),
                    _ => (None, String::new()),
                },
                None => (None, String::new()),
            };
            let mut already_done: HashSet<i64> = HashSet::new();
            if self.props.offset_map {
                if let Some(o) = position {
                    if let Some(done) = decode_offset_map(o, &metadata) {
                        already_done.extend(done);
                    }
                }
            }
            let shared = Arc::new(PartitionShared::new(
                &self.subscription,
                self.topic.clone(),
                p,
                OffsetTracker::starting_at(position),
            ));
            let ready = Arc::new(AtomicBool::new(true));
            let state = self
                .state
                .as_ref()
                .map(|s| s.open_partition(&self.topic, p, ready.clone()));
            tracing::info!(subscription = %self.subscription, topic = %self.topic, partition = p, ?position,
                skipping = already_done.len(), "partition assigned");
            parts.insert(
                p,
                PartitionEntry {
                    shared,
                    scheduler: PartitionScheduler::new(&self.props, &self.worker, &self.runtime),
                    overflow: VecDeque::new(),
                    paused: false,
                    already_done,
                    ready,
                    last_committed: position.map(|o| (o, metadata)),
                    state,
                },
            );
        }
        self.counters
            .assigned_partitions
            .store(parts.len() as u64, Ordering::Relaxed);
    }

    /// Stops dispatching `partitions`, waits up to `timeout` for their tasks (running ones
    /// only on revocation; every dispatched one on shutdown), commits their positions and
    /// forgets them.
    fn revoke(
        &self,
        consumer: &BaseConsumer<RuntimeContext<T, P>>,
        partitions: &[i32],
        timeout: Duration,
        drain: bool,
    ) {
        let deadline = Instant::now() + timeout;
        let shared: Vec<Arc<PartitionShared>> = {
            let parts = self.partitions.lock();
            partitions
                .iter()
                .filter_map(|p| parts.get(p).map(|e| e.shared.clone()))
                .collect()
        };
        if shared.is_empty() {
            return;
        }
        if !drain {
            for s in &shared {
                s.core.lock().revoked = true;
            }
        }
        for s in &shared {
            let finished = if drain {
                s.wait_until(deadline, |c| c.dispatched == 0)
            } else {
                s.wait_until(deadline, |c| c.running == 0)
            };
            let mut core = s.core.lock();
            core.revoked = true;
            if !finished && core.running > 0 {
                self.counters
                    .abandoned
                    .fetch_add(core.running as u64, Ordering::Relaxed);
                tracing::warn!(subscription = %self.subscription, partition = s.partition, running = core.running,
                    "tasks still running after the timeout are abandoned; their completion will commit nothing");
            }
            core.closed = true;
        }
        {
            // The final commit of a released partition is always sent, even if an earlier
            // asynchronous commit of the same position is believed to have succeeded.
            let mut parts = self.partitions.lock();
            for s in &shared {
                if let Some(entry) = parts.get_mut(&s.partition) {
                    entry.last_committed = None;
                }
            }
        }
        // Everything is frozen: commit the final positions synchronously.
        self.commit(consumer, CommitMode::Sync);
        let mut parts = self.partitions.lock();
        for s in &shared {
            if let Some(entry) = parts.remove(&s.partition) {
                if entry.paused {
                    self.counters
                        .paused_partitions
                        .fetch_sub(1, Ordering::Relaxed);
                }
                if let (Some(state), Some(slot)) = (&self.state, &entry.state) {
                    state.close_partition(slot, s);
                }
            }
        }
        self.paused_gauge
            .set(self.counters.paused_partitions.load(Ordering::Relaxed) as f64);
        self.counters
            .assigned_partitions
            .store(parts.len() as u64, Ordering::Relaxed);
        tracing::info!(subscription = %self.subscription, partitions = ?partitions, "partitions released");
    }

    fn shutdown(&self, consumer: &BaseConsumer<RuntimeContext<T, P>>) {
        let deadline = Instant::now() + self.props.shutdown_timeout;
        // Stop fetching; let what was dispatched finish (up to shutdown_timeout). Keep
        // polling meanwhile so a rebalance started by another member is served (its
        // revocation commits while this member's generation is still valid) and the
        // session stays alive.
        let mut tpl = TopicPartitionList::new();
        for p in self.partitions.lock().keys() {
            tpl.add_partition(&self.topic, *p);
        }
        let _ = consumer.pause(&tpl);
        loop {
            let idle = self
                .partitions
                .lock()
                .values()
                .all(|e| e.shared.core.lock().dispatched == 0);
            if idle || Instant::now() >= deadline {
                break;
            }
            // Records fetched before the pause are dropped here: they were never
            // registered, so the committed position stays below them.
            let _ = consumer.poll(Duration::from_millis(10));
        }
        let partitions: Vec<i32> = self.partitions.lock().keys().copied().collect();
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.revoke(consumer, &partitions, remaining, true);
    }
}
