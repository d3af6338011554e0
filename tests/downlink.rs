//! Kafka → devices against a real broker: routing by clientId and deviceUid,
//! connect.response binding, takeover, spoofing, the serverId filter and
//! garbage records (PROTOCOL 1.4, 2.2).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Setup {
    gw: Gateway,
    up: String,
    down: String,
    brokers: String,
    producer: rdkafka::producer::BaseProducer,
}

fn setup(server_id: &str) -> Setup {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 2);
    let gw = Gateway::start(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_SERVER_ID", server_id)
            // tansu takes about half the session timeout to form a group.
            .env("EDGEGATE_KAFKA_CONSUMER_GROUP_ID", unique("group")),
    );
    gw.wait_consumer();
    Setup {
        gw,
        up,
        down,
        brokers: broker.addr(),
        producer: producer(&broker.addr()),
    }
}

impl Setup {
    /// A connected device, its clientId, with downlink proven to flow.
    fn device(&self) -> (Device, String) {
        let mut d = self.gw.device();
        let client = client_id_of(&mut d, &self.brokers, &self.up);
        wait_downlink(&mut d, &self.producer, &self.down, &client);
        (d, client)
    }

    fn send(&self, client: Option<&str>, device: Option<&str>, body: Value) {
        produce(
            &self.producer,
            &self.down,
            &[server_response(client, device, body)],
        );
    }
}

#[test]
fn binding_routes_by_device_and_refuses_spoofing() {
    let s = setup("gw-bind");
    let (mut d, client) = s.device();

    // By clientId, written exactly as the worker wrote deviceResponse.
    let connect = json!({"action":"connect.response","uid":"c1","status":"ok","data":{"n":1},"errorCode":"","errorMessage":""});
    s.send(Some(&client), Some("dev-1"), connect.clone());
    assert_eq!(d.json(), connect);

    // Bound: a request claiming another device is refused, its own accepted.
    let r = d.request("t", "spoof", Some("dev-2"), Value::Null);
    assert_eq!(
        (r["errorCode"].as_str(), r["uid"].as_str()),
        (Some("unauthorized"), Some("spoof"))
    );
    let own = ack_id(&d.request("t", "own", Some("dev-1"), Value::Null));
    let silent = ack_id(&d.request("t", "no-claim", None, Value::Null));

    // By deviceUid alone.
    s.send(
        None,
        Some("dev-1"),
        json!({"action":"notice","uid":"n1","status":"ok"}),
    );
    assert_eq!(d.json()["uid"], "n1");

    // The envelopes carry the bound deviceUid, which is also the key.
    let records = read_topic(&s.brokers, &s.up, 1, 3, WAIT);
    for id in [&own, &silent] {
        let r = records
            .iter()
            .find(|r| r.payload["messageId"] == id.as_str())
            .expect("acked request in Kafka");
        assert_eq!(r.payload["deviceUid"], "dev-1");
        assert_eq!(r.key, b"dev-1");
    }
    assert!(records
        .iter()
        .all(|r| r.payload["deviceRequest"]["uid"] != "spoof"));
}

#[test]
fn failed_connect_response_binds_nothing() {
    let s = setup("gw-nobind");
    let (mut d, client) = s.device();
    s.send(
        Some(&client),
        Some("dev-x"),
        json!({"action":"connect.response","uid":"c","status":"error"}),
    );
    assert_eq!(d.json()["status"], "error");
    // Not bound: any deviceUid is accepted, and deviceUid routing does not
    // find this connection (the message is held for a device that binds).
    ack_id(&d.request("t", "u", Some("dev-other"), Value::Null));
    let before = s.gw.metric("edgegate_downlink_held_total");
    s.send(None, Some("dev-x"), json!({"action":"lost","status":"ok"}));
    s.gw.wait_metric("edgegate_downlink_held_total", |v| v > before);
    d.set_timeout(Duration::from_millis(500));
    assert_eq!(
        d.line(),
        None,
        "an unbound connection got a device's message"
    );
}

#[test]
fn newer_binding_takes_over_the_device() {
    let s = setup("gw-takeover");
    let (mut old, old_client) = s.device();
    let (mut new, new_client) = s.device();
    let ok = |uid: &str| json!({"action":"connect.response","uid":uid,"status":"ok"});
    s.send(Some(&old_client), Some("dev-t"), ok("first"));
    assert_eq!(old.json()["uid"], "first");
    s.send(Some(&new_client), Some("dev-t"), ok("second"));
    assert_eq!(new.json()["uid"], "second");
    assert!(
        old.closed_within(Duration::from_secs(10)),
        "the older connection is closed"
    );
    s.send(
        None,
        Some("dev-t"),
        json!({"action":"notice","uid":"after","status":"ok"}),
    );
    assert_eq!(new.json()["uid"], "after");
    assert!(s.gw.metric("edgegate_connections_taken_over_total") >= 1.0);
}

#[test]
fn other_servers_and_garbage_records_are_skipped_without_stopping() {
    let s = setup("gw-filter");
    let (mut d, client) = s.device();
    let mut for_other = json!({"deviceResponse":{"action":"x","uid":"other"},"clientId":client,"serverId":"gw-else"});
    let garbage: Vec<Vec<u8>> = vec![
        b"not json at all".to_vec(),
        b"{}".to_vec(),
        br#"{"deviceResponse":"a string"}"#.to_vec(),
        br#"{"deviceResponse":null,"clientId":"x"}"#.to_vec(),
        vec![0xff, 0x00, 0x13],
        for_other.to_string().into_bytes(),
    ];
    produce(&s.producer, &s.down, &garbage);
    for_other["serverId"] = json!("gw-filter");
    for_other["deviceResponse"]["uid"] = json!("mine");
    produce(&s.producer, &s.down, &[for_other.to_string().into_bytes()]);
    // Pretty-printed JSON from a worker still arrives as one line.
    let pretty = format!(
        "{{\n \"deviceResponse\": {{\n  \"action\": \"x\",\n  \"uid\": \"pretty\"\n }},\n \"clientId\": \"{client}\"\n}}"
    );
    produce(&s.producer, &s.down, &[pretty.into_bytes()]);
    // The partitions may interleave: collect both.
    let mut got = vec![
        d.json()["uid"].as_str().unwrap().to_owned(),
        d.json()["uid"].as_str().unwrap().to_owned(),
    ];
    got.sort();
    assert_eq!(got, ["mine", "pretty"]);
    s.gw.wait_metric("edgegate_downlink_malformed_total", |v| v >= 5.0);
    assert_eq!(s.gw.metric("edgegate_downlink_other_server_total"), 1.0);
}

#[test]
fn offsets_resume_after_a_restart_even_on_untouched_partitions() {
    let mut s = setup("gw-resume");
    let (mut d, client) = s.device();
    // Only partition 0 sees traffic before the restart.
    let live = server_response(Some(&client), None, json!({"action":"x","uid":"live"}));
    produce_to(&s.producer, &s.down, Some(0), &[live]);
    assert_eq!(d.json()["uid"], "live");
    // Let auto-commit store the handled offsets, then stop cleanly.
    std::thread::sleep(Duration::from_millis(1500));
    s.gw.signal("TERM");
    assert_eq!(s.gw.wait_exit(Duration::from_secs(20)), Some(0));
    drop(d);
    // Sent while the gateway is down, to both partitions: the restarted
    // gateway must read all of them, including partition 1's, which had no
    // record (and so no offset of its own) before.
    for partition in [0, 1] {
        let away: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                server_response(
                    None,
                    Some("dev-away"),
                    json!({"action":"x","uid":format!("away-{partition}-{i}")}),
                )
            })
            .collect();
        produce_to(&s.producer, &s.down, Some(partition), &away);
    }
    s.gw.restart();
    s.gw.wait_metric("edgegate_downlink_held_total", |v| v >= 10.0);
    // The device comes back and is bound again: it gets what was sent to it
    // while the gateway was down, each partition's messages in order.
    let (mut back, client) = s.device();
    s.send(
        Some(&client),
        Some("dev-away"),
        json!({"action":"connect.response","uid":"again","status":"ok"}),
    );
    assert_eq!(back.json()["uid"], "again");
    let mut got: Vec<String> = (0..10)
        .map(|_| back.json()["uid"].as_str().unwrap().to_owned())
        .collect();
    for partition in [0, 1] {
        let mine: Vec<&String> = got
            .iter()
            .filter(|u| u.starts_with(&format!("away-{partition}-")))
            .collect();
        let want: Vec<String> = (0..5).map(|i| format!("away-{partition}-{i}")).collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>(), "{got:?}");
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 10);
    assert_eq!(s.gw.metric("edgegate_downlink_held_released_total"), 10.0);
}

/// A deviceUid from the backend holding a newline and a terminal escape
/// cannot forge or colour a log line: the router's "moved" line escapes it.
#[test]
fn hostile_device_uids_from_the_backend_are_escaped_in_the_log() {
    let s = setup("gw-escape");
    let (mut a, client_a) = s.device();
    let (mut b, client_b) = s.device();
    let device = "dev-x\nERROR forged line \u{1b}[31m";
    let ok = json!({"action":"connect.response","uid":"c","status":"ok"});
    s.send(Some(&client_a), Some(device), ok.clone());
    assert_eq!(a.json()["uid"], "c");
    s.send(Some(&client_b), Some(device), ok); // takes the binding over
    assert_eq!(b.json()["uid"], "c");
    let deadline = std::time::Instant::now() + WAIT;
    while !s.gw.log().contains("moved to connection") {
        assert!(std::time::Instant::now() < deadline, "{}", s.gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.gw.log();
    assert!(
        log.contains("dev-x\\nERROR forged line \\u{1b}[31m"),
        "{log}"
    );
    assert!(!log.lines().any(|l| l.starts_with("ERROR forged")), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
}

#[test]
fn a_device_that_never_stops_sending_still_gets_its_downlink() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;
    use std::time::Instant;
    let s = setup("gw-busy");
    let (d, client) = s.device();
    // Requests every 2 ms, faster than acks come back (tens of ms): the
    // gateway always has input from this device waiting.
    let mut writer = d.stream.try_clone().unwrap();
    let sending = Arc::new(AtomicBool::new(true));
    let flag = sending.clone();
    let flood = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(6);
        let mut n = 0;
        while Instant::now() < until {
            let line = format!("{{\"action\":\"t\",\"uid\":\"f{n}\"}}\n");
            if writer.write_all(line.as_bytes()).is_err() {
                break;
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        flag.store(false, Relaxed);
    });
    let mut d = d;
    std::thread::sleep(Duration::from_secs(1));
    s.send(
        Some(&client),
        None,
        json!({"action":"notice","uid":"busy","status":"ok"}),
    );
    loop {
        let v = d.json();
        if v["action"] == "notice" {
            break;
        }
        assert_eq!(v["action"], "ack", "{v}");
    }
    // Before the flood ended (it once came only after the input stopped).
    assert!(
        sending.load(Relaxed),
        "the downlink waited for the device to stop sending"
    );
    flood.join().unwrap();
}
