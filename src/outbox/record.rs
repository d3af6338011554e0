//! The record format: a group commit's requests, sealed with a checksum
//! (`AppendBatch`), and a stored record read back and verified (`Batch`).

use uuid::Uuid;

pub(super) const MAGIC: u8 = 0xEB;
pub(super) const VERSION: u8 = 1;
/// magic, version, crc32, count.
pub const HEADER_LEN: usize = 10;

/// Requests encoded for one append, built by a connection.
#[derive(Debug)]
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
