//! Kafka → devices: reads the workers' topics and hands every record to the
//! router.
//!
//! The consumer runs on its own thread (librdkafka's poll blocks). An offset
//! is stored only after its record was handed to a connection or counted as
//! undeliverable (`enable.auto.offset.store=false`), and auto-commit commits
//! only stored offsets, so a restart resumes at the first record not yet
//! handled.

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
use crate::kafka::ErrorLog;
use crate::ops::metrics::Metrics;
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
}

impl ClientContext for Context {
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
        // Some brokers (tansu) do not wake a waiting fetch when data arrives,
        // so this bounds downlink latency.
        .set("fetch.wait.max.ms", "10")
        // 6 s is the smallest session Apache Kafka accepts by default.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500");
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
    pub fn start(
        cfg: &KafkaConfig,
        group: &str,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConsumerError> {
        let errors = Arc::new(ErrorLog::default());
        let consumer: BaseConsumer<Context> = client_config(cfg, group)
            .create_with_context(Context {
                metrics: metrics.clone(),
                errors: errors.clone(),
                assigned: Mutex::new(None),
            })
            .map_err(ConsumerError::Create)?;
        let topics: Vec<&str> = cfg.consumer_topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| ConsumerError::Subscribe {
                topics: cfg.consumer_topics.clone(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("edgegate-consumer".into())
            .spawn(move || consume(consumer, router, metrics, errors, flag))
            .map_err(ConsumerError::Thread)?;
        Ok(DownlinkConsumer { stop, thread })
    }

    /// Stops polling, commits what was handled and leaves the group.
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        let _ = self.thread.join();
    }
}

fn consume(
    consumer: BaseConsumer<Context>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    errors: Arc<ErrorLog>,
    stop: Arc<AtomicBool>,
) {
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
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(msg)) => {
                router.route(msg.payload().unwrap_or_default());
                if let Err(e) = consumer.store_offset_from_message(&msg) {
                    log::warn!("storing downlink offset failed: {e}");
                }
            }
            Some(Err(e)) => {
                metrics.downlink_consumer_errors.fetch_add(1, Relaxed);
                errors.report("Kafka consumer", &e, "polling for downlink messages");
            }
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored yet is the common harmless case.
        log::debug!("final downlink commit: {e}");
    }
    consumer.unsubscribe();
}

/// Commits a starting offset for assigned partitions that have none.
///
/// A new group starts at the end of each partition, but Kafka only keeps an
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
        match consumer.fetch_watermarks(e.topic(), e.partition(), TIMEOUT) {
            Ok((_, high)) => {
                let _ =
                    anchors.add_partition_offset(e.topic(), e.partition(), Offset::Offset(high));
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
