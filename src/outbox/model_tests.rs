//! The outbox against a simple in-memory model: random sequences of appends
//! (with rotations and the cap), deliveries and reopenings must agree with a
//! queue of acknowledged ids.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use smol::channel::Receiver;
use uuid::Uuid;

use super::*;
use crate::ops::metrics::Metrics;

#[derive(Debug, Clone)]
enum Op {
    /// One append of `requests` requests with payloads of `size` bytes.
    Append { requests: u8, size: u16 },
    /// The producer confirms the next `batches` records, in order.
    Deliver { batches: u8 },
    /// The process stops cleanly and starts again on the same directory.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..40, 1u16..4000).prop_map(|(requests, size)| Op::Append { requests, size }),
        3 => (1u8..8).prop_map(|batches| Op::Deliver { batches }),
        1 => Just(Op::Reopen),
    ]
}

const CAP: u64 = 256 << 10;

struct Running {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    appender: Appender,
    writer: smol::Task<()>,
    _doorbell: Receiver<()>,
}

fn start(dir: &Path) -> Running {
    let metrics = Arc::new(Metrics::default());
    let (store, doorbell) = Store::open(&dir.join("outbox"), CAP, metrics.clone()).unwrap();
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
    Running {
        store,
        metrics,
        appender,
        writer: smol::spawn(writer),
        _doorbell: doorbell,
    }
}

fn stop(r: Running) {
    drop(r.appender);
    smol::block_on(r.writer);
}

/// Every id the store would replay, in order, without removing anything.
fn replay(store: &Store) -> Vec<u128> {
    let mut seq = 0;
    let mut out = Vec::new();
    while let Some((s, v)) = store.next_batch(seq, None).unwrap() {
        let record = record::from_disk(&v).unwrap();
        let batch = Batch::parse(&record).expect("no corruption in this test");
        out.extend(batch.entries().map(|e| e.message_id.as_u128()));
        seq = s + 1;
    }
    out
}

proptest! {
    // A failing case is printed, not saved beside the sources.
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn outbox_agrees_with_a_queue_of_acked_ids(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut running = start(dir.path());
        let mut model: VecDeque<u128> = VecDeque::new();
        let mut next_id = 1u128;
        for op in ops {
            match op {
                Op::Append { requests, size } => {
                    let mut batch = AppendBatch::new();
                    let ids: Vec<u128> = (next_id..next_id + u128::from(requests)).collect();
                    next_id += u128::from(requests);
                    for id in &ids {
                        batch.push(b"key", &Uuid::from_u128(*id), |out| {
                            out.extend(std::iter::repeat_n(b'p', usize::from(size)))
                        });
                    }
                    match smol::block_on(running.appender.append(batch)) {
                        Ok(()) => model.extend(ids),
                        Err(AppendError::Full) => {} // refused: nothing of it may appear
                        Err(e) => prop_assert!(false, "append failed: {e}"),
                    }
                }
                Op::Deliver { batches } => {
                    let store = &running.store;
                    for _ in 0..batches {
                        let Some((seq, value)) = store.next_batch(0, None).unwrap() else { break };
                        let record = record::from_disk(&value).unwrap();
                        let batch = Batch::parse(&record).unwrap();
                        for entry in batch.entries() {
                            prop_assert_eq!(Some(entry.message_id.as_u128()), model.pop_front(), "replay order");
                        }
                        store.remove(seq, batch.count).unwrap();
                    }
                }
                Op::Reopen => {
                    stop(running);
                    running = start(dir.path());
                }
            }
            prop_assert_eq!(running.metrics.outbox_records.load(Relaxed), model.len() as i64);
            prop_assert_eq!(running.store.is_empty(), model.is_empty());
            // Nothing was damaged: no loss may be reported.
            prop_assert_eq!(running.metrics.outbox_lost_batches.load(Relaxed), 0);
        }
        prop_assert_eq!(replay(&running.store), Vec::from(model.clone()));
        stop(running);
        // Generations left on disk: at most the drained-to-empty newest one
        // plus those still holding records.
        let left = std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u64>().is_ok()))
            .count();
        prop_assert!(model.is_empty() && left <= 2 || !model.is_empty(), "{left} generations left");
    }
}
