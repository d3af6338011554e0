use super::*;

fn limits() -> HoldLimits {
    HoldLimits {
        ttl: Duration::from_secs(3600),
        max_per_device: 1000,
        max_bytes: 1 << 20,
    }
}

fn open(dir: &Path, limits: HoldLimits) -> (Hold, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (Hold::open(dir, limits, metrics.clone()).unwrap(), metrics)
}

fn lines(released: Vec<(u64, Vec<u8>)>) -> Vec<String> {
    released
        .into_iter()
        .map(|(_, l)| String::from_utf8(l).unwrap())
        .collect()
}

/// The one hold file in `dir`.
fn only_file(dir: &Path) -> PathBuf {
    let mut files = std::fs::read_dir(dir).unwrap();
    let file = files.next().unwrap().unwrap().path();
    assert!(files.next().is_none());
    file
}

fn put(h: &Hold, device: &str, line: &str) {
    h.put(device, line.as_bytes(), Receipt::untracked())
        .unwrap();
}

#[test]
fn held_messages_survive_a_restart_in_order_per_device() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (h, _) = open(dir.path(), limits());
        for i in 0..5 {
            put(&h, "dev-a", &format!("a{i}"));
            put(&h, "dev-b", &format!("b{i}"));
        }
        h.sync().unwrap();
    }
    let (h, m) = open(dir.path(), limits());
    assert_eq!(h.len(), 10);
    assert_eq!(m.hold_messages.load(Relaxed), 10);
    let a = h.release("dev-a").unwrap();
    assert_eq!(lines(a.clone()), ["a0", "a1", "a2", "a3", "a4"]);
    // Released and not written: a second release gives nothing new.
    assert!(h.release("dev-a").unwrap().is_empty());
    // Two written, then the connection closes: the rest comes again.
    h.written("dev-a", a[1].0).unwrap();
    h.returned("dev-a");
    assert_eq!(lines(h.release("dev-a").unwrap()), ["a2", "a3", "a4"]);
    h.written("dev-a", a[4].0).unwrap();
    assert_eq!(h.len(), 5);
    drop(h);
    // What was written stays gone; the file of dev-a is gone.
    let (h, _) = open(dir.path(), limits());
    assert!(h.release("dev-a").unwrap().is_empty());
    assert_eq!(
        lines(h.release("dev-b").unwrap()),
        ["b0", "b1", "b2", "b3", "b4"]
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn each_bound_drops_the_oldest_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (h, m) = open(
        dir.path(),
        HoldLimits {
            max_per_device: 3,
            max_bytes: 20,
            ..limits()
        },
    );
    for i in 0..5 {
        put(&h, "dev-a", &format!("a{i}"));
    }
    assert_eq!(lines(h.release("dev-a").unwrap()), ["a2", "a3", "a4"]);
    h.returned("dev-a");
    assert_eq!(
        m.hold_dropped[HoldDrop::PerDevice as usize].load(Relaxed),
        2
    );
    // 6 bytes held; 10 more devices with 2 bytes each: past 20 bytes the
    // oldest overall (dev-a's) go first.
    for i in 0..10 {
        put(&h, &format!("dev-{i}"), &format!("b{i}"));
    }
    assert_eq!(m.hold_dropped[HoldDrop::Bytes as usize].load(Relaxed), 3);
    assert!(h.release("dev-a").unwrap().is_empty());
    assert_eq!(m.hold_bytes.load(Relaxed), 20);
    drop(h);

    // The TTL: everything older is dropped on the next look.
    let (h, m) = open(
        dir.path(),
        HoldLimits {
            ttl: Duration::ZERO,
            ..limits()
        },
    );
    assert!(h.release("dev-0").unwrap().is_empty());
    assert_eq!(m.hold_dropped[HoldDrop::Expired as usize].load(Relaxed), 10);
    assert_eq!(h.len(), 0);
}

#[test]
fn a_torn_tail_is_cut_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (h, _) = open(dir.path(), limits());
        put(&h, "dev-a", "first");
        put(&h, "dev-a", "second");
        h.sync().unwrap();
    }
    let file = only_file(dir.path());
    let mut bytes = std::fs::read(&file).unwrap();
    let len = bytes.len();
    bytes[len - 1] ^= 1; // the last record's crc no longer holds
    bytes.extend_from_slice(&[7, 0, 0]); // and half a header after it
    std::fs::write(&file, bytes).unwrap();
    let (h, _) = open(dir.path(), limits());
    assert_eq!(lines(h.release("dev-a").unwrap()), ["first"]);
}

#[test]
fn receipts_wait_for_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _) = open(dir.path(), limits());
    let receipts = Arc::new(crate::routing::receipt::Receipts::default());
    let r = receipts.issue("t", 0, 5);
    h.put("dev-a", b"x", r).unwrap();
    assert_eq!(receipts.safe_offsets(), vec![]);
    h.sync().unwrap();
    assert_eq!(receipts.safe_offsets(), vec![(Arc::from("t"), 0, 6)]);
}

#[test]
fn a_mostly_dead_file_is_rewritten_without_losing_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _) = open(dir.path(), limits());
    let line = "y".repeat(1000);
    for _ in 0..100 {
        put(&h, "dev-a", &line);
    }
    put(&h, "dev-a", "last");
    let all = h.release("dev-a").unwrap();
    h.written("dev-a", all[99].0).unwrap();
    let file = only_file(dir.path());
    // 101 KB written; rewritten once the dead prefix passed 64 KiB and half.
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size < 50_000, "not compacted: {size} bytes");
    h.returned("dev-a");
    assert_eq!(lines(h.release("dev-a").unwrap()), ["last"]);
    drop(h);
    let (h, _) = open(dir.path(), limits());
    assert_eq!(lines(h.release("dev-a").unwrap()), ["last"]);
}
