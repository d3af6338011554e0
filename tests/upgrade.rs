//! An outbox written by edgegate 0.1.0 (uncompressed records, format
//! version 1) is replayed completely by this build, in order.
//!
//! `tests/fixtures/outbox-0.1.0/` was made by the 0.1.0 binary (commit
//! b7e8a0c) with its broker unreachable: 60 requests acked on one
//! connection (uids fx-0 to fx-59, deviceUids dev-0 to dev-2, serverId
//! fixture-0.1.0), then SIGTERM.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn an_outbox_written_by_0_1_0_is_replayed_in_full() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/outbox-0.1.0");
    copy_dir(&fixture, &data);
    let mut opts = GatewayOptions::new(broker.addr()).topics(&up, &down);
    opts.data_dir = Some(data);
    let gw = Gateway::start(opts);
    gw.wait_drained();
    let records = read_topic(&broker.addr(), &up, 1, 60, Duration::from_secs(30));
    let uids: Vec<String> = records
        .iter()
        .map(|r| {
            r.payload["deviceRequest"]["uid"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    let expected: Vec<String> = (0..60).map(|i| format!("fx-{i}")).collect();
    assert_eq!(uids, expected, "{}", gw.log());
    assert!(records
        .iter()
        .all(|r| r.payload["serverId"] == "fixture-0.1.0"));
    assert_eq!(gw.metric("edgegate_outbox_lost_batches_total"), 0.0);
    assert_eq!(gw.metric("edgegate_outbox_corrupt_batches_total"), 0.0);
}

/// `outbox.compression` can change between runs: records written under
/// lz4, then zstd, are replayed in full and in order by a gateway set to
/// store them uncompressed.
#[test]
fn records_written_under_each_compression_are_replayed_in_order() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut sent = 0;
    for codec in ["lz4", "zstd"] {
        let mut opts = GatewayOptions::offline().env("EDGEGATE_OUTBOX_COMPRESSION", codec);
        opts.data_dir = Some(data.clone());
        let mut gw = Gateway::start(opts);
        let mut d = gw.device();
        for _ in 0..20 {
            let payload = serde_json::json!({"t": 21.5, "codec": codec});
            ack_id(&d.request("telemetry", &format!("c-{sent}"), None, payload));
            sent += 1;
        }
        assert_eq!(gw.metric("edgegate_outbox_records"), sent as f64, "{codec}");
        gw.kill();
    }
    let mut opts = GatewayOptions::new(broker.addr())
        .topics(&up, &down)
        .env("EDGEGATE_OUTBOX_COMPRESSION", "none");
    opts.data_dir = Some(data);
    let gw = Gateway::start(opts);
    gw.wait_drained();
    let records = read_topic(&broker.addr(), &up, 1, sent, Duration::from_secs(30));
    let uids: Vec<&str> = records
        .iter()
        .map(|r| r.payload["deviceRequest"]["uid"].as_str().unwrap_or("?"))
        .collect();
    let expected: Vec<String> = (0..sent).map(|i| format!("c-{i}")).collect();
    assert_eq!(uids, expected, "{}", gw.log());
    assert_eq!(gw.metric("edgegate_outbox_corrupt_batches_total"), 0.0);
}
