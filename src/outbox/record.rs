//! The record format: a group commit's requests, sealed with a checksum
//! (`AppendBatch`), and a stored record read back and verified (`Batch`).

use std::borrow::Cow;
use std::cell::RefCell;

use uuid::Uuid;

mod ids;

pub(super) const MAGIC: u8 = 0xEB;
pub(super) const VERSION: u8 = 1;
/// magic, version, crc32, count.
pub const HEADER_LEN: usize = 10;
/// A record as written to disk with its entries compressed.
pub(super) const VERSION_COMPRESSED: u8 = 2;
/// magic, version 2, crc32 (of what follows it), count, length of the
/// entries uncompressed, codec.
pub(super) const HEADER_COMPRESSED_LEN: usize = 15;
/// Not a record but a pointer to one kept in a file ([`super::large`]).
pub(super) const VERSION_IN_FILE: u8 = 3;
const CODEC_ZSTD: u8 = 1;
const CODEC_LZ4: u8 = 2;
/// Set in the codec byte: the entries' messageId texts were taken out
/// before compression ([`ids`]).
const IDS_STRIPPED: u8 = 0x10;
/// zstd's fastest level: a 7 KiB record of JSON envelopes shrinks several
/// times over in microseconds, off the executor.
const ZSTD_LEVEL: i32 = 1;
/// A decompressed record larger than this is damage, not data.
const MAX_ENTRIES_BYTES: usize = 256 << 20;

/// How records are stored on disk (`outbox.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    /// lz4's block format (lz4_flex): a third or less of zstd's CPU for a
    /// larger record.
    Lz4,
}

/// The record as it goes to disk: compressed if that makes it smaller.
pub(super) fn for_disk(record: &[u8], compression: Compression) -> Cow<'_, [u8]> {
    if compression == Compression::None || record.len() <= HEADER_LEN {
        return Cow::Borrowed(record);
    }
    let stripped = ids::strip(&record[HEADER_LEN..]);
    let (flag, entries) = match &stripped {
        Some(s) => (IDS_STRIPPED, &s[..]),
        None => (0, &record[HEADER_LEN..]),
    };
    let (codec, packed) = match compression {
        Compression::Zstd => match zstd_compress(entries) {
            Ok(packed) => (CODEC_ZSTD, packed),
            Err(_) => return Cow::Borrowed(record),
        },
        Compression::Lz4 => (CODEC_LZ4, lz4_flex::block::compress(entries)),
        Compression::None => unreachable!("returned above"),
    };
    if packed.len() + HEADER_COMPRESSED_LEN >= record.len() {
        return Cow::Borrowed(record);
    }
    let mut out = Vec::with_capacity(HEADER_COMPRESSED_LEN + packed.len());
    out.extend_from_slice(&[MAGIC, VERSION_COMPRESSED, 0, 0, 0, 0]);
    out.extend_from_slice(&record[6..10]); // count
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.push(codec | flag);
    out.extend_from_slice(&packed);
    let crc = crc32fast::hash(&out[6..]);
    out[2..6].copy_from_slice(&crc.to_le_bytes());
    Cow::Owned(out)
}

/// The length of a record's entries with their messageId texts taken out.
#[cfg(test)]
pub(super) fn ids_stripped_len(record: &[u8]) -> usize {
    ids::strip(&record[HEADER_LEN..]).map_or(0, |s| s.len())
}

/// A record's entries, their messageId texts taken out and put back.
#[cfg(test)]
pub(super) fn ids_stripped_and_restored(record: &[u8]) -> Option<Vec<u8>> {
    ids::restore(&ids::strip(&record[HEADER_LEN..])?)
}

thread_local! {
    // One zstd context per thread, kept: a new context clears its tables
    // first, which cost more than compressing a 7 KiB record (under
    // callgrind, 82,000 of a record's 147,000 instructions).
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn zstd_compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|kept| {
        let compressor = match kept {
            Some(c) => c,
            None => kept.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        compressor.compress(data)
    })
}

fn zstd_decompress(data: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|kept| {
        let decompressor = match kept {
            Some(d) => d,
            None => kept.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(data, raw_len)
    })
}

/// The request count of a stored record, either version, if its checksum
/// holds (without decompressing it).
pub(super) fn stored_count(value: &[u8]) -> Option<u32> {
    let min = match *value.get(1)? {
        VERSION => HEADER_LEN,
        VERSION_COMPRESSED => HEADER_COMPRESSED_LEN,
        VERSION_IN_FILE => super::large::POINTER_LEN,
        _ => return None,
    };
    if value.len() < min || value[0] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(value[2..6].try_into().ok()?);
    (crc32fast::hash(&value[6..]) == crc)
        .then(|| u32::from_le_bytes(value[6..10].try_into().expect("4 bytes")))
}

/// A record read from disk, as [`Batch::parse`] takes it: a version 1
/// record as it is, a compressed one checked and decompressed.
pub(super) fn from_disk(value: &[u8]) -> Result<Cow<'_, [u8]>, CorruptBatch> {
    if value.len() < 2 || value[0] != MAGIC {
        return Err(CorruptBatch::Header);
    }
    match value[1] {
        VERSION_COMPRESSED => {}
        // Its file could not be read when the pointer was resolved.
        VERSION_IN_FILE => return Err(CorruptBatch::FileMissing),
        _ => return Ok(Cow::Borrowed(value)),
    }
    if value.len() < HEADER_COMPRESSED_LEN {
        return Err(CorruptBatch::Short);
    }
    let crc = u32::from_le_bytes(value[2..6].try_into().expect("4 bytes"));
    if crc32fast::hash(&value[6..]) != crc {
        return Err(CorruptBatch::Checksum);
    }
    let raw_len = u32::from_le_bytes(value[10..14].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_ENTRIES_BYTES {
        return Err(CorruptBatch::Header);
    }
    let packed = &value[HEADER_COMPRESSED_LEN..];
    let entries = match value[14] & !IDS_STRIPPED {
        CODEC_ZSTD => zstd_decompress(packed, raw_len).map_err(|_| CorruptBatch::Layout)?,
        CODEC_LZ4 => {
            lz4_flex::block::decompress(packed, raw_len).map_err(|_| CorruptBatch::Layout)?
        }
        _ => return Err(CorruptBatch::Header),
    };
    if entries.len() != raw_len {
        return Err(CorruptBatch::Layout);
    }
    let entries = match value[14] & IDS_STRIPPED {
        0 => entries,
        _ => ids::restore(&entries).ok_or(CorruptBatch::Layout)?,
    };
    let mut record = Vec::with_capacity(HEADER_LEN + entries.len());
    record.extend_from_slice(&[MAGIC, VERSION, 0, 0, 0, 0]);
    record.extend_from_slice(&value[6..10]);
    record.extend_from_slice(&entries);
    let crc = crc32fast::hash(&record[6..]);
    record[2..6].copy_from_slice(&crc.to_le_bytes());
    Ok(Cow::Owned(record))
}

/// Requests encoded for one append, built by a connection.
#[derive(Debug, Clone)]
pub struct AppendBatch {
    /// Starts with `HEADER_LEN` reserved bytes so the writer can turn a
    /// single job into a record without copying it.
    pub(super) buf: Vec<u8>,
    pub(super) count: u32,
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

    /// Room for `additional` more bytes of entries.
    pub fn reserve(&mut self, additional: usize) {
        self.buf.reserve(additional);
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
        self.push_kind(Kind::Request, key, message_id, write_payload);
    }

    /// Adds one presence event (PROTOCOL 6.2), for the presence topic.
    pub fn push_presence(&mut self, key: &[u8], event_id: &Uuid, payload: &[u8]) {
        self.push_kind(Kind::Presence, key, event_id, |out| {
            out.extend_from_slice(payload)
        });
    }

    fn push_kind(
        &mut self,
        kind: Kind,
        key: &[u8],
        message_id: &Uuid,
        write_payload: impl FnOnce(&mut Vec<u8>),
    ) {
        let key = &key[..key.len().min(MAX_KEY_BYTES)];
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        let flag = match kind {
            Kind::Request => 0,
            Kind::Presence => PRESENCE_FLAG,
        };
        self.buf
            .extend_from_slice(&(key.len() as u16 | flag).to_le_bytes());
        self.buf.extend_from_slice(key);
        self.buf.extend_from_slice(message_id.as_bytes());
        write_payload(&mut self.buf);
        let len = (self.buf.len() - start - 4) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
    }

    /// Seals the batch into a record value: header filled in, crc computed.
    pub(super) fn seal(mut self) -> Vec<u8> {
        self.buf[0] = MAGIC;
        self.buf[1] = VERSION;
        self.buf[6..10].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[6..]);
        self.buf[2..6].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }

    /// Each entry's bytes, length prefix included.
    pub(super) fn raw_entries(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.buf[HEADER_LEN..];
        std::iter::from_fn(move || {
            let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let (entry, tail) = rest.split_at((4 + len).min(rest.len()));
            rest = tail;
            Some(entry)
        })
    }

    pub(super) fn push_raw(&mut self, entry: &[u8]) {
        self.buf.extend_from_slice(entry);
        self.count += 1;
    }
}

/// What an entry is, and so which topic it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A device request, for `kafka.producer_topic`.
    Request,
    /// A presence event, for `kafka.presence_topic`.
    Presence,
}

/// The top bit of an entry's key length marks a presence event. Keys are a
/// deviceUid (at most 128 bytes) or a clientId (36), so the bit was never
/// set by a 0.1.0 record; longer keys are cut to fit the 15 bits.
const PRESENCE_FLAG: u16 = 0x8000;
const MAX_KEY_BYTES: usize = (PRESENCE_FLAG - 1) as usize;

/// One stored request or event, borrowed from its batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub kind: Kind,
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
    #[error("kept in a file that is missing or unreadable")]
    FileMissing,
}

/// A stored batch whose checksum and layout were verified.
#[derive(Debug)]
pub struct Batch<'a> {
    pub count: u32,
    pub(super) body: &'a [u8],
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

    /// A record this process sealed, or verified when it read it: its
    /// count and entries as the header says, without another pass over
    /// every byte (on the memory path that was three checksums of each
    /// record, 640 instructions a request).
    pub(super) fn verified(value: &'a [u8]) -> Self {
        debug_assert!(Batch::parse(value).is_ok(), "a record not verified");
        Batch {
            count: u32::from_le_bytes(value[6..10].try_into().expect("4 bytes")),
            body: &value[HEADER_LEN..],
        }
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

pub(super) fn split_entry(bytes: &[u8]) -> Option<(Entry<'_>, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let entry = bytes.get(4..4usize.checked_add(len)?)?;
    let key_len = u16::from_le_bytes(entry.get(..2)?.try_into().ok()?);
    let kind = match key_len & PRESENCE_FLAG {
        0 => Kind::Request,
        _ => Kind::Presence,
    };
    let key_len = (key_len & !PRESENCE_FLAG) as usize;
    let key = entry.get(2..2 + key_len)?;
    let id = entry.get(2 + key_len..2 + key_len + 16)?;
    let payload = &entry[2 + key_len + 16..];
    Some((
        Entry {
            kind,
            key,
            message_id: Uuid::from_slice(id).ok()?,
            payload,
        },
        &bytes[4 + len..],
    ))
}
