//! `decaton dlq`: look into a dead-letter topic and put its tasks back.
//!
//! A subscription with a dead-letter topic produces every task that failed for good there,
//! with its original key, value and headers plus the `decaton-dlq-*` headers saying why
//! and where from (see `decaton_protocol::dead_letter`).
//!
//! * `list` reads the topic from the beginning to its current end, without joining a
//!   group, and prints a summary: how many records, the first and last dead-letter time,
//!   and the count per failure kind and reason (with `--records`, one line per record).
//! * `replay` reads it the same way and produces each matching record (filters: key,
//!   reason text, failure kind, dead-lettered since) back to the topic it came from (its
//!   `decaton-dlq-origin-topic` header, or `--to`), with the same key and value, the
//!   dead-letter headers dropped, and its `dt_meta` retry count and scheduled time reset,
//!   so it runs as a new task. `--dry-run` shows what would be replayed and produces
//!   nothing. Kafka keeps the dead-letter records: replaying twice puts the tasks back
//!   twice; `--since` lets a second replay pick up only newer records.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use decaton_protocol::headers::{add_raw_header, raw_headers};
use decaton_protocol::{dead_letter, decode_metadata, encode_metadata, METADATA_HEADER};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::options::{topic_partitions, KafkaArgs};

/// Arguments of `decaton dlq`.
#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// Summarise a dead-letter topic: count, first and last, reasons.
    List(ListArgs),
    /// Put dead-lettered tasks back on the topic they came from.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The dead-letter topic.
    #[arg(long)]
    topic: String,
    /// Also print one line per record.
    #[arg(long)]
    records: bool,
    #[command(flatten)]
    filter: Filter,
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// The dead-letter topic.
    #[arg(long)]
    topic: String,
    /// Put the tasks on this topic instead of the one each came from.
    #[arg(long, value_name = "TOPIC")]
    to: Option<String>,
    /// Show what would be replayed; produce nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    filter: Filter,
}

/// Which dead-letter records a command looks at.
#[derive(Debug, Clone, clap::Args)]
struct Filter {
    /// Only records with this key; repeat for several.
    #[arg(long, value_name = "KEY")]
    key: Vec<String>,
    /// Only records whose reason contains this text.
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    /// Only records of this failure kind.
    #[arg(long, value_enum, value_name = "KIND")]
    kind: Option<FailureKind>,
    /// Only records dead-lettered at or after this time (milliseconds since the epoch).
    #[arg(long, value_name = "MILLIS")]
    since: Option<i64>,
}

/// The failure kinds a dead-letter record's kind header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FailureKind {
    /// `process` returned an error.
    Error,
    /// The processor asked for a retry and no retry was left.
    Retry,
    /// A permanent error: not retried.
    Permanent,
    /// `process` panicked.
    Panic,
    /// A deferred completion timed out.
    Timeout,
    /// A deferred completion was dropped without completing.
    Leaked,
    /// Discarded before it could run (undecodable, or scheduled too far ahead).
    Discarded,
}

impl FailureKind {
    /// The kind header's value.
    fn as_str(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Retry => "retry",
            FailureKind::Permanent => "permanent",
            FailureKind::Panic => "panic",
            FailureKind::Timeout => "timeout",
            FailureKind::Leaked => "leaked",
            FailureKind::Discarded => "discarded",
        }
    }
}

/// What a dead-letter record says about itself.
#[derive(Debug, Clone, PartialEq)]
struct DeadLetter {
    key: Option<Vec<u8>>,
    reason: String,
    kind: String,
    attempts: String,
    source: String,
    origin_topic: Option<String>,
    subscription: String,
    time_millis: Option<i64>,
}

impl DeadLetter {
    fn of(m: &OwnedMessage) -> DeadLetter {
        let text = |name: &str| header(m, name).map(|v| String::from_utf8_lossy(v).into_owned());
        DeadLetter {
            key: m.key().map(<[u8]>::to_vec),
            reason: text(dead_letter::REASON).unwrap_or_default(),
            kind: text(dead_letter::KIND).unwrap_or_default(),
            attempts: text(dead_letter::ATTEMPTS).unwrap_or_default(),
            source: format!(
                "{}/{}@{}",
                text(dead_letter::TOPIC).unwrap_or_default(),
                text(dead_letter::PARTITION).unwrap_or_default(),
                text(dead_letter::OFFSET).unwrap_or_default()
            ),
            origin_topic: text(dead_letter::ORIGIN_TOPIC),
            subscription: text(dead_letter::SUBSCRIPTION).unwrap_or_default(),
            time_millis: text(dead_letter::TIME_MILLIS).and_then(|t| t.parse().ok()),
        }
    }

    fn key_text(&self) -> String {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_else(|| "-".into())
    }
}

impl Filter {
    fn matches(&self, d: &DeadLetter) -> bool {
        (self.key.is_empty()
            || d.key
                .as_deref()
                .is_some_and(|k| self.key.iter().any(|want| want.as_bytes() == k)))
            && self
                .reason
                .as_ref()
                .is_none_or(|r| d.reason.contains(r.as_str()))
            && self.kind.is_none_or(|k| d.kind == k.as_str())
            && self
                .since
                .is_none_or(|s| d.time_millis.is_some_and(|t| t >= s))
    }
}

fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    raw_headers(m.headers()?.as_borrowed())
        .find(|h| h.is(name))
        .and_then(|h| h.value)
}

/// Runs `decaton dlq`.
pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(a) => list(a).await,
        DlqCommand::Replay(a) => replay(a).await,
    }
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let records = read_to_end(&args.kafka, &args.topic).await?;
    let mut out = std::io::stdout().lock();
    let mut by_reason: BTreeMap<(String, String), u64> = BTreeMap::new();
    let (mut count, mut first, mut last) = (0u64, None::<i64>, None::<i64>);
    for m in &records {
        let d = DeadLetter::of(m);
        if !args.filter.matches(&d) {
            continue;
        }
        count += 1;
        if let Some(t) = d.time_millis {
            first = Some(first.map_or(t, |f| f.min(t)));
            last = Some(last.map_or(t, |l| l.max(t)));
        }
        if args.records {
            writeln!(
                out,
                "{}/{}@{} key={} kind={} attempts={} from={} subscription={} time_ms={} reason={}",
                m.topic(),
                m.partition(),
                m.offset(),
                d.key_text(),
                d.kind,
                d.attempts,
                d.source,
                d.subscription,
                d.time_millis.map_or("-".into(), |t| t.to_string()),
                d.reason
            )?;
        }
        *by_reason
            .entry((d.kind.clone(), d.reason.clone()))
            .or_default() += 1;
    }
    let show = |t: Option<i64>| t.map_or("-".to_string(), |t| t.to_string());
    writeln!(
        out,
        "topic={} records={count} first_ms={} last_ms={}",
        args.topic,
        show(first),
        show(last)
    )?;
    for ((kind, reason), n) in by_reason {
        writeln!(out, "  {n:>8}  kind={kind}  reason={reason}")?;
    }
    Ok(())
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let records = read_to_end(&args.kafka, &args.topic).await?;
    let chosen: Vec<(&OwnedMessage, String)> = records
        .iter()
        .filter_map(|m| {
            let d = DeadLetter::of(m);
            if !args.filter.matches(&d) {
                return None;
            }
            args.to.clone().or(d.origin_topic).map(|t| (m, t))
        })
        .collect();
    let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, t) in &chosen {
        *per_topic.entry(t.as_str()).or_default() += 1;
    }
    let without_origin = records
        .iter()
        .filter(|m| {
            let d = DeadLetter::of(m);
            args.filter.matches(&d) && args.to.is_none() && d.origin_topic.is_none()
        })
        .count();
    let mut out = std::io::stdout().lock();
    if without_origin > 0 {
        tracing::warn!(
            "{without_origin} matching records name no origin topic and are skipped (use --to)"
        );
    }
    if args.dry_run {
        for (topic, n) in &per_topic {
            writeln!(out, "would replay {n} to {topic}")?;
        }
        writeln!(out, "dry run: nothing produced")?;
        return Ok(());
    }
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &args.kafka.bootstrap);
    config.set("partitioner", "murmur2_random");
    for (k, v) in &args.kafka.properties {
        config.set(k, v);
    }
    config.set("acks", "all").set("enable.idempotence", "true");
    let producer: FutureProducer = config.create().context("creating the producer")?;
    let bar = indicatif::ProgressBar::new(chosen.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("replay {bar:40} {pos}/{len} {per_sec} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for (m, topic) in &chosen {
        let headers = replay_headers(m);
        let mut record = FutureRecord::to(topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .with_context(|| {
                format!(
                    "replaying {}/{}@{} to {topic}",
                    m.topic(),
                    m.partition(),
                    m.offset()
                )
            })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    for (topic, n) in &per_topic {
        writeln!(out, "replayed {n} to {topic}")?;
    }
    Ok(())
}

/// The headers a replayed task carries: the dead-letter ones dropped, `dt_meta` with its
/// retry count and scheduled time reset (a header that does not decode is kept as is).
fn replay_headers(m: &OwnedMessage) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    let Some(hs) = m.headers() else {
        return headers;
    };
    // Names are kept byte for byte: a producer may write any bytes there.
    for h in raw_headers(hs.as_borrowed()) {
        if h.name.starts_with(dead_letter::PREFIX.as_bytes()) {
            continue;
        }
        let reset = h
            .is(METADATA_HEADER)
            .then(|| h.value.and_then(|v| decode_metadata(v).ok()))
            .flatten()
            .map(|mut meta| {
                meta.retry_count = 0;
                meta.scheduled_time_millis = 0;
                encode_metadata(&meta)
            });
        headers = add_raw_header(headers, h.name, reset.as_deref().or(h.value));
    }
    headers
}

/// Every record of `topic` from the beginning to the end it had when this started,
/// read without a consumer group.
async fn read_to_end(kafka: &KafkaArgs, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
    let (kafka, topic) = (kafka.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &kafka.bootstrap);
        for (k, v) in &kafka.properties {
            config.set(k, v);
        }
        config
            .set("group.id", "decaton-dlq-reader")
            .set("enable.auto.commit", "false")
            .set("allow.auto.create.topics", "false");
        let consumer: BaseConsumer = config.create().context("creating the consumer")?;
        let partitions = topic_partitions(&consumer, &topic, &kafka)?;
        let mut ends: HashMap<i32, i64> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, kafka.timeout)
                .with_context(|| format!("reading the end of {topic}/{p}"))?;
            if high > low {
                ends.insert(p, high);
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))?;
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let mut idle = std::time::Instant::now();
        while !ends.is_empty() {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    idle = std::time::Instant::now();
                    let p = m.partition();
                    let at_end = ends.get(&p).is_some_and(|end| m.offset() + 1 >= *end);
                    if ends.contains_key(&p) {
                        out.push(m.detach());
                    }
                    if at_end {
                        ends.remove(&p);
                    }
                }
                Some(Err(e)) => return Err(e).context("reading the dead-letter topic"),
                None if idle.elapsed() > Duration::from_secs(30) => {
                    anyhow::bail!("no record for 30 s before the end of {topic}: {ends:?} left")
                }
                None => {}
            }
        }
        Ok(out)
    })
    .await?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use decaton_protocol::TaskMetadata;
    use rdkafka::message::{Header, Headers};
    use rdkafka::Timestamp;

    fn dead(key: &str, reason: &str, kind: &str, time: i64) -> OwnedMessage {
        let meta = TaskMetadata {
            retry_count: 3,
            scheduled_time_millis: 99,
            source_application_id: "app".into(),
            ..Default::default()
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: METADATA_HEADER,
                value: Some(&encode_metadata(&meta)),
            })
            .insert(Header {
                key: "traceparent",
                value: Some("00-abc".as_bytes()),
            })
            .insert(Header {
                key: dead_letter::REASON,
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: dead_letter::KIND,
                value: Some(kind.as_bytes()),
            })
            .insert(Header {
                key: dead_letter::TIME_MILLIS,
                value: Some(time.to_string().as_bytes()),
            })
            .insert(Header {
                key: dead_letter::ORIGIN_TOPIC,
                value: Some("ops".as_bytes()),
            });
        OwnedMessage::new(
            Some(b"task".to_vec()),
            Some(key.as_bytes().to_vec()),
            "ops-dlq".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        )
    }

    #[test]
    fn filters_select_by_key_reason_kind_and_time() {
        let m = dead("user-1", "storage timed out", "error", 1_000);
        let d = DeadLetter::of(&m);
        let f = |key: &[&str], reason: Option<&str>, kind: Option<&str>, since: Option<i64>| {
            Filter {
                key: key.iter().map(|k| k.to_string()).collect(),
                reason: reason.map(String::from),
                kind: kind.map(|k| <FailureKind as clap::ValueEnum>::from_str(k, false).unwrap()),
                since,
            }
            .matches(&d)
        };
        assert!(f(&[], None, None, None));
        assert!(f(
            &["user-2", "user-1"],
            Some("timed out"),
            Some("error"),
            Some(1_000)
        ));
        assert!(!f(&["user-2"], None, None, None));
        assert!(!f(&[], Some("refused"), None, None));
        assert!(!f(&[], None, Some("panic"), None));
        assert!(!f(&[], None, None, Some(1_001)));
        assert_eq!(d.origin_topic.as_deref(), Some("ops"));
    }

    #[test]
    fn replayed_headers_drop_dead_letter_ones_and_reset_the_retry() {
        let m = dead("user-1", "x", "error", 1);
        let h = replay_headers(&m);
        let keys: Vec<&str> = h.iter().map(|h| h.key).collect();
        assert_eq!(keys, vec![METADATA_HEADER, "traceparent"]);
        let meta = decode_metadata(h.get(0).value.unwrap()).unwrap();
        assert_eq!(meta.retry_count, 0);
        assert_eq!(meta.scheduled_time_millis, 0);
        assert_eq!(meta.source_application_id, "app");
    }

    /// A header name that is not UTF-8 used to panic `list` and `replay`; it is kept byte
    /// for byte, and a null value stays null.
    #[test]
    fn header_names_that_are_not_utf8_are_read_and_replayed_byte_for_byte() {
        let headers = add_raw_header(OwnedHeaders::new(), b"\xff\xfe", Some(b"x"));
        let headers = add_raw_header(headers, b"null", None);
        let headers = add_raw_header(headers, dead_letter::REASON.as_bytes(), Some(b"why"));
        let m = OwnedMessage::new(
            Some(b"task".to_vec()),
            None,
            "ops-dlq".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        );
        assert_eq!(header(&m, dead_letter::REASON), Some(&b"why"[..]));
        let replayed = replay_headers(&m);
        let read: Vec<_> = raw_headers(replayed.as_borrowed())
            .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            read,
            vec![
                (b"\xff\xfe".to_vec(), Some(b"x".to_vec())),
                (b"null".to_vec(), None)
            ]
        );
    }
}
