//! The service configuration: one TOML file, overridden by `DECATON_` environment
//! variables.
//!
//! ```toml
//! [service]
//! http_addr = "127.0.0.1:9464"   # /metrics, /health/live, /health/ready
//! log_format = "json"            # or "text"
//!
//! [kafka]                        # librdkafka settings shared by every subscription
//! "bootstrap.servers" = "kafka-1:9092,kafka-2:9092"
//!
//! [subscriptions.storage-mutation-processor]
//! topic = "chat-ops"
//! "decaton.partition.concurrency" = 8   # a Decaton property, by either name
//! max_pending = 5000
//! "session.timeout.ms" = 10000          # anything else: a librdkafka setting, verbatim
//! ```
//!
//! Every key is checked when the file is loaded: a Decaton property must parse, a
//! librdkafka setting must be one librdkafka knows (its value is checked by librdkafka
//! itself, without connecting anywhere), and any other key is an error that names the key
//! and its line. Dotted keys may be quoted or not; `decaton.max.pending.records = 10` and
//! `"decaton.max.pending.records" = 10` are the same key.
//!
//! Environment variables override the file: `DECATON_SERVICE__HTTP_ADDR`,
//! `DECATON_KAFKA__BOOTSTRAP_SERVERS` (`_` becomes `.` in librdkafka names) and
//! `DECATON_SUBSCRIPTIONS__<ID>__<KEY>`, where `<ID>` is the subscription id in upper case
//! with `-` and `.` written as `_` (`STORAGE_MUTATION_PROCESSOR`), and `<KEY>` a property
//! (`PARTITION_CONCURRENCY`, `DECATON_PARTITION_CONCURRENCY`), `TOPIC`, `STATE_DIR`, or a
//! librdkafka setting (`SESSION_TIMEOUT_MS`).
//!
//! The bootstrap servers, from the strongest source to the weakest: the binary's
//! `-b`/`--bootstrap` flag ([`ServiceConfig::with_bootstrap_servers`]), a subscription's own
//! `bootstrap.servers` (`DECATON_SUBSCRIPTIONS__<ID>__BOOTSTRAP_SERVERS`, then the table in
//! the file), `DECATON_KAFKA__BOOTSTRAP_SERVERS`, `DECATON_BOOTSTRAP` (the variable every
//! decaton-rs binary reads, the `decaton` command line included), then `[kafka]` in the
//! file. There is no built-in default: a subscription without any is refused.
//!
//! A `DECATON_` variable that is none of these (a typo such as
//! `DECATON_KAFKA_BOOTSTRAP_SERVERS`) is ignored with a note naming the closest known
//! variable, and so is a `DECATON_SUBSCRIPTIONS__<ID>__<KEY>` for a subscription the file
//! does not have (one shell may serve several services); [`ServiceConfig::notes`] lists
//! them and [`crate::Service::start`] logs them as warnings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use decaton_processor::{
    Backoff, DeadLetterConfig, ProcessorProperties, PropertyError, RetryConfig, StateConfig,
};
use decaton_state::Backend;
use rdkafka::ClientConfig;
use toml_edit::{Item, Value};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "DECATON_";

/// The bootstrap servers for every decaton-rs binary that is given no `-b`/`--bootstrap`
/// flag; in a service it stands below `DECATON_KAFKA__BOOTSTRAP_SERVERS`.
pub const BOOTSTRAP_ENV: &str = "DECATON_BOOTSTRAP";

/// `DECATON_` variables read outside the configuration file: the bootstrap servers, and
/// the test tooling's.
const OTHER_VARIABLES: &[&str] = &[
    BOOTSTRAP_ENV,
    "DECATON_TEST_BROKERS",
    "DECATON_RESTORE_BROKER",
    "DECATON_RESTORE_RECORDS",
    "DECATON_CACHE",
];

/// The `[service]` keys, for suggestions.
const SERVICE_KEYS: &[&str] = &[
    "http_addr",
    "log_format",
    "log_filter",
    "stall_timeout_ms",
    "lag_interval_ms",
    "liveness_timeout_ms",
    "otlp_endpoint",
];

/// Notes about the `DECATON_` variables among `names` that no decaton-rs binary reads,
/// each naming the closest variable that one does. Configuration-file overrides
/// (`DECATON_SERVICE__…`, `DECATON_KAFKA__…`, `DECATON_SUBSCRIPTIONS__…`) count as known
/// here; [`ServiceConfig::load`] checks those against the file.
pub fn unknown_variable_notes<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut names: Vec<String> = names
        .into_iter()
        .map(|n| n.as_ref().to_string())
        .filter(|n| n.starts_with(ENV_PREFIX))
        .collect();
    names.sort();
    names
        .into_iter()
        .filter(|name| {
            let rest = name.strip_prefix(ENV_PREFIX).unwrap_or(name);
            !OTHER_VARIABLES.contains(&name.as_str())
                && !["SERVICE__", "KAFKA__", "SUBSCRIPTIONS__", "SUBSCRIPTION__"]
                    .iter()
                    .any(|p| rest.starts_with(p))
        })
        .map(|name| unknown_variable_note(&name, &[]))
        .collect()
}

/// "unknown environment variable X ignored (did you mean Y?)", Y the closest of the known
/// variables and of `extra`.
fn unknown_variable_note(name: &str, extra: &[String]) -> String {
    let mut known: Vec<String> = OTHER_VARIABLES.iter().map(|s| s.to_string()).collect();
    known.push("DECATON_KAFKA__BOOTSTRAP_SERVERS".into());
    known.extend(
        SERVICE_KEYS
            .iter()
            .map(|k| format!("DECATON_SERVICE__{}", k.to_ascii_uppercase())),
    );
    known.extend(extra.iter().cloned());
    let closest = known
        .iter()
        .min_by_key(|k| edit_distance(name, k))
        .map(String::as_str)
        .unwrap_or(BOOTSTRAP_ENV);
    format!("unknown environment variable {name} ignored (did you mean {closest}?)")
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row.first().copied().unwrap_or(0);
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or(usize::MAX - 1);
            let left = row.get(j).copied().unwrap_or(usize::MAX - 1);
            let value = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(left + 1);
            diagonal = above;
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = value;
            }
        }
    }
    row.last().copied().unwrap_or(0)
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, colored on a terminal.
    #[default]
    Text,
    /// One JSON object per line, with the fields of every enclosing span.
    Json,
}

/// The `[service]` table: what the process itself does.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServiceSettings {
    /// Where `/metrics`, `/health/live` and `/health/ready` are served (`http_addr`,
    /// default `127.0.0.1:9464`; port 0 picks a free port, logged at start).
    pub http_addr: SocketAddr,
    /// Log format (`log_format`, `text` or `json`).
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax (`log_filter`, default `info`); `RUST_LOG`, when
    /// set, wins.
    pub log_filter: String,
    /// A partition where no task has completed for this long while tasks that could run
    /// are pending is reported not ready (`stall_timeout_ms`, default 60 s).
    pub stall_timeout: Duration,
    /// How often consumer lag is read from the broker (`lag_interval_ms`, default 10 s).
    pub lag_interval: Duration,
    /// A consumer loop that has not turned for this long makes the service not live
    /// (`liveness_timeout_ms`, default 30 s).
    pub liveness_timeout: Duration,
    /// Where spans are exported with OTLP over HTTP (`otlp_endpoint`, e.g.
    /// `http://collector:4318`; default none). Needs the `otel` cargo feature.
    pub otlp_endpoint: Option<String>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            stall_timeout: Duration::from_secs(60),
            lag_interval: Duration::from_secs(10),
            liveness_timeout: Duration::from_secs(30),
            otlp_endpoint: None,
        }
    }
}

/// One `[subscriptions.<id>]` table, with the shared `[kafka]` settings merged in.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriptionConfig {
    /// The subscription id (= consumer group id): the table's name.
    pub id: String,
    /// The topic it processes.
    pub topic: String,
    /// Decaton properties.
    pub properties: ProcessorProperties,
    /// librdkafka consumer settings, `bootstrap.servers` included.
    pub kafka: BTreeMap<String, String>,
    /// The partition-local state store, if `state.dir` (or another `state.` key) is set.
    pub state: Option<StateConfig>,
    /// Retrying failed tasks, if any `retry.` key is set (and `retry.enabled` is not
    /// false).
    pub retry: Option<RetryConfig>,
    /// The dead-letter topic, if any `dead_letter.` key is set (and
    /// `dead_letter.enabled` is not false).
    pub dead_letter: Option<DeadLetterConfig>,
    /// A file of reloadable properties (`live_properties_file`): edits to it change the
    /// processing rate, `max_pending`, `ignore_keys`, `partition_concurrency` or the
    /// deferred timeout while the subscription runs (see `decaton_processor::FileProperties`).
    pub live_properties_file: Option<std::path::PathBuf>,
    /// The retry topic the subscription also consumes, if it retries through one.
    retry_topic: Option<String>,
}

impl SubscriptionConfig {
    /// The topics the subscription consumes: its topic, and its retry topic if it
    /// retries through one.
    pub fn topics(&self) -> Vec<String> {
        std::iter::once(self.topic.clone())
            .chain(self.retry_topic.clone())
            .collect()
    }

    /// The bootstrap servers (`bootstrap.servers`).
    pub fn bootstrap_servers(&self) -> &str {
        self.kafka
            .get("bootstrap.servers")
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Applies this configuration to a subscription builder: bootstrap servers, topic,
    /// properties, librdkafka settings and state store.
    pub fn apply<T, P>(
        &self,
        mut builder: decaton_processor::SubscriptionBuilder<T, P>,
    ) -> decaton_processor::SubscriptionBuilder<T, P>
    where
        T: prost::Message + Default + Send + 'static,
        P: decaton_processor::TaskProcessor<T>,
    {
        builder = builder
            .bootstrap_servers(self.bootstrap_servers())
            .topic(self.topic.clone())
            .properties(self.properties.clone());
        for (k, v) in self.kafka.iter().filter(|(k, _)| *k != "bootstrap.servers") {
            builder = builder.set(k.clone(), v.clone());
        }
        if let Some(state) = &self.state {
            builder = builder.state_store(state.clone());
        }
        if let Some(retry) = &self.retry {
            builder = builder.retry(retry.clone());
        }
        if let Some(dead_letter) = &self.dead_letter {
            builder = builder.dead_letter(dead_letter.clone());
        }
        if let Some(path) = &self.live_properties_file {
            builder = builder.property_supplier(decaton_processor::FileProperties::new(path));
        }
        builder
    }
}

/// A loaded and checked configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// The `[service]` table.
    pub service: ServiceSettings,
    /// The subscriptions, by id.
    pub subscriptions: BTreeMap<String, SubscriptionConfig>,
    /// Environment variables that were ignored, and why.
    notes: Vec<String>,
}

/// Why a configuration was refused: where (file and line, or environment variable) and
/// what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    origin: String,
    line: Option<usize>,
    message: String,
}

impl ConfigError {
    /// The file, or `environment variable NAME`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The 1-based line in the file, when the error has one.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Where a setting came from.
#[derive(Debug, Clone)]
struct Location {
    origin: String,
    line: Option<usize>,
}

impl Location {
    fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.origin.clone(),
            line: self.line,
            message: message.into(),
        }
    }
}

/// One `key = value` from the file or the environment.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    value: String,
    at: Location,
}

/// What the file and the environment say, section by section, in the order they apply.
#[derive(Default)]
struct Raw {
    service: Vec<Entry>,
    kafka: Vec<Entry>,
    subscriptions: BTreeMap<String, (Location, Vec<Entry>)>,
}

impl ServiceConfig {
    /// Loads `path` and applies the process's `DECATON_` environment variables.
    pub fn load(path: impl AsRef<Path>) -> Result<ServiceConfig, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        // vars() would panic on a variable that is not UTF-8; such a variable is no
        // override of ours.
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Self::parse(&text, &origin, env)
    }

    /// Parses `text` (named `origin` in errors) and applies the `DECATON_` variables among
    /// `env`.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ServiceConfig, ConfigError> {
        let mut raw = Raw::default();
        read_file(text, origin, &mut raw)?;
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        let mut notes = Vec::new();
        // Below every DECATON_KAFKA__ variable: those are applied after it.
        if let Some((name, value)) = env.iter().find(|(k, _)| k == BOOTSTRAP_ENV) {
            if !value.trim().is_empty() {
                raw.kafka.push(Entry {
                    key: "bootstrap.servers".into(),
                    value: value.trim().to_string(),
                    at: Location {
                        origin: format!("environment variable {name}"),
                        line: None,
                    },
                });
            }
        }
        for (name, value) in env {
            read_env(&name, value, &mut raw, &mut notes)?;
        }
        let mut config = build(raw)?;
        config.notes = notes;
        Ok(config)
    }

    /// Environment variables that were ignored (unknown, or for a subscription the file
    /// does not have), each with the reason; [`crate::Service::start`] logs them.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Sets every subscription's `bootstrap.servers`, over the file and the environment:
    /// what a binary's `-b`/`--bootstrap` flag does. Blank `servers` change nothing.
    pub fn with_bootstrap_servers(mut self, servers: &str) -> ServiceConfig {
        let servers = servers.trim();
        if !servers.is_empty() {
            for subscription in self.subscriptions.values_mut() {
                subscription
                    .kafka
                    .insert("bootstrap.servers".into(), servers.to_string());
            }
        }
        self
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn read_file(text: &str, origin: &str, raw: &mut Raw) -> Result<(), ConfigError> {
    let at = |span: Option<std::ops::Range<usize>>| Location {
        origin: origin.to_string(),
        line: span.map(|s| line_of(text, s.start)),
    };
    let doc = toml_edit::Document::parse(text.to_string()).map_err(|e| {
        at(e.span()).error(format!(
            "not valid TOML: {}",
            e.message().lines().next().unwrap_or("")
        ))
    })?;
    let root = doc.as_table();
    for (name, item) in root.iter() {
        let key_at = at(root.key(name).and_then(|k| k.span()));
        match name {
            "service" => flatten(item, "", text, origin, &key_at, &mut raw.service)?,
            "kafka" => flatten(item, "", text, origin, &key_at, &mut raw.kafka)?,
            "subscriptions" => {
                let Some(table) = item.as_table_like() else {
                    return Err(key_at
                        .error("`subscriptions` must be a table of [subscriptions.<id>] tables"));
                };
                for (id, sub) in table.iter() {
                    let sub_at = at(table.key(id).and_then(|k| k.span()));
                    if sub.as_table_like().is_none() {
                        return Err(sub_at.error(format!(
                            "subscription `{id}` must be a table ([subscriptions.{id}])"
                        )));
                    }
                    let mut entries = Vec::new();
                    flatten(sub, "", text, origin, &sub_at, &mut entries)?;
                    raw.subscriptions.insert(id.to_string(), (sub_at, entries));
                }
            }
            other => {
                return Err(key_at.error(format!(
                    "unknown key `{other}` (expected [service], [kafka] or [subscriptions.<id>])"
                )))
            }
        }
    }
    Ok(())
}

/// Turns a table (and its dotted or nested sub-tables) into `a.b.c = value` entries.
fn flatten(
    item: &Item,
    prefix: &str,
    text: &str,
    origin: &str,
    table_at: &Location,
    out: &mut Vec<Entry>,
) -> Result<(), ConfigError> {
    let Some(table) = item.as_table_like() else {
        return Err(table_at.error(format!(
            "`{}` must be a table",
            prefix.trim_end_matches('.')
        )));
    };
    for (key, value) in table.iter() {
        let name = format!("{prefix}{key}");
        let span = table
            .key(key)
            .and_then(|k| k.span())
            .or_else(|| value.span());
        let at = Location {
            origin: origin.to_string(),
            line: span.map(|s| line_of(text, s.start)).or(table_at.line),
        };
        match value {
            Item::Value(v) if !v.is_inline_table() => out.push(Entry {
                value: scalar(v).map_err(|m| at.error(format!("`{name}`: {m}")))?,
                key: name,
                at,
            }),
            Item::None => {}
            _ => flatten(value, &format!("{name}."), text, origin, &at, out)?,
        }
    }
    Ok(())
}

fn scalar(v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::String(s) => s.value().clone(),
        Value::Integer(i) => i.value().to_string(),
        Value::Float(f) => f.value().to_string(),
        Value::Boolean(b) => b.value().to_string(),
        Value::Array(a) => a
            .iter()
            .map(scalar)
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        Value::Datetime(_) => return Err("a date is not a valid value here".into()),
        Value::InlineTable(_) => return Err("a table is not a valid value here".into()),
    })
}

fn normalize_id(id: &str) -> String {
    id.to_ascii_uppercase().replace(['-', '.'], "_")
}

fn read_env(
    name: &str,
    value: String,
    raw: &mut Raw,
    notes: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if OTHER_VARIABLES.contains(&name) {
        return Ok(());
    }
    let at = Location {
        origin: format!("environment variable {name}"),
        line: None,
    };
    let parts: Vec<&str> = name
        .strip_prefix(ENV_PREFIX)
        .unwrap_or(name)
        .split("__")
        .collect();
    let entry = |key: String| Entry {
        key,
        value,
        at: at.clone(),
    };
    match parts.as_slice() {
        ["SERVICE", key] => raw.service.push(entry(key.to_ascii_lowercase())),
        ["KAFKA", key] => raw
            .kafka
            .push(entry(key.to_ascii_lowercase().replace('_', "."))),
        ["SUBSCRIPTIONS" | "SUBSCRIPTION", id, key] => {
            let ids: Vec<String> = raw.subscriptions.keys().map(|s| normalize_id(s)).collect();
            let Some((_, entries)) = raw
                .subscriptions
                .iter_mut()
                .find(|(sub, _)| normalize_id(sub) == *id)
                .map(|(_, v)| v)
            else {
                notes.push(format!(
                    "environment variable {name} ignored: the file has no subscription {id} \
                     (it has {}; ids are matched in upper case, with - and . as _)",
                    ids.join(", ")
                ));
                return Ok(());
            };
            let lower = key.to_ascii_lowercase();
            let section = [
                ("state_", "state"),
                ("retry_", "retry"),
                ("dead_letter_", "dead_letter"),
            ]
            .into_iter()
            .find_map(|(p, table)| lower.strip_prefix(p).map(|rest| (table, rest)));
            let key = if lower == "topic" || lower == "live_properties_file" {
                lower
            } else if let Some((table, rest)) = section {
                format!("{table}.{rest}")
            } else if !matches!(
                ProcessorProperties::default().set(&lower, "1"),
                Err(PropertyError::Unknown(_))
            ) {
                lower
            } else {
                lower.replace('_', ".")
            };
            entries.push(entry(key));
        }
        _ => {
            let extra: Vec<String> = raw
                .subscriptions
                .keys()
                .map(|id| format!("DECATON_SUBSCRIPTIONS__{}__TOPIC", normalize_id(id)))
                .collect();
            notes.push(unknown_variable_note(name, &extra));
        }
    }
    Ok(())
}

/// Checks a librdkafka setting with librdkafka itself (nothing is contacted).
fn check_kafka(entry: &Entry) -> Result<(), ConfigError> {
    match entry.key.as_str() {
        "group.id" => {
            return Err(entry
                .at
                .error("`group.id` is the subscription id (the table's name); do not set it"))
        }
        "enable.auto.commit" | "enable.auto.offset.store" => {
            return Err(entry.at.error(format!(
                "`{}` is always false: the runtime commits only finished tasks",
                entry.key
            )))
        }
        _ => {}
    }
    let mut config = ClientConfig::new();
    config.set(entry.key.clone(), entry.value.clone());
    config.create_native_config().map(|_| ()).map_err(|e| {
        let text = e.to_string();
        if text.contains("No such configuration property") {
            entry.at.error(format!(
                "unknown key `{}`: not a Decaton property nor a librdkafka setting",
                entry.key
            ))
        } else {
            entry.at.error(format!("`{}`: {text}", entry.key))
        }
    })
}

fn millis(entry: &Entry) -> Result<Duration, ConfigError> {
    entry
        .value
        .trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| {
            entry.at.error(format!(
                "`{}`: expected milliseconds, got {:?}",
                entry.key, entry.value
            ))
        })
}

fn boolean(entry: &Entry) -> Result<bool, ConfigError> {
    entry.value.trim().parse().map_err(|_| {
        entry.at.error(format!(
            "`{}`: expected true or false, got {:?}",
            entry.key, entry.value
        ))
    })
}

/// The `retry.` keys of a subscription.
#[derive(Default)]
struct RetrySettings {
    any: bool,
    enabled: Option<bool>,
    topic: Option<String>,
    queue: Option<bool>,
    max_retries: Option<u32>,
    initial: Option<Duration>,
    max: Option<Duration>,
    in_process_attempts: Option<u32>,
    in_process_backoff: Option<Duration>,
}

impl RetrySettings {
    fn set(&mut self, field: &str, e: &Entry) -> Result<(), ConfigError> {
        let count = || {
            e.value.trim().parse::<u32>().map_err(|_| {
                e.at.error(format!("`{}`: expected a count, got {:?}", e.key, e.value))
            })
        };
        self.any = true;
        match field {
            "enabled" => self.enabled = Some(boolean(e)?),
            "topic" => self.topic = Some(e.value.trim().to_string()),
            "queue" => self.queue = Some(boolean(e)?),
            "max_retries" => self.max_retries = Some(count()?),
            "backoff_initial_ms" => self.initial = Some(millis(e)?),
            "backoff_max_ms" => self.max = Some(millis(e)?),
            "in_process_attempts" => self.in_process_attempts = Some(count()?),
            "in_process_backoff_ms" => self.in_process_backoff = Some(millis(e)?),
            other => {
                return Err(e.at.error(format!(
                "unknown key `retry.{other}` (expected retry.enabled, retry.topic, retry.queue, \
                     retry.max_retries, retry.backoff_initial_ms, retry.backoff_max_ms, \
                     retry.in_process_attempts or retry.in_process_backoff_ms)"
            )))
            }
        }
        Ok(())
    }

    /// The retry topic consumed, if retries go through one.
    fn queue_topic(&self, source: &str) -> Option<String> {
        (self.any && self.enabled != Some(false) && self.queue != Some(false)).then(|| {
            self.topic
                .clone()
                .unwrap_or_else(|| format!("{source}-retry"))
        })
    }

    fn build(self) -> Option<RetryConfig> {
        if !self.any || self.enabled == Some(false) {
            return None;
        }
        let mut r = RetryConfig::new();
        if let Some(t) = self.topic {
            r = r.topic(t);
        }
        if self.queue == Some(false) {
            r = r.without_queue();
        }
        if let Some(n) = self.max_retries {
            r = r.max_retries(n);
        }
        if self.initial.is_some() || self.max.is_some() {
            let initial = self.initial.unwrap_or(Duration::from_secs(1));
            let max = self.max.unwrap_or(Duration::from_secs(60)).max(initial);
            r = r.backoff(Backoff::exponential(initial, max));
        }
        if self.in_process_attempts.is_some() || self.in_process_backoff.is_some() {
            r = r.in_process(
                self.in_process_attempts.unwrap_or(0),
                Backoff::fixed(self.in_process_backoff.unwrap_or(Duration::from_millis(50))),
            );
        }
        Some(r)
    }
}

fn build(raw: Raw) -> Result<ServiceConfig, ConfigError> {
    let mut service = ServiceSettings::default();
    for e in &raw.service {
        match e.key.as_str() {
            "http_addr" => {
                service.http_addr = e.value.trim().parse().map_err(|_| {
                    e.at.error(format!(
                        "`http_addr`: expected HOST:PORT with an IP address, got {:?}",
                        e.value
                    ))
                })?
            }
            "log_format" => {
                service.log_format = match e.value.trim() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    other => {
                        return Err(e.at.error(format!(
                            "`log_format`: expected \"text\" or \"json\", got {other:?}"
                        )))
                    }
                }
            }
            "log_filter" => service.log_filter = e.value.clone(),
            "stall_timeout_ms" => service.stall_timeout = millis(e)?,
            "lag_interval_ms" => service.lag_interval = millis(e)?.max(Duration::from_millis(100)),
            "liveness_timeout_ms" => service.liveness_timeout = millis(e)?,
            "otlp_endpoint" => {
                let url = e.value.trim();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(e.at.error(format!(
                        "`otlp_endpoint`: expected an http:// or https:// URL, got {url:?}"
                    )));
                }
                service.otlp_endpoint = Some(url.trim_end_matches('/').to_string())
            }
            other => {
                return Err(e.at.error(format!(
                "unknown key `{other}` in [service] (expected http_addr, log_format, log_filter, \
                     stall_timeout_ms, lag_interval_ms, liveness_timeout_ms or otlp_endpoint)"
            )))
            }
        }
    }
    let mut shared = BTreeMap::new();
    for e in &raw.kafka {
        check_kafka(e)?;
        shared.insert(e.key.clone(), e.value.clone());
    }
    let mut subscriptions = BTreeMap::new();
    for (id, (table_at, entries)) in raw.subscriptions {
        let mut topic = None;
        let mut properties = ProcessorProperties::default();
        let mut kafka = shared.clone();
        let mut state: Option<StateConfig> = None;
        let mut retry = RetrySettings::default();
        let mut dead_letter: Option<(bool, DeadLetterConfig)> = None;
        let mut live_properties_file = None;
        for e in &entries {
            if e.key == "live_properties_file" {
                live_properties_file = Some(e.value.clone().into());
                continue;
            }
            if let Some(field) = e.key.strip_prefix("retry.") {
                retry.set(field, e)?;
                continue;
            }
            if let Some(field) = e.key.strip_prefix("dead_letter.") {
                let d = dead_letter.get_or_insert((true, DeadLetterConfig::new()));
                match field {
                    "topic" => d.1 = d.1.clone().topic(e.value.trim()),
                    "enabled" => d.0 = boolean(e)?,
                    other => {
                        return Err(e.at.error(format!(
                            "unknown key `dead_letter.{other}` (expected dead_letter.topic or \
                             dead_letter.enabled)"
                        )))
                    }
                }
                continue;
            }
            if e.key == "topic" {
                topic = Some(e.value.clone());
                continue;
            }
            if let Some(field) = e.key.strip_prefix("state.") {
                let s = state.get_or_insert_with(StateConfig::default);
                match field {
                    "dir" => s.state_dir = e.value.clone().into(),
                    "backend" => {
                        s.backend = match e.value.trim() {
                            "sled" => Backend::Sled,
                            "memory" => Backend::Memory,
                            other => {
                                return Err(e.at.error(format!(
                                "`state.backend`: expected \"sled\" or \"memory\", got {other:?}"
                            )))
                            }
                        }
                    }
                    "store_name" => s.store_name = e.value.clone(),
                    "sled_cache_bytes" => {
                        s.sled_cache_bytes = e.value.trim().parse().map_err(|_| {
                            e.at.error(format!(
                                "`state.sled_cache_bytes`: expected a number, got {:?}",
                                e.value
                            ))
                        })?
                    }
                    "checkpoint_max_age_ms" => {
                        s.checkpoint_max_age_ms = e.value.trim().parse().map_err(|_| {
                            e.at.error(format!(
                                "`state.checkpoint_max_age_ms`: expected a number, got {:?}",
                                e.value
                            ))
                        })?
                    }
                    other => {
                        return Err(e.at.error(format!(
                            "unknown key `state.{other}` (expected state.dir, state.backend, \
                             state.store_name, state.sled_cache_bytes or \
                             state.checkpoint_max_age_ms)"
                        )))
                    }
                }
                continue;
            }
            match properties.set(&e.key, &e.value) {
                Ok(_) => continue,
                Err(PropertyError::Unknown(_)) if e.key.starts_with("decaton.") => {
                    return Err(e
                        .at
                        .error(format!("unknown key `{}`: no such Decaton property", e.key)))
                }
                Err(PropertyError::Unknown(_)) => {}
                Err(err) => return Err(e.at.error(err.to_string())),
            }
            check_kafka(e)?;
            kafka.insert(e.key.clone(), e.value.clone());
        }
        let Some(topic) = topic.filter(|t| !t.is_empty()) else {
            return Err(table_at.error(format!("subscription `{id}` has no `topic`")));
        };
        if kafka
            .get("bootstrap.servers")
            .is_none_or(|b| b.trim().is_empty())
        {
            return Err(table_at.error(format!(
                "subscription `{id}` has no `bootstrap.servers` (set it in [kafka] or in the subscription)"
            )));
        }
        properties
            .validate()
            .map_err(|err| table_at.error(format!("subscription `{id}`: {err}")))?;
        let retry_topic = retry.queue_topic(&topic);
        subscriptions.insert(
            id.clone(),
            SubscriptionConfig {
                retry_topic,
                live_properties_file,
                id,
                topic,
                properties,
                kafka,
                state,
                retry: retry.build(),
                dead_letter: dead_letter.filter(|d| d.0).map(|d| d.1),
            },
        );
    }
    Ok(ServiceConfig {
        service,
        subscriptions,
        notes: Vec::new(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[service]
http_addr = "127.0.0.1:0"
log_format = "json"

[kafka]
"bootstrap.servers" = "127.0.0.1:9092"

[subscriptions.storage-mutation-processor]
topic = "chat-ops"
"decaton.partition.concurrency" = 8
decaton.max.pending.records = 500
mode = "per_key"
"session.timeout.ms" = 6000
ignore_keys = ["a", "b"]
state.dir = "/tmp/x"
"#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<ServiceConfig, ConfigError> {
        ServiceConfig::parse(
            text,
            "svc.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn decaton_names_short_names_and_librdkafka_settings_side_by_side() {
        let c = parse(FILE, &[]).unwrap();
        assert_eq!(c.service.log_format, LogFormat::Json);
        let s = &c.subscriptions["storage-mutation-processor"];
        assert_eq!(s.topic, "chat-ops");
        assert_eq!(s.properties.partition_concurrency, 8);
        assert_eq!(s.properties.max_pending, 500);
        assert_eq!(s.properties.ignore_keys, vec!["a", "b"]);
        assert_eq!(s.kafka["session.timeout.ms"], "6000");
        assert_eq!(s.bootstrap_servers(), "127.0.0.1:9092");
        assert_eq!(
            s.state.as_ref().unwrap().state_dir,
            std::path::PathBuf::from("/tmp/x")
        );
    }

    #[test]
    fn the_checkpoint_max_age_is_a_state_key() {
        let text = format!("{FILE}state.checkpoint_max_age_ms = 60000\n");
        let c = parse(&text, &[]).unwrap();
        let state = c.subscriptions["storage-mutation-processor"].state.clone();
        assert_eq!(state.unwrap().checkpoint_max_age_ms, 60_000);
        let text = format!("{FILE}state.checkpoint_max_age_ms = \"soon\"\n");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("checkpoint_max_age_ms"), "{err}");
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_line() {
        let bad = FILE.replace("mode = \"per_key\"", "sesion.timeout.ms = 6000");
        let e = parse(&bad, &[]).unwrap_err();
        assert_eq!(e.line(), Some(13), "{e}");
        assert!(e.message().contains("`sesion.timeout.ms`"), "{e}");
        assert!(e.to_string().starts_with("svc.toml:13: "), "{e}");

        let bad = FILE.replace("log_format", "log_fromat");
        let e = parse(&bad, &[]).unwrap_err();
        assert_eq!(e.line(), Some(4), "{e}");

        let bad = FILE.replace("decaton.max.pending", "decaton.max.pendin");
        let e = parse(&bad, &[]).unwrap_err();
        assert_eq!(e.line(), Some(12), "{e}");
        assert!(e.message().contains("no such Decaton property"), "{e}");

        let bad = FILE.replace("= 8", "= 0");
        let e = parse(&bad, &[]).unwrap_err();
        assert_eq!(e.line(), Some(11), "{e}");
    }

    #[test]
    fn librdkafka_checks_values() {
        let bad = FILE.replace("= 6000", "= \"soon\"");
        let e = parse(&bad, &[]).unwrap_err();
        assert_eq!(e.line(), Some(14), "{e}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = parse(
            FILE,
            &[
                ("DECATON_SERVICE__HTTP_ADDR", "127.0.0.1:9999"),
                ("DECATON_KAFKA__BOOTSTRAP_SERVERS", "b:1"),
                (
                    "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__DECATON_PARTITION_CONCURRENCY",
                    "3",
                ),
                (
                    "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__SESSION_TIMEOUT_MS",
                    "7000",
                ),
                ("DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__MAX_PENDING", "9"),
                ("DECATON_BOOTSTRAP", "ignored: not configuration"),
            ],
        )
        .unwrap();
        assert_eq!(c.service.http_addr.port(), 9999);
        let s = &c.subscriptions["storage-mutation-processor"];
        assert_eq!(s.properties.partition_concurrency, 3);
        assert_eq!(s.properties.max_pending, 9);
        assert_eq!(s.kafka["session.timeout.ms"], "7000");
        assert_eq!(s.bootstrap_servers(), "b:1");

        let e = parse(FILE, &[("DECATON_KAFKA__NO_SUCH_THING", "x")]).unwrap_err();
        assert!(e.message().contains("`no.such.thing`"), "{e}");
    }

    #[test]
    fn bootstrap_precedence_flag_then_kafka_variable_then_decaton_bootstrap_then_file() {
        let servers = |env: &[(&str, &str)], flag: Option<&str>| {
            let mut c = parse(FILE, env).unwrap();
            if let Some(flag) = flag {
                c = c.with_bootstrap_servers(flag);
            }
            c.subscriptions["storage-mutation-processor"]
                .bootstrap_servers()
                .to_string()
        };
        assert_eq!(servers(&[], None), "127.0.0.1:9092");
        assert_eq!(servers(&[("DECATON_BOOTSTRAP", "env:1")], None), "env:1");
        let both = [
            ("DECATON_BOOTSTRAP", "env:1"),
            ("DECATON_KAFKA__BOOTSTRAP_SERVERS", "kafka:2"),
        ];
        assert_eq!(servers(&both, None), "kafka:2");
        assert_eq!(servers(&both, Some("flag:3")), "flag:3");
        assert_eq!(servers(&both, Some(" ")), "kafka:2");
        let c = parse(
            "[subscriptions.a]\ntopic = \"t\"\n",
            &[("DECATON_BOOTSTRAP", "env:1")],
        )
        .unwrap();
        assert_eq!(c.subscriptions["a"].bootstrap_servers(), "env:1");
        assert!(c.notes().is_empty(), "{:?}", c.notes());
    }

    #[test]
    fn unknown_variables_and_other_subscriptions_are_noted_not_fatal() {
        let c = parse(
            FILE,
            &[
                ("DECATON_SUBSCRIPTIONS__NOTIFICATION_PROCESSOR__TOPIC", "x"),
                ("DECATON_KAFKA_BOOTSTRAP_SERVERS", "typo:1"),
                ("DECATON_BOOTSTRAPS", "typo:2"),
                ("DECATON_SERVCE__HTTP_ADDR", "127.0.0.1:1"),
                ("NOT_OURS", "x"),
            ],
        )
        .unwrap();
        let s = &c.subscriptions["storage-mutation-processor"];
        assert_eq!(s.topic, "chat-ops");
        assert_eq!(s.bootstrap_servers(), "127.0.0.1:9092");
        let notes = c.notes();
        assert_eq!(notes.len(), 4, "{notes:?}");
        let note = |var: &str| {
            notes
                .iter()
                .find(|n| n.contains(&format!("{var} ")))
                .unwrap_or_else(|| panic!("no note on {var}: {notes:?}"))
        };
        assert!(
            note("DECATON_SUBSCRIPTIONS__NOTIFICATION_PROCESSOR__TOPIC")
                .contains("STORAGE_MUTATION_PROCESSOR"),
            "{notes:?}"
        );
        assert!(
            note("DECATON_KAFKA_BOOTSTRAP_SERVERS")
                .contains("did you mean DECATON_KAFKA__BOOTSTRAP_SERVERS?"),
            "{notes:?}"
        );
        assert!(
            note("DECATON_BOOTSTRAPS").contains("did you mean DECATON_BOOTSTRAP?"),
            "{notes:?}"
        );
        assert!(
            note("DECATON_SERVCE__HTTP_ADDR").contains("did you mean DECATON_SERVICE__HTTP_ADDR?"),
            "{notes:?}"
        );
        assert_eq!(
            unknown_variable_notes([
                "DECATON_BOOTSTRAP",
                "DECATON_KAFKA__BOOTSTRAP_SERVERS",
                "DECATON_BOOTSTRP",
                "PATH"
            ]),
            vec!["unknown environment variable DECATON_BOOTSTRP ignored (did you mean DECATON_BOOTSTRAP?)"]
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn retry_and_dead_letter_tables() {
        let text = format!(
            "{FILE}retry.max_retries = 3\nretry.backoff_initial_ms = 500\ndead_letter.topic = \"parked\"\n"
        );
        let c = parse(&text, &[]).unwrap();
        let s = &c.subscriptions["storage-mutation-processor"];
        assert!(s.retry.is_some() && s.dead_letter.is_some());
        assert_eq!(s.topics(), vec!["chat-ops", "chat-ops-retry"]);
        let c = parse(FILE, &[]).unwrap();
        let s = &c.subscriptions["storage-mutation-processor"];
        assert!(s.retry.is_none() && s.dead_letter.is_none());
        let c = parse(
            FILE,
            &[(
                "DECATON_SUBSCRIPTIONS__STORAGE_MUTATION_PROCESSOR__RETRY_MAX_RETRIES",
                "2",
            )],
        )
        .unwrap();
        assert!(c.subscriptions["storage-mutation-processor"]
            .retry
            .is_some());
        let c = parse(
            &format!("{FILE}live_properties_file = \"/etc/live.toml\"\n"),
            &[],
        )
        .unwrap();
        let s = &c.subscriptions["storage-mutation-processor"];
        assert_eq!(
            s.live_properties_file.as_deref(),
            Some(std::path::Path::new("/etc/live.toml"))
        );
        let e = parse(&format!("{FILE}retry.max_retry = 3\n"), &[]).unwrap_err();
        assert_eq!(e.line(), Some(17), "{e}");
        assert!(e.message().contains("`retry.max_retry`"), "{e}");
    }

    #[test]
    fn missing_topic_and_bootstrap_are_reported_at_the_table() {
        let e = parse("[subscriptions.a]\n\"bootstrap.servers\" = \"x\"\n", &[]).unwrap_err();
        assert_eq!(e.line(), Some(1));
        assert!(e.message().contains("no `topic`"));
        let e = parse("\n[subscriptions.a]\ntopic = \"t\"\n", &[]).unwrap_err();
        assert_eq!(e.line(), Some(2));
        assert!(e.message().contains("bootstrap.servers"));
        let e = parse("[subscriptions.a]\ntopic = \n", &[]).unwrap_err();
        assert_eq!(e.line(), Some(2), "{e}");
    }
}
