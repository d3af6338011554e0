//! `edgegate outbox stat|dump|purge`: the outbox of a stopped gateway, for
//! an operator who must see or rescue what waits in it. Each command takes
//! the outbox's lock first, so it refuses while a gateway runs on it (and
//! says which process), and a gateway cannot start while it works.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::generation::{open_db, seq_of};
use super::large;
use super::record::{from_disk, Batch, Kind};
use super::store::lock_dir;
use super::OutboxError;

/// What `stat` reports.
#[derive(Debug, Default)]
pub struct Stat {
    pub generations: Generations,
    pub batches: u64,
    pub records: u64,
    pub presence_events: u64,
    /// Bytes of the stored batches, as stored (compressed or not).
    pub stored_bytes: u64,
    pub disk_bytes: u64,
    /// `receivedAt` of the oldest and newest request.
    pub oldest: Option<String>,
    pub newest: Option<String>,
    /// Batches that could not be read (damaged, or a store sled refused).
    pub unreadable: Vec<String>,
    /// Generations moved aside at some start (`*.broken-*`), kept for a
    /// rescue by hand.
    pub broken: Vec<PathBuf>,
    /// Lines and bytes of `<data_dir>/quarantine/requests.jsonl`.
    pub quarantined: (u64, u64),
}

/// One stored record, as `dump` prints it.
pub struct Dumped<'a> {
    pub seq: u64,
    pub kind: Kind,
    pub key: &'a [u8],
    /// The envelope as it goes to Kafka (JSON).
    pub payload: &'a [u8],
}

/// The outbox directory of `data_dir`, locked; refused if missing.
fn open(data_dir: &Path) -> Result<(PathBuf, std::fs::File), OutboxError> {
    let root = data_dir.join("outbox");
    if !root.is_dir() {
        return Err(OutboxError::CreateDir {
            path: root,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no outbox here"),
        });
    }
    let lock = lock_dir(&root)?;
    Ok((root, lock))
}

/// Generation directories with their first seq, oldest first.
type Generations = Vec<(PathBuf, u64)>;

/// The generation directories, and those moved aside.
fn generations(root: &Path) -> Result<(Generations, Vec<PathBuf>), OutboxError> {
    let entries = std::fs::read_dir(root).map_err(|source| OutboxError::CreateDir {
        path: root.to_owned(),
        source,
    })?;
    let (mut live, mut broken) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(first) = name.parse::<u64>() {
            live.push((entry.path(), first));
        } else if name.contains(".broken-") {
            broken.push(entry.path());
        }
    }
    live.sort_by_key(|(_, first)| *first);
    broken.sort();
    Ok((live, broken))
}

/// Calls `each` with every record in seq order; returns what could not be
/// read (the rest is still visited).
fn visit(
    generations: &Generations,
    mut each: impl FnMut(Dumped<'_>) -> std::io::Result<()>,
) -> Result<Vec<String>, OutboxError> {
    let mut unreadable = Vec::new();
    for (dir, _) in generations {
        let db = match open_db(dir) {
            Ok(db) => db,
            Err(e) => {
                unreadable.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        for item in db.iter() {
            let (seq, value) = match item {
                Ok((key, value)) => (seq_of(&key), value),
                Err(e) => {
                    unreadable.push(format!("{}: {e}", dir.display()));
                    break;
                }
            };
            let value = match large::is_pointer(&value) {
                true => match large::read(dir, seq) {
                    Ok(record) => record.into(),
                    Err(e) => {
                        unreadable.push(format!("batch {seq}: its file: {e}"));
                        continue;
                    }
                },
                false => value,
            };
            let record = match from_disk(&value) {
                Ok(r) => r,
                Err(e) => {
                    unreadable.push(format!("batch {seq}: {e}"));
                    continue;
                }
            };
            let batch = match Batch::parse(&record) {
                Ok(b) => b,
                Err(e) => {
                    unreadable.push(format!("batch {seq}: {e}"));
                    continue;
                }
            };
            for entry in batch.entries() {
                each(Dumped {
                    seq,
                    kind: entry.kind,
                    key: entry.key,
                    payload: entry.payload,
                })
                .map_err(|source| OutboxError::CreateDir {
                    path: PathBuf::from("-"),
                    source,
                })?;
            }
        }
    }
    Ok(unreadable)
}

pub fn stat(data_dir: &Path) -> Result<Stat, OutboxError> {
    let (root, _lock) = open(data_dir)?;
    let (generations, broken) = generations(&root)?;
    let mut stat = Stat {
        disk_bytes: super::generation::dir_bytes(&root, None),
        broken,
        ..Stat::default()
    };
    let mut last_seq = None;
    let unreadable = visit(&generations, |r| {
        if last_seq != Some(r.seq) {
            last_seq = Some(r.seq);
            stat.batches += 1;
        }
        if r.kind == Kind::Presence {
            stat.presence_events += 1;
            return Ok(());
        }
        stat.records += 1;
        stat.stored_bytes += r.payload.len() as u64;
        if let Some(at) = received_at(r.payload) {
            if stat.oldest.is_none() {
                stat.oldest = Some(at.clone());
            }
            stat.newest = Some(at);
        }
        Ok(())
    })?;
    stat.unreadable = unreadable;
    stat.generations = generations;
    let quarantine = data_dir
        .join("quarantine")
        .join(super::quarantine::FILE_NAME);
    if let Ok(text) = std::fs::read(&quarantine) {
        let lines = text.iter().filter(|&&b| b == b'\n').count() as u64;
        stat.quarantined = (lines, text.len() as u64);
    }
    Ok(stat)
}

/// Writes every record as one JSON line: `{"seq", "kind", "key", "value"}`,
/// `value` the envelope as it would go to Kafka. Returns how many.
pub fn dump(data_dir: &Path, out: &mut dyn Write) -> Result<(u64, Vec<String>), OutboxError> {
    let (root, _lock) = open(data_dir)?;
    let (generations, _) = generations(&root)?;
    let mut written = 0;
    let unreadable = visit(&generations, |r| {
        let kind = match r.kind {
            Kind::Request => "request",
            Kind::Presence => "presence",
        };
        let key = String::from_utf8_lossy(r.key);
        write!(
            out,
            "{{\"seq\":{},\"kind\":\"{kind}\",\"key\":{},\"value\":",
            r.seq,
            serde_json::to_string(&key).unwrap_or_default()
        )?;
        out.write_all(r.payload)?;
        out.write_all(b"}\n")?;
        written += 1;
        Ok(())
    })?;
    out.flush().map_err(|source| OutboxError::CreateDir {
        path: PathBuf::from("-"),
        source,
    })?;
    Ok((written, unreadable))
}

/// Deletes everything the outbox holds (not the generations moved aside,
/// which are kept for a rescue by hand). Returns the generations deleted.
pub fn purge(data_dir: &Path) -> Result<usize, OutboxError> {
    let (root, _lock) = open(data_dir)?;
    let (generations, _) = generations(&root)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OutboxError::CreateDir { path, source }
    };
    for (dir, _) in &generations {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    let mark = root.join(super::marks::REMOVED_FILE);
    if mark.exists() {
        std::fs::remove_file(&mark).map_err(io(&mark))?;
    }
    super::durable::sync_path(&root).map_err(io(&root))?;
    Ok(generations.len())
}

/// The envelope's `receivedAt`, without parsing the rest.
fn received_at(payload: &[u8]) -> Option<String> {
    const FIELD: &[u8] = b"\"receivedAt\":\"";
    let at = payload.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let end = payload[at..].iter().position(|&b| b == b'"')?;
    String::from_utf8(payload[at..at + end].to_vec()).ok()
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC timestamp as the
/// gateway writes them (`2026-11-25T22:00:00.123Z`).
pub fn unix_millis(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, min, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let ms = if b.get(19) == Some(&b'.') {
        num(20..23)?
    } else {
        0
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000 + s * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_back_to_the_millisecond() {
        assert_eq!(unix_millis("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            unix_millis("2026-11-25T22:00:00.123Z"),
            Some(1_795_644_000_123)
        );
        let now = crate::wire::protocol::Timestamp::from_unix_millis(1_764_633_600_999);
        assert_eq!(unix_millis(&now.to_string()), Some(1_764_633_600_999));
        assert_eq!(unix_millis("yesterday"), None);
    }

    #[test]
    fn received_at_is_found_in_an_envelope() {
        let env =
            br#"{"messageId":"x","receivedAt":"2026-01-02T03:04:05.678Z","deviceRequest":{}}"#;
        assert_eq!(
            received_at(env).as_deref(),
            Some("2026-01-02T03:04:05.678Z")
        );
        assert_eq!(received_at(b"{}"), None);
    }
}
