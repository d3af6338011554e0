//! A request Kafka refuses for good must not stop the ones behind it: it
//! goes to the quarantine, and the others reach the topic in order.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn a_request_kafka_refuses_for_good_is_quarantined_and_the_rest_flow_on() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    // Acked while Kafka is unreachable, with a frame limit of 200 kB.
    let mut gw = Gateway::start(
        GatewayOptions::offline()
            .topics(&up, &down)
            .env("EDGEGATE_LISTENER_MAX_FRAME_BYTES", 200_000),
    );
    let mut d = gw.device();
    let big = "x".repeat(150_000);
    for (uid, data) in [
        ("before", Value::from(1)),
        ("poison", Value::from(big)),
        ("after", Value::from(3)),
    ] {
        let reply = d.request("telemetry", uid, Some("dev-p"), data);
        assert_eq!(reply["status"], "accepted", "{reply}");
    }
    let data_dir = gw.data_dir.clone();
    gw.kill();

    // Restarted with a Kafka message limit the big one no longer fits: the
    // operator lowered it, or the topic's limit is lower than the frame's.
    let config = data_dir.with_extension("toml");
    std::fs::write(
        &config,
        "[kafka.properties]\n\"message.max.bytes\" = 100000\n",
    )
    .unwrap();
    let mut opts = GatewayOptions::new(broker.addr()).topics(&up, &down);
    opts.data_dir = Some(data_dir.clone());
    opts.config = Some(config);
    let gw = Gateway::start(opts);
    gw.wait_metric("edgegate_kafka_quarantined_total", |v| v == 1.0);
    gw.wait_drained();

    let records = read_topic(&broker.addr(), &up, 1, 2, Duration::from_secs(20));
    let uids: Vec<&str> = records
        .iter()
        .filter_map(|r| r.payload["deviceRequest"]["uid"].as_str())
        .collect();
    assert_eq!(uids, ["before", "after"], "{}", gw.log());

    let kept = std::fs::read_to_string(data_dir.join("quarantine/requests.jsonl")).unwrap();
    let lines: Vec<Value> = kept
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{kept}");
    assert_eq!(lines[0]["request"]["deviceRequest"]["uid"], "poison");
    assert_eq!(lines[0]["key"], "dev-p");
    assert!(
        lines[0]["error"].as_str().unwrap().contains("too large"),
        "{}",
        lines[0]["error"]
    );
    assert!(gw.log().contains("for good"), "{}", gw.log());
    assert_eq!(gw.metric("edgegate_outbox_records"), 0.0);
}

#[test]
fn a_frame_limit_kafka_cannot_carry_is_refused_at_start() {
    let out = command()
        .args(["check-config"])
        .env("EDGEGATE_LISTENER_MAX_FRAME_BYTES", "999000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("message.max.bytes"), "{stderr}");
}
