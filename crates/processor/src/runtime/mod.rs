//! The machinery behind [`Subscription::run`](crate::Subscription::run). Nothing here is
//! public.
//!
//! Data flows one way:
//!
//! ```text
//! consumer (poll loop, rebalance callbacks)          consumer.rs, assignment.rs
//!   -> extract (decode, discard)                     extract.rs
//!   -> partition context (register offset, overflow, partition.rs, partitions.rs
//!      pause/resume, delay queue)                    delay.rs
//!   -> lanes (per-key order)                         lanes.rs
//!   -> pipeline (process, settle, state writes)      pipeline.rs, completion.rs, state.rs
//!   -> partition core (offset done)                  partition.rs, offsets/
//!   -> commit (position + offset map)                commit.rs
//! ```
//!
//! Threads: one dedicated OS thread per subscription owns the librdkafka consumer and
//! every Kafka-side decision (assignment, pause/resume, commits), so none races another
//! and none blocks a tokio worker. Lanes run on the tokio runtime. Sled and librdkafka
//! calls that can wait run on tokio's blocking pool.

pub(crate) mod assignment;
pub(crate) mod commit;
pub(crate) mod completion;
pub(crate) mod consumer;
pub(crate) mod delay;
pub(crate) mod extract;
pub(crate) mod forward;
pub(crate) mod kafka_config;
pub(crate) mod lanes;
pub(crate) mod meta;
pub(crate) mod offsets;
pub(crate) mod partition;
pub(crate) mod partition_core;
pub(crate) mod partitions;
pub(crate) mod pipeline;
pub(crate) mod quota;
pub(crate) mod rate;
pub(crate) mod recorder;
pub(crate) mod state;
pub(crate) mod task;
pub(crate) mod topics;
pub(crate) mod wakeup;

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::runtime::Handle;

use crate::config::ProcessorProperties;
use commit::Committer;
use extract::Extractor;
use partitions::Partitions;
use pipeline::TaskRunner;
use recorder::SubscriptionRecorder;
use state::StateRuntime;
use topics::Topics;
use wakeup::Wakeup;

/// Everything one running subscription shares between its consumer thread and the
/// consumer's callbacks.
pub(crate) struct RuntimeCore<T> {
    pub(crate) recorder: Arc<SubscriptionRecorder>,
    pub(crate) topics: Topics,
    pub(crate) props: ProcessorProperties,
    pub(crate) partitions: Mutex<Partitions<T>>,
    pub(crate) runner: Arc<dyn TaskRunner<T>>,
    pub(crate) runtime: Handle,
    pub(crate) state: Option<Arc<StateRuntime>>,
    pub(crate) committer: Committer,
    pub(crate) wakeup: Arc<Wakeup>,
    pub(crate) extractor: Extractor,
    pub(crate) health: Arc<crate::health::HealthBoard>,
    pub(crate) live: crate::LiveProperties,
    /// The per-key quota, when the subscription has one.
    pub(crate) quota: Option<Arc<quota::QuotaRuntime>>,
}
