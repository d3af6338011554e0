//! Damage to the outbox on disk between two runs: bytes flipped in the
//! middle of the store's log, or the log cut short. The gateway must start,
//! keep running, deliver what it can read back, and never lose an
//! acknowledged request without counting it (in
//! `edgegate_outbox_lost_batches_total`, `..._corrupt_batches_total` or
//! `..._store_recoveries_total`).

mod common;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::json;

/// A file of every generation of the outbox (`db`: sled's log; `conf`: its
/// settings).
fn store_files(data_dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir.join("outbox"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn run_case(what: &str, file: &str, damage: impl Fn(&Path)) {
    let broker = Broker::start();
    let (up, down) = broker.fresh_topics(1, 1);
    let mut gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    broker.proxy.cut();
    let mut d = gw.device();
    let acked = send_numbered(&mut d, "dev-c", 0, 3000, 300);
    gw.kill();
    drop(d);
    let damaged = store_files(&gw.data_dir, file);
    assert!(!damaged.is_empty(), "no outbox {file} found");
    for log in &damaged {
        damage(log);
    }
    broker.proxy.restore();
    gw.restart();
    gw.wait_metric("edgegate_outbox_records", |v| v == 0.0);
    // Still up, not crash-looping, and still taking requests.
    std::thread::sleep(Duration::from_secs(1));
    let mut d = gw.device();
    let after = ack_id(&d.request("seq", "after", Some("dev-c"), json!({})));
    let records = read_topic(&broker.addr(), &up, 1, usize::MAX, Duration::from_secs(10));
    let delivered: HashSet<String> = records
        .iter()
        .map(|r| r.payload["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        delivered.contains(&after),
        "a request after the restart was not delivered"
    );
    let missing = acked
        .iter()
        .filter(|(id, _, _)| !delivered.contains(id))
        .count();
    let m = gw.metrics();
    let counted = m["edgegate_outbox_lost_batches_total"]
        + m["edgegate_outbox_corrupt_batches_total"]
        + m["edgegate_outbox_store_recoveries_total"];
    eprintln!(
        "{what}: {} acked, {} delivered, {missing} missing; counted: {} lost batches, {} corrupt batches, {} stores moved aside",
        acked.len(),
        acked.len() - missing,
        m["edgegate_outbox_lost_batches_total"],
        m["edgegate_outbox_corrupt_batches_total"],
        m["edgegate_outbox_store_recoveries_total"],
    );
    assert!(
        missing == 0 || counted > 0.0,
        "{what}: {missing} acknowledged requests were lost and nothing counted it:\n{}",
        gw.log()
    );
    // A store moved aside is kept for an operator, and said so in the log.
    if m["edgegate_outbox_store_recoveries_total"] > 0.0 {
        let kept = std::fs::read_dir(gw.data_dir.join("outbox"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".broken-"));
        assert!(kept, "the damaged store was not kept aside");
        assert!(
            gw.log().contains("is damaged and cannot be read"),
            "{}",
            gw.log()
        );
    }
    // Every record in the topic is one the gateway acked (nothing garbled).
    let acked_ids: HashSet<&String> = acked.iter().map(|(id, _, _)| id).collect();
    for r in &records {
        let id = r.payload["messageId"].as_str().unwrap().to_owned();
        assert!(
            id == after || acked_ids.contains(&id),
            "unknown record {}",
            r.payload
        );
    }
}

#[test]
fn flipped_bytes_in_the_log_are_survived_and_counted() {
    run_case("flipped bytes", "db", |log| {
        let file = std::fs::OpenOptions::new().write(true).open(log).unwrap();
        let len = file.metadata().unwrap().len();
        let garbage: Vec<u8> = (0..512u32).map(|i| (i * 7 + 13) as u8).collect();
        file.write_all_at(&garbage, len / 2).unwrap();
    });
}

#[test]
fn a_log_cut_short_is_survived_and_counted() {
    run_case("log cut in half", "db", |log| {
        let file = std::fs::OpenOptions::new().write(true).open(log).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len / 2).unwrap();
    });
}

#[test]
fn a_store_sled_cannot_open_is_moved_aside_and_counted() {
    run_case("unreadable store settings", "conf", |conf| {
        std::fs::write(conf, b"\xff\xfe not sled's settings \x00").unwrap();
    });
}
