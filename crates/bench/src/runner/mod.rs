//! Runners: the consumers a benchmark drives over a pre-filled topic.
//!
//! Each runner implements [`Runner`]: consume the topic, decode every task, call
//! [`Recorder::started`] when its processing begins (with the delivery latency, produce
//! timestamp to now), process it, call [`Recorder::finished`], and return once the
//! recorder has seen every task.
//!
//! * [`decaton`] — the decaton-rs processor runtime, configured by `--param`;
//! * [`rdkafka_serial`] — the baseline a user writes without the framework: partitions
//!   concurrently, each partition's tasks one after another;
//! * [`rdkafka_raw`] — consume and decode only: the ceiling for a no-op processor.
//!
//! All of them decode the `dt_meta` header and the [`ChatOp`] value, so decoding costs
//! the same everywhere.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use decaton_protocol::headers::raw_headers;
use decaton_protocol::{decode_record, ChatOp, METADATA_HEADER};
use prost::Message as _;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::ClientConfig;

use crate::config::{RunnerKind, RunnerSpec};
use crate::recorder::Recorder;
use crate::BenchError;

pub(crate) mod decaton;
pub(crate) mod rdkafka_raw;
pub(crate) mod rdkafka_serial;

/// What a runner needs to know about its run.
#[derive(Debug, Clone)]
pub(crate) struct RunEnv {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// The pre-filled topic.
    pub topic: String,
    /// A consumer group used by no other run.
    pub group_id: String,
    /// Partitions of the topic.
    pub partitions: i32,
    /// Simulated processing time per task.
    pub latency: Duration,
    /// The runner's `--param`s.
    pub params: Vec<(String, String)>,
}

/// A consumer under benchmark.
#[async_trait]
pub(crate) trait Runner: Send + Sync {
    /// Consumes `env.topic`, reporting every task to `recorder`, until the recorder has
    /// seen them all; then shuts the consumer down and returns.
    async fn run(&self, env: &RunEnv, recorder: Arc<Recorder>) -> Result<(), BenchError>;
}

/// The runner of `kind`.
pub(crate) fn runner(kind: RunnerKind) -> Box<dyn Runner> {
    match kind {
        RunnerKind::Decaton => Box::new(decaton::DecatonRunner),
        RunnerKind::RdkafkaSerial => Box::new(rdkafka_serial::RdkafkaSerial),
        RunnerKind::RdkafkaRaw => Box::new(rdkafka_raw::RdkafkaRaw),
    }
}

/// How many tasks of one partition the runner processes at once, when that is bounded:
/// 1 for `rdkafka-serial`; `partition_concurrency` (default 1, as in Decaton) for
/// `decaton` in `bounded` mode; `max_pending` (default 10000) for `per_key` mode, where
/// every key with work has a lane of its own. `rdkafka-raw` does not process and has no
/// lanes.
pub(crate) fn lanes(spec: &RunnerSpec) -> Option<u64> {
    match spec.kind {
        RunnerKind::RdkafkaSerial => Some(1),
        RunnerKind::RdkafkaRaw => None,
        RunnerKind::Decaton => decaton::lanes(&spec.params),
    }
}

/// The ideal throughput, tasks/s: every lane of every partition busy all the time, each
/// task taking exactly `latency`. Tasks of one key never run at once, so with `keys`
/// distinct keys at most `keys` tasks run at once.
pub(crate) fn ideal_throughput(
    lanes: Option<u64>,
    partitions: i32,
    latency: Duration,
    keys: Option<u64>,
) -> Option<f64> {
    let lanes = lanes?;
    if latency.is_zero() {
        return None;
    }
    let mut concurrent = lanes.saturating_mul(partitions.max(1) as u64);
    if let Some(k) = keys {
        concurrent = concurrent.min(k.max(1));
    }
    Some(concurrent as f64 / latency.as_secs_f64())
}

/// Consumer settings the rdkafka runners share, then the runner's `--param`s verbatim.
pub(crate) fn consumer_config(env: &RunEnv) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &env.bootstrap)
        .set("group.id", &env.group_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("enable.auto.commit", "true")
        // At-least-once as a careful user writes it: store the offset once processed.
        .set("enable.auto.offset.store", "false");
    for (k, v) in &env.params {
        config.set(k, v);
    }
    config
}

/// The simulated processing of one task: sleeps `latency` on the precise timer (nothing
/// for zero) and tells `recorder` how long it really slept.
pub(crate) async fn simulate(latency: Duration, recorder: &Recorder) {
    if !latency.is_zero() {
        recorder.slept(crate::timer::sleep(latency).await);
    }
}

/// Decodes a task record (metadata header and `ChatOp` value) and returns when it was
/// produced, in microseconds since the epoch (`dt_meta` `timestamp_millis`, else the
/// record timestamp).
pub(crate) fn decode_produced_us(msg: &BorrowedMessage<'_>) -> Result<i64, BenchError> {
    let header = msg.headers().and_then(|h| {
        raw_headers(h)
            .find(|h| h.is(METADATA_HEADER))
            .and_then(|h| h.value)
    });
    let record = decode_record(header, msg.payload()).map_err(|e| {
        BenchError::Decode(format!(
            "{}/{}@{}: {e}",
            msg.topic(),
            msg.partition(),
            msg.offset()
        ))
    })?;
    let op = ChatOp::decode(&*record.task).map_err(|e| {
        BenchError::Decode(format!(
            "{}/{}@{}: {e}",
            msg.topic(),
            msg.partition(),
            msg.offset()
        ))
    })?;
    std::hint::black_box(&op);
    let produced_ms = match record.metadata.timestamp_millis {
        0 => msg.timestamp().to_millis().unwrap_or(0),
        t => t,
    };
    Ok(produced_ms * 1_000)
}

/// Closes a consumer off the async workers (librdkafka's close blocks while it leaves
/// the group).
pub(crate) async fn close(consumer: Arc<StreamConsumer>) {
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_follow_the_mode() {
        let d = || RunnerSpec::new(RunnerKind::Decaton);
        assert_eq!(lanes(&d()), Some(1));
        assert_eq!(lanes(&d().param("partition_concurrency", "8")), Some(8));
        assert_eq!(
            lanes(&d().param("decaton.partition.concurrency", "4")),
            Some(4)
        );
        assert_eq!(lanes(&d().param("mode", "per_key")), Some(10_000));
        assert_eq!(lanes(&d().param("partition_concurrency", "x")), None);
        assert_eq!(
            lanes(&d().param("mode", "per-key").param("max_pending", "100")),
            Some(100)
        );
        assert_eq!(lanes(&RunnerSpec::new(RunnerKind::RdkafkaSerial)), Some(1));
        assert_eq!(lanes(&RunnerSpec::new(RunnerKind::RdkafkaRaw)), None);
    }

    #[test]
    fn ideal_is_lanes_times_partitions_over_latency() {
        let ms = Duration::from_millis;
        assert_eq!(ideal_throughput(Some(1), 3, ms(10), None), Some(300.0));
        assert_eq!(ideal_throughput(Some(10), 3, ms(10), Some(5)), Some(500.0));
        assert_eq!(ideal_throughput(Some(1), 3, ms(0), None), None);
        assert_eq!(ideal_throughput(None, 3, ms(10), None), None);
    }
}
