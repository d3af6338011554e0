//! The random-kill loop: devices stream numbered requests while the gateway
//! is SIGKILLed at random moments (during start-up too) and restarted on the
//! same data directory, with the broker link cut in some cycles. Afterwards
//! every acknowledged messageId must be in the topic, with each device's
//! first copies in order.
//!
//! CI runs a short loop. The long mode for the reliability figures:
//! `EDGEGATE_CRASH_CYCLES=100 cargo test --release --test crash_loop -- --nocapture`
//! (`EDGEGATE_CRASH_SEED` replays a run's kill schedule).

mod common;

use std::thread;
use std::time::Duration;

use common::*;

const DEVICES: usize = 4;

#[test]
fn random_kills_lose_nothing_acknowledged() {
    let cycles: usize = std::env::var("EDGEGATE_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed = seed_from_env("EDGEGATE_CRASH_SEED");
    eprintln!("crash loop: {cycles} cycles, EDGEGATE_CRASH_SEED={seed}");
    let mut rng = Rng::new(seed);

    let broker = Broker::start();
    let (up, down) = broker.fresh_topics(2, 1);
    let mut gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    let load = Load::start(gw.port, DEVICES);

    let (mut cut_cycles, mut kills_before_ready) = (0, 0);
    for cycle in 0..cycles {
        let cut = rng.below(3) == 0;
        if cut {
            broker.proxy.cut();
            cut_cycles += 1;
        }
        // One kill in four lands in start-up (sled opening, Kafka set-up),
        // the others anywhere in 1.5 s of streaming.
        let life = match rng.below(4) {
            0 => Duration::from_millis(rng.below(100)),
            _ => Duration::from_millis(rng.below(1500)),
        };
        thread::sleep(life);
        if !gw.is_ready() {
            kills_before_ready += 1;
        }
        gw.kill_and_respawn();
        if cut {
            broker.proxy.restore();
        }
        if cycle % 10 == 9 {
            eprintln!("cycle {}: {} acked so far", cycle + 1, load.acked_count());
        }
    }
    // Let the last gateway come up, take some traffic, and drain.
    gw.wait_ready();
    thread::sleep(Duration::from_millis(500));
    let acked = load.stop();
    gw.wait_drained();
    assert!(
        acked.len() > cycles,
        "too little traffic to mean anything: {}",
        acked.len()
    );
    let (records, duplicates) = assert_all_delivered(&broker.addr(), &up, 2, &acked);
    // Nothing was lost, so the last start must not have reported a loss.
    assert_eq!(gw.metric("edgegate_outbox_lost_batches_total"), 0.0);
    eprintln!(
        "crash loop passed: {cycles} kills ({kills_before_ready} before ready, {cut_cycles} with the broker cut), \
         {} acked, {records} records, {duplicates} duplicate copies, 0 lost, seed {seed}",
        acked.len()
    );
}
