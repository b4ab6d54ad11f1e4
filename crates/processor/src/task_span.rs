//! The span each task runs in.
//!
//! `process` runs inside a `task` span carrying the subscription, topic, partition,
//! offset, key and retry count, so every line a processor logs says which task it is
//! about. When the producer put a W3C `traceparent` on the task, the span carries its
//! trace id and the producer's span id as its parent: the processing continues the
//! producer's trace.

use decaton_protocol::{TaskMetadata, TraceParent};

/// Longest key shown in the span; longer keys are cut (a key is an id, not a payload).
const MAX_KEY_CHARS: usize = 128;

/// The span of one task.
pub(crate) fn task_span(
    subscription: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    metadata: &TaskMetadata,
    trace: Option<&TraceParent>,
) -> tracing::Span {
    let key = key.map(|k| {
        let text = String::from_utf8_lossy(k);
        match text.char_indices().nth(MAX_KEY_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.into_owned(),
        }
    });
    tracing::info_span!(
        "task",
        subscription,
        topic,
        partition,
        offset,
        key = key.as_deref().unwrap_or(""),
        retry_count = metadata.retry_count,
        trace_id = trace.map(|t| t.trace_id_hex()),
        parent_span_id = trace.map(|t| t.parent_id_hex()),
    )
}
