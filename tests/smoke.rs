//! End to end in one test: a device frame is acked and lands in Kafka, and a
//! worker's answer comes back to the device. CI also runs it against the
//! cross-compiled aarch64 binary under qemu (EDGEGATE_TEST_BIN and
//! EDGEGATE_TEST_RUNNER, see tests/common).

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn device_to_kafka_and_back() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let gw = Gateway::start(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_KAFKA_CONSUMER_GROUP_ID", unique("smoke")),
    );
    gw.wait_consumer();
    let mut d = gw.device();
    d.send("Ping");
    assert_eq!(d.line().unwrap(), "Pong");
    let id = ack_id(&d.request("telemetry", "smoke-1", Some("hub-dev"), json!({"t": 1})));
    let records = read_topic(&broker.addr(), &up, 1, 1, WAIT);
    assert_eq!(records.len(), 1, "the acked frame is in Kafka");
    assert_eq!(records[0].payload["messageId"], id.as_str());
    let client = records[0].payload["clientId"].as_str().unwrap().to_owned();

    let p = producer(&broker.addr());
    wait_downlink(&mut d, &p, &down, &client);
    produce(
        &p,
        &down,
        &[server_response(
            Some(&client),
            Some("hub-dev"),
            json!({"action":"connect.response","uid":"smoke-1","status":"ok"}),
        )],
    );
    let reply: Value = d.json();
    assert_eq!(reply["action"], "connect.response");
    assert_eq!(reply["uid"], "smoke-1");
}
