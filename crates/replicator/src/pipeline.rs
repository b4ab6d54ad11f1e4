//! The replication loop: one dedicated thread owns the consumer and the producer.
//!
//! ```text
//! poll source -> decode (dt_meta / legacy envelope / plain; task type) -> every route:
//!   filter -> map -> produce (key kept or re-keyed, murmur2 partitioner)
//! at-least-once: source offset registered in its partition's OffsetTracker; done when
//!   every derived record (and its dead letter) is acknowledged; commit = position +
//!   offset map, every commit_interval, on revoke and at shutdown
//! exactly-once:  everything produced inside a transaction with the consumed positions
//!   (send_offsets_to_transaction); one transaction per commit_interval, on revoke and at
//!   shutdown
//! ```
//!
//! The loop never holds the pipeline lock while it polls the consumer: librdkafka runs the
//! rebalance callbacks inside that poll, and they take the lock to drain and commit the
//! revoked partitions. Delivery reports are collected by the producer's context into a
//! list (bounded by the producer's queue, `queue.buffering.max.messages`) and applied by
//! whoever holds the lock, right after it polled the producer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_processor::{decode_offset_map, OffsetTracker, Registration};
use decaton_protocol::headers::{add_raw_header, raw_headers};
use parking_lot::{Condvar, Mutex};
use prost_reflect::DynamicMessage;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, ClientContext, Message as _};

use crate::route::{Out, RecordView};
use crate::{Replicator, ReplicatorError, ReplicatorHandle, SourceFormat};

/// Longest offset map put into commit metadata (Kafka's default limit is 4096).
const OFFSET_MAP_MAX_BYTES: usize = 4000;
/// A transaction closes after this many source records even before commit_interval.
const MAX_TXN_RECORDS: usize = 50_000;

/// Which counter a delivery report feeds.
#[derive(Debug, Clone, Copy)]
enum Dest {
    Route(usize),
    Router,
    DeadLetter,
}

/// Travels with each derived record through librdkafka and back in its delivery report.
#[derive(Debug)]
struct Token {
    partition: i32,
    offset: i64,
    generation: u64,
    dest: Dest,
}

type Ack = (Box<Token>, Result<(), String>);

/// Collects delivery reports (on the producer's polling thread); applied under the
/// pipeline lock. The condition variable wakes a pipeline waiting for room or a drain.
#[derive(Default)]
struct Acks {
    list: Mutex<Vec<Ack>>,
    arrived: Condvar,
}

struct AckContext {
    acks: Arc<Acks>,
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<Token>;
    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<Token>) {
        let r = match result {
            Ok(_) => Ok(()),
            Err((e, m)) => Err(format!("to {}: {e}", m.topic())),
        };
        self.acks.list.lock().push((token, r));
        self.acks.arrived.notify_all();
    }
}

/// The consumer's context: rebalance callbacks and lag from librdkafka's statistics.
struct SourceContext {
    pipeline: Arc<Mutex<Pipeline>>,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        for topic in statistics.topics.values() {
            for (p, s) in &topic.partitions {
                if *p >= 0 && s.consumer_lag >= 0 {
                    metrics::gauge!(crate::metric_names::LAG, "partition" => p.to_string())
                        .set(s.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            self.pipeline.lock().release(consumer, &partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.pipeline.lock().assign(consumer, tpl),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// One source partition in at-least-once mode.
struct PartitionState {
    tracker: OffsetTracker,
    /// Derived records not yet acknowledged, per source offset (bounded by max_pending).
    pending: HashMap<i64, u32>,
    generation: u64,
    paused: bool,
    /// What was last sent in a commit (position, offset map).
    committed: Option<(i64, String)>,
}

enum Mode {
    AtLeastOnce(HashMap<i32, PartitionState>),
    ExactlyOnce(Txn),
}

#[derive(Default)]
struct Txn {
    open: bool,
    /// Next offset per partition consumed in the open transaction.
    positions: HashMap<i32, i64>,
    records: usize,
    started: Option<Instant>,
    /// Assigned partitions (records of others are ignored).
    assigned: std::collections::HashSet<i32>,
}

pub(crate) struct Pipeline {
    replicator: Replicator,
    handle: ReplicatorHandle,
    producer: ThreadedProducer<AckContext>,
    acks: Arc<Acks>,
    mode: Mode,
    needs_message: bool,
    next_generation: u64,
    fatal: Option<ReplicatorError>,
    topic: Arc<str>,
    /// Registered once: the macro looks the metric up on every call.
    source_counter: metrics::Counter,
}

fn client_config(b: &crate::ReplicatorBuilder, own: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &b.bootstrap);
    for (k, v) in b.settings.iter().chain(own) {
        c.set(k, v);
    }
    c
}

pub(crate) fn run(replicator: Replicator, handle: ReplicatorHandle) -> Result<(), ReplicatorError> {
    let b = &replicator.builder;
    let exactly_once = b.exactly_once;
    let topic: Arc<str> = Arc::from(b.source_topic.as_str());

    let mut producer_defaults: Vec<(String, String)> = vec![
        ("acks".into(), "all".into()),
        ("enable.idempotence".into(), "true".into()),
        ("linger.ms".into(), "5".into()),
        ("partitioner".into(), "murmur2_random".into()),
        // Retry until the broker takes it: giving up would reorder a key's records.
        ("message.timeout.ms".into(), "0".into()),
    ];
    if exactly_once {
        let id = b
            .transactional_id
            .clone()
            .unwrap_or_else(|| format!("{}-replicator", b.group));
        producer_defaults.push(("transactional.id".into(), id));
    }
    let mut pconf = client_config(b, &[]);
    for (k, v) in producer_defaults
        .iter()
        .chain(b.settings.iter())
        .chain(b.producer_settings.iter())
    {
        pconf.set(k, v);
    }
    let acks = Arc::new(Acks::default());
    let producer: ThreadedProducer<AckContext> =
        pconf.create_with_context(AckContext { acks: acks.clone() })?;

    let needs_message =
        replicator.routes.iter().any(|r| r.reads_fields()) || replicator.builder.router.is_some();
    let pipeline = Arc::new(Mutex::new(Pipeline {
        mode: if exactly_once {
            Mode::ExactlyOnce(Txn::default())
        } else {
            Mode::AtLeastOnce(HashMap::new())
        },
        replicator,
        handle: handle.clone(),
        producer,
        acks,
        needs_message,
        next_generation: 0,
        fatal: None,
        topic: topic.clone(),
        source_counter: metrics::counter!(crate::metric_names::SOURCE_RECORDS),
    }));

    let (consumer, commit_interval, shutdown_timeout) = {
        let p = pipeline.lock();
        let b = &p.replicator.builder;
        let mut cconf = client_config(b, &[]);
        cconf
            .set("group.id", &b.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "5000");
        if exactly_once {
            cconf.set("isolation.level", "read_committed");
        }
        for (k, v) in b.settings.iter().chain(b.consumer_settings.iter()) {
            cconf.set(k, v);
        }
        let consumer: BaseConsumer<SourceContext> = cconf.create_with_context(SourceContext {
            pipeline: pipeline.clone(),
        })?;
        if exactly_once {
            probe_transactions(&p.producer, &consumer, &b.source_topic)?;
        }
        consumer.subscribe(&[&b.source_topic])?;
        (consumer, b.commit_interval, b.shutdown_timeout)
    };
    tracing::info!(topic = %topic, exactly_once, "replicator started");

    let mut last_commit = Instant::now();
    let result = loop {
        if handle.stopping() {
            break Ok(());
        }
        let polled = consumer.poll(Duration::from_millis(20));
        let mut p = pipeline.lock();
        p.serve_producer(Duration::ZERO);
        match polled {
            Some(Ok(m)) => p.handle(&consumer, &m),
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => {}
        }
        p.flow(&consumer);
        if last_commit.elapsed() >= commit_interval || p.txn_full() {
            p.commit(&consumer, CommitMode::Async);
            last_commit = Instant::now();
        }
        if let Some(e) = p.fatal.take() {
            break Err(e);
        }
    };
    let late_error = {
        let mut p = pipeline.lock();
        p.finish(&consumer, shutdown_timeout, result.is_ok());
        p.fatal.take()
    };
    // Closing the consumer runs the revoke callback, which takes the lock: not held here.
    consumer.unsubscribe();
    drop(consumer);
    match (result, late_error) {
        (Ok(()), Some(e)) => Err(e),
        (r, _) => r,
    }
}

/// Exactly-once needs InitProducerId with a transactional id, AddOffsetsToTxn,
/// TxnOffsetCommit and EndTxn: all are exercised before anything is consumed, so a
/// broker without them is reported, never half-used. The probe transaction carries the
/// group's current position of partition 0 (or the log start) and is aborted, so it
/// changes nothing. (An empty transaction would prove nothing: librdkafka ends it
/// locally.)
fn probe_transactions(
    producer: &ThreadedProducer<AckContext>,
    consumer: &BaseConsumer<SourceContext>,
    topic: &str,
) -> Result<(), ReplicatorError> {
    let unsupported = |what: &str, e: KafkaError| {
        ReplicatorError::TransactionsUnsupported(format!("{what}: {e}"))
    };
    let timeout = Duration::from_secs(30);
    producer
        .init_transactions(timeout)
        .map_err(|e| unsupported("InitProducerId", e))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let committed = consumer
        .committed_offsets(tpl.clone(), timeout)
        .ok()
        .and_then(|c| c.elements().first().map(|e| e.offset()));
    let offset = match committed {
        Some(Offset::Offset(o)) => o,
        _ => consumer
            .fetch_watermarks(topic, 0, timeout)
            .map(|(low, _)| low)?,
    };
    tpl.set_partition_offset(topic, 0, Offset::Offset(offset))?;
    let meta = consumer
        .group_metadata()
        .ok_or_else(|| ReplicatorError::Settings("the consumer has no group metadata".into()))?;
    producer
        .begin_transaction()
        .map_err(|e| unsupported("begin", e))?;
    let sent = producer.send_offsets_to_transaction(&tpl, &meta, timeout);
    let aborted = producer.abort_transaction(timeout);
    sent.map_err(|e| unsupported("AddOffsetsToTxn/TxnOffsetCommit", e))?;
    aborted.map_err(|e| unsupported("EndTxn", e))?;
    Ok(())
}

impl Pipeline {
    fn builder(&self) -> &crate::ReplicatorBuilder {
        &self.replicator.builder
    }

    /// Applies the delivery reports that arrived, waiting up to `wait` for one if none has.
    fn serve_producer(&mut self, wait: Duration) {
        let acks = {
            let mut list = self.acks.list.lock();
            if list.is_empty() && !wait.is_zero() {
                self.acks.arrived.wait_for(&mut list, wait);
            }
            std::mem::take(&mut *list)
        };
        for (token, result) in acks {
            self.apply_ack(*token, result);
        }
    }

    fn apply_ack(&mut self, token: Token, result: Result<(), String>) {
        if let Err(e) = result {
            if self.fatal.is_none() {
                tracing::error!(error = %e, partition = token.partition, offset = token.offset, "derived record not delivered");
                self.fatal = Some(ReplicatorError::Delivery(format!(
                    "derived record of source partition {} offset {} not delivered {e}",
                    token.partition, token.offset
                )));
            }
            return;
        }
        match token.dest {
            Dest::Route(i) => {
                if let Some(route) = self.replicator.routes.get(i) {
                    route.counters.out();
                }
            }
            Dest::Router => {
                if let Some(c) = &self.replicator.router_counters {
                    c.out();
                }
            }
            Dest::DeadLetter => {
                self.handle
                    .stats
                    .global
                    .dead_letters
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(crate::metric_names::DEAD_LETTERS).increment(1);
            }
        }
        self.settle(&token);
    }

    /// One derived record of the token's source record is finished with.
    fn settle(&mut self, token: &Token) {
        if let Mode::AtLeastOnce(parts) = &mut self.mode {
            if let Some(ps) = parts
                .get_mut(&token.partition)
                .filter(|ps| ps.generation == token.generation)
            {
                if let Some(n) = ps.pending.get_mut(&token.offset) {
                    *n -= 1;
                    if *n == 0 {
                        ps.pending.remove(&token.offset);
                        ps.tracker.complete(token.offset);
                    }
                }
            }
        }
    }

    fn exactly_once(&self) -> bool {
        matches!(self.mode, Mode::ExactlyOnce(_))
    }

    /// New partitions: at-least-once reads each one's committed position and offset map.
    fn assign(&mut self, consumer: &BaseConsumer<SourceContext>, tpl: &TopicPartitionList) {
        // librdkafka keeps a pause across unassign/assign: resume what we get.
        if let Err(e) = consumer.resume(tpl) {
            tracing::warn!(error = %e, "resume on assignment");
        }
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(?partitions, "partitions assigned");
        match &mut self.mode {
            Mode::ExactlyOnce(txn) => txn.assigned.extend(partitions),
            Mode::AtLeastOnce(_) => {
                let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(30));
                let mut starts: HashMap<i32, (Option<i64>, String)> = HashMap::new();
                match committed {
                    Ok(c) => {
                        for e in c.elements() {
                            let meta =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    e.metadata().to_string()
                                }))
                                .unwrap_or_default();
                            let pos = match e.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            };
                            starts.insert(e.partition(), (pos, meta));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading committed offsets; starting from the fetch position")
                    }
                }
                for p in partitions {
                    let (pos, meta) = starts.remove(&p).unwrap_or((None, String::new()));
                    let inherited = pos
                        .and_then(|pos| decode_offset_map(pos, &meta))
                        .unwrap_or_default();
                    self.next_generation += 1;
                    let generation = self.next_generation;
                    if let Mode::AtLeastOnce(parts) = &mut self.mode {
                        parts.insert(
                            p,
                            PartitionState {
                                tracker: OffsetTracker::starting_at(pos, inherited),
                                pending: HashMap::new(),
                                generation,
                                paused: false,
                                committed: pos.map(|p| (p, meta)),
                            },
                        );
                    }
                }
            }
        }
    }

    /// Revoked partitions: wait for their derived records, commit, forget them.
    fn release(&mut self, consumer: &BaseConsumer<SourceContext>, partitions: &[i32]) {
        tracing::info!(?partitions, "partitions revoked");
        let timeout = self.builder().shutdown_timeout;
        if self.exactly_once() {
            self.commit(consumer, CommitMode::Sync);
            if let Mode::ExactlyOnce(txn) = &mut self.mode {
                for p in partitions {
                    txn.assigned.remove(p);
                }
            }
        } else {
            {
                self.drain(timeout, Some(partitions));
                self.commit_partitions(consumer, CommitMode::Sync, Some(partitions));
                if let Mode::AtLeastOnce(parts) = &mut self.mode {
                    for p in partitions {
                        if let Some(ps) = parts.remove(p) {
                            if !ps.pending.is_empty() {
                                tracing::warn!(partition = p, unacknowledged = ps.pending.len(),
                                    "released with derived records unacknowledged; the next owner sends them again");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Waits (up to `timeout`) until the given partitions (all when None) have no derived
    /// record in flight.
    fn drain(&mut self, timeout: Duration, partitions: Option<&[i32]>) {
        let deadline = Instant::now() + timeout;
        loop {
            let busy = match &self.mode {
                Mode::AtLeastOnce(parts) => parts.iter().any(|(p, ps)| {
                    partitions.is_none_or(|only| only.contains(p)) && !ps.pending.is_empty()
                }),
                Mode::ExactlyOnce(_) => false,
            };
            if !busy || Instant::now() >= deadline || self.fatal.is_some() {
                return;
            }
            self.serve_producer(Duration::from_millis(20));
        }
    }

    /// Pauses partitions at max_pending, resumes them below half of it.
    fn flow(&mut self, consumer: &BaseConsumer<SourceContext>) {
        let max = self.builder().max_pending;
        let topic = self.topic.clone();
        if let Mode::AtLeastOnce(parts) = &mut self.mode {
            for (p, ps) in parts.iter_mut() {
                let inflight = ps.tracker.in_flight();
                let change = if !ps.paused && inflight >= max {
                    Some(true)
                } else if ps.paused && inflight <= max / 2 {
                    Some(false)
                } else {
                    None
                };
                if let Some(pause) = change {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&topic, *p);
                    let r = if pause {
                        consumer.pause(&tpl)
                    } else {
                        consumer.resume(&tpl)
                    };
                    match r {
                        Ok(()) => ps.paused = pause,
                        Err(e) => tracing::warn!(error = %e, partition = p, pause, "pause/resume"),
                    }
                }
            }
        }
    }

    fn txn_full(&self) -> bool {
        matches!(&self.mode, Mode::ExactlyOnce(t) if t.records >= MAX_TXN_RECORDS)
    }

    /// At-least-once: commits positions that moved. Exactly-once: closes the transaction.
    fn commit(&mut self, consumer: &BaseConsumer<SourceContext>, mode: CommitMode) {
        if self.exactly_once() {
            self.commit_transaction(consumer)
        } else {
            self.commit_partitions(consumer, mode, None)
        }
    }

    fn commit_partitions(
        &mut self,
        consumer: &BaseConsumer<SourceContext>,
        mode: CommitMode,
        only: Option<&[i32]>,
    ) {
        let topic = self.topic.clone();
        let Mode::AtLeastOnce(parts) = &mut self.mode else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        let mut sent = Vec::new();
        for (p, ps) in parts.iter() {
            if only.is_some_and(|o| !o.contains(p)) {
                continue;
            }
            let Some(pos) = ps.tracker.position() else {
                continue;
            };
            let map = ps.tracker.offset_map(OFFSET_MAP_MAX_BYTES);
            if ps
                .committed
                .as_ref()
                .is_some_and(|(cp, cm)| *cp == pos && *cm == map)
            {
                continue;
            }
            let mut e = tpl.add_partition(&topic, *p);
            if e.set_offset(Offset::Offset(pos)).is_ok() {
                e.set_metadata(map.clone());
                sent.push((*p, pos, map));
            }
        }
        if sent.is_empty() {
            return;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                for (p, pos, map) in sent {
                    metrics::gauge!(crate::metric_names::COMMITTED_OFFSET, "partition" => p.to_string()).set(pos as f64);
                    if let Some(ps) = parts.get_mut(&p) {
                        ps.committed = Some((pos, map));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "commit failed; sent again next round"),
        }
    }

    fn commit_transaction(&mut self, consumer: &BaseConsumer<SourceContext>) {
        let topic = self.topic.clone();
        let timeout = self.builder().shutdown_timeout;
        let Mode::ExactlyOnce(txn) = &mut self.mode else {
            return;
        };
        if !txn.open {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &txn.positions {
            let _ = tpl.add_partition_offset(&topic, *p, Offset::Offset(*next));
        }
        let result = (|| -> Result<(), KafkaError> {
            if tpl.count() > 0 {
                let meta = consumer
                    .group_metadata()
                    .ok_or(KafkaError::Global(RDKafkaErrorCode::InvalidGroupId))?;
                self.producer
                    .send_offsets_to_transaction(&tpl, &meta, timeout)?;
            }
            self.producer.commit_transaction(timeout)
        })();
        txn.open = false;
        txn.positions.clear();
        txn.records = 0;
        txn.started = None;
        match result {
            Ok(()) => {
                self.handle
                    .stats
                    .global
                    .transactions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                let _ = self.producer.abort_transaction(timeout);
                self.fatal.get_or_insert(ReplicatorError::Delivery(format!(
                    "transaction failed and was aborted: {e}"
                )));
            }
        }
        // Reports of the committed transaction's records.
        self.serve_producer(Duration::ZERO);
    }

    /// Shutdown: wait for in-flight records, commit everything.
    fn finish(&mut self, consumer: &BaseConsumer<SourceContext>, timeout: Duration, clean: bool) {
        if self.exactly_once() {
            if clean {
                self.commit_transaction(consumer);
            } else {
                let _ = self.producer.abort_transaction(timeout);
            }
            if let Mode::ExactlyOnce(txn) = &mut self.mode {
                txn.assigned.clear();
            }
        } else {
            self.drain(timeout, None);
            self.commit_partitions(consumer, CommitMode::Sync, None);
            if let Mode::AtLeastOnce(parts) = &mut self.mode {
                parts.clear();
            }
        }
        tracing::info!(stats = ?self.handle.stats(), "replicator stopped");
    }

    /// One source record: decode, route, produce.
    fn handle(&mut self, consumer: &BaseConsumer<SourceContext>, m: &BorrowedMessage<'_>) {
        let _ = consumer;
        let (partition, offset) = (m.partition(), m.offset());
        self.handle
            .stats
            .global
            .source
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.source_counter.increment(1);
        let generation = match &mut self.mode {
            Mode::AtLeastOnce(parts) => {
                let Some(ps) = parts.get_mut(&partition) else {
                    return;
                };
                match ps.tracker.register(offset) {
                    Registration::New => ps.generation,
                    Registration::Rebased { committed } => {
                        tracing::warn!(partition, committed, position = offset,
                            "the committed offset is past the log end (the log was truncated or recreated); \
                             replicating from the fetch position");
                        ps.generation
                    }
                    Registration::Inherited => {
                        self.handle
                            .stats
                            .global
                            .skipped_done
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        metrics::counter!(crate::metric_names::SKIPPED_DONE).increment(1);
                        return;
                    }
                    Registration::Rewound => return,
                }
            }
            Mode::ExactlyOnce(txn) => {
                if !txn.assigned.contains(&partition) {
                    return;
                }
                if !txn.open {
                    if let Err(e) = self.producer.begin_transaction() {
                        self.fatal.get_or_insert(ReplicatorError::Delivery(format!(
                            "begin transaction: {e}"
                        )));
                        return;
                    }
                    txn.open = true;
                    txn.started = Some(Instant::now());
                }
                txn.positions.insert(partition, offset + 1);
                txn.records += 1;
                0
            }
        };

        let format = self.builder().format;
        let value = m.payload().unwrap_or(&[]);
        let headers = m.headers();
        let decoded = match format {
            SourceFormat::Decaton => {
                let meta = headers.and_then(|h| {
                    raw_headers(h)
                        .find(|h| h.is(decaton_protocol::METADATA_HEADER))
                        .map(|h| h.value.unwrap_or(&[]))
                });
                decaton_protocol::decode_record(meta, m.payload())
                    .map(|r| (r.task, meta.is_none().then_some(r.metadata)))
                    .map_err(|e| e.to_string())
            }
            SourceFormat::Plain => Ok((std::borrow::Cow::Borrowed(value), None)),
        };
        let message = match (&decoded, &self.replicator.builder.message) {
            (Ok((task, _)), Some(desc)) if self.needs_message => {
                DynamicMessage::decode(desc.clone(), task.as_ref())
                    .map(Some)
                    .map_err(|e| format!("task does not decode as {}: {e}", desc.full_name()))
            }
            _ => Ok(None),
        };
        let mut outs: Vec<(Dest, Out<'_>)> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        match (&decoded, &message) {
            (Ok((task, legacy)), Ok(msg)) => {
                let view = RecordView {
                    partition,
                    offset,
                    key: m.key(),
                    headers,
                    value,
                    task: task.as_ref(),
                    message: msg.as_ref(),
                    legacy_metadata: legacy.as_ref(),
                };
                for (i, route) in self.replicator.routes.iter().enumerate() {
                    route.counters.record_in();
                    match route.derive(&view, format) {
                        Ok(Some(out)) => outs.push((Dest::Route(i), out)),
                        Ok(None) => route.counters.filtered(),
                        Err(e) => {
                            route.counters.failed();
                            errors.push(format!("route {}: {e}", route.name));
                        }
                    }
                }
                if let (Some(router), Some(c)) = (
                    &self.replicator.builder.router,
                    &self.replicator.router_counters,
                ) {
                    c.record_in();
                    match router(&view) {
                        Ok(list) if list.is_empty() => c.filtered(),
                        Ok(list) => {
                            for (topic, d) in list {
                                outs.push((
                                    Dest::Router,
                                    Out {
                                        topic: Some(topic),
                                        ..Out::from_derived(d)
                                    },
                                ));
                            }
                        }
                        Err(e) => {
                            c.failed();
                            errors.push(format!("router: {e}"));
                        }
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                self.handle
                    .stats
                    .global
                    .invalid
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!(crate::metric_names::INVALID_RECORDS).increment(1);
                for route in &self.replicator.routes {
                    route.counters.record_in();
                    route.counters.failed();
                }
                errors.push(format!("undecodable: {e}"));
            }
        }
        if !errors.is_empty() {
            tracing::debug!(partition, offset, errors = ?errors, "bad record");
            if let Some(dlq) = &self.replicator.builder.dead_letter_topic {
                // The processor's dead-letter headers, so `decaton dlq list` shows why and
                // `decaton dlq replay` puts the record back on the source topic.
                use decaton_protocol::dead_letter as dl;
                let hs: Vec<(String, Vec<u8>)> = [
                    (dl::REASON, errors.join("; ")),
                    (dl::KIND, "discarded".to_string()),
                    (dl::ATTEMPTS, "1".to_string()),
                    (dl::TOPIC, self.topic.to_string()),
                    (dl::PARTITION, partition.to_string()),
                    (dl::OFFSET, offset.to_string()),
                    (dl::ORIGIN_TOPIC, self.topic.to_string()),
                    (dl::SUBSCRIPTION, self.replicator.builder.group.clone()),
                    (dl::TIME_MILLIS, decaton_protocol::now_millis().to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_bytes()))
                .collect();
                outs.push((
                    Dest::DeadLetter,
                    Out {
                        topic: Some(dlq.clone()),
                        key: m.key().map(std::borrow::Cow::Borrowed),
                        value: std::borrow::Cow::Borrowed(value),
                        headers: hs,
                        copy_source_headers: true,
                    },
                ));
            }
        }

        if let Mode::AtLeastOnce(parts) = &mut self.mode {
            if let Some(ps) = parts.get_mut(&partition) {
                if outs.is_empty() {
                    ps.tracker.complete(offset);
                } else {
                    ps.pending.insert(offset, outs.len() as u32);
                }
            }
        }
        for (dest, out) in outs {
            let topic = match (&out.topic, dest) {
                (Some(t), _) => t.clone(),
                (None, Dest::Route(i)) => match self.replicator.routes.get(i) {
                    Some(route) => route.topic.clone(),
                    None => continue,
                },
                (None, _) => continue,
            };
            self.send(m, topic, dest, out, partition, offset, generation);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        m: &BorrowedMessage<'_>,
        topic: String,
        dest: Dest,
        out: Out<'_>,
        partition: i32,
        offset: i64,
        generation: u64,
    ) {
        let mut headers = OwnedHeaders::new();
        if out.copy_source_headers {
            // Byte for byte: a source name need not be UTF-8.
            if let Some(h) = m.headers() {
                for h in raw_headers(h) {
                    headers = add_raw_header(headers, h.name, h.value);
                }
            }
        }
        for (k, v) in &out.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let token = Box::new(Token {
            partition,
            offset,
            generation,
            dest,
        });
        let mut record: BaseRecord<'_, [u8], [u8], Box<Token>> =
            BaseRecord::with_opaque_to(&topic, token)
                .payload(out.value.as_ref())
                .headers(headers);
        if let Some(k) = out.key.as_deref() {
            record = record.key(k);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if self.handle.stopping() {
                        // Never sent: its source offset stays unfinished, so the committed
                        // position stays below it and the next run sends it.
                        return;
                    }
                    record = r;
                    self.serve_producer(Duration::from_millis(10));
                }
                Err((e, r)) => {
                    // Refused locally (too large, unknown topic...): this record is lost
                    // to this route; the source offset completes through its token.
                    tracing::warn!(error = %e, topic = %topic, partition, offset, "derived record refused");
                    if let Some(route) = match dest {
                        Dest::Route(i) => self.replicator.routes.get(i),
                        _ => None,
                    } {
                        route.counters.failed();
                    }
                    self.settle(&r.delivery_opaque);
                    return;
                }
            }
        }
    }
}
