//! Tasks waiting for their scheduled time, outside the lanes.
//!
//! A task whose `scheduled_time_millis` lies in the future (a retry, a scheduled put)
//! waits here instead of in a lane, so the lane keeps running other keys' tasks. Per-key
//! order still holds: while a key has a task waiting, its later tasks wait behind it
//! (even those due already), and they leave in offset order. A task without a key has no
//! order to keep and waits alone.
//!
//! The queue lives on the consumer thread, which releases due tasks between polls and
//! polls no longer than until the next one is due. A released task still takes a token
//! of the partition's rate before it goes to a lane. Waiting tasks are registered but not
//! running: revocation and shutdown do not wait for them, they are simply not committed,
//! and the next owner of the partition receives them again.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use super::task::TaskUnit;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum WaitKey {
    Keyed(Arc<[u8]>),
    Unkeyed(u64),
}

/// Delayed tasks of one partition, grouped by key.
pub(crate) struct DelayQueue<T> {
    parked: HashMap<WaitKey, VecDeque<TaskUnit<T>>>,
    /// (due time, key) of the first task of each parked key.
    timers: BinaryHeap<Reverse<(i64, WaitKey)>>,
    waiting: usize,
    next_unkeyed: u64,
}

impl<T> Default for DelayQueue<T> {
    fn default() -> Self {
        DelayQueue {
            parked: HashMap::new(),
            timers: BinaryHeap::new(),
            waiting: 0,
            next_unkeyed: 0,
        }
    }
}

fn due(unit: &TaskUnit<impl Sized>) -> i64 {
    unit.metadata.scheduled_time_millis
}

impl<T> DelayQueue<T> {
    /// Tasks waiting.
    pub(crate) fn len(&self) -> usize {
        self.waiting
    }

    /// Takes a task; gives it back when it may run now (not delayed, and no earlier task
    /// of its key waits).
    pub(crate) fn offer(&mut self, unit: TaskUnit<T>, now_ms: i64) -> Option<TaskUnit<T>> {
        let key = match unit.key.as_ref() {
            Some(k) => WaitKey::Keyed(k.clone()),
            None => {
                if due(&unit) <= now_ms {
                    return Some(unit);
                }
                self.next_unkeyed += 1;
                WaitKey::Unkeyed(self.next_unkeyed)
            }
        };
        if let Some(queue) = self.parked.get_mut(&key) {
            queue.push_back(unit);
            self.waiting += 1;
            return None;
        }
        if due(&unit) <= now_ms {
            return Some(unit);
        }
        self.timers.push(Reverse((due(&unit), key.clone())));
        self.parked.insert(key, VecDeque::from([unit]));
        self.waiting += 1;
        None
    }

    /// Removes the tasks that may run at `now_ms`, in the order they must start.
    pub(crate) fn release_due(&mut self, now_ms: i64) -> Vec<TaskUnit<T>> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now_ms {
                break;
            }
            let Some(Reverse((_, key))) = self.timers.pop() else {
                break;
            };
            let Some(queue) = self.parked.get_mut(&key) else {
                continue;
            };
            while let Some(front) = queue.front() {
                if due(front) > now_ms {
                    self.timers.push(Reverse((due(front), key.clone())));
                    break;
                }
                if let Some(unit) = queue.pop_front() {
                    out.push(unit);
                }
            }
            if queue.is_empty() {
                self.parked.remove(&key);
            }
        }
        self.waiting -= out.len();
        out
    }

    /// When the earliest waiting task is due.
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::super::task::tests::unit;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_waiting_key_holds_its_later_tasks_only() {
        let mut q = DelayQueue::default();
        assert!(q.offer(unit(0, Some(b"a"), 100), 0).is_none());
        // b is not delayed: runs at once.
        assert!(q.offer(unit(1, Some(b"b"), 0), 0).is_some());
        // a's next task is not delayed but waits behind a's first.
        assert!(q.offer(unit(2, Some(b"a"), 0), 0).is_none());
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_due(), Some(100));
        assert!(q.release_due(99).is_empty());
        let out: Vec<i64> = q.release_due(100).iter().map(|u| u.offset).collect();
        assert_eq!(out, vec![0, 2]);
        assert_eq!(q.len(), 0);
        assert_eq!(q.next_due(), None);
    }

    proptest! {
        /// Whatever the schedule: every task leaves exactly once, never before it is due,
        /// and one key's tasks leave in offset order.
        #[test]
        fn releases_in_key_order_never_early(tasks in proptest::collection::vec((proptest::option::of(0u8..4), 0i64..50), 1..100),
                                            steps in proptest::collection::vec(1i64..20, 1..20)) {
            let mut q = DelayQueue::default();
            let mut out: Vec<(i64, i64)> = Vec::new();
            let mut now = 0;
            for (offset, (key, due)) in tasks.iter().enumerate() {
                let k = key.map(|k| vec![k]);
                if let Some(u) = q.offer(unit(offset as i64, k.as_deref(), *due), now) {
                    out.push((u.offset, now));
                }
            }
            for step in steps.iter().chain(std::iter::once(&1000)) {
                now += step;
                for u in q.release_due(now) {
                    prop_assert!(u.metadata.scheduled_time_millis <= now);
                    out.push((u.offset, now));
                }
            }
            prop_assert_eq!(out.len(), tasks.len());
            prop_assert_eq!(q.len(), 0);
            for k in 0u8..4 {
                let order: Vec<i64> = out.iter().map(|(o, _)| *o).filter(|o| tasks[*o as usize].0 == Some(k)).collect();
                let mut sorted = order.clone();
                sorted.sort();
                prop_assert_eq!(order, sorted);
            }
        }
    }
}
