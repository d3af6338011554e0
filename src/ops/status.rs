//! What an operator is told about the gateway's state at a glance: the
//! `/status` document (PROTOCOL 4) and, while Kafka cannot be reached, a
//! periodic log line with the backlog.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ops::build::build_info;
use crate::ops::logging;
use crate::ops::metrics::Metrics;

/// How often the backlog line is repeated while Kafka stays unreachable.
const BACKLOG_EVERY: Duration = Duration::from_secs(60);
/// How often the state is looked at (the first line comes this soon).
const BACKLOG_CHECK: Duration = Duration::from_secs(10);

/// Where the gateway is in its life, for `/readyz` and `/status`.
pub struct Lifecycle {
    /// Set once the device listener is up; cleared when shutdown begins.
    pub ready: AtomicBool,
    /// Set when shutdown begins.
    pub stopping: AtomicBool,
    pub server_id: String,
    pub started: Instant,
}

impl Lifecycle {
    pub fn new(server_id: String) -> Lifecycle {
        Lifecycle {
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            server_id,
            started: Instant::now(),
        }
    }
}

/// The `/status` document.
pub fn document(m: &Metrics, life: &Lifecycle) -> Value {
    let b = build_info();
    let full = m.outbox_full.load(SeqCst) != 0;
    let ready = life.ready.load(SeqCst);
    let state = if life.stopping.load(SeqCst) {
        "shutting_down"
    } else if !ready {
        "starting"
    } else if full {
        "outbox_full"
    } else {
        "ready"
    };
    json!({
        "version": b.version,
        "commit": b.commit,
        "target": b.target,
        "librdkafka": b.librdkafka,
        "server_id": life.server_id,
        "uptime_secs": life.started.elapsed().as_secs(),
        "state": state,
        "ready": ready && !full,
        "connections": m.connections_open.load(Relaxed),
        "kafka": {
            "connected": m.kafka_broker_connected.load(Relaxed) != 0,
            "delivered": m.kafka_delivered.load(Relaxed),
            "failed": m.kafka_failed.load(Relaxed),
            "quarantined": m.kafka_quarantined.load(Relaxed),
        },
        "outbox": {
            "records": m.outbox_records.load(Relaxed),
            "bytes": m.outbox_bytes.load(Relaxed),
            "disk_bytes": m.outbox_disk_bytes.load(Relaxed),
            "max_bytes": m.outbox_max_bytes.load(Relaxed),
            "full": full,
            "oldest_age_secs": m.outbox_oldest_age().map(|d| d.as_secs()),
        },
        "last_errors": logging::recent()
            .into_iter()
            .map(|r| json!({"ts": r.at, "level": r.level, "msg": r.message}))
            .collect::<Vec<_>>(),
    })
}

/// Logs the backlog while Kafka is unreachable and requests wait: soon
/// after it starts, then every [`BACKLOG_EVERY`]; and once when it ends.
pub async fn report_backlog(metrics: std::sync::Arc<Metrics>) {
    let mut last: Option<Instant> = None;
    loop {
        smol::Timer::after(BACKLOG_CHECK).await;
        let connected = metrics.kafka_broker_connected.load(Relaxed) != 0;
        let records = metrics.outbox_records.load(Relaxed);
        if connected || records <= 0 {
            if last.take().is_some() {
                log::info!("Kafka is taking the outbox backlog again ({records} requests left)");
            }
            continue;
        }
        if last.is_some_and(|at| at.elapsed() < BACKLOG_EVERY) {
            continue;
        }
        last = Some(Instant::now());
        let age = metrics
            .outbox_oldest_age()
            .map_or("-".to_owned(), |d| format!("{} s", d.as_secs()));
        log::warn!(
            "Kafka is unreachable: {records} requests wait in the outbox ({} bytes, {} of {} bytes on disk), the oldest for {age}",
            metrics.outbox_bytes.load(Relaxed),
            metrics.outbox_disk_bytes.load(Relaxed),
            metrics.outbox_max_bytes.load(Relaxed),
        );
    }
}
