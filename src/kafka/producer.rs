//! Outbox → Kafka: sends stored requests in order and removes each batch once
//! Kafka confirmed all of it.
//!
//! The producer is idempotent with `acks=all` and an infinite message timeout
//! (`message.timeout.ms=0`): during an outage librdkafka keeps retrying in
//! order instead of failing messages, so nothing is resent behind a later
//! one. Only a delivery report counts: a batch is removed after every request
//! in it was confirmed. If a report carries an error (a permanent one, given
//! the infinite timeout), everything from the first failed batch on is sent
//! again after a back-off, by a fresh producer if librdkafka declared the old
//! one unusable. Duplicates carry the same messageId.
//!
//! A refusal that no retry can change (a request too large for the client or
//! the topic, an invalid record) would otherwise stop every request behind
//! it for good. Kafka refuses a whole produce request for one bad record, so
//! after such a refusal the batch that had it is sent again one request at a
//! time, each waiting for its report: a request refused on its own goes to
//! the quarantine (`outbox::quarantine`) and the others are sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use smol::channel::{self, Receiver, Sender};
use smol::Timer;
use uuid::Uuid;

use crate::config::KafkaConfig;
use crate::kafka::ErrorLog;
use crate::ops::metrics::Metrics;
use crate::outbox::{Entry, Kind, Quarantine, Reader, Sent, Store};

/// Requests handed to librdkafka and not yet confirmed, at most. Bounds
/// memory during a long outage (the rest waits on disk) while keeping enough
/// in flight for full-speed batching. 20,000 before: a replay's peak RSS was
/// 7-12 MiB higher and its drain 5-6% slower, uplink the same within noise
/// (BENCHMARKS.md, "Replay").
const MAX_IN_FLIGHT: usize = 5_000;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Failed resends in a row, with nothing confirmed in between, after which
/// the producer is replaced. A broker that restarted without its producer
/// state refuses the old producer id's sequence for good (seen on tansu as
/// "Unknown broker error" forever); a new producer gets a new id.
const RECREATE_AFTER_FAILURES: u32 = 3;
/// Removals are persisted at least this often even without new appends.
const REMOVAL_FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error("cannot create the Kafka producer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot start the Kafka producer's thread: {0}")]
    Thread(std::io::Error),
}

type Report = (usize, Result<(), KafkaError>);

pub struct Context {
    reports: Sender<Report>,
    metrics: Arc<Metrics>,
    errors: ErrorLog,
    /// This producer's txbytes at its last statistics: a new producer
    /// starts from 0, and the counter only adds what each one sent.
    tx_bytes: std::sync::atomic::AtomicU64,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        // Bootstrap entries have nodeid -1; a learned broker that is UP means
        // the cluster is reachable.
        let up = stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        let was = self
            .metrics
            .kafka_broker_connected
            .swap(i64::from(up), Relaxed);
        if up && was == 0 {
            log::info!("Kafka producer connected");
            self.errors.clear();
        }
        let sent: u64 = stats.brokers.values().map(|b| b.txbytes).sum();
        let before = self.tx_bytes.swap(sent, Relaxed);
        self.metrics
            .kafka_tx_bytes
            .fetch_add(sent.saturating_sub(before), Relaxed);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report("Kafka producer", &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::log_librdkafka(level, fac, log_message);
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, local_id: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        let _ = self.reports.try_send((local_id, outcome));
    }
}

/// The librdkafka settings of the producer; `kafka.properties` come last so
/// an operator can add TLS/SASL or tune anything.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        // A partition's batch leaves once it holds this many, before the
        // linger ends: under load devices waiting for acks no longer wait
        // out the linger too (50 connections of 64 in flight: 45 → 58 % of
        // raw), while at a hub's rates a batch still gathers what 5 ms
        // brings. 64 made too many requests for librdkafka's five in flight.
        .set("batch.num.messages", "256")
        // Hubs often reach Kafka over metered links: zstd shrinks batches of
        // JSON envelopes several times over for little CPU. Level 1, not
        // zstd's default 3: librdkafka makes a new zstd context per
        // request, and level 3's tables, cleared each time, were a fifth
        // of the gateway's instructions; level 1 took 38 bytes per
        // telemetry request on the wire against 44 (bigger batches).
        .set("compression.type", "zstd")
        .set("compression.level", "1")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("statistics.interval.ms", "1000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

struct InFlight {
    seq: u64,
    /// This process's id of the batch, carried by each delivery report.
    local: usize,
    remaining: u32,
    failed: bool,
    /// Some report said the refusal is permanent: the batch is sent again
    /// one request at a time.
    refused: bool,
    sent: Sent,
    /// When it was handed to librdkafka, for the delivery latency.
    produced_at: Instant,
}

pub struct Pipeline {
    reader: Reader,
    topic: String,
    /// Named in a `reply-topic` header on every request (PROTOCOL 6.1).
    reply_topic: Option<String>,
    /// Where presence events go (PROTOCOL 6.2); `None`: presence is off,
    /// and events stored while it was on are dropped.
    presence_topic: Option<String>,
    config: ClientConfig,
    metrics: Arc<Metrics>,
    reports_tx: Sender<Report>,
    reports: Receiver<Report>,
    producer: Polled,
    in_flight: VecDeque<InFlight>,
    in_flight_msgs: usize,
    next_local: usize,
    last_read_error: Option<Instant>,
    quarantine: Arc<Quarantine>,
    /// The batch to send one request at a time when it is read again.
    careful: Option<u64>,
}

impl Pipeline {
    pub fn new(
        store: Arc<Store>,
        cfg: &KafkaConfig,
        reply_topic: Option<String>,
        metrics: Arc<Metrics>,
        quarantine: Arc<Quarantine>,
    ) -> Result<Self, ProducerError> {
        let (reports_tx, reports) = channel::unbounded();
        let config = client_config(cfg);
        let producer = create(&config, reports_tx.clone(), metrics.clone())?;
        Ok(Pipeline {
            reader: Reader::new(store),
            topic: cfg.producer_topic.clone(),
            reply_topic,
            presence_topic: cfg.presence_topic.clone(),
            config,
            metrics,
            reports_tx,
            reports,
            producer,
            in_flight: VecDeque::new(),
            in_flight_msgs: 0,
            next_local: 0,
            last_read_error: None,
            quarantine,
            careful: None,
        })
    }

    /// Runs until `stop` is set and the doorbell closes or rings.
    pub async fn run(mut self, doorbell: Receiver<()>, stop: Arc<AtomicBool>) {
        let mut backoff = RETRY_MIN;
        let mut failures_in_a_row = 0u32;
        let mut removed_since_flush = false;
        let mut last_flush = Instant::now();
        loop {
            if stop.load(Relaxed) {
                break;
            }
            self.fill(&stop).await;
            let wake = smol::future::or(
                smol::future::or(
                    async {
                        let first = self.reports.recv().await;
                        first.ok().map(Some)
                    },
                    async {
                        let _ = doorbell.recv().await;
                        Some(None)
                    },
                ),
                async {
                    Timer::after(REMOVAL_FLUSH_EVERY).await;
                    Some(None)
                },
            )
            .await;
            let mut failed = false;
            if let Some(Some(report)) = wake {
                failed |= self.record(report);
            }
            while let Ok(report) = self.reports.try_recv() {
                failed |= self.record(report);
            }
            let progress = self.remove_delivered().await;
            if progress {
                failures_in_a_row = 0;
            }
            removed_since_flush |= progress;
            if failed || self.in_flight.iter().any(|b| b.failed) {
                if self.in_flight.iter().all(|b| b.remaining == 0) {
                    failures_in_a_row += 1;
                    self.rewind(backoff, failures_in_a_row >= RECREATE_AFTER_FAILURES)
                        .await;
                    if failures_in_a_row >= RECREATE_AFTER_FAILURES {
                        failures_in_a_row = 0;
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            } else if !self.in_flight.is_empty() {
                backoff = RETRY_MIN;
            }
            if removed_since_flush && last_flush.elapsed() >= REMOVAL_FLUSH_EVERY {
                let store = self.reader.store().clone();
                if let Err(e) = smol::unblock(move || store.flush()).await {
                    log::warn!("persisting outbox removals failed: {e}");
                }
                removed_since_flush = false;
                last_flush = Instant::now();
            }
        }
        let store = self.reader.store().clone();
        if let Err(e) = smol::unblock(move || store.flush()).await {
            log::warn!("persisting outbox removals failed: {e}");
        }
    }

    /// Hands stored batches to librdkafka, up to the in-flight limit.
    async fn fill(&mut self, stop: &AtomicBool) {
        if self.in_flight.iter().any(|b| b.failed) {
            return; // wait for the rewind
        }
        while self.in_flight_msgs < MAX_IN_FLIGHT {
            let record = match self.reader.next_record() {
                Ok(Some(record)) => record,
                Ok(None) => return,
                Err(e) => {
                    // Retried on the next wake-up (at least every second);
                    // reported at most every 30 s.
                    if self
                        .last_read_error
                        .is_none_or(|at| at.elapsed() >= Duration::from_secs(30))
                    {
                        log::warn!("reading the outbox failed: {e}; retrying");
                        self.last_read_error = Some(Instant::now());
                    }
                    return;
                }
            };
            let batch = record.batch();
            let (seq, sent) = (record.seq(), record.sent());
            let local = self.next_local;
            self.next_local = self.next_local.wrapping_add(1);
            if self.careful == Some(seq) {
                // Alone in flight: everything before it was confirmed.
                let done = self.send_carefully(seq, &batch, local, stop).await;
                if done {
                    self.careful = None;
                }
                self.in_flight.push_back(InFlight {
                    seq,
                    local,
                    remaining: 0,
                    failed: !done,
                    refused: false,
                    sent,
                    produced_at: Instant::now(),
                });
                if !done {
                    return;
                }
                continue;
            }
            let skipped = batch
                .entries()
                .filter(|e| self.destination(e).is_none())
                .count() as u32;
            let count = batch.count - skipped;
            self.in_flight.push_back(InFlight {
                seq,
                local,
                remaining: count,
                failed: false,
                refused: false,
                sent,
                produced_at: Instant::now(),
            });
            self.in_flight_msgs += count as usize;
            self.metrics
                .presence_dropped
                .fetch_add(u64::from(skipped), Relaxed);
            for entry in batch.entries() {
                let Some(topic) = self.destination(&entry) else {
                    continue;
                };
                let mut record = BaseRecord::with_opaque_to(topic, local)
                    .key(entry.key)
                    .payload(entry.payload)
                    .headers(self.headers(&entry));
                loop {
                    match self.producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            Timer::after(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => {
                            // Not even queued: treat as a failed delivery.
                            let _ = self.reports_tx.try_send((local, Err(e)));
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The topic an entry goes to; `None` for a presence event while
    /// presence is off.
    fn destination(&self, entry: &Entry<'_>) -> Option<&str> {
        match entry.kind {
            Kind::Request => Some(&self.topic),
            Kind::Presence => self.presence_topic.as_deref(),
        }
    }

    /// `message-id` on every record; `reply-topic` on requests when this
    /// gateway has one.
    fn headers(&self, entry: &Entry<'_>) -> OwnedHeaders {
        let mut id_buf = Uuid::encode_buffer();
        let id = entry.message_id.hyphenated().encode_lower(&mut id_buf);
        let headers = OwnedHeaders::new_with_capacity(2).insert(Header {
            key: "message-id",
            value: Some(id.as_bytes()),
        });
        match (&self.reply_topic, entry.kind) {
            (Some(topic), Kind::Request) => headers.insert(Header {
                key: "reply-topic",
                value: Some(topic.as_bytes()),
            }),
            _ => headers,
        }
    }

    /// Applies one delivery report; true if it failed.
    fn record(&mut self, (local, outcome): Report) -> bool {
        let Some(front) = self.in_flight.front() else {
            return false;
        };
        let index = local.wrapping_sub(front.local);
        let Some(batch) = self.in_flight.get_mut(index) else {
            return false; // a report from before a rewind
        };
        batch.remaining = batch.remaining.saturating_sub(1);
        self.in_flight_msgs = self.in_flight_msgs.saturating_sub(1);
        match outcome {
            Ok(()) => {
                self.metrics.kafka_delivered.fetch_add(1, Relaxed);
                self.metrics
                    .kafka_delivery_seconds
                    .observe(batch.produced_at.elapsed(), 1);
                false
            }
            Err(e) => {
                self.metrics.kafka_failed.fetch_add(1, Relaxed);
                if !batch.failed {
                    log::error!(
                        "Kafka refused a request of outbox batch {}: {e}; it will be sent again",
                        batch.seq
                    );
                }
                batch.failed = true;
                batch.refused |= careful::is_permanent(&e);
                true
            }
        }
    }

    /// Removes the confirmed batches at the front; true if any was removed.
    async fn remove_delivered(&mut self) -> bool {
        // Confirmations settle first: most records sent from memory never
        // reached the disk and need no removal (nor the mark's sync).
        let mut ready = 0;
        for b in self.in_flight.iter_mut() {
            if b.remaining > 0 || b.failed || !self.reader.confirm(&mut b.sent) {
                break;
            }
            ready += 1;
        }
        let last = self
            .in_flight
            .iter()
            .take(ready)
            .rfind(|b| self.reader.needs_removal(&b.sent))
            .map(|b| b.seq);
        if let Some(last) = last.filter(|&seq| self.reader.needs_mark(seq)) {
            // The removal mark is synced before any removal it covers; move
            // it to everything handed to Kafka so far, so that one sync
            // serves many removals, and off the executor.
            let store = self.reader.store().clone();
            let next = self.reader.cursor().max(last + 1);
            if let Err(e) = smol::unblock(move || store.advance_removal_mark(next)).await {
                log::error!("moving the outbox removal mark failed: {e}");
                return false;
            }
        }
        let mut removed = false;
        for _ in 0..ready {
            let Some(front) = self.in_flight.front() else {
                break;
            };
            let outcome = self.reader.remove(&front.sent);
            if let Err(e) = outcome {
                log::error!("removing delivered outbox batch {} failed: {e}", front.seq);
                break;
            }
            self.in_flight.pop_front();
            removed = true;
        }
        removed
    }

    /// After a failure: resend from the first unconfirmed batch, with a fresh
    /// producer if librdkafka says the old one cannot go on or `renew` asks.
    async fn rewind(&mut self, backoff: Duration, renew: bool) {
        let Some(first) = self.in_flight.iter().find(|b| b.failed || b.remaining > 0) else {
            return;
        };
        if first.refused {
            self.careful = Some(first.seq);
        }
        let first = self.in_flight.front().map_or(first.seq, |b| b.seq);
        self.reader.rewind(first);
        self.in_flight.clear();
        self.in_flight_msgs = 0;
        let fatal = self.producer.client().fatal_error();
        if fatal.is_some() || renew {
            match &fatal {
                Some(f) => {
                    log::error!("the Kafka producer failed fatally ({f:?}); creating a new one")
                }
                None => {
                    log::warn!("Kafka keeps refusing the same requests; creating a new producer")
                }
            }
            match create(&self.config, self.reports_tx.clone(), self.metrics.clone()) {
                Ok(p) => {
                    let old = std::mem::replace(&mut self.producer, p);
                    // Nothing of the old one may be waited for: its messages
                    // are sent again by the new one. Dropped off the executor,
                    // since librdkafka's teardown blocks.
                    old.purge(PurgeConfig::default().queue().inflight());
                    smol::unblock(move || drop(old)).detach();
                }
                Err(e) => log::error!("{e}"),
            }
        }
        log::warn!(
            "sending again from outbox batch {} in {backoff:?}",
            self.reader.cursor()
        );
        Timer::after(backoff).await;
        while self.reports.try_recv().is_ok() {}
    }
}

mod careful;
mod polled;

use polled::Polled;

fn create(
    config: &ClientConfig,
    reports: Sender<Report>,
    metrics: Arc<Metrics>,
) -> Result<Polled, ProducerError> {
    let producer: BaseProducer<Context> = config.create_with_context(Context {
        reports,
        metrics,
        errors: ErrorLog::default(),
        tx_bytes: Default::default(),
    })?;
    Polled::start(producer).map_err(ProducerError::Thread)
}
