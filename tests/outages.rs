//! Broker outages under load, against a real broker: a long outage, a
//! flapping link and a broker restart. Devices keep streaming numbered
//! requests throughout; every acknowledged messageId must reach the topic
//! with each device's first copies in order.
//!
//! CI runs short outages (8 s). The long mode of the reliability figures,
//! 60 s each: `EDGEGATE_FAULT_LONG=1 cargo test --test outages -- --nocapture`.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const DEVICES: usize = 4;

fn span() -> Duration {
    match std::env::var("EDGEGATE_FAULT_LONG").as_deref() {
        Ok("1") => Duration::from_secs(60),
        _ => Duration::from_secs(8),
    }
}

/// Stops the load, waits for the outbox to drain, checks the promise.
fn finish(gw: &Gateway, broker: &Broker, up: &str, load: Load, what: &str) {
    let acked = load.stop();
    gw.wait_drained();
    let (records, duplicates) = assert_all_delivered(&broker.addr(), up, 2, &acked);
    eprintln!(
        "{what}: {} acked, {records} records, {duplicates} duplicate copies, 0 lost",
        acked.len()
    );
}

#[test]
fn a_long_outage_under_load_loses_nothing() {
    let broker = Broker::start();
    let (up, down) = broker.fresh_topics(2, 1);
    let gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    let load = Load::start(gw.port, DEVICES);
    thread::sleep(Duration::from_secs(1));
    broker.proxy.cut();
    let before = load.acked_count();
    thread::sleep(span());
    let during = load.acked_count() - before;
    assert!(
        gw.metric("edgegate_outbox_records") > 0.0,
        "nothing waited in the outbox"
    );
    broker.proxy.restore();
    thread::sleep(Duration::from_secs(2));
    // Devices were acknowledged all through the outage: the outbox took it.
    assert!(
        during > 100,
        "only {during} acks during a {:?} outage",
        span()
    );
    eprintln!(
        "outage of {:?}: {during} requests acked while the broker was unreachable",
        span()
    );
    finish(&gw, &broker, &up, load, "long outage");
}

#[test]
fn a_flapping_link_loses_nothing() {
    let broker = Broker::start();
    let (up, down) = broker.fresh_topics(2, 1);
    let gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    let load = Load::start(gw.port, DEVICES);
    let start = Instant::now();
    let mut flaps = 0u64;
    while start.elapsed() < span() {
        // Down and up for 1 to 2 s each, in a fixed irregular pattern.
        broker.proxy.cut();
        thread::sleep(Duration::from_millis(1000 + (flaps * 389) % 1000));
        broker.proxy.restore();
        thread::sleep(Duration::from_millis(1000 + (flaps * 617) % 1000));
        flaps += 1;
    }
    eprintln!("{flaps} cuts in {:?}", start.elapsed());
    finish(&gw, &broker, &up, load, "flapping link");
}

#[test]
fn a_broker_restart_loses_nothing() {
    let mut broker = Broker::start_persistent();
    let (up, down) = broker.fresh_topics(2, 1);
    let gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    let load = Load::start(gw.port, DEVICES);
    thread::sleep(Duration::from_secs(2));
    gw.wait_metric("edgegate_kafka_delivered_total", |v| v > 0.0);
    broker.restart(Duration::from_secs(2));
    thread::sleep(span().min(Duration::from_secs(5)));
    finish(&gw, &broker, &up, load, "broker restart");
}
