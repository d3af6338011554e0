//! Large records in files of their own ([`super::large`]), through the
//! store: written, read back in order, removed, and what a cut can leave
//! behind cleaned up on the next start.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::*;
use crate::ops::metrics::Metrics;

/// One request of `len` payload bytes that no codec shrinks.
fn request(id: u128, len: usize) -> AppendBatch {
    let mut b = AppendBatch::new();
    let mut x = id as u64 | 1;
    b.push(b"k", &Uuid::from_u128(id), |out| {
        out.extend((0..len).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        }))
    });
    b
}

fn open(dir: &Path) -> (Arc<Store>, Arc<Metrics>) {
    let (store, _, metrics) = super::tests::open(dir, 1 << 30);
    (store, metrics)
}

fn append_all(store: &Arc<Store>, requests: Vec<AppendBatch>) {
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
    let task = smol::spawn(writer);
    smol::block_on(async {
        for r in requests {
            appender.append(r).await.unwrap();
        }
    });
    drop(appender);
    smol::block_on(task);
}

/// (seq, message ids) of every batch, in order.
fn drain(store: &Store) -> Vec<(u64, Vec<u128>)> {
    let mut seq = 0;
    let mut out = Vec::new();
    while let Some((s, v)) = store.next_batch(seq, None).unwrap() {
        let record = record::from_disk(&v).unwrap();
        let ids = Batch::parse(&record).unwrap().entries();
        out.push((s, ids.map(|e| e.message_id.as_u128()).collect()));
        seq = s + 1;
    }
    out
}

/// The disk measure, which counts `large/` files as they come and go, and
/// a walk of every file.
fn disk_counted_and_walked(store: &Store) -> (u64, u64) {
    let walked = (store.generations().iter())
        .map(|g| generation::dir_bytes(&g.dir, None))
        .sum();
    (store.measure_disk(), walked)
}

fn files(dir: &Path, sub: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for generation in std::fs::read_dir(dir.join("outbox")).unwrap().flatten() {
        if let Ok(entries) = std::fs::read_dir(generation.path().join(sub)) {
            found.extend(entries.flatten().map(|e| e.path()));
        }
    }
    found
}

#[test]
fn large_requests_get_files_small_ones_stay_in_the_tree_and_sled_makes_no_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, metrics) = open(dir.path());
    let sizes = [100, 40 << 10, 200, 300 << 10, 12 << 10, 100];
    let requests = (1..).zip(sizes).map(|(id, len)| request(id, len)).collect();
    append_all(&store, requests);
    assert_eq!(files(dir.path(), "large").len(), 3);
    let (counted, walked) = disk_counted_and_walked(&store);
    let in_files: u64 = (files(dir.path(), "large").iter())
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(in_files > 100 << 10 && walked > in_files);
    assert_eq!(counted, walked);
    let expected: Vec<Vec<u128>> = (1..=6).map(|id| vec![id]).collect();
    let found = drain(&store);
    assert_eq!(
        found.iter().map(|(_, ids)| ids.clone()).collect::<Vec<_>>(),
        expected
    );
    drop(store);

    // Counted the same after a restart, bytes included, then delivered.
    let (store, metrics_again) = open(dir.path());
    assert_eq!(metrics_again.outbox_records.load(Relaxed), 6);
    let (counted, walked) = disk_counted_and_walked(&store);
    assert_eq!(counted, walked);
    assert_eq!(
        metrics_again.outbox_bytes.load(Relaxed),
        metrics.outbox_bytes.load(Relaxed)
    );
    for (seq, _) in drain(&store) {
        store.remove(seq, 1).unwrap();
    }
    assert!(store.is_empty());
    assert!(files(dir.path(), "large").is_empty());
    assert_eq!(metrics_again.outbox_bytes.load(Relaxed), 0);
    let (counted, walked) = disk_counted_and_walked(&store);
    assert_eq!(counted, walked);

    // Many large requests in one generation, the producer removing as it
    // goes: sled splits and merges leaves all along, and none of its nodes
    // outgrows the log (with 40 KiB values in the tree, it made hundreds of
    // blob files here).
    let requests = (100..400).map(|id| request(id, 40 << 10)).collect();
    append_all(&store, requests);
    let mut seq = 0;
    while let Some((s, _)) = store.next_batch(seq, None).unwrap() {
        if s % 3 != 0 {
            store.remove(s, 1).unwrap();
        }
        seq = s + 1;
    }
    store.flush().unwrap();
    assert_eq!(files(dir.path(), "blobs"), Vec::<PathBuf>::new());
    assert_eq!(files(dir.path(), "large").len(), 100);
}

#[test]
fn what_a_cut_leaves_of_large_records_is_cleaned_up_on_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let requests = vec![request(1, 20 << 10), request(2, 20 << 10), request(3, 50)];
    append_all(&store, requests);
    let batches = drain(&store);
    let (delivered, damaged) = (batches[0].0, batches[1].0);
    let generation = store.active().dir.clone();
    let file = |seq: u64| generation.join("large").join(format!("{seq:020}"));
    // Batch 1 was delivered: the removal mark passed it and its file was
    // deleted, but the pointer's removal never reached the disk.
    store.advance_removal_mark(delivered + 1).unwrap();
    std::fs::remove_file(file(delivered)).unwrap();
    // Batch 2 lost its file (above the mark: damage, not a removal); and an
    // append cut short left a file without a pointer.
    std::fs::remove_file(file(damaged)).unwrap();
    std::fs::write(file(damaged + 100), b"half written").unwrap();
    drop(store);

    let (store, metrics) = open(dir.path());
    assert!(!file(damaged + 100).exists());
    // The delivered one is gone without a word; the damaged one is counted
    // lost, and handed out as damage, which the reader reports and skips.
    assert_eq!(metrics.outbox_batches.load(Relaxed), 2);
    assert_eq!(metrics.outbox_lost_batches.load(Relaxed), 1);
    let (seq, value) = store.next_batch(0, None).unwrap().unwrap();
    assert_eq!(seq, damaged);
    assert_eq!(
        record::from_disk(&value).unwrap_err(),
        CorruptBatch::FileMissing
    );
    let (seq, _) = store.next_batch(damaged + 1, None).unwrap().unwrap();
    assert_eq!(seq, batches[2].0);
}

/// Only a file known to be gone is damage: any other error reading it
/// (here a directory in its place; on a hub, too many open files) leaves the
/// record where it is, to be read again.
#[test]
fn a_large_record_that_cannot_be_read_for_now_is_not_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let (store, metrics) = open(dir.path());
    append_all(&store, vec![request(1, 20 << 10)]);
    let (seq, _) = store.next_batch(0, None).unwrap().unwrap();
    let file = store.active().dir.join("large").join(format!("{seq:020}"));
    let kept = dir.path().join("kept");
    std::fs::rename(&file, &kept).unwrap();
    std::fs::create_dir(&file).unwrap();
    let mut reader = Reader::new(store.clone());
    assert!(matches!(
        reader.read_next(None),
        Err(OutboxError::ReadFile { .. })
    ));
    assert_eq!(metrics.outbox_corrupt_batches.load(Relaxed), 0);
    std::fs::remove_dir(&file).unwrap();
    std::fs::rename(&kept, &file).unwrap();
    let batch = reader.read_next(None).unwrap().expect("still there");
    assert_eq!(batch.seq, seq);
}
