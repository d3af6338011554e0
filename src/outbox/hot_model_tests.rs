//! The memory-first path against a model: appends, sends, Kafka's
//! confirmations, failed sends, spills to disk and crashes in any order.
//! Checked after every step: no acknowledged request is lost (it reached
//! Kafka or is on disk), the first copies reach Kafka in the order the
//! requests were appended, no append is answered twice, and once everything
//! is confirmed nothing is left in the outbox.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use smol::channel::{self, Receiver};
use uuid::Uuid;

use super::reader::{Reader, Sent};
use super::writer::{pack, Job, Writer, RECORD_BYTES};
use super::*;
use crate::ops::metrics::Metrics;

#[derive(Debug, Clone)]
enum Op {
    /// One append of `requests` requests of `size` bytes: handed to the
    /// producer's side at once, on disk only if spilled.
    Append { requests: u8, size: u16 },
    /// The producer hands the next `records` to Kafka.
    Send { records: u8 },
    /// Kafka confirms the oldest `records` in flight.
    Confirm { records: u8 },
    /// Kafka refuses what is in flight: it is sent again from the first.
    Fail,
    /// The writer puts every record not confirmed yet on disk (what
    /// `spill_after_ms` does with time).
    Spill,
    /// The power goes: memory is gone, the disk stays.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u8..20, 1u16..3000).prop_map(|(requests, size)| Op::Append { requests, size }),
        4 => (1u8..6).prop_map(|records| Op::Send { records }),
        4 => (1u8..6).prop_map(|records| Op::Confirm { records }),
        1 => Just(Op::Fail),
        2 => Just(Op::Spill),
        1 => Just(Op::Crash),
    ]
}

const CAP: u64 = 64 << 20;

struct Gateway {
    store: Arc<Store>,
    writer: Writer,
    reader: Reader,
    /// Records in flight to Kafka, oldest first, with their ids.
    in_flight: VecDeque<(Sent, Vec<u128>)>,
    _doorbell: Receiver<()>,
}

fn start(dir: &Path) -> Gateway {
    let metrics = Arc::new(Metrics::default());
    let (store, doorbell) = Store::open(&dir.join("outbox"), CAP, metrics).unwrap();
    Gateway {
        writer: Writer::new(store.clone()),
        reader: Reader::new(store.clone()),
        store,
        in_flight: VecDeque::new(),
        _doorbell: doorbell,
    }
}

fn ids_of(batch: &Batch<'_>) -> Vec<u128> {
    batch.entries().map(|e| e.message_id.as_u128()).collect()
}

/// Every id on disk, in the order a restart would replay them.
fn on_disk(store: &Store) -> Vec<u128> {
    let mut seq = 0;
    let mut out = Vec::new();
    while let Some((s, v)) = store.next_batch(seq, None).unwrap() {
        out.extend(ids_of(
            &Batch::parse(&record::from_disk(&v).unwrap()).unwrap(),
        ));
        seq = s + 1;
    }
    out
}

/// Where an append's answer comes.
type Answer = Receiver<Result<(), AppendError>>;

struct Model {
    /// Appends not answered yet: their ids, and where the answer comes.
    waiting: Vec<(Vec<u128>, Answer)>,
    acked: BTreeSet<u128>,
    /// Ids in the order of their first copy in Kafka.
    first_copies: Vec<u128>,
    delivered: BTreeSet<u128>,
    /// Answers per id, to catch an append answered twice.
    answers: HashMap<u128, usize>,
}

impl Model {
    /// Collects the answers that came.
    fn poll(&mut self) -> Result<(), TestCaseError> {
        let mut still = Vec::new();
        for (ids, rx) in self.waiting.drain(..) {
            let mut answered = false;
            while let Ok(reply) = rx.try_recv() {
                for id in &ids {
                    *self.answers.entry(*id).or_default() += 1;
                    prop_assert_eq!(self.answers[id], 1, "id {} answered twice", id);
                }
                if reply.is_ok() {
                    self.acked.extend(ids.iter().copied());
                }
                answered = true;
            }
            if !answered {
                // Dropped unanswered: the device would hear "shutting down"
                // from a gateway that is not.
                prop_assert!(
                    !rx.is_closed(),
                    "append of ids {:?} dropped without an answer",
                    ids
                );
                still.push((ids, rx));
            }
        }
        self.waiting = still;
        Ok(())
    }
}

fn confirm_front(g: &mut Gateway, m: &mut Model) -> Result<bool, TestCaseError> {
    let Some((sent, ids)) = g.in_flight.front_mut() else {
        return Ok(false);
    };
    for id in ids.iter() {
        if m.delivered.insert(*id) {
            m.first_copies.push(*id);
        }
    }
    prop_assert!(
        g.reader.confirm(sent),
        "nothing is being written between steps"
    );
    if g.reader.needs_removal(sent) {
        if g.reader.needs_mark(sent.seq) {
            let next = g.reader.cursor().max(sent.seq + 1);
            g.store.advance_removal_mark(next).unwrap();
        }
        g.reader.remove(sent).unwrap();
    }
    g.in_flight.pop_front();
    Ok(true)
}

proptest! {
    // A failing case is printed, not saved beside the sources.
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn acked_requests_survive_any_order_of_confirmations_spills_and_crashes(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut g = start(dir.path());
        let mut m = Model {
            waiting: Vec::new(),
            acked: BTreeSet::new(),
            first_copies: Vec::new(),
            delivered: BTreeSet::new(),
            answers: HashMap::new(),
        };
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
                    let (done, answer) = channel::unbounded();
                    let (records, accepted) = pack(
                        &g.store,
                        vec![Job { batch, done }],
                        g.store.hot.bytes() as u64,
                        RECORD_BYTES,
                    );
                    prop_assert!(!records.is_empty(), "far below the cap");
                    g.writer.stage(records, accepted);
                    m.waiting.push((ids, answer));
                }
                Op::Send { records } => {
                    for _ in 0..records {
                        let Some(record) = g.reader.next_record().unwrap() else { break };
                        let ids = ids_of(&record.batch());
                        g.in_flight.push_back((record.sent(), ids));
                    }
                }
                Op::Confirm { records } => {
                    for _ in 0..records {
                        if !confirm_front(&mut g, &mut m)? {
                            break;
                        }
                    }
                }
                Op::Fail => {
                    if let Some((first, _)) = g.in_flight.front() {
                        g.reader.rewind(first.seq);
                        g.in_flight.clear();
                    }
                }
                Op::Spill => {
                    let due = g.store.hot.take_due(Instant::now(), Duration::ZERO, true);
                    smol::block_on(g.writer.spill(due));
                }
                Op::Crash => {
                    m.poll()?;
                    let disk: BTreeSet<u128> = on_disk(&g.store).into_iter().collect();
                    for id in &m.acked {
                        prop_assert!(
                            m.delivered.contains(id) || disk.contains(id),
                            "acked id {} is neither in Kafka nor on disk", id
                        );
                    }
                    drop(g);
                    // Answers not given by now never will be.
                    m.waiting.clear();
                    g = start(dir.path());
                }
            }
            m.poll()?;
        }
        // Kafka comes back for good: everything is sent and confirmed.
        loop {
            let mut progress = false;
            while let Some(record) = g.reader.next_record().unwrap() {
                let ids = ids_of(&record.batch());
                g.in_flight.push_back((record.sent(), ids));
                progress = true;
            }
            while confirm_front(&mut g, &mut m)? {
                progress = true;
            }
            if !progress {
                break;
            }
        }
        m.poll()?;
        for id in &m.acked {
            prop_assert!(m.delivered.contains(id), "acked id {} never reached Kafka", id);
        }
        let mut sorted = m.first_copies.clone();
        sorted.sort_unstable();
        prop_assert_eq!(&m.first_copies, &sorted, "first copies out of order");
        prop_assert!(m.waiting.is_empty(), "every append still waiting is answered");
        prop_assert!(g.store.is_empty(), "confirmed records left in the outbox");
    }
}
