//! The layers a value can come from, read through the key table: a flag
//! beats the environment, which beats the file, which beats the default.
//! Each value read is remembered with where it came from, for
//! `check-config`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;

use super::keys::{self, quote, Key, Kind};
use super::{ConfigError, Flags};

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Default,
    File,
    Environment,
    /// `log.level` only: the RUST_LOG variable, read when
    /// EDGEGATE_LOG_LEVEL is not set.
    RustLog,
    CommandLine,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Default => "default",
            Origin::File => "config file",
            Origin::Environment => "environment",
            Origin::RustLog => "environment, RUST_LOG",
            Origin::CommandLine => "command line",
        })
    }
}

/// One effective setting, its value as TOML writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    pub value: String,
    pub origin: Origin,
}

/// A value as the winning layer gave it.
enum Raw<'a> {
    Text(&'a str),
    Toml(&'a toml::Value),
}

pub(super) struct Layers<'a> {
    file: BTreeMap<String, toml::Value>,
    pub(super) properties: BTreeMap<String, String>,
    env: &'a HashMap<String, String>,
    flags: &'a Flags,
    read: RefCell<BTreeMap<&'static str, Setting>>,
}

impl<'a> Layers<'a> {
    /// Flattens the file's sections to `section.key` and refuses any key
    /// the table does not have.
    pub(super) fn new(
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
            .find(|k| !keys::KEYS.iter().any(|key| key.name == k.as_str()))
        {
            return Err(ConfigError::UnknownKey(unknown.clone()));
        }
        // A misspelt variable would otherwise leave its key on the default
        // without a word (PROTOCOL 4).
        if let Some(unknown) = env
            .keys()
            .filter(|k| k.starts_with("EDGEGATE_"))
            .find(|k| !keys::KEYS.iter().any(|key| key.env() == **k))
        {
            return Err(ConfigError::UnknownEnv(unknown.clone()));
        }
        Ok(Layers {
            file: flat,
            properties,
            env,
            flags,
            read: RefCell::default(),
        })
    }

    fn raw(&self, key: &Key) -> (Option<Raw<'_>>, Origin) {
        if let Some(v) = self.flags.values.get(key.name) {
            return (Some(Raw::Text(v)), Origin::CommandLine);
        }
        if let Some(v) = self.env.get(&key.env()) {
            return (Some(Raw::Text(v)), Origin::Environment);
        }
        if key.name == "log.level" {
            if let Some(v) = self.env.get("RUST_LOG") {
                return (Some(Raw::Text(v)), Origin::RustLog);
            }
        }
        match self.file.get(key.name) {
            Some(v) => (Some(Raw::Toml(v)), Origin::File),
            None => (None, Origin::Default),
        }
    }

    /// Where the value of `name` comes from.
    pub(super) fn origin(&self, name: &str) -> Origin {
        self.raw(keys::key(name)).1
    }

    /// Every setting read so far, in the table's order.
    pub(super) fn settings(&self) -> Vec<Setting> {
        let read = self.read.borrow();
        keys::KEYS
            .iter()
            .filter_map(|k| read.get(k.name).cloned())
            .collect()
    }

    fn remember(&self, key: &'static Key, value: String, origin: Origin) {
        self.read.borrow_mut().insert(
            key.name,
            Setting {
                key: key.name,
                value,
                origin,
            },
        );
    }

    /// The trimmed text of a string-valued key, default included.
    fn text(&self, key: &'static Key) -> Result<(String, Origin), ConfigError> {
        let (raw, origin) = self.raw(key);
        let text = match raw {
            None => key.default.to_owned(),
            Some(Raw::Text(v)) => v.trim().to_owned(),
            Some(Raw::Toml(toml::Value::String(v))) => v.trim().to_owned(),
            Some(Raw::Toml(_)) => return Err(invalid(key.name, origin, "expected a string")),
        };
        self.remember(key, quote(&text), origin);
        Ok((text, origin))
    }

    pub(super) fn string(&self, name: &str) -> Result<String, ConfigError> {
        Ok(self.text(keys::key(name))?.0)
    }

    pub(super) fn path(&self, name: &str) -> Result<Option<PathBuf>, ConfigError> {
        let text = self.string(name)?;
        Ok((!text.is_empty()).then(|| PathBuf::from(text)))
    }

    pub(super) fn choice(&self, name: &str) -> Result<&'static str, ConfigError> {
        let key = keys::key(name);
        let Kind::Choice(words) = key.kind else {
            panic!("`{name}` is not a choice")
        };
        let (text, origin) = self.text(key)?;
        words.iter().copied().find(|w| *w == text).ok_or_else(|| {
            invalid(
                name,
                origin,
                format!("`{text}` is not one of {}", words.join(", ")),
            )
        })
    }

    pub(super) fn address(&self, name: &str) -> Result<SocketAddr, ConfigError> {
        self.optional_address(name)?
            .ok_or_else(|| invalid(name, self.origin(name), "must not be empty"))
    }

    pub(super) fn optional_address(&self, name: &str) -> Result<Option<SocketAddr>, ConfigError> {
        let (text, origin) = self.text(keys::key(name))?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| invalid(name, origin, format!("`{text}` is not an IP:port address")))
    }

    pub(super) fn number(&self, name: &str) -> Result<u64, ConfigError> {
        let key = keys::key(name);
        let Kind::Number { min, max } = key.kind else {
            panic!("`{name}` is not a number")
        };
        let (raw, origin) = self.raw(key);
        let value = match raw {
            None => key
                .default
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("the default of `{name}` is not a number")),
            Some(Raw::Text(v)) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| invalid(name, origin, format!("`{v}` is not a whole number")))?,
            Some(Raw::Toml(toml::Value::Integer(i))) => {
                u64::try_from(*i).map_err(|_| invalid(name, origin, "must not be negative"))?
            }
            Some(Raw::Toml(_)) => return Err(invalid(name, origin, "expected a whole number")),
        };
        if value < min || value > max {
            return Err(invalid(
                name,
                origin,
                format!("{value} is outside {min}..={max}"),
            ));
        }
        self.remember(key, value.to_string(), origin);
        Ok(value)
    }

    pub(super) fn topics(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let key = keys::key(name);
        let (raw, origin) = self.raw(key);
        let list: Vec<String> = match raw {
            None => vec![key.default.to_owned()],
            Some(Raw::Text(v)) if v.trim().is_empty() => Vec::new(),
            Some(Raw::Text(v)) => v.split(',').map(|t| t.trim().to_owned()).collect(),
            Some(Raw::Toml(toml::Value::Array(items))) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| invalid(name, origin, "expected an array of strings"))?,
            Some(Raw::Toml(toml::Value::String(v))) => vec![v.clone()],
            Some(Raw::Toml(_)) => {
                return Err(invalid(name, origin, "expected an array of strings"))
            }
        };
        for t in &list {
            super::check_topic(key.name, origin, t)?;
        }
        let shown: Vec<String> = list.iter().map(|t| quote(t)).collect();
        self.remember(key, format!("[{}]", shown.join(", ")), origin);
        Ok(list)
    }
}

fn read_properties(value: toml::Value) -> Result<BTreeMap<String, String>, ConfigError> {
    let toml::Value::Table(table) = value else {
        return Err(invalid(
            "kafka.properties",
            Origin::File,
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
                        Origin::File,
                        format!("`{k}` must be a string, number or boolean"),
                    ))
                }
            };
            Ok((k, text))
        })
        .collect()
}

pub(super) fn invalid(key: &str, origin: Origin, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        origin,
        message: message.into(),
    }
}
