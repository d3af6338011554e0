//! Presence events into the outbox (PROTOCOL 6.2).
//!
//! The router makes the events under its lock, so they are in the order
//! the bindings changed, and queues them here; one task appends them to
//! the outbox in that order, so they reach the presence topic in it too (the
//! outbox keeps the order of one appender's records, like a connection's),
//! at least once, across outages and restarts.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use smol::channel::{Receiver, Sender, TrySendError};
use smol::Timer;

use crate::ops::metrics::Metrics;
use crate::outbox::{AppendBatch, AppendError, Appender};
use crate::wire::ids;
use crate::wire::protocol::{write_presence, Presence};

/// Events waiting for the outbox, at most. Only a long outbox refusal
/// (full disk) fills it; past it new events are dropped and counted.
pub const QUEUE_MAX: usize = 65_536;
/// Events appended together, at most.
const BATCH_MAX: usize = 512;
/// Wait before trying a refused append again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Where the router puts events.
pub struct Queue {
    tx: Sender<Presence>,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn new(metrics: Arc<Metrics>) -> (Queue, Receiver<Presence>) {
        let (tx, rx) = smol::channel::bounded(QUEUE_MAX);
        (Queue { tx, metrics }, rx)
    }

    pub(super) fn push(&self, event: Presence) {
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(e)) => {
                self.metrics.presence_dropped.fetch_add(1, Relaxed);
                log::warn!(
                    "presence queue full (the outbox refuses appends): dropped {:?} of connection {}",
                    e.change,
                    e.client_id
                );
            }
            Err(TrySendError::Closed(_)) => {
                self.metrics.presence_dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Appends queued events until the queue is closed and empty.
pub async fn run(
    events: Receiver<Presence>,
    appender: Appender,
    server_id: String,
    reply_topic: Option<String>,
    metrics: Arc<Metrics>,
) {
    let mut payload = Vec::new();
    while let Ok(first) = events.recv().await {
        let mut batch = AppendBatch::new();
        let mut next = Some(first);
        while let Some(event) = next.take() {
            payload.clear();
            write_presence(&mut payload, &event, &server_id, reply_topic.as_deref());
            batch.push_presence(event.device_uid.as_bytes(), &ids::new_v4(), &payload);
            if batch.len() < BATCH_MAX {
                next = events.try_recv().ok();
            }
        }
        let count = batch.len() as u64;
        loop {
            // A copy per try: a refused append consumes its batch.
            match appender.append(batch.clone()).await {
                Ok(()) => {
                    metrics.presence_events.fetch_add(count, Relaxed);
                    break;
                }
                Err(AppendError::Closed) => {
                    metrics.presence_dropped.fetch_add(count, Relaxed);
                    log::warn!("the outbox closed before {count} presence events were stored");
                    return;
                }
                Err(e) => {
                    log::debug!("presence events not stored yet: {e}; trying again");
                    Timer::after(RETRY_EVERY).await;
                }
            }
        }
    }
}
