use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use smol::channel::Receiver;
use uuid::Uuid;

use super::writer::DISK_CHECK_EVERY;
use super::*;
use crate::ops::metrics::Metrics;

fn batch(ids: &[u128]) -> AppendBatch {
    let mut b = AppendBatch::new();
    for &id in ids {
        b.push(format!("k{id}").as_bytes(), &Uuid::from_u128(id), |out| {
            out.extend_from_slice(format!("{{\"n\":{id}}}").as_bytes())
        });
    }
    b
}

fn ids(value: &[u8]) -> Vec<u128> {
    Batch::parse(&record::from_disk(value).unwrap())
        .unwrap()
        .entries()
        .map(|e| e.message_id.as_u128())
        .collect()
}

#[test]
fn sealed_batch_round_trips() {
    let mut b = batch(&[1, 2]);
    for entry in batch(&[3]).raw_entries() {
        b.push_raw(entry);
    }
    let value = b.seal();
    let parsed = Batch::parse(&value).unwrap();
    assert_eq!(parsed.count, 3);
    let entries: Vec<Entry<'_>> = parsed.entries().collect();
    assert_eq!(entries[2].key, b"k3");
    assert_eq!(entries[2].payload, b"{\"n\":3}");
    assert_eq!(ids(&value), vec![1, 2, 3]);
}

#[test]
fn presence_events_keep_their_kind_and_key() {
    let mut b = batch(&[1]);
    b.push_presence(b"dev-1", &Uuid::from_u128(2), b"{\"event\":\"connected\"}");
    let value = b.seal();
    let parsed = Batch::parse(&value).unwrap();
    let entries: Vec<Entry<'_>> = parsed.entries().collect();
    assert_eq!(
        (entries[0].kind, entries[0].key),
        (record::Kind::Request, &b"k1"[..])
    );
    assert_eq!(
        (entries[1].kind, entries[1].key),
        (record::Kind::Presence, &b"dev-1"[..])
    );
    assert_eq!(entries[1].payload, b"{\"event\":\"connected\"}");
    // A key longer than the 15 bits is cut, never taken for the flag.
    let mut long = AppendBatch::new();
    long.push(&[b'k'; 40_000], &Uuid::from_u128(3), |o| o.push(b'1'));
    let value = long.seal();
    let entry = Batch::parse(&value).unwrap().entries().next().unwrap();
    assert_eq!(
        (entry.kind, entry.key.len()),
        (record::Kind::Request, 32_767)
    );
}

#[test]
fn any_flipped_byte_is_detected() {
    let value = batch(&[1, 2, 3]).seal();
    for i in 0..value.len() {
        let mut bad = value.clone();
        bad[i] ^= 0x40;
        assert!(Batch::parse(&bad).is_err(), "flip at {i} went unnoticed");
    }
    assert_eq!(
        Batch::parse(&value[..value.len() - 1]).unwrap_err(),
        CorruptBatch::Checksum
    );
    assert_eq!(Batch::parse(&value[..5]).unwrap_err(), CorruptBatch::Short);
}

pub(super) fn open(dir: &Path, max: u64) -> (Arc<Store>, Receiver<()>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let (s, r) = Store::open(&dir.join("outbox"), max, metrics.clone()).unwrap();
    (s, r, metrics)
}

fn drain(store: &Store) -> Vec<u128> {
    let mut seq = 0;
    let mut out = Vec::new();
    while let Some((s, v)) = store.next_batch(seq, None).unwrap() {
        out.extend(ids(&v));
        seq = s + 1;
    }
    out
}

#[test]
fn appends_survive_reopen_in_order_and_removals_stick() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, rung, _) = open(dir.path(), 1 << 30);
        let (appender, writer) =
            start_writer(store.clone(), Duration::from_millis(1), Duration::ZERO);
        let task = smol::spawn(writer);
        smol::block_on(async {
            appender.append(batch(&[1, 2])).await.unwrap();
            appender.append(batch(&[3])).await.unwrap();
            appender.append(batch(&[4])).await.unwrap();
        });
        assert!(rung.try_recv().is_ok(), "producer must be told");
        drop(appender);
        smol::block_on(task);
        let (seq, _) = store.next_batch(0, None).unwrap().unwrap();
        store.remove(seq, 2).unwrap();
        store.flush().unwrap();
    }
    let (store, _, metrics) = open(dir.path(), 1 << 30);
    assert_eq!(drain(&store), vec![3, 4]);
    assert_eq!(metrics.outbox_records.load(Relaxed), 2);
    // New appends go after the old ones.
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
    let task = smol::spawn(writer);
    smol::block_on(appender.append(batch(&[5]))).unwrap();
    drop(appender);
    smol::block_on(task);
    assert_eq!(drain(&store), vec![3, 4, 5]);
}

#[test]
fn drained_generations_are_deleted_so_a_full_outbox_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, metrics) = open(dir.path(), 2 << 20);
    // Stored as they are, so that these padded requests fill the cap.
    store.set_compression(Compression::None);
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
    let task = smol::spawn(writer);
    let big = |id: u128| {
        let mut b = AppendBatch::new();
        b.push(b"k", &Uuid::from_u128(id), |out| {
            out.extend(std::iter::repeat_n(b'x', 100 << 10))
        });
        b
    };
    let mut id = 0;
    let (mut acked, mut delivered) = (Vec::new(), Vec::new());
    smol::block_on(async {
        for _round in 0..3 {
            // Fill to the cap, pausing so the writer measures the disk.
            loop {
                id += 1;
                match appender.append(big(id)).await {
                    Ok(()) => acked.push(id),
                    Err(AppendError::Full) => break,
                    Err(e) => panic!("{e}"),
                }
                if id % 4 == 0 {
                    smol::Timer::after(Duration::from_millis(120)).await;
                }
                assert!(id < 1000, "the cap never applied");
            }
            // Deliver everything, as the producer would: every acked
            // id exactly once, in order, across generations.
            let mut seq = 0;
            while let Some((s, v)) = store.next_batch(seq, None).unwrap() {
                delivered.extend(ids(&v));
                store.remove(s, 1).unwrap();
                seq = s + 1;
            }
            assert_eq!(delivered, acked, "round {_round}");
            assert!(store.is_empty());
            smol::Timer::after(DISK_CHECK_EVERY + Duration::from_millis(100)).await;
            id += 1;
            appender.append(big(id)).await.expect("space came back");
            acked.push(id);
        }
    });
    let dirs = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .count();
    assert!(dirs <= 3, "{dirs} generations left behind");
    assert!(metrics.outbox_disk_bytes.load(Relaxed) <= 2 << 20);
    drop(appender);
    smol::block_on(task);
}

#[test]
fn cap_refuses_with_full_and_keeps_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    // Room is kept on disk for one more sled segment (512 KiB).
    let (store, _, _) = open(dir.path(), 4 << 20);
    store.set_compression(Compression::None);
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
    let task = smol::spawn(writer);
    let big = |id: u128| {
        let mut b = AppendBatch::new();
        b.push(b"k", &Uuid::from_u128(id), |out| {
            out.extend(std::iter::repeat_n(b'x', 1 << 20))
        });
        b
    };
    smol::block_on(async {
        appender.append(big(1)).await.unwrap();
        appender.append(big(2)).await.unwrap();
        appender.append(big(3)).await.unwrap();
        assert_eq!(appender.append(big(4)).await, Err(AppendError::Full));
    });
    assert_eq!(drain(&store), vec![1, 2, 3]);
    drop(appender);
    smol::block_on(task);
}

#[test]
fn the_reader_hands_out_in_order_skips_corrupt_batches_and_acks_by_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, metrics) = open(dir.path(), 1 << 30);
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
    let task = smol::spawn(writer);
    smol::block_on(async {
        for id in [1, 2, 3] {
            appender.append(batch(&[id])).await.unwrap();
        }
    });
    // Damage the middle batch in place.
    let db = store.active().db().unwrap();
    let (middle, _) = store.next_batch(1, None).unwrap().unwrap();
    db.insert(middle.to_be_bytes(), &b"junk"[..]).unwrap();

    let mut reader = Reader::new(store.clone());
    let first = reader.read_next(None).unwrap().unwrap();
    assert_eq!(
        first
            .entries()
            .map(|e| e.message_id.as_u128())
            .collect::<Vec<_>>(),
        vec![1]
    );
    let third = reader.read_next(None).unwrap().unwrap();
    assert_eq!(
        third
            .entries()
            .map(|e| e.message_id.as_u128())
            .collect::<Vec<_>>(),
        vec![3]
    );
    assert!(reader.read_next(None).unwrap().is_none());
    assert_eq!(metrics.outbox_corrupt_batches.load(Relaxed), 1);
    // A failed send: read again from the first, then ack both.
    reader.rewind(first.seq);
    assert_eq!(reader.read_next(None).unwrap().unwrap().seq, first.seq);
    assert_eq!(reader.read_next(None).unwrap().unwrap().seq, third.seq);
    reader.ack(first.seq).unwrap();
    reader.ack(third.seq).unwrap();
    assert!(store.is_empty());
    // (The records gauge keeps the corrupt batch's unknown count until the
    // next start re-counts it; batches are exact.)
    assert_eq!(metrics.outbox_batches.load(Relaxed), 0);
    drop(appender);
    smol::block_on(task);
}

/// Records go to disk compressed when that makes them smaller, and come back
/// exactly; a damaged compressed record is refused, never mis-read; an
/// uncompressed record (as 0.1.0 wrote them) reads as before.
#[test]
fn compressed_records_round_trip_and_damage_is_caught() {
    let mut b = AppendBatch::new();
    for id in 1..=30u128 {
        b.push(b"dev-7", &Uuid::from_u128(id), |out| {
            out.extend_from_slice(
                format!(r#"{{"deviceRequest":{{"action":"telemetry","uid":"{id}","data":{{"t":21.{id}}}}},"serverId":"gw-1"}}"#)
                    .as_bytes(),
            )
        });
    }
    let plain = b.seal();
    // Version 1 records pass through untouched.
    assert!(matches!(
        record::from_disk(&plain).unwrap(),
        std::borrow::Cow::Borrowed(_)
    ));
    assert_eq!(&*record::for_disk(&plain, Compression::None), &plain[..]);
    // zstd shrinks these 30 envelopes more than 3 times, lz4 more than 2.
    for (compression, factor) in [(Compression::Zstd, 3), (Compression::Lz4, 2)] {
        let packed = record::for_disk(&plain, compression).into_owned();
        assert!(
            packed.len() * factor < plain.len(),
            "{compression:?}: {} -> {} bytes",
            plain.len(),
            packed.len()
        );
        assert_eq!(record::stored_count(&packed), Some(30));
        assert_eq!(&*record::from_disk(&packed).unwrap(), &plain[..]);
        assert_eq!(ids(&packed), (1..=30).collect::<Vec<u128>>());
        for i in 0..packed.len() {
            let mut bad = packed.clone();
            bad[i] ^= 0x40;
            assert!(
                record::from_disk(&bad)
                    .and_then(|r| Batch::parse(&r).map(|_| ()))
                    .is_err(),
                "{compression:?}: flip at {i} went unnoticed"
            );
        }
    }
}

/// A compressed record keeps each messageId once (the entry's 16 bytes)
/// and gives back the exact bytes it was given: for an envelope, a payload
/// naming its messageId twice, a presence event and a payload without it.
#[test]
fn message_id_texts_are_stored_once_and_given_back_byte_for_byte() {
    let id = |n: u128| Uuid::from_u128(0x5ba9e759_46a1_4634_a9a1_8ff1bf841f00 + n);
    let text = |n: u128| id(n).hyphenated().to_string();
    let mut b = AppendBatch::new();
    b.push(b"dev-1", &id(1), |out| {
        out.extend_from_slice(
            format!(
                r#"{{"deviceRequest":{{"uid":"a"}},"messageId":"{}","receivedAt":"x"}}"#,
                text(1)
            )
            .as_bytes(),
        )
    });
    b.push(b"dev-2", &id(2), |out| {
        out.extend_from_slice(format!("{0} and again {0}", text(2)).as_bytes())
    });
    b.push_presence(b"dev-3", &id(3), br#"{"event":"connected"}"#);
    b.push(b"dev-4", &id(4), |out| out.extend_from_slice(b"no id here"));
    b.push(b"", &id(5), |out| out.extend_from_slice(text(5).as_bytes()));
    let plain = b.seal();
    for compression in [Compression::Zstd, Compression::Lz4] {
        let packed = record::for_disk(&plain, compression).into_owned();
        assert_eq!(
            &*record::from_disk(&packed).unwrap(),
            &plain[..],
            "{compression:?}"
        );
    }
    // What is compressed: three texts gone (36 bytes each; the presence
    // event and "no id here" have none), an offset (4 bytes) per entry.
    let stripped = record::ids_stripped_len(&plain);
    assert_eq!(stripped, plain.len() - HEADER_LEN - 3 * 36 + 5 * 4);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Any entries, with or without their messageId's text anywhere in
    /// the payload, come back from disk as they were given.
    #[test]
    fn compressed_records_give_back_any_entries(
        entries in proptest::collection::vec(
            (
                proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                proptest::num::u128::ANY,
                proptest::collection::vec(proptest::num::u8::ANY, 0..120),
                proptest::option::of(0usize..120),
                proptest::bool::ANY,
            ),
            1..12,
        )
    ) {
        let mut b = AppendBatch::new();
        for (key, id, mut payload, text_at, presence) in entries {
            let id = Uuid::from_u128(id);
            if let Some(at) = text_at {
                let at = at.min(payload.len());
                let text = id.hyphenated().to_string();
                payload.splice(at..at, text.bytes());
            }
            if presence {
                b.push_presence(&key, &id, &payload);
            } else {
                b.push(&key, &id, |out| out.extend_from_slice(&payload));
            }
        }
        let plain = b.seal();
        // Random payloads rarely compress (then the record is stored as
        // version 1): the messageId step is checked on its own too.
        let restored = record::ids_stripped_and_restored(&plain);
        proptest::prop_assert_eq!(restored.as_deref(), Some(&plain[HEADER_LEN..]));
        for compression in [Compression::Zstd, Compression::Lz4] {
            let packed = record::for_disk(&plain, compression).into_owned();
            proptest::prop_assert_eq!(&*record::from_disk(&packed).unwrap(), &plain[..]);
        }
    }
}

/// A process killed while sled wrote a snapshot leaves an empty
/// `snap.*.generating`, which sled 0.34 takes for the newest snapshot and
/// then refuses the store: it is removed before sled opens the generation
/// (found by the crash loop: 88 acked requests moved aside with their store).
#[test]
fn an_unfinished_sled_snapshot_does_not_cost_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _, _) = open(dir.path(), 1 << 30);
        let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
        let task = smol::spawn(writer);
        smol::block_on(appender.append(batch(&[1, 2]))).unwrap();
        drop(appender);
        smol::block_on(task);
    }
    let generation = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && std::fs::read_dir(p).unwrap().count() > 0)
        .unwrap();
    std::fs::write(generation.join("snap.FFFFFFFFFFFFFFFF.generating"), b"").unwrap();
    let (store, _, metrics) = open(dir.path(), 1 << 30);
    assert_eq!(drain(&store), vec![1, 2]);
    assert_eq!(metrics.outbox_store_recoveries.load(Relaxed), 0);
    assert!(!generation.join("snap.FFFFFFFFFFFFFFFF.generating").exists());
}

/// Appends every `gap`, each awaited on its own task, as devices at a hub's
/// rate would; returns once all are answered.
async fn trickle(appender: &Appender, ids: std::ops::Range<u128>, gap: Duration) {
    let mut tasks = Vec::new();
    for id in ids {
        let appender = appender.clone();
        tasks.push(smol::spawn(async move {
            appender.append(batch(&[id])).await.unwrap()
        }));
        smol::Timer::after(gap).await;
    }
    for t in tasks {
        t.await;
    }
}

#[test]
fn kafka_silent_past_the_spill_delay_makes_few_large_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, metrics) = open(dir.path(), 1 << 30);
    let spill_after = Duration::from_millis(40);
    let (appender, writer) = start_writer(store.clone(), Duration::from_millis(1), spill_after);
    let task = smol::spawn(writer);
    // Nothing confirms: the first record is spilled when due, then the
    // writer gathers for up to `spill_after` and writes at once.
    smol::block_on(trickle(&appender, 0..60, Duration::from_millis(2)));
    assert_eq!(metrics.outbox_outages.load(Relaxed), 1);
    let flushes = metrics.outbox_flushes.load(Relaxed);
    // One by one they would take one flush each, or nearly.
    assert!(flushes <= 12, "{flushes} flushes for 60 appends");
    // A confirmation ends the outage mode: the next unconfirmed record is
    // spilled when due again, which starts a second one.
    store.confirmations.fetch_add(1, Relaxed);
    smol::block_on(trickle(&appender, 60..61, Duration::ZERO));
    assert_eq!(metrics.outbox_outages.load(Relaxed), 2);
    drop(appender);
    smol::block_on(task);
    assert_eq!(drain(&store), (0..61).collect::<Vec<_>>());
}

#[test]
fn a_request_behind_the_first_spilled_one_is_answered_without_more_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, metrics) = open(dir.path(), 1 << 30);
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::from_millis(40));
    let task = smol::spawn(writer);
    // Nothing confirms and nothing else arrives: the second request is not
    // due when the first is spilled, and must not wait for another append.
    let answered = smol::block_on(async {
        let first = smol::spawn({
            let appender = appender.clone();
            async move { appender.append(batch(&[1])).await }
        });
        smol::Timer::after(Duration::from_millis(10)).await;
        let second = smol::spawn({
            let appender = appender.clone();
            async move { appender.append(batch(&[2])).await }
        });
        smol::future::or(async { Some((first.await, second.await)) }, async {
            smol::Timer::after(Duration::from_secs(5)).await;
            None
        })
        .await
    });
    let (first, second) = answered.expect("both answered within 5 s");
    assert!(first.is_ok() && second.is_ok());
    assert_eq!(metrics.outbox_outages.load(Relaxed), 1);
    drop(appender);
    smol::block_on(task);
    assert_eq!(drain(&store), vec![1, 2]);
}

#[test]
fn the_producer_waits_out_a_group_commit_of_its_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = open(dir.path(), 1 << 30);
    let (appender, writer) = start_writer(store.clone(), Duration::ZERO, Duration::ZERO);
    let task = smol::spawn(writer);
    smol::block_on(appender.append(batch(&[1]))).unwrap();
    drop(appender);
    smol::block_on(task);
    // A commit in progress: sled must see no read or removal of the
    // producer's until it has synced (see `Generation::committing`).
    let generation = store.active();
    let committing = generation.committing();
    let (done_tx, done) = std::sync::mpsc::channel();
    let producer = std::thread::spawn({
        let store = store.clone();
        move || {
            let (seq, value) = store.next_batch(0, None).unwrap().expect("on disk");
            done_tx.send("read").unwrap();
            store.remove(seq, ids(&value).len() as u32).unwrap();
            done_tx.send("removed").unwrap();
        }
    });
    assert!(
        done.recv_timeout(Duration::from_millis(200)).is_err(),
        "the producer read during a commit"
    );
    drop(committing);
    assert_eq!(done.recv_timeout(Duration::from_secs(5)), Ok("read"));
    assert_eq!(done.recv_timeout(Duration::from_secs(5)), Ok("removed"));
    producer.join().unwrap();
    assert!(drain(&store).is_empty());
}
