//! Log output: `tracing` to stderr, as text or one JSON object per line; with the `otel`
//! feature and an `otlp_endpoint`, spans are also exported to an OpenTelemetry collector.
//!
//! In JSON every line carries the fields of the spans it was logged in (`span` for the
//! innermost, `spans` for all of them): a line logged inside `process` has the task's
//! subscription, topic, partition, offset, key and retry count. `RUST_LOG` overrides the
//! configured filter (which also decides which spans are exported).

use std::io::IsTerminal as _;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, ServiceSettings};

/// What must live as long as the logging: the span exporter, if any.
pub(crate) struct LoggingGuard {
    #[cfg(feature = "otel")]
    pub(crate) exporter: Option<crate::otel::Exporter>,
}

/// Installs the global subscriber (if one was installed already, that one stays and
/// nothing is exported).
pub(crate) fn install(
    settings: &ServiceSettings,
    service_name: &str,
) -> Result<LoggingGuard, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    {
        let (layer, exporter) = match &settings.otlp_endpoint {
            Some(endpoint) => {
                let (layer, exporter) = crate::otel::layer(endpoint, service_name)?;
                (Some(layer), Some(exporter))
            }
            None => (None, None),
        };
        let _ = registry.with(layer).try_init();
        Ok(LoggingGuard { exporter })
    }
    #[cfg(not(feature = "otel"))]
    {
        if settings.otlp_endpoint.is_some() {
            return Err(format!(
                "otlp_endpoint is set but {service_name} was built without the `otel` feature"
            ));
        }
        let _ = registry.try_init();
        Ok(LoggingGuard {})
    }
}
