//! OpenTelemetry export (the `otel` feature): every span, the task spans included, goes to
//! an OTLP/HTTP collector; a task whose producer sent a `traceparent` is exported as a
//! child of the producer's span, in the producer's trace.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use decaton_processor::TraceParent;

/// The exporter: flushed and stopped by [`Exporter::shutdown`].
pub(crate) struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports what is buffered and stops (blocking: call off the async workers).
    pub(crate) fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("span export shutdown: {e}");
        }
    }
}

/// The layer exporting spans to `endpoint` (`http://host:4318`) as `service_name`.
pub(crate) fn layer<S>(
    endpoint: &str,
    service_name: &str,
) -> Result<(impl tracing_subscriber::Layer<S>, Exporter), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    // Exports run as tokio tasks, never on the thread that ends a span.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("decaton");
    decaton_processor::set_trace_continuation(continue_trace);
    Ok((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Exporter { provider },
    ))
}

/// Makes a task's span a child of its producer's span.
fn continue_trace(span: &tracing::Span, parent: &TraceParent) {
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(remote));
}
