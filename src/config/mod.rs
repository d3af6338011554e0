//! Configuration: defaults < TOML file < `EDGEGATE_*` environment < flags.
//!
//! Every key is described once, in [`keys::KEYS`] (its default, range,
//! environment variable, flag and help); [`layers`] reads a key's value from
//! whichever layer gives it and remembers where it came from; this module
//! turns the values into typed settings and checks them against each other.
//! Every refusal names the key (as written in the TOML file) that caused it.

pub mod keys;
mod layers;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use keys::{env_name, Key, KEYS};
pub use layers::{Origin, Setting};

use layers::{invalid, Layers};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("unknown configuration key `{0}`")]
    UnknownKey(String),
    #[error("unknown environment variable `{0}`: no configuration key is set by it (`edgegate --help` lists them)")]
    UnknownEnv(String),
    #[error("invalid value for `{key}` (from the {origin}): {message}")]
    Invalid {
        key: String,
        origin: Origin,
        message: String,
    },
    #[error("`{key}` is required {why} (set it in the config file or with {env})")]
    Missing {
        key: &'static str,
        why: &'static str,
        env: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `None`: made on first start and kept in `data_dir` (see `state`).
    pub server_id: Option<String>,
    pub data_dir: PathBuf,
    pub listener: ListenerConfig,
    pub kafka: KafkaConfig,
    pub downlink: DownlinkConfig,
    pub limits: LimitsConfig,
    pub outbox: OutboxConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
    /// Every key's effective value and origin, for `check-config`.
    pub settings: Vec<Setting>,
}

/// How a connection proves which device it is (PROTOCOL 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Bound only by the backend's `connect.response`.
    None,
    /// An HMAC token in the first frame.
    Token,
    /// A client certificate on the TLS listener.
    Mtls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Journal when systemd gave the gateway a journal stream, else text.
    Auto,
    Text,
    Json,
    Journal,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A valid `RUST_LOG`-style filter.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub token_key_file: Option<PathBuf>,
    pub revoked_file: Option<PathBuf>,
    pub timeout: Duration,
    pub max_pending_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// `None`: no TLS listener.
    pub address: Option<SocketAddr>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub max_frame_bytes: usize,
    pub max_json_depth: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_pending_downlink: usize,
    pub max_pending_reply_bytes: usize,
    pub max_partial_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub producer_topic: String,
    /// May be empty when `reply_topic` is set.
    pub consumer_topics: Vec<String>,
    /// As configured, `{serverId}` not yet replaced: see [`KafkaConfig::reply_topic`].
    pub reply_topic: Option<String>,
    pub reply_topic_partitions: i32,
    pub presence_topic: Option<String>,
    /// `None`: `edgegate-<serverId>`.
    pub consumer_group_id: Option<String>,
    pub drain_timeout: Duration,
    /// librdkafka's `fetch.wait.max.ms` for the downlink consumer.
    pub fetch_wait: Duration,
    /// Passed to librdkafka as is, after edgegate's own settings.
    pub properties: BTreeMap<String, String>,
}

/// Rate limits (PROTOCOL 7); 0 requests per second: off.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub requests_per_sec: u64,
    pub burst: u64,
}

/// The hold for devices not connected (PROTOCOL 6.3).
#[derive(Debug, Clone)]
pub struct DownlinkConfig {
    pub hold_for: Duration,
    pub hold_max_per_device: usize,
    pub hold_max_bytes: u64,
}

/// `outbox.compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxCompression {
    /// Smallest on disk (zstd level 1).
    Zstd,
    /// Fewer instructions per byte, larger on disk.
    Lz4,
    None,
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub max_bytes: u64,
    pub flush_interval: Duration,
    pub spill_after: Duration,
    /// How records on disk are compressed.
    pub compression: OutboxCompression,
    pub quarantine_max_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

/// Values given on the command line, by TOML key.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub values: HashMap<&'static str, String>,
}

impl Config {
    /// Loads the configuration the way the service does: the file named by
    /// `--config` (none: defaults), then `env`, then `flags`.
    pub fn load(flags: &Flags, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_toml(path)?,
            None => toml::Table::new(),
        };
        build(&Layers::new(file, env, flags)?)
    }

    /// This gateway's reply topic (PROTOCOL 6.1), `{serverId}` replaced.
    pub fn reply_topic(&self, server_id: &str) -> Result<Option<String>, ConfigError> {
        let Some(template) = &self.kafka.reply_topic else {
            return Ok(None);
        };
        let topic = template.replace(SERVER_ID_PLACEHOLDER, server_id);
        let origin = self
            .settings
            .iter()
            .find(|s| s.key == "kafka.reply_topic")
            .map_or(Origin::Default, |s| s.origin);
        check_topic("kafka.reply_topic", origin, &topic)?;
        Ok(Some(topic))
    }

    pub fn consumer_group(&self, server_id: &str) -> String {
        self.kafka
            .consumer_group_id
            .clone()
            .unwrap_or_else(|| format!("edgegate-{server_id}"))
    }

    /// The effective settings as TOML, one `key = value` line each, with
    /// where a value came from when it is not the default.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for setting in &self.settings {
            let _ = write!(s, "{} = {}", setting.key, setting.value);
            if setting.origin != Origin::Default {
                let _ = write!(s, "  # {}", setting.origin);
            }
            s.push('\n');
        }
        for (name, value) in &self.kafka.properties {
            let shown = if is_secret(name) { "<hidden>" } else { value };
            let _ = writeln!(
                s,
                "kafka.properties.{} = {}  # config file",
                keys::quote(name),
                keys::quote(shown)
            );
        }
        s
    }
}

/// librdkafka settings whose values must not be printed.
pub fn is_secret(name: &str) -> bool {
    name.contains("password")
        || name.contains("secret")
        || name.contains("key.pem")
        || name.ends_with(".key")
}

fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Toml {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn build(layers: &Layers<'_>) -> Result<Config, ConfigError> {
    let server_id = layers.string("server_id")?;
    if !server_id.is_empty() && !valid_id(&server_id) {
        return Err(invalid(
            "server_id",
            layers.origin("server_id"),
            "use 1 to 128 characters of A-Z a-z 0-9 . _ : -",
        ));
    }
    let data_dir = layers.string("data_dir")?;
    if data_dir.is_empty() {
        return Err(invalid(
            "data_dir",
            layers.origin("data_dir"),
            "must not be empty",
        ));
    }
    let listener = ListenerConfig {
        address: layers.address("listener.address")?,
        max_frame_bytes: layers.number("listener.max_frame_bytes")? as usize,
        max_json_depth: layers.number("listener.max_json_depth")? as usize,
        max_connections: layers.number("listener.max_connections")? as usize,
        idle_timeout: Duration::from_secs(layers.number("listener.idle_timeout_secs")?),
        max_pending_downlink: layers.number("listener.max_pending_downlink")? as usize,
        max_pending_reply_bytes: layers.number("listener.max_pending_reply_bytes")? as usize,
        max_partial_bytes: layers.number("listener.max_partial_bytes")? as usize,
    };
    let brokers = layers.string("kafka.brokers")?;
    if brokers.is_empty() {
        return Err(invalid(
            "kafka.brokers",
            layers.origin("kafka.brokers"),
            "must not be empty",
        ));
    }
    let producer_topic = layers.string("kafka.producer_topic")?;
    check_topic(
        "kafka.producer_topic",
        layers.origin("kafka.producer_topic"),
        &producer_topic,
    )?;
    let consumer_topics = layers.topics("kafka.consumer_topics")?;
    let reply_topic = layers.string("kafka.reply_topic")?;
    if !reply_topic.is_empty() {
        // Checked with a stand-in id here, with the real one at start (a
        // generated serverId is a UUID, always fit for a topic name).
        let id = if server_id.is_empty() {
            "id"
        } else {
            &server_id
        };
        check_topic(
            "kafka.reply_topic",
            layers.origin("kafka.reply_topic"),
            &reply_topic.replace(SERVER_ID_PLACEHOLDER, id),
        )?;
    } else if consumer_topics.is_empty() {
        return Err(invalid(
            "kafka.consumer_topics",
            layers.origin("kafka.consumer_topics"),
            "is empty and kafka.reply_topic is not set: no reply would ever reach a device",
        ));
    }
    let presence_topic = layers.string("kafka.presence_topic")?;
    if !presence_topic.is_empty() {
        check_topic(
            "kafka.presence_topic",
            layers.origin("kafka.presence_topic"),
            &presence_topic,
        )?;
    }
    let group = layers.string("kafka.consumer_group_id")?;
    let kafka = KafkaConfig {
        brokers,
        producer_topic,
        consumer_topics,
        reply_topic: (!reply_topic.is_empty()).then_some(reply_topic),
        reply_topic_partitions: layers.number("kafka.reply_topic_partitions")? as i32,
        presence_topic: (!presence_topic.is_empty()).then_some(presence_topic),
        consumer_group_id: (!group.is_empty()).then_some(group),
        drain_timeout: Duration::from_secs(layers.number("kafka.drain_timeout_secs")?),
        fetch_wait: Duration::from_millis(layers.number("kafka.fetch_wait_ms")?),
        properties: layers.properties.clone(),
    };
    let downlink = DownlinkConfig {
        hold_for: Duration::from_secs(layers.number("downlink.hold_secs")?),
        hold_max_per_device: layers.number("downlink.hold_max_per_device")? as usize,
        hold_max_bytes: layers.number("downlink.hold_max_bytes")?,
    };
    let limits = LimitsConfig {
        requests_per_sec: layers.number("limits.requests_per_sec")?,
        burst: layers.number("limits.burst")?,
    };
    let outbox = OutboxConfig {
        max_bytes: layers.number("outbox.max_bytes")?,
        flush_interval: Duration::from_millis(layers.number("outbox.flush_interval_ms")?),
        spill_after: Duration::from_millis(layers.number("outbox.spill_after_ms")?),
        compression: match layers.choice("outbox.compression")? {
            "zstd" => OutboxCompression::Zstd,
            "lz4" => OutboxCompression::Lz4,
            _ => OutboxCompression::None,
        },
        quarantine_max_bytes: layers.number("outbox.quarantine_max_bytes")?,
    };
    let admin = AdminConfig {
        address: layers.address("admin.address")?,
    };
    let (auth, tls) = security(layers)?;
    let log = LogConfig {
        level: log_level(layers)?,
        format: match layers.choice("log.format")? {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            "journal" => LogFormat::Journal,
            _ => LogFormat::Auto,
        },
    };
    Ok(Config {
        server_id: (!server_id.is_empty()).then_some(server_id),
        data_dir: PathBuf::from(data_dir),
        listener,
        kafka,
        downlink,
        limits,
        outbox,
        admin,
        auth,
        tls,
        log,
        settings: layers.settings(),
    })
}

/// `log.level`, refused unless every directive parses: env_filter would
/// otherwise drop a bad one and log less than asked (`inof`: nothing).
fn log_level(layers: &Layers<'_>) -> Result<String, ConfigError> {
    let level = layers.string("log.level")?;
    check_log_filter(&level)
        .map_err(|why| invalid("log.level", layers.origin("log.level"), why))?;
    Ok(level)
}

/// Whether `spec` is a filter the logger can use as it is.
pub fn check_log_filter(spec: &str) -> Result<(), String> {
    if spec.is_empty() {
        return Err("must not be empty (use \"off\" for no logs)".into());
    }
    env_filter::Builder::new()
        .try_parse(spec)
        .map_err(|e| format!("`{spec}` is not a log filter: {e}"))?;
    // env_filter reads a bare word as a target to log everything of: a
    // misspelt level (`inof`) would silence every line. Here a bare word
    // must be a level; a target needs its level (`librdkafka=warn`).
    let directives = spec.split('/').next().unwrap_or_default();
    for bare in directives.split(',').map(str::trim) {
        if !bare.is_empty() && !bare.contains('=') && bare.parse::<log::LevelFilter>().is_err() {
            return Err(format!(
                "`{bare}` is not a level (error, warn, info, debug, trace, off); a target needs one: `{bare}=debug`"
            ));
        }
    }
    Ok(())
}

/// The `auth` and `tls` sections, checked against each other. The files
/// themselves are read (and refused, naming the file) at start.
fn security(layers: &Layers<'_>) -> Result<(AuthConfig, TlsConfig), ConfigError> {
    let mode = match layers.choice("auth.mode")? {
        "token" => AuthMode::Token,
        "mtls" => AuthMode::Mtls,
        _ => AuthMode::None,
    };
    let auth = AuthConfig {
        mode,
        token_key_file: layers.path("auth.token_key_file")?,
        revoked_file: layers.path("auth.revoked_file")?,
        timeout: Duration::from_secs(layers.number("auth.timeout_secs")?),
        max_pending_bytes: layers.number("auth.max_pending_bytes")? as usize,
    };
    let tls = TlsConfig {
        address: layers.optional_address("tls.address")?,
        cert_file: layers.path("tls.cert_file")?,
        key_file: layers.path("tls.key_file")?,
        client_ca_file: layers.path("tls.client_ca_file")?,
    };
    let need = |key: &'static str, present: bool, why: &'static str| {
        if present {
            Ok(())
        } else {
            Err(ConfigError::Missing {
                key,
                why,
                env: env_name(key),
            })
        }
    };
    if mode == AuthMode::Token {
        need(
            "auth.token_key_file",
            auth.token_key_file.is_some(),
            "when auth.mode is token",
        )?;
    }
    if mode == AuthMode::Mtls {
        need(
            "tls.address",
            tls.address.is_some(),
            "when auth.mode is mtls",
        )?;
        need(
            "tls.client_ca_file",
            tls.client_ca_file.is_some(),
            "when auth.mode is mtls",
        )?;
    } else if tls.client_ca_file.is_some() {
        // Accepting it silently would suggest devices are checked.
        return Err(invalid(
            "tls.client_ca_file",
            layers.origin("tls.client_ca_file"),
            "is only used when auth.mode is mtls",
        ));
    }
    if tls.address.is_some() {
        need(
            "tls.cert_file",
            tls.cert_file.is_some(),
            "when tls.address is set",
        )?;
        need(
            "tls.key_file",
            tls.key_file.is_some(),
            "when tls.address is set",
        )?;
    }
    Ok((auth, tls))
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Replaced by the gateway's id in `kafka.reply_topic`.
const SERVER_ID_PLACEHOLDER: &str = "{serverId}";

fn check_topic(key: &str, origin: Origin, topic: &str) -> Result<(), ConfigError> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            origin,
            format!("`{topic}` is not a Kafka topic name (1 to 249 of A-Z a-z 0-9 . _ -)"),
        ))
    }
}

#[cfg(test)]
mod tests;
