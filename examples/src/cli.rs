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
/// `default_filter` (for example `"info"` or `"warn"`). Then warns about each `DECATON_`
/// variable no binary reads (a misspelt one), naming the closest known variable.
pub fn init_tracing(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Fails only if a subscriber is already installed, and then that one is used.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for note in decaton_service::config::unknown_variable_notes(names) {
        tracing::warn!("{note}");
    }
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
    /// Kafka bootstrap servers for every subscription, over the file and the environment
    /// (`DECATON_KAFKA__BOOTSTRAP_SERVERS`, then `DECATON_BOOTSTRAP`, override the file).
    #[arg(short = 'b', long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub bootstrap: Option<String>,
    /// The subscription to run: the file's `[subscriptions.<ID>]` table, and the consumer
    /// group. Default: the binary's own name. A second instance on another topic needs its
    /// own (and its own `http_addr`), or it joins the first one's group.
    #[arg(long, value_name = "ID")]
    pub subscription: Option<String>,
}

impl ServiceArgs {
    /// Loads the configuration: `--config`, or `examples/config/<name>.toml`.
    pub fn load(&self, name: &str) -> anyhow::Result<ServiceConfig> {
        let path = self.config.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(format!("{name}.toml"))
        });
        let config = ServiceConfig::load(&path)?;
        Ok(match &self.bootstrap {
            Some(servers) => config.with_bootstrap_servers(servers),
            None => config,
        })
    }

    /// The subscription to run: `--subscription`, or `default`; an error naming the
    /// file's subscriptions when the file has no such table.
    pub fn subscription_id(&self, config: &ServiceConfig, default: &str) -> anyhow::Result<String> {
        let id = self.subscription.as_deref().unwrap_or(default);
        if config.subscriptions.contains_key(id) {
            return Ok(id.to_string());
        }
        anyhow::bail!(
            "the configuration has no [subscriptions.{id}] table (it has: {}); fix the table's \
             name, or pass --subscription ID to run another",
            config
                .subscriptions
                .keys()
                .map(|k| format!("[subscriptions.{k}]"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Loads the configuration ([`Self::load`]) and starts the service: logging,
    /// metrics, the HTTP endpoint.
    pub async fn start(&self, name: &str) -> anyhow::Result<Service> {
        let config = self.load(name)?;
        // Before anything is bound or logged: a wrong table name fails at once.
        self.subscription_id(&config, name)?;
        Ok(Service::start(config).await?)
    }
}

/// Runs `main` and turns an error into exit code 1 (printed on stderr).
pub fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FILE: &str = "[kafka]\n\"bootstrap.servers\" = \"file:1\"\n\n\
                        [subscriptions.chat-messages-notifier]\ntopic = \"chat-messages\"\n";

    #[test]
    fn the_bootstrap_flag_wins_and_the_subscription_is_chosen_by_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.toml");
        std::fs::write(&path, FILE).unwrap();
        let args = ServiceArgs {
            config: Some(path),
            bootstrap: Some("flag:2".into()),
            subscription: None,
        };
        let config = args.load("notification-processor").unwrap();
        let e = args
            .subscription_id(&config, "notification-processor")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no [subscriptions.notification-processor] table")
                && e.contains("it has: [subscriptions.chat-messages-notifier]"),
            "{e}"
        );
        let args = ServiceArgs {
            subscription: Some("chat-messages-notifier".into()),
            ..args
        };
        let id = args
            .subscription_id(&config, "notification-processor")
            .unwrap();
        assert_eq!(id, "chat-messages-notifier");
        assert_eq!(config.subscriptions[&id].bootstrap_servers(), "flag:2");
    }
}
