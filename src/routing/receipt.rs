//! Which downlink records are handled, so that the consumer stores an
//! offset only past records that were written to a device's socket, held
//! on disk or counted (PROTOCOL 6.3): a crash then redelivers, rather than
//! skips, a record that was still in a mailbox or waiting for the hold's
//! sync.
//!
//! Each record gets a [`Receipt`]; dropping it marks the record handled.
//! It travels with the record: into a mailbox and out of it once written,
//! into the hold until its sync, or nowhere (counted, dropped at once). A
//! partition's safe offset is its oldest record still unhandled, or one past
//! the newest seen.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
pub struct Receipts {
    partitions: Mutex<HashMap<(Arc<str>, i32), Partition>>,
}

#[derive(Default)]
struct Partition {
    /// Bumped on each assignment: receipts of an earlier one are ignored.
    generation: u64,
    pending: BTreeSet<i64>,
    /// One past the newest offset issued.
    next: i64,
    /// The offset last reported by [`Receipts::safe_offsets`].
    reported: i64,
}

/// Proof that a record is not handled yet; dropping it says it is.
#[must_use]
pub struct Receipt {
    of: Option<Issued>,
}

/// Whose record a receipt is for.
struct Issued {
    receipts: Arc<Receipts>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    generation: u64,
}

impl Receipt {
    /// A receipt that tracks nothing (tests, records not from Kafka).
    pub fn untracked() -> Receipt {
        Receipt { of: None }
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.of {
            Some(i) => write!(f, "{}/{}@{}", i.topic, i.partition, i.offset),
            None => f.write_str("untracked"),
        }
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        if let Some(i) = self.of.take() {
            let mut parts = i.receipts.lock();
            if let Some(p) = parts.get_mut(&(i.topic, i.partition)) {
                if p.generation == i.generation {
                    p.pending.remove(&i.offset);
                }
            }
        }
    }
}

impl Receipts {
    fn lock(&self) -> MutexGuard<'_, HashMap<(Arc<str>, i32), Partition>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receipt for a record just read; records of a partition are issued
    /// in offset order.
    pub fn issue(self: &Arc<Self>, topic: &str, partition: i32, offset: i64) -> Receipt {
        let mut parts = self.lock();
        let key = match parts.get_key_value(&(Arc::from(topic), partition)) {
            Some((k, _)) => k.clone(),
            None => (Arc::from(topic), partition),
        };
        let p = parts.entry(key.clone()).or_default();
        if p.pending.is_empty() && p.next <= offset {
            p.reported = p.reported.max(offset);
        }
        p.pending.insert(offset);
        p.next = p.next.max(offset + 1);
        Receipt {
            of: Some(Issued {
                receipts: self.clone(),
                topic: key.0,
                partition,
                offset,
                generation: p.generation,
            }),
        }
    }

    /// A new assignment: what was pending in an earlier one is forgotten
    /// (another consumer, or this one after a restart, reads it again).
    pub fn reset(&self) {
        for p in self.lock().values_mut() {
            p.generation += 1;
            p.pending.clear();
            p.next = 0;
            p.reported = 0;
        }
    }

    /// Partitions whose safe offset moved since the last call: the offset
    /// to store (the next one to read).
    pub fn safe_offsets(&self) -> Vec<(Arc<str>, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), p) in self.lock().iter_mut() {
            let safe = p.pending.first().copied().unwrap_or(p.next);
            if safe > p.reported {
                p.reported = safe;
                out.push((topic.clone(), *partition, safe));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_safe_offset_waits_for_the_oldest_unhandled_record() {
        let r = Arc::new(Receipts::default());
        let a = r.issue("t", 0, 10);
        let b = r.issue("t", 0, 11);
        let c = r.issue("t", 0, 12);
        assert_eq!(r.safe_offsets(), vec![]);
        drop(b);
        drop(c);
        assert_eq!(r.safe_offsets(), vec![]);
        drop(a);
        assert_eq!(r.safe_offsets(), vec![(Arc::from("t"), 0, 13)]);
        assert_eq!(r.safe_offsets(), vec![], "reported once");
        let d = r.issue("t", 0, 13);
        r.reset();
        drop(d); // from before the assignment: ignored
        assert_eq!(r.safe_offsets(), vec![]);
        drop(r.issue("t", 0, 20));
        assert_eq!(r.safe_offsets(), vec![(Arc::from("t"), 0, 21)]);
    }
}
