//! `decaton`: the decaton-rs processor runtime.
//!
//! A [`Subscription`] (consumer group = the run's group id) over the run's topic, whose
//! [`TaskProcessor`] receives the [`ChatOp`] the runtime decoded, records the delivery
//! latency from the task's metadata (`dt_meta` `timestamp_millis`), waits the simulated
//! latency and returns `Ok`. Each `--param` is first offered to
//! [`ProcessorProperties::set`] (`mode`, `partition_concurrency`, `max_pending`, Decaton
//! names such as `decaton.partition.concurrency`, ...); a name it does not know is passed
//! to librdkafka through [`SubscriptionBuilder::set`](decaton_processor::SubscriptionBuilder::set).
//!
//! Once the recorder has seen every task the runner asks the subscription to shut down
//! (it commits and leaves the group) and waits for it, outside the measured window.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use decaton_processor::{
    ProcessError, ProcessingContext, ProcessorProperties, PropertyError, SchedulingMode,
    Subscription, TaskProcessor,
};
use decaton_protocol::ChatOp;

use super::{RunEnv, Runner};
use crate::recorder::{now_micros, Recorder};
use crate::BenchError;

/// See the module docs.
pub(crate) struct DecatonRunner;

/// The benchmark's processor: record, wait, done.
struct BenchProcessor {
    recorder: Arc<Recorder>,
    latency: Duration,
}

#[async_trait]
impl TaskProcessor<ChatOp> for BenchProcessor {
    async fn process(&self, ctx: &ProcessingContext, task: ChatOp) -> Result<(), ProcessError> {
        let produced = ctx.created_at_millis() * 1_000;
        self.recorder.started(now_micros() - produced);
        std::hint::black_box(&task);
        super::simulate(self.latency, &self.recorder).await;
        self.recorder.finished_after(now_micros() - produced);
        Ok(())
    }
}

/// Splits `--param`s into processor properties and librdkafka settings.
fn properties(
    params: &[(String, String)],
) -> Result<(ProcessorProperties, Vec<(String, String)>), BenchError> {
    let mut props = ProcessorProperties::default();
    let mut kafka = Vec::new();
    for (k, v) in params {
        match props.set(k, v) {
            Ok(_) => {}
            Err(PropertyError::Unknown(_)) => kafka.push((k.clone(), v.clone())),
            Err(e) => return Err(BenchError::Config(format!("--param {k}={v}: {e}"))),
        }
    }
    Ok((props, kafka))
}

/// Tasks of one partition that may run at once under these `--param`s:
/// `partition_concurrency` in `bounded` mode, `max_pending` in `per_key` mode. `None`
/// when the params are invalid (the run itself reports why).
pub(crate) fn lanes(params: &[(String, String)]) -> Option<u64> {
    let (props, _) = properties(params).ok()?;
    Some(match props.mode {
        SchedulingMode::Bounded => props.partition_concurrency as u64,
        SchedulingMode::PerKey => props.max_pending as u64,
    })
}

#[async_trait]
impl Runner for DecatonRunner {
    async fn run(&self, env: &RunEnv, recorder: Arc<Recorder>) -> Result<(), BenchError> {
        let (props, kafka) = properties(&env.params)?;
        let processor = BenchProcessor {
            recorder: recorder.clone(),
            latency: env.latency,
        };
        let mut builder = Subscription::builder(env.group_id.clone(), processor)
            .bootstrap_servers(env.bootstrap.clone())
            .topic(env.topic.clone())
            .properties(props);
        for (k, v) in kafka {
            builder = builder.set(k, v);
        }
        let subscription = builder
            .build()
            .map_err(|e| BenchError::Config(e.to_string()))?;
        let handle = subscription.handle();
        let run = subscription.run();
        tokio::pin!(run);
        tokio::select! {
            _ = recorder.wait_complete() => handle.shutdown(),
            r = &mut run => {
                return Err(match r {
                    Ok(stats) => BenchError::Internal(format!("subscription stopped early: {stats:?}")),
                    Err(e) => BenchError::Internal(format!("subscription: {e}")),
                });
            }
        }
        let stats = run
            .await
            .map_err(|e| BenchError::Internal(format!("subscription: {e}")))?;
        if stats.failed > 0 || stats.discarded > 0 {
            tracing::warn!(?stats, "the decaton runner failed or discarded tasks");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_split_into_properties_and_kafka_settings() -> Result<(), BenchError> {
        let p = |k: &str, v: &str| (k.to_string(), v.to_string());
        let (props, kafka) = properties(&[
            p("mode", "per_key"),
            p("decaton.partition.concurrency", "4"),
            p("fetch.wait.max.ms", "10"),
        ])?;
        assert_eq!(props.partition_concurrency, 4);
        assert_eq!(kafka, vec![p("fetch.wait.max.ms", "10")]);
        assert!(properties(&[p("partition_concurrency", "zero")]).is_err());
        Ok(())
    }
}
