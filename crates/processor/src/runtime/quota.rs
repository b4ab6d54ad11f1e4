//! The machinery of the per-key quota: counting keys, and keeping a shaped key shaped.
//!
//! **Counting** ([`KeyCounter`], one per source partition, on the consumer thread): a
//! count-min sketch per window, the current one and the previous one, so memory is fixed
//! whatever the number of keys. A key's count is its estimate in the current window plus
//! the previous window's, weighted by how much of the previous window still overlaps the
//! sliding window ending now. A count-min sketch never underestimates, so a key over
//! quota is always seen over quota; a key under quota may be seen over it only through
//! collisions, which the width keeps rare. No well-kept crate offers a windowed sketch of
//! fixed memory (governor's keyed limiter keeps one entry per key seen), and the sketch
//! is a few lines.
//!
//! **Sticky shaping** ([`ShapingState`], one per subscription, shared by the lanes): the
//! number of shaped tasks of each key produced by this instance and not yet processed
//! here. A source task of a key with such tasks goes to the shaping topic too, whatever
//! the quota says, so it runs after them; a key is processed directly again only when
//! none is outstanding. The map holds at most `max_shaped_keys` keys: a key that cannot
//! enter it is not shaped, which keeps its order.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::quota::{QuotaAction, QuotaConfig, QuotaUsage};

/// Rows of the sketch (independent hashes).
const DEPTH: usize = 4;
/// Counters per row: with a few thousand tasks per window and partition, a key is
/// overestimated by more than a few tasks only rarely.
const WIDTH: usize = 4096;

type SketchHasher = BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// Fixed-memory counts of one window.
#[derive(Clone)]
struct Sketch {
    cells: Vec<u32>,
}

impl Sketch {
    fn new() -> Self {
        Sketch {
            cells: vec![0; DEPTH * WIDTH],
        }
    }

    fn clear(&mut self) {
        self.cells.fill(0);
    }

    fn slots(key: &[u8]) -> [usize; DEPTH] {
        let mut out = [0; DEPTH];
        for (row, slot) in out.iter_mut().enumerate() {
            let mut h = SketchHasher::default().build_hasher();
            row.hash(&mut h);
            key.hash(&mut h);
            *slot = row * WIDTH + (h.finish() % WIDTH as u64) as usize;
        }
        out
    }

    #[allow(
        clippy::indexing_slicing,
        reason = "slots come from `slots`: row * WIDTH + (hash % WIDTH) < DEPTH * WIDTH"
    )]
    fn estimate_at(&self, slots: &[usize; DEPTH]) -> u32 {
        slots.iter().map(|&s| self.cells[s]).min().unwrap_or(0)
    }

    /// Adds one (conservative update: only the smallest cells grow) and returns the new
    /// estimate.
    #[allow(
        clippy::indexing_slicing,
        reason = "slots come from `slots`: row * WIDTH + (hash % WIDTH) < DEPTH * WIDTH"
    )]
    fn add(&mut self, slots: &[usize; DEPTH]) -> u32 {
        let next = self.estimate_at(slots).saturating_add(1);
        for &s in slots {
            if self.cells[s] < next {
                self.cells[s] = next;
            }
        }
        next
    }
}

/// Sliding-window counts of keys, in fixed memory.
pub(crate) struct KeyCounter {
    window_ms: i64,
    /// Start of the current window (epoch ms).
    start: i64,
    current: Sketch,
    previous: Sketch,
}

impl KeyCounter {
    pub(crate) fn new(window: Duration) -> Self {
        KeyCounter {
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1),
            start: 0,
            current: Sketch::new(),
            previous: Sketch::new(),
        }
    }

    fn roll(&mut self, now_ms: i64) {
        let elapsed = now_ms.saturating_sub(self.start);
        if elapsed < self.window_ms {
            return;
        }
        if elapsed < 2 * self.window_ms {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
            self.start = self.start.saturating_add(self.window_ms);
        } else {
            self.current.clear();
            self.previous.clear();
            self.start = now_ms - now_ms.rem_euclid(self.window_ms);
        }
    }

    /// Counts one task of `key` at `now_ms`; returns the key's count over the window
    /// ending now, this task included.
    pub(crate) fn add(&mut self, key: &[u8], now_ms: i64) -> u64 {
        self.roll(now_ms);
        let slots = Sketch::slots(key);
        let current = u64::from(self.current.add(&slots));
        current + self.previous_share(&slots, now_ms)
    }

    /// The key's count over the window ending at `now_ms`, without counting anything.
    #[cfg(test)]
    pub(crate) fn count(&mut self, key: &[u8], now_ms: i64) -> u64 {
        self.roll(now_ms);
        let slots = Sketch::slots(key);
        u64::from(self.current.estimate_at(&slots)) + self.previous_share(&slots, now_ms)
    }

    /// The part of the previous window's count that the sliding window still covers.
    fn previous_share(&self, slots: &[usize; DEPTH], now_ms: i64) -> u64 {
        let into = (now_ms - self.start).clamp(0, self.window_ms);
        let previous = u64::from(self.previous.estimate_at(slots));
        // Rounded up: never below the true count of the overlapping part on average.
        let remaining = (self.window_ms - into) as u64;
        (previous * remaining).div_ceil(self.window_ms as u64)
    }
}

/// The quota check of one source partition, on the consumer thread.
pub(crate) struct KeyQuota {
    counter: KeyCounter,
    config: QuotaConfig,
    /// Tasks per second per key; -1 unlimited.
    rate: i64,
}

impl KeyQuota {
    pub(crate) fn new(config: QuotaConfig, rate: i64) -> Self {
        KeyQuota {
            counter: KeyCounter::new(config.window),
            config,
            rate,
        }
    }

    /// Applies a new per-key rate (`per_key_quota_processing_rate`).
    pub(crate) fn set_rate(&mut self, rate: i64) {
        self.rate = rate;
    }

    /// Counts a task of `key` and tells whether it is to be shaped: its key is over quota
    /// and the user's callback says so.
    pub(crate) fn check(&mut self, key: &[u8], partition: i32, now_ms: i64) -> bool {
        let Ok(per_second) = u64::try_from(self.rate) else {
            return false;
        };
        let count = self.counter.add(key, now_ms);
        let window = self.config.window;
        let limit = (per_second as u128 * window.as_millis() / 1000) as u64;
        if count <= limit {
            return false;
        }
        let usage = QuotaUsage {
            key,
            partition,
            count,
            limit,
            window,
        };
        // The callback is the user's and runs on the consumer thread: a panic there must
        // not take the subscription down. Shaping loses nothing, so it is the fallback.
        let decide = &self.config.decide;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decide(&usage))) {
            Ok(action) => action == QuotaAction::Shape,
            Err(_) => {
                tracing::error!(partition, "the quota callback panicked; shaping the task");
                true
            }
        }
    }
}

/// The per-key quota of a running subscription.
pub(crate) struct QuotaRuntime {
    pub(crate) config: QuotaConfig,
    pub(crate) state: Arc<ShapingState>,
}

/// Where a source task of a key goes at its turn in the lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Processed here, now.
    Direct,
    /// Produced to the shaping topic (its outstanding count was raised).
    Shape,
}

struct Entry {
    outstanding: u32,
    /// Source partition the key's tasks come from (also its shaping partition).
    partition: i32,
}

/// Keys with shaped tasks not yet processed by this instance.
pub(crate) struct ShapingState {
    keys: Mutex<HashMap<Arc<[u8]>, Entry>>,
    capacity: usize,
    /// Tells this instance's shaping records from those of earlier runs or other
    /// instances (header [`SHAPED_BY`]): only its own lower an outstanding count.
    incarnation: [u8; 8],
    gauge: metrics::Gauge,
    full: metrics::Counter,
}

/// Header a shaping record carries: the incarnation of the instance that shaped it.
pub(crate) const SHAPED_BY: &str = "decaton-shaped-by";

impl ShapingState {
    pub(crate) fn new(capacity: usize, subscription: &str) -> Self {
        let label = [("subscription", subscription.to_string())];
        // Random per state: std seeds every `RandomState` afresh.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        std::time::SystemTime::now().hash(&mut h);
        subscription.hash(&mut h);
        ShapingState {
            keys: Mutex::new(HashMap::new()),
            capacity,
            incarnation: h.finish().to_be_bytes(),
            gauge: metrics::gauge!(crate::metrics::KEYS_SHAPED, &label),
            full: metrics::counter!(crate::metrics::SHAPING_FULL, &label),
        }
    }

    pub(crate) fn incarnation(&self) -> &[u8] {
        &self.incarnation
    }

    /// The route of a source task of `key` from `partition` at its turn: shaped if the
    /// key has shaped tasks outstanding, or if `over_quota` asks for it and the map has
    /// room; directly otherwise.
    pub(crate) fn route(&self, key: &Arc<[u8]>, partition: i32, over_quota: bool) -> Route {
        let mut keys = self.keys.lock();
        if let Some(e) = keys.get_mut(key) {
            e.outstanding = e.outstanding.saturating_add(1);
            return Route::Shape;
        }
        if !over_quota {
            return Route::Direct;
        }
        if keys.len() >= self.capacity {
            self.full.increment(1);
            return Route::Direct;
        }
        keys.insert(
            key.clone(),
            Entry {
                outstanding: 1,
                partition,
            },
        );
        self.gauge.set(keys.len() as f64);
        Route::Shape
    }

    /// One task of `key` counted by [`Self::route`] is done with: processed from the
    /// shaping topic, or never produced there.
    pub(crate) fn settled(&self, key: &[u8]) {
        let mut keys = self.keys.lock();
        let Some(e) = keys.get_mut(key) else { return };
        e.outstanding = e.outstanding.saturating_sub(1);
        if e.outstanding == 0 {
            keys.remove(key);
            self.gauge.set(keys.len() as f64);
        }
    }

    /// Whether a shaping record carries this instance's incarnation.
    pub(crate) fn is_own(&self, shaped_by: Option<&[u8]>) -> bool {
        shaped_by == Some(&self.incarnation[..])
    }

    /// Forgets the keys of `partition` (its source or shaping partition was released:
    /// their shaped tasks are no longer processed here).
    pub(crate) fn forget_partition(&self, partition: i32) {
        let mut keys = self.keys.lock();
        keys.retain(|_, e| e.partition != partition);
        self.gauge.set(keys.len() as f64);
    }

    /// Keys with shaped tasks outstanding.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.keys.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    proptest! {
        /// Whatever the keys and their times: a key's count is never below its true count
        /// in the window, nor above the number of tasks counted in the last two windows.
        #[test]
        fn counts_never_underestimate(events in proptest::collection::vec((0u16..300, 0i64..50), 1..2000)) {
            let window = 100i64;
            let mut counter = KeyCounter::new(Duration::from_millis(window as u64));
            let mut now = 1_000i64;
            let mut seen: Vec<(u16, i64)> = Vec::new();
            for (key, step) in events {
                now += step;
                let k = key.to_be_bytes();
                let got = counter.add(&k, now);
                seen.push((key, now));
                // Tasks of this key in the current fixed window are a lower bound of the
                // sliding estimate.
                let window_start = now - now.rem_euclid(window);
                let exact_current = seen.iter().filter(|(kk, t)| *kk == key && *t >= window_start).count() as u64;
                prop_assert!(got >= exact_current, "key {key}: {got} < {exact_current}");
                let recent = seen.iter().filter(|(_, t)| *t >= window_start - window).count() as u64;
                prop_assert!(got <= recent, "key {key}: {got} > {recent} counted");
            }
        }
    }

    #[test]
    fn a_key_is_forgotten_after_two_quiet_windows() {
        let mut c = KeyCounter::new(Duration::from_secs(1));
        for _ in 0..50 {
            c.add(b"hot", 10_000);
        }
        assert_eq!(c.count(b"hot", 10_000), 50);
        assert_eq!(c.count(b"cold", 10_000), 0);
        // Half a window later the previous window weighs half.
        assert_eq!(c.count(b"hot", 11_500), 25);
        assert_eq!(c.count(b"hot", 13_000), 0);
    }

    #[test]
    fn few_keys_are_counted_exactly() {
        let mut c = KeyCounter::new(Duration::from_secs(1));
        for i in 0..1000u32 {
            c.add(&(i % 100).to_be_bytes(), 5_000);
        }
        for i in 0..100u32 {
            assert_eq!(c.count(&i.to_be_bytes(), 5_000), 10);
        }
    }

    /// One step of the simulated runtime.
    #[derive(Debug, Clone)]
    enum Step {
        /// The source lane takes the next task of key `k`; `over` is the quota's verdict.
        Source { k: u8, over: bool },
        /// The shaping lane processes the oldest shaped task of key `k`, if any.
        Shaping { k: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..6, any::<bool>()).prop_map(|(k, over)| Step::Source { k, over }),
            (0u8..6).prop_map(|k| Step::Shaping { k }),
        ]
    }

    proptest! {
        /// Source tasks of each key arrive in sequence; the quota's verdicts and the
        /// interleaving of the source and shaping lanes are arbitrary. Every key's tasks
        /// are processed in sequence order, the map never exceeds its capacity, and a key
        /// with nothing outstanding leaves it.
        #[test]
        fn sticky_shaping_keeps_key_order(steps in proptest::collection::vec(step(), 1..400), capacity in 1usize..4) {
            let state = ShapingState::new(capacity, "s");
            let mut next_seq = [0u64; 6];
            let mut shaped: [VecDeque<u64>; 6] = Default::default();
            let mut processed: [Vec<u64>; 6] = Default::default();
            for s in steps {
                match s {
                    Step::Source { k, over } => {
                        let key: Arc<[u8]> = Arc::from(vec![k]);
                        let seq = next_seq[k as usize];
                        next_seq[k as usize] += 1;
                        match state.route(&key, 0, over) {
                            Route::Direct => processed[k as usize].push(seq),
                            Route::Shape => shaped[k as usize].push_back(seq),
                        }
                    }
                    Step::Shaping { k } => {
                        if let Some(seq) = shaped[k as usize].pop_front() {
                            processed[k as usize].push(seq);
                            state.settled(&[k]);
                        }
                    }
                }
                prop_assert!(state.len() <= capacity);
                let outstanding = shaped.iter().filter(|q| !q.is_empty()).count();
                prop_assert_eq!(state.len(), outstanding);
            }
            for k in 0..6 {
                while let Some(seq) = shaped[k].pop_front() {
                    processed[k].push(seq);
                    state.settled(&[k as u8]);
                }
                let want: Vec<u64> = (0..next_seq[k]).collect();
                prop_assert_eq!(&processed[k], &want);
            }
            prop_assert_eq!(state.len(), 0);
        }
    }

    #[test]
    fn records_of_other_incarnations_are_told_apart() {
        let a = ShapingState::new(10, "s");
        let b = ShapingState::new(10, "s");
        assert!(a.is_own(Some(a.incarnation())));
        assert!(!a.is_own(Some(b.incarnation())));
        assert!(!a.is_own(None));
    }

    #[test]
    fn the_callback_sees_keys_over_quota_and_decides() {
        let config = QuotaConfig::new().on_over_quota(|u| {
            assert!(u.count > u.limit);
            if u.key == b"vip" {
                QuotaAction::Process
            } else {
                QuotaAction::Shape
            }
        });
        let mut q = KeyQuota::new(config, -1);
        assert!((0..100).all(|_| !q.check(b"hot", 0, 5_000)));
        q.set_rate(10);
        let shaped = (0..20).filter(|_| q.check(b"hot", 0, 5_000)).count();
        // Nothing is counted while unlimited: the first 10 are within the quota.
        assert_eq!(shaped, 10);
        assert!((0..20).all(|_| !q.check(b"vip", 0, 5_000)));
        assert!((0..10).all(|_| !q.check(b"calm", 0, 5_000)));
        assert!(q.check(b"calm", 0, 5_000));
    }

    #[test]
    fn a_panicking_callback_shapes() {
        let config = QuotaConfig::new().on_over_quota(|_| panic!("bad callback"));
        let mut q = KeyQuota::new(config, 0);
        assert!(q.check(b"k", 0, 1_000));
    }

    #[test]
    fn a_released_partition_forgets_its_keys() {
        let s = ShapingState::new(10, "s");
        assert_eq!(s.route(&Arc::from(&b"a"[..]), 1, true), Route::Shape);
        assert_eq!(s.route(&Arc::from(&b"b"[..]), 2, true), Route::Shape);
        s.forget_partition(1);
        assert_eq!(s.len(), 1);
        assert_eq!(s.route(&Arc::from(&b"a"[..]), 1, false), Route::Direct);
        assert_eq!(s.route(&Arc::from(&b"b"[..]), 2, false), Route::Shape);
    }
}
