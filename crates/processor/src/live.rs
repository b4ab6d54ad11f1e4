//! Properties that change while a subscription runs.
//!
//! A subscription built with [`SubscriptionBuilder::live_properties`](crate::SubscriptionBuilder::live_properties)
//! reads these properties from a [`LiveProperties`] whenever it uses them, so a change
//! takes effect without a restart:
//!
//! | property (short or Decaton name) | takes effect |
//! |---|---|
//! | `processing_rate_per_partition`, `decaton.processing.rate.per.partition` | at the partition's next dispatch |
//! | `retry_processing_rate_per_partition` | at the retry partition's next dispatch |
//! | `per_key_quota_processing_rate`, `decaton.per.key.quota.processing.rate` | at the partition's next dispatch |
//! | `max_pending`, `decaton.max.pending.records` | at the partition's next flow-control round |
//! | `ignore_keys`, `decaton.ignore.keys` | for the next record fetched |
//! | `partition_concurrency`, `decaton.partition.concurrency` | bounded mode: each partition stops dispatching, waits until its lanes are empty and its deferred tasks (those held in a `Batching` or `Compaction` window among them) have completed, then runs on the new number of lanes (per-lane stage instances are made anew); per-key order holds throughout |
//! | `deferred_complete_timeout`, `decaton.deferred.complete.timeout.ms` | for tasks deferred from then on |
//!
//! Every change is logged with its old and new value; a value that does not parse, or a
//! property that cannot change while running, is rejected with a log line and the previous
//! value stays: a bad edit never stops processing. Values come from the program
//! ([`LiveProperties::set`]) or from a [`PropertySupplier`] such as [`FileProperties`].
//! A property whose line is removed from the file returns to the value the subscription
//! was configured with ([`LiveProperties::reset`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;

use crate::config::{ProcessorProperties, PropertyError};

/// The properties [`LiveProperties`] accepts changes of, by their short names.
const RELOADABLE: [&str; 7] = [
    "processing_rate_per_partition",
    "retry_processing_rate_per_partition",
    "partition_concurrency",
    "per_key_quota_processing_rate",
    "max_pending",
    "ignore_keys",
    "deferred_complete_timeout",
];

/// The short name of a property given by either name, if it is reloadable.
fn reloadable(name: &str) -> Option<&'static str> {
    let short = match name {
        "decaton.processing.rate.per.partition" => "processing_rate_per_partition",
        "decaton.per.key.quota.processing.rate" => "per_key_quota_processing_rate",
        "decaton.max.pending.records" => "max_pending",
        "decaton.partition.concurrency" => "partition_concurrency",
        "decaton.ignore.keys" => "ignore_keys",
        "decaton.deferred.complete.timeout.ms" | "deferred_complete_timeout_ms" => {
            "deferred_complete_timeout"
        }
        other => other,
    };
    RELOADABLE.iter().copied().find(|r| *r == short)
}

struct Inner {
    /// The values the properties were configured with: a property no longer supplied
    /// returns to its value here.
    initial: Arc<ProcessorProperties>,
    current: RwLock<Arc<ProcessorProperties>>,
    version: AtomicU64,
    /// `deferred_complete_timeout` in ms (-1: none), read once per deferred task.
    deferred_ms: AtomicI64,
    /// The processing rate is 0: tasks of the source topic hold at their start.
    stopped: AtomicBool,
    /// The retry topic's processing rate is 0: its tasks hold at their start.
    retry_stopped: AtomicBool,
    resumed: tokio::sync::Notify,
}

fn deferred_ms(p: &ProcessorProperties) -> i64 {
    p.deferred_complete_timeout
        .map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A subscription's properties that may change while it runs. Cheap to clone; all clones
/// share the values.
///
/// ```
/// use decaton_processor::{LiveProperties, ProcessorProperties};
///
/// let live = LiveProperties::new(ProcessorProperties::default());
/// live.set("decaton.processing.rate.per.partition", "200").unwrap();
/// assert_eq!(live.get().processing_rate_per_partition, 200);
/// // Not reloadable: rejected, the running value stays.
/// assert!(live.set("mode", "per_key").is_err());
/// // A bad value is rejected too.
/// assert!(live.set("decaton.partition.concurrency", "0").is_err());
/// assert_eq!(live.get().partition_concurrency, 1);
/// ```
#[derive(Clone)]
pub struct LiveProperties {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LiveProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveProperties")
            .field("current", &self.get())
            .finish()
    }
}

impl LiveProperties {
    /// Starts from `initial` (which also sets what cannot change while running).
    pub fn new(initial: ProcessorProperties) -> Self {
        LiveProperties {
            inner: Arc::new(Inner {
                deferred_ms: AtomicI64::new(deferred_ms(&initial)),
                stopped: AtomicBool::new(initial.processing_rate_per_partition == 0),
                retry_stopped: AtomicBool::new(initial.retry_processing_rate_per_partition == 0),
                resumed: tokio::sync::Notify::new(),
                initial: Arc::new(initial.clone()),
                current: RwLock::new(Arc::new(initial)),
                version: AtomicU64::new(0),
            }),
        }
    }

    /// The current values.
    pub fn get(&self) -> Arc<ProcessorProperties> {
        self.inner.current.read().clone()
    }

    /// Changes one reloadable property (by its short or Decaton name). A value that does
    /// not parse or is not allowed, or a property that cannot change while running, is
    /// rejected (and logged) and the current value stays.
    pub fn set(&self, name: &str, value: &str) -> Result<(), PropertyError> {
        let result = self.try_set(name, value);
        if let Err(e) = &result {
            tracing::warn!(property = name, value, "property change rejected: {e}");
        }
        result
    }

    fn try_set(&self, name: &str, value: &str) -> Result<(), PropertyError> {
        let Some(short) = reloadable(name) else {
            let mut probe = ProcessorProperties::default();
            return Err(match probe.set(name, value) {
                Err(PropertyError::Unknown(n)) => PropertyError::Unknown(n),
                _ => PropertyError::NotReloadable(name.to_string()),
            });
        };
        self.change(short, |next| next.set(name, value).map(|_| ()))
    }

    /// Returns one reloadable property (by its short or Decaton name) to the value it was
    /// configured with, the one this `LiveProperties` was created with. A
    /// [`FileProperties`] does this when the property's line is removed from the file.
    /// A property that cannot change while running is rejected (and logged).
    ///
    /// ```
    /// use decaton_processor::{LiveProperties, ProcessorProperties};
    ///
    /// let live = LiveProperties::new(ProcessorProperties { max_pending: 50, ..Default::default() });
    /// live.set("decaton.max.pending.records", "10").unwrap();
    /// live.reset("decaton.max.pending.records").unwrap();
    /// assert_eq!(live.get().max_pending, 50);
    /// ```
    pub fn reset(&self, name: &str) -> Result<(), PropertyError> {
        let result = match reloadable(name) {
            Some(short) => {
                let initial = self.inner.initial.clone();
                self.change(short, |next| {
                    copy_property(&initial, next, short);
                    Ok(())
                })
            }
            None => Err(PropertyError::NotReloadable(name.to_string())),
        };
        if let Err(e) = &result {
            tracing::warn!(property = name, "property reset rejected: {e}");
        }
        result
    }

    /// Applies `edit` to a copy of the current values and, if they are valid and differ,
    /// makes them current (`short` names the property changed, for the log).
    fn change(
        &self,
        short: &str,
        edit: impl FnOnce(&mut ProcessorProperties) -> Result<(), PropertyError>,
    ) -> Result<(), PropertyError> {
        let mut current = self.inner.current.write();
        let mut next = (**current).clone();
        edit(&mut next)?;
        next.validate()?;
        if next == **current {
            return Ok(());
        }
        let before = describe(&current, short);
        let after = describe(&next, short);
        self.inner
            .deferred_ms
            .store(deferred_ms(&next), Ordering::Release);
        let stopped = next.processing_rate_per_partition == 0;
        self.inner.stopped.store(stopped, Ordering::Release);
        let retry_stopped = next.retry_processing_rate_per_partition == 0;
        self.inner
            .retry_stopped
            .store(retry_stopped, Ordering::Release);
        *current = Arc::new(next);
        self.inner.version.fetch_add(1, Ordering::AcqRel);
        drop(current);
        if !stopped || !retry_stopped {
            self.inner.resumed.notify_waiters();
        }
        tracing::info!(property = short, from = %before, to = %after, "property changed");
        Ok(())
    }

    /// Applies several values (as a supplier read them), each on its own: the bad ones are
    /// rejected and logged, the rest applied. Returns the rejections.
    pub fn apply<'a>(
        &self,
        values: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<PropertyError> {
        values
            .into_iter()
            .filter_map(|(k, v)| self.set(k, v).err())
            .collect()
    }

    /// Bumped on every change; readers cache what they derive from the values and
    /// refresh it when this moves.
    pub(crate) fn version(&self) -> u64 {
        self.inner.version.load(Ordering::Acquire)
    }

    /// The current `deferred_complete_timeout`, without a lock.
    pub(crate) fn deferred_timeout(&self) -> Option<Duration> {
        u64::try_from(self.inner.deferred_ms.load(Ordering::Acquire))
            .ok()
            .map(Duration::from_millis)
    }

    /// Whether the processing rate of the source topic's partitions is 0.
    pub(crate) fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    /// Whether the processing rate of the retry topic's partitions is 0.
    pub(crate) fn is_retry_stopped(&self) -> bool {
        self.inner.retry_stopped.load(Ordering::Acquire)
    }

    /// Completes when a processing rate changes away from 0 (or may complete
    /// spuriously; callers check again).
    pub(crate) async fn resumed(&self) {
        self.inner.resumed.notified().await
    }

    fn downgrade(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }
}

/// Copies the reloadable property `short` from `from` into `to`.
fn copy_property(from: &ProcessorProperties, to: &mut ProcessorProperties, short: &str) {
    match short {
        "processing_rate_per_partition" => {
            to.processing_rate_per_partition = from.processing_rate_per_partition
        }
        "retry_processing_rate_per_partition" => {
            to.retry_processing_rate_per_partition = from.retry_processing_rate_per_partition
        }
        "per_key_quota_processing_rate" => {
            to.per_key_quota_processing_rate = from.per_key_quota_processing_rate
        }
        "max_pending" => to.max_pending = from.max_pending,
        "partition_concurrency" => to.partition_concurrency = from.partition_concurrency,
        "ignore_keys" => to.ignore_keys = from.ignore_keys.clone(),
        "deferred_complete_timeout" => {
            to.deferred_complete_timeout = from.deferred_complete_timeout
        }
        _ => {}
    }
}

/// One property's value as text, for the change log.
fn describe(p: &ProcessorProperties, short: &str) -> String {
    match short {
        "processing_rate_per_partition" => p.processing_rate_per_partition.to_string(),
        "retry_processing_rate_per_partition" => p.retry_processing_rate_per_partition.to_string(),
        "per_key_quota_processing_rate" => p.per_key_quota_processing_rate.to_string(),
        "max_pending" => p.max_pending.to_string(),
        "partition_concurrency" => p.partition_concurrency.to_string(),
        "ignore_keys" => format!("{:?}", p.ignore_keys),
        "deferred_complete_timeout" => format!("{:?}", p.deferred_complete_timeout),
        _ => String::new(),
    }
}

/// A source of property values that may change while a subscription runs.
pub trait PropertySupplier: Send + 'static {
    /// Supplies the current values into `live` now, and later changes as they happen for
    /// as long as any clone of `live` exists. An error here (the source cannot be read at
    /// all) stops the subscription from starting; later problems are logged and keep the
    /// previous values.
    fn start(self: Box<Self>, live: LiveProperties) -> Result<(), PropertyError>;
}

/// Properties from a TOML file of `name = value` pairs (short or Decaton names; numbers,
/// strings and arrays of strings for `ignore_keys`), reloaded when the file changes.
///
/// ```toml
/// "decaton.processing.rate.per.partition" = 200
/// "decaton.ignore.keys" = ["spammer-1", "spammer-2"]
/// ```
///
/// The file is watched (by `notify`, the platform's file-change events) and also
/// re-read every `poll` interval (default 1 s), so a change lands even where events are
/// not delivered (some network and container filesystems).
#[derive(Debug, Clone)]
pub struct FileProperties {
    path: PathBuf,
    poll: Duration,
}

impl FileProperties {
    /// Watches the file at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileProperties {
            path: path.as_ref().to_path_buf(),
            poll: Duration::from_secs(1),
        }
    }

    /// How often the file is re-read even without a change event (default 1 s).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }

    /// How long a changed file must stay unchanged before its values apply.
    const SETTLE: Duration = Duration::from_millis(50);

    /// Whether the file still reads as `seen` after [`Self::SETTLE`].
    fn settled(path: &Path, seen: &BTreeMap<String, String>) -> bool {
        std::thread::sleep(Self::SETTLE);
        Self::read(path).is_ok_and(|again| &again == seen)
    }

    /// Reads the file into `name -> value` text.
    fn read(path: &Path) -> Result<BTreeMap<String, String>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        table
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Array(items) => items
                        .into_iter()
                        .map(|i| match i {
                            toml::Value::String(s) => Ok(s),
                            other => {
                                Err(format!("{}: {k}: {other} is not a string", path.display()))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .join(","),
                    other => {
                        return Err(format!(
                            "{}: {k}: unsupported value {other}",
                            path.display()
                        ))
                    }
                };
                Ok((k, text))
            })
            .collect()
    }
}

impl PropertySupplier for FileProperties {
    fn start(self: Box<Self>, live: LiveProperties) -> Result<(), PropertyError> {
        let initial = Self::read(&self.path).map_err(PropertyError::Source)?;
        let mut last = initial.clone();
        live.apply(initial.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let weak = live.downgrade();
        drop(live);
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let watched = self.path.clone();
        let watcher = notify::recommended_watcher(move |_event| {
            // A full channel already holds a wakeup: nothing is lost.
            let _ = tx.try_send(());
        });
        let mut watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(file = %watched.display(), "file events unavailable, polling only: {e}");
                None
            }
        };
        if let Some(w) = watcher.as_mut() {
            use notify::Watcher as _;
            // Watch the directory: editors replace files rather than write them in place.
            let dir = watched
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(file = %watched.display(), "cannot watch, polling only: {e}");
            }
        }
        let poll = self.poll;
        std::thread::Builder::new()
            .name("decaton-properties".into())
            .spawn(move || {
                let _watcher = watcher;
                loop {
                    let _ = rx.recv_timeout(poll);
                    let Some(inner) = weak.upgrade() else { return };
                    let live = LiveProperties { inner };
                    match Self::read(&watched) {
                        // A file written in place can be read half-written, and a line
                        // missing from a torn read would reset its property (a stopped
                        // subscription would briefly run). A change applies once a second
                        // read a moment later agrees with it.
                        Ok(now) if now != last && Self::settled(&watched, &now) => {
                            // A property no longer in the file (by either name) returns
                            // to its configured value.
                            let kept: Vec<&str> =
                                now.keys().filter_map(|k| reloadable(k)).collect();
                            let removed: BTreeSet<&str> = last
                                .keys()
                                .filter(|k| !now.contains_key(*k))
                                .filter_map(|k| reloadable(k))
                                .filter(|short| !kept.contains(short))
                                .collect();
                            for short in removed {
                                let _ = live.reset(short);
                            }
                            live.apply(now.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                            last = now;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(
                                "property file unreadable; keeping the current values: {e}"
                            )
                        }
                    }
                }
            })
            .map_err(|e| PropertyError::Source(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_apply_bad_values_keep_the_previous_one() {
        let live = LiveProperties::new(ProcessorProperties::default());
        let v0 = live.version();
        live.set("processing_rate_per_partition", "50").unwrap();
        assert!(live.version() > v0);
        assert!(live.set("processing_rate_per_partition", "fast").is_err());
        assert!(live.set("decaton.max.pending.records", "0").is_err());
        assert!(matches!(
            live.set("no.such.thing", "1"),
            Err(PropertyError::Unknown(_))
        ));
        assert!(matches!(
            live.set("mode", "per_key"),
            Err(PropertyError::NotReloadable(_))
        ));
        let p = live.get();
        assert_eq!(p.processing_rate_per_partition, 50);
        assert_eq!(p.max_pending, 10_000);
        let rejected = live.apply([("decaton.ignore.keys", "a, b"), ("max_pending", "-3")]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(
            live.get().ignore_keys,
            vec!["a".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn a_file_is_read_now_and_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("props.toml");
        std::fs::write(&path, "\"decaton.processing.rate.per.partition\" = 10\n").unwrap();
        let live = LiveProperties::new(ProcessorProperties::default());
        Box::new(FileProperties::new(&path).poll_interval(Duration::from_millis(50)))
            .start(live.clone())
            .unwrap();
        assert_eq!(live.get().processing_rate_per_partition, 10);
        std::fs::write(
            &path,
            "\"decaton.processing.rate.per.partition\" = -1\nignore_keys = [\"x\"]\nmax_pending = \"lots\"\n",
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while live.get().processing_rate_per_partition != -1 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10)); // polling a value another thread sets
        }
        let p = live.get();
        assert_eq!(p.processing_rate_per_partition, -1);
        assert_eq!(p.ignore_keys, vec!["x".to_string()]);
        assert_eq!(p.max_pending, 10_000, "the bad value is rejected");
    }

    /// Polls `done` (set by the file's reader thread) until it holds or 5 s pass.
    fn until(done: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10)); // polling a value another thread sets
        }
        done()
    }

    /// A line removed from the file returns its property to the configured value (not
    /// the file's last one); a property still in the file under its other name keeps the
    /// file's value.
    #[test]
    fn a_removed_line_reverts_to_the_configured_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("props.toml");
        std::fs::write(
            &path,
            "\"decaton.processing.rate.per.partition\" = 0\nmax_pending = 7\n\
             \"decaton.partition.concurrency\" = 4\nignore_keys = [\"x\"]\n",
        )
        .unwrap();
        let live = LiveProperties::new(ProcessorProperties {
            processing_rate_per_partition: 50,
            max_pending: 100,
            ..Default::default()
        });
        Box::new(FileProperties::new(&path).poll_interval(Duration::from_millis(20)))
            .start(live.clone())
            .unwrap();
        assert_eq!(live.get().processing_rate_per_partition, 0);
        assert!(live.is_stopped());
        assert_eq!(live.get().max_pending, 7);
        // The rate and ignore_keys lines go; concurrency moves to its short name.
        std::fs::write(&path, "max_pending = 7\npartition_concurrency = 4\n").unwrap();
        assert!(
            until(|| live.get().processing_rate_per_partition == 50),
            "the rate stayed {}",
            live.get().processing_rate_per_partition
        );
        assert!(!live.is_stopped(), "no longer stopped");
        let p = live.get();
        assert!(p.ignore_keys.is_empty());
        assert_eq!((p.max_pending, p.partition_concurrency), (7, 4));
        // Emptied: everything back to the configured values.
        std::fs::write(&path, "").unwrap();
        assert!(until(|| live.get().max_pending == 100));
        assert_eq!(live.get().partition_concurrency, 1);
    }

    #[test]
    fn reset_returns_to_the_configured_value_and_refuses_fixed_properties() {
        let live = LiveProperties::new(ProcessorProperties {
            retry_processing_rate_per_partition: 9,
            ..Default::default()
        });
        live.set("retry_processing_rate_per_partition", "0")
            .unwrap();
        assert!(live.is_retry_stopped());
        live.reset("retry_processing_rate_per_partition").unwrap();
        assert_eq!(live.get().retry_processing_rate_per_partition, 9);
        assert!(!live.is_retry_stopped());
        assert!(matches!(
            live.reset("mode"),
            Err(PropertyError::NotReloadable(_))
        ));
    }
}
