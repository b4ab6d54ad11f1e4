//! The Kafka clients of the state machinery: how their configuration is built from the
//! user's pass-through settings, and how blocking librdkafka calls stay off the async
//! workers.
//!
//! The user's `kafka` settings pass straight through to librdkafka. The changelog
//! producer starts from its own defaults (`linger.ms=1`: a task's key waits for the
//! acknowledgement of the task's batch before its next task runs, so latency matters
//! more than batching), which the user's settings override, and then gets the settings
//! it cannot do without (`acks=all`, `enable.idempotence=true`) forced on top: the
//! restore relies on a partition's records being stored once each, in the order they
//! were handed to the producer. The restore consumer likewise starts from defaults that
//! bound how much of the changelog it prefetches, which the user's settings override.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::StateError;

/// Defaults of the changelog producer; the pass-through settings override them.
/// `murmur2_random` places keyed records as Java clients do (the changelog names its
/// partition explicitly, but any keyed record without one lands where Java would put it).
const PRODUCER_DEFAULTS: [(&str, &str); 2] =
    [("linger.ms", "1"), ("partitioner", "murmur2_random")];

/// Producer settings the changelog cannot do without; they override the pass-through.
const FORCED_PRODUCER: [(&str, &str); 2] = [("acks", "all"), ("enable.idempotence", "true")];

/// Defaults of the restore consumer; the pass-through settings override them.
///
/// librdkafka's own defaults let a consumer prefetch up to 100 000 records and 64 MiB per
/// partition (`queued.min.messages`, `queued.max.messages.kbytes`), which a replay that
/// drains as fast as it can fills at once. These keep half of that at most: reading, not
/// prefetching more, bounds a replay (1M mutations from Tansu: 184k/s with these, 191k/s
/// with librdkafka's, 167k/s with a quarter of them). `max.partition.fetch.bytes` bounds
/// what one fetch adds on top of the queue, and a short `fetch.queue.backoff.ms` asks for
/// more as soon as the queue drains below its bounds (librdkafka's 1 s default would stall
/// the replay each time).
const RESTORE_CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    ("max.partition.fetch.bytes", "16777216"),
    ("queued.min.messages", "50000"),
    ("queued.max.messages.kbytes", "32768"),
    ("fetch.queue.backoff.ms", "10"),
];

/// Builds a client config: the pass-through settings first, then `bootstrap.servers`.
pub(crate) fn client_config(bootstrap: &str, kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in kafka {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", bootstrap);
    cfg
}

/// The changelog producer's config: its defaults, the pass-through settings over them,
/// and the forced settings on top (a conflicting pass-through value is logged and
/// ignored).
pub(crate) fn producer_config(bootstrap: &str, kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut with_defaults: BTreeMap<String, String> = PRODUCER_DEFAULTS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    with_defaults.extend(kafka.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut cfg = client_config(bootstrap, &with_defaults);
    for (k, v) in FORCED_PRODUCER {
        if let Some(given) = kafka
            .get(k)
            .filter(|given| given.as_str() != v && !(k == "acks" && given.as_str() == "-1"))
        {
            tracing::warn!("changelog producer ignores {k}={given}: it needs {k}={v}");
        }
        cfg.set(k, v);
    }
    cfg
}

/// The restore consumer's config: its defaults, the pass-through settings over them, and
/// what a replay needs on top. librdkafka's `assign()` needs a group handle, so a group id
/// is set, but the consumer never joins the group (no subscribe) and never commits.
pub(crate) fn restore_consumer_config(
    bootstrap: &str,
    kafka: &BTreeMap<String, String>,
    changelog_topic: &str,
) -> ClientConfig {
    let mut with_defaults: BTreeMap<String, String> = RESTORE_CONSUMER_DEFAULTS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    with_defaults.extend(kafka.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut cfg = client_config(bootstrap, &with_defaults);
    cfg.set("group.id", format!("{changelog_topic}-restore"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "100");
    cfg
}

/// The partition count of `topic`, or `None` if the broker does not know it (yet).
pub(crate) fn partition_count(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<Option<i32>, StateError> {
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .and_then(|t| i32::try_from(t.partitions().len()).ok()))
}

/// How long [`delete_retention`] waits for the broker.
pub(crate) const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `delete.retention.ms` of `topic`, or `None` when the broker does not say (it
/// does not serve DescribeConfigs, as librdkafka's mock cluster does not, or does not
/// answer within [`DESCRIBE_TIMEOUT`]).
pub(crate) async fn delete_retention(
    bootstrap: &str,
    kafka: &BTreeMap<String, String>,
    topic: &str,
) -> Option<Duration> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap, kafka).create().ok()?;
    let opts = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
    let resource = ResourceSpecifier::Topic(topic);
    let described =
        tokio::time::timeout(DESCRIBE_TIMEOUT, admin.describe_configs([&resource], &opts)).await;
    close_off_runtime(admin);
    let config = described.ok()?.ok()?.into_iter().next()?.ok()?;
    let value = config.get("delete.retention.ms")?.value.as_deref()?.trim();
    value.parse::<u64>().ok().map(Duration::from_millis)
}

/// Runs blocking librdkafka (or sled) calls on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Internal(format!("blocking task failed: {e}")))?
}

/// Drops a librdkafka client where its destruction may block: a producer purges, flushes
/// (up to 500 ms) and joins its polling thread when dropped, which must not happen on an
/// async worker. Inside a tokio runtime the value goes to a short-lived thread of its
/// own (not the blocking pool, which a runtime that is shutting down no longer runs);
/// elsewhere the caller may block and it is dropped in place.
pub(crate) fn close_off_runtime<T: Send + 'static>(client: T) {
    if tokio::runtime::Handle::try_current().is_err() {
        drop(client);
        return;
    }
    // The value comes back if the thread cannot start, and is then dropped here.
    let slot = std::sync::Arc::new(parking_lot::Mutex::new(Some(client)));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new()
        .name("decaton-client-close".to_string())
        .spawn(move || drop(theirs.lock().take()));
    if let Err(e) = spawned {
        tracing::warn!("no thread to close a Kafka client on ({e}); closing it in place");
        drop(slot.lock().take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the thread it is dropped on.
    struct DropSpy(std::sync::mpsc::Sender<std::thread::ThreadId>);

    impl Drop for DropSpy {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().id());
        }
    }

    #[test]
    fn clients_are_closed_off_the_runtime_thread() -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let runtime_thread = std::thread::current().id();
        rt.block_on(async { close_off_runtime(DropSpy(tx.clone())) });
        let dropped_on = rx.recv_timeout(Duration::from_secs(10))?;
        assert_ne!(dropped_on, runtime_thread, "closed on the runtime's thread");
        // Outside a runtime the caller may block: closed in place.
        close_off_runtime(DropSpy(tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10))?, runtime_thread);
        Ok(())
    }

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn producer_defaults_yield_to_the_user_but_forced_settings_do_not() {
        let cfg = producer_config("b:9092", &settings(&[]));
        assert_eq!(cfg.get("linger.ms"), Some("1"));
        assert_eq!(cfg.get("partitioner"), Some("murmur2_random"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("bootstrap.servers"), Some("b:9092"));

        let cfg = producer_config(
            "b:9092",
            &settings(&[
                ("linger.ms", "20"),
                ("partitioner", "consistent_random"),
                ("acks", "1"),
                ("enable.idempotence", "false"),
                ("bootstrap.servers", "elsewhere:1"),
                ("compression.type", "lz4"),
            ]),
        );
        assert_eq!(cfg.get("linger.ms"), Some("20"));
        assert_eq!(cfg.get("partitioner"), Some("consistent_random"));
        assert_eq!(cfg.get("compression.type"), Some("lz4"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn restore_consumer_defaults_yield_to_the_user() {
        let cfg = restore_consumer_config("b:9092", &settings(&[]), "s-state-changelog");
        assert_eq!(cfg.get("max.partition.fetch.bytes"), Some("16777216"));
        assert_eq!(cfg.get("queued.min.messages"), Some("50000"));
        assert_eq!(cfg.get("queued.max.messages.kbytes"), Some("32768"));
        assert_eq!(cfg.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(cfg.get("group.id"), Some("s-state-changelog-restore"));
        assert_eq!(cfg.get("enable.auto.commit"), Some("false"));

        let cfg = restore_consumer_config(
            "b:9092",
            &settings(&[
                ("max.partition.fetch.bytes", "1048576"),
                ("queued.min.messages", "100000"),
                ("queued.max.messages.kbytes", "65536"),
                ("fetch.queue.backoff.ms", "1000"),
                ("enable.auto.commit", "true"),
            ]),
            "s-state-changelog",
        );
        assert_eq!(cfg.get("max.partition.fetch.bytes"), Some("1048576"));
        assert_eq!(cfg.get("queued.min.messages"), Some("100000"));
        assert_eq!(cfg.get("queued.max.messages.kbytes"), Some("65536"));
        assert_eq!(cfg.get("fetch.queue.backoff.ms"), Some("1000"));
        assert_eq!(cfg.get("enable.auto.commit"), Some("false"));
        assert_eq!(cfg.get("bootstrap.servers"), Some("b:9092"));
    }
}
