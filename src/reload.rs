//! SIGHUP (PROTOCOL 4): the configuration is read again as at start (file,
//! environment, flags) and what can change without dropping a connection is
//! applied: the log filter and format, the token key, the TLS certificate,
//! key and client CA, and the revocation list (re-read; its devices' open
//! connections are closed). Everything new is read and checked before
//! anything is applied, so a reload that fails changes nothing. Any other
//! key that changed is logged as waiting for a restart.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::config::{AuthMode, Config, ConfigError, Setting};
use crate::ops::logging::{self, Format};
use crate::ops::metrics::Metrics;
use crate::routing::Router;
use crate::security::auth::{Gate, KeyError, TokenKey};
use crate::security::tls::{self, TlsError};

/// Reads the configuration the way the gateway was started.
pub type Load = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("log.level: {0}")]
    Log(String),
}

/// The keys a reload applies.
const RELOADABLE: &[&str] = &[
    "log.level",
    "log.format",
    "auth.token_key_file",
    "tls.cert_file",
    "tls.key_file",
    "tls.client_ca_file",
];

/// What a reload changes in the running gateway.
pub struct Targets {
    pub gate: Arc<Gate>,
    /// Closes the connections of newly revoked devices.
    pub router: Arc<Router>,
    pub tls: Option<Arc<tls::Acceptor>>,
    pub metrics: Arc<Metrics>,
}

pub struct Reloader {
    load: Load,
    targets: Targets,
    /// The settings in effect: those of the start, with reloaded keys
    /// updated (so a change that waits for a restart is reported each time).
    running: Mutex<Vec<Setting>>,
}

impl Reloader {
    pub fn new(load: Load, targets: Targets, running: Vec<Setting>) -> Reloader {
        Reloader {
            load,
            targets,
            running: Mutex::new(running),
        }
    }

    /// Reloads, logging what changed or why nothing did.
    pub fn reload(&self) {
        let metrics = &self.targets.metrics;
        match self.try_reload() {
            Ok(()) => metrics.reloads.fetch_add(1, Relaxed),
            Err(e) => {
                log::error!("reload refused, the running settings are kept: {e}");
                metrics.reloads_failed.fetch_add(1, Relaxed)
            }
        };
    }

    fn try_reload(&self) -> Result<(), ReloadError> {
        let new = (self.load)()?;
        let gate = &self.targets.gate;
        // Everything is read and checked first...
        let format = Format::resolve(new.log.format);
        let key = match (gate.mode, &new.auth.token_key_file) {
            (AuthMode::Token, Some(path)) => Some((TokenKey::load(path)?, path)),
            _ => None,
        };
        let acceptor = match &self.targets.tls {
            Some(_) => Some(tls::acceptor(&new.tls, gate.mode)?),
            None => None,
        };
        // ...then applied.
        let mut done = Vec::new();
        let was = logging::configure(&new.log.level, format).map_err(ReloadError::Log)?;
        done.push(format!(
            "log.level {:?} (was {was:?}), format {format:?}",
            new.log.level
        ));
        if let Some((key, path)) = key {
            gate.set_key(key);
            done.push(format!("token key {}", path.display()));
        }
        if let (Some(current), Some(acceptor)) = (&self.targets.tls, acceptor) {
            current.replace(acceptor);
            done.push("TLS certificate, key and client CA (new handshakes)".to_owned());
        }
        if let Some(listed) = gate.revoked.reload_now() {
            for device in &listed {
                self.targets.router.close_device(device);
            }
            done.push(format!("revocation list ({} device(s))", listed.len()));
        }
        log::info!("reloaded: {}", done.join("; "));

        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut waiting = Vec::new();
        for setting in &new.settings {
            let Some(old) = running.iter_mut().find(|s| s.key == setting.key) else {
                continue;
            };
            if old.value == setting.value {
                continue;
            }
            if RELOADABLE.contains(&setting.key) {
                *old = setting.clone();
            } else {
                waiting.push(format!(
                    "{} = {} (running: {})",
                    setting.key, setting.value, old.value
                ));
            }
        }
        if !waiting.is_empty() {
            log::warn!(
                "changed, but applied only by a restart: {}",
                waiting.join(", ")
            );
        }
        Ok(())
    }
}
