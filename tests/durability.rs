//! Nothing acknowledged is lost: broker outages, SIGKILL and SIGTERM, each
//! against a real broker behind a proxy that the test cuts.

mod common;

use std::time::Duration;

use common::*;

struct Setup {
    broker: Broker,
    up: String,
    down: String,
}

fn setup() -> Setup {
    let broker = Broker::start();
    let (up, down) = broker.fresh_topics(2, 1);
    Setup { broker, up, down }
}

impl Setup {
    fn options(&self) -> GatewayOptions {
        GatewayOptions::new(self.broker.addr()).topics(&self.up, &self.down)
    }

    fn assert_all_delivered(&self, acked: &[Acked]) {
        assert_all_delivered(&self.broker.addr(), &self.up, 2, acked);
    }
}

/// Sends `n` numbered requests (pipelined in bursts) and returns the acked
/// (messageId, seq, device) triples.
fn stream(d: &mut Device, device: &str, from: u64, n: u64) -> Vec<(String, u64, String)> {
    let mut acked = Vec::new();
    for chunk_start in (from..from + n).step_by(50) {
        let end = (chunk_start + 50).min(from + n);
        let mut burst = String::new();
        for i in chunk_start..end {
            burst.push_str(&format!(
                "{{\"action\":\"seq\",\"uid\":\"{i}\",\"deviceUid\":\"{device}\",\"data\":{i}}}\n"
            ));
        }
        d.send_raw(burst.as_bytes());
        for i in chunk_start..end {
            let r = d.json();
            assert_eq!(r["uid"], i.to_string());
            acked.push((ack_id(&r), i, device.to_owned()));
        }
    }
    acked
}

#[test]
fn outage_keeps_every_acked_message_and_delivers_in_order_after() {
    let s = setup();
    let gw = Gateway::start(s.options());
    let mut d = gw.device();
    let mut acked = stream(&mut d, "dev-a", 0, 100);
    gw.wait_metric("edgegate_outbox_records", |v| v == 0.0);

    s.broker.proxy.cut();
    acked.extend(stream(&mut d, "dev-a", 100, 400));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        gw.metric("edgegate_outbox_records") > 0.0,
        "kept in the outbox during the outage"
    );
    let mut other = gw.device();
    acked.extend(stream(&mut other, "dev-b", 0, 100));

    s.broker.proxy.restore();
    acked.extend(stream(&mut d, "dev-a", 500, 100));
    gw.wait_metric("edgegate_outbox_records", |v| v == 0.0);
    s.assert_all_delivered(&acked);
}

#[test]
fn sigkill_during_an_outage_loses_nothing_acked() {
    let s = setup();
    let mut gw = Gateway::start(s.options());
    let mut d = gw.device();
    let mut acked = stream(&mut d, "dev-k", 0, 50);
    s.broker.proxy.cut();
    acked.extend(stream(&mut d, "dev-k", 50, 500));
    gw.kill();
    drop(d);
    // Restart while Kafka is still unreachable, then bring it back.
    gw.restart();
    assert!(
        gw.metric("edgegate_outbox_records") >= 500.0,
        "backlog reloaded"
    );
    let mut d = gw.device();
    acked.extend(stream(&mut d, "dev-k", 550, 50));
    s.broker.proxy.restore();
    gw.wait_metric("edgegate_outbox_records", |v| v == 0.0);
    s.assert_all_delivered(&acked);
}

#[test]
fn sigterm_drains_the_outbox_to_kafka_and_exits_zero() {
    let s = setup();
    let mut gw = Gateway::start(s.options());
    let mut d = gw.device();
    s.broker.proxy.cut();
    let acked = stream(&mut d, "dev-t", 0, 300);
    s.broker.proxy.restore();
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(gw.log().contains("outbox drained"), "{}", gw.log());
    s.assert_all_delivered(&acked);
}
