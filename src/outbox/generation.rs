//! One sled database of the outbox (a generation): opening it, syncing
//! what sled leaves unsynced, and loading one an earlier run left.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use super::durable;
use super::large;
use super::marks::{read_mark, write_mark, FLUSHED_FILE};
use super::record::stored_count;
use super::OutboxError;
use crate::ops::metrics::Metrics;

/// One sled database of the outbox, named by the first seq it may hold.
///
/// sled 0.34 keeps every page it has read or written in memory for as long
/// as the database is open, whatever its cache setting; so a generation is
/// only open while it is written (the newest) or read (the one the producer
/// is draining), and is small. That is what keeps memory flat however large
/// the backlog.
pub(super) struct Generation {
    pub(super) first_seq: u64,
    pub(super) dir: PathBuf,
    pub(super) db: Mutex<Option<sled::Db>>,
    /// Batches stored in it and not yet removed.
    pub(super) batches: AtomicU64,
    /// Bytes appended to it by this process (it rotates on this, so no
    /// directory walk is needed per flush).
    pub(super) appended: AtomicU64,
    /// Bytes in its `large/` files, counted as they are written and
    /// removed: a hub's outage leaves hundreds of thousands of them, too
    /// many to walk every time the disk is measured.
    pub(super) large_bytes: AtomicU64,
    /// Drained and deleted: must not be opened again (that would recreate
    /// its directory).
    pub(super) retired: AtomicBool,
    /// The `flushed` file, open once written.
    pub(super) flushed: Mutex<Option<std::fs::File>>,
    /// A `flushed` mark was written and not synced yet.
    pub(super) flushed_unsynced: AtomicBool,
    /// The `flushed` file was created by this process: its name needs a
    /// sync of the directory.
    pub(super) flushed_created: AtomicBool,
    /// Our own handle on sled's log, to fsync it.
    pub(super) log: Mutex<Option<std::fs::File>>,
    /// Blob files already made durable.
    pub(super) blobs: Mutex<durable::Blobs>,
    /// Held for writing by a group commit from its first insert to its
    /// log's fsync, and for reading by the producer's reads and removals.
    /// sled rewrites tree nodes (splits, merges) in whichever thread walks
    /// the tree, and a node large enough goes to a blob file: one written
    /// by the producer between the commit's look at `blobs/` and its fsync
    /// of the log could be pointed to by the synced log while the file
    /// itself was not synced. After a power cut sled would then skip the
    /// new node (a split's right half, acknowledged records with it) or
    /// stop reading the log there. Outside a commit, whatever the producer
    /// writes is synced by the next commit, blobs before the log.
    commit: RwLock<()>,
}

impl Generation {
    pub(super) fn new(first_seq: u64, dir: PathBuf, db: Option<sled::Db>) -> Self {
        Generation {
            first_seq,
            dir,
            db: Mutex::new(db),
            batches: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            large_bytes: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            flushed: Mutex::new(None),
            flushed_unsynced: AtomicBool::new(false),
            flushed_created: AtomicBool::new(false),
            log: Mutex::new(None),
            blobs: Mutex::new(durable::Blobs::default()),
            commit: RwLock::new(()),
        }
    }

    /// For a group commit: no other thread touches the tree until dropped.
    pub(super) fn committing(&self) -> RwLockWriteGuard<'_, ()> {
        self.commit.write().unwrap_or_else(|p| p.into_inner())
    }

    /// For the producer's reads and removals: not during a group commit.
    pub(super) fn between_commits(&self) -> RwLockReadGuard<'_, ()> {
        self.commit.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that every seq below `next` was flushed and synced (see
    /// [`FLUSHED_FILE`]). Written here, synced by the next group commit or
    /// the close: after a power cut it may be older than the truth, never
    /// newer, so it can only under-report a loss.
    pub(super) fn mark_flushed(&self, next: u64) {
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

    pub(super) fn sync_flushed_mark(&self) -> std::io::Result<()> {
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
    pub(super) fn make_durable(&self) -> std::io::Result<()> {
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

    /// Its size on disk: sled's files as they are, `large/` as counted.
    pub(super) fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.dir, Some(large::DIR)) + self.large_bytes.load(SeqCst)
    }

    /// The open database, opening it if needed.
    pub(super) fn db(&self) -> Result<sled::Db, OutboxError> {
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

    pub(super) fn open_db(&self) -> Option<sled::Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Drops the handle without flushing (after an I/O error).
    pub(super) fn reset(&self) {
        self.db.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Flushes and closes it, releasing its pages.
    pub(super) fn close(&self) {
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

    pub(super) fn is_empty(&self) -> bool {
        self.batches.load(SeqCst) == 0
    }
}

/// What a generation held when it was loaded.
pub(super) struct GenerationStats {
    pub(super) batches: u64,
    pub(super) records: i64,
    pub(super) bytes: u64,
    /// Of `bytes`, those in `large/` files.
    pub(super) large_bytes: u64,
    pub(super) next_seq: u64,
}

/// Opens and counts one generation left by an earlier run, then closes it.
/// One that sled cannot open or read (an error, or a panic inside sled,
/// which it raises on some damaged files) is moved aside to
/// `<dir>.broken-<unix time>`, loudly, and left out: refusing to start, or
/// crash-looping, would stop every device. Its files stay for an operator.
pub(super) fn load_generation(
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
            large_bytes: 0,
            next_seq: first,
        };
        let mut pointers = std::collections::HashSet::new();
        let mut stale = Vec::new();
        for item in db.iter() {
            let (key, value) = item?;
            let seq = seq_of(&key);
            stats.next_seq = stats.next_seq.max(seq.saturating_add(1));
            let mut bytes = value.len() as u64;
            if large::is_pointer(&value) {
                if large::missing(&dir, seq) {
                    if removed.is_some_and(|r| seq < r) {
                        // Delivered: its file's deletion reached the disk,
                        // the pointer's removal did not.
                        stale.push(key);
                        continue;
                    }
                    // Acked and never delivered: the reader reports it as
                    // damage too, and moves past it.
                    log::error!(
                        "outbox store {} lost batch {seq}: the file holding it is gone; \
                         the requests in it were acknowledged and will not be sent",
                        dir.display()
                    );
                    metrics.outbox_lost_batches.fetch_add(1, Relaxed);
                }
                pointers.insert(seq);
                bytes = large::file_len(&value);
                stats.large_bytes += bytes;
            }
            stats.batches += 1;
            stats.bytes += bytes;
            // A batch that fails its checksum is counted and skipped when
            // the producer reaches it.
            if let Some(count) = stored_count(&value) {
                stats.records += i64::from(count);
            }
        }
        for key in stale {
            db.remove(key)?;
        }
        let orphans = large::remove_orphans(&dir, &pointers)?;
        if orphans > 0 {
            log::debug!(
                "outbox generation {}: {orphans} files without a pointer deleted",
                dir.display()
            );
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
            generation.large_bytes.store(stats.large_bytes, SeqCst);
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

/// sled reports a database locked by another open handle only through the
/// text of an I/O error.
pub(super) fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens a generation's database, and syncs what sled wrote without syncing
/// on the way (see [`durable`]). This process holds the outbox's directory
/// lock, so a sled lock conflict can only be a handle of this process that
/// is still being released (sled lets go of its file lock asynchronously,
/// and each open file has its own): wait it out.
pub(super) fn open_db(dir: &Path) -> sled::Result<sled::Db> {
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

pub(super) fn open_db_once(dir: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        // We flush ourselves, once per group commit.
        .flush_every_ms(None)
        .cache_capacity(8 << 20)
        .mode(sled::Mode::HighThroughput)
        .open()
}

pub(super) fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

/// Bytes of the files in `dir` and below (sled's `blobs/`, our `keep/`),
/// leaving out the directory named `skip` in `dir`. A file with two names
/// (a blob and its `keep/` link) counts once.
pub(super) fn dir_bytes(dir: &Path, skip: Option<&str>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| skip.is_none_or(|skip| e.file_name() != skip))
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path(), None),
            Ok(m) => m.len() / m.nlink().max(1),
            Err(_) => 0,
        })
        .sum()
}
