//! Records kept in files of their own (`<generation>/large/<seq, 20
//! digits>`) with a small pointer in the tree: every record of more than
//! [`INLINE_MAX`] on disk, large requests and the records of big group
//! commits alike.
//!
//! Why files: sled writes a tree node of more than about 128 KiB to a blob
//! file. The group commit syncs blob files too, but on a real disk a log
//! page that names a blob can reach the medium before the blob does (sled
//! starts writeback of its log itself; so does the kernel), and a power cut
//! then costs the node's records, acknowledged ones included. A leaf holds
//! at most about 20 values (it splits past 16 and may absorb a neighbour of
//! fewer than 4), so values of at most 6 KiB would keep every node in the
//! log. Files also cost flash less: sled's splits and consolidations
//! rewrite a tree value three to four times, a file is written about once.
//! Telemetry during an outage (`benches/outage.sh`): at full speed 169
//! bytes written per request with 6 KiB records in the tree, 48 with 32
//! KiB records in files; at 1,000 requests a second (group commits of about
//! 3.5 KiB) 488 and 240. Below [`INLINE_MAX`] a file gains nothing (200 a
//! second: 1,083 bytes written per request in the tree, 1,189 in files; the
//! sync of each commit dominates) and would spend an inode on a few
//! requests.
//!
//! A file is written and synced, with its directory entry, before its
//! pointer enters the tree: whatever part of sled's log reaches the disk, a
//! pointer in it has its file behind it.
//!
//! A pointer is removed from the tree before its file is deleted (and, when
//! a group commit fails, made durable first). Files without a pointer (an
//! append cut short, which was never acked, or a removal cut short, whose
//! record Kafka already had) and pointers whose file is gone below the
//! removal mark (a removal whose tree half did not reach the disk) are
//! dropped when the generation is loaded; a pointer above the mark without
//! its file is an acknowledged record lost, and counted so.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::durable::sync_path;
use super::record::{MAGIC, VERSION_IN_FILE};

/// The largest record stored in the tree itself; larger ones take a file.
/// At most 6 KiB, so that no tree node becomes a blob (see above).
pub(super) const INLINE_MAX: usize = 2 << 10;
const _: () = assert!(INLINE_MAX <= 6 << 10);
/// Whether a record, as stored, goes to a file rather than the tree.
pub(super) fn takes_file(record: &[u8]) -> bool {
    record.len() > INLINE_MAX
}

/// magic, version 3, crc32 (of what follows it), count, file length.
pub(super) const POINTER_LEN: usize = 14;
pub(super) const DIR: &str = "large";

/// The tree's value for a record stored in a file: its count (as
/// `stored_count` reads every version) and the file's length.
pub(super) fn pointer(record: &[u8]) -> [u8; POINTER_LEN] {
    let mut p = [0u8; POINTER_LEN];
    p[0] = MAGIC;
    p[1] = VERSION_IN_FILE;
    p[6..10].copy_from_slice(&record[6..10]);
    p[10..14].copy_from_slice(&(record.len() as u32).to_le_bytes());
    let crc = crc32fast::hash(&p[6..]);
    p[2..6].copy_from_slice(&crc.to_le_bytes());
    p
}

pub(super) fn is_pointer(value: &[u8]) -> bool {
    value.len() == POINTER_LEN && value[0] == MAGIC && value[1] == VERSION_IN_FILE
}

/// The length of the file a pointer names.
pub(super) fn file_len(pointer: &[u8]) -> u64 {
    u32::from_le_bytes(pointer[10..14].try_into().expect("4 bytes")) as u64
}

pub(super) fn path(generation: &Path, seq: u64) -> PathBuf {
    generation.join(DIR).join(format!("{seq:020}"))
}

/// Blocking: writes each record to its file and syncs the files and the
/// directory entries that name them.
pub(super) fn store<'a>(
    generation: &Path,
    records: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> io::Result<()> {
    let dir = generation.join(DIR);
    let mut any = false;
    for (seq, record) in records {
        if !any {
            std::fs::create_dir_all(&dir)?;
            any = true;
        }
        let mut file = File::create(path(generation, seq))?;
        file.write_all(record)?;
        file.sync_data()?;
    }
    if any {
        sync_path(&dir)?;
        sync_path(generation)?; // the first time, `large/` itself is new
    }
    Ok(())
}

/// Blocking: a record's file, as stored.
pub(super) fn read(generation: &Path, seq: u64) -> io::Result<Vec<u8>> {
    std::fs::read(path(generation, seq))
}

/// Deletes a record's file; one already gone is no error.
pub(super) fn remove(generation: &Path, seq: u64) -> io::Result<()> {
    match std::fs::remove_file(path(generation, seq)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// True only if the file is known to be gone: an error that may pass (too
/// many open files, say) is not taken for a loss.
pub(super) fn missing(generation: &Path, seq: u64) -> bool {
    matches!(path(generation, seq).try_exists(), Ok(false))
}

/// Deletes the files of a generation whose seq has no pointer in the tree;
/// how many.
pub(super) fn remove_orphans(generation: &Path, pointers: &HashSet<u64>) -> io::Result<usize> {
    let entries = match std::fs::read_dir(generation.join(DIR)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let seq = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok());
        if seq.is_none_or(|seq| !pointers.contains(&seq)) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: usize, count: u32) -> Vec<u8> {
        let mut r = vec![MAGIC, 1, 0, 0, 0, 0];
        r.extend_from_slice(&count.to_le_bytes());
        r.resize(len, b'x');
        r
    }

    #[test]
    fn a_pointer_carries_the_count_and_the_file_length() {
        let r = record(40 << 10, 7);
        let p = pointer(&r);
        assert!(is_pointer(&p));
        assert!(!is_pointer(&r[..POINTER_LEN]));
        assert_eq!(super::super::record::stored_count(&p), Some(7));
        assert_eq!(file_len(&p), 40 << 10);
        let mut bad = p;
        bad[8] ^= 1;
        assert_eq!(super::super::record::stored_count(&bad), None);
    }

    #[test]
    fn files_round_trip_and_orphans_go() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (record(10_000, 1), record(50_000, 2));
        store(dir.path(), [(3, &a[..]), (9, &b[..])]).unwrap();
        assert_eq!(read(dir.path(), 3).unwrap(), a);
        assert_eq!(read(dir.path(), 9).unwrap(), b);
        assert_eq!(remove_orphans(dir.path(), &HashSet::from([9])).unwrap(), 1);
        assert!(missing(dir.path(), 3) && !missing(dir.path(), 9));
        remove(dir.path(), 9).unwrap();
        remove(dir.path(), 9).unwrap();
        assert!(read(dir.path(), 9).is_err());
        // A generation that never had a large record.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(remove_orphans(empty.path(), &HashSet::new()).unwrap(), 0);
    }
}
