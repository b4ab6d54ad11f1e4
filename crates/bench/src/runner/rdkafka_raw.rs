//! `rdkafka-raw`: consume and decode, no processing — the ceiling for a no-op processor.
//!
//! One rdkafka `StreamConsumer` and one loop: receive, decode header and task, store the
//! offset. The simulated latency is ignored (there is no processing to delay), so the
//! figure is what a single consumer can fetch and decode.

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::consumer::{Consumer, StreamConsumer};

use super::{close, consumer_config, decode_produced_us, RunEnv, Runner};
use crate::recorder::{now_micros, Recorder};
use crate::BenchError;

/// See the module docs.
pub(crate) struct RdkafkaRaw;

#[async_trait]
impl Runner for RdkafkaRaw {
    async fn run(&self, env: &RunEnv, recorder: Arc<Recorder>) -> Result<(), BenchError> {
        let consumer: Arc<StreamConsumer> = Arc::new(consumer_config(env).create()?);
        consumer.subscribe(&[&env.topic])?;
        let result = loop {
            match consumer.recv().await {
                Ok(msg) => {
                    match decode_produced_us(&msg) {
                        Ok(produced) => recorder.started(now_micros() - produced),
                        Err(e) => break Err(e),
                    }
                    if let Err(e) = consumer.store_offset_from_message(&msg) {
                        break Err(e.into());
                    }
                    if recorder.finished() {
                        break Ok(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "consume error"),
            }
        };
        close(consumer).await;
        result
    }
}
