//! Kafka → devices: reads the workers' topics and hands every record to the
//! router.
//!
//! The consumer runs on its own thread (librdkafka's poll blocks). An offset
//! is stored only once every record before it was written to a device's
//! socket, held on disk (synced) or counted (`enable.auto.offset.store=false`
//! and `routing::receipt`), and auto-commit commits only stored offsets, so
//! a restart resumes at the first record not yet handled.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::topics::{self, Ensured};
use crate::kafka::ErrorLog;
use crate::ops::metrics::Metrics;
use crate::routing::receipt::Receipts;
use crate::routing::Router;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create the Kafka consumer: {0}")]
    Create(KafkaError),
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error("cannot start the consumer thread: {0}")]
    Thread(std::io::Error),
}

struct Context {
    metrics: Arc<Metrics>,
    errors: Arc<ErrorLog>,
    /// Partitions of a new assignment, for the poll loop to anchor.
    assigned: Mutex<Option<Vec<(String, i32)>>>,
    /// What the records read were handled by (see `routing::receipt`).
    receipts: Arc<Receipts>,
    /// Only this gateway's replies are in it: a new group reads it from the
    /// start, so a reply sent before the first assignment is not skipped.
    reply_topic: Option<String>,
}

impl ClientContext for Context {
    fn stats(&self, stats: rdkafka::statistics::Statistics) {
        // Each statistics report holds the client's running total.
        let received: u64 = stats.brokers.values().map(|b| b.rxbytes).sum();
        self.metrics.kafka_rx_bytes.store(received, Relaxed);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report("Kafka consumer", &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::log_librdkafka(level, fac, log_message);
    }
}

impl ConsumerContext for Context {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.errors.clear();
                self.receipts.reset();
                let parts = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = Some(parts);
                log::info!("downlink consumer assigned {} partitions", tpl.count());
                self.metrics
                    .kafka_consumer_partitions
                    .store(tpl.count() as i64, Relaxed);
            }
            Rebalance::Revoke(_) => self.metrics.kafka_consumer_partitions.store(0, Relaxed),
            Rebalance::Error(e) => log::warn!("downlink consumer rebalance failed: {e}"),
        }
    }
}

pub fn client_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        // A new group starts at the end: old responses are not replayed to
        // devices that never asked for them (PROTOCOL 2.2).
        .set("auto.offset.reset", "latest")
        // An idle consumer asks again each time a fetch comes back empty:
        // at 10 ms that was 25 KB/s with the broker, at 500 ms 0.9 KB/s
        // (README, `kafka.fetch_wait_ms`).
        .set("fetch.wait.max.ms", cfg.fetch_wait.as_millis().to_string())
        // 6 s is the smallest session Apache Kafka accepts by default.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        // For edgegate_kafka_rx_bytes_total: the downlink's cost on the WAN.
        .set("statistics.interval.ms", "1000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

pub struct DownlinkConsumer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl DownlinkConsumer {
    /// Reads `kafka.consumer_topics` and, if set, `reply_topic` (this
    /// gateway's own, created first when missing).
    pub fn start(
        cfg: &KafkaConfig,
        group: &str,
        reply_topic: Option<String>,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConsumerError> {
        let errors = Arc::new(ErrorLog::default());
        let consumer: BaseConsumer<Context> = client_config(cfg, group)
            .create_with_context(Context {
                metrics: metrics.clone(),
                errors: errors.clone(),
                assigned: Mutex::new(None),
                receipts: Arc::new(Receipts::default()),
                reply_topic: reply_topic.clone(),
            })
            .map_err(ConsumerError::Create)?;
        let mut topics = cfg.consumer_topics.clone();
        topics.extend(reply_topic.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let kafka = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("edgegate-consumer".into())
            .spawn(move || {
                if let Some(topic) = &reply_topic {
                    if !create_reply_topic(&kafka, topic, &flag) {
                        return;
                    }
                }
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                if let Err(source) = consumer.subscribe(&names) {
                    log::error!(
                        "{}; no reply reaches devices until a restart",
                        ConsumerError::Subscribe { topics, source }
                    );
                    return;
                }
                consume(consumer, router, metrics, errors, flag)
            })
            .map_err(ConsumerError::Thread)?;
        Ok(DownlinkConsumer { stop, thread })
    }

    /// Stops polling, commits what was handled and leaves the group.
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        let _ = self.thread.join();
    }
}

/// Creates the reply topic if it is missing, retrying while Kafka cannot
/// be reached; false if the gateway stopped first.
fn create_reply_topic(cfg: &KafkaConfig, topic: &str, stop: &AtomicBool) -> bool {
    let mut wait = Duration::from_secs(1);
    let mut logged = false;
    while !stop.load(Relaxed) {
        match topics::ensure(cfg, topic, cfg.reply_topic_partitions) {
            Ok(Ensured::Created) => {
                log::info!("created reply topic {topic}");
                return true;
            }
            Ok(Ensured::Existed) => {
                log::info!("reading replies from {topic}, which exists");
                return true;
            }
            Err(e) => {
                if !logged {
                    log::warn!("{e}; retrying until Kafka takes it");
                    logged = true;
                }
            }
        }
        let until = std::time::Instant::now() + wait;
        while !stop.load(Relaxed) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
    false
}

fn consume(
    consumer: BaseConsumer<Context>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    errors: Arc<ErrorLog>,
    stop: Arc<AtomicBool>,
) {
    let receipts = consumer.context().receipts.clone();
    let mut since_sync = 0;
    while !stop.load(Relaxed) {
        let assigned = consumer
            .context()
            .assigned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(parts) = assigned {
            anchor_new_partitions(&consumer, &parts);
        }
        // Records waiting for the hold's sync: take what is already there
        // without waiting, then sync once for all of them.
        let wait = match since_sync {
            0 => Duration::from_millis(100),
            _ => Duration::ZERO,
        };
        match consumer.poll(wait) {
            Some(Ok(msg)) => {
                let receipt = receipts.issue(msg.topic(), msg.partition(), msg.offset());
                router.route(msg.payload().unwrap_or_default(), receipt);
                since_sync += 1;
                if since_sync < SYNC_EVERY_RECORDS {
                    continue;
                }
            }
            Some(Err(e)) => {
                metrics.downlink_consumer_errors.fetch_add(1, Relaxed);
                errors.report("Kafka consumer", &e, "polling for downlink messages");
            }
            None => {}
        }
        if since_sync > 0 {
            since_sync = 0;
            router.sync_hold();
        }
        store_safe_offsets(&consumer, &receipts);
    }
    router.sync_hold();
    store_safe_offsets(&consumer, &receipts);
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored yet is the common harmless case.
        log::debug!("final downlink commit: {e}");
    }
    consumer.unsubscribe();
}

/// Records read before the hold is synced and offsets stored, at most.
const SYNC_EVERY_RECORDS: usize = 256;

/// Stores the offset up to which every record was handled (see
/// [`Receipts`]); auto-commit commits it.
fn store_safe_offsets(consumer: &BaseConsumer<Context>, receipts: &Receipts) {
    let safe = receipts.safe_offsets();
    if safe.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in &safe {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // A partition no longer assigned; its new owner reads it again.
        log::debug!("storing downlink offsets failed: {e}");
    }
}

/// Commits a starting offset for assigned partitions that have none.
///
/// A new group starts at the end of each partition (the reply topic's at
/// its start), but Kafka only keeps an
/// offset for a partition once one is committed. Without this, a partition
/// that received nothing before a restart would start at its end again and
/// skip the responses sent while the gateway was down. The end is taken from
/// the high watermark; a broker that under-reports it (tansu) makes this
/// start a little early, which delivers old records again rather than losing
/// new ones.
fn anchor_new_partitions(consumer: &BaseConsumer<Context>, parts: &[(String, i32)]) {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in parts {
        tpl.add_partition(topic, *partition);
    }
    let committed = match consumer.committed_offsets(tpl, TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            log::warn!("cannot read committed downlink offsets: {e}");
            return;
        }
    };
    let mut anchors = TopicPartitionList::new();
    for e in committed.elements() {
        if e.offset() != Offset::Invalid {
            continue;
        }
        let from_start = consumer.context().reply_topic.as_deref() == Some(e.topic());
        match consumer.fetch_watermarks(e.topic(), e.partition(), TIMEOUT) {
            Ok((low, high)) => {
                let start = if from_start { low } else { high };
                let _ =
                    anchors.add_partition_offset(e.topic(), e.partition(), Offset::Offset(start));
            }
            Err(err) => log::warn!(
                "cannot read the end of {}/{}: {err}",
                e.topic(),
                e.partition()
            ),
        }
    }
    if anchors.count() == 0 {
        return;
    }
    match consumer.commit(&anchors, CommitMode::Sync) {
        Ok(()) => log::info!(
            "downlink consumer: committed starting offsets for {} new partitions",
            anchors.count()
        ),
        Err(e) => log::warn!("cannot commit starting downlink offsets: {e}"),
    }
}
