//! `decaton config check FILE`: validates a service configuration, or a replicator
//! configuration, without starting anything.
//!
//! A file with a top-level `source_topic` is a replicator configuration (as `decaton
//! replicate --config` reads it): its routes, filters and task type are compiled and any
//! error is reported with file, line and column.
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
    /// Check a service configuration file (with the DECATON_ environment applied), or a
    /// replicator configuration file.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// Runs `decaton config ...`.
pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Check { file } => {
            if is_replicator_config(&file) {
                decaton_replicator::ReplicatorBuilder::from_file(&file)?;
                println!("{}: ok (replicator configuration)", file.display());
                return Ok(());
            }
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

/// Whether `file` is a replicator configuration (a top-level `source_topic`). A file that
/// does not parse is not: the service check then reports why.
fn is_replicator_config(file: &std::path::Path) -> bool {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("source_topic"))
}
