//! The topics a subscription reads, and how a partition of one of them is named.
//!
//! A subscription reads its source topic and, when it has a retry queue, the retry topic
//! too, and the shaping topic when it has a per-key quota. All are consumed by the same group and treated alike: each partition of either
//! has its own context, offsets and commits. A partition is named by a small copyable
//! [`PartitionId`] (an index into [`Topics`] and the partition number), so the consumer
//! thread's lookups per record never allocate.

use std::sync::Arc;

/// A partition of one of the subscription's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PartitionId {
    /// Index into [`Topics`]: 0 is the source topic, then the retry and shaping topics
    /// when the subscription has them.
    pub(crate) topic: u8,
    pub(crate) partition: i32,
}

/// The topics of one subscription, source first.
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    names: Vec<Arc<str>>,
    shaping: Option<u8>,
}

impl Topics {
    /// The source topic, and the retry topic if the subscription has a retry queue.
    pub(crate) fn new(source: &str, retry: Option<&str>) -> Self {
        let mut names = vec![Arc::from(source)];
        if let Some(r) = retry {
            names.push(Arc::from(r));
        }
        Topics {
            names,
            shaping: None,
        }
    }

    /// Reads `shaping` too, the shaping topic of a per-key quota.
    pub(crate) fn with_shaping(mut self, shaping: Option<&str>) -> Self {
        if let Some(s) = shaping {
            self.shaping = Some(self.names.len() as u8);
            self.names.push(Arc::from(s));
        }
        self
    }

    /// Whether `id` is a partition of the shaping topic.
    pub(crate) fn is_shaping(&self, id: PartitionId) -> bool {
        self.shaping == Some(id.topic)
    }

    /// The id of `partition` of topic `name`, if the subscription reads that topic.
    pub(crate) fn id(&self, name: &str, partition: i32) -> Option<PartitionId> {
        self.names
            .iter()
            .position(|n| &**n == name)
            .map(|i| PartitionId {
                topic: i as u8,
                partition,
            })
    }

    /// The name of the topic `id` belongs to.
    #[allow(
        clippy::indexing_slicing,
        reason = "ids are made by `id` from positions in `names`, which never shrinks"
    )]
    pub(crate) fn name(&self, id: PartitionId) -> &Arc<str> {
        &self.names[usize::from(id.topic)]
    }

    /// The source topic.
    #[allow(
        clippy::indexing_slicing,
        reason = "`names` is made with the source first and never shrinks"
    )]
    pub(crate) fn source(&self) -> &Arc<str> {
        &self.names[0]
    }

    /// Every topic, source first.
    pub(crate) fn all(&self) -> &[Arc<str>] {
        &self.names
    }

    /// The ids of the elements of `tpl` that belong to these topics.
    pub(crate) fn ids_in(&self, tpl: &rdkafka::TopicPartitionList) -> Vec<PartitionId> {
        tpl.elements()
            .iter()
            .filter_map(|e| self.id(e.topic(), e.partition()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_topic() {
        let t = Topics::new("ops", Some("ops-retry"));
        let a = t.id("ops", 3).unwrap();
        let b = t.id("ops-retry", 3).unwrap();
        assert_ne!(a, b);
        assert_eq!(&**t.name(a), "ops");
        assert_eq!(&**t.name(b), "ops-retry");
        assert!(t.id("other", 3).is_none());
        assert!(Topics::new("ops", None).id("ops-retry", 0).is_none());
        let t = Topics::new("ops", None).with_shaping(Some("ops-shaping"));
        let s = t.id("ops-shaping", 1).unwrap();
        assert!(t.is_shaping(s));
        assert!(!t.is_shaping(t.id("ops", 1).unwrap()));
    }
}
