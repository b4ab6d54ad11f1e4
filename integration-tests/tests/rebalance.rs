#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! Partition ownership changing hands: what a partition's new owner inherits (the pause
//! flag librdkafka keeps, the offset map the previous owner committed) and must not lose.
//!
//! Both tests run on the embedded broker and keep every member in the group until the end
//! (the mock cluster delays the next assignment by about a session timeout after a member
//! leaves).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_integration_tests::{
    committed, init_tracing, produce, wait_committed, Behaviour, Recorder, Recording,
};
use decaton_processor::{
    async_trait, ProcessError, ProcessingContext, ProcessorProperties, SchedulingMode,
    Subscription, SubscriptionHandle, SubscriptionStats, TaskProcessor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{checker, BrokerKind, TestBroker};
use tokio::sync::watch;
use tokio::task::JoinHandle;

type Running = JoinHandle<Result<SubscriptionStats, decaton_processor::SubscriptionError>>;

/// Runs every task only once the gate is open (tasks wait at the gate, inside `process`,
/// holding their lane), then records it.
struct Gated {
    gate: watch::Receiver<bool>,
    recorder: Recorder,
}

#[async_trait]
impl TaskProcessor<ChatOp> for Gated {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        self.recorder.process(ctx, task).await
    }
}

/// Asks a subscription to stop and waits at most `within` for `run` to return.
async fn stop(
    handle: &SubscriptionHandle,
    running: Running,
    within: Duration,
) -> anyhow::Result<()> {
    handle.shutdown();
    match tokio::time::timeout(within, running).await {
        Ok(r) => {
            r??;
            Ok(())
        }
        Err(_) => anyhow::bail!("subscription did not stop within {within:?}"),
    }
}

/// Defect: a partition paused for backpressure when it was revoked is never resumed when
/// the same instance gets it back.
///
/// librdkafka keeps the application's pause flag of a partition across unassign/assign,
/// while the runtime starts every newly assigned partition as "not paused" and so never
/// calls resume for it: after an eager rebalance the partition stays paused forever and
/// its tasks are never fetched again.
///
/// Member A pauses both partitions of the topic (max_pending reached while every task
/// waits at a closed gate); member B of the same subscription joins, the eager rebalance
/// revokes both partitions from A and gives one back to it. Once the gate opens, every
/// task of both partitions must be processed.
///
/// Without the fix, the partition A gets back is never fetched again (every task of that
/// partition is lost to this instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_partition_resumes_after_reassignment() -> anyhow::Result<()> {
    init_tracing();
    const TASKS: u64 = 400;
    const KEYS: u64 = 40;
    const MAX_PENDING: usize = 20;
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    broker.create_topic("pause-rb", 2)?;
    let expected = produce(&broker, "pause-rb", TASKS, KEYS).await?;
    let rec = Arc::new(Recording::default());
    let (gate_tx, gate_rx) = watch::channel(false);
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::Bounded;
    props.partition_concurrency = 2;
    props.max_pending = MAX_PENDING;
    props.commit_interval = Duration::from_millis(100);
    props.rebalance_timeout = Duration::from_millis(300);
    props.shutdown_timeout = Duration::from_secs(5);
    let member = |instance: &str| {
        let sub = Subscription::builder(
            "pause-rb",
            Gated {
                gate: gate_rx.clone(),
                recorder: Recorder::new(instance, rec.clone(), Behaviour::default()),
            },
        )
        .bootstrap_servers(broker.bootstrap_servers())
        .topic("pause-rb")
        .properties(props.clone())
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "300")
        .build()?;
        let handle = sub.handle();
        anyhow::Ok((handle, tokio::spawn(sub.run())))
    };
    let started = Instant::now();
    let (a, a_run) = member("a")?;
    let mut b = None;
    let outcome = async {
        // A owns both partitions and has paused both: max_pending tasks each, all waiting
        // at the gate.
        rec.wait_for(Duration::from_secs(30), |_| {
            let s = a.stats();
            s.assigned_partitions == 2 && s.paused_partitions == 2
        })
        .await
        .map_err(|e| anyhow::anyhow!("A never paused both partitions: {e}; A {:?}", a.stats()))?;
        let pauses_before = a.stats().pauses;
        // B joins: the eager rebalance takes both partitions from A and gives one back.
        let (bh, b_run) = member("b")?;
        b = Some((bh.clone(), b_run));
        rec.wait_for(Duration::from_secs(30), |_| {
            a.stats().assigned_partitions == 1 && bh.stats().assigned_partitions == 1
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the rebalance did not split the partitions: {e}; A {:?} B {:?}",
                a.stats(),
                bh.stats()
            )
        })?;
        println!(
            "rebalanced after {:?}: A {:?} (pauses before {pauses_before}), B {:?}",
            started.elapsed(),
            a.stats(),
            bh.stats()
        );
        gate_tx.send_replace(true);
        let distinct = |r: &Recording| {
            r.log
                .lock()
                .iter()
                .map(|p| (p.key.clone(), p.sequence))
                .collect::<BTreeSet<_>>()
                .len() as u64
        };
        let waited = rec
            .wait_for(Duration::from_secs(30), |r| distinct(r) >= TASKS)
            .await;
        let report = checker::check(&expected, &rec.log.lock());
        println!(
            "after the gate opened: {report}; A {:?} B {:?}",
            a.stats(),
            bh.stats()
        );
        if let Err(e) = waited {
            anyhow::bail!(
                "tasks of the partition A got back were never processed ({e}): {report}; \
                 A {:?} (a fresh assignment that librdkafka still has paused from before the \
                 revocation is never resumed), B {:?}",
                a.stats(),
                bh.stats()
            );
        }
        assert_eq!(report.lost_count, 0, "{report}");
        assert_eq!(report.unexpected, 0, "{report}");
        anyhow::Ok(())
    }
    .await;
    // Always stop both members (open the gate first so nothing waits on it).
    gate_tx.send_replace(true);
    let stop_a = stop(&a, a_run, Duration::from_secs(30));
    if let Some((bh, b_run)) = b {
        let (ra, rb) = tokio::join!(stop_a, stop(&bh, b_run, Duration::from_secs(30)));
        outcome?;
        ra?;
        rb?;
    } else {
        let ra = stop_a.await;
        outcome?;
        ra?;
    }
    println!("took {:?}", started.elapsed());
    Ok(())
}

/// Holds the task at one offset at a gate; records every task.
struct HoldAt {
    offset: i64,
    gate: watch::Receiver<bool>,
    holding: Arc<AtomicBool>,
    recorder: Recorder,
}

#[async_trait]
impl TaskProcessor<ChatOp> for HoldAt {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        if ctx.offset() == self.offset {
            self.holding.store(true, Ordering::SeqCst);
            let mut gate = self.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
        }
        self.recorder.process(ctx, task).await
    }
}

/// Defect: a new owner that commits before it has fetched (or registered) the offsets its
/// inherited offset map lists erases that map.
///
/// The runtime decodes the committed offset map into a side set and seeds its offset
/// tracker with the bare position; its next commit encodes the map from the tracker alone,
/// which knows nothing of the inherited done offsets it has not dispatched yet. The commit
/// (same position, smaller map) overwrites the inherited map, so a crash after it would run
/// those tasks again.
///
/// Setup: 1 partition, N tasks of distinct keys; position P with a hand-encoded map listing
/// P+2..=P+5 as done is committed for the group before the subscription starts. The task
/// at P is held at a gate and `max_pending` is 2, so the inherited offsets stay beyond
/// what the new owner dispatches while P is held — the same situation as a commit before
/// the first fetch, made deterministic. While P is held, every commit must still list
/// P+2..=P+5; after the gate opens those four tasks must be skipped and all others run.
///
/// Without the fix, the new owner's first commit carries a map of P+1 only (the inherited
/// P+2..=P+5 are gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inherited_offset_map_survives_first_commit() -> anyhow::Result<()> {
    init_tracing();
    const TASKS: u64 = 30;
    const P: i64 = 5;
    let started = Instant::now();
    let broker = TestBroker::start(BrokerKind::Embedded)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("inherit", 1)?;
    // Distinct keys: each offset is its own task, nothing orders one behind another.
    produce(&broker, "inherit", TASKS, TASKS).await?;
    let inherited: Vec<i64> = (P + 2..=P + 5).collect();
    let metadata = encode_offset_map(P, &inherited);
    commit_as_group(&bootstrap, "inherit", "inherit", P, &metadata)?;
    let c = committed(&bootstrap, "inherit", "inherit", 1)?;
    assert_eq!(c[0], (Some(P), metadata.clone()), "setup commit not stored");
    assert_eq!(
        decode_offset_map(P, &metadata).as_deref(),
        Some(&inherited[..])
    );

    let rec = Arc::new(Recording::default());
    let (gate_tx, gate_rx) = watch::channel(false);
    let holding = Arc::new(AtomicBool::new(false));
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::PerKey;
    props.max_pending = 2;
    props.commit_interval = Duration::from_millis(100);
    props.shutdown_timeout = Duration::from_secs(5);
    let sub = Subscription::builder(
        "inherit",
        HoldAt {
            offset: P,
            gate: gate_rx,
            holding: holding.clone(),
            recorder: Recorder::new("new-owner", rec.clone(), Behaviour::default()),
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("inherit")
    .properties(props)
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let outcome = async {
        rec.wait_for(Duration::from_secs(20), |_| holding.load(Ordering::SeqCst))
            .await
            .map_err(|e| anyhow::anyhow!("the task at {P} never started: {e}"))?;
        // Sample the committed map (every ~commit interval) while P is held: until the
        // new owner has committed the offset it finished itself (P+1), for at most 3 s
        // (30 commit intervals). Every sample must still list the inherited offsets.
        let window = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut samples = 0;
        loop {
            let (pos, md) = committed(&bootstrap, "inherit", "inherit", 1)?.remove(0);
            samples += 1;
            assert_eq!(pos, Some(P), "position moved past the held task");
            let listed = decode_offset_map(P, &md).unwrap_or_default();
            if let Some(missing) = inherited.iter().find(|o| !listed.contains(o)) {
                anyhow::bail!(
                    "the new owner's commit erased the inherited offset map: committed \
                     metadata {md:?} lists {listed:?}, offset {missing} (inherited as done) is \
                     missing (sample {samples}, stats {:?})",
                    handle.stats()
                );
            }
            if listed.contains(&(P + 1)) || tokio::time::Instant::now() >= window {
                println!(
                    "committed map while P held: {md:?} -> {listed:?} after {samples} samples"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await; // polling the broker
        }
        gate_tx.send_replace(true);
        let should_run: BTreeSet<i64> = (P..TASKS as i64)
            .filter(|o| !inherited.contains(o))
            .collect();
        rec.wait_for(Duration::from_secs(20), |r| {
            let ran: BTreeSet<i64> = r.offsets.lock().iter().map(|(_, o)| *o).collect();
            should_run.is_subset(&ran)
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "not every task from {P} ran: {e}; ran {:?}",
                rec.offsets.lock()
            )
        })?;
        let ran: Vec<i64> = rec.offsets.lock().iter().map(|(_, o)| *o).collect();
        let rerun: Vec<i64> = ran
            .iter()
            .copied()
            .filter(|o| inherited.contains(o))
            .collect();
        assert!(
            rerun.is_empty(),
            "tasks the inherited map lists as done ran again: {rerun:?}"
        );
        assert!(
            ran.iter().all(|o| *o >= P),
            "a task below the committed position ran: {ran:?}"
        );
        assert_eq!(handle.stats().skipped, inherited.len() as u64);
        let pos = wait_committed(
            &bootstrap,
            "inherit",
            "inherit",
            TASKS as i64,
            Duration::from_secs(10),
        )
        .await?;
        assert_eq!(pos, Some(TASKS as i64));
        anyhow::Ok(())
    }
    .await;
    gate_tx.send_replace(true);
    let stopped = stop(&handle, running, Duration::from_secs(20)).await;
    outcome?;
    stopped?;
    println!("took {:?}", started.elapsed());
    Ok(())
}

/// Commits `offset` with `metadata` for `group` from a plain consumer that never joins.
fn commit_as_group(
    bootstrap: &str,
    group: &str,
    topic: &str,
    offset: i64,
    metadata: &str,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(offset))?;
    if let Some(mut e) = tpl.find_partition(topic, 0) {
        e.set_metadata(metadata);
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

// --- The offset map's wire format (`dtom1:<base>:<len>:r<base64 LEB128 runs>`), written
// --- here from its documentation so the test does not depend on runtime internals.

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|b| *b == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Offset map of `done` (sorted, all above `base`) for committed position `base`, as runs
/// alternating not-done / done, starting with not-done.
fn encode_offset_map(base: i64, done: &[i64]) -> String {
    let len = done.last().map_or(0, |l| (l - base + 1) as usize);
    let flags: Vec<bool> = (0..len)
        .map(|i| done.contains(&(base + i as i64)))
        .collect();
    let mut runs = Vec::new();
    let (mut current, mut run) = (false, 0u64);
    for &d in &flags {
        if d == current {
            run += 1;
        } else {
            push_varint(&mut runs, run);
            current = d;
            run = 1;
        }
    }
    push_varint(&mut runs, run);
    format!("dtom1:{base}:{len}:r{}", b64_encode(&runs))
}

/// The done offsets of an offset map committed at `position` (both encodings), or None.
fn decode_offset_map(position: i64, metadata: &str) -> Option<Vec<i64>> {
    let mut parts = metadata.splitn(4, ':');
    if parts.next()? != "dtom1" {
        return None;
    }
    let base: i64 = parts.next()?.parse().ok()?;
    let len: usize = parts.next()?.parse().ok()?;
    let body = parts.next()?;
    if base != position {
        return None;
    }
    let payload = b64_decode(body.get(1..)?)?;
    let mut out = Vec::new();
    match body.as_bytes().first()? {
        b'b' => {
            for i in 0..len {
                if payload.get(i / 8)? & (1 << (i % 8)) != 0 {
                    out.push(base + i as i64);
                }
            }
        }
        b'r' => {
            let (mut pos, mut at, mut done) = (0, 0usize, false);
            while pos < payload.len() {
                let mut run = 0u64;
                let mut shift = 0;
                loop {
                    let b = *payload.get(pos)?;
                    pos += 1;
                    run |= u64::from(b & 0x7f) << shift;
                    shift += 7;
                    if b & 0x80 == 0 {
                        break;
                    }
                }
                if done {
                    out.extend((at..at + run as usize).map(|i| base + i as i64));
                }
                at += run as usize;
                done = !done;
            }
        }
        _ => return None,
    }
    Some(out)
}

#[test]
fn offset_map_codec_round_trips() {
    let done = [7, 8, 9, 10, 15];
    let enc = encode_offset_map(5, &done);
    assert_eq!(decode_offset_map(5, &enc).unwrap(), done);
    assert_eq!(decode_offset_map(6, &enc), None);
}
