//! What is checked before anything starts, for `run` and `check-config`
//! alike: the files the settings name, the kafka.properties as librdkafka
//! reads them, the largest frame against Kafka's message limit, and (for
//! `check-config`) that the data directory is writable.

use std::sync::Arc;

use futures_rustls::TlsAcceptor;

use super::AppError;
use crate::config::Config;
use crate::ops::metrics::Metrics;
use crate::security::auth::Gate;
use crate::security::tls;
use crate::wire::protocol::RECORD_OVERHEAD_BYTES;

/// A configuration whose files (token key, certificates, CA, revocation
/// list) were read and accepted: `check-config` stops here, `run` goes on to
/// [`start`]. A bad file stops the service with a message naming it, before
/// anything else starts.
pub struct Checked {
    pub(super) config: Config,
    pub(super) gate: Gate,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) metrics: Arc<Metrics>,
}

impl Checked {
    pub fn new(config: Config) -> Result<Checked, AppError> {
        check_frame_fits_kafka(&config)?;
        check_kafka_properties(&config)?;
        let metrics = Arc::new(Metrics::default());
        let gate = Gate::new(&config.auth, metrics.clone())?;
        let tls = match config.tls.address {
            Some(_) => Some(tls::acceptor(&config.tls, config.auth.mode)?),
            None => None,
        };
        Ok(Checked {
            config,
            gate,
            tls,
            metrics,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// `check-config`: the data directory, or the nearest existing directory
/// it would be created in, must be writable by this user (the unit's
/// `edgegate`, not the operator who runs the check as root).
pub fn check_data_dir_writable(path: &std::path::Path) -> Result<(), AppError> {
    use rustix::fs::{access, Access};
    let existing = path
        .ancestors()
        .find(|p| p.as_os_str().is_empty() || p.exists())
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(path);
    let refused = |source: std::io::Error| AppError::DataDir {
        path: path.to_owned(),
        source,
    };
    if !existing.is_dir() {
        return Err(refused(std::io::Error::other(format!(
            "{} is not a directory",
            existing.display()
        ))));
    }
    access(existing, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
        refused(std::io::Error::other(format!(
            "{} is not writable by this user (uid {}): {e}",
            existing.display(),
            rustix::process::getuid().as_raw()
        )))
    })
}

/// librdkafka checks `kafka.properties` only when a client is made: made
/// here, without connecting, so a misspelt or invalid entry is refused by
/// `check-config` and before anything starts, not by a crash after.
fn check_kafka_properties(config: &Config) -> Result<(), AppError> {
    let producer = crate::kafka::producer::client_config(&config.kafka);
    let consumer = crate::kafka::consumer::client_config(&config.kafka, "edgegate-check");
    for (client, c) in [("producer", producer), ("consumer", consumer)] {
        match c.create_native_config() {
            Ok(_) => {}
            Err(rdkafka::error::KafkaError::ClientConfig(_, reason, key, value)) => {
                return Err(AppError::KafkaProperties {
                    client,
                    entry: format!("{key:?} = {value:?}"),
                    reason,
                })
            }
            Err(other) => {
                return Err(AppError::KafkaProperties {
                    client,
                    entry: String::new(),
                    reason: other.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// librdkafka's own limit on one message (its `message.max.bytes`).
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// A frame of `max_frame_bytes` must fit one Kafka message once enveloped.
/// (A topic's own, lower `max.message.bytes` is found only when Kafka
/// refuses: those requests go to the quarantine.)
fn check_frame_fits_kafka(config: &Config) -> Result<(), AppError> {
    let frame = config.listener.max_frame_bytes;
    let set = config.kafka.properties.get("message.max.bytes");
    let limit = match set {
        // librdkafka refuses a value that is not a number, naming it.
        Some(v) => v.trim().parse::<usize>().unwrap_or(usize::MAX),
        None => LIBRDKAFKA_MESSAGE_MAX_BYTES,
    };
    if frame + RECORD_OVERHEAD_BYTES > limit {
        return Err(AppError::FrameTooLargeForKafka {
            frame,
            overhead: RECORD_OVERHEAD_BYTES,
            limit: limit.to_string(),
            default: if set.is_none() {
                ", librdkafka's default"
            } else {
                ""
            },
        });
    }
    Ok(())
}
