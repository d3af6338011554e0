//! Records that are not on disk yet: handed to the producer at once, and
//! written to the store only if Kafka has not confirmed them within
//! `outbox.spill_after_ms` (or memory for them runs out). A group of appends
//! is acknowledged once each of its records is confirmed or on disk,
//! whichever comes first for each.
//!
//! A record is here from the moment the writer gives it a seq until Kafka
//! confirmed it or it is on disk. Its phases: `Waiting` (in memory only),
//! `Writing` (the writer is putting it on disk; it may still be confirmed
//! meanwhile). Seqs are given in arrival order and records are spilled
//! oldest first, so every seq below the first one here is on disk or was
//! confirmed: that is what `committed` says to the reader.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use smol::channel::Sender;

use super::AppendError;

/// Memory for records not on disk yet; past it every waiting record is
/// spilled at once (counted in `edgegate_outbox_memory_full_total`). At
/// 200-byte requests that is about 40,000 requests, 0.2 s at full speed,
/// four times what 50 ms of spill delay holds.
pub const MEMORY_LIMIT: usize = 16 << 20;

/// Where an append waits for its answer.
pub(super) type Waiter = Sender<Result<(), AppendError>>;

/// The appends of one group commit, answered together.
pub(super) struct GroupAck {
    /// Records of the group neither confirmed nor on disk yet.
    remaining: AtomicUsize,
    waiters: Mutex<Option<Vec<Waiter>>>,
}

impl GroupAck {
    pub(super) fn new(records: usize, waiters: Vec<Waiter>) -> Arc<Self> {
        Arc::new(GroupAck {
            remaining: AtomicUsize::new(records),
            waiters: Mutex::new(Some(waiters)),
        })
    }

    /// One record is safe; the last one answers every append of the group.
    fn settle_one(&self) {
        if self.remaining.fetch_sub(1, SeqCst) == 1 {
            self.answer(Ok(()));
        }
    }

    /// Answers every append now (once): a refusal, or the success.
    pub(super) fn answer(&self, reply: Result<(), AppendError>) {
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for done in waiters.into_iter().flatten() {
            let _ = done.try_send(reply.clone());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Writing,
}

struct Record {
    value: Arc<[u8]>,
    count: u32,
    arrived: Instant,
    phase: Phase,
    /// Confirmed or on disk already: counted in its group.
    settled: bool,
    group: Arc<GroupAck>,
}

/// What became of a confirmed record.
#[derive(Debug, PartialEq, Eq)]
pub enum Confirmed {
    /// It never reached the disk: nothing to remove.
    InMemory,
    /// It is on disk: remove it from the store.
    OnDisk,
    /// The writer is putting it on disk: remove it once that is done.
    Writing,
}

/// A record taken for a spill.
pub(super) struct Spill {
    pub(super) seq: u64,
    pub(super) value: Arc<[u8]>,
}

#[derive(Default)]
pub struct Hot {
    records: Mutex<BTreeMap<u64, Record>>,
    bytes: AtomicUsize,
}

impl Hot {
    fn records(&self) -> MutexGuard<'_, BTreeMap<u64, Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the records of one group, seqs in order.
    pub(super) fn stage(
        &self,
        records: impl IntoIterator<Item = (u64, Vec<u8>, u32)>,
        group: &Arc<GroupAck>,
        now: Instant,
    ) {
        let mut map = self.records();
        for (seq, value, count) in records {
            self.bytes.fetch_add(value.len(), SeqCst);
            map.insert(
                seq,
                Record {
                    value: value.into(),
                    count,
                    arrived: now,
                    phase: Phase::Waiting,
                    settled: false,
                    group: group.clone(),
                },
            );
        }
    }

    /// Bytes of the records held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.records().is_empty()
    }

    /// The first seq held at or after `seq`.
    pub fn first_from(&self, seq: u64) -> Option<u64> {
        self.records().range(seq..).next().map(|(s, _)| *s)
    }

    /// The first seq held: every seq below it is on disk or confirmed.
    pub fn first(&self) -> Option<u64> {
        self.records().keys().next().copied()
    }

    /// The record `seq`, for the producer to send from memory.
    pub fn get(&self, seq: u64) -> Option<(Arc<[u8]>, u32)> {
        self.records().get(&seq).map(|r| (r.value.clone(), r.count))
    }

    /// Kafka confirmed every request of record `seq`.
    pub fn confirm(&self, seq: u64) -> Confirmed {
        let mut map = self.records();
        let Some(record) = map.get_mut(&seq) else {
            return Confirmed::OnDisk;
        };
        if !record.settled {
            record.settled = true;
            record.group.settle_one();
        }
        match record.phase {
            Phase::Writing => Confirmed::Writing,
            Phase::Waiting => {
                let record = map.remove(&seq).expect("present");
                self.bytes.fetch_sub(record.value.len(), SeqCst);
                Confirmed::InMemory
            }
        }
    }

    /// When the oldest waiting record is due for the disk.
    pub(super) fn next_due(&self, spill_after: Duration) -> Option<Instant> {
        self.records()
            .values()
            .find(|r| r.phase == Phase::Waiting)
            .map(|r| r.arrived + spill_after)
    }

    /// The waiting records due at `now` (every one if `all`), oldest first,
    /// now `Writing`.
    pub(super) fn take_due(&self, now: Instant, spill_after: Duration, all: bool) -> Vec<Spill> {
        let mut map = self.records();
        let mut out = Vec::new();
        for (seq, r) in map.iter_mut() {
            if r.phase != Phase::Waiting {
                continue;
            }
            if !all && r.arrived + spill_after > now {
                break; // arrival order: the rest are younger
            }
            r.phase = Phase::Writing;
            out.push(Spill {
                seq: *seq,
                value: r.value.clone(),
            });
        }
        out
    }

    /// The writer is done with `seqs`: on disk (`Ok`), or not (the appends
    /// of their groups get the refusal unless already answered; Kafka may
    /// still take what the producer sent).
    pub(super) fn written(&self, seqs: &[u64], outcome: &Result<(), AppendError>) {
        let mut map = self.records();
        for seq in seqs {
            let Some(record) = map.remove(seq) else {
                continue;
            };
            self.bytes.fetch_sub(record.value.len(), SeqCst);
            match outcome {
                Ok(()) if !record.settled => record.group.settle_one(),
                Ok(()) => {}
                Err(e) if !record.settled => record.group.answer(Err(e.clone())),
                Err(_) => {}
            }
        }
    }
}
