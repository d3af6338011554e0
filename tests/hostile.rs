//! Hostile and broken devices against the real binary: thousands of
//! slowloris connections, resets in the middle of a frame, random bytes,
//! and a device that never reads while the backend floods it. Meanwhile a
//! well-behaved device's acks stay prompt and the gateway's memory stays
//! bounded (asserted).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Ack latency of a well-behaved device: p99 of `n` sequential requests.
fn ack_p99(d: &mut Device, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            let start = Instant::now();
            ack_id(&d.request("t", &format!("good-{i}"), None, json!({"i": i})));
            start.elapsed()
        })
        .collect();
    times.sort();
    times[n * 99 / 100]
}

fn raise_open_files() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

#[test]
fn ten_thousand_slowloris_connections_hurt_no_one() {
    raise_open_files();
    const SLOW: usize = 10_000;
    // Long enough for all of them to connect before the first is closed.
    let gw =
        Gateway::start(GatewayOptions::offline().env("EDGEGATE_LISTENER_IDLE_TIMEOUT_SECS", 20));
    let mut good = gw.device();
    let baseline = ack_p99(&mut good, 100);
    let rss_before = rss_kib(gw.pid());

    let mut slow: Vec<TcpStream> = Vec::with_capacity(SLOW);
    let connecting = Instant::now();
    for _ in 0..SLOW {
        let s = TcpStream::connect(("127.0.0.1", gw.port)).expect("connect a slow client");
        s.set_nonblocking(true).unwrap();
        slow.push(s);
    }
    gw.wait_metric("edgegate_connections", |v| v >= SLOW as f64);
    // Every slow client dribbles the start of a frame, one byte per round,
    // never finishing it.
    let frame = br#"{"action":"telemetry","uid":"slow","data":{"never":"ends"#;
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        for s in &mut slow {
            let _ = s.write(&frame[round..round + 1]);
        }
        worst = worst.max(ack_p99(&mut good, 50));
    }
    let rss_during = rss_kib(gw.pid());
    eprintln!(
        "{SLOW} slowloris connected in {:?}: good device ack p99 {baseline:?} before, worst {worst:?} during; \
         gateway RSS {rss_before} KiB -> {rss_during} KiB",
        connecting.elapsed()
    );
    assert!(
        worst < Duration::from_millis(500),
        "acks slowed to {worst:?}"
    );
    // Bytes that never complete a frame do not keep a connection open, nor
    // does each one cost more than a few KiB.
    assert!(
        rss_during - rss_before < 64 * 1024,
        "RSS grew by {} KiB for {SLOW} slow connections",
        rss_during - rss_before
    );
    // The idle timeout closes them all, counted.
    let deadline = Instant::now() + Duration::from_secs(120);
    while gw.metric("edgegate_connections") > 1.0 {
        assert!(
            Instant::now() < deadline,
            "slow connections outlived the idle timeout"
        );
        std::thread::sleep(Duration::from_millis(500));
        good.send("Ping");
        assert_eq!(good.line().as_deref(), Some("Pong"));
    }
    assert!(gw.metric("edgegate_connections_idle_closed_total") >= SLOW as f64);
    good.send("Ping");
    // The good device sent frames all along, so it is still there.
    assert_eq!(good.line().as_deref(), Some("Pong"));
}

#[test]
fn resets_mid_frame_and_random_bytes_hurt_no_one() {
    let gw = Gateway::start(GatewayOptions::offline());
    let mut good = gw.device();
    // Resets in the middle of a frame.
    for i in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        let _ = s.write_all(format!("{{\"action\":\"t\",\"uid\":\"r{i}\",\"da").as_bytes());
        // SO_LINGER 0: close sends a RST instead of a FIN.
        rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).unwrap();
        drop(s);
    }
    // Random bytes, newlines included, from many connections at once.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut noisy: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(("127.0.0.1", gw.port)).unwrap())
        .collect();
    for s in &mut noisy {
        let bytes: Vec<u8> = (0..64 << 10)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if seed.is_multiple_of(97) {
                    b'\n'
                } else {
                    seed as u8
                }
            })
            .collect();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.write_all(b"\n");
    }
    // Each gets its error replies; read a little from each, then hang up.
    for s in &mut noisy {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        let first = text.lines().next().unwrap_or("");
        let reply: Value =
            serde_json::from_str(first).unwrap_or_else(|_| panic!("reply {first:?}"));
        assert_eq!(reply["action"], "error", "{first}");
    }
    drop(noisy);
    let p99 = ack_p99(&mut good, 100);
    assert!(p99 < Duration::from_millis(500), "acks slowed to {p99:?}");
    let m = gw.metrics();
    assert!(m["edgegate_errors_total{code=\"bad_json\"}"] > 0.0);
    assert_eq!(m["edgegate_errors_total{code=\"internal\"}"], 0.0);
    gw.wait_metric("edgegate_connections", |v| v == 1.0);
}

#[test]
fn a_device_that_never_reads_is_cut_off_while_others_get_their_messages() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let gw = Gateway::start(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_KAFKA_CONSUMER_GROUP_ID", unique("group"))
            .env("EDGEGATE_LISTENER_MAX_PENDING_DOWNLINK", 200),
    );
    gw.wait_consumer();
    let p = producer(&broker.addr());
    let mut deaf = gw.device();
    let deaf_client = client_id_of(&mut deaf, &broker.addr(), &up);
    wait_downlink(&mut deaf, &p, &down, &deaf_client);
    let mut good = gw.device();
    let good_client = client_id_of(&mut good, &broker.addr(), &up);
    wait_downlink(&mut good, &p, &down, &good_client);
    let rss_before = rss_kib(gw.pid());

    // The backend floods the deaf device: 20,000 messages of 1 KiB; it
    // reads none of them (its socket buffers fill, then the gateway's
    // queue for it).
    let blob = "x".repeat(1000);
    let flood: Vec<Vec<u8>> = (0..20_000)
        .map(|i| {
            server_response(
                Some(&deaf_client),
                None,
                json!({"action":"flood","uid":format!("f{i}"),"data":blob}),
            )
        })
        .collect();
    for chunk in flood.chunks(2000) {
        produce(&p, &down, chunk);
    }
    gw.wait_metric("edgegate_connections_slow_closed_total", |v| v >= 1.0);
    // The other device's messages still arrive.
    produce(
        &p,
        &down,
        &[server_response(
            Some(&good_client),
            None,
            json!({"action":"hello","uid":"g1","status":"ok"}),
        )],
    );
    assert_eq!(good.json()["uid"], "g1");
    let rss_after = rss_kib(gw.pid());
    eprintln!("flooded non-reader: gateway RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after - rss_before < 64 * 1024,
        "RSS grew by {} KiB for one device that does not read",
        rss_after - rss_before
    );
}
