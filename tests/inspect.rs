//! `edgegate outbox stat|dump|purge` on a real backlog: refused while the
//! gateway runs (naming its PID), then counted, exported and deleted.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::{json, Value};

fn outbox(args: &[&str], data_dir: &std::path::Path) -> (Option<i32>, String, String) {
    let dir = data_dir.to_str().unwrap();
    let all: Vec<&str> = ["outbox"]
        .into_iter()
        .chain(args.iter().copied())
        .chain(["--data-dir", dir])
        .collect();
    run_cli(&all, &[])
}

#[test]
fn the_outbox_of_a_stopped_gateway_is_counted_dumped_and_purged() {
    // Kafka is away: the acked requests wait in the outbox.
    let mut gw = Gateway::start(GatewayOptions::offline());
    let mut d = gw.device();
    let acked: HashSet<String> = (0..5)
        .map(|i| ack_id(&d.request("t", &format!("r{i}"), Some("dev-7"), json!({"i": i}))))
        .collect();
    let (code, _, stderr) = outbox(&["stat"], &gw.data_dir);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "in use by another edgegate process (PID {})",
            gw.pid()
        )),
        "{stderr}"
    );
    gw.kill();

    let (code, stdout, stderr) = outbox(&["stat"], &gw.data_dir);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("requests:        5 in "), "{stdout}");
    assert!(stdout.contains("oldest request:  20"), "{stdout}");
    assert!(stdout.contains("quarantined:     0 request(s)"), "{stdout}");

    let (code, stdout, stderr) = outbox(&["dump"], &gw.data_dir);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    let dumped: HashSet<String> = lines
        .iter()
        .map(|l| l["value"]["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(dumped, acked);
    for l in &lines {
        assert_eq!(l["kind"], "request");
        assert_eq!(l["key"], "dev-7");
        assert_eq!(l["value"]["deviceRequest"]["deviceUid"], "dev-7");
    }
    assert!(stderr.contains("5 record(s)"), "{stderr}");

    // Without --yes nothing goes.
    let (code, _, stderr) = outbox(&["purge"], &gw.data_dir);
    assert_eq!(code, Some(2), "{stderr}");
    let (_, stdout, _) = outbox(&["stat"], &gw.data_dir);
    assert!(stdout.contains("requests:        5 in "), "{stdout}");
    let (code, stdout, stderr) = outbox(&["purge", "--yes"], &gw.data_dir);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("purged 5 request(s)"), "{stdout}");
    let (_, stdout, _) = outbox(&["stat"], &gw.data_dir);
    assert!(
        stdout.contains("requests:        0 in 0 batches"),
        "{stdout}"
    );

    // The gateway starts on the purged store, empty, and takes requests.
    gw.respawn();
    gw.wait_ready();
    assert_eq!(gw.metric("edgegate_outbox_records"), 0.0);
    let mut d = gw.device();
    ack_id(&d.request("t", "after", None, Value::Null));
}

#[test]
fn every_subcommand_has_its_own_help() {
    for (args, expected) in [
        (vec!["--help"], "Usage: edgegate [OPTIONS] [COMMAND]"),
        (vec!["outbox", "--help"], "Usage: edgegate outbox <COMMAND>"),
        (vec!["outbox", "purge", "--help"], "--yes"),
        (
            vec!["token", "--help"],
            "Usage: edgegate token --key-file <PATH> <DEVICE_UID>",
        ),
        (vec!["device", "--help"], "Usage: edgegate device [ADDR]"),
        (
            vec!["check-config", "--help"],
            "Usage: edgegate check-config [OPTIONS]",
        ),
        (vec!["run", "--help"], "Usage: edgegate run [OPTIONS]"),
        (
            vec!["completions", "--help"],
            "Usage: edgegate completions <SHELL>",
        ),
    ] {
        let out = command().args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}");
        assert!(stdout.contains(expected), "{args:?}: {stdout}");
    }
}
