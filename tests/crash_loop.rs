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

    let stats = interrupt_loop(
        "crash loop",
        cycles,
        &mut rng,
        &broker,
        &mut gw,
        &load,
        |gw| gw.kill_and_respawn(),
    );
    let (acked, records, duplicates) =
        settle_and_check(&mut gw, load, &broker.addr(), &up, 2, cycles);
    eprintln!(
        "crash loop passed: {cycles} kills ({} before ready, {} with the broker cut), \
         {} acked, {records} records, {duplicates} duplicate copies, 0 lost, seed {seed}",
        stats.before_ready,
        stats.broker_cut,
        acked.len()
    );
}
