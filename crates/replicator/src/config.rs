//! The TOML configuration file.
//!
//! Every mistake is reported at start-up with the file, the line and the reason: unknown
//! keys (a typo never silently falls back to a default), a value of the wrong type, an
//! unknown task type or field, an enum value the field's enum does not have, a filter
//! expression that does not parse. See `docs/configuration.md` for the reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost_reflect::{DescriptorPool, MessageDescriptor};
use serde::Deserialize;
use toml::Spanned;

use crate::route::{CompiledRoute, Route, RoutePart};
use crate::{ReplicatorBuilder, SourceFormat};

/// A configuration file that cannot be used: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {reason}", file.display())]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// What is wrong.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    bootstrap_servers: Option<String>,
    source_topic: String,
    group: String,
    #[serde(default)]
    format: Option<Spanned<String>>,
    task: Option<TaskSection>,
    #[serde(default)]
    exactly_once: bool,
    transactional_id: Option<String>,
    dead_letter_topic: Option<String>,
    commit_interval_ms: Option<u64>,
    max_pending: Option<usize>,
    shutdown_timeout_ms: Option<u64>,
    #[serde(default)]
    kafka: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    consumer: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    producer: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    route: Vec<Spanned<RouteSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskSection {
    descriptor_set: Option<Spanned<String>>,
    #[serde(rename = "type")]
    type_name: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    name: Option<String>,
    topic: String,
    filter: Option<Spanned<String>>,
    map: Option<MapSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapSection {
    keep: Option<Vec<Spanned<String>>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Byte offset -> (line, column), both from 1.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    // A span from the parser is a byte offset; one inside a character counts from the
    // end of the text rather than panicking.
    let before = text.get(..offset).unwrap_or(text);
    let offset = before.len();
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn at(&self, offset: usize, reason: impl Into<String>) -> ConfigError {
        let (line, column) = line_col(self.text, offset);
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            reason: reason.into(),
        }
    }

    /// The byte offset of character `chars` inside the string value spanning `span`
    /// (exact for strings without escapes).
    fn inside(&self, span: std::ops::Range<usize>, chars: usize) -> usize {
        let body = self.text.get(span.start..span.end).unwrap_or("");
        // Skip the opening quote(s): ", ', """ or '''.
        let quote = if body.starts_with("\"\"\"") || body.starts_with("'''") {
            3
        } else {
            1
        };
        let body = body.get(quote..).unwrap_or("");
        span.start
            + quote
            + body
                .char_indices()
                .nth(chars)
                .map_or(body.len(), |(i, _)| i)
    }
}

fn setting(
    ctx: &Ctx<'_>,
    key: &str,
    v: &Spanned<toml::Value>,
) -> Result<(String, String), ConfigError> {
    let value = match v.get_ref() {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => {
            return Err(ctx.at(
                v.span().start,
                format!("librdkafka setting {key} must be a string, number or boolean"),
            ))
        }
    };
    Ok((key.to_string(), value))
}

/// Loads the task type: `type` from `descriptor_set` (relative to the config file), or
/// from the project's own protobuf files when no descriptor set is named.
fn load_type(ctx: &Ctx<'_>, task: &TaskSection) -> Result<MessageDescriptor, ConfigError> {
    let pool = match &task.descriptor_set {
        Some(path) => {
            let full = ctx
                .file
                .parent()
                .unwrap_or(Path::new("."))
                .join(path.get_ref());
            let bytes = std::fs::read(&full).map_err(|e| {
                ctx.at(
                    path.span().start,
                    format!("cannot read descriptor set {}: {e}", full.display()),
                )
            })?;
            DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
                ctx.at(
                    path.span().start,
                    format!(
                        "{} is not a protobuf FileDescriptorSet: {e}",
                        full.display()
                    ),
                )
            })?
        }
        None => DescriptorPool::decode(decaton_protocol::FILE_DESCRIPTOR_SET).map_err(|e| {
            ctx.at(
                task.type_name.span().start,
                format!("built-in descriptors: {e}"),
            )
        })?,
    };
    let name = task.type_name.get_ref();
    pool.get_message_by_name(name)
        .or_else(|| {
            let mut found = pool.all_messages().filter(|m| m.name() == name);
            match (found.next(), found.next()) {
                (Some(m), None) => Some(m),
                _ => None,
            }
        })
        .ok_or_else(|| {
            ctx.at(
                task.type_name.span().start,
                format!("unknown message type {name} in the descriptor set"),
            )
        })
}

/// Parses and checks a configuration file into a builder.
pub(crate) fn load(path: &Path) -> Result<ReplicatorBuilder, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and checks configuration `text` (named `file` in errors) into a builder.
pub(crate) fn parse(file: &Path, text: &str) -> Result<ReplicatorBuilder, ConfigError> {
    let ctx = Ctx { file, text };
    let cfg: FileConfig = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        ctx.at(offset, e.message().trim().to_string())
    })?;
    let format = match &cfg.format {
        None => SourceFormat::Decaton,
        Some(f) => match f.get_ref().as_str() {
            "decaton" => SourceFormat::Decaton,
            "plain" => SourceFormat::Plain,
            other => {
                return Err(ctx.at(
                    f.span().start,
                    format!("unknown format {other:?}; expected \"decaton\" (Decaton task records) or \"plain\" (the value is the message)"),
                ))
            }
        },
    };
    let message = cfg.task.as_ref().map(|t| load_type(&ctx, t)).transpose()?;
    if cfg.route.is_empty() {
        return Err(ctx.at(text.len(), "no [[route]]: at least one route is needed"));
    }
    let mut builder = ReplicatorBuilder::new(
        cfg.bootstrap_servers.clone().unwrap_or_default(),
        cfg.source_topic.clone(),
        cfg.group.clone(),
    )
    .format(format)
    .exactly_once(cfg.exactly_once);
    if let Some(m) = message.clone() {
        builder = builder.message_type(m);
    }
    if let Some(t) = &cfg.transactional_id {
        builder = builder.transactional_id(t.clone());
    }
    if let Some(t) = &cfg.dead_letter_topic {
        builder = builder.dead_letter_topic(t.clone());
    }
    if let Some(ms) = cfg.commit_interval_ms {
        builder = builder.commit_interval(Duration::from_millis(ms.max(1)));
    }
    if let Some(n) = cfg.max_pending {
        builder = builder.max_pending(n);
    }
    if let Some(ms) = cfg.shutdown_timeout_ms {
        builder = builder.shutdown_timeout(Duration::from_millis(ms));
    }
    for (k, v) in &cfg.kafka {
        let (k, v) = setting(&ctx, k, v)?;
        builder = builder.set(k, v);
    }
    for (k, v) in &cfg.consumer {
        let (k, v) = setting(&ctx, k, v)?;
        builder = builder.set_consumer(k, v);
    }
    for (k, v) in &cfg.producer {
        let (k, v) = setting(&ctx, k, v)?;
        builder = builder.set_producer(k, v);
    }
    for spanned in &cfg.route {
        let section = spanned.get_ref();
        let mut route = Route::to(section.topic.clone());
        if let Some(n) = &section.name {
            route = route.name(n.clone());
        }
        if let Some(f) = &section.filter {
            route = route.filter(f.get_ref().clone());
        }
        if let Some(map) = &section.map {
            if let Some(keep) = &map.keep {
                route = route.keep_fields(keep.iter().map(|k| k.get_ref().clone()));
            }
            if let Some(k) = &map.key {
                route = route.key_field(k.get_ref().clone());
            }
            for (k, v) in &map.headers {
                route = route.header(k.clone(), v.clone());
            }
        }
        // Compile now, so errors point into the file.
        if let Err((part, reason, _)) = CompiledRoute::compile(&route, message.as_ref()) {
            let offset = match part {
                RoutePart::Filter(chars) => section
                    .filter
                    .as_ref()
                    .map_or(spanned.span().start, |f| ctx.inside(f.span(), chars)),
                RoutePart::Keep(i) => section
                    .map
                    .as_ref()
                    .and_then(|m| m.keep.as_ref())
                    .and_then(|k| k.get(i))
                    .map_or(spanned.span().start, |k| k.span().start),
                RoutePart::KeyField => section
                    .map
                    .as_ref()
                    .and_then(|m| m.key.as_ref())
                    .map_or(spanned.span().start, |k| k.span().start),
            };
            let what = match part {
                RoutePart::Filter(_) => "filter",
                RoutePart::Keep(_) => "map.keep",
                RoutePart::KeyField => "map.key",
            };
            return Err(ctx.at(
                offset,
                format!("route {}: {what}: {reason}", route.display_name()),
            ));
        }
        builder = builder.route(route);
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
bootstrap_servers = "127.0.0.1:9092"
source_topic = "chat-ops"
group = "chat-replicator"

[task]
type = "decaton.example.ChatOp"

[kafka]
"session.timeout.ms" = 6000

[[route]]
topic = "chat-messages"
filter = "op in [SEND_MESSAGE, READ]"

[[route]]
topic = "chat-social"
filter = 'op in [ADD_FRIEND, BLOCK]'
[route.map]
keep = ["user_id", "op", "target_id", "sequence"]
key = "target_id"
headers = { category = "social" }
"#;

    fn error(text: &str) -> ConfigError {
        match parse(Path::new("repl.toml"), text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_good_file_loads() {
        let b = parse(Path::new("repl.toml"), GOOD).unwrap();
        assert_eq!(b.routes.len(), 2);
        assert!(b
            .settings
            .iter()
            .any(|(k, v)| k == "session.timeout.ms" && v == "6000"));
    }

    #[test]
    fn unknown_key_names_its_line() {
        let e = error(&GOOD.replace("group =", "grop ="));
        assert_eq!(
            (e.line, e.file.as_path()),
            (4, Path::new("repl.toml")),
            "{e}"
        );
        assert!(e.reason.contains("grop"), "{e}");
        let e = error(&GOOD.replace("key = \"target_id\"", "kee = \"target_id\""));
        assert_eq!(e.line, 21, "{e}");
        assert!(e.to_string().starts_with("repl.toml:21:"), "{e}");
    }

    #[test]
    fn unknown_enum_value_points_at_it() {
        let e = error(&GOOD.replace("[SEND_MESSAGE, READ]", "[SEND_MESSAGE, WRITE]"));
        assert_eq!((e.line, e.column), (14, 32), "{e}");
        assert!(e.reason.contains("unknown value WRITE"), "{e}");
        assert!(e.reason.contains("route chat-messages: filter"), "{e}");
    }

    #[test]
    fn bad_expression_unknown_field_and_type() {
        let e = error(&GOOD.replace("'op in [ADD_FRIEND, BLOCK]'", "'op in [ADD_FRIEND, BLOCK'"));
        assert_eq!(e.line, 18, "{e}");
        assert!(e.reason.contains("expected ',' or ']'"), "{e}");
        let e = error(&GOOD.replace("\"target_id\", \"sequence\"", "\"target_id\", \"seq\""));
        assert_eq!((e.line, e.column), (20, 39), "{e}");
        assert!(e.reason.contains("unknown field seq"), "{e}");
        let e = error(&GOOD.replace("decaton.example.ChatOp", "decaton.example.Chat"));
        assert_eq!(e.line, 7, "{e}");
        let e = error(&GOOD.replace("filter = 'op", "fliter = 'op"));
        assert!(e.reason.contains("fliter") && e.line == 18, "{e}");
        let e = error(&GOOD.replace("source_topic = \"chat-ops\"", "source_topic = 5"));
        assert_eq!(e.line, 3, "{e}");
    }
}
