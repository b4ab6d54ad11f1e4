//! Log output: `tracing` to stderr, as text or one JSON object per line.
//!
//! In JSON every line carries the fields of the spans it was logged in (`span` for the
//! innermost, `spans` for all of them): a line logged inside `process` has the task's
//! subscription, topic, partition, offset, key and retry count. `RUST_LOG` overrides the
//! configured filter.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, ServiceSettings};

/// Installs the global subscriber; false if one was installed already (that one stays).
pub(crate) fn install(settings: &ServiceSettings) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
            .is_ok(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
            .is_ok(),
    }
}
