//! The group-commit writer: gathers appends, stores them as records in the
//! active generation, makes them durable, then answers every append.

use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::{self, Receiver, Sender, TrySendError};

use super::record::{AppendBatch, Batch, HEADER_LEN};
use super::store::Store;
use super::{AppendError, OutboxError};

/// Stop gathering requests into one group commit past this many bytes.
pub(super) const MAX_BATCH_BYTES: usize = 4 << 20;
/// A group commit is stored as records of at most this size (a larger
/// request gets a record of its own); one flush still serves the whole group.
/// sled writes a tree node whose serialized size exceeds a quarter of its
/// 512 KiB segment, less headers, to a blob file of its own, and a leaf holds
/// up to 17 records: 17 records of 7 KiB stay under that, so nodes stay in
/// the log, the one file whose every write the group commit syncs anyway.
/// (At 32 KiB every consolidated leaf became a new blob file, each needing
/// its own fsync and a directory fsync before the ack.)
pub(super) const RECORD_BYTES: usize = 7 << 10;
/// Pending append jobs; beyond it connections wait (backpressure).
pub(super) const JOB_QUEUE: usize = 4096;
/// After a failed write, appends are refused without touching the store for
/// this long.
pub(super) const RETRY_AFTER_WRITE_ERROR: Duration = Duration::from_millis(200);
/// How often the size on disk is measured for the byte cap.
pub(super) const DISK_CHECK_EVERY: Duration = Duration::from_millis(500);

pub(super) fn is_disk_full(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
}

/// Logs failed appends without flooding the log while the disk stays full:
/// the first failure, then a summary at most every 10 s, then the recovery.
pub(super) struct ErrorThrottle {
    pub(super) failing_since: Option<Instant>,
    pub(super) last_report: Option<Instant>,
    pub(super) refused: u64,
    /// What requests get while the store is left alone after a failure.
    pub(super) last_refusal: AppendError,
}

impl Default for ErrorThrottle {
    fn default() -> Self {
        ErrorThrottle {
            failing_since: None,
            last_report: None,
            refused: 0,
            last_refusal: AppendError::Full,
        }
    }
}

impl ErrorThrottle {
    pub(super) fn report(&mut self, refused: u32, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        self.failing_since.get_or_insert(now);
        self.refused += u64::from(refused);
        if self
            .last_report
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            log::error!(
                "outbox writes are failing ({e}); {} requests refused so far, devices keep them and retry",
                self.refused
            );
            self.last_report = Some(now);
        }
    }

    pub(super) fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            log::warn!(
                "outbox writes work again after {:?}; {} requests were refused meanwhile",
                since.elapsed(),
                self.refused
            );
        }
        self.last_report = None;
        self.refused = 0;
    }
}

pub(super) struct Job {
    pub(super) batch: AppendBatch,
    pub(super) done: Sender<Result<(), AppendError>>,
}

/// The connections' handle: append a batch and wait until it is on disk.
#[derive(Clone)]
pub struct Appender {
    pub(super) jobs: Sender<Job>,
}

impl Appender {
    pub async fn append(&self, batch: AppendBatch) -> Result<(), AppendError> {
        let (done, wait) = channel::bounded(1);
        self.jobs
            .send(Job { batch, done })
            .await
            .map_err(|_| AppendError::Closed)?;
        wait.recv().await.map_err(|_| AppendError::Closed)?
    }
}

/// Starts the group-commit writer; it runs until every [`Appender`] is gone.
pub fn start_writer(
    store: Arc<Store>,
    flush_interval: Duration,
) -> (Appender, impl std::future::Future<Output = ()>) {
    let (jobs, rx) = channel::bounded(JOB_QUEUE);
    (Appender { jobs }, run_writer(store, rx, flush_interval))
}

pub(super) async fn run_writer(store: Arc<Store>, jobs: Receiver<Job>, flush_interval: Duration) {
    let mut next_seq = store.committed.load(SeqCst);
    let mut write_errors = ErrorThrottle::default();
    let mut retry_at: Option<Instant> = None;
    let mut last_disk_check = Instant::now();
    while let Ok(first) = jobs.recv().await {
        let mut group = vec![first];
        let mut bytes = group[0].batch.bytes();
        if !flush_interval.is_zero() {
            // Gather more requests for this flush, but never past the interval.
            let deadline = Instant::now() + flush_interval;
            while bytes < MAX_BATCH_BYTES {
                let next = smol::future::or(async { jobs.recv().await.ok() }, async {
                    smol::Timer::at(deadline).await;
                    None
                })
                .await;
                match next {
                    Some(job) => {
                        bytes += job.batch.bytes();
                        group.push(job);
                    }
                    None => break,
                }
            }
        }
        while bytes < MAX_BATCH_BYTES {
            match jobs.try_recv() {
                Ok(job) => {
                    bytes += job.batch.bytes();
                    group.push(job);
                }
                Err(_) => break,
            }
        }

        if last_disk_check.elapsed() >= DISK_CHECK_EVERY {
            store.measure_disk();
            last_disk_check = Instant::now();
        }
        // Refuse jobs past the cap; keep the rest in arrival order.
        let mut records = Vec::new();
        let mut record = AppendBatch::new();
        let mut accepted = Vec::with_capacity(group.len());
        let mut pending = 0u64;
        for job in group {
            let size = (job.batch.bytes() - HEADER_LEN) as u64;
            if store.would_exceed(pending + HEADER_LEN as u64, size) {
                let _ = job.done.try_send(Err(AppendError::Full));
                continue;
            }
            pending += size;
            for entry in job.batch.raw_entries() {
                if !record.is_empty() && record.bytes() + entry.len() > RECORD_BYTES {
                    records.push(std::mem::take(&mut record).seal());
                }
                record.push_raw(entry);
            }
            accepted.push(job.done);
        }
        if !record.is_empty() {
            records.push(record.seal());
        }
        if records.is_empty() {
            continue;
        }
        let count: u32 = records
            .iter()
            .map(|r| Batch::parse(r).map_or(0, |b| b.count))
            .sum();
        let len: u64 = records.iter().map(|r| r.len() as u64).sum();
        let first = next_seq;
        let batches = records.len() as u64;
        next_seq += batches;

        let generation = store.active();
        // After a failure, the store is not tried again for a moment: every
        // device would otherwise make the gateway reopen it in a loop.
        let db = match retry_at.filter(|at| Instant::now() < *at) {
            Some(_) => Err(None),
            None => generation.db().map_err(Some),
        };
        let db = match db {
            Ok(db) => db,
            Err(e) => {
                write_errors.refused += u64::from(count);
                let refusal = match &e {
                    None => write_errors.last_refusal.clone(),
                    Some(OutboxError::Open { source, .. }) if is_disk_full(source) => {
                        AppendError::Full
                    }
                    Some(other) => AppendError::Store(other.to_string()),
                };
                if let Some(e) = e {
                    write_errors.report(0, &e);
                    write_errors.last_refusal = refusal.clone();
                    retry_at = Some(Instant::now() + RETRY_AFTER_WRITE_ERROR);
                }
                store.committed.store(next_seq, SeqCst);
                for done in accepted {
                    let _ = done.try_send(Err(refusal.clone()));
                }
                continue;
            }
        };
        // The handle goes into the blocking closure and dies there: a clone
        // kept here would hold sled's file lock after a rotation closed the
        // generation, and the producer could not open it.
        let marker = generation.clone();
        let result = smol::unblock(move || {
            let written = (|| {
                for (seq, value) in (first..).zip(records) {
                    db.insert(seq.to_be_bytes(), value)?;
                }
                db.flush()?;
                marker.make_durable()?;
                marker.mark_flushed(first + batches);
                Ok::<_, sled::Error>(())
            })();
            if written.is_err() {
                // The device keeps its copy; do not send one it was not acked.
                for seq in first..first + batches {
                    let _ = db.remove(seq.to_be_bytes());
                }
            }
            written
        })
        .await;
        store.metrics.outbox_flushes.fetch_add(1, Relaxed);
        let reply = match result {
            Ok(()) => {
                write_errors.recovered();
                retry_at = None;
                generation.batches.fetch_add(batches, SeqCst);
                generation.appended.fetch_add(len, SeqCst);
                store.live_bytes.fetch_add(len, SeqCst);
                store.disk_since.fetch_add(len, SeqCst);
                let metrics = &store.metrics;
                metrics
                    .outbox_disk_bytes
                    .store(store.disk_estimate(), Relaxed);
                metrics.outbox_batches.fetch_add(batches as i64, Relaxed);
                metrics.outbox_records.fetch_add(i64::from(count), Relaxed);
                metrics.outbox_bytes.fetch_add(len as i64, Relaxed);
                store.committed.store(next_seq, SeqCst);
                // Only now: a new generation starts at `committed`, so every
                // seq of this group must be below it.
                store.maybe_rotate();
                if let Err(TrySendError::Closed(_)) = store.doorbell.try_send(()) {
                    log::debug!("outbox appended with no producer listening");
                }
                Ok(())
            }
            Err(e) => {
                store.metrics.outbox_write_errors.fetch_add(1, Relaxed);
                write_errors.report(count, &e);
                store.committed.store(next_seq, SeqCst);
                // sled keeps failing with its first I/O error for the rest of
                // the life of that handle, even once the disk has room again:
                // drop it, so the next append (or read) opens it afresh.
                generation.reset();
                retry_at = Some(Instant::now() + RETRY_AFTER_WRITE_ERROR);
                let refusal = if is_disk_full(&e) {
                    AppendError::Full
                } else {
                    AppendError::Store(e.to_string())
                };
                write_errors.last_refusal = refusal.clone();
                Err(refusal)
            }
        };
        for done in accepted {
            let _ = done.try_send(reply.clone());
        }
    }
    if let Err(e) = smol::unblock(move || store.flush()).await {
        log::error!("final outbox flush failed: {e}");
    }
}
