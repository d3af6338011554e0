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

#[test]
fn outage_keeps_every_acked_message_and_delivers_in_order_after() {
    let s = setup();
    let gw = Gateway::start(s.options());
    let mut d = gw.device();
    let mut acked = send_numbered(&mut d, "dev-a", 0, 100, 0);
    gw.wait_metric("edgegate_outbox_records", |v| v == 0.0);

    s.broker.proxy.cut();
    acked.extend(send_numbered(&mut d, "dev-a", 100, 400, 0));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        gw.metric("edgegate_outbox_records") > 0.0,
        "kept in the outbox during the outage"
    );
    let mut other = gw.device();
    acked.extend(send_numbered(&mut other, "dev-b", 0, 100, 0));

    s.broker.proxy.restore();
    acked.extend(send_numbered(&mut d, "dev-a", 500, 100, 0));
    gw.wait_metric("edgegate_outbox_records", |v| v == 0.0);
    s.assert_all_delivered(&acked);
}

#[test]
fn sigkill_during_an_outage_loses_nothing_acked() {
    let s = setup();
    let mut gw = Gateway::start(s.options());
    let mut d = gw.device();
    let mut acked = send_numbered(&mut d, "dev-k", 0, 50, 0);
    s.broker.proxy.cut();
    acked.extend(send_numbered(&mut d, "dev-k", 50, 500, 0));
    gw.kill();
    drop(d);
    // Restart while Kafka is still unreachable, then bring it back.
    gw.restart();
    assert!(
        gw.metric("edgegate_outbox_records") >= 500.0,
        "backlog reloaded"
    );
    let mut d = gw.device();
    acked.extend(send_numbered(&mut d, "dev-k", 550, 50, 0));
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
    let acked = send_numbered(&mut d, "dev-t", 0, 300, 0);
    s.broker.proxy.restore();
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(gw.log().contains("outbox drained"), "{}", gw.log());
    s.assert_all_delivered(&acked);
}
