//! Partition-local state (wired to decaton-state once it lands).
#![allow(dead_code, missing_docs)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::context::{CompletionHook, CompletionInner, Outcome};
use crate::partition::PartitionShared;
use crate::stats::Counters;

pub trait StateStore: Send + Sync {}
#[derive(Clone)]
pub struct TaskBatch;
impl StateStore for TaskBatch {}
#[derive(Clone)]
pub struct PartitionStore;
impl PartitionStore {
    pub(crate) fn task_batch(&self) -> TaskBatch {
        TaskBatch
    }
}
#[derive(Clone, Debug)]
pub struct StateConfig;
#[derive(Debug, thiserror::Error)]
#[error("state")]
pub struct StateError;

pub(crate) struct StateRuntime;

impl StateRuntime {
    pub(crate) fn new(
        _cfg: StateConfig,
        _sub: &str,
        _bootstrap: &str,
        _kafka: &std::collections::BTreeMap<String, String>,
        _rt: tokio::runtime::Handle,
        _c: Arc<Counters>,
    ) -> Result<Self, StateError> {
        Err(StateError)
    }
    pub(crate) fn open_partition(&self, _t: &str, _p: i32, _pos: Option<i64>, _ready: Arc<AtomicBool>) -> Result<PartitionStore, StateError> {
        Err(StateError)
    }
    pub(crate) fn close_partition(&self, _t: &str, _p: i32, _s: PartitionStore, _sh: &PartitionShared) {}
}

impl CompletionHook for StateRuntime {
    fn on_complete(&self, inner: Arc<CompletionInner>, _outcome: Outcome) {
        inner.mark_done();
    }
}
