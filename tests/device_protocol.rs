//! The device side of the contract (PROTOCOL 1) against the real binary.
//! Kafka is unreachable here on purpose: acks depend on the outbox only.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn gateway() -> Gateway {
    Gateway::start(GatewayOptions::offline())
}

#[test]
fn ack_carries_uid_and_a_fresh_message_id() {
    let gw = gateway();
    let mut d = gw.device();
    let a = d.request("telemetry", "req-1", Some("dev-42"), json!({"t": 21.5}));
    let b = d.request("telemetry", "req-2", None, Value::Null);
    assert_eq!(a["uid"], "req-1");
    assert_eq!(b["uid"], "req-2");
    let (ida, idb) = (ack_id(&a), ack_id(&b));
    assert_ne!(ida, idb);
    uuid::Uuid::parse_str(&ida).expect("messageId is a UUID");
    assert_eq!(gw.metric("edgegate_acks_total"), 2.0);
    assert_eq!(gw.metric("edgegate_outbox_records"), 2.0);
}

#[test]
fn every_device_error_code_with_its_exact_reply() {
    let gw =
        Gateway::start(GatewayOptions::offline().env("EDGEGATE_LISTENER_MAX_FRAME_BYTES", 100));
    let mut d = gw.device();

    d.send("{not json");
    let r = d.json();
    assert_eq!(
        (r["errorCode"].as_str(), r["uid"].as_str()),
        (Some("bad_json"), Some(""))
    );
    assert_eq!(r["action"], "error");
    assert_eq!(r["status"], "error");
    assert!(r["errorMessage"].as_str().unwrap().len() > 5);

    d.send_raw(b"{\"action\":\"a\",\"uid\":\"\xff\xfe\"}\n");
    assert_eq!(d.json()["errorCode"], "bad_json");

    d.send("[1,2,3]");
    assert_eq!(d.json()["errorCode"], "bad_request");
    d.send(r#"{"action":"a","uid":"u-7","deviceUid":5}"#);
    let r = d.json();
    assert_eq!(
        (r["errorCode"].as_str(), r["uid"].as_str()),
        (Some("bad_request"), Some("u-7"))
    );
    d.send(r#"{"action":"bad action","uid":"u-8"}"#);
    assert_eq!(d.json()["errorCode"], "bad_request");
    d.send(r#"{"action":"a"}"#);
    let r = d.json();
    assert_eq!(r["errorCode"], "bad_request");
    assert!(r["errorMessage"].as_str().unwrap().contains("uid"));

    d.send(&format!(
        r#"{{"action":"a","uid":"big","data":"{}"}}"#,
        "x".repeat(200)
    ));
    let r = d.json();
    assert_eq!(
        (r["errorCode"].as_str(), r["uid"].as_str()),
        (Some("frame_too_large"), Some(""))
    );

    // The connection is still fine after every one of them.
    ack_id(&d.request("a", "after", None, Value::Null));
    for code in ["bad_json", "bad_request", "frame_too_large"] {
        assert!(
            gw.metric(&format!("edgegate_errors_total{{code=\"{code}\"}}")) >= 1.0,
            "{code}"
        );
    }
}

#[test]
fn json_a_backend_could_not_parse_is_refused() {
    let gw = gateway();
    let mut d = gw.device();
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // 32 levels, the frame's own object included, are fine; 33 are not.
    d.send(&format!(
        r#"{{"action":"a","uid":"d31","data":{}}}"#,
        nested(31)
    ));
    ack_id(&d.json());
    for (n, uid) in [(32, "d32"), (1000, "d1000"), (30_000, "d30000")] {
        d.send(&format!(
            r#"{{"action":"a","uid":"{uid}","data":{}}}"#,
            nested(n)
        ));
        let r = d.json();
        assert_eq!(r["errorCode"], "bad_request", "{n} levels: {r}");
        assert_eq!(r["uid"], uid, "{r}");
    }
    // Escaped lone surrogates, in data, in uid, in an unknown field.
    for frame in [
        r#"{"action":"a","uid":"s1","data":"\ud800"}"#,
        r#"{"action":"a","uid":"\udc00"}"#,
        r#"{"action":"a","uid":"s3","other":["\ud800x"]}"#,
    ] {
        d.send(frame);
        assert_eq!(d.json()["errorCode"], "bad_json", "{frame}");
    }
    // A surrogate pair is a character like any other.
    d.send(r#"{"action":"a","uid":"pair","data":"\ud83d\ude00"}"#);
    ack_id(&d.json());
    // Bytes that are not UTF-8, in a field the gateway otherwise ignores.
    d.send_raw(b"{\"action\":\"a\",\"uid\":\"u8\",\"other\":\"\xff\"}\n");
    assert_eq!(d.json()["errorCode"], "bad_json");
    ack_id(&d.request("a", "after", None, Value::Null));
}

#[test]
fn pings_are_answered_and_not_stored() {
    let gw = gateway();
    let mut d = gw.device();
    d.send("Ping");
    assert_eq!(d.line().unwrap(), "Pong");
    d.send_raw(b"Ping\r\n");
    assert_eq!(d.line().unwrap(), "Pong");
    d.send(r#"{"action":"ping","uid":"p-1"}"#);
    assert_eq!(d.json(), json!({"action":"pong","uid":"p-1","status":"ok"}));
    assert_eq!(gw.metric("edgegate_outbox_records"), 0.0);
}

#[test]
fn frames_split_and_merged_across_reads_get_one_reply_each_in_order() {
    let gw = gateway();
    let mut d = gw.device();
    let mut bytes = Vec::new();
    for i in 0..50 {
        match i % 5 {
            0 => bytes.extend_from_slice(b"Ping\n"),
            1 => bytes.extend_from_slice(b"{oops\r\n"),
            2 => bytes.extend_from_slice(b"\n"), // ignored, no reply
            _ => bytes
                .extend_from_slice(format!("{{\"action\":\"t\",\"uid\":\"u{i}\"}}\n").as_bytes()),
        }
    }
    // First all of it in one write, then byte by byte, then in odd chunks.
    d.send_raw(&bytes);
    for b in &bytes {
        d.stream.write_all(std::slice::from_ref(b)).unwrap();
    }
    for chunk in bytes.chunks(7) {
        d.stream.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    for round in 0..3 {
        for i in 0..50 {
            match i % 5 {
                0 => assert_eq!(d.line().unwrap(), "Pong", "round {round} frame {i}"),
                1 => assert_eq!(d.json()["errorCode"], "bad_json"),
                2 => {}
                _ => assert_eq!(d.json()["uid"], format!("u{i}"), "round {round}"),
            }
        }
    }
    d.send("Ping");
    assert_eq!(d.line().unwrap(), "Pong", "no extra replies were queued");
}

#[test]
fn oversized_frame_is_discarded_without_growing_memory() {
    let gw = gateway();
    let mut d = gw.device();
    let rss_before = rss_kib(gw.pid());
    // 32 MiB in one line, then a normal frame.
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..32 {
        d.send_raw(&chunk);
    }
    d.send_raw(b"\n");
    let r = d.json();
    assert_eq!(r["errorCode"], "frame_too_large");
    ack_id(&d.request("a", "next", None, Value::Null));
    let grown = rss_kib(gw.pid()).saturating_sub(rss_before);
    assert!(
        grown < 8 * 1024,
        "RSS grew by {grown} KiB for a discarded 32 MiB frame"
    );
}

#[test]
fn idle_connection_is_closed_and_partial_bytes_do_not_keep_it_open() {
    let gw =
        Gateway::start(GatewayOptions::offline().env("EDGEGATE_LISTENER_IDLE_TIMEOUT_SECS", 1));
    let mut quiet = gw.device();
    let mut dribbler = gw.device();
    let mut busy = gw.device();
    let start = std::time::Instant::now();
    // Dribble for most of the timeout, and ping on another connection.
    for _ in 0..4 {
        dribbler.send_raw(b"{");
        busy.send("Ping");
        assert_eq!(busy.line().unwrap(), "Pong");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(quiet.closed_within(Duration::from_secs(3)));
    assert!(dribbler.closed_within(Duration::from_secs(3)));
    assert!(start.elapsed() >= Duration::from_millis(900));
    for _ in 0..2 {
        busy.send("Ping");
        assert_eq!(busy.line().unwrap(), "Pong");
        std::thread::sleep(Duration::from_millis(600));
    }
    busy.send("Ping");
    assert_eq!(
        busy.line().unwrap(),
        "Pong",
        "a connection completing frames stays open"
    );
    assert!(gw.metric("edgegate_connections_idle_closed_total") >= 2.0);
}

#[test]
fn max_connections_answers_server_busy_then_closes() {
    let gw = Gateway::start(GatewayOptions::offline().env("EDGEGATE_LISTENER_MAX_CONNECTIONS", 3));
    let mut held: Vec<Device> = (0..3).map(|_| gw.device()).collect();
    for d in &mut held {
        d.send("Ping");
        assert_eq!(d.line().unwrap(), "Pong");
    }
    let mut extra = gw.device();
    let r = extra.json();
    assert_eq!(r["errorCode"], "server_busy");
    assert_eq!(r["uid"], "");
    assert!(extra.closed_within(Duration::from_secs(5)));
    // A slot frees up when one leaves.
    drop(held.pop());
    gw.wait_metric("edgegate_connections", |v| v == 2.0);
    let mut again = gw.device();
    again.send("Ping");
    assert_eq!(again.line().unwrap(), "Pong");
    assert_eq!(gw.metric("edgegate_connections_rejected_total"), 1.0);
}

#[test]
fn a_stalled_or_flooding_connection_does_not_delay_others() {
    let gw = gateway();
    // One connection floods pings and never reads its replies.
    let flood = gw.device();
    let flood_stream = flood.stream.try_clone().unwrap();
    let flooder = std::thread::spawn(move || {
        let mut s = flood_stream;
        let line = b"Ping\n".repeat(10_000);
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < until {
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            if s.write_all(&line).is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    // Another one sends half a frame and stalls.
    let mut stalled = gw.device();
    stalled.send_raw(b"{\"action\":\"a\",");
    let mut d = gw.device();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        let t = std::time::Instant::now();
        ack_id(&d.request("a", &format!("u{i}"), None, Value::Null));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "ack took {:?}",
            t.elapsed()
        );
    }
    flooder.join().unwrap();
    drop(flood);
}

#[test]
fn outbox_cap_refuses_with_outbox_full_and_keeps_the_connection() {
    // Stored as sent, so that these padded requests fill the cap.
    let gw = Gateway::start(
        GatewayOptions::offline()
            .env("EDGEGATE_OUTBOX_MAX_BYTES", 1 << 20)
            .env("EDGEGATE_OUTBOX_COMPRESSION", "none"),
    );
    let mut d = gw.device();
    let data = "y".repeat(60_000);
    let mut acked = 0;
    let mut full = None;
    for i in 0..40 {
        let r = d.request("bulk", &format!("u{i}"), None, json!(data));
        if r["action"] == "ack" {
            acked += 1;
        } else {
            full = Some(r);
            break;
        }
    }
    let r = full.expect("the 1 MiB cap was never reached");
    assert_eq!(r["errorCode"], "outbox_full");
    // Said once in the log, and not ready while full.
    assert_eq!(
        gw.log().matches("the outbox is full").count(),
        1,
        "{}",
        gw.log()
    );
    let (status, body) = http_get(gw.admin_port, "/readyz").unwrap();
    assert_eq!(
        (status, body.contains("outbox is full")),
        (503, true),
        "{body}"
    );
    assert_eq!(gw.metric("edgegate_outbox_full"), 1.0);
    let status = gw.status();
    assert_eq!(status["state"], "outbox_full", "{status}");
    assert_eq!(status["ready"], false);
    assert_eq!(status["outbox"]["full"], true);
    assert_eq!(status["outbox"]["max_bytes"], 1 << 20);
    assert_eq!(status["outbox"]["records"], acked);
    assert!(
        status["last_errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["level"] == "WARN"
                && e["msg"].as_str().unwrap().contains("the outbox is full")),
        "{status}"
    );
    assert!(r["uid"].as_str().unwrap().starts_with('u'));
    assert!(acked >= 5, "only {acked} acks before outbox_full");
    // Still usable: pings work, acknowledged records are all still there.
    d.send("Ping");
    assert_eq!(d.line().unwrap(), "Pong");
    assert_eq!(gw.metric("edgegate_outbox_records"), acked as f64);
    let disk = gw.metric("edgegate_outbox_disk_bytes");
    assert!(
        disk <= (1 << 20) as f64 * 1.05,
        "{disk} bytes on disk, {acked} acked"
    );
}

#[test]
fn sigterm_answers_new_frames_with_shutting_down_and_exits_zero() {
    let mut gw =
        Gateway::start(GatewayOptions::offline().env("EDGEGATE_KAFKA_DRAIN_TIMEOUT_SECS", 3));
    let mut d = gw.device();
    ack_id(&d.request("a", "before", None, Value::Null));
    gw.signal("TERM");
    // Kafka is unreachable, so the gateway waits out the drain timeout with
    // the connection open: a request now is refused and the connection closed.
    std::thread::sleep(Duration::from_millis(300));
    // Not ready from the first moment of the shutdown.
    let (code, body) = http_get(gw.admin_port, "/readyz").unwrap();
    assert_eq!((code, body.as_str()), (503, "not ready: shutting down\n"));
    assert_eq!(gw.status()["state"], "shutting_down");
    d.send(r#"{"action":"a","uid":"late"}"#);
    let r = d.json();
    assert_eq!(r["errorCode"], "shutting_down");
    assert_eq!(r["uid"], "late");
    assert!(d.closed_within(Duration::from_secs(5)));
    assert!(
        common::Device::try_connect(gw.port).is_none(),
        "no new connections during shutdown"
    );
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    // The acked request is still in the outbox for the next start.
    let mut opts = GatewayOptions::offline();
    opts.data_dir = Some(gw.data_dir.clone());
    let restarted = Gateway::start(opts);
    assert_eq!(restarted.metric("edgegate_outbox_records"), 1.0);
}

#[test]
fn a_second_gateway_on_the_same_data_dir_is_refused_and_moves_nothing() {
    let gw = gateway();
    let mut d = gw.device();
    ack_id(&d.request("a", "kept", None, Value::Null));
    let out = common::command()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--brokers",
            "127.0.0.1:1",
        ])
        .arg("--data-dir")
        .arg(&gw.data_dir)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Naming the process that holds it.
    assert!(
        stderr.contains(&format!(
            "in use by another edgegate process (PID {})",
            gw.pid()
        )),
        "{stderr}"
    );
    let moved: Vec<_> = std::fs::read_dir(gw.data_dir.join("outbox"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("broken"))
        .collect();
    assert!(moved.is_empty(), "a live outbox was moved aside: {moved:?}");
    // The first one is unaffected.
    ack_id(&d.request("a", "still", None, Value::Null));
    assert_eq!(gw.metric("edgegate_outbox_records"), 2.0);
}

#[test]
fn the_device_subcommand_sends_stdin_and_prints_replies() {
    use std::io::Write as _;
    let gw = gateway();
    let mut child = common::command()
        .arg("device")
        .arg(format!("127.0.0.1:{}", gw.port))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Ping\n{\"action\":\"t\",\"uid\":\"cli-1\"}\n{bad\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "Pong");
    assert!(
        lines[1].contains("\"action\":\"ack\"") && lines[1].contains("cli-1"),
        "{text}"
    );
    assert!(lines[2].contains("bad_json"), "{text}");
}

#[test]
fn requests_over_the_rate_limit_are_refused_and_not_stored() {
    let gw = Gateway::start(
        GatewayOptions::offline()
            .env("EDGEGATE_LIMITS_REQUESTS_PER_SEC", 5)
            .env("EDGEGATE_LIMITS_BURST", 3),
    );
    let mut d = gw.device();
    // Eight at once: the burst of three goes through, the rest wait.
    for i in 0..8 {
        d.send(&format!(r#"{{"action":"a","uid":"r{i}"}}"#));
    }
    let replies: Vec<Value> = (0..8).map(|_| d.json()).collect();
    let acked = replies.iter().filter(|r| r["action"] == "ack").count();
    assert_eq!(acked, 3, "{replies:?}");
    let mut longest = 0;
    for r in replies.iter().filter(|r| r["action"] != "ack") {
        assert_eq!(r["errorCode"], "rate_limited", "{r}");
        assert!(r["uid"].as_str().unwrap().starts_with('r'), "{r}");
        let wait = r["retryAfterMs"].as_u64().expect("retryAfterMs");
        assert!((1..=200).contains(&wait), "{r}");
        longest = longest.max(wait);
    }
    // Pings are not limited.
    for _ in 0..5 {
        d.send("Ping");
        assert_eq!(d.line().as_deref(), Some("Pong"));
    }
    // After the wait it was told, a request goes through again.
    std::thread::sleep(Duration::from_millis(longest));
    ack_id(&d.request("a", "later", None, Value::Null));
    assert_eq!(
        gw.metric("edgegate_errors_total{code=\"rate_limited\"}"),
        5.0
    );
    assert_eq!(
        gw.metric("edgegate_outbox_records"),
        4.0,
        "refused ones not stored"
    );
}

#[test]
fn admin_head_requests_get_no_body_and_other_methods_405() {
    let gw = gateway();
    let (status, head, body) = http(gw.admin_port, "HEAD", "/metrics").unwrap();
    assert_eq!((status, body.as_str()), (200, ""), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(length > 1000, "the length the body would have: {head}");
    let (status, _, body) = http(gw.admin_port, "HEAD", "/readyz").unwrap();
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, _, _) = http(gw.admin_port, "POST", "/metrics").unwrap();
    assert_eq!(status, 405);
    let (status, _, body) = http(gw.admin_port, "GET", "/nowhere").unwrap();
    assert_eq!((status, body.as_str()), (404, "not found\n"));
}

#[test]
fn status_and_the_log_tell_an_outage_at_a_glance() {
    let gw = Gateway::start(GatewayOptions::offline());
    let status = gw.status();
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["outbox"]["oldest_age_secs"], Value::Null);
    let mut d = gw.device();
    for i in 0..3 {
        ack_id(&d.request("a", &format!("o{i}"), None, Value::Null));
    }
    // Kafka is unreachable and requests wait: said within seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !gw
        .log()
        .contains("Kafka is unreachable: 3 requests wait in the outbox")
    {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = gw.status();
    assert_eq!(status["kafka"]["connected"], false, "{status}");
    assert_eq!(status["outbox"]["records"], 3);
    assert!(
        status["outbox"]["oldest_age_secs"].as_u64().unwrap() >= 5,
        "{status}"
    );
    assert!(status["outbox"]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(status["connections"], 1);
    assert!(status["uptime_secs"].as_u64().unwrap() >= 5);
    assert!(gw.metric("edgegate_outbox_oldest_age_seconds") >= 5.0);
    assert_eq!(gw.metric("edgegate_outbox_max_bytes"), (1u64 << 30) as f64);
    // Acked by the fsync: Kafka is away.
    assert_eq!(gw.metric("edgegate_ack_seconds_count"), 3.0);
    assert_eq!(gw.metric("edgegate_ack_seconds_bucket{le=\"+Inf\"}"), 3.0);
    assert_eq!(gw.metric("edgegate_kafka_delivery_seconds_count"), 0.0);
    // What a hub runs short of, as the Prometheus client libraries name it.
    assert!(gw.metric("process_resident_memory_bytes") > 1e6);
    assert!(gw.metric("process_open_fds") >= 5.0);
    assert!(gw.metric("process_cpu_seconds_total") > 0.0);
    let build = gw
        .metrics()
        .into_keys()
        .find(|k| k.starts_with("edgegate_build_info{"))
        .expect("edgegate_build_info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(build.contains("librdkafka=\"2."), "{build}");
}
