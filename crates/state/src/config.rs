//! Configuration of partition-local state: where it lives and which backend holds it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which storage holds a partition's state locally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// An embedded sled database per partition under [`StateConfig::state_dir`]. Survives
    /// restarts; a clean close leaves a checkpoint so the next open replays only the
    /// changelog's tail.
    #[default]
    Sled,
    /// A sorted map in memory. Nothing on disk: every open restores the whole changelog.
    Memory,
}

/// Configuration of a state store (`[state]` in the processor configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StateConfig {
    /// Directory that holds one sled database per (subscription, store, topic, partition).
    pub state_dir: PathBuf,
    /// Local storage backend.
    pub backend: Backend,
    /// Name of the store; part of the changelog topic name and the directory layout.
    pub store_name: String,
    /// Page cache size of each partition's sled database, in bytes. sled's own default
    /// (1 GiB) is per database, too much when a host owns many partitions.
    pub sled_cache_bytes: u64,
    /// How old a local checkpoint may be, in ms, and still be restored from. Compaction
    /// removes a delete (tombstone) from the changelog `delete.retention.ms` after
    /// cleaning it, and with it the only trace that a key the local store still holds
    /// was deleted; an older checkpoint would bring such a key back. So a checkpoint is
    /// used only while it is younger than this and than half the changelog topic's
    /// `delete.retention.ms` (when the broker says it); otherwise the local store is
    /// emptied and restored from the start of the changelog. Default: 12 h, half of
    /// Kafka's default `delete.retention.ms`.
    pub checkpoint_max_age_ms: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            state_dir: PathBuf::from("decaton-state"),
            backend: Backend::Sled,
            store_name: "state".to_string(),
            sled_cache_bytes: 64 * 1024 * 1024,
            checkpoint_max_age_ms: DEFAULT_CHECKPOINT_MAX_AGE_MS,
        }
    }
}

impl StateConfig {
    /// The defaults with `state_dir` set: `StateConfig::new(dir).backend(Backend::Memory)`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        StateConfig {
            state_dir: state_dir.into(),
            ..StateConfig::default()
        }
    }

    /// Sets the local storage backend.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets the store name (part of the changelog topic name).
    pub fn store_name(mut self, store_name: impl Into<String>) -> Self {
        self.store_name = store_name.into();
        self
    }

    /// Sets the page cache size of each partition's sled database, in bytes.
    pub fn sled_cache_bytes(mut self, bytes: u64) -> Self {
        self.sled_cache_bytes = bytes;
        self
    }

    /// Sets how old a local checkpoint may be and still be restored from (see
    /// [`StateConfig::checkpoint_max_age_ms`]).
    pub fn checkpoint_max_age(mut self, max_age: std::time::Duration) -> Self {
        self.checkpoint_max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        self
    }
}

/// Default of [`StateConfig::checkpoint_max_age_ms`]: 12 hours.
const DEFAULT_CHECKPOINT_MAX_AGE_MS: u64 = 12 * 60 * 60 * 1000;

/// The changelog topic of `store` for `subscription`: `<subscription>-<store>-changelog`.
///
/// It has one partition per source partition; partition `p` of the changelog holds the
/// state of source partition `p`. A subscription that reads several source topics needs
/// one store name per topic, because partition `p` of every topic would otherwise share
/// one changelog partition (and compaction would merge their keys).
pub fn changelog_topic(subscription: &str, store: &str) -> String {
    format!("{subscription}-{store}-changelog")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changelog_topic_name() {
        assert_eq!(
            changelog_topic("billing", "state"),
            "billing-state-changelog"
        );
    }

    #[test]
    fn defaults_fill_missing_fields() -> anyhow::Result<()> {
        let cfg: StateConfig =
            serde_json::from_str(r#"{"state_dir": "/var/lib/x", "backend": "memory"}"#)?;
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(cfg.backend, Backend::Memory);
        assert_eq!(cfg.store_name, "state");
        let cfg: StateConfig = serde_json::from_str("{}")?;
        assert_eq!(cfg, StateConfig::default());
        Ok(())
    }
}
