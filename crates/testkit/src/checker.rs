//! The order and loss checker.
//!
//! Every processor under test appends one [`Processed`] entry per task it runs: the key,
//! the task's per-key sequence number (assigned by the producer, from 0), and the
//! instance that ran it (a unique id per process run). [`check`] then verifies, against
//! the number of tasks produced per key:
//!
//! * **completeness**: every (key, sequence) was processed at least once;
//! * **per-key order**: within one instance, a key's tasks start in sequence order. An
//!   instance may *replay* (see a sequence again, after a partition moved back to it) and
//!   may *skip ahead* over sequences that another instance already processed (the
//!   partition came from there); it may never skip over a sequence nobody else ran;
//! * **duplicates**: how many entries re-ran an already processed task.
//!
//! Entries of one instance must be in that instance's processing order; entries of
//! different instances may be interleaved arbitrarily.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::Path;

/// One processed task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Processed {
    /// The task's key (user id).
    pub key: String,
    /// Per-key sequence number given by the producer, from 0.
    pub sequence: u64,
    /// Which process run handled it.
    pub instance: String,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Tasks expected (sum over keys).
    pub expected: u64,
    /// Entries in the logs.
    pub processed: u64,
    /// Distinct (key, sequence) processed.
    pub distinct: u64,
    /// Entries that re-ran a task already processed.
    pub duplicates: u64,
    /// (key, sequence) never processed; at most 20 listed, `lost_count` has the total.
    pub lost: Vec<(String, u64)>,
    /// Number of tasks never processed.
    pub lost_count: u64,
    /// Human-readable order violations; at most 20 listed.
    pub order_violations: Vec<String>,
    /// Number of order violations.
    pub order_violation_count: u64,
    /// Entries for keys or sequences that were never produced.
    pub unexpected: u64,
}

impl CheckReport {
    /// True when nothing was lost, nothing ran out of order and nothing unexpected ran.
    pub fn ok(&self) -> bool {
        self.lost_count == 0 && self.order_violation_count == 0 && self.unexpected == 0
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expected {} processed {} distinct {} duplicates {} lost {} order-violations {} unexpected {}",
            self.expected,
            self.processed,
            self.distinct,
            self.duplicates,
            self.lost_count,
            self.order_violation_count,
            self.unexpected
        )?;
        if !self.lost.is_empty() {
            write!(f, "; first lost: {:?}", self.lost)?;
        }
        if !self.order_violations.is_empty() {
            write!(f, "; first violations: {:?}", self.order_violations)?;
        }
        Ok(())
    }
}

/// Checks `entries` against `expected`: key -> number of tasks produced for it
/// (sequences `0..n`).
pub fn check(expected: &HashMap<String, u64>, entries: &[Processed]) -> CheckReport {
    let mut report = CheckReport {
        expected: expected.values().sum(),
        processed: entries.len() as u64,
        ..Default::default()
    };
    // Which instances processed each (key, sequence).
    let mut ran_by: HashMap<(&str, u64), HashSet<&str>> = HashMap::new();
    for e in entries {
        match expected.get(&e.key) {
            Some(&n) if e.sequence < n => {}
            _ => {
                report.unexpected += 1;
                continue;
            }
        }
        ran_by
            .entry((e.key.as_str(), e.sequence))
            .or_default()
            .insert(e.instance.as_str());
    }
    report.distinct = ran_by.len() as u64;
    report.duplicates = report.processed - report.unexpected - report.distinct;

    for (key, &n) in expected {
        for seq in 0..n {
            if !ran_by.contains_key(&(key.as_str(), seq)) {
                report.lost_count += 1;
                if report.lost.len() < 20 {
                    report.lost.push((key.clone(), seq));
                }
            }
        }
    }
    report.lost.sort();

    // Order: per (instance, key), the highest sequence seen so far.
    let mut high: HashMap<(&str, &str), u64> = HashMap::new();
    for e in entries {
        if expected.get(&e.key).is_none_or(|&n| e.sequence >= n) {
            continue;
        }
        let slot = high.entry((e.instance.as_str(), e.key.as_str()));
        match slot {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(e.sequence);
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let hi = *o.get();
                if e.sequence > hi + 1 {
                    // Skipping ahead is fine only over tasks another instance ran.
                    let skipped_unrun = (hi + 1..e.sequence).find(|s| {
                        ran_by
                            .get(&(e.key.as_str(), *s))
                            .is_none_or(|by| by.iter().all(|i| *i == e.instance))
                    });
                    if let Some(s) = skipped_unrun {
                        report.order_violation_count += 1;
                        if report.order_violations.len() < 20 {
                            report.order_violations.push(format!(
                                "instance {} key {}: ran sequence {} after {} without {} having run elsewhere",
                                e.instance, e.key, e.sequence, hi, s
                            ));
                        }
                    }
                }
                if e.sequence > hi {
                    o.insert(e.sequence);
                }
            }
        }
    }
    report
}

/// Appends entries as JSON lines to `path` (one file per instance is the usual layout).
pub fn append_jsonl(path: &Path, entries: &[Processed]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut w = std::io::BufWriter::new(f);
    for e in entries {
        serde_json::to_writer(&mut w, e)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// Reads every `*.jsonl` file in `dir`, each file's entries in file order. A torn last
/// line (the writer was killed mid-write) is ignored.
pub fn read_jsonl_dir(dir: &Path) -> std::io::Result<Vec<Processed>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let r = std::io::BufReader::new(std::fs::File::open(&f)?);
        for line in r.lines() {
            let line = line?;
            if let Ok(p) = serde_json::from_str::<Processed>(&line) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(key: &str, sequence: u64, instance: &str) -> Processed {
        Processed {
            key: key.into(),
            sequence,
            instance: instance.into(),
        }
    }

    fn expected(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn clean_run_is_ok() {
        let e = expected(&[("a", 3), ("b", 2)]);
        let log = vec![
            p("a", 0, "i"),
            p("b", 0, "i"),
            p("a", 1, "i"),
            p("b", 1, "i"),
            p("a", 2, "i"),
        ];
        let r = check(&e, &log);
        assert!(r.ok(), "{r}");
        assert_eq!(r.duplicates, 0);
    }

    #[test]
    fn loss_is_found() {
        let e = expected(&[("a", 3)]);
        let r = check(&e, &[p("a", 0, "i"), p("a", 1, "i")]);
        assert!(!r.ok());
        assert_eq!(r.lost, vec![("a".to_string(), 2)]);
    }

    #[test]
    fn reorder_within_an_instance_is_a_violation() {
        let e = expected(&[("a", 3)]);
        let r = check(&e, &[p("a", 0, "i"), p("a", 2, "i"), p("a", 1, "i")]);
        assert_eq!(r.order_violation_count, 1, "{r}");
    }

    #[test]
    fn handover_and_replay_are_fine_and_counted() {
        let e = expected(&[("a", 5)]);
        // i ran 0..=2, died before committing 2; j replays 2 and goes on. Then the
        // partition comes back to i, which skips 3 (j ran it) and runs 4.
        let log = vec![
            p("a", 0, "i"),
            p("a", 1, "i"),
            p("a", 2, "i"),
            p("a", 2, "j"),
            p("a", 3, "j"),
            p("a", 4, "i"),
        ];
        let r = check(&e, &log);
        assert!(r.ok(), "{r}");
        assert_eq!(r.duplicates, 1);
    }

    #[test]
    fn unexpected_entries_are_counted() {
        let e = expected(&[("a", 1)]);
        let r = check(&e, &[p("a", 0, "i"), p("a", 7, "i"), p("zz", 0, "i")]);
        assert_eq!(r.unexpected, 2);
        assert!(!r.ok());
    }

    #[test]
    fn jsonl_round_trip_ignores_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.jsonl");
        append_jsonl(&f, &[p("a", 0, "i"), p("a", 1, "i")]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .unwrap()
            .write_all(b"{\"key\":\"a\",\"seq")
            .unwrap();
        assert_eq!(read_jsonl_dir(dir.path()).unwrap().len(), 2);
    }
}
