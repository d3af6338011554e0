//! The one table of configuration keys. Each key's default, accepted range,
//! environment variable, command-line flag and help text are written here
//! and nowhere else: loading, `check-config`, the usage text and the test of
//! the packaged `packaging/edgegate.toml` all read this table.

/// What a key's value is, and so how every layer's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string, trimmed; may be empty when the default is.
    Text,
    /// A file name; empty: none.
    Path,
    /// An `IP:port` address.
    Address,
    /// An `IP:port` address; empty: off.
    OptionalAddress,
    /// Kafka topic names: a TOML array, or comma-separated text.
    Topics,
    /// A whole number within `min..=max`.
    Number { min: u64, max: u64 },
    /// One of the listed words.
    Choice(&'static [&'static str]),
}

/// A command-line flag and the placeholder its usage line shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    pub name: &'static str,
    pub value: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// As written in the TOML file: `section.key`, or `key` at the top.
    pub name: &'static str,
    pub kind: Kind,
    /// As TOML would spell the value, without quotes.
    pub default: &'static str,
    pub flag: Option<Flag>,
    pub help: &'static str,
}

impl Key {
    /// `listener.max_frame_bytes` → `EDGEGATE_LISTENER_MAX_FRAME_BYTES`.
    pub fn env(&self) -> String {
        env_name(self.name)
    }

    /// The default as TOML writes it (strings quoted, arrays bracketed).
    pub fn default_toml(&self) -> String {
        match self.kind {
            Kind::Number { .. } => self.default.to_owned(),
            Kind::Topics => format!("[{}]", quote(self.default)),
            _ => quote(self.default),
        }
    }
}

pub fn env_name(key: &str) -> String {
    format!("EDGEGATE_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// A JSON string is also a valid TOML basic string.
pub(crate) fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// The key named `name`. Every name the loader asks for is in the table (a
/// test loads the defaults, which asks for each).
pub fn key(name: &str) -> &'static Key {
    KEYS.iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("`{name}` is not in config::keys::KEYS"))
}

/// The flag `--name`, if some key has it.
pub fn by_flag(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.flag.is_some_and(|f| f.name == name))
}

const fn number(min: u64, max: u64) -> Kind {
    Kind::Number { min, max }
}

const fn flag(name: &'static str, value: &'static str) -> Option<Flag> {
    Some(Flag { name, value })
}

/// In the order `check-config` prints them and the packaged file lists them.
pub const KEYS: &[Key] = &[
    Key {
        name: "server_id",
        kind: Kind::Text,
        default: "",
        flag: flag("--server-id", "ID"),
        help: "this gateway's id in envelopes; empty: a UUID made on first start and kept in data_dir",
    },
    Key {
        name: "data_dir",
        kind: Kind::Text,
        default: "./edgegate-data",
        flag: flag("--data-dir", "DIR"),
        help: "directory for the outbox and the server id",
    },
    Key {
        name: "listener.address",
        kind: Kind::Address,
        default: "0.0.0.0:3000",
        flag: flag("--listen", "ADDR"),
        help: "device listener (plain TCP)",
    },
    // The contract's line limit (PROTOCOL 1.1), without the terminator.
    Key {
        name: "listener.max_frame_bytes",
        kind: number(64, 64 << 20),
        default: "65536",
        flag: None,
        help: "longest frame, without its line terminator",
    },
    // PROTOCOL 1.1; above serde_json's own limit of 128 it would mean nothing.
    Key {
        name: "listener.max_json_depth",
        kind: number(1, 128),
        default: "32",
        flag: None,
        help: "levels arrays and objects may nest in a frame, the frame itself included; deeper gets bad_request",
    },
    Key {
        name: "listener.max_connections",
        kind: number(1, 10_000_000),
        default: "100000",
        flag: None,
        help: "open device connections at most; more get server_busy",
    },
    Key {
        name: "listener.idle_timeout_secs",
        kind: number(1, 7 * 86_400),
        default: "300",
        flag: None,
        help: "close a connection that completes no frame for this long",
    },
    // Past it the device is disconnected rather than letting memory grow.
    Key {
        name: "listener.max_pending_downlink",
        kind: number(1, 1_000_000),
        default: "1000",
        flag: None,
        help: "downlink messages queued for a device that does not read, before it is disconnected",
    },
    // PROTOCOL 7.
    Key {
        name: "listener.max_pending_reply_bytes",
        kind: number(4096, 64 << 20),
        default: "262144",
        flag: None,
        help: "reply bytes waiting for a device that does not read; past it its frames are not read until it does",
    },
    // Not in the contract: hostile half-sent lines cannot take more than a
    // small hub's spare memory, while a thousand devices can each have a
    // 64 KiB frame split across reads at once.
    Key {
        name: "listener.max_partial_bytes",
        kind: number(64 << 10, 1 << 40),
        default: "67108864",
        flag: None,
        help: "bytes of incomplete frames held across all connections; a connection that would go past it is closed",
    },
    Key {
        name: "kafka.brokers",
        kind: Kind::Text,
        default: "localhost:9092",
        flag: flag("--brokers", "LIST"),
        help: "bootstrap brokers, comma-separated",
    },
    Key {
        name: "kafka.producer_topic",
        kind: Kind::Text,
        default: "tcp_layer_messages",
        flag: None,
        help: "topic for device requests",
    },
    Key {
        name: "kafka.consumer_topics",
        kind: Kind::Topics,
        default: "workers_layer_messages",
        flag: None,
        help: "topics of worker responses (TOML array, env comma-separated)",
    },
    Key {
        name: "kafka.consumer_group_id",
        kind: Kind::Text,
        default: "",
        flag: None,
        help: "consumer group; empty: edgegate-<server_id>",
    },
    // PROTOCOL 6.1: a fleet on one cluster reads only its own replies.
    Key {
        name: "kafka.reply_topic",
        kind: Kind::Text,
        default: "",
        flag: None,
        help: "topic only this gateway reads replies from, created if missing; {serverId} is replaced; empty: off",
    },
    Key {
        name: "kafka.reply_topic_partitions",
        kind: number(1, 10_000),
        default: "1",
        flag: None,
        help: "partitions of the reply topic when the gateway creates it",
    },
    // PROTOCOL 6.2.
    Key {
        name: "kafka.presence_topic",
        kind: Kind::Text,
        default: "",
        flag: None,
        help: "topic for connected/disconnected events, keyed by deviceUid; empty: off",
    },
    // Kafka answers a waiting fetch when data arrives; some brokers (tansu)
    // only when the wait is over. Each empty answer crosses the WAN.
    Key {
        name: "kafka.fetch_wait_ms",
        kind: number(1, 300_000),
        default: "500",
        flag: None,
        help: "longest the broker holds a fetch for downlink data; brokers that do not answer when data arrives (tansu) delay replies this long",
    },
    // Below systemd's 90 s stop timeout; the rest is sent after the next start.
    Key {
        name: "kafka.drain_timeout_secs",
        kind: number(0, 3600),
        default: "10",
        flag: None,
        help: "on SIGTERM, how long Kafka gets to take the outbox backlog",
    },
    // PROTOCOL 6.3.
    Key {
        name: "downlink.hold_secs",
        kind: number(1, 365 * 86_400),
        default: "86400",
        flag: None,
        help: "how long a message for a device that is not connected is held for it, on disk",
    },
    Key {
        name: "downlink.hold_max_per_device",
        kind: number(1, 10_000_000),
        default: "1000",
        flag: None,
        help: "messages held for one device at most; past it its oldest is dropped and counted",
    },
    Key {
        name: "downlink.hold_max_bytes",
        kind: number(1 << 10, u64::MAX),
        default: "268435456",
        flag: None,
        help: "bytes of held messages over all devices at most; past it the oldest is dropped and counted",
    },
    // PROTOCOL 7.
    Key {
        name: "limits.requests_per_sec",
        kind: number(0, 10_000_000),
        default: "0",
        flag: None,
        help: "requests a connection, and a bound device over all its connections, may send per second; more get rate_limited; 0: off",
    },
    Key {
        name: "limits.burst",
        kind: number(0, 100_000_000),
        default: "0",
        flag: None,
        help: "requests that may come at once above the rate; 0: one second's worth",
    },
    // 1 GiB: hours of backlog on a hub's flash without filling it.
    Key {
        name: "outbox.max_bytes",
        kind: number(1 << 20, u64::MAX),
        default: "1073741824",
        flag: None,
        help: "outbox size cap on disk; past it requests get outbox_full",
    },
    // Long enough for many requests to share one fsync, short enough to stay
    // far below a device's patience.
    Key {
        name: "outbox.flush_interval_ms",
        kind: number(0, 1000),
        default: "2",
        flag: None,
        help: "group commit: how long a flush waits to gather more requests",
    },
    // PROTOCOL 3: a request waits this long for Kafka's confirmation before
    // it is written to disk; 0 writes every request first.
    Key {
        name: "outbox.spill_after_ms",
        kind: number(0, 60_000),
        default: "50",
        flag: None,
        help: "a request Kafka has not confirmed within this many ms is written to the outbox (and acked then); 0: every request is written before its ack",
    },
    // PROTOCOL 3: what reaches the disk is compressed; records written by
    // any setting (and by 0.1.0, uncompressed) are read.
    Key {
        name: "outbox.compression",
        kind: Kind::Choice(&["zstd", "lz4", "none"]),
        default: "zstd",
        flag: None,
        help: "how records written to the outbox are compressed: zstd (smallest), lz4 (cheapest on CPU) or none",
    },
    // Enough for thousands of refused requests; bounded so that a device
    // sending nothing but refused requests cannot fill the disk.
    Key {
        name: "outbox.quarantine_max_bytes",
        kind: number(0, u64::MAX),
        default: "67108864",
        flag: None,
        help: "requests Kafka refuses for good are kept in data_dir/quarantine/ up to this size; past it they are dropped and counted",
    },
    Key {
        name: "admin.address",
        kind: Kind::Address,
        default: "127.0.0.1:8080",
        flag: flag("--admin-listen", "ADDR"),
        help: "HTTP /healthz, /readyz, /status, /metrics",
    },
    Key {
        name: "auth.mode",
        kind: Kind::Choice(&["none", "token", "mtls"]),
        default: "none",
        flag: None,
        help: "none (bound by the backend's connect.response), token (HMAC token in the first frame) or mtls (client certificates)",
    },
    Key {
        name: "auth.token_key_file",
        kind: Kind::Path,
        default: "",
        flag: None,
        help: "token mode: the HMAC key, at least 32 bytes, not readable by group or others",
    },
    Key {
        name: "auth.revoked_file",
        kind: Kind::Path,
        default: "",
        flag: None,
        help: "deviceUids refused at authentication, one per line; re-read when it changes",
    },
    // Enough for a device on a slow link, short enough that unauthenticated
    // sockets cannot pile up.
    Key {
        name: "auth.timeout_secs",
        kind: number(1, 3600),
        default: "10",
        flag: None,
        help: "close a connection that has not authenticated (or finished its TLS handshake) by then",
    },
    // PROTOCOL 7: an auth frame is a few hundred bytes.
    Key {
        name: "auth.max_pending_bytes",
        kind: number(256, 64 << 20),
        default: "4096",
        flag: None,
        help: "token mode: bytes of an incomplete frame held before authentication; past it the connection is closed",
    },
    Key {
        name: "tls.address",
        kind: Kind::OptionalAddress,
        default: "",
        flag: None,
        help: "TLS device listener, e.g. 0.0.0.0:3443; empty: off",
    },
    Key {
        name: "tls.cert_file",
        kind: Kind::Path,
        default: "",
        flag: None,
        help: "TLS listener: certificate chain (PEM)",
    },
    Key {
        name: "tls.key_file",
        kind: Kind::Path,
        default: "",
        flag: None,
        help: "TLS listener: private key (PEM)",
    },
    Key {
        name: "tls.client_ca_file",
        kind: Kind::Path,
        default: "",
        flag: None,
        help: "mtls mode: CA certificates (PEM) that sign device certificates",
    },
    // PROTOCOL 4. RUST_LOG is read when neither the file nor
    // EDGEGATE_LOG_LEVEL sets it.
    Key {
        name: "log.level",
        kind: Kind::Text,
        default: "info",
        flag: None,
        help: "log filter: a level (error, warn, info, debug, trace) or RUST_LOG-style directives, e.g. info,librdkafka=warn; reloaded on SIGHUP",
    },
    Key {
        name: "log.format",
        kind: Kind::Choice(&["auto", "text", "json", "journal"]),
        default: "auto",
        flag: None,
        help: "text, json, or journal (syslog priority prefix, no timestamp); auto: journal when started by systemd, else text",
    },
];

/// The options part of `edgegate --help`, one line per flag.
pub fn usage_options() -> String {
    let mut lines = vec![format!(
        "  {:<21}{}",
        "--config PATH", "TOML configuration file (default: none, built-in defaults)"
    )];
    for k in KEYS {
        let Some(f) = k.flag else { continue };
        let shown = if k.default.is_empty() {
            String::new()
        } else {
            format!(" (default: {})", k.default)
        };
        lines.push(format!(
            "  {:<21}{}{shown}",
            format!("{} {}", f.name, f.value),
            k.help
        ));
    }
    lines.join("\n") + "\n"
}
