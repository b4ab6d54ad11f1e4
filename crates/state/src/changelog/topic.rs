//! Creating a changelog topic: compacted, partitioned like its source topic.
//!
//! The changelog must have at least as many partitions as the source topic (partition
//! `p` of the changelog holds the state of source partition `p`), `cleanup.policy=compact`
//! (one live record per state key) and a `min.compaction.lag.ms` long enough that a torn
//! batch cannot make the cleaner delete the valid value before the next owner's restore
//! writes it again. A broker that refuses those settings gets a topic with fewer, and a
//! warning.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::changelog_topic;
use crate::kafka::{blocking, client_config, partition_count};
use crate::StateError;

/// `min.compaction.lag.ms` of the changelog: records younger than this are neither
/// cleaned nor used to clean older ones, so a torn batch cannot make the cleaner delete the
/// valid value it overwrote before the next owner's restore writes that value again.
const MIN_COMPACTION_LAG_MS: &str = "86400000";

/// What [`create_changelog_topic`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogTopicInfo {
    /// The changelog topic, `<subscription>-<store>-changelog`.
    pub topic: String,
    /// Its partition count (the source topic's when it was created here).
    pub partitions: i32,
    /// Whether this call created it (false: it already existed).
    pub created: bool,
    /// Whether it was created with `cleanup.policy=compact` (false when it already
    /// existed, or when the broker rejected the setting and it was created without).
    pub compacted: bool,
}

/// Creates the changelog topic of `store` for `subscription` with the partition count of
/// `source_topic`, `cleanup.policy=compact` and `min.compaction.lag.ms` = one day, and
/// waits until its metadata is visible.
///
/// An existing topic is accepted (an error if it has fewer partitions than the source).
/// If the broker rejects the topic configs, the topic is created with fewer (compaction
/// only, then none) and a warning says so. `replication_factor` `None` asks for
/// the broker default.
pub async fn create_changelog_topic(
    bootstrap: &str,
    kafka: &BTreeMap<String, String>,
    subscription: &str,
    store: &str,
    source_topic: &str,
    replication_factor: Option<i32>,
) -> Result<ChangelogTopicInfo, StateError> {
    let topic = changelog_topic(subscription, store);
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap, kafka).create()?;
    let admin = std::sync::Arc::new(admin);
    let partitions = {
        let (admin, source) = (admin.clone(), source_topic.to_string());
        blocking(move || partition_count(&admin, &source)).await?
    }
    .ok_or_else(|| StateError::Changelog {
        topic: topic.clone(),
        detail: format!("source topic {source_topic} does not exist"),
    })?;

    let replication = replication_factor.unwrap_or(-1);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Most protective settings first; a broker that rejects them gets fewer.
    let attempts: [&[(&str, &str)]; 3] = [
        &[
            ("cleanup.policy", "compact"),
            ("min.compaction.lag.ms", MIN_COMPACTION_LAG_MS),
        ],
        &[("cleanup.policy", "compact")],
        &[],
    ];
    let mut outcome = None;
    let mut rejected = Vec::new();
    for config in attempts {
        let mut new_topic = NewTopic::new(&topic, partitions, TopicReplication::Fixed(replication));
        for (k, v) in config {
            new_topic = new_topic.set(k, v);
        }
        match create_one(&admin, &new_topic, &opts).await? {
            Ok(created) => {
                let compacted = created && config.iter().any(|(k, _)| *k == "cleanup.policy");
                outcome = Some((created, compacted));
                break;
            }
            Err(code) => rejected.push(format!("{config:?}: {code}")),
        }
    }
    let Some((created, compacted)) = outcome else {
        return Err(StateError::Changelog {
            topic,
            detail: format!("create topic refused: {}", rejected.join("; ")),
        });
    };
    if !rejected.is_empty() {
        tracing::warn!(
            topic,
            "broker rejected changelog topic settings ({}); created with fewer",
            rejected.join("; ")
        );
    }
    if created && !compacted {
        tracing::warn!(
            topic,
            "changelog created without cleanup.policy=compact: it keeps every record, not the latest per key"
        );
    }

    // Wait until the topic is visible with all its partitions.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = {
            let (admin, t) = (admin.clone(), topic.clone());
            blocking(move || partition_count(&admin, &t)).await?
        };
        match found {
            Some(n) if n < partitions && !created => {
                return Err(StateError::Changelog {
                    topic,
                    detail: format!(
                        "has {n} partitions, fewer than the {partitions} of {source_topic}"
                    ),
                });
            }
            // Just created: the metadata does not show every partition yet.
            Some(n) if n < partitions => {}
            Some(n) => {
                if n > partitions {
                    tracing::warn!(
                        topic,
                        "changelog has {n} partitions, more than the {partitions} of {source_topic}"
                    );
                }
                return Ok(ChangelogTopicInfo {
                    topic,
                    partitions: n,
                    created,
                    compacted,
                });
            }
            None => {}
        }
        if Instant::now() > deadline {
            return Err(StateError::Timeout(format!(
                "changelog topic {topic} not visible after creation"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `delete.retention.ms` of the changelog `topic`: how long compaction keeps a delete
/// after cleaning it, which bounds how old a checkpoint a restore may trust (see
/// [`RestoreOptions::checkpoint_max_age`](crate::internal::RestoreOptions::checkpoint_max_age)).
/// `None` when the broker does not say (no DescribeConfigs, as on librdkafka's mock
/// cluster, or no answer within 5 s).
pub async fn changelog_delete_retention(
    bootstrap: &str,
    kafka: &BTreeMap<String, String>,
    topic: &str,
) -> Option<Duration> {
    crate::kafka::delete_retention(bootstrap, kafka, topic).await
}

/// `Ok(Ok(true))` created, `Ok(Ok(false))` already existed, `Ok(Err(code))` refused.
async fn create_one(
    admin: &AdminClient<DefaultClientContext>,
    topic: &NewTopic<'_>,
    opts: &AdminOptions,
) -> Result<Result<bool, RDKafkaErrorCode>, StateError> {
    let results = admin.create_topics([topic], opts).await?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(Ok(true)),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(Ok(false)),
        Some(Err((_, code))) => Ok(Err(code)),
        None => Err(StateError::Internal(
            "create_topics returned no result".into(),
        )),
    }
}
