//! Requests Kafka refuses for good (too large for the topic or the client,
//! an invalid record): kept in `<data_dir>/quarantine/requests.jsonl`, one
//! JSON object per line, so that the requests behind them flow on and an
//! operator can look at them, fix the cause and send them again.
//!
//! A line is written and fsynced before the request leaves the outbox, so a
//! quarantined request is on disk in one place or the other. The file is
//! bounded: past `max_bytes` a refused request is dropped, logged with its
//! messageId and counted, instead of filling the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

use crate::wire::protocol::Timestamp;

/// The file's name in the quarantine directory.
pub const FILE_NAME: &str = "requests.jsonl";

/// One refused request, as the producer had it.
pub struct Refused<'a> {
    pub topic: &'a str,
    pub key: &'a [u8],
    pub message_id: Uuid,
    /// The ServerRequest envelope (JSON).
    pub payload: &'a [u8],
    /// What Kafka said.
    pub error: &'a str,
}

/// What became of a refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Kept,
    /// The file had reached its cap.
    Dropped,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write to the quarantine {path}: {source}")]
pub struct QuarantineError {
    path: PathBuf,
    source: std::io::Error,
}

pub struct Quarantine {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<Option<File>>,
}

impl Quarantine {
    /// Nothing is created until a request is refused.
    pub fn new(dir: &Path, max_bytes: u64) -> Quarantine {
        Quarantine {
            path: dir.join(FILE_NAME),
            max_bytes,
            file: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line and syncs it (blocking: call off the executor).
    pub fn put(&self, refused: &Refused<'_>) -> Result<Outcome, QuarantineError> {
        let line = line(refused, &Timestamp::now());
        let err = |source| QuarantineError {
            path: self.path.clone(),
            source,
        };
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            let created = !dir.exists();
            std::fs::create_dir_all(dir).map_err(err)?;
            let new_file = !self.path.exists();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(err)?;
            // A new name is only on disk once its directory is.
            if new_file {
                File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
            }
            if created {
                if let Some(parent) = dir.parent() {
                    File::open(parent).and_then(|d| d.sync_all()).map_err(err)?;
                }
            }
            *guard = Some(file);
        }
        let file = guard.as_mut().expect("opened above");
        let size = file.metadata().map_err(err)?.len();
        if size + line.len() as u64 > self.max_bytes {
            return Ok(Outcome::Dropped);
        }
        file.write_all(&line).map_err(err)?;
        file.sync_data().map_err(err)?;
        Ok(Outcome::Kept)
    }
}

/// `{"quarantinedAt":..,"error":..,"topic":..,"key":..,"messageId":..,"request":..}`;
/// the request is embedded as JSON when it is JSON, else as a string.
fn line(r: &Refused<'_>, now: &Timestamp) -> Vec<u8> {
    let text =
        |bytes: &[u8]| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned());
    let request: serde_json::Value =
        serde_json::from_slice(r.payload).unwrap_or_else(|_| text(r.payload));
    let value = serde_json::json!({
        "quarantinedAt": now.to_string(),
        "error": r.error,
        "topic": r.topic,
        "key": text(r.key),
        "messageId": r.message_id.to_string(),
        "request": request,
    });
    let mut out = serde_json::to_vec(&value).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(payload: &[u8]) -> Refused<'_> {
        Refused {
            topic: "t",
            key: b"dev-1",
            message_id: Uuid::nil(),
            payload,
            error: "Message size too large",
        }
    }

    #[test]
    fn lines_are_json_and_the_cap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::new(&dir.path().join("quarantine"), 400);
        assert_eq!(q.put(&refused(br#"{"a":1}"#)).unwrap(), Outcome::Kept);
        assert_eq!(q.put(&refused(b"not json")).unwrap(), Outcome::Kept);
        let big = vec![b'x'; 300];
        assert_eq!(q.put(&refused(&big)).unwrap(), Outcome::Dropped);
        let text = std::fs::read_to_string(q.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["request"]["a"], 1);
        assert_eq!(lines[1]["request"], "not json");
        assert_eq!(lines[0]["key"], "dev-1");
        assert_eq!(lines[0]["error"], "Message size too large");
        assert!(text.len() <= 400);
    }
}
