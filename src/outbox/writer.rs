//! The group-commit writer: gathers appends, stores them as records in the
//! active generation, makes them durable, then answers every append.

use std::borrow::Cow;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel::{self, Receiver, Sender, TrySendError};

use super::hot::{GroupAck, Spill, Waiter, MEMORY_LIMIT};
use super::large;
use super::record::{for_disk, AppendBatch, Batch, HEADER_LEN};
use super::store::Store;
use super::{AppendError, OutboxError};

/// Stop gathering requests into one group commit past this many bytes.
pub(super) const MAX_BATCH_BYTES: usize = 4 << 20;
/// A group commit is stored as records of about this size on disk (a
/// larger request gets a record of its own); one flush still serves the
/// whole group. Small records stay in sled's log, the one file whose every
/// write the group commit syncs anyway; one past [`large::INLINE_MAX`]
/// goes to a file of its own, synced apart (see `large` for what each
/// costs in flash). A record stored as it is never passes this size; a
/// compressed one packed by a ratio that no longer holds can. Bigger
/// records write less per request (telemetry at full speed: 6 KiB records
/// in the tree 167-169 bytes, 32 KiB records in files 48) but each file is
/// one more fsync: outage writes at full speed became 15-19% slower
/// (297k-335k against 259k-268k requests a second, `benches/outage.sh`),
/// far above any hub's rate.
pub(super) const RECORD_BYTES: usize = 32 << 10;
/// Requests packed into one record, before compression, at most. Records
/// are packed from as many bytes as the last write's compression ratio
/// says fit in [`RECORD_BYTES`] on disk, up to this: zstd's ratio improves
/// with size, while an incompressible payload stays at [`RECORD_BYTES`]. A
/// sudden change of ratio only makes a record bigger or smaller than
/// planned.
pub(super) const RECORD_RAW_MAX: usize = 256 << 10;
/// In outage mode a group commit ends at this many bytes if the spill
/// delay has not ended it first: about one record of [`RECORD_BYTES`] for
/// compressible requests (zstd's ratio), and few flushes at full speed.
pub(super) const OUTAGE_GROUP_BYTES: usize = 256 << 10;
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
/// With a zero `spill_after` every append is written before its ack; else
/// appends go to the producer at once (through [`Hot`](super::hot::Hot))
/// and only what Kafka has not confirmed within `spill_after` is written.
pub fn start_writer(
    store: Arc<Store>,
    flush_interval: Duration,
    spill_after: Duration,
) -> (Appender, impl std::future::Future<Output = ()>) {
    let (jobs, rx) = channel::bounded(JOB_QUEUE);
    (
        Appender { jobs },
        run_writer(store, rx, flush_interval, spill_after),
    )
}

/// The writer's state between group commits.
pub(super) struct Writer {
    store: Arc<Store>,
    /// The next seq to give a record.
    next_seq: u64,
    /// The seq after the last record written: a record given a seq but
    /// never written (confirmed first) leaves a gap after it.
    written_end: u64,
    errors: ErrorThrottle,
    retry_at: Option<Instant>,
    last_disk_check: Instant,
    /// How many bytes of requests [`pack`] puts in a record (see
    /// [`RECORD_RAW_MAX`]).
    record_raw: usize,
}

pub(super) async fn run_writer(
    store: Arc<Store>,
    jobs: Receiver<Job>,
    flush_interval: Duration,
    spill_after: Duration,
) {
    let mut w = Writer::new(store.clone());
    let hot = !spill_after.is_zero();
    // Outage mode (memory-first only): entered when a record had to be
    // spilled, left once Kafka confirms anything again. Until then waiting
    // in memory only delays the write, and a hub's trickle of requests
    // spilled one by one costs a flush (a flash page or more) and a poorly
    // compressed record each: so a group gathers for up to `spill_after`
    // (no request waits longer than it would have waited in memory), goes
    // to the producer as usual and is written at once, as one flush.
    let mut outage: Option<u64> = None;
    let still_out =
        |outage: Option<u64>| outage.filter(|&at| store.confirmations.load(Relaxed) == at);
    loop {
        outage = still_out(outage);
        // Appends, or (in memory-first mode) the next record due for the disk.
        let due = if hot && outage.is_none() {
            store.hot.next_due(spill_after)
        } else {
            None
        };
        let first = match due {
            None => jobs.recv().await.ok().map(Some),
            Some(at) => {
                smol::future::or(async { jobs.recv().await.ok().map(Some) }, async {
                    smol::Timer::at(at).await;
                    Some(None)
                })
                .await
            }
        };
        let first = match first {
            None => break, // every appender is gone
            Some(first) => first,
        };
        if let Some(first) = first {
            outage = still_out(outage);
            let group = match outage {
                Some(_) => gather(first, &jobs, spill_after, OUTAGE_GROUP_BYTES).await,
                None => gather(first, &jobs, flush_interval, MAX_BATCH_BYTES).await,
            };
            // Near the cap, sled's jumps (a new segment, a consolidated node
            // written whole) matter: measure before every decision.
            if w.last_disk_check.elapsed() >= DISK_CHECK_EVERY || store.near_cap() {
                store.measure_disk();
                w.last_disk_check = Instant::now();
            }
            let reserved = if hot { store.hot.bytes() as u64 } else { 0 };
            let (records, accepted) = pack(&store, group, reserved, w.record_raw);
            if records.is_empty() {
                continue;
            }
            if hot {
                w.stage(records, accepted);
            } else {
                let outcome = w.write_now(records).await;
                for done in accepted {
                    let _ = done.try_send(outcome.clone());
                }
            }
        }
        if hot {
            let memory_full = store.hot.bytes() > MEMORY_LIMIT;
            if memory_full {
                store.metrics.outbox_memory_full.fetch_add(1, Relaxed);
            }
            let all = memory_full || outage.is_some();
            let now = Instant::now();
            let mut spill = store.hot.take_due(now, spill_after, all);
            if !spill.is_empty() && outage.is_none() {
                outage = Some(store.confirmations.load(Relaxed));
                store.metrics.outbox_outages.fetch_add(1, Relaxed);
                // The younger ones wait for the same silent Kafka, and outage
                // mode sets no timer for them: written now, after the due
                // ones (seqs still ascending).
                spill.extend(store.hot.take_due(now, spill_after, true));
            }
            w.spill(spill).await;
        }
    }
    if hot {
        // What Kafka has not confirmed yet stays for the next start.
        w.spill(store.hot.take_due(Instant::now(), spill_after, true))
            .await;
    }
    if let Err(e) = smol::unblock(move || store.flush()).await {
        log::error!("final outbox flush failed: {e}");
    }
}

/// Gathers more appends for one group commit, up to `limit` bytes, but
/// never past the interval.
async fn gather(first: Job, jobs: &Receiver<Job>, interval: Duration, limit: usize) -> Vec<Job> {
    let mut group = vec![first];
    let mut bytes = group[0].batch.bytes();
    if !interval.is_zero() {
        let deadline = Instant::now() + interval;
        while bytes < limit {
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
    while bytes < limit {
        match jobs.try_recv() {
            Ok(job) => {
                bytes += job.batch.bytes();
                group.push(job);
            }
            Err(_) => break,
        }
    }
    group
}

/// Refuses jobs past the cap (`reserved`: bytes accepted and not on disk
/// yet) and packs the rest, in arrival order, into records of at most
/// `record_raw` bytes.
pub(super) fn pack(
    store: &Store,
    group: Vec<Job>,
    reserved: u64,
    record_raw: usize,
) -> (Vec<Vec<u8>>, Vec<Waiter>) {
    let mut records = Vec::new();
    let mut record = AppendBatch::new();
    let mut accepted = Vec::with_capacity(group.len());
    let mut pending = reserved;
    for job in group {
        let size = (job.batch.bytes() - HEADER_LEN) as u64;
        if store.would_exceed(pending + HEADER_LEN as u64, size) {
            store.set_full(true);
            let _ = job.done.try_send(Err(AppendError::Full));
            continue;
        }
        store.set_full(false);
        pending += size;
        for entry in job.batch.raw_entries() {
            if !record.is_empty() && record.bytes() + entry.len() > record_raw {
                records.push(std::mem::take(&mut record).seal());
            }
            record.push_raw(entry);
        }
        accepted.push(job.done);
    }
    if !record.is_empty() {
        records.push(record.seal());
    }
    (records, accepted)
}

/// The request count of a record [`pack`] sealed.
fn count_of(record: &[u8]) -> u32 {
    Batch::verified(record).count
}

impl Writer {
    pub(super) fn new(store: Arc<Store>) -> Writer {
        let next_seq = store.committed.load(SeqCst);
        Writer {
            store,
            next_seq,
            written_end: next_seq,
            errors: ErrorThrottle::default(),
            retry_at: None,
            last_disk_check: Instant::now(),
            record_raw: RECORD_BYTES,
        }
    }

    /// Memory-first: gives the records seqs and hands them to the producer;
    /// the group is answered once each is confirmed or on disk.
    pub(super) fn stage(&mut self, records: Vec<Vec<u8>>, accepted: Vec<Waiter>) {
        let group = GroupAck::new(records.len(), accepted);
        let first = self.next_seq;
        self.next_seq += records.len() as u64;
        let staged = (first..).zip(records).map(|(seq, value)| {
            let count = count_of(&value);
            (seq, value, count)
        });
        self.store.hot.stage(staged, &group, Instant::now());
        self.ring();
    }

    /// Writes the records now, before any of them is answered.
    async fn write_now(&mut self, records: Vec<Vec<u8>>) -> Result<(), AppendError> {
        let first = self.next_seq;
        self.next_seq += records.len() as u64;
        let records: Vec<(u64, Arc<[u8]>)> = (first..)
            .zip(records)
            .map(|(seq, v)| (seq, v.into()))
            .collect();
        self.write(records).await
    }

    /// Memory-first: writes records Kafka has not confirmed in time.
    pub(super) async fn spill(&mut self, spill: Vec<Spill>) {
        if !spill.is_empty() {
            let seqs: Vec<u64> = spill.iter().map(|s| s.seq).collect();
            let records = spill.into_iter().map(|s| (s.seq, s.value)).collect();
            let outcome = self.write(records).await;
            self.store
                .metrics
                .outbox_spilled
                .fetch_add(seqs.len() as u64, Relaxed);
            self.store.hot.written(&seqs, &outcome);
        }
        // Below the first record in memory, everything is on disk or was
        // confirmed: the producer may read the disk up to there.
        let committed = self.store.hot.first().unwrap_or(self.next_seq);
        if committed > self.store.committed.fetch_max(committed, SeqCst) {
            // Every seq from `committed` on is in memory or not given yet,
            // so a new generation may start there.
            self.store.maybe_rotate();
        }
        self.ring();
    }

    fn ring(&self) {
        if let Err(TrySendError::Closed(_)) = self.store.doorbell.try_send(()) {
            log::debug!("outbox appended with no producer listening");
        }
    }

    /// Inserts `records` (seqs ascending) into the active generation, flushes
    /// and makes them durable. In disk-first mode `committed` moves past them.
    async fn write(&mut self, records: Vec<(u64, Arc<[u8]>)>) -> Result<(), AppendError> {
        let store = self.store.clone();
        let count: u32 = records.iter().map(|(_, r)| count_of(r)).sum();
        let raw: usize = records.iter().map(|(_, r)| r.len()).sum();
        let batches = records.len() as u64;
        let compression = store.compression();
        let (first, last) = match (records.first(), records.last()) {
            (Some(f), Some(l)) => (f.0, l.0),
            _ => return Ok(()),
        };
        // Seqs given but never written (Kafka confirmed them first) must be
        // below the removal mark, or the next start would count them lost.
        let gap = first > self.written_end || last - first + 1 != batches;
        let generation = store.active();
        // After a failure, the store is not tried again for a moment: every
        // device would otherwise make the gateway reopen it in a loop.
        let db = match self.retry_at.filter(|at| Instant::now() < *at) {
            Some(_) => Err(None),
            None => generation.db().map_err(Some),
        };
        let db = match db {
            Ok(db) => db,
            Err(e) => {
                self.errors.refused += u64::from(count);
                let refusal = match &e {
                    None => self.errors.last_refusal.clone(),
                    Some(OutboxError::Open { source, .. }) if is_disk_full(source) => {
                        AppendError::Full
                    }
                    Some(other) => AppendError::Store(other.to_string()),
                };
                if let Some(e) = e {
                    self.errors.report(0, &e);
                    self.errors.last_refusal = refusal.clone();
                    self.retry_at = Some(Instant::now() + RETRY_AFTER_WRITE_ERROR);
                }
                self.settle_disk_first(last);
                return Err(refusal);
            }
        };
        // The handle goes into the blocking closure and dies there: a clone
        // kept here would hold sled's file lock after a rotation closed the
        // generation, and the producer could not open it.
        let marker = generation.clone();
        let marks = store.clone();
        let first_seq = records.first().map_or(last, |(seq, _)| *seq);
        // Compressed here, off the executor; what the disk holds is counted.
        let result = smol::unblock(move || {
            let (mut stored, mut in_files) = (0u64, 0u64);
            let committing = marker.committing();
            let written = (|| {
                if gap {
                    marks
                        .advance_removal_mark(last)
                        .map_err(|e| sled::Error::Io(std::io::Error::other(e.to_string())))?;
                }
                let on_disk: Vec<(u64, Cow<'_, [u8]>)> = records
                    .iter()
                    .map(|(seq, value)| (*seq, for_disk(value, compression)))
                    .collect();
                // Large ones first, synced before their pointers exist.
                large::store(
                    &marker.dir,
                    on_disk
                        .iter()
                        .filter(|(_, v)| large::takes_file(v))
                        .map(|(seq, v)| (*seq, &v[..])),
                )?;
                for (seq, value) in &on_disk {
                    stored += value.len() as u64;
                    if large::takes_file(value) {
                        in_files += value.len() as u64;
                        db.insert(seq.to_be_bytes(), &large::pointer(value)[..])?;
                    } else {
                        db.insert(seq.to_be_bytes(), &**value)?;
                    }
                }
                db.flush()?;
                marker.make_durable()?;
                marker.mark_flushed(last + 1);
                // Before the producer can remove one of them (not during a
                // commit): its subtraction must not come first.
                marker.large_bytes.fetch_add(in_files, SeqCst);
                Ok::<_, sled::Error>(stored)
            })();
            if written.is_err() {
                // The device keeps its copy; do not send one it was not acked.
                for (seq, _) in &records {
                    let _ = db.remove(seq.to_be_bytes());
                }
                // Files only once no pointer to them can come back: one
                // gone under a pointer reads as an acked record lost. Left
                // behind, a retry rewrites them or the next start deletes
                // them.
                if db.flush().is_ok() && marker.make_durable().is_ok() {
                    for (seq, _) in &records {
                        let _ = large::remove(&marker.dir, *seq);
                    }
                }
            }
            drop(committing);
            written
        })
        .await;
        store.metrics.outbox_flushes.fetch_add(1, Relaxed);
        match result {
            Ok(len) => {
                self.errors.recovered();
                self.retry_at = None;
                if let Some(fit) = (RECORD_BYTES as u64 * raw as u64).checked_div(len) {
                    self.record_raw = (fit as usize).clamp(RECORD_BYTES, RECORD_RAW_MAX);
                }
                self.written_end = last + 1;
                store.note_written(first_seq);
                generation.batches.fetch_add(batches, SeqCst);
                generation.appended.fetch_add(len, SeqCst);
                store.live_bytes.fetch_add(len, SeqCst);
                store.disk_since.fetch_add(len, SeqCst);
                // Readable before the records leave memory: the producer
                // looks for a record in memory first, then on disk below
                // `committed`, and skips what is in neither. After the
                // counts, which its removals subtract from.
                store.committed.fetch_max(last + 1, SeqCst);
                let metrics = &store.metrics;
                metrics
                    .outbox_disk_bytes
                    .store(store.disk_estimate(), Relaxed);
                metrics.outbox_batches.fetch_add(batches as i64, Relaxed);
                metrics.outbox_records.fetch_add(i64::from(count), Relaxed);
                metrics.outbox_bytes.fetch_add(len as i64, Relaxed);
                self.settle_disk_first(last);
                self.ring();
                Ok(())
            }
            Err(e) => {
                store.metrics.outbox_write_errors.fetch_add(1, Relaxed);
                self.errors.report(count, &e);
                self.settle_disk_first(last);
                // sled keeps failing with its first I/O error for the rest of
                // the life of that handle, even once the disk has room again:
                // drop it, so the next append (or read) opens it afresh.
                generation.reset();
                self.retry_at = Some(Instant::now() + RETRY_AFTER_WRITE_ERROR);
                let refusal = if is_disk_full(&e) {
                    AppendError::Full
                } else {
                    AppendError::Store(e.to_string())
                };
                self.errors.last_refusal = refusal.clone();
                Err(refusal)
            }
        }
    }

    /// Disk-first: the producer may read up to `last` (a failed write left
    /// nothing there to read), and a new generation may start after it.
    fn settle_disk_first(&self, last: u64) {
        if self.store.hot.is_empty() {
            self.store.committed.fetch_max(last + 1, SeqCst);
            // Only now: a new generation starts at `committed`, so every
            // seq written must be below it.
            self.store.maybe_rotate();
        }
    }
}
