//! Device authentication (PROTOCOL 5): HMAC tokens and the revocation list;
//! damping of failing addresses is in `damping`, TLS in `tls`.
//!
//! Nothing here logs a token or key bytes: refusals name the device and the
//! reason, never the secret.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use ring::hmac;

use crate::config::{AuthConfig, AuthMode};
use crate::ops::metrics::{AuthFailure, Metrics};
use crate::security::damping::Damper;
use crate::wire::protocol::{self, Request};

/// Everything a connection needs to authenticate.
pub struct Gate {
    pub mode: AuthMode,
    /// Present in token mode; replaced by a reload (SIGHUP).
    key: RwLock<Option<TokenKey>>,
    pub revoked: Arc<Revocations>,
    pub damper: Damper,
    /// For the auth frame (token mode) and the TLS handshake.
    pub timeout: Duration,
    /// Bytes of an incomplete frame held before authentication.
    pub max_pending_bytes: usize,
}

impl Gate {
    /// Reads the key and the revocation list; refuses a bad key file.
    pub fn new(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Gate, KeyError> {
        let key = match (cfg.mode, &cfg.token_key_file) {
            (AuthMode::Token, Some(path)) => Some(TokenKey::load(path)?),
            _ => None,
        };
        let revoked = match cfg.mode {
            AuthMode::None => Revocations::default(),
            _ => Revocations::load(cfg.revoked_file.clone()),
        };
        Ok(Gate {
            mode: cfg.mode,
            key: RwLock::new(key),
            revoked: Arc::new(revoked),
            damper: Damper::new(metrics),
            timeout: cfg.timeout,
            max_pending_bytes: cfg.max_pending_bytes,
        })
    }

    /// Token mode: checks an auth frame; the deviceUid it proves, or why not.
    pub fn authenticate(&self, req: &Request<'_>) -> Result<String, (AuthFailure, &'static str)> {
        let claim = protocol::auth_claim(req).map_err(|why| (AuthFailure::BadToken, why))?;
        let key = self.key.read().unwrap_or_else(|p| p.into_inner());
        let Some(key) = key.as_ref() else {
            return Err((
                AuthFailure::BadToken,
                "token authentication is not configured",
            ));
        };
        if !key.verify(&claim.device_uid, &claim.token) {
            return Err((
                AuthFailure::BadToken,
                "the token is not valid for this deviceUid",
            ));
        }
        if self.revoked.is_revoked(&claim.device_uid) {
            return Err((AuthFailure::Revoked, REVOKED));
        }
        Ok(claim.device_uid.into_owned())
    }

    /// Token mode: tokens are checked against `key` from now on.
    pub fn set_key(&self, key: TokenKey) {
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }
}

/// The refusal of a revoked device, by token or by certificate.
pub const REVOKED: &str = "this device is revoked";

/// Shorter keys make HMAC-SHA256 guessable sooner than its output length
/// suggests; 32 bytes is what `head -c 32 /dev/urandom` gives.
pub const MIN_KEY_BYTES: u64 = 32;
/// How often the revocation file is checked for changes.
pub const REVOCATION_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the token key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the token key file {path} is readable by group or others (mode {mode:o}); \
         make it private: chmod 600 {path}"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "the token key file {path} holds {len} bytes; it needs at least {MIN_KEY_BYTES} \
         (make one with: head -c 32 /dev/urandom > {path})"
    )]
    TooShort { path: PathBuf, len: u64 },
}

/// The HMAC-SHA256 key that tokens are made and checked with.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    /// Reads the key: the file's bytes exactly as stored.
    pub fn load(path: &Path) -> Result<TokenKey, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.mode() & 0o777;
        if mode & 0o044 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        if (bytes.len() as u64) < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                path: path.to_owned(),
                len: bytes.len() as u64,
            });
        }
        Ok(TokenKey::from_bytes(&bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> TokenKey {
        TokenKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The token for `device_uid`: lowercase hex of its HMAC.
    pub fn token_for(&self, device_uid: &str) -> String {
        let tag = hmac::sign(&self.0, device_uid.as_bytes());
        let mut hex = String::with_capacity(64);
        for b in tag.as_ref() {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 15)]));
        }
        hex
    }

    /// Checks a token in constant time (ring compares the tags). Anything
    /// that is not 64 lowercase hex digits is simply wrong.
    pub fn verify(&self, device_uid: &str, token: &str) -> bool {
        let Some(tag) = decode_hex32(token) else {
            return false;
        };
        hmac::verify(&self.0, device_uid.as_bytes(), &tag).is_ok()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The devices refused at authentication, from `auth.revoked_file`.
#[derive(Default)]
pub struct Revocations {
    path: Option<PathBuf>,
    listed: RwLock<HashSet<Box<str>>>,
    /// What the file looked like when last read (inner `None`: missing), to
    /// notice edits in place and renames; outer `None`: never read.
    #[allow(clippy::option_option)]
    seen: Mutex<Option<Option<FileStamp>>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
    changed: i64,
    changed_ns: i64,
}

impl Revocations {
    /// Reads the file once; a missing file means nobody is revoked.
    pub fn load(path: Option<PathBuf>) -> Revocations {
        let r = Revocations {
            path,
            ..Revocations::default()
        };
        r.reload_if_changed();
        r
    }

    pub fn is_revoked(&self, device_uid: &str) -> bool {
        self.listed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(device_uid)
    }

    /// Re-reads the file if it changed since the last look; returns the
    /// devices listed now (so their open connections can be closed) or
    /// `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Vec<Box<str>>> {
        let path = self.path.as_ref()?;
        let stamp = std::fs::metadata(path).ok().map(|m| FileStamp {
            inode: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
            changed: m.ctime(),
            changed_ns: m.ctime_nsec(),
        });
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == Some(stamp) {
            return None;
        }
        let listed = match std::fs::read_to_string(path) {
            Ok(text) => parse_revoked(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                log::warn!(
                    "revocation file {} is missing: no device is revoked",
                    path.display()
                );
                HashSet::new()
            }
            Err(e) => {
                // Keep the last list rather than un-revoke everyone; retried
                // at the next poll.
                log::error!(
                    "cannot read revocation file {}: {e}; keeping the previous list",
                    path.display()
                );
                return None;
            }
        };
        *seen = Some(stamp);
        log::info!(
            "revocation list {}: {} device(s)",
            path.display(),
            listed.len()
        );
        let now: Vec<Box<str>> = listed.iter().cloned().collect();
        *self.listed.write().unwrap_or_else(|p| p.into_inner()) = listed;
        Some(now)
    }

    /// Re-reads the file whether or not it looks changed (SIGHUP); what
    /// [`Revocations::reload_if_changed`] returns.
    pub fn reload_now(&self) -> Option<Vec<Box<str>>> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.reload_if_changed()
    }

    /// Polls the file in a thread of its own and calls `closer` with every
    /// listed device after each change. Polling, not inotify: it sees edits
    /// in place and replacement by rename alike, on every filesystem.
    pub fn watch(self: &Arc<Self>, closer: impl Fn(&str) + Send + 'static) {
        if self.path.is_none() {
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("revocations".into())
            .spawn(move || loop {
                std::thread::sleep(REVOCATION_POLL);
                if let Some(listed) = me.reload_if_changed() {
                    for device in &listed {
                        closer(device);
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot watch the revocation file: {e}");
        }
    }
}

/// One deviceUid per line; blank lines and `#` comments skipped.
fn parse_revoked(text: &str) -> HashSet<Box<str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(Box::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_verify_only_for_their_device_and_key() {
        let key = TokenKey::from_bytes(&[7u8; 32]);
        let token = key.token_for("dev-42");
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|c| HEX.contains(&c)));
        assert!(key.verify("dev-42", &token));
        assert!(!key.verify("dev-43", &token));
        assert!(!TokenKey::from_bytes(&[8u8; 32]).verify("dev-42", &token));
        assert!(!key.verify("dev-42", &token.to_uppercase()));
        assert!(!key.verify("dev-42", &token[..63]));
        assert!(!key.verify("dev-42", ""));
        assert!(!key.verify("dev-42", &format!("{}zz", &token[..62])));
    }

    #[test]
    fn token_matches_an_independent_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = TokenKey::from_bytes(b"Jefe");
        assert_eq!(
            key.token_for("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn key_file_checks_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let missing = TokenKey::load(&path).err().unwrap().to_string();
        assert!(missing.contains(path.to_str().unwrap()), "{missing}");

        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[1u8; 31])
            .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let short = TokenKey::load(&path).err().unwrap();
        assert!(
            matches!(short, KeyError::TooShort { len: 31, .. }),
            "{short}"
        );

        std::fs::write(&path, [1u8; 32]).unwrap();
        assert!(TokenKey::load(&path).is_ok());
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = TokenKey::load(&path).err().unwrap().to_string();
            assert!(e.contains("readable by group or others"), "{e}");
        }
    }

    #[test]
    fn key_bytes_are_used_as_stored() {
        // A trailing newline is part of the key, not trimmed.
        let a = TokenKey::from_bytes(&[b'k'; 32]);
        let mut with_newline = vec![b'k'; 32];
        with_newline.push(b'\n');
        let b = TokenKey::from_bytes(&with_newline);
        assert_ne!(a.token_for("d"), b.token_for("d"));
    }

    #[test]
    fn revocation_file_format_and_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        let r = Revocations::load(Some(path.clone()));
        assert!(!r.is_revoked("a"));
        std::fs::write(&path, "# stolen\n a \r\nb\r\n\n#c\n").unwrap();
        let listed = r.reload_if_changed().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(r.is_revoked("a") && r.is_revoked("b"));
        assert!(!r.is_revoked("#c") && !r.is_revoked("c"));
        assert!(r.reload_if_changed().is_none(), "unchanged file re-read");
        // Replaced by rename.
        let next = dir.path().join("revoked.new");
        std::fs::write(&next, "c\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert!(r.reload_if_changed().is_some());
        assert!(!r.is_revoked("a") && r.is_revoked("c"));
        // Removed: nobody is revoked.
        std::fs::remove_file(&path).unwrap();
        assert!(r.reload_if_changed().is_some());
        assert!(!r.is_revoked("c"));
    }
}
