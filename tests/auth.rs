//! Token authentication (PROTOCOL 5) against the real binary: the auth
//! frame, refusals, binding, takeover, revocation, timeouts, damping and
//! the key file rules. Each test connects from loopback addresses of its
//! own, since damping works per source address.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::tokens::*;
use common::*;
use serde_json::{json, Value};

fn assert_unauthorized(reply: &Value, uid: &str) {
    assert_eq!(reply["action"], "error", "{reply}");
    assert_eq!(reply["errorCode"], "unauthorized", "{reply}");
    assert_eq!(reply["uid"], uid, "{reply}");
}

#[test]
fn every_wrong_first_frame_is_refused_and_closed() {
    let t = token_gateway(GatewayOptions::offline());
    let right = t.token("dev-1");
    let other = t.token("dev-2");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "request first",
            json!({"action":"telemetry","uid":"r1","deviceUid":"dev-1"}).to_string(),
            "r1",
        ),
        ("bad JSON first", "{nope".to_owned(), ""),
        (
            "token of another device",
            json!({"action":"auth","uid":"a2","deviceUid":"dev-1","data":{"token":other}})
                .to_string(),
            "a2",
        ),
        (
            "not hex",
            json!({"action":"auth","uid":"a3","deviceUid":"dev-1","data":{"token":"zz"}})
                .to_string(),
            "a3",
        ),
        (
            "no token",
            json!({"action":"auth","uid":"a4","deviceUid":"dev-1"}).to_string(),
            "a4",
        ),
        (
            "uppercase hex of the right token",
            json!({"action":"auth","uid":"a5","deviceUid":"dev-1","data":{"token":right.to_uppercase()}})
                .to_string(),
            "a5",
        ),
    ];
    for (what, frame, uid) in &cases {
        let mut d = t.connect(fresh_source());
        // Pings are answered before authentication and do not count.
        d.send("Ping");
        assert_eq!(d.line().as_deref(), Some("Pong"), "{what}");
        d.send(r#"{"action":"ping","uid":"p"}"#);
        assert_eq!(d.json()["action"], "pong", "{what}");
        d.send(frame);
        assert_unauthorized(&d.json(), uid);
        assert!(
            d.closed_within(Duration::from_secs(5)),
            "{what}: still open"
        );
    }
    let m = t.gw.metrics();
    assert_eq!(
        m["edgegate_auth_failures_total{reason=\"not_auth_first\"}"],
        2.0
    );
    assert_eq!(m["edgegate_auth_failures_total{reason=\"bad_token\"}"], 4.0);
    assert_eq!(m["edgegate_errors_total{code=\"unauthorized\"}"], 6.0);
    assert_eq!(m["edgegate_auth_ok_total"], 0.0);
    // And the right token still works.
    let mut d = t.connect(fresh_source());
    let reply = t.auth(&mut d, "ok", "dev-1", &right);
    assert_eq!(reply["status"], "ok", "{reply}");
    let log = t.gw.log();
    assert!(
        !log.contains(&right) && !log.contains(&other),
        "a token reached the log"
    );
}

#[test]
fn authentication_binds_at_once_and_nothing_of_it_reaches_kafka() {
    let broker = shared_broker();
    let (up, down) = broker.fresh_topics(1, 1);
    let t = token_gateway(
        GatewayOptions::new(broker.addr())
            .topics(&up, &down)
            .env("EDGEGATE_KAFKA_CONSUMER_GROUP_ID", unique("group")),
    );
    t.gw.wait_consumer();
    let token = t.token("dev-42");
    let mut d = t.authenticated("dev-42");

    // A second auth frame changes nothing.
    let again = t.auth(&mut d, "a2", "dev-43", &t.token("dev-43"));
    assert_eq!(again["errorCode"], "bad_request", "{again}");
    // Spoofing another device is refused, and the connection stays open.
    let spoof = d.request("telemetry", "s1", Some("dev-43"), json!({}));
    assert_unauthorized(&spoof, "s1");
    let own = ack_id(&d.request("telemetry", "t1", Some("dev-42"), json!({"n":1})));
    let unnamed = ack_id(&d.request("telemetry", "t2", None, json!({"n":2})));

    // Downlink by deviceUid reaches it with no connect.response.
    let p = producer(&broker.addr());
    let client = client_id_of(&mut d, &broker.addr(), &up);
    wait_downlink(&mut d, &p, &down, &client);
    produce(
        &p,
        &down,
        &[server_response(
            None,
            Some("dev-42"),
            json!({"action":"notice","uid":"n1","status":"ok"}),
        )],
    );
    assert_eq!(d.json()["uid"], "n1");
    // The backend cannot move an authenticated connection to another device.
    produce(
        &p,
        &down,
        &[server_response(
            Some(&client),
            Some("dev-99"),
            json!({"action":"connect.response","uid":"c1","status":"ok"}),
        )],
    );
    assert_eq!(d.json()["action"], "connect.response");
    assert_unauthorized(
        &d.request("telemetry", "s2", Some("dev-99"), json!({})),
        "s2",
    );

    let records = read_topic(&broker.addr(), &up, 1, 4, WAIT);
    for id in [&own, &unnamed] {
        let r = records
            .iter()
            .find(|r| r.payload["messageId"] == **id)
            .expect("acked request in Kafka");
        assert_eq!(r.payload["deviceUid"], "dev-42", "{}", r.payload);
        assert_eq!(r.key, b"dev-42");
    }
    for r in &records {
        let text = r.payload.to_string();
        assert!(!text.contains(&token), "a token was forwarded: {text}");
        assert_ne!(r.payload["deviceRequest"]["action"], "auth", "{text}");
    }
    assert!(!t.gw.log().contains(&token), "the token reached the log");
}

#[test]
fn a_second_authenticated_connection_takes_over() {
    let t = token_gateway(GatewayOptions::offline());
    let mut first = t.authenticated("dev-t");
    let mut second = t.authenticated("dev-t");
    assert!(first.closed_within(Duration::from_secs(5)));
    second.send("Ping");
    assert_eq!(second.line().as_deref(), Some("Pong"));
    assert_eq!(t.gw.metric("edgegate_connections_taken_over_total"), 1.0);
}

#[test]
fn revoked_devices_are_refused_and_cut_off() {
    let t = token_gateway(GatewayOptions::offline());
    // The file does not exist yet: nobody is revoked, with a warning.
    assert!(t.gw.log().contains("missing"), "{}", t.gw.log());
    let mut victim = t.authenticated("dev-r1");
    let mut bystander = t.authenticated("dev-r2");

    t.set_revoked("# lost on 2026-11-26\ndev-r1\r\n");
    let start = Instant::now();
    assert!(
        victim.closed_within(Duration::from_secs(5)),
        "revoked device still connected"
    );
    eprintln!("revoked connection closed after {:?}", start.elapsed());
    bystander.send("Ping");
    assert_eq!(bystander.line().as_deref(), Some("Pong"));
    assert_eq!(t.gw.metric("edgegate_auth_revoked_closed_total"), 1.0);

    let mut again = t.connect(fresh_source());
    let reply = t.auth(&mut again, "a9", "dev-r1", &t.token("dev-r1"));
    assert_unauthorized(&reply, "a9");
    assert!(again.closed_within(Duration::from_secs(5)));
    assert_eq!(
        t.gw.metric("edgegate_auth_failures_total{reason=\"revoked\"}"),
        1.0
    );

    // Edited in place to drop the line: the device is welcome again.
    std::fs::write(&t.revoked, "# nobody\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut d = t.connect(fresh_source());
        if t.auth(&mut d, "a10", "dev-r1", &t.token("dev-r1"))["status"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "still revoked after the edit");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn unauthenticated_connections_time_out_even_when_pinging() {
    let t = token_gateway(GatewayOptions::offline().env("EDGEGATE_AUTH_TIMEOUT_SECS", 1));
    let mut authed = t.authenticated("dev-k");
    let mut d = t.connect(fresh_source());
    d.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(5) {
        let _ = d.stream.write_all_ping();
        match d.line() {
            Some(line) => assert_eq!(line, "Pong"),
            None => {
                closed = d.closed_within(Duration::from_millis(100));
                if closed {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        closed,
        "an unauthenticated connection outlived auth.timeout_secs"
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(t.gw.metric("edgegate_auth_timeouts_total"), 1.0);
    // The deadline is for authenticating only.
    authed.send("Ping");
    assert_eq!(authed.line().as_deref(), Some("Pong"));
    // Timeouts do not count towards damping.
    assert_eq!(t.gw.metric("edgegate_auth_damped_total"), 0.0);
}

trait PingExt {
    fn write_all_ping(&mut self) -> std::io::Result<()>;
}

impl PingExt for std::net::TcpStream {
    fn write_all_ping(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        self.write_all(b"Ping\n")
    }
}

#[test]
fn five_failures_damp_the_source_address_only() {
    let t = token_gateway(GatewayOptions::offline());
    let attacker = fresh_source();
    for i in 0..5 {
        let mut d = t.connect(attacker);
        let reply = t.auth(&mut d, &format!("g{i}"), "dev-d", &"0".repeat(64));
        assert_unauthorized(&reply, &format!("g{i}"));
        assert!(d.closed_within(Duration::from_secs(5)));
    }
    // Even with the right token, the address is now closed at once.
    let mut d = t.connect(attacker);
    d.set_timeout(Duration::from_secs(5));
    let token = t.token("dev-d");
    let _ = std::io::Write::write_all(
        &mut d.stream,
        format!(
            "{}\n",
            json!({"action":"auth","uid":"late","deviceUid":"dev-d","data":{"token":token}})
        )
        .as_bytes(),
    );
    assert_eq!(d.line(), None, "a damped address got an answer");
    assert!(t.gw.metric("edgegate_auth_damped_total") >= 1.0);
    // Another address is not affected.
    let _ok = t.authenticated("dev-d");
    assert!(t.gw.log().contains("failed authentications from"));
}

#[test]
fn key_file_rules_stop_the_gateway_and_the_token_command() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("exposed.key");
    write_key(&key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = command()
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("EDGEGATE_AUTH_MODE", "token")
        .env("EDGEGATE_AUTH_TOKEN_KEY_FILE", &key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("group or others"),
        "{err}"
    );

    let out = command()
        .args(["token", "dev-1", "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "a token was printed under an exposed key"
    );

    let short = dir.path().join("short.key");
    std::fs::write(&short, b"too short").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = command()
        .args(["check-config"])
        .env("EDGEGATE_AUTH_MODE", "token")
        .env("EDGEGATE_AUTH_TOKEN_KEY_FILE", &short)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("short.key") && err.contains("at least 32"),
        "{err}"
    );

    // Token mode without a key file is a configuration error naming the key.
    let out = command()
        .args(["check-config"])
        .env("EDGEGATE_AUTH_MODE", "token")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("auth.token_key_file"), "{err}");

    // The same key always gives the same token, and another device another.
    let good = dir.path().join("good.key");
    write_key(&good);
    assert_eq!(mint("dev-1", &good), mint("dev-1", &good));
    assert_ne!(mint("dev-1", &good), mint("dev-2", &good));
}

#[test]
fn before_authentication_a_half_sent_frame_is_capped() {
    use std::io::Write;
    let t = token_gateway(GatewayOptions::offline());
    let gw = &t.gw;
    // Under auth.max_pending_bytes (4096): kept, the connection stays.
    let mut under = gw.device();
    under.send_raw(&[b'a'; 4000]);
    // Past it: refused and closed, whatever the frame size limit.
    let mut over = gw.device();
    over.send_raw(b"{\"action\":\"auth\",\"uid\":\"");
    over.send_raw(&[b'a'; 5000]);
    let reply = over.json();
    assert_eq!(reply["errorCode"], "unauthorized", "{reply}");
    assert!(over.closed_within(Duration::from_secs(5)));
    assert!(!under.closed_within(Duration::from_millis(500)));
    assert_eq!(gw.metric("edgegate_connections_partial_closed_total"), 1.0);
    // Many such connections cost little: each is closed at 4 KiB.
    let rss_before = rss_kib(gw.pid());
    let mut many = Vec::new();
    for _ in 0..500 {
        // Each from its own address: damping would refuse them at accept.
        let mut s = connect_from(gw.port, fresh_source()).unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = s.write_all(&[b'a'; 65_000]);
        many.push(s);
    }
    gw.wait_metric("edgegate_connections_partial_closed_total", |v| v >= 501.0);
    let rss_after = rss_kib(gw.pid());
    eprintln!(
        "500 unauthenticated 65,000-byte half frames: RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 16 * 1024,
        "RSS grew by {} KiB",
        rss_after - rss_before
    );
}

/// A reader that went away is not a crash: `edgegate token ... | head -c 0`.
#[test]
fn token_and_check_config_exit_quietly_when_stdout_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    write_key(&key);
    for args in [
        vec![
            "token".to_owned(),
            "dev-1".to_owned(),
            "--key-file".to_owned(),
            key.display().to_string(),
        ],
        vec!["check-config".to_owned()],
        vec!["--version".to_owned()],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // closed before the command writes: EPIPE every time
        let out = command().args(&args).stdout(writer).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// One rule for deviceUids: `edgegate token` refuses what a request could
/// not carry (a newline, surrounding whitespace, a leading `#`).
#[test]
fn token_refuses_identities_the_protocol_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    write_key(&key);
    for bad in ["dev\nERROR forged", " dev", "dev ", "#dev", ""] {
        let out = command()
            .args(["token", bad, "--key-file"])
            .arg(&key)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(out.stdout.is_empty(), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("control characters"));
    }
}

#[test]
fn a_device_has_one_rate_limit_across_its_connections() {
    let t = token_gateway(
        GatewayOptions::offline()
            .env("EDGEGATE_LIMITS_REQUESTS_PER_SEC", 1)
            .env("EDGEGATE_LIMITS_BURST", 2),
    );
    let mut first = t.authenticated("dev-rl");
    ack_id(&first.request("a", "1", None, Value::Null));
    ack_id(&first.request("a", "2", None, Value::Null));
    // A new connection has a full bucket of its own; the device's is empty.
    let mut second = t.authenticated("dev-rl");
    let r = second.request("a", "3", None, Value::Null);
    assert_eq!(r["errorCode"], "rate_limited", "{r}");
    // Another device is not held back by it.
    let mut other = t.authenticated("dev-other");
    ack_id(&other.request("a", "4", None, Value::Null));
}
