//! SIGHUP (PROTOCOL 4) against the real binary: the log level, the token
//! key and the revocation list are reloaded with connections kept open; a
//! broken configuration is refused and the running settings kept; a change
//! that needs a restart is said to. Also the log formats a reload can pick.
//! (The TLS certificate's reload is in tests/tls.rs.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::tokens::{mint, token_gateway, write_key};
use common::*;
use serde_json::{json, Value};

fn write(path: &Path, text: &str) {
    // Replaced by rename, as configuration management does.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn sighup_reloads_the_log_level_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edgegate.toml");
    write(&file, "[log]\nlevel = \"info\"\n");
    let gw = Gateway::start(GatewayOptions::offline().config(&file).env("RUST_LOG", ""));
    let mut d = gw.device();
    ack_id(&d.request("t", "before", None, json!({})));
    let debug_lines = |log: &str| log.lines().filter(|l| l.contains(" DEBUG ")).count();
    assert_eq!(debug_lines(&gw.log()), 0);

    write(
        &file,
        "[log]\nlevel = \"debug\"\n[listener]\nmax_connections = 7\n",
    );
    gw.signal("HUP");
    gw.wait_metric("edgegate_reloads_total", |v| v == 1.0);
    ack_id(&d.request("t", "after", None, json!({})));
    // A new connection is logged at debug level.
    let mut other = gw.device();
    other.send("Ping");
    assert_eq!(other.line().as_deref(), Some("Pong"));
    let log = gw.log();
    assert!(
        log.contains(r#"reloaded: log.level "debug" (was "info")"#),
        "{log}"
    );
    assert!(
        debug_lines(&log) > 0,
        "no debug line after the reload:\n{log}"
    );
    assert!(
        log.contains("changed, but applied only by a restart: listener.max_connections = 7 (running: 100000)"),
        "{log}"
    );

    // A broken file: refused, said why, nothing changed, nobody dropped.
    write(&file, "[log]\nlevel = \"inof\"\n");
    gw.signal("HUP");
    gw.wait_metric("edgegate_reloads_failed_total", |v| v == 1.0);
    let log = gw.log();
    assert!(
        log.contains("reload refused, the running settings are kept: invalid value for `log.level` (from the config file): `inof` is not a level"),
        "{log}"
    );
    ack_id(&d.request("t", "still", None, json!({})));
    assert_eq!(gw.metric("edgegate_reloads_total"), 1.0);
    assert_eq!(gw.metric("edgegate_connections"), 2.0);
    // SIGHUP never stops the gateway.
    assert!(gw.is_ready());
}

#[test]
fn sighup_reloads_the_token_key_and_the_revocation_list_keeping_connections() {
    let t = token_gateway(GatewayOptions::offline());
    let mut kept = t.authenticated("dev-kept");
    let mut revoked = t.authenticated("dev-gone");
    let old_token = t.token("dev-new");

    // A new key, swapped in by rename (mode 600 as required).
    let fresh = t.key.with_extension("fresh");
    write_key(&fresh);
    std::fs::rename(&fresh, &t.key).unwrap();
    t.set_revoked("dev-gone\n");
    t.gw.signal("HUP");
    t.gw.wait_metric("edgegate_reloads_total", |v| v == 1.0);
    let log = t.gw.log();
    assert!(log.contains("token key"), "{log}");
    assert!(log.contains("revocation list (1 device(s))"), "{log}");

    // Tokens of the old key are refused, those of the new one accepted.
    let mut d = t.connect(fresh_source());
    let reply = t.auth(&mut d, "a1", "dev-new", &old_token);
    assert_eq!(reply["errorCode"], "unauthorized", "{reply}");
    let new_token = mint("dev-new", &t.key);
    let mut d = t.connect(fresh_source());
    let reply = t.auth(&mut d, "a2", "dev-new", &new_token);
    assert_eq!(reply, json!({"action":"auth","uid":"a2","status":"ok"}));
    // The connection authenticated with the old key stays; the revoked one
    // is closed.
    ack_id(&kept.request("t", "k1", None, Value::Null));
    assert!(revoked.closed_within(Duration::from_secs(5)));
}

#[test]
fn journal_and_json_formats_carry_the_level() {
    // journal: a syslog priority prefix, no timestamp.
    let gw = Gateway::start(GatewayOptions::offline().env("EDGEGATE_LOG_FORMAT", "journal"));
    gw.device().send("Ping");
    let log = gw.log();
    let started = log
        .lines()
        .find(|l| l.contains("listening for devices"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        started.starts_with("<6>edgegate::app: listening"),
        "{started}"
    );
    // librdkafka's broker-down warnings, priority 4.
    assert!(log.lines().any(|l| l.starts_with("<4>")), "{log}");
    assert!(
        log.lines().all(|l| l.starts_with('<')),
        "every line has its priority:\n{log}"
    );

    // json: one object per line.
    let gw = Gateway::start(GatewayOptions::offline().env("EDGEGATE_LOG_FORMAT", "json"));
    let log = gw.log();
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["msg"].is_string() && v["ts"].is_string(),
            "{v}"
        );
    }
    assert!(log.contains("\"level\":\"INFO\""), "{log}");
}
