//! Small runs of every `edgegate-bench` mode, so the tool cannot rot. They
//! check that each mode works and reports, not how fast anything is.

mod common;

use std::collections::HashMap;

use common::*;

/// The bench tool, built beside the gateway by `cargo test --workspace`
/// (`EDGEGATE_BENCH_BIN` for another build).
fn bench_bin() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("EDGEGATE_BENCH_BIN") {
        return path.into();
    }
    let path =
        std::path::Path::new(env!("CARGO_BIN_EXE_edgegate")).with_file_name("edgegate-bench");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p edgegate-bench` first)",
        path.display()
    );
    path
}

/// Runs `edgegate-bench ARGS` and parses its final `key=value` line.
fn bench(args: &[&str]) -> HashMap<String, String> {
    let out = std::process::Command::new(bench_bin())
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("a result line");
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn num(r: &HashMap<String, String>, key: &str) -> f64 {
    r.get(key)
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
        .parse()
        .unwrap()
}

#[test]
fn raw_and_uplink_modes_report_and_verify() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(2, 1);
    let raw = unique("raw");
    broker.create_topic(&raw, 1);
    let r = bench(&[
        "raw",
        "--brokers",
        &broker.addr(),
        "--topic",
        &raw,
        "--messages",
        "2000",
    ]);
    assert_eq!(r["mode"], "raw");
    assert!(num(&r, "msgs_per_sec") > 0.0);

    let gw = Gateway::start(GatewayOptions::new(broker.addr()).topics(&up, &down));
    let gateway = format!("127.0.0.1:{}", gw.port);
    let r = bench(&[
        "uplink",
        "--gateway",
        &gateway,
        "--brokers",
        &broker.addr(),
        "--topic",
        &up,
        "--partitions",
        "2",
        "--connections",
        "4",
        "--window",
        "8",
        "--messages",
        "1000",
    ]);
    assert_eq!(num(&r, "acked"), 1000.0);
    assert_eq!(num(&r, "errors"), 0.0);
    assert_eq!(
        num(&r, "verified"),
        1000.0,
        "every acked id is in the topic"
    );
    assert_eq!(num(&r, "missing"), 0.0);
    assert!(num(&r, "p99_ms") >= num(&r, "p50_ms"));

    // Realistic readings: every one is a valid request, acked and in Kafka,
    // and the gateway counts what its producer sent.
    let r = bench(&[
        "uplink",
        "--gateway",
        &gateway,
        "--brokers",
        &broker.addr(),
        "--topic",
        &up,
        "--partitions",
        "2",
        "--connections",
        "2",
        "--messages",
        "500",
        "--payload",
        "telemetry",
    ]);
    assert_eq!(r["size"], "telemetry");
    assert_eq!(num(&r, "acked"), 500.0);
    assert_eq!(num(&r, "errors"), 0.0);
    assert_eq!(num(&r, "missing"), 0.0);
    gw.wait_metric("edgegate_kafka_tx_bytes_total", |v| v > 0.0);
}

#[test]
fn idle_and_drain_modes_report() {
    let gw = Gateway::start(GatewayOptions::offline());
    let gateway = format!("127.0.0.1:{}", gw.port);
    let pid = gw.pid().to_string();
    let r = bench(&[
        "idle",
        "--gateway",
        &gateway,
        "--pid",
        &pid,
        "--connections",
        "200",
    ]);
    assert_eq!(num(&r, "connections"), 200.0);
    assert!(num(&r, "rss_after_kib") > 0.0);

    // A small backlog (Kafka is unreachable), then drain mode on it with a
    // broker: it must see the outbox go to zero.
    ack_id(
        &gw.device()
            .request("a", "backlog", None, serde_json::Value::Null),
    );
    let data_dir = gw.data_dir.clone();
    drop(gw);
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let mut opts = GatewayOptions::new(broker.addr()).topics(&up, &down);
    opts.data_dir = Some(data_dir);
    let gw = Gateway::start(opts);
    let admin = format!("127.0.0.1:{}", gw.admin_port);
    let r = bench(&["drain", "--admin", &admin, "--pid", &gw.pid().to_string()]);
    assert_eq!(r["mode"], "drain");
    assert!(num(&r, "seconds") >= 0.0);
    assert_eq!(gw.metric("edgegate_outbox_records"), 0.0);
}

#[test]
fn roundtrip_mode_echoes_through_kafka_and_back() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let gw = Gateway::start(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_KAFKA_CONSUMER_GROUP_ID", unique("rt")),
    );
    let r = bench(&[
        "roundtrip",
        "--gateway",
        &format!("127.0.0.1:{}", gw.port),
        "--admin",
        &format!("127.0.0.1:{}", gw.admin_port),
        "--brokers",
        &broker.addr(),
        "--topic",
        &up,
        "--reply-topic",
        &down,
        "--connections",
        "4",
        "--rate",
        "200",
        "--seconds",
        "2",
    ]);
    assert!(num(&r, "sent") >= 300.0, "{r:?}");
    assert_eq!(num(&r, "lost"), 0.0, "every request echoed back: {r:?}");
    assert!(num(&r, "p99_ms") >= num(&r, "p50_ms"));
    // The two halves were measured for the echoed requests.
    assert!(
        num(&r, "up_p50_ms") > 0.0 && num(&r, "down_p50_ms") > 0.0,
        "{r:?}"
    );
}

#[test]
fn hop_mode_measures_one_trip_through_the_broker() {
    let broker = shared_broker();
    let topic = unique("hop");
    broker.create_topic(&topic, 1);
    let r = bench(&[
        "hop",
        "--brokers",
        &broker.addr(),
        "--topic",
        &topic,
        "--rate",
        "200",
        "--seconds",
        "1",
    ]);
    assert!(num(&r, "sent") >= 150.0, "{r:?}");
    assert_eq!(num(&r, "received"), num(&r, "sent"), "{r:?}");
    assert!(num(&r, "p99_ms") >= num(&r, "p50_ms"));
}

#[test]
fn plot_and_report_modes_render_result_lines() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.txt");
    std::fs::write(
        &results,
        "mode=machine cores=2 arch=x86_64 cpu=smoke date=now\n\
         phase=ratio mode=raw messages=10 size=200 seconds=1 msgs_per_sec=1000\n\
         phase=ratio mode=uplink connections=5 window=4 size=200 acked=10 errors=0 seconds=1 msgs_per_sec=700 p50_ms=1 p99_ms=2 p999_ms=3 client_cpu_secs=0.1 verified=10 missing=0 gateway_cpu_secs=0.2 broker_cpu_secs=0.3\n\
         mode=drain records=10 seconds=1 msgs_per_sec=10 peak_rss_kib=2048 curve=0.00:10:1024,1.00:0:2048\n",
    )
    .unwrap();
    let svg = dir.path().join("results.svg");
    let r = bench(&[
        "plot",
        "--input",
        results.to_str().unwrap(),
        "--output",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(r["mode"], "plot");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawn.starts_with("<svg") && drawn.contains("<polyline"),
        "{drawn}"
    );

    let out = std::process::Command::new(bench_bin())
        .args(["report", "--input"])
        .arg(&results)
        .output()
        .unwrap();
    assert!(out.status.success());
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(md.contains("| 1 | 1,000 | 700 | 70% |"), "{md}");
    assert!(md.contains("## Replay"), "{md}");
}
