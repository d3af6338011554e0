//! The producer's handle on the outbox: records in seq order, from memory
//! while they are there (never read back from disk), else from disk; and
//! what Kafka's confirmation of each means. The reader owns the bookkeeping
//! of what it handed out: a batch that fails its checksum is logged,
//! counted and removed here, and a confirmation needs only the handle the
//! reader gave. No sled type leaves the outbox.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::hot::Confirmed;
use super::record::{from_disk, Batch, Entry};
use super::store::Store;
use super::OutboxError;

/// A stored batch, verified (and decompressed), with the requests in it.
pub struct StoredBatch {
    pub seq: u64,
    value: Stored,
}

/// A record as read: sled's bytes when stored uncompressed, else its
/// decompressed copy.
enum Stored {
    Sled(sled::IVec),
    Decoded(Vec<u8>),
}

impl std::ops::Deref for Stored {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Stored::Sled(v) => v,
            Stored::Decoded(v) => v,
        }
    }
}

impl StoredBatch {
    pub fn count(&self) -> u32 {
        self.batch().count
    }

    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        self.batch().entries()
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch::verified(&self.value)
    }
}

/// A record to send: from memory, or read from disk.
pub enum Outgoing {
    Memory(u64, Arc<[u8]>),
    Disk(StoredBatch),
}

impl Outgoing {
    pub fn seq(&self) -> u64 {
        match self {
            Outgoing::Memory(seq, _) => *seq,
            Outgoing::Disk(b) => b.seq,
        }
    }

    pub fn batch(&self) -> Batch<'_> {
        match self {
            Outgoing::Memory(_, value) => Batch::verified(value),
            Outgoing::Disk(b) => b.batch(),
        }
    }

    /// What the producer keeps while the record is in flight.
    pub fn sent(&self) -> Sent {
        let origin = match self {
            Outgoing::Memory(..) => Origin::Memory {
                count: self.batch().count,
                on_disk: None,
            },
            Outgoing::Disk(_) => Origin::Disk,
        };
        Sent {
            seq: self.seq(),
            origin,
        }
    }
}

/// A record handed to Kafka, as the reader needs to know it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Disk,
    /// Sent from memory; `on_disk` once its confirmation was settled.
    Memory {
        count: u32,
        on_disk: Option<bool>,
    },
}

/// What an ack needs to know of a batch it removes.
struct HandedOut {
    seq: u64,
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
    /// handed out, below `limit` if given; `None` when there is none yet.
    /// Disk only: [`Reader::next_record`] is what the producer uses.
    pub fn read_next(&mut self, limit: Option<u64>) -> Result<Option<StoredBatch>, OutboxError> {
        loop {
            let Some((seq, value)) = self.store.next_batch(self.cursor, limit)? else {
                return Ok(None);
            };
            self.cursor = seq + 1;
            let decoded = match from_disk(&value) {
                Ok(Cow::Borrowed(_)) => Ok(Stored::Sled(value)),
                Ok(Cow::Owned(record)) => Ok(Stored::Decoded(record)),
                Err(e) => Err(e),
            };
            match decoded.and_then(|v| Batch::parse(&v).map(|b| b.count).map(|c| (v, c))) {
                Ok((value, count)) => {
                    self.handed_out.push_back(HandedOut { seq, count });
                    return Ok(Some(StoredBatch { seq, value }));
                }
                Err(e) => {
                    log::error!("outbox batch {seq} is corrupt ({e}); skipping it");
                    self.store
                        .metrics
                        .outbox_corrupt_batches
                        .fetch_add(1, Relaxed);
                    // Its record count is unknown; the gauge is re-counted on start.
                    if let Err(e) = self.store.remove(seq, 0) {
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

    /// The next record in seq order: from memory while it is there, else
    /// from disk below the first one in memory. A seq in neither place was
    /// confirmed, or refused when it could not be written: it is skipped.
    pub fn next_record(&mut self) -> Result<Option<Outgoing>, OutboxError> {
        let store = self.store.clone();
        loop {
            let cursor = self.cursor;
            let in_memory = store.hot.first_from(cursor);
            if in_memory == Some(cursor) {
                match store.hot.get(cursor) {
                    Some((value, _)) => {
                        self.cursor = cursor + 1;
                        return Ok(Some(Outgoing::Memory(cursor, value)));
                    }
                    None => continue, // written to disk (or confirmed) just now
                }
            }
            if let Some(batch) = self.read_next(in_memory)? {
                return Ok(Some(Outgoing::Disk(batch)));
            }
            match in_memory {
                Some(seq) => self.cursor = seq,
                None => return Ok(None),
            }
        }
    }

    /// Kafka confirmed every request of `sent`: settles what is in memory
    /// (its appends may be answered now). False if the writer is putting it
    /// on disk at this moment: ask again later. Then, if
    /// [`Reader::needs_removal`], [`Reader::remove`] takes it out of the
    /// store.
    pub fn confirm(&mut self, sent: &mut Sent) -> bool {
        if let Origin::Memory { on_disk, .. } = &mut sent.origin {
            if on_disk.is_none() {
                match self.store.hot.confirm(sent.seq) {
                    Confirmed::InMemory => {
                        self.store
                            .metrics
                            .outbox_confirmed_in_memory
                            .fetch_add(1, Relaxed);
                        *on_disk = Some(false);
                    }
                    Confirmed::OnDisk => *on_disk = Some(true),
                    Confirmed::Writing => return false,
                }
            }
        }
        self.store.confirmations.fetch_add(1, Relaxed);
        true
    }

    /// True if the confirmed `sent` is on disk and must be removed.
    pub fn needs_removal(&self, sent: &Sent) -> bool {
        matches!(
            sent.origin,
            Origin::Disk
                | Origin::Memory {
                    on_disk: Some(true),
                    ..
                }
        )
    }

    /// Removes a confirmed record from the store (the oldest handed out).
    pub fn remove(&mut self, sent: &Sent) -> Result<(), OutboxError> {
        match sent.origin {
            Origin::Disk => self.ack(sent.seq),
            Origin::Memory {
                count,
                on_disk: Some(true),
            } => self.store.remove(sent.seq, count),
            Origin::Memory { .. } => Ok(()),
        }
    }

    /// Kafka confirmed every request of the oldest batch read from disk,
    /// `seq`: it leaves the outbox.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        let Some(front) = self.handed_out.front() else {
            return Ok(());
        };
        debug_assert_eq!(front.seq, seq, "acks come in seq order");
        self.store.remove(seq, front.count)?;
        self.handed_out.pop_front();
        Ok(())
    }
}
