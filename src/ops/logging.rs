//! The gateway's logger and the escaping of untrusted text in log lines.
//!
//! One line per event on stderr, in one of three formats (`log.format`):
//! `text` (timestamped), `json` (one object per line), or `journal` (a
//! `<N>` syslog priority prefix journald turns into the entry's priority,
//! and no timestamp: the journal keeps its own). The filter (`log.level`)
//! can be replaced while running (SIGHUP).
//!
//! Strings that come from devices or the backend (deviceUids, certificate
//! names, record contents) go into log lines only through [`escaped`]: a
//! newline or a terminal escape in one must not forge a line or colour the
//! operator's terminal.

use std::io::Write as _;
use std::sync::{OnceLock, RwLock};

use log::{Level, Log, Metadata, Record};

use crate::config::LogFormat;
use crate::wire::protocol::Timestamp;

use std::fmt;

/// `text` with control characters, backslashes and Unicode format
/// characters (bidirectional overrides among them) escaped as `\n`, `\\`,
/// `\u{1b}`...; printable text is left as it is.
pub fn escaped(text: &str) -> Escaped<'_> {
    Escaped(text)
}

pub struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() || is_format(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Unicode's invisible format characters that reorder or hide text: the
/// bidirectional marks and overrides, zero-width ones, the BOM.
fn is_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// A concrete format: [`LogFormat::Auto`] resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Journal,
}

impl Format {
    /// `auto` is journal when systemd connected stderr to the journal: it
    /// sets JOURNAL_STREAM then (and not for a shell the unit started).
    pub fn resolve(format: LogFormat) -> Format {
        match format {
            LogFormat::Text => Format::Text,
            LogFormat::Json => Format::Json,
            LogFormat::Journal => Format::Journal,
            LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => Format::Journal,
            LogFormat::Auto => Format::Text,
        }
    }
}

struct Logger {
    state: RwLock<State>,
}

struct State {
    filter: env_filter::Filter,
    spec: String,
    format: Format,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// The last warnings and errors, for `/status`.
static RECENT: std::sync::Mutex<std::collections::VecDeque<Recent>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());
const RECENT_KEPT: usize = 10;

#[derive(Debug, Clone)]
pub struct Recent {
    pub at: String,
    pub level: &'static str,
    pub message: String,
}

/// The last [`RECENT_KEPT`] warnings and errors logged, oldest first.
pub fn recent() -> Vec<Recent> {
    RECENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect()
}

/// Installs the logger with `spec` (a filter [`crate::config::check_log_filter`]
/// accepted; anything else logs at info) and `format`. Called once, before
/// the configuration is read so that its refusal is logged; [`configure`]
/// then applies the configuration's own settings.
pub fn init(spec: &str, format: Format) {
    let logger = LOGGER.get_or_init(|| Logger {
        state: RwLock::new(State {
            filter: build(spec).unwrap_or_else(|| build("info").expect("a valid filter")),
            spec: spec.to_owned(),
            format,
        }),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.read().filter.filter());
    }
}

/// Replaces the filter and the format; returns the filter in use before.
/// An invalid filter changes nothing.
pub fn configure(spec: &str, format: Format) -> Result<String, String> {
    crate::config::check_log_filter(spec)?;
    let filter = build(spec).ok_or_else(|| format!("`{spec}` is not a log filter"))?;
    let Some(logger) = LOGGER.get() else {
        return Err("no logger installed".into());
    };
    let mut state = logger.state.write().unwrap_or_else(|p| p.into_inner());
    log::set_max_level(filter.filter());
    state.filter = filter;
    state.format = format;
    Ok(std::mem::replace(&mut state.spec, spec.to_owned()))
}

fn build(spec: &str) -> Option<env_filter::Filter> {
    let mut builder = env_filter::Builder::new();
    builder.try_parse(spec).ok()?;
    Some(builder.build())
}

impl Logger {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.read().filter.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        let format = {
            let state = self.read();
            if !state.filter.matches(record) {
                return;
            }
            state.format
        };
        if record.level() <= Level::Warn {
            let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT_KEPT {
                recent.pop_front();
            }
            recent.push_back(Recent {
                at: Timestamp::now().to_string(),
                level: record.level().as_str(),
                message: format!("{}: {}", record.target(), record.args()),
            });
        }
        // The whole line in one write, so threads' lines never interleave.
        let mut line = Vec::with_capacity(128);
        write_line(&mut line, format, record);
        let _ = std::io::stderr().lock().write_all(&line);
    }

    fn flush(&self) {}
}

fn write_line(out: &mut Vec<u8>, format: Format, record: &Record<'_>) {
    match format {
        Format::Text => {
            let _ = writeln!(
                out,
                "{} {:<5} {}: {}",
                Timestamp::now(),
                record.level(),
                record.target(),
                record.args()
            );
        }
        Format::Journal => {
            let _ = writeln!(
                out,
                "<{}>{}: {}",
                syslog_priority(record.level()),
                record.target(),
                record.args()
            );
        }
        Format::Json => {
            let line = serde_json::json!({
                "ts": Timestamp::now().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            let _ = serde_json::to_writer(&mut *out, &line);
            out.push(b'\n');
        }
    }
}

/// syslog(3) priorities: err, warning, info, debug.
fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: Format, level: Level, msg: &str) -> String {
        let mut out = Vec::new();
        write_line(
            &mut out,
            format,
            &Record::builder()
                .level(level)
                .target("edgegate::outbox")
                .args(format_args!("{msg}"))
                .build(),
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_format_writes_one_line_with_its_level() {
        assert_eq!(
            line(Format::Journal, Level::Warn, "outbox full"),
            "<4>edgegate::outbox: outbox full\n"
        );
        assert_eq!(
            line(Format::Journal, Level::Error, "x"),
            "<3>edgegate::outbox: x\n"
        );
        let text = line(Format::Text, Level::Info, "started");
        assert!(
            text.ends_with(" INFO  edgegate::outbox: started\n"),
            "{text}"
        );
        let json = line(Format::Json, Level::Debug, "a \"quoted\" word");
        assert_eq!(json.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["level"], "DEBUG");
        assert_eq!(v["msg"], "a \"quoted\" word");
        assert_eq!(v["target"], "edgegate::outbox");
    }

    #[test]
    fn control_and_format_characters_are_escaped() {
        assert_eq!(escaped("dev-42").to_string(), "dev-42");
        assert_eq!(escaped("dévice ü").to_string(), "dévice ü");
        assert_eq!(
            escaped("a\nERROR forged\u{1b}[31m\\").to_string(),
            "a\\nERROR forged\\u{1b}[31m\\\\"
        );
        assert_eq!(escaped("x\u{202e}y\u{0}").to_string(), "x\\u{202e}y\\u{0}");
        assert!(!escaped("\r\n\t\u{7f}\u{85}")
            .to_string()
            .chars()
            .any(char::is_control));
    }
}
