//! The store: the generations, oldest first, shared by the writer (appends)
//! and the producer (reads and removes), and the byte cap.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};

use smol::channel::{self, Receiver, Sender};

use super::durable;
use super::generation::{load_generation, open_db, seq_of, Generation};
use super::hot::Hot;
use super::large;
use super::marks::{read_mark, write_mark, REMOVED_FILE};
use super::record::Compression;
use super::OutboxError;
use crate::ops::build::unix_ms;
use crate::ops::metrics::Metrics;

/// A generation is closed to appends at this size on disk (or a quarter of
/// the cap, if smaller): bounds the memory sled holds per open generation.
pub(super) const GENERATION_BYTES: u64 = 16 << 20;
/// sled 0.34's log segment (its default `segment_size`).
const SLED_SEGMENT_BYTES: u64 = 512 << 10;

/// The store shared by the writer (appends) and the producer (reads and
/// removes).
pub struct Store {
    pub(super) root: PathBuf,
    /// Held for the life of the store: one process per outbox. sled locks
    /// each database, but a generation this process keeps closed would
    /// otherwise be open to another one.
    pub(super) _lock: std::fs::File,
    /// Oldest first; the last one takes new batches.
    pub(super) generations: RwLock<Vec<Arc<Generation>>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) max_bytes: u64,
    /// Start a new generation once the active one occupies this much disk.
    pub(super) rotate_at: u64,
    /// `first_seq` of the generation the producer reads from.
    pub(super) reading: AtomicU64,
    pub(super) live_bytes: AtomicU64,
    /// Size on disk at the last measurement, and bytes appended since.
    pub(super) disk_measured: AtomicU64,
    pub(super) disk_since: AtomicU64,
    /// Batches below this seq are flushed and may be sent.
    pub(super) committed: AtomicU64,
    /// Rung after each flush that made new batches readable.
    pub(super) doorbell: Sender<()>,
    /// [`REMOVED_FILE`] and the mark last written and synced to it.
    pub(super) removed: Mutex<(Option<std::fs::File>, u64)>,
    /// The same mark, read without the lock: batches below it may be removed.
    pub(super) removal_limit: AtomicU64,
    /// Records not on disk yet (memory-first mode).
    pub hot: Hot,
    /// Records Kafka has confirmed since start, whichever way they came:
    /// the writer leaves its outage mode once this moves.
    pub(super) confirmations: AtomicU64,
    /// How records are written (`outbox.compression`); both are read.
    compression: Mutex<Compression>,
    /// When each flush to disk was written (its first seq, Unix ms), oldest
    /// first: the age of the oldest request waiting, for operators.
    written_at: Mutex<VecDeque<(u64, u64)>>,
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
            confirmations: AtomicU64::new(0),
            hot: Hot::default(),
            compression: Mutex::new(Compression::Zstd),
            written_at: Mutex::new(VecDeque::new()),
        };
        store.metrics.outbox_max_bytes.store(max_bytes, Relaxed);
        store.scan(&firsts)?;
        store.add_generation()?;
        store.retire_drained();
        store.measure_disk();
        Ok((Arc::new(store), rung))
    }

    pub(super) fn generations(&self) -> Vec<Arc<Generation>> {
        self.generations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn active(&self) -> Arc<Generation> {
        self.generations()
            .last()
            .cloned()
            .expect("the outbox always has a generation")
    }

    /// Counts what a previous run left behind, one generation at a time
    /// (each is closed again after), so the backlog is never all in memory.
    pub(super) fn scan(&self, firsts: &[u64]) -> Result<(), OutboxError> {
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
            // Their age is not recorded: counted from this start.
            self.note_written(0);
            log::info!(
                "outbox holds {records} requests in {batches} batches ({bytes} bytes) from before; replaying them first"
            );
        }
        Ok(())
    }

    /// Starts a new generation for appends, beginning at the next seq, and
    /// closes the previous one unless the producer is reading it.
    pub(super) fn add_generation(&self) -> Result<(), OutboxError> {
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
    pub(super) fn retire_drained(&self) {
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

    /// The first flushed batch at or after `seq` (and below `limit`).
    pub(super) fn next_batch(
        &self,
        seq: u64,
        limit: Option<u64>,
    ) -> Result<Option<(u64, sled::IVec)>, OutboxError> {
        let end = self.committed.load(SeqCst).min(limit.unwrap_or(u64::MAX));
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
            let found = {
                let _not_committing = generation.between_commits();
                db.range(start.to_be_bytes()..end.to_be_bytes()).next()
            };
            if let Some(item) = found {
                let (key, value) = item?;
                let seq = seq_of(&key);
                if large::is_pointer(&value) {
                    match large::read(&generation.dir, seq) {
                        Ok(record) => return Ok(Some((seq, record.into()))),
                        // Gone: the pointer goes on, and the reader reports
                        // it as damage and moves past it.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        // Another error may pass (too many open files, say):
                        // the producer reads it again later.
                        Err(source) => {
                            return Err(OutboxError::ReadFile {
                                path: large::path(&generation.dir, seq),
                                source,
                            })
                        }
                    }
                }
                return Ok(Some((seq, value)));
            }
        }
        Ok(None)
    }

    /// How records are written from now on.
    pub fn set_compression(&self, compression: Compression) {
        *self.compression.lock().unwrap_or_else(|p| p.into_inner()) = compression;
    }

    pub(super) fn compression(&self) -> Compression {
        *self.compression.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes a batch whose requests Kafka confirmed (or a corrupt one).
    /// Its size is what it takes on disk, as found there.
    pub(super) fn remove(&self, seq: u64, records: u32) -> Result<(), OutboxError> {
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
        let db = generation.db()?;
        let removed = {
            let _not_committing = generation.between_commits();
            db.remove(seq.to_be_bytes())?
        };
        let Some(removed) = removed else {
            return Ok(()); // already gone
        };
        let bytes = if large::is_pointer(&removed) {
            // After the pointer: a cut between the two, or a failed delete,
            // leaves a file without a pointer, which the next start deletes.
            if let Err(e) = large::remove(&generation.dir, seq) {
                log::warn!(
                    "cannot delete the file of outbox batch {seq} in {}: {e}",
                    generation.dir.display()
                );
            }
            let bytes = large::file_len(&removed);
            generation.large_bytes.fetch_sub(bytes, SeqCst);
            bytes
        } else {
            removed.len() as u64
        };
        generation.batches.fetch_sub(1, SeqCst);
        self.live_bytes.fetch_sub(bytes, SeqCst);
        self.metrics.outbox_batches.fetch_sub(1, Relaxed);
        self.metrics
            .outbox_records
            .fetch_sub(i64::from(records), Relaxed);
        self.metrics.outbox_bytes.fetch_sub(bytes as i64, Relaxed);
        self.note_removed(seq);
        if generations.len() > 1 && generation.is_empty() {
            self.retire_drained();
        }
        // Room again for a request of a typical size: ready again, even
        // before a device tries.
        if self.metrics.outbox_full.load(SeqCst) != 0 && !self.would_exceed(0, 64 << 10) {
            self.set_full(false);
        }
        Ok(())
    }

    /// A flush wrote batches from `first_seq` on.
    pub(super) fn note_written(&self, first_seq: u64) {
        let now = unix_ms();
        let mut written = self.written_at.lock().unwrap_or_else(|p| p.into_inner());
        if written.is_empty() {
            self.metrics.outbox_oldest_unix_ms.store(now, Relaxed);
        }
        written.push_back((first_seq, now));
    }

    /// The batch `seq` left. Kafka takes batches in order, so every flush
    /// that ends at or before it is gone.
    fn note_removed(&self, seq: u64) {
        let mut written = self.written_at.lock().unwrap_or_else(|p| p.into_inner());
        while written.len() > 1 && written[1].0 <= seq + 1 {
            written.pop_front();
        }
        if self.metrics.outbox_batches.load(Relaxed) <= 0 {
            written.clear();
        }
        let oldest = written.front().map_or(0, |&(_, at)| at);
        self.metrics.outbox_oldest_unix_ms.store(oldest, Relaxed);
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

    /// Nothing waits for Kafka, on disk or in memory.
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty() && self.generations().iter().all(|g| g.is_empty())
    }

    /// Wakes the producer (used to make it notice a stop request).
    pub fn wake(&self) {
        let _ = self.doorbell.try_send(());
    }

    /// Measures the size on disk of every generation.
    pub(super) fn measure_disk(&self) -> u64 {
        let total = self.generations().iter().map(|g| g.disk_bytes()).sum();
        self.disk_measured.store(total, SeqCst);
        self.disk_since.store(0, SeqCst);
        self.metrics.outbox_disk_bytes.store(total, Relaxed);
        total
    }

    /// Disk use as last measured plus what was appended since (sled writes
    /// at least that much), so the cap holds between measurements.
    pub(super) fn disk_estimate(&self) -> u64 {
        self.disk_measured.load(SeqCst) + self.disk_since.load(SeqCst)
    }

    /// Past half the cap: the estimate between measurements is not enough.
    pub(super) fn near_cap(&self) -> bool {
        self.disk_estimate() > self.max_bytes / 2
    }

    /// Says so, once, when the outbox starts refusing for lack of room and when
    /// it takes requests again (the gauge drives `/readyz`).
    pub(super) fn set_full(&self, full: bool) {
        let was = self.metrics.outbox_full.swap(i64::from(full), SeqCst) != 0;
        if full && !was {
            log::warn!(
                "the outbox is full ({} bytes on disk, outbox.max_bytes {}): new requests get outbox_full until Kafka takes some",
                self.disk_estimate(),
                self.max_bytes
            );
        } else if !full && was {
            log::info!("the outbox has room again: requests are accepted");
        }
    }

    /// True if `incoming` bytes more would take the outbox past its cap.
    /// On disk, room is kept for one more sled segment: the log grows by
    /// whole segments, so one write can add that much at once.
    pub(super) fn would_exceed(&self, pending: u64, incoming: u64) -> bool {
        let live = self.live_bytes.load(SeqCst);
        live + pending + incoming > self.max_bytes
            || self.disk_estimate() + pending + incoming + SLED_SEGMENT_BYTES > self.max_bytes
    }

    /// Closes a large active generation to appends, so that it can be
    /// deleted once drained and its pages leave memory meanwhile.
    pub(super) fn maybe_rotate(&self) {
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

/// Locks the outbox for this process and writes its PID in the lock file,
/// so that a second one can say who holds it.
pub(super) fn lock_dir(root: &Path) -> Result<std::fs::File, OutboxError> {
    use std::io::{Read, Seek, Write};
    let path = root.join("lock");
    let io = |source| OutboxError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {
            // Not synced: only a running process's PID means anything.
            let pid = std::process::id().to_string();
            let written = file
                .set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(pid.as_bytes()));
            if let Err(e) = written {
                log::warn!("cannot write the PID into {}: {e}", path.display());
            }
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim().parse::<u32>() {
                Ok(pid) => format!(" (PID {pid})"),
                Err(_) => String::new(),
            };
            Err(OutboxError::InUse {
                path: root.to_owned(),
                holder,
            })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}
