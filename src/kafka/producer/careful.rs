//! Requests Kafka refuses for good. Kafka refuses a whole produce request
//! for one bad record, so the batch that had such a refusal is sent again
//! one request at a time, each after the report of the one before: a
//! request refused on its own goes to the quarantine
//! (`outbox::quarantine`), and the others are sent.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::BaseRecord;
use smol::Timer;

use super::Pipeline;
use crate::outbox::quarantine::{Outcome, Refused};
use crate::outbox::Batch;

/// Refusals that sending again cannot change.
pub(super) fn is_permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

impl Pipeline {
    /// Sends the requests of `batch` one at a time, each after the report
    /// of the one before; a request refused for good on its own goes to the
    /// quarantine. False if a report said to try again later (or `stop`).
    pub(super) async fn send_carefully(
        &mut self,
        seq: u64,
        batch: &Batch<'_>,
        local: usize,
        stop: &AtomicBool,
    ) -> bool {
        for entry in batch.entries() {
            let Some(topic) = self.destination(&entry) else {
                self.metrics.presence_dropped.fetch_add(1, Relaxed);
                continue;
            };
            let record = BaseRecord::with_opaque_to(topic, local)
                .key(entry.key)
                .payload(entry.payload)
                .headers(self.headers(&entry));
            let outcome = match self.producer.send(record) {
                Ok(()) => loop {
                    if stop.load(Relaxed) {
                        return false;
                    }
                    let next = smol::future::or(async { self.reports.recv().await.ok() }, async {
                        Timer::after(Duration::from_millis(200)).await;
                        None
                    });
                    match next.await {
                        Some((l, outcome)) if l == local => break outcome,
                        _ => continue, // a report from before the rewind, or none yet
                    }
                },
                Err((e, _)) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    self.metrics.kafka_delivered.fetch_add(1, Relaxed);
                }
                Err(e) if is_permanent(&e) => {
                    let error = e.to_string();
                    let refused = Refused {
                        topic,
                        key: entry.key,
                        message_id: entry.message_id,
                        payload: entry.payload,
                        error: &error,
                    };
                    // Owned copies for the blocking write off the executor.
                    let (topic, key, payload) = (
                        refused.topic.to_owned(),
                        entry.key.to_vec(),
                        entry.payload.to_vec(),
                    );
                    let quarantine = self.quarantine.clone();
                    let message_id = entry.message_id;
                    let put = smol::unblock(move || {
                        quarantine.put(&Refused {
                            topic: &topic,
                            key: &key,
                            message_id,
                            payload: &payload,
                            error: &error,
                        })
                    })
                    .await;
                    match put {
                        Ok(Outcome::Kept) => {
                            self.metrics.kafka_quarantined.fetch_add(1, Relaxed);
                            log::error!(
                                "Kafka refuses request {message_id} for good ({e}); it is kept in {} and the requests behind it go on",
                                self.quarantine.path().display()
                            );
                        }
                        Ok(Outcome::Dropped) => {
                            self.metrics.kafka_quarantine_dropped.fetch_add(1, Relaxed);
                            log::error!(
                                "Kafka refuses request {message_id} for good ({e}) and the quarantine {} is full: the request is dropped",
                                self.quarantine.path().display()
                            );
                        }
                        Err(qe) => {
                            log::error!("{qe}; request {message_id} stays in the outbox");
                            return false;
                        }
                    }
                }
                Err(e) => {
                    self.metrics.kafka_failed.fetch_add(1, Relaxed);
                    log::warn!(
                        "Kafka refused a request of outbox batch {seq} again: {e}; it will be sent again"
                    );
                    return false;
                }
            }
        }
        true
    }
}
