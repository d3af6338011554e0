//! Token mode (PROTOCOL 5) for the tests: a key file, tokens minted with
//! `edgegate token` as an operator would, the auth frame and the
//! revocation file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{command, fresh_source, Device, Gateway, GatewayOptions};

/// A fresh 32-byte key, mode 600 as the gateway requires.
pub fn write_key(path: &Path) {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `edgegate token DEVICE --key-file KEY`, the provisioning command.
pub fn mint(device: &str, key: &Path) -> String {
    let out = command()
        .args(["token", device, "--key-file"])
        .arg(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.len(), 64, "{token}");
    token
}

/// A gateway in token mode, with its key and revocation file.
pub struct TokenGateway {
    pub gw: Gateway,
    pub key: PathBuf,
    pub revoked: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn token_gateway(opts: GatewayOptions) -> TokenGateway {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    write_key(&key);
    let revoked = dir.path().join("revoked");
    let gw = Gateway::start(
        opts.env("EDGEGATE_AUTH_MODE", "token")
            .env("EDGEGATE_AUTH_TOKEN_KEY_FILE", key.display())
            .env("EDGEGATE_AUTH_REVOKED_FILE", revoked.display()),
    );
    TokenGateway {
        gw,
        key,
        revoked,
        _dir: dir,
    }
}

impl TokenGateway {
    pub fn token(&self, device: &str) -> String {
        mint(device, &self.key)
    }

    pub fn connect(&self, source: std::net::Ipv4Addr) -> Device {
        Device::connect_from(self.gw.port, source)
    }

    /// Sends an auth frame and returns the reply.
    pub fn auth(&self, d: &mut Device, uid: &str, device: &str, token: &str) -> Value {
        d.send(
            &json!({"action":"auth","uid":uid,"deviceUid":device,"data":{"token":token}})
                .to_string(),
        );
        d.json()
    }

    /// A connection authenticated as `device`.
    pub fn authenticated(&self, device: &str) -> Device {
        let mut d = self.connect(fresh_source());
        let reply = self.auth(&mut d, "a1", device, &self.token(device));
        assert_eq!(reply, json!({"action":"auth","uid":"a1","status":"ok"}));
        d
    }

    pub fn set_revoked(&self, text: &str) {
        // Replaced by rename, as an operator's tooling would.
        let tmp = self.revoked.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.revoked).unwrap();
    }
}
