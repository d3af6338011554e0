//! The durable hold for offline devices (PROTOCOL 6.3): messages for a
//! deviceUid with no open bound connection, kept on disk across restarts
//! and crashes and written to the device, in the order received, when a
//! connection binds to it.
//!
//! One append-only file per device (`data_dir/hold/<n>.hold`): a header
//! (magic, the offset of the first live record, the deviceUid) and records
//! (length, crc32, arrival time, the message line). Messages leave from the
//! front only (delivered, expired or dropped by a bound), so the file's
//! head offset is all that changes in place; a file is rewritten once most
//! of it is dead, and deleted once empty. Memory holds an index of 32 bytes
//! per message; the messages themselves are read back only to deliver them.
//!
//! Not sled, which the contract names: sled 0.34 keeps every page it read
//! or wrote in memory while the database is open, so a full hold (256 MiB
//! by default) would be 256 MiB of a hub's memory (see `outbox::generation`).
//!
//! A message counts as held once [`Hold::sync`] has fsynced its file (and
//! the directory, for a new file); only then is its [`Receipt`] dropped,
//! which lets the consumer store its offset. Removals need no sync: one
//! undone by a power cut delivers a message twice, never loses it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::receipt::Receipt;
use crate::ops::metrics::{HoldDrop, Metrics};

const MAGIC: &[u8; 4] = b"EGH1";
/// magic, head offset, deviceUid length; then the deviceUid.
const HEADER_FIXED: u64 = 4 + 8 + 2;
/// length of the line, crc32 of time and line, arrival time (ms).
const RECORD_HEADER: u64 = 4 + 4 + 8;
/// A file whose dead prefix is at least this large, and most of it, is
/// rewritten.
const COMPACT_AFTER: u64 = 64 << 10;

#[derive(Debug, Clone, Copy)]
pub struct HoldLimits {
    pub ttl: Duration,
    pub max_per_device: usize,
    pub max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("hold file {path}: {source}")]
pub struct HoldError {
    path: PathBuf,
    source: io::Error,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> HoldError + '_ {
    move |source| HoldError {
        path: path.to_owned(),
        source,
    }
}

pub struct Hold {
    dir: PathBuf,
    limits: HoldLimits,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    devices: HashMap<Arc<str>, Device>,
    /// Arrival order over all devices, for the TTL and the byte bound. An
    /// entry whose message has left already is skipped when reached.
    order: VecDeque<(u64, Arc<str>)>,
    next_seq: u64,
    next_file: u64,
    /// Line bytes held, all devices.
    bytes: u64,
    /// Receipts of messages written since the last sync.
    unsynced: Vec<Receipt>,
    /// Devices whose file has writes since the last sync.
    dirty: HashSet<Arc<str>>,
    /// A file was created, renamed or deleted since the last sync.
    dir_dirty: bool,
}

struct Device {
    path: PathBuf,
    /// Open while it has unsynced writes.
    file: Option<File>,
    entries: VecDeque<Entry>,
    /// Where the next record goes.
    end: u64,
    /// The entries at the front that were handed to a connection and not
    /// yet written to its socket.
    released: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    seq: u64,
    /// Where its record starts in the file.
    offset: u64,
    /// Its line's length.
    len: u32,
    at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Device {
    fn head(&self) -> u64 {
        self.entries.front().map_or(self.end, |e| e.offset)
    }

    fn file(&mut self) -> Result<&File, HoldError> {
        if self.file.is_none() {
            let f = File::options()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(err(&self.path))?;
            self.file = Some(f);
        }
        Ok(self.file.as_ref().expect("opened above"))
    }

    /// Records the head offset in the header (synced with the next sync,
    /// or never: an older head only delivers a message again).
    fn write_head(&mut self) -> Result<(), HoldError> {
        let head = self.head();
        self.file()?
            .write_all_at(&head.to_le_bytes(), 4)
            .map_err(err(&self.path))
    }

    fn read_line(&mut self, e: Entry) -> Result<Vec<u8>, HoldError> {
        let mut line = vec![0; e.len as usize];
        self.file()?
            .read_exact_at(&mut line, e.offset + RECORD_HEADER)
            .map_err(err(&self.path))?;
        Ok(line)
    }
}

fn record(line: &[u8], at_ms: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER as usize + line.len());
    r.extend_from_slice(&(line.len() as u32).to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(&at_ms.to_le_bytes());
    r.extend_from_slice(line);
    let crc = crc32fast::hash(&r[8..]);
    r[4..8].copy_from_slice(&crc.to_le_bytes());
    r
}

fn header(device: &str, head: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_FIXED as usize + device.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&head.to_le_bytes());
    h.extend_from_slice(&(device.len() as u16).to_le_bytes());
    h.extend_from_slice(device.as_bytes());
    h
}

/// A file read back: its deviceUid and live records (offset, line
/// length, time). A torn or damaged tail ends it; `end` is where the good
/// part ends.
struct Loaded {
    device: String,
    records: Vec<(u64, u32, u64)>,
    end: u64,
}

fn load(path: &Path) -> io::Result<Option<Loaded>> {
    let bytes = std::fs::read(path)?;
    if bytes.len() < HEADER_FIXED as usize || &bytes[..4] != MAGIC {
        return Ok(None);
    }
    let head = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let dlen = u16::from_le_bytes(bytes[12..14].try_into().expect("2 bytes")) as usize;
    let Some(device) = bytes.get(14..14 + dlen) else {
        return Ok(None);
    };
    let Ok(device) = String::from_utf8(device.to_vec()) else {
        return Ok(None);
    };
    let first = (14 + dlen) as u64;
    let mut pos = head.max(first);
    let mut records = Vec::new();
    loop {
        let at = pos as usize;
        let Some(h) = bytes.get(at..at + RECORD_HEADER as usize) else {
            break;
        };
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let at_ms = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let Some(body) = bytes.get(at + 8..at + RECORD_HEADER as usize + len as usize) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        records.push((pos, len, at_ms));
        pos += RECORD_HEADER + u64::from(len);
    }
    Ok(Some(Loaded {
        device,
        records,
        end: pos,
    }))
}

/// What became of one message offered to the hold.
#[derive(Debug, PartialEq, Eq)]
pub struct Put {
    /// Older messages dropped to make room (counted by bound).
    pub dropped: usize,
}

impl Hold {
    /// Opens (or creates) the hold in `dir` and reads back what an earlier
    /// run left.
    pub fn open(dir: &Path, limits: HoldLimits, metrics: Arc<Metrics>) -> Result<Hold, HoldError> {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let mut state = State::default();
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(err(dir))? {
            let path = entry.map_err(err(dir))?.path();
            let Some(n) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".hold"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                // A compaction's unfinished copy, or not ours.
                if path.extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            };
            state.next_file = state.next_file.max(n + 1);
            let loaded = match load(&path).map_err(err(&path))? {
                Some(l) if !l.records.is_empty() => l,
                _ => {
                    std::fs::remove_file(&path).map_err(err(&path))?;
                    continue;
                }
            };
            let device: Arc<str> = Arc::from(loaded.device.as_str());
            for &(offset, len, at_ms) in &loaded.records {
                all.push((at_ms, device.clone(), offset, len));
            }
            state.devices.insert(
                device,
                Device {
                    path,
                    file: None,
                    entries: VecDeque::new(),
                    end: loaded.end,
                    released: 0,
                },
            );
        }
        // One arrival order over all devices; a device's own is its file's.
        all.sort_by_key(|(at, _, offset, _)| (*at, *offset));
        for (at_ms, device, offset, len) in all {
            let seq = state.next_seq;
            state.next_seq += 1;
            let d = state.devices.get_mut(&device).expect("loaded above");
            d.entries.push_back(Entry {
                seq,
                offset,
                len,
                at_ms,
            });
            state.order.push_back((seq, device));
            state.bytes += u64::from(len);
        }
        for d in state.devices.values_mut() {
            d.entries.make_contiguous().sort_by_key(|e| e.offset);
        }
        let hold = Hold {
            dir: dir.to_owned(),
            limits,
            metrics,
            state: Mutex::new(state),
        };
        let held = hold.len();
        if held > 0 {
            log::info!(
                "hold: {held} messages for {} offline devices kept from the last run",
                hold.state().devices.len()
            );
        }
        hold.publish(&hold.state());
        Ok(hold)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.state().devices.values().map(|d| d.entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn publish(&self, s: &State) {
        let count: usize = s.devices.values().map(|d| d.entries.len()).sum();
        self.metrics.hold_messages.store(count as i64, Relaxed);
        self.metrics.hold_bytes.store(s.bytes as i64, Relaxed);
    }

    /// Holds `line` for `device`; its receipt is dropped once the message
    /// is synced. Older messages go first when a bound is reached.
    pub fn put(&self, device: &str, line: &[u8], receipt: Receipt) -> Result<Put, HoldError> {
        let now = now_ms();
        let mut s = self.state();
        let mut dropped = self.expire(&mut s, now);
        let key: Arc<str> = match s.devices.get_key_value(device) {
            Some((k, _)) => k.clone(),
            None => {
                let path = self.dir.join(format!("{}.hold", s.next_file));
                s.next_file += 1;
                let h = header(device, 0);
                let f = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(err(&path))?;
                f.write_all_at(&h, 0).map_err(err(&path))?;
                s.dir_dirty = true;
                let key: Arc<str> = Arc::from(device);
                s.devices.insert(
                    key.clone(),
                    Device {
                        path,
                        file: Some(f),
                        entries: VecDeque::new(),
                        end: h.len() as u64,
                        released: 0,
                    },
                );
                key
            }
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        let d = s.devices.get_mut(&key).expect("present");
        let bytes = record(line, now);
        let offset = d.end;
        d.file()?
            .write_all_at(&bytes, offset)
            .map_err(err(&d.path))?;
        d.end += bytes.len() as u64;
        d.entries.push_back(Entry {
            seq,
            offset,
            len: line.len() as u32,
            at_ms: now,
        });
        s.order.push_back((seq, key.clone()));
        s.bytes += line.len() as u64;
        s.dirty.insert(key.clone());
        s.unsynced.push(receipt);
        while s.devices[&key].entries.len() > self.limits.max_per_device {
            self.drop_front(&mut s, &key, HoldDrop::PerDevice)?;
            dropped += 1;
        }
        while s.bytes > self.limits.max_bytes {
            match self.oldest(&mut s) {
                Some(device) => {
                    self.drop_front(&mut s, &device, HoldDrop::Bytes)?;
                    dropped += 1;
                }
                None => break,
            }
        }
        self.publish(&s);
        Ok(Put { dropped })
    }

    /// The device of the oldest live message, stale order entries skipped.
    fn oldest(&self, s: &mut State) -> Option<Arc<str>> {
        while let Some((seq, device)) = s.order.front() {
            let live = s
                .devices
                .get(device)
                .and_then(|d| d.entries.front())
                .is_some_and(|e| e.seq == *seq);
            if live {
                return Some(device.clone());
            }
            s.order.pop_front();
        }
        None
    }

    /// Drops what is older than the TTL; returns how many.
    fn expire(&self, s: &mut State, now: u64) -> usize {
        let ttl = self.limits.ttl.as_millis() as u64;
        let mut dropped = 0;
        while let Some(device) = self.oldest(s) {
            let at = s.devices[&device].entries[0].at_ms;
            if now.saturating_sub(at) < ttl {
                break;
            }
            if self.drop_front(s, &device, HoldDrop::Expired).is_err() {
                break;
            }
            dropped += 1;
        }
        dropped
    }

    fn drop_front(&self, s: &mut State, device: &Arc<str>, why: HoldDrop) -> Result<(), HoldError> {
        self.metrics.hold_dropped(why);
        self.remove_front(s, device)
    }

    /// Takes the front message of `device` out (delivered or dropped).
    fn remove_front(&self, s: &mut State, device: &Arc<str>) -> Result<(), HoldError> {
        let Some(d) = s.devices.get_mut(device) else {
            return Ok(());
        };
        let Some(e) = d.entries.pop_front() else {
            return Ok(());
        };
        d.released = d.released.saturating_sub(1);
        s.bytes -= u64::from(e.len);
        if d.entries.is_empty() {
            let d = s.devices.remove(device).expect("present");
            s.dirty.remove(device);
            std::fs::remove_file(&d.path).map_err(err(&d.path))?;
            s.dir_dirty = true;
            return Ok(());
        }
        d.write_head()?;
        s.dirty.insert(device.clone());
        let head = d.head();
        if head >= COMPACT_AFTER && head > d.end / 2 {
            self.compact(s, device)?;
        }
        Ok(())
    }

    /// Rewrites a file without its dead prefix: a copy, synced, renamed over.
    fn compact(&self, s: &mut State, device: &Arc<str>) -> Result<(), HoldError> {
        let d = s.devices.get_mut(device).expect("present");
        let tmp = d.path.with_extension("tmp");
        let h = header(device, 0);
        let mut out = h.clone();
        let head = d.head();
        let shift = head - h.len() as u64;
        let mut buf = vec![0; (d.end - head) as usize];
        d.file()?
            .read_exact_at(&mut buf, head)
            .map_err(err(&d.path))?;
        out.extend_from_slice(&buf);
        out[4..12].copy_from_slice(&(h.len() as u64).to_le_bytes());
        std::fs::write(&tmp, &out).map_err(err(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(err(&tmp))?;
        std::fs::rename(&tmp, &d.path).map_err(err(&d.path))?;
        d.file = None;
        d.end -= shift;
        for e in d.entries.iter_mut() {
            e.offset -= shift;
        }
        s.dir_dirty = true;
        Ok(())
    }

    /// The messages held for `device` not yet handed to a connection, in
    /// order, each with the seq to confirm it by: [`Hold::written`] once
    /// on the device's socket, [`Hold::returned`] if it never got there.
    pub fn release(&self, device: &str) -> Result<Vec<(u64, Vec<u8>)>, HoldError> {
        let mut s = self.state();
        self.expire(&mut s, now_ms());
        let Some(d) = s.devices.get_mut(device) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for i in d.released..d.entries.len() {
            let e = d.entries[i];
            out.push((e.seq, d.read_line(e)?));
        }
        d.released = d.entries.len();
        self.metrics
            .downlink_held_released
            .fetch_add(out.len() as u64, Relaxed);
        Ok(out)
    }

    /// Message `seq` of `device` (and any before it) reached its socket.
    pub fn written(&self, device: &str, seq: u64) -> Result<(), HoldError> {
        let mut s = self.state();
        let Some((key, _)) = s.devices.get_key_value(device) else {
            return Ok(());
        };
        let key = key.clone();
        while s
            .devices
            .get(&key)
            .and_then(|d| d.entries.front())
            .is_some_and(|e| e.seq <= seq)
        {
            self.remove_front(&mut s, &key)?;
        }
        self.publish(&s);
        Ok(())
    }

    /// The connection `device`'s released messages went to closed before
    /// writing them: they wait for the next one.
    pub fn returned(&self, device: &str) {
        if let Some(d) = self.state().devices.get_mut(device) {
            d.released = 0;
        }
    }

    /// Makes every write since the last call durable, then drops the
    /// receipts of the messages it held. Cheap when nothing changed.
    pub fn sync(&self) -> Result<(), HoldError> {
        let (files, dir, receipts) = {
            let mut s = self.state();
            if s.dirty.is_empty() && !s.dir_dirty && s.unsynced.is_empty() {
                return Ok(());
            }
            let dirty = std::mem::take(&mut s.dirty);
            let mut files = Vec::new();
            for device in dirty {
                if let Some(d) = s.devices.get_mut(&device) {
                    if let Some(f) = d.file.take() {
                        files.push((d.path.clone(), f));
                    }
                }
            }
            let dir = std::mem::take(&mut s.dir_dirty);
            (files, dir, std::mem::take(&mut s.unsynced))
        };
        // Off the lock: routing goes on while the disk syncs.
        let synced = files
            .iter()
            .try_for_each(|(path, f)| f.sync_data().map_err(err(path)))
            .and_then(|()| match dir {
                true => File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(err(&self.dir)),
                false => Ok(()),
            });
        match synced {
            Ok(()) => drop(receipts),
            Err(e) => {
                // Not held yet: their offsets must wait for a sync that works.
                let mut s = self.state();
                s.unsynced.extend(receipts);
                s.dir_dirty |= dir;
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
