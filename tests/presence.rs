//! Presence events against the real broker (PROTOCOL 6.2): connected when
//! a connection is bound, disconnected with the reason when it ends, in the
//! order they happened, keyed by deviceUid, at least once across an outage.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::tokens::*;
use common::*;
use serde_json::Value;

/// (event, clientId, reason) of each device, in the order read.
fn by_device(records: &[Record]) -> HashMap<String, Vec<(String, String, String)>> {
    let mut out: HashMap<String, Vec<_>> = HashMap::new();
    for r in records {
        let p = &r.payload;
        let device = p["deviceUid"].as_str().unwrap().to_owned();
        assert_eq!(r.key, device.as_bytes(), "keyed by deviceUid: {p}");
        assert!(r.headers.contains_key("message-id"), "{p}");
        out.entry(device).or_default().push((
            p["event"].as_str().unwrap().to_owned(),
            p["clientId"].as_str().unwrap().to_owned(),
            p["reason"].as_str().unwrap_or("").to_owned(),
        ));
    }
    out
}

fn events(list: &[(String, String, String)]) -> Vec<(&str, &str)> {
    list.iter()
        .map(|(e, _, r)| (e.as_str(), r.as_str()))
        .collect()
}

#[test]
fn every_way_a_connection_ends_has_its_event_in_order() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let presence = unique("presence");
    broker.create_topic(&presence, 1);
    let mut t = token_gateway(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_SERVER_ID", "gw-p")
            .env("EDGEGATE_KAFKA_PRESENCE_TOPIC", &presence)
            .env("EDGEGATE_LISTENER_IDLE_TIMEOUT_SECS", 2),
    );
    // Idle: nothing sent after authenticating.
    let mut idle = t.authenticated("dev-idle");
    assert!(idle.closed_within(Duration::from_secs(10)));
    // Taken over by a second connection of the same device.
    let mut first = t.authenticated("dev-twice");
    let mut second = t.authenticated("dev-twice");
    assert!(first.closed_within(Duration::from_secs(5)));
    // Closed by the device.
    let closer = t.authenticated("dev-close");
    drop(closer);
    // Revoked.
    let mut revoked = t.authenticated("dev-revoked");
    t.set_revoked("dev-revoked\n");
    assert!(revoked.closed_within(Duration::from_secs(10)));
    // Connected at shutdown.
    let _staying = t.authenticated("dev-stay");
    second.send(r#"{"action":"ping","uid":"p"}"#);
    let _ = second.json();
    t.gw.signal("TERM");
    assert_eq!(t.gw.wait_exit(Duration::from_secs(30)), Some(0));

    let records = read_topic(&broker.addr(), &presence, 1, 12, WAIT);
    assert_eq!(records.len(), 12);
    let seen = by_device(&records);
    assert_eq!(
        events(&seen["dev-idle"]),
        [("connected", ""), ("disconnected", "idle")]
    );
    assert_eq!(
        events(&seen["dev-close"]),
        [("connected", ""), ("disconnected", "closed")]
    );
    assert_eq!(
        events(&seen["dev-revoked"]),
        [("connected", ""), ("disconnected", "revoked")]
    );
    assert_eq!(
        events(&seen["dev-stay"]),
        [("connected", ""), ("disconnected", "shutdown")]
    );
    let twice = &seen["dev-twice"];
    assert_eq!(
        events(twice),
        [
            ("connected", ""),
            ("disconnected", "taken_over"),
            ("connected", ""),
            ("disconnected", "shutdown")
        ]
    );
    // Each connection's own clientId on its pair of events.
    assert_eq!(twice[0].1, twice[1].1);
    assert_eq!(twice[2].1, twice[3].1);
    assert_ne!(twice[0].1, twice[2].1);
    let p = &records[0].payload;
    assert_eq!(
        (&p["serverId"], &p["replyTopic"]),
        (&Value::from("gw-p"), &Value::Null)
    );
    assert!(p["at"].as_str().unwrap().ends_with('Z'), "{p}");
}

#[test]
fn events_made_during_an_outage_arrive_after_it() {
    let broker = Broker::start();
    let (up, down) = broker.fresh_topics(1, 1);
    let presence = unique("presence");
    broker.create_topic(&presence, 1);
    let t = token_gateway(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_KAFKA_PRESENCE_TOPIC", &presence),
    );
    broker.proxy.cut();
    for i in 0..5 {
        let d = t.authenticated(&format!("dev-{i}"));
        drop(d);
    }
    t.gw.wait_metric("edgegate_presence_events_total", |v| v >= 10.0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(t.gw.metric("edgegate_kafka_delivered_total"), 0.0);
    broker.proxy.restore();
    let records = read_topic(&broker.addr(), &presence, 1, 10, WAIT);
    let seen = by_device(&records);
    for i in 0..5 {
        assert_eq!(
            events(&seen[&format!("dev-{i}")]),
            [("connected", ""), ("disconnected", "closed")]
        );
    }
}
