//! What one benchmark run is made of: the runner, its parameters, and the workload.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The consumer a benchmark drives over the pre-filled topic.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum RunnerKind {
    /// The decaton-rs processor runtime (`Subscription`), configured by `--param`.
    Decaton,
    /// What a user writes without the framework: one rdkafka consumer, each partition's
    /// records processed one after another (partitions concurrently), with the same
    /// simulated latency as the processor.
    RdkafkaSerial,
    /// Consume and decode without processing: the ceiling for a no-op processor.
    RdkafkaRaw,
}

impl RunnerKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            RunnerKind::Decaton => "decaton",
            RunnerKind::RdkafkaSerial => "rdkafka-serial",
            RunnerKind::RdkafkaRaw => "rdkafka-raw",
        }
    }
}

impl fmt::Display for RunnerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RunnerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "decaton" => Ok(RunnerKind::Decaton),
            "rdkafka-serial" => Ok(RunnerKind::RdkafkaSerial),
            "rdkafka-raw" => Ok(RunnerKind::RdkafkaRaw),
            other => Err(format!(
                "unknown runner {other:?} (expected decaton, rdkafka-serial or rdkafka-raw)"
            )),
        }
    }
}

/// A runner with its parameters, written `name[:key=value,key=value...]` on the command
/// line of `decaton bench matrix` (for example `decaton:mode=bounded,partition_concurrency=10`).
///
/// For the `decaton` runner the parameters are processor properties (`mode`,
/// `partition_concurrency`, `max_pending`, Decaton names like
/// `decaton.partition.concurrency`, or librdkafka settings passed through). For the
/// rdkafka runners they are librdkafka consumer settings, verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerSpec {
    /// Which runner.
    pub kind: RunnerKind,
    /// Its parameters, in the order given.
    pub params: Vec<(String, String)>,
}

impl RunnerSpec {
    /// A runner without parameters.
    pub fn new(kind: RunnerKind) -> Self {
        RunnerSpec {
            kind,
            params: Vec::new(),
        }
    }

    /// Adds a parameter.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// The last value given for any of `names`.
    pub fn get(&self, names: &[&str]) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.as_str())
    }

    /// Parameters as a map (later values win), for reports.
    pub fn params_map(&self) -> BTreeMap<String, String> {
        self.params.iter().cloned().collect()
    }

    /// A short label for tables and chart legends: `decaton(mode=bounded,partition_concurrency=10)`.
    pub fn label(&self) -> String {
        if self.params.is_empty() {
            self.kind.name().to_string()
        } else {
            let params: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{}({})", self.kind.name(), params.join(","))
        }
    }
}

impl fmt::Display for RunnerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

impl FromStr for RunnerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = match s.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (s, None),
        };
        let mut spec = RunnerSpec::new(name.trim().parse()?);
        if let Some(rest) = rest {
            for p in rest.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = parse_param(p)?;
                spec.params.push((k, v));
            }
        }
        Ok(spec)
    }
}

/// Parses one `name=value` parameter.
pub fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("parameter {s:?} is not name=value")),
    }
}

/// How the benchmark's tasks are keyed (`--keys null|unique|N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keys {
    /// No key, as Decaton's benchmark produces: no two tasks constrain each other's
    /// order, and the processor spreads them over its lanes round robin.
    #[default]
    Null,
    /// A key of its own per task (`task-{i}`): no ordering constraint either, but each
    /// task hashes to a lane, so lanes get uneven shares.
    Unique,
    /// `N` distinct keys (`user-{i % N}`): at most `N` tasks can run at once.
    Distinct(u64),
}

impl Keys {
    /// The number of distinct keys, when there is a fixed number.
    pub fn distinct(self) -> Option<u64> {
        match self {
            Keys::Distinct(n) => Some(n),
            Keys::Null | Keys::Unique => None,
        }
    }

    /// In words, for reports: "no keys", "a key per task", "N keys".
    pub(crate) fn describe(self) -> String {
        match self {
            Keys::Null => "no keys".to_string(),
            Keys::Unique => "a key per task".to_string(),
            Keys::Distinct(k) => format!("{k} keys"),
        }
    }
}

impl std::str::FromStr for Keys {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "null" | "none" => Ok(Keys::Null),
            "unique" => Ok(Keys::Unique),
            n => match n.parse::<u64>() {
                Ok(0) | Err(_) => Err(format!(
                    "--keys takes null, unique or a number of keys (at least 1), not {n:?}"
                )),
                Ok(n) => Ok(Keys::Distinct(n)),
            },
        }
    }
}

impl std::fmt::Display for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keys::Null => f.write_str("null"),
            Keys::Unique => f.write_str("unique"),
            Keys::Distinct(n) => write!(f, "{n}"),
        }
    }
}

/// The workload and harness settings shared by every benchmark (consumer runs, the
/// producer comparison and each cell of a matrix).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Tasks measured per run (after the warmup).
    pub tasks: u64,
    /// Tasks processed before measuring starts (JIT-free Rust still warms caches,
    /// connections, the consumer group and librdkafka's fetch pipeline).
    pub warmup: u64,
    /// Partitions of the benchmark topic.
    pub partitions: i32,
    /// How tasks are keyed: no key (the default, as in Decaton's benchmark), a key per
    /// task, or N distinct keys.
    #[serde(default)]
    pub keys: Keys,
    /// Size of each task's payload field in bytes.
    pub payload_bytes: usize,
    /// Kafka cluster; `None` = the embedded librdkafka mock cluster in this process.
    pub bootstrap: Option<String>,
    /// How many times to repeat the measurement (each run on a fresh topic).
    pub runs: u32,
    /// Puts in flight while filling the topic (and in the producer benchmark).
    pub in_flight: usize,
    /// librdkafka producer settings applied to every producer the harness creates (the
    /// filling `TaskClient` and both producers of `decaton bench produce`), verbatim, after
    /// the defaults. E.g. `batch.num.messages=1` for brokers that cannot serve a fetch
    /// starting inside a record batch (Tansu 0.6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub producer_params: Vec<(String, String)>,
    /// Give up when no task completes for this long.
    #[serde(with = "secs")]
    pub stall_timeout: Duration,
    /// Show progress bars on stderr (only drawn when stderr is a terminal). Not part of
    /// reports.
    #[serde(skip)]
    pub progress: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            tasks: 10_000,
            warmup: 1_000,
            partitions: 3,
            keys: Keys::Null,
            payload_bytes: 64,
            bootstrap: None,
            runs: 1,
            in_flight: 256,
            producer_params: Vec::new(),
            stall_timeout: Duration::from_secs(60),
            progress: false,
        }
    }
}

impl Workload {
    /// Warmup plus measured tasks: what is produced per run.
    pub fn total(&self) -> u64 {
        self.tasks + self.warmup
    }

    /// The flags that reproduce this workload (`--tasks ... --partitions ...`).
    pub(crate) fn flags(&self) -> Vec<String> {
        let mut f = vec![
            format!("--tasks {}", self.tasks),
            format!("--warmup {}", self.warmup),
            format!("--partitions {}", self.partitions),
        ];
        if self.keys != Keys::Null {
            f.push(format!("--keys {}", self.keys));
        }
        let d = Workload::default();
        if self.payload_bytes != d.payload_bytes {
            f.push(format!("--payload-bytes {}", self.payload_bytes));
        }
        if self.in_flight != d.in_flight {
            f.push(format!("--in-flight {}", self.in_flight));
        }
        for (k, v) in &self.producer_params {
            f.push(format!(
                "--producer-param {}",
                shell_quote(&format!("{k}={v}"))
            ));
        }
        if let Some(b) = &self.bootstrap {
            f.push(format!("--bootstrap {}", shell_quote(b)));
        }
        if self.runs != 1 {
            f.push(format!("--runs {}", self.runs));
        }
        f
    }

    /// One line describing the setup, for text reports.
    pub(crate) fn describe(&self) -> String {
        let keys = self.keys.describe();
        format!(
            "{} tasks + {} warmup, {} partitions, {keys}, {} B payload",
            self.tasks, self.warmup, self.partitions, self.payload_bytes
        )
    }
}

/// One consumer benchmark: a runner over a workload, with a simulated processing latency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// The runner and its parameters.
    pub runner: RunnerSpec,
    /// How long processing one task takes (a precise sleep); zero = no-op processing.
    #[serde(with = "millis")]
    pub simulate_latency: Duration,
    /// The workload.
    pub workload: Workload,
}

impl BenchConfig {
    /// The `decaton bench` command line that reproduces this benchmark.
    pub fn command_line(&self) -> String {
        let mut parts = vec![
            "decaton bench".to_string(),
            format!("--runner {}", self.runner.kind),
        ];
        for (k, v) in &self.runner.params {
            parts.push(format!("--param {}", shell_quote(&format!("{k}={v}"))));
        }
        parts.push(format!(
            "--simulate-latency {}",
            self.simulate_latency.as_millis()
        ));
        parts.extend(self.workload.flags());
        parts.join(" ")
    }
}

/// Quotes `s` for a POSIX shell when it has characters the shell would interpret.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,:/@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs_f64(f64::deserialize(d)?.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_spec_round_trips() {
        let s: RunnerSpec = "decaton:mode=bounded,partition_concurrency=10"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.kind, RunnerKind::Decaton);
        assert_eq!(s.get(&["partition_concurrency"]), Some("10"));
        assert_eq!(
            s.to_string(),
            "decaton:mode=bounded,partition_concurrency=10"
        );
        assert_eq!(s.label(), "decaton(mode=bounded,partition_concurrency=10)");
        assert!("nope".parse::<RunnerSpec>().is_err());
        assert!("decaton:mode".parse::<RunnerSpec>().is_err());
    }

    #[test]
    fn command_line_reproduces_the_config() {
        let cfg = BenchConfig {
            runner: RunnerSpec::new(RunnerKind::Decaton).param("mode", "per_key"),
            simulate_latency: Duration::from_millis(10),
            workload: Workload {
                keys: Keys::Distinct(100),
                ..Workload::default()
            },
        };
        assert_eq!(
            cfg.command_line(),
            "decaton bench --runner decaton --param mode=per_key --simulate-latency 10 --tasks 10000 --warmup 1000 --partitions 3 --keys 100"
        );
    }
}
