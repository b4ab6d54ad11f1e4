//! Search indexing with deferred completion.
//!
//! A search engine wants documents in bulk: one request per few hundred documents, not
//! one per message. [`SearchIndexer`] therefore does not index inside `process`: it turns
//! the operation into a [`Document`], calls [`ProcessingContext::defer`] and hands the
//! document together with its [`Completion`] to a [`BatchIndexer`] task, then returns at
//! once so the lane moves on to the next task. The batch indexer sends a bulk request
//! every `flush_interval` (or as soon as `max_batch` documents are waiting) and completes
//! each task only when its document is in the index.
//!
//! Until then the task counts as unfinished: the committed offset stays below it, so a
//! crash before the flush re-delivers it instead of losing it, and `max_pending` bounds
//! how many documents can wait. Operations with nothing to index complete normally by
//! returning from `process`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decaton_processor::{async_trait, Completion, ProcessError, ProcessingContext, TaskProcessor};
use decaton_protocol::{ChatOp, OpType};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How the batch indexer batches.
#[derive(Debug, Clone, Copy)]
pub struct IndexerConfig {
    /// Send a bulk request at least this often while documents wait.
    pub flush_interval: Duration,
    /// Send a bulk request as soon as this many documents wait.
    pub max_batch: usize,
    /// How long one (simulated) bulk request takes.
    pub bulk_latency: Duration,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        IndexerConfig {
            flush_interval: Duration::from_millis(50),
            max_batch: 500,
            bulk_latency: Duration::from_millis(5),
        }
    }
}

/// A document for the search index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Unique id: `<user>/<sequence>`.
    pub id: String,
    /// What the document is: `message`, `profile` or `membership`.
    pub kind: &'static str,
    /// The user it belongs to.
    pub owner: String,
    /// The room or user it refers to.
    pub target: String,
    /// Searchable text.
    pub text: String,
}

impl Document {
    /// The document for `op`, or `None` for operations that are not searchable.
    pub fn from_op(op: &ChatOp) -> Option<Document> {
        let kind = match op.op() {
            OpType::SendMessage => "message",
            OpType::UpdateProfile => "profile",
            OpType::JoinRoom => "membership",
            _ => return None,
        };
        Some(Document {
            id: format!("{}/{}", op.user_id, op.sequence),
            kind,
            owner: op.user_id.clone(),
            target: op.target_id.clone(),
            text: String::from_utf8_lossy(&op.payload).into_owned(),
        })
    }
}

/// What the indexer did so far.
#[derive(Debug, Default)]
pub struct IndexStats {
    /// Documents indexed (their tasks completed).
    pub indexed: AtomicU64,
    /// Bulk requests sent.
    pub bulk_requests: AtomicU64,
    /// Operations with nothing to index (completed without deferring).
    pub skipped: AtomicU64,
    /// Documents whose task was failed because the indexer had stopped.
    pub rejected: AtomicU64,
    terms: Mutex<HashMap<String, u64>>,
}

impl IndexStats {
    /// A one-line summary, with the most frequent indexed terms.
    pub fn summary(&self) -> String {
        let indexed = self.indexed.load(Ordering::Relaxed);
        let bulks = self.bulk_requests.load(Ordering::Relaxed);
        let mut terms: Vec<(String, u64)> = self
            .terms
            .lock()
            .iter()
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        terms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let top: Vec<String> = terms
            .iter()
            .take(5)
            .map(|(t, n)| format!("{t}:{n}"))
            .collect();
        format!(
            "indexed {indexed} documents in {bulks} bulk requests (avg {:.1}/request), skipped {}, rejected {}; top terms [{}]",
            indexed as f64 / bulks.max(1) as f64,
            self.skipped.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            top.join(" ")
        )
    }
}

struct Pending {
    doc: Document,
    completion: Completion,
}

/// The processor: defers each searchable operation to the [`BatchIndexer`].
#[derive(Clone)]
pub struct SearchIndexer {
    queue: mpsc::Sender<Pending>,
    stats: Arc<IndexStats>,
}

/// The background task that sends bulk requests and completes the deferred tasks.
pub struct BatchIndexer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl SearchIndexer {
    /// Starts the batch indexer on the current tokio runtime and returns the processor
    /// feeding it. Call [`BatchIndexer::stop`] after the subscription has stopped.
    pub fn start(config: IndexerConfig) -> (SearchIndexer, BatchIndexer) {
        let (queue, rx) = mpsc::channel(config.max_batch.max(1) * 4);
        let stats = Arc::new(IndexStats::default());
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(batch_loop(config, rx, stop_rx, stats.clone()));
        (SearchIndexer { queue, stats }, BatchIndexer { stop, task })
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<IndexStats> {
        self.stats.clone()
    }
}

impl BatchIndexer {
    /// Indexes every document still waiting, completes their tasks, and stops.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::error!("batch indexer failed: {e}");
        }
    }
}

#[async_trait]
impl TaskProcessor<ChatOp> for SearchIndexer {
    async fn process(&self, ctx: &ProcessingContext, op: ChatOp) -> Result<(), ProcessError> {
        let Some(doc) = Document::from_op(&op) else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        // From here on the task finishes when `completion` completes, not when we return.
        let completion = ctx.defer();
        if let Err(mpsc::error::SendError(pending)) =
            self.queue.send(Pending { doc, completion }).await
        {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            pending.completion.fail("search indexer stopped");
        }
        Ok(())
    }
}

async fn batch_loop(
    config: IndexerConfig,
    mut rx: mpsc::Receiver<Pending>,
    mut stop: oneshot::Receiver<()>,
    stats: Arc<IndexStats>,
) {
    let mut batch = Vec::with_capacity(config.max_batch);
    let mut tick = tokio::time::interval(config.flush_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            item = rx.recv() => match item {
                Some(p) => {
                    batch.push(p);
                    if batch.len() >= config.max_batch {
                        flush(&mut batch, &config, &stats).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => flush(&mut batch, &config, &stats).await,
        }
    }
    // Index what is still queued; new documents are refused (their tasks fail).
    rx.close();
    while let Some(p) = rx.recv().await {
        batch.push(p);
    }
    flush(&mut batch, &config, &stats).await;
}

async fn flush(batch: &mut Vec<Pending>, config: &IndexerConfig, stats: &IndexStats) {
    if batch.is_empty() {
        return;
    }
    // The bulk request.
    tokio::time::sleep(config.bulk_latency).await;
    {
        let mut terms = stats.terms.lock();
        for p in batch.iter() {
            for term in p.doc.text.split_whitespace() {
                *terms.entry(term.to_lowercase()).or_default() += 1;
            }
        }
    }
    stats.bulk_requests.fetch_add(1, Ordering::Relaxed);
    stats
        .indexed
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    tracing::debug!(documents = batch.len(), "bulk request indexed");
    for p in batch.drain(..) {
        p.completion.complete();
    }
}
