//! Device → Kafka against a real broker: the ServerRequest envelope, its key
//! and header (PROTOCOL 2.1), and per-connection order.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::{json, Value};

#[test]
fn envelope_key_and_header_follow_the_contract() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let gw = Gateway::start(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_SERVER_ID", "gw-test-1"),
    );
    let mut d = gw.device();
    let with_device = ack_id(&d.request(
        "telemetry",
        "req-1",
        Some("dev-42"),
        json!({"t": 21.5, "s": "é\n"}),
    ));
    let anonymous = ack_id(&d.request("status", "req-2", None, Value::Null));

    let records = read_topic(&broker.addr(), &up, 1, 2, WAIT);
    assert_eq!(records.len(), 2, "both acked requests reach Kafka");
    let (a, b) = (&records[0], &records[1]);

    assert_eq!(
        a.payload["deviceRequest"],
        json!({"action":"telemetry","deviceUid":"dev-42","uid":"req-1","data":{"t":21.5,"s":"é\n"}})
    );
    assert_eq!(a.payload["serverId"], "gw-test-1");
    let client_id = a.payload["clientId"].as_str().unwrap();
    uuid::Uuid::parse_str(client_id).unwrap();
    assert_eq!(a.payload["deviceUid"], Value::Null, "not bound yet");
    assert_eq!(a.payload["messageId"], with_device.as_str());
    let received = a.payload["receivedAt"].as_str().unwrap();
    assert_eq!(received.len(), 24, "{received}");
    assert!(
        received.ends_with('Z') && received.as_bytes()[10] == b'T',
        "{received}"
    );
    assert_eq!(a.key, b"dev-42", "key: claimed deviceUid");
    assert_eq!(a.headers["message-id"], with_device.as_bytes());

    assert_eq!(
        b.payload["deviceRequest"],
        json!({"action":"status","deviceUid":null,"uid":"req-2","data":null})
    );
    assert_eq!(
        b.payload["clientId"], client_id,
        "same connection, same clientId"
    );
    assert_eq!(
        b.key,
        client_id.as_bytes(),
        "key: clientId when no deviceUid"
    );
    assert_eq!(b.headers["message-id"], anonymous.as_bytes());
    gw.wait_metric("edgegate_outbox_records", |v| v == 0.0);
    assert!(gw.metric("edgegate_kafka_delivered_total") >= 2.0);
    assert!(gw.metric("edgegate_kafka_delivery_seconds_count") >= 2.0);
    assert!(gw.metric("edgegate_ack_seconds_count") >= 2.0);
    gw.wait_metric("edgegate_kafka_broker_connected", |v| v == 1.0);
}

#[test]
fn pipelined_requests_of_each_connection_stay_in_order() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(3, 1);
    let gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    const DEVICES: usize = 6;
    const EACH: usize = 300;
    let port = gw.port;
    let threads: Vec<_> = (0..DEVICES)
        .map(|n| {
            std::thread::spawn(move || {
                let mut d = Device::connect(port);
                let mut burst = String::new();
                for i in 0..EACH {
                    burst.push_str(&format!(
                        "{{\"action\":\"seq\",\"uid\":\"{i}\",\"deviceUid\":\"dev-{n}\",\"data\":{i}}}\n"
                    ));
                }
                d.send_raw(burst.as_bytes());
                (0..EACH)
                    .map(|i| {
                        let r = d.json();
                        assert_eq!(r["uid"], i.to_string(), "replies in order");
                        ack_id(&r)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let acked: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let records = read_topic(&broker.addr(), &up, 3, acked.len(), WAIT);
    assert_eq!(records.len(), acked.len());
    let mut by_device: HashMap<String, Vec<(i32, i64, u64)>> = HashMap::new();
    for r in &records {
        let dev = String::from_utf8(r.key.clone()).unwrap();
        let seq = r.payload["deviceRequest"]["data"].as_u64().unwrap();
        by_device
            .entry(dev)
            .or_default()
            .push((r.partition, r.offset, seq));
    }
    assert_eq!(by_device.len(), DEVICES);
    for (dev, mut rows) in by_device {
        assert!(
            rows.iter().all(|r| r.0 == rows[0].0),
            "{dev} spans partitions"
        );
        rows.sort();
        let seqs: Vec<u64> = rows.iter().map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (0..EACH as u64).collect::<Vec<_>>(),
            "{dev} out of order"
        );
    }
}

#[test]
fn server_id_is_generated_once_and_kept() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let mut gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    let kept = std::fs::read_to_string(gw.data_dir.join("server_id")).unwrap();
    ack_id(&gw.device().request("a", "1", None, Value::Null));
    gw.restart();
    ack_id(&gw.device().request("a", "2", None, Value::Null));
    let records = read_topic(&broker.addr(), &up, 1, 2, WAIT);
    assert_eq!(records.len(), 2);
    for r in records {
        assert_eq!(r.payload["serverId"], kept.trim());
    }
    uuid::Uuid::parse_str(kept.trim()).unwrap();
}
