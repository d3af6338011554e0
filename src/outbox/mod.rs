//! The durable outbox: every accepted request is on disk before its ack.
//!
//! # On-disk format
//!
//! `<data_dir>/outbox/<first seq, 20 digits>/`: a series of small sled
//! databases ("generations"), oldest first; appends go to the newest, which
//! is closed to appends once about 16 MiB (or a quarter of `max_bytes`) was
//! written to it. Two properties of sled 0.34 shape this: it keeps the disk
//! space of removed records, and it keeps every page it has read or written
//! in memory while the database is open. So a generation is deleted as soon
//! as it is drained (that gives disk back), and only the newest and the one
//! being drained are open (that keeps memory flat whatever the backlog).
//!
//! Each group commit is stored as records of at most 7 KiB, each under its own
//! seq, all inserted before one flush: sled's cost is per insert and per
//! remove, so a record per request would cap throughput, and tree nodes above
//! about 128 KiB would go to sled's blob files, each needing syncs of its own
//! (see [`RECORD_BYTES`]).
//!
//! ```text
//! key   = seq: u64 big-endian (so sled's order is append order)
//! value = magic 0xEB | version 1 | crc32: u32 LE | count: u32 LE | entries
//! entry = len: u32 LE (of the rest of the entry) | key_len: u16 LE | key
//!         | message_id: 16 bytes | payload (the ServerRequest JSON)
//! ```
//!
//! The crc32 covers `count` and every entry. Below, "batch" means one record.
//!
//! sled leaves its files unsynced; [`durable`] says what the outbox syncs and
//! when, and why blob files get a second name in `<generation>/keep/`.
//!
//! Beside sled's files, two marks (seq u64 LE | crc32 u32 LE, written in
//! place): `<generation>/flushed`, the seq after the last flushed batch of
//! that generation, and `outbox/removed`, a seq below which batches may have
//! been removed. sled 0.34 opens a damaged log by silently dropping what
//! follows the damage; on start, batches between the two marks that sled
//! does not give back are counted as lost (logged as an error,
//! `edgegate_outbox_lost_batches_total`).
//!
//! # Invariants
//!
//! - A batch is inserted, flushed and fsynced (with every file and directory
//!   entry it depends on) before any request in it is acked, and the
//!   producer only reads batches below `committed` (synced ones).
//! - Seqs only grow, across generations too. A generation is named by the
//!   first seq it holds, and every seq in it is below the next generation's
//!   name (a new generation starts only after `committed` covers all that
//!   was written); a new process continues after the highest stored key, so
//!   replay order is append order across restarts.
//! - A batch is removed only after Kafka confirmed every request in it;
//!   removals need no flush of their own (a lost removal means a duplicate,
//!   never a loss).
//! - A batch whose checksum or layout is wrong is logged, counted and removed
//!   without stopping the replay of the others.
//! - `live_bytes` (the sum of live batch sizes) plus what is being appended
//!   never exceeds `max_bytes`, and neither does the size on disk of all
//!   generations (measured every 500 ms, plus what was appended since):
//!   past either, appends fail with [`AppendError::Full`].
//! - A generation that sled cannot open is moved aside, never deleted.
//! - `removed` is written and synced before any removal it covers, `flushed`
//!   written after the fsync of the log it records (and synced later): on
//!   disk, a batch at or above `removed` and below `flushed` was acknowledged
//!   and never removed, so if it is missing, it was lost.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use smol::channel::{self, Receiver, Sender, TrySendError};
use uuid::Uuid;

use crate::ops::metrics::Metrics;

const MAGIC: u8 = 0xEB;
const VERSION: u8 = 1;
/// magic, version, crc32, count.
pub const HEADER_LEN: usize = 10;
/// Stop gathering requests into one group commit past this many bytes.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// A group commit is stored as records of at most this size (a larger
/// request gets a record of its own); one flush still serves the whole group.
/// sled writes a tree node whose serialized size exceeds a quarter of its
/// 512 KiB segment, less headers, to a blob file of its own, and a leaf holds
/// up to 17 records: 17 records of 7 KiB stay under that, so nodes stay in
/// the log, the one file whose every write the group commit syncs anyway.
/// (At 32 KiB every consolidated leaf became a new blob file, each needing
/// its own fsync and a directory fsync before the ack.)
const RECORD_BYTES: usize = 7 << 10;
/// In each generation's directory, beside sled's files: the seq after the
/// last flushed batch (u64 LE, then its crc32). sled 0.34, reading a damaged
/// log, usually stops at the damage and opens without the records after
/// it, saying nothing; this is how such a loss is noticed and counted.
/// Written after the log's fsync, synced with the next group commit: on
/// disk it is never ahead of the log.
const FLUSHED_FILE: &str = "flushed";
/// In the outbox directory: a seq below which batches may have been
/// removed (delivered), same layout. Written and synced before any removal
/// it covers (the producer moves it ahead to what it has handed to Kafka,
/// off the executor), so a batch missing below it may simply have been
/// delivered, and one missing at or above it was lost.
const REMOVED_FILE: &str = "removed";
/// Pending append jobs; beyond it connections wait (backpressure).
const JOB_QUEUE: usize = 4096;
/// A generation is closed to appends at this size on disk (or a quarter of
/// the cap, if smaller): bounds the memory sled holds per open generation.
const GENERATION_BYTES: u64 = 16 << 20;
/// After a failed write, appends are refused without touching the store for
/// this long.
const RETRY_AFTER_WRITE_ERROR: Duration = Duration::from_millis(200);
/// How often the size on disk is measured for the byte cap.
const DISK_CHECK_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot create outbox directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open outbox store {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("outbox store error: {0}")]
    Store(#[from] sled::Error),
    #[error("outbox generation {0} was already drained and deleted")]
    Retired(PathBuf),
    #[error("the data directory {path} is in use by another edgegate process")]
    InUse { path: PathBuf },
}

/// Why an append was refused. Nothing of a refused append is acked.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AppendError {
    #[error("the outbox is full")]
    Full,
    #[error("the outbox could not store the request: {0}")]
    Store(String),
    #[error("the outbox is closed")]
    Closed,
}

/// Requests encoded for one append, built by a connection.
#[derive(Debug)]
pub struct AppendBatch {
    /// Starts with `HEADER_LEN` reserved bytes so the writer can turn a
    /// single job into a record without copying it.
    buf: Vec<u8>,
    count: u32,
}

impl Default for AppendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl AppendBatch {
    pub fn new() -> Self {
        AppendBatch {
            buf: vec![0; HEADER_LEN],
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes this batch will take in the store.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Adds one request; `write_payload` appends its ServerRequest JSON.
    pub fn push(
        &mut self,
        key: &[u8],
        message_id: &Uuid,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) {
        let key = &key[..key.len().min(u16::MAX as usize)];
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(message_id.as_bytes());
        write_payload(&mut self.buf);
        let len = (self.buf.len() - start - 4) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
    }

    /// Seals the batch into a record value: header filled in, crc computed.
    fn seal(mut self) -> Vec<u8> {
        self.buf[0] = MAGIC;
        self.buf[1] = VERSION;
        self.buf[6..10].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[6..]);
        self.buf[2..6].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }

    /// Each entry's bytes, length prefix included.
    fn raw_entries(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.buf[HEADER_LEN..];
        std::iter::from_fn(move || {
            let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let (entry, tail) = rest.split_at((4 + len).min(rest.len()));
            rest = tail;
            Some(entry)
        })
    }

    fn push_raw(&mut self, entry: &[u8]) {
        self.buf.extend_from_slice(entry);
        self.count += 1;
    }
}

/// One stored request, borrowed from its batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub key: &'a [u8],
    pub message_id: Uuid,
    pub payload: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorruptBatch {
    #[error("record shorter than its header")]
    Short,
    #[error("unknown magic or version")]
    Header,
    #[error("checksum mismatch")]
    Checksum,
    #[error("entry lengths do not add up")]
    Layout,
}

/// A stored batch whose checksum and layout were verified.
#[derive(Debug)]
pub struct Batch<'a> {
    pub count: u32,
    body: &'a [u8],
}

impl<'a> Batch<'a> {
    pub fn parse(value: &'a [u8]) -> Result<Self, CorruptBatch> {
        if value.len() < HEADER_LEN {
            return Err(CorruptBatch::Short);
        }
        if value[0] != MAGIC || value[1] != VERSION {
            return Err(CorruptBatch::Header);
        }
        let crc = u32::from_le_bytes(value[2..6].try_into().expect("4 bytes"));
        if crc32fast::hash(&value[6..]) != crc {
            return Err(CorruptBatch::Checksum);
        }
        let count = u32::from_le_bytes(value[6..10].try_into().expect("4 bytes"));
        let batch = Batch {
            count,
            body: &value[HEADER_LEN..],
        };
        // Walk once so that iteration can trust the lengths.
        let mut seen = 0u32;
        let mut rest = batch.body;
        while !rest.is_empty() {
            let (_, tail) = split_entry(rest).ok_or(CorruptBatch::Layout)?;
            rest = tail;
            seen += 1;
        }
        if seen != count {
            return Err(CorruptBatch::Layout);
        }
        Ok(batch)
    }

    pub fn entries(&self) -> impl Iterator<Item = Entry<'a>> {
        let mut rest = self.body;
        std::iter::from_fn(move || {
            let (entry, tail) = split_entry(rest)?;
            rest = tail;
            Some(entry)
        })
    }
}

fn split_entry(bytes: &[u8]) -> Option<(Entry<'_>, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let entry = bytes.get(4..4usize.checked_add(len)?)?;
    let key_len = u16::from_le_bytes(entry.get(..2)?.try_into().ok()?) as usize;
    let key = entry.get(2..2 + key_len)?;
    let id = entry.get(2 + key_len..2 + key_len + 16)?;
    let payload = &entry[2 + key_len + 16..];
    Some((
        Entry {
            key,
            message_id: Uuid::from_slice(id).ok()?,
            payload,
        },
        &bytes[4 + len..],
    ))
}

/// One sled database of the outbox, named by the first seq it may hold.
///
/// sled 0.34 keeps every page it has read or written in memory for as long
/// as the database is open, whatever its cache setting; so a generation is
/// only open while it is written (the newest) or read (the one the producer
/// is draining), and is small. That is what keeps memory flat however large
/// the backlog.
struct Generation {
    first_seq: u64,
    dir: PathBuf,
    db: Mutex<Option<sled::Db>>,
    /// Batches stored in it and not yet removed.
    batches: AtomicU64,
    /// Bytes appended to it by this process (it rotates on this, so no
    /// directory walk is needed per flush).
    appended: AtomicU64,
    /// Drained and deleted: must not be opened again (that would recreate
    /// its directory).
    retired: AtomicBool,
    /// The `flushed` file, open once written.
    flushed: Mutex<Option<std::fs::File>>,
    /// A `flushed` mark was written and not synced yet.
    flushed_unsynced: AtomicBool,
    /// The `flushed` file was created by this process: its name needs a
    /// sync of the directory.
    flushed_created: AtomicBool,
    /// Our own handle on sled's log, to fsync it.
    log: Mutex<Option<std::fs::File>>,
    /// Blob files already made durable.
    blobs: Mutex<durable::Blobs>,
}

impl Generation {
    fn new(first_seq: u64, dir: PathBuf, db: Option<sled::Db>) -> Self {
        Generation {
            first_seq,
            dir,
            db: Mutex::new(db),
            batches: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            flushed: Mutex::new(None),
            flushed_unsynced: AtomicBool::new(false),
            flushed_created: AtomicBool::new(false),
            log: Mutex::new(None),
            blobs: Mutex::new(durable::Blobs::default()),
        }
    }

    /// Records that every seq below `next` was flushed and synced (see
    /// [`FLUSHED_FILE`]). Written here, synced by the next group commit or
    /// the close: after a power cut it may be older than the truth, never
    /// newer, so it can only under-report a loss.
    fn mark_flushed(&self, next: u64) {
        let mut file = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        if file.is_none() {
            let path = self.dir.join(FLUSHED_FILE);
            if !path.exists() {
                self.flushed_created.store(true, SeqCst);
            }
            *file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join(FLUSHED_FILE))
                .ok();
        }
        if let Some(f) = &*file {
            write_mark(f, next);
            self.flushed_unsynced.store(true, SeqCst);
        }
    }

    fn sync_flushed_mark(&self) -> std::io::Result<()> {
        if !self.flushed_unsynced.swap(false, SeqCst) {
            return Ok(());
        }
        let file = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &*file {
            f.sync_data()?;
        }
        if self.flushed_created.swap(false, SeqCst) {
            durable::sync_path(&self.dir)?;
        }
        Ok(())
    }

    /// After sled's flush of a group commit and before its acks: what sled
    /// left unsynced (see [`durable`]). The previous `flushed` mark, new
    /// blob files, then the log.
    fn make_durable(&self) -> std::io::Result<()> {
        self.sync_flushed_mark()?;
        self.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_new(&self.dir)?;
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.is_none() {
            *log = Some(std::fs::File::open(self.dir.join("db"))?);
        }
        log.as_ref().expect("opened above").sync_data()
    }

    /// The open database, opening it if needed.
    fn db(&self) -> Result<sled::Db, OutboxError> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = &*db {
            return Ok(open.clone());
        }
        if self.retired.load(SeqCst) {
            return Err(OutboxError::Retired(self.dir.clone()));
        }
        let open = open_db(&self.dir).map_err(|source| OutboxError::Open {
            path: self.dir.clone(),
            source,
        })?;
        *db = Some(open.clone());
        Ok(open)
    }

    fn open_db(&self) -> Option<sled::Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops the handle without flushing (after an I/O error).
    fn reset(&self) {
        self.db.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Flushes and closes it, releasing its pages.
    fn close(&self) {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(db) = db {
            if let Err(e) = db.flush() {
                log::warn!(
                    "flushing outbox generation {} failed: {e}",
                    self.dir.display()
                );
            }
        }
        if let Err(e) = self.sync_flushed_mark() {
            log::warn!(
                "syncing the flushed mark of outbox generation {} failed: {e}",
                self.dir.display()
            );
        }
    }

    fn is_empty(&self) -> bool {
        self.batches.load(SeqCst) == 0
    }
}

/// The store shared by the writer (appends) and the producer (reads and
/// removes).
pub struct Store {
    root: PathBuf,
    /// Held for the life of the store: one process per outbox. sled locks
    /// each database, but a generation this process keeps closed would
    /// otherwise be open to another one.
    _lock: std::fs::File,
    /// Oldest first; the last one takes new batches.
    generations: RwLock<Vec<Arc<Generation>>>,
    metrics: Arc<Metrics>,
    max_bytes: u64,
    /// Start a new generation once the active one occupies this much disk.
    rotate_at: u64,
    /// `first_seq` of the generation the producer reads from.
    reading: AtomicU64,
    live_bytes: AtomicU64,
    /// Size on disk at the last measurement, and bytes appended since.
    disk_measured: AtomicU64,
    disk_since: AtomicU64,
    /// Batches below this seq are flushed and may be sent.
    committed: AtomicU64,
    /// Rung after each flush that made new batches readable.
    doorbell: Sender<()>,
    /// [`REMOVED_FILE`] and the mark last written and synced to it.
    removed: Mutex<(Option<std::fs::File>, u64)>,
    /// The same mark, read without the lock: batches below it may be removed.
    removal_limit: AtomicU64,
}

impl Store {
    /// Opens (or creates) the outbox under `root`. A generation that sled
    /// cannot open is moved aside to `<dir>.broken-<unix time>` and left out,
    /// loudly: refusing to start would stop every device, and the moved files
    /// stay for an operator to inspect.
    pub fn open(
        root: &Path,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Store>, Receiver<()>), OutboxError> {
        let created = !root.exists();
        std::fs::create_dir_all(root).map_err(|source| OutboxError::CreateDir {
            path: root.to_owned(),
            source,
        })?;
        if created {
            // A new directory's name is on disk once its parent is synced.
            let parent = root.parent().unwrap_or(Path::new("."));
            durable::sync_path(parent).map_err(|source| OutboxError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        let lock = lock_dir(root)?;
        let mut firsts = Vec::new();
        let entries = std::fs::read_dir(root).map_err(|source| OutboxError::CreateDir {
            path: root.to_owned(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(first) = name.to_str().and_then(|n| n.parse::<u64>().ok()) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let (doorbell, rung) = channel::bounded(1);
        let store = Store {
            root: root.to_owned(),
            _lock: lock,
            generations: RwLock::new(Vec::new()),
            metrics,
            max_bytes,
            rotate_at: (max_bytes / 4).clamp(1, GENERATION_BYTES),
            reading: AtomicU64::new(0),
            live_bytes: AtomicU64::new(0),
            disk_measured: AtomicU64::new(0),
            disk_since: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            doorbell,
            removed: Mutex::new((None, 0)),
            removal_limit: AtomicU64::new(0),
        };
        store.scan(&firsts)?;
        store.add_generation()?;
        store.retire_drained();
        store.measure_disk();
        Ok((Arc::new(store), rung))
    }

    fn generations(&self) -> Vec<Arc<Generation>> {
        self.generations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn active(&self) -> Arc<Generation> {
        self.generations()
            .last()
            .cloned()
            .expect("the outbox always has a generation")
    }

    /// Counts what a previous run left behind, one generation at a time
    /// (each is closed again after), so the backlog is never all in memory.
    fn scan(&self, firsts: &[u64]) -> Result<(), OutboxError> {
        let (mut batches, mut records, mut bytes, mut next) = (0i64, 0i64, 0u64, 0u64);
        let mut generations = Vec::new();
        // No file: nothing was ever removed (it is written before the first
        // removal). A damaged one: unknown, and no loss can be told apart.
        let removed_path = self.root.join(REMOVED_FILE);
        let removed = match removed_path.exists() {
            false => Some(0),
            true => read_mark(&removed_path),
        };
        if let Some(mark) = removed {
            self.removed.lock().unwrap_or_else(|p| p.into_inner()).1 = mark;
            self.removal_limit.store(mark, SeqCst);
        }
        for &first in firsts {
            let Some((generation, stats)) =
                load_generation(&self.root, first, removed, &self.metrics)?
            else {
                continue;
            };
            next = next.max(first).max(stats.next_seq);
            batches += stats.batches as i64;
            records += stats.records;
            bytes += stats.bytes;
            generations.push(Arc::new(generation));
        }
        *self.generations.write().unwrap_or_else(|p| p.into_inner()) = generations;
        self.committed.store(next, SeqCst);
        self.live_bytes.store(bytes, SeqCst);
        self.metrics.outbox_batches.store(batches, Relaxed);
        self.metrics.outbox_records.store(records, Relaxed);
        self.metrics.outbox_bytes.store(bytes as i64, Relaxed);
        if batches > 0 {
            log::info!(
                "outbox holds {records} requests in {batches} batches ({bytes} bytes) from before; replaying them first"
            );
        }
        Ok(())
    }

    /// Starts a new generation for appends, beginning at the next seq, and
    /// closes the previous one unless the producer is reading it.
    fn add_generation(&self) -> Result<(), OutboxError> {
        let first = self.committed.load(SeqCst);
        if self
            .generations()
            .last()
            .is_some_and(|g| g.first_seq >= first)
        {
            return Ok(()); // nothing was written to the active one yet
        }
        let dir = self.root.join(format!("{first:020}"));
        let db = open_db(&dir).map_err(|source| OutboxError::Open {
            path: dir.clone(),
            source,
        })?;
        let generation = Generation::new(first, dir, Some(db));
        // Its `flushed` mark and its own name must be on disk before
        // anything acked goes in (sled's files were synced on open).
        generation.mark_flushed(first);
        let io = |source| OutboxError::CreateDir {
            path: generation.dir.clone(),
            source,
        };
        generation.sync_flushed_mark().map_err(io)?;
        durable::sync_path(&self.root).map_err(io)?;
        let previous = {
            let mut generations = self.generations.write().unwrap_or_else(|p| p.into_inner());
            let previous = generations.last().cloned();
            generations.push(Arc::new(generation));
            previous
        };
        if let Some(previous) = previous {
            if previous.first_seq != self.reading.load(SeqCst) {
                previous.close();
            }
        }
        Ok(())
    }

    /// Deletes generations that are no longer written to and hold nothing:
    /// sled keeps the space of removed records, a deleted directory does not.
    fn retire_drained(&self) {
        let retired: Vec<Arc<Generation>> = {
            let mut generations = self.generations.write().unwrap_or_else(|p| p.into_inner());
            let last = generations.len().saturating_sub(1);
            let (keep, gone): (Vec<_>, Vec<_>) = generations
                .drain(..)
                .enumerate()
                .partition(|(i, g)| *i == last || !g.is_empty());
            *generations = keep.into_iter().map(|(_, g)| g).collect();
            gone.into_iter().map(|(_, g)| g).collect()
        };
        let any = !retired.is_empty();
        for generation in retired {
            generation
                .db
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match std::fs::remove_dir_all(&generation.dir) {
                Ok(()) => log::debug!(
                    "outbox generation {} drained and deleted",
                    generation.dir.display()
                ),
                Err(e) => log::warn!(
                    "cannot delete drained outbox generation {}: {e}",
                    generation.dir.display()
                ),
            }
        }
        if any {
            self.measure_disk();
        }
    }

    /// The first flushed batch at or after `seq`.
    pub fn next_batch(&self, seq: u64) -> Result<Option<(u64, sled::IVec)>, OutboxError> {
        let end = self.committed.load(SeqCst);
        if seq >= end {
            return Ok(None);
        }
        let generations = self.generations();
        let from = generations
            .iter()
            .rposition(|g| g.first_seq <= seq)
            .unwrap_or(0);
        for generation in &generations[from..] {
            if generation.is_empty() || generation.retired.load(SeqCst) {
                continue;
            }
            self.reading.store(generation.first_seq, SeqCst);
            let start = seq.max(generation.first_seq);
            let db = generation.db()?;
            if let Some(item) = db.range(start.to_be_bytes()..end.to_be_bytes()).next() {
                let (key, value) = item?;
                return Ok(Some((seq_of(&key), value)));
            }
        }
        Ok(None)
    }

    /// Removes a batch whose requests Kafka confirmed (or a corrupt one).
    pub fn remove(&self, seq: u64, bytes: u64, records: u32) -> Result<(), OutboxError> {
        let generations = self.generations();
        let Some(generation) = generations.iter().rev().find(|g| g.first_seq <= seq) else {
            return Ok(());
        };
        if generation.retired.load(SeqCst) {
            return Ok(()); // drained and deleted: nothing left to remove
        }
        if !self.removal_allowed(seq) {
            // The producer moves the mark ahead off the executor; this is
            // the fallback (a corrupt batch skipped, say).
            self.advance_removal_mark(seq + 1)?;
        }
        if generation.db()?.remove(seq.to_be_bytes())?.is_none() {
            return Ok(()); // already gone
        }
        generation.batches.fetch_sub(1, SeqCst);
        self.live_bytes.fetch_sub(bytes, SeqCst);
        self.metrics.outbox_batches.fetch_sub(1, Relaxed);
        self.metrics
            .outbox_records
            .fetch_sub(i64::from(records), Relaxed);
        self.metrics.outbox_bytes.fetch_sub(bytes as i64, Relaxed);
        if generations.len() > 1 && generation.is_empty() {
            self.retire_drained();
        }
        Ok(())
    }

    /// True if the batch `seq` may be removed without moving the removal
    /// mark first.
    pub fn removal_allowed(&self, seq: u64) -> bool {
        seq < self.removal_limit.load(SeqCst)
    }

    /// Blocking: writes and syncs (in [`REMOVED_FILE`]) that batches below
    /// `next` may be gone, before any such removal can reach the disk. A
    /// mark ahead of the removals only narrows what a loss check covers.
    pub fn advance_removal_mark(&self, next: u64) -> Result<(), OutboxError> {
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        if removed.1 >= next {
            return Ok(());
        }
        let path = self.root.join(REMOVED_FILE);
        let io = |source| OutboxError::CreateDir {
            path: path.clone(),
            source,
        };
        if removed.0.is_none() {
            let existed = path.exists();
            let file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io)?;
            if !existed {
                file.sync_all().map_err(io)?;
                durable::sync_path(&self.root).map_err(io)?;
            }
            removed.0 = Some(file);
        }
        let file = removed.0.as_ref().expect("opened above");
        write_mark(file, next);
        file.sync_data().map_err(io)?;
        removed.1 = next;
        self.removal_limit.store(next, SeqCst);
        Ok(())
    }

    /// Blocking: persists removals (and anything else pending).
    pub fn flush(&self) -> Result<(), OutboxError> {
        for generation in self.generations() {
            if let Some(db) = generation.open_db() {
                db.flush()?;
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.generations().iter().all(|g| g.is_empty())
    }

    /// Wakes the producer (used to make it notice a stop request).
    pub fn wake(&self) {
        let _ = self.doorbell.try_send(());
    }

    /// Measures the size on disk of every generation.
    fn measure_disk(&self) -> u64 {
        let total = self.generations().iter().map(|g| dir_bytes(&g.dir)).sum();
        self.disk_measured.store(total, SeqCst);
        self.disk_since.store(0, SeqCst);
        self.metrics.outbox_disk_bytes.store(total, Relaxed);
        total
    }

    /// Disk use as last measured plus what was appended since (sled writes
    /// at least that much), so the cap holds between measurements.
    fn disk_estimate(&self) -> u64 {
        self.disk_measured.load(SeqCst) + self.disk_since.load(SeqCst)
    }

    fn would_exceed(&self, pending: u64, incoming: u64) -> bool {
        let live = self.live_bytes.load(SeqCst);
        live + pending + incoming > self.max_bytes
            || self.disk_estimate() + pending + incoming > self.max_bytes
    }

    /// Closes a large active generation to appends, so that it can be
    /// deleted once drained and its pages leave memory meanwhile.
    fn maybe_rotate(&self) {
        let active = self.active();
        if active.appended.load(SeqCst) < self.rotate_at {
            return;
        }
        if let Err(e) = self.add_generation() {
            log::error!("cannot start a new outbox generation: {e}");
            return;
        }
        self.retire_drained();
    }
}

/// Bytes of the files in `dir` and below (sled's `blobs/`, our `keep/`). A
/// file with two names (a blob and its `keep/` link) counts once.
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len() / m.nlink().max(1),
            Err(_) => 0,
        })
        .sum()
}

/// What a generation held when it was loaded.
struct GenerationStats {
    batches: u64,
    records: i64,
    bytes: u64,
    next_seq: u64,
}

/// Opens and counts one generation left by an earlier run, then closes it.
/// One that sled cannot open or read (an error, or a panic inside sled,
/// which it raises on some damaged files) is moved aside to
/// `<dir>.broken-<unix time>`, loudly, and left out: refusing to start, or
/// crash-looping, would stop every device. Its files stay for an operator.
fn load_generation(
    root: &Path,
    first: u64,
    removed: Option<u64>,
    metrics: &Metrics,
) -> Result<Option<(Generation, GenerationStats)>, OutboxError> {
    let dir = root.join(format!("{first:020}"));
    let loaded = std::panic::catch_unwind(|| -> sled::Result<(sled::Db, GenerationStats)> {
        let db = open_db(&dir)?;
        let mut stats = GenerationStats {
            batches: 0,
            records: 0,
            bytes: 0,
            next_seq: first,
        };
        for item in db.iter() {
            let (key, value) = item?;
            stats.next_seq = stats.next_seq.max(seq_of(&key).saturating_add(1));
            stats.batches += 1;
            stats.bytes += value.len() as u64;
            // A batch that fails its checksum is counted and skipped when
            // the producer reaches it.
            if let Ok(batch) = Batch::parse(&value) {
                stats.records += i64::from(batch.count);
            }
        }
        Ok((db, stats))
    });
    let reason = match loaded {
        Ok(Ok((db, mut stats))) => {
            if let Some(flushed) = read_mark(&dir.join(FLUSHED_FILE)) {
                // Batches are removed in seq order once delivered, so those
                // from the removal mark up to the last flushed one must all
                // be there. sled, reading a damaged log, stops at the damage:
                // what it lost is the end.
                let expected_from = first.max(removed.unwrap_or(0));
                let readable_to = if stats.batches > 0 {
                    stats.next_seq.max(expected_from)
                } else {
                    expected_from
                };
                if removed.is_some() && flushed > readable_to {
                    let lost = flushed - readable_to;
                    log::error!(
                        "outbox store {} lost {lost} batches (seqs {readable_to}..{flushed}): sled could not read them back; \
                         the requests in them were acknowledged and will not be sent",
                        dir.display(),
                    );
                    metrics.outbox_lost_batches.fetch_add(lost, Relaxed);
                }
                // Never hand out a seq that was used before.
                stats.next_seq = stats.next_seq.max(flushed);
            }
            let generation = Generation::new(first, dir, None);
            generation.batches.store(stats.batches, SeqCst);
            db.flush()?;
            drop(db);
            return Ok(Some((generation, stats)));
        }
        Ok(Err(e)) if is_lock_error(&e) => {
            // Still locked after waiting: never move a locked store aside.
            return Err(OutboxError::Open {
                path: dir,
                source: e,
            });
        }
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "sled panicked".to_owned()),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let aside = PathBuf::from(format!("{}.broken-{stamp}", dir.display()));
    log::error!(
        "outbox store {} is damaged and cannot be read ({reason}); moving it to {} and going on without it: \
         requests acknowledged into it will not be sent unless recovered by hand",
        dir.display(),
        aside.display()
    );
    std::fs::rename(&dir, &aside).map_err(|source| OutboxError::CreateDir {
        path: aside.clone(),
        source,
    })?;
    metrics.outbox_store_recoveries.fetch_add(1, Relaxed);
    Ok(None)
}

/// A mark file ([`FLUSHED_FILE`], [`REMOVED_FILE`]): a seq, u64 LE, then
/// its crc32. Written in place, not synced: after a crash of the process it
/// is exact; after a power cut it may be older than the truth.
fn write_mark(file: &std::fs::File, seq: u64) {
    use std::os::unix::fs::FileExt;
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..8]);
    bytes[8..].copy_from_slice(&crc.to_le_bytes());
    let _ = file.write_all_at(&bytes, 0);
}

/// A mark file's seq, if it is there and intact.
fn read_mark(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let bytes: [u8; 12] = bytes.get(..12)?.try_into().ok()?;
    let crc = u32::from_le_bytes(bytes[8..].try_into().ok()?);
    (crc32fast::hash(&bytes[..8]) == crc)
        .then(|| u64::from_le_bytes(bytes[..8].try_into().unwrap()))
}

fn lock_dir(root: &Path) -> Result<std::fs::File, OutboxError> {
    let path = root.join("lock");
    let io = |source| OutboxError::CreateDir {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OutboxError::InUse {
            path: root.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

fn is_disk_full(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
}

/// Logs failed appends without flooding the log while the disk stays full:
/// the first failure, then a summary at most every 10 s, then the recovery.
struct ErrorThrottle {
    failing_since: Option<Instant>,
    last_report: Option<Instant>,
    refused: u64,
    /// What requests get while the store is left alone after a failure.
    last_refusal: AppendError,
}

impl Default for ErrorThrottle {
    fn default() -> Self {
        ErrorThrottle {
            failing_since: None,
            last_report: None,
            refused: 0,
            last_refusal: AppendError::Full,
        }
    }
}

impl ErrorThrottle {
    fn report(&mut self, refused: u32, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        self.failing_since.get_or_insert(now);
        self.refused += u64::from(refused);
        if self
            .last_report
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            log::error!(
                "outbox writes are failing ({e}); {} requests refused so far, devices keep them and retry",
                self.refused
            );
            self.last_report = Some(now);
        }
    }

    fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            log::warn!(
                "outbox writes work again after {:?}; {} requests were refused meanwhile",
                since.elapsed(),
                self.refused
            );
        }
        self.last_report = None;
        self.refused = 0;
    }
}

/// sled reports a database locked by another open handle only through the
/// text of an I/O error.
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens a generation's database, and syncs what sled wrote without syncing
/// on the way (see [`durable`]). This process holds the outbox's directory
/// lock, so a sled lock conflict can only be a handle of this process that
/// is still being released (sled lets go of its file lock asynchronously,
/// and each open file has its own): wait it out.
fn open_db(dir: &Path) -> sled::Result<sled::Db> {
    let restored = durable::before_open(dir)?;
    if restored > 0 {
        log::warn!(
            "outbox generation {}: {restored} blob files restored from keep/ (removed before the log that replaced them was synced)",
            dir.display()
        );
    }
    log::debug!("opening outbox generation {}", dir.display());
    let mut attempts = 0;
    let db = loop {
        match open_db_once(dir) {
            Err(e) if is_lock_error(&e) && attempts < 400 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            other => break other?,
        }
    };
    durable::after_open(dir)?;
    Ok(db)
}

fn open_db_once(dir: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        // We flush ourselves, once per group commit.
        .flush_every_ms(None)
        .cache_capacity(8 << 20)
        .mode(sled::Mode::HighThroughput)
        .open()
}

fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

struct Job {
    batch: AppendBatch,
    done: Sender<Result<(), AppendError>>,
}

/// The connections' handle: append a batch and wait until it is on disk.
#[derive(Clone)]
pub struct Appender {
    jobs: Sender<Job>,
}

impl Appender {
    pub async fn append(&self, batch: AppendBatch) -> Result<(), AppendError> {
        let (done, wait) = channel::bounded(1);
        self.jobs
            .send(Job { batch, done })
            .await
            .map_err(|_| AppendError::Closed)?;
        wait.recv().await.map_err(|_| AppendError::Closed)?
    }
}

/// Starts the group-commit writer; it runs until every [`Appender`] is gone.
pub fn start_writer(
    store: Arc<Store>,
    flush_interval: Duration,
) -> (Appender, impl std::future::Future<Output = ()>) {
    let (jobs, rx) = channel::bounded(JOB_QUEUE);
    (Appender { jobs }, run_writer(store, rx, flush_interval))
}

async fn run_writer(store: Arc<Store>, jobs: Receiver<Job>, flush_interval: Duration) {
    let mut next_seq = store.committed.load(SeqCst);
    let mut write_errors = ErrorThrottle::default();
    let mut retry_at: Option<Instant> = None;
    let mut last_disk_check = Instant::now();
    while let Ok(first) = jobs.recv().await {
        let mut group = vec![first];
        let mut bytes = group[0].batch.bytes();
        if !flush_interval.is_zero() {
            // Gather more requests for this flush, but never past the interval.
            let deadline = Instant::now() + flush_interval;
            while bytes < MAX_BATCH_BYTES {
                let next = smol::future::or(async { jobs.recv().await.ok() }, async {
                    smol::Timer::at(deadline).await;
                    None
                })
                .await;
                match next {
                    Some(job) => {
                        bytes += job.batch.bytes();
                        group.push(job);
                    }
                    None => break,
                }
            }
        }
        while bytes < MAX_BATCH_BYTES {
            match jobs.try_recv() {
                Ok(job) => {
                    bytes += job.batch.bytes();
                    group.push(job);
                }
                Err(_) => break,
            }
        }

        if last_disk_check.elapsed() >= DISK_CHECK_EVERY {
            store.measure_disk();
            last_disk_check = Instant::now();
        }
        // Refuse jobs past the cap; keep the rest in arrival order.
        let mut records = Vec::new();
        let mut record = AppendBatch::new();
        let mut accepted = Vec::with_capacity(group.len());
        let mut pending = 0u64;
        for job in group {
            let size = (job.batch.bytes() - HEADER_LEN) as u64;
            if store.would_exceed(pending + HEADER_LEN as u64, size) {
                let _ = job.done.try_send(Err(AppendError::Full));
                continue;
            }
            pending += size;
            for entry in job.batch.raw_entries() {
                if !record.is_empty() && record.bytes() + entry.len() > RECORD_BYTES {
                    records.push(std::mem::take(&mut record).seal());
                }
                record.push_raw(entry);
            }
            accepted.push(job.done);
        }
        if !record.is_empty() {
            records.push(record.seal());
        }
        if records.is_empty() {
            continue;
        }
        let count: u32 = records
            .iter()
            .map(|r| Batch::parse(r).map_or(0, |b| b.count))
            .sum();
        let len: u64 = records.iter().map(|r| r.len() as u64).sum();
        let first = next_seq;
        let batches = records.len() as u64;
        next_seq += batches;

        let generation = store.active();
        // After a failure, the store is not tried again for a moment: every
        // device would otherwise make the gateway reopen it in a loop.
        let db = match retry_at.filter(|at| Instant::now() < *at) {
            Some(_) => Err(None),
            None => generation.db().map_err(Some),
        };
        let db = match db {
            Ok(db) => db,
            Err(e) => {
                write_errors.refused += u64::from(count);
                let refusal = match &e {
                    None => write_errors.last_refusal.clone(),
                    Some(OutboxError::Open { source, .. }) if is_disk_full(source) => {
                        AppendError::Full
                    }
                    Some(other) => AppendError::Store(other.to_string()),
                };
                if let Some(e) = e {
                    write_errors.report(0, &e);
                    write_errors.last_refusal = refusal.clone();
                    retry_at = Some(Instant::now() + RETRY_AFTER_WRITE_ERROR);
                }
                store.committed.store(next_seq, SeqCst);
                for done in accepted {
                    let _ = done.try_send(Err(refusal.clone()));
                }
                continue;
            }
        };
        // The handle goes into the blocking closure and dies there: a clone
        // kept here would hold sled's file lock after a rotation closed the
        // generation, and the producer could not open it.
        let marker = generation.clone();
        let result = smol::unblock(move || {
            let written = (|| {
                for (seq, value) in (first..).zip(records) {
                    db.insert(seq.to_be_bytes(), value)?;
                }
                db.flush()?;
                marker.make_durable()?;
                marker.mark_flushed(first + batches);
                Ok::<_, sled::Error>(())
            })();
            if written.is_err() {
                // The device keeps its copy; do not send one it was not acked.
                for seq in first..first + batches {
                    let _ = db.remove(seq.to_be_bytes());
                }
            }
            written
        })
        .await;
        store.metrics.outbox_flushes.fetch_add(1, Relaxed);
        let reply = match result {
            Ok(()) => {
                write_errors.recovered();
                retry_at = None;
                generation.batches.fetch_add(batches, SeqCst);
                generation.appended.fetch_add(len, SeqCst);
                store.live_bytes.fetch_add(len, SeqCst);
                store.disk_since.fetch_add(len, SeqCst);
                let metrics = &store.metrics;
                metrics
                    .outbox_disk_bytes
                    .store(store.disk_estimate(), Relaxed);
                metrics.outbox_batches.fetch_add(batches as i64, Relaxed);
                metrics.outbox_records.fetch_add(i64::from(count), Relaxed);
                metrics.outbox_bytes.fetch_add(len as i64, Relaxed);
                store.committed.store(next_seq, SeqCst);
                // Only now: a new generation starts at `committed`, so every
                // seq of this group must be below it.
                store.maybe_rotate();
                if let Err(TrySendError::Closed(_)) = store.doorbell.try_send(()) {
                    log::debug!("outbox appended with no producer listening");
                }
                Ok(())
            }
            Err(e) => {
                store.metrics.outbox_write_errors.fetch_add(1, Relaxed);
                write_errors.report(count, &e);
                store.committed.store(next_seq, SeqCst);
                // sled keeps failing with its first I/O error for the rest of
                // the life of that handle, even once the disk has room again:
                // drop it, so the next append (or read) opens it afresh.
                generation.reset();
                retry_at = Some(Instant::now() + RETRY_AFTER_WRITE_ERROR);
                let refusal = if is_disk_full(&e) {
                    AppendError::Full
                } else {
                    AppendError::Store(e.to_string())
                };
                write_errors.last_refusal = refusal.clone();
                Err(refusal)
            }
        };
        for done in accepted {
            let _ = done.try_send(reply.clone());
        }
    }
    if let Err(e) = smol::unblock(move || store.flush()).await {
        log::error!("final outbox flush failed: {e}");
    }
}

mod durable;
#[cfg(test)]
mod model_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ids: &[u128]) -> AppendBatch {
        let mut b = AppendBatch::new();
        for &id in ids {
            b.push(format!("k{id}").as_bytes(), &Uuid::from_u128(id), |out| {
                out.extend_from_slice(format!("{{\"n\":{id}}}").as_bytes())
            });
        }
        b
    }

    fn ids(value: &[u8]) -> Vec<u128> {
        Batch::parse(value)
            .unwrap()
            .entries()
            .map(|e| e.message_id.as_u128())
            .collect()
    }

    #[test]
    fn sealed_batch_round_trips() {
        let mut b = batch(&[1, 2]);
        for entry in batch(&[3]).raw_entries() {
            b.push_raw(entry);
        }
        let value = b.seal();
        let parsed = Batch::parse(&value).unwrap();
        assert_eq!(parsed.count, 3);
        let entries: Vec<Entry<'_>> = parsed.entries().collect();
        assert_eq!(entries[2].key, b"k3");
        assert_eq!(entries[2].payload, b"{\"n\":3}");
        assert_eq!(ids(&value), vec![1, 2, 3]);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let value = batch(&[1, 2, 3]).seal();
        for i in 0..value.len() {
            let mut bad = value.clone();
            bad[i] ^= 0x40;
            assert!(Batch::parse(&bad).is_err(), "flip at {i} went unnoticed");
        }
        assert_eq!(
            Batch::parse(&value[..value.len() - 1]).unwrap_err(),
            CorruptBatch::Checksum
        );
        assert_eq!(Batch::parse(&value[..5]).unwrap_err(), CorruptBatch::Short);
    }

    fn open(dir: &Path, max: u64) -> (Arc<Store>, Receiver<()>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let (s, r) = Store::open(&dir.join("outbox"), max, metrics.clone()).unwrap();
        (s, r, metrics)
    }

    fn drain(store: &Store) -> Vec<u128> {
        let mut seq = 0;
        let mut out = Vec::new();
        while let Some((s, v)) = store.next_batch(seq).unwrap() {
            out.extend(ids(&v));
            seq = s + 1;
        }
        out
    }

    #[test]
    fn appends_survive_reopen_in_order_and_removals_stick() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, rung, _) = open(dir.path(), 1 << 30);
            let (appender, writer) = start_writer(store.clone(), Duration::from_millis(1));
            let task = smol::spawn(writer);
            smol::block_on(async {
                appender.append(batch(&[1, 2])).await.unwrap();
                appender.append(batch(&[3])).await.unwrap();
                appender.append(batch(&[4])).await.unwrap();
            });
            assert!(rung.try_recv().is_ok(), "producer must be told");
            drop(appender);
            smol::block_on(task);
            let (seq, v) = store.next_batch(0).unwrap().unwrap();
            store.remove(seq, v.len() as u64, 2).unwrap();
            store.flush().unwrap();
        }
        let (store, _, metrics) = open(dir.path(), 1 << 30);
        assert_eq!(drain(&store), vec![3, 4]);
        assert_eq!(metrics.outbox_records.load(Relaxed), 2);
        // New appends go after the old ones.
        let (appender, writer) = start_writer(store.clone(), Duration::ZERO);
        let task = smol::spawn(writer);
        smol::block_on(appender.append(batch(&[5]))).unwrap();
        drop(appender);
        smol::block_on(task);
        assert_eq!(drain(&store), vec![3, 4, 5]);
    }

    #[test]
    fn drained_generations_are_deleted_so_a_full_outbox_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, metrics) = open(dir.path(), 2 << 20);
        let (appender, writer) = start_writer(store.clone(), Duration::ZERO);
        let task = smol::spawn(writer);
        let big = |id: u128| {
            let mut b = AppendBatch::new();
            b.push(b"k", &Uuid::from_u128(id), |out| {
                out.extend(std::iter::repeat_n(b'x', 100 << 10))
            });
            b
        };
        let mut id = 0;
        let (mut acked, mut delivered) = (Vec::new(), Vec::new());
        smol::block_on(async {
            for _round in 0..3 {
                // Fill to the cap, pausing so the writer measures the disk.
                loop {
                    id += 1;
                    match appender.append(big(id)).await {
                        Ok(()) => acked.push(id),
                        Err(AppendError::Full) => break,
                        Err(e) => panic!("{e}"),
                    }
                    if id % 4 == 0 {
                        smol::Timer::after(Duration::from_millis(120)).await;
                    }
                    assert!(id < 1000, "the cap never applied");
                }
                // Deliver everything, as the producer would: every acked
                // id exactly once, in order, across generations.
                let mut seq = 0;
                while let Some((s, v)) = store.next_batch(seq).unwrap() {
                    delivered.extend(ids(&v));
                    store.remove(s, v.len() as u64, 1).unwrap();
                    seq = s + 1;
                }
                assert_eq!(delivered, acked, "round {_round}");
                assert!(store.is_empty());
                smol::Timer::after(DISK_CHECK_EVERY + Duration::from_millis(100)).await;
                id += 1;
                appender.append(big(id)).await.expect("space came back");
                acked.push(id);
            }
        });
        let dirs = std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .count();
        assert!(dirs <= 3, "{dirs} generations left behind");
        assert!(metrics.outbox_disk_bytes.load(Relaxed) <= 2 << 20);
        drop(appender);
        smol::block_on(task);
    }

    #[test]
    fn cap_refuses_with_full_and_keeps_what_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = open(dir.path(), 1 << 20);
        let (appender, writer) = start_writer(store.clone(), Duration::ZERO);
        let task = smol::spawn(writer);
        let big = |id: u128| {
            let mut b = AppendBatch::new();
            b.push(b"k", &Uuid::from_u128(id), |out| {
                out.extend(std::iter::repeat_n(b'x', 300 << 10))
            });
            b
        };
        smol::block_on(async {
            appender.append(big(1)).await.unwrap();
            appender.append(big(2)).await.unwrap();
            appender.append(big(3)).await.unwrap();
            assert_eq!(appender.append(big(4)).await, Err(AppendError::Full));
        });
        assert_eq!(drain(&store), vec![1, 2, 3]);
        drop(appender);
        smol::block_on(task);
    }
}
