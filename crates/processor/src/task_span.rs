//! The span each task runs in.
//!
//! `process` runs inside a `task` span carrying the subscription, topic, partition,
//! offset, key and retry count, so every line a processor logs says which task it is
//! about. When the producer put a W3C `traceparent` on the task, the span carries its
//! trace id and the producer's span id as its parent: the processing continues the
//! producer's trace. A tracing backend that exports spans (OpenTelemetry) registers a
//! [`set_trace_continuation`] hook to make the span a child of the producer's span.

use std::sync::OnceLock;

use decaton_protocol::TraceParent;

/// What a [`set_trace_continuation`] hook is: called with every task span whose task
/// carries a `traceparent`, right after the span is created and before it is entered.
pub type TraceContinuation = fn(&tracing::Span, &TraceParent);

static CONTINUATION: OnceLock<TraceContinuation> = OnceLock::new();

/// Registers the process-wide hook that makes a task's span continue its producer's trace
/// (e.g. set its OpenTelemetry parent). Returns false if a hook was registered already
/// (the first one stays).
pub fn set_trace_continuation(hook: TraceContinuation) -> bool {
    CONTINUATION.set(hook).is_ok()
}

/// Longest key shown in the span; longer keys are cut (a key is an id, not a payload).
const MAX_KEY_CHARS: usize = 128;

/// The span of one task.
pub(crate) fn task_span(
    subscription: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    retry_count: i64,
    trace: Option<&TraceParent>,
) -> tracing::Span {
    let key = key.map(|k| {
        let text = String::from_utf8_lossy(k);
        match text.char_indices().nth(MAX_KEY_CHARS) {
            Some(_) => format!("{}…", text.chars().take(MAX_KEY_CHARS).collect::<String>()),
            None => text.into_owned(),
        }
    });
    let span = tracing::info_span!(
        "task",
        subscription,
        topic,
        partition,
        offset,
        key = key.as_deref().unwrap_or(""),
        retry_count,
        trace_id = trace.map(|t| t.trace_id_hex()),
        parent_span_id = trace.map(|t| t.parent_id_hex()),
    );
    if let (Some(trace), Some(hook)) = (trace, CONTINUATION.get()) {
        hook(&span, trace);
    }
    span
}
