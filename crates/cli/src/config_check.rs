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
//! contacted. With `--subscription ID` (repeatable, the subscriptions the binary runs), a
//! table the binary does not know (a misspelt `[subscriptions.…]`) or one it lacks is an
//! error. Ignored `DECATON_` variables are reported as warnings.

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
        /// A subscription the binary reading the file runs (its `[subscriptions.<ID>]`
        /// table); repeat for several. The file must then have exactly these tables: a
        /// misspelt table name is reported instead of passing unnoticed.
        #[arg(long, value_name = "ID")]
        subscription: Vec<String>,
    },
}

/// Runs `decaton config ...`.
pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Check { file, subscription } => {
            if is_replicator_config(&file) {
                decaton_replicator::ReplicatorBuilder::from_file(&file)?;
                println!("{}: ok (replicator configuration)", file.display());
                return Ok(());
            }
            let config = decaton_service::ServiceConfig::load(&file)?;
            for note in config.notes() {
                eprintln!("warning: {note}");
            }
            if !subscription.is_empty() {
                check_subscriptions(&file, &config, &subscription)?;
            }
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

/// Every expected subscription has its table and no other table is there.
fn check_subscriptions(
    file: &std::path::Path,
    config: &decaton_service::ServiceConfig,
    expected: &[String],
) -> anyhow::Result<()> {
    let found: Vec<&String> = config.subscriptions.keys().collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !config.subscriptions.contains_key(*id))
        .collect();
    let unexpected: Vec<&&String> = found.iter().filter(|id| !expected.contains(**id)).collect();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    for id in &missing {
        problems.push(format!("no [subscriptions.{id}] table"));
    }
    for id in &unexpected {
        problems.push(format!(
            "[subscriptions.{id}] is not a subscription the binary runs{}",
            closest(id, &missing)
                .map(|m| format!(" (a misspelt [subscriptions.{m}]?)"))
                .unwrap_or_default()
        ));
    }
    anyhow::bail!("{}: {}", file.display(), problems.join("; "))
}

/// The name among `candidates` within a few edits of `id`.
fn closest<'a>(id: &str, candidates: &[&'a String]) -> Option<&'a String> {
    candidates
        .iter()
        .map(|c| (strsim_distance(id, c), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over characters.
fn strsim_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = i;
        let mut next_row = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or(usize::MAX - 1);
            let left = next_row.last().copied().unwrap_or(usize::MAX - 1);
            next_row.push(
                (previous + usize::from(ca != *cb))
                    .min(above + 1)
                    .min(left + 1),
            );
            previous = above;
        }
        row = next_row;
    }
    row.last().copied().unwrap_or(0)
}

/// Whether `file` is a replicator configuration (a top-level `source_topic`). A file that
/// does not parse is not: the service check then reports why.
fn is_replicator_config(file: &std::path::Path) -> bool {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("source_topic"))
}
