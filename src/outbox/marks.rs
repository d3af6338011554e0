//! The two marks kept beside sled's files, by which the outbox notices
//! batches sled lost (see the module doc of `outbox`).

use std::path::Path;

/// In each generation's directory, beside sled's files: the seq after the
/// last flushed batch (u64 LE, then its crc32). sled 0.34, reading a damaged
/// log, usually stops at the damage and opens without the records after
/// it, saying nothing; this is how such a loss is noticed and counted.
/// Written after the log's fsync, synced with the next group commit: on
/// disk it is never ahead of the log.
pub(super) const FLUSHED_FILE: &str = "flushed";
/// In the outbox directory: a seq below which batches may have been
/// removed (delivered), same layout. Written and synced before any removal
/// it covers (the producer moves it ahead to what it has handed to Kafka,
/// off the executor), so a batch missing below it may simply have been
/// delivered, and one missing at or above it was lost.
pub(super) const REMOVED_FILE: &str = "removed";

/// A mark file ([`FLUSHED_FILE`], [`REMOVED_FILE`]): a seq, u64 LE, then
/// its crc32. Written in place, not synced: after a crash of the process it
/// is exact; after a power cut it may be older than the truth.
pub(super) fn write_mark(file: &std::fs::File, seq: u64) {
    use std::os::unix::fs::FileExt;
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..8]);
    bytes[8..].copy_from_slice(&crc.to_le_bytes());
    let _ = file.write_all_at(&bytes, 0);
}

/// A mark file's seq, if it is there and intact.
pub(super) fn read_mark(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let bytes: [u8; 12] = bytes.get(..12)?.try_into().ok()?;
    let crc = u32::from_le_bytes(bytes[8..].try_into().ok()?);
    (crc32fast::hash(&bytes[..8]) == crc)
        .then(|| u64::from_le_bytes(bytes[..8].try_into().unwrap()))
}
