//! The Kafka side: the producer that drains the outbox to Kafka
//! (`producer`), the consumer that routes the backend's responses
//! (`consumer`), and what they share, here: how librdkafka's errors reach
//! the log. During an outage librdkafka reports the same failure many times
//! a second; the log gets one line per kind of error and interval, and a
//! line when the broker is back.

pub mod consumer;
pub mod producer;
pub mod topics;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;

/// The same kind of Kafka error is logged at most this often.
const REPEAT_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct ErrorLog {
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ErrorLog {
    /// Logs `error` unless the same kind was logged within `REPEAT_EVERY`;
    /// the next line says how many were suppressed.
    pub fn report(&self, what: &str, error: &KafkaError, detail: &str) {
        let kind = format!("{what}:{:?}", error.rdkafka_error_code());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match last.get_mut(&kind) {
            Some((at, suppressed)) if now.duration_since(*at) < REPEAT_EVERY => *suppressed += 1,
            entry => {
                let suppressed = entry.map_or(0, |(_, s)| *s);
                let more = if suppressed > 0 {
                    format!(" ({suppressed} more like it since the last report)")
                } else {
                    String::new()
                };
                log::warn!("{what}: {error}: {detail}{more}");
                last.insert(kind, (now, 0));
            }
        }
    }

    /// Forgets past errors (the broker is back), so the next one is logged.
    pub fn clear(&self) {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// librdkafka's own log lines: connection failures are already reported
/// through `error`, so they go to debug; real trouble stays visible.
pub fn log_librdkafka(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical => log::error!(target: "librdkafka", "{fac}: {message}"),
        Error | Warning if fac != "FAIL" => log::warn!(target: "librdkafka", "{fac}: {message}"),
        _ => log::debug!(target: "librdkafka", "{fac}: {message}"),
    }
}
