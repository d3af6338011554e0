//! The producer with a thread of ours serving its events (delivery
//! reports, statistics, logs), in place of rdkafka's `ThreadedProducer`.
//!
//! rdkafka's poll turns the time left into whole milliseconds, rounding
//! down, and once under one millisecond is left it polls without waiting
//! until the deadline has passed. `ThreadedProducer` polls for 100 ms at a
//! time, so each cycle ended with up to a millisecond of spinning on the
//! clock: 0.85% of a core on an idle gateway (`benches/idle.sh`; `perf`
//! put the thread's time in `clock_gettime`). Asking for a whole number of
//! milliseconds and a little more leaves a tail no longer than that little.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::producer::BaseProducer;

use super::Context;

/// One poll: 100 ms, plus more than the few microseconds between rdkafka
/// starting its deadline and reading it.
const POLL: Duration = Duration::from_micros(100_020);

pub struct Polled {
    producer: Arc<BaseProducer<Context>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Polled {
    pub fn start(producer: BaseProducer<Context>) -> std::io::Result<Self> {
        let producer = Arc::new(producer);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("kafka-producer".into())
            .spawn({
                let producer = producer.clone();
                let stop = stop.clone();
                move || {
                    while !stop.load(Relaxed) {
                        producer.poll(POLL);
                    }
                }
            })?;
        Ok(Polled {
            producer,
            stop,
            thread: Some(thread),
        })
    }
}

impl Deref for Polled {
    type Target = BaseProducer<Context>;

    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

impl Drop for Polled {
    /// Stops the thread (within one poll) before the producer goes, as
    /// `ThreadedProducer` does.
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
