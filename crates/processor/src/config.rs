//! Runtime properties of a subscription.
//!
//! Each Decaton property has a named field here (`decaton.partition.concurrency` ->
//! [`partition_concurrency`](ProcessorProperties::partition_concurrency)), settable from
//! TOML/JSON through serde or one at a time by either name with
//! [`ProcessorProperties::set`]. Kafka settings are not here: they pass straight through to
//! librdkafka via [`SubscriptionBuilder::set`](crate::SubscriptionBuilder::set).

use std::time::Duration;

use serde::Deserialize;

/// How tasks of one partition are spread over concurrent lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulingMode {
    /// `partition_concurrency` lanes per partition; a key is hashed to a lane, so two keys
    /// may share one (Decaton's thread-pool runtime).
    #[default]
    Bounded,
    /// One lane per distinct key with tasks in flight, any number of keys (Decaton's
    /// virtual-thread runtime); concurrency is limited by `max_pending` only.
    PerKey,
}

/// Properties of the processing runtime, with Decaton's defaults where Decaton has one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessorProperties {
    /// Scheduling mode (`bounded` or `per_key`).
    pub mode: SchedulingMode,
    /// Lanes per partition in `bounded` mode (`decaton.partition.concurrency`, default 1).
    pub partition_concurrency: usize,
    /// Uncommitted tasks per partition (from the lowest unfinished offset to the newest
    /// dispatched one) (`decaton.max.pending.records`, default 10000). Records fetched
    /// beyond it wait; once as many again wait, fetching of the partition pauses, and it
    /// resumes when half of them have moved on. Bounds memory (at most twice this many
    /// records per partition) and the size of the offset map.
    pub max_pending: usize,
    /// How often positions are committed (`decaton.commit.interval.ms`, default 1 s).
    #[serde(with = "millis")]
    pub commit_interval: Duration,
    /// A deferred task not completed within this time is completed as failed and counted
    /// (`decaton.deferred.complete.timeout.ms`; default: none, wait forever, as Decaton).
    #[serde(with = "opt_millis")]
    pub deferred_complete_timeout: Option<Duration>,
    /// On shutdown, how long to wait for dispatched tasks before committing and leaving
    /// (`decaton.processing.shutdown.timeout.ms`, default 30 s).
    #[serde(with = "millis")]
    pub shutdown_timeout: Duration,
    /// On partition revocation, how long to wait for the revoked partitions' running
    /// tasks before committing and releasing them (`decaton.group.rebalance.timeout.ms`,
    /// default 1 s). Tasks still running after it are abandoned: their completion commits
    /// nothing.
    #[serde(with = "millis")]
    pub rebalance_timeout: Duration,
    /// Keys whose tasks are discarded without processing (`decaton.ignore.keys`).
    pub ignore_keys: Vec<String>,
    /// Record completed offsets above the commit position in the commit metadata, so a
    /// new owner skips them instead of running them again (default on).
    pub offset_map: bool,
    /// Largest encoded offset map; above it, only the position is committed (default
    /// 4000 bytes, under Kafka's default `offset.metadata.max.bytes` of 4096).
    pub offset_map_max_bytes: usize,
    /// A task scheduled further ahead than this is discarded and counted instead of
    /// waiting (default 30 days): a corrupt or absurd `scheduled_time_millis` must not
    /// hold its key forever.
    #[serde(with = "millis")]
    pub max_scheduled_delay: Duration,
    /// Tasks per second each partition may start (`decaton.processing.rate.per.partition`):
    /// -1 unlimited (default), 0 stops processing, N at most N per second. Waiting for the
    /// rate holds no lane: records wait in the partition, which is paused when
    /// `max_pending` is reached. Reloadable through [`LiveProperties`](crate::LiveProperties).
    pub processing_rate_per_partition: i64,
    /// Tasks per second each partition of the retry topic may start: -1 unlimited
    /// (default), 0 stops retries, N at most N per second. The retry topic has a rate of
    /// its own, as the shaping topic has (`QuotaConfig::shaping_rate`): stopping the
    /// source topic with `processing_rate_per_partition = 0` leaves retries running, and
    /// limiting it does not slow them. Reloadable through
    /// [`LiveProperties`](crate::LiveProperties).
    pub retry_processing_rate_per_partition: i64,
    /// Tasks per second one key may start before its further tasks count as over quota
    /// (`decaton.per.key.quota.processing.rate`): -1 unlimited (default). Applies only to
    /// a subscription with a [`QuotaConfig`](crate::QuotaConfig), whose window and
    /// callback decide what happens then. Reloadable through
    /// [`LiveProperties`](crate::LiveProperties).
    pub per_key_quota_processing_rate: i64,
}

impl Default for ProcessorProperties {
    fn default() -> Self {
        ProcessorProperties {
            mode: SchedulingMode::Bounded,
            partition_concurrency: 1,
            max_pending: 10_000,
            commit_interval: Duration::from_secs(1),
            deferred_complete_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
            rebalance_timeout: Duration::from_secs(1),
            ignore_keys: Vec::new(),
            offset_map: true,
            offset_map_max_bytes: 4000,
            max_scheduled_delay: Duration::from_secs(30 * 24 * 3600),
            processing_rate_per_partition: -1,
            retry_processing_rate_per_partition: -1,
            per_key_quota_processing_rate: -1,
        }
    }
}

/// A property name or value [`ProcessorProperties::set`] did not accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PropertyError {
    /// No property has this name.
    #[error("unknown property {0}")]
    Unknown(String),
    /// The value does not parse for this property.
    #[error("invalid value {value:?} for {name}")]
    InvalidValue {
        /// Property name.
        name: String,
        /// The rejected value.
        value: String,
    },
    /// The property exists but cannot change while the subscription runs.
    #[error("{0} cannot change while the subscription runs")]
    NotReloadable(String),
    /// A property source (a file) could not be read.
    #[error("property source: {0}")]
    Source(String),
}

impl ProcessorProperties {
    /// Checks the values together; [`SubscriptionBuilder::build`](crate::SubscriptionBuilder::build)
    /// calls it.
    pub fn validate(&self) -> Result<(), PropertyError> {
        let bad = |name: &str, value: String| {
            Err(PropertyError::InvalidValue {
                name: name.to_string(),
                value,
            })
        };
        if self.partition_concurrency == 0 {
            return bad("partition_concurrency", "0".into());
        }
        if self.max_pending == 0 {
            return bad("max_pending", "0".into());
        }
        if self.commit_interval.is_zero() {
            return bad("commit_interval", "0".into());
        }
        if self.processing_rate_per_partition < -1 {
            return bad(
                "processing_rate_per_partition",
                self.processing_rate_per_partition.to_string(),
            );
        }
        if self.retry_processing_rate_per_partition < -1 {
            return bad(
                "retry_processing_rate_per_partition",
                self.retry_processing_rate_per_partition.to_string(),
            );
        }
        if self.per_key_quota_processing_rate < -1 {
            return bad(
                "per_key_quota_processing_rate",
                self.per_key_quota_processing_rate.to_string(),
            );
        }
        Ok(())
    }

    /// Sets one property by its name here (`partition_concurrency`) or its Decaton name
    /// (`decaton.partition.concurrency`). Durations are in milliseconds; a negative
    /// `deferred_complete_timeout` means none.
    ///
    /// ```
    /// use decaton_processor::ProcessorProperties;
    /// let mut p = ProcessorProperties::default();
    /// p.set("decaton.partition.concurrency", "10").unwrap();
    /// p.set("mode", "per_key").unwrap();
    /// assert_eq!(p.partition_concurrency, 10);
    /// ```
    pub fn set(&mut self, name: &str, value: &str) -> Result<&mut Self, PropertyError> {
        let bad = || PropertyError::InvalidValue {
            name: name.to_string(),
            value: value.to_string(),
        };
        let num = || value.trim().parse::<u64>().map_err(|_| bad());
        let ms = || num().map(Duration::from_millis);
        match name {
            "mode" | "scheduling_mode" | "decaton.scheduling.mode" => {
                self.mode = match value.trim() {
                    "bounded" => SchedulingMode::Bounded,
                    "per_key" | "per-key" | "perkey" => SchedulingMode::PerKey,
                    _ => return Err(bad()),
                }
            }
            "partition_concurrency" | "decaton.partition.concurrency" => {
                self.partition_concurrency = num()? as usize;
                if self.partition_concurrency == 0 {
                    return Err(bad());
                }
            }
            "max_pending" | "decaton.max.pending.records" => {
                self.max_pending = num()? as usize;
                if self.max_pending == 0 {
                    return Err(bad());
                }
            }
            "commit_interval" | "commit_interval_ms" | "decaton.commit.interval.ms" => {
                self.commit_interval = ms()?
            }
            "deferred_complete_timeout"
            | "deferred_complete_timeout_ms"
            | "decaton.deferred.complete.timeout.ms" => {
                self.deferred_complete_timeout =
                    match value.trim().parse::<i64>().map_err(|_| bad())? {
                        v if v < 0 => None,
                        v => Some(Duration::from_millis(v as u64)),
                    }
            }
            "shutdown_timeout"
            | "shutdown_timeout_ms"
            | "decaton.processing.shutdown.timeout.ms" => self.shutdown_timeout = ms()?,
            "rebalance_timeout" | "rebalance_timeout_ms" | "decaton.group.rebalance.timeout.ms" => {
                self.rebalance_timeout = ms()?
            }
            "ignore_keys" | "decaton.ignore.keys" => {
                self.ignore_keys = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "offset_map" | "decaton.offset.map" => {
                self.offset_map = value.trim().parse().map_err(|_| bad())?;
            }
            "offset_map_max_bytes" => self.offset_map_max_bytes = num()? as usize,
            "max_scheduled_delay" | "max_scheduled_delay_ms" => self.max_scheduled_delay = ms()?,
            "processing_rate_per_partition" | "decaton.processing.rate.per.partition" => {
                self.processing_rate_per_partition = match value.trim().parse::<i64>() {
                    Ok(v) if v >= -1 => v,
                    _ => return Err(bad()),
                }
            }
            "retry_processing_rate_per_partition" => {
                self.retry_processing_rate_per_partition = match value.trim().parse::<i64>() {
                    Ok(v) if v >= -1 => v,
                    _ => return Err(bad()),
                }
            }
            "per_key_quota_processing_rate" | "decaton.per.key.quota.processing.rate" => {
                self.per_key_quota_processing_rate = match value.trim().parse::<i64>() {
                    Ok(v) if v >= -1 => v,
                    _ => return Err(bad()),
                }
            }
            _ => return Err(PropertyError::Unknown(name.to_string())),
        }
        Ok(self)
    }
}

mod millis {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_millis {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?
            .filter(|v| *v >= 0)
            .map(|v| Duration::from_millis(v as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decaton_and_short_names_set_the_same_field() {
        let mut p = ProcessorProperties::default();
        p.set("decaton.max.pending.records", "5").unwrap();
        assert_eq!(p.max_pending, 5);
        p.set("max_pending", "7").unwrap();
        assert_eq!(p.max_pending, 7);
        p.set("decaton.deferred.complete.timeout.ms", "-1").unwrap();
        assert_eq!(p.deferred_complete_timeout, None);
        assert!(matches!(p.set("nope", "1"), Err(PropertyError::Unknown(_))));
        assert!(matches!(
            p.set("partition_concurrency", "0"),
            Err(PropertyError::InvalidValue { .. })
        ));
    }

    #[test]
    fn deserializes_from_json_with_defaults() {
        let p: ProcessorProperties =
            serde_json::from_str(r#"{"mode":"per_key","commit_interval":250}"#).unwrap();
        assert_eq!(p.mode, SchedulingMode::PerKey);
        assert_eq!(p.commit_interval, Duration::from_millis(250));
        assert_eq!(p.max_pending, 10_000);
    }
}
