//! `rdkafka-serial`: the consumer a user writes without the framework.
//!
//! One rdkafka `StreamConsumer` in the run's group; each partition's queue is split off
//! (`split_partition_queue`) and drained by a tokio task of its own, which processes the
//! partition's records strictly one after another: decode, simulated latency, store the
//! offset (auto-commit commits it). Partitions run concurrently, tasks within a
//! partition never do — so its ideal throughput is `partitions / latency`.

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::task::JoinSet;

use super::{close, consumer_config, decode_produced_us, simulate, RunEnv, Runner};
use crate::recorder::{now_micros, Recorder};
use crate::BenchError;

/// See the module docs.
pub(crate) struct RdkafkaSerial;

#[async_trait]
impl Runner for RdkafkaSerial {
    async fn run(&self, env: &RunEnv, recorder: Arc<Recorder>) -> Result<(), BenchError> {
        let consumer: Arc<StreamConsumer> = Arc::new(consumer_config(env).create()?);
        consumer.subscribe(&[&env.topic])?;
        let mut partitions: JoinSet<Result<(), BenchError>> = JoinSet::new();
        for partition in 0..env.partitions {
            let queue = consumer
                .split_partition_queue(&env.topic, partition)
                .ok_or_else(|| {
                    BenchError::Internal(format!(
                        "cannot split the queue of {}/{partition}",
                        env.topic
                    ))
                })?;
            let (consumer, recorder, latency) = (consumer.clone(), recorder.clone(), env.latency);
            partitions.spawn(async move {
                loop {
                    let msg = match queue.recv().await {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(partition, error = %e, "consume error");
                            continue;
                        }
                    };
                    let produced = decode_produced_us(&msg)?;
                    recorder.started(now_micros() - produced);
                    simulate(latency, &recorder).await;
                    consumer.store_offset_from_message(&msg)?;
                    recorder.finished_after(now_micros() - produced);
                }
            });
        }
        let complete = recorder.wait_complete();
        tokio::pin!(complete);
        let result = loop {
            tokio::select! {
                _ = &mut complete => break Ok(()),
                // The main queue still carries events and errors; it must be polled.
                m = consumer.recv() => {
                    if let Err(e) = m {
                        tracing::warn!(error = %e, "consumer error");
                    }
                }
                Some(r) = partitions.join_next() => {
                    break match r {
                        Ok(Err(e)) => Err(e),
                        Ok(Ok(())) => Err(BenchError::Internal("partition task ended".into())),
                        Err(e) => Err(BenchError::Internal(format!("partition task: {e}"))),
                    };
                }
            }
        };
        partitions.shutdown().await;
        close(consumer).await;
        result
    }
}
