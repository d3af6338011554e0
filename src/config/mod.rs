//! Configuration: defaults < TOML file < `EDGEGATE_*` environment < flags.
//!
//! Every key is read through one table ([`KEYS`]) so that the file, the
//! environment and the flags cannot drift apart, and every refusal names the
//! key (as written in the TOML file) that caused it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default line limit (PROTOCOL 1.1), without the terminator.
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 65_536;
pub const DEFAULT_MAX_CONNECTIONS: u64 = 100_000;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
/// 1 GiB: room for hours of backlog on a hub's flash without filling it.
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 1 << 30;
/// Long enough for many requests to share one fsync, short enough to stay
/// far below a device's patience.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 2;
/// How long SIGTERM waits for Kafka to take the backlog before exiting; the
/// rest is sent after the next start. Below systemd's 90 s stop timeout.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 10;
/// Downlink messages queued for one device that is not reading; past it the
/// device is disconnected rather than letting memory grow.
pub const DEFAULT_MAX_PENDING_DOWNLINK: u64 = 1_000;
/// PROTOCOL 7: reply bytes waiting for a device that does not read, before
/// the gateway stops reading its frames.
pub const DEFAULT_MAX_PENDING_REPLY_BYTES: u64 = 256 << 10;
/// Bytes of incomplete frames held across all connections. Not in the
/// contract: sized so that hostile half-sent lines cannot take more than a
/// small hub's spare memory, while a thousand devices can each have a
/// 64 KiB frame split across reads at once.
pub const DEFAULT_MAX_PARTIAL_BYTES: u64 = 64 << 20;
/// PROTOCOL 7: bytes of an incomplete frame a connection may hold before it
/// has authenticated (an auth frame is a few hundred bytes).
pub const DEFAULT_AUTH_MAX_PENDING_BYTES: u64 = 4096;
/// Time a connection has to authenticate (token mode) or to finish its TLS
/// handshake: enough for a device on a slow link, short enough that
/// unauthenticated sockets cannot pile up.
pub const DEFAULT_AUTH_TIMEOUT_SECS: u64 = 10;

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
    #[error("invalid value for `{key}` (from the {origin}): {message}")]
    Invalid {
        key: &'static str,
        origin: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `None`: made on first start and kept in `data_dir` (see `state`).
    pub server_id: Option<String>,
    pub data_dir: PathBuf,
    pub listener: ListenerConfig,
    pub kafka: KafkaConfig,
    pub outbox: OutboxConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
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
    pub consumer_topics: Vec<String>,
    /// `None`: `edgegate-<serverId>`.
    pub consumer_group_id: Option<String>,
    pub drain_timeout: Duration,
    /// Passed to librdkafka as is, after edgegate's own settings.
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub max_bytes: u64,
    pub flush_interval: Duration,
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

/// The flag for each key that has one.
pub const FLAGS: &[(&str, &str)] = &[
    ("--server-id", "server_id"),
    ("--data-dir", "data_dir"),
    ("--listen", "listener.address"),
    ("--brokers", "kafka.brokers"),
    ("--admin-listen", "admin.address"),
];

/// Every scalar key, with its default as TOML would spell it and a short
/// description (used by `check-config` and the packaged config file).
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "server_id",
        "",
        "this gateway's id in envelopes; empty: a UUID made on first start and kept in data_dir",
    ),
    (
        "data_dir",
        "./edgegate-data",
        "directory for the outbox and the server id",
    ),
    (
        "listener.address",
        "0.0.0.0:3000",
        "device listener (plain TCP)",
    ),
    (
        "listener.max_frame_bytes",
        "65536",
        "longest frame, without its line terminator",
    ),
    (
        "listener.max_connections",
        "100000",
        "open device connections at most; more get server_busy",
    ),
    (
        "listener.idle_timeout_secs",
        "300",
        "close a connection that completes no frame for this long",
    ),
    (
        "listener.max_pending_downlink",
        "1000",
        "downlink messages queued for a device that does not read, before it is disconnected",
    ),
    (
        "listener.max_pending_reply_bytes",
        "262144",
        "reply bytes waiting for a device that does not read; past it its frames are not read until it does",
    ),
    (
        "listener.max_partial_bytes",
        "67108864",
        "bytes of incomplete frames held across all connections; a connection that would go past it is closed",
    ),
    (
        "kafka.brokers",
        "localhost:9092",
        "bootstrap brokers, comma-separated",
    ),
    (
        "kafka.producer_topic",
        "tcp_layer_messages",
        "topic for device requests",
    ),
    (
        "kafka.consumer_topics",
        "workers_layer_messages",
        "topics of worker responses (TOML array, env comma-separated)",
    ),
    (
        "kafka.consumer_group_id",
        "",
        "consumer group; empty: edgegate-<server_id>",
    ),
    (
        "kafka.drain_timeout_secs",
        "10",
        "on SIGTERM, how long Kafka gets to take the outbox backlog",
    ),
    (
        "outbox.max_bytes",
        "1073741824",
        "outbox size cap on disk; past it requests get outbox_full",
    ),
    (
        "outbox.flush_interval_ms",
        "2",
        "group commit: how long a flush waits to gather more requests",
    ),
    (
        "admin.address",
        "127.0.0.1:8080",
        "HTTP /healthz, /readyz, /metrics",
    ),
    (
        "auth.mode",
        "none",
        "none (bound by the backend's connect.response), token (HMAC token in the first frame) or mtls (client certificates)",
    ),
    (
        "auth.token_key_file",
        "",
        "token mode: the HMAC key, at least 32 bytes, not readable by group or others",
    ),
    (
        "auth.revoked_file",
        "",
        "deviceUids refused at authentication, one per line; re-read when it changes",
    ),
    (
        "auth.timeout_secs",
        "10",
        "close a connection that has not authenticated (or finished its TLS handshake) by then",
    ),
    (
        "auth.max_pending_bytes",
        "4096",
        "token mode: bytes of an incomplete frame held before authentication; past it the connection is closed",
    ),
    (
        "tls.address",
        "",
        "TLS device listener, e.g. 0.0.0.0:3443; empty: off",
    ),
    ("tls.cert_file", "", "TLS listener: certificate chain (PEM)"),
    ("tls.key_file", "", "TLS listener: private key (PEM)"),
    (
        "tls.client_ca_file",
        "",
        "mtls mode: CA certificates (PEM) that sign device certificates",
    ),
];

impl Config {
    /// Loads the configuration the way the service does: the file named by
    /// `--config` (none: defaults), then `env`, then `flags`.
    pub fn load(flags: &Flags, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => read_toml(path)?,
            None => toml::Table::new(),
        };
        let layers = Layers::new(file, env, flags)?;
        layers.build()
    }

    pub fn consumer_group(&self, server_id: &str) -> String {
        self.kafka
            .consumer_group_id
            .clone()
            .unwrap_or_else(|| format!("edgegate-{server_id}"))
    }

    /// The effective settings, one `key = value` line each, as TOML.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        // A JSON string is also a valid TOML basic string.
        let q = |v: &str| serde_json::to_string(v).unwrap_or_default();
        let _ = writeln!(
            s,
            "server_id = {}",
            q(self.server_id.as_deref().unwrap_or(""))
        );
        let _ = writeln!(s, "data_dir = {}", q(&self.data_dir.display().to_string()));
        let l = &self.listener;
        let _ = writeln!(s, "listener.address = {}", q(&l.address.to_string()));
        let _ = writeln!(s, "listener.max_frame_bytes = {}", l.max_frame_bytes);
        let _ = writeln!(s, "listener.max_connections = {}", l.max_connections);
        let _ = writeln!(
            s,
            "listener.idle_timeout_secs = {}",
            l.idle_timeout.as_secs()
        );
        let _ = writeln!(
            s,
            "listener.max_pending_downlink = {}",
            l.max_pending_downlink
        );
        let _ = writeln!(
            s,
            "listener.max_pending_reply_bytes = {}",
            l.max_pending_reply_bytes
        );
        let _ = writeln!(s, "listener.max_partial_bytes = {}", l.max_partial_bytes);
        let k = &self.kafka;
        let _ = writeln!(s, "kafka.brokers = {}", q(&k.brokers));
        let _ = writeln!(s, "kafka.producer_topic = {}", q(&k.producer_topic));
        let topics: Vec<String> = k.consumer_topics.iter().map(|t| q(t)).collect();
        let _ = writeln!(s, "kafka.consumer_topics = [{}]", topics.join(", "));
        let _ = writeln!(
            s,
            "kafka.consumer_group_id = {}",
            q(k.consumer_group_id.as_deref().unwrap_or(""))
        );
        let _ = writeln!(
            s,
            "kafka.drain_timeout_secs = {}",
            k.drain_timeout.as_secs()
        );
        for (name, value) in &k.properties {
            let shown = if is_secret(name) { "<hidden>" } else { value };
            let _ = writeln!(s, "kafka.properties.{} = {}", q(name), q(shown));
        }
        let _ = writeln!(s, "outbox.max_bytes = {}", self.outbox.max_bytes);
        let _ = writeln!(
            s,
            "outbox.flush_interval_ms = {}",
            self.outbox.flush_interval.as_millis()
        );
        let _ = writeln!(s, "admin.address = {}", q(&self.admin.address.to_string()));
        let a = &self.auth;
        let mode = match a.mode {
            AuthMode::None => "none",
            AuthMode::Token => "token",
            AuthMode::Mtls => "mtls",
        };
        let path = |p: &Option<PathBuf>| {
            q(&p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default())
        };
        let _ = writeln!(s, "auth.mode = {}", q(mode));
        // The key file's name is not a secret; its bytes never leave it.
        let _ = writeln!(s, "auth.token_key_file = {}", path(&a.token_key_file));
        let _ = writeln!(s, "auth.revoked_file = {}", path(&a.revoked_file));
        let _ = writeln!(s, "auth.timeout_secs = {}", a.timeout.as_secs());
        let _ = writeln!(s, "auth.max_pending_bytes = {}", a.max_pending_bytes);
        let t = &self.tls;
        let address = t.address.map(|a| a.to_string()).unwrap_or_default();
        let _ = writeln!(s, "tls.address = {}", q(&address));
        let _ = writeln!(s, "tls.cert_file = {}", path(&t.cert_file));
        let _ = writeln!(s, "tls.key_file = {}", path(&t.key_file));
        let _ = writeln!(s, "tls.client_ca_file = {}", path(&t.client_ca_file));
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

/// A value as one of the layers gave it.
enum Raw<'a> {
    Text(&'a str, &'static str),
    Toml(&'a toml::Value),
}

struct Layers<'a> {
    file: BTreeMap<String, toml::Value>,
    properties: BTreeMap<String, String>,
    env: &'a HashMap<String, String>,
    flags: &'a Flags,
}

impl<'a> Layers<'a> {
    fn new(
        file: toml::Table,
        env: &'a HashMap<String, String>,
        flags: &'a Flags,
    ) -> Result<Self, ConfigError> {
        let mut flat = BTreeMap::new();
        let mut properties = BTreeMap::new();
        for (name, value) in file {
            match value {
                toml::Value::Table(section) => {
                    for (k, v) in section {
                        let key = format!("{name}.{k}");
                        if key == "kafka.properties" {
                            properties = read_properties(v)?;
                        } else {
                            flat.insert(key, v);
                        }
                    }
                }
                other => {
                    flat.insert(name, other);
                }
            }
        }
        if let Some(unknown) = flat
            .keys()
            .find(|k| !KEYS.iter().any(|(name, _, _)| name == k))
        {
            return Err(ConfigError::UnknownKey(unknown.clone()));
        }
        Ok(Layers {
            file: flat,
            properties,
            env,
            flags,
        })
    }

    fn raw(&self, key: &'static str) -> Option<Raw<'_>> {
        if let Some(v) = self.flags.values.get(key) {
            return Some(Raw::Text(v, "command line"));
        }
        if let Some(v) = self.env.get(&env_name(key)) {
            return Some(Raw::Text(v, "environment"));
        }
        self.file.get(key).map(Raw::Toml)
    }

    fn string(&self, key: &'static str, default: &str) -> Result<String, ConfigError> {
        match self.raw(key) {
            None => Ok(default.to_owned()),
            Some(Raw::Text(v, _)) => Ok(v.trim().to_owned()),
            Some(Raw::Toml(toml::Value::String(v))) => Ok(v.trim().to_owned()),
            Some(Raw::Toml(_)) => Err(invalid(key, "config file", "expected a string")),
        }
    }

    fn number(
        &self,
        key: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let (value, source) = match self.raw(key) {
            None => return Ok(default),
            Some(Raw::Text(v, source)) => (
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| invalid(key, source, format!("`{v}` is not a whole number")))?,
                source,
            ),
            Some(Raw::Toml(toml::Value::Integer(i))) => (
                u64::try_from(*i)
                    .map_err(|_| invalid(key, "config file", "must not be negative"))?,
                "config file",
            ),
            Some(Raw::Toml(_)) => {
                return Err(invalid(key, "config file", "expected a whole number"))
            }
        };
        if value < min || value > max {
            return Err(invalid(
                key,
                source,
                format!("{value} is outside {min}..={max}"),
            ));
        }
        Ok(value)
    }

    fn address(&self, key: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
        let text = self.string(key, default)?;
        text.parse().map_err(|_| {
            invalid(
                key,
                self.source_of(key),
                format!("`{text}` is not an IP:port address"),
            )
        })
    }

    fn topics(&self, key: &'static str, default: &str) -> Result<Vec<String>, ConfigError> {
        let list: Vec<String> = match self.raw(key) {
            None => vec![default.to_owned()],
            Some(Raw::Text(v, _)) => v.split(',').map(|t| t.trim().to_owned()).collect(),
            Some(Raw::Toml(toml::Value::Array(items))) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid(key, "config file", "expected an array of strings"))?,
            Some(Raw::Toml(toml::Value::String(v))) => vec![v.clone()],
            Some(Raw::Toml(_)) => {
                return Err(invalid(key, "config file", "expected an array of strings"))
            }
        };
        if list.is_empty() {
            return Err(invalid(
                key,
                self.source_of(key),
                "needs at least one topic",
            ));
        }
        for t in &list {
            check_topic(key, self.source_of(key), t)?;
        }
        Ok(list)
    }

    fn source_of(&self, key: &'static str) -> &'static str {
        match self.raw(key) {
            Some(Raw::Text(_, source)) => source,
            _ => "config file",
        }
    }

    fn build(&self) -> Result<Config, ConfigError> {
        let server_id = self.string("server_id", "")?;
        if !server_id.is_empty() && !valid_id(&server_id) {
            return Err(invalid(
                "server_id",
                self.source_of("server_id"),
                "use 1 to 128 characters of A-Z a-z 0-9 . _ : -",
            ));
        }
        let data_dir = self.string("data_dir", "./edgegate-data")?;
        if data_dir.is_empty() {
            return Err(invalid(
                "data_dir",
                self.source_of("data_dir"),
                "must not be empty",
            ));
        }
        let listener = ListenerConfig {
            address: self.address("listener.address", "0.0.0.0:3000")?,
            max_frame_bytes: self.number(
                "listener.max_frame_bytes",
                DEFAULT_MAX_FRAME_BYTES,
                64,
                64 << 20,
            )? as usize,
            max_connections: self.number(
                "listener.max_connections",
                DEFAULT_MAX_CONNECTIONS,
                1,
                10_000_000,
            )? as usize,
            idle_timeout: Duration::from_secs(self.number(
                "listener.idle_timeout_secs",
                DEFAULT_IDLE_TIMEOUT_SECS,
                1,
                7 * 86_400,
            )?),
            max_pending_downlink: self.number(
                "listener.max_pending_downlink",
                DEFAULT_MAX_PENDING_DOWNLINK,
                1,
                1_000_000,
            )? as usize,
            max_pending_reply_bytes: self.number(
                "listener.max_pending_reply_bytes",
                DEFAULT_MAX_PENDING_REPLY_BYTES,
                4096,
                64 << 20,
            )? as usize,
            max_partial_bytes: self.number(
                "listener.max_partial_bytes",
                DEFAULT_MAX_PARTIAL_BYTES,
                64 << 10,
                1 << 40,
            )? as usize,
        };
        let brokers = self.string("kafka.brokers", "localhost:9092")?;
        if brokers.is_empty() {
            return Err(invalid(
                "kafka.brokers",
                self.source_of("kafka.brokers"),
                "must not be empty",
            ));
        }
        let producer_topic = self.string("kafka.producer_topic", "tcp_layer_messages")?;
        check_topic(
            "kafka.producer_topic",
            self.source_of("kafka.producer_topic"),
            &producer_topic,
        )?;
        let group = self.string("kafka.consumer_group_id", "")?;
        let kafka = KafkaConfig {
            brokers,
            producer_topic,
            consumer_topics: self.topics("kafka.consumer_topics", "workers_layer_messages")?,
            consumer_group_id: (!group.is_empty()).then_some(group),
            drain_timeout: Duration::from_secs(self.number(
                "kafka.drain_timeout_secs",
                DEFAULT_DRAIN_TIMEOUT_SECS,
                0,
                3600,
            )?),
            properties: self.properties.clone(),
        };
        let outbox = OutboxConfig {
            max_bytes: self.number(
                "outbox.max_bytes",
                DEFAULT_OUTBOX_MAX_BYTES,
                1 << 20,
                u64::MAX,
            )?,
            flush_interval: Duration::from_millis(self.number(
                "outbox.flush_interval_ms",
                DEFAULT_FLUSH_INTERVAL_MS,
                0,
                1000,
            )?),
        };
        let admin = AdminConfig {
            address: self.address("admin.address", "127.0.0.1:8080")?,
        };
        let (auth, tls) = self.security()?;
        Ok(Config {
            server_id: (!server_id.is_empty()).then_some(server_id),
            data_dir: PathBuf::from(data_dir),
            listener,
            kafka,
            outbox,
            admin,
            auth,
            tls,
        })
    }

    fn path(&self, key: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        let text = self.string(key, "")?;
        Ok((!text.is_empty()).then(|| PathBuf::from(text)))
    }

    /// The `auth` and `tls` sections, checked against each other. The files
    /// themselves are read (and refused, naming the file) at start.
    fn security(&self) -> Result<(AuthConfig, TlsConfig), ConfigError> {
        let mode = match self.string("auth.mode", "none")?.as_str() {
            "none" => AuthMode::None,
            "token" => AuthMode::Token,
            "mtls" => AuthMode::Mtls,
            other => {
                return Err(invalid(
                    "auth.mode",
                    self.source_of("auth.mode"),
                    format!("`{other}` is not one of none, token, mtls"),
                ))
            }
        };
        let auth = AuthConfig {
            mode,
            token_key_file: self.path("auth.token_key_file")?,
            revoked_file: self.path("auth.revoked_file")?,
            timeout: Duration::from_secs(self.number(
                "auth.timeout_secs",
                DEFAULT_AUTH_TIMEOUT_SECS,
                1,
                3600,
            )?),
            max_pending_bytes: self.number(
                "auth.max_pending_bytes",
                DEFAULT_AUTH_MAX_PENDING_BYTES,
                256,
                64 << 20,
            )? as usize,
        };
        let address = self.string("tls.address", "")?;
        let tls = TlsConfig {
            address: if address.is_empty() {
                None
            } else {
                Some(self.address("tls.address", "")?)
            },
            cert_file: self.path("tls.cert_file")?,
            key_file: self.path("tls.key_file")?,
            client_ca_file: self.path("tls.client_ca_file")?,
        };
        let need = |key: &'static str, present: bool, why: &str| {
            if present {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    self.source_of(key),
                    format!("is required {why}"),
                ))
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
                self.source_of("tls.client_ca_file"),
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
}

fn read_properties(value: toml::Value) -> Result<BTreeMap<String, String>, ConfigError> {
    let toml::Value::Table(table) = value else {
        return Err(invalid(
            "kafka.properties",
            "config file",
            "expected a table of librdkafka settings",
        ));
    };
    table
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(invalid(
                        "kafka.properties",
                        "config file",
                        format!("`{k}` must be a string, number or boolean"),
                    ))
                }
            };
            Ok((k, text))
        })
        .collect()
}

/// `listener.max_frame_bytes` → `EDGEGATE_LISTENER_MAX_FRAME_BYTES`.
pub fn env_name(key: &str) -> String {
    format!("EDGEGATE_{}", key.replace('.', "_").to_ascii_uppercase())
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn check_topic(key: &'static str, source: &'static str, topic: &str) -> Result<(), ConfigError> {
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
            source,
            format!("`{topic}` is not a Kafka topic name (1 to 249 of A-Z a-z 0-9 . _ -)"),
        ))
    }
}

fn invalid(key: &'static str, origin: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        origin,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests;
