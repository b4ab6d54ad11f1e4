//! The Kafka clients of the state machinery: how their configuration is built from the
//! user's pass-through settings, and how blocking librdkafka calls stay off the async
//! workers.
//!
//! The user's `kafka` settings pass straight through to librdkafka. The changelog
//! producer then gets the settings it cannot do without (`acks=all`,
//! `enable.idempotence=true`) forced on top: the restore relies on a partition's records
//! being stored once each, in the order they were handed to the producer.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::StateError;

/// Producer settings the changelog cannot do without; they override the pass-through.
const FORCED_PRODUCER: [(&str, &str); 2] = [("acks", "all"), ("enable.idempotence", "true")];

/// Builds a client config: the pass-through settings first, then `bootstrap.servers`.
pub(crate) fn client_config(bootstrap: &str, kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in kafka {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", bootstrap);
    cfg
}

/// The changelog producer's config: the pass-through settings, with the forced settings
/// on top (a conflicting pass-through value is logged and ignored).
pub(crate) fn producer_config(bootstrap: &str, kafka: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = client_config(bootstrap, kafka);
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

/// Runs blocking librdkafka (or sled) calls on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Internal(format!("blocking task failed: {e}")))?
}
