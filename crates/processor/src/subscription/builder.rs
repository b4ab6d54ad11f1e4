//! Building a subscription: what it is made of, and the checks made before it starts.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::ProcessorProperties;
use crate::{
    DeadLetterConfig, LiveProperties, PropertySupplier, QuotaConfig, RetryConfig, TaskProcessor,
};

use super::{Failures, HandleInner, Subscription, SubscriptionError, SubscriptionHandle};

/// Builds a [`Subscription`].
pub struct SubscriptionBuilder<T, P> {
    id: String,
    processor: P,
    bootstrap: Option<String>,
    topic: Option<String>,
    properties: ProcessorProperties,
    kafka: BTreeMap<String, String>,
    state: Option<decaton_state::StateConfig>,
    retry: Option<RetryConfig>,
    dead_letter: Option<DeadLetterConfig>,
    quota: Option<QuotaConfig>,
    live: Option<LiveProperties>,
    supplier: Option<Box<dyn PropertySupplier>>,
    _task: std::marker::PhantomData<fn(T)>,
}

impl<T, P> SubscriptionBuilder<T, P>
where
    T: prost::Message + Default + Send + 'static,
    P: TaskProcessor<T>,
{
    /// A builder for subscription `id` running `processor`, with nothing else set.
    pub(super) fn new(id: String, processor: P) -> Self {
        SubscriptionBuilder {
            id,
            processor,
            bootstrap: None,
            topic: None,
            properties: ProcessorProperties::default(),
            kafka: BTreeMap::new(),
            state: None,
            retry: None,
            dead_letter: None,
            quota: None,
            live: None,
            supplier: None,
            _task: std::marker::PhantomData,
        }
    }

    /// The cluster to consume from (`bootstrap.servers`).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap = Some(servers.into());
        self
    }

    /// The topic whose tasks this subscription runs.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Runtime properties (concurrency, backpressure, timeouts).
    pub fn properties(mut self, properties: ProcessorProperties) -> Self {
        self.properties = properties;
        self
    }

    /// Sets a librdkafka consumer property verbatim; it overrides the runtime's defaults
    /// (`enable.auto.commit=false`, `enable.auto.offset.store=false`,
    /// `auto.offset.reset=earliest`). `group.id` is the subscription id and cannot be set.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.insert(key.into(), value.into());
        self
    }

    /// Gives the processor partition-local state ([`ProcessingContext::state`](crate::ProcessingContext::state)),
    /// kept under `config.state_dir` and replicated to the changelog topic
    /// `<subscription>-<store>-changelog`.
    pub fn state_store(mut self, config: decaton_state::StateConfig) -> Self {
        self.state = Some(config);
        self
    }

    /// Reads its properties from `live`, so the reloadable ones (see [`LiveProperties`])
    /// can change while it runs; replaces [`properties`](Self::properties). Keep a clone
    /// to change them.
    pub fn live_properties(mut self, live: LiveProperties) -> Self {
        self.properties = (*live.get()).clone();
        self.live = Some(live);
        self
    }

    /// Takes property changes from `supplier` (for example a [`FileProperties`](crate::FileProperties))
    /// while running; it is started when the subscription starts, over the properties
    /// given so far.
    pub fn property_supplier(mut self, supplier: impl PropertySupplier) -> Self {
        self.supplier = Some(Box::new(supplier));
        self
    }

    /// Retries failed tasks (see [`RetryConfig`]); the retry topic must exist.
    pub fn retry(mut self, config: RetryConfig) -> Self {
        self.retry = Some(config);
        self
    }

    /// Keeps tasks that fail for good in a dead-letter topic (see [`DeadLetterConfig`]);
    /// the topic must exist.
    pub fn dead_letter(mut self, config: DeadLetterConfig) -> Self {
        self.dead_letter = Some(config);
        self
    }

    /// Gives every key a quota (see [`QuotaConfig`]): tasks of a key over it are shaped
    /// to the shaping topic, which must exist with as many partitions as the source
    /// topic. The quota is the property `per_key_quota_processing_rate`.
    pub fn per_key_quota(mut self, config: QuotaConfig) -> Self {
        self.quota = Some(config);
        self
    }

    /// Validates and creates the subscription (nothing is contacted yet).
    pub fn build(mut self) -> Result<Subscription<T, P>, SubscriptionError> {
        let bootstrap = self
            .bootstrap
            .ok_or_else(|| SubscriptionError::Config("bootstrap_servers is required".into()))?;
        let topic = self
            .topic
            .ok_or_else(|| SubscriptionError::Config("topic is required".into()))?;
        if self.id.is_empty() {
            return Err(SubscriptionError::Config(
                "subscription id must not be empty".into(),
            ));
        }
        if self.kafka.contains_key("group.id") {
            return Err(SubscriptionError::Config(
                "group.id is the subscription id; do not set it".into(),
            ));
        }
        // Live properties, when given, are the properties (the last word on them).
        let live = match self.live.take() {
            Some(live) => {
                self.properties = (*live.get()).clone();
                live
            }
            None => LiveProperties::new(self.properties.clone()),
        };
        self.properties
            .validate()
            .map_err(|e| SubscriptionError::Config(e.to_string()))?;
        if self.properties.mode == crate::SchedulingMode::PerKey && self.processor.needs_lanes() {
            return Err(SubscriptionError::Config(
                "a per-lane processor scope needs bounded mode: in per-key mode every key is \
                 a lane of its own"
                    .into(),
            ));
        }
        let retry_topic = self
            .retry
            .as_ref()
            .filter(|r| r.queue)
            .map(|r| r.topic.clone().unwrap_or_else(|| format!("{topic}-retry")));
        if let (Some(r), Some(_)) = (&self.retry, &retry_topic) {
            if self.state.is_some() {
                return Err(SubscriptionError::Config(
                    "a retry topic cannot be combined with a state store: a retried task may be \
                     read by another instance than the one owning its state partition \
                     (use RetryConfig::without_queue for retries in the lane)"
                        .into(),
                ));
            }
            if r.backoff.longest() > self.properties.max_scheduled_delay {
                return Err(SubscriptionError::Config(format!(
                    "the retry backoff can reach {:?}, more than max_scheduled_delay ({:?}): \
                     retried tasks would be discarded",
                    r.backoff.longest(),
                    self.properties.max_scheduled_delay
                )));
            }
        }
        let shaping_topic = self.quota.as_ref().map(|q| {
            q.topic
                .clone()
                .unwrap_or_else(|| format!("{topic}-shaping"))
        });
        if let (Some(q), Some(_)) = (&self.quota, &shaping_topic) {
            if self.state.is_some() {
                return Err(SubscriptionError::Config(
                    "a per-key quota cannot be combined with a state store: a shaped task may \
                     be read by another instance than the one owning its state partition"
                        .into(),
                ));
            }
            if q.window.is_zero() {
                return Err(SubscriptionError::Config(
                    "the quota window must not be zero".into(),
                ));
            }
            if q.shaping_rate < -1 || q.shaping_rate == 0 {
                return Err(SubscriptionError::Config(format!(
                    "shaping_rate {} would never process the shaping topic (-1 or N > 0)",
                    q.shaping_rate
                )));
            }
            if let Some(strategy) = self.kafka.get("partition.assignment.strategy") {
                if !strategy.trim_start().starts_with("range") {
                    tracing::warn!(subscription = %self.id, strategy = %strategy,
                        "with a per-key quota, an assignor other than range may give a key's \
                         source and shaping partitions to different instances: its order then \
                         holds only while neither moves (see docs/shaping.md)");
                }
            }
            if q.max_shaped_keys == 0 {
                return Err(SubscriptionError::Config(
                    "max_shaped_keys must be at least 1".into(),
                ));
            }
        }
        let dead_letter_topic = self
            .dead_letter
            .as_ref()
            .map(|d| d.topic.clone().unwrap_or_else(|| format!("{topic}-dlq")));
        distinct_topics(&[
            ("source", "SubscriptionBuilder::topic", Some(&topic)),
            ("retry", "RetryConfig::topic", retry_topic.as_ref()),
            ("shaping", "QuotaConfig::topic", shaping_topic.as_ref()),
            (
                "dead-letter",
                "DeadLetterConfig::topic",
                dead_letter_topic.as_ref(),
            ),
        ])?;
        Ok(Subscription {
            id: self.id,
            processor: Arc::new(self.processor),
            bootstrap,
            topic,
            properties: self.properties,
            kafka: self.kafka,
            state: self.state,
            failures: Failures {
                retry: self.retry,
                retry_topic,
                dead_letter_topic,
                quota: self.quota,
                shaping_topic,
            },
            live,
            supplier: Mutex::new(self.supplier),
            handle: SubscriptionHandle {
                inner: Arc::new(HandleInner::default()),
            },
            _task: std::marker::PhantomData,
        })
    }
}

/// Refuses two roles naming one topic: a task written to the retry, shaping or
/// dead-letter topic would be read back as a task of the other role (or of the source)
/// and go round forever. Each entry is (role, the setting that names it, its topic).
fn distinct_topics(roles: &[(&str, &str, Option<&String>)]) -> Result<(), SubscriptionError> {
    let named: Vec<(&str, &str, &String)> = roles
        .iter()
        .filter_map(|(role, setting, topic)| topic.map(|t| (*role, *setting, t)))
        .collect();
    for (i, (role, setting, topic)) in named.iter().enumerate() {
        if let Some((earlier, earlier_setting, _)) =
            named.iter().take(i).find(|(_, _, t)| t == topic)
        {
            return Err(SubscriptionError::Config(format!(
                "the {role} topic must differ from the {earlier} topic: {setting} and \
                 {earlier_setting} both name {topic:?} (or default to it), so a task would \
                 go round between them forever"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ProcessError, ProcessingContext, Subscription};

    struct Nothing;

    #[async_trait::async_trait]
    impl TaskProcessor<u64> for Nothing {
        async fn process(&self, _: &ProcessingContext, _: u64) -> Result<(), ProcessError> {
            Ok(())
        }
    }

    /// Builds on source topic "src" with the given retry, shaping and dead-letter topics.
    fn build(
        retry: Option<&str>,
        shaping: Option<&str>,
        dead_letter: Option<&str>,
    ) -> Result<(), String> {
        let mut b = Subscription::builder("s", Nothing)
            .bootstrap_servers("127.0.0.1:1")
            .topic("src");
        if let Some(t) = retry {
            b = b.retry(RetryConfig::new().topic(t));
        }
        if let Some(t) = shaping {
            b = b.per_key_quota(QuotaConfig::new().topic(t));
        }
        if let Some(t) = dead_letter {
            b = b.dead_letter(DeadLetterConfig::new().topic(t));
        }
        b.build().map(|_| ()).map_err(|e| e.to_string())
    }

    /// Every pair of the source, retry, shaping and dead-letter topics naming one topic
    /// is refused at build, and the error names both settings.
    #[test]
    fn any_two_roles_on_one_topic_are_refused() {
        let cases = [
            (
                Some("src"),
                None,
                None,
                ["RetryConfig::topic", "SubscriptionBuilder::topic"],
            ),
            (
                None,
                Some("src"),
                None,
                ["QuotaConfig::topic", "SubscriptionBuilder::topic"],
            ),
            (
                None,
                None,
                Some("src"),
                ["DeadLetterConfig::topic", "SubscriptionBuilder::topic"],
            ),
            (
                Some("x"),
                Some("x"),
                None,
                ["QuotaConfig::topic", "RetryConfig::topic"],
            ),
            (
                Some("x"),
                None,
                Some("x"),
                ["DeadLetterConfig::topic", "RetryConfig::topic"],
            ),
            (
                None,
                Some("x"),
                Some("x"),
                ["DeadLetterConfig::topic", "QuotaConfig::topic"],
            ),
        ];
        for (retry, shaping, dead_letter, settings) in cases {
            let err = build(retry, shaping, dead_letter).expect_err("must be refused");
            for s in settings {
                assert!(
                    err.contains(s),
                    "{retry:?} {shaping:?} {dead_letter:?}: {err}"
                );
            }
            assert!(err.contains("must differ"), "{err}");
        }
        // Distinct topics build.
        assert_eq!(build(Some("r"), Some("sh"), Some("d")), Ok(()));
        assert_eq!(build(None, None, None), Ok(()));
        // Without a retry queue there is no retry topic to clash with; with one, its
        // default name counts.
        assert_eq!(build(None, None, Some("src-retry")), Ok(()));
        let err = Subscription::builder("s", Nothing)
            .bootstrap_servers("127.0.0.1:1")
            .topic("src")
            .retry(RetryConfig::new())
            .dead_letter(DeadLetterConfig::new().topic("src-retry"))
            .build()
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(err.is_err_and(|e| e.contains("dead-letter topic must differ from the retry")));
    }
}
