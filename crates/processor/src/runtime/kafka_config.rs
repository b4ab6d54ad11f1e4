//! The librdkafka configuration of every client the runtime creates.
//!
//! The user's settings pass through verbatim to every client — the consumer, the
//! changelog producer, metadata probes and admin calls — so security settings
//! (`security.protocol`, `sasl.*`, `ssl.*`) reach them all. The runtime adds only the
//! settings its guarantees rest on, and says which ones it overrides.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

/// Settings that only make sense on a consumer; dropped from producers and probes so
/// librdkafka does not warn about them.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    "group.instance.id",
    "fetch.min.bytes",
    "fetch.wait.max.ms",
    "max.partition.fetch.bytes",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "isolation.level",
    "enable.partition.eof",
];

/// The subscription's consumer: manual commits of the runtime's own positions.
pub(crate) fn consumer(
    bootstrap: &str,
    group: &str,
    user: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("client.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    for (k, v) in user {
        config.set(k, v);
    }
    // The runtime commits its own positions; librdkafka's automatic commits would pass
    // unfinished tasks and lose them in a crash.
    for (k, v) in [
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
    ] {
        if user.get(k).is_some_and(|given| given != v) {
            tracing::warn!(
                "the subscription ignores {k}={}: it commits its own positions",
                user[k]
            );
        }
        config.set(k, v);
    }
    config.set("group.id", group);
    config
}

/// The user's settings minus consumer-only ones: for producers, probes and admin clients.
pub(crate) fn shared_settings(user: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    user.iter()
        .filter(|(k, _)| !CONSUMER_ONLY.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The producer of retry and dead-letter records: Java-compatible partitioning by
/// default, the user's settings over it, and `acks=all` with idempotence forced on top (a
/// retry record must be stored before the original offset may be committed).
pub(crate) fn producer(bootstrap: &str, user: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("partitioner", "murmur2_random");
    for (k, v) in shared_settings(user) {
        config.set(k, v);
    }
    for (k, v) in [("acks", "all"), ("enable.idempotence", "true")] {
        if user
            .get(k)
            .is_some_and(|g| g != v && !(k == "acks" && g == "-1"))
        {
            tracing::warn!(
                "the retry/dead-letter producer ignores {k}={}: it needs {k}={v}",
                user[k]
            );
        }
        config.set(k, v);
    }
    config.set("bootstrap.servers", bootstrap);
    config
}

/// A short-lived client for metadata probes.
pub(crate) fn probe(bootstrap: &str, user: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in shared_settings(user) {
        config.set(k, v);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The changelog existence probe must use the user's security settings.
    #[test]
    fn security_settings_reach_every_client() {
        let user: BTreeMap<String, String> = [
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "PLAIN"),
            ("session.timeout.ms", "10000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let probe = probe("b:9092", &user);
        assert_eq!(probe.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(probe.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(probe.get("session.timeout.ms"), None);
        let config = consumer("b:9092", "g", &user);
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("group.id"), Some("g"));
        let auto: BTreeMap<String, String> = [("enable.auto.commit", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            consumer("b:9092", "g", &auto).get("enable.auto.commit"),
            Some("false")
        );
        assert_eq!(
            shared_settings(&user)
                .get("sasl.mechanism")
                .map(String::as_str),
            Some("PLAIN")
        );
    }
}
