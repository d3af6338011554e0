//! The durable outbox: every accepted request is in Kafka or on disk
//! before its ack.
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
//! Each group commit is stored as records of up to about 32 KiB on disk
//! (up to 256 KiB of requests before compression), each under its own seq,
//! all inserted before one flush: sled's cost is per insert and per remove,
//! so a record per request would cap throughput. A record of more than 2
//! KiB on disk (a big group commit's, or a large request) goes to a file of
//! its own, `<generation>/large/<seq>`, with a pointer under its seq: a
//! tree node above about 128 KiB would go to one of sled's blob files,
//! which a real disk can lose after the log that names it, and sled
//! rewrites tree values several times where a file is written once
//! ([`large`] says why and how the file is kept safe).
//!
//! ```text
//! key   = seq: u64 big-endian (so sled's order is append order)
//! value = magic 0xEB | version 1 | crc32: u32 LE | count: u32 LE | entries
//! entry = len: u32 LE (of the rest of the entry) | key_len: u16 LE | key
//!         | message_id: 16 bytes | payload (the ServerRequest JSON)
//! ```
//!
//! The crc32 covers `count` and every entry. Version 2 is a compressed
//! record ([`record::for_disk`]); version 3 is a pointer, `magic | 3 | crc32
//! | count | file length`, the record itself (version 1 or 2) in its file.
//! Below, "batch" means one record.
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
//! # Memory first (`outbox.spill_after_ms`)
//!
//! With a non-zero `spill_after_ms` (50 ms by default) the writer gives a
//! group commit's records their seqs and puts them in [`hot::Hot`] instead
//! of on disk; the producer sends them from there at once. Each record
//! becomes safe one of two ways, whichever comes first: Kafka confirms it
//! (`acks=all`), or the writer, finding it still unconfirmed after
//! `spill_after_ms` (or memory for waiting records past
//! [`hot::MEMORY_LIMIT`]), writes it to disk the way every record is written
//! in disk-first mode. A group's appends are answered once each of its
//! records is safe. A record confirmed before it was written never touches
//! the disk; one written and then confirmed is removed like any other. With
//! `spill_after_ms = 0` every record is written before its ack.
//!
//! Once a record had to be spilled, the writer is in outage mode until Kafka
//! confirms anything again (`edgegate_outbox_outages_total` counts the
//! entries): a group gathers appends for up to `spill_after_ms` (or 256
//! KiB), is staged as usual and spilled at once, whole. Requests wait no
//! longer than they would have in memory, and a hub's trickle during an
//! outage makes one flush and well-compressed records per interval instead
//! of a flush per request (measured: 2,967 → 482 bytes written per request
//! at 1,000 requests a second, BENCHMARKS.md). The order argument below is
//! unchanged: outage mode only spills earlier and more at a time.
//!
//! Why the first copies of one connection's requests still reach Kafka in
//! the order they were sent, whatever the interleaving:
//!
//! - a connection appends one turn at a time, and the writer gives seqs in
//!   the order appends arrive, so a connection's requests have rising seqs;
//! - the producer hands records to librdkafka strictly in seq order
//!   ([`Reader::next_record`]): from memory while a record is there, else
//!   from disk. The writer spills oldest first and moves `committed` past a
//!   spilled record before it leaves memory, so a record is always in one of
//!   the two places the producer looks (or was confirmed, or was refused
//!   and its append told so), and the producer never jumps over one that is
//!   on its way to the disk;
//! - librdkafka's idempotent producer with an infinite message timeout keeps
//!   that order per partition and never fails a message behind a later one;
//!   after a failure the producer sends again from the first unconfirmed
//!   record, again in seq order;
//! - after a crash, what is on disk is replayed in seq order before anything
//!   new (new records get seqs above every stored one). What was only in
//!   memory was not acknowledged; what Kafka had confirmed of it is not sent
//!   again. A record confirmed out of order with another partition's is not
//!   an ordering question: order is per partition, and a connection's
//!   requests share a key.
//!
//! Seqs given to records that were confirmed before being written leave
//! gaps on disk; before a write that skips over any, the removal mark is
//! moved past them (so the next start does not count them lost). The model
//! test `hot_model_tests` checks these rules against random interleavings
//! of appends, sends, confirmations, failures, spills and crashes.
//!
//! # Files
//!
//! `record` (the format above), `marks` (`flushed`, `removed`),
//! `generation` (one sled database: open, sync, load), `durable` (what
//! sled leaves unsynced), `store` (the generations, the cap, reads and
//! removals), `hot` (records not on disk yet, and their groups' answers),
//! `writer` (the group commit: stage or write, and spills), `reader` (the
//! producer's handle: records in order from memory or disk, and what each
//! confirmation means), `quarantine` (requests Kafka refuses for good).
//!
//! # Invariants
//!
//! - A request is acked only once Kafka confirmed its record or the record
//!   was inserted, flushed and fsynced (with every file and directory entry
//!   it depends on); the producer reads from disk only batches below
//!   `committed` (synced ones).
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

mod durable;
mod generation;
pub mod hot;
pub mod inspect;
mod large;
mod marks;
pub mod quarantine;
mod reader;
mod record;
mod store;
mod writer;

#[cfg(test)]
mod hot_model_tests;
#[cfg(test)]
mod large_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use quarantine::Quarantine;
pub use reader::{Outgoing, Reader, Sent, StoredBatch};
pub use record::{AppendBatch, Batch, Compression, CorruptBatch, Entry, Kind, HEADER_LEN};
pub use store::Store;
pub use writer::{start_writer, Appender};

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
    #[error("cannot read outbox file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox generation {0} was already drained and deleted")]
    Retired(PathBuf),
    #[error("the data directory {path} is in use by another edgegate process{holder}")]
    InUse { path: PathBuf, holder: String },
    #[error("cannot open the outbox lock file {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
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
