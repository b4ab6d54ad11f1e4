#![allow(clippy::field_reassign_with_default, clippy::unwrap_used)]
//! The broker goes away and comes back (same port, same sqlite storage) while tasks are
//! produced and processed: the producer retries, the subscription reconnects and resumes
//! by itself, nothing acknowledged is lost and each key stays in order.
//!
//! Tansu with sqlite storage only (the mock cluster cannot restart); skipped, with the
//! reason printed, when the Tansu binary is not installed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decaton_client::TaskClient;
use decaton_integration_tests::{
    chat_op, expected_counts, init_tracing, Behaviour, Recorder, Recording,
};
use decaton_processor::{
    async_trait, ProcessError, ProcessingContext, ProcessorProperties, SchedulingMode,
    Subscription, TaskProcessor,
};
use decaton_protocol::ChatOp;
use decaton_testkit::{checker, tansu_binary, BrokerKind, TestBroker};
use parking_lot::Mutex;
use tokio::sync::watch;

const TASKS: u64 = 5_000;
const KEYS: u64 = 200;
const PARTITIONS: i32 = 3;
const ROUNDS: u64 = TASKS / KEYS;
/// How many rounds the producer may run ahead of processing: keeps the stream steady (and
/// still flowing after the restart) instead of producing everything up front.
const LEAD_ROUNDS: u64 = 3;

fn distinct(rec: &Recording) -> u64 {
    rec.log
        .lock()
        .iter()
        .map(|p| (p.key.clone(), p.sequence))
        .collect::<HashSet<_>>()
        .len() as u64
}

/// What the test producer saw.
#[derive(Default)]
struct ProducerLog {
    /// Rounds started (round r puts sequence r of every key).
    round: AtomicU64,
    /// Puts that failed (each was retried).
    put_errors: AtomicU64,
    /// Clients rebuilt after one put failed three times in a row.
    rebuilds: AtomicU64,
    /// The first few errors, for the report.
    first_errors: Mutex<Vec<String>>,
}

/// The test producer. Not idempotent: Tansu 0.6 with sqlite storage panics in its storage
/// task (`tansu-storage-0.6.0/src/lite.rs:503`, "more or less than one row", from
/// `producer_select_for_update.sql`) on the first produce after an idempotent producer's
/// deliveries timed out (librdkafka then bumps the producer epoch), and from then on it
/// answers nothing that needs storage — no produce, no metadata, no group. One request in
/// flight keeps each partition in order across librdkafka's own retries instead.
fn client(bootstrap: &str) -> anyhow::Result<TaskClient<ChatOp>> {
    let mut b = TaskClient::<ChatOp>::builder(bootstrap, "restart")
        .application_id("it")
        .delivery_timeout(Duration::from_secs(5))
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1");
    for (k, v) in BrokerKind::TansuSqlite.producer_settings() {
        b = b.set(*k, *v);
    }
    Ok(b.build()?)
}

/// Round by round (all keys' sequence r at once, so a retried put never overtakes a later
/// task of its key), never more than [`LEAD_ROUNDS`] ahead of processing; a failed put is
/// counted and retried.
async fn producer(
    bootstrap: String,
    rec: Arc<Recording>,
    log: Arc<ProducerLog>,
) -> anyhow::Result<()> {
    let mut client = Arc::new(client(&bootstrap)?);
    for round in 0..ROUNDS {
        let need = round.saturating_sub(LEAD_ROUNDS) * KEYS;
        rec.wait_for(Duration::from_secs(90), |r| distinct(r) >= need)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "producer: processing stalled before round {round} (processed {} distinct, need {need}): {e}",
                    distinct(&rec)
                )
            })?;
        log.round.store(round, Ordering::SeqCst);
        let mut pending: Vec<u64> = (0..KEYS).collect();
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            if attempt > 3 {
                // Three failures in a row for the same round: start over with a new client.
                log.rebuilds.fetch_add(1, Ordering::SeqCst);
                client = Arc::new(self::client(&bootstrap)?);
                attempt = 1;
            }
            let results = futures::future::join_all(pending.iter().map(|&user| {
                let client = client.clone();
                async move {
                    let op = chat_op(user, round);
                    (user, client.put(op.user_id.clone(), &op).await)
                }
            }))
            .await;
            pending.clear();
            for (user, r) in results {
                if let Err(e) = r {
                    log.put_errors.fetch_add(1, Ordering::SeqCst);
                    let mut first = log.first_errors.lock();
                    if first.len() < 5 {
                        first.push(format!("round {round} user {user}: {e}"));
                    }
                    pending.push(user);
                }
            }
            if log.put_errors.load(Ordering::SeqCst) > 20 * KEYS {
                anyhow::bail!("producer: more than {} put errors", 20 * KEYS);
            }
        }
    }
    Ok(())
}

/// Defect under test: the subscription must resume by itself after the broker restarts.
///
/// 5k tasks over 3 partitions and 200 keys are produced in a steady stream while one
/// subscription processes them; after a third is processed the broker is restarted (same
/// port, same sqlite storage) and production continues. Asserted: every task processed
/// (a put that failed was retried; errors are reported), per-key order kept (checker),
/// processing of tasks produced after the restart starts by itself within 45 s. Prints
/// the time from the restart to the first task processed after it, and to the first task
/// produced after it.
///
/// The restart takes ~60 ms; librdkafka reconnects and the group survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_resumes_after_broker_restart() -> anyhow::Result<()> {
    restart_test(Duration::ZERO, false).await
}

/// Like [`processing_resumes_after_broker_restart`], with the broker down for 8 s: longer
/// than the session timeout (6 s), so the group loses its member, and longer than the
/// producer's 5 s delivery timeout, so puts fail and are retried.
///
/// The lost session is revoked and assigned again; processing resumes ~5-6 s after the
/// broker is back, and ~300 tasks run again since Tansu keeps no offset map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_resumes_after_broker_outage() -> anyhow::Result<()> {
    restart_test(Duration::from_secs(8), false).await
}

/// Like [`processing_resumes_after_broker_outage`], with every partition paused for
/// backpressure when the broker goes down and through the lost session: from just before
/// the outage until the session's partitions have been revoked (observed as tasks
/// abandoned after `rebalance_timeout`), every task that starts is held (a processor
/// whose downstream hangs), so each partition reaches `max_pending` (50) with as many
/// records waiting behind them, and stays paused.
///
/// The same defect as `rebalance::paused_partition_resumes_after_reassignment`, reached
/// through a broker outage: librdkafka keeps the pause flag of a partition across the
/// lost session and the reassignment; the runtime starts the reassigned partition as not
/// paused and never resumes it.
///
/// Without the fix, nothing is fetched again after the reassignment (stats show 0 paused
/// partitions while librdkafka keeps them paused; a fresh consumer group reads the topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_resumes_after_broker_outage_while_paused() -> anyhow::Result<()> {
    restart_test(Duration::from_secs(8), true).await
}

/// Processes like the [`Recorder`] (up to 2 ms per task); a task that starts while `hold`
/// is set waits until it is cleared.
struct Holding {
    hold: watch::Receiver<bool>,
    recorder: Recorder,
}

#[async_trait]
impl TaskProcessor<ChatOp> for Holding {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let mut hold = self.hold.clone();
        let _ = hold.wait_for(|h| !*h).await;
        self.recorder.process(ctx, task).await
    }
}

async fn restart_test(outage: Duration, paused: bool) -> anyhow::Result<()> {
    init_tracing();
    if let Err(e) = tansu_binary() {
        println!("SKIPPED (broker restart, outage {outage:?}, paused {paused}): {e}");
        return Ok(());
    }
    let started = Instant::now();
    let mut broker = TestBroker::start(BrokerKind::TansuSqlite)?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic("restart", PARTITIONS)?;
    let rec = Arc::new(Recording::default());
    let mut props = ProcessorProperties::default();
    props.mode = SchedulingMode::Bounded;
    props.partition_concurrency = 4;
    // A partition pauses once `max_pending` tasks are held and as many more wait fetched;
    // the producer runs at most LEAD_ROUNDS (600 tasks, ~200 a partition) ahead.
    props.max_pending = if paused { 50 } else { 500 };
    props.commit_interval = Duration::from_millis(200);
    props.shutdown_timeout = Duration::from_secs(10);
    let (hold_tx, hold_rx) = watch::channel(false);
    let recorder = Recorder::new(
        "i",
        rec.clone(),
        Behaviour {
            max_latency_ms: 2,
            ..Default::default()
        },
    );
    let sub = Subscription::builder(
        "restart",
        Holding {
            hold: hold_rx,
            recorder,
        },
    )
    .bootstrap_servers(&bootstrap)
    .topic("restart")
    .properties(props)
    .set("session.timeout.ms", "6000")
    .set("heartbeat.interval.ms", "500")
    .build()?;
    let handle = sub.handle();
    let running = tokio::spawn(sub.run());
    let plog = Arc::new(ProducerLog::default());
    let produced = tokio::spawn(producer(bootstrap.clone(), rec.clone(), plog.clone()));

    let outcome = async {
        rec.wait_for(Duration::from_secs(90), |r| distinct(r) >= TASKS / 3)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "a third was not processed before the restart: {e}; {} distinct, stats {:?}",
                    distinct(&rec),
                    handle.stats()
                )
            })?;
        if paused {
            hold_tx.send_replace(true);
            rec.wait_for(Duration::from_secs(20), |_| {
                handle.stats().paused_partitions == PARTITIONS as u64
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "not every partition paused while tasks are held: {e}; {:?}",
                    handle.stats()
                )
            })?;
            println!("paused before the outage: {:?}", handle.stats());
        }
        let before = rec.count();
        let restart_began = Instant::now();
        if outage.is_zero() {
            tokio::task::block_in_place(|| broker.restart())?;
        } else {
            tokio::task::block_in_place(|| broker.stop())?;
            // Fault injection: how long the broker stays down is the point, not a sync.
            tokio::time::sleep(outage).await;
            tokio::task::block_in_place(|| broker.restart())?;
        }
        let restarted = Instant::now();
        let count_at_restart = rec.count();
        let round_at_restart = plog.round.load(Ordering::SeqCst);
        if paused {
            // Hold until the lost session's partitions were revoked (the held tasks are
            // abandoned then), so they are paused when revoked.
            let revoked = rec
                .wait_for(Duration::from_secs(30), |_| handle.stats().abandoned > 0)
                .await;
            println!(
                "revocation after the restart: {revoked:?} at {:?}; stats {:?}",
                restarted.elapsed(),
                handle.stats()
            );
            hold_tx.send_replace(false);
        }
        println!(
            "restarted the broker (outage {outage:?}) in {:?} at {before} processed ({count_at_restart} when it answered again), producer in round {round_at_restart}; stats {:?}",
            restarted - restart_began,
            handle.stats()
        );
        // Resumption: a task counted after the restart, and a task produced after it.
        let first_after: Mutex<Option<Duration>> = Mutex::new(None);
        let fresh = |r: &Recording| {
            if r.count() > count_at_restart {
                first_after.lock().get_or_insert_with(|| restarted.elapsed());
            }
            r.log
                .lock()
                .iter()
                .any(|p| p.sequence > round_at_restart + 1)
        };
        let first_fresh = rec
            .wait_for(Duration::from_secs(45), fresh)
            .await
            .map(|_| restarted.elapsed());
        let first_after = *first_after.lock();
        println!(
            "after the restart: first processed task {first_after:?}, first task produced after the restart {first_fresh:?}; stats {:?}",
            handle.stats()
        );
        if first_fresh.is_err() {
            anyhow::bail!(
                "processing did not resume within 45 s of the broker restart: {} processed \
                 ({count_at_restart} at the restart), first processed task after it {first_after:?}, \
                 producer in round {} with {} put errors, stats {:?}",
                rec.count(),
                plog.round.load(Ordering::SeqCst),
                plog.put_errors.load(Ordering::SeqCst),
                handle.stats()
            );
        }
        rec.wait_for(Duration::from_secs(120), |r| distinct(r) >= TASKS)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "not everything was processed after the restart: {e}; {} distinct of {TASKS}, stats {:?}",
                    distinct(&rec),
                    handle.stats()
                )
            })?;
        anyhow::Ok(())
    }
    .await;
    handle.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(30), running).await;
    let produced = if produced.is_finished() {
        Some(produced.await)
    } else {
        produced.abort();
        None
    };
    println!(
        "producer: {} put errors (each retried), {} client rebuilds, first errors {:?}; result {produced:?}",
        plog.put_errors.load(Ordering::SeqCst),
        plog.rebuilds.load(Ordering::SeqCst),
        plog.first_errors.lock()
    );
    let report = checker::check(&expected_counts(TASKS, KEYS), &rec.log.lock());
    println!("{report}; took {:?}", started.elapsed());
    if outcome.is_err() {
        probe_broker(&bootstrap).await;
        let log = broker.log().unwrap_or_default();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["ERROR", "WARN", "panic", "tansu broker"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .take(40)
            .collect();
        println!(
            "--- tansu log, first errors and warnings (TANSU_LOG sets its level):\n{}",
            notable.join("\n")
        );
    }
    outcome?;
    match produced {
        Some(r) => r??,
        None => anyhow::bail!("producer did not finish"),
    }
    match stopped {
        Ok(r) => {
            r??;
        }
        Err(_) => anyhow::bail!("subscription did not stop within 30 s"),
    }
    assert!(report.ok(), "{report}");
    assert_eq!(rec.key_overlaps.load(Ordering::SeqCst), 0);
    Ok(())
}

/// After a failure: does the restarted broker serve a fresh producer (idempotent or not)
/// and a fresh consumer group? Separates a broker that stopped serving from a subscription
/// that did not recover.
async fn probe_broker(bootstrap: &str) {
    for idempotent in ["true", "false"] {
        let result = async {
            let client = TaskClient::<ChatOp>::builder(bootstrap, "restart")
                .delivery_timeout(Duration::from_secs(5))
                .set("enable.idempotence", idempotent)
                .build()?;
            let op = chat_op(KEYS + 1, 0);
            let d = client.put(op.user_id.clone(), &op).await?;
            anyhow::Ok(d)
        }
        .await;
        println!("probe: fresh producer (idempotence={idempotent}) put: {result:?}");
    }
    let bootstrap = bootstrap.to_string();
    let consumed = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "restart-probe")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .create()?;
        consumer.subscribe(&["restart"])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut errors = Vec::new();
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    return anyhow::Ok(format!(
                        "record {}/{} after assignment {:?}",
                        m.partition(),
                        m.offset(),
                        consumer.assignment().map(|a| a.count())
                    ))
                }
                Some(Err(e)) if errors.len() < 5 => errors.push(e.to_string()),
                _ => {}
            }
        }
        Ok(format!(
            "nothing in 10 s; assignment {:?}; errors {errors:?}",
            consumer.assignment().map(|a| a.count())
        ))
    })
    .await;
    println!("probe: fresh consumer group: {consumed:?}");
}
