//! What every example binary shares: logging, signals, `key=value` parsing, and starting
//! a processor as a service.
//!
//! A processor binary is a [`decaton_service::Service`]: it takes `--config FILE` (by
//! default its own file in `examples/config/`), builds its subscription from the file's
//! `[subscriptions.<id>]` table and runs until SIGTERM or Ctrl-C, serving `/metrics` and
//! `/health/*` on the file's `http_addr`.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use decaton_service::{Service, ServiceConfig};
use tracing_subscriber::EnvFilter;

/// Installs a `tracing` subscriber that logs to stderr; `RUST_LOG` overrides
/// `default_filter` (for example `"info"` or `"warn"`).
pub fn init_tracing(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Fails only if a subscriber is already installed, and then that one is used.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("listening for Ctrl-C")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("listening for Ctrl-C")?;
    Ok(())
}

/// Parses `key=value` (the value may itself contain `=`).
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

/// The flag every processor binary takes: its service configuration file.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// The service configuration (TOML; `DECATON_` environment variables override it).
    /// Default: the binary's file in `examples/config/`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ServiceArgs {
    /// Loads the configuration: `--config`, or `examples/config/<name>.toml`.
    pub fn load(&self, name: &str) -> anyhow::Result<ServiceConfig> {
        let path = self.config.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(format!("{name}.toml"))
        });
        Ok(ServiceConfig::load(&path)?)
    }

    /// Loads the configuration ([`Self::load`]) and starts the service: logging,
    /// metrics, the HTTP endpoint.
    pub async fn start(&self, name: &str) -> anyhow::Result<Service> {
        Ok(Service::start(self.load(name)?).await?)
    }
}

/// Runs `main` and turns an error into exit code 1 (printed on stderr).
pub fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
