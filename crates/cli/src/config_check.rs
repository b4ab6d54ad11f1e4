//! `decaton config check FILE`: validates a service configuration without starting
//! anything.
//!
//! Reads the file as a processor service would (`DECATON_` environment overrides
//! included), checks every key — Decaton properties parse, librdkafka settings are ones
//! librdkafka knows, with values it accepts — and prints one line per subscription. A bad
//! key is reported with the file and line: `svc.toml:12: unknown key ...`. Nothing is
//! contacted.

use std::path::PathBuf;

/// Arguments of `decaton config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ConfigCommand {
    /// Check a service configuration file (with the DECATON_ environment applied).
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// Runs `decaton config ...`.
pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Check { file } => {
            let config = decaton_service::ServiceConfig::load(&file)?;
            println!(
                "{}: ok; http {} ({:?} logs)",
                file.display(),
                config.service.http_addr,
                config.service.log_format
            );
            for (id, s) in &config.subscriptions {
                println!(
                    "subscription {id}: topic {} on {}, mode {:?}, {} librdkafka settings{}",
                    s.topic,
                    s.bootstrap_servers(),
                    s.properties.mode,
                    s.kafka.len(),
                    s.state
                        .as_ref()
                        .map(|st| format!(", state in {}", st.state_dir.display()))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}
