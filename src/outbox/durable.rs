//! What sled 0.34 leaves unsynced, synced by the outbox.
//!
//! sled calls a flush durable once its log is written with `pwrite` and
//! `sync_file_range`: that reaches neither the file's size nor the device's
//! write cache, so a power cut can take back everything since the last real
//! `fsync`, which sled only does in a periodic flusher the outbox turns off.
//! It never syncs `conf`, a blob file or a directory either. So:
//!
//! - before a generation is opened, every blob file is synced and kept
//!   ([`before_open`]): sled's recovery syncs the log, which may point to
//!   blobs an earlier handle of this process wrote;
//! - after it is opened (created, or recovered, which may write a
//!   snapshot and rename it): `conf`, every snapshot file, `db`, `blobs/`
//!   and the generation's directory are synced ([`after_open`]);
//! - after each group commit's flush, before any of it is acked: new blob
//!   files sled has finished writing are synced and linked into `keep/`,
//!   both directories synced, then the log (`db`) is synced
//!   ([`Blobs::sync_new`], then the caller's `sync_data`); one still being
//!   written is left for the next commit ([`is_complete`]).
//!
//! `keep/` exists because a blob's removal and its creation need opposite
//! orders: a new blob must be durable before the log that points to it,
//! while sled unlinks a blob as soon as it holds the log that replaces the
//! pointer "stable", which can be before our next `fsync` of the log. With
//! a second name in `keep/`, an unlink that became durable too early is
//! undone on the next open ([`restore_kept_blobs`]); `keep/` goes with the
//! generation once it is drained. The outbox itself no longer makes blobs:
//! it keeps every value in the tree small enough that sled's nodes stay in
//! the log, and larger records in files of its own ([`super::large`]). This
//! stays for stores written before that, and as a second line.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::Path;

/// sled's directory of values too large for its log.
const BLOBS: &str = "blobs";
/// Second names of blob files, so that no unlink of sled's can lose one.
const KEEP: &str = "keep";

/// `fsync` of a file or directory by path.
pub fn sync_path(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// A directory's entries, or `None` if it does not exist (sled creates
/// `blobs/` and we create `keep/` only when first needed).
fn entries_if_any(dir: &Path) -> io::Result<Option<std::fs::ReadDir>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(Some(entries)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Syncs what sled wrote without syncing when it opened a generation.
pub fn after_open(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let sled_file =
            name == "conf" || name == "db" || name.to_string_lossy().starts_with("snap.");
        if sled_file && entry.file_type()?.is_file() {
            sync_path(&entry.path())?;
        }
    }
    if dir.join(BLOBS).is_dir() {
        sync_path(&dir.join(BLOBS))?;
    }
    forget_discarded_blobs(dir)?;
    sync_path(dir)
}

/// After sled's recovery: drops the `keep/` names of blobs it discarded.
///
/// [`before_open`] put every kept blob back, so a name in `keep/` with none
/// in `blobs/` is one recovery removed as newer than the log it kept (its
/// entry was lost with the cut). sled names blobs by log position and goes
/// on writing from where the log now ends, so it will write a different
/// blob under that name; a stale second name would then be put back in its
/// place by a later open. The removals in `blobs/` are synced first (by the
/// caller), so a cut in between only lets the next open do this again.
fn forget_discarded_blobs(dir: &Path) -> io::Result<()> {
    let Some(kept) = entries_if_any(&dir.join(KEEP))? else {
        return Ok(());
    };
    let mut forgot = 0;
    for entry in kept {
        let entry = entry?;
        if !dir.join(BLOBS).join(entry.file_name()).exists() {
            std::fs::remove_file(entry.path())?;
            forgot += 1;
        }
    }
    if forgot > 0 {
        log::debug!(
            "outbox generation {}: {forgot} kept blob names dropped (discarded by sled's recovery)",
            dir.display()
        );
        sync_path(&dir.join(KEEP))?;
    }
    Ok(())
}

/// Before sled opens a generation: puts back blob files from `keep/` (see
/// [`restore_kept_blobs`]), then makes every blob file durable with its
/// second name. sled's recovery syncs the log itself (when it zeroes the
/// tail of the last segment), and the log may point to blobs an earlier
/// handle wrote without a sync (the producer's removals rewrite nodes of a
/// generation no group commit syncs): they must be durable first.
pub fn before_open(dir: &Path) -> io::Result<usize> {
    remove_unfinished_snapshots(dir)?;
    let restored = restore_kept_blobs(dir)?;
    Blobs::default().sync_new(dir)?;
    Ok(restored)
}

/// sled 0.34 writes a snapshot to `snap.<lsn>.generating`, syncs it and
/// renames it, but on open takes the last `snap.*` name in sort order,
/// `.generating` included: a process killed (or a power cut) between the
/// create and the rename leaves an empty or partial file that sorts after
/// the good snapshot, and sled then refuses the whole store as corrupt. Such
/// a file was never finished: without it sled uses the previous snapshot and
/// replays its log from there.
fn remove_unfinished_snapshots(dir: &Path) -> io::Result<()> {
    let Some(entries) = entries_if_any(dir)? else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            log::warn!(
                "outbox generation {}: removing the unfinished sled snapshot {name} (written when the process stopped)",
                dir.display()
            );
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Puts back blob files that sled unlinked but whose unlink outlived the
/// log that made them unneeded (see the module doc).
fn restore_kept_blobs(dir: &Path) -> io::Result<usize> {
    let Some(kept) = entries_if_any(&dir.join(KEEP))? else {
        return Ok(0);
    };
    let mut restored = 0;
    for entry in kept {
        let entry = entry?;
        let blob = dir.join(BLOBS).join(entry.file_name());
        if !blob.exists() {
            std::fs::create_dir_all(dir.join(BLOBS))?;
            std::fs::hard_link(entry.path(), &blob)?;
            restored += 1;
        }
    }
    if restored > 0 {
        sync_path(&dir.join(BLOBS))?;
    }
    Ok(restored)
}

/// The blob files of one generation already made durable.
#[derive(Default)]
pub struct Blobs {
    synced: HashSet<OsString>,
}

impl Blobs {
    /// Makes every blob file sled created since the last call durable, with
    /// a second name in `keep/`. A cheap `readdir` when there are none.
    pub fn sync_new(&mut self, dir: &Path) -> io::Result<()> {
        let Some(entries) = entries_if_any(&dir.join(BLOBS))? else {
            return Ok(());
        };
        let mut present = HashSet::new();
        let mut new = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            if !self.synced.contains(&name) {
                new.push(name.clone());
            }
            present.insert(name);
        }
        // Names sled removed need no tracking any more.
        self.synced.retain(|name| present.contains(name));
        if new.is_empty() {
            return Ok(());
        }
        let keep = dir.join(KEEP);
        if !keep.is_dir() {
            std::fs::create_dir(&keep)?;
            sync_path(dir)?;
        }
        for name in &new {
            let blob = dir.join(BLOBS).join(name);
            match File::open(&blob) {
                // Still being written: synced by a later call.
                Ok(file) if !is_complete(&file)? => continue,
                Ok(file) => file.sync_all()?,
                // Written and already replaced: nothing can point to it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            match std::fs::hard_link(&blob, keep.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // The same file, linked before an earlier open; a stale
                    // one is what [`forget_discarded_blobs`] prevents.
                    debug_assert!(same_file(&blob, &keep.join(name)));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            self.synced.insert(name.clone());
        }
        sync_path(&dir.join(BLOBS))?;
        sync_path(&keep)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => true,
    }
}

/// Whether sled has finished writing a blob file: its checksum (4 bytes,
/// little-endian CRC-32 of the rest) matches, as sled's `read_blob` checks.
///
/// A blob synced half written is never synced again here, and after a power
/// cut sled's recovery stops reading the log at a blob it cannot read: every
/// record acknowledged after it would be lost. A group commit keeps the
/// producer out of sled (`Generation::committing`), which is where such a
/// blob came from (sled rewrites nodes in whichever thread walks the tree);
/// this check keeps `sync_new` right on its own, for a read and a CRC of
/// each new blob, small beside its fsync.
/// A blob skipped here is synced by the next commit, whose flush waits for
/// its write (sled makes no log entry stable before its blob is written).
fn is_complete(mut file: &File) -> io::Result<bool> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let Some((crc, rest)) = bytes.split_first_chunk::<4>() else {
        return Ok(false);
    };
    Ok(!rest.is_empty() && u32::from_le_bytes(*crc) == crc32fast::hash(rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    /// A blob file as sled writes it: CRC-32 of the kind byte and the data,
    /// then the kind byte and the data.
    fn sled_blob(data: &[u8]) -> Vec<u8> {
        let mut rest = vec![7u8];
        rest.extend_from_slice(data);
        let mut blob = crc32fast::hash(&rest).to_le_bytes().to_vec();
        blob.extend_from_slice(&rest);
        blob
    }

    /// A generation's directory with sled's `blobs/` in it.
    fn generation_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(BLOBS)).unwrap();
        dir
    }

    #[test]
    fn a_blob_discarded_by_recovery_loses_its_kept_name() {
        let dir = generation_dir();
        let dir = dir.path();
        let old = sled_blob(b"old timeline");
        std::fs::write(dir.join(BLOBS).join("7"), &old).unwrap();
        std::fs::write(dir.join(BLOBS).join("8"), &old).unwrap();
        Blobs::default().sync_new(dir).unwrap();
        // sled's recovery removes 7 (past the log it kept) and keeps 8.
        std::fs::remove_file(dir.join(BLOBS).join("7")).unwrap();
        after_open(dir).unwrap();
        assert!(!dir.join(KEEP).join("7").exists());
        assert!(dir.join(KEEP).join("8").exists());
        // sled writes a new blob 7; removed again, the new one comes back.
        let new = sled_blob(b"new timeline");
        std::fs::write(dir.join(BLOBS).join("7"), &new).unwrap();
        Blobs::default().sync_new(dir).unwrap();
        std::fs::remove_file(dir.join(BLOBS).join("7")).unwrap();
        assert_eq!(before_open(dir).unwrap(), 1);
        assert_eq!(std::fs::read(dir.join(BLOBS).join("7")).unwrap(), new);
    }

    #[test]
    fn a_blob_still_being_written_is_synced_once_it_is_complete() {
        let dir = generation_dir();
        let dir = dir.path();
        let whole = sled_blob(&[42; 1000]);
        let path = dir.join(BLOBS).join("4096");
        let mut blobs = Blobs::default();
        // Created, then the checksum alone, then part of the data.
        for written in [0, 4, 500] {
            std::fs::write(&path, &whole[..written]).unwrap();
            blobs.sync_new(dir).unwrap();
            assert!(blobs.synced.is_empty(), "{written} bytes taken as whole");
            assert!(!dir.join(KEEP).join("4096").exists());
        }
        std::fs::write(&path, &whole).unwrap();
        blobs.sync_new(dir).unwrap();
        assert!(blobs.synced.contains(OsStr::new("4096")));
        assert_eq!(std::fs::read(dir.join(KEEP).join("4096")).unwrap(), whole);
    }

    #[test]
    fn new_blobs_get_a_second_name_that_restores_them() {
        let dir = generation_dir();
        let dir = dir.path();
        let blob = sled_blob(b"node");
        std::fs::write(dir.join(BLOBS).join("42"), &blob).unwrap();
        let mut blobs = Blobs::default();
        blobs.sync_new(dir).unwrap();
        assert_eq!(std::fs::read(dir.join(KEEP).join("42")).unwrap(), blob);
        // sled unlinks it; the next open brings it back.
        std::fs::remove_file(dir.join(BLOBS).join("42")).unwrap();
        assert_eq!(restore_kept_blobs(dir).unwrap(), 1);
        assert_eq!(std::fs::read(dir.join(BLOBS).join("42")).unwrap(), blob);
        assert_eq!(restore_kept_blobs(dir).unwrap(), 0);
        // Nothing new: nothing done, and a removed name is forgotten.
        std::fs::remove_file(dir.join(BLOBS).join("42")).unwrap();
        blobs.sync_new(dir).unwrap();
        assert!(blobs.synced.is_empty());
    }
}
