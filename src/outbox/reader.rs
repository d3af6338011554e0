//! The producer's handle on the outbox: stored batches in seq order, and
//! their acknowledgements. The reader owns the bookkeeping of what it handed
//! out: a batch that fails its checksum is logged, counted and removed here,
//! and an ack needs only the batch's seq. No sled type leaves the outbox.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::record::{Batch, Entry};
use super::store::Store;
use super::OutboxError;

/// A stored batch, verified, with the requests in it.
pub struct StoredBatch {
    pub seq: u64,
    value: sled::IVec,
}

impl StoredBatch {
    pub fn count(&self) -> u32 {
        self.batch().count
    }

    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        self.batch().entries()
    }

    fn batch(&self) -> Batch<'_> {
        Batch::parse(&self.value).expect("verified when it was read")
    }
}

/// What an ack needs to know of a batch it removes.
struct HandedOut {
    seq: u64,
    bytes: u64,
    count: u32,
}

pub struct Reader {
    store: Arc<Store>,
    /// The next seq to read.
    cursor: u64,
    /// Batches handed out and not acknowledged, in seq order.
    handed_out: VecDeque<HandedOut>,
}

impl Reader {
    pub fn new(store: Arc<Store>) -> Reader {
        Reader {
            store,
            cursor: 0,
            handed_out: VecDeque::new(),
        }
    }

    /// The next stored batch (flushed and synced) after those already
    /// handed out; `None` when there is none yet.
    pub fn read_next(&mut self) -> Result<Option<StoredBatch>, OutboxError> {
        loop {
            let Some((seq, value)) = self.store.next_batch(self.cursor)? else {
                return Ok(None);
            };
            self.cursor = seq + 1;
            match Batch::parse(&value) {
                Ok(batch) => {
                    self.handed_out.push_back(HandedOut {
                        seq,
                        bytes: value.len() as u64,
                        count: batch.count,
                    });
                    return Ok(Some(StoredBatch { seq, value }));
                }
                Err(e) => {
                    log::error!("outbox batch {seq} is corrupt ({e}); skipping it");
                    self.store
                        .metrics
                        .outbox_corrupt_batches
                        .fetch_add(1, Relaxed);
                    // Its record count is unknown; the gauge is re-counted on start.
                    if let Err(e) = self.store.remove(seq, value.len() as u64, 0) {
                        log::error!("removing corrupt outbox batch {seq} failed: {e}");
                    }
                }
            }
        }
    }

    /// Reads again from `seq` (after a failed send): what was handed out
    /// from there on is handed out anew.
    pub fn rewind(&mut self, seq: u64) {
        self.cursor = seq;
        while self.handed_out.back().is_some_and(|b| b.seq >= seq) {
            self.handed_out.pop_back();
        }
    }

    /// True if acknowledging the batch `seq` needs the removal mark moved
    /// first (`Store::advance_removal_mark`, blocking: off the executor).
    pub fn needs_mark(&self, seq: u64) -> bool {
        !self.store.removal_allowed(seq)
    }

    /// The store, for its blocking calls off the executor.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The next seq to read: everything below was handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Kafka confirmed every request of the oldest batch handed out, `seq`:
    /// it leaves the outbox.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        let Some(front) = self.handed_out.front() else {
            return Ok(());
        };
        debug_assert_eq!(front.seq, seq, "acks come in seq order");
        self.store.remove(seq, front.bytes, front.count)?;
        self.handed_out.pop_front();
        Ok(())
    }
}
